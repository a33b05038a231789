"""BatchNorm folded into the convolution that feeds it, for networks loaded to infer only
(igkd.models.fold.inference_copy, used by evaluate and the corruption scores): the same
logits up to float rounding and the same predictions, only BatchNorm layers fed by a
convolution alone folded, and the network itself wherever the copy would differ."""

import copy

import pytest
import torch
from torch import nn

from igkd.evaluate.metrics import predict
from igkd.models import build_model, count_parameters, inference_copy


def with_statistics(net: nn.Module) -> nn.Module:
    """Running statistics and affine parameters unlike a fresh network's (mean 0, var 1 would
    make a wrongly folded layer look right)."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)
    return net.eval()


def batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


IMAGES = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec, left", [
    ("mobilenetv2:width=0.25,drop=12", 0),
    ("resnet:depth=8", 0),
    ("resnet18", 0),
    # pre-activation: each block's bn1 comes before its conv, and the last bn1 follows a sum
    ("wrn:depth=10,k=1", 4),
])
def test_a_folded_copy_gives_the_same_logits_and_leaves_the_network_as_it_was(spec, left):
    net = with_statistics(build_model(spec, 10, 3))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    want = predict(net, IMAGES)
    mine = inference_copy(net, IMAGES[:4].float() / 255)
    assert mine is not net and batchnorms(mine) == left < batchnorms(net)
    got = predict(mine, IMAGES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


class MaskUse(nn.Module):
    """The convolution's output feeds the BatchNorm and, as a mask the autograd graph does
    not show, the product: folding would compute another function."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        c = self.conv(x)
        return self.fc((self.bn(c) * (c > 0).float()).mean((2, 3)))


class PreActivation(nn.Module):
    """A BatchNorm before a convolution, named as if after it: nothing to fold."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv1(self.bn1(x)).mean((2, 3))


@pytest.mark.parametrize("cls", [MaskUse, PreActivation])
def test_the_network_itself_where_a_folded_copy_would_differ_or_nothing_folds(cls):
    torch.manual_seed(0)
    net = with_statistics(cls())
    assert inference_copy(net, IMAGES[:4].float() / 255) is net


def test_evaluate_reports_the_checkpoints_parameters_and_the_unfolded_networks_predictions(tmp_path):
    import igkd
    from igkd.models import save_checkpoint
    spec = "resnet:depth=8"
    net = with_statistics(build_model(spec, 10, 1))
    save_checkpoint(tmp_path / "m", net, {"model": spec, "num_classes": 10, "in_channels": 1,
                                           "preprocessing": {"normalize": "none"}})
    demo = igkd.load_dataset("demo")
    r = igkd.evaluate(tmp_path / "m.safetensors", data="demo", quiet=True)
    probe = demo.test.images[:4].float() / 255
    assert r["params"] == count_parameters(net) > count_parameters(inference_copy(copy.deepcopy(net), probe))
    assert r["correct"] == predict(net, demo.test.images).argmax(1).eq(demo.test.labels).sum().item()
