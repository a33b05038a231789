"""Distillation: losses, batched augmentation with IG overlays, and the trainer."""

from .augment import crop_flip, ig_overlay
from .losses import at_loss, attention_map, kd_kl, kd_loss
from .trainer import METHODS, Method, Trainer, TrainingDiverged, parse_method

__all__ = ["METHODS", "Method", "Trainer", "TrainingDiverged", "at_loss", "attention_map", "crop_flip",
           "ig_overlay", "kd_kl", "kd_loss", "parse_method"]
