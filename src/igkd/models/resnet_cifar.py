"""CIFAR ResNets (He et al. 2016, section 4.2) as the KD benchmarks build them.

Three stages of ``n`` basic blocks with 16, 32, 64 channels (depth = 6n + 2) on a 3x3
stem, as RepDistiller and mdistiller: their module names (``conv1``, ``layer1.0.conv1``,
``downsample.0``/``.1``, ``fc``, torchvision's scheme), and their shortcut, a 1x1
convolution + BatchNorm wherever the shape changes (He et al.'s option B). Published
counts at 10 classes are for option A (zero-padding shortcut), which has 2,752 fewer
parameters: ResNet-20 0.27M, ResNet-56 0.86M, ResNet-110 1.7M; ours are 272,474,
855,770 and 1,730,714 (tests/test_models.py).

``width=W`` multiplies the stage channels (``resnet:depth=8,width=4`` is the benchmarks'
ResNet8x4, ``depth=32,width=4`` ResNet32x4: stages 64, 128, 256 on a 32-channel stem, the
stem being 32 channels for every W > 1 as in those benchmarks).
"""

from __future__ import annotations

import torch
from torch import nn

from .family import Family, blocks, dim, options, out_of_range
from .resnet import BasicBlock, init_weights, make_stage


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 1):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 or width < 1:
            raise ValueError(f"depth must be 6n+2 >= 8 and width >= 1, got depth {depth}, width {width}")
        n = (depth - 2) // 6
        stem = 16 if width == 1 else 32
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1, c = make_stage(BasicBlock, stem, 16 * width, n, 1)
        self.layer2, c = make_stage(BasicBlock, c, 32 * width, n, 2)
        self.layer3, c = make_stage(BasicBlock, c, 64 * width, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(spec, num_classes: int, in_channels: int) -> nn.Module:
    o = options(spec, {"depth": (int, 20), "width": (int, 1)}, "resnet:depth=20")
    # at most the deepest CIFAR ResNet of He et al. (2016): resnet:depth=600002 began building
    # a network of 100,000 blocks per stage
    if o["depth"] < 8 or (o["depth"] - 2) % 6 or o["depth"] > 1202:
        # torchvision's depths: a user bringing its ResNet-18 writes resnet:depth=18
        imagenet = "; the ImageNet ResNets are the specs resnet18, resnet34 and resnet50" \
            if o["depth"] in (18, 34, 101, 152) else ""
        raise out_of_range(spec, f"depth={o['depth']}",
                           f"a CIFAR ResNet's depth is 6n+2: 8, 14, 20, 32, 44, 56, 110 ... 1202{imagenet}")
    if not 1 <= o["width"] <= 16:
        raise out_of_range(spec, f"width={o['width']}", "use an integer multiplier 1 to 16 (4 for ResNet8x4)")
    return CifarResNet(o["depth"], num_classes, in_channels, o["width"])


def _guess(state: dict) -> list[str]:
    if "layer4.0.conv1.weight" in state or "layer3.0.conv1.weight" not in state \
            or dim(state, "layer1.0.conv1.weight", 0) % 16:
        return []
    width = dim(state, "layer1.0.conv1.weight", 0) // 16
    return [f"depth={6 * blocks(state, 'layer1.') + 2}" + (f",width={width}" if width != 1 else "")]


FAMILY = Family(_build, "CIFAR ResNet: depth=6n+2 (20, 32, 44, 56, 110), width=W (4: ResNet8x4/32x4)",
                depth_knob="depth", width_knob="width", guess=_guess, native_size=32)
