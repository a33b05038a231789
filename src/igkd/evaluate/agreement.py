"""Attribution agreement between two models on the same images.

Maps are compared per image, flattened over pixels: Spearman rank correlation (Pearson
correlation of average ranks, so ties get the mean of the ranks they span), optionally
over a subset of pixels, and the overlap of the top k% pixels (intersection over union
of the two sets).
"""

from __future__ import annotations

import math

import torch


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along the last dimension, ties given the average of their ranks."""
    n = x.shape[-1]
    if n == 0:
        return torch.empty(x.shape, dtype=torch.float64, device=x.device)
    sorted_x, order = x.sort(dim=-1, stable=True)
    flat_sorted = sorted_x.reshape(-1, n)
    out = torch.empty(flat_sorted.shape, dtype=torch.float64, device=x.device)  # on x's device: a GPU audit
    for row, (values, idx) in enumerate(zip(flat_sorted, order.reshape(-1, n))):
        # runs of equal values: start positions and lengths, each gets its mean rank
        _, counts = torch.unique_consecutive(values, return_counts=True)
        ends = counts.cumsum(0).double()
        mean_rank = ends - (counts.double() - 1) / 2  # ranks start-of-run+1 ... end, mean
        out[row, idx] = mean_rank.repeat_interleave(counts)
    return out.reshape(x.shape)


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spearman rank correlation per row of ``a`` and ``b`` (N x ..., flattened per row),
    over the entries where ``mask`` is True (all when None); NaN for a row where either
    side is constant or fewer than 2 entries are masked in (an image equal to the baseline
    has all-zero maps: the masked set is empty, and the whole audit crashed)."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    if mask is None:
        return _pearson(average_ranks(a), average_ranks(b))
    mask = mask.reshape(len(mask), -1)
    nan = torch.tensor(math.nan, dtype=torch.float64, device=a.device)
    return torch.stack([_pearson(average_ranks(x[m]), average_ranks(y[m])) if int(m.sum()) >= 2 else nan
                        for x, y, m in zip(a, b, mask)])


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    den = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    return torch.where(den > 0, (x * y).sum(-1) / den.clamp_min(1e-300), torch.full_like(den, math.nan))


def top_fraction_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ceil(fraction * pixels) largest values per row (N x ...)."""
    flat = maps.reshape(len(maps), -1)
    k = max(1, math.ceil(round(fraction * flat.shape[1], 9)))  # 0.07 * 400 is 28.000000000000004, not 29
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(k, dim=1).indices, True)
    return mask


def topk_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Per row, intersection over union of the top ``fraction`` pixels of ``a`` and ``b``;
    NaN where either map is constant (all zero for an image equal to the baseline): its "top"
    pixels would be whichever the tie-break picks, and two such maps scored as agreeing."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ma, mb = top_fraction_mask(a, fraction), top_fraction_mask(b, fraction)
    iou = (ma & mb).sum(1).double() / (ma | mb).sum(1).double()
    flat_a, flat_b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    constant = (flat_a.amax(1) == flat_a.amin(1)) | (flat_b.amax(1) == flat_b.amin(1))
    return torch.where(constant.to(iou.device), torch.full_like(iou, math.nan), iou)


__all__ = ["average_ranks", "spearman", "top_fraction_mask", "topk_iou"]
