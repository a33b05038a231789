"""What a model family declares to the rest of igkd (see :mod:`.registry`).

A family is a builder ``(Spec, num_classes, in_channels) -> nn.Module`` plus the names of
its size options, so code outside ``models/`` (the compression sweep) can make smaller
members without knowing the family: ``depth_knob`` is the option a ``--depths`` value
sets (``drop`` for MobileNetV2 truncation, ``depth`` for ResNets), ``width_knob`` the one
a ``--widths`` value sets. ``own_weights``: the spec itself holds the weights
(TorchScript), so no separate weights file is loaded. ``guess``: the option strings of the
members a foreign state dict may be (from its names and shapes), which a loading error
names where one fits exactly (:func:`igkd.models.checkpoint.load_weights`).
``native_size``: the image side its strides were designed for (32 for the CIFAR networks,
224 for the ImageNet ones); where a foreign state dict also fits another family's member
(``mobilenetv2`` and ``mobilenetv2_imagenet`` share torchvision's layout and differ only in
strides), loading it for images nearer that family's size gets a warning naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserError
from ..spec import Spec, reject_leftovers, take_option


@dataclass(frozen=True)
class Family:
    build: Callable[[Spec, int, int], nn.Module]
    summary: str = ""
    depth_knob: str | None = None
    width_knob: str | None = None
    own_weights: bool = False
    # builds from code or a file the spec names (py: imports a module, torchscript: loads a
    # program): such a spec runs only when the user gives it, never when a weights file does
    runs_code: bool = False
    # state dict -> option strings ("" for the defaults) of members it may be; checked by building them
    guess: Callable[[dict], list[str]] | None = None
    native_size: int | None = None


def options(spec: Spec, schema: dict[str, tuple[type, object]], example: str) -> dict:
    """The spec's options cast as ``schema`` says ({name: (type, default)}); one-line
    errors for a positional argument or an unknown option."""
    if spec.arg:
        raise UserError(f"model spec '{spec}' takes no positional argument; use e.g. '{example}'")
    opts = dict(spec.options)
    out = {k: take_option(spec, opts, k, cast, default, "model spec") for k, (cast, default) in schema.items()}
    reject_leftovers(spec, opts, list(schema), "model spec")
    return out


def out_of_range(spec: Spec, what: str, fix: str) -> UserError:
    return UserError(f"{what} in '{spec}' is out of range; {fix}")


def blocks(state: dict, prefix: str) -> int:
    """How many numbered children ``prefix`` has in a state dict's names (``layer1.`` -> 3)."""
    return len({k[len(prefix):].partition(".")[0] for k in state if k.startswith(prefix)})


def dim(state: dict, key: str, i: int) -> int:
    """Size ``i`` of tensor ``key`` of a state dict, 0 where it has none."""
    t = state.get(key)
    return t.shape[i] if t is not None and t.dim() > i else 0
