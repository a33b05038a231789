"""Losses of METHOD.md section 5, as plain functions (checked against hand computations).

KD:  L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)),  KL batch-mean.
AT:  A = l2-normalise(flatten(mean_c(F^2)));  L_AT = gamma * mean((A_t - A_s)^2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    log_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (T * T)


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            T: float, alpha: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts. With ``teacher_logits`` None this is plain cross-entropy."""
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce, {"ce": ce.detach()}
    kl = kd_kl(student_logits, teacher_logits, T)
    return (1 - alpha) * ce + alpha * kl, {"ce": ce.detach(), "kd": kl.detach()}


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """l2-normalised, flattened channel mean of squared activations (N x H*W)."""
    a = features.float().pow(2).mean(1).flatten(1)
    return F.normalize(a, p=2, dim=1)


def at_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """mean((A_t - A_s)^2) over batch and positions (multiply by gamma outside)."""
    if student_features.shape[-2:] != teacher_features.shape[-2:]:
        raise ValueError(f"attention transfer needs equal spatial sizes, got student "
                         f"{tuple(student_features.shape[-2:])} vs teacher {tuple(teacher_features.shape[-2:])}")
    return (attention_map(teacher_features) - attention_map(student_features)).pow(2).mean()
