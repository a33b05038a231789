"""Batched inference and classification metrics."""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: torch.device | str = "cpu",
            channels_last: bool = True) -> torch.Tensor:
    """Logits (float32, on CPU) of ``model`` for uint8 images N x C x H x W, in order."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy (percent), per-class accuracy (percent) and confusion matrix (rows = true class)."""
    k = len(classes)
    pred = logits.argmax(1)
    labels = labels.to(pred.device)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    support = confusion.sum(1)
    per_class = {c: (100.0 * confusion[i, i].item() / support[i].item()) if support[i] else None
                 for i, c in enumerate(classes)}
    return {
        "accuracy": 100.0 * int((pred == labels).sum()) / len(labels) if len(labels) else float("nan"),
        "correct": int((pred == labels).sum()),
        "total": int(len(labels)),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
