"""``kd``: Hinton et al. (2015) distillation on the teacher's logits, METHOD.md section 5.

L = (1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t/T) || softmax(s/T)), KL batch-mean.
``kd_standardize``: logit standardisation (Sun et al., CVPR 2024): both logit vectors
become z-scores over the classes before the temperature, so the student matches the
teacher's logit relations, not their scale.
"""

from __future__ import annotations

from ...options import opt
from .base import Part



def standardize_option(part: str):
    return opt(False, f"{part}: logit standardisation (Sun et al. 2024), z-score each logit vector over the "
               "classes before the temperature")


class KD(Part):
    name = "kd"
    help = "distillation on teacher logits, (1-alpha) CE + alpha T^2 KL (Hinton 2015; the paper's T 2.5, alpha 0.01)"
    formula = "(1 - alpha) CE(s, y) + alpha T^2 KL(softmax(t/T) ‖ softmax(s/T))"
    reference = "Hinton et al. 2015; logit standardisation: Sun et al. 2024"
    group = "logits"
    order = 10
    fields = {
        "T": opt(2.5, "distillation temperature of kd", low=0.0, high=100.0, low_open=True),
        "alpha": opt(0.01, "weight of the KD term; (1 - alpha) weighs cross-entropy", low=0.0, high=1.0),
        "kd_standardize": standardize_option("kd"),
    }
    search = {"T": [1, 2, 2.5, 4, 8], "alpha": [0.01, 0.1, 0.5, 0.9]}
    log_scale = ("T",)
    needs_teacher = needs_logits = True

    def ce_weight(self, cfg) -> float:
        return 1 - cfg.alpha

    def loss(self, state, step):
        from ..losses import kd_kl, standardize
        s, t = step.logits, step.teacher_logits
        if step.cfg.kd_standardize:
            s, t = standardize(s), standardize(t)
        return {"kd": (step.cfg.alpha, kd_kl(s, t, step.cfg.T))}


PARTS = [KD()]
