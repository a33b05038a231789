"""What every experiment does first: check the output folder, the methods and the teacher,
build the precompute store once, and score the teacher (cached in ``teacher.json``)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from .. import api
from ..config import PrecomputeConfig, to_dict
from ..distill.methods import parse_method
from ..errors import UserError
from ..fileio import write_json, write_text
from ..progress import log
from ..runtime import set_threads
from .config import ExperimentConfig, check, split_list
from .runs import file_sha256, prepare_out


def methods_of(cfg: ExperimentConfig) -> list[str]:
    return [parse_method(m).name for m in split_list(cfg.methods, str, "--methods")]


def baseline_of(methods: list[str]) -> str:
    return "student" if "student" in methods else methods[0]


def setup(cfg: ExperimentConfig, out: str | Path, kind: str, methods: list[str], quiet: bool,
          need_teacher: bool = False) -> tuple[Path, dict]:
    """Prepare ``out``; return it and the context (teacher facts, store path) for the results."""
    check(cfg)
    parsed = [parse_method(m) for m in methods]
    teacher = need_teacher or any(m.needs_teacher for m in parsed)
    if teacher and not cfg.teacher:
        raise UserError("these methods need a teacher; pass --teacher CHECKPOINT (or set teacher: in the config)")
    if teacher and not Path(cfg.teacher).is_file():
        raise UserError(f"teacher checkpoint {cfg.teacher} does not exist; pass --teacher CHECKPOINT (paths in a "
                        "config are relative to the current folder)")
    out = prepare_out(out, kind)
    set_threads(cfg.threads)
    ctx: dict = {"kind": kind, "data": cfg.data, "teacher": None, "store": None}
    if teacher:
        ctx["teacher"] = teacher_facts(cfg, out, quiet)
    if any(api.needs_store(m, cfg) for m in parsed):
        store = api.precompute(cfg.teacher, cfg.data, precompute_config(cfg), cfg.store or None, cfg.teacher_model,
                               cfg.device, quiet, threads=cfg.threads)
        ctx["store"] = str(Path(store.path).resolve())
        ctx["ig"] = {"steps": cfg.ig_steps, "method": cfg.ig_method, "baseline": cfg.ig_baseline,
                     "completeness_delta": store.manifest.get("completeness_delta")}
    return out, ctx


def precompute_config(cfg) -> PrecomputeConfig:
    """The precompute fields of ``cfg`` as a plain PrecomputeConfig."""
    return PrecomputeConfig(**{f.name: getattr(cfg, f.name) for f in fields(PrecomputeConfig)})


def teacher_facts(cfg: ExperimentConfig, out: Path, quiet: bool) -> dict:
    """Model, parameters and test accuracy of the teacher; cached by file hash and dataset."""
    sha = file_sha256(cfg.teacher)
    cache = out / "teacher.json"
    if cache.exists():
        facts = json.loads(cache.read_text())
        if facts.get("sha256") == sha and facts.get("data") == cfg.data and sha:
            return facts
    r = api.evaluate(cfg.teacher, cfg.data, model=cfg.teacher_model, device=cfg.device,
                     batch_size=cfg.eval_batch_size)
    facts = {"path": str(cfg.teacher), "sha256": sha, "data": cfg.data, "model": r["model"], "params": r["params"],
             "test_accuracy": r["accuracy"], "test_images": r["total"]}
    log(f"teacher {r['model']} ({r['params']:,} params): test accuracy {r['accuracy']:.2f}%", quiet)
    write_json(cache, facts)
    return facts


def save_results(out: Path, kind: str, result: dict, table: str, cfg: ExperimentConfig) -> None:
    """``KIND.json`` (everything), ``KIND.md`` (the table) and ``KIND.yaml`` (the resolved config)."""
    import yaml
    write_text(out / f"{kind}.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    write_json(out / f"{kind}.json", result)
    write_text(out / f"{kind}.md", table + "\n")


__all__ = ["baseline_of", "methods_of", "save_results", "setup", "teacher_facts"]
