"""SmoothGrad of gradient magnitudes (registry entry ``smoothgrad``: options
``smoothgrad_samples`` and ``smoothgrad_sigma``, ``smoothgrad_samples`` passes per image,
no completeness delta). Importing this module does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..options import opt
from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn


def smoothgrad(model: nn.Module, inputs: torch.Tensor, target, samples: int = 16, sigma: float = 0.15,
               generator: torch.Generator | None = None, batch_size: int | None = None,
               fast: bool = True, noise: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothGrad (Smilkov et al. 2017) of gradient magnitudes, as captum's
    ``NoiseTunnel(Saliency(model)).attribute(..., nt_type="smoothgrad", stdevs=sigma)``:
    the mean over ``samples`` noisy copies ``x + N(0, sigma^2)`` of ``|dF_y/dx|`` at each
    copy. ``sigma`` is in the units of ``inputs`` (0.15 of the [0, 1] pixel range by
    default). Noise comes from ``generator`` (CPU, drawn image-major as
    ``samples x C x H x W`` per image), so results are reproducible, or is ``noise`` itself
    (N x samples x C x H x W standard normal draws); ``batch_size`` noisy images per pass.
    Costs ``samples`` forward+backward passes per image."""
    import math
    import numbers

    import torch

    from ..errors import UserError
    from .engine import _check_inputs, _plain_gradients, _targets, check_model

    check_model(model)
    inputs = _check_inputs(inputs, model=model)
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise UserError(f"smoothgrad samples must be a positive integer, got {samples!r}")
    samples = int(samples)
    # an infinite sigma gave finite, meaningless maps; a string a TypeError
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 <= sigma < math.inf:
        raise UserError(f"smoothgrad sigma must be a finite number >= 0 (in the inputs' units), got {sigma!r}")
    n = inputs.shape[0]
    if noise is None:
        noise = torch.randn((n, samples, *inputs.shape[1:]), generator=generator, dtype=inputs.dtype)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n, samples, *inputs.shape[1:]):
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise UserError(f"smoothgrad noise must be a tensor of shape {(n, samples, *inputs.shape[1:])}, got {got}")
    # in the inputs' dtype: float64 draws (numpy's) made float64 images a float32 model refused
    noise = noise.to(device=inputs.device, dtype=inputs.dtype)
    noisy = (inputs.unsqueeze(1) + sigma * noise).reshape(n * samples, *inputs.shape[1:])
    rows = _targets(target, n, inputs.device).repeat_interleave(samples)
    grads = _plain_gradients(model, noisy, rows, batch_size, fast)
    return grads.abs().reshape(n, samples, *inputs.shape[1:]).mean(1)


def _compute(teacher, x, y, cfg, first_index: int = 0, n_steps: int | None = None):
    import torch

    from .engine import no_delta
    # each image's noise from its own dataset index: one generator per chunk drew an image's noise
    # by its place in the chunk, so a store depended on --chunk-size, which is not in its identity
    noise = torch.stack([torch.randn((cfg.smoothgrad_samples, *x.shape[1:]),
                                     generator=torch.Generator().manual_seed(first_index + i), dtype=x.dtype)
                         for i in range(len(x))]) if len(x) else None
    return smoothgrad(teacher, x, y, cfg.smoothgrad_samples, cfg.smoothgrad_sigma, noise=noise,
                      batch_size=cfg.ig_batch or None), no_delta(len(x))


ATTRIBUTION = Attribution(
    name="smoothgrad",
    help="mean |gradient| over noisy copies, --smoothgrad-samples passes",
    fields={"smoothgrad_samples": opt(16, "noisy copies per image for smoothgrad", low=1, high=4096, unit="passes"),
            "smoothgrad_sigma": opt(0.15, "noise standard deviation for smoothgrad, in [0, 1] pixel units", low=0.0,
                                    high=10.0)},
    settings=lambda cfg: {"attribution": "smoothgrad", "samples": cfg.smoothgrad_samples,
                          "sigma": cfg.smoothgrad_sigma, "noise": "seeded by each image's index"},
    compute=_compute,
    describe=lambda cfg: f"smoothgrad x {cfg.smoothgrad_samples} samples, sigma {cfg.smoothgrad_sigma}",
)
