"""Evaluation: metrics (accuracy, balanced accuracy, Cohen's kappa, per class, confusion) of a model on a split."""

from .metrics import classification_metrics, cohen_kappa, predict

__all__ = ["classification_metrics", "cohen_kappa", "predict"]
