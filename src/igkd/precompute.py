"""Precompute teacher logits and overlay maps for a training set (METHOD.md section 3).

Everything is computed on the clean, un-augmented training images in index order and
stored by sample index (see :mod:`igkd.store`), once per (teacher architecture and
weights, dataset, attribution settings), and reused by every distillation run. This is what
the paper's code got wrong: it computed through a shuffled, augmented loader and read back
by index.

Sharding: under torchrun (WORLD_SIZE > 1) chunk i of the store is computed by rank
i % WORLD_SIZE; the ranks write disjoint chunk files of one store directory, rank 0
assembles the final arrays once every rank is done. Chunks are a pure function of the
images they cover, so the store is the same however many processes built it (byte for
byte at equal CPU thread counts). On several machines the store directory must be on a
filesystem they all see.

Rank 0 holds the store's lock (:mod:`igkd.lock`) from the first look at the store to
the last write, so a second precompute of the same store (or a distill that needs it)
waits, then reuses what the first built; the other ranks of one torchrun group work
under rank 0's lock. A finished store is verified (``--verify-store``) before it is
used, and one that fails is recomputed with a warning (see :mod:`igkd.store`).
"""

from __future__ import annotations

from dataclasses import asdict, replace
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .attribution import attribution_map
from .attribution import registry
from .attribution.engine import inputs_known_finite
from .config import PrecomputeConfig
from .data import Dataset
from .errors import UserError
from .distill.parallel import Dist
from .models import Normalized, teacher_identity, to_device
from .fileio import remove_temporaries
from .lock import DirLock
from .progress import Progress, log
from .runtime import cache_dir
from .store import (Store, StoreDamaged, StoreWriter, open_store, read_manifest, remove_store_files,
                    settings_difference, store_key)



def attribution_settings(cfg: PrecomputeConfig) -> dict:
    """The settings that determine the maps (part of the store's identity): the
    attribution's own (its registry entry's ``settings``), the target and the map format."""
    s = registry.get(cfg.attribution).settings(cfg)
    size = f", area mean to {cfg.map_size}x{cfg.map_size}" if cfg.map_size else ""  # absent: keys as before
    return {**s, "target": "label", "map": f"sum_c|IG| / max, {cfg.map_dtype}{size}"}


def maps_record(cfg: PrecomputeConfig, store: Store | None = None) -> dict:
    """What the teacher's maps are, for results files, model cards and reports: the
    attribution, its phrase (the registry's description) and the settings that decided
    them (the store's identity, a fitted schedule resolved). Written as IG steps, method
    and baseline, a Grad-CAM or saliency store was described as the IG it was not."""
    entry = registry.get(cfg.attribution)
    settings = store.manifest["identity"]["settings"] if store is not None else attribution_settings(cfg)
    return {"attribution": entry.name, "description": entry.description(cfg), "settings": settings}


def store_identity(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig, settings: bool = True) -> dict:
    """What a store is for. Changing any of these gives another store. ``settings=False``:
    the teacher and the data alone."""
    pre = {"mean": teacher.mean.flatten().tolist(), "std": teacher.std.flatten().tolist()} \
        if isinstance(teacher, Normalized) else {"normalize": "none"}
    # the teacher's architecture as well as its weights (models.teacher_identity): equal state dicts
    # of different networks, or frozen TorchScript teachers (no state dict), must not share a store
    identity = {"dataset": dataset.fingerprint("train"), "teacher": teacher_identity(teacher) + ":" + store_key(pre)}
    return {**identity, "settings": attribution_settings(cfg)} if settings else identity


def prepare_settings(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig, device: torch.device,
                     quiet: bool = False, dist: Dist | None = None) -> PrecomputeConfig:
    """``cfg`` with what its attribution resolves from the teacher and the data before a
    store can be named (a fitted IG schedule; see the registry's ``prepare``). Under
    torchrun rank 0 resolves first and the other ranks then find its result cached."""
    entry = registry.get(cfg.attribution)
    if entry.prepare is None:
        return cfg
    env = dist or Dist()
    key = store_identity(teacher, dataset, cfg, settings=False)
    if env.rank == 0:
        cfg = entry.prepare(teacher, dataset, cfg, device, quiet, key)
    env.barrier(long=True)
    if env.rank != 0:
        cfg = entry.prepare(teacher, dataset, cfg, device, True, key)
    return cfg


def default_store_dir(identity: dict) -> Path:
    return cache_dir("stores", store_key(identity))


@torch.no_grad()
def _logits(teacher: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([teacher(x[i:i + batch]) for i in range(0, len(x), batch)])


def attributions(teacher: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PrecomputeConfig,
                 first_index: int = 0, n_steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributions of ``cfg.attribution`` for [0, 1] images ``x`` with labels ``y``, and
    the completeness delta (NaN for the attributions that have none). ``first_index``:
    the dataset index of ``x[0]`` (seeds SmoothGrad's noise, so a chunk is the same
    whoever computes it); ``n_steps`` overrides the step count of those that have one
    (``cfg.ig_steps``). The attribution is its registry entry's ``compute``
    (:mod:`igkd.attribution.registry`); ``attribution_map`` of the result is the map."""
    return registry.get(cfg.attribution).compute(teacher, x, y, cfg, first_index, n_steps)


SLICE_VALUES = 1 << 23  # image values (32 MiB of float32) per attribution call within a chunk


def compute_chunk(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PrecomputeConfig,
                  device: torch.device, first_index: int = 0) -> dict[str, np.ndarray]:
    """Logits, normalised maps, scales and deltas for one block of clean images.

    In slices of at most :data:`SLICE_VALUES` image values: an attribution holds several
    float copies of its input (inputs, baseline, difference, gradient sum, attributions), so a
    chunk of 1,024 images at 224 pixels took gigabytes of short-lived memory whose page
    faults cost more than the teacher's passes. A CIFAR chunk is one slice, as before."""
    per_image = max(1, math.prod(images.shape[1:]))
    step = max(1, SLICE_VALUES // per_image)
    if len(images) <= step:
        return _compute_slice(teacher, images, labels, cfg, device, first_index)
    parts = [_compute_slice(teacher, images[i:i + step], labels[i:i + step], cfg, device, first_index + i)
             for i in range(0, len(images), step)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def _compute_slice(teacher: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PrecomputeConfig,
                   device: torch.device, first_index: int) -> dict[str, np.ndarray]:
    x = images.to(device).float().div_(255)
    y = labels.to(device)
    entry = registry.get(cfg.attribution)
    with inputs_known_finite():  # bytes / 255
        attr, delta = entry.compute(teacher, x, y, cfg, first_index)
    unit, scale = unit_maps(attribution_map(attr), cfg)
    maps = unit.mul(255).round_().to(torch.uint8) if cfg.map_dtype == "uint8" else unit.half()
    logits = _logits(teacher, x, 256)
    if entry.completeness:  # sum(attr) - delta = F_y(x) - F_y(baseline)
        gap = attr.flatten(1).sum(1, dtype=torch.float64) - delta.double()
    else:  # F_y(x) - F_y(black image), from the logits above and one more pass
        rows = y.view(-1, 1)
        gap = (logits.gather(1, rows) - _logits(teacher, torch.zeros_like(x), 256).gather(1, rows))[:, 0].double()
    return {
        "logits": logits.float().cpu().numpy(),
        "maps": maps.cpu().numpy(),
        "map_scale": scale.float().cpu().numpy(),
        "delta": delta.float().cpu().numpy(),
        "gap": gap.float().cpu().numpy(),
    }


def downsample_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``N x H x W`` maps as ``N x size x size`` area means (each stored pixel the mean of
    the image pixels it covers: no aliasing of the map's fine detail into wrong places)."""
    return torch.nn.functional.adaptive_avg_pool2d(maps[:, None].float(), size)[:, 0]


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Stored maps back at the image size: bilinear at pixel centres, float32."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    return torch.nn.functional.interpolate(maps[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


def unit_maps(maps: torch.Tensor, cfg: PrecomputeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(each ``N x H x W`` map divided by its maximum, at ``--map-size`` when set; the maxima):
    what a store keeps, before its dtype."""
    scale = maps.flatten(1).amax(1).clamp_min(torch.finfo(torch.float32).tiny)
    unit = maps / scale[:, None, None]
    if cfg.map_size and tuple(unit.shape[-2:]) != (cfg.map_size, cfg.map_size):
        unit = downsample_maps(unit, cfg.map_size)
    return unit, scale


def as_read_back(maps: torch.Tensor, cfg: PrecomputeConfig) -> torch.Tensor:
    """``N x H x W`` maps as training reads them back from a store of ``cfg``: at
    ``--map-size`` and upsampled again, quantised with ``--map-dtype uint8``, in the maps'
    own units. The error estimate scores these: it printed 0% for a 7x7 ``--map-size`` of a
    28x28 map, whose stored maps err by 56-73% (README). float16 rounding (2^-11 of the
    maximum at most) is left out, so that the reference's own settings score 0."""
    if not cfg.map_size and cfg.map_dtype != "uint8":
        return maps
    unit, scale = unit_maps(maps, cfg)
    if cfg.map_dtype == "uint8":
        unit = unit.mul(255).round_().div_(255)
    return upsample_maps(unit, tuple(maps.shape[-2:])) * scale[:, None, None]


def relative_l1(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per image ``sum |M - R| / sum |R|`` over the map (the error measure igkd reports)."""
    return (maps - reference).abs().flatten(1).sum(1) / reference.abs().flatten(1).sum(1).clamp_min(1e-30)


def estimate_error(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig, device: torch.device,
                   images: int | None = None, reference_steps: int | None = None, quiet: bool = True) -> dict | None:
    """Map error of ``cfg``'s attribution against IG (``attribution.registry.REFERENCE``)
    with ``reference_steps`` Gauss-Legendre steps (same baseline), on ``images`` evenly
    spaced training images: what choosing these settings costs in accuracy, known before
    the full run. None when skipped.

    For another attribution the maps are in other units (a gradient, not gradient x (x -
    x')), and their raw L1 distance moved with the IG baseline that saliency never reads:
    both maps are then scaled to sum 1 per image first, and the figure is their distance
    as shares of the map (0 to 2), marked ``"scaled": "sum 1"``. Each image's maps are
    computed with its own index, as the store's are (smoothgrad's noise follows it).
    ``quiet=False`` shows progress by image where the check takes more than a few seconds
    (8 images of a ResNet-50 at 224 pixels: minutes on a CPU)."""
    k = min(cfg.check_images if images is None else images, len(dataset.train))
    steps = reference_steps or cfg.check_steps
    if k <= 0:
        return None
    train = dataset.train
    idx = torch.linspace(0, len(train) - 1, k).round().long()
    x = train.images[idx].to(device).float().div_(255)
    y = train.labels[idx].to(device)
    ref_cfg = replace(cfg, attribution=registry.REFERENCE, ig_method="gausslegendre")  # cfg may be a DistillConfig
    refs, ours = [], []
    with Progress(k, f"precompute: checking the maps against a {steps}-step IG reference", "img", quiet=quiet,
                  delay=5.0) as bar:
        for j in range(k):  # image by image, for the progress; the attributions batch the steps
            refs.append(attribution_map(attributions(teacher, x[j:j + 1], y[j:j + 1], ref_cfg, n_steps=steps)[0]))
            ours.append(attribution_map(attributions(teacher, x[j:j + 1], y[j:j + 1], cfg,
                                                     first_index=int(idx[j]))[0]))
            bar.update(1)
    ref, ours = torch.cat(refs), torch.cat(ours)
    ours = as_read_back(ours, cfg)
    scaled = cfg.attribution != registry.REFERENCE
    if scaled:
        ours, ref = (m / m.flatten(1).sum(1).clamp_min(1e-30).view(-1, *[1] * (m.dim() - 1)) for m in (ours, ref))
    err = relative_l1(ours, ref).cpu()
    return {"images": k, "reference_steps": steps, "median": float(err.median()), "max": float(err.max()),
            "mean": float(err.mean()), **({"scaled": "sum 1"} if scaled else {})}


def precompute(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig | None = None,
               store_dir: str | Path | None = None, device: torch.device | str = "cpu",
               quiet: bool = False, dist: Dist | None = None, chunks: list[int] | None = None,
               maps: bool = True) -> Store | None:
    """Build (or reuse, or resume) the store for ``teacher`` on ``dataset``'s training set.

    ``maps=False``: the caller reads only the stored logits (a kd, dkd or dist run), so a
    finished store of this teacher and these images is used whatever its map settings
    (:data:`igkd.store.LOGITS_IDENTITY`); one that must be computed or finished is computed
    with ``cfg``'s settings as ever, a store like any other.

    ``dist``: this process's place in a torchrun group (see :mod:`igkd.distill.parallel`);
    every rank must call this, each computes its share of the chunks, rank 0 assembles
    the store, and all ranks return it opened. ``chunks``: compute only these chunks
    (one share of the work, done by hand) and return None; a later call without
    ``chunks`` computes what is missing and assembles the store.
    """
    cfg = cfg or PrecomputeConfig()
    if not len(dataset.train):  # a store of no rows has no chunk to assemble (finalize read a chunks/000000.npz)
        raise UserError(f"the training split of {dataset.spec} holds no images; there is nothing to precompute")
    h, w = dataset.image_size
    if cfg.map_size > min(h, w):  # adaptive pooling "to" a larger size repeats pixels: a bigger store, no gain
        raise UserError(f"--map-size {cfg.map_size} is larger than the {h}x{w} images; give at most {min(h, w)}, "
                        "or 0 to store maps at the image size")
    env = dist or Dist()
    device = torch.device(device)
    teacher = to_device(teacher, device).eval()  # a frozen TorchScript teacher's weights too
    cfg = prepare_settings(teacher, dataset, cfg, device, quiet, env)
    identity = store_identity(teacher, dataset, cfg)
    path = Path(store_dir) if store_dir else default_store_dir(identity)
    if (path / "manifest.json").exists() and not os.access(path, os.W_OK):
        return _read_only(path, identity, cfg.verify_store, quiet, maps)
    lock = None
    if env.rank == 0:  # one writer per store; the other ranks of this group work under rank 0's lock
        lock = DirLock(path, "store", "wait for it to finish").acquire(wait=True, quiet=quiet)
    try:
        return _precompute(teacher, dataset, cfg, path, identity, device, quiet, env, chunks, maps)
    finally:
        if lock is not None:
            lock.release()


def _read_only(path: Path, identity: dict, mode: str, quiet: bool, maps: bool = True) -> Store:
    """A finished store this process may not write (a team's store on a read-only mount, or
    another user's): read without the lock, which needs a file in it, and never repaired. It
    was refused as an unwritable --store, though training only reads it."""
    try:
        store = open_store(path, identity, mode, maps)
    except StoreDamaged as e:
        raise UserError(f"store {path} is read-only here and damaged: {e.file} {e.problem}; have it rebuilt by its "
                        "owner, or pass another --store to compute one") from None
    log(f"precompute: reusing read-only store {path}: it is complete"
        + (" and verified" if mode != "never" else " (--verify-store never: size and header checked)")
        + teacher_accuracy_note(store.manifest) + other_maps_note(store.manifest, identity), quiet)
    return store


def _reuse_or_clear(path: Path, identity: dict, mode: str, quiet: bool, maps: bool = True) -> bool:
    """Rank 0, holding the lock: True when ``path`` holds a finished store that passes
    verification; a damaged one is deleted (warning on stderr) so that it is recomputed."""
    for tmp in remove_temporaries(path) + remove_temporaries(path / "chunks"):
        log(f"precompute: removed {tmp.name}, left behind by a killed writer", quiet)
    if not (path / "manifest.json").exists():
        return False
    try:
        open_store(path, identity, mode, maps)
    except StoreDamaged as e:
        print(f"igkd: warning: store {path}: {e.file} {e.problem}; recomputing the store", file=sys.stderr,
              flush=True)
        remove_store_files(path)
        return False
    if (path / "chunks").exists():  # a finalisation killed after the manifest was written
        shutil.rmtree(path / "chunks")
    return True


def _precompute(teacher: nn.Module, dataset: Dataset, cfg: PrecomputeConfig, path: Path, identity: dict,
                device: torch.device, quiet: bool, env: Dist, chunks: list[int] | None,
                maps: bool = True) -> Store | None:
    reuse = env.rank == 0 and _reuse_or_clear(path, identity, cfg.verify_store, quiet, maps)
    if reuse:
        manifest = read_manifest(path)
        log(f"precompute: reusing store {path}: it is complete"
            + (" and verified" if cfg.verify_store != "never" else " (--verify-store never: size and header checked)")
            + teacher_accuracy_note(manifest) + other_maps_note(manifest, identity), quiet)
    env.barrier(long=True)
    if (path / "manifest.json").exists():  # rank 0 verified it under the lock (or deleted it)
        return open_store(path, identity, "never", maps)
    train = dataset.train
    estimate = None
    if env.rank == 0 and len(train) and not (path / "chunks").exists():
        # one image through the real computation first: an option only the attribution can check
        # (a --gradcam-layer typo) fails here, not after the store's plan exists, which would
        # then refuse the corrected command as "computed for other settings"
        compute_chunk(teacher, train.images[:1], train.labels[:1], cfg, device, first_index=0)
    if env.rank == 0:  # creates the store's plan; the other ranks then check theirs against it
        writer = StoreWriter(path, identity, len(train), cfg.chunk_size)
        wanted = list(range(writer.num_chunks)) if chunks is None else chunks
        pending = writer.pending(wanted)  # re-hashes finished chunks, removes bad ones
        todo = [i for i in pending if i % env.world == 0]
        if pending:
            log(f"precompute: {len(train)} images, {registry.get(cfg.attribution).description(cfg)} -> {path}"
                + (f" (resuming: {len(wanted) - len(pending)} of {len(wanted)} chunks done)"
                   if len(pending) < len(wanted) else "")
                + (f" on {env.world} processes" if env.world > 1 else ""), quiet)
        # estimated once per store and kept beside the chunks (StoreWriter.save_estimate), so that
        # every way of finishing the store writes it into the manifest
        check = {"check_images": cfg.check_images, "check_steps": cfg.check_steps}
        estimate = writer.saved_estimate(check)
        if estimate is None and (pending or chunks is None):
            estimate = estimate_error(teacher, dataset, cfg, device, quiet=quiet)
            writer.save_estimate(check, estimate)
        if pending:
            if estimate is not None:
                what, how = ("map error vs", "relative L1; raise --ig-steps to lower it") if "scaled" not in estimate \
                    else ("distance to", "L1 of the maps scaled to sum 1, 0 to 200%: how unlike IG they are")
                if cfg.map_size and "scaled" not in estimate:  # it includes what storing them small costs
                    how = (f"relative L1 of the maps as kept at --map-size {cfg.map_size}; raise --ig-steps or "
                           "--map-size to lower it")
                log(f"precompute: {what} a {estimate['reference_steps']}-step IG reference on "
                    f"{estimate['images']} images: median {100 * estimate['median']:.1f}%, max "
                    f"{100 * estimate['max']:.1f}% ({how})", quiet)
    env.barrier(long=True)
    if env.rank != 0:
        writer = StoreWriter(path, identity, len(train), cfg.chunk_size)
        wanted = list(range(writer.num_chunks)) if chunks is None else chunks
        todo = writer.pending([i for i in wanted if i % env.world == env.rank])
    remaining = sum(writer.chunk_range(i)[1] - writer.chunk_range(i)[0] for i in todo)
    extra = f"rank 0 of {env.world}" if env.world > 1 else ""
    with Progress(remaining, "precompute", "img", quiet=quiet or not todo or env.rank != 0) as bar:
        for i in todo:
            lo, hi = writer.chunk_range(i)
            writer.write_chunk(i, **compute_chunk(teacher, train.images[lo:hi], train.labels[lo:hi], cfg, device,
                                                  first_index=lo))
            bar.update(hi - lo, extra)
    env.barrier(long=True)
    if chunks is not None:
        return None
    if env.rank == 0:
        settings = {k: v for k, v in asdict(cfg).items() if k != "verify_store"}  # how to read it, not what it is
        store = writer.finalize(extra={"settings": settings, "dataset_spec": dataset.spec,
                                       "classes": dataset.classes, "error_estimate": estimate,
                                       "processes": env.world}, labels=train.labels.numpy())
        if note := teacher_accuracy_note(store.manifest):
            log(f"precompute: {note.removeprefix('; ')}", quiet)
        d = store.manifest["completeness_delta"]
        if registry.get(cfg.attribution).completeness:
            log(f"precompute: done; IG completeness error |delta| / |F(x) - F(x')|: median "
                f"{100 * d['median_relative']:.1f}%, p90 {100 * d['p90_relative']:.1f}% (more --ig-steps lowers it)",
                quiet)
    env.barrier(long=True)
    return open_store(path, identity, "never")  # verified while written


def other_maps_note(manifest: dict, identity: dict) -> str:
    """'; its maps were computed with other settings (...), and only its logits are read', or ''.
    Said where a logits-only run reuses such a store (``maps=False``), so that a reader of the
    log does not take the run's own IG options for those of the store."""
    diff = settings_difference(manifest.get("identity") or {}, identity)
    return f"; its maps were computed with other settings ({diff}), and only its logits are read" if diff else ""


def teacher_accuracy_note(manifest: dict) -> str:
    """'; the teacher is right on 97.8% of its 120 training images (stored logits)', or ''
    for a store written before the count was kept. A teacher fed the wrong normalisation or
    image size computes maps and logits all the same: this is where it shows."""
    acc = manifest.get("teacher_accuracy")
    if not acc:
        return ""
    return f"; the teacher is right on {acc['percent']:.1f}% of its {acc['images']} training images (stored logits)"


def bytes_per_image(num_classes: int, height: int, width: int, map_dtype: str = "float16") -> int:
    """Disk bytes of one image's row in a store: logits, map, scale, delta, gap."""
    return 4 * num_classes + (1 if map_dtype == "uint8" else 2) * height * width + 3 * 4


__all__ = ["attributions", "bytes_per_image", "compute_chunk", "downsample_maps", "upsample_maps", "estimate_error", "precompute", "relative_l1",
           "prepare_settings", "store_identity"]
