"""Integrated gradients (METHOD.md section 3), batched over images and steps.

    IG_i(x) = (x_i - x'_i) * integral_0^1 dF_y(x' + a (x - x')) / dx_i da

F_y is the model's logit for class ``target``, x' the baseline
(:mod:`.baselines`). The integral is a quadrature (:mod:`.quadrature`, captum's methods
and definitions); the interpolated images of several inputs times all their steps go
through the model as ONE batch, and one ``torch.autograd.grad`` call returns the
gradients w.r.t. that batch (never into the parameters). The model runs in eval mode
with its parameters' ``requires_grad`` off; both are restored afterwards. The engine
(fast copy, batching, gradient core, and the precision notes) is :mod:`.engine`.

Registry entry ``ig``: options ``ig_steps``, ``ig_method``, ``ig_baseline``; it has a
completeness delta. Importing this module does not import torch (see :mod:`.registry`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn


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
            function with different float32 rounding (see "Precision" in :mod:`.engine`).
            ``fast=False`` runs ``model`` itself with captum's operations and memory
            format, and agrees with captum to rounding (~1e-7 of max|IG|).

    Returns:
        attributions shaped like ``inputs`` (its dtype), or ``(attributions, delta)``.
    """
    import torch

    from .baselines import _resolve_baseline
    from .engine import (_check_batch_size, _check_inputs, _eval_without_param_grads, _forward_selected,
                         _input_grads, _prepare, _targets)
    from .quadrature import check_method, quadrature

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


def _compute(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, first_index: int = 0,
             n_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from .baselines import model_baseline
    return integrated_gradients(teacher, x, y, baseline=model_baseline(teacher, x, cfg.ig_baseline),
                                n_steps=n_steps or cfg.ig_steps, method=cfg.ig_method,
                                batch_size=cfg.ig_batch or None, return_delta=True)


ATTRIBUTION = Attribution(
    name="ig",
    help="integrated gradients, the paper's: --ig-steps passes",
    options=("ig_steps", "ig_method", "ig_baseline"),
    settings=lambda cfg: {"ig_steps": cfg.ig_steps, "ig_method": cfg.ig_method, "ig_baseline": cfg.ig_baseline},
    compute=_compute,
    completeness=True,
    describe=lambda cfg: f"IG {cfg.ig_method} x {cfg.ig_steps} steps, baseline {cfg.ig_baseline}",
)

_MOVED = {"BASELINES": ".baselines", "gaussian_blur": ".baselines", "make_baseline": ".baselines",
          "_resolve_baseline": ".baselines", "attribution_map": ".engine", "saliency": ".saliency",
          "input_x_gradient": ".input_x_gradient", "smoothgrad": ".smoothgrad"}


def __getattr__(name: str):
    """Names this module held before the split (``from igkd.attribution.ig import
    BASELINES, _prepare``): found where they live now."""
    import importlib
    source = _MOVED.get(name, ".engine" if name.startswith("_") and not name.startswith("__") else None)
    if source is not None:
        module = importlib.import_module(source, __package__)
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
