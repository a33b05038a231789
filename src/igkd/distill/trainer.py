"""Training loop for teachers (cross-entropy) and students (CE / KD / IG overlay).

The data path follows the fast CIFAR trainers: the whole training split lives as a
uint8 tensor on the training device next to its labels, IG maps and teacher logits,
all aligned by sample index; each batch is the images at a slice of a seeded
permutation, augmented as tensor ops (:mod:`igkd.distill.augment`). There is no
DataLoader and no per-sample Python.

A run directory holds::

    config.yaml       the resolved configuration
    metrics.jsonl     one line per epoch: losses, images/s, validation accuracy
    last.pt           full state after the last finished epoch (for --resume)
    model.safetensors + model.json   the best epoch's network (by validation accuracy)
    summary.json      best epoch, validation and test accuracy, parameters, timings

Randomness: initialisation from ``seed``; data order and augmentation of epoch e from
a generator seeded with (seed, e), so resuming after epoch e replays nothing and
changes nothing.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from ..config import DistillConfig, TrainConfig, to_dict
from ..data import Dataset, stratified_split
from ..errors import UserError
from ..evaluate import classification_metrics, predict
from ..fileio import atomic_path, write_json, write_text
from ..models import Normalized, bare, count_parameters, load_weights, save_checkpoint
from ..progress import Progress, fmt_seconds, is_rank0, log
from .augment import crop_flip, ig_overlay
from .losses import kd_loss

METHODS = ["student", "kd", "ig", "kd+ig", "ig-shuffled", "kd+ig-shuffled"]


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Method:
    name: str
    kd: bool
    ig: bool
    shuffled: bool

    @property
    def needs_teacher(self) -> bool:
        return self.kd or self.ig


def parse_method(name: str) -> Method:
    parts = name.lower().split("+")
    if name.lower() not in METHODS:
        raise UserError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return Method(name.lower(), kd="kd" in parts, ig=any(p.startswith("ig") for p in parts),
                  shuffled="ig-shuffled" in parts)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def shuffled_map_index(n: int, seed: int) -> torch.Tensor:
    """A fixed derangement-like permutation: sample i gets the map of sample perm[i] != i."""
    g = torch.Generator().manual_seed(epoch_seed(seed, -1))
    perm = torch.randperm(n, generator=g)
    same = perm == torch.arange(n)
    if n > 1 and bool(same.any()):  # move fixed points one step along
        fixed = same.nonzero().flatten()
        perm[fixed] = perm[torch.roll(fixed, 1)] if len(fixed) > 1 else perm[(fixed + 1) % n]
        if len(fixed) == 1:
            perm[(fixed + 1) % n] = fixed
    return perm


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


class Trainer:
    """Trains ``model`` on ``dataset`` as ``cfg`` says; see the module docstring."""

    def __init__(self, cfg: TrainConfig, model: nn.Module, dataset: Dataset, out_dir: str | Path,
                 device: torch.device, teacher: nn.Module | None = None, store=None, meta: dict | None = None,
                 quiet: bool = False):
        self.cfg, self.dataset, self.device, self.quiet = cfg, dataset, device, quiet
        self.out = Path(out_dir)
        self.meta = meta or {}
        self.method = parse_method(cfg.method) if isinstance(cfg, DistillConfig) else parse_method("student")
        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        train = dataset.train
        self.images = train.images.to(device)
        self.labels = train.labels.to(device)
        keep, held = stratified_split(train.labels, cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 \
            else (torch.arange(len(train)), torch.empty(0, dtype=torch.long))
        self.train_idx, self.val_idx = keep.to(device), held
        self.teacher = teacher.to(device).eval() if teacher is not None else None
        self.maps = self.logits = None
        if self.method.ig:
            self.maps = torch.from_numpy(np.array(store.maps)).to(device)
            if self.method.shuffled:
                self.map_index = shuffled_map_index(len(train), cfg.seed).to(device)
        if self.method.kd and cfg.logits == "precomputed":
            self.logits = torch.from_numpy(np.array(store.logits)).to(device)
        n = len(self.train_idx)
        self.steps_per_epoch = max(1, n // cfg.batch_size) if n >= cfg.batch_size else 1
        self.optimizer = make_optimizer(cfg, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps_per_epoch))
        self.epoch = 0
        self.best = {"val_accuracy": -1.0, "epoch": 0}

    # ---------------------------------------------------------------- batches
    def batches(self, epoch: int):
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(cfg.seed, epoch))
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=gen, device=self.device)]
        bs = min(cfg.batch_size, len(order))
        for s in range(self.steps_per_epoch):
            idx = order[s * bs:(s + 1) * bs]
            x = self.images[idx].float().div_(255)
            if self.method.ig:
                map_idx = self.map_index[idx] if self.method.shuffled else idx
                x = ig_overlay(x, self.maps[map_idx], cfg.p, gen)
            x = crop_flip(x, cfg.crop_padding, cfg.flip, gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield idx, x, self.labels[idx]

    def teacher_logits(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if not self.method.kd:
            return None
        if self.logits is not None:
            return self.logits[idx]
        with torch.no_grad():
            return self.teacher(x).float()

    # ---------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.model.train()
        sums: dict[str, float] = {}
        seen = 0
        start = time.perf_counter()
        with Progress(self.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", "step",
                      quiet=self.quiet or not _is_tty()) as bar:
            for idx, x, y in self.batches(epoch):
                t = self.teacher_logits(idx, x)
                out = self.model(x)
                alpha = getattr(cfg, "alpha", 0.0)
                loss, parts = kd_loss(out, y, t, getattr(cfg, "T", 1.0), alpha, cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss.item()} at epoch {epoch}; the last good checkpoint is "
                        f"{self.out / 'last.pt'}; lower --lr or check the data")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                n = len(idx)
                seen += n
                sums["loss"] = sums.get("loss", 0.0) + loss.item() * n
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * n
                bar.update(1, extra=f"loss {sums['loss'] / seen:.3f}")
        dt = time.perf_counter() - start
        return {**{k: v / max(1, seen) for k, v in sums.items()}, "images_per_s": seen / dt, "seconds": dt}

    def evaluate(self, indices: torch.Tensor | None = None, split: str = "val") -> dict:
        data = self.dataset.train if split == "val" else self.dataset.test
        images = data.images if indices is None else data.images[indices]
        labels = data.labels if indices is None else data.labels[indices]
        logits = predict(self.model, images, self.cfg.eval_batch_size, self.device, self.cfg.channels_last)
        return classification_metrics(logits, labels, self.dataset.classes)

    # ---------------------------------------------------------------- state
    def state(self, history: list) -> dict:
        return {"model": bare(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "best": self.best,
                "history": history, "torch_rng": torch.get_rng_state(), "config": to_dict(self.cfg)}

    def save_state(self, history: list) -> None:
        with atomic_path(self.out / "last.pt") as tmp:
            torch.save(self.state(history), tmp)

    def load_state(self) -> list:
        path = self.out / "last.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k not in ("epochs", "quiet")}
        now = {k: v for k, v in to_dict(self.cfg).items() if k not in ("epochs", "quiet")}
        if saved != now:
            diff = sorted(k for k in now if saved.get(k) != now[k])
            raise UserError(f"cannot resume {self.out}: its config differs in {', '.join(diff)}; "
                            "resume with the same options or start a new --out directory")
        bare(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best = state["epoch"], state["best"]
        torch.set_rng_state(state["torch_rng"])
        return state["history"]

    def model_meta(self) -> dict:
        pre = {"normalize": "none"}
        if isinstance(self.model, Normalized):
            pre = {"normalize": "dataset", "mean": self.model.mean.flatten().tolist(),
                   "std": self.model.std.flatten().tolist()}
        return {"model": self.cfg.model, "num_classes": len(self.dataset.classes),
                "in_channels": self.dataset.channels, "classes": self.dataset.classes,
                "image_size": list(self.dataset.image_size), "preprocessing": pre,
                "input": "RGB or grayscale float in [0, 1], NCHW", "dataset": self.dataset.spec,
                "dataset_fingerprint": self.dataset.fingerprint("train"), **self.meta}

    # ---------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        history: list = []
        if resume and (self.out / "last.pt").exists():
            history = self.load_state()
            log(f"resuming {self.out} after epoch {self.epoch}", self.quiet)
        elif (self.out / "summary.json").exists() or (self.out / "last.pt").exists():
            raise UserError(f"run directory {self.out} already holds a run; pass --resume to continue it "
                            "or choose another --out")
        else:
            torch.manual_seed(cfg.seed)
        if is_rank0():
            write_text(self.out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        params = count_parameters(bare(self.model))
        log(f"training {cfg.model} ({params:,} params) with {self.method.name} on {self.dataset.spec}: "
            f"{len(self.train_idx)} train / {len(self.val_idx)} val images, {cfg.epochs} epochs, "
            f"batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.lr}, device {self.device}", self.quiet)
        start, first = time.perf_counter(), self.epoch
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            stats = self.train_epoch(epoch)
            val = self.evaluate(self.val_idx)["accuracy"] if len(self.val_idx) else float("nan")
            self.epoch = epoch
            improved = len(self.val_idx) == 0 or val > self.best["val_accuracy"]
            if improved:
                self.best = {"val_accuracy": val, "epoch": epoch}
                save_checkpoint(self.out / "model", self.model, self.model_meta())
            row = {"epoch": epoch, **stats, "val_accuracy": val, "lr": self.scheduler.get_last_lr()[0]}
            history.append(row)
            self.save_state(history)
            if is_rank0():  # rewritten whole from the saved history: no duplicate or lost rows on resume
                write_text(self.out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            eta = (time.perf_counter() - start) / (epoch - first) * (cfg.epochs - epoch)
            log(f"epoch {epoch}/{cfg.epochs}: loss {stats['loss']:.4f}"
                + "".join(f", {k} {stats[k]:.4f}" for k in ("ce", "kd") if k in stats and len(stats) > 4)
                + f", val {val:.2f}%{' *' if improved else ''}, {stats['images_per_s']:.0f} img/s, "
                f"ETA {fmt_seconds(eta)}", self.quiet)
        return self.finish(history, time.perf_counter() - start)

    def finish(self, history: list, seconds: float) -> dict:
        load_weights(self.model, self.out / "model.safetensors", self.cfg.model)
        test = self.evaluate(split="test")
        summary = {
            "method": self.method.name, "model": self.cfg.model, "dataset": self.dataset.spec,
            "params": count_parameters(bare(self.model)), "best_epoch": self.best["epoch"],
            "val_accuracy": self.best["val_accuracy"], "test_accuracy": test["accuracy"],
            "test": test, "epochs": self.cfg.epochs, "train_seconds": seconds, **self.meta,
        }
        meta = {**self.model_meta(), "metrics": {"val_accuracy": self.best["val_accuracy"],
                                                 "test_accuracy": test["accuracy"], "epoch": self.best["epoch"]}}
        save_checkpoint(self.out / "model", self.model, meta)
        write_json(self.out / "summary.json", summary)
        log(f"done: best epoch {self.best['epoch']} (val {self.best['val_accuracy']:.2f}%), "
            f"test accuracy {test['accuracy']:.2f}% -> {self.out}", self.quiet)
        return summary


def _is_tty() -> bool:
    import sys
    return sys.stderr.isatty()


__all__ = ["METHODS", "Method", "Trainer", "TrainingDiverged", "parse_method"]
