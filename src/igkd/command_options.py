"""Options of ``igkd evaluate``, ``igkd bench latency``, ``igkd export``, ``igkd audit`` and ``igkd predict``.

One dataclass per command, built with :func:`igkd.options.opt` like
:class:`igkd.config.TrainConfig`: each field is the command's option ``--field-name``
(help, choices, range, unit and default in ``--help``), a key of the command's YAML
section (``evaluate:``, ``bench:``, ``export:``, ``audit:``) and a keyword of the API
function (``igkd.evaluate``, ``igkd.bench_latency``, ``igkd.export_model``,
``igkd.audit``), whose defaults are these. No torch here: ``igkd --help`` stays fast.

Where an option is written (a file, a run folder) and how much is printed are not
options of the work and stay arguments of the command and the function, as for train.

Thread counts: 0 means torch's default in every command, except where the command
measures latency (``bench latency``, ``export --int8``): there one thread by default,
so numbers are comparable between runs and machines whatever else is running.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, fields
from typing import ClassVar

from .attribution import registry as attributions
from .config import PrecomputeConfig, _extended, _Validated, attribution_owners, renamed, teacher_normalize_opt
from .evaluate import corruptions as corruption_registry
from .options import opt

NORMALIZE_HELP = ("input preprocessing: auto = as the checkpoint's metadata says (none for foreign files), none = "
                  "raw [0,1] pixels, dataset = train-set mean/std, imagenet = torchvision's ImageNet mean/std")
THREADS_HELP = "CPU threads for torch (0 = torch's default)"
CORRUPTIONS_HELP = ("accuracy also under these corruptions, computed on the fly, at the five severities of "
                    "CIFAR-10-C (Hendrycks and Dietterich 2019), with the mean over the severities and over the "
                    "corruptions: a comma list of " + corruption_registry.help_text() + "; or 'all' (default: none)")
LATENCY_THREADS_HELP = ("CPU threads while timing: torch.set_num_threads and ONNX Runtime intra_op_num_threads; "
                        "one by default, unlike other commands' 0 (torch's default), so latencies are comparable "
                        "between runs and machines")


@dataclass
class PrecomputeCommandConfig(PrecomputeConfig):
    """Options of ``igkd precompute``: the store's settings (:class:`PrecomputeConfig`,
    what the maps depend on) and where the teacher, the data and the store are."""

    teacher: str = opt("", "teacher checkpoint (.safetensors from igkd train, or .pt with --teacher-model)",
                       required=True, metavar="CKPT")
    teacher_model: str = opt("", "architecture spec of a foreign teacher checkpoint without igkd metadata",
                             metavar="SPEC")
    teacher_normalize: str = teacher_normalize_opt("teacher")
    data: str = opt("", "dataset spec; the maps are of its training split", required=True, metavar="SPEC")
    store: str = opt("", "store directory (default: a fingerprinted folder in the cache)", metavar="DIR")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    threads: int = opt(0, THREADS_HELP + "; under torchrun on CPU: cores // processes per machine", low=0,
                       high=1024)

    def settings(self) -> PrecomputeConfig:
        """The store's settings alone (what its identity and manifest are made of)."""
        return PrecomputeConfig(**{f.name: getattr(self, f.name) for f in fields(PrecomputeConfig)})


@dataclass
class EvaluateConfig(_Validated):
    """Options of ``igkd evaluate``: score a checkpoint on a dataset's test split."""

    weights: str = opt("", ".safetensors (igkd) or .pt/.pth state dict", required=True, metavar="FILE")
    data: str = opt("", "dataset spec; its test split is scored", required=True, metavar="SPEC")
    model: str = opt("", "architecture spec, required for files without igkd metadata (default: from the "
                     "metadata)", metavar="SPEC")
    normalize: str = opt("auto", NORMALIZE_HELP, choices=["auto", "none", "dataset", "imagenet"])
    teacher: str = opt("", "teacher checkpoint or spec, to report the compression factor", metavar="CKPT|SPEC")
    batch_size: int = opt(128, "images per forward pass", low=1, high=65536, unit="images")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    threads: int = opt(0, THREADS_HELP, low=0, high=1024)
    class_map: str = opt("", "JSON/YAML file mapping the data's class names to the model's (with 'classes:' for "
                         "checkpoints without metadata); images of unmapped classes are dropped and counted "
                         "(default: none, the classes must match)", metavar="FILE")
    teacher_correct: str = opt("", "teacher-correct protocol: run this teacher (with the same --class-map applied to "
                               "its classes) on the test images and score the model only on the images the "
                               "teacher classifies correctly; reports how many that leaves and the teacher's "
                               "accuracy (default: off, every image is scored)", metavar="CKPT")
    teacher_correct_model: str = opt("", "architecture of the --teacher-correct checkpoint when it has no igkd "
                                     "metadata (foreign .pt) (default: from its metadata)", metavar="SPEC")
    teacher_correct_normalize: str = teacher_normalize_opt("--teacher-correct teacher")
    corruptions: str = opt("", CORRUPTIONS_HELP, metavar="NAME[,NAME...]", repeat=True)
    corruption_seed: int = opt(0, "seed of the corruptions' random numbers (per image, so independent of the batch "
                               "size and device)", low=0, high=2**31 - 1)
    corruption_images: int = opt(0, "score the corruptions on this many of the scored test images, evenly spaced "
                                 "(0 = all); each corruption costs five passes over them, and the clean accuracy "
                                 "on the same images is reported beside", low=0, high=1 << 30, unit="images")

    def __post_init__(self) -> None:
        super().__post_init__()
        corruption_registry.parse(self.corruptions)  # an unknown name: one line listing the valid ones


@dataclass
class LatencyConfig(_Validated):
    """Options of ``igkd bench latency`` (YAML section ``bench:``)."""

    RENAMED: ClassVar[dict] = {"batch": "batch_size"}

    model: str = opt("", "model specs, the reference (teacher) first; repeatable (default: none, from --weights "
                     "metadata)", metavar="SPEC[,SPEC...]", repeat=True)
    weights: str = opt("", "checkpoints, one per --model (or alone, with igkd metadata); they give the size on "
                       "disk (default: none, untrained weights; latency does not depend on their values)",
                       metavar="FILE[,FILE...]", repeat=True)
    batch_size: str = opt("1", "batch sizes, a comma list; repeatable", metavar="N[,N...]", repeat=True)
    threads: int = opt(1, LATENCY_THREADS_HELP, low=1, high=1024)
    runtime: str = opt("eager", "eager (PyTorch), compiled (torch.compile, compiled during warm-up) and/or "
                       "onnxruntime (exported to ONNX; needs igkd[export]), a comma list; repeatable",
                       metavar="R[,R...]", repeat=True)
    input: str = opt("3x32x32", "image shape of models given by spec (checkpoints use their metadata)",
                     metavar="CxHxW")
    classes: int = opt(10, "classes of models given by spec", low=1, high=1 << 20)
    warmup: int = opt(10, "untimed calls first", low=0, high=1 << 20, unit="calls")
    min_time: float = opt(1.0, "timed calls last at least this long", low=0.0, high=86400.0, unit="seconds")
    min_reps: int = opt(10, "timed calls at least", low=1, high=1 << 24, unit="calls")
    max_reps: int = opt(10000, "timed calls at most", low=1, high=1 << 24, unit="calls")


@dataclass
class ExportConfig(_Validated):
    """Options of ``igkd export`` (the file written is ``--output``, not an option of the export)."""

    weights: str = opt("", ".safetensors (igkd) or .pt/.pth state dict", required=True, metavar="FILE")
    format: str = opt("auto", "output format; auto: by --output's name, ONNX for *.onnx, TorchScript for *.pt, "
                      "*.pth, *.ts", choices=["auto", "onnx", "torchscript"])
    model: str = opt("", "architecture spec, required for files without igkd metadata (default: from the "
                     "metadata)", metavar="SPEC")
    data: str = opt("", "dataset for the parity check (its test split) and int8 calibration (its training "
                    "split) (default: none, the dataset named in the checkpoint's metadata: igkd's own kinds "
                    "only, never downloaded)", metavar="SPEC")
    normalize: str = opt("auto", NORMALIZE_HELP, choices=["auto", "none", "dataset", "imagenet"])
    images: int = opt(0, "parity (and the int8 check) on N test images, evenly spaced over the split; 0 = all",
                      low=0, high=1 << 30, unit="images")
    atol: float = opt(1e-3, "largest allowed |logit difference| between the export and PyTorch", low=0.0,
                      high=1e6)
    min_agreement: float = opt(99.9, "least top-1 agreement with PyTorch", low=0.0, high=100.0, unit="percent")
    int8: bool = opt(False, "write a static int8 model (ONNX Runtime QDQ, per-channel) instead of fp32")
    max_int8_drop: float = opt(1.0, "largest allowed fall of test accuracy from the fp32 export to the int8 model; "
                               "beyond it nothing is written (100 = no gate)", low=0.0, high=100.0, unit="points")
    calibration_images: int = opt(256, "training images to calibrate int8 activation ranges on", low=1,
                                  high=1 << 20, unit="images")
    threads: int = opt(1, LATENCY_THREADS_HELP + " (the int8 vs fp32 latency)", low=1, high=1024)
    min_time: float = opt(1.0, "timed calls per latency measurement last at least this long", low=0.0,
                          high=86400.0, unit="seconds")


@dataclass
class _AuditBase(_Validated):
    """The options of ``igkd audit`` that belong to no attribution."""

    RENAMED: ClassVar[dict] = {"steps": "ig_steps", "baseline": "ig_baseline"}

    teacher: str = opt("", "teacher checkpoint", required=True, metavar="CKPT")
    student: str = opt("", "student checkpoints (e.g. a KD+IG one and a plain one); repeatable", required=True,
                       metavar="CKPT[,CKPT...]", repeat=True)
    data: str = opt("", "dataset spec; images come from its test split", required=True, metavar="SPEC")
    teacher_model: str = opt("", "architecture of a foreign teacher file (default: from its metadata)",
                             metavar="SPEC")
    teacher_normalize: str = teacher_normalize_opt("teacher")
    student_model: str = opt("", "architecture of foreign student files, e.g. mobilenetv2:drop=5 for the "
                             "paper's: one for every student, or one per --student in their order, empty where "
                             "the file's metadata names it, separated by ';' (quote a path holding ';') (default: from their "
                             "metadata)",
                             metavar="SPEC[;SPEC...]")
    images: int = opt(64, "test images, evenly spaced over the split", low=1, high=1 << 20, unit="images")
    target: str = opt("label", "class each model attributes: the true label (the same question for all) or its "
                      "own prediction", choices=["label", "predicted"])
    topk: float = opt(10.0, "share of pixels in the top-k overlap", low=0.0, high=100.0, low_open=True,
                      unit="percent")
    attribution: str = opt(attributions.DEFAULT, "attribution whose maps are compared: " + attributions.help_text()
                           + "; --ig-steps and --ig-baseline apply to ig, each attribution's own options (as in "
                           "precompute) to it, the same for every model; a --gradcam-layer other than auto must "
                           "name a layer of every model", choices=list(attributions.names()))
    ig_steps: int = opt(32, "integration steps of integrated gradients (Gauss-Legendre)", low=1, high=4096)
    ig_baseline: str = opt("black", "IG baseline, the same pixels for every model unless zero (= each model's "
                           "normalised zero)", choices=["black", "zero", "blur"])
    gallery: int = opt(8, "rows (images) in audit.png; 0 = none", low=0, high=10000, unit="images")
    threads: int = opt(0, THREADS_HELP, low=0, high=1024)


# the base options and every registered attribution's own (smoothgrad's samples, gradcam's
# layer, a plug-in's), as precompute takes them: an audit compares the maps precompute makes
AuditConfig = _extended("AuditConfig", _AuditBase, attributions.config_fields(),
                        "Options of ``igkd audit``: do students attribute like their teacher? The options of "
                        "each attribution come from its module in igkd/attribution/.", attribution_owners())


@dataclass
class PredictConfig(_Validated):
    """Options of ``igkd predict`` (the image files are its arguments, not options)."""

    weights: str = opt("", "what classifies: an igkd checkpoint (.safetensors), an igkd export (.onnx, or a "
                       "TorchScript file igkd export wrote), or a foreign .pt/.pth state dict with --model, "
                       "--classes and --size", required=True, metavar="FILE")
    model: str = opt("", "architecture spec, required for files without igkd metadata (default: from the "
                     "metadata)", metavar="SPEC")
    classes: str = opt("", "class names of a file that records none, in output order: a comma list or a text "
                       "FILE with one name per line (default: the recorded ones)", metavar="NAMES|FILE")
    normalize: str = opt("auto", NORMALIZE_HELP + " (an export has its own inside)",
                         choices=["auto", "none", "dataset", "imagenet"])
    size: str = opt("", "input size N or HxW each image is brought to (default: the size the model was trained "
                    "or exported at)", metavar="N|HxW")
    resize: str = opt("auto", "how an image reaches --size: fixed (straight to HxW), shorter (shorter side to the "
                      "size, then a centre crop, keeping the aspect ratio), or auto = as the training data was "
                      "(an image folder's resize=; fixed otherwise)", choices=["auto", "fixed", "shorter"])
    top: int = opt(5, "classes listed per image, most probable first", low=1, high=100000)
    batch_size: int = opt(64, "images decoded and run at once", low=1, high=65536, unit="images")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N (a checkpoint; an export runs on "
                      "the CPU)")
    threads: int = opt(0, THREADS_HELP, low=0, high=1024)


# Keyword names the API functions took before their options became these dataclasses.
API_RENAMED = {
    "LatencyConfig": {"models": "model", "batches": "batch_size", "runtimes": "runtime", "input_shape": "input",
                      "num_classes": "classes"},
    "AuditConfig": {"students": "student", "gallery_images": "gallery"},
}


def api_config(cls, config, options: dict, function: str):
    """The config of an API call: ``config`` (default: the dataclass's defaults) with
    ``options`` (field names; ``None`` = not given) replaced and validated.

    Old keyword names (``steps=`` for ``ig_steps=``) still work with a DeprecationWarning;
    paths may be ``Path`` objects, list options lists."""
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"{function}(config=...) takes an {cls.__name__}, got {type(config).__name__}")
    by_name = {f.name: f for f in fields(cls)}
    old = {**renamed(cls), **API_RENAMED.get(cls.__name__, {})}
    values = {}
    for key, value in options.items():
        if value is None:
            continue
        if key not in by_name and key in old:
            warnings.warn(f"{function}({key}=...) is deprecated; use {old[key]}=...", DeprecationWarning,
                          stacklevel=3)
            key = old[key]
        if key not in by_name:
            raise TypeError(f"{function}() got an unexpected keyword argument '{key}' (its options: "
                            f"{', '.join(by_name)})")
        kind = type(by_name[key].default)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif kind is str and isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        values[key] = value
    return dataclasses.replace(config, **values) if config is not None else cls(**values)


__all__ = ["API_RENAMED", "AuditConfig", "EvaluateConfig", "ExportConfig", "LatencyConfig", "api_config"]
