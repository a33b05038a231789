"""Regressions: the teacher identity of stores, the fast attribution copy's fallbacks,
checkpoint key handling, spec round trips and int8 export of graphs ORT's shape inference
cannot follow."""

import warnings

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

from igkd.attribution.engine import _prepare
from igkd.models import fold_batchnorm as _fold_batchnorm
from igkd.attribution.ig import integrated_gradients
from igkd.config import PrecomputeConfig
from igkd.data import Dataset, Split
from igkd.errors import UserError
from igkd.models import build_model, load_model, save_checkpoint, teacher_identity, weights_fingerprint
from igkd.precompute import default_store_dir, store_identity
from igkd.spec import parse_spec


def _data(channels=1, size=8) -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = Split((torch.rand(6, channels, size, size, generator=g) * 255).to(torch.uint8), torch.arange(6) % 2)
    return Dataset("tiny", ["a", "b"], channels, (size, size), split, split)


def _store_dir(teacher, data):
    return default_store_dir(store_identity(teacher, data, PrecomputeConfig()))


# ----------------------------------------------------------------------- 1: teacher identity
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_frozen_torchscript_teachers_get_their_own_stores(tmp_path):
    from igkd.export import torchscript_module
    data, teachers = _data(), []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        path = tmp_path / f"t{len(teachers)}.pt"
        torch.jit.save(torchscript_module(build_model("resnet:depth=8", 2, 1).eval(), (1, 8, 8)), str(path))
        teachers.append(load_model(f"torchscript:{path}")[0])  # as `--teacher torchscript:FILE` loads it
    a, b, a_again = teachers
    assert a.state_dict() == {} and weights_fingerprint(a) == weights_fingerprint(b)  # frozen: weights are constants
    x = torch.rand(2, 1, 8, 8)
    assert not torch.allclose(a(x), b(x))  # two different teachers...
    assert _store_dir(a, data) != _store_dir(b, data)  # ...two stores
    key = store_identity(a, data, PrecomputeConfig(), settings=False)  # what fitted schedules are cached by
    assert key != store_identity(b, data, PrecomputeConfig(), settings=False)
    assert _store_dir(a, data) == _store_dir(a_again, data)  # the same program (another file, same bytes) reuses


def test_same_weights_in_another_architecture_get_another_store():
    data = _data(3, 16)
    torch.manual_seed(0)
    a = build_model("mobilenetv2:width=0.25,drop=10", 2, 3).eval()
    b = build_model("mobilenetv2_imagenet:width=0.25,drop=10", 2, 3).eval()
    b.load_state_dict(a.state_dict())  # the same state dict fits both; the strides differ
    torch.nn.init.normal_(a.classifier[1].weight)
    b.classifier[1].weight.data.copy_(a.classifier[1].weight)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))
    assert weights_fingerprint(a) == weights_fingerprint(b)  # the model card's "weights fingerprint" is unchanged
    assert _store_dir(a, data) != _store_dir(b, data)
    # without the spec (a module handed to the API), the modules' strides still tell them apart
    for net in (a, b):
        del net._igkd_spec
    assert teacher_identity(a) != teacher_identity(b)
    # the same architecture and weights name the same store; the order of options does not matter
    c, d = build_model("mobilenetv2:width=0.25,drop=3", 2, 3), build_model("mobilenetv2:drop=3,width=0.25", 2, 3)
    d.load_state_dict(c.state_dict())
    assert teacher_identity(c) == teacher_identity(d)


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_scripted_teachers_differing_only_in_an_attribute_are_told_apart():
    class Scaled(nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.scale = scale
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean((2, 3))) * self.scale

    torch.manual_seed(0)
    a = torch.jit.script(Scaled(2.0))
    b = torch.jit.script(Scaled(3.0))
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b) and teacher_identity(a) != teacher_identity(b)


# ----------------------------------------------------------------------- 2, 3: fast copy
def _bn(c):
    b = nn.BatchNorm2d(c)
    b.running_mean.uniform_(-1, 1)
    b.running_var.uniform_(0.3, 3)
    b.weight.data.uniform_(0.5, 2)
    b.bias.data.uniform_(-1, 1)
    return b


class _InplaceIgnored(nn.Module):  # the in-place ReLU's return value is dropped: only aliasing applies it
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Linear(8, 5)

    def forward(self, x):
        out = self.conv(x)
        self.relu(out)
        return self.fc(out.mean((2, 3)))


class _MaskUse(nn.Module):  # the conv output feeds the BatchNorm and, as a mask, the product
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), _bn(8), nn.Linear(8, 5)

    def forward(self, x):
        c = self.conv(x)
        return self.fc((self.bn(c) * (c > 0).float()).mean((2, 3)))


class _WeightNormBN(nn.Module):
    def __init__(self, parametrization: bool):
        super().__init__()
        conv = nn.Conv2d(3, 8, 3, padding=1)
        wn = nn.utils.parametrizations.weight_norm if parametrization else nn.utils.weight_norm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy weight_norm's deprecation notice
            self.conv = wn(conv)
        self.bn, self.fc = _bn(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _ig_error(model, x, y):
    ref = IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=y, n_steps=16, method="gausslegendre")
    ours = integrated_gradients(model, x, y, baseline="black", n_steps=16, fast=True)
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("cls", [_InplaceIgnored, _MaskUse])
def test_fast_copy_that_changes_the_function_falls_back_to_the_model(cls, capsys):
    torch.manual_seed(0)
    model = cls().double().eval()
    x, y = torch.rand(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 3])
    assert _ig_error(model, x, y) < 1e-7  # was 1.18 and 0.705: the fast copy computed another function
    assert "igkd: note: the fast copy of the model" in capsys.readouterr().err
    _ig_error(model, x, y)
    assert capsys.readouterr().err == ""  # said once per model, not once per call (per store chunk)


def test_fast_copy_is_kept_when_it_is_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _bn(8), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(4))
    model(torch.rand(1, 3, 6, 6))
    net, _ = _prepare(model.eval(), torch.rand(2, 3, 6, 6), True)
    assert net is not model and isinstance(net[1], nn.Identity)  # BatchNorm folded: the fast path still runs


@pytest.mark.parametrize("parametrization", [False, True])
def test_weight_normed_conv_before_batchnorm_is_not_folded(parametrization):
    torch.manual_seed(0)
    model = _WeightNormBN(parametrization).eval()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        model(x)  # e.g. an evaluation before precompute: the hook-made weight is a plain tensor now
    assert _ig_error(model, x, y) < 1e-5  # crashed in the fold (deepcopy of a non-leaf weight)
    assert _fold_batchnorm(model, x[:1]) == 0 and isinstance(model.bn, nn.BatchNorm2d)


# ----------------------------------------------------------------------- 4, 5: checkpoints
WRAP = """
from torch import nn
class Wrap(nn.Module):
    def __init__(self, num_classes=10, in_channels=3, only_child=False):
        super().__init__()
        self.module = nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    *([nn.Linear(4, num_classes)] if only_child else []))
        self.fc = nn.Identity() if only_child else nn.Linear(4, num_classes)
    def forward(self, x):
        return self.fc(self.module(x))
"""


def test_a_child_named_module_keeps_its_prefix(tmp_path):
    (tmp_path / "wrapnet.py").write_text(WRAP)
    spec = f"py:{tmp_path / 'wrapnet.py'}:Wrap"
    x = torch.rand(2, 3, 6, 6)
    torch.manual_seed(0)
    net = build_model(spec, 5, 3).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", net, {"model": spec, "num_classes": 5, "in_channels": 3})
    torch.testing.assert_close(load_model(path, spec)[0](x), net(x), rtol=0, atol=0)  # igkd's own file: was refused
    # a DDP-wrapped foreign file of it: only the wrapper's prefix (on every key) goes
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    torch.testing.assert_close(load_model(tmp_path / "ddp.pt", spec, 5, 3)[0](x), net(x), rtol=0, atol=0)
    # a foreign file of a network whose only child is `module`: every key has the prefix, and fits as stored
    only = build_model(spec + ",only_child=true", 5, 3).eval()
    torch.save(only.state_dict(), tmp_path / "only.pt")
    torch.testing.assert_close(load_model(tmp_path / "only.pt", spec + ",only_child=true", 5, 3)[0](x), only(x),
                               rtol=0, atol=0)


def test_state_dict_without_num_batches_tracked_loads(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnet:depth=8", 10, 3)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # torch < 0.4.1
    torch.save(state, tmp_path / "old.pth")
    loaded, _ = load_model(tmp_path / "old.pth", "resnet:depth=8", 10, 3)
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert int(got["bn1.num_batches_tracked"]) == 0
    del state["fc.weight"]  # anything else missing is still refused, naming it
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"1 missing key\(s\), e.g. fc.weight"):
        load_model(tmp_path / "bad.pth", "resnet:depth=8", 10, 3)


# ----------------------------------------------------------------------- 6: spec strings
@pytest.mark.parametrize("text", [
    'imagefolder:"/data/run=1",size=32', 'torchscript:"/tmp/runs/lr=0.1/teacher.pt"',
    'py:"/tmp/exp=2/net.py:make",width=16', 'imagefolder:"/data/cats, dogs",size=64',
    'imagefolder:"/my data/a=b, c",size=32x32,resize=shorter', "imagefolder:\"it's\",size=8",
    "imagefolder:'say \"a\"'\"it's\",size=8", 'imagefolder:" /padded ",test=0.2', "mobilenetv2:drop=5,width=0.5",
    "py:/tmp/net.py:make", "demo", 'kind:"",x=1', "imagefolder:/d,tag='a=b, c'",
])
def test_spec_round_trips(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec, str(spec)


def test_repeated_spec_option_is_refused():
    with pytest.raises(UserError, match="option 'drop' is given twice") as e:
        build_model("mobilenetv2:drop=5,DROP=3")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- 7: int8 export
class _Attention(nn.Module):  # ORT's symbolic shape inference asserts on MultiheadAttention's Reshape
    def __init__(self):
        super().__init__()
        self.patch, self.attn, self.head = nn.Conv2d(3, 16, 4, 4), nn.MultiheadAttention(16, 2, batch_first=True), \
            nn.Linear(16, 4)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return self.head((t + self.attn(t, t, t, need_weights=False)[0]).mean(1))


def test_int8_of_multihead_attention_and_failures_are_user_errors(tmp_path):
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from igkd.export import onnx_bytes, ort_runner, ort_session, quantize_int8
    torch.manual_seed(0)
    model, shape = _Attention().eval(), (3, 8, 8)
    calib = (torch.rand(8, *shape) * 255).to(torch.uint8)
    fp32 = onnx_bytes(model, shape)
    quantize_int8(fp32, tmp_path / "q.onnx", calib, batch_size=8)  # was a bare AssertionError
    # the same as ORT's own pipeline without symbolic shape inference, to the bit
    (tmp_path / "a.onnx").write_bytes(fp32)
    quant_pre_process(str(tmp_path / "a.onnx"), str(tmp_path / "p.onnx"), skip_symbolic_shape=True)

    class Reader:
        batches = iter([{"images": calib.float().div(255).numpy()}])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(tmp_path / "p.onnx"), str(tmp_path / "ref.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    x = torch.rand(3, *shape)
    ours, ref = ort_runner(ort_session(tmp_path / "q.onnx"))(x), ort_runner(ort_session(tmp_path / "ref.onnx"))(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    with pytest.raises(UserError, match="int8 quantisation failed while preparing the graph") as e:
        quantize_int8(b"not an onnx graph", tmp_path / "bad.onnx", calib)
    assert "\n" not in str(e.value)
