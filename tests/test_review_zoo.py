"""Users' own architectures (not igkd's families) through layer choice, training and
evaluation: tiny but structurally faithful ViTs (nn.MultiheadAttention and
scaled_dot_product_attention), a ConvNeXt (depthwise 7x7, channels-last LayerNorm via
permute, layer scale), an EfficientNet (SiLU, squeeze-and-excitation, stochastic depth),
a DenseNet (concatenation, transitions), a GroupNorm net, a Swin-like net whose stages
work on N x H x W x C tensors, and nets returning (logits, features) or a dict."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igkd
from igkd.attribution.gradcam import auto_layer, gradcam
from igkd.config import DistillConfig, build
from igkd.distill.attention import choose_layers
from igkd.errors import UserError
from igkd.evaluate.metrics import predict

SHAPE = (1, 16, 16)


class MHABlock(nn.Module):
    def __init__(self, dim, sdpa):
        super().__init__()
        self.sdpa, self.heads = sdpa, 2
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        if self.sdpa:
            b, n, c = h.shape
            q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        else:
            a = self.attn(h, h, h, need_weights=False)[0]
        x = x + a
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, num_classes, in_channels, sdpa=False, dim=16, patch=4, size=16):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(MHABlock(dim, sdpa), MHABlock(dim, sdpa))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm, self.pw1, self.pw2 = nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x):
        h = self.pw2(F.gelu(self.pw1(self.norm(self.dwconv(x).permute(0, 2, 3, 1))))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


def convnext(num_classes, in_channels):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 2, 2), CNBlock(8), CNBlock(8), nn.Conv2d(8, 16, 2, 2),
                         CNBlock(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, num_classes))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, stride, p=0.1):
        super().__init__()
        h = 4 * cin
        self.block = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU(),
                                   nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU(),
                                   SE(h), nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.res, self.p = stride == 1 and cin == cout, p

    def forward(self, x):
        y = self.block(x)
        if self.res and self.training:  # stochastic depth
            y = y * (torch.rand(len(y), 1, 1, 1) >= self.p) / (1 - self.p)
        return x + y if self.res else y


def efficientnet(num_classes, in_channels):
    return nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
                         MBConv(8, 8, 1), MBConv(8, 16, 2), MBConv(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(16, num_classes))


class Dense(nn.Module):
    def __init__(self, cin, g=4):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(cin), nn.Conv2d(cin, g, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


def densenet(num_classes, in_channels):
    transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False), nn.AvgPool2d(2))
    return nn.Sequential(nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), Dense(8), Dense(12), transition,
                                       Dense(8), Dense(12)),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def groupnorm(num_classes, in_channels):
    def block(i, o, s):
        return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.GroupNorm(4, o), nn.ReLU())
    return nn.Sequential(block(in_channels, 8, 1), block(8, 8, 2), block(8, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class NHWCStage(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Merge(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.red = nn.Linear(4 * c, 2 * c)

    def forward(self, x):
        return self.red(torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1))


def swin(num_classes, in_channels):
    """torchvision's Swin layout: stages on N x H x W x C, permuted back only before pooling."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 8, 2, 2), Permute(0, 2, 3, 1), nn.LayerNorm(8))
    return nn.Sequential(nn.Sequential(stem, NHWCStage(8), Merge(8), NHWCStage(16)), nn.LayerNorm(16),
                         Permute(0, 3, 1, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


class TupleOut(nn.Module):
    """mdistiller / torchdistill style: forward returns (logits, features)."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = groupnorm(num_classes, in_channels)

    def forward(self, x):
        return self.body(x), {"feats": [x]}


NETS = {  # net: (its factory, auto Grad-CAM layer, auto AT layer of the net with itself; None: refused)
    "vit_mha": (lambda n, c: ViT(n, c), None, None),
    "vit_sdpa": (lambda n, c: ViT(n, c, sdpa=True), None, None),
    "convnext": (convnext, "4", "4"),
    "efficientnet": (efficientnet, "3", "3"),
    "densenet": (densenet, "1", "1"),
    "groupnorm": (groupnorm, "2.2", "1.2"),
    "swin": (swin, "2", "2"),  # not "1", the N x 4 x 4 x 16 LayerNorm read as C=4, H=4, W=16
}


@pytest.mark.parametrize("name", list(NETS))
def test_auto_layers_of_users_architectures(name):
    factory, cam_layer, at_layer = NETS[name]
    torch.manual_seed(0)
    net = factory(3, 1)
    assert net(torch.rand(2, *SHAPE)).shape == (2, 3)
    if cam_layer is None:  # a ViT: its only feature map is the patch embedding; tokens after it
        with pytest.raises(UserError, match=r"first layer patch_embed, before blocks giving 17 x 16 \(tokens") as e:
            auto_layer(net, SHAPE)
        assert "--gradcam-layer" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(UserError, match="--at-teacher-layer patch_embed to use it anyway"):
            choose_layers(net, factory(3, 1), "auto", "auto", SHAPE)
        # named, it is taken
        assert gradcam(net, torch.rand(2, *SHAPE), 0, layer="patch_embed").shape == (2, 16, 16)
        return
    assert auto_layer(net, SHAPE) == cam_layer
    assert choose_layers(net, factory(3, 1), "auto", "auto", SHAPE)[:2] == (at_layer, at_layer)
    assert gradcam(net, torch.rand(2, *SHAPE), 0).shape == (2, 16, 16)


def test_channels_last_layers_named_are_taken_with_a_warning(capsys):
    # auto passes them over (above); a layer the user names is taken, since an unpadded
    # convolution on a non-square input also changes the aspect: one warning says why it may be wrong
    net = swin(3, 1)
    assert choose_layers(net, swin(3, 1), "1", "1", SHAPE)[:2] == ("1", "1")
    gradcam(net, torch.rand(2, *SHAPE), 0, layer="1")
    gradcam(net, torch.rand(2, *SHAPE), 0, layer="1")
    err = capsys.readouterr().err
    assert err.count("igkd: warning: --at-teacher-layer 1 gives 4 x 4 x 16, whose H x W does not keep") == 1
    assert err.count("--gradcam-layer 1 gives 4 x 4 x 16") == 1 and "channels-last" in err


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    images = (torch.rand(n, *SHAPE, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) * 0.3).clamp(0, 1)
    return igkd.from_tensors(train=(images, labels), test=(images[:8], labels[:8]), classes=["a", "b", "c"])


def test_attention_students_train_with_explain(tmp_path):
    """explain differentiates the student's gradient: through the fused attention kernels (a
    ViT's MultiheadAttention or scaled_dot_product_attention) the first step failed with
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"."""
    cfg = build(DistillConfig, dict(method="kd+explain", explain_layer="patch_embed", epochs=1, batch_size=8,
                                    ig_steps=2, check_images=0, val_fraction=0.0, threads=1))
    for sdpa in (False, True):
        torch.manual_seed(0)
        s = igkd.distill(cfg, tmp_path / f"sdpa{sdpa}", quiet=True, data=_data(), teacher=groupnorm(3, 1),
                         student=ViT(3, 1, sdpa=sdpa))
        assert s["explain"]["student_layer"] == "patch_embed"


def test_tuple_outputs_are_one_line_where_models_are_scored():
    """evaluate and export score through predict: a (logits, features) forward was an
    AttributeError traceback ('tuple' object has no attribute 'shape')."""
    images = torch.zeros(4, *SHAPE, dtype=torch.uint8)
    with pytest.raises(UserError, match=r"returns a tuple, not a tensor of logits.*returns net\(x\)\[0\]"):
        predict(TupleOut(3, 1), images, channels_last=False)
