"""Input times gradient ``x * dF_y/dx`` (registry entry ``input_x_gradient``: one pass per
image, no options, no completeness delta). Importing this module does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn


def input_x_gradient(model: nn.Module, inputs: torch.Tensor, target,
                     batch_size: int | None = None, fast: bool = True) -> torch.Tensor:
    """``x * dF_y/dx`` (captum's ``InputXGradient``): IG with a zero baseline and a
    single right-endpoint step. Conventions as :func:`~igkd.attribution.saliency`."""
    from .engine import _plain_gradients
    grads = _plain_gradients(model, inputs, target, batch_size, fast)
    return grads * inputs.detach()


def _compute(teacher, x, y, cfg, first_index: int = 0, n_steps: int | None = None):
    from .engine import no_delta
    return input_x_gradient(teacher, x, y, batch_size=cfg.ig_batch or None), no_delta(len(x))


ATTRIBUTION = Attribution(
    name="input_x_gradient",
    help="input x gradient, 1 pass",
    settings=lambda cfg: {"attribution": "input_x_gradient"},
    compute=_compute,
)
