"""Model checkpoints: safetensors weights + a JSON metadata file beside them.

``NAME.safetensors`` holds the bare network's state dict; ``NAME.json`` holds what is
needed to use it: the architecture spec, number of classes and input channels, class
names, image size, preprocessing, and where it came from (teacher fingerprint, metrics).
The same metadata (less the file's own sha256) is also in the safetensors header, under
the key ``igkd`` (a JSON string; safetensors metadata values are strings), so a
checkpoint copied without its .json still loads with its architecture, classes and
preprocessing. The .json, when present, is what is read.

Foreign PyTorch files (``.pt``/``.pth``, e.g. the paper's published students) are read
with ``weights_only=True`` and ``map_location="cpu"``: no code runs on load, and
CUDA-saved files open on CPU-only machines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import re
import shlex
import threading
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ..errors import UserError, cause
from ..fileio import dumps, file_sha256, native_path, write_bytes, write_json
from ..spec import canonical_spec, parse_spec
from .preprocess import bare, preprocessing_of, with_preprocessing
from .registry import MODELS, SPEC_ATTRIBUTE, build_model, built_spec, family_of, find_family

FORMAT = "igkd-checkpoint/1"
HEADER_KEY = "igkd"  # safetensors header metadata key holding the JSON metadata


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def storable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bare network's state dict as safetensors stores it: contiguous CPU tensors, and
    tied weights (a classifier that is the embedding, a module used twice), which share one
    storage and which safetensors refuses, each name with its own copy (loading fills the one
    tensor twice)."""
    state, storages = {}, set()
    for k, v in bare(model).state_dict().items():
        t = v.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in storages and t.numel():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        state[k] = t
    return state


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write ``path`` (.safetensors) and its .json; returns the .safetensors path."""
    weights, meta_path = _paths(path)
    state = storable_state(model)
    # serialised in memory and written by Python: safetensors' own writer reports a full disk as an
    # opaque SafetensorError, a Python write as OSError(ENOSPC) naming the file
    header = {HEADER_KEY: dumps({"format": FORMAT, **meta})}
    write_bytes(weights, save(state, metadata=header))
    write_json(meta_path, {"format": FORMAT, **meta, "sha256": file_sha256(weights)})
    return weights


def header_metadata(path: str | Path) -> dict | None:
    """igkd's metadata from a .safetensors header (read without loading the tensors), or None."""
    native_path(path, "weights file")  # else "damaged": safetensors takes UTF-8 names only
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(HEADER_KEY)
    except Exception as e:  # noqa: BLE001 - any failure to parse the header is the file's fault
        # returning None here made a truncated or foreign file read as "has no igkd metadata; pass
        # --model", sending the user to an option that cannot help: the file itself is bad
        raise UserError(f"{path} is not a readable safetensors file ({cause(e, 120)}); it is truncated, damaged "
                        "or of another format: copy or save it again (a PyTorch state dict is named .pt or .pth)") \
            from None
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise UserError(f"the igkd metadata in the header of {path} is not valid JSON ({e}); re-save the model "
                        "or give its .json beside it") from None
    check_metadata(meta, f"in the header of {path}")
    return meta


def read_metadata(path: str | Path) -> dict | None:
    """The JSON metadata beside a .safetensors file, else the copy in its header; None for
    foreign files."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".json"):
        return None
    weights, meta_path = _paths(path)
    if not meta_path.exists():
        return header_metadata(weights) if weights.exists() else None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # Recursion: nested thousands deep
        raise UserError(f"metadata file {meta_path} is not valid JSON ({e}); restore it or re-export the model") from None
    check_metadata(meta, meta_path)
    return meta


def check_metadata(meta, where) -> None:
    """One-line UserError unless ``meta`` has the shape igkd writes (fields may be absent)."""
    def bad(what: str):
        raise UserError(f"metadata {where} {what}; restore the file igkd wrote, or delete it and name the "
                        "architecture with --model")

    if not isinstance(meta, dict):
        bad(f"holds a JSON {type(meta).__name__}, not an object")
    if "model" in meta and not (isinstance(meta["model"], str) and meta["model"].strip()):
        bad(f"has model {meta['model']!r}, not a spec string such as 'mobilenetv2:drop=5'")
    for key in ("num_classes", "in_channels"):
        if key in meta and not (isinstance(meta[key], int) and not isinstance(meta[key], bool) and meta[key] >= 1):
            bad(f"has {key} {meta[key]!r}, not a positive integer")
    if "classes" in meta and not (isinstance(meta["classes"], list) and all(isinstance(c, str) for c in meta["classes"])):
        bad("has classes that are not a list of names")
    # read by export (the parity data) and bench latency (the input size): a number there was a traceback
    if "dataset" in meta and not isinstance(meta["dataset"], str):
        bad(f"has dataset {meta['dataset']!r}, not a dataset spec string")
    size = meta.get("image_size")
    if "image_size" in meta and not (isinstance(size, list) and len(size) == 2 and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        bad(f"has image_size {size!r}, not [height, width] in pixels")
    pre = meta.get("preprocessing")
    if pre is None:
        return
    if not isinstance(pre, dict) or pre.get("normalize", "none") not in ("none", "dataset"):
        bad(f"has preprocessing {pre!r}; expected {{'normalize': 'none'}} or {{'normalize': 'dataset', 'mean': "
            "[...], 'std': [...]}")
    if pre.get("normalize") == "dataset":
        channels = meta.get("in_channels")
        for key in ("mean", "std"):
            v = pre.get(key)
            if not (isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                       and math.isfinite(x) for x in v)):
                bad(f"has preprocessing {key} {v!r}, not a list of numbers")
            if channels and len(v) != channels:
                bad(f"has a preprocessing {key} of {len(v)} value(s) for {channels} input channel(s)")
        if len(pre["mean"]) != len(pre["std"]) or min(pre["std"]) <= 0:
            bad("has a preprocessing mean and std of different lengths, or a std <= 0")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read weights from .safetensors, or safely from a foreign .pt/.pth file (without the
    prefixes of a DDP or torch.compile wrapper, see :func:`_unwrap_prefixes`)."""
    state, own_file = _read_state(path)
    return state if own_file else _unwrap_prefixes(state)


def _read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """The state dict as stored (unwrapped from ``state_dict``/``model`` containers) and
    whether the file is igkd's own (a .safetensors with igkd's header metadata)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} does not exist; check the path")
    if path.suffix == ".json":
        path = _paths(path)[0]
    if path.suffix == ".safetensors":
        native_path(path, "weights file")  # else "cannot read": safetensors takes UTF-8 names only
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path), device="cpu")
        else:
            obj = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - any decode failure is the file's fault
        raise _unreadable(path, e) from None
    obj = _state_inside(obj, path)
    # igkd's own file holds the bare network's names: there a child named `module` is the model's own
    return obj, path.suffix == ".safetensors" and _has_igkd_header(path)


# where checkpoints keep the state dict beside other things (optimizer, epoch, args), in the
# order they are preferred: torchvision's reference scripts save "model" and "model_ema"
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "student")


def _is_state(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _state_inside(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict a loaded file holds: the file itself, the entry of a known container
    key (a few levels deep), or else its one entry that is a state dict (``{"ema": ...,
    "epoch": 3}``). Several such entries and no known key are refused naming them rather
    than one picked silently (a file of a ``teacher`` and a ``net``)."""
    for _ in range(4):
        if _is_state(obj) or not isinstance(obj, dict):
            break
        known = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
        inner = [k for k, v in obj.items() if isinstance(v, dict) and v and _is_state(v)]
        if known is None and len(inner) > 1:
            raise UserError(f"{path} holds several state dicts ({_names(inner)}) and none under "
                            f"{'/'.join(CONTAINER_KEYS)}; save the one to use alone: "
                            "torch.save(torch.load(FILE)[KEY], 'weights.pth')")
        if known is None and not inner:
            break
        obj = obj[known if known is not None else inner[0]]
    if not _is_state(obj):
        what = f"a dict with keys {_names(list(obj))}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UserError(f"{path} does not hold a state dict of tensors (it holds {what}); save one with "
                        "torch.save(model.state_dict(), FILE)")
    return obj


def _names(keys: list, k: int = 5) -> str:
    shown = ", ".join(repr(x)[:40] for x in keys[:k])
    return shown + (f" and {len(keys) - k} more" if len(keys) > k else "") if keys else "none"


def _unreadable(path: Path, e: Exception) -> UserError:
    """The one-line error for a file torch or safetensors cannot read, saying what it is where
    that is known: torch's own message for these is a paragraph about ``weights_only``."""
    text = str(e)
    if "TorchScript" in text:
        return UserError(f"cannot read weights from {path}: it is a TorchScript program, not a state dict; give it "
                         f"as torchscript:{path} (--teacher or --model; its weights are inside)")
    found = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", text)  # torch >= 2.4 | older
    if found:
        return UserError(f"cannot read weights from {path}: it holds a pickled {found.group(1)}, which igkd does not "
                         "unpickle (only tensors and plain containers, so that no code runs); if you trust the file, "
                         "open it with torch.load(FILE, weights_only=False) and save the network's state dict alone: "
                         "torch.save(model.state_dict(), 'weights.pth')")
    first = (text.strip().splitlines() or ["empty or unreadable file"])[0][:160]
    return UserError(f"cannot read weights from {path} ({type(e).__name__}: {first}); "
                     "give a .safetensors file or a PyTorch state dict saved with torch.save")


def _has_igkd_header(path: Path) -> bool:
    """Whether a .safetensors file was written by :func:`save_checkpoint` (its header carries
    igkd's metadata key; the metadata itself is checked where it is read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return HEADER_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - unreadable header: treat as foreign
        return False


def _unwrap_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, each removed only
    when every key carries it: a wrapper prefixes all names, while a network's own child named
    ``module`` prefixes only its part of them."""
    while state:
        prefix = next((p for p in ("module.", "_orig_mod.") if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _named_as(raw: dict[str, torch.Tensor], names: set[str], optional: set[str]) -> dict[str, torch.Tensor]:
    """A foreign state dict with the model's names: as stored where they fit (a network whose
    only child is named `module`), else without a DDP or torch.compile wrapper's prefixes,
    else without the prefix every name shares where that makes them fit (a PyTorch Lightning
    module's attribute: `model.conv1.weight`). Fitting: no name the model lacks, and every
    name it has but those in ``optional``. Where nothing fits, the candidate sharing the most
    names with the model, for the error to report its differences (one missing `fc.bias`,
    not every name under `model.`)."""
    candidates = [raw, _unwrap_prefixes(raw)]
    while candidates[-1] and all("." in k for k in candidates[-1]) and \
            len({k.partition(".")[0] for k in candidates[-1]}) == 1:
        candidates.append({k.partition(".")[2]: v for k, v in candidates[-1].items()})
    for state in candidates:
        if _fits(state, names, optional):
            return state
    return max(candidates[1:], key=lambda state: len(names & set(state)))


def _fits(keys, names: set[str], optional: set[str]) -> bool:
    """Whether state dict names ``keys`` are a model's ``names``: none it lacks, and all it has
    but those in ``optional`` (BatchNorm counters, absent from old files)."""
    return set(keys) <= names and names - set(keys) <= optional


_NO_INIT = threading.local()  # .on: this thread builds networks only for their names and shapes
_NO_INIT_LOCK = threading.Lock()
_no_init_users = 0  # threads inside _no_init; torch.nn.init holds the skipping wrappers while any is
_SAVED_INIT: dict = {}  # torch.nn.init's own initialisers meanwhile


@contextlib.contextmanager
def _no_init():
    """``torch.nn.init``'s in-place initialisers as no-ops in this thread, for networks built
    only for their names and shapes: on the meta device each is a Python decomposition, and
    initialising a MobileNetV2 took 0.2 s of its 0.24 s build there (as transformers'
    no_init_weights). The wrappers skip only where this thread asked: a network another
    thread builds meanwhile (an API caller's) is initialised, not left as torch.empty's memory."""
    global _no_init_users
    init = torch.nn.init
    with _NO_INIT_LOCK:
        if not _no_init_users:
            _SAVED_INIT.update({name: getattr(init, name) for name in dir(init)
                                if name.endswith("_") and not name.startswith("_") and callable(getattr(init, name))})
            for name, fn in _SAVED_INIT.items():
                setattr(init, name, _skipping(fn))
        _no_init_users += 1
    was, _NO_INIT.on = getattr(_NO_INIT, "on", False), True
    try:
        yield
    finally:
        _NO_INIT.on = was
        with _NO_INIT_LOCK:
            _no_init_users -= 1
            if not _no_init_users:
                for name, fn in _SAVED_INIT.items():
                    setattr(init, name, fn)
                _SAVED_INIT.clear()


def _skipping(fn):
    @functools.wraps(fn)
    def init_unless_skipped(tensor, *args, **kwargs):
        return tensor if getattr(_NO_INIT, "on", False) else fn(tensor, *args, **kwargs)
    return init_unless_skipped


def _specs_fitting(state: dict[str, torch.Tensor]) -> list[str]:
    """The registered specs whose networks have exactly these names and shapes (at the file's
    own classes and input channels; num_batches_tracked optional), for an error to name: each
    family's :attr:`~igkd.models.family.Family.guess` proposes members, each is built on the
    meta device (no memory, no initialisation) and compared."""
    tensors = [t for t in state.values() if isinstance(t, torch.Tensor)]
    # the first convolution's input channels, the last linear layer's outputs (the head)
    channels = next((t.shape[1] for t in tensors if t.dim() == 4), 1)
    classes = next((t.shape[0] for t in reversed(tensors) if t.dim() == 2), 1)
    found = []
    for kind, family in MODELS.items():
        try:
            guesses = family.guess(state) if family.guess else []
        except Exception:  # noqa: BLE001 - a plug-in family's guess that fails names nothing, and breaks no load
            guesses = []
        for options in guesses:
            spec = f"{kind}:{options}" if options else kind
            try:
                with torch.device("meta"), _no_init():
                    net = build_model(spec, classes, channels)
            except Exception:  # noqa: BLE001 - a guess no family builds (a depth out of range) fits nothing
                continue
            theirs = net.state_dict()
            if _fits(state, set(theirs), {k for k in theirs if k.endswith(".num_batches_tracked")}) and \
                    all(tuple(theirs[k].shape) == tuple(state[k].shape) for k in state):
                found.append(spec)
    return found


def _torch_load(path: Path):
    # torchvision's reference scripts store their argparse arguments beside the model:
    # a Namespace only sets attributes, so it is allowed; anything else is still refused
    with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. about pickle protocols; a failure is reported by the caller
        return torch.load(path, map_location="cpu", weights_only=True)


def _refuse_other_io(path, state: dict, own: dict, wrong: list[str], io_flags: tuple[str, str] | None = None,
                     classes_from: str = "the data") -> None:
    """A one-line UserError when the architecture is right and only the data differs: the
    first weight's input channels and/or the last layer's classes (a 3-channel ImageNet file
    on grayscale 10-class data). "Pass the --model they were trained with" sent users to
    the one thing that was right."""
    weights = [k for k in own if own[k].dim() >= 2]
    if not weights:
        return
    first, last = weights[0], next((k for k in reversed(weights) if own[k].dim() == 2), None)
    head = {last, f"{last.rpartition('.')[0]}.bias"} if last else set()

    def differs(k: str) -> list[int]:
        a, b = tuple(state[k].shape), tuple(own[k].shape)
        return [i for i in range(len(a)) if a[i] != b[i]] if len(a) == len(b) else [-1]

    if not all((k == first and differs(k) == [1]) or (k in head and differs(k) == [0]) for k in wrong):
        return
    # what the file is for, what the data gives, and (no data: bench latency) the options that gave it
    said, data, given, fix = [], [], [], []
    flags = io_flags or ("", "")
    if first in wrong:
        said.append(f"{state[first].shape[1]}-channel images")
        data.append(f"{own[first].shape[1]} channel(s)")
        given.append(f"{flags[1]} has {own[first].shape[1]} channel(s)")
        fix.append(f"{flags[1]} {state[first].shape[1]}xHxW")
    if any(k in head for k in wrong):
        said.append(f"{state[last].shape[0]} classes")
        data.append(f"{own[last].shape[0]} classes")
        given.append(f"{flags[0]} is {own[last].shape[0]}")
        fix.append(f"{flags[0]} {state[last].shape[0]}")
    if io_flags:
        raise UserError(f"weights {path} are for {' and '.join(said)}, but {' and '.join(given)}; pass "
                        f"{' and '.join(fix)} (a file without igkd metadata is built from these options)")
    if classes_from != "the data" and any(k in head for k in wrong):
        # a class map sized the model: the classes it maps to are the weights' own
        has = f"{classes_from} lists {data.pop()}" + (f" and the data has {data[0]}" if data else "")
        raise UserError(f"weights {path} are for {' and '.join(said)}, {has}; list the classes the weights were "
                        "trained on, in output order, under 'classes:'")
    raise UserError(f"weights {path} are for {' and '.join(said)}, the data has {' and '.join(data)}; use the data "
                    "they were trained on (another number of classes: --class-map for evaluate)")


def load_weights(model: nn.Module, path: str | Path, spec: str = "the model", flag: str = "--model",
                 io_flags: tuple[str, str] | None = None, classes_from: str = "the data") -> nn.Module:
    """Load weights into ``model`` (its bare network), strictly, with a one-line error.
    ``io_flags``: the options (classes, input shape) that sized ``model`` where no dataset
    did, named in the error when only its classes or input channels differ; ``classes_from``
    what gave its number of classes where that was not the data (a class map)."""
    raw, own_file = _read_state(path)
    net = bare(model)
    own = net.state_dict()
    # BatchNorm's num_batches_tracked (torch >= 0.4.1) is absent from older files (torchvision's
    # original ImageNet weights among them) and torch's own loader accepts that; it only counts
    # training batches (used when momentum is None), so a missing one starts at 0
    counters = {k for k in own if k.rpartition(".")[2] == "num_batches_tracked" and
                isinstance(net.get_submodule(k.rpartition(".")[0]), nn.modules.batchnorm._NormBase)}
    state = raw if own_file else _named_as(raw, set(own), counters)
    stored = dict(state)
    for k in counters - set(state):
        state[k] = torch.zeros_like(own[k])
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong and not missing and not unexpected:
        _refuse_other_io(path, state, own, wrong, io_flags, classes_from)
    if missing or unexpected or wrong:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatch(es), e.g. {k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        meta = read_metadata(path)
        if meta and "model" in meta:
            fix = f"pass the {flag} they were trained with (its metadata says {flag} {meta['model']})"
        else:
            fits = [s for s in _specs_fitting(stored) if canonical_spec(s) != built_spec(net)]
            fix = (f"pass the {flag} they were trained with" if not fits else
                   f"they fit the built-in {fits[0]}: pass {flag} {fits[0]}" if len(fits) == 1 else
                   f"they fit the built-in {' and '.join(fits)} (alike state dicts): pass {flag} with the one they "
                   "were trained with")
        raise UserError(f"weights {path} do not fit {spec}: {'; '.join(detail)}; {fix}")
    net.load_state_dict(state)
    return model


def holds_own_weights(text: str) -> bool:
    """Whether ``text`` is a model spec of a family whose weights come with it
    (``torchscript:FILE``), given where a weights file is expected."""
    family = find_family(text)
    return family is not None and family.own_weights


def recorded_spec(spec: str, path: str | Path, flag: str = "--model") -> str:
    """The architecture a weights file's metadata records, when igkd builds it from its own
    code. A ``py:`` or ``torchscript:`` spec would import a module or load a program the file
    names, not the user (``py:torch.hub:load,...`` fetches and runs a repository;
    ``py:logging:basicConfig,filename=...`` truncates a file): it is refused with the spec to
    pass as ``flag`` when the user trusts it. ``module:CLASS`` (a module handed to the API
    that no class rebuilds) cannot be built at all."""
    parsed = parse_spec(spec, f"model spec recorded in {path}")
    if parsed.kind == "module":
        raise UserError(f"{path} was trained from a Python module igkd cannot rebuild ({spec}); pass {flag} SPEC "
                        f"({_keyword(flag)}= in Python) naming a factory that builds it (py:FILE.py:CALLABLE), or "
                        "load it with igkd.models.load_weights(your_module, FILE)")
    if family_of(parsed).runs_code:
        raise UserError(f"{path} records model {spec}, which runs code from outside the file; igkd runs no code a "
                        f"weights file names: if you trust it, pass {flag} {shlex.quote(spec)} ({_keyword(flag)}= in "
                        "Python)")
    return spec


def _keyword(flag: str) -> str:
    """The Python API's keyword of a command-line option (``--teacher-model`` -> ``teacher_model``):
    a notebook's error named only the flag."""
    return flag.lstrip("-").replace("-", "_")


def load_model(path: str | Path, spec: str | None = None, num_classes: int | None = None,
               in_channels: int | None = None, preprocessing: dict | None = None,
               flag: str = "--model", io_flags: tuple[str, str] | None = None,
               classes_from: str = "the data", image_size: tuple[int, int] | None = None) -> tuple[nn.Module, dict]:
    """Build and load a model. igkd checkpoints describe themselves; foreign files need
    ``spec`` (and ``num_classes``/``in_channels`` when not 10 and 3). A spec that holds its
    own weights (``torchscript:FILE``) may be given as ``path`` itself. ``flag`` is the
    option that gives the spec, named in errors (``--teacher-model`` for a teacher).
    ``image_size``: the data's H x W, where known; a foreign file that fits another family's
    layout made for images nearer that size gets a warning (:func:`warn_other_strides`).

    Returns ``(model in eval mode, wrapped with its preprocessing; metadata dict)``.
    """
    if not isinstance(path, (str, Path)) or not str(path):
        raise UserError(f"the weights file must be a path, got {type(path).__name__}; pass --weights FILE")
    if not spec and holds_own_weights(str(path)):
        spec = str(path)
    meta = dict(read_metadata(path) or {})
    foreign = not meta.get("model")  # no architecture of igkd's recorded: the user names it
    spec = spec or (recorded_spec(meta["model"], path, flag) if meta.get("model") else None)
    if spec is None:
        if not Path(path).exists():
            raise UserError(f"weights file {path} does not exist; check the path")
        raise UserError(f"{path} has no igkd metadata; say which architecture it is with {flag} SPEC")
    # the spec that is built, not the one the file records: a --model given for a file recording
    # module:CLASS (or another spelling) was reported, and written into export sidecars, as the record
    meta["model"] = spec
    num_classes = num_classes or meta.get("num_classes") or 10
    in_channels = in_channels or meta.get("in_channels") or 3
    net = build_model(spec, num_classes, in_channels)
    if not family_of(spec).own_weights:
        load_weights(net, path, f"model '{spec}'", flag, io_flags, classes_from)
        if image_size and foreign:
            warn_other_strides(path, spec, net, image_size, flag)
    if image_size:
        warn_other_size(path, meta.get("image_size"), image_size)
    pre = preprocessing if preprocessing is not None else meta.get("preprocessing")
    if pre and pre.get("normalize") == "dataset" and len(pre["mean"]) != in_channels:
        raise UserError(f"{path}: its preprocessing has {len(pre['mean'])} channel mean(s) but the data has "
                        f"{in_channels} channel(s); use the dataset the model was trained on")
    meta.update(num_classes=num_classes, in_channels=in_channels, preprocessing=pre or {"normalize": "none"})
    return with_preprocessing(net, pre).eval(), meta


_WARNED: set = set()


def warn_other_size(path, trained, image_size: tuple[int, int]) -> None:
    """Say once where a checkpoint that records the image size it learnt at (``trained``) is
    given images of another: a convolutional network with global pooling runs on them all the
    same, and scores lower, silently. An image folder without ``size=`` takes the size of its
    images, so a held-out folder of larger photos met a model trained at 64 pixels unnoticed
    (66.7% at 64, 60.0% at 160; helper-65). A warning, not a refusal: testing another
    resolution on purpose is fair."""
    if not trained or list(trained) == list(image_size) or (str(path), tuple(image_size)) in _WARNED:
        return
    from ..progress import log
    _WARNED.add((str(path), tuple(image_size)))
    h, w = trained
    log(f"igkd: warning: {path} was trained on {h}x{w} images and is given {image_size[0]}x{image_size[1]}; "
        f"it runs, and scores lower as a rule: give the data at {h}x{w} (an image folder: add ,size={h}x{w} to "
        "its spec) unless another size is the point")


def warn_other_strides(path, spec: str, net: nn.Module, image_size: tuple[int, int], flag: str) -> None:
    """Say once where a foreign state dict, loaded into ``spec``, fits as well a member of
    another family made for images nearer the data's ``image_size`` (each family's
    ``native_size``): torchvision's ``mobilenet_v2`` loads into the CIFAR ``mobilenetv2``
    without a mismatch, and runs with strides for 32-pixel images, giving logits unlike its
    source's. Nothing is said where the family's own size is within 2x of the data's."""
    family = family_of(spec)
    side = min(image_size)
    if not family.native_size or side <= 0 or (path, spec, side) in _WARNED:
        return

    def off(f) -> float:
        return abs(math.log(side / f.native_size))
    if off(family) <= math.log(2):
        return
    better = [s for s in _specs_fitting(bare(net).state_dict()) if family_of(s) is not family
              and family_of(s).native_size and off(family_of(s)) < off(family)]
    if better:
        from ..progress import log
        _WARNED.add((path, spec, side))
        other = family_of(better[0]).native_size
        # torchvision's weights are the ImageNet member's, not the CIFAR one's
        note = " (torchvision's weights are)" if other > family.native_size else ""
        log(f"igkd: warning: {path} fits {spec} (strides for {family.native_size}-pixel images) and "
            f"{better[0]} (for {other}-pixel images) alike, and the data's images are "
            f"{image_size[0]}x{image_size[1]}: if it was trained as {better[0]}{note}, pass "
            f"{flag} {better[0]}; it was loaded as {spec}")


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the bare network's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(bare(model).state_dict().items()):
        h.update(f"{k}|".encode())
        _hash_tensor(h, v)
    return h.hexdigest()


_IDENTITY_FORMAT = "igkd-teacher/2"
_UNSTABLE = {"training", "_is_full_backward_hook"}  # change with modes and hooks, not with the function


def teacher_identity(model: nn.Module) -> str:
    """sha256 naming the function a teacher computes, for its precompute store and fitted
    schedules: the architecture as well as the weights. :func:`weights_fingerprint` alone
    is blind to both the architecture (one state dict fits mobilenetv2 and
    mobilenetv2_imagenet, whose strides differ) and to a frozen TorchScript teacher, whose
    weights are constants of its code (an empty state dict).

    Hashed: the spec the network was built from (set by ``build_model``; absent for a module
    handed in directly), then for every module its name, class and plain attributes (strides,
    paddings, options a user's network keeps; numbers, strings and tuples of them), and for a
    TorchScript module the code of its methods, their constants (frozen weights included) and
    the plain attributes that code reads; then the weights. Preprocessing is not included
    (the store identity adds it)."""
    net = bare(model)
    h = hashlib.sha256(f"{_IDENTITY_FORMAT}|spec={getattr(net, SPEC_ATTRIBUTE, None)}|".encode())
    for name, m in net.named_modules():
        h.update(f"module {name}|".encode())
        if isinstance(m, torch.jit.ScriptModule):
            _script_identity(m, h)
        else:
            h.update(f"{type(m).__module__}.{type(m).__qualname__}|".encode())
            for key, value in sorted(vars(m).items()):
                if key not in _UNSTABLE and _plain(value):
                    h.update(f"{key}={value!r}|".encode())
    h.update(f"weights={weights_fingerprint(net)}".encode())
    return h.hexdigest()


def resume_identity(model: nn.Module) -> str:
    """sha256 by which a resumed distillation knows its teacher at another path: what
    :func:`teacher_identity` names (architecture, weights, a TorchScript teacher's program and
    its frozen constants) and the input normalisation in front. :func:`weights_fingerprint`
    alone is one value for every frozen TorchScript teacher (an empty state dict), and is blind
    to another architecture or normalisation read from another file's metadata."""
    pre = json.dumps(preprocessing_of(model), sort_keys=True)
    return hashlib.sha256(f"{teacher_identity(model)}|preprocessing={pre}".encode()).hexdigest()


def _plain(value) -> bool:
    """Numbers, strings, None and tuples/lists of them: values whose repr is stable across
    processes (no object addresses) and that can change what forward computes."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _script_identity(m: torch.jit.ScriptModule, h) -> None:
    """Hash a TorchScript module's own methods: code text, constants, and the plain attributes
    the code reads (``self.scale``); its state dict is hashed with the weights. (The saved
    file's bytes are not used: scripting in another process mangles class names differently.)"""
    h.update(f"script {getattr(m, 'original_name', '')}|".encode())
    for method in sorted(m._c._method_names()):
        code, constants = m._c._get_method(method).code_with_constants
        h.update(f"def {method}|{code}|".encode())
        for key in sorted(constants):
            value = constants[key]
            h.update(f"const {key}|".encode())
            if isinstance(value, torch.Tensor):
                _hash_tensor(h, value)
            else:
                h.update(repr(value).encode() if _plain(value) else type(value).__name__.encode())
        own = re.match(r"\s*def \w+\((\w+)", code)  # the method's first parameter: `self`, or as the author named it
        for attr in sorted(set(re.findall(rf"\b{own.group(1)}\.(\w+)", code))) if own else ():
            value = m._c.getattr(attr) if attr not in _UNSTABLE and m._c.hasattr(attr) else None
            if _plain(value):
                h.update(f"{attr}={value!r}|".encode())


def _hash_tensor(h, t: torch.Tensor) -> None:
    """dtype, shape and bytes of ``t`` into the hash ``h`` (bfloat16, which numpy lacks, as int16 bits)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())


def copy_matching(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Copy into ``student`` every tensor of ``teacher``'s state dict (bare networks, buffers
    included) whose name and shape the student also has: a truncated or narrower student
    of the same family starts from the teacher's layers. Returns the copied names; a
    student that shares none is a one-line UserError."""
    theirs = bare(teacher).state_dict()
    names = _copy_state(student, theirs)
    if not names:
        raise UserError("--init teacher: the student shares no tensor (same name and shape) with the teacher; "
                        "use a student of the teacher's family (e.g. a truncated one) or --init scratch")
    return names


def _copy_state(model: nn.Module, theirs: dict[str, torch.Tensor]) -> list[str]:
    """Copy the tensors of ``theirs`` whose name and shape the bare ``model`` has; the names, or
    none where no parameter matches. A BatchNorm's step counter (a 0-dim buffer, the same shape
    in every network) goes with its statistics only: two unrelated networks shared nothing
    else, and a file of another architecture was taken as 9 tensors copied."""
    own = bare(model).state_dict()
    names = [k for k, v in own.items() if k in theirs and tuple(theirs[k].shape) == tuple(v.shape)]
    kept = set(names)
    names = [k for k in names if not k.endswith("num_batches_tracked")
             or k.removesuffix("num_batches_tracked") + "running_mean" in kept]
    params = {n for n, _ in bare(model).named_parameters()}
    if not params & set(names):
        return []
    bare(model).load_state_dict({k: theirs[k] for k in names}, strict=False)
    return names


def weights_file(path: str | Path) -> Path:
    """The file holding the tensors ``path`` names: an igkd checkpoint's .safetensors for its
    .json, else ``path``. ``--init``'s record, a resume's check and an experiment's run key
    hash this one, so that model.json and model.safetensors name one start."""
    return _paths(path)[0] if Path(path).suffix == ".json" else Path(path)


def copy_from_file(model: nn.Module, path: str | Path, spec: str = "the model") -> dict:
    """Fine-tuning's start: copy into ``model`` every tensor of the weights file ``path`` (an
    igkd checkpoint, a PyTorch state dict read without unpickling code, a .safetensors; a DDP,
    torch.compile or Lightning wrapper's prefix dropped as for a teacher) whose name and shape
    the bare network has. What the file lacks or shapes otherwise (torchvision's 1000-class
    ``fc`` against the data's classes) keeps the model's own initialisation. Returns ``{"from":
    path, "sha256", "copied", "of", "kept"}`` (``kept``: the first names left as they were); a
    file sharing no tensor with the model is a one-line UserError."""
    raw, own_file = _read_state(path)
    own = bare(model).state_dict()
    theirs = raw if own_file else _named_as(raw, set(own), set())
    names = _copy_state(model, theirs)
    if not names:
        raise UserError(f"--init {path} shares no tensor (same name and shape) with {spec}: the file has "
                        f"{_names(list(theirs))}, the model {_names(list(own))}; give weights of this architecture "
                        "(torchvision's names are those of igkd's resnet18/34/50 and mobilenetv2_imagenet)")
    copied = set(names)
    # same name, other shape, outside the classifier: weights of another depth or width (a
    # resnet18 file in a resnet50 copies its stem and little else), worth a word beside the count
    linears = [n for n, m in bare(model).named_modules() if isinstance(m, nn.Linear)]
    head = f"{linears[-1]}." if linears else None
    mismatched = [k for k in own if k in theirs and k not in copied and not k.endswith("num_batches_tracked")
                  and not (head and k.startswith(head))]
    return {"from": str(path), "sha256": file_sha256(weights_file(path)),
            "copied": len(names), "of": len(own), "kept": [k for k in own if k not in copied][:8],
            "other_shape": mismatched[:8]}
