"""``igkd demo``: the whole method on the embedded dataset, on CPU, in a few minutes.

Steps: get the teacher (shipped in the package, or trained with ``--train-teacher``),
precompute IG maps and teacher logits, train the ``student`` and ``kd+ig`` students with
the same seed and budget, evaluate all three on the test split, and write ``report.md``,
``metrics.json``, ``gallery.png`` and ``curves.png`` to the output directory.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import torch

from . import api
from .config import DistillConfig, PrecomputeConfig, TrainConfig, build, find_config, read_yaml_file, shipped_configs
from .data import load_dataset
from .errors import UserError
from .fileio import writable_dir, write_json, write_text
from .models import count_parameters
from .precompute import precompute
from .progress import log
from .report import accuracy_points, class_label, gallery, markdown_table, names_key, training_curves
from .runtime import resolve_device


def asset(name: str) -> Path:
    return Path(str(resources.files("igkd") / "assets" / name))


DEMO_DEFAULTS = {"methods": ["student", "kd+ig"], "gallery": 10}


def load_recipe(path: str | Path | None) -> dict:
    # no --config: the shipped recipe itself, not whatever 'demo' names in the working
    # directory (igkd demo --out demo makes a folder of that name)
    path = find_config(path) if path else shipped_configs()["demo"]
    recipe = read_yaml_file(path, "demo recipe") or {}
    if not isinstance(recipe, dict):
        raise UserError(f"demo recipe {path} must hold a mapping of sections (train:, precompute:, distill:, demo:)")
    for name, section in recipe.items():
        if not isinstance(section, dict):
            raise UserError(f"section '{name}:' in demo recipe {path} is not a mapping of option: value")
    return recipe


def demo_settings(recipe: dict, path: str | Path) -> dict:
    """The recipe's ``demo:`` section (methods, gallery) checked, with the defaults filled in.

    Checked when the recipe is read, before anything is written: read where used, a bad
    value failed after the precompute and the students had trained (``gallery: abc``), a
    string was iterated by its characters (``methods: student`` trained 's', 't', ...)."""
    from .distill.parts import parse_method
    settings = recipe.get("demo") or {}
    unknown = [str(k) for k in settings if k not in DEMO_DEFAULTS]
    if unknown:
        raise UserError(f"unknown option '{unknown[0]}' in section 'demo:' of demo recipe {path}; known options: "
                        f"{', '.join(DEMO_DEFAULTS)}")
    methods = settings.get("methods", DEMO_DEFAULTS["methods"])
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise UserError(f"'methods:' in section 'demo:' of {path} must be a list of method names, e.g. "
                        f"[student, kd+ig], got {methods!r}")
    for m in methods:
        try:
            parse_method(m)  # an unknown part: one line listing the parts
        except UserError as e:
            raise UserError(f"'methods:' in section 'demo:' of {path}: {e}") from None
    if len(set(methods)) != len(methods):
        raise UserError(f"'methods:' in section 'demo:' of {path} names a method twice ({methods}); list each once")
    gallery = settings.get("gallery", DEMO_DEFAULTS["gallery"])
    if isinstance(gallery, bool) or not isinstance(gallery, int) or gallery < 1:
        raise UserError(f"'gallery:' in section 'demo:' of {path} must be a whole number of images >= 1, "
                        f"got {gallery!r}")
    return {"methods": methods, "gallery": gallery}


def run_demo(out: str | Path, recipe_path: str | Path | None = None, train_teacher: bool = False,
             epochs: int | None = None, quiet: bool = False, print_summary: bool = True,
             ig_steps: int | None = None) -> dict:
    """Run the demo into ``out``; ``epochs`` and ``ig_steps`` override the recipe's student
    epochs and IG steps (of the precompute and the students alike). A rerun into the same
    ``out`` reuses finished work, so it must use the same recipe and budget."""
    out = writable_dir(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / "demo.json").exists():
        raise UserError(f"{out} exists and is not an igkd demo directory; choose another --out")
    started = time.perf_counter()
    recipe = load_recipe(recipe_path)
    source = str(recipe_path or "demo.yaml")
    settings = demo_settings(recipe, source)  # before anything is written (demo.json is the first file)
    budget = {"epochs": epochs, "ig_steps": ig_steps}
    dcfg = build(DistillConfig, recipe.get("distill", {}), budget, source)
    pcfg = build(PrecomputeConfig, recipe.get("precompute", {}), {"ig_steps": ig_steps}, source)
    methods = settings["methods"]
    shipped = asset("demo_teacher.safetensors")
    train_teacher = bool(train_teacher or not shipped.exists())
    tcfg = build(TrainConfig, recipe.get("train", {}), None, source) if train_teacher else None
    # the teacher is part of what a rerun reuses (the store holds its maps, the students its
    # logits): another one is refused now, not after training it, at the store's check
    resolved = {"epochs": dcfg.epochs, "ig_steps": pcfg.ig_steps, "train_teacher": train_teacher}
    check_same_demo(out, recipe, resolved)
    dataset = load_dataset(dcfg.data)
    dataset.require_train("igkd demo trains on the train split")  # before demo.json, the first file
    write_json(out / "demo.json", {"recipe": recipe, **resolved, "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    # 1. teacher
    if train_teacher:
        log("demo: training the teacher (pass no --train-teacher to use the shipped one)", quiet)
        tdir = out / "teacher"
        api.train(tcfg, tdir, resume=(tdir / "last.pt").exists(), quiet=quiet)
        teacher_path = tdir / "model.safetensors"
    else:
        teacher_path = shipped
    teacher, tmeta = api.load_teacher(teacher_path, dataset)
    teacher_eval = api.evaluate(teacher_path, dcfg.data, device=dcfg.device)
    log(f"demo: teacher {tmeta['model']} ({count_parameters(teacher):,} params), test accuracy "
        f"{teacher_eval['accuracy']:.2f}%", quiet)

    # 2. precompute once, shared by every student
    store = precompute(teacher, dataset, pcfg, out / "store", resolve_device(dcfg.device), quiet)

    # 3. students with the same seed and budget
    results = {}
    for method in methods:
        cfg = build(DistillConfig, {**recipe.get("distill", {}), "method": method, "teacher": str(teacher_path),
                                    "store": str(out / "store")}, budget, source)
        run_dir = out / "runs" / method
        if (run_dir / "summary.json").exists():
            results[method] = json.loads((run_dir / "summary.json").read_text())
            log(f"demo: {method} already trained, reusing {run_dir}", quiet)
            continue
        log(f"demo: training student with {method}", quiet)
        results[method] = api.distill(cfg, run_dir, resume=(run_dir / "last.pt").exists(), quiet=quiet)

    # 4. report
    n = settings["gallery"]
    train = dataset.train
    pick = torch.tensor([int((train.labels == c).nonzero()[0]) for c in range(len(dataset.classes))])[:n]
    gallery(out / "gallery.png", train.images[pick], torch.from_numpy(store.maps[pick.numpy()].astype("float32")),
            [class_label(dataset.classes, int(train.labels[i])) for i in pick],
            title=f"teacher IG maps ({pcfg.ig_method}, {pcfg.ig_steps} steps) and the overlays students see")
    histories = {m: [json.loads(line) for line in (out / "runs" / m / "metrics.jsonl").read_text().splitlines()]
                 for m in methods}
    training_curves(out / "curves.png", histories)
    accuracy_points(out / "accuracy.png", methods, [results[m]["test_accuracy"] for m in methods],
                  teacher_eval["accuracy"])
    seconds = time.perf_counter() - started
    metrics = {
        "dataset": dataset.spec, "teacher": {"model": tmeta["model"], "params": count_parameters(teacher),
                                             "test_accuracy": teacher_eval["accuracy"], "path": str(teacher_path)},
        "students": {m: {k: results[m][k] for k in ("model", "params", "best_epoch", "val_accuracy",
                                                    "test_accuracy")} for m in methods},
        "ig": {"steps": pcfg.ig_steps, "method": pcfg.ig_method, "baseline": pcfg.ig_baseline,
               "completeness_delta": store.manifest["completeness_delta"]},
        "seconds": seconds,
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", render_report(metrics, dcfg, names_key()))
    base = results[methods[0]]["test_accuracy"]
    summary = "; ".join(f"{m} {results[m]['test_accuracy']:.2f}%" for m in methods)
    if print_summary:
        print(f"demo done in {seconds:.0f} s: teacher {teacher_eval['accuracy']:.2f}%; {summary} -> {out}/report.md")
    metrics["gain"] = {m: results[m]["test_accuracy"] - base for m in methods}
    return metrics


def check_same_demo(out: Path, recipe: dict, resolved: dict) -> None:
    """A rerun reuses the store and the finished students of ``out``: refuse one with another
    recipe, --epochs or --ig-steps (it would report them as trained with the new budget)."""
    path = out / "demo.json"
    if not path.exists():
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # unreadable: rewritten below; the store and runs check their own state
    if not isinstance(before, dict):
        return
    diff = [_option(k, before[k]) for k in resolved if k in before and before[k] != resolved[k]]
    if "recipe" in before and before["recipe"] != recipe:
        diff.append("another recipe")
    if diff:
        raise UserError(f"{out} holds a demo run with {', '.join(diff)}; rerun with the same options to reuse it, "
                        "or choose another --out")


def _option(name: str, value) -> str:
    """How the option that gave ``value`` was typed: --epochs 4, --train-teacher, no --train-teacher."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def render_report(m: dict, cfg: DistillConfig, key: str = "") -> str:
    """The demo's report.md; ``key``: :func:`~igkd.report.names_key` of its figures."""
    t = m["teacher"]
    rows = [["teacher", t["model"], t["params"], "1.00x", t["test_accuracy"], "", ""]]
    students = m["students"]
    base = next(iter(students.values()))["test_accuracy"]
    for name, s in students.items():
        rows.append([name, s["model"], s["params"], f"{t['params'] / s['params']:.2f}x", s["test_accuracy"],
                     f"{s['test_accuracy'] - base:+.2f}", s["val_accuracy"]])
    d = m["ig"]["completeness_delta"]
    return f"""# igkd demo report

Dataset `{m['dataset']}` (test split for accuracy, validation split carved from train for model
selection). Students trained {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} with the same seed ({cfg.seed}), budget and recipe
({cfg.optimizer}, lr {cfg.lr}, batch {cfg.batch_size}); KD with T={cfg.T}, alpha={cfg.alpha}; IG overlay p={cfg.p}.
One seed on a 2,000-image set: differences of a point or two can be run-to-run noise;
repeat with other seeds (`seed:` in the `distill:` section of a copy of the recipe,
`igkd config show demo`, passed as `--config`) before drawing conclusions.

{markdown_table(["method", "model", "params", "compression", "test acc (%)", "gain", "val acc (%)"], rows)}

![accuracy](accuracy.png)

## Teacher IG maps

Integrated gradients ({m['ig']['method']}, {m['ig']['steps']} steps, baseline `{m['ig']['baseline']}`),
target = true label, map = sum over channels of |IG|. Completeness error
|sum IG - (F(x) - F(x'))| relative to |F(x) - F(x')|: median {100 * d['median_relative']:.1f}%,
90th percentile {100 * d['p90_relative']:.1f}% (the quadrature error; more steps lower it).

![gallery](gallery.png){chr(10) * 2 + key if key else ""}

## Training curves

![curves](curves.png)

Run time: {m['seconds']:.0f} s.
"""
