"""Review of experiments at the edges of real use: no validation split, a run that diverges
inside an experiment, a report of an unfinished run or experiment. Hand-made folders and a
stubbed trainer: nothing is trained here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from igkd.errors import UserError

SPEC = "mobilenetv2:width=0.25,drop=12"
FAKE_DATA = {"train": "t" * 64, "test": "s" * 64}


def _summary(val, test=50.0) -> dict:
    return {"test_accuracy": test, "val_accuracy": val, "params": 7386, "best_epoch": 1, "train_images": 90,
            "train_seconds": 0.1}


def _stub_runs(monkeypatch):
    """run_jobs without dataset fingerprints (the demo's would be computed)."""
    from igkd.experiments import runs
    monkeypatch.setattr(runs, "data_sha256", lambda spec: FAKE_DATA)
    return runs


def test_an_ablation_without_a_validation_split_is_tabled(tmp_path, monkeypatch):
    """--val-fraction 0: every run's validation accuracy is NaN, and describe() of them raised
    'values must be finite numbers' as a traceback after all the training."""
    from igkd.experiments import ablation, resolve
    cfg = resolve("ablation", None, {"data": "demo", "model": SPEC, "methods": "student", "seeds": 2,
                                     "val_fraction": 0.0, "threads": 1})
    monkeypatch.setattr(ablation, "run_jobs", lambda jobs, out, what, quiet, data=None:
                        [_summary(math.nan, 50 + i) for i, _ in enumerate(jobs)])
    result = ablation.run_ablation(cfg, tmp_path / "abl", quiet=True)
    row = result["rows"][0]
    assert row["mean"] == 50.5 and math.isnan(row["val_mean"])
    assert json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"][0]["val_mean"] is None
    # a reused run's summary.json holds null there
    assert math.isnan(ablation._val_mean([None, None])) and ablation._val_mean([50.0, 52.0]) == 51.0


def test_a_reused_run_without_validation_accuracy_is_logged(tmp_path, monkeypatch, capsys):
    """A finished run of --val-fraction 0 has "val_accuracy": null in summary.json; the
    rerun's 'finished earlier' line formatted it with :.2f, a TypeError traceback."""
    from igkd.experiments import resolve
    from igkd.experiments.config import distill_config
    runs = _stub_runs(monkeypatch)
    cfg = resolve("montecarlo", None, {"data": "demo", "model": SPEC, "methods": "student", "val_fraction": 0.0})
    job = runs.Job("student run 0", distill_config(cfg, method="student"), {"method": "student", "mc_run": 0})
    d = runs.run_dir(tmp_path, job)
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(_summary(None)))
    (d / "run.json").write_text(json.dumps({"data_sha256": FAKE_DATA}))
    assert runs.run_jobs([job], tmp_path, "montecarlo")[0]["val_accuracy"] is None
    assert "finished earlier (test 50.00%, val n/a), skipped" in capsys.readouterr().err


def test_a_diverged_run_names_itself_in_the_experiment_s_one_line(tmp_path, monkeypatch):
    """The experiment stops at the diverged run with one line; under --quiet that line
    ('loss became nan at epoch 1, ...') named none of the N runs."""
    from igkd.distill.trainer import TrainingDiverged
    from igkd.experiments import resolve
    from igkd.experiments.config import distill_config
    runs = _stub_runs(monkeypatch)
    cfg = resolve("montecarlo", None, {"data": "demo", "model": SPEC, "methods": "student"})
    jobs = [runs.Job(f"student run {r}", distill_config(cfg, method="student", seed=r), {"mc_run": r})
            for r in range(2)]

    def distill(c, path, resume, quiet):
        if c.seed == 1:
            raise TrainingDiverged("loss became nan at epoch 1, before any checkpoint; lower --lr and run again")
        return _summary(10.0)
    monkeypatch.setattr(runs.api, "distill", distill)
    with pytest.raises(TrainingDiverged) as e:
        runs.run_jobs(jobs, tmp_path, "montecarlo", quiet=True)
    msg = str(e.value)
    assert msg.startswith("montecarlo run 2/2 student run 1 (runs/student_run_1--") and "\n" not in msg
    assert msg.endswith("): loss became nan at epoch 1, before any checkpoint; lower --lr and run again")
    assert isinstance(e.value, UserError)  # exit 2
    # a search trial is one job: its caller names the trial (no label twice)
    with pytest.raises(TrainingDiverged, match=r"^loss became nan"):
        runs.run_jobs(jobs[1:], tmp_path, "search trial 3", quiet=True)


def _history(folder: Path, epochs: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 2.0 - e / 10, "val_accuracy": 40.0
                                                              + e}) + "\n" for e in range(1, epochs + 1)))


def test_the_report_of_an_unfinished_run_says_so(tmp_path):
    """A run killed after 2 of 3 epochs: the report showed its curves as 'run (? ep)' and
    nothing else, as if it were a run of unknown length."""
    from igkd.report import write_report
    run = tmp_path / "run"
    _history(run, 2)
    (run / "config.yaml").write_text(f"data: demo\nmodel: {SPEC}\nepochs: 3\nmethod: kd\n")
    (run / "last.pt").write_bytes(b"")
    text = write_report(run)
    assert "? ep" not in text and "kd (unfinished: 2 of 3 ep) (1)" in text
    assert ("**Not finished**: no summary.json, so no test accuracy; epochs logged in metrics.jsonl: 2 of 3; its "
            "command with --resume continues it from last.pt.") in text


def _run(root: Path, name: str, kind: str, done: bool) -> None:
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"experiment": kind, "tags": {"method": "student"},
                                            "config": {"epochs": 1}}))
    if done:
        (d / "summary.json").write_text(json.dumps(_summary(10.0)))


def test_the_report_of_an_unfinished_experiment_says_what_finished(tmp_path):
    """An experiment writes KIND.json only when all its runs are done: killed, its report said
    'Experiments in this folder: montecarlo.' and showed nothing of it (or failed, 'holds no
    experiment results', before any run had a curve)."""
    from igkd.report import unfinished_experiments, write_report
    exp = tmp_path / "mc"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps({"igkd": "experiment", "kinds": ["montecarlo"]}))
    for name, done in (("student_run_0--a", True), ("kd_run_0--b", True), ("student_run_1--c", False)):
        _run(exp, name, "montecarlo", done)
    text = write_report(exp)
    assert ("**montecarlo has not finished**: no montecarlo.json yet, so no montecarlo results; runs/ holds 2 "
            "finished and 1 unfinished run of it.") in text
    # finished with 2 runs, then --runs 3 killed midway: the results are the 2 runs' pairs, and
    # the runs beside them are said
    (exp / "montecarlo.json").write_text(json.dumps({"runs": [{"run": "runs/student_run_0--a"},
                                                              {"run": "runs/kd_run_0--b"}]}))
    _run(exp, "kd_run_1--d", "montecarlo", True)
    assert unfinished_experiments(exp, ["montecarlo"]) == (
        "runs/ also holds 1 finished and 1 unfinished run of montecarlo that montecarlo.json does not list (other "
        "settings, or a later montecarlo that has not finished): the montecarlo section shows the runs "
        "montecarlo.json lists.")
    (exp / "runs" / "student_run_1--c" / "summary.json").write_text("{}")
    (exp / "montecarlo.json").write_text(json.dumps({"runs": [{"run": f"runs/{d.name}"}
                                                              for d in (exp / "runs").iterdir()]}))
    assert unfinished_experiments(exp, ["montecarlo"]) == ""  # all listed: nothing to say
