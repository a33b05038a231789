"""Experiment trackers: ``--log csv,tensorboard,wandb,mlflow`` (off by default).

Every tracker receives the same rows: per-step scalars (``step`` = global optimisation step,
the mean loss and its parts over the last ``--log-every`` steps, the learning rate) and one
row per epoch (the ``metrics.jsonl`` row). A tracker is one class with ``step``, ``epoch``
and ``close`` plus one line in :data:`LOGGERS` (and :data:`PACKAGES` when it needs one);
trackers other than csv import their package only when asked for, and :func:`parse_loggers`
refuses a missing one in one line, before any run folder is written.
Only rank 0 logs.
"""

from __future__ import annotations

import csv
from pathlib import Path

from . import plugins
from .errors import UserError


class CsvLogger:
    """``log/steps.csv`` and ``log/epochs.csv`` in the run directory, appended row by row
    (``tail -f`` works). A resumed run first drops the rows after the epoch it resumes from,
    so no step is logged twice."""

    def __init__(self, out: Path, run: dict, resume_epoch: int):
        self.folder = out / "log"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files = {}
        for name in ("steps", "epochs"):
            path = self.folder / f"{name}.csv"
            if path.exists():
                rows = list(csv.DictReader(path.open(newline="")))
                keep = [r for r in rows if int(float(r["epoch"])) <= resume_epoch]
                if len(keep) != len(rows):
                    self._rewrite(path, keep)
            self.files[name] = path

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        from .fileio import atomic_path
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)

    def _append(self, name: str, row: dict) -> None:
        # a run logs the same columns every time (resuming needs the same config, hence method)
        path = self.files[name]
        new = not path.exists() or path.stat().st_size == 0
        fields = list(row) if new else next(csv.reader(path.open(newline="")))
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()

    def step(self, row: dict) -> None:
        self._append("steps", row)

    def epoch(self, row: dict) -> None:
        self._append("epochs", row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in ``log/tensorboard`` (``tensorboard --logdir RUN/log``). A resumed run
    writes a new event file that purges the steps logged after its checkpoint (TensorBoard's
    ``purge_step``): without it, the steps of the interrupted epoch showed twice, as two lines."""

    def __init__(self, out: Path, run: dict, resume_epoch: int):
        self.folder, self.run, self.resumed, self.writer = out / "log" / "tensorboard", run, resume_epoch > 0, None

    def _open(self, first_step: int | None):
        # opened at the first row: a resumed run's first logged step is where the old file's
        # stale steps begin (rows come every --log-every steps from the epoch's start, as before)
        from torch.utils.tensorboard import SummaryWriter  # present: parse_loggers checked the package
        self.writer = SummaryWriter(str(self.folder), purge_step=first_step if self.resumed else None)
        if not self.resumed:
            self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in self.run.items()))
        return self.writer

    def step(self, row: dict) -> None:
        writer = self.writer or self._open(row["step"])
        for k, v in row.items():
            if k not in ("step", "epoch"):
                writer.add_scalar(f"train/{k}", v, row["step"])

    def epoch(self, row: dict) -> None:
        # epoch rows are logged after the checkpoint that holds them: a resumed run has none to purge
        writer = self.writer or self._open(None)
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v == v:
                writer.add_scalar(f"epoch/{k}", v, row["epoch"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbLogger:
    """A Weights & Biases run named after the run folder, in project $WANDB_PROJECT (default igkd)."""

    def __init__(self, out: Path, run: dict, resume_epoch: int):
        import os

        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "igkd"), name=out.name, dir=str(out / "log"),
                              config=run)

    def step(self, row: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def epoch(self, row: dict) -> None:
        self.run.log({f"epoch/{k}": v for k, v in row.items()})

    def close(self) -> None:
        self.run.finish()


class MlflowLogger:
    """An MLflow run (tracking URI from $MLFLOW_TRACKING_URI, else ./mlruns)."""

    def __init__(self, out: Path, run: dict, resume_epoch: int):
        import mlflow
        self.mlflow = mlflow
        mlflow.start_run(run_name=out.name)
        mlflow.log_params({k: v for k, v in run.items() if isinstance(v, (str, int, float, bool))})

    def step(self, row: dict) -> None:
        self.mlflow.log_metrics({f"train_{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def epoch(self, row: dict) -> None:
        self.mlflow.log_metrics({f"epoch_{k}": v for k, v in row.items() if k != "epoch" and v == v},
                                step=row["epoch"])

    def close(self) -> None:
        self.mlflow.end_run()


# and installed packages' (entry points igkd.loggers)
LOGGERS = plugins.Registry({"csv": CsvLogger, "tensorboard": TensorBoardLogger, "wandb": WandbLogger,
                            "mlflow": MlflowLogger}, "loggers", "tracker")


# the package each tracker needs, and how to install it
PACKAGES = {"tensorboard": ("tensorboard", 'pip install "igkd[tensorboard]"'), "wandb": ("wandb", "pip install wandb"),
            "mlflow": ("mlflow", "pip install mlflow")}


def parse_loggers(value: str) -> list[str]:
    """The tracker names of a ``--log`` value; a one-line error for unknown ones or ones
    whose package is missing (checked before any run folder is written)."""
    import importlib.util
    names = [v.strip().lower() for v in (value or "").split(",") if v.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise UserError(f"--log {','.join(bad)} is not known; use a comma list of {', '.join(LOGGERS)} (or nothing)")
    for n in names:
        if n in PACKAGES and importlib.util.find_spec(PACKAGES[n][0]) is None:
            raise UserError(f"--log {n} needs the {PACKAGES[n][0]} package: {PACKAGES[n][1]}")
    return list(dict.fromkeys(names))


class Trackers:
    """All trackers of a run as one: rank 0 builds it, other ranks (and runs without
    ``--log``) get an empty one.

    A tracker that fails (a lost connection, a full or vanished log folder, a server that
    refuses a run) is dropped with one warning line and the run goes on: a tracker only
    mirrors what ``metrics.jsonl`` and ``last.pt`` keep, and its exception stopped the
    training in the middle of an epoch."""

    def __init__(self, value: str = "", out: Path | None = None, run: dict | None = None, resume_epoch: int = 0,
                 active: bool = True):
        names = parse_loggers(value) if active else []
        self.items: list[tuple[str, object]] = []
        for n in names:
            try:
                self.items.append((n, LOGGERS[n](out, run or {}, resume_epoch)))
            except Exception as e:  # noqa: BLE001 - any failure of a tracker's own code
                self._failed(n, "start", e)

    @staticmethod
    def _failed(name: str, what: str, e: Exception) -> None:
        import sys
        reason = " ".join(str(e).split()) or type(e).__name__
        print(f"igkd: warning: --log {name} failed to {what} ({type(e).__name__}: {reason[:200]}); it logs "
              "nothing more, the run goes on (metrics.jsonl has every epoch)", file=sys.stderr)

    def _each(self, what: str, *args) -> None:
        for item in list(self.items):
            name, tracker = item
            try:
                getattr(tracker, what)(*args)
            except Exception as e:  # noqa: BLE001
                self.items.remove(item)
                self._failed(name, f"log a {what}" if what != "close" else "close", e)

    def __bool__(self) -> bool:
        return bool(self.items)

    def step(self, row: dict) -> None:
        self._each("step", row)

    def epoch(self, row: dict) -> None:
        self._each("epoch", row)

    def close(self) -> None:
        self._each("close")
        self.items = []
