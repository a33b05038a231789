"""Model families beyond the paper's MobileNetV2: parameter counts against the published
figures, torchvision's state_dict naming (from a table written here, not from igkd's
modules), foreign checkpoint wrappers, and one-line errors for bad specs."""

import argparse
import re

import pytest
import torch
from safetensors.torch import save_file

from igkd.errors import UserError
from igkd.models import build_model, count_parameters, load_model, load_weights, read_state_dict


OPTION_B = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # the two 1x1 conv + BN shortcuts He et al.'s option A lacks


@pytest.mark.parametrize("spec,classes,count,published,extra", [
    # He et al. 2016, table 6 (option A shortcut: our count minus the option-B shortcuts)
    ("resnet:depth=20", 10, 272_474, "0.27M", OPTION_B),
    ("resnet:depth=32", 10, 466_906, "0.46M", OPTION_B),
    ("resnet:depth=44", 10, 661_338, "0.66M", OPTION_B),
    ("resnet:depth=56", 10, 855_770, "0.85M", OPTION_B),
    ("resnet:depth=110", 10, 1_730_714, "1.7M", OPTION_B),
    # RepDistiller's table (CIFAR-100, option B as here)
    ("resnet:depth=8,width=4", 100, 1_233_540, "1.23M", 0),
    ("resnet:depth=32,width=4", 100, 7_433_860, "7.43M", 0),
    ("wrn:depth=16,k=2", 100, 703_284, "0.70M", 0),
    ("wrn:depth=40,k=2", 100, 2_255_156, "2.26M", 0),
    # torchvision's exact counts
    ("resnet18", 1000, 11_689_512, "11689512", 0),
    ("resnet34", 1000, 21_797_672, "21797672", 0),
    ("resnet50", 1000, 25_557_032, "25557032", 0),
    ("mobilenetv2_imagenet", 1000, 3_504_872, "3504872", 0),
    ("mobilenetv2", 10, 2_236_682, "2236682", 0),
])
def test_parameter_counts_match_published(spec, classes, count, published, extra):
    n = count_parameters(build_model(spec, classes, 3))
    assert n == count
    if published.endswith("M"):  # the published figure is n rounded to its last digit
        digits = len(published[:-1].partition(".")[2])
        assert round((n - extra) / 1e6, digits) == float(published[:-1])
    else:
        assert n == int(published)


@pytest.mark.parametrize("spec,size,classes", [("resnet:depth=20", 32, 10), ("resnet:depth=8,width=4", 32, 7),
                                               ("wrn:depth=16,k=2", 32, 10), ("resnet18", 64, 5),
                                               ("resnet50", 64, 5), ("mobilenetv2_imagenet", 64, 5)])
def test_families_take_any_channel_count(spec, size, classes):
    net = build_model(spec, classes, 1).eval()
    with torch.no_grad():
        assert net(torch.rand(2, 1, size, size)).shape == (2, classes)


# --------------------------------------------------------------------------- torchvision's naming
def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def torchvision_resnet_shapes(blocks, bottleneck, classes=1000):
    """torchvision.models.resnet's keys and shapes, written from its naming scheme."""
    s = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        out = planes * (4 if bottleneck else 1)
        for j in range(n):
            p = f"layer{i}.{j}"
            if bottleneck:
                s.update({f"{p}.conv1.weight": (planes, cin, 1, 1), **_bn(f"{p}.bn1", planes),
                          f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes),
                          f"{p}.conv3.weight": (out, planes, 1, 1), **_bn(f"{p}.bn3", out)})
            else:
                s.update({f"{p}.conv1.weight": (planes, cin, 3, 3), **_bn(f"{p}.bn1", planes),
                          f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes)})
            if j == 0 and (cin != out or i > 1):
                s.update({f"{p}.downsample.0.weight": (out, cin, 1, 1), **_bn(f"{p}.downsample.1", out)})
            cin = out
    s.update({"fc.weight": (classes, cin), "fc.bias": (classes,)})
    return s


def torchvision_mobilenetv2_shapes(classes=1000):
    """torchvision.models.mobilenetv2's keys and shapes (Conv2dNormActivation = conv, bn, relu6)."""
    s = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    cin, idx = 32, 1
    for t, c, n, _ in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                       (6, 320, 1, 1)]:
        for _ in range(n):
            p, hidden, k = f"features.{idx}.conv", cin * t, 0
            if t != 1:
                s.update({f"{p}.0.0.weight": (hidden, cin, 1, 1), **_bn(f"{p}.0.1", hidden)})
                k = 1
            s.update({f"{p}.{k}.0.weight": (hidden, 1, 3, 3), **_bn(f"{p}.{k}.1", hidden),
                      f"{p}.{k + 1}.weight": (c, hidden, 1, 1), **_bn(f"{p}.{k + 2}", c)})
            cin, idx = c, idx + 1
    s.update({"features.18.0.weight": (1280, 320, 1, 1), **_bn("features.18.1", 1280),
              "classifier.1.weight": (classes, 1280), "classifier.1.bias": (classes,)})
    return s


TORCHVISION = {"resnet18": lambda: torchvision_resnet_shapes([2, 2, 2, 2], False),
               "resnet50": lambda: torchvision_resnet_shapes([3, 4, 6, 3], True),
               "mobilenetv2_imagenet": torchvision_mobilenetv2_shapes}


def _random_state(shapes):
    g = torch.Generator().manual_seed(1)
    return {k: (torch.randint(0, 100, (), generator=g) if k.endswith("num_batches_tracked")
                else torch.rand(shape, generator=g)) for k, shape in shapes.items()}


@pytest.mark.parametrize("spec", sorted(TORCHVISION))
def test_torchvision_state_dict_loads_unchanged(tmp_path, spec):
    state = _random_state(TORCHVISION[spec]())
    # as torchvision's reference train.py saves it: a dict with the model, optimizer and argparse args
    torch.save({"model": state, "optimizer": {"state": {}}, "epoch": 89, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "checkpoint.pth")
    net, _ = load_model(tmp_path / "checkpoint.pth", spec, 1000, 3)
    got = net.state_dict()
    assert list(got) == list(state)  # same names in the same order
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    # a DDP-wrapped .safetensors without igkd metadata loads the same way
    save_file({"module." + k: v for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(load_model(tmp_path / "w.safetensors", spec, 1000, 3)[0].state_dict(), got,
                               rtol=0, atol=0)


@pytest.mark.parametrize("spec", sorted(TORCHVISION))
def test_mismatched_torchvision_state_dict_is_one_line(tmp_path, spec):
    shapes = TORCHVISION[spec]()
    key = sorted(k for k in shapes if k.endswith("conv2.weight") or k.endswith(".3.weight"))[0]
    bad = dict(shapes, **{key: (1, *shapes[key][1:])})
    torch.save(_random_state(bad), tmp_path / "bad.pth")
    with pytest.raises(UserError, match=f"shape mismatch.*{key}") as e:
        load_model(tmp_path / "bad.pth", spec, 1000, 3)
    assert "\n" not in str(e.value)
    missing = {k: v for k, v in shapes.items() if k != "fc.weight" and k != "classifier.1.weight"}
    torch.save(_random_state(missing), tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"1 missing key\(s\), e.g. (fc|classifier\.1)\.weight"):
        load_weights(build_model(spec, 1000, 3), tmp_path / "missing.pth", spec)


def test_hostile_pickle_runs_nothing(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))
    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="cannot read weights"):
        read_state_dict(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("bad,words", [
    ("resnet:depth=21", "6n+2"), ("resnet:depth=20,width=0", "width=0"), ("resnet:depth=20,k=2", "unknown option"),
    ("wrn:depth=41", "6n+4"), ("wrn:depth=16,k=0", "k=0"), ("resnet18:depth=3", "unknown option"),
    ("resnet:foo", "no positional"), ("resnet:depth=x", "not a valid int"), ("vgg16", "unknown model"),
    ("mobilenetv2_imagenet:drop=19", "drop=19"),
])
def test_bad_family_specs_are_one_line(bad, words):
    with pytest.raises(UserError, match=re.escape(words)) as e:
        build_model(bad)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- IG of every family
class TinyCNN(torch.nn.Module):
    """A user's own network (the py: family), with a conv+BN pair outside any Sequential."""

    def __init__(self, num_classes=10, in_channels=3, width=8):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(width)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _trained_like(net):
    """Random BatchNorm statistics and affine terms, so folding them is not a no-op."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net.eval()


@pytest.mark.parametrize("spec,size", [("resnet:depth=20", 16), ("resnet:depth=8,width=4", 16),
                                       ("wrn:depth=16,k=2", 16), ("resnet18", 32), ("resnet50", 32),
                                       ("mobilenetv2_imagenet", 32), ("mobilenetv2:width=0.5,drop=9", 16),
                                       ("py:test_families:TinyCNN,width=6", 12)])
def test_ig_of_every_family_agrees_with_captum(spec, size, monkeypatch):
    from captum.attr import IntegratedGradients

    from igkd.attribution import integrated_gradients
    from igkd.models import fold_batchnorm as _fold_batchnorm
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    torch.manual_seed(0)
    net = _trained_like(build_model(spec, 5, 3))
    x, y = torch.rand(2, 3, size, size), torch.tensor([1, 3])
    theirs = IntegratedGradients(net).attribute(x, target=y, n_steps=8)
    exact = integrated_gradients(net, x, y, n_steps=8, fast=False)
    fast = integrated_gradients(net, x, y, n_steps=8)  # BatchNorm folded, channels_last
    scale = theirs.abs().max()
    assert (exact - theirs).abs().max() <= 1e-5 * scale
    assert torch.linalg.norm(fast - theirs) <= 2e-3 * torch.linalg.norm(theirs)
    copy_ = __import__("copy").deepcopy(net)
    with torch.enable_grad():
        folded = _fold_batchnorm(copy_, x[:1])
    assert folded >= 1 and not torch.equal(fast, exact)  # the fast path really folded something
