"""Gradient saliency ``|dF_y/dx|`` (registry entry ``saliency``: one pass per image, no
options, no completeness delta). Importing this module does not import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .registry import Attribution

if TYPE_CHECKING:
    import torch
    from torch import nn


def saliency(model: nn.Module, inputs: torch.Tensor, target, abs: bool = True,
             batch_size: int | None = None, fast: bool = True) -> torch.Tensor:
    """Gradient saliency ``|dF_y/dx|`` (``abs=False``: the signed gradient), like captum's
    ``Saliency``. One forward and backward per image; ``batch_size`` images per pass;
    ``fast`` as in :func:`~igkd.attribution.integrated_gradients`."""
    from .engine import _plain_gradients
    grads = _plain_gradients(model, inputs, target, batch_size, fast)
    return grads.abs() if abs else grads


def _compute(teacher, x, y, cfg, first_index: int = 0, n_steps: int | None = None):
    from .engine import no_delta
    return saliency(teacher, x, y, batch_size=cfg.ig_batch or None), no_delta(len(x))


ATTRIBUTION = Attribution(
    name="saliency",
    help="|gradient|, 1 pass",
    settings=lambda cfg: {"attribution": "saliency"},
    compute=_compute,
)
