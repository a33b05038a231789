"""Integrated gradients (igkd.attribution) against captum, on trained networks.

Networks: the paper's published KD+IG student (needs the ``shared`` folder beside the
repository; those tests skip without it) and a small MobileNetV2 trained here for a few
seconds on structured synthetic images (always available).

Tolerances. Our exact path (``fast=False``) performs the same float32 operations as captum
(same step positions and weights, same memory format), only batched differently, so it
must agree to rounding: ``rtol=1e-4, atol=1e-5 * max|IG|`` (float32 eps is 1.2e-7; a
gradient through ~50 layers and a 50-term sum stay far below 1e-5 relative to the
largest attribution). Completeness deltas are sums over all C*H*W attributions; captum
sums in float32 and we in float64, so they agree within ``2e-5 * (sum|IG| + |F(x)| +
|F(x')|)``, between the typical (sqrt(n) eps) and worst-case (n eps) float32 summation
error for n = 3072.

The fast path (BatchNorm folded into convolutions, channels_last) computes the same
function with different rounding. IG of a ReLU network is ill-conditioned in float32: a
quadrature point within rounding of a ReLU kink switches a unit's gradient on or off.
Measured on the published student: captum in float32 differs from the same computation
in float64 by ~3e-4 (Frobenius, relative) and ~1.5e-3 (max, relative to max|IG|). So the
fast path is held to that noise level, not to elementwise rounding: Frobenius <= 2e-3
against captum, and no less accurate than captum against a float64 reference.
"""

from __future__ import annotations

import copy
import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, IntegratedGradients, Saliency
from conftest import shared_or_skip

from igkd.attribution import (METHODS, attribution_map, input_x_gradient, integrated_gradients, make_baseline,
                              quadrature, saliency)
from igkd.errors import UserError
from igkd.models import Normalized, build_model, load_model
from igkd.models.mobilenetv2 import torch_relu6

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STUDENT = SHARED / "checkpoints" / "nordlinglab" / "CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt"
JPEG_TEST = Path("/tmp/igkd-test-data/cifar10-jpg/test")
JPEG_TAR = SHARED / "data" / "cifar10-jpg.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------- fixtures
def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _cifar_test_images(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first test image of each of the first ``n`` classes, as [0, 1] NCHW (strided
    NHWC, as images from HWC arrays are), or None when no copy of the data is at hand."""
    arrays: list[np.ndarray] = []
    if JPEG_TEST.is_dir():
        for c in CIFAR_CLASSES[:n]:
            files = sorted((JPEG_TEST / c).glob("*.jpg"))
            if not files:
                return None
            arrays.append(_decode(files[0].read_bytes()))
    elif JPEG_TAR.is_file():
        wanted = {f"test/{c}/": None for c in CIFAR_CLASSES[:n]}
        with tarfile.open(JPEG_TAR) as tf:
            for member in tf:
                prefix = member.name[: member.name.rfind("/") + 1]
                if member.isfile() and prefix in wanted and wanted[prefix] is None:
                    wanted[prefix] = _decode(tf.extractfile(member).read())
                    if all(v is not None for v in wanted.values()):
                        break
        if any(v is None for v in wanted.values()):
            return None
        arrays = list(wanted.values())
    else:
        return None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return x, torch.arange(n)


@pytest.fixture(scope="module")
def student():
    """The paper's published KD+IG student; skips (fails under IGKD_REQUIRE_SHARED) when
    the shared folder beside the repository is absent."""
    path = shared_or_skip("checkpoints", "nordlinglab", STUDENT.name)
    model, _ = load_model(path, spec="mobilenetv2:drop=5")
    return model.eval()


@pytest.fixture(scope="module")
def cifar():
    """Two real CIFAR-10 test images (classes 0 and 1, the targets) or smooth images."""
    found = _cifar_test_images(2)
    if found is None:
        return _smooth_images(2), torch.tensor([0, 1])
    return found


def _synthetic(n: int, size: int = 16, classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Oriented gratings (class = orientation) with random colour, phase, frequency, noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    theta = y.float() * math.pi / classes + 0.15 * torch.randn(n, generator=g)
    phase = torch.rand(n, generator=g) * 2 * math.pi
    freq = 2.0 + 2.0 * torch.rand(n, generator=g)
    proj = xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None]
    grating = torch.sin(freq[:, None, None] * math.pi * proj + phase[:, None, None])
    colour = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    img = colour + 0.2 * grating[:, None] + 0.15 * torch.randn(n, 3, size, size, generator=g)
    return img.clamp(0, 1), y


@pytest.fixture(scope="module")
def small():
    """A small MobileNetV2 trained for 100 SGD steps on synthetic gratings (16x16)."""
    torch.manual_seed(0)
    net = build_model("mobilenetv2:width=0.25,drop=9", num_classes=4, in_channels=3)
    x, y = _synthetic(1024)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    net.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        i = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.grad = None
    xt, yt = _synthetic(256, seed=2)
    with torch.no_grad():
        accuracy = (net(xt).argmax(1) == yt).float().mean().item()
    assert accuracy > 0.8, f"the small test network did not train (accuracy {accuracy:.2f})"
    return net, xt[:4], yt[:4]


# --------------------------------------------------------------------------- helpers
def assert_matches_captum(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)


def assert_delta_matches(delta: torch.Tensor, theirs: torch.Tensor, attributions: torch.Tensor,
                         f_x: torch.Tensor, f_base: torch.Tensor) -> None:
    scale = attributions.abs().flatten(1).sum(1) + f_x.abs() + f_base.abs()
    assert delta.shape == theirs.shape == (attributions.shape[0],)
    assert ((delta - theirs).abs() <= 2e-5 * scale).all(), (delta, theirs)


def logit(model, x, target) -> torch.Tensor:
    with torch.no_grad():
        return model(x).gather(1, torch.as_tensor(target).view(-1, 1))[:, 0]


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# --------------------------------------------------------------------------- quadrature
def test_quadrature_matches_captum_definitions():
    from captum.attr._utils.approximation_methods import approximation_parameters

    for method in METHODS:
        for n in (2, 7, 50):
            alphas, weights = quadrature(method, n)
            step_sizes, captum_alphas = approximation_parameters(method)
            # riemann alphas are captum's float32 linspace values; gausslegendre float64
            assert torch.equal(alphas, torch.tensor(captum_alphas(n), dtype=torch.float64)), (method, n)
            torch.testing.assert_close(weights, torch.tensor(step_sizes(n), dtype=torch.float64), rtol=1e-15, atol=0)


# --------------------------------------------------------------------------- agreement with captum
# every rule is checked on the small trained net below; on the published student (6-7 s each) the
# paper's rule and igkd's default
@pytest.mark.parametrize("method", ["gausslegendre", "riemann_middle"])
def test_matches_captum_on_published_student(student, cifar, method):
    x, y = cifar
    ig = IntegratedGradients(student)
    for baseline, n_steps in ((None, 50), (make_baseline("blur", x), 50), (torch.full_like(x, 0.5), 15)):
        ours, delta = integrated_gradients(student, x, y, baseline=baseline, n_steps=n_steps, method=method,
                                           return_delta=True, fast=False)
        theirs, their_delta = ig.attribute(x, baselines=baseline, target=y, n_steps=n_steps, method=method,
                                           return_convergence_delta=True)
        assert ours.dtype == torch.float32 and ours.shape == x.shape
        assert_matches_captum(ours, theirs)
        base = torch.zeros_like(x) if baseline is None else baseline
        assert_delta_matches(delta, their_delta, theirs, logit(student, x, y), logit(student, base, y))


@pytest.mark.parametrize("method", METHODS)
def test_matches_captum_on_small_trained_net(small, method):
    net, x, y = small
    ig = IntegratedGradients(net)
    for baseline, n_steps in ((None, 50), (make_baseline("blur", x), 50), (x.mean((2, 3), keepdim=True).expand_as(x).contiguous(), 7)):
        ours, delta = integrated_gradients(net, x, y, baseline=baseline, n_steps=n_steps, method=method,
                                           return_delta=True, fast=False)
        theirs, their_delta = ig.attribute(x, baselines=baseline, target=y, n_steps=n_steps, method=method,
                                           return_convergence_delta=True)
        assert_matches_captum(ours, theirs)
        base = torch.zeros_like(x) if baseline is None else torch.broadcast_to(baseline, x.shape)
        assert_delta_matches(delta, their_delta, theirs, logit(net, x, y), logit(net, base, y))


def test_int_target_and_scalar_baseline_match_captum(small):
    net, x, _ = small
    ours = integrated_gradients(net, x, 2, baseline=0.25, n_steps=12, method="riemann_middle", fast=False)
    theirs = IntegratedGradients(net).attribute(x, baselines=0.25, target=2, n_steps=12, method="riemann_middle")
    assert_matches_captum(ours, theirs)


def test_fast_path_within_float32_noise_of_captum(student, cifar):
    x, y = cifar
    ours, delta = integrated_gradients(student, x, y, return_delta=True)  # fast=True is the default
    theirs, their_delta = IntegratedGradients(student).attribute(x, target=y, n_steps=50,
                                                                 return_convergence_delta=True)
    assert rel_fro(ours, theirs) <= 2e-3
    assert (ours - theirs).abs().max() <= 1e-2 * theirs.abs().max()
    gap = logit(student, x, y) - logit(student, torch.zeros_like(x), y)
    assert ((delta - their_delta).abs() <= 1e-3 * gap.abs()).all()
    # against the same integral in float64, the fast path is as accurate as captum in float32
    reference = IntegratedGradients(copy.deepcopy(student).double()).attribute(
        x.double().contiguous(), target=y, n_steps=50)
    ours_err, their_err = rel_fro(ours, reference), rel_fro(theirs, reference)
    assert ours_err <= 3 * their_err + 5e-4, (ours_err, their_err)


def test_fast_path_on_small_net(small):
    net, x, y = small
    fast = integrated_gradients(net, x, y, n_steps=32)
    exact = integrated_gradients(net, x, y, n_steps=32, fast=False)
    assert rel_fro(fast, exact) <= 2e-3


def test_fast_path_gives_torchs_relu6_the_copy_free_one_without_touching_the_model(small):
    net, x, y = small
    stock = torch_relu6(copy.deepcopy(net))
    assert torch.equal(integrated_gradients(stock, x, y, n_steps=8), integrated_gradients(net, x, y, n_steps=8))
    assert sum(type(m) is torch.nn.ReLU6 and m.inplace for m in stock.modules()) > 0  # the caller's, unchanged


# --------------------------------------------------------------------------- completeness
def _relative_delta(model, x, y, n_steps: int) -> float:
    """sum |delta| / sum |F(x) - F(x')| over the images (a per-image ratio is meaningless
    for an image whose logit barely changes along the path)."""
    _, delta = integrated_gradients(model, x, y, n_steps=n_steps, method="gausslegendre", return_delta=True)
    gap = logit(model, x, y) - logit(model, torch.zeros_like(x), y)
    return (delta.abs().sum() / gap.abs().sum()).item()


def test_completeness_published_student(student, cifar):
    x, y = cifar
    coarse, fine = _relative_delta(student, x, y, 12), _relative_delta(student, x, y, 200)
    assert fine < 0.02, fine  # sum IG = F(x) - F(x') to within 2% with 200 Gauss-Legendre steps
    assert fine < coarse / 4, (coarse, fine)


def test_completeness_small_net(small):
    net, x, y = small
    deltas = [_relative_delta(net, x, y, n) for n in (4, 32, 512)]
    assert deltas[2] < 0.02, deltas
    assert deltas[2] < deltas[1] < deltas[0], deltas


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize("fast", [False, True])
def test_batch_size_chunking_gives_same_result(small, fast):
    net, x, y = small
    x = x[:3]
    y = y[:3]
    base = make_baseline("blur", x)
    one, d_one = integrated_gradients(net, x, y, baseline=base, n_steps=20, batch_size=60, return_delta=True, fast=fast)
    for batch_size in (None, 7, 20, 40, 1000):  # 7 < n_steps: an image's steps split over passes
        other, d_other = integrated_gradients(net, x, y, baseline=base, n_steps=20, batch_size=batch_size,
                                              return_delta=True, fast=fast)
        # the same sums in other batch shapes: the convolution kernels oneDNN picks per shape round
        # differently (the BN-folded fast path ran up to 8e-6 of a 4e-3 maximum apart in one full-suite
        # order); a chunking error would be of the order of the attributions themselves
        torch.testing.assert_close(other, one, rtol=1e-3, atol=1e-4 * one.abs().max().item())
        torch.testing.assert_close(d_other, d_one, rtol=0, atol=1e-5 * one.abs().sum().item())


# --------------------------------------------------------------------------- model state
@pytest.mark.parametrize("fast", [False, True])
def test_model_mode_and_flags_restored(small, fast):
    net, x, y = small
    model = copy.deepcopy(net)
    model.train()
    model.features[1].eval()  # a submodule left in eval inside a training model
    frozen = list(model.parameters())[:3]
    for p in frozen:
        p.requires_grad_(False)
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(m.training))
    try:
        integrated_gradients(model, x, y, n_steps=8, fast=fast)
        saliency(model, x, y, fast=fast)
    finally:
        hook.remove()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    for name, b in model.named_buffers():  # BatchNorm statistics untouched (eval mode)
        assert torch.equal(b, buffers[name]), name
    # it ran in eval mode (the fast path runs an eval copy, which deepcopy gives the hook too)
    assert seen and not any(seen)


def test_works_under_no_grad_and_inference_mode(small):
    net, x, y = small
    expected = integrated_gradients(net, x, y, n_steps=8)
    with torch.no_grad():
        torch.testing.assert_close(integrated_gradients(net, x, y, n_steps=8), expected)
    with torch.inference_mode():
        xi = x.clone()
        torch.testing.assert_close(integrated_gradients(net, xi, y, n_steps=8).clone(), expected)


# --------------------------------------------------------------------------- maps and baselines
def test_attribution_map(small):
    net, x, y = small
    attributions = integrated_gradients(net, x, y, n_steps=8)
    m = attribution_map(attributions)
    assert m.shape == (x.shape[0], x.shape[2], x.shape[3])
    assert (m >= 0).all()
    torch.testing.assert_close(m, attributions.abs().sum(1))
    with pytest.raises(UserError):
        attribution_map(attributions[0])


def test_zero_baseline_is_model_space_zero():
    x = _smooth_images(3)
    wrapped = Normalized(torch.nn.Identity(), CIFAR_MEAN, CIFAR_STD)
    base = make_baseline("zero", x, CIFAR_MEAN, CIFAR_STD)
    assert base.shape == x.shape
    assert torch.equal(wrapped(base), torch.zeros_like(x))
    assert torch.equal(make_baseline("zero", x), torch.zeros_like(x))  # no normalisation: zeros
    assert torch.equal(make_baseline("black", x), torch.zeros_like(x))


def test_blur_baseline():
    x = _smooth_images(2) + 0.2 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    b = make_baseline("blur", x)
    assert b.shape == x.shape
    assert b.min() >= x.min() - 1e-6 and b.max() <= x.max() + 1e-6  # a weighted average
    tv = lambda t: (t.diff(dim=-1).abs().mean() + t.diff(dim=-2).abs().mean()).item()  # noqa: E731
    assert tv(b) < tv(x) / 3
    flat = torch.full((1, 3, 32, 32), 0.3)
    torch.testing.assert_close(make_baseline("blur", flat), flat)
    with pytest.raises(UserError, match="zero, black, blur"):
        make_baseline("noise", x)


def test_ig_invariant_to_normalisation(small):
    """IG w.r.t. [0, 1] pixels through Normalized with the "zero" baseline equals IG of the
    bare net w.r.t. normalised inputs with a zero baseline (the official code's setting)."""
    net, x, y = small
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    wrapped = Normalized(net, mean, std).eval()
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixel = integrated_gradients(wrapped, x, y, baseline=make_baseline("zero", x, mean, std), fast=False)
    normalised = integrated_gradients(net, (x - m) / s, y, baseline=None, fast=False)
    assert rel_fro(pixel, normalised) <= 2e-3  # same integral, different float32 rounding
    # the "zero" kind by name reads the wrapper's mean
    by_name = integrated_gradients(wrapped, x, y, baseline="zero", fast=False)
    assert torch.equal(by_name, pixel)


# --------------------------------------------------------------------------- cheap alternatives
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_saliency_and_input_x_gradient_match_captum(small):
    net, x, y = small
    assert_matches_captum(saliency(net, x, y, fast=False), Saliency(net).attribute(x, target=y))
    assert_matches_captum(saliency(net, x, y, abs=False, fast=False),
                          Saliency(net).attribute(x, target=y, abs=False))
    assert_matches_captum(input_x_gradient(net, x, y, batch_size=3, fast=False),
                          InputXGradient(net).attribute(x, target=y))
    assert rel_fro(input_x_gradient(net, x, y), InputXGradient(net).attribute(x, target=y)) <= 2e-3


# --------------------------------------------------------------------------- errors
def test_bad_arguments_raise_user_error(small):
    net, x, y = small
    with pytest.raises(UserError) as e:
        integrated_gradients(net, x, y, method="simpson")
    for name in METHODS:
        assert name in str(e.value)
    with pytest.raises(UserError):
        integrated_gradients(net, x, y, n_steps=1, method="riemann_trapezoid")
    with pytest.raises(UserError):
        integrated_gradients(net, x, y[:2])
    with pytest.raises(UserError):
        integrated_gradients(net, x, 7)  # 4 classes
    with pytest.raises(UserError):
        integrated_gradients(net, x, y, baseline=torch.zeros(2, 3, 16, 16))
    with pytest.raises(UserError):
        integrated_gradients(net, x[0], y[:1])
    with pytest.raises(UserError):
        integrated_gradients(net, x, y, batch_size=0)
