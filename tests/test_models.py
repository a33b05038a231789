import warnings

import pytest
import torch

from igkd.errors import UserError
from igkd.models import (MobileNetV2, Normalized, build_model, count_parameters, load_model, load_weights,
                         read_metadata, save_checkpoint)
from igkd.models.mobilenetv2 import torch_relu6
from conftest import shared_or_skip

# METHOD.md section 2, exactly
PAPER_TABLE = {3: 1_019_402, 5: 543_498, 7: 306_954, 9: 185_738, 11: 77_194, 13: 40_970, 15: 16_042, 17: 1_994}
PAPER_FACTORS = {3: 2.19, 5: 4.12, 7: 7.29, 9: 12.04, 11: 28.97, 13: 54.59, 15: 139.43, 17: 1121.71}
TEACHER = 2_236_682


def test_teacher_parameter_count():
    m = build_model("mobilenetv2")
    assert count_parameters(m) == TEACHER
    assert len(m.features) == 19


@pytest.mark.parametrize("k", sorted(PAPER_TABLE))
def test_truncated_students_match_paper_table(k):
    m = build_model(f"mobilenetv2:drop={k}")
    assert count_parameters(m) == PAPER_TABLE[k]
    assert round(TEACHER / PAPER_TABLE[k], 2) == PAPER_FACTORS[k]
    assert len(m.features) == 19 - k
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_width_students_are_narrow_everywhere_and_run_on_grayscale():
    m = build_model("mobilenetv2:width=0.5", num_classes=7, in_channels=1)
    assert m.features[0][0].in_channels == 1
    assert m.features[-1][0].out_channels == 640
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 7)
    assert count_parameters(m) < count_parameters(build_model("mobilenetv2", 7, 1)) / 3


@pytest.mark.parametrize("bad", ["resnet9000", "mobilenetv2:drop=19", "mobilenetv2:width=0",
                                 "mobilenetv2:depth=3", "mobilenetv2:drop=x", "mobilenetv2:/some/path"])
def test_bad_model_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        build_model(bad)


def test_safetensors_checkpoint_roundtrip_with_metadata(tmp_path):
    net = build_model("mobilenetv2:drop=13", 10, 3)
    model = Normalized(net, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]).eval()
    meta = {"model": "mobilenetv2:drop=13", "num_classes": 10, "in_channels": 3, "classes": list("abcdefghij"),
            "preprocessing": {"normalize": "dataset", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}}
    path = save_checkpoint(tmp_path / "m", model, meta)
    assert path.suffix == ".safetensors" and read_metadata(path)["model"] == meta["model"]
    loaded, lmeta = load_model(path)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert isinstance(loaded, Normalized) and lmeta["classes"] == meta["classes"]
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind


def test_weights_for_another_architecture_are_refused_in_one_line(tmp_path):
    path = save_checkpoint(tmp_path / "m", build_model("mobilenetv2:drop=13"), {"model": "mobilenetv2:drop=13"})
    with pytest.raises(UserError) as e:
        load_weights(build_model("mobilenetv2:drop=5"), path, "model 'mobilenetv2:drop=5'")
    assert "\n" not in str(e.value) and "mobilenetv2:drop=13" in str(e.value)


def test_foreign_pt_loads_safely_and_garbage_is_a_user_error(tmp_path):
    net = build_model("mobilenetv2:drop=15")
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, tmp_path / "x.pt")
    other = load_weights(build_model("mobilenetv2:drop=15"), tmp_path / "x.pt")
    for a, b in zip(other.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_weights(build_model("mobilenetv2:drop=15"), tmp_path / "bad.pt")
    with pytest.raises(UserError):
        load_model(tmp_path / "x.pt")  # no metadata and no spec


@pytest.mark.parametrize("name", ["CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt",
                                  "CIFAR10_KD_T2.5_alpha0.01_p0_gamma0_TestAcc92.29.pt",
                                  "CIFAR10-Train80Rand_Student_TestAcc90.73.pt"])
def test_published_checkpoints_load_into_the_truncated_student_with_same_keys(name):
    path = shared_or_skip("checkpoints", "nordlinglab", name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2(drop=5)
    assert set(model.state_dict()) == set(state)
    model, meta = load_model(path, "mobilenetv2:drop=5")
    assert count_parameters(model) == 543_498 and meta["preprocessing"] == {"normalize": "none"}


@pytest.mark.parametrize("channels_last", [True, False])
def test_inplace_relu6_trains_bitwise_like_torchs_without_copying_activations(channels_last):
    from torch.profiler import ProfilerActivity, profile
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    x = (torch.randn(8, 3, 16, 16) * 4).contiguous(memory_format=fmt)  # wide range: both clamps bite
    nets = []
    for stock in (False, True):
        torch.manual_seed(1)
        net = build_model("mobilenetv2:width=0.25,drop=12", 10, 3)
        nets.append((torch_relu6(net) if stock else net).to(memory_format=fmt).train())
    ours, theirs = nets
    relus = sum(type(m) is torch.nn.ReLU6 for m in theirs.modules())
    assert relus > 0
    clones = []
    for net in nets:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = net(x)
            out.square().sum().backward()
        clones.append(sum(e.count for e in prof.key_averages() if e.key == "aten::clone"))
    assert clones == [0, relus]  # torch copies every in-place ReLU6's input aside; igkd does not
    for (k, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a.grad, b.grad), k
    for (k, a), b in zip(ours.named_buffers(), theirs.buffers()):
        assert torch.equal(a, b), k
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still used by some
            warnings.simplefilter("ignore", DeprecationWarning)
            assert torch.equal(torch.jit.script(ours)(x), theirs(x))  # still scriptable


def test_copy_free_relu6_keeps_each_flag_and_leaves_subclasses_alone():
    from igkd.models.mobilenetv2 import ReLU6, copy_free_relu6

    class Skip(torch.nn.Module):  # the activation's input is used again: must stay out of place
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.act = torch.nn.ReLU6(inplace=False)
            self.inplace_act = torch.nn.ReLU6(inplace=True)
            self.custom = type("MyReLU6", (torch.nn.ReLU6,), {})()

        def forward(self, x):
            h = self.conv(x) * 4
            return self.custom(self.inplace_act(h + self.act(h)))

    torch.manual_seed(0)
    net, x = Skip(), torch.randn(2, 3, 8, 8)
    expected = net(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert copy_free_relu6(net) == 2
    assert type(net.act) is ReLU6 and not net.act.inplace and type(net.inplace_act) is ReLU6 and net.inplace_act.inplace
    assert type(net.custom).__name__ == "MyReLU6"
    out = net(x)
    out.sum().backward()
    assert torch.equal(out, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
