"""``dkd``: decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD's KL splits into a target-class term and a non-target term (``losses.dkd_terms``):
TCKD = T^2 KL(b_t || b_s) on the binary distributions (p_target, 1 - p_target), and
NCKD = T^2 KL(q_t || q_s) on the distributions over the non-target classes alone.
L = CE + w(epoch) (alpha TCKD + beta NCKD), w = min(epoch / warm-up, 1).
Defaults: the paper's CIFAR-100 setting (alpha 1, beta 8, T 4, 20 warm-up epochs).
"""

from __future__ import annotations

from ...options import opt
from .base import Part
from .kd import standardize_option


class DKD(Part):
    name = "dkd"
    help = "decoupled KD, CE + alpha TCKD + beta NCKD with a linear warm-up (Zhao 2022: alpha 1, beta 8, T 4)"
    formula = "CE(s, y) + min(epoch/warm-up, 1) (alpha TCKD + beta NCKD), both T^2-scaled KLs"
    reference = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"
    group = "logits"
    order = 11
    fields = {
        "dkd_alpha": opt(1.0, "dkd: weight of the target-class term TCKD", low=0.0, high=1e4),
        "dkd_beta": opt(8.0, "dkd: weight of the non-target-class term NCKD", low=0.0, high=1e4),
        "dkd_T": opt(4.0, "dkd: temperature", low=0.0, high=100.0, low_open=True),
        "dkd_warmup": opt(20.0, "dkd: epochs over which its weight rises linearly to 1 (0 = none)", low=0.0,
                          high=1e5, unit="epochs"),
        "dkd_standardize": standardize_option("dkd"),
    }
    search = {"dkd_beta": [1, 2, 4, 8], "dkd_T": [1, 2, 4]}
    log_scale = ("dkd_T",)
    needs_teacher = needs_logits = True

    def loss(self, state, step):
        from ..losses import dkd_terms, standardize
        cfg = step.cfg
        s, t = step.logits, step.teacher_logits
        if cfg.dkd_standardize:
            s, t = standardize(s), standardize(t)
        tckd, nckd = dkd_terms(s, t, step.batch.y, cfg.dkd_T)
        ramp = min(step.epoch / cfg.dkd_warmup, 1.0) if cfg.dkd_warmup > 0 else 1.0
        return {"tckd": (ramp * cfg.dkd_alpha, tckd), "nckd": (ramp * cfg.dkd_beta, nckd)}


PARTS = [DKD()]
