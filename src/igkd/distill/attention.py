"""Attention transfer (METHOD.md section 5): feature maps taken by forward hooks.

The teacher's and the student's feature maps are read at named layers by forward
hooks, without changing either model. Names are those of ``named_modules()`` of the
bare network (``igkd.models.bare``: through the ``Normalized`` wrapper), e.g.
``features.6`` for MobileNetV2. Both maps must have the same spatial size; the loss is
``gamma * mean((A_t - A_s)^2)`` with ``A = l2-normalise(flatten(mean_c(F^2)))``
(:func:`igkd.distill.losses.at_loss`).

``auto`` layer choice, for any architecture: the candidate blocks are the network's
top-level modules and the children of top-level containers (``features.N`` of MobileNetV2,
``layer2.1`` of a ResNet, ``block2`` of a WRN), in the order their forward passes end;
of several returning the same tensor (``features`` and its last block) the deepest
counts. Outputs with a 1x1 or no spatial extent are not candidates, nor channels-last
N x H x W x C ones (:func:`is_feature_map`). ``auto`` refuses a network whose only map is
its first layer, before blocks of tokens (a ViT's patch embedding: :func:`stem_only`).

* both auto: the student's last block in its second-largest spatial stage (the 16x16
  stage for 32x32 inputs; the only stage if it has one), and the teacher's last block of
  that spatial size. For the CIFAR teacher and the paper's 4.12x student that is
  ``features.6`` in both (32 channels, 16x16); for ResNet-56 -> ResNet-20, ``layer2.8``
  and ``layer2.2``.
* one side auto: that side's last block with the other side's spatial size.

Sizes are found by one probe forward pass of a zero batch in eval mode (no training
state or random numbers are touched). A named layer's output must not be modified in
place by later layers. TorchScript modules take no hooks, so they are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from ..models import bare, eval_mode


class StopForward(Exception):
    """Raised by a hook to end a teacher's forward pass once its features are taken."""


class FeatureHook:
    """Keeps the output of the sub-module ``name`` of ``model`` at every forward pass."""

    def __init__(self, model: nn.Module, name: str, who: str = "model"):
        self.name, self.module = name, resolve_layer(model, name, who)
        self.features: torch.Tensor | None = None
        self.stop = False  # raise StopForward after capture (teacher: skip the rest of the network)
        self.handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = output
        if self.stop:
            raise StopForward

    def pop(self) -> torch.Tensor:
        f, self.features = self.features, None
        if f is None:
            raise RuntimeError(f"layer {self.name} did not run in the last forward pass")
        return f

    def remove(self) -> None:
        self.handle.remove()


def layer_names(model: nn.Module) -> list[str]:
    return [n for n, _ in bare(model).named_modules() if n]


def resolve_layer(model: nn.Module, name: str, who: str = "model", purpose: str = "attention transfer",
                  instead: str = "use a method without 'at'") -> nn.Module:
    """The sub-module ``name`` of the bare network; a UserError listing valid names otherwise.
    ``purpose`` (what needs the layer) and ``instead`` (the way around a TorchScript model)
    word the errors."""
    if isinstance(bare(model), torch.jit.ScriptModule):
        raise UserError(f"the {who} is a TorchScript module, which cannot take the forward hooks {purpose} "
                        f"needs; {instead}, or give the network as Python code (py:MODULE:CALLABLE)")
    modules = dict(bare(model).named_modules())
    if name in modules and name:
        return modules[name]
    top = [n for n in layer_names(model) if n.count(".") <= 1]
    shown = top if len(top) <= 12 else top[:6] + ["..."] + top[-4:]
    raise UserError(f"unknown {who} layer '{name}' for {purpose}; valid names include "
                    f"{', '.join(shown)} (any name of named_modules() of the bare network)")


@torch.no_grad()
def probe_shapes(model: nn.Module, names: list[str], input_shape: tuple[int, int, int],
                 device: torch.device | str = "cpu", who: str = "model") -> dict[str, tuple[int, ...]]:
    """Output shape (C, H, W) of each named layer for one zero image, in eval mode, in the
    order the layers' forward passes end; of layers returning the same tensor only the
    deepest (ties: the last to end) is kept."""
    modules = {n: resolve_layer(model, n, who) for n in names}
    ends: list[tuple[str, object]] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: ends.append((n, o))) for n, m in modules.items()]
    try:
        with eval_mode(model):
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    last = {n: (pos, o) for pos, (n, o) in enumerate(ends)}  # each layer at its last call
    in_order = sorted(last, key=lambda n: last[n][0])
    owner: dict[int, str] = {}  # id(output) -> the deepest layer returning it (ties: the last)
    for n in in_order:
        other = owner.get(id(last[n][1]))
        if other is None or n.count(".") >= other.count("."):
            owner[id(last[n][1])] = n
    keep = set(owner.values())
    return {n: tuple(last[n][1].shape[1:]) if isinstance(last[n][1], torch.Tensor) else ()
            for n in in_order if n in keep}


def candidate_blocks(model: nn.Module) -> list[str]:
    """Candidate blocks: top-level modules and the children of top-level containers
    (names of the bare network's ``named_modules()``, in definition order)."""
    net = bare(model)
    names = []
    for name, child in net.named_children():
        names.append(name)
        names += [f"{name}.{n}" for n, _ in child.named_children()]
    return names


def is_feature_map(shape: tuple, input_hw: tuple[int, int] | None = None) -> bool:
    """Whether a layer's output ``shape`` (per sample) is a C x H x W map larger than 1x1;
    with the input's ``input_hw``, also one whose h x w keeps the input's aspect, as one
    stride on both axes gives (``|h W - w H| < H + W``, each side rounded by under one
    pixel). A channels-last N x H x W x C tensor (a Swin stage, the permuted LayerNorm
    of a ConvNeXt block) is 3-dimensional too, but read as C x H x W its "w" is the
    channel count: attention maps and Grad-CAMs of it mix channels into space."""
    if len(shape) != 3 or tuple(shape[-2:]) == (1, 1):
        return False
    if input_hw is None:
        return True
    (h, w), (big_h, big_w) = shape[-2:], input_hw
    return abs(h * big_w - w * big_h) < big_h + big_w


_WARNED: set = set()


def warn_unlike_input(name: str, shape: tuple, input_hw: tuple[int, int], flag: str) -> None:
    """Say once, for a layer the user named (``flag``), that its C x H x W output does not
    keep the input's aspect (:func:`is_feature_map`): a channels-last N x H x W x C tensor
    looks like that, and so does a map shrunk by unpadded convolutions on a non-square
    input, which is why a named layer is taken, not refused."""
    if is_feature_map(shape, input_hw) or (flag, name, tuple(shape)) in _WARNED:
        return
    from ..progress import log
    _WARNED.add((flag, name, tuple(shape)))
    log(f"igkd: warning: {flag} {name} gives {' x '.join(map(str, shape))}, whose H x W does not keep the "
        f"{input_hw[0]}x{input_hw[1]} input's aspect; if it is a channels-last N x H x W x C output (a Swin "
        "stage, a ConvNeXt block's permuted LayerNorm) its maps mix channels into space: name a layer giving "
        "N x C x H x W")


def spatial_only(shapes: dict[str, tuple], input_hw: tuple[int, int] | None = None) -> dict[str, tuple]:
    """The entries of ``shapes`` (from :func:`probe_shapes`) that are C x H x W feature
    maps larger than 1x1 (:func:`is_feature_map`; with ``input_hw``, channels-last
    tensors left out)."""
    return {n: s for n, s in shapes.items() if is_feature_map(s, input_hw)}


def stem_only(shapes: dict[str, tuple], chosen: str, input_hw: tuple[int, int]) -> str | None:
    """Where ``auto`` chose the first layer to run (``shapes`` from :func:`probe_shapes`,
    all candidates) and later blocks give tokens (N x L x D, or channels-last maps),
    as in a ViT whose only spatial output is its patch embedding: the shape of the first
    such block, for the refusal to name; else None. A map of the stem alone is the
    embedding of each patch, not what the network computed from the image."""
    names = list(shapes)
    if not names or names[0] != chosen:
        return None
    tokens = [s for s in shapes.values() if len(s) >= 2 and not is_feature_map(s, input_hw) and s[-2:] != (1, 1)]
    return " x ".join(map(str, tokens[0])) if tokens else None


def last_with_size(shapes: dict[str, tuple], size: tuple[int, int]) -> str | None:
    """The last layer of ``shapes`` (in order) whose output is ``size`` (H, W), or None."""
    found = [n for n, s in shapes.items() if s[-2:] == size]
    return found[-1] if found else None


# the names these helpers had while attention transfer alone used them
_blocks, _spatial, _last_with_size = candidate_blocks, spatial_only, last_with_size


def choose_layers(teacher: nn.Module, student: nn.Module, teacher_layer: str, student_layer: str,
                  input_shape: tuple[int, int, int], device="cpu") -> tuple[str, str, tuple, tuple]:
    """Resolve ``auto`` names (rule in the module docstring) and check the spatial sizes.

    Returns (teacher layer, student layer, teacher shape C x H x W, student shape).
    """
    for model, who in ((teacher, "teacher"), (student, "student")):
        resolve_layer(model, "", who) if isinstance(bare(model), torch.jit.ScriptModule) else None
    hw = tuple(input_shape[-2:])
    teacher_given, student_given = teacher_layer, student_layer
    t_shapes = probe_shapes(teacher, candidate_blocks(teacher) if teacher_layer == "auto" else [teacher_layer],
                            input_shape, device, "teacher")
    s_shapes = probe_shapes(student, candidate_blocks(student) if student_layer == "auto" else [student_layer],
                            input_shape, device, "student")
    for name, shapes, who in ((teacher_layer, t_shapes, "teacher"), (student_layer, s_shapes, "student")):
        # a 1x1 map (a pooling layer) normalises to the constant 1 on both sides: a term of 0
        # that trains nothing, so it is refused like a layer giving no feature map at all
        if name != "auto" and not is_feature_map(shapes.get(name, ())):
            raise UserError(f"{who} layer {name} gives {'no output' if name not in shapes else f'shape {shapes[name]}'}"
                            ", not a C x H x W feature map larger than 1x1; pick a convolutional block (e.g. features.6)")
        if name != "auto":
            warn_unlike_input(name, shapes[name], hw, f"--at-{who}-layer")
    t_all, s_all = t_shapes, s_shapes
    if teacher_layer == "auto":
        t_shapes = spatial_only(t_shapes, hw)
    if student_layer == "auto":
        s_shapes = spatial_only(s_shapes, hw)
        if not s_shapes:
            raise UserError("no block of the student gives a C x H x W feature map for attention transfer; name "
                            "the layers with --at-teacher-layer and --at-student-layer, or use a method without 'at'")
        sizes = list(dict.fromkeys(s[-2:] for s in s_shapes.values()))  # distinct, network order
        if teacher_layer != "auto":
            sizes = [t_shapes[teacher_layer][-2:]]
        student_layer = last_with_size(s_shapes, sizes[1] if len(sizes) > 1 else sizes[0]) or student_layer
    if teacher_layer == "auto":
        size = s_shapes[student_layer][-2:] if student_layer in s_shapes else (0, 0)
        teacher_layer = last_with_size(t_shapes, size) or teacher_layer
    for name, who in ((teacher_layer, "teacher"), (student_layer, "student")):
        if name == "auto":
            raise UserError(f"no {who} block has the spatial size of the other network's layer; name both "
                            "layers with --at-teacher-layer and --at-student-layer")
    for name, given, all_shapes, who, flag in ((teacher_layer, teacher_given, t_all, "teacher", "--at-teacher-layer"),
                                               (student_layer, student_given, s_all, "student", "--at-student-layer")):
        tokens = stem_only(all_shapes, name, hw) if given == "auto" else None
        if tokens:
            raise UserError(f"auto found the {who}'s only C x H x W feature map at its first layer {name}, before "
                            f"blocks giving {tokens} (tokens, as in a ViT): attention there would be of the patch "
                            f"embedding alone; name the layers with --at-teacher-layer and --at-student-layer "
                            f"({flag} {name} to use it anyway), or use a method without 'at'")
    ts, ss = t_shapes[teacher_layer], s_shapes[student_layer]
    if ts[-2:] != ss[-2:]:
        raise UserError(f"attention transfer needs feature maps of equal spatial size, but teacher layer "
                        f"{teacher_layer} gives {_fmt(ts)} and student layer {student_layer} gives {_fmt(ss)} "
                        f"for {input_shape[1]}x{input_shape[2]} inputs; pick other layers "
                        "(--at-teacher-layer/--at-student-layer) or 'auto'")
    return teacher_layer, student_layer, ts, ss


def _fmt(shape: tuple) -> str:
    return f"{shape[0]} x {shape[1]} x {shape[2]} (C x H x W)"


__all__ = ["FeatureHook", "StopForward", "candidate_blocks", "choose_layers", "is_feature_map", "last_with_size",
           "layer_names", "probe_shapes", "resolve_layer", "spatial_only", "stem_only", "warn_unlike_input"]
