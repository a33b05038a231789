"""Architectures, spec strings, preprocessing and checkpoints."""

from .checkpoint import copy_matching, load_model, load_weights, read_metadata, read_state_dict, save_checkpoint, weights_fingerprint
from .mobilenetv2 import MobileNetV2
from .preprocess import Normalized, bare, with_preprocessing
from .family import Family
from .registry import MODELS, build_model, count_parameters, family_of

__all__ = [
    "Family", "MODELS", "copy_matching", "MobileNetV2", "family_of", "Normalized", "bare", "build_model", "count_parameters", "load_model",
    "load_weights", "read_metadata", "read_state_dict", "save_checkpoint", "weights_fingerprint",
    "with_preprocessing",
]
