"""Distillation: method parts and names, losses, batched augmentation with IG overlays,
attention transfer hooks, the trainer, and its speed and multi-process switches."""

from .._lazy import lazy_package

_NAMES = {
    "parallel": ".parallel", "FeatureHook": ".attention", "choose_layers": ".attention",
    "crop_flip": ".augment", "ig_overlay": ".augment",
    "at_loss": ".losses", "attention_map": ".losses", "kd_kl": ".losses", "kd_loss": ".losses",
    "METHODS": ".methods", "MODERN_METHODS": ".methods", "Method": ".methods", "parse_method": ".methods",
    "Part": ".parts", "register_part": ".parts",
    "Trainer": ".trainer", "TrainingDiverged": ".trainer",
}
lazy_package(__name__, _NAMES)  # the CLI reads method names without importing torch
__all__ = sorted(_NAMES)
