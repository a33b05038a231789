"""``cutmix``: CutMix (Yun et al., ICCV 2019) as the augmentation control of distillation.

Strong mixing augmentation is itself known to help KD ("What makes a good data
augmentation in knowledge distillation", NeurIPS 2022), so a gain of the overlay should
be measured against it. With probability ``cutmix_p`` a sample gets a box of its
partner pasted in: lam ~ U(0, 1) (Beta(1, 1), the paper's CIFAR setting), a box of side
sqrt(1 - lam) of the image's at a uniform centre, clipped to the image; its label becomes
lam' y + (1 - lam') y_partner with lam' the unpasted share of the pixels. The teacher runs
online on the mixed images (their precomputed clean logits would describe other images).

Partners are neighbours in the shuffled batch, (0, 1), (2, 3), ..., one box per sample, as
tensor ops after crop and flip. Pairs never straddle two processes' slices when the batch
per process is even, so torchrun gives the batches of one process (an odd last sample
keeps its image).
"""

from __future__ import annotations

from ...options import opt
from .base import Part


class CutMix(Part):
    name = "cutmix"
    help = "control: CutMix of neighbouring samples (p 0.5, lam ~ U(0,1)), teacher online, mixed labels"
    formula = "x_i ← box-paste of x_j (area 1 − lam), target lam' y_i + (1 − lam') y_j"
    reference = "Yun et al., ICCV 2019"
    order = 50
    fields = {"cutmix_p": opt(0.5, "cutmix: probability that a sample gets a box of its partner (the CutMix "
                              "paper's CIFAR setting)", low=0.0, high=1.0)}
    search = {"cutmix_p": [0.25, 0.5, 1.0]}
    stage = "mix"
    online_teacher = True

    def setup(self, run):
        return {"cfg": run.cfg, "classes": len(run.dataset.classes)}

    def transform(self, state, batch, gen, shard):
        import torch
        import torch.nn.functional as F
        from ..augment import uniform
        x = batch.x
        n, _, h, w = x.shape
        draws = [uniform(n, gen, shard, x.device) for _ in range(4)]  # apply, lam, centre y, centre x
        apply = draws[0] < state["cfg"].cutmix_p
        cut = torch.sqrt(1 - draws[1])
        ch, cw = (h * cut).floor().long(), (w * cut).floor().long()
        cy, cx = (draws[2] * h).floor().long(), (draws[3] * w).floor().long()
        y1, y2 = (cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h)
        x1, x2 = (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)
        rows = torch.arange(h, device=x.device)[None, :, None]
        cols = torch.arange(w, device=x.device)[None, None, :]
        box = (rows >= y1[:, None, None]) & (rows < y2[:, None, None]) & (cols >= x1[:, None, None]) \
            & (cols < x2[:, None, None]) & apply[:, None, None]  # N x H x W
        # an odd last sample is its own partner; clamped, not assigned through a boolean mask,
        # which makes the host wait for the GPU at every step
        partner = (torch.arange(n, device=x.device) ^ 1).clamp_(max=n - 1)
        batch.x = torch.where(box[:, None], x[partner], x)
        if batch.maps is not None:
            batch.maps = torch.where(box, batch.maps[partner], batch.maps)
        keep = 1 - box.flatten(1).float().mean(1)  # lam': the share of the sample's own pixels
        own = batch.target if batch.target is not None else F.one_hot(batch.y, state["classes"]).float()
        batch.target = keep[:, None] * own + (1 - keep[:, None]) * own[partner]
        batch.mixed = True
        return batch


PARTS = [CutMix()]
