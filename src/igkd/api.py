"""The Python API behind every command: ``igkd.train``, ``igkd.distill``, ``igkd.evaluate``...

Each function takes a validated config (or plain arguments), does the work, writes its
outputs atomically, and returns a summary dict (``precompute``: the opened store). The
command line only parses arguments and calls these.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import yaml
from torch import nn

from .command_options import EvaluateConfig, api_config
from .config import DistillConfig, PrecomputeConfig, TrainConfig, init_file
from .data import Dataset, RowView, load_dataset
from .data.memory import given_data, is_memory_spec
from .distill import Trainer, parallel, parse_method
from .distill.trainer import check_run_dir, refuse_busy_run_dir, refuse_world
from .distill.speed import amp_dtype
from .errors import UserError
from .fileio import native_path, writable_dir
from .evaluate import classification_metrics, predict
from .evaluate.classmap import model_classes, read_class_map, remap, shown
from .evaluate.metrics import not_logits
from .evaluate.corruptions import evaluate_corruptions, evenly_spaced, parse as parse_corruptions
from .models.fold import for_inference
from .models.preprocess import IMAGENET_MEAN, IMAGENET_STD, remember_preprocessing, trained_preprocessing
from .models import (bare, build_model, built_spec, copy_from_file, copy_matching, count_parameters, eval_mode, holds_own_weights,
                     load_model, read_metadata, preprocessing_of, recorded_spec, resume_identity, weights_fingerprint,
                     with_preprocessing)
from .precompute import maps_record, precompute as _precompute
from .progress import log
from .runtime import keeps_threads, resolve_device, set_threads
from .spec import parse_spec


def preprocessing_for(normalize: str, dataset: Dataset) -> dict | None:
    """The preprocessing a ``--normalize`` (or ``--teacher-normalize``) value names for
    ``dataset``: none, the dataset's own channel mean/std, or torchvision's ImageNet ones
    (what a foreign ImageNet checkpoint was trained with); None for ``auto``, the
    checkpoint's own (what :func:`~igkd.models.load_model` takes as "from the metadata")."""
    if normalize == "auto":
        return None
    if normalize == "none":
        return {"normalize": "none"}
    if normalize == "imagenet":
        if dataset.channels != 3:
            raise UserError(f"imagenet normalisation is for RGB images; {dataset.spec} has {dataset.channels} "
                            "channel(s): use none or dataset")
        return {"normalize": "dataset", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    mean, std = dataset.channel_stats()
    return {"normalize": "dataset", "mean": mean, "std": std}


_WARNED_PREPROCESSING: set[str] = set()


def warn_unknown_preprocessing(path, normalize: str, flag: str) -> None:
    """Say once per file that a weights file without igkd metadata gets raw [0, 1] pixels under
    ``auto``: a torchvision ImageNet teacher then scored 25% instead of 75% on its own data, and
    distilled from that, without a word. ``flag`` is the option that states the preprocessing."""
    if normalize != "auto" or isinstance(path, nn.Module) or not path or holds_own_weights(str(path)):
        return
    if read_metadata(path) is not None or str(path) in _WARNED_PREPROCESSING:
        return
    _WARNED_PREPROCESSING.add(str(path))
    log(f"igkd: warning: {path} has no igkd metadata, so how its training images were normalised is unknown; it "
        f"gets raw [0, 1] pixels. Pass {flag} imagenet for a torchvision ImageNet model, {flag} dataset for one "
        f"trained on images normalised by this data's mean/std, or {flag} none to confirm raw pixels")


def _check_store_dir(store) -> None:
    """A ``--store`` to be written must be writable (said before any work); a finished one is
    only read, and may sit on a read-only mount."""
    if store and not (Path(store) / "manifest.json").exists():
        writable_dir(store, "--store")


def _describe_pre(pre: dict) -> str:
    if pre["normalize"] == "none":
        return "raw [0, 1] pixels"
    return "mean " + ", ".join(f"{m:.3f}" for m in pre["mean"]) + "; std " + ", ".join(f"{v:.3f}" for v in pre["std"])


def _config(cfg, cls: type, function: str):
    """``cfg`` when it is a ``cls`` (a subclass included), else a one-line UserError: a dict,
    None or another command's config failed deep inside with an AttributeError."""
    if not isinstance(cfg, cls):
        raise UserError(f"{function}() needs an igkd.{cls.__name__} as its config, got {type(cfg).__name__}; "
                        f"build one with igkd.{cls.__name__}(data=..., ...) or igkd.experiments.resolve")
    return cfg


def _check_out(out: str | Path | None) -> Path:
    # safetensors opens the run's model.safetensors by a UTF-8 name: a folder name that is not
    # (bytes that are not UTF-8; any non-ASCII name under an ASCII locale) failed after training
    return native_path(writable_dir(out or "", "--out"), "--out")


def _run_data(cfg, data, out: Path, resume: bool):
    """``(dataset, cfg)``: the data a run trains on, ``data`` (a Dataset or a spec string,
    recorded in ``cfg.data`` by :func:`igkd.data.memory.given_data`) when given, else
    ``cfg.data`` loaded. A run resumed with other in-memory data (or in-memory data where it
    had a spec, or the reverse) is refused here, in words, before any work: the trainer's
    config check would refuse it only after the precompute."""
    if data is None:
        _check_resumed_data(out, cfg.data, resume)
        return load_dataset(cfg.data), cfg
    dataset, spec = given_data(data)
    _check_resumed_data(out, spec, resume)
    return dataset, dataclasses.replace(cfg, data=spec)


def _same_data_on_every_rank(env, spec: str) -> None:
    """Under torchrun each process builds its own ``data=``: processes given other tensors
    (unseeded random data, a per-process shuffle) trained each on its own images, or failed
    on one rank alone at the store check. One line on every rank instead (the recorded
    specs, content digests for in-memory data, are compared: one all-gather of a string)."""
    specs = env.all_gather_object(spec)
    if len(set(specs)) > 1:
        other = next(r for r, s in enumerate(specs) if s != specs[0])
        raise UserError(f"the torchrun processes were given different data: rank 0 {specs[0]}, rank {other} "
                        f"{specs[other]}; build the same data in every process (seed any random choice)")


def _check_resumed_data(out: Path, spec: str, resume: bool) -> None:
    if not resume or not (out / "last.pt").exists():
        return
    try:
        recorded = (yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}).get("data")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return  # the trainer compares last.pt's own config
    if recorded == spec or not (is_memory_spec(recorded) or is_memory_spec(spec)):
        return
    if is_memory_spec(recorded):
        what = "data= the same images, labels and classes (igkd.data.from_tensors)"
    else:
        what = f"data={recorded!r}"
    raise UserError(f"cannot resume {out}: it was trained on {recorded}, this call gives {spec} (other images, labels "
                    f"or classes); pass {what}, or start a new out directory")


def module_spec(net: nn.Module, num_classes: int, in_channels: int, image_size: tuple[int, int] = (32, 32)) -> str:
    """The spec recorded for a network given as an ``nn.Module``: the spec ``build_model``
    built it from, else ``py:MODULE:CLASS``, when that spec rebuilds the same function (the
    module's weights loaded into the rebuilt network give its logits on a probe image), else
    ``module:CLASS``. Names and shapes alone were not enough: options that change no shape
    (a stride, max pooling, an ImageNet stem) were lost, and the recorded spec computed
    another function from the same weights."""
    net = bare(net)
    cls = type(net)
    candidates = [built_spec(net)]
    if cls.__module__ != "__main__" and "<locals>" not in cls.__qualname__:
        candidates.append(f"py:{cls.__module__}:{cls.__qualname__}")
    for spec in filter(None, candidates):
        if _rebuilds(spec, net, num_classes, in_channels, image_size):
            return spec
    return f"module:{cls.__qualname__}"


def _rebuilds(spec: str, net: nn.Module, num_classes: int, in_channels: int, image_size: tuple[int, int]) -> bool:
    try:
        with torch.random.fork_rng(devices=[]):  # the rebuild's initialisation draws no number of the run's
            rebuilt = build_model(spec, num_classes, in_channels)
            rebuilt.load_state_dict(net.state_dict())
            probe = torch.rand(2, in_channels, *image_size, generator=torch.Generator().manual_seed(0))
        device = next((p.device for p in net.parameters()), torch.device("cpu"))
        with torch.no_grad(), eval_mode(net):
            a = net(probe.to(device)).float().cpu()
            b = rebuilt.to(device).eval()(probe.to(device)).float().cpu()
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (1 + float(a.abs().max())))
    except Exception:  # noqa: BLE001 - any failure means: not rebuildable from that spec
        return False


def check_outputs(net: nn.Module, dataset: Dataset, what: str, split: str = "train") -> None:
    """One image of ``split`` through ``net`` (eval mode, no gradients): it must give a float
    logits tensor of shape (1, classes). A user's network returning a tuple or a dict, the
    wrong number of classes or channels, or failing, is one line naming it here, not a
    traceback from inside a training step (or a store computed whole, then refused)."""
    rows = getattr(dataset, split)
    if not len(rows.labels):
        return
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    x = rows.images[:1].to(device).float().div(255)
    try:
        with torch.no_grad(), eval_mode(net):
            out = net(x)
    except Exception as e:  # noqa: BLE001 - whatever the user's network raises
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{what} fails on one {dataset.channels}x{'x'.join(map(str, dataset.image_size))} image of "
                        f"{dataset.spec} ({type(e).__name__}: {first}); it must take float32 N x C x H x W "
                        "pixels in [0, 1] and return logits") from None
    classes = len(dataset.classes)
    if not isinstance(out, torch.Tensor):
        raise not_logits(out, what)
    if not out.is_floating_point() or tuple(out.shape) != (1, classes):
        raise UserError(f"{what} returns {out.dtype} of shape {tuple(out.shape)} for one image; {dataset.spec} "
                        f"needs float logits of shape (1, {classes}), one per class")


@contextlib.contextmanager
def _as_given(*modules):
    """The caller's modules (None, or anything else, is skipped) come back as they were
    given: each submodule's training flag, and no ``.grad`` where there was none, so that a
    notebook's teacher given in train mode is not left in eval mode, nor a student given
    in eval mode left in train mode holding the last step's gradients."""
    saved = [([(m, m.training) for m in module.modules()], [p for p in module.parameters() if p.grad is None])
             for module in modules if isinstance(module, nn.Module)]
    try:
        yield
    finally:
        for modes, gradless in saved:
            for m, training in modes:
                m.training = training
            for p in gradless:
                p.grad = None


@contextlib.contextmanager
def _own_rng():
    """The run seeds torch's global CPU generator (``cfg.seed``: initialisation, dropout)
    and a resumed run restores it from last.pt; the caller's is put back afterwards, so a
    notebook's random numbers do not restart from the run's seed. (CUDA generators are
    seeded by the run, as ``torch.manual_seed`` does.)"""
    with torch.random.fork_rng(devices=[]):
        yield


def _student(cfg, dataset: Dataset, model: nn.Module | None, quiet: bool = False, resuming: bool = False):
    """(cfg with the spec of a given module, the network wrapped with its preprocessing, the
    record of ``--init FILE``'s copy or None). ``resuming``: from a ``last.pt``, whose weights
    replace any initial ones: the file is not read (it may be gone), the record comes from there."""
    torch.manual_seed(cfg.seed)  # initialisation follows the seed
    if model is None:
        net = build_model(cfg.model, len(dataset.classes), dataset.channels)
    else:
        if not isinstance(model, nn.Module):
            raise UserError(f"the student must be a model spec or a torch.nn.Module, got {type(model).__name__}")
        net = bare(model)
        cfg = dataclasses.replace(cfg, model=module_spec(net, len(dataset.classes), dataset.channels,
                                                         tuple(dataset.image_size)))
    pre = preprocessing_for(cfg.normalize, dataset)
    init = _init_from_file(cfg, net, pre, quiet) if init_file(cfg.init) and not resuming else None
    net = with_preprocessing(net, pre)
    if model is not None and model is bare(model):  # an igkd wrapper given applies its own normalisation
        remember_preprocessing(model, net)
    check_outputs(net, dataset, f"model {cfg.model}" if model is None else "the student module")
    return cfg, net, init


def given_module(weights, options: dict, config, conflict: str) -> tuple[nn.Module | None, object]:
    """(the ``nn.Module`` given as ``weights`` or None, what the call's config then records as
    its weights: ``module:CLASS``, never read as a file). A ``model`` spec beside a module, in
    ``options`` or ``config``, is refused: ``conflict`` says so, for evaluate, export and predict."""
    if not isinstance(weights, nn.Module):
        return None, weights
    if options.get("model") or (config is not None and config.model):
        raise UserError(f"{conflict}; give one of them")
    return weights, f"module:{type(weights).__name__}"


def module_input(module: nn.Module, normalize: str, dataset: Dataset) -> tuple[nn.Module, dict]:
    """(``module`` with the preprocessing ``normalize`` names in front, that preprocessing),
    for a module scored or exported as it is. ``auto``: the one igkd.train or igkd.distill
    trained it behind in this process (its weights expect it), else none: it takes [0, 1]
    pixels. The preprocessing returned is what the whole applies, an igkd wrapper's own too."""
    pre = preprocessing_for(normalize, dataset) or trained_preprocessing(module) or {"normalize": "none"}
    net = with_preprocessing(module, pre)
    # the new wrapper's own flag only: net.train(flag) set every module inside to one flag, and a
    # training module's frozen BatchNorm or Dropout came back training
    net.training = module.training
    return net, (pre if pre["normalize"] != "none" else preprocessing_of(module))


def check_init(cfg, command: str, resuming: bool = False, teacher_given: bool = False) -> None:
    """A bad ``--init`` in one line before any data is read (a resumed run does not read its
    file). ``command``: train, distill or experiment (whose paths a config file may give);
    ``teacher_given``: a teacher module handed to the API."""
    in_config = command == "experiment"
    if cfg.init == "teacher" and command == "train":
        raise UserError("--init teacher copies a teacher's layers into a student: it is an option of igkd distill; "
                        "igkd train takes --init scratch or a weights FILE")
    if cfg.init == "teacher" and not teacher_given and not cfg.teacher:  # said "this method needs a teacher"
        raise UserError(f"--init teacher copies the teacher's layers into the student{'s' if in_config else ''}; "
                        f"pass --teacher CHECKPOINT{' (or set teacher: in the config)' if in_config else ''}, "
                        "or use --init scratch")
    if init_file(cfg.init) and not resuming and not Path(cfg.init).is_file():
        raise UserError(f"--init {cfg.init}: no such file; give scratch, {'' if command == 'train' else 'teacher or '}"
                        "a weights file (.safetensors, .pt, .pth"
                        f"{'; paths in a config are relative to the current folder' if in_config else ''})")


def _init_from_file(cfg, net: nn.Module, pre: dict, quiet: bool) -> dict:
    """Copy ``cfg.init``'s matching tensors into ``net`` and say what it did (and, where the
    weights were trained on inputs normalised otherwise than this run's, that too: torchvision's
    ImageNet weights fed raw pixels start far from where they were trained)."""
    info = copy_from_file(net, cfg.init, cfg.model)
    kept = f"; left as initialised: {', '.join(info['kept'])}{', ...' if info['of'] - info['copied'] > 8 else ''}" \
        if info["kept"] else ""
    log(f"--init {cfg.init}: copied {info['copied']} of {info['of']} tensors{kept}", quiet)
    if info["other_shape"]:
        log(f"igkd: warning: {cfg.init} has tensors named as {cfg.model}'s with other shapes "
            f"({', '.join(info['other_shape'][:3])}{', ...' if len(info['other_shape']) > 3 else ''}), beyond its "
            "classifier: weights of another depth or width? Those layers start random", quiet)
    theirs = (read_metadata(cfg.init) or {}).get("preprocessing") if Path(cfg.init).suffix in (
        ".safetensors", ".json") else None
    ours = pre or {"normalize": "none"}
    if theirs is None and cfg.normalize != "imagenet":
        log(f"igkd: note: {cfg.init} does not say how its training images were normalised; torchvision's ImageNet "
            "weights expect --normalize imagenet", quiet)
    elif theirs is not None and _describe_pre(theirs) != _describe_pre(ours):
        log(f"igkd: note: {cfg.init} was trained on {_describe_pre(theirs)}, this run gives {_describe_pre(ours)} "
            "(--normalize)", quiet)
    return info


@keeps_threads
def train(cfg: TrainConfig, out: str | Path, resume: bool = False, quiet: bool = False,
          model: nn.Module | None = None, data: Dataset | str | None = None) -> dict:
    """Train a model from scratch with cross-entropy (a teacher, or a plain student) into
    the run folder ``out`` (``resume``: go on from its ``last.pt``; ``quiet``: no progress
    lines on stderr).

    ``model``, an ``nn.Module`` taking float [0, 1] pixels N x C x H x W and returning
    N x classes logits, replaces ``cfg.model``; it is moved to the run's device, trained in
    place and holds the best epoch's weights afterwards, those of ``out/model.safetensors``;
    its training flags are as given. ``data``, an :class:`igkd.data.Dataset` (e.g. from
    :func:`igkd.data.from_tensors`) or a spec string, replaces ``cfg.data``; in-memory data
    is recorded as ``memory:sha256=HEX``, its content digest (:mod:`igkd.data.memory`), and
    a resumed run must be given the same data. ``cfg.threads`` holds for the call only; the
    global CPU random generator is the caller's again afterwards.

    Returns the run's summary (what ``out/summary.json`` and ``igkd train --json`` hold,
    except that an undefined figure, such as ``val_accuracy`` without a validation split,
    is NaN here and null there): ``method``, ``model`` (the recorded spec), ``dataset``,
    ``params``, ``best_epoch``, ``val_accuracy``, ``test_accuracy``, ``test`` (the test
    split's ``accuracy``, ``correct``, ``total``, ``balanced_accuracy``, ``kappa``,
    ``per_class``, ``confusion``), ``epochs``, ``train_seconds``, ``train_images``,
    ``val_images``, ``processes``, ``global_batch``, ``lr``."""
    with _as_given(model), _own_rng():
        return _train(cfg, out, resume, quiet, model, data)


def _train(cfg, out, resume: bool, quiet: bool, model, data=None) -> dict:
    _config(cfg, TrainConfig, "train")
    refuse_world()  # before the data is read (a folder's first decode takes minutes), not after
    out = _check_out(out)
    refuse_busy_run_dir(out)
    check_run_dir(out, resume)  # before the data is read, not after
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    resuming = resume and (out / "last.pt").exists()
    check_init(cfg, "train", resuming)
    dataset, cfg = _run_data(cfg, data, out, resume)
    _ = dataset.train, dataset.test  # a bad test image is found now, not after every epoch has run
    cfg, model, init = _student(cfg, dataset, model, quiet, resuming)
    return Trainer(cfg, model, dataset, out, device, meta={"init": init} if init else None, quiet=quiet).fit(resume)


def load_teacher(path: str | Path, dataset: Dataset | str, spec: str = "",
                 normalize: str = "auto") -> tuple[nn.Module, dict]:
    """Load a teacher checkpoint and check it fits the dataset's classes and channels.
    ``dataset``: an :class:`igkd.data.Dataset` or its spec string (``"demo"``). ``spec``:
    the architecture of a file without igkd metadata (``--teacher-model``). ``normalize``
    (``--teacher-normalize``): auto = as its metadata says (raw [0, 1] pixels for a foreign
    file), or none, dataset, imagenet (torchvision's ImageNet checkpoints).

    Returns ``(teacher, metadata)``: the network in eval mode with its preprocessing in
    front, parameters not requiring gradients, and the checkpoint's metadata dict."""
    if isinstance(dataset, str):
        dataset = load_dataset(dataset)
    elif not isinstance(dataset, Dataset):
        raise UserError(f"load_teacher() needs the dataset (an igkd.data.Dataset from igkd.load_dataset, or its spec "
                        f"string), got {type(dataset).__name__}")
    if not path:
        raise UserError("this method needs a teacher; pass --teacher CHECKPOINT (train one with 'igkd train')")
    meta = read_metadata(path) or {}
    if meta.get("classes") and meta["classes"] != dataset.classes:
        raise UserError(f"teacher {path} was trained on {shown(meta['classes'])}; {dataset.spec} has "
                        f"{shown(dataset.classes)}; use a teacher trained on this dataset's classes")
    if meta.get("in_channels") and meta["in_channels"] != dataset.channels:
        raise UserError(f"teacher {path} takes {meta['in_channels']}-channel images but {dataset.spec} has "
                        f"{dataset.channels}; use a teacher trained on this dataset")
    teacher, meta = load_model(path, spec or None, len(dataset.classes), dataset.channels,
                               preprocessing_for(normalize, dataset), flag="--teacher-model",
                               image_size=dataset.image_size)
    for p in teacher.parameters():
        p.requires_grad_(False)
    check_outputs(teacher, dataset, f"teacher {path} ({meta['model']})")
    warn_unknown_preprocessing(path, normalize, "--teacher-normalize")  # once it is usable: errors stay one line
    return teacher, meta


@keeps_threads
def precompute(teacher_path: str | Path | nn.Module, data: str | Dataset, cfg: PrecomputeConfig | None = None,
               store: str | Path | None = None, teacher_model: str = "", device: str = "auto",
               quiet: bool = False, threads: int = 0, teacher_normalize: str = "auto", maps: bool = True):
    """Compute (or reuse, or resume) the store of teacher logits and IG maps of a teacher
    checkpoint (or spec holding its weights, or an ``nn.Module`` taking [0, 1] pixels, or
    behind the normalisation :func:`train` trained it with or ``teacher_normalize`` names: run
    in eval mode, its training flags as given afterwards) on the training split of the
    dataset spec ``data`` (or an :class:`igkd.data.Dataset`, e.g. in memory from
    :func:`igkd.data.from_tensors`: the store is keyed by its fingerprint all the same).
    ``store``: its folder (default: one in the cache, named by its fingerprint); ``threads``
    holds for the call only; ``maps=False``: only its logits will be read, so a finished
    store of this teacher and data is taken whatever its map settings.

    Returns the opened :class:`igkd.store.Store`, not a dict: ``.path``, ``.logits``
    (N x classes), ``.maps`` (N x H x W), ``.manifest`` (what ``igkd precompute --json``
    prints, after ``store`` and ``images``).

    Under torchrun the processes share the work (chunk i on rank i % N, gloo on CPU, nccl
    on CUDA) and write one store; every rank returns it opened."""
    with _as_given(teacher_path):
        return _precompute_api(teacher_path, data, cfg, store, teacher_model, device, quiet, threads,
                               teacher_normalize, maps)


def _precompute_api(teacher_path, data, cfg, store, teacher_model, device, quiet, threads, teacher_normalize,
                    maps=True):
    if cfg is not None:
        _config(cfg, PrecomputeConfig, "precompute")
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= 1024:
        raise UserError(f"threads={threads!r} is out of range; use 0 (torch's default) to 1024")
    _check_store_dir(store)
    env = parallel.init(device)
    try:
        if not threads and env.world > 1 and env.device.type == "cpu":
            threads = parallel.default_threads(env.local_world)
        set_threads(threads)
        with env.rank0_first():
            dataset, spec = given_data(data)
            _ = dataset.train  # decoded (and cached) by rank 0 first
        _same_data_on_every_rank(env, spec)
        if isinstance(teacher_path, nn.Module):  # teacher_normalize in front of it, as distill puts it
            teacher = module_input(teacher_path.eval(), teacher_normalize, dataset)[0]
            check_outputs(teacher, dataset, "the teacher module")
        else:
            teacher = load_teacher(teacher_path, dataset, teacher_model, teacher_normalize)[0]
        return _precompute(teacher, dataset, cfg or PrecomputeConfig(), store, env.device, quiet, dist=env, maps=maps)
    finally:
        parallel.shutdown(env)


@keeps_threads
def distill(cfg: DistillConfig, out: str | Path, resume: bool = False, quiet: bool = False,
            teacher: nn.Module | None = None, student: nn.Module | None = None,
            data: Dataset | str | None = None) -> dict:
    """Train a student with the parts of ``cfg.method`` (CE, KD, DKD, DIST, IG overlay,
    explanation matching, AT, CutMix...; :mod:`igkd.distill.parts`) into the run folder
    ``out`` (``resume``: go on from its ``last.pt``; ``quiet``: no progress lines on stderr).

    ``teacher`` and ``student``, ``nn.Module`` s taking float [0, 1] pixels N x C x H x W
    and returning N x classes logits (a teacher that normalises does so inside, or
    ``cfg.teacher_normalize`` puts the normalisation in front of it: ``imagenet`` for a
    torchvision model; ``auto``, the one :func:`train` trained it behind in this process),
    replace ``cfg.teacher`` and ``cfg.model``. Both are moved to the
    run's device. The teacher runs in eval mode and its weights are not changed; the
    student is trained in place and holds the best epoch's weights afterwards, those of
    ``out/model.safetensors``. Both come back with the training flags they were given.
    With ``cfg.init == "teacher"`` the student starts from the teacher's matching tensors
    (:func:`igkd.models.copy_matching`). ``data`` replaces ``cfg.data`` as in :func:`train`
    (in-memory data is recorded by its content digest; the store of teacher outputs is
    checked by its fingerprint; under torchrun every process must give the same data, else
    each is refused in one line). ``cfg.threads`` holds for the call only; the global CPU
    random generator is the caller's again afterwards.

    Returns the run's summary (what ``out/summary.json`` and ``igkd distill --json`` hold,
    except that an undefined figure is NaN here and null there): the keys :func:`train`
    returns, plus ``teacher`` (its path, spec, parameters and weights fingerprint),
    ``compression``, the method's options (``T``, ``alpha``, ``p``...), ``logits`` and
    ``maps`` where the method uses them.

    Under torchrun (WORLD_SIZE > 1) this process joins the group (gloo on CPU, nccl on
    CUDA, see :mod:`igkd.distill.parallel`); rank 0 loads the data and builds the store
    first, the other ranks then read them; rank 0 alone writes the run directory.
    """
    with _as_given(teacher, student), _own_rng():
        return _distill(cfg, out, resume, quiet, teacher, student, data)


def _distill(cfg, out, resume: bool, quiet: bool, teacher, student, data=None) -> dict:
    _config(cfg, DistillConfig, "distill")
    out = _check_out(out)
    refuse_busy_run_dir(out)  # another run writing it is named now, not after our precompute
    check_run_dir(out, resume)  # before the teacher, the data and the precompute, which take minutes
    _check_store_dir(cfg.store)
    resuming = resume and (out / "last.pt").exists()
    check_init(cfg, "distill", resuming, teacher_given=teacher is not None)
    method = parse_method(cfg.method)
    env = parallel.init(cfg.device)
    try:
        threads = cfg.threads
        if not threads and env.world > 1 and env.device.type == "cpu":
            threads = parallel.default_threads(env.local_world)
        set_threads(threads)
        device = env.device
        amp_dtype(cfg.amp, device)  # option errors before any long work
        with env.rank0_first():
            dataset, cfg = _run_data(cfg, data, out, resume)
            _ = dataset.train, dataset.test  # decoded (and cached) by rank 0 first
            meta = {"method": method.name}
            if teacher is not None:
                if not isinstance(teacher, nn.Module):
                    raise UserError(f"the teacher must be a torch.nn.Module, got {type(teacher).__name__}")
                teacher = teacher.eval()
                spec = module_spec(teacher, len(dataset.classes), dataset.channels, tuple(dataset.image_size))
                # cfg.teacher_normalize applies to a module too (imagenet: a torchvision model handed
                # over as it is); it was ignored, and such a teacher saw raw pixels
                # (auto: the normalisation igkd.train trained it behind, as evaluate takes it; the store
                # and IG maps were a teacher fed raw pixels: 67.8% of the training images right, not 97.8%)
                teacher = module_input(teacher, cfg.teacher_normalize, dataset)[0]
                check_outputs(teacher, dataset, "the teacher module")
                meta["teacher"] = {"path": None, "model": spec}
            elif method.needs_teacher or cfg.init == "teacher":
                teacher, tmeta = load_teacher(cfg.teacher, dataset, cfg.teacher_model, cfg.teacher_normalize)
                meta["teacher"] = {"path": str(cfg.teacher), "model": tmeta.get("model")}
            if teacher is not None:
                meta["teacher"].update(params=count_parameters(teacher), fingerprint=weights_fingerprint(teacher),
                                       identity=resume_identity(teacher))
        _same_data_on_every_rank(env, cfg.data)
        cfg, model, init = _student(cfg, dataset, student, quiet or env.rank > 0, resuming)
        if init:
            meta["init"] = init
        net = bare(model)
        if cfg.init == "teacher":  # (a resumed run then loads its own weights over these)
            copied = copy_matching(net, teacher)
            meta["init"] = {"from": "teacher", "copied": len(copied), "of": len(net.state_dict())}
            # the copied layers expect the teacher's input: with the student's own (distill's
            # default is raw pixels against a teacher trained on normalised ones) the first
            # activations were off by the normalisation, a much worse start than intended
            pre = preprocessing_of(teacher)
            model = with_preprocessing(net, pre)
            if student is not None and student is bare(student):
                remember_preprocessing(student, model)
            cfg = dataclasses.replace(cfg, normalize=pre["normalize"])
            log(f"--init teacher: copied {len(copied)} of {len(net.state_dict())} student tensors from the teacher; "
                f"the student takes the teacher's input normalisation ({_describe_pre(pre)})", quiet or env.rank > 0)
        if not method.needs_teacher:
            teacher = None
        for part in method.parts:  # bad layer names and the like fail now, not after the precompute
            part.check(cfg, teacher, model, (dataset.channels, *dataset.image_size))
        store = None
        if needs_store(method, cfg):
            store = _precompute(teacher, dataset, cfg, cfg.store or None, device, quiet or env.rank > 0, dist=env,
                                maps=method.needs_maps)  # logits alone: any map settings will do
            if store.manifest.get("teacher_accuracy") and meta.get("teacher"):
                # the teacher as the student sees it (its normalisation, the data's size), on the training images
                meta["teacher"]["train_accuracy"] = store.manifest["teacher_accuracy"]["percent"]
        if teacher is not None:
            # None, not 0.0, for a frozen TorchScript teacher: its weights are constants, not parameters
            meta["compression"] = (meta["teacher"]["params"] / count_parameters(net)) if meta["teacher"]["params"] \
                else None
        if method.needs_logits:
            meta["logits"] = "online" if method.online_teacher else cfg.logits
        if method.needs_maps:
            meta["maps"] = maps_record(cfg, store)
        return Trainer(cfg, model, dataset, out, device, teacher=teacher, store=store, meta=meta,
                       quiet=quiet, dist=env).fit(resume)
    finally:
        parallel.shutdown(env)


def needs_store(method, cfg) -> bool:
    """Whether a run of ``method`` reads the precompute store: maps, or precomputed logits."""
    return method.needs_maps or (method.needs_logits and cfg.logits == "precomputed" and not method.online_teacher)


def _model_params(teacher: str, num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameters of a teacher given as a checkpoint (with metadata) or a model spec; a spec
    is built for ``num_classes`` and ``in_channels`` (the data's: its head counts too)."""
    path = Path(teacher)
    if path.is_file():
        meta = read_metadata(path)
        if not meta or not meta.get("model"):
            raise UserError(f"--teacher {teacher} has no igkd metadata; pass the teacher's architecture spec as "
                            "--teacher (e.g. --teacher resnet50: only its size is used)")
        spec = recorded_spec(meta["model"], teacher, "--teacher")
        return count_parameters(build_model(spec, meta.get("num_classes", 10), meta.get("in_channels", 3)))
    if path.suffix in (".safetensors", ".pt", ".pth", ".json") or ("/" in teacher and ":" not in teacher):
        raise UserError(f"--teacher {teacher} does not exist; give the teacher's checkpoint or its architecture spec")
    return count_parameters(build_model(teacher, num_classes, in_channels))


@keeps_threads
def evaluate(weights=None, data=None, *, config: EvaluateConfig | None = None,
             class_map: str | Path | dict | None = None, quiet: bool = False, **options) -> dict:
    """Accuracy, balanced accuracy, Cohen's kappa, per-class accuracy, confusion matrix,
    parameters (and compression factor) of a checkpoint ``weights`` (a path) on the test
    split of the dataset spec ``data`` (or an :class:`igkd.data.Dataset`, e.g. in memory from
    :func:`igkd.data.from_tensors`; ``result["data"]`` is then its ``memory:sha256=HEX``).

    ``weights`` may also be an ``nn.Module`` (a network :func:`distill` or :func:`train`
    just trained in place, say): it is scored as it is, its outputs read as the dataset's
    classes in order. ``normalize`` ``dataset`` or ``imagenet`` puts that normalisation in
    front of it; ``auto`` the one :func:`train` or :func:`distill` trained it behind (its
    ``normalize``), or none for another module, which then takes float [0, 1] pixels
    (``module_input``); ``result["weights"]`` is then None and
    ``result["model"]`` ``module:CLASSNAME``. The module is moved to ``device``, and its
    training flag is left as it was.

    Returns the dict ``igkd evaluate --json`` prints: ``weights``, ``model``, ``data``,
    ``split``, ``preprocessing``, ``params``, ``accuracy``, ``correct``, ``total``,
    ``balanced_accuracy``, ``kappa``, ``per_class``, ``confusion``, and ``class_map``,
    ``teacher_correct``, ``corruptions``, ``teacher``/``teacher_params``/``compression``
    when those options are given. ``threads`` holds for the call only.

    The options (``model``, ``normalize``, ``teacher``, ``batch_size``, ``device``,
    ``threads``) are the fields of :class:`igkd.command_options.EvaluateConfig`, given as
    keywords or as ``config``: one dataclass gives ``igkd evaluate``'s options, the YAML
    section ``evaluate:`` and these defaults, so they cannot disagree.

    ``class_map`` (a JSON/YAML file or dict, see :mod:`igkd.evaluate.classmap`) scores the
    model on a dataset with other class names: its classes are mapped onto the model's,
    images of unmapped classes are dropped and counted.

    ``teacher_correct`` (a teacher checkpoint; ``teacher_correct_model`` its spec when it has
    no igkd metadata, ``teacher_correct_normalize`` its preprocessing as ``--teacher-normalize``
    takes it) applies the teacher-correct protocol: the teacher, with the same class map
    applied to its classes, is run on the (mapped) test images and the model is scored
    only on the images the teacher classifies correctly. ``result["teacher_correct"]`` says
    how many images that leaves, of how many, and the teacher's accuracy on all of them.

    ``corruptions`` (names, a comma list, or ``"all"``; :mod:`igkd.evaluate.corruptions`)
    also scores the model under those corruptions at CIFAR-10-C's five severities, on the
    scored images (``corruption_images`` of them, evenly spaced, 0 = all), with noise seeded
    by ``corruption_seed`` and each image's test index: ``result["corruptions"]`` holds the
    accuracy per corruption and severity, the mean per corruption, the mean over the
    corruptions (``overall_mean``) and the clean accuracy on the same images. ``quiet``:
    no progress lines for that (on stderr)."""
    if class_map is not None and not isinstance(class_map, dict):
        options["class_map"] = class_map
        class_map = None
    given = None
    if isinstance(data, Dataset):  # the config holds a spec string: the one it is recorded as
        given, data = given_data(data)
    module, weights = given_module(weights, options, config, "evaluate got a module to score and a --model spec")
    cfg = api_config(EvaluateConfig, config, {"weights": weights, "data": data, **options}, "evaluate")
    if class_map is None and cfg.class_map:
        class_map = cfg.class_map
    weights, data, model, normalize = cfg.weights, cfg.data, cfg.model, cfg.normalize
    teacher_correct, teacher_correct_model = cfg.teacher_correct or None, cfg.teacher_correct_model
    corruption_names = parse_corruptions(cfg.corruptions)
    if not weights:
        raise UserError("no checkpoint to evaluate; pass --weights FILE")
    if not data:
        raise UserError("no dataset to evaluate on; pass --data SPEC")
    # named before a dataset is loaded (or downloaded); torchscript:FILE holds its weights, as --teacher takes it
    file = Path(parse_spec(str(weights)).arg or "") if holds_own_weights(str(weights)) else Path(weights)
    if module is None and (not file.exists() or file.is_dir()):
        raise UserError(f"weights file {file} {'is a folder' if file.is_dir() else 'does not exist'}; check the path")
    if module is not None and class_map is not None:
        raise UserError("a class map names the model's classes, which a module does not record; save it with its "
                        "classes first (igkd.models.save_checkpoint) and evaluate the file")
    if teacher_correct is not None and not holds_own_weights(str(teacher_correct)) \
            and not Path(teacher_correct).is_file():
        raise UserError(f"--teacher-correct {teacher_correct} does not exist (or is not a file); give the teacher's "
                        "checkpoint")
    # a teacher checkpoint's size first: a bad --teacher is named before any data is loaded
    tparams = _model_params(cfg.teacher) if cfg.teacher and Path(cfg.teacher).is_file() else None
    set_threads(cfg.threads)
    dataset = given if given is not None else load_dataset(data)
    meta = (read_metadata(weights) or {}) if module is None else {}
    cmap = read_class_map(class_map) if class_map is not None else None
    classes = model_classes(cmap, meta.get("classes"), str(weights)) if cmap else dataset.classes
    if not cmap and meta.get("classes") and meta["classes"] != dataset.classes:
        if set(dataset.classes) <= set(meta["classes"]):
            # a held-out folder with some of the model's classes (by name): scored on them, as an
            # identity --class-map would; it was refused, the message naming neither list in full
            cmap = read_class_map({c: c for c in dataset.classes})
            cmap.source = "the data's class names"
            classes = model_classes(cmap, meta["classes"], str(weights))
            log(f"evaluate: {dataset.spec} has {len(dataset.classes)} of the model's {len(meta['classes'])} classes "
                "(by name): scored on their images, predictions over all the model's classes", quiet)
        else:
            raise UserError(f"{weights} was trained on {shown(meta['classes'])}; {dataset.spec} has "
                            f"{shown(dataset.classes)}; evaluate it on data of its classes (folders named as "
                            "them, some of them will do), or map the classes with --class-map")
    if module is not None:  # scored as it is: its outputs are the data's classes, in order
        net, pre = module_input(module, normalize, dataset)
        meta = {"model": weights, "preprocessing": pre}
        check_outputs(net, dataset, f"the module {type(module).__name__}", split="test")
    else:
        net, meta = load_model(weights, model or None, len(classes), dataset.channels,
                               preprocessing_for(normalize, dataset),
                               classes_from=f"--class-map {class_map}" if cmap else "the data",
                               image_size=dataset.image_size)
        warn_unknown_preprocessing(weights, normalize, "--normalize")
    params = count_parameters(net)  # the checkpoint's, before BatchNorm is folded away
    if cfg.teacher and tparams is None:
        # a spec, built once, at this model's classes and channels (not 10 and 3), before the evaluation
        tparams = _model_params(cfg.teacher, len(classes), dataset.channels)
    dev = resolve_device(cfg.device)
    test = dataset.test
    # a view of the scored rows (class map, teacher-correct, corruption picks narrow it): read batch
    # by batch, so a memory-mapped split is never copied
    images, labels, mapped = RowView(test.images, torch.arange(len(test.labels))), test.labels, None
    index = torch.arange(len(test.labels))  # each scored image's index in the test split (seeds corruption noise)
    if cmap:
        mapped = remap(test.labels, dataset.classes, cmap, classes)
        images, labels, index = images[mapped["keep"]], mapped["labels"], index[mapped["keep"]]
        if not len(labels):
            raise UserError(f"no test image of {dataset.spec} belongs to a class named in {cmap.source}")
    protocol = None
    if teacher_correct is not None:
        keep, protocol = _teacher_correct(str(teacher_correct), teacher_correct_model, dataset, cmap, images,
                                          cfg.batch_size, dev, cfg.teacher_correct_normalize)
        images, labels, index = images[keep], labels[keep], index[keep]
    net = for_inference(net, images, dev)  # loaded here to infer only: BatchNorm folded
    logits = predict(net, images, cfg.batch_size, dev)
    result = {"weights": str(weights) if module is None else None, "model": meta["model"], "data": dataset.spec,
              "split": "test",
              "preprocessing": meta["preprocessing"], "params": params,
              **classification_metrics(logits, labels, classes)}
    if mapped:
        result["class_map"] = {"source": cmap.source, "map": cmap.mapping, "dropped_images": mapped["dropped_images"],
                               "dropped_classes": mapped["dropped_classes"]}
    if protocol:
        result["teacher_correct"] = protocol
    if corruption_names:
        pick = evenly_spaced(len(labels), cfg.corruption_images)
        result["corruptions"] = evaluate_corruptions(net, images[pick], labels[pick], index[pick], corruption_names,
                                                     cfg.corruption_seed, cfg.batch_size, dev, quiet)
    if cfg.teacher:
        result.update(teacher=cfg.teacher, teacher_params=tparams, compression=tparams / result["params"])
    return result


def _teacher_correct(path: str, spec: str, dataset: Dataset, cmap, images: torch.Tensor, batch_size: int,
                     dev: torch.device, normalize: str = "auto") -> tuple[torch.Tensor, dict]:
    """Indices (into ``images``, the mapped test images) that the teacher classifies
    correctly, and the protocol's figures. The teacher's labels come from the same class
    map applied to its own classes (which need not be in the student's order)."""
    tmeta = read_metadata(path) or {}
    if cmap:
        tclasses = model_classes(cmap, tmeta.get("classes"), path)
    else:
        tclasses = dataset.classes
        if tmeta.get("classes") and tmeta["classes"] != dataset.classes:
            raise UserError(f"--teacher-correct {path} was trained on {shown(tmeta['classes'])}; {dataset.spec} "
                            f"has {shown(dataset.classes)}; use the teacher of this dataset (or map the classes with "
                            "--class-map)")
    if tmeta.get("in_channels") and tmeta["in_channels"] != dataset.channels:
        raise UserError(f"--teacher-correct {path} takes {tmeta['in_channels']}-channel images but {dataset.spec} "
                        f"has {dataset.channels}; use a teacher of this kind of image")
    labels = dataset.test.labels
    if cmap:
        missing = sorted(set(cmap.mapping.values()) - set(tclasses))
        if missing:
            raise UserError(f"{cmap.source} maps to {missing[:3]}, not classes of the teacher {path} "
                            f"({', '.join(tclasses[:10])}); use a teacher with the student's classes")
        labels = remap(labels, dataset.classes, cmap, tclasses)["labels"]
    net, tmeta = load_model(path, spec or None, len(tclasses), dataset.channels, preprocessing_for(normalize, dataset),
                            flag="--teacher-correct-model", image_size=dataset.image_size)
    warn_unknown_preprocessing(path, normalize, "--teacher-correct-normalize")
    right = predict(for_inference(net, images, dev), images, batch_size, dev).argmax(1) == labels
    keep = torch.nonzero(right).reshape(-1)
    if not len(keep):
        raise UserError(f"the --teacher-correct teacher {path} classifies none of the {len(labels)} test images "
                        "correctly; nothing is left to score (check the teacher, the data and the class map)")
    return keep, {"teacher": path, "model": tmeta["model"], "images": int(len(keep)), "of": int(len(labels)),
                  "teacher_accuracy": 100.0 * len(keep) / len(labels)}


__all__ = ["distill", "evaluate", "load_teacher", "module_spec", "precompute", "train"]
