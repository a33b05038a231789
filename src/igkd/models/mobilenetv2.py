"""The CIFAR variant of MobileNetV2 (METHOD.md section 1) and its compressed students.

Module names follow torchvision's MobileNetV2 (``features.N.conv.M``), so the paper's
published state dicts load unchanged. Compared with the ImageNet network, the stem has
stride 1 and the second stage stride 1 (32x32 inputs keep 32x32 up to stage 3).

Students (METHOD.md section 2):

* truncation, ``drop=k``: remove the last k children of ``features`` and end with
  AdaptiveAvgPool(1) -> Flatten -> Linear(out_channels, classes) (the paper's student);
* width, ``width=w``: every layer's channels times w (rounded to multiples of 8,
  including the 1280-channel head, so a narrow network is narrow everywhere).

Both compose: ``mobilenetv2:width=0.5,drop=5``.

``imagenet=True`` is torchvision's ImageNet MobileNetV2 for 224-pixel images (stride 2 in
the stem and the second stage, a 1280-channel head for every width <= 1): the same keys
and shapes as torchvision's ``mobilenet_v2``, 3,504,872 parameters at 1000 classes.

The activations are :class:`ReLU6`, an ``nn.ReLU6`` whose in-place form does not copy its
input under autograd (bitwise the same outputs and gradients, training 7-9% faster).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (expansion t, output channels c, repeats n, first stride s) of the CIFAR variant
CIFAR_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# torchvision's ImageNet settings: stem and second stage with stride 2 (224 -> 7 at the end)
IMAGENET_SETTINGS = [CIFAR_SETTINGS[0], (6, 24, 2, 2), *CIFAR_SETTINGS[2:]]
NUM_FEATURE_BLOCKS = 19  # stem + 17 inverted residuals + last 1x1 conv


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels like torchvision: to a multiple of ``divisor``, never 10% below."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class _ReLU6InPlace(torch.autograd.Function):
    """ReLU6 in place whose backward reads the output, not the input.

    torch's in-place ReLU6 (``hardtanh_``) differentiates through the input, so autograd
    first copies the input aside: one extra read and write of every activation, about 10%
    of the 4.12x student's training step on 2 CPU cores. The output decides the same mask
    (0 < y < 6 exactly where 0 < x < 6), so nothing needs copying; gradients are bitwise
    those of ``nn.ReLU6`` (tests/test_models.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = x.clamp_(0.0, 6.0)
        ctx.mark_dirty(y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3


def _tracing_or_compiling() -> bool:
    return torch.jit.is_tracing() or _is_compiling()


class ReLU6(nn.ReLU6):
    """``nn.ReLU6`` (same name, no state, same checkpoints and exports) whose in-place form
    under autograd skips the input copy torch makes (:class:`_ReLU6InPlace`). Out of place,
    without gradients, traced or compiled, it is ``nn.ReLU6``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.inplace and x.requires_grad and torch.is_grad_enabled() and not _tracing_or_compiling():
                return self._copy_free(x)
        return F.hardtanh(x, self.min_val, self.max_val, self.inplace)

    @torch.jit.unused
    def _copy_free(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6InPlace.apply(x)


def _replace_relu6(module: nn.Module, old: type, new: type) -> int:
    n = 0
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if type(child) is old:
                setattr(parent, name, new(inplace=child.inplace))
                n += 1
    return n


def copy_free_relu6(module: nn.Module) -> int:
    """Replace every plain ``nn.ReLU6`` in ``module`` by igkd's :class:`ReLU6` with the same
    ``inplace`` flag (so in place ones stop copying their input under autograd; out of
    place ones stay out of place, since their input may be used elsewhere). Subclasses
    are left alone. Returns how many were replaced; outputs and gradients are unchanged."""
    return _replace_relu6(module, nn.ReLU6, ReLU6)


def torch_relu6(module: nn.Module) -> nn.Module:
    """``module`` with torch's own ``nn.ReLU6`` in place of igkd's (same flags), to compare
    the two (benchmarks/train_throughput.py, the tests)."""
    _replace_relu6(module, ReLU6, nn.ReLU6)
    return module


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            ReLU6(inplace=True),
        )
        self.out_channels = cout


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = int(round(cin * expand))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2; ``drop`` > 0 gives the paper's truncated student."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        drop: int = 0,
        dropout: float = 0.2,
        imagenet: bool = False,
    ):
        super().__init__()
        if not 0 <= drop < NUM_FEATURE_BLOCKS:
            raise ValueError(f"drop must be in [0, {NUM_FEATURE_BLOCKS - 1}], got {drop}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width, self.drop = width, drop
        cin = make_divisible(32 * width)
        blocks: list[nn.Module] = [ConvBNReLU(in_channels, cin, stride=2 if imagenet else 1)]
        for t, c, n, s in IMAGENET_SETTINGS if imagenet else CIFAR_SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = make_divisible(1280 * (max(1.0, width) if imagenet else width))
        blocks.append(ConvBNReLU(cin, last, kernel=1))
        blocks = blocks[: NUM_FEATURE_BLOCKS - drop]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        out_channels = blocks[-1].out_channels
        if drop == 0:
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(out_channels, num_classes))
        else:  # the paper's student head: keys classifier.1.* as in the published checkpoints
            self.classifier = nn.Sequential(nn.Flatten(1), nn.Linear(out_channels, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(self.pool(x).flatten(1))
