"""Reports: Markdown tables and PNG plots (matplotlib, headless)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .distill.augment import ig_overlay
from .fileio import atomic_path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def overlay_examples(images: torch.Tensor, maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The overlay the student would see with p = 1 (uint8 images, maps N x H x W)."""
    gen = torch.Generator().manual_seed(seed)
    return ig_overlay(images.float() / 255, maps.float(), 1.0, gen)


def gallery(path: str | Path, images: torch.Tensor, maps: torch.Tensor, labels: list[str],
            title: str = "teacher IG maps and overlays") -> Path:
    """A PNG with one column per image: the image, its IG map (sum_c |IG|), its overlay."""
    plt = _plt()
    n = len(images)
    over = overlay_examples(images, maps)
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n, 4.4), squeeze=False)
    gray = images.shape[1] == 1
    for j in range(n):
        img = images[j].permute(1, 2, 0).numpy()
        ov = over[j].permute(1, 2, 0).clamp(0, 1).numpy()
        panels = [(img[..., 0] if gray else img, "gray" if gray else None),
                  (maps[j].float().numpy(), "inferno"),
                  (ov[..., 0] if gray else ov, "gray" if gray else None)]
        for i, (data, cmap) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(data, cmap=cmap, vmin=0 if cmap == "gray" else None, vmax=(255 if data.dtype == np.uint8
                      else 1) if cmap == "gray" else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(labels[j], fontsize=8)
    for i, name in enumerate(["image", "IG map", "overlay"]):
        axes[i, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def training_curves(path: str | Path, histories: dict[str, list[dict]]) -> Path:
    """Validation accuracy and training loss per epoch, one line per run."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, hist in histories.items():
        ep = [r["epoch"] for r in hist]
        a.plot(ep, [r["val_accuracy"] for r in hist], marker="o", ms=3, label=name)
        b.plot(ep, [r["loss"] for r in hist], marker="o", ms=3, label=name)
    a.set_xlabel("epoch")
    a.set_ylabel("validation accuracy (%)")
    b.set_xlabel("epoch")
    b.set_ylabel("training loss")
    a.legend()
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_bars(path: str | Path, names: list[str], accuracies: list[float], reference: float | None = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.2))
    ax.bar(names, accuracies, color="#4c72b0")
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1, label="teacher")
        ax.legend()
    lo = min(accuracies + ([reference] if reference is not None else []))
    ax.set_ylim(max(0, math.floor(lo - 5)), 100)
    for i, v in enumerate(accuracies):
        ax.text(i, v + 0.3, f"{v:.2f}", ha="center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    _plt().close(fig)
    return path
