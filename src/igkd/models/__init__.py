"""Architectures (one module per family), spec strings, preprocessing and checkpoints."""

from .checkpoint import (copy_from_file, copy_matching, holds_own_weights, load_model, load_weights, read_metadata, read_state_dict,
                         recorded_spec, resume_identity, save_checkpoint, teacher_identity, weights_file, weights_fingerprint)
from .family import Family
from .fold import fold_batchnorm, inference_copy
from .mobilenetv2 import MobileNetV2, ReLU6, copy_free_relu6
from .preprocess import Normalized, bare, eval_mode, preprocessing_of, with_preprocessing
from .registry import MODELS, build_model, built_spec, count_parameters, family_of, find_family
from .user import to_device

__all__ = [
    "Family", "MODELS", "MobileNetV2", "Normalized", "ReLU6", "bare", "build_model", "built_spec", "copy_free_relu6",
    "copy_from_file", "copy_matching", "count_parameters", "eval_mode", "fold_batchnorm", "inference_copy", "family_of", "find_family", "holds_own_weights", "load_model",
    "load_weights", "preprocessing_of", "read_metadata", "read_state_dict", "recorded_spec", "resume_identity", "save_checkpoint",
    "teacher_identity", "to_device", "weights_file", "weights_fingerprint", "with_preprocessing",
]
