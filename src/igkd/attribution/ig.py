"""Integrated gradients (METHOD.md section 3), batched over images and steps.

    IG_i(x) = (x_i - x'_i) * integral_0^1 dF_y(x' + a (x - x')) / dx_i da

F_y is the model's logit for class ``target``, x' the baseline. The integral is a
quadrature (:mod:`.quadrature`, captum's methods and definitions); the interpolated
images of several inputs times all their steps go through the model as ONE batch, and
one ``torch.autograd.grad`` call returns the gradients w.r.t. that batch (never into the
parameters). The model runs in eval mode with its parameters' ``requires_grad`` off;
both are restored afterwards.

Precision: IG of a ReLU network is ill-conditioned in float32. A quadrature point that
lies within rounding of a ReLU(6) kink switches that unit's gradient on or off, so any
change of rounding (NCHW vs NHWC convolutions, folded BatchNorm, float64) moves the
attributions by ~3e-4 (Frobenius, relative) and up to ~1.5e-3 of max|IG| on the paper's
trained student; captum in float32 is that far from the float64 integral too. Results of
the ``fast`` path are therefore as accurate as captum's but not bit-identical to them.

Conventions shared by every function here: ``inputs`` is an ``N x C x H x W`` float
tensor of what the model takes (for igkd models, [0, 1] pixels: a normalising teacher is
wrapped in :class:`igkd.models.Normalized`); ``target`` is an int or N ints; results
are float tensors shaped like ``inputs`` on the inputs' device.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UserError
from ..models import Normalized, ReLU6, bare, copy_free_relu6
from .quadrature import check_method, quadrature

BASELINES = ("zero", "black", "blur")

# Interpolated samples per forward pass at 32x32x3, scaled inversely with the input size.
# CPU: small passes are fastest. Measured on the CIFAR MobileNetV2 teacher, 2 threads,
# 50 steps: 50 samples per pass 4.6 images/s, 250 per pass 3.5 images/s, because
# activations over glibc's 32 MiB mmap threshold are mapped and page-faulted afresh on
# every pass (the extra time is all system time). 64 -> one image x 50 steps per pass.
# CUDA: the teacher saves 13-19 MiB per sample for backward at 32x32, so 256 samples
# need ~3-5 GiB (not tuned on a GPU; pass batch_size to use more of a large one).
_CPU_BUDGET = 64
_GPU_BUDGET = 256
_REFERENCE_NUMEL = 3 * 32 * 32


# --------------------------------------------------------------------------- helpers
@contextmanager
def _eval_without_param_grads(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` on all parameters; restore both after.

    Each module's own ``training`` flag is restored (not ``model.train(prev)``), so a
    model with, e.g., frozen BatchNorm layers inside a training model is left as found.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-d weight is stored channels_last (and not also NCHW)."""
    for p in model.parameters():
        if p.dim() == 4:
            return (p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())
    return False


def _fold_batchnorm(net: nn.Module, probe: torch.Tensor) -> int:
    """Fold every eval-mode BatchNorm2d whose input is the output of a Conv2d that nothing
    else uses into that convolution (in place); returns how many were folded.

    Pairs are found on any architecture by one forward pass of ``probe`` with hooks: the
    BatchNorm's input must be the very tensor the convolution returned (not modified in
    place since), each module must run once, and the autograd graph must show no other
    consumer of that tensor (a residual branch, say), or folding would change the function.
    """
    outputs, pairs, calls = {}, [], Counter()

    def on_conv(m, inputs, out):
        calls[m] += 1
        outputs[id(out)] = (m, out, out.grad_fn)

    def on_bn(m, inputs):
        calls[m] += 1
        x = inputs[0]
        hit = outputs.get(id(x))
        if hit is not None and hit[1] is x and x.grad_fn is hit[2]:
            pairs.append((hit[0], m, x.grad_fn))

    handles = [m.register_forward_hook(on_conv) for m in net.modules() if type(m) is nn.Conv2d]
    handles += [m.register_forward_pre_hook(on_bn) for m in net.modules()
                if type(m) is nn.BatchNorm2d and m.running_mean is not None and m.running_var is not None]
    try:
        out = net(probe.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    uses, stack, seen = Counter(), [out.grad_fn] if isinstance(out, torch.Tensor) else [], set()
    while stack:  # how many autograd nodes consume each node's output
        node = stack.pop()
        for nxt, _ in node.next_functions if node is not None else ():
            if nxt is not None:
                uses[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    names = {m: n for n, m in net.named_modules()}
    folded = 0
    for conv, bn, node in pairs:
        if calls[conv] == 1 and calls[bn] == 1 and uses[node] == 1 and conv.out_channels == bn.num_features:
            fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
            for module, new in ((conv, fused), (bn, nn.Identity())):
                parent, _, attr = names[module].rpartition(".")
                setattr(net.get_submodule(parent), attr, new)
            folded += 1
    return folded


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor (e.g. images from ``permute``), else NCHW."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _prepare(model: nn.Module, inputs: torch.Tensor, fast: bool) -> tuple[nn.Module, torch.memory_format]:
    """The network to differentiate and the memory format to feed it.

    ``fast``: an eval-mode copy with BatchNorm folded into the convolutions that feed it
    (:func:`_fold_batchnorm`, any architecture), activations
    out of place and, on CPU, channels_last weights (about 2x faster for MobileNetV2 on CPU; the same function up
    to float rounding). The caller's model is never modified. Falls back to the model
    itself when it cannot be copied.

    Without ``fast``, the model itself, fed in the inputs' own memory format (as captum
    does: NCHW and NHWC convolutions round differently, and IG of a ReLU network is
    sensitive to rounding, see :func:`integrated_gradients`), or channels_last for a
    channels_last model.
    """
    if fast and not isinstance(bare(model), torch.jit.ScriptModule):  # scripted: no hooks, run as is
        try:
            net = copy.deepcopy(model)
        except Exception:  # noqa: BLE001 - e.g. modules holding non-copyable handles
            net = None
        if net is not None:
            net.eval()
            _fold_batchnorm(net, inputs[:1])
            # torch's in-place activations cost a copy of their input under autograd (~7% of a
            # pass), so they run out of place, except ReLU6, which has a copy-free in-place form
            # (3-7% faster than out of place); only ReLU6s the model had in place stay in place
            copy_free_relu6(net)
            for m in net.modules():
                if isinstance(m, (nn.ReLU, nn.Hardtanh)) and not isinstance(m, ReLU6):
                    m.inplace = False
            for p in net.parameters():
                p.requires_grad_(False)
            if inputs.device.type == "cpu" or _channels_last(model):
                return net.to(memory_format=torch.channels_last), torch.channels_last
            return net, _memory_format(inputs)
    return model, torch.channels_last if _channels_last(model) else _memory_format(inputs)


def _check_inputs(inputs: torch.Tensor, what: str = "inputs") -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise UserError(f"{what} must be a torch.Tensor of images (N x C x H x W), got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise UserError(f"{what} must be a batch of images N x C x H x W, got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise UserError(f"{what} must be floating point (e.g. [0, 1] pixels), got {inputs.dtype}; "
                        "convert with .float() / 255")
    return inputs.detach()


def _targets(target: int | Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"target must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise UserError(f"target has {t.numel()} entries for {n} images; give one class index per image or one int")
    return t


def _check_logits(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise UserError(f"the model must return N x classes logits, got shape {tuple(logits.shape)}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= logits.shape[1]):
        raise UserError(f"target classes must be in [0, {logits.shape[1] - 1}], "
                        f"got {int(target.min())}..{int(target.max())}")


def _default_batch_size(inputs: torch.Tensor) -> int:
    budget = _GPU_BUDGET if inputs.device.type == "cuda" else _CPU_BUDGET
    per_sample = max(1, inputs[0].numel())
    return max(1, budget * _REFERENCE_NUMEL // per_sample)


def _check_batch_size(batch_size: int | None, inputs: torch.Tensor) -> int:
    if batch_size is None:
        return _default_batch_size(inputs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer (samples per forward pass), got {batch_size!r}")
    return batch_size


def _input_grads(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """d logit[rows] / d x for a batch ``x`` (one forward, one autograd.grad)."""
    x = x.contiguous(memory_format=fmt).detach().requires_grad_(True)
    logits = model(x)
    _check_logits(logits, rows)
    selected = logits.gather(1, rows.view(-1, 1))
    (grad,) = torch.autograd.grad(selected.sum(), x)
    return grad


def _forward_selected(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, batch_size: int,
                      fmt: torch.memory_format) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s:s + batch_size].contiguous(memory_format=fmt))
            _check_logits(logits, rows)
            out.append(logits.gather(1, rows[s:s + batch_size].view(-1, 1)).squeeze(1))
    return torch.cat(out) if out else x.new_zeros(0)


def _resolve_baseline(model: nn.Module, inputs: torch.Tensor,
                      baseline: torch.Tensor | float | str | None) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(inputs)
    if isinstance(baseline, str):
        mean = model.mean if isinstance(model, Normalized) else None
        return make_baseline(baseline, inputs, mean=mean)
    b = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).detach()
    try:
        return torch.broadcast_to(b, inputs.shape)
    except RuntimeError:
        raise UserError(f"baseline of shape {tuple(b.shape)} does not broadcast to inputs of shape "
                        f"{tuple(inputs.shape)}") from None


# --------------------------------------------------------------------------- IG
def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor,
    baseline: torch.Tensor | float | str | None = None,
    n_steps: int = 50,
    method: str = "gausslegendre",
    batch_size: int | None = None,
    return_delta: bool = False,
    fast: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients of ``model``'s logit ``target`` w.r.t. ``inputs``.

    Args:
        model: maps ``N x C x H x W`` to ``N x classes`` logits. Run in eval mode with
            parameter gradients off; its modes and ``requires_grad`` flags are restored
            and no parameter ``.grad`` is touched.
        inputs: ``N x C x H x W`` float images.
        target: class per image (int, or N ints / an int tensor of shape N).
        baseline: ``None`` = zeros like ``inputs`` (captum's default: zeros in the space
            the model receives, i.e. black pixels for an igkd model); a tensor or number
            broadcastable to ``inputs``; or a kind of :func:`make_baseline` ("zero" =
            zeros in the model's normalised space, using ``model.mean`` when the model is
            an :class:`igkd.models.Normalized`; "black"; "blur").
        n_steps: quadrature points per image.
        method: "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid" or
            "gausslegendre" (captum's definitions; see :mod:`igkd.attribution.quadrature`).
        batch_size: most interpolated samples per forward pass. Default: 64 samples of
            32x32x3 on CPU (256 on CUDA), scaled inversely with the image size. Whole
            images (all their steps) go into one pass when they fit, else an image's
            steps are split over several passes.
        return_delta: also return the completeness gap per image,
            ``sum_i IG_i - (F_y(x) - F_y(x'))`` (the quadrature error, shape N), with
            F evaluated by the same network as the gradients.
        fast: differentiate an eval-mode copy of the model with BatchNorm folded into the
            preceding convolutions, channels_last on CPU (2.2x captum's throughput for the
            CIFAR MobileNetV2 teacher on 2 CPU threads, against 1.2x without). The same
            function with different float32 rounding (see "Precision" above).
            ``fast=False`` runs ``model`` itself with captum's operations and memory
            format, and agrees with captum to rounding (~1e-7 of max|IG|).

    Returns:
        attributions shaped like ``inputs`` (its dtype), or ``(attributions, delta)``.
    """
    inputs = _check_inputs(inputs)
    method = check_method(method)
    alphas, weights = quadrature(method, n_steps)
    batch_size = _check_batch_size(batch_size, inputs)
    n, steps = inputs.shape[0], alphas.numel()
    dtype, device, item = inputs.dtype, inputs.device, inputs.shape[1:]
    ones = (1,) * len(item)
    # all inside inference_mode(False): tensors made under torch.inference_mode (inputs,
    # a copied model) must not reach autograd
    with torch.inference_mode(False), torch.enable_grad():
        inputs = inputs.clone() if inputs.is_inference() else inputs
        rows = _targets(target, n, device)
        base = _resolve_baseline(model, inputs, baseline)
        alphas = alphas.to(device=device, dtype=dtype)
        weights = weights.to(device=device, dtype=dtype)
        diff = inputs - base
        total = torch.zeros_like(inputs, memory_format=torch.contiguous_format)
        net, fmt = _prepare(model, inputs, fast)
        with _eval_without_param_grads(net):
            if n and batch_size >= steps:
                # whole images per pass: k images x all their steps, image-major; chunks of
                # equal size (16 images at 5 per pass -> 4 x 4) so shapes repeat
                k = math.ceil(n / math.ceil(n / (batch_size // steps)))
                for s in range(0, n, k):
                    b, d = base[s:s + k], diff[s:s + k]
                    m = b.shape[0]
                    scaled = (b.unsqueeze(1) + alphas.view(1, steps, *ones) * d.unsqueeze(1)).reshape(m * steps, *item)
                    grads = _input_grads(net, scaled, rows[s:s + k].repeat_interleave(steps), fmt)
                    # weighted sum over steps: one contraction, no loop over steps
                    total[s:s + k] = torch.einsum("s,ks...->k...", weights, grads.reshape(m, steps, *item))
            elif n:
                # more steps than fit in a pass: an image's steps are split over passes
                for i in range(n):
                    for s in range(0, steps, batch_size):
                        a, w = alphas[s:s + batch_size], weights[s:s + batch_size]
                        scaled = base[i:i + 1] + a.view(-1, *ones) * diff[i:i + 1]
                        grads = _input_grads(net, scaled, rows[i:i + 1].expand(a.numel()), fmt)
                        total[i] += torch.einsum("s,s...->...", w, grads)
            attributions = total * diff
            if not return_delta:
                return attributions
            ends = _forward_selected(net, torch.cat([inputs, base]), torch.cat([rows, rows]), batch_size, fmt)
    delta = attributions.reshape(n, -1).sum(1, dtype=torch.float64) - (ends[:n].double() - ends[n:].double())
    return attributions, delta.to(dtype)


# --------------------------------------------------------------------------- cheap alternatives
def _plain_gradients(model: nn.Module, inputs: torch.Tensor, target, batch_size: int | None,
                     fast: bool) -> torch.Tensor:
    inputs = _check_inputs(inputs)
    batch_size = _check_batch_size(batch_size, inputs)
    with torch.inference_mode(False), torch.enable_grad():
        rows = _targets(target, inputs.shape[0], inputs.device)
        out = torch.zeros_like(inputs, memory_format=torch.contiguous_format)
        net, fmt = _prepare(model, inputs, fast)
        with _eval_without_param_grads(net):
            for s in range(0, inputs.shape[0], batch_size):
                out[s:s + batch_size] = _input_grads(net, inputs[s:s + batch_size],
                                                     rows[s:s + batch_size], fmt)
    return out


def saliency(model: nn.Module, inputs: torch.Tensor, target, abs: bool = True,
             batch_size: int | None = None, fast: bool = True) -> torch.Tensor:
    """Gradient saliency ``|dF_y/dx|`` (``abs=False``: the signed gradient), like captum's
    ``Saliency``. One forward and backward per image; ``batch_size`` images per pass;
    ``fast`` as in :func:`integrated_gradients`."""
    grads = _plain_gradients(model, inputs, target, batch_size, fast)
    return grads.abs() if abs else grads


def input_x_gradient(model: nn.Module, inputs: torch.Tensor, target,
                     batch_size: int | None = None, fast: bool = True) -> torch.Tensor:
    """``x * dF_y/dx`` (captum's ``InputXGradient``): IG with a zero baseline and a
    single right-endpoint step. Conventions as :func:`saliency`."""
    grads = _plain_gradients(model, inputs, target, batch_size, fast)
    return grads * inputs.detach()


def smoothgrad(model: nn.Module, inputs: torch.Tensor, target, samples: int = 16, sigma: float = 0.15,
               generator: torch.Generator | None = None, batch_size: int | None = None,
               fast: bool = True) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017) of gradient magnitudes, as captum's
    ``NoiseTunnel(Saliency(model)).attribute(..., nt_type="smoothgrad", stdevs=sigma)``:
    the mean over ``samples`` noisy copies ``x + N(0, sigma^2)`` of ``|dF_y/dx|`` at each
    copy. ``sigma`` is in the units of ``inputs`` (0.15 of the [0, 1] pixel range by
    default). Noise comes from ``generator`` (CPU, drawn image-major as
    ``samples x C x H x W`` per image), so results are reproducible; ``batch_size``
    noisy images per pass. Costs ``samples`` forward+backward passes per image."""
    inputs = _check_inputs(inputs)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UserError(f"smoothgrad samples must be a positive integer, got {samples!r}")
    if not sigma >= 0:
        raise UserError(f"smoothgrad sigma must be >= 0, got {sigma}")
    n = inputs.shape[0]
    noise = torch.randn((n, samples, *inputs.shape[1:]), generator=generator, dtype=inputs.dtype)
    noisy = (inputs.unsqueeze(1) + sigma * noise.to(inputs.device)).reshape(n * samples, *inputs.shape[1:])
    rows = _targets(target, n, inputs.device).repeat_interleave(samples)
    grads = _plain_gradients(model, noisy, rows, batch_size, fast)
    return grads.abs().reshape(n, samples, *inputs.shape[1:]).mean(1)


# --------------------------------------------------------------------------- maps and baselines
def attribution_map(attributions: torch.Tensor) -> torch.Tensor:
    """The overlay map of METHOD.md: ``M = sum over channels of |IG|``, ``N x H x W``."""
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4:
        shape = tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions).__name__
        raise UserError(f"attributions must be N x C x H x W, got {shape}")
    return attributions.abs().sum(1)


def _per_channel(values, inputs: torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=inputs.dtype, device=inputs.device).reshape(-1)
    if t.numel() not in (1, inputs.shape[1]):
        raise UserError(f"{what} has {t.numel()} values for {inputs.shape[1]}-channel images; give one per channel")
    return t.view(1, -1, 1, 1)


def _gaussian_kernel(sigma: float, radius: int, dtype, device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(images: torch.Tensor, sigma: float | tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian blur per channel with reflect padding (radius ~3 sigma, capped
    by the image size, which reflect padding requires)."""
    images = _check_inputs(images, "images")
    n, c, h, w = images.shape
    sh, sw = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
    out = images
    for axis, (s, size) in enumerate(((sh, h), (sw, w))):
        radius = min(int(math.ceil(3 * s)), size - 1)
        if s <= 0 or radius < 1:
            continue
        k = _gaussian_kernel(s, radius, images.dtype, images.device)
        if axis == 0:
            weight, pad = k.view(1, 1, -1, 1), (0, 0, radius, radius)
        else:
            weight, pad = k.view(1, 1, 1, -1), (radius, radius, 0, 0)
        out = F.conv2d(F.pad(out, pad, mode="reflect"), weight.expand(c, 1, *weight.shape[2:]), groups=c)
    return out


def make_baseline(kind: str, inputs: torch.Tensor, mean=None, std=None,
                  sigma: float | None = None) -> torch.Tensor:
    """A baseline x' for [0, 1] pixel ``inputs`` fed to a model that normalises inside
    (:class:`igkd.models.Normalized` with per-channel ``mean``/``std``).

    * ``"zero"`` (igkd's default): zeros in the model's normalised input space, i.e. the
      per-channel ``mean`` colour in pixel space ((mean - mean) / std = 0). This is the
      baseline of the paper's official code, which ran captum on normalised tensors with
      captum's zero baseline. Without ``mean`` (a model that does not normalise) it is
      all zeros.
    * ``"black"``: all-zero pixels.
    * ``"blur"``: each image under a strong Gaussian blur (sigma = H/8 and W/8 unless
      ``sigma`` is given; separable convolution, reflect padding).

    ``std`` is accepted for symmetry and checked, but no kind needs it: integrated
    gradients are invariant to per-channel affine maps z = (x - mean) / std. With
    x' = mean, IG_i w.r.t. pixels through the wrapper is
    (x_i - mean_c) * integral dF/dx_i = (x_i - mean_c) / std_c * integral dG/dz_i
    = (z_i - 0) * integral dG/dz_i, the IG w.r.t. normalised inputs with a zero baseline.
    So computing IG on [0, 1] inputs through :class:`~igkd.models.Normalized` with the
    "zero" baseline reproduces the official code's attributions.
    """
    inputs = _check_inputs(inputs)
    if std is not None and not bool((_per_channel(std, inputs, "std") > 0).all()):
        raise UserError("std must be positive in every channel")
    if kind == "zero":
        if mean is None:
            return torch.zeros_like(inputs)
        return _per_channel(mean, inputs, "mean").expand_as(inputs).clone()
    if kind == "black":
        return torch.zeros_like(inputs)
    if kind == "blur":
        h, w = inputs.shape[-2:]
        if sigma is not None and not sigma > 0:
            raise UserError(f"blur sigma must be > 0, got {sigma}")
        return gaussian_blur(inputs, (sigma, sigma) if sigma is not None else (h / 8, w / 8))
    raise UserError(f"unknown baseline {kind!r}; use one of: {', '.join(BASELINES)}")
