"""Model spec strings -> ``nn.Module``: one line per family in :data:`MODELS`.

``mobilenetv2``                 the CIFAR MobileNetV2 teacher (2,236,682 params at 10 classes)
``mobilenetv2:drop=5``          the paper's 4.12x student (last 5 feature blocks removed)
``mobilenetv2:width=0.35``      a width-multiplied student (fewer channels everywhere)
``mobilenetv2:width=0.5,drop=3``  both (options: drop 0-18, width > 0, dropout)
``mobilenetv2_imagenet``        torchvision's ImageNet MobileNetV2, 224-pixel images (same options)
``resnet:depth=20``             CIFAR ResNet, depth 6n+2 (20, 32, 44, 56, 110)
``resnet:depth=8,width=4``      the KD benchmarks' ResNet8x4 (``depth=32,width=4``: ResNet32x4)
``wrn:depth=40,k=2``            Wide ResNet WRN-40-2 (``depth=16,k=2``: WRN-16-2)
``resnet18`` ``resnet34`` ``resnet50``  ImageNet ResNets, torchvision's state_dict keys
``py:MODULE:CALLABLE[,key=value...]``  your factory, called with the class count and image channels
                                     by its own names (:func:`.user._size_arguments`) and the options
``torchscript:FILE``            a TorchScript file (a teacher; no Python code needed)

The number of classes and input channels come from the dataset, not the spec. A new
family is one module under ``models/`` that builds from a :class:`~.family.Family` and
one line here; the rest of igkd asks the family (its size knobs, whether it takes hooks)
instead of testing names.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import plugins
from ..errors import UserError
from ..spec import Spec, parse_spec
from . import resnet, resnet_cifar, user, wrn
from .family import Family, blocks, dim, options, out_of_range
from .mobilenetv2 import NUM_FEATURE_BLOCKS, MobileNetV2, make_divisible


def _mobilenetv2(imagenet: bool):
    def build(spec: Spec, num_classes: int, in_channels: int) -> nn.Module:
        o = options(spec, {"drop": (int, 0), "width": (float, 1.0), "dropout": (float, 0.2)}, "mobilenetv2:drop=5")
        if not 0 <= o["drop"] < NUM_FEATURE_BLOCKS:
            raise out_of_range(spec, f"drop={o['drop']}", f"use 0 (teacher) to {NUM_FEATURE_BLOCKS - 1}")
        if not 0 < o["width"] <= 4:
            raise out_of_range(spec, f"width={o['width']}", "use a multiplier in (0, 4]")
        if not 0 <= o["dropout"] < 1:
            raise out_of_range(spec, f"dropout={o['dropout']}", "use [0, 1)")
        return MobileNetV2(num_classes, in_channels, imagenet=imagenet, **o)
    return build


def _mobilenetv2_guess(state: dict) -> list[str]:
    """drop from the feature blocks present; width from the stem's channels, or a common one
    (a width's channels are rounded to multiples of 8, so the stem alone can mislead)."""
    if "features.0.0.weight" not in state:
        return []
    present = blocks(state, "features.")
    drop = [f"drop={NUM_FEATURE_BLOCKS - present}"] if present < NUM_FEATURE_BLOCKS else []
    stem = dim(state, "features.0.0.weight", 0)
    # only widths whose stem has the file's channels (each guess is built to be compared)
    widths = sorted(w for w in {stem / 32, 0.25, 0.35, 0.5, 0.75, 1.0, 1.3, 1.4, 1.5, 2.0} if make_divisible(32 * w) == stem)
    return [",".join(([f"width={w:g}"] if w != 1 else []) + drop) for w in widths]


SPEC_ATTRIBUTE = "_igkd_spec"  # set by build_model on the network: the spec it was built from

MODELS: dict[str, Family] = plugins.Registry({
    "mobilenetv2": Family(_mobilenetv2(False), "CIFAR MobileNetV2: drop=K truncation, width=W",
                          depth_knob="drop", width_knob="width", guess=_mobilenetv2_guess, native_size=32),
    "mobilenetv2_imagenet": Family(_mobilenetv2(True), "torchvision's ImageNet MobileNetV2 (224-pixel images)",
                                   depth_knob="drop", width_knob="width", guess=_mobilenetv2_guess,
                                   native_size=224),
    "resnet": resnet_cifar.FAMILY,
    "wrn": wrn.FAMILY,
    "resnet18": resnet.family(18),
    "resnet34": resnet.family(34),
    "resnet50": resnet.family(50),
    "py": user.PY,
    "torchscript": user.TORCHSCRIPT,
}, "models", "model family", plugins.expect(Family, "model family"))  # and entry points igkd.models


def family_of(spec: str | Spec) -> Family:
    """The :class:`Family` a spec names; one-line UserError for an unknown one."""
    spec = spec if isinstance(spec, Spec) else parse_spec(spec, "model spec")
    if spec.kind not in MODELS:
        raise UserError(f"unknown model '{spec.kind}' in spec '{spec}'{_near(spec.kind)}; known models: "
                        f"{', '.join(sorted(MODELS))}")
    return MODELS[spec.kind]


def _near(kind: str) -> str:
    """' (did you mean ...?)' for a family named the way papers and other tools name its
    members: resnet20 is igkd's resnet:depth=20 (the CIFAR ResNet), wrn-16-2 wrn:depth=16,k=2."""
    import difflib
    import re
    if m := re.fullmatch(r"resnet-?(\d+)", kind):
        return f" (did you mean resnet:depth={m.group(1)}, the CIFAR ResNet? resnet18/34/50 are ImageNet's)"
    if m := re.fullmatch(r"wrn-?(\d+)(?:-(\d+))?", kind):
        return f" (did you mean wrn:depth={m.group(1)},k={m.group(2) or 2}?)"
    close = difflib.get_close_matches(kind, list(MODELS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def find_family(spec: str | Spec) -> Family | None:
    """The :class:`Family` ``spec`` names, or None where it names none (a path, ``module:CLASS``)."""
    try:
        return family_of(spec)
    except UserError:
        return None


def build_model(spec: str | Spec, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Build an untrained model from its spec string."""
    for what, n in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:  # 0 built a network with no outputs
            raise UserError(f"{what} must be a positive integer, got {n!r}")
    spec = spec if isinstance(spec, Spec) else parse_spec(spec, "model spec")
    net = family_of(spec).build(spec, num_classes, in_channels)
    if not isinstance(net, torch.jit.ScriptModule):  # TorchScript is identified by its code instead
        # recorded for the teacher identity of precompute stores (checkpoint.teacher_identity): two
        # architectures can share one state dict; options sorted so their order does not matter
        try:
            setattr(net, SPEC_ATTRIBUTE, str(spec.canonical()))
        except Exception:  # noqa: BLE001 - a user's module refusing attributes: identified by its structure alone
            pass
    return net


def built_spec(net: nn.Module) -> str | None:
    """The spec :func:`build_model` built ``net`` from (options in key order), or None."""
    return getattr(net, SPEC_ATTRIBUTE, None)


def count_parameters(model: nn.Module) -> int:
    """Elements of all of ``model``'s parameters, frozen ones (``requires_grad=False``, a
    teacher's) included; BatchNorm running statistics are buffers, not counted."""
    if not isinstance(model, nn.Module):  # a spec string: one line, not an AttributeError
        raise UserError(f"count_parameters() takes a torch.nn.Module, got {type(model).__name__}; build one with "
                        "igkd.build_model(spec, num_classes, in_channels)")
    return sum(p.numel() for p in model.parameters())
