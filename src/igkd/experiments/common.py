"""What every experiment does first: check the output folder, the methods and the teacher,
build the precompute store once, and score the teacher (cached in ``teacher.json``)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .. import api
from ..config import PrecomputeConfig, to_dict
from ..data import Dataset, load_dataset
from ..distill.methods import parse_method
from ..errors import UserError
from ..evaluate.corruptions import check_images
from ..precompute import maps_record
from ..fileio import write_json, write_text
from ..progress import log
from ..runtime import set_threads
from .config import ExperimentConfig, check, corruption_names, split_list
from .runs import cached_file_sha256, data_sha256, know_image_size, prepare_out, teacher_file


def methods_of(cfg: ExperimentConfig) -> list[str]:
    return [parse_method(m).name for m in split_list(cfg.methods, str, "--methods")]


def baseline_of(methods: list[str]) -> str:
    return "student" if "student" in methods else methods[0]


def start(cfg: ExperimentConfig, out: str | Path, kind: str, methods: list[str], quiet: bool,
          need_teacher: bool = False, dataset: Dataset | None = None) -> tuple[Path, dict, dict[str, dict]]:
    """Check the config, prepare ``out`` and the teacher's facts and store; return ``out``, the
    context (teacher facts, store path) for the results, and the sha256 of the data's splits as
    :func:`~igkd.experiments.runs.run_jobs` takes them (``{spec: {"train": ..., "test": ...}}``).
    The dataset (``dataset``: ``cfg.data`` already loaded) is loaded once for the checks, the
    teacher's score, the store and these (each loaded it again, and run_jobs once more), and not
    kept: the runs load their own."""
    check(cfg)
    parsed = [parse_method(m) for m in methods]
    teacher = need_teacher or any(m.needs_teacher for m in parsed)
    if teacher and not cfg.teacher:
        raise UserError("these methods need a teacher; pass --teacher CHECKPOINT (or set teacher: in the config)")
    # a bad --init was found by the first run, after the folder was marked (and a missing file
    # keyed the runs by its path, not its sha256): distill's own check, before any of that
    api.check_init(cfg, "experiment")
    if (teacher or cfg.init == "teacher") and not teacher_file(cfg.teacher).is_file():
        raise UserError(f"teacher checkpoint {teacher_file(cfg.teacher)} does not exist; pass --teacher CHECKPOINT "
                        "(paths in a config are relative to the current folder)")
    # every experiment trains: data without a train split (a folder of test/ alone) is refused
    # before the folder is marked, not at its first run
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    dataset.require_train(f"igkd experiment {kind} trains on the train split")
    know_image_size(cfg.data, dataset)  # the runs' keys resolve --augment auto by it
    if getattr(cfg, "corruptions", ""):  # a corruption these images cannot take, before any run trains
        check_images(corruption_names(cfg), (dataset.channels, *dataset.image_size))
    out = prepare_out(out, kind)
    set_threads(cfg.threads)
    ctx: dict = {"kind": kind, "data": cfg.data, "teacher": None, "store": None}
    if teacher:
        ctx["teacher"] = teacher_facts(cfg, out, quiet, dataset)
    if any(api.needs_store(m, cfg) for m in parsed):
        maps = any(m.needs_maps for m in parsed)  # logits alone: a --store of any map settings will do
        store = api.precompute(cfg.teacher, dataset, precompute_config(cfg), cfg.store or None, cfg.teacher_model,
                               cfg.device, quiet, threads=cfg.threads, teacher_normalize=cfg.teacher_normalize,
                               maps=maps)
        ctx["store"] = str(Path(store.path).resolve())
        if maps:
            ctx["maps"] = {**maps_record(precompute_config(cfg), store),
                           "completeness_delta": store.manifest.get("completeness_delta")}
    return out, ctx, {cfg.data: data_sha256(dataset)}


def precompute_config(cfg) -> PrecomputeConfig:
    """The precompute fields of ``cfg`` as a plain PrecomputeConfig."""
    return PrecomputeConfig(**{f.name: getattr(cfg, f.name) for f in fields(PrecomputeConfig)})


def teacher_facts(cfg: ExperimentConfig, out: Path, quiet: bool, dataset: Dataset | None = None) -> dict:
    """Model, parameters and test accuracy of the teacher; cached by file hash and dataset
    (``dataset``: ``cfg.data`` loaded, else it is loaded here)."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    sha = cached_file_sha256(teacher_file(cfg.teacher))
    test_sha = dataset.fingerprint("test")  # the images, not the spec: a folder's files may have changed
    cache = out / "teacher.json"
    try:
        facts = json.loads(cache.read_text()) if cache.exists() else None
    except (OSError, ValueError):  # damaged from outside: a cache, so the teacher is scored again (was a traceback)
        facts = None
    if isinstance(facts, dict):  # a JSON list or number there crashed on .get
        # the architecture too: one foreign .pt read as another --teacher-model is another teacher
        if facts.get("sha256") == sha and facts.get("data") == cfg.data and sha and \
                facts.get("test_sha256") == test_sha and \
                facts.get("normalize", "auto") == cfg.teacher_normalize and \
                facts.get("teacher_model", "") == cfg.teacher_model:
            return facts
    # igkd evaluate takes a file: a torchscript:FILE teacher is its file with the spec as its model
    weights = teacher_file(cfg.teacher)
    spec = cfg.teacher_model or (cfg.teacher if weights != Path(cfg.teacher) else "")
    r = api.evaluate(str(weights), dataset, model=spec, device=cfg.device, batch_size=cfg.eval_batch_size,
                     normalize=cfg.teacher_normalize)
    facts = {"path": str(cfg.teacher), "sha256": sha, "data": cfg.data, "normalize": cfg.teacher_normalize,
             "teacher_model": cfg.teacher_model,
             "model": r["model"], "params": r["params"],
             "test_accuracy": r["accuracy"], "test_images": r["total"], "test_sha256": test_sha}
    log(f"teacher {r['model']} ({r['params']:,} params): test accuracy {r['accuracy']:.2f}%", quiet)
    write_json(cache, facts)
    return facts


def save_results(out: Path, kind: str, result: dict, table: str, cfg: ExperimentConfig) -> None:
    """``KIND.json`` (everything), ``KIND.md`` (the table) and ``KIND.yaml`` (the resolved config)."""
    import yaml
    write_text(out / f"{kind}.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json(out / f"{kind}.json", result)
    write_text(out / f"{kind}.md", table + "\n")


MEAN = "mean"  # the condition averaging the corruptions (a corruption's own name is never this)


def corruption_summary(runs: list[dict], methods: list[str], pairs: list[tuple[str, str]] | None, names: list[str],
                       cfg: ExperimentConfig) -> dict:
    """Per condition (each corruption: the mean over its five severities; ``mean``: the
    mean over the corruptions) the runs' accuracies per method, in run order, and their
    statistics: :func:`~igkd.experiments.stats.describe` per method and, with ``pairs``,
    the paired tests of the clean accuracy (:func:`~igkd.experiments.stats.by_condition`).
    ``runs`` carry ``corruptions`` from :func:`~igkd.experiments.runs.run_record`."""
    from .stats import by_condition, describe
    conds = [*names, MEAN]

    def value(run: dict, cond: str) -> float:
        c = run["corruptions"]
        return c["overall_mean"] if cond == MEAN else c["mean"][cond]
    acc = {k: {m: [value(r, k) for r in runs if r["method"] == m] for m in methods} for k in conds}
    if pairs:
        stats = by_condition(acc, pairs)
    else:
        stats = {k: {"summary": {m: describe(v) for m, v in groups.items()}} for k, groups in acc.items()}
    severity = {n: {m: [sum(r["corruptions"]["accuracy"][n][s] for r in runs if r["method"] == m)
                        / max(1, sum(r["method"] == m for r in runs)) for s in range(5)] for m in methods}
                for n in names}
    clean = {m: describe([r["corruptions"]["clean_accuracy"] for r in runs if r["method"] == m]) for m in methods}
    return {"names": names, "seed": cfg.corruption_seed, "images": runs[0]["corruptions"]["images"],
            "subset": any(_scored_a_subset(r["corruptions"], cfg) for r in runs), "conditions": conds,
            "labels": {**{n: n for n in names}, MEAN: "mean of corruptions"}, "accuracy": acc, "stats": stats,
            "severity_means": severity, "clean_on_scored_images": clean}


def _scored_a_subset(c: dict, cfg: ExperimentConfig) -> bool:
    """Whether a run's corruptions were scored on fewer than all its test images (the report
    then shows the clean accuracy on those images too). --corruption-images at or above the
    test set's size scores all of them; scores cached before the size was kept go by the option."""
    return c["images"] < c["test_images"] if "test_images" in c else bool(cfg.corruption_images)


def corruption_section(run_dir: Path, result: dict, kind: str, tables: str, clean: dict[str, dict],
                       figures: str = "mean ± sd over the runs") -> str:
    """The report's text and plot (``KIND_corruptions.png``) of accuracy under corruptions;
    ``clean``: per method the clean accuracy's mean and interval (describe's keys)."""
    from ..report import condition_points
    c, methods = result["corruptions"], result["methods"]
    conds = c["conditions"]
    points = {m: [clean[m]] + [c["stats"][k]["summary"][m] for k in conds] for m in methods}
    condition_points(run_dir / f"{kind}_corruptions.png", ["clean"] + [c["labels"][k] for k in conds], points)
    tests = (" Paired tests as for the clean accuracy, Holm-corrected within each condition over its "
             f"{len(c['stats'][conds[0]]['comparisons'])} comparisons." if c["stats"][conds[0]].get("comparisons") else "")
    images = (f"{c['images']} test images, evenly spaced (clean accuracy on them in {kind}.json)" if c.get("subset")
              else f"the {c['images']} test images")
    return (f"### Under corruptions\n\nEvery run's best checkpoint scored on {images} under {', '.join(c['names'])} "
            f"at the five severities of CIFAR-10-C (Hendrycks and Dietterich 2019), computed on the fly with noise "
            f"seed {c['seed']}: every run and method sees the same corrupted images. A corruption's figure is the "
            f"mean over its severities; 'mean of corruptions' averages those; 'clean' is the test accuracy above. "
            f"Figures: {figures}; per-severity means in {kind}.json.{tests}\n\n{tables}\n\n"
            f"![accuracy clean and under each corruption, mean and 95% CI]({kind}_corruptions.png)\n")


__all__ = ["MEAN", "baseline_of", "corruption_section", "corruption_summary", "methods_of", "save_results", "start",
           "teacher_facts"]
