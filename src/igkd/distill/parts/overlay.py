"""The overlay (METHOD.md section 4) and its two controls.

``ig``: each training image is blended, with probability p, toward its own teacher map
from the store: x <- (1 - w) x + w M', M' = minmax(M ** g), g log-uniform in the exponent
range. The paper: p 0.1, w 0.5, g in [1, 2]; the maps are whatever attribution the store
was built with (``--attribution``, integrated gradients by default).

``ig-shuffled``: the same, with the map of another image (a fixed derangement), so any
gain that survives it is not the teacher's knowledge of *this* image.

``overlay-constant``: the same draws, probability and blend, toward a constant image of
M''s mean: the overlay's brightness shift and loss of contrast without the map's layout.
With ``ig-shuffled`` it separates "any blend" from "the teacher's attribution".
"""

from __future__ import annotations

from ...options import opt
from .base import Part

# one set of fields shared by the three parts: a method has at most one of them (group "overlay")
FIELDS = {
    "p": opt(0.1, "probability of overlaying a sample's map (ig, ig-shuffled, overlay-constant)", low=0.0, high=1.0),
    "blend": opt(0.5, "overlay blend weight w: x <- (1 - w) x + w M' (the paper's 0.5)", low=0.0, high=1.0),
    "exponent_min": opt(1.0, "overlay: smallest map exponent g (M' = minmax(M ** g), g log-uniform)", low=0.0,
                        high=100.0, low_open=True),
    "exponent_max": opt(2.0, "overlay: largest map exponent g (the paper's range is [1, 2])", low=0.0, high=100.0,
                        low_open=True),
}


def shuffled_map_index(n: int, seed: int):
    """A fixed derangement-like permutation: sample i gets the map of sample perm[i] != i."""
    import torch
    from ..trainer import epoch_seed
    g = torch.Generator().manual_seed(epoch_seed(seed, -1))
    perm = torch.randperm(n, generator=g)
    same = perm == torch.arange(n)
    if n > 1 and bool(same.any()):  # move fixed points one step along
        fixed = same.nonzero().flatten()
        perm[fixed] = perm[torch.roll(fixed, 1)] if len(fixed) > 1 else perm[(fixed + 1) % n]
        if len(fixed) == 1:
            perm[(fixed + 1) % n] = fixed
    return perm


class Overlay(Part):
    name = "ig"
    help = "overlay of each image's own teacher map with probability p, blend w (the paper's method)"
    formula = "x ← (1 − w) x + w minmax(M_i^g) with probability p; g log-uniform in [1, 2], w 0.5, p 0.1"
    reference = "the paper (METHOD.md section 4)"
    group = "overlay"
    order = 20
    fields = FIELDS
    search = {"p": [0, 0.1, 0.25, 0.5]}  # blend too with --space blend=...: a larger grid by default
    needs_teacher = needs_maps = True
    stage = "overlay"
    shuffled = False
    constant = False

    def check(self, cfg, teacher, student, input_shape) -> None:
        from ...errors import UserError
        if cfg.exponent_min > cfg.exponent_max:
            raise UserError(f"--exponent-min {cfg.exponent_min} is above --exponent-max {cfg.exponent_max}; "
                            "give a range lo <= hi")

    def setup(self, run):
        index = None
        if self.shuffled:
            # the run's training images trade maps among themselves: a derangement over the whole
            # training split gave some of them the maps of validation images (and of images
            # outside a Monte Carlo subset), showing held-out attributions to the student
            import torch
            train = run.train_idx.cpu()
            index = torch.arange(len(run.dataset.train))
            index[train] = train[shuffled_map_index(len(train), run.cfg.seed)]
            index = index.to(run.device)
        return {"maps": run.maps, "index": index, "cfg": run.cfg}

    def transform(self, state, batch, gen, shard):
        from ..augment import ig_overlay
        cfg = state["cfg"]
        rows = state["index"][batch.idx] if state["index"] is not None else batch.idx
        batch.x = ig_overlay(batch.x, state["maps"][rows], cfg.p, gen, shard, blend=cfg.blend,
                             exponents=(cfg.exponent_min, cfg.exponent_max), constant=self.constant)
        return batch


class ShuffledOverlay(Overlay):
    name = "ig-shuffled"
    help = "control: the overlay with the map of another image (a fixed derangement)"
    formula = "as ig, with M_π(i) for a fixed derangement π"
    reference = "control (METHOD.md section 8)"
    order = 21
    shuffled = True


class ConstantOverlay(Overlay):
    name = "overlay-constant"
    help = "control: the overlay's draws and blend toward a constant image of the map's mean"
    formula = "as ig, with M' replaced by its mean over the image"
    reference = "control: the overlay as a mere blur and contrast change? (README, Evidence)"
    order = 22
    constant = True


PARTS = [Overlay(), ShuffledOverlay(), ConstantOverlay()]
