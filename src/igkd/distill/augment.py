"""Batched augmentation as tensor ops: IG overlay, random crop with zero padding, flip.

No per-sample Python: a whole batch is transformed by indexing. The IG overlay
(METHOD.md section 4) is applied to the full clean image before crop and flip; since
zero-padded cropping and flipping are linear, ``crop(0.5 x + 0.5 M') = 0.5 crop(x) +
0.5 crop(M')``: the map is cropped and flipped exactly with its image.
"""

from __future__ import annotations

import math

import torch


def _draw(fn, n: int, shard: tuple[int, int] | None, device) -> torch.Tensor:
    """``fn(size, device)`` for a batch of n. With ``shard=(rank, world)`` the batch is slice
    ``rank`` of ``world`` equal slices of a global batch (DDP): the numbers are drawn for the
    global batch, the same stream as one process, and this rank's slice is returned."""
    rank, world = shard or (0, 1)
    return fn((n * world,), device)[rank * n:(rank + 1) * n]


def ig_overlay(x: torch.Tensor, maps: torch.Tensor, p: float, generator: torch.Generator,
               shard: tuple[int, int] | None = None) -> torch.Tensor:
    """x: N x C x H x W in [0, 1]; maps: N x H x W (any non-negative scale); ``shard``: see ``_draw``.

    For each sample independently: g = exp(U(ln 1, ln 2)); M' = M ** g, min-max
    normalised over the image to [0, 1]; with probability p, x <- 0.5 x + 0.5 M'.
    The random draws happen for every sample whatever p is, so the stream of random
    numbers (and hence the other augmentations) does not depend on p.
    """
    n = x.shape[0]
    rand = lambda size, dev: torch.rand(size, generator=generator, device=dev)  # noqa: E731
    u = _draw(rand, n, shard, generator.device).to(x.device)
    pick = _draw(rand, n, shard, generator.device).to(x.device) < p
    if not bool(pick.any()):
        return x
    m = maps[pick].float()
    g = torch.exp(u[pick] * math.log(2.0))
    m = m.clamp_min(0).pow(g[:, None, None])
    lo = m.flatten(1).amin(1)[:, None, None]
    hi = m.flatten(1).amax(1)[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    out = x.clone()
    out[pick] = 0.5 * x[pick] + 0.5 * m[:, None]
    return out


def crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
              shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop of the zero-padded batch back to H x W, and random horizontal flip."""
    n, _, h, w = x.shape
    dev = generator.device
    rand = lambda size, d: torch.rand(size, generator=generator, device=d)  # noqa: E731
    offset = lambda size, d: torch.randint(0, 2 * padding + 1, size, generator=generator, device=d)  # noqa: E731
    if padding > 0:
        dy = _draw(offset, n, shard, dev).to(x.device)
        dx = _draw(offset, n, shard, dev).to(x.device)
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N,1,H,1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N,1,1,W
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = _draw(rand, n, shard, dev).to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x
