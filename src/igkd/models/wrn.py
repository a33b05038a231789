"""Wide ResNets WRN-depth-k (Zagoruyko and Komodakis 2016) for CIFAR-size images.

Pre-activation blocks (BN-ReLU-conv), three groups of ``n = (depth - 4) / 6`` blocks with
16k, 32k, 64k channels. Module names are RepDistiller's (``block1.layer.0.conv1``,
``convShortcut``, final ``bn1`` and ``fc``), so its published WRN teachers load.
RepDistiller's table gives WRN-16-2 0.70M and WRN-40-2 2.26M parameters at 100 classes;
ours are 703,284 and 2,255,156 (tests/test_models.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .family import Family, blocks, dim, options, out_of_range


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.equal = cin == cout and stride == 1
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        if not self.equal:  # the shortcut takes the pre-activated input (as the original code)
            x = out
        out = self.relu2(self.bn2(self.conv1(out)))
        out = F.dropout(out, self.dropout, self.training) if self.dropout else out
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 40, k: int = 2, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 or k < 1:
            raise ValueError(f"depth must be 6n+4 >= 10 and k >= 1, got depth {depth}, k {k}")
        n, ch = (depth - 4) // 6, [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, dropout)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, dropout)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():  # the original code's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _build(spec, num_classes: int, in_channels: int) -> nn.Module:
    o = options(spec, {"depth": (int, 40), "k": (int, 2), "dropout": (float, 0.0)}, "wrn:depth=40,k=2")
    if o["depth"] < 10 or (o["depth"] - 4) % 6 or o["depth"] > 1000:  # unbounded, wrn:depth=600004 hung building
        raise out_of_range(spec, f"depth={o['depth']}", "a WRN's depth is 6n+4: 10, 16, 22, 28, 40 ... 1000")
    if not 1 <= o["k"] <= 32:
        raise out_of_range(spec, f"k={o['k']}", "use an integer widening factor 1 to 32")
    if not 0 <= o["dropout"] < 1:
        raise out_of_range(spec, f"dropout={o['dropout']}", "use [0, 1)")
    return WideResNet(o["depth"], o["k"], num_classes, in_channels, o["dropout"])


def _guess(state: dict) -> list[str]:
    if "block1.layer.0.conv1.weight" not in state:
        return []
    return [f"depth={6 * blocks(state, 'block1.layer.') + 4},k={dim(state, 'block1.layer.0.conv1.weight', 0) // 16}"]


FAMILY = Family(_build, "Wide ResNet WRN-depth-k: depth=6n+4 (16, 40), k=widening (2)",
                depth_knob="depth", width_knob="k", guess=_guess, native_size=32)
