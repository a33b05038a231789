"""Precompute teacher logits and IG overlay maps for a training set (METHOD.md section 3).

Everything is computed on the clean, un-augmented training images in index order and
stored by sample index (see :mod:`igkd.store`), once per (teacher weights, dataset, IG
settings), and reused by every distillation run. This is what the paper's code got
wrong: it computed through a shuffled, augmented loader and read back by index.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attribution import attribution_map, integrated_gradients, make_baseline
from .config import PrecomputeConfig
from .data import Dataset
from .models import Normalized, weights_fingerprint
from .progress import Progress, log
from .runtime import cache_dir
from .store import Store, StoreWriter, open_store, store_key


def store_identity(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig) -> dict:
    """What a store is for. Changing any of these gives another store."""
    pre = {"mean": teacher.mean.flatten().tolist(), "std": teacher.std.flatten().tolist()} \
        if isinstance(teacher, Normalized) else {"normalize": "none"}
    return {
        "dataset": dataset.fingerprint("train"),
        "teacher": weights_fingerprint(teacher) + ":" + store_key(pre),
        "settings": {"ig_steps": cfg.ig_steps, "ig_method": cfg.ig_method, "ig_baseline": cfg.ig_baseline,
                     "target": "label", "map": "sum_c|IG| / max, float16"},
    }


def default_store_dir(identity: dict) -> Path:
    return cache_dir("stores", store_key(identity))


@torch.no_grad()
def _logits(teacher: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])


def compute_chunk(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PrecomputeConfig,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Logits, normalised maps, scales and deltas for one block of clean images."""
    x = images.to(device).float().div_(255)
    y = labels.to(device)
    mean = teacher.mean if isinstance(teacher, Normalized) else None
    std = teacher.std if isinstance(teacher, Normalized) else None
    baseline = make_baseline(cfg.ig_baseline, x, mean=mean, std=std)
    attr, delta = integrated_gradients(teacher, x, y, baseline=baseline, n_steps=cfg.ig_steps,
                                       method=cfg.ig_method, batch_size=cfg.ig_batch or None, return_delta=True)
    m = attribution_map(attr)
    scale = m.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "logits": _logits(teacher, x, 256).float().cpu().numpy(),
        "maps": (m / scale[:, None, None]).half().cpu().numpy(),
        "map_scale": scale.float().cpu().numpy(),
        "delta": delta.float().cpu().numpy(),
        "gap": (attr.flatten(1).sum(1, dtype=torch.float64) - delta.double()).float().cpu().numpy(),
    }


def precompute(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig | None = None,
               store_dir: str | Path | None = None, device: torch.device | str = "cpu",
               quiet: bool = False, chunks: list[int] | None = None) -> Store | None:
    """Build (or reuse, or resume) the store for ``teacher`` on ``dataset``'s training set.

    ``chunks`` restricts the work to some chunks (one rank's share); the store is then
    finalised by whoever calls with ``chunks=None`` once all chunks exist.
    """
    cfg = cfg or PrecomputeConfig()
    device = torch.device(device)
    teacher = teacher.to(device).eval()
    identity = store_identity(teacher, dataset, cfg)
    path = Path(store_dir) if store_dir else default_store_dir(identity)
    if (path / "manifest.json").exists():
        store = open_store(path, identity)
        log(f"precompute: reusing store {path}", quiet)
        return store
    train = dataset.train
    writer = StoreWriter(path, identity, len(train), cfg.chunk_size)
    todo = writer.pending(chunks)
    remaining = sum(writer.chunk_range(i)[1] - writer.chunk_range(i)[0] for i in todo)
    if todo:
        done_already = (writer.num_chunks if chunks is None else len(chunks)) - len(todo)
        log(f"precompute: {len(train)} images, IG {cfg.ig_method} x {cfg.ig_steps} steps, baseline {cfg.ig_baseline}"
            f" -> {path}" + (f" (resuming: {done_already} chunk(s) already done)" if done_already else ""), quiet)
    with Progress(remaining, "precompute", "img", quiet=quiet or not todo) as bar:
        for i in todo:
            lo, hi = writer.chunk_range(i)
            writer.write_chunk(i, **compute_chunk(teacher, train.images[lo:hi], train.labels[lo:hi], cfg, device))
            bar.update(hi - lo)
    if chunks is not None:
        return None
    store = writer.finalize(extra={"settings": asdict(cfg), "dataset_spec": dataset.spec,
                                   "classes": dataset.classes})
    d = store.manifest["completeness_delta"]
    log(f"precompute: done; IG completeness error |delta| / |F(x) - F(x')|: median {100 * d['median_relative']:.1f}%, "
        f"p90 {100 * d['p90_relative']:.1f}% (more --ig-steps lowers it)", quiet)
    return store
