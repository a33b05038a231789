"""``igkd export``: a checkpoint to ONNX or TorchScript (optionally int8), preprocessing
inside the graph, written only when it passes a parity check against PyTorch.

The exporters themselves (ONNX bytes, TorchScript module, int8 quantisation, runners)
are the library module :mod:`igkd.export`; this is the command around them."""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch

from ..api import check_outputs, given_module, module_input, preprocessing_for, warn_unknown_preprocessing
from ..command_options import ExportConfig, api_config
from ..data import Dataset, load_dataset
from ..data.imagefolder import input_recipe
from ..evaluate.classmap import shown
from ..data.memory import given_data, is_memory_spec
from ..errors import UserError, cause
from ..evaluate import predict
from ..evaluate.corruptions import evenly_spaced
from ..evaluate.cost import check_budget, measure_latency
from ..export import embed_metadata, load_runner, logits_of, onnx_bytes, parity, quantize_int8, require_onnxruntime, torchscript_module
from ..fileio import atomic_path, file_sha256, finite, native_path, writable_dir, writable_file, write_json
from ..lock import folder_held
from ..models import bare, holds_own_weights, load_model, read_metadata, weights_fingerprint
from ..progress import log
from ..spec import Spec, parse_spec
from .common import existing

FORMATS = ("onnx", "torchscript")


def export_model(weights=None, output: str | Path | None = None, format: str | None = None, *,
                 config: ExportConfig | None = None, report_dir: str | Path | None = None, quiet: bool = False,
                 out: str | Path | None = None, **options) -> dict:
    """Export a checkpoint to ONNX or TorchScript, preprocessing included, and check it.

    Parity: the exported model and PyTorch run the test split of ``data`` (a spec, or an
    :class:`igkd.data.Dataset`, e.g. in memory from :func:`igkd.data.from_tensors`, then
    recorded as its ``memory:sha256=HEX``; ``images`` evenly spaced test images when > 0;
    default the dataset named in the checkpoint's metadata, if one of igkd's own kinds,
    never downloaded); the export is kept only if
    max |logit difference| <= ``atol`` and top-1 agrees on >= ``min_agreement`` percent. With
    ``int8`` (ONNX only) the written model is quantised
    (ONNX Runtime static QDQ, per-channel, calibrated on ``calibration_images`` training
    images); its accuracy, agreement and latency are reported next to the fp32 export's, and
    it is kept only if its test accuracy is at most ``max_int8_drop`` points below fp32.
    Writes ``output`` and ``output.json`` (input shape, dtype, value range,
    preprocessing, class names, parity), and ``report_dir/export.json`` when given.

    ``weights`` may also be an ``nn.Module`` (a network :func:`igkd.distill` or
    :func:`igkd.train` just trained in place, say), exported as it is with its outputs read
    as the classes of ``data`` (then required), in order, and ``normalize`` as
    :func:`igkd.evaluate` takes it for a module: ``auto``, the normalisation the run trained
    it behind, or none for a module igkd did not train. It comes back on its device with its
    training flags; the sidecar's ``source`` names its class and weights fingerprint.

    The options are the fields of :class:`igkd.command_options.ExportConfig`, as keywords
    or ``config``: one dataclass gives the command line, the YAML section ``export:`` and
    these defaults. ``out=`` is the old name of ``output`` (DeprecationWarning).
    """
    if out is not None:
        warnings.warn("export_model(out=...) is deprecated; use output=...", DeprecationWarning, stacklevel=2)
        output = output if output is not None else out
    if output is None:
        raise UserError("no file to write; pass --output FILE (*.onnx for ONNX, e.g. *.pt for TorchScript)")
    given = None
    module, weights = given_module(weights, options, config, "export_model got a module to export and a model spec")
    if isinstance(options.get("data"), Dataset):  # the config holds a spec string: the one it is recorded as
        given, options["data"] = given_data(options["data"])
    cfg = api_config(ExportConfig, config, {"weights": weights, "format": format, **options}, "export_model")
    if not cfg.weights:
        raise UserError("no checkpoint to export; pass --weights FILE")
    weights, format, int8 = cfg.weights, cfg.format, cfg.int8
    output = native_path(writable_file(output, "--output"), "--output")  # ONNX Runtime and TorchScript open it
    if format == "auto":  # --output x.pt without --format torchscript was refused as not fitting onnx
        format = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript"}.get(
            output.suffix.lower(), "")
        if not format:
            raise UserError(f"--output {output}: its name says no format; name it *.onnx (ONNX) or *.pt "
                            "(TorchScript), or pass --format onnx|torchscript")
    if report_dir:
        writable_dir(report_dir, "--report-dir")
    if (output.suffix == ".onnx") != (format == "onnx") or output.suffix == ".json":
        raise UserError(f"--output {output} does not fit --format {format}; name ONNX files *.onnx and TorchScript "
                        "files e.g. *.pt")
    if int8 and format != "onnx":
        raise UserError("--int8 needs --format onnx (ONNX Runtime quantisation)")
    check_budget(1, 1, cfg.min_time, 1, 10000)
    if module is None:
        if _weights_file(weights).suffix in (".safetensors", ".json") or holds_own_weights(str(weights)):
            native_path(_weights_file(weights), "--weights")  # opened by safetensors or TorchScript
        meta = read_metadata(existing(_weights_file(weights), "weights file")) or {}
    else:
        meta = {}
    _check_clobber(output, _weights_file(weights) if module is None else None)
    if format == "onnx":
        require_onnxruntime()
    data = cfg.data or (_recorded_dataset(meta.get("dataset", ""), weights) if module is None else "")
    if not data:
        if module is not None:
            raise UserError("a module records no dataset; pass data= (a spec or an igkd Dataset) for its classes "
                            "and the parity check (its test split)")
        raise UserError(f"{weights} names no dataset; pass --data SPEC for the parity check (its test split)")
    try:
        dataset = given if given is not None else load_dataset(data)
    except UserError as e:
        if cfg.data:
            raise
        # the user typed no dataset: a spec recorded with a relative path fails from another folder,
        # and the bare "does not exist" did not say where the spec came from
        fix = "pass --data SPEC (the same data)"
        if is_memory_spec(data):
            fix = "pass the same data as igkd.export_model(..., data=dataset), or --data SPEC of it on disk,"
        raise UserError(f"the dataset {weights} was trained on ({data}, from its metadata) cannot be loaded: "
                        f"{str(e).split(';')[0]}; {fix} for the parity check") from None
    if meta.get("classes") and meta["classes"] != dataset.classes:
        raise UserError(f"{weights} was trained on {shown(meta['classes'])}; {dataset.spec} has "
                        f"{shown(dataset.classes)}; pass the --data it was trained on")
    if int8:  # said now, not after the fp32 export and its parity check
        dataset.require_train("--int8 calibrates on training images")
    trained = meta.get("image_size")
    if trained and list(trained) != list(dataset.image_size):
        # the export's input size is fixed to the data's: a file for another size than the model
        # learnt on was written, and its sidecar advertised that size
        raise UserError(f"{weights} was trained on {'x'.join(map(str, trained))} images, {dataset.spec} has "
                        f"{'x'.join(map(str, dataset.image_size))}; pass the --data it was trained on (an image "
                        f"folder: add ,size={'x'.join(map(str, trained))})")
    if module is not None:  # exported as it is: its outputs are the data's classes, in order
        net, pre = module_input(module, cfg.normalize, dataset)
        meta = {"model": weights, "preprocessing": pre}
        check_outputs(net, dataset, f"the module {type(module).__name__}", split="test")
    else:
        pre = preprocessing_for(cfg.normalize, dataset)
        net, meta = load_model(weights, cfg.model or None, len(dataset.classes), dataset.channels, pre,
                               image_size=dataset.image_size)
        warn_unknown_preprocessing(weights, cfg.normalize, "--normalize")
    shape = (dataset.channels, *dataset.image_size)
    # evenly spaced, not the first N: an image folder lists its test split class by class, and the
    # first N images were of one class (the int8 accuracy gate then saw that class alone)
    test = dataset.test if not cfg.images else dataset.test.subset(evenly_spaced(len(dataset.test), cfg.images))
    log(f"export: {meta['model']} -> {output} ({format}{', int8' if int8 else ''}), parity on {len(test)} test "
        "images", quiet)
    # on the module's own device: a notebook's CUDA module is not moved for the reference
    reference = predict(net, test.images, device=next((p.device for p in net.parameters()), torch.device("cpu")))
    accuracy = lambda logits: 100.0 * float((logits.argmax(1) == test.labels).float().mean())  # noqa: E731
    result: dict = {"out": str(output), "format": format, "int8": int8,
                    "weights": str(weights) if module is None else None,
                    "model": meta["model"], "data": dataset.spec, "accuracy_pytorch": accuracy(reference)}
    atol, min_agreement = cfg.atol, cfg.min_agreement
    # the file and its sidecar land together under the output folder's flock: two exports to one
    # --output at once left one's file beside the other's sidecar (other weights, sha256, parity)
    with ExitStack() as landing, atomic_path(output) as tmp:
        if format == "onnx":
            fp32 = onnx_bytes(net, shape)
            tmp.write_bytes(fp32)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                torch.jit.save(torchscript_module(net, shape), str(tmp))
        exported = _exported_logits(tmp, format, test.images)
        check = {**parity(reference, exported), "atol": atol, "min_agreement": min_agreement}
        if check["max_abs_diff"] > atol or check["top1_agreement"] < min_agreement:
            raise UserError(f"parity check failed: max |logit diff| {check['max_abs_diff']:.3g} (allowed {atol}), "
                            f"top-1 agreement {check['top1_agreement']:.2f}% (needed {min_agreement}); nothing written")
        result["parity"] = check
        if int8:
            calib = _calibration_set(dataset, cfg.calibration_images)
            quantize_int8(fp32, tmp, calib)
            q = _exported_logits(tmp, format, test.images)
            drop = accuracy(exported) - accuracy(q)
            if drop > cfg.max_int8_drop:  # quantisation can wreck a model (depthwise convs, odd ranges)
                raise UserError(
                    f"int8 check failed: test accuracy {accuracy(q):.2f}% against {accuracy(exported):.2f}% in fp32 "
                    f"on {len(test)} images ({drop:.2f} points lower, allowed {cfg.max_int8_drop:g}); nothing "
                    "written; calibrate on more images (--calibration-images), export fp32 (no --int8), or allow "
                    "more with --max-int8-drop")
            fp32_lat = measure_latency(fp32, shape, 1, cfg.threads, 10, cfg.min_time, runtime="onnxruntime")
            int8_lat = measure_latency(tmp, shape, 1, cfg.threads, 10, cfg.min_time, runtime="onnxruntime")
            result["int8_check"] = {
                **parity(reference, q), "calibration_images": len(calib), "accuracy_fp32": accuracy(exported),
                "accuracy_int8": accuracy(q), "accuracy_change": accuracy(q) - accuracy(exported),
                "max_int8_drop": cfg.max_int8_drop,
                "latency_fp32_ms": fp32_lat["median_ms"], "latency_int8_ms": int8_lat["median_ms"],
                "speedup": fp32_lat["median_ms"] / int8_lat["median_ms"], "threads": cfg.threads, "batch": 1}
            if result["int8_check"]["speedup"] < 1:  # written all the same (it passed its gates), said plainly
                log(f"igkd: warning: the int8 model runs {1 / result['int8_check']['speedup']:.2f}x slower than fp32 "
                    f"here (batch 1, {cfg.threads} thread(s)): its quantise and dequantise steps cost more than its int8 "
                    "arithmetic saves on this CPU; deploy the fp32 export (no --int8) unless the target "
                    "runs int8 kernels the CPU here lacks")
        source = ({"weights": str(weights), "sha256": file_sha256(_weights_file(weights))} if module is None else
                  {"weights": None, "module": type(module).__name__, "weights_fingerprint": weights_fingerprint(bare(module))})
        sidecar = _sidecar(output, format, int8, source, meta, dataset, shape, result)
        embed_metadata(tmp, finite(sidecar), format)  # inside the file too: it travels without the .json
        result["bytes"] = tmp.stat().st_size
        landing.enter_context(folder_held(output.parent))
        # an earlier export's sidecar goes before the new file takes its name: a kill between the two
        # renames left the new model beside a .json describing the old one (its spec, classes,
        # source); now it is beside none, and its own embedded metadata still describes it
        Path(f"{output}.json").unlink(missing_ok=True)
        if report_dir:  # likewise the run's export.json: a kill before it is rewritten left the old export's
            (Path(report_dir) / "export.json").unlink(missing_ok=True)

        def land(failed, *_) -> None:  # after atomic_path renamed the file, before the flock is dropped
            if failed is None:
                write_json(Path(f"{output}.json"), sidecar)
        landing.push(land)
    result["sidecar"] = f"{output}.json"
    if report_dir:
        write_json(Path(report_dir) / "export.json", result)
    return result


# the dataset kinds igkd itself defines: what a file's metadata may name (see _recorded_dataset)
RECORDED_KINDS = ("cifar10", "cifar100", "imagefolder", "fashion-mnist", "demo", "memory")  # memory: loads nothing


def _recorded_dataset(text: str, weights) -> str:
    """The dataset spec a checkpoint records, made safe to load without the user naming it:
    the file chose it, not the user. An installed plug-in's kind would run that plug-in's code on
    the file's say, and ``cifar10:DIR`` (download on by default) made export create DIR wherever the
    file said and download into it; so only igkd's own kinds are taken, never downloading
    (``download=0``): a spec that cannot be read as it is asks for --data."""
    if not text:
        return ""
    spec = parse_spec(text, f"dataset spec recorded in {weights}")
    if spec.kind not in RECORDED_KINDS:
        raise UserError(f"{weights} records dataset {text!r}, which is not one of igkd's own kinds "
                        f"({', '.join(RECORDED_KINDS)}); igkd loads no other data a file names: pass --data SPEC "
                        "(the same data) for the parity check")
    if spec.kind in ("cifar10", "cifar100"):
        spec = Spec(spec.kind, spec.arg, {**spec.options, "download": "0"})
    return str(spec)


def _exported_logits(path: Path, format: str, images: torch.Tensor) -> torch.Tensor:
    """Logits of the exported file on ``images`` (in batches of up to 256), or a one-line
    UserError when it cannot run them: a model whose code makes the batch size a constant
    (``int(x.shape[0])``) was exported for the tracing batch alone, and the parity check
    died with ONNX Runtime's or TorchScript's traceback."""
    run = load_runner(path, format=format)

    def checked(x: torch.Tensor) -> torch.Tensor:
        out = run(x)
        if out.ndim != 2 or len(out) != len(x):  # fill_rows would broadcast one row over the batch
            raise ValueError(f"{len(x)} images gave logits of shape {tuple(out.shape)}")
        return out
    try:
        return logits_of(checked, images)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the runtime raises on the exported graph
        raise UserError(f"parity check failed: the exported model cannot run {min(len(images), 256)} test images "
                        f"at once ({cause(e)}); nothing written. A model whose code makes the batch "
                        "size a constant (int(x.shape[0])) exports for one batch size only: compute shapes with "
                        "tensor operations (x.flatten(1))") from None


def _weights_file(weights) -> Path:
    """The file of ``--weights``: itself, or the FILE of a ``torchscript:FILE`` spec, which
    holds its weights as distill's --teacher takes it (the spec was looked for as a file
    and said not to exist)."""
    return Path(parse_spec(str(weights)).arg if holds_own_weights(str(weights)) else weights)


def _check_clobber(output: Path, weights: Path | None) -> None:
    """Refuse an --output that would overwrite the checkpoint being exported, or whose
    ``output.json`` sidecar would overwrite a file igkd's export did not write: ``--output
    run/model`` wrote ``run/model.json`` over the checkpoint's own metadata (the checkpoint then
    no longer loaded), ``--output run/summary`` over the run's summary."""
    sources = [weights] if weights is not None else []  # None: a module, no file of its own
    if weights is not None and weights.suffix in (".safetensors", ".json"):  # an igkd checkpoint is a .safetensors and its .json
        sources += [weights.with_suffix(".safetensors"), weights.with_suffix(".json")]
    sidecar = Path(f"{output}.json")
    for path, what in ((output, "the exported file"), (sidecar, "its metadata file")):
        if any(os.path.abspath(path) == os.path.abspath(s) or (path.exists() and s.exists() and
                                                              os.path.samefile(path, s)) for s in sources):
            raise UserError(f"--output {output}: {what} {path} would overwrite the checkpoint being exported; "
                            "choose another --output")
    if sidecar.is_file() and export_sidecar(sidecar) is None:
        raise UserError(f"--output {output}: its metadata file {sidecar} exists and is not an igkd export's; "
                        "choose another --output (e.g. one ending in .onnx or .pt)")


def export_sidecar(path: Path) -> dict | None:
    """The metadata file ``path`` as an igkd export wrote it, or None (absent, unreadable, not
    JSON, or another file's)."""
    import json
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == "igkd-export/1" else None


def _calibration_set(dataset: Dataset, n: int) -> torch.Tensor:
    """``n`` training images, a seeded random choice (calibration never sees the test split)."""
    train = dataset.train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    return train.images[idx]


def _sidecar(out: Path, format: str, int8: bool, source: dict, meta: dict, dataset: Dataset, shape, result: dict) -> dict:
    pre = meta["preprocessing"]
    return {
        "format": "igkd-export/1", "file": out.name, "runtime_format": format, "int8": int8,
        "model": meta["model"], "source": source,
        "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32", "layout": "NCHW",
                  "value_range": [0.0, 1.0], "channels": "grayscale" if shape[0] == 1 else "RGB"},
        "output": {"name": "logits", "shape": ["batch", len(dataset.classes)],
                   "meaning": "unnormalised class scores; softmax gives probabilities"},
        "preprocessing": {**pre, "in_graph": True, "note": "pixels / 255 -> [0, 1] is the caller's job; "
                          "any mean/std normalisation listed here is inside the exported graph"},
        "classes": dataset.classes,
        # how an image file becomes the input, as the training images were made (and igkd predict does)
        "image": input_recipe(dataset.spec, dataset.image_size, dataset.channels),
        # the file's own parity: for int8, the quantised model's against PyTorch (the fp32 graph's,
        # which gates the export, is kept beside it)
        "parity": {k: result["int8_check"][k] for k in result["parity"] if k in result["int8_check"]} if int8
        else result["parity"],
        **({"parity_fp32": result["parity"], "int8_check": result["int8_check"]} if int8 else {}),
    }


def export_summary(r: dict) -> str:
    p = r["parity"]
    lines = [f"{r['model']} -> {r['out']} ({r['format']}{', int8' if r['int8'] else ''}, {r['bytes']:,} bytes; "
             f"metadata {r['sidecar']})",
             f"parity (fp32 export vs PyTorch, {p['images']} test images of {r['data']}): max |logit diff| "
             f"{p['max_abs_diff']:.2e} (<= {p['atol']}), top-1 agreement {p['top1_agreement']:.2f}%"]
    if r["int8"]:
        q = r["int8_check"]
        lines.append(f"int8: accuracy {q['accuracy_int8']:.2f}% vs fp32 {q['accuracy_fp32']:.2f}% "
                     f"({q['accuracy_change'] + 0.0:+.2f} points), "  # + 0.0: -0.0 printed "-0.00 points" for no change
                     f"top-1 agreement with PyTorch {q['top1_agreement']:.2f}%, "
                     f"latency batch 1 ({q['threads']} thread(s)) {q['latency_int8_ms']:.3f} ms vs "
                     f"{q['latency_fp32_ms']:.3f} ms: {q['speedup']:.2f}x")
    return "\n".join(lines)
