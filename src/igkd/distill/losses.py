"""Losses of the method parts, as plain functions (checked against hand computations and
the papers' formulas in tests/test_losses_augment.py).

KD:   L = (1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T)),  KL batch-mean.
AT:   A = l2-normalise(flatten(mean_c(F^2)));  L_AT = gamma * mean((A_t - A_s)^2).
DKD:  TCKD = T^2 KL(b_t || b_s), b = (p_y, 1 - p_y);  NCKD = T^2 KL(q_t || q_s), q = softmax over
      the non-target classes alone (Zhao et al. 2022).
DIST: 1 - Pearson correlation of softmax(s/T) and softmax(t/T), per sample (inter) and per
      class over the batch (intra) (Huang et al. 2022).
Explanation matching: 1 - cos(E_s, E_t) per sample (e2KD, Parchami-Araghi et al. 2024).
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


def standardize(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al. 2024): z-scores over the classes (unbiased std, as
    their code)."""
    z = logits.float()
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + eps)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) of decoupled KD, each T^2-scaled and batch-mean. Log-probabilities
    throughout (log-sum-exp for 1 - p_y, the target column removed for the non-target
    distribution) rather than the paper code's probabilities and -1000 masking, so
    confident teachers give no log(0)."""
    s, t = student_logits.float() / T, teacher_logits.float() / T
    n, c = s.shape
    gt = F.one_hot(labels, c).bool()
    log_ps, log_pt = F.log_softmax(s, 1), F.log_softmax(t, 1)

    # the target and non-target columns by gather, not by boolean masks (which make the host
    # wait for the GPU at every step): the non-target columns of row i, in order
    others = torch.arange(c - 1, device=s.device)[None, :]
    others = others + (others >= labels[:, None]).long()

    def binary(log_p):  # log (p_y, 1 - p_y)
        other = log_p.masked_fill(gt, float("-inf")).logsumexp(1)
        return torch.stack([log_p.gather(1, labels[:, None]).squeeze(1), other], 1)

    tckd = F.kl_div(binary(log_ps), binary(log_pt), reduction="batchmean", log_target=True) * (T * T)
    rest = lambda z: F.log_softmax(z.gather(1, others), 1)  # noqa: E731
    nckd = F.kl_div(rest(s), rest(t), reduction="batchmean", log_target=True) * (T * T)
    return tckd, nckd


def _pearson_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mean over rows of 1 - Pearson correlation (centred cosine), as DIST's code:
    a.b / (|a| |b| + eps). Not F.cosine_similarity, which clamps each norm at eps and so
    gives near-constant rows (a near-uniform softmax, a class column equal over the
    batch) their full, noise-driven correlation where DIST's code gives about 0."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)).mean()


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               T: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) relation distances of DIST, unscaled (the part multiplies by T^2)."""
    ps = F.softmax(student_logits.float() / T, 1)
    pt = F.softmax(teacher_logits.float() / T, 1)
    return _pearson_distance(ps, pt), _pearson_distance(ps.t(), pt.t())


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """mean over samples of 1 - cos(flatten(a_i), flatten(b_i))."""
    return 1 - F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=eps).mean()
