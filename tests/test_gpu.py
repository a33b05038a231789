"""The GPU paths (issue 15): integrated gradients on CUDA against the CPU, under bf16 and fp16
autocast against the error the quadrature already has, distillation with AMP through the
command, torchrun with nccl, export of a CUDA-trained checkpoint, and a checkpoint saved
from CUDA tensors loading on a machine without a GPU, a frozen TorchScript teacher on CUDA,
the statistics of the differentiable synchronised BatchNorm under fp16, and training steps
that never make the host wait for the GPU.

The GPU tests are marked ``gpu`` (:func:`gpu`; ``pytest -m gpu``, which
``scripts/gpu_check.sh`` runs with the benchmarks) and skipped with a reason where torch sees
no CUDA device, so the CPU suite and CI pass over them; the tests without the mark check on
the CPU what the GPU paths rely on. Measured figures go to the JUnit XML (``--junitxml``) as
properties, for the README.

Map errors are the relative L1 igkd reports everywhere (``igkd.precompute.relative_l1``,
sum |M - R| / sum |R| per image, over the map sum_c |IG|), on 16 evenly spaced training
images of the demo set with the shipped demo teacher. Tolerances, and why:

* CUDA float32 (TF32 off) against the CPU: per image at most 5e-3, mean at most 1e-3. The
  same function with other float rounding: IG of a ReLU network is sensitive to rounding
  (a step within rounding of a kink switches a unit), and two CPU paths (folded BatchNorm in
  channels_last against the model as is; float32 against float64) differ by up to 4e-4 on
  this teacher. 5e-3 leaves room for cuDNN's other kernels and stays 10x below the error of
  the quadrature itself.
* Lower precision (TF32 convolutions, torch's CUDA default; bf16 and fp16 autocast): its
  map error (against float32 IG at the same steps) must be below the quadrature error the
  default settings already accept on the same images (IG-50 midpoint against IG-512
  Gauss-Legendre in float32: 3% to 14% per image on this teacher on the CPU). A precision
  that costs more than the quadrature error is not good enough for the maps; this says
  whether it does, which no CPU can.
"""

import json
import math
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import igkd
from helpers_cli import run_igkd
from igkd.attribution import attribution_map, integrated_gradients
from igkd.data import load_dataset
from igkd.models import bare
from igkd.precompute import relative_l1

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False (scripts/gpu_check.sh runs these on one)"


def gpu(test):
    """A GPU test: marked ``gpu`` and skipped, with the reason, where torch sees no CUDA device.
    The tests here without it check on the CPU what the GPU paths rely on."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)(test))


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])


DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
STUDENT = "mobilenetv2:width=0.5,drop=5"  # the demo recipe's student
SAME_MAX, SAME_MEAN = 5e-3, 1e-3  # CUDA float32 against CPU float32 (module docstring)


@contextmanager
def full_fp32():
    """float32 convolutions and matmuls on CUDA (TF32 off), restored after."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def demo_batch(n: int = 16):
    train = load_dataset("demo").train
    idx = torch.linspace(0, len(train) - 1, n).round().long()
    return train.images[idx].float() / 255, train.labels[idx]


def ig_map(model, x, y, steps: int = 50, method: str = "riemann_middle", fast: bool = True) -> torch.Tensor:
    """The overlay map of IG (igkd's default quadrature unless told), as float32 on the CPU."""
    return attribution_map(integrated_gradients(model, x, y, n_steps=steps, method=method, fast=fast)).float().cpu()


def teacher(device: str):
    return igkd.load_model(DEMO_TEACHER)[0].to(device)


@pytest.fixture(scope="module")
def quadrature():
    """(x, y on CUDA, float32 IG-50 maps on CUDA, the quadrature error of IG-50 per image)."""
    x, y = (t.cuda() for t in demo_batch())
    net = teacher("cuda")
    with full_fp32():
        fp32 = ig_map(net, x, y)
        reference = ig_map(net, x, y, steps=512, method="gausslegendre", fast=False)
    return x, y, fp32, relative_l1(fp32, reference)


@gpu
def test_ig_on_cuda_equals_ig_on_cpu(quadrature, record_property):
    x, y, _, quad = quadrature
    cpu = ig_map(teacher("cpu"), x.cpu(), y.cpu())
    net = teacher("cuda")
    with full_fp32():
        exact = relative_l1(ig_map(net, x, y), cpu)
    tf32 = relative_l1(ig_map(net, x, y), cpu)  # torch's CUDA defaults: TF32 convolutions on Ampere and later
    for name, v in (("ig_cuda_fp32_vs_cpu_max", exact.max()), ("ig_cuda_fp32_vs_cpu_mean", exact.mean()),
                    ("ig_cuda_default_tf32_vs_cpu_mean", tf32.mean()), ("ig50_quadrature_error_mean", quad.mean())):
        record_property(name, float(v))
    assert exact.max() < SAME_MAX and exact.mean() < SAME_MEAN, exact
    assert tf32.mean() < quad.mean(), (tf32, quad)


@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_ig_errs_less_than_the_quadrature(quadrature, amp, record_property):
    """IG run by a user under torch.autocast (igkd has no precision option for IG): the maps
    must stay finite and within the quadrature error of the same settings."""
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    x, y, fp32, quad = quadrature
    with torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16):
        low = ig_map(teacher("cuda"), x, y)
    err = relative_l1(low, fp32)
    record_property(f"ig_{amp}_autocast_vs_fp32_mean", float(err.mean()))
    record_property(f"ig_{amp}_autocast_vs_fp32_max", float(err.max()))
    record_property("ig50_quadrature_error_mean", float(quad.mean()))
    assert torch.isfinite(low).all()
    assert err.mean() < quad.mean(), (err, quad)


@pytest.fixture(scope="module")
def amp_run(tmp_path_factory):
    """``igkd distill`` of kd+ig on the demo set for two epochs on CUDA with ``--amp AMP`` (the
    store, IG on CUDA, built by the first); run once per AMP and kept for the other tests."""
    runs: dict[str, tuple[Path, dict]] = {}

    def get(amp: str) -> tuple[Path, dict]:
        if amp not in runs:
            out = tmp_path_factory.mktemp("gpu") / f"kdig-{amp}"
            r = run_igkd("distill", "--data", "demo", "--teacher", DEMO_TEACHER, "--method", "kd+ig", "--model",
                         STUDENT, "--normalize", "none", "--epochs", "2", "--batch-size", "64", "--optimizer", "adam",
                         "--lr", "0.002", "--weight-decay", "0", "--warmup-epochs", "0", "--schedule", "constant",
                         "--alpha", "0.5", "--p", "0.5", "--ig-steps", "4", "--check-images", "0", "--device", "cuda",
                         "--amp", amp, "--out", out, "--json")
            assert r.returncode == 0, r.stderr[-3000:]
            runs[amp] = out, json.loads(r.stdout)
        return runs[amp]
    return get


@gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_distill_with_amp(amp_run, amp, record_property):
    """Two epochs with autocast (and loss scaling for fp16) through the command: finite losses
    that fall from the first epoch to the second, and a float32 checkpoint. (No accuracy bar:
    after 56 steps from scratch the demo student may still sit near chance on the test split.)"""
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    out, summary = amp_run(amp)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["amp"], cfg["device"]) == (amp, "cuda")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[1]["loss"] < rows[0]["loss"], rows  # it learns
    assert summary["train_images"] == 1800 and math.isfinite(summary["test_accuracy"])
    record_property(f"distill_{amp}_test_accuracy", summary["test_accuracy"])
    record_property(f"distill_{amp}_images_per_s", rows[-1].get("images_per_s"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ("scaler" in state) == (amp == "fp16")  # fp16 trains with loss scaling, bf16 without
    weights = igkd.load_model(out / "model.safetensors")[0]
    assert all(p.dtype == torch.float32 for p in weights.parameters())  # AMP keeps float32 weights


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason=f"nccl under torchrun needs a GPU per process (igkd puts rank r on cuda:r) and this "
                    f"machine has {torch.cuda.device_count() if torch.cuda.is_available() else 0}")
@gpu
def test_two_nccl_processes_train_like_one(small_real, tmp_path):
    """tests/test_distributed.py's gloo comparison on two GPUs: 2 nccl processes with batch 32
    each against one process with batch 64. GPU kernels are not bitwise deterministic (atomic
    adds in some cuDNN backward kernels), so the weights agree to 1e-3, not the CPU's 1e-4."""
    args = ["distill", "--data", f"imagefolder:{small_real / 'data'},gray=1", "--teacher",
            str(small_real / "teacher.safetensors"), "--method", "kd+ig", "--model", "mobilenetv2:width=0.25,drop=14",
            "--epochs", "2", "--ig-steps", "2", "--warmup-epochs", "0", "--lr", "0.05", "--p", "0.5", "--alpha", "0.5",
            "--val-fraction", "0.1", "--device", "cuda", "--amp", "off"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "igkd.cli",
                          *args, "--batch-size", "32", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "igkd.cli", *args, "--batch-size", "64", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone prints
    a, b = (torch.load(tmp_path / r / "last.pt", map_location="cpu", weights_only=True) for r in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2)
    params = [k for k in a["model"] if "running" not in k and "num_batches" not in k]
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in params)
    assert diff < 1e-3, diff
    sb = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (sb["processes"], sb["global_batch"]) == (2, 64)


@gpu
def test_export_a_cuda_trained_checkpoint(amp_run, tmp_path):
    out, _ = amp_run("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    formats = ["torchscript"]
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        formats.append("onnx")
    except ImportError:  # igkd[export] not installed: TorchScript alone
        pass
    for fmt in formats:
        target = tmp_path / f"student.{'onnx' if fmt == 'onnx' else 'pt'}"
        r = run_igkd("export", "--weights", out / "model.safetensors", "--format", fmt, "--output", target,
                     "--images", "200", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        result = json.loads(r.stdout)
        assert target.is_file() and result["parity"]["top1_agreement"] >= 99.9
        assert result["parity"]["max_abs_diff"] <= 1e-3
    with warnings.catch_warnings():  # torch.jit's deprecation notice; TorchScript is what igkd exports
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(tmp_path / "student.pt"), map_location="cpu")
    x = load_dataset("demo").test.images[:32].float() / 255
    net = igkd.load_model(out / "model.safetensors")[0]
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-4)


@gpu
def test_a_checkpoint_saved_from_cuda_loads_on_a_machine_without_one(amp_run, tmp_path):
    """A plain .pt state dict of CUDA tensors (as the paper's published students are) evaluated
    by a process that sees no GPU (CUDA_VISIBLE_DEVICES empty): igkd loads it with
    map_location='cpu', and it scores exactly what the same weights score from safetensors."""
    out, _ = amp_run("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    net, meta = igkd.load_model(out / "model.safetensors")
    state = {k: v.cuda() for k, v in bare(net).state_dict().items()}
    torch.save(state, tmp_path / "cuda_saved.pt")
    assert torch.load(tmp_path / "cuda_saved.pt", weights_only=True)["classifier.1.weight"].is_cuda
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "igkd", "evaluate", "--weights", str(tmp_path / "cuda_saved.pt"),
                        "--model", meta["model"], "--data", "demo", "--device", "auto", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    want = igkd.evaluate(out / "model.safetensors", "demo", device="cpu")
    assert got["correct"] == want["correct"] and got["confusion"] == want["confusion"]


@gpu
def test_streamed_batches_on_cuda_equal_the_device_resident_ones(tmp_path):
    """The streaming path on a GPU (pinned buffers, the side-stream copy one step ahead)
    gives the batches of the device-resident path, maps and logits included."""
    from test_stream import assert_same_batches, pair
    assert_same_batches(*pair(tmp_path, "kd+ig", device="cuda", p=0.5))


@gpu
def test_resume_on_cuda_restores_the_gpu_generator(tmp_path):
    """Dropout on a GPU draws from the CUDA generator: last.pt keeps its state and a resumed
    run continues it, as the CPU generator is (bitwise weights are not compared here: cuDNN's
    backward kernels need not be deterministic)."""
    from test_trainer import config, dataset, teacher as small_teacher
    from igkd.distill import Trainer
    from igkd.models import build_model
    from igkd.precompute import precompute

    def make():
        cfg = config(method="kd", epochs=1, device="cuda")
        data = dataset()
        store = precompute(small_teacher(), data, cfg, tmp_path / "store", quiet=True)
        torch.manual_seed(cfg.seed)
        return Trainer(cfg, build_model(cfg.model, 4, 3), data, tmp_path / "run", torch.device("cuda"),
                       teacher=small_teacher().cuda(), store=store, quiet=True)
    make().fit()
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["cuda_rng"]
    resumed = make()  # (which seeds the generators again)
    torch.cuda.manual_seed(12345)  # anything else: only load_state can bring the saved state back
    assert not torch.equal(torch.cuda.get_rng_state(), saved)
    resumed.load_state()
    assert torch.equal(torch.cuda.get_rng_state(), saved)


@gpu
def test_sync_batchnorm_on_cuda_is_differentiable_twice_where_a_part_needs_it():
    """Under torchrun on GPUs BatchNorm is synchronised; torch's SyncBatchNorm has no second
    derivative, which `explain` (a loss on the student's gradients) needs, so there the
    differentiable GlobalBatchNorm2d replaces it."""
    from igkd.distill.parallel import GlobalBatchNorm2d, sync_batchnorm
    from igkd.distill.parts import parse_method
    from igkd.models import build_model
    cuda = torch.device("cuda")
    assert any(p.double_backward for p in parse_method("kd+explain").parts)
    assert not any(p.double_backward for p in parse_method("kd+ig+at").parts)
    fused = sync_batchnorm(build_model(STUDENT, 10, 1).to(cuda), cuda)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in fused.modules())
    net = sync_batchnorm(build_model(STUDENT, 10, 1).to(cuda), cuda, double_backward=True)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is GlobalBatchNorm2d for m in bns)
    x = torch.rand(4, 1, 28, 28, device=cuda, requires_grad=True)
    g, = torch.autograd.grad(net(x)[:, 0].sum(), x, create_graph=True)
    (x * g).abs().sum().backward()  # the second derivative exists, through every BatchNorm
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in bns)


@gpu
def test_corrupted_images_on_cuda_equal_those_on_the_cpu():
    """evaluate --corruptions promises the same images whatever the device: the blur is a
    convolution, which cuDNN runs in TF32 by default unless told otherwise."""
    from igkd.evaluate.corruptions import CORRUPTIONS, corrupt
    x, _ = demo_batch(8)
    x = x.expand(-1, 3, -1, -1).contiguous()  # RGB, so brightness's HSV path runs too
    index = torch.arange(8)
    for name in CORRUPTIONS:
        for level in range(1, 6):
            cpu = corrupt(x, name, level, 0, index)
            gpu = corrupt(x.cuda(), name, level, 0, index.cuda()).cpu()
            torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5,  # float rounding of the reductions
                                       msg=lambda m, n=name, lv=level: f"{n} severity {lv}: {m}")


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_global_batchnorm_keeps_float32_statistics_of_a_half_precision_batch(device, dtype):
    """GlobalBatchNorm2d (torchrun's BatchNorm where a part differentiates the student's
    gradients) under autocast, whose convolutions hand it float16 or bfloat16: 64 images of
    32x32 per channel, a count above float16's largest number (65504), are normalised as
    nn.BatchNorm2d normalises them in float32, and the running statistics move alike. The sum
    over processes is one process's here: the statistics' arithmetic is the point."""
    from igkd.distill.parallel import GlobalBatchNorm2d
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul_(3).add_(1).to(device, dtype)
    reference = torch.nn.BatchNorm2d(3).to(device).train()
    want = reference(x.float())
    bn = GlobalBatchNorm2d(3).to(device).train()
    with torch.autocast(device, dtype=dtype):
        got = bn.normalize(x, lambda t: t)
    torch.testing.assert_close(got.float(), want, rtol=0, atol=4 * torch.finfo(dtype).eps)
    assert got.dtype == dtype  # as nn.BatchNorm2d gives it
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(reference, name), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's
def test_a_frozen_torchscript_module_keeps_its_weights_through_module_to(tmp_path):
    """What models.to_device is for: the TorchScript igkd export writes (frozen) has no
    parameters; its weights are constants of its code, which Module.to leaves where they were
    loaded (the meta device stands in for a GPU here: torch.jit.load cannot load onto it).
    to_device sees them, and leaves a module on its device as it is."""
    from igkd.export import torchscript_module
    from igkd.models import Normalized, to_device
    from igkd.models.user import _constants_elsewhere
    from test_trainer import teacher as small_teacher
    torch.jit.save(torchscript_module(small_teacher(), (3, 12, 12)), str(tmp_path / "t.pt"))
    frozen = torch.jit.load(str(tmp_path / "t.pt"), map_location="cpu")
    assert not list(frozen.parameters())
    with pytest.raises(RuntimeError, match="device"):
        frozen.to("meta")(torch.zeros(1, 3, 12, 12, device="meta"))
    assert _constants_elsewhere(frozen, torch.device("meta")) and not _constants_elsewhere(frozen, torch.device("cpu"))
    assert to_device(frozen, "cpu") is frozen
    wrapped = Normalized(frozen, [0.5] * 3, [0.25] * 3)
    assert to_device(wrapped, "cpu") is wrapped and wrapped.net is frozen
    scripted = torch.jit.script(torch.nn.Linear(2, 2))  # weights as parameters: Module.to moves them
    assert not _constants_elsewhere(scripted, torch.device("meta"))


@gpu
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's
def test_a_frozen_torchscript_teacher_precomputes_and_teaches_on_cuda(tmp_path):
    """A teacher as igkd export writes it (torchscript:FILE, loaded on the CPU) precomputes its
    store on CUDA, the same store as on the CPU (its identity, its logits to TF32 rounding: the
    frozen code convolves in TF32), and runs online in a CUDA training step."""
    import numpy as np
    from igkd.distill import Trainer
    from igkd.export import torchscript_module
    from igkd.models import build_model
    from igkd.precompute import precompute
    from test_trainer import config, dataset, teacher as small_teacher
    data = dataset()
    torch.jit.save(torchscript_module(small_teacher(), (3, 12, 12)), str(tmp_path / "t.pt"))
    spec = f"torchscript:{tmp_path / 't.pt'}"
    cfg = config(method="kd+ig", check_images=0)
    cpu = precompute(build_model(spec, 4, 3), data, cfg, tmp_path / "cpu", quiet=True)
    cuda = precompute(build_model(spec, 4, 3), data, cfg, tmp_path / "cuda", device="cuda", quiet=True)
    assert cuda.manifest["identity"] == cpu.manifest["identity"]
    np.testing.assert_allclose(cuda.logits, cpu.logits, rtol=0, atol=1e-2 * float(np.abs(cpu.logits).max()))
    online = config(method="kd", logits="online")
    torch.manual_seed(0)
    run = Trainer(online, build_model(online.model, 4, 3), data, tmp_path / "run", torch.device("cuda"),
                  teacher=build_model(spec, 4, 3), quiet=True)
    batch = next(run.batches(1))
    logits = run.teacher_outputs(batch)
    assert logits.is_cuda and tuple(logits.shape) == (len(batch.idx), 4)
    run.train_step(batch)


@gpu
@pytest.mark.parametrize("method, options", [("kd+ig+cutmix", {"amp": "fp16"}),
                                             ("kd+ig-shuffled+at", {"augment": "random-resized-crop"}),
                                             ("dkd+explain", {"amp": "bf16"}), ("explain", {"amp": "fp16"}),
                                             ("dist", {"optimizer": "sgd"})],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_training_steps_never_make_the_host_wait_for_the_gpu(tmp_path, method, options):
    """After the first step (cuDNN's first calls, the optimizer's state made lazily), making a
    batch and training on it never synchronise with the GPU, which would drain its queue of
    work at every step: torch raises at any operation that does (set_sync_debug_mode("error"):
    .item(), a boolean mask index, a copy from pageable host memory)."""
    from igkd.distill import Trainer
    from igkd.models import build_model
    from igkd.precompute import precompute
    from test_trainer import config, dataset, teacher as small_teacher
    cfg = config(method=method, batch_size=8, p=0.5, check_images=0, **options)
    data = dataset()
    store = precompute(small_teacher(), data, cfg, tmp_path / "store", quiet=True)
    torch.manual_seed(0)
    run = Trainer(cfg, build_model(cfg.model, 4, 3), data, tmp_path / "run", torch.device("cuda"),
                  teacher=small_teacher(), store=store, quiet=True)
    run.train_model.train()
    steps = run.batches(1)
    run.train_step(next(steps))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for n, batch in enumerate(steps, 2):
            run.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert n >= 3


@contextmanager
def conv_fp32_precision(value: str):
    """TF32 for cuDNN's convolutions set as torch's documentation now says, restored after."""
    old = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = old


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="torch before 2.9 has no fp32_precision settings")
def test_tf32_set_through_torchs_newer_settings_does_not_break_the_blur():
    """A process that sets TF32 through torch's fp32_precision settings, on which its older
    TF32 flags raise, still blurs images for the corruptions (the same images). (The check of
    IG's fast copy read those flags too; it now compares in float64, where TF32 plays no part.)"""
    from igkd.evaluate.corruptions import corrupt
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = corrupt(x, "gaussian_blur", 3, 0, torch.arange(4))
    with conv_fp32_precision("ieee"):
        with pytest.raises(RuntimeError, match="legacy and new"):
            torch.backends.cudnn.allow_tf32
        assert torch.equal(corrupt(x, "gaussian_blur", 3, 0, torch.arange(4)), want)


@gpu
def test_attribution_agreement_on_cuda_equals_on_the_cpu():
    """audit's Spearman correlation (average ranks, masked rows, NaN rows) on CUDA tensors: its
    buffers were allocated on the CPU, and indexing them with CUDA indices failed."""
    from igkd.evaluate.agreement import spearman
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 8, 8, generator=g).round(decimals=1), torch.rand(4, 8, 8, generator=g)  # ties in a
    mask = torch.rand(4, 8, 8, generator=g) > 0.3
    mask[3] = False  # a row with nothing masked in: NaN
    cpu = spearman(a, b, mask)
    gpu_ = spearman(a.cuda(), b.cuda(), mask.cuda())
    assert gpu_.is_cuda and torch.allclose(gpu_.cpu(), cpu, equal_nan=True) and cpu[3].isnan()
    assert torch.allclose(spearman(a.cuda(), b.cuda()).cpu(), spearman(a, b))


@gpu
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's
def test_export_leaves_a_cuda_module_on_its_device():
    """onnx_bytes and torchscript_module export on the CPU; the caller's CUDA module stays on
    CUDA with the very tensors (storage), gradients and buffers it had, and its training flags
    (``model.cpu().eval()`` moved it to the CPU for good). The exports run on the CPU, not
    holding CUDA tensors put back under them."""
    import copy
    from igkd.export import onnx_bytes, ort_runner, ort_session, torchscript_module
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).cuda()
    net(torch.rand(2, 1, 8, 8, device="cuda")).sum().backward()
    net[1].eval()  # mixed modes, as a caller may keep them
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        want = copy.deepcopy(net).cpu().eval()(x)

    def state():
        return [m.training for m in net.modules()], \
            [(id(t), t.data_ptr(), t.device) for p in net.parameters() for t in (p, p.grad)] + \
            [(id(b), b.data_ptr(), b.device) for b in net.buffers()]
    before = state()
    assert all(device.type == "cuda" for *_, device in before[1])
    scripted = torchscript_module(net, (1, 8, 8))
    assert state() == before
    graph = onnx_bytes(net, (1, 8, 8))
    assert state() == before
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ort_runner(ort_session(graph))(x), want, rtol=1e-4, atol=1e-5)


@gpu
@pytest.mark.parametrize("method", ["explain", "explain+input_x_gradient"])
def test_explain_trains_under_fp16_loss_scaling_with_cudnns_autotuner(tmp_path, method):
    """``explain`` under ``--amp fp16``: its Grad-CAM (or input x gradient) gradient is taken of
    the label logits times a scale (the GradScaler's, at most 2^10: its first scale, 65536, is
    past fp16's largest value) and divided back in float32, so the explanation term is finite
    and not the 1 of an all-zero map; fit() turns cuDNN's autotuner on for the run and gives
    the caller's setting back."""
    from igkd.distill import Trainer
    from igkd.models import build_model
    from igkd.precompute import precompute
    from test_trainer import config, dataset, teacher as small_teacher
    name, how = (method.split("+") + ["gradcam"])[:2]
    cfg = config(method=name, explain_method=how, amp="fp16", epochs=1, batch_size=8, check_images=0)
    data = dataset()
    store = precompute(small_teacher(), data, cfg, tmp_path / "store", quiet=True)
    torch.manual_seed(0)
    run = Trainer(cfg, build_model(cfg.model, 4, 3), data, tmp_path / "run", torch.device("cuda"),
                  teacher=small_teacher(), store=store, quiet=True)
    assert run.scaler is not None
    seen = []
    step = run.train_step

    def watch(batch):
        seen.append(torch.backends.cudnn.benchmark)
        loss, terms = step(batch)
        term = terms["explain"].item()
        assert math.isfinite(loss.item()) and math.isfinite(term) and term < 1 - 1e-6, terms
        return loss, terms

    run.train_step = watch
    before = torch.backends.cudnn.benchmark
    run.fit()
    assert seen and all(seen) and torch.backends.cudnn.benchmark == before

