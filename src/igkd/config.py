"""Typed, validated run configurations.

A config is a dataclass whose fields each carry a help text, a unit and an allowed range
or set of choices. The same description drives YAML loading, validation, the command
line (every field is an option ``--field-name``) and ``--help``, so the three never
disagree. Shipped YAML recipes live in ``igkd/configs/`` (``--config NAME``); a file may hold one section per command
(``train:``, ``precompute:``, ``distill:``) or a flat mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path, PurePath
from typing import Any, ClassVar

import yaml

from .attribution import registry as attributions
from .errors import UserError
from .options import deprecation_warning, opt


class _Validated:
    """Configs check themselves when built, from the CLI, YAML or Python alike
    (``DistillConfig(T=-1)`` raises instead of training with a negative temperature)."""

    def __post_init__(self) -> None:
        validate(self)


INIT_HELP = ("initial weights: scratch (random, from --seed) or a weights FILE (an igkd checkpoint, a PyTorch "
             "state dict .pt/.pth or a .safetensors, such as torchvision's ImageNet weights): every tensor whose "
             "name and shape the model has is copied and the rest (a classifier for other classes) stays random")


@dataclass
class TrainConfig(_Validated):
    """Options shared by ``igkd train`` (teacher) and ``igkd distill`` (student)."""

    # igkd.train and igkd.distill take the model and teacher as modules too (as arguments):
    # a module given as the field is pointed there
    takes_modules: ClassVar[bool] = True

    data: str = opt("demo", "dataset spec: demo, cifar10:DIR, cifar100:DIR, imagefolder:DIR[,size=N], fashion-mnist[:DIR] "
                    "(the Python API's TrainConfig defaults to demo)", required=True, metavar="SPEC")
    model: str = opt("mobilenetv2", "architecture spec, e.g. mobilenetv2, mobilenetv2:drop=5, mobilenetv2:width=0.5",
                     metavar="SPEC")
    normalize: str = opt("dataset", "input preprocessing baked into the model: 'dataset' mean/std, 'none' "
                         "(the paper's students take raw [0,1] pixels) or 'imagenet' (torchvision's ImageNet "
                         "mean/std, what weights from torchvision given to --init expect)",
                         choices=["dataset", "none", "imagenet"])
    init: str = opt("scratch", INIT_HELP + ", i.e. fine-tuning", metavar="scratch|FILE")
    epochs: int = opt(30, "training epochs", low=1, high=100000)
    batch_size: int = opt(128, "images per optimisation step", low=1, high=65536, unit="images")
    optimizer: str = opt("sgd", "sgd (momentum, Nesterov) or adam (the paper's)", choices=["sgd", "adam"])
    lr: float = opt(0.05, "peak learning rate", low=0.0, high=10.0, low_open=True)
    momentum: float = opt(0.9, "SGD momentum", low=0.0, high=1.0)
    nesterov: bool = opt(True, "Nesterov momentum (sgd only)")
    weight_decay: float = opt(5e-4, "L2 weight decay (coupled, as torch.optim)", low=0.0, high=1.0)
    schedule: str = opt("cosine", "learning-rate schedule: cosine decay to 0, or constant",
                        choices=["cosine", "constant"])
    warmup_epochs: float = opt(1.0, "linear warm-up from 0 to lr", low=0.0, high=1000.0, unit="epochs")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy term", low=0.0, high=0.5)
    augment: str = opt("auto", "geometric augmentation: pad-crop (zero padding by --crop-padding and a random "
                       "crop back, for CIFAR-sized images), random-resized-crop (a random box of --rrc-scale-min/max area "
                       "share and --rrc-ratio-min/max aspect, resized back to the image size, for 224-pixel-class images) "
                       "or auto (pad-crop below 128 pixels on the shorter side, random-resized-crop from 128 up; the run "
                       "records which); maps compared by a loss take the same crop",
                       choices=["auto", "pad-crop", "random-resized-crop"])
    crop_padding: int = opt(4, "random crop after zero padding by this many pixels (0 = off)", low=0, high=64,
                            unit="pixels")
    rrc_scale_min: float = opt(0.08, "random-resized-crop: smallest area share of the box", low=0.0, high=1.0,
                               low_open=True)
    rrc_scale_max: float = opt(1.0, "random-resized-crop: largest area share of the box", low=0.0, high=1.0,
                               low_open=True)
    rrc_ratio_min: float = opt(0.75, "random-resized-crop: smallest aspect ratio (width / height) of the box",
                               low=0.01, high=100.0)
    rrc_ratio_max: float = opt(4 / 3, "random-resized-crop: largest aspect ratio of the box", low=0.01, high=100.0)
    flip: bool = opt(True, "random horizontal flip")
    val_fraction: float = opt(0.1, "stratified share of the training set held out for model selection",
                              low=0.0, high=0.5)
    subset: float = opt(1.0, "stratified share of the training set to use (drawn before the validation split; "
                        "samples keep their dataset indices, so stored maps and logits stay aligned)",
                        low=0.0, high=1.0, low_open=True)
    subset_seed: int = opt(0, "seed of the --subset draw (Monte Carlo runs give each run its own)",
                           low=0, high=2**31 - 1)
    seed: int = opt(0, "seed for initialisation, data order, augmentation and the validation split",
                    low=0, high=2**31 - 1)
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    channels_last: bool = opt(True, "channels_last memory format (faster convolutions on CPU and GPU)")
    eval_batch_size: int = opt(128, "images per forward pass when evaluating", low=1, high=65536, unit="images")
    stream: str = opt("auto", "data path: off keeps the training images, maps and logits on the training device "
                      "(CIFAR's fast path); on gathers each batch by sample index from memory (or the memory-mapped "
                      "image cache and store) on a background thread; auto streams when the images are "
                      "memory-mapped or images and maps exceed the memory budget (IGKD_DATA_MEMORY) or half of a "
                      "GPU's free memory. Both paths give identical batches", choices=["auto", "on", "off"])
    threads: int = opt(0, "CPU threads for torch (0 = torch's default; under torchrun on CPU: cores // processes "
                       "per machine)", low=0, high=1024)
    optimizer_impl: str = opt("auto", "optimizer kernel: auto (fused where torch has it), fused, foreach (multi-tensor)"
                              " or loop (one parameter at a time)", choices=["auto", "fused", "foreach", "loop"])
    amp: str = opt("auto", "mixed precision autocast, GPU only: auto (bf16 on CUDA, off on CPU), off, bf16, fp16 "
                   "(with loss scaling)", choices=["auto", "off", "bf16", "fp16"])
    log: str = opt("", "experiment trackers, a comma list of csv (RUN/log/*.csv), tensorboard, wandb, mlflow: "
                   "per-step and per-epoch scalars, rank 0 only; repeatable", metavar="NAME[,NAME...]", repeat=True)
    log_every: int = opt(20, "optimisation steps between logged per-step scalars (the mean over them)", low=1,
                         high=1 << 20, unit="steps")
    compile: bool = opt(False, "torch.compile the training forward (slower on 2 CPU cores and ~70 s to compile; "
                        "for GPUs)")


def teacher_normalize_opt(who: str):
    """The ``*_normalize`` option of a teacher file (``--teacher-normalize``, audit's and
    evaluate's teacher-correct one): the preprocessing put in front of it."""
    return opt("auto", f"{who} input preprocessing: auto = as its metadata says (raw [0,1] pixels for a foreign "
               "file), imagenet = torchvision's ImageNet mean/std (its checkpoints expect them), dataset = this "
               "data's mean/std, none", choices=["auto", "none", "dataset", "imagenet"])


@dataclass
class _PrecomputeBase(_Validated):
    """Options of ``igkd precompute``: teacher logits and IG maps for the training set."""

    ig_steps: int = opt(50, "integration steps of integrated gradients (the paper's 50)", low=1, high=4096)
    ig_method: str = opt("riemann_middle", "quadrature rule; riemann_middle is more accurate than the paper's "
                         "gausslegendre at equal steps on ReLU networks (README, 'The precompute'); fitted: "
                         "--ig-steps points and weights fitted to the teacher on --ig-fit-images training images",
                         choices=["gausslegendre", "riemann_left", "riemann_right", "riemann_middle",
                                  "riemann_trapezoid", "fitted"])
    ig_schedule: str = opt("", "with --ig-method fitted: a schedule file to use (JSON, as precompute writes when it "
                           "fits one); empty: fit one, or reuse the one already fitted for this teacher, data and "
                           "settings", metavar="FILE")
    ig_fit_images: int = opt(32, "with --ig-method fitted: training images the schedule is fitted on (a seeded "
                             "sample, none of them among the --check-images the error check holds out)", low=1,
                             high=4096, unit="images")
    ig_fit_reference: int = opt(512, "with --ig-method fitted: candidate points and Gauss-Legendre reference steps "
                                "of the fit (2 x this passes per fit image)", low=2, high=8192)
    ig_fit_seed: int = opt(0, "with --ig-method fitted: seed of the fit images", low=0, high=2**31 - 1)
    ig_baseline: str = opt("zero", "IG baseline: zero (zeros in the teacher's normalised input space, as the "
                           "paper's code), black (zero pixels) or blur (blurred image)",
                           choices=["zero", "black", "blur"])
    ig_batch: int = opt(0, "interpolated images per teacher forward+backward (0 = automatic)", low=0,
                        high=1 << 20, unit="images")
    chunk_size: int = opt(1024, "images per resumable chunk of the store", low=1, high=1 << 24, unit="images")
    attribution: str = opt(attributions.DEFAULT, "overlay attribution: " + attributions.help_text(),
                           choices=list(attributions.names()))
    map_dtype: str = opt("float16", "how maps are stored: float16 (2 bytes/pixel) or uint8 (1 byte/pixel, "
                         "quantised to 1/255 of the image's maximum)", choices=["float16", "uint8"])
    map_size: int = opt(0, "store maps at N x N pixels (the area mean of the full map), upsampled bilinearly on the "
                        "training device when used; 0 = the image size. 56 keeps 1/16 of a 224x224 map (README, "
                        "'The precompute')", low=0, high=4096, unit="pixels")
    check_images: int = opt(8, "before a new store is computed, estimate the map error of these settings against "
                            "a --check-steps reference on this many images (0 = skip)", low=0, high=4096,
                            unit="images")
    check_steps: int = opt(256, "integration steps of the reference for the error estimate", low=2, high=65536)
    verify_store: str = opt("auto", "check a finished store before using it: auto (sha256 of arrays changed since "
                            "last verified; always the cheap size and header check), always (sha256 of every "
                            "array), never (size and header only). A store that fails is recomputed",
                            choices=["always", "auto", "never"])


def refuse_taken(config: str, taken, owners: dict) -> None:
    """One line naming the first option of an extension (``owners``: option name -> ``method
    part 'x'`` or ``attribution 'y'``) that is already a field of ``config``: made into one
    dataclass, the extension's field silently replaced igkd's (a part's ``lr`` changed every
    run's learning rate), or igkd's replaced the extension's."""
    clash = sorted(set(owners) & set(taken))
    if clash:
        n = clash[0]
        other = attribution_owners().get(n)  # an attribution's option is a field of every config built on it
        where = f"which {other} declares too" if other and other != owners[n] else f"which {config} already has"
        raise UserError(f"{owners[n]} declares option {n!r}, {where}; name the option after its part or "
                        f"attribution (e.g. {owners[n].split()[-1].strip(chr(39)).replace('-', '_')}_{n})")


def attribution_owners() -> dict:
    return {n: f"attribution {e.name!r}" for e in attributions.entries() for n in e.fields}


def _extended(name: str, base: type, fields_: dict, doc: str, owners: dict | None = None,
              reserved: tuple = ()) -> type:
    """The dataclass ``name``: ``base`` and ``fields_`` (option name -> ``opt(...)``), as
    the registries declare them (a method part's, an attribution's options; ``owners``:
    who declared each, for the error when one is already an option of ``base`` or
    ``reserved``)."""
    refuse_taken(name, {*(f.name for f in fields(base)), *reserved}, owners or {})
    cls = dataclasses.make_dataclass(name, [(n, type(f.default), f) for n, f in fields_.items()], bases=(base,))
    # pickles and prints as the module of its base's: igkd.config.PrecomputeConfig, igkd.command_options.AuditConfig
    cls.__module__, cls.__qualname__, cls.__doc__ = base.__module__, name, doc
    return cls


# the base options and the own options of every registered attribution
# (:mod:`igkd.attribution.registry`): an attribution brings its options, help and ranges to
# the CLI, YAML and the API, as a method part does
PrecomputeConfig = _extended("PrecomputeConfig", _PrecomputeBase, attributions.config_fields(),
                             "Options of ``igkd precompute``: teacher logits and maps for the training set. The "
                             "options of each attribution come from its module in igkd/attribution/.",
                             attribution_owners())


@dataclass
class _DistillBase(TrainConfig, PrecomputeConfig):
    """The options of ``igkd distill`` that belong to no method part."""

    model: str = opt("mobilenetv2:drop=5", "student architecture spec (the paper's 4.12x student by default)",
                     metavar="SPEC")
    normalize: str = opt("none", "student input preprocessing: 'none' (the paper's, raw [0,1] pixels), "
                         "'dataset' or 'imagenet' (for a student --init from torchvision's weights)",
                         choices=["dataset", "none", "imagenet"])
    # train has no teacher to start from: the choice is distill's alone (and its --help's)
    init: str = opt("scratch", INIT_HELP + "; or teacher: the teacher's matching tensors (a truncated or "
                    "same-family student)", metavar="scratch|teacher|FILE")
    teacher: str = opt("", "teacher checkpoint (.safetensors from igkd train, or .pt with --teacher-model)",
                       metavar="CKPT")
    teacher_model: str = opt("", "architecture spec of a foreign teacher checkpoint without igkd metadata",
                             metavar="SPEC")
    teacher_normalize: str = teacher_normalize_opt("teacher")
    logits: str = opt("precomputed", "teacher logits: precomputed once on clean images (by sample index) or "
                      "online on each augmented batch (always online with a mixing part such as cutmix)",
                      choices=["precomputed", "online"])
    store: str = opt("", "precompute store directory (default: a fingerprinted folder in the cache)", metavar="DIR")
    scale_lr: bool = opt(False, "under torchrun: multiply lr by the number of processes (linear scaling rule; "
                         "the global batch is batch-size x processes)")
    sync_bn: bool = opt(True, "under torchrun: BatchNorm statistics over the global batch, so N processes train "
                        "like one process with N times the batch")


def _distill_config() -> type:
    """DistillConfig: the base options, ``method``, and the options of every registered
    method part (:mod:`igkd.distill.parts`), so a part brings its own options, help and
    ranges to the CLI, YAML and the API."""
    import importlib
    registry = importlib.import_module("igkd.distill.parts")
    method = opt("kd+ig", "parts joined with '+' (student = cross-entropy alone; e.g. kd+ig, the paper's): "
                 + registry.methods_help())
    return _extended("DistillConfig", _DistillBase, {"method": method, **registry.config_fields(freeze=True)},
                     "Options of ``igkd distill``; defaults are the paper's method settings. The fields of "
                     "each method part come from its module in igkd/distill/parts/.",
                     registry.field_owners(), reserved=("method",))


DistillConfig = _distill_config()


def _field_help(f: dataclasses.Field) -> str:
    m = f.metadata
    text = m.get("help", "")
    if m.get("choices"):
        text += f" [{'|'.join(map(str, m['choices']))}]"
    elif m.get("low") is not None:
        lo = "(" if m.get("low_open") else "["
        text += f" {lo}{m['low']}, {m['high']}]"
    if m.get("unit"):
        text += f" ({m['unit']})"
    if m.get("required"):
        return text + " (required)"
    if "(default:" in text:  # the help says what the default means (e.g. 'from the metadata')
        return text
    return text + f" (default: {'none' if f.default == '' else f.default})"


def _number(text: str):
    """``text`` as an int or float where it spells one (``'1e-3'``, ``'64'``), else unchanged."""
    for cast in (int, float):
        try:
            return cast(text.strip())
        except ValueError:
            pass
    return text


def validate(cfg) -> Any:
    """Check types and ranges; one-line UserError naming the field and the allowed values."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        m = f.metadata
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            if not isinstance(value, bool):
                raise UserError(f"{flag} must be true or false, got {value!r}")
        elif kind in (int, float):
            if isinstance(value, str):  # YAML reads '1e-3' (no dot before e) as a string
                value = _number(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{flag} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
            if not math.isfinite(value):  # before int(), which raises on inf and nan (YAML's .inf, .nan)
                raise UserError(f"{flag} {value} is out of range; use a finite number"
                                + (f" in [{m['low']}, {m['high']}]" if m.get("low") is not None else ""))
            if kind is int and value != int(value):
                raise UserError(f"{flag} must be an integer, got {value!r}")
            given, value = (value if kind is int else kind(value)), kind(value)
            setattr(cfg, f.name, value)
            if (m.get("low") is not None and (
                    value < m["low"] or value > m["high"] or (m.get("low_open") and value == m["low"]))):
                lo = "(" if m.get("low_open") else "["
                # the number as given: int(1e300) printed all of its 301 digits
                raise UserError(f"{flag} {given} is out of range; use a value in {lo}{m['low']}, {m['high']}]")
        elif kind is str and isinstance(value, PurePath) and f.name not in ("data", "model"):
            # a notebook's Path for a file or folder (teacher=Path(...)), as evaluate, audit and
            # export take one, was refused with "must be a string" (data and model are specs:
            # a Path there gets parse_spec's hint, imagefolder:PATH)
            setattr(cfg, f.name, str(value))
        elif not isinstance(value, str):
            is_module = callable(getattr(value, "state_dict", None))
            # only distill and train take a module (as an argument); audit, export, bench and the
            # experiments read files, and the hint would send their callers to distill
            if is_module and f.name in ("teacher", "model") and getattr(cfg, "takes_modules", False):
                keyword = "teacher" if f.name == "teacher" else "student"
                raise UserError(f"{flag} takes a spec or a checkpoint path; pass a torch.nn.Module as "
                                f"igkd.distill(cfg, out, {keyword}=module) (igkd.train(cfg, out, model=module))")
            if is_module and f.name in ("teacher", "model", "student", "weights", "teacher_correct"):
                raise UserError(f"{flag} takes a checkpoint path or a spec, not a {type(value).__name__} module; "
                                "save the module first (igkd.models.save_checkpoint) and pass its path")
            if f.name == "data" and callable(getattr(value, "fingerprint", None)):  # an igkd.data.Dataset
                raise UserError(f"{flag} takes a dataset spec string; pass a Dataset as igkd.train(cfg, out, "
                                "data=dataset) (igkd.distill, igkd.precompute, igkd.evaluate and igkd.export_model "
                                "take data= too)")
            # a module's or an array's repr runs to hundreds of lines: no one-line error then
            shown = repr(value)
            shown = shown if len(shown) <= 120 and "\n" not in shown else f"a {type(value).__name__}"
            raise UserError(f"{flag} must be a string, got {shown}")
        if m.get("choices") and value not in m["choices"]:
            raise UserError(f"{flag} {value!r} is not one of {', '.join(map(str, m['choices']))}")
    if getattr(cfg, "log", ""):
        # an unknown tracker or a missing package, refused with the config: checked only by the
        # trainer, distill refused it after the precompute had run (minutes to hours)
        from .loggers import parse_loggers
        parse_loggers(cfg.log)
    for lo, hi in (("rrc_scale_min", "rrc_scale_max"), ("rrc_ratio_min", "rrc_ratio_max")):
        if hasattr(cfg, lo) and getattr(cfg, lo) > getattr(cfg, hi):
            raise UserError(f"--{lo.replace('_', '-')} {getattr(cfg, lo)} is above --{hi.replace('_', '-')} "
                            f"{getattr(cfg, hi)}; give a range with min <= max")
    return cfg


SECTIONS = ("train", "precompute", "distill", "experiment", "demo", "evaluate", "bench", "export", "audit", "predict")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping. PyYAML keeps the
    last one silently, so a recipe with ``lr:`` twice (a copied line, an override added at
    the bottom) trained with whichever came last, and nothing said so. Keys brought in by a
    merge (``<<: *base``) may still be overridden: only the mapping's own keys count."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: construct_mapping names it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (lines {first} and {line}); keep one", None)
                seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml_file(path: str | Path, what: str = "config file"):
    """The parsed YAML (or JSON) document in ``path``, or a one-line UserError: missing file,
    a folder, not UTF-8, not valid YAML, a key given twice. ``SafeLoader``: no tags, no code."""
    path = Path(path)
    if not path.is_file():
        # only a recipe can be a shipped name; pointing a missing class map at 'igkd config
        # list' sent the user looking for the wrong thing
        fix = ("give a YAML file (igkd config list shows the shipped ones)" if what in ("config file", "demo recipe")
               else "give an existing JSON or YAML file")
        raise UserError(f"{what} {path} {'is a folder' if path.is_dir() else 'does not exist'}; {fix}")
    try:
        return yaml.load(recipe_text(path), Loader=_UniqueKeyLoader)  # safe: no tags, no code
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes nested lists and mappings recursively: a traceback
        raise UserError(f"{what} {path} nests lists or mappings thousands of levels deep, which no {what} "
                        "needs; fix the file") from None


def shipped_configs() -> dict[str, Path]:
    """The recipes inside the package (``igkd/configs/NAME.yaml``), by name."""
    folder = _package_folder() / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


# a value "assets/NAME" in a shipped recipe: a file shipped inside the igkd package
_SHIPPED_ASSET = re.compile(r"(?m)^([ \t]*[A-Za-z_][\w-]*:[ \t]+)assets/([^\s#'\"]+)")


def recipe_text(path: str | Path) -> str:
    """The text of the recipe file ``path``. In a shipped recipe (``igkd/configs/``), a value
    ``assets/NAME`` is a file shipped in the package and is written as its absolute path
    (``igkd config show`` prints this text too, so a copy runs anywhere). demo_experiments
    named its teacher src/igkd/assets/..., found only from the repository root: an installed
    igkd's recipe failed from every other folder. Other relative paths keep their meaning
    (relative to the current folder), in shipped recipes as in a user's own."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    shipped = _package_folder().resolve()
    if path.resolve().parent != shipped / "configs":
        return text
    # a JSON string is a YAML double-quoted scalar: any folder name reads back as written
    return _SHIPPED_ASSET.sub(lambda m: m.group(1) + json.dumps(str(shipped / "assets" / m.group(2))), text)


def _package_folder() -> Path:
    from importlib import resources
    return Path(str(resources.files("igkd")))


def find_config(value: str | Path) -> Path:
    """A ``--config`` value as a file: an existing file, else a shipped recipe's name, else
    the path (a folder is then named as one by :func:`read_yaml_file`).

    Only a file takes precedence over a shipped name: a folder named like a recipe (``igkd
    demo --out demo`` writes one into the working directory) hid the recipe, and every later
    ``--config demo`` there failed with "is a folder"."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(value) in shipped:
        return shipped[str(value)]
    if path.exists():
        return path
    raise UserError(f"config file {value} does not exist and is not a shipped recipe either (shipped: "
                    f"{', '.join(shipped)}; igkd config list)")


def load_yaml(path: str | Path, section: str | None) -> dict:
    """Read a YAML config; take ``section`` if the file has one, else the whole mapping (a
    file of sections without ``section`` is refused: none of it would apply).

    A section that is there but not a mapping (``distill: 5``) is an error: read as absent,
    it silently gave a run with every default."""
    path = find_config(path)
    doc = read_yaml_file(path) or {}
    if not isinstance(doc, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    for name in SECTIONS:
        if name in doc and not isinstance(doc[name], dict):
            raise UserError(f"section '{name}:' in {path} holds {doc[name]!r}, not a mapping of option: value; "
                            f"indent its options under '{name}:'")
    loose = [k for k in doc if k not in SECTIONS]
    sections = [k for k in doc if k in SECTIONS]
    if loose and sections:  # which command would they be for? Read as absent, a typo'd or misplaced
        # option silently gave a run with its default
        hints = [f"'{k}:' is not a section, did you mean '{_close(k, SECTIONS)}:'?" for k in loose
                 if _close(k, SECTIONS)]
        raise UserError(f"{path} has sections ({', '.join(s + ':' for s in sections)}) and also options at its top "
                        f"level ({', '.join(map(str, loose[:5]))}); {'; '.join(hints + [''])}indent each option "
                        "under the section of the command it is for")
    if section and section in doc:
        return _one_spelling(dict(doc[section]), f"section '{section}:' of {path}")
    if section and sections:
        # a recipe of other commands' sections: read as bare options, none of it applied and the
        # command ran on its defaults (igkd train --config demo_experiments trained a 30-epoch
        # default model, as if --config had not been given)
        raise UserError(f"{path} has no '{section}:' section (it has {', '.join(s + ':' for s in sections)}), so "
                        f"none of it is for this command; add a section '{section}:' or leave out --config")
    return _one_spelling({k: v for k, v in doc.items() if k not in SECTIONS}, str(path))


def _one_spelling(values: dict, where: str) -> dict:
    """``values``, refused where two keys spell one option (``batch-size:`` and
    ``batch_size:``): the later one in the file won, silently."""
    seen: dict[str, str] = {}
    for k in values:
        if isinstance(k, str):
            first = seen.setdefault(k.replace("-", "_"), k)
            if first != k:
                raise UserError(f"'{first}' and '{k}' in {where} both set option '{k.replace('-', '_')}'; keep one")
    return values


def _close(name, known) -> str | None:
    """The known name ``name`` is most likely a typo of (``epoch`` -> ``epochs``), or None."""
    import difflib
    if not isinstance(name, str):
        return None
    match = difflib.get_close_matches(name.replace("-", "_"), list(known), n=1, cutoff=0.75)
    return match[0] if match else None


def renamed(cls) -> dict[str, str]:
    """Old field name -> new one, for a config's options renamed within the last release
    (``cls.RENAMED``): still accepted on the command line and in YAML, with a warning."""
    return dict(getattr(cls, "RENAMED", {}))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _joined(f: dataclasses.Field, value):
    """A repeatable option's values (repeated flags, a YAML list) as one comma list; a YAML
    number given for a text option (``batch_size: 32`` of bench, a list of sizes) as text."""
    if f.metadata.get("repeat") and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(f.default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def build(cls, yaml_values: dict | None = None, overrides: dict | None = None, source: str = "config",
          cli: bool = False):
    """Defaults <- YAML values <- command-line overrides, then validate.

    ``cli``: also require the fields marked ``required`` (the command line has no
    default for them, whatever the dataclass says) in one line naming the option."""
    by_name = {f.name: f for f in fields(cls)}
    old_names = renamed(cls)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # option -> the YAML key that set it
    for k, v in (yaml_values or {}).items():
        # a YAML key that is not text (``1: 2``, ``null: x``) names no option: refused below as unknown
        key = k.replace("-", "_") if isinstance(k, str) else None
        if key not in by_name and key in old_names:
            deprecation_warning(f"'{k}'", f"'{old_names[key]}'", f" in {source}")
            key = old_names[key]
        if key not in by_name:
            raise _unknown_option(k, source, by_name, old_names)
        value = _joined(by_name[key], v)
        if key in values:
            if not by_name[key].metadata.get("repeat"):
                # an old and a new name (steps: 3, ig_steps: 4): the one later in the file won,
                # silently. (Two spellings of one name are refused per section by load_yaml: an
                # experiment's layers may respell what an earlier layer set.)
                raise UserError(f"'{spelled[key]}' and '{k}' in {source} both set option '{key}'; keep one")
            value = f"{values[key]},{value}"  # old and new name of a list: both count
        values[key], spelled[key] = value, k
    given = {}
    for k, v in (overrides or {}).items():
        # a Python caller's typo (experiments.resolve(kind, config, {"coslogit_wieght": 3})) was a
        # bare KeyError: the one line a YAML typo gets, and an old name taken as there
        if k not in by_name and k in old_names:
            deprecation_warning(f"'{k}'", f"'{old_names[k]}'", " in the overrides")
            k = old_names[k]
        if k not in by_name:
            raise _unknown_option(k, "the overrides", by_name, old_names)
        given[k] = v
    values.update({k: _joined(by_name[k], v) for k, v in given.items() if v is not None})
    cfg = validate(cls(**values))  # a bad value is named first, then a missing one
    if cli:
        for f in fields(cls):
            if f.metadata.get("required") and values.get(f.name) in (None, ""):
                raise UserError(f"{_flag(f.name)} is required; pass {_flag(f.name)} {_metavar(f)} or give "
                                f"'{f.name}:' in the --config YAML")
    return cfg


def _unknown_option(name, source: str, by_name: dict, old_names: dict) -> UserError:
    """The one line for an option no field has: a near miss named first (the list of a distill
    config's options runs to a thousand characters)."""
    near = _close(name, [*by_name, *old_names])
    section = _close(name, SECTIONS) if not near else None
    hint = (f" (did you mean '{near}'?)" if near else f" (did you mean the section '{section}:'?)" if section
            else "")
    return UserError(f"unknown option '{name}' in {source}{hint}; known options: {', '.join(sorted(by_name))}")


def _metavar(f: dataclasses.Field) -> str:
    return f.metadata.get("metavar") or f.name.upper()


def _parse_float(text: str) -> float:
    try:
        return float(text)  # nan and inf too: validate() names the range they are out of
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _value_type(kind):
    """How an option's text becomes its value; a bad one is a one-line argparse error."""
    from .cli_types import int_range
    return int_range() if kind is int else _parse_float if kind is float else kind


def add_arguments(parser: argparse.ArgumentParser, cls, main: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per config field; None means 'not given'.

    The fields named in ``main`` come first, in that order, in a group 'main options'
    shown before every other group of ``--help``; old names of renamed fields
    (``cls.RENAMED``) are hidden options that warn and set the new field."""
    from .cli_types import Deprecated
    by_name = {f.name: f for f in fields(cls)}
    group = parser.add_argument_group(f"{cls.__name__} options (also settable in --config YAML)")
    ordered = [by_name[n] for n in main if n in by_name] + [f for f in fields(cls) if f.name not in main]
    first = None
    if any(n in by_name for n in main):
        first = parser.add_argument_group("main options")
        parser._action_groups.remove(first)  # shown first, before --help and the command's own options
        parser._action_groups.insert(0, first)
    for f in ordered:
        target = first if f.name in main else group
        flag = _flag(f.name)
        kind = type(f.default)
        if kind is bool:
            target.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=_field_help(f))
        else:
            choices = f.metadata.get("choices")
            extra = {"action": "append"} if f.metadata.get("repeat") else {}
            target.add_argument(flag, dest=f.name, default=None, type=_value_type(kind), choices=choices,
                                metavar=None if choices else _metavar(f), help=_field_help(f), **extra)
    for old, new in renamed(cls).items():
        f = by_name[new]
        parser.add_argument(_flag(old), dest=new, default=None, type=_value_type(type(f.default)),
                            choices=f.metadata.get("choices"), action=Deprecated, new=_flag(new),
                            append=bool(f.metadata.get("repeat")), help=argparse.SUPPRESS)


def overrides_from(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name, None) for f in fields(cls)}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def init_file(init) -> bool:
    """Whether ``--init`` names a weights file (not scratch or teacher)."""
    return isinstance(init, str) and init not in ("scratch", "teacher")


# What a run recorded before an option existed ran with, where that is not the option's
# default now: every run before --augment (and its default auto) trained with pad-crop. A
# record without the option counted with today's default, auto, matched no resolved run
# (a resume was refused, an experiment trained its finished runs again).
PREDATED = {"augment": "pad-crop"}


def recorded_defaults(cls) -> dict:
    """The value each field of ``cls`` stands at in a run recorded before the field existed
    (a resume's config check, an experiment's finished runs, a search study's recipe)."""
    return {f.name: PREDATED.get(f.name, f.default) for f in fields(cls)}
