"""Distillation: method names, losses, batched augmentation with IG overlays, attention
transfer hooks, the trainer, and its speed and multi-process switches."""

from . import parallel
from .attention import FeatureHook, choose_layers
from .augment import crop_flip, ig_overlay
from .losses import at_loss, attention_map, kd_kl, kd_loss
from .methods import METHODS, Method, parse_method
from .trainer import Trainer, TrainingDiverged

__all__ = ["METHODS", "FeatureHook", "Method", "Trainer", "TrainingDiverged", "at_loss", "attention_map",
           "choose_layers", "crop_flip", "ig_overlay", "kd_kl", "kd_loss", "parallel", "parse_method"]
