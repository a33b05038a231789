"""Evaluation: metrics (accuracy, per class, confusion) of a model on a split."""

from .metrics import classification_metrics, predict

__all__ = ["classification_metrics", "predict"]
