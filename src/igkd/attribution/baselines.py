"""Baselines x' for integrated gradients: the kinds of :func:`make_baseline` and the
Gaussian blur behind ``"blur"``; :func:`_resolve_baseline` turns a ``baseline`` argument
(None, a number, a tensor or a kind) into a tensor like the inputs."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..models import Normalized
from .engine import _check_inputs

BASELINES = ("zero", "black", "blur")


def _resolve_baseline(model: nn.Module, inputs: torch.Tensor,
                      baseline: torch.Tensor | float | str | None) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(inputs)
    if isinstance(baseline, str):
        mean = model.mean if isinstance(model, Normalized) else None
        return make_baseline(baseline, inputs, mean=mean)
    b = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device).detach()
    if not bool(torch.isfinite(b).all()):  # NaN gave all-NaN maps without a word
        raise UserError("the baseline holds NaN or infinite values; give finite pixels (or a named baseline)")
    try:
        return torch.broadcast_to(b, inputs.shape)
    except RuntimeError:
        raise UserError(f"baseline of shape {tuple(b.shape)} does not broadcast to inputs of shape "
                        f"{tuple(inputs.shape)}") from None



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
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real)
                                  or not 0 < sigma < math.inf):
            raise UserError(f"blur sigma must be a finite number > 0 (pixels), got {sigma!r}")
        return gaussian_blur(inputs, (sigma, sigma) if sigma is not None else (h / 8, w / 8))
    raise UserError(f"unknown baseline {kind!r}; use one of: {', '.join(BASELINES)}")


def model_baseline(model: nn.Module, inputs: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`make_baseline` of ``kind`` for ``model``: with its ``mean``/``std`` when it is
    an :class:`igkd.models.Normalized`, as precompute's IG uses it."""
    mean = model.mean if isinstance(model, Normalized) else None
    std = model.std if isinstance(model, Normalized) else None
    return make_baseline(kind, inputs, mean=mean, std=std)
