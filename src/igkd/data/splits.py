"""Seeded, stratified index splits (validation sets, imagefolder test hold-outs)."""

from __future__ import annotations

import torch

from ..errors import UserError


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into ``(keep_idx, held_idx)``, both sorted int64.

    Class ``c`` with ``n_c`` samples gives ``round(fraction * n_c)`` of them to the held
    part (Python's ``round``), at least 1 when ``fraction > 0`` and ``n_c >= 2``, and at
    most ``n_c - 1`` when ``n_c >= 2``, so every such class stays on both sides. Which
    ones is drawn by a ``torch.Generator`` seeded with ``seed``, classes in sorted order:
    the same labels and seed always give the same split.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"split fraction {fraction} is out of range; use a value in [0, 1), e.g. 0.1")
    labels = torch.as_tensor(labels).reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).reshape(-1)
        n = len(idx)
        k = round(fraction * n)
        if n >= 2 and fraction > 0:
            k = min(max(k, 1), n - 1)
        held.append(idx[torch.randperm(n, generator=gen)[:k]])
    mask = torch.zeros(len(labels), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).reshape(-1), torch.nonzero(mask).reshape(-1)


def subset_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted dataset indices of a stratified ``fraction`` of the samples (all of them at 1).

    The complement of :func:`stratified_split`'s held part with ``1 - fraction``: class
    ``c`` keeps ``n_c - round((1 - fraction) * n_c)`` samples (at least one). The indices
    are the samples' own, so anything stored by sample index stays aligned.
    """
    labels = torch.as_tensor(labels).reshape(-1)
    if not 0 < fraction <= 1:
        raise UserError(f"subset fraction {fraction} is out of range; use a value in (0, 1], e.g. 0.8")
    if fraction == 1:
        return torch.arange(len(labels))
    keep = stratified_split(labels, 1 - fraction, seed)[0]
    # stratified_split holds out the one sample of a class when 1 - fraction > 0.5 (round(n * f)
    # is 1): add such samples back. Classes of 2 or more keep exactly the rows they always kept
    # (the generator draws the same), so earlier subsets, and results built on them, stand.
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    single = torch.nonzero(counts[inverse] == 1).reshape(-1)
    return torch.unique(torch.cat([keep, single]))  # sorted
