"""Research workflows over many training runs (METHOD.md section 7).

* :func:`run_ablation`     every method with the same budget, seeds and splits (the paper's table)
* :func:`run_montecarlo`   repeated runs on random stratified subsets, with paired statistics
* :func:`run_compression`  students by truncation depth and width: accuracy against compression,
  MACs and measured latency
* :func:`run_search`       grid or TPE search of T, alpha, p and lr with Optuna, scored on the
  validation split; many workers can share one study

Every run is found again by its resolved configuration (:mod:`igkd.experiments.runs`), so
an interrupted experiment re-run with the same command trains only what is unfinished.
``igkd report DIR`` (:func:`igkd.report.write_report`) renders what an experiment folder holds.
"""

from __future__ import annotations

from pathlib import Path

from .._lazy import lazy_package

_NAMES = {
    "run_ablation": ".ablation", "run_compression": ".compression", "KINDS": ".config",
    "ExperimentConfig": ".config", "resolve": ".config", "run_montecarlo": ".montecarlo", "run_search": ".search",
}
lazy_package(__name__, _NAMES)  # 'igkd experiment --help' reads the config without scipy and torch


def run_experiment(kind: str, cfg, out: str | Path, quiet: bool = False) -> dict:
    """Run experiment ``kind`` (ablation, montecarlo, compression or search) into ``out``."""
    import importlib

    from ..fileio import writable_dir
    from ..errors import UserError
    from .config import KINDS, ExperimentConfig
    if kind not in KINDS:
        raise UserError(f"unknown experiment {kind!r}; use one of: {', '.join(KINDS)}")
    if not isinstance(cfg, ExperimentConfig):
        raise UserError(f"run_experiment() needs an ExperimentConfig, got {type(cfg).__name__}; build one with "
                        f"igkd.experiments.resolve({kind!r}, CONFIG, overrides)")
    runner = getattr(importlib.import_module(__name__), f"run_{kind}")
    return runner(cfg, writable_dir(out, "--out"), quiet=quiet)


__all__ = sorted(_NAMES) + ["run_experiment"]
