"""Model spec strings -> ``nn.Module``.

``mobilenetv2``                 the CIFAR MobileNetV2 teacher (2,236,682 params at 10 classes)
``mobilenetv2:drop=5``          the paper's 4.12x student (last 5 feature blocks removed)
``mobilenetv2:width=0.35``      a width-multiplied student (fewer channels everywhere)
``mobilenetv2:width=0.5,drop=3``  both

Options: ``drop`` (int, 0-18, default 0), ``width`` (float > 0, default 1.0),
``dropout`` (teacher head dropout, default 0.2). The number of classes and input
channels come from the dataset, not the spec. Any other ``nn.Module`` can be used
through the Python API.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import UserError
from ..spec import Spec, parse_spec, reject_leftovers, take_option
from .mobilenetv2 import NUM_FEATURE_BLOCKS, MobileNetV2


def _mobilenetv2(spec: Spec, num_classes: int, in_channels: int) -> nn.Module:
    opts = dict(spec.options)
    what = "model spec"
    if spec.arg:
        raise UserError(f"model spec '{spec}' takes no positional argument; use e.g. 'mobilenetv2:drop=5'")
    drop = take_option(spec, opts, "drop", int, 0, what)
    width = take_option(spec, opts, "width", float, 1.0, what)
    dropout = take_option(spec, opts, "dropout", float, 0.2, what)
    reject_leftovers(spec, opts, ["drop", "width", "dropout"], what)
    if not 0 <= drop < NUM_FEATURE_BLOCKS:
        raise UserError(f"drop={drop} in '{spec}' is out of range; use 0 (teacher) to {NUM_FEATURE_BLOCKS - 1}")
    if not 0 < width <= 4:
        raise UserError(f"width={width} in '{spec}' is out of range; use a multiplier in (0, 4]")
    if not 0 <= dropout < 1:
        raise UserError(f"dropout={dropout} in '{spec}' is out of range; use [0, 1)")
    return MobileNetV2(num_classes, in_channels, width=width, drop=drop, dropout=dropout)


MODELS: dict[str, Callable[[Spec, int, int], nn.Module]] = {"mobilenetv2": _mobilenetv2}


def build_model(spec: str | Spec, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build an untrained model from its spec string."""
    spec = spec if isinstance(spec, Spec) else parse_spec(spec, "model spec")
    if spec.kind not in MODELS:
        raise UserError(f"unknown model '{spec.kind}' in spec '{spec}'; known models: {', '.join(sorted(MODELS))}")
    return MODELS[spec.kind](spec, num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())
