"""Architectures, spec strings, preprocessing and checkpoints."""

from .checkpoint import load_model, load_weights, read_metadata, read_state_dict, save_checkpoint, weights_fingerprint
from .mobilenetv2 import MobileNetV2
from .preprocess import Normalized, bare, with_preprocessing
from .registry import MODELS, build_model, count_parameters

__all__ = [
    "MODELS", "MobileNetV2", "Normalized", "bare", "build_model", "count_parameters", "load_model",
    "load_weights", "read_metadata", "read_state_dict", "save_checkpoint", "weights_fingerprint",
    "with_preprocessing",
]
