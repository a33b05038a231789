"""Batched inference and classification metrics."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.preprocess import eval_mode


def fill_rows(n: int, batch_size: int, rows_at: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Rows 0 ... n-1 (float32, on CPU) of a batched computation, ``rows_at(i)`` giving rows
    ``i ... i + batch_size - 1``, copied into one output tensor allocated at the first batch.

    One tensor filled in place, not per-batch results kept and concatenated: a small result
    kept per batch sits between the large freed batch buffers and splits them, so that each
    batch's buffers no longer fit the freed space and the heap grew by a batch per batch (seen
    on 224-pixel data, about 1 run in 6). ``rows_at``'s own buffers are freed when it returns,
    before the next batch allocates."""
    out = None
    for i in range(0, n, batch_size):
        rows = rows_at(i)
        if out is None:
            out = torch.empty((n, *rows.shape[1:]), dtype=torch.float32)
        out[i:i + len(rows)].copy_(rows)
        del rows
    return out if out is not None else torch.empty(0)


def not_logits(out, what: str):
    """The one-line UserError for a network whose forward returned ``out``, not a logits
    tensor (mdistiller's (logits, features), a dict, an object with ``.logits``), saying how
    to wrap it."""
    from ..errors import UserError
    hint = "net(x)[0]" if isinstance(out, (tuple, list)) else "net(x)['logits']" if isinstance(out, dict) \
        else "net(x).logits"
    return UserError(f"{what} returns a {type(out).__name__}, not a tensor of logits; make its forward return the "
                     f"logits alone (N x classes), e.g. wrap it in a module whose forward returns {hint}")


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128, device: torch.device | str = "cpu",
            channels_last: bool = True, transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None
            ) -> torch.Tensor:
    """Logits (float32, on CPU) of ``model`` for uint8 images N x C x H x W, in order.

    ``transform(x, start)``, when given, changes each batch ``x`` (float [0, 1] pixels on
    ``device``, images ``start`` ... ``start + len(x) - 1``) before the model sees it (a
    corruption, :mod:`igkd.evaluate.corruptions`)."""
    device = torch.device(device)

    def logits_at(i: int) -> torch.Tensor:
        x = images[i:i + batch_size].to(device, non_blocking=True).float().div_(255)
        if transform is not None:
            x = transform(x, i)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        if not isinstance(out, torch.Tensor):
            raise not_logits(out, "the model")
        return out

    # each module's own flag back after, not model.train(prev): a user's module scored as it is
    # (igkd.evaluate(module)) with a frozen BatchNorm or Dropout inside a training model kept it
    with eval_mode(model):
        return fill_rows(len(images), batch_size, logits_at)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy (percent), balanced accuracy (percent), Cohen's kappa, per-class accuracy
    (percent) and confusion matrix (rows = true class).

    Balanced accuracy is the mean per-class recall over the classes present in ``labels``
    (classes without images are left out, not counted as 0). Cohen's kappa is
    (p_o - p_e) / (1 - p_e) from the confusion matrix: p_o the observed agreement (the
    accuracy), p_e the agreement expected by chance from the row and column totals."""
    k = len(classes)
    pred = logits.argmax(1)
    labels = labels.to(pred.device)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k).cpu()
    support = confusion.sum(1)
    per_class = {c: (100.0 * confusion[i, i].item() / support[i].item()) if support[i] else None
                 for i, c in enumerate(classes)}
    correct = int(confusion.diagonal().sum())
    present = [v for v in per_class.values() if v is not None]
    return {
        "accuracy": 100.0 * correct / len(labels) if len(labels) else float("nan"),
        "correct": correct,
        "total": int(len(labels)),
        "balanced_accuracy": sum(present) / len(present) if present else None,
        "kappa": cohen_kappa(confusion),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def cohen_kappa(confusion: torch.Tensor) -> float | None:
    """Cohen's kappa of a k x k confusion matrix of counts (rows = true, columns = predicted).

    With n images, row totals r_c and column totals p_c: p_o = trace / n and
    p_e = sum_c r_c p_c / n^2, so kappa = (n trace - sum_c r_c p_c) / (n^2 - sum_c r_c p_c),
    computed here in exact integers. It is undefined (None, JSON null) when p_e == 1, that
    is when every label and every prediction is one and the same class (one class present
    and always predicted): chance alone then explains all the agreement and the ratio is
    0/0. It is None for no images too."""
    c = confusion.to(torch.int64)
    n = int(c.sum())
    chance = int((c.sum(1) * c.sum(0)).sum())  # n^2 p_e
    if n == 0 or chance == n * n:
        return None
    return (n * int(c.diagonal().sum()) - chance) / (n * n - chance)
