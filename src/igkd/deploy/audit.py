"""``igkd audit``: do students attribute like their teacher? Attribution maps of the
teacher and each student on the same test images, compared by rank correlation, top-k
overlap and top-1 agreement."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..api import preprocessing_for, warn_unknown_preprocessing
from ..command_options import AuditConfig, api_config
from ..data import Dataset, load_dataset
from ..errors import UserError
from ..evaluate import predict
from ..evaluate.classmap import shown
from ..evaluate.agreement import spearman, topk_iou
from ..fileio import writable_dir, write_json
from ..models import count_parameters, holds_own_weights, load_model, read_metadata
from ..progress import Progress
from ..report import class_label, names_key
from ..runtime import keeps_threads, set_threads
from ..spec import parse_spec, split_specs
from .common import existing, split_files
from .plots import audit_gallery

TARGETS = ("label", "predicted")


def _load_checked(path: str, spec: str, dataset: Dataset, normalize: str = "auto",
                  flag: str = "--student-model") -> tuple[nn.Module, dict]:
    meta = read_metadata(path) or {}
    if meta.get("classes") and meta["classes"] != dataset.classes:
        raise UserError(f"{path} was trained on {shown(meta['classes'])}; {dataset.spec} has "
                        f"{shown(dataset.classes)}; audit models on the dataset they were trained for")
    net, meta = load_model(path, spec or None, len(dataset.classes), dataset.channels,
                           preprocessing_for(normalize, dataset), flag=flag, image_size=dataset.image_size)
    if flag == "--teacher-model":  # students have no option to state theirs: igkd's own, as a rule
        warn_unknown_preprocessing(path, normalize, "--teacher-normalize")
    for p in net.parameters():
        p.requires_grad_(False)
    return net, meta


@keeps_threads
def audit(teacher=None, student=None, data=None, *, config: AuditConfig | None = None,
          out: str | Path | None = None, quiet: bool = False, **options) -> dict:
    """Do the students attribute like the teacher? Attribution maps (IG by default: sum
    over channels of |IG|) of the teacher and each student (``student``: checkpoints, a
    comma list or a list) on the same ``images`` test images of ``data`` (evenly spaced
    over the test split), each model attributing the true label (``target="label"``, the
    same question for all) or its own prediction (``"predicted"``), same baseline and
    steps. ``attribution``: any name of :mod:`igkd.attribution.registry` (IG with
    Gauss-Legendre ``ig_steps`` and ``ig_baseline``; the others with their own options as
    precompute takes them, e.g. ``smoothgrad_samples``; Grad-CAM at each model's ``auto``
    layer unless ``gradcam_layer`` names one every model has).

    Per student: mean Spearman rank correlation of its maps with the teacher's, mean IoU
    of their top ``topk`` percent pixels, and top-1 agreement with the teacher's
    predictions (plus both accuracies on these images). Writes ``out/audit.json`` and a
    gallery ``out/audit.png`` (image | teacher map | student maps, one row per image,
    ``gallery`` rows).

    The options are the fields of :class:`igkd.command_options.AuditConfig`, as keywords
    or ``config``: one dataclass gives the command line, the YAML section ``audit:`` and
    these defaults. Old keywords (``students``, ``steps``, ``baseline``,
    ``gallery_images``) still work, with a DeprecationWarning.
    """
    cfg = api_config(AuditConfig, config, {"teacher": teacher, "student": student, "data": data, **options},
                     "audit")
    if out:
        writable_dir(out, "--out")
    from ..attribution import attribution_map, registry
    from ..config import PrecomputeConfig
    entry = registry.get(cfg.attribution)
    paths = split_files(cfg.student, "--student")
    if not cfg.teacher:
        raise UserError("no teacher to audit against; pass --teacher CKPT")
    if not paths:
        raise UserError("no student to audit; pass --student CKPT[,CKPT...]")
    if not cfg.data:
        raise UserError("no dataset to audit on; pass --data SPEC")
    for path in [cfg.teacher, *paths]:  # a missing file is named before the dataset is loaded
        # torchscript:FILE holds its weights, as distill's --teacher takes it: its file must exist
        # (the spec itself was looked for as a file: "checkpoint torchscript:t.pt does not exist")
        existing(parse_spec(path).arg if holds_own_weights(path) else path, "checkpoint")
    set_threads(cfg.threads)
    pcfg = PrecomputeConfig(attribution=cfg.attribution, ig_steps=cfg.ig_steps, ig_method="gausslegendre",
                            ig_baseline=cfg.ig_baseline, **{n: getattr(cfg, n) for n in entry.fields})
    dataset = load_dataset(cfg.data)
    models = [(cfg.teacher, *_load_checked(cfg.teacher, cfg.teacher_model, dataset, cfg.teacher_normalize,
                                           "--teacher-model"))]
    specs = _student_specs(cfg.student_model, len(paths))
    for p, spec in zip(paths, specs):
        try:
            models.append((p, *_load_checked(p, spec, dataset)))
        except UserError as e:
            if len(paths) == 1 or not cfg.student_model or ";" in cfg.student_model:
                raise
            # one spec was given for every student: a plain student and one of another
            # architecture (a py: network) need one each, which the error did not say
            raise UserError(f"{e}; --student-model {cfg.student_model} was applied to every --student: for students "
                            "of different architectures give one per student in their order, separated by ';', "
                            f"empty where the file names its own (e.g. '{cfg.student_model};')") from None
    test = dataset.test
    idx = torch.linspace(0, len(test) - 1, min(cfg.images, len(test))).round().long().unique()
    x_u8, labels = test.images[idx], test.labels[idx]
    x = x_u8.float() / 255
    maps, preds = [], []
    with Progress(len(models) * len(idx), f"audit ({cfg.attribution})", "img", quiet) as progress:
        for _, net, _ in models:
            pred = predict(net, x_u8).argmax(1)
            tgt = labels if cfg.target == "label" else pred
            chunks = []
            for i in range(0, len(x), 16):
                attr = entry.compute(net, x[i:i + 16], tgt[i:i + 16], pcfg, first_index=int(idx[i]))[0]
                chunks.append(attribution_map(attr).float())
                progress.update(len(attr))
            maps.append(torch.cat(chunks))
            preds.append(pred)
    accuracy = lambda p: 100.0 * float((p == labels).float().mean())  # noqa: E731
    rows = []
    for (path, net, meta), m, p in zip(models[1:], maps[1:], preds[1:]):
        # pixels equal to the baseline get exactly zero attribution from every model (IG is
        # (x - x') times an average gradient): left out, they would count as agreement
        rho, iou = spearman(maps[0], m, (maps[0] != 0) | (m != 0)), topk_iou(maps[0], m, cfg.topk / 100)
        # None ("?"), as bench latency says: a frozen TorchScript model's weights are constants, not 0
        rows.append({"weights": path, "model": meta["model"], "params": count_parameters(net) or None,
                     "spearman_mean": float(rho.nanmean()), "topk_iou_mean": float(iou.nanmean()),
                     "top1_agreement": 100.0 * float((p == preds[0]).float().mean()), "accuracy": accuracy(p),
                     "per_image": {"spearman": rho.tolist(), "topk_iou": iou.tolist()}})
    result = {"teacher": {"weights": cfg.teacher, "model": models[0][2]["model"],
                          "params": count_parameters(models[0][1]) or None, "accuracy": accuracy(preds[0])},
              "data": dataset.spec, "images": len(idx), "indices": idx.tolist(), "target": cfg.target,
              "attribution": cfg.attribution, "description": entry.description(pcfg), "settings": entry.settings(pcfg),
              "ig": {"steps": cfg.ig_steps, "method": "gausslegendre", "baseline": cfg.ig_baseline},
              "topk_percent": cfg.topk, "students": rows}
    if out:
        if cfg.gallery:
            n = min(cfg.gallery, len(idx))
            names = [label(p) for p, _, _ in models]
            names_key()  # stand-ins of figures drawn before are not this gallery's
            audit_gallery(Path(out) / "audit.png", x_u8[:n], [m[:n] for m in maps], names,
                          [class_label(dataset.classes, int(c)) for c in labels[:n]])
            result["gallery"] = "audit.png"
            if key := names_key():  # the names no installed font could draw, for the report's text
                result["gallery_names"] = key
        write_json(Path(out) / "audit.json", result)
    return result


def _student_specs(text: str, n: int) -> list[str]:
    """--student-model: one spec for every student, or one per student separated by ';' (a
    spec holds commas: mobilenetv2:drop=5,width=0.5), '' where a file's metadata names it.
    A plain student and a compressed one of another architecture took the same spec and one
    of them failed to load."""
    specs = split_specs(text, "--student-model") if text else [""]
    if len(specs) == 1:
        return specs * n
    if len(specs) != n:
        raise UserError(f"--student-model gives {len(specs)} specs for {n} --student files; give one for all, or "
                        "one per student in their order, separated by ';' (empty where the file's metadata names it)")
    return specs


def label(path: str | Path) -> str:
    """A checkpoint's short name: its stem, with its folder when the stem is igkd's 'model'."""
    path = Path(path)
    return f"{path.parent.name}/{path.stem}" if path.stem == "model" and path.parent.name else path.stem


def audit_table(result: dict) -> str:
    from ..report import markdown_table
    t = result["teacher"]

    def mean(v) -> str:  # undefined where every image's maps were all zero: NaN here, null in audit.json
        return "n/a" if v is None or v != v else f"{v:.3f}"
    rows = [[label(s["weights"]), s["model"], "?" if s["params"] is None else s["params"], mean(s["spearman_mean"]),
             mean(s["topk_iou_mean"]), f"{s['top1_agreement']:.1f}%", f"{s['accuracy']:.1f}%"]
            for s in result["students"]]
    return (markdown_table(["student", "model", "params", "Spearman rho", f"top-{result['topk_percent']:g}% IoU",
                            "top-1 agreement", "accuracy"], rows)
            + f"\n\nteacher {label(t['weights'])} ({t['model']}, accuracy {t['accuracy']:.1f}%); "
            f"{result['images']} test images of {result['data']}; "
            + (f"{result['description']}, of the {result['target']} class" if "description" in result else
               f"IG of the {result['target']} class, {result['ig']['steps']} steps, {result['ig']['baseline']} "
               "baseline"))  # audit.json written before attributions were named
