"""Figures of the deployment commands (matplotlib through :mod:`igkd.report`'s backend)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..report import figure


@figure
def audit_gallery(path: Path, images: torch.Tensor, maps: list[torch.Tensor], names: list[str],
                  labels: list[str]) -> Path:
    """One row per image: the image, then the teacher's map and each student's."""
    from ..report import _plt, _save, figure_text
    plt = _plt()
    n, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols, 1.5 * n + 0.4), squeeze=False)
    gray = images.shape[1] == 1
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)
        axes[i, 0].set_ylabel(figure_text(labels[i]), fontsize=8)
        for j, m in enumerate(maps):
            axes[i, j + 1].imshow(m[i].numpy(), cmap="inferno", interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["image", *(("teacher " if k == 0 else "") + nm for k, nm in enumerate(names))]):
        name = figure_text(name if len(name) <= 24 else name[:22] + "..", "model")
        axes[0, j].set_title(name, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
