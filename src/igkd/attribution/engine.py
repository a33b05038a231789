"""The engine every attribution here shares: a fast differentiable copy of the model,
batching, and the gradient core.

* :func:`_prepare`: the network to differentiate. With ``fast``, an eval-mode copy with
  BatchNorm folded into the convolutions that feed it (:func:`~igkd.models.fold.fold_batchnorm`, any
  architecture), activations out of place and channels_last on CPU; the caller's model
  is never modified.
* :func:`_input_grads`: ``d logit[rows] / d x`` for one batch, one forward and one
  ``torch.autograd.grad`` call (never into the parameters); :func:`_plain_gradients`
  batches it over images; :func:`_forward_selected` the logits alone.
* :func:`_check_inputs`, :func:`_targets`, :func:`_check_batch_size`: argument checks
  with one-line :class:`~igkd.errors.UserError` messages.
* :func:`attribution_map`: the overlay map ``sum over channels of |attributions|``.

The model runs in eval mode with its parameters' ``requires_grad`` off
(:func:`_eval_without_param_grads`); both are restored afterwards.

Precision: IG of a ReLU network is ill-conditioned in float32. A quadrature point that
lies within rounding of a ReLU(6) kink switches that unit's gradient on or off, so any
change of rounding (NCHW vs NHWC convolutions, folded BatchNorm, float64) moves the
attributions by ~3e-4 (Frobenius, relative) and up to ~1.5e-3 of max|IG| on the paper's
trained student; captum in float32 is that far from the float64 integral too. Results of
the ``fast`` path are therefore as accurate as captum's but not bit-identical to them.

Conventions shared by every attribution function: ``inputs`` is an ``N x C x H x W``
float tensor of what the model takes (for igkd models, [0, 1] pixels: a normalising
teacher is wrapped in :class:`igkd.models.Normalized`); ``target`` is an int or N ints;
results are float tensors shaped like ``inputs`` on the inputs' device.
"""

from __future__ import annotations

import copy
import itertools
import numbers
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..models import ReLU6, bare, copy_free_relu6, eval_mode
from ..models.fold import fold_batchnorm, logit_gap
from ..progress import log

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
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def _channels_last(model: nn.Module) -> bool:
    """Whether the model's first 4-d weight is stored channels_last (and not also NCHW)."""
    for p in model.parameters():
        if p.dim() == 4:
            return (p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous())
    return False


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for an NHWC-strided 4-d tensor (e.g. images from ``permute``), else NCHW."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _prepare(model: nn.Module, inputs: torch.Tensor, fast: bool) -> tuple[nn.Module, torch.memory_format]:
    """The network to differentiate and the memory format to feed it.

    ``fast``: an eval-mode copy with BatchNorm folded into the convolutions that feed it
    (:func:`~igkd.models.fold.fold_batchnorm`, any architecture), activations
    out of place and, on CPU, channels_last weights (about 2x faster for MobileNetV2 on CPU; the same function up
    to float rounding). The caller's model is never modified. Falls back to the model
    itself when it cannot be copied or prepared, or when the copy's logits on the first
    inputs differ from the model's beyond rounding (:func:`_same_function`): a model that
    relies on an in-place activation's aliasing, or uses a convolution's output outside the
    BatchNorm too (a mask, say), computes another function once changed so.

    Without ``fast``, the model itself, fed in the inputs' own memory format (as captum
    does: NCHW and NHWC convolutions round differently, and IG of a ReLU network is
    sensitive to rounding, see :func:`integrated_gradients`), or channels_last for a
    channels_last model.
    """
    if fast and not isinstance(bare(model), torch.jit.ScriptModule):  # scripted: no hooks, run as is
        prepared = _fast_copy(model, inputs)
        if prepared is not None and _same_function(model, prepared[0], inputs[:_PROBE_IMAGES]):
            return prepared
    return model, torch.channels_last if _channels_last(model) else _memory_format(inputs)


# Images of the inputs on which the fast copy's logits are compared with the model's.
_PROBE_IMAGES = 4
_noted: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models already reported (once each, not per chunk)


def _fast_copy(model: nn.Module, inputs: torch.Tensor) -> tuple[nn.Module, torch.memory_format] | None:
    """The fast copy of :func:`_prepare` and its memory format, or None when any step fails
    (a module that cannot be copied, a fold that cannot be done): the model itself is then
    used, as it is always correct."""
    try:
        net = copy.deepcopy(model)
        net.eval()
        fold_batchnorm(net, inputs[:1])
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
    except Exception:  # noqa: BLE001 - e.g. modules holding non-copyable handles; the model itself is correct
        return None


def _same_function(model: nn.Module, net: nn.Module, probe: torch.Tensor) -> bool:
    """Whether the fast copy ``net`` gives the model's logits on ``probe`` up to rounding
    (:func:`igkd.models.fold.logit_gap`: as they run, and in float64 where that differs, so
    that TF32 and autocast decide nothing); says once per model where it does not."""
    try:
        gap = logit_gap(model, net, probe)
    except Exception:  # noqa: BLE001 - the model itself then runs and raises what it raises
        return False
    if gap is None:
        return False
    diff, scale, tolerance = gap
    if diff <= tolerance:
        return True
    if model not in _noted:
        _noted.add(model)
        log(f"igkd: note: the fast copy of the model for attributions (BatchNorm folded, activations out of "
            f"place) changes its logits by {diff:.3g} (largest logit {scale:.3g}); using the model as it is "
            "(slower)")
    return False


# a context variable, not a module flag: another thread's attribution keeps its check
_KNOWN_FINITE: ContextVar[bool] = ContextVar("igkd_inputs_known_finite", default=False)


@contextmanager
def inputs_known_finite():
    """Skip the NaN scan of the inputs, for a caller whose images are finite by construction
    (precompute's: bytes / 255): one more pass over every chunk, not small beside a 1-step IG."""
    token = _KNOWN_FINITE.set(True)
    try:
        yield
    finally:
        _KNOWN_FINITE.reset(token)


def _check_inputs(inputs: torch.Tensor, what: str = "inputs", model: nn.Module | None = None) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise UserError(f"{what} must be a torch.Tensor of images (N x C x H x W), got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise UserError(f"{what} must be a batch of images N x C x H x W, got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise UserError(f"{what} must be floating point (e.g. [0, 1] pixels), got {inputs.dtype}; "
                        "convert with .float() / 255")
    if not len(inputs):
        raise UserError(f"{what} hold no images (a batch of 0); give at least one")
    # a NaN pixel gave all-NaN IG maps, or finite but meaningless saliency ones, without a word
    if not _KNOWN_FINITE.get() and not bool(torch.isfinite(inputs).all()):
        raise UserError(f"{what} hold NaN or infinite values; give finite pixels (e.g. [0, 1])")
    if model is not None:
        _check_against(model, inputs, what)
    return inputs.detach()


def _check_against(model: nn.Module, inputs: torch.Tensor, what: str) -> None:
    """Inputs the model can take: on its device, in its dtype (outside autocast, which casts
    them itself). float64 images (numpy's default) or a GPU model given CPU images failed deep
    in the first convolution with torch's 'expected scalar type Double but found Float'."""
    ref = next((t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()), None)
    if ref is None:
        return
    if ref.device != inputs.device:
        raise UserError(f"{what} are on {inputs.device} but the model is on {ref.device}; move one to the other "
                        f"({what}.to('{ref.device}') or model.to('{inputs.device}'))")
    if ref.dtype != inputs.dtype and not torch.is_autocast_enabled(inputs.device.type):
        raise UserError(f"{what} are {inputs.dtype} but the model's parameters are {ref.dtype}; convert one "
                        f"({what}.to({ref.dtype}) or model.to({inputs.dtype}))")


def check_model(model) -> None:
    """A network to attribute: an ``nn.Module`` (a plain function has no parameters to put in
    eval mode and no hooks: it failed deep inside with an AttributeError)."""
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"the model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in "
                        "an nn.Module whose forward calls it")


def _targets(target: int | Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    try:
        t = torch.as_tensor(target, device=device)
    except (TypeError, ValueError, RuntimeError):  # None, a class name: torch's own error was a traceback
        raise UserError(f"target must be a class index per image (an int, N ints or an int tensor), got "
                        f"{target!r:.80}") from None
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise UserError(f"target must be integer class indices, got dtype {t.dtype}")
    t = t.long().reshape(-1)
    if t.is_inference():  # labels made under torch.inference_mode: gather cannot save them for backward
        t = t.clone()
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise UserError(f"target has {t.numel()} entries for {n} images; give one class index per image or one int")
    return t


def _span(target: torch.Tensor) -> tuple[int, int] | None:
    """(smallest, largest) target class, read once per call: on a GPU each read waits for
    the device, so the passes of a call check against this rather than read it again."""
    return (int(target.min()), int(target.max())) if target.numel() else None


def _check_logits(logits: torch.Tensor, target: torch.Tensor, span: tuple[int, int] | None = None) -> None:
    if not isinstance(logits, torch.Tensor):  # a tuple or dict failed with an AttributeError
        raise UserError(f"the model must return one tensor of N x classes logits, got a {type(logits).__name__}; "
                        "wrap it in an nn.Module whose forward returns the logits alone")
    if logits.dim() != 2:
        raise UserError(f"the model must return N x classes logits, got shape {tuple(logits.shape)}")
    lo, hi = span if span is not None else (_span(target) or (0, 0))
    if lo < 0 or hi >= logits.shape[1]:
        raise UserError(f"target classes must be in [0, {logits.shape[1] - 1}], got {lo}..{hi}")


def _default_batch_size(inputs: torch.Tensor) -> int:
    budget = _GPU_BUDGET if inputs.device.type == "cuda" else _CPU_BUDGET
    per_sample = max(1, inputs[0].numel())
    return max(1, budget * _REFERENCE_NUMEL // per_sample)


def _check_batch_size(batch_size: int | None, inputs: torch.Tensor) -> int:
    if batch_size is None:
        return _default_batch_size(inputs)
    # numbers.Integral: a numpy integer (n_steps takes one) was refused as "not a positive integer"
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer (samples per forward pass), got {batch_size!r}")
    return int(batch_size)


def _input_grads(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, fmt: torch.memory_format,
                 span: tuple[int, int] | None = None) -> torch.Tensor:
    """d logit[rows] / d x for a batch ``x`` (one forward, one autograd.grad); ``span``: the
    call's target range (:func:`_span`), else read from ``rows``."""
    x = x.contiguous(memory_format=fmt).detach().requires_grad_(True)
    logits = model(x)
    _check_logits(logits, rows, span)
    selected = logits.gather(1, rows.view(-1, 1))
    (grad,) = torch.autograd.grad(selected.sum(), x)
    return grad


def _forward_selected(model: nn.Module, x: torch.Tensor, rows: torch.Tensor, batch_size: int,
                      fmt: torch.memory_format, span: tuple[int, int] | None = None) -> torch.Tensor:
    out = []
    span = span if span is not None else _span(rows)
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            logits = model(x[s:s + batch_size].contiguous(memory_format=fmt))
            _check_logits(logits, rows, span)
            out.append(logits.gather(1, rows[s:s + batch_size].view(-1, 1)).squeeze(1))
    return torch.cat(out) if out else x.new_zeros(0)


def _plain_gradients(model: nn.Module, inputs: torch.Tensor, target, batch_size: int | None,
                     fast: bool) -> torch.Tensor:
    check_model(model)
    inputs = _check_inputs(inputs, model=model)
    batch_size = _check_batch_size(batch_size, inputs)
    with torch.inference_mode(False), torch.enable_grad():
        # as integrated_gradients: an inference tensor (inputs made, or noise added, under the caller's
        # torch.inference_mode) cannot require grad, and saliency raised a RuntimeError there
        inputs = inputs.clone() if inputs.is_inference() else inputs
        rows = _targets(target, inputs.shape[0], inputs.device)
        span = _span(rows)
        out = torch.zeros_like(inputs, memory_format=torch.contiguous_format)
        net, fmt = _prepare(model, inputs, fast)
        with _eval_without_param_grads(net):
            for s in range(0, inputs.shape[0], batch_size):
                out[s:s + batch_size] = _input_grads(net, inputs[s:s + batch_size],
                                                     rows[s:s + batch_size], fmt, span)
    return out


def attribution_map(attributions: torch.Tensor) -> torch.Tensor:
    """The overlay map of METHOD.md: ``M = sum over channels of |IG|``, ``N x H x W``."""
    if not isinstance(attributions, torch.Tensor) or attributions.dim() != 4:
        shape = tuple(attributions.shape) if isinstance(attributions, torch.Tensor) else type(attributions).__name__
        raise UserError(f"attributions must be N x C x H x W, got {shape}")
    return attributions.abs().sum(1)


def no_delta(n: int) -> torch.Tensor:
    """The completeness delta of an attribution that has none: N NaNs (CPU, float32)."""
    return torch.full((n,), float("nan"))
