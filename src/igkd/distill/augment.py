"""Batched augmentation as tensor ops: the overlay, random crop with zero padding, flip.

No per-sample Python: a whole batch is transformed by indexing. The overlay
(METHOD.md section 4) is applied to the full clean image before crop and flip; since
zero-padded cropping and flipping are linear, ``crop((1-w) x + w M') = (1-w) crop(x) +
w crop(M')``: the map is cropped and flipped exactly with its image. Maps that a loss
compares with the student (``explain``) go through :func:`crop_flip` with their images
as one more channel, so they take the very same crop and flip.
"""

from __future__ import annotations

import math

import torch


def draw(fn, n: int, shard: tuple[int, int] | None, device) -> torch.Tensor:
    """``fn(size, device)`` for a batch of n. With ``shard=(rank, world)`` the batch is slice
    ``rank`` of ``world`` equal slices of a global batch (DDP): the numbers are drawn for the
    global batch, the same stream as one process, and this rank's slice is returned."""
    rank, world = shard or (0, 1)
    return fn((n * world,), device)[rank * n:(rank + 1) * n]


def uniform(n: int, generator: torch.Generator, shard, device) -> torch.Tensor:
    """n numbers in [0, 1) for this rank's slice of the global batch, on ``device``."""
    rand = lambda size, dev: torch.rand(size, generator=generator, device=dev)  # noqa: E731
    return draw(rand, n, shard, generator.device).to(device)


def ig_overlay(x: torch.Tensor, maps: torch.Tensor, p: float, generator: torch.Generator,
               shard: tuple[int, int] | None = None, blend: float = 0.5,
               exponents: tuple[float, float] = (1.0, 2.0), constant: bool = False) -> torch.Tensor:
    """x: N x C x H x W in [0, 1]; maps: N x H x W (any non-negative scale); ``shard``: see ``draw``.

    For each sample independently: g = exp(U(ln lo, ln hi)) with ``exponents`` = (lo, hi)
    ((1, 2) in the paper); M' = M ** g, min-max normalised over the image to [0, 1]; with
    probability p, x <- (1 - blend) x + blend M' (blend 0.5 in the paper). ``constant``:
    the overlay's control: blend toward the constant image of M''s mean instead, the same
    shift in brightness and loss of contrast without the map's spatial layout.
    The random draws happen for every sample whatever p is, so the stream of random
    numbers (and hence the other augmentations) does not depend on p.
    """
    n = x.shape[0]
    u = uniform(n, generator, shard, x.device)
    pick = uniform(n, generator, shard, x.device) < p
    # every sample is computed and the picked ones selected: indexing by a boolean mask (or
    # asking whether any is picked) makes the host wait for the GPU at every step; on the CPU
    # the question costs nothing and skips the work when none is picked (most batches at small p
    # and batch size). Per sample the arithmetic is the same either way.
    if p <= 0 or (x.device.type == "cpu" and not bool(pick.any())):
        return x
    m = maps.float()
    lo, hi = math.log(exponents[0]), math.log(exponents[1])
    g = torch.exp(u * (hi - lo) + lo)
    m = m.clamp_min(0).pow(g[:, None, None])
    low = m.flatten(1).amin(1)[:, None, None]
    high = m.flatten(1).amax(1)[:, None, None]
    m = (m - low) / (high - low).clamp_min(1e-12)
    if constant:
        m = m.mean((1, 2), keepdim=True).expand_as(m)
    return torch.where(pick[:, None, None, None], (1 - blend) * x + blend * m[:, None], x)


# ``--augment auto`` takes random resized crops from this shorter side up
LARGE_SIDE = 128


def resolve_augment(augment: str, image_size: tuple[int, ...]) -> str:
    """The geometric augmentation ``augment`` names for images of ``image_size`` (H, W):
    ``auto`` is ``pad-crop`` below 128 pixels on the shorter side (CIFAR, Fashion-MNIST, Tiny
    ImageNet's 64, STL-10's 96: a shift of a few pixels moves the object by a real share of the
    image) and ``random-resized-crop`` from 128 up (ImageNet-class images, which torchvision's and
    timm's recipes train on random boxes: 4 pixels of 224 barely change the image)."""
    if augment != "auto":
        return augment
    return "random-resized-crop" if min(image_size) >= LARGE_SIDE else "pad-crop"


def crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator,
              shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Random crop of the zero-padded batch back to H x W, and random horizontal flip."""
    n, _, h, w = x.shape
    dev = generator.device
    rand = lambda size, d: torch.rand(size, generator=generator, device=d)  # noqa: E731
    offset = lambda size, d: torch.randint(0, 2 * padding + 1, size, generator=generator, device=d)  # noqa: E731
    if padding > 0:
        dy = draw(offset, n, shard, dev).to(x.device)
        dx = draw(offset, n, shard, dev).to(x.device)
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # N,1,H,1
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # N,1,1,W
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = draw(rand, n, shard, dev).to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def resized_crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                       generator: torch.Generator, shard: tuple[int, int] | None = None) -> torch.Tensor:
    """``N x 4`` integer boxes ``(top, left, height, width)`` of random resized crops, as
    torchvision's ``RandomResizedCrop.get_params`` draws them, for a whole batch at once:
    10 tries per image of an area share in ``scale`` and a log-uniform aspect ratio in
    ``ratio``; the first try that fits the image is taken, else the centre crop of the
    image clamped to the ratio range. Drawn for the global batch (see :func:`draw`)."""
    tries = 10
    dev = generator.device
    rand = lambda size, d: torch.rand((size[0], tries), generator=generator, device=d)  # noqa: E731
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draw(rand, n, shard, dev))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draw(rand, n, shard, dev))
    cw = torch.sqrt(area * aspect).round().long()
    ch = torch.sqrt(area / aspect).round().long()
    u, v = draw(rand, n, shard, dev), draw(rand, n, shard, dev)
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=dev))
    pick = first.clamp_min(0)[:, None]
    bh, bw = ch.gather(1, pick)[:, 0], cw.gather(1, pick)[:, 0]
    # torch.randint(0, h - ch + 1) as a uniform draw: floor(u * (h - ch + 1))
    top = (u.gather(1, pick)[:, 0] * (h - bh + 1)).floor().long().clamp_max(h - bh)
    left = (v.gather(1, pick)[:, 0] * (w - bw + 1)).floor().long().clamp_max(w - bw)
    # fallback (no try fitted): the centre crop at the nearest allowed aspect ratio
    in_ratio = w / h
    fw, fh = (w, int(round(w / ratio[0]))) if in_ratio < ratio[0] else \
        ((int(round(h * ratio[1])), h) if in_ratio > ratio[1] else (w, h))
    miss = first < 0
    bh = torch.where(miss, torch.full_like(bh, fh), bh)
    bw = torch.where(miss, torch.full_like(bw, fw), bw)
    top = torch.where(miss, (h - bh) // 2, top)
    left = torch.where(miss, (w - bw) // 2, left)
    return torch.stack([top, left, bh, bw], 1)


def resized_crop_flip(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float], flip: bool,
                      generator: torch.Generator, shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Random resized crop back to the batch's H x W, and random horizontal flip, for the
    whole batch in one ``grid_sample``: each image's box (:func:`resized_crop_boxes`)
    becomes an affine sampling grid, bilinear, sampling pixel centres as
    ``F.interpolate(crop, (H, W), mode="bilinear", align_corners=False)`` does, except
    that a sample within half a pixel of the box's edge blends with the pixel outside
    the box (interpolate clamps to the box) and there is no antialiasing when the box is
    larger than the output (it never is: the box lies inside the H x W image); a flip
    negates the grid's x. Every channel takes the same box, so a map passed as
    one more channel follows its image exactly."""
    n, _, h, w = x.shape
    boxes = resized_crop_boxes(n, h, w, scale, ratio, generator, shard).to(x.device)
    flips = torch.zeros(n, dtype=torch.bool, device=x.device)
    if flip:
        rand = lambda size, d: torch.rand(size, generator=generator, device=d)  # noqa: E731
        flips = draw(rand, n, shard, generator.device).to(x.device) < 0.5
    top, left, bh, bw = boxes.to(x.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    # output pixel centre u in [-1, 1] (align_corners=False) maps to input centre
    # left + (u + 1) / 2 * bw in pixels, i.e. (2 left + bw) / w - 1 + u * bw / w normalised
    theta[:, 0, 0] = torch.where(flips, -bw / w, bw / w)
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    # the map is axis-aligned (no rotation or shear), so the grid is separable: one x per column
    # and one y per row, broadcast; affine_grid's batched matmul over every pixel cost more than
    # the sampling itself (benchmarks/data_throughput.py)
    u = (torch.arange(w, dtype=x.dtype, device=x.device) * 2 + 1) / w - 1
    v = (torch.arange(h, dtype=x.dtype, device=x.device) * 2 + 1) / h - 1
    gx = theta[:, 0, 0, None] * u + theta[:, 0, 2, None]
    gy = theta[:, 1, 1, None] * v + theta[:, 1, 2, None]
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], -1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
