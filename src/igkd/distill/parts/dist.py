"""``dist``: DIST (Huang et al., NeurIPS 2022), relations instead of exact probabilities.

With P = softmax(s/T), Q = softmax(t/T) (N x classes) and rho the Pearson correlation:
inter = mean_i (1 - rho(P_i., Q_i.)) over samples, intra = mean_c (1 - rho(P_.c, Q_.c))
over classes; L = CE + beta T^2 inter + gamma T^2 intra. Defaults: the paper's CIFAR-100
setting (beta 2, gamma 2, T 4).
"""

from __future__ import annotations

from ...options import opt
from .base import Part


class DIST(Part):
    name = "dist"
    help = "DIST, CE + beta T^2 inter-class + gamma T^2 intra-class Pearson distance (Huang 2022: 2, 2, T 4)"
    formula = "CE(s, y) + beta T^2 mean_i(1 - rho(P_i, Q_i)) + gamma T^2 mean_c(1 - rho(P_c, Q_c))"
    reference = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"
    group = "logits"
    order = 12
    fields = {
        "dist_beta": opt(2.0, "dist: weight of the inter-class (per sample) relation term", low=0.0, high=1e4),
        "dist_gamma": opt(2.0, "dist: weight of the intra-class (per class, over the batch) relation term",
                          low=0.0, high=1e4),
        "dist_T": opt(4.0, "dist: temperature", low=0.0, high=100.0, low_open=True),
    }
    search = {"dist_beta": [1, 2], "dist_gamma": [1, 2], "dist_T": [1, 4]}
    log_scale = ("dist_T",)
    needs_teacher = needs_logits = True

    def loss(self, state, step):
        from ..losses import dist_terms
        from ..parallel import gather_batch
        cfg = step.cfg
        # intra correlates each class over the batch: over the global batch under torchrun, as
        # one process does, not over each process's slice
        inter, intra = dist_terms(gather_batch(step.logits.float()), gather_batch(step.teacher_logits.float()),
                                  cfg.dist_T)
        scale = cfg.dist_T ** 2
        return {"inter": (cfg.dist_beta * scale, inter), "intra": (cfg.dist_gamma * scale, intra)}


PARTS = [DIST()]
