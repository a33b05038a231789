"""``igkd predict``: classify image files with a checkpoint or an export.

Each file is decoded and resized as the model's training images were
(:func:`igkd.data.imagefolder.input_recipe`: the recorded dataset spec's size and resize
policy, Pillow's bilinear filter, L or RGB), so a checkpoint here gives the prediction
``igkd evaluate`` scored, and an export the one its deployment will make from the same file
(the recipe is also its ``FILE.json``'s ``image``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..command_options import PredictConfig, api_config
from ..data.imagefolder import IMAGE_EXTS, decode_image, input_recipe, parse_size
from ..errors import UserError
from ..progress import Progress
from ..runtime import keeps_threads, resolve_device, set_threads


@keeps_threads
def predict(weights=None, files=(), *, config: PredictConfig | None = None, data=None, quiet: bool = False,
            **options) -> dict:
    """Classify image ``files`` (paths; a folder stands for the image files under it, sorted)
    with ``weights``: an igkd checkpoint, an igkd export (``.onnx``, or TorchScript with the
    ``FILE.json`` igkd export wrote beside it), a foreign state dict (with ``model``,
    ``classes`` and ``size``), or an ``nn.Module`` (with ``data``, a spec or
    :class:`igkd.data.Dataset`, for its classes, image size and decoding; its normalisation
    as :func:`igkd.evaluate` takes a module's).

    Returns the dict ``igkd predict --json`` prints: ``weights``, ``model``, ``classes``,
    ``image`` (how each file was decoded: size, resize, mode, filter), ``preprocessing``, and
    ``predictions``, one per file in order: ``file``, ``class``, ``index``, ``probability``
    (softmax of the logits) and ``top`` (``[class, probability]`` pairs, most probable first,
    ``top`` of them). The options are the fields of
    :class:`igkd.command_options.PredictConfig`, as keywords or ``config``."""
    from ..api import given_module
    module, weights = given_module(weights, options, config, "predict got a module and a model spec")
    cfg = api_config(PredictConfig, config, {"weights": weights, **options}, "predict")
    if not cfg.weights:
        raise UserError("nothing to classify with; pass --weights FILE (a checkpoint or an igkd export)")
    paths = image_files(files)
    set_threads(cfg.threads)
    if module is not None:
        run, described = _module_runner(module, data, cfg)
    else:
        if data is not None:
            raise UserError("data= is for a module (its classes and image size); a file records its own")
        run, described = _file_runner(Path(cfg.weights), cfg)
    classes, recipe = described["classes"], described["image"]
    k = min(cfg.top, len(classes))
    predictions = []
    with Progress(len(paths), "predict", "img", quiet=quiet, delay=5.0) as bar:
        for start in range(0, len(paths), cfg.batch_size):
            batch = paths[start:start + cfg.batch_size]
            images = torch.from_numpy(np.stack([decode_image(p, recipe) for p in batch]))
            logits = run(images)
            if logits.ndim != 2 or logits.shape[1] != len(classes):
                raise UserError(f"{cfg.weights} gives {tuple(logits.shape[1:])} outputs per image, not one per class "
                                f"of its {len(classes)} ({', '.join(classes[:3])}...); pass --classes with one "
                                "name per output")
            probs = torch.softmax(logits.double(), 1)
            best, idx = probs.topk(k, 1)
            for path, b, i in zip(batch, best.tolist(), idx.tolist()):
                predictions.append({"file": str(path), "class": classes[i[0]], "index": i[0], "probability": b[0],
                                    "top": [[classes[j], p] for j, p in zip(i, b)]})
            bar.update(len(batch))
    return {"weights": str(cfg.weights) if module is None else None, **described, "predictions": predictions}


def image_files(files) -> list[Path]:
    """The files to classify: each path given, a folder standing for the image files under it
    (by extension, sorted; hidden ones skipped), in the order given. One line for a path that
    does not exist or a folder without images."""
    if isinstance(files, (str, Path)):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTS and q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise UserError(f"{p} holds no image files ({', '.join(sorted(IMAGE_EXTS)[:6])}, ...); give image "
                                "files or a folder of them")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders of them")
    if not out:
        raise UserError("no image files given; pass one or more files or folders (igkd predict --weights W FILE...)")
    return out


def _file_runner(path: Path, cfg: PredictConfig):
    from ..export import load_runner, read_export_metadata
    from ..models import holds_own_weights
    if not path.exists() and not holds_own_weights(str(path)):
        raise UserError(f"{path} does not exist; pass --weights FILE (a checkpoint or an igkd export)")
    from .export import export_sidecar
    export = export_sidecar(Path(f"{path}.json")) or (read_export_metadata(path, "onnx") if path.suffix == ".onnx"
                                                      else None)
    if path.suffix == ".onnx" and export is None:
        raise UserError(f"{path} is not an igkd export (no {path.name}.json beside it, nothing embedded): its "
                        "classes and input are unknown; export it with igkd export")
    if export is not None:
        if cfg.normalize != "auto" or cfg.model:
            raise UserError(f"{path} is an export, its architecture and normalisation inside it; drop --model and "
                            "--normalize")
        c, h, w = export["input"]["shape"][1:]
        recipe = export.get("image") or input_recipe("", (h, w), c)  # exported before the recipe was kept
        run_file = load_runner(path, cfg.threads or None, export.get("runtime_format"))
        described = {"model": export.get("model"), "classes": _classes(cfg, export.get("classes")),
                     "image": _recipe(recipe, cfg), "preprocessing": export.get("preprocessing")}
        return (lambda images: run_file(images.float().div(255))), described
    from ..api import warn_unknown_preprocessing
    from ..evaluate import predict as logits_for
    from ..models import load_model, read_metadata
    from ..models.fold import for_inference
    meta = read_metadata(path) or {}
    classes = _classes(cfg, meta.get("classes"))
    size = meta.get("image_size")
    if not size and not cfg.size:
        raise UserError(f"{path} records no image size; pass --size N or HxW (the size it was trained at)")
    channels = meta.get("in_channels") or 3
    net, meta = load_model(path, cfg.model or None, len(classes), channels, _preprocessing(cfg.normalize, channels))
    warn_unknown_preprocessing(path, cfg.normalize, "--normalize")
    recipe = _recipe(input_recipe(meta.get("dataset", ""), size or (1, 1), channels), cfg)
    device = resolve_device(cfg.device)
    folded = []

    def run(images: torch.Tensor) -> torch.Tensor:
        if not folded:  # as evaluate scores it: BatchNorm folded, probed on the first images
            folded.append(for_inference(net, images, device))
        return logits_for(folded[0], images, cfg.batch_size, device)
    return run, {"model": meta["model"], "classes": classes, "image": recipe, "preprocessing": meta["preprocessing"]}


def _module_runner(module: nn.Module, data, cfg: PredictConfig):
    from ..api import module_input
    from ..data import Dataset, load_dataset
    from ..evaluate import predict as logits_for
    if data is None:
        raise UserError("a module records no classes or image size; pass data= (a spec or an igkd Dataset) of "
                        "the data it was trained on")
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    net, pre = module_input(module, cfg.normalize, dataset)
    device = next((p.device for p in module.parameters()), resolve_device(cfg.device))
    recipe = _recipe(input_recipe(dataset.spec, dataset.image_size, dataset.channels), cfg)

    def run(images: torch.Tensor) -> torch.Tensor:
        return logits_for(net, images, cfg.batch_size, device)  # eval mode for the call, flags kept
    return run, {"model": f"module:{type(module).__name__}", "classes": _classes(cfg, dataset.classes),
                 "image": recipe, "preprocessing": pre}


def _classes(cfg: PredictConfig, recorded) -> list[str]:
    if cfg.classes:
        path = Path(cfg.classes)
        names = ([n.strip() for n in path.read_text(encoding="utf-8").splitlines() if n.strip()] if path.is_file()
                 else [n.strip() for n in cfg.classes.split(",") if n.strip()])
        if not names:
            raise UserError(f"--classes {cfg.classes} names no class; give a comma list or a file of names, one a line")
        return names
    if not recorded:
        raise UserError(f"{cfg.weights} records no class names; pass --classes a,b,c or --classes FILE (one name "
                        "a line, in the model's output order)")
    return list(recorded)


def _recipe(recipe: dict, cfg: PredictConfig) -> dict:
    """The recipe with --size and --resize applied."""
    recipe = dict(recipe)
    if cfg.size:
        recipe["size"] = list(parse_size(cfg.size, f"--size {cfg.size}"))
    if cfg.resize != "auto":
        recipe["resize"] = cfg.resize
    return recipe


def _preprocessing(normalize: str, channels: int) -> dict | None:
    from ..models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    if normalize == "auto":
        return None
    if normalize == "none":
        return {"normalize": "none"}
    if normalize == "dataset":
        raise UserError("--normalize dataset needs the training data's mean/std, which predict does not read; an "
                        "igkd checkpoint records its normalisation (leave --normalize auto), a foreign one takes "
                        "imagenet or none")
    if channels != 3:
        raise UserError(f"--normalize imagenet is for RGB models; this one takes {channels} channel(s)")
    return {"normalize": "dataset", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def predict_table(r: dict) -> str:
    """The predictions as text: one line per file, its class and probability, then the runners-up."""
    if not r["predictions"]:
        return "no images"
    width = min(60, max(len(p["file"]) for p in r["predictions"]))
    lines = [f"{'file':<{width}}  {'class':<16} {'prob':>6}  next"]
    for p in r["predictions"]:
        rest = ", ".join(f"{c} {100 * q:.1f}%" for c, q in p["top"][1:])
        lines.append(f"{p['file']:<{width}}  {p['class']:<16} {100 * p['probability']:5.1f}%  {rest}")
    recipe = r["image"]
    lines.append(f"({len(r['predictions'])} images by {r['model']}; each decoded as {recipe['mode']}, "
                 f"{'shorter side to' if recipe['resize'] == 'shorter' else 'resized to'} "
                 f"{recipe['size'][0]}x{recipe['size'][1]}{' and centre-cropped' if recipe['resize'] == 'shorter' else ''}"
                 f", {recipe['filter']})")
    return "\n".join(lines)


__all__ = ["image_files", "predict", "predict_table"]
