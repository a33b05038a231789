"""Training loop for teachers (cross-entropy) and students (cross-entropy plus the terms
and batch transforms of their method's parts, :mod:`igkd.distill.parts`).

The data path follows the fast CIFAR trainers: the whole training split lives as a
uint8 tensor on the training device next to its labels, IG maps and teacher logits,
all aligned by sample index; each batch is the images at a slice of a seeded
permutation, augmented as tensor ops (:mod:`igkd.distill.augment`). There is no
DataLoader and no per-sample Python. Data larger than memory (or ``--stream on``) takes
the streaming path instead (:mod:`igkd.distill.stream`): the same indices, gathered from
host memory or memory maps on a background thread, and identical batches.

The trainer knows no method by name. Each batch is the images at the step's indices,
then the transforms of the parts at stage ``overlay`` (clean images), crop and flip (with
the maps of the samples as one more channel when a part compares maps), then the
transforms at stage ``mix``. The teacher runs when a part needs its logits online
(``--logits online``, or a mixing part) or hooks one of its layers; otherwise logits come
from the store by sample index. The loss is ``w_ce CE + sum of w_term term`` over the
parts' named terms; the terms are logged unweighted.

A run directory holds::

    config.yaml       the resolved configuration
    metrics.jsonl     one line per epoch: losses, images/s, validation accuracy
    last.pt           full state after the last finished epoch (for --resume)
    model.safetensors + model.json   the best epoch's network (by validation accuracy);
                      a new best is written as model-pending.* and renamed once last.pt
                      names it, so the two never disagree after a kill
    summary.json      best epoch, validation and test accuracy, parameters, timings

Randomness: initialisation from ``seed``; data order and augmentation of epoch e from
a generator seeded with (seed, e), so resuming after epoch e replays nothing and
changes nothing; dropout from the global generator, seeded per rank and saved per rank.

Under torchrun (:mod:`igkd.distill.parallel`) every rank takes its slice of the same
global batch, DDP averages gradients, validation is sharded, and rank 0 alone writes.
The step's speed switches (fused optimizers, AMP on CUDA, torch.compile) are in
:mod:`igkd.distill.speed`; attention transfer hooks in :mod:`igkd.distill.attention`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..config import TrainConfig, init_file, recorded_defaults, to_dict
from ..data import Dataset, RowView, stratified_split, subset_indices
from ..errors import UserError
from ..evaluate import classification_metrics, predict
from ..loggers import Trackers, parse_loggers
from ..fileio import (disk_full_names, dumps, file_digest, finite, remove_temporaries, write_bytes, write_json,
                      write_text)
from ..lock import DirLock
from ..modelcard import model_card
from ..models import (bare, count_parameters, load_weights, preprocessing_of, save_checkpoint, to_device,
                      weights_file)
from ..models.user import code_sha256
from ..progress import Progress, fmt_percent, fmt_seconds, log
from .attention import FeatureHook, StopForward
from .augment import crop_flip, resized_crop_flip, resolve_augment
from .parallel import Dist, rank_seed, sync_batchnorm
from .parts import PLAIN, Batch, Step, method_label, parse_method
from .parts import config_fields as part_config_fields
from .parts.provenance import method_code, provenance
from .stream import Prefetcher, Rows
from .stream import choose as choose_stream
from .speed import amp_dtype, autocast, cudnn_autotune, lr_lambda, make_optimizer, maybe_compile


def twice_differentiable(on: bool):
    """Where a part differentiates a gradient of the student (``explain``): its attention
    (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) by the math kernel, whose
    ops have second derivatives; the fused flash and memory-efficient kernels have none
    ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented" at a ViT student's first step)."""
    if not on:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


CHECK_EVERY = 20  # steps between finite-loss checks (one tiny all-reduce under DDP)
# keys of the records a run writes beside the parts' terms (a metrics.jsonl row, a tracker's
# step row, the epoch's stats): a term of one of these names overwrote them ('epoch': 2.48)
RESERVED_TERMS = ("loss", "ce", "epoch", "step", "lr", "seconds", "images_per_s", "val_accuracy")


def _same_start(record, init) -> bool:
    """Whether ``init``, a resumed run's ``--init`` now, is a file with the weights the run
    started from (``record``: last.pt's record of that copy, with their sha256). Its path is
    no part of the result: an experiment finds its runs by the file's sha256, and a run found
    after the file moved was then refused for the path it was recorded with."""
    if not (init_file(init) and isinstance(record, dict) and isinstance(record.get("sha256"), str)):
        return False
    path = weights_file(init)
    return path.is_file() and file_digest(path, "sha256") == record["sha256"]


RESUME_FREE = ("epochs", "threads", "stream", "compile", "verify_store", "log", "log_every")  # options a resumed run may change
# what a last.pt written by Trainer.state always holds
RESUME_KEYS = {"model", "optimizer", "scheduler", "epoch", "best", "history", "torch_rng", "config"}


# what a run writes into its --out (and an experiment beside it): a folder holding anything
# else is the user's, and a run would overwrite their config.yaml or README.md in it
PENDING = "model-pending"  # a new best epoch's checkpoint until last.pt names it (Trainer.settle_best)
RUN_FILES = {"config.yaml", "metrics.jsonl", "last.pt", "summary.json", "model.safetensors", "model.json",
             "README.md", "log", "run.json", "corruptions.json", f"{PENDING}.safetensors", f"{PENDING}.json",
             # what igkd's readers write into a run folder (report; export --report-dir, bench latency
             # --out, audit --out): a run looked at before --resume was refused as the user's folder
             "report.md", "tables", "export.json", "latency.json", "audit.json",
             *(f"{name}.{fmt}" for name in ("curves", "audit") for fmt in ("png", "pdf", "svg"))}


RUN_LOCK_ADVICE = "wait for it to finish or choose another --out"


def refuse_busy_run_dir(out: Path) -> None:
    """Refuse an --out another run is writing now, naming it, before any work: ``Trainer.fit``
    takes the lock only after the data, the teacher and the precompute (minutes of work, then
    refused), and :func:`check_run_dir` meanwhile took that run's last.pt for a run to be
    resumed ("already holds a run; pass --resume")."""
    DirLock(out, "run directory", RUN_LOCK_ADVICE).refuse_if_held()


def check_run_dir(out: Path, resume: bool) -> None:
    """Refuse an --out a run cannot use, before any work (``api.train``/``api.distill`` call it
    ahead of the data and the precompute, ``Trainer.fit`` again under the lock): a finished
    or started run without --resume, a finished one with it, or a folder of the user's."""
    out = Path(out)
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # hidden: locks, temporaries
    if not names:
        return
    # a run's own state, or the two files every run writes first (a README.md and config.yaml
    # alone are as likely the user's)
    started = any((out / n).exists() for n in ("last.pt", "summary.json", "run.json")) or \
        ((out / "config.yaml").exists() and (out / "metrics.jsonl").exists())
    if not started or not set(names) <= RUN_FILES:
        foreign = [n for n in names if n not in RUN_FILES] or names
        raise UserError(f"--out {out} holds files that are not an igkd run's ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}); a run writes config.yaml, README.md, model.* and "
                        "more there: choose a new or empty folder")
    if resume and not (out / "last.pt").exists() and (out / "summary.json").exists():
        raise UserError(f"run {out} has finished (summary.json) and has no last.pt to resume from; "
                        "choose another --out for a new run")
    if not resume and ((out / "summary.json").exists() or (out / "last.pt").exists()):
        raise UserError(f"run directory {out} already holds a run; pass --resume (resume=True in Python) to "
                        "continue it or choose another --out")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class UpsampledMaps:
    """Maps stored smaller than their images (``--map-size``), read by sample index at the
    image size: only the batch's maps are upsampled, on the training device."""

    def __init__(self, maps: torch.Tensor, size: tuple[int, int]):
        self.stored, self.size = maps, size

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.stored), *self.size)

    def __getitem__(self, idx) -> torch.Tensor:
        from ..precompute import upsample_maps
        return upsample_maps(self.stored[idx], self.size)


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def refuse_world() -> None:
    """One line under torchrun for what trains in one process (``igkd train``, a Trainer made
    without ``dist``): N copies would write one run directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("under torchrun only 'igkd distill' trains with several processes; run this in one")


def _loadable(name: str, saved: dict) -> dict:
    """A part's state as :meth:`Part.state_dict` returned it, checked to load as a resume reads
    last.pt (``weights_only=True``): a plug-in part keeping a NumPy number or an object of its
    own wrote a last.pt that every resume then called damaged, found out only when resuming."""
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(buf, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler refuses
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        # torch's message opens with advice to unpickle anyway; the line naming the type says what
        first = next((ln for ln in lines if "Unsupported global" in ln), lines[0])[:160]
        raise UserError(f"method part '{name}' keeps a state a resume cannot read ({first}); its state_dict must "
                        "return tensors and plain values (numbers, strings, lists, dicts), e.g. float() of a "
                        "NumPy number") from None
    return saved


def _shown(x) -> str:
    """A part's returned object in a few words, for the one-line errors of Trainer._first_terms."""
    if torch.is_tensor(x):
        shape = "a 0-d tensor" if x.dim() == 0 else f"a tensor of shape {tuple(x.shape)}"
        return f"{shape} ({str(x.dtype).replace('torch.', '')})"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"a Python {type(x).__name__} ({x:.4g})"
    if isinstance(x, (tuple, list)):
        more = ", ..." if len(x) > 3 else ""
        return f"a {type(x).__name__} of {len(x)}: " + ", ".join(_shown(v) for v in x[:3]) + more
    return "None" if x is None else f"a {type(x).__name__}"


class Trainer:
    """Trains ``model`` on ``dataset`` as ``cfg`` says; see the module docstring.

    ``dist`` (from :func:`igkd.distill.parallel.init`) says which rank of how many this
    process is; ``cfg.batch_size`` is per rank, the global batch batch_size x world.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module, dataset: Dataset, out_dir: str | Path,
                 device: torch.device, teacher: nn.Module | None = None, store=None, meta: dict | None = None,
                 quiet: bool = False, dist: Dist | None = None):
        # resolved here, so config.yaml and a resume see the choice; a resume refused over it says so
        self.auto_augment = getattr(cfg, "augment", None) == "auto"
        if self.auto_augment:
            cfg = replace(cfg, augment=resolve_augment(cfg.augment, dataset.image_size))
        self.cfg, self.dataset, self.device, self.quiet = cfg, dataset, device, quiet
        if dist is None:
            refuse_world()
        self.dist = dist or Dist(device=device)
        self.rank, self.world = self.dist.rank, self.dist.world
        self.out = Path(out_dir)
        parse_loggers(cfg.log)  # an unknown tracker or a missing package: refused before anything is written
        self.trackers = Trackers()  # fit() starts the real ones (rank 0)
        self.meta = dict(meta or {})
        self.method = parse_method(cfg.method) if hasattr(cfg, "method") else PLAIN  # a teacher's TrainConfig
        second = [p.name for p in self.method.parts if p.double_backward]
        self.double_backward = bool(second)
        if second and getattr(cfg, "compile", False):  # any such part, a plug-in's too: one line, not a step's traceback
            raise UserError(f"method part '{second[0]}' differentiates gradients of the student, which torch.compile "
                            f"does not support (no double backward); drop --compile or use a method without "
                            f"'{second[0]}'")
        self.model = model.to(device)
        self.sync_bn = self.dist.active and getattr(cfg, "sync_bn", True)
        if self.sync_bn:
            sync_batchnorm(self.model, device, any(p.double_backward for p in self.method.parts))
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        train = dataset.train
        m = self.method
        maps_src = store.maps if m.needs_maps else None
        logits_src = store.logits if m.needs_logits and cfg.logits == "precomputed" and not m.online_teacher else None
        extra = sum(a.nbytes for a in (maps_src, logits_src) if a is not None)
        self.streaming, self.stream_reason = choose_stream(getattr(cfg, "stream", "off"), train.images,
                                                           train.mapped is not None, extra, device)
        # streaming: images, maps and logits stay in host memory (or its memory maps) and each
        # batch's rows are gathered ahead on a thread (distill/stream.py); else all on the device
        self.images = train.images if self.streaming else train.images.to(device)
        self.labels = train.labels.to(device)
        # --subset first, then the validation split inside it; both are sample indices of the
        # whole training split, so maps and logits stored by index stay aligned
        pool = subset_indices(train.labels, getattr(cfg, "subset", 1.0), getattr(cfg, "subset_seed", 0))
        keep, held = stratified_split(train.labels[pool], cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 \
            else (torch.arange(len(pool)), torch.empty(0, dtype=torch.long))
        self.train_idx, self.val_idx = pool[keep].to(device), pool[held]
        self.teacher = to_device(teacher, device).eval() if teacher is not None else None
        if self.teacher is not None and cfg.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.maps = self.logits = None
        if maps_src is not None:
            self.maps = Rows(maps_src, device) if self.streaming else torch.from_numpy(np.array(maps_src)).to(device)
            if tuple(self.maps.shape[-2:]) != tuple(train.images.shape[-2:]):  # stored at --map-size
                self.maps = UpsampledMaps(self.maps, tuple(train.images.shape[-2:]))
        if logits_src is not None:
            self.logits = Rows(logits_src, device) if self.streaming else torch.from_numpy(np.array(logits_src)).to(device)
        self.aligned_maps = any(p.aligned_maps for p in m.parts)
        self.teacher_hooks: list[FeatureHook] = []
        self.student_hooks: list[FeatureHook] = []
        self.input_grad = False  # a part's setup sets it when its loss differentiates the input
        self.current_epoch = 0
        self.meta.update({name: getattr(cfg, name) for name in sorted(m.fields)})  # the parts' options
        plugins = {p.name: rec for p in m.parts if (rec := provenance(p)) is not None}
        if plugins:  # which code a plug-in part was: summary.json, model.json
            self.meta["part_code"] = plugins
        self.parts = [(part, part.setup(self)) for part in m.parts]
        n = len(self.train_idx)
        self.batch = min(cfg.batch_size, n // self.world)
        if self.batch < 1:
            raise UserError(f"the training split has {n} images, fewer than the {self.world} processes")
        if self.batch == 1:
            refuse_lone_values(self.model, (dataset.channels, *dataset.image_size), device)
        self.steps_per_epoch = max(1, n // (self.batch * self.world))
        self.lr = cfg.lr * (self.world if getattr(cfg, "scale_lr", False) else 1)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params, self.lr, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, self.steps_per_epoch))
        self.amp = amp_dtype(getattr(cfg, "amp", "off"), device)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        net = self.model
        if self.dist.active:
            # with sync-bn the buffers agree on every rank: no broadcast before each forward (torch
            # 2.13 renamed the option and warns about the old name on every rank)
            ddp = nn.parallel.DistributedDataParallel
            sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters \
                else "broadcast_buffers"
            net = ddp(net, device_ids=[device.index] if device.type == "cuda" else None, **{sync: not self.sync_bn})
        self.train_model = maybe_compile(net, getattr(cfg, "compile", False))
        self.epoch = 0
        self.best = {"val_accuracy": -1.0, "epoch": 0}
        # training time of the sessions before a --resume (last.pt keeps it) and this one's start:
        # summary.json's train_seconds was the last session's alone
        self.seconds_before, self.started = 0.0, None

    def hook_teacher(self, name: str) -> FeatureHook:
        """A forward hook keeping the output of the teacher's layer ``name`` (for a part's setup)."""
        hook = FeatureHook(self.teacher, name, "teacher")
        self.teacher_hooks.append(hook)
        return hook

    def hook_student(self, name: str) -> FeatureHook:
        hook = FeatureHook(self.model, name, "student")
        self.student_hooks.append(hook)
        return hook

    def part_state(self, name: str):
        """The state the part ``name`` of this run's method keeps (its setup's result)."""
        return next(state for part, state in self.parts if part.name == name)

    def _stage(self, stage: str):
        return [(part, state) for part, state in self.parts if part.stage == stage]

    # ---------------------------------------------------------------- batches
    def batches(self, epoch: int):
        """The :class:`~igkd.distill.parts.Batch` of each step of ``epoch`` (it unpacks as
        ``idx, x, y``): this rank's slice of each global batch (the whole batch in a single
        process). Random draws, in order: the permutation, the overlay stage's, crop and
        flip, the mix stage's; all from one generator seeded by (seed, epoch)."""
        cfg, bs, shard = self.cfg, self.batch, (self.rank, self.world)
        gen = torch.Generator(device=self.device).manual_seed(epoch_seed(cfg.seed, epoch))
        order = self.train_idx[torch.randperm(len(self.train_idx), generator=gen, device=self.device)]
        overlay, mix = self._stage("overlay"), self._stage("mix")
        steps = [order[(s * self.world + self.rank) * bs:][:bs] for s in range(self.steps_per_epoch)]
        for idx, (images, labels) in zip(steps, self._rows(steps)):
            b = Batch(idx, images.float().div_(255), labels)
            for part, state in overlay:
                b = part.transform(state, b, gen, shard)
            if self.aligned_maps:  # the maps take their images' crop and flip as one more channel
                both = self._crop_flip(torch.cat([b.x, self.maps[idx].float()[:, None]], 1), gen, shard)
                b.x, b.maps = both[:, :-1], both[:, -1]
            else:
                b.x = self._crop_flip(b.x, gen, shard)
            for part, state in mix:
                b = part.transform(state, b, gen, shard)
            if cfg.channels_last:
                b.x = b.x.contiguous(memory_format=torch.channels_last)
            yield b

    def _rows(self, steps: list[torch.Tensor]):
        """Images and labels of each step's sample indices, in order. Streaming: gathered on
        the prefetch thread with the maps and logits of the same rows, which are handed to
        their lookups (:class:`~igkd.distill.stream.Rows`) for the step."""
        if not self.streaming:
            for idx in steps:
                yield self.images[idx], self.labels[idx]
            return
        # one device-to-host copy of the epoch's indices, not one per step
        host = [i.numpy() for i in torch.cat(steps).cpu().split([len(i) for i in steps])] if steps else []
        maps = self.maps.stored if isinstance(self.maps, UpsampledMaps) else self.maps
        sources = {"images": self.images, "labels": self.dataset.train.labels}
        if maps is not None:
            sources["maps"] = maps.source
        if self.logits is not None:
            sources["logits"] = self.logits.source
        for idx, got in zip(steps, Prefetcher(sources, self.device).batches(host)):
            if maps is not None:
                maps.ready(idx, got["maps"])
            if self.logits is not None:
                self.logits.ready(idx, got["logits"])
            yield got["images"], got["labels"]

    def _augment_words(self) -> str:
        cfg = self.cfg
        crop = "random resized crops" if cfg.augment == "random-resized-crop" else \
            f"pad-crop {cfg.crop_padding}" if cfg.crop_padding else "no crop"
        return crop + (" + flip" if cfg.flip else "")

    def _crop_flip(self, x: torch.Tensor, gen: torch.Generator, shard) -> torch.Tensor:
        cfg = self.cfg
        if cfg.augment == "random-resized-crop":
            return resized_crop_flip(x, (cfg.rrc_scale_min, cfg.rrc_scale_max), (cfg.rrc_ratio_min, cfg.rrc_ratio_max),
                                     cfg.flip, gen, shard)
        return crop_flip(x, cfg.crop_padding, cfg.flip, gen, shard)

    # ---------------------------------------------------------------- step
    def teacher_outputs(self, batch: Batch) -> torch.Tensor | None:
        """The teacher's logits for the batch when a part needs them: precomputed by sample
        index, or online on ``batch.x``. The teacher also runs (eval mode, no gradients) when
        a part hooks one of its layers; with one hook and no online logits it stops there."""
        need = self.method.needs_logits
        logits = self.logits[batch.idx] if need and self.logits is not None and not batch.mixed else None
        online = need and logits is None
        hooks = self.teacher_hooks
        if not (online or hooks):
            return logits
        if hooks:  # with no logits to compute, the teacher's one hooked layer ends its forward
            hooks[0].stop = not online and len(hooks) == 1
        with torch.no_grad():
            try:
                out = self.teacher(batch.x.detach())
            except StopForward:
                out = None
            finally:
                if hooks:  # never leave a stopping hook on the caller's teacher
                    hooks[0].stop = False
        return out.float() if online else logits

    def teacher_logits(self, idx: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
        return self.teacher_outputs(Batch(idx, x, None))

    # each part's term names, in order, as its first step returned them (checked then; later
    # steps are compared with them), and the part that owns each term (for the errors)
    _part_terms: list | None = None
    _term_owner: dict | None = None

    def _first_terms(self, part, returned, owner: dict) -> None:
        """Check what ``part.loss`` returned at the run's first step against the contract
        (``{name: (weight, value)}``, value a 0-d tensor): a mistake there gave a raw traceback
        from deep in torch ("grad can be implicitly created only for scalar outputs"), and a
        term named like a record's key (``epoch``, ``loss``) or another part's term overwrote
        it in metrics.jsonl while the loss was summed right. One line naming the part and the
        term, before the step's backward and before anything is saved. ``owner``: term name ->
        the part that returned it so far, filled in here."""
        said = f"method part '{part.name}'"
        expect = "expected {name: (weight, value)}, the value a 0-d tensor computed from the student, e.g. " \
                 "{'mine': (1.0, step.logits.pow(2).mean())}"
        if not isinstance(returned, dict):
            raise UserError(f"{said}'s loss returned {_shown(returned)}; {expect}")
        for name, item in returned.items():
            term = f"term {name!r} of {said}"
            instead = part.name if part.name not in owner and part.name not in RESERVED_TERMS else f"{part.name}_{name}"
            if not isinstance(name, str) or not name:
                raise UserError(f"{said}'s loss returned a term named {name!r}; term names are non-empty strings")
            if name in RESERVED_TERMS or name.startswith("val_"):
                used = ", ".join(n for n in RESERVED_TERMS if not n.startswith("val_"))
                raise UserError(f"{term} takes a name the run's records use ({used}, val_*); name it after the "
                                f"part, e.g. '{instead}'")
            if name in owner:
                raise UserError(f"{term} has the name of a term of method part '{owner[name]}'; each term is logged "
                                f"under its name, so name it after the part, e.g. '{instead}'")
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise UserError(f"{term} is {_shown(item)}, not a pair (weight, value); {expect}")
            w, value = item
            number = isinstance(w, (int, float, np.integer, np.floating)) or (torch.is_tensor(w) and w.numel() == 1)
            if isinstance(w, bool) or not number:
                raise UserError(f"{term} has weight {_shown(w)}; a weight is a number (the value is {_shown(value)})")
            if not torch.is_tensor(value):
                raise UserError(f"{term} has value {_shown(value)}, not a tensor: a Python number carries no gradient "
                                f"and trains nothing; {expect}")
            if value.dim() != 0 or not value.is_floating_point():
                raise UserError(f"{term} has value {_shown(value)}; it must be one number, a 0-d floating tensor "
                                "(reduce a per-sample loss over the batch, e.g. .mean())")
            owner[name] = part.name
            if w != 0 and not value.requires_grad:
                # a .detach() or a value from the teacher alone: the term is logged and moves nothing
                log(f"igkd: warning: {term} carries no gradient (it does not depend on the student's "
                    "parameters), so it is logged but trains nothing; compute it from step.logits (or a "
                    "hooked student layer) without .detach()")

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """One optimisation step on a batch; returns the loss and its terms (detached)."""
        cfg = self.cfg
        if self.input_grad:
            batch.x.requires_grad_(True)
        with autocast(self.amp, self.device):
            t_logits = self.teacher_outputs(batch)
            with twice_differentiable(self.double_backward):
                out = self.train_model(batch.x)
        target = batch.target if batch.target is not None else batch.y
        ce = F.cross_entropy(out.float(), target, label_smoothing=cfg.label_smoothing)
        weight = 1.0
        for part, _ in self.parts:
            weight *= part.ce_weight(cfg)
        loss, terms = (ce if weight == 1.0 else weight * ce), {"ce": ce.detach()}
        step = Step(cfg, self.current_epoch, batch, out, t_logits)
        first = self._part_terms is None
        seen: list = []
        owner = {"ce": "the cross-entropy"}
        for i, (part, state) in enumerate(self.parts):
            returned = part.loss(state, step)
            if first:
                self._first_terms(part, returned, owner)
                seen.append(tuple(returned))
            elif not isinstance(returned, dict) or tuple(returned) != self._part_terms[i]:
                # the epoch's sums are kept by position: another set of names mislabelled or broke them
                got = (", ".join(map(str, returned)) or "none") if isinstance(returned, dict) else _shown(returned)
                raise UserError(f"method part '{part.name}' returned terms {got} "
                                f"at this step and {', '.join(self._part_terms[i]) or 'none'} at the first; a part "
                                "returns the same terms every step (a weight of 0 leaves one out)")
            for name, (w, value) in returned.items():
                loss = loss + w * value
                terms[name] = value.detach()
        if first:  # kept once every part's terms passed: a step that raised checks again
            self._part_terms, self._term_owner = seen, owner
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), terms

    # ---------------------------------------------------------------- epochs
    def train_epoch(self, epoch: int) -> dict:
        """Mean loss parts over the epoch's global batches, images/s (all ranks) and seconds.

        Loss sums stay on the device (no per-step sync on GPUs) and are checked every
        CHECK_EVERY steps, summed over ranks so that all ranks stop together."""
        cfg = self.cfg
        self.train_model.train()
        self.current_epoch = epoch
        acc, names, seen, first_bad = None, [], 0, None
        # losses are synced every CHECK_EVERY steps; with trackers also every log_every steps
        # (decided by the config, not by rank, so that every rank joins each all-reduce)
        every = min(CHECK_EVERY, cfg.log_every) if cfg.log else CHECK_EVERY
        logged = (0, None)  # (images seen, summed losses) at the last logged step
        start = time.perf_counter()
        with Progress(self.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", "step",
                      quiet=self.quiet or not _is_tty()) as bar:
            for s, batch in enumerate(self.batches(epoch)):
                loss, terms = self.train_step(batch)
                names = ["loss", *terms]
                vals = torch.stack([loss.float(), *(v.float() for v in terms.values())]) * len(batch.idx)
                acc = vals if acc is None else acc + vals
                # which values were not finite at the first step where any was, kept on the device
                # (no sync): after it the weights are NaN and every term is, so the window's sums
                # alone could not name the term that started it
                bad = ~torch.isfinite(vals)
                first_bad = bad if first_bad is None else torch.where(first_bad.any(), first_bad, bad)
                seen += len(batch.idx)
                extra = ""
                if (s + 1) % every == 0 or s + 1 == self.steps_per_epoch:
                    total = self._checked(acc, epoch, names, first_bad)
                    extra = f"loss {total[0] / (seen * self.world):.3f}"
                    if self.trackers:
                        n0, t0 = logged
                        part = [a - b for a, b in zip(total, t0 or [0.0] * len(total))]
                        count = (seen - n0) * self.world
                        self.trackers.step({"step": (epoch - 1) * self.steps_per_epoch + s + 1, "epoch": epoch,
                                            **{k: v / count for k, v in zip(names, part)},
                                            "lr": self.scheduler.get_last_lr()[0]})
                        logged = (seen, total)
                bar.update(1, extra=extra)
        dt = time.perf_counter() - start
        seen *= self.world
        return {**{k: float(v) / max(1, seen) for k, v in zip(names, total)}, "images_per_s": seen / dt,
                "seconds": dt}

    @staticmethod
    def _term_names(stats: dict) -> list[str]:
        """The loss terms of an epoch's stats worth printing (none when CE is all there is)."""
        terms = [k for k in stats if k not in ("loss", "images_per_s", "seconds")]
        return terms if len(terms) > 1 else []

    def close(self) -> None:
        """Remove the parts' hooks: the caller's teacher and student come back unhooked."""
        for part, state in self.parts:
            part.close(state)
        for hook in self.teacher_hooks + self.student_hooks:
            hook.remove()
        self.teacher_hooks, self.student_hooks = [], []

    def _checked(self, acc: torch.Tensor, epoch: int, names: list | None = None,
                 first_bad: torch.Tensor | None = None) -> list[float]:
        """The epoch's sums so far over all ranks; TrainingDiverged when one is not finite, naming
        the terms that were not at the first such step (``first_bad``, this rank's, by ``names``)."""
        total = self.dist.all_reduce(acc.clone()).tolist()
        if not all(np.isfinite(total)):
            which = ""
            if names and first_bad is not None:
                owner = self._term_owner or {}
                bad = [n for n, b in zip(names[1:], first_bad.tolist()[1:]) if b]
                if bad:
                    which = "; not finite first: " + ", ".join(
                        "the cross-entropy" if n == "ce" else f"term {n!r} of method part '{owner.get(n, '?')}'"
                        for n in bad)
            # what works next: --resume replays the same steps into the same NaN and refuses another
            # --lr, and before epoch 1 ended there is no last.pt to name
            if self.epoch == 0:
                raise TrainingDiverged(f"loss became {total[0]} at epoch {epoch}, before any checkpoint; "
                                       f"lower --lr and run again, or check the data{which}")
            raise TrainingDiverged(
                f"loss became {total[0]} at epoch {epoch}; the last good checkpoint is "
                f"{self.out / 'last.pt'} (epoch {self.epoch}), but --resume would repeat the same steps: "
                f"lower --lr and train into a new --out, or check the data{which}")
        return total

    def evaluate(self, indices: torch.Tensor | None = None, split: str = "val") -> dict:
        data = self.dataset.train if split == "val" else self.dataset.test
        # validation rows are gathered batch by batch (a memory-mapped split is never copied whole)
        images = data.images if indices is None else RowView(data.images, indices)
        labels = data.labels if indices is None else data.labels[indices]
        logits = predict(self.model, images, self.cfg.eval_batch_size, self.device, self.cfg.channels_last)
        return classification_metrics(logits, labels, self.dataset.classes)

    def val_accuracy(self) -> float:
        """Accuracy on the validation split, each rank scoring its share with rank 0's
        BatchNorm statistics: without --sync-bn each rank's drifted with its own last batches,
        and the accuracy was of a model no file holds (rank 0's is the one saved)."""
        if not len(self.val_idx):
            return float("nan")
        if not self.sync_bn:
            self.dist.broadcast_buffers(bare(self.model))
        mine = self.val_idx[self.rank::self.world]
        m = self.evaluate(mine) if len(mine) else {"correct": 0, "total": 0}
        counts = self.dist.all_reduce(torch.tensor([m["correct"], m["total"]], dtype=torch.float64,
                                                   device=self.device)).tolist()
        return 100.0 * counts[0] / counts[1]

    # ---------------------------------------------------------------- state
    def rng_states(self) -> dict:
        """Every rank's random number states, gathered (a collective: all ranks call it). Each
        rank draws its own dropout masks (:func:`~.parallel.rank_seed`), so each resumes its own."""
        states = {"torch_rng_ranks": self.dist.all_gather_object(torch.get_rng_state())}
        if self.device.type == "cuda":  # dropout on a GPU draws from its own generator, not the CPU's
            states["cuda_rng_ranks"] = self.dist.all_gather_object(torch.cuda.get_rng_state(self.device).cpu())
        return states

    def state(self, history: list, rngs: dict | None = None) -> dict:
        rngs = rngs if rngs is not None else self.rng_states()
        state = {"model": bare(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "best": self.best,
                 "history": history, "torch_rng": rngs["torch_rng_ranks"][0], "config": to_dict(self.cfg),
                 "world_size": self.world, "train_seconds": self.train_seconds(), **rngs}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if "init" in self.meta:  # a resume does not read the --init file again (it may be gone)
            state["init"] = self.meta["init"]
        teacher = self.meta.get("teacher") or {}
        if teacher.get("fingerprint"):  # the teacher by its weights and program, not its path
            state["teacher_fingerprint"] = teacher["fingerprint"]
        if teacher.get("identity"):
            state["teacher_identity"] = teacher["identity"]
        state["part_code"] = method_code(self.method)  # compared on resume: the loss's code is the run's
        state["model_code"] = code_sha256(self.cfg.model)  # and a py: network's source
        kept = {part.name: part.state_dict(st) for part, st in self.parts}
        if any(kept.values()):
            state["parts"] = {name: _loadable(name, d) for name, d in kept.items() if d}
        if "cuda_rng_ranks" in rngs:
            state["cuda_rng"] = rngs["cuda_rng_ranks"][0]
        return state

    def recorded_config(self) -> dict:
        """The run's options as config.yaml records them: without the options of installed parts
        the method does not have, which changed nothing, yet were written into every run, so
        that config.yaml (--config) and --resume failed once that plug-in was uninstalled."""
        others = set(part_config_fields()) - set(self.method.fields)
        return {k: v for k, v in to_dict(self.cfg).items() if k not in others}

    def train_seconds(self) -> float:
        """Seconds this run has trained, over all its sessions so far."""
        return self.seconds_before + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def save_state(self, history: list, rngs: dict | None = None) -> None:
        buf = io.BytesIO()  # serialised in memory: torch.save turns a full disk into an opaque RuntimeError
        torch.save(self.state(history, rngs), buf)
        write_bytes(self.out / "last.pt", buf.getbuffer())

    def load_state(self) -> list:
        path = self.out / "last.pt"
        try:
            with warnings.catch_warnings():  # torch warns about foreign pickle protocols: the error says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)  # no code runs from the file
            if not isinstance(state, dict) or not RESUME_KEYS <= state.keys():
                raise ValueError("not a state igkd wrote")
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file, whatever torch raises
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise UserError(f"cannot resume {self.out}: {path} is damaged or not igkd's ({first}); restore it, or "
                            "delete it to start the run over") from None
        defaults = recorded_defaults(type(self.cfg))  # options added since the run started, as it ran
        saved = {k: v for k, v in {**defaults, **state["config"]}.items() if k not in RESUME_FREE}
        now = {k: v for k, v in self.recorded_config().items() if k not in RESUME_FREE}
        others = set(part_config_fields()) - set(now)  # options of installed parts not in the method
        saved = {k: v for k, v in saved.items() if k not in others}
        if state.get("model_code") and saved.get("model") == now.get("model") \
                and state["model_code"] != code_sha256(self.cfg.model):  # (another spec: the config says so)
            raise UserError(f"cannot resume {self.out}: the source of --model {self.cfg.model} changed since the run "
                            "started (its file's sha256); resume with that file as it was, or start a new --out "
                            "directory")
        code, then = method_code(self.method), state.get("part_code")
        if then is not None and then != code:  # (None: written before the code was kept)
            changed = sorted(n for n in {*code, *then} if code.get(n) != then.get(n))
            raise UserError(f"cannot resume {self.out}: the code of method part(s) {', '.join(changed)} changed since "
                            "the run started (its module's sha256, or the version it declares); resume with that "
                            "code, or start a new --out directory")
        if saved.get("init") != now.get("init") and _same_start(state.get("init"), now.get("init")):
            saved["init"] = now["init"]  # the weights file moved or named otherwise: the same start
        teacher = self.meta.get("teacher") or {}
        # the same teacher at another path (a moved project folder): known by resume_identity, as
        # the weights fingerprint alone is one value for every frozen TorchScript teacher (an
        # empty state dict) and took any other such teacher for the run's
        if saved.get("teacher") != now.get("teacher") and teacher.get("identity") \
                and state.get("teacher_identity") == teacher["identity"]:
            saved["teacher"] = now["teacher"]
        if saved.get("teacher") == now.get("teacher") and teacher.get("fingerprint") \
                and state.get("teacher_fingerprint") not in (None, teacher["fingerprint"]):
            # a teacher trained again into the same file (or another module handed in): the run
            # would go on learning from another network (the stable weights fingerprint, so that
            # a TorchScript program text another torch prints differently is not refused)
            where = f"--teacher {now['teacher']}" if now.get("teacher") else "the teacher module"
            raise UserError(f"cannot resume {self.out}: {where} has other weights than the teacher the run "
                            "started with (its weights are compared, not its path); resume with that teacher "
                            "or start a new --out directory")
        if saved != now:
            # an option the run has and this igkd no longer knows counts too (the list was empty)
            diff = sorted(k for k in {*saved, *now} if k not in saved or k not in now or saved[k] != now[k])

            def value(d: dict, k: str) -> str:
                return repr(d[k]) if k in d else "not an option"
            said = ", ".join(f"{k} ({value(saved, k)} in the run, {value(now, k)} now)" for k in diff[:4])
            said += ", ..." if len(diff) > 4 else ""
            how = "the same options"
            if "augment" in diff and self.auto_augment and isinstance(saved.get("augment"), str):
                # the options typed may be the very ones the run started with: it was recorded
                # before auto (pad-crop for every size), and auto takes random boxes at this size
                h, w = self.dataset.image_size
                how += (f" (--augment {saved['augment']}: the default, --augment auto, takes "
                        f"{now['augment']} for these {h}x{w} images)")
            if "teacher" in diff and "teacher_identity" in state:
                how += " (or the run's teacher at another path: its weights are compared, not its path)"
            if "init" in diff and init_file(saved.get("init")):
                # the file is not read again (it may be gone): the run's own --init always resumes
                how += (f" (--init {saved['init']}: the run started from its weights, which last.pt holds now; "
                        "the file need not be there, and a copy of it at another path is taken too)")
            raise UserError(f"cannot resume {self.out}: its config differs in {said}; "
                            f"resume with {how} or start a new --out directory")
        if state["epoch"] > self.cfg.epochs:  # the summary said N epochs of a model trained longer
            raise UserError(f"cannot resume {self.out}: it has finished {state['epoch']} epochs, more than "
                            f"--epochs {self.cfg.epochs}; resume with --epochs {state['epoch']} or more")
        if state.get("world_size", 1) != self.world:
            raise UserError(f"cannot resume {self.out}: it ran with {state.get('world_size', 1)} process(es), "
                            f"this run has {self.world} (the global batch would change); resume with "
                            f"--nproc_per_node={state.get('world_size', 1)}")
        try:
            bare(self.model).load_state_dict(state["model"])
        except RuntimeError as e:  # another architecture under the same spec: a traceback before
            first = str(e).strip().splitlines()[0][:160]
            raise UserError(f"cannot resume {self.out}: its weights do not fit the model --model {self.cfg.model} "
                            f"builds now ({first}); was its code edited? resume with the code it started with, or "
                            "start a new --out directory") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the rate of the next step from this run's schedule: LambdaLR's load_state_dict keeps the
        # optimizer's saved rate, which is another schedule's when --epochs was extended (the
        # first resumed step ran at the old schedule's last rate, 0 after its decay); the same
        # product as the scheduler computes, so an unchanged schedule resumes bitwise
        for group, base, rate in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * rate(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        for part, st in self.parts:
            part.load_state_dict(st, state.get("parts", {}).get(part.name, {}))
        if "init" in state:
            self.meta["init"] = state["init"]
        self.epoch, self.best = state["epoch"], state["best"]
        self.seconds_before = float(state.get("train_seconds", 0.0))
        ranks = state.get("torch_rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            torch.set_rng_state(ranks[self.rank])
        else:  # written before each rank's state was kept: rank 0's, and a fresh seed elsewhere
            torch.set_rng_state(state["torch_rng"])
            if self.rank:
                torch.manual_seed(rank_seed(self.cfg.seed + self.epoch, self.rank))
        if self.device.type == "cuda":
            cuda = state.get("cuda_rng_ranks")
            if cuda is not None and len(cuda) == self.world:
                torch.cuda.set_rng_state(cuda[self.rank], self.device)
            elif "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        return state["history"]

    def model_meta(self) -> dict:
        pre = preprocessing_of(self.model)
        return {"model": self.cfg.model, "num_classes": len(self.dataset.classes),
                "in_channels": self.dataset.channels, "classes": self.dataset.classes,
                "image_size": list(self.dataset.image_size), "preprocessing": pre,
                "input": "RGB or grayscale float in [0, 1], NCHW", "dataset": self.dataset.spec,
                "dataset_fingerprint": self.dataset.fingerprint("train"), **self.meta}

    # ---------------------------------------------------------------- fit
    def fit(self, resume: bool = False) -> dict:
        """Train (or resume) and finish the run. Rank 0, the only writer, holds the run
        directory's lock (:mod:`igkd.lock`) throughout: a second run into the same --out is
        refused with one line naming this one, on every rank of its group."""
        lock, refused = None, None
        if self.rank == 0:
            try:
                lock = DirLock(self.out, "run directory", RUN_LOCK_ADVICE).acquire()
                # judged here by rank 0 alone: another rank looking while rank 0 writes config.yaml
                # (before metrics.jsonl) took the folder for the user's and failed on its own
                check_run_dir(self.out, resume)
            except UserError as e:
                refused = str(e)
                if lock is not None:
                    lock.release()
                    lock = None
        refused = self.dist.broadcast_object(refused)
        if refused:
            raise UserError(refused)
        if lock is not None:  # a killed run's half-written last.pt etc.; safe only under the lock
            remove_temporaries(self.out)
        try:
            with cudnn_autotune(self.device):  # fixed batch shapes: cuDNN's fastest algorithms
                return self._fit(resume)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume: bool) -> dict:
        cfg, rank0 = self.cfg, self.rank == 0
        history: list = []
        # rank 0 decides for all: a rank that looked for itself (a node whose --out is not rank 0's
        # folder) trained from epoch 1 beside ranks resumed after epoch N, and their collectives
        # no longer matched: the group hung until the default timeout (30 minutes on gloo)
        resuming = self.dist.broadcast_object(resume and (self.out / "last.pt").exists())
        if resuming and (self.out / "last.pt").exists():
            history = self.load_state()
            log(f"resuming {self.out} after epoch {self.epoch}", self.quiet)
        elif not resuming:
            torch.manual_seed(rank_seed(cfg.seed, self.rank))  # each rank its own dropout masks
        epochs = self.dist.all_gather_object(self.epoch)
        other = next((r for r, e in enumerate(epochs) if e != epochs[0]), None)
        if other is not None:
            raise UserError(f"cannot resume {self.out}: rank 0 resumes it after epoch {epochs[0]}, rank {other} after "
                            f"epoch {epochs[other]} (0: it sees no last.pt there); --out must be one folder that "
                            "every node sees")
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.settle_best()
            write_text(self.out / "config.yaml", yaml.safe_dump(self.recorded_config(), sort_keys=False))
            # the rows last.pt knows, then one appended line per epoch (tail -f works); a row
            # written after the last saved state is dropped here, so none is ever doubled
            write_text(self.out / "metrics.jsonl", "".join(dumps(r) + "\n" for r in history))
        self.trackers = Trackers(cfg.log, self.out, self.recorded_config(), self.epoch, active=rank0)
        params = count_parameters(bare(self.model))
        procs = f" x {self.world} processes = {self.batch * self.world}" if self.world > 1 else ""
        words = [w for w in (part.describe(state) for part, state in self.parts) if w]
        log(f"training {cfg.model} ({params:,} params) with {method_label(self.method.name)} on {self.dataset.spec}: "
            f"{len(self.train_idx)} train / {len(self.val_idx)} val images, {cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'}, "
            f"batch {self.batch}{procs}, {cfg.optimizer} lr {self.lr:g}, {self._augment_words()}, device {self.device}"
            + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else "")
            + "".join(f", {w}" for w in words)
            + (f"; streaming batches ({self.stream_reason})" if self.streaming else ""), self.quiet)
        start, first = time.perf_counter(), self.epoch
        self.started = start
        try:
            self._epochs(history, start, first)
        finally:
            self.close()
            self.trackers.close()
        return self.finish(history, self.train_seconds())

    def _epochs(self, history: list, start: float, first: int) -> None:
        cfg, rank0 = self.cfg, self.rank == 0
        while self.epoch < cfg.epochs:
            epoch = self.epoch + 1
            stats = self.train_epoch(epoch)
            val = self.val_accuracy()
            self.epoch = epoch
            improved = len(self.val_idx) == 0 or val > self.best["val_accuracy"]
            if improved:
                self.best = {"val_accuracy": val, "epoch": epoch}
                if rank0:  # model.* only once last.pt names this epoch the best (settle_best)
                    save_checkpoint(self.out / PENDING, self.model, {**self.model_meta(), "epoch": epoch})
            row = {"epoch": epoch, **stats, "val_accuracy": val, "lr": self.scheduler.get_last_lr()[0]}
            history.append(row)
            rngs = self.rng_states()
            if rank0:  # state first: a row is in metrics.jsonl only once last.pt holds it
                self.save_state(history, rngs)
                self.settle_best()
                with disk_full_names(self.out / "metrics.jsonl"), open(self.out / "metrics.jsonl", "a") as f:
                    f.write(dumps(row) + "\n")
                self.trackers.epoch(row)
            eta = (time.perf_counter() - start) / (epoch - first) * (cfg.epochs - epoch)
            log(f"epoch {epoch}/{cfg.epochs}: loss {stats['loss']:.4f}"
                + "".join(f", {k} {stats[k]:.4g}" for k in self._term_names(stats))
                + f", val {fmt_percent(val)}{' *' if improved else ''}, {stats['images_per_s']:.0f} img/s, "
                f"ETA {fmt_seconds(eta)}", self.quiet)

    def settle_best(self) -> None:
        """``model-pending.*`` (a new best epoch's checkpoint, written before last.pt) becomes
        ``model.*`` when last.pt names its epoch the best, and is dropped otherwise (a run killed
        between the two). Written straight to model.*, a kill there left weights of an epoch
        last.pt did not know: the resumed run reported its own best epoch with them."""
        weights = self.out / f"{PENDING}.safetensors"
        meta = self.out / f"{PENDING}.json"
        if not weights.exists():
            # a kill between the two renames below: model.safetensors is already the pending epoch's
            # and its metadata is still here. Dropped, model.json went on describing another epoch's
            # weights (its epoch and sha256, as igkd.load_model returns them) until the run finished
            if meta.exists() and self._pending_meta_fits(meta):
                os.replace(meta, self.out / "model.json")
            meta.unlink(missing_ok=True)
            return
        recorded = json.loads(meta.read_text()).get("epoch") if meta.exists() else None
        if recorded == self.best["epoch"] and self.best["epoch"] > 0:
            os.replace(weights, self.out / "model.safetensors")
            os.replace(meta, self.out / "model.json")
        else:
            weights.unlink()
            meta.unlink(missing_ok=True)

    def _pending_meta_fits(self, meta: Path) -> bool:
        """Whether ``meta`` (a model-pending.json left alone) describes the best epoch last.pt
        names and the very bytes of model.safetensors (its sha256), i.e. only its rename is missing."""
        try:
            recorded = json.loads(meta.read_text())
        except (OSError, ValueError):
            return False
        target = self.out / "model.safetensors"
        return isinstance(recorded, dict) and self.best["epoch"] > 0 and recorded.get("epoch") == self.best["epoch"] \
            and target.exists() and recorded.get("sha256") == file_digest(target)

    def finish(self, history: list, seconds: float) -> dict:
        """Rank 0 scores the best epoch on the test split and writes the summary; every rank
        returns it."""
        summary = None
        try:
            if self.rank == 0:
                summary = self._summary(seconds)
        finally:
            # the other ranks wait out rank 0's test evaluation on the long group: on the default
            # one they gave up after its timeout (30 minutes on gloo), torchrun killed rank 0 before
            # summary.json, and every --resume ran into the same wall. Rank 0 comes here even when
            # it fails, so that they then wait on the default group's timeout, not for days.
            self.dist.barrier(long=True)
        return self.dist.broadcast_object(summary)

    def _summary(self, seconds: float) -> dict:
        """Rank 0's part of :meth:`finish`: the test split, model.*, summary.json, README.md."""
        load_weights(self.model, self.out / "model.safetensors", self.cfg.model)
        test = self.evaluate(split="test")
        summary = {
            "method": self.method.name, "model": self.cfg.model, "dataset": self.dataset.spec,
            "params": count_parameters(bare(self.model)), "best_epoch": self.best["epoch"],
            "val_accuracy": self.best["val_accuracy"], "test_accuracy": test["accuracy"],
            "test": test, "epochs": self.cfg.epochs, "train_seconds": seconds,
            "train_images": len(self.train_idx), "val_images": len(self.val_idx),
            "processes": self.world, "global_batch": self.batch * self.world, "lr": self.lr, **self.meta,
        }
        meta = {**self.model_meta(), "metrics": {"val_accuracy": self.best["val_accuracy"],
                                                 "test_accuracy": test["accuracy"], "epoch": self.best["epoch"]}}
        save_checkpoint(self.out / "model", self.model, meta)
        write_text(self.out / "README.md", model_card(finite(summary), meta))
        # summary.json last: it marks the run finished (experiments reuse it as it is, and a run
        # killed after it but before the model card was never resumed, so it lacked README.md)
        write_json(self.out / "summary.json", summary)
        log(f"done: best epoch {self.best['epoch']} (val {fmt_percent(self.best['val_accuracy'])}), "
            f"test accuracy {test['accuracy']:.2f}% -> {self.out}", self.quiet)
        self._warn_one_class(test)
        return summary

    def _warn_one_class(self, test: dict) -> None:
        """Say when the final model predicts one class for every test image of a split with
        several: its accuracy is that class's share, whatever the method, and a user took the
        same accuracy across methods for a loss that did nothing (it was BatchNorm running
        statistics not yet settled after 1 epoch of a tiny subset). From the confusion matrix
        the test metrics hold, so it costs nothing. Not said under --quiet, unlike a warning of
        a mistake: a run of a few steps is often meant (a smoke test), and this one is a guess."""
        only = one_class(test)
        if only is None:
            return
        cls = self.dataset.classes[only]
        steps = self.cfg.epochs * self.steps_per_epoch
        norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        why = (f"its BatchNorm running statistics, not settled in {steps} training step{'s' if steps != 1 else ''},"
               if norms else f"too few training steps ({steps}),") + " or a model collapsed by a learning rate too high"
        log(f"igkd: warning: the trained model predicts class {cls!r} for all {test['total']} test images, so its "
            f"accuracy ({test['accuracy']:.2f}%) is that class's share and says nothing of the method; likely {why}: "
            "train more steps (epochs, images) before comparing runs", self.quiet)


def one_class(test: dict) -> int | None:
    """The class a model predicted for every image of a test split holding several classes
    (from its metrics' confusion matrix), or None."""
    confusion = torch.tensor(test.get("confusion") or [[0]])
    predicted, present = confusion.sum(0), confusion.sum(1)
    if int((present > 0).sum()) < 2 or int((predicted > 0).sum()) != 1:
        return None
    return int(predicted.argmax())


def refuse_lone_values(model: nn.Module, input_shape: tuple[int, int, int], device: torch.device) -> None:
    """Refuse a batch of one image where a BatchNorm layer of ``model`` sees a 1x1 feature map:
    one value per channel, which training-mode BatchNorm cannot normalise (resnet18 on 28-pixel
    images, whose last stage is 1x1, failed at its first step with torch's ValueError, after
    the run folder was written). Probed in eval mode, without gradients: nothing changes."""
    lone = []

    def hook(module, inputs, _):
        if inputs[0].numel() // max(1, inputs[0].shape[1]) <= 1:
            lone.append(module)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    handles = [m.register_forward_hook(hook) for m in norms]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if lone:
        name = next((n for n, m in bare(model).named_modules() if m is lone[0]), "")  # as --explain-layer names
        raise UserError(f"a batch of one image gives BatchNorm layer {name or 'the model'} a 1x1 feature map, one value "
                        "per channel, which it cannot normalise in training; use --batch-size 2 or more (or more "
                        "training images per process)")


def _is_tty() -> bool:
    import sys
    return sys.stderr.isatty()


__all__ = ["Trainer", "TrainingDiverged", "epoch_seed"]
