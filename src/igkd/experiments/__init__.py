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

from .ablation import run_ablation
from .compression import run_compression
from .config import KINDS, ExperimentConfig, resolve
from .montecarlo import run_montecarlo
from .search import run_search

RUNNERS = {"ablation": run_ablation, "montecarlo": run_montecarlo, "compression": run_compression,
           "search": run_search}


def run_experiment(kind: str, cfg: ExperimentConfig, out: str | Path, quiet: bool = False) -> dict:
    """Run experiment ``kind`` (ablation, montecarlo, compression or search) into ``out``."""
    from ..fileio import writable_dir
    return RUNNERS[kind](cfg, writable_dir(out, "--out"), quiet=quiet)


__all__ = ["ExperimentConfig", "KINDS", "RUNNERS", "resolve", "run_ablation", "run_compression", "run_experiment",
           "run_montecarlo", "run_search"]
