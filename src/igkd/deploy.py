"""Deployment: latency benchmark, export with parity check (and int8), attribution audit.

The command-level functions behind ``igkd bench latency``, ``igkd export`` and ``igkd
audit``; each validates its input first, writes atomically, and returns a dict (the
command's ``--json`` output). :func:`deployment_section` renders the JSON files these
commands write into a run directory as Markdown for the report.
"""

from __future__ import annotations

import json
import math
import platform
import warnings
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .api import preprocessing_for
from .data import Dataset, load_dataset
from .errors import UserError
from .evaluate import predict
from .evaluate.agreement import spearman, topk_iou
from .evaluate.cost import RUNTIMES, check_budget, count_macs, measure_latency, weights_bytes
from .export import load_runner, logits_of, onnx_bytes, parity, quantize_int8, require_onnxruntime, torchscript_module
from .fileio import atomic_path, writable_dir, writable_file, write_json
from .models import build_model, count_parameters, load_model, read_metadata
from .models.checkpoint import file_sha256
from .progress import Progress, log

FORMATS = ("onnx", "torchscript")
TARGETS = ("label", "predicted")


def split_specs(values: str | list[str] | tuple[str, ...]) -> list[str]:
    """Model specs from comma lists: ``"mobilenetv2,mobilenetv2:width=0.5,drop=3"`` is two
    specs (a piece with '=' but no ':' is an option of the spec before it)."""
    specs: list[str] = []
    for text in [values] if isinstance(values, str) else values:
        for piece in filter(None, (p.strip() for p in text.split(","))):
            if specs and "=" in piece and ":" not in piece:
                specs[-1] += "," + piece
            else:
                specs.append(piece)
    return specs


def split_list(values: str | list[str] | tuple[str, ...]) -> list[str]:
    items = [values] if isinstance(values, str) else list(values)
    return [p.strip() for text in items for p in text.split(",") if p.strip()]


def parse_ints(values: str | list | tuple, what: str) -> list[int]:
    try:
        out = [int(v) for v in split_list([str(v) for v in ([values] if isinstance(values, (str, int)) else values)])]
    except ValueError:
        raise UserError(f"{what} must be whole numbers separated by commas, got {values!r}") from None
    if not out or min(out) <= 0:
        raise UserError(f"{what} must be positive numbers, got {values!r}")
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise UserError(f"input shape {text!r} is not CxHxW (e.g. 3x32x32)")
    return shape  # type: ignore[return-value]


def _existing(path: str | Path, what: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist; check the path")
    return Path(path)


# ---------------------------------------------------------------- latency


def bench_latency(models: str | list[str] = "", weights: str | list[str] = "", batches: str | list[int] = (1,),
                  threads: int = 1, runtimes: str | list[str] = ("eager",), input_shape: str = "3x32x32",
                  num_classes: int = 10, warmup: int = 10, min_time: float = 1.0, min_reps: int = 10,
                  max_reps: int = 10000, out: str | Path | None = None, quiet: bool = False) -> dict:
    """Latency, throughput, parameters, MACs and weight size of models side by side.

    ``models``: specs (the first is the reference, normally the teacher); ``weights``:
    checkpoint files, one per model (their metadata gives the spec when ``models`` is
    empty; weights do not change the latency but give the size on disk). Every (model,
    runtime, batch) is measured in this run with ``threads`` threads; ``speedup`` is the
    reference's median latency over the model's, at the same runtime and batch.
    Writes ``out/latency.json`` when ``out`` is given.
    """
    if out:
        writable_dir(out, "--out")
    specs, files = split_specs(models), split_list(weights)
    if not specs and not files:
        raise UserError("no model to measure; pass --model SPEC[,SPEC...] and/or --weights FILE[,FILE...]")
    if files and specs and len(files) != len(specs):
        raise UserError(f"{len(specs)} --model specs but {len(files)} --weights files; give one file per model "
                        "or leave --model out (checkpoints with metadata name their architecture)")
    batch_sizes = parse_ints(batches, "--batch")
    runtime_list = split_list(runtimes)
    for r in runtime_list:
        if r not in RUNTIMES:
            raise UserError(f"unknown runtime '{r}'; use one of {', '.join(RUNTIMES)}")
    if "onnxruntime" in runtime_list:
        require_onnxruntime()
    if threads is None or threads <= 0:
        raise UserError(f"--threads must be a positive number, got {threads}")
    check_budget(1, warmup, min_time, min_reps, max_reps)
    shape = parse_shape(input_shape)
    entries: list[tuple[str, nn.Module, tuple[int, int, int], int, str]] = []
    for i in range(max(len(specs), len(files))):
        spec = specs[i] if specs else None
        if files:
            own = read_metadata(_existing(files[i], "weights file"))  # foreign files: --classes and --input
            net, meta = load_model(files[i], spec, None if own else num_classes, None if own else shape[0])
            in_shape = (meta["in_channels"], *meta.get("image_size", shape[1:]))
            entries.append((meta["model"], net, in_shape, weights_bytes(files[i]), files[i]))
        else:
            net = build_model(spec, num_classes, shape[0]).eval()
            entries.append((spec, net, shape, weights_bytes(net), ""))
    rows = []
    total = len(entries) * len(runtime_list) * len(batch_sizes)
    with Progress(total, "latency", "config", quiet) as progress:
        for runtime in runtime_list:
            for batch in batch_sizes:
                for spec, net, in_shape, size, file in entries:
                    r = measure_latency(net, in_shape, batch, threads, warmup, min_time, min_reps, max_reps, runtime)
                    rows.append({"model": spec, "weights": file, "params": count_parameters(net),
                                 "macs": count_macs(net, in_shape), "weights_bytes": size, **r})
                    progress.update(1, f"{spec} {runtime} batch {batch}")
    by_key = {(r["runtime"], r["batch"]): r for r in rows if r["model"] == entries[0][0]}
    for r in rows:
        ref = by_key[(r["runtime"], r["batch"])]
        r.update(speedup=ref["median_ms"] / r["median_ms"], param_ratio=ref["params"] / r["params"],
                 mac_ratio=ref["macs"] / r["macs"])
    result = {"reference": entries[0][0], "threads": threads, "input_shape": list(entries[0][2]),
              "warmup": warmup, "min_time": min_time, "min_reps": min_reps, "rows": rows,
              "environment": _environment("onnxruntime" in runtime_list)}
    if out:
        write_json(Path(out) / "latency.json", result)
    return result


def _environment(with_ort: bool = False) -> dict:
    env = {"igkd": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu": platform.processor() or platform.machine()}
    if with_ort:
        import onnxruntime
        env["onnxruntime"] = onnxruntime.__version__
    return env


def latency_table(result: dict) -> str:
    from .report import markdown_table
    rows = [[r["model"], r["runtime"], r["batch"], r["params"], f"{r['macs'] / 1e6:.1f}M",
             f"{r['weights_bytes'] / 2**20:.2f} MiB", f"{r['median_ms']:.3f}",
             f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}", f"{r['images_per_s']:.1f}", f"{r['param_ratio']:.2f}x",
             f"{r['mac_ratio']:.2f}x", f"{r['speedup']:.2f}x"] for r in result["rows"]]
    return (markdown_table(["model", "runtime", "batch", "params", "MACs/img", "weights", "median ms", "p10-p90 ms",
                            "img/s", "fewer params", "fewer MACs", "speed-up"], rows)
            + f"\n\nratios against {result['reference']}, same runtime and batch; {result['threads']} thread(s), "
            f"input {'x'.join(map(str, result['input_shape']))}")


# ---------------------------------------------------------------- export


def export_model(weights: str | Path, out: str | Path, format: str = "onnx", model: str = "", data: str = "",
                 normalize: str = "auto", int8: bool = False, images: int = 0, calibration_images: int = 256,
                 atol: float = 1e-3, min_agreement: float = 99.9, threads: int = 1, min_time: float = 1.0,
                 report_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Export a checkpoint to ONNX or TorchScript, preprocessing included, and check it.

    Parity: the exported model and PyTorch run the test split of ``data`` (the first
    ``images`` when > 0; default the dataset named in the checkpoint's metadata); the export
    is kept only if max |logit difference| <= ``atol`` and top-1 agrees on >=
    ``min_agreement`` percent. With ``int8`` (ONNX only) the written model is quantised
    (ONNX Runtime static QDQ, per-channel, calibrated on ``calibration_images`` training
    images); its accuracy, agreement and latency are reported next to the fp32 export's.
    Writes ``out`` and ``out.json`` (input shape, dtype, value range, preprocessing, class
    names, parity), and ``report_dir/export.json`` when given.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; use one of {', '.join(FORMATS)}")
    out = writable_file(out, "--out")
    if report_dir:
        writable_dir(report_dir, "--report-dir")
    if not (math.isfinite(atol) and atol >= 0):
        raise UserError(f"--atol {atol} is not a tolerance; give a finite number >= 0 (default 0.001)")
    if not (math.isfinite(min_agreement) and 0 <= min_agreement <= 100):
        raise UserError(f"--min-agreement {min_agreement} is out of range; give a percentage in [0, 100]")
    if (out.suffix == ".onnx") != (format == "onnx") or out.suffix == ".json":
        raise UserError(f"--out {out} does not fit --format {format}; name ONNX files *.onnx and TorchScript "
                        "files e.g. *.pt")
    if int8 and format != "onnx":
        raise UserError("--int8 needs --format onnx (ONNX Runtime quantisation)")
    if normalize not in ("auto", "none", "dataset"):
        raise UserError(f"--normalize {normalize!r} is not one of auto, none, dataset")
    if images < 0 or calibration_images <= 0 or atol < 0 or not 0 <= min_agreement <= 100 or threads <= 0:
        raise UserError("--images must be >= 0, --calibration-images and --threads > 0, --atol >= 0, "
                        "--min-agreement in [0, 100]")
    check_budget(1, 1, min_time, 1, 10000)
    if format == "onnx":
        require_onnxruntime()
    meta = read_metadata(_existing(weights, "weights file")) or {}
    data = data or meta.get("dataset", "")
    if not data:
        raise UserError(f"{weights} names no dataset; pass --data SPEC for the parity check (its test split)")
    dataset = load_dataset(data)
    if meta.get("classes") and meta["classes"] != dataset.classes:
        raise UserError(f"{weights} was trained on classes {meta['classes'][:3]}..., not those of {dataset.spec}; "
                        "pass the --data it was trained on")
    pre = None if normalize == "auto" else preprocessing_for(normalize, dataset)
    net, meta = load_model(weights, model or None, len(dataset.classes), dataset.channels, pre)
    shape = (dataset.channels, *dataset.image_size)
    test = dataset.test if not images else dataset.test.subset(torch.arange(min(images, len(dataset.test))))
    log(f"export: {meta['model']} -> {out} ({format}{', int8' if int8 else ''}), parity on {len(test)} test images",
        quiet)
    reference = predict(net, test.images)
    accuracy = lambda logits: 100.0 * float((logits.argmax(1) == test.labels).float().mean())  # noqa: E731
    result: dict = {"out": str(out), "format": format, "int8": int8, "weights": str(weights), "model": meta["model"],
                    "data": dataset.spec, "accuracy_pytorch": accuracy(reference)}
    with atomic_path(out) as tmp:
        if format == "onnx":
            fp32 = onnx_bytes(net, shape)
            tmp.write_bytes(fp32)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit's deprecation notice
                torch.jit.save(torchscript_module(net, shape), str(tmp))
        exported = logits_of(load_runner(tmp, format=format), test.images)
        check = {**parity(reference, exported), "atol": atol, "min_agreement": min_agreement}
        if check["max_abs_diff"] > atol or check["top1_agreement"] < min_agreement:
            raise UserError(f"parity check failed: max |logit diff| {check['max_abs_diff']:.3g} (allowed {atol}), "
                            f"top-1 agreement {check['top1_agreement']:.2f}% (needed {min_agreement}); nothing written")
        result["parity"] = check
        if int8:
            calib = _calibration_set(dataset, calibration_images)
            quantize_int8(fp32, tmp, calib)
            q = logits_of(load_runner(tmp, format=format), test.images)
            fp32_lat = measure_latency(fp32, shape, 1, threads, 10, min_time, runtime="onnxruntime")
            int8_lat = measure_latency(tmp, shape, 1, threads, 10, min_time, runtime="onnxruntime")
            result["int8_check"] = {
                **parity(reference, q), "calibration_images": len(calib), "accuracy_fp32": accuracy(exported),
                "accuracy_int8": accuracy(q), "accuracy_change": accuracy(q) - accuracy(exported),
                "latency_fp32_ms": fp32_lat["median_ms"], "latency_int8_ms": int8_lat["median_ms"],
                "speedup": fp32_lat["median_ms"] / int8_lat["median_ms"], "threads": threads, "batch": 1}
        result["bytes"] = tmp.stat().st_size
    sidecar = _sidecar(out, format, int8, weights, meta, dataset, shape, result)
    write_json(Path(f"{out}.json"), sidecar)
    result["sidecar"] = f"{out}.json"
    if report_dir:
        write_json(Path(report_dir) / "export.json", result)
    return result


def _calibration_set(dataset: Dataset, n: int) -> torch.Tensor:
    """``n`` training images, a seeded random choice (calibration never sees the test split)."""
    train = dataset.train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
    return train.images[idx]


def _sidecar(out: Path, format: str, int8: bool, weights, meta: dict, dataset: Dataset, shape, result: dict) -> dict:
    pre = meta["preprocessing"]
    return {
        "format": "igkd-export/1", "file": out.name, "runtime_format": format, "int8": int8,
        "model": meta["model"], "source": {"weights": str(weights), "sha256": file_sha256(weights)},
        "input": {"name": "images", "shape": ["batch", *shape], "dtype": "float32", "layout": "NCHW",
                  "value_range": [0.0, 1.0], "channels": "grayscale" if shape[0] == 1 else "RGB"},
        "output": {"name": "logits", "shape": ["batch", len(dataset.classes)],
                   "meaning": "unnormalised class scores; softmax gives probabilities"},
        "preprocessing": {**pre, "in_graph": True, "note": "pixels / 255 -> [0, 1] is the caller's job; "
                          "any mean/std normalisation listed here is inside the exported graph"},
        "classes": dataset.classes, "parity": result["parity"],
        **({"int8_check": result["int8_check"]} if int8 else {}),
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
                     f"({q['accuracy_change']:+.2f} points), top-1 agreement with PyTorch {q['top1_agreement']:.2f}%, "
                     f"latency batch 1 ({q['threads']} thread(s)) {q['latency_int8_ms']:.3f} ms vs "
                     f"{q['latency_fp32_ms']:.3f} ms: {q['speedup']:.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------- audit


def _load_checked(path: str, spec: str, dataset: Dataset) -> tuple[nn.Module, dict]:
    meta = read_metadata(_existing(path, "checkpoint")) or {}
    if meta.get("classes") and meta["classes"] != dataset.classes:
        raise UserError(f"{path} was trained on classes {meta['classes'][:3]}..., not those of {dataset.spec}; "
                        "audit models on the dataset they were trained for")
    net, meta = load_model(path, spec or None, len(dataset.classes), dataset.channels)
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta


def audit(teacher: str, students: str | list[str], data: str, teacher_model: str = "", student_model: str = "",
          images: int = 64, target: str = "label", topk: float = 10.0, steps: int = 32,
          baseline: str = "black", gallery_images: int = 8, out: str | Path | None = None,
          quiet: bool = False, attribution: str = "ig") -> dict:
    """Do the students attribute like the teacher? Attribution maps (IG by default: sum
    over channels of |IG|) of the teacher and each student on the same ``images`` test
    images (evenly spaced over the test split), each model attributing the true label
    (``target="label"``, the same question for all) or its own prediction
    (``"predicted"``), same baseline and steps. ``attribution``: any name of
    :mod:`igkd.attribution.registry` (IG with Gauss-Legendre ``steps`` and ``baseline``;
    the others with precompute's defaults for their options, Grad-CAM at each model's
    ``auto`` layer).

    Per student: mean Spearman rank correlation of its maps with the teacher's, mean IoU
    of their top ``topk`` percent pixels, and top-1 agreement with the teacher's
    predictions (plus both accuracies on these images). Writes ``out/audit.json`` and a
    gallery ``out/audit.png`` (image | teacher map | student maps, one row per image).
    """
    if out:
        writable_dir(out, "--out")
    from .attribution import BASELINES, attribution_map, registry
    from .config import PrecomputeConfig
    entry = registry.get(attribution)
    paths = split_list(students)
    if not paths:
        raise UserError("no student to audit; pass --student CKPT[,CKPT...]")
    if target not in TARGETS:
        raise UserError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if baseline not in BASELINES:
        raise UserError(f"--baseline {baseline!r} is not one of {', '.join(BASELINES)}")
    if images <= 0 or steps <= 0 or gallery_images < 0 or not 0 < topk <= 100:
        raise UserError("--images and --steps must be > 0, --gallery >= 0, --topk a percentage in (0, 100]")
    cfg = PrecomputeConfig(attribution=attribution, ig_steps=steps, ig_method="gausslegendre", ig_baseline=baseline)
    dataset = load_dataset(data)
    models = [(teacher, *_load_checked(teacher, teacher_model, dataset))]
    models += [(p, *_load_checked(p, student_model, dataset)) for p in paths]
    test = dataset.test
    idx = torch.linspace(0, len(test) - 1, min(images, len(test))).round().long().unique()
    x_u8, labels = test.images[idx], test.labels[idx]
    x = x_u8.float() / 255
    maps, preds = [], []
    with Progress(len(models) * len(idx), f"audit ({attribution})", "img", quiet) as progress:
        for _, net, _ in models:
            pred = predict(net, x_u8).argmax(1)
            tgt = labels if target == "label" else pred
            chunks = []
            for i in range(0, len(x), 16):
                attr = entry.compute(net, x[i:i + 16], tgt[i:i + 16], cfg, first_index=int(idx[i]))[0]
                chunks.append(attribution_map(attr).float())
                progress.update(len(attr))
            maps.append(torch.cat(chunks))
            preds.append(pred)
    accuracy = lambda p: 100.0 * float((p == labels).float().mean())  # noqa: E731
    rows = []
    for (path, net, meta), m, p in zip(models[1:], maps[1:], preds[1:]):
        # pixels equal to the baseline get exactly zero attribution from every model (IG is
        # (x - x') times an average gradient): left out, they would count as agreement
        rho, iou = spearman(maps[0], m, (maps[0] != 0) | (m != 0)), topk_iou(maps[0], m, topk / 100)
        rows.append({"weights": path, "model": meta["model"], "params": count_parameters(net),
                     "spearman_mean": float(rho.nanmean()), "topk_iou_mean": float(iou.mean()),
                     "top1_agreement": 100.0 * float((p == preds[0]).float().mean()), "accuracy": accuracy(p),
                     "per_image": {"spearman": rho.tolist(), "topk_iou": iou.tolist()}})
    result = {"teacher": {"weights": teacher, "model": models[0][2]["model"], "params": count_parameters(models[0][1]),
                          "accuracy": accuracy(preds[0])},
              "data": dataset.spec, "images": len(idx), "indices": idx.tolist(), "target": target,
              "attribution": attribution, "description": entry.description(cfg),
              "ig": {"steps": steps, "method": "gausslegendre", "baseline": baseline}, "topk_percent": topk,
              "students": rows}
    if out:
        if gallery_images:
            n = min(gallery_images, len(idx))
            names = [_label(p) for p, _, _ in models]
            _audit_gallery(Path(out) / "audit.png", x_u8[:n], [m[:n] for m in maps], names,
                           [dataset.classes[int(c)] for c in labels[:n]])
            result["gallery"] = "audit.png"
        write_json(Path(out) / "audit.json", result)
    return result


def _label(path: str | Path) -> str:
    """A checkpoint's short name: its stem, with its folder when the stem is igkd's 'model'."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}" if path.stem == "model" and path.parent.name else path.stem


def _audit_gallery(path: Path, images: torch.Tensor, maps: list[torch.Tensor], names: list[str],
                   labels: list[str]) -> Path:
    """One row per image: the image, then the teacher's map and each student's."""
    from .report import _plt, _save
    plt = _plt()
    n, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.5 * cols, 1.5 * n + 0.4), squeeze=False)
    gray = images.shape[1] == 1
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)
        axes[i, 0].set_ylabel(labels[i], fontsize=8)
        for j, m in enumerate(maps):
            axes[i, j + 1].imshow(m[i].numpy(), cmap="inferno", interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    for j, name in enumerate(["image", *(("teacher " if k == 0 else "") + nm for k, nm in enumerate(names))]):
        axes[0, j].set_title(name if len(name) <= 24 else name[:22] + "..", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def audit_table(result: dict) -> str:
    from .report import markdown_table
    t = result["teacher"]
    rows = [[_label(s["weights"]), s["model"], s["params"], f"{s['spearman_mean']:.3f}", f"{s['topk_iou_mean']:.3f}",
             f"{s['top1_agreement']:.1f}%", f"{s['accuracy']:.1f}%"] for s in result["students"]]
    return (markdown_table(["student", "model", "params", "Spearman rho", f"top-{result['topk_percent']:g}% IoU",
                            "top-1 agreement", "accuracy"], rows)
            + f"\n\nteacher {_label(t['weights'])} ({t['model']}, accuracy {t['accuracy']:.1f}%); "
            f"{result['images']} test images of {result['data']}; "
            + (f"{result['description']}, of the {result['target']} class" if "description" in result else
               f"IG of the {result['target']} class, {result['ig']['steps']} steps, {result['ig']['baseline']} "
               "baseline"))  # audit.json written before attributions were named


# ---------------------------------------------------------------- report


def deployment_section(run_dir: str | Path) -> str:
    """Markdown of the latency.json, export.json and audit.json found in ``run_dir``
    (empty string when there are none)."""
    run_dir = Path(run_dir)
    parts = []

    def load(name: str) -> dict | None:
        path = run_dir / name
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except json.JSONDecodeError:
            return None

    if (lat := load("latency.json")) is not None:
        parts.append("### Latency\n\n" + latency_table(lat))
    if (exp := load("export.json")) is not None:
        parts.append("### Export\n\n" + export_summary(exp).replace("\n", "\n\n"))
    if (aud := load("audit.json")) is not None:
        text = "### Attribution agreement with the teacher\n\n" + audit_table(aud)
        if aud.get("gallery") and (run_dir / aud["gallery"]).is_file():
            text += f"\n\n![teacher and student IG maps]({aud['gallery']})"
        parts.append(text)
    return ("## Deployment\n\n" + "\n\n".join(parts) + "\n") if parts else ""
