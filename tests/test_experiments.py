"""Research workflows end to end on the demo dataset with the shipped teacher, tiny budgets:
ablation (killed and restarted as a real process), Monte Carlo, compression sweep, search
with two worker processes on one SQLite study, and the report of it all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import stats as sps

import igkd
from igkd.experiments import ExperimentConfig, resolve, run_compression, run_montecarlo
from igkd.experiments.config import distill_config
from igkd.experiments.runs import Job, run_dir, run_key, same_run, semantic_config

TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
# one epoch on a tenth of the demo set, one IG step: every run takes seconds; all tests of
# this module share one store (same teacher, data and IG settings), built once by the
# shared_store fixture; no map-error estimate (check_images 0: a 256-step IG of 8 images,
# as long as the store itself, that these tests do not look at; test_precompute does)
TINY = {"data": "demo", "teacher": str(TEACHER), "model": "mobilenetv2:width=0.5,drop=9", "normalize": "none",
        "epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.002, "crop_padding": 2, "subset": 0.1,
        "val_fraction": 0.1, "seed": 0, "T": 2.5, "alpha": 0.5, "p": 0.5, "ig_steps": 1, "threads": 1,
        "eval_batch_size": 500, "check_images": 0}


def write_config(path: Path, experiment: dict | None = None, **distill) -> Path:
    path.write_text(yaml.safe_dump({"distill": {**TINY, **distill}, "experiment": experiment or {}}))
    return path


def igkd_cli(*args, timeout=300, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "igkd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def igkd_main(capsys, *args) -> tuple[int, str, str]:
    """The command line in this process (no interpreter start-up): exit code, stdout, stderr."""
    import torch
    from igkd.cli import main
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """The store every run of this module reuses (teacher logits and IG maps of the 2,000 demo
    training images), built here with all the cores instead of inside the first run, whose
    processes use one thread (threads: 1, as two search workers share the machine)."""
    import torch
    from igkd.config import DistillConfig, PrecomputeConfig, build
    cfg = build(DistillConfig, TINY)
    pcfg = build(PrecomputeConfig, {f: getattr(cfg, f) for f in PrecomputeConfig.__dataclass_fields__})
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as env:  # the session's cache, as conftest's _isolated_cache sets it
        env.setenv("IGKD_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "igkd-cache"))
        try:
            return igkd.precompute(TEACHER, "demo", pcfg, threads=min(2, os.cpu_count() or 1), quiet=True).path
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory, shared_store):
    """One experiment folder the Monte Carlo, compression and search tests fill, and the report reads."""
    return tmp_path_factory.mktemp("experiments") / "exp"


# ---------------------------------------------------------------- ablation, kill and restart
def test_ablation_killed_then_restarted_retrains_only_unfinished_runs(tmp_path, capsys, shared_store):
    cfg = write_config(tmp_path / "exp.yaml", {"methods": ["student", "kd+ig"]}, epochs=2)
    out = tmp_path / "abl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "igkd.cli", "experiment", "ablation", "--config", str(cfg),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    # kill it (SIGKILL, no clean-up) once the first run is finished and the second has a finished
    # epoch: its metrics.jsonl has a row, which the trainer appends only after last.pt holds it (a
    # kill between the two leaves last.pt without the row, which resuming writes back)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = sorted(p.parent.name for p in out.glob("runs/*/summary.json"))
        partial = [p.parent for p in out.glob("runs/*/metrics.jsonl")
                   if p.read_text().strip() and not (p.parent / "summary.json").exists()]
        if done and partial:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the ablation ended before it could be killed:\n" + proc.stdout.read()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/summary.json")}
    interrupted = [p.parent.name for p in out.glob("runs/*/last.pt") if p.parent.name not in finished]
    assert finished and interrupted and not (out / "ablation.json").exists()
    first_epoch = json.loads((out / "runs" / interrupted[0] / "metrics.jsonl").read_text().splitlines()[0])

    r = igkd_cli("experiment", "ablation", "--config", cfg, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stderr
    assert f"{len(finished)} already finished, {2 - len(finished)} to train" in log
    for name in finished:  # finished runs were not retrained: same summary file, logged as skipped
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == finished[name]
        assert f"in {out / 'runs' / name}" not in log
    assert log.count("finished earlier") == len(finished)
    assert f"resuming in {out / 'runs' / interrupted[0]}" in log and "resuming" in log and "after epoch 1" in log
    assert f"reusing store {shared_store}" in log and "precompute: 2000 images" not in log
    metrics = [json.loads(x) for x in (out / "runs" / interrupted[0] / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and metrics[0] == first_epoch  # continued, not restarted

    result = json.loads((out / "ablation.json").read_text())
    assert [row["method"] for row in result["rows"]] == ["student", "kd+ig"]
    table = (out / "ablation.md").read_text()
    assert table.splitlines()[0] == "| method | test accuracy (%) | gain over student | params | compression |"
    for row in ("| teacher (mobilenetv2:width=0.5) |", "| student |", "| kd+ig |"):
        assert row in table
    params = result["rows"][0]["params"]
    assert result["rows"][0]["compression"] == pytest.approx(590_122 / params)
    for row in result["rows"][1:]:
        assert row["gain"] == pytest.approx(row["mean"] - result["rows"][0]["mean"])
    # same budget, seed and splits for every method
    configs = [yaml.safe_load((out / run["run"] / "config.yaml").read_text()) for run in result["runs"]]
    assert {(c["seed"], c["epochs"], c["subset"], c["val_fraction"]) for c in configs} == {(0, 2, 0.1, 0.1)}
    # --augment auto, resolved for 28-pixel images in the run and in its key alike (as runs from
    # before auto recorded it, so that they are found)
    records = [json.loads((out / run["run"] / "run.json").read_text()) for run in result["runs"]]
    assert {c["augment"] for c in configs} == {r["config"]["augment"] for r in records} == {"pad-crop"}
    assert len({run["train_images"] for run in result["runs"]}) == 1
    # a third invocation (in this process) trains nothing
    code, stdout, _ = igkd_main(capsys, "experiment", "ablation", "--config", cfg, "--out", out, "--quiet")
    assert code == 0 and "| kd+ig |" in stdout
    assert all((out / "runs" / name / "summary.json").stat().st_mtime_ns == finished[name] for name in finished)


# ---------------------------------------------------------------- Monte Carlo
def test_montecarlo_runs_share_subset_and_seed_and_report_paired_statistics(exp_dir, tmp_path):
    # every run's checkpoint is also scored under two corruptions, on 20 test images (item 2 of issue 15)
    yaml_path = write_config(tmp_path / "mc.yaml", {"montecarlo": {"runs": 2, "mc_subset": 0.25},
                                                    "corruptions": ["contrast", "gaussian_blur"],
                                                    "corruption_images": 20})
    cfg = resolve("montecarlo", yaml_path, {"methods": "student,kd+ig"})
    result = run_montecarlo(cfg, exp_dir, quiet=True)
    assert result["methods"] == ["student", "kd+ig"] and result["runs_count"] == 2
    runs = result["runs"]
    assert len(runs) == 4
    for r in range(2):  # run r: both methods with seed r on subset r
        cfgs = [yaml.safe_load((exp_dir / x["run"] / "config.yaml").read_text()) for x in runs if x["mc_run"] == r]
        assert len(cfgs) == 2
        assert {(c["seed"], c["subset"], c["subset_seed"]) for c in cfgs} == {(r, 0.25, r)}
    acc = result["accuracy"]
    assert len(acc["student"]) == 2 and len(acc["kd+ig"]) == 2
    s = result["summary"]["kd+ig"]
    lo, hi = sps.t.interval(0.95, 1, loc=np.mean(acc["kd+ig"]), scale=sps.sem(acc["kd+ig"])) \
        if np.std(acc["kd+ig"]) > 0 else (np.mean(acc["kd+ig"]),) * 2
    assert s["mean"] == pytest.approx(np.mean(acc["kd+ig"])) and (s["ci_low"], s["ci_high"]) == pytest.approx((lo, hi))
    (comp,) = result["comparisons"]
    assert (comp["a"], comp["b"]) == ("kd+ig", "student")
    diff = np.subtract(acc["kd+ig"], acc["student"])
    assert comp["t"]["mean_diff"] == pytest.approx(diff.mean())
    if np.std(diff) > 0:
        assert comp["t"]["p"] == pytest.approx(sps.ttest_rel(acc["kd+ig"], acc["student"]).pvalue)
    table = (exp_dir / "montecarlo.md").read_text()
    assert "| student | 2 |" in table and "| kd+ig | 2 |" in table and "| kd+ig - student |" in table
    # subsets: 25% of 2,000 stratified = 500, minus the 10% validation split
    assert result["train_images"] == 450

    # corrupted accuracy: per run from its corruptions.json, then the clean accuracy's statistics
    c = result["corruptions"]
    assert c["conditions"] == ["contrast", "gaussian_blur", "mean"] and c["images"] == 20
    for x in runs:
        saved = json.loads((exp_dir / x["run"] / "corruptions.json").read_text())
        assert saved["key"]["names"] == ["contrast", "gaussian_blur"] and saved["result"]["images"] == 20
        assert saved["result"]["test_images"] == x["corruptions"]["test_images"] > 20
        assert x["corruptions"]["mean"] == saved["result"]["mean"]
        assert saved["result"]["mean"]["contrast"] == pytest.approx(np.mean(saved["result"]["accuracy"]["contrast"]))
    per_run = {m: [x["corruptions"]["overall_mean"] for x in sorted(runs, key=lambda x: x["mc_run"])
                   if x["method"] == m] for m in ("student", "kd+ig")}
    assert c["accuracy"]["mean"] == per_run
    assert c["stats"]["mean"]["summary"]["kd+ig"]["mean"] == pytest.approx(np.mean(per_run["kd+ig"]))
    (blur,) = c["stats"]["gaussian_blur"]["comparisons"]
    diff = np.subtract(c["accuracy"]["gaussian_blur"]["kd+ig"], c["accuracy"]["gaussian_blur"]["student"])
    assert (blur["a"], blur["b"]) == ("kd+ig", "student") and blur["t"]["mean_diff"] == pytest.approx(diff.mean())
    assert "| condition | difference |" in table and "| mean of corruptions | kd+ig - student |" in table

    # one method alone, with corruptions: no pairs to test, and the tables still come (it
    # crashed with a KeyError after all the training); a copy reuses the finished runs
    one = tmp_path / "one"
    shutil.copytree(exp_dir, one)
    alone = run_montecarlo(resolve("montecarlo", yaml_path, {"methods": "student"}), one, quiet=True)
    assert alone["comparisons"] == [] and alone["corruptions"]["stats"]["contrast"]["comparisons"] == []
    assert alone["accuracy"]["student"] == acc["student"]
    assert "| student | 2 |" in (one / "montecarlo.md").read_text()

    # the ablation of Monte Carlo run 0's subset and seed is the same two runs: trained and scored once
    before = {p: p.stat().st_mtime_ns for p in exp_dir.glob("runs/*/corruptions.json")}
    ablation = igkd.run_ablation(resolve("ablation", yaml_path, {"methods": "student,kd+ig", "subset": 0.25}),
                                 exp_dir, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in exp_dir.glob("runs/*/corruptions.json")} == before
    row0 = {x["method"]: x["corruptions"]["mean"]["contrast"] for x in runs if x["mc_run"] == 0}
    assert {m: s["mean"] for m, s in ablation["corruptions"]["stats"]["contrast"]["summary"].items()} == row0
    assert "| method | clean | clean, scored images | contrast | gaussian_blur | mean of corruptions |" in \
        (exp_dir / "ablation.md").read_text()


def test_corruptions_scored_on_every_test_image_are_no_subset():
    # --corruption-images at or above the test set's size scores all of it: the report showed a
    # "clean, scored images" column equal to the clean one, and called the images a subset
    from igkd.experiments.common import corruption_summary
    from igkd.experiments.montecarlo import corruption_tables

    def run(method, images, test_images=100):
        acc = {"contrast": [50.0 + len(method)] * 5}
        return {"method": method, "corruptions": {"images": images, "test_images": test_images,
                                                  "clean_accuracy": 60.0, "accuracy": acc,
                                                  "mean": {"contrast": 50.0 + len(method)}, "overall_mean": 50.0}}
    for images, subset in ((100, False), (40, True)):
        runs = [run(m, images) for _ in range(2) for m in ("student", "kd")]
        cfg = resolve("montecarlo", overrides={"corruption_images": 500 if not subset else 40})
        c = corruption_summary(runs, ["student", "kd"], [("kd", "student")], ["contrast"], cfg)
        assert c["subset"] is subset
        result = {"methods": ["student", "kd"], "corruptions": c,
                  "summary": {m: {"n": 2, "mean": 60.0, "std": 0.0} for m in ("student", "kd")}}
        assert ("clean, scored images" in corruption_tables(result)) is subset
    # scores cached before the size was kept go by the option, as before
    old = run("student", 100)
    del old["corruptions"]["test_images"]
    cfg = resolve("montecarlo", overrides={"corruption_images": 500})
    assert corruption_summary([old], ["student"], None, ["contrast"], cfg)["subset"] is True


def test_subset_keeps_dataset_indices_so_store_rows_stay_aligned():
    """A --subset run reads the store by the samples' own indices: the logits it uses for a
    batch are the teacher's logits of exactly those images, and the maps are their maps."""
    import torch
    from igkd.api import load_teacher
    from igkd.data import load_dataset, stratified_split, subset_indices
    from igkd.distill import Trainer
    from igkd.experiments.common import precompute_config
    from igkd.models import build_model
    from igkd.precompute import compute_chunk, precompute

    cfg = igkd.DistillConfig(**{**TINY, "method": "kd+ig", "subset": 0.3, "subset_seed": 7})
    data = load_dataset("demo")
    teacher, _ = load_teacher(TEACHER, data)
    store = precompute(teacher, data, precompute_config(cfg))
    trainer = Trainer(cfg, build_model(cfg.model, 10, 1), data, "unused", torch.device("cpu"), teacher=teacher,
                      store=store)
    pool = subset_indices(data.train.labels, 0.3, 7)
    assert len(pool) == 600 and torch.equal(torch.sort(torch.cat([trainer.train_idx, trainer.val_idx])).values, pool)
    assert len(trainer.val_idx) == 60
    # stratified: 60 of each class, and not the first 600 samples
    assert torch.bincount(data.train.labels[pool]).tolist() == [60] * 10 and pool.max() > 1500
    idx, _, y = next(trainer.batches(1))
    assert bool(torch.isin(idx, trainer.train_idx).all())
    assert torch.equal(y, data.train.labels[idx])
    with torch.no_grad():
        direct = teacher.eval()(data.train.images[idx].float() / 255)
    assert torch.allclose(trainer.teacher_logits(idx, None), direct, atol=1e-4)
    few = idx[:4]
    fresh = compute_chunk(teacher, data.train.images[few], data.train.labels[few], cfg, torch.device("cpu"))
    assert np.allclose(trainer.maps[few].float().numpy(), fresh["maps"].astype(np.float32), atol=2e-3)
    # subset 1 changes nothing: the validation split is the one igkd always drew
    whole = Trainer(igkd.DistillConfig(**{**TINY, "method": "student", "subset": 1.0}), build_model(cfg.model, 10, 1),
                    data, "unused", torch.device("cpu"))
    keep, held = stratified_split(data.train.labels, 0.1, 0)
    assert torch.equal(whole.train_idx, keep) and torch.equal(whole.val_idx, held)


# ---------------------------------------------------------------- compression sweep
def test_compression_sweep_reports_params_macs_latency_and_accuracy(exp_dir, tmp_path):
    cfg = resolve("compression", write_config(tmp_path / "c.yaml", {"compression": {
        "sweep_base": "mobilenetv2:width=0.5", "depths": [13, 17], "widths": [0.25], "methods": ["student"],
        "latency_min_time": 0.05}}))
    result = run_compression(cfg, exp_dir, quiet=True)
    models = [s["model"] for s in result["students"]]
    assert models == ["mobilenetv2:width=0.5,drop=13", "mobilenetv2:width=0.5,drop=17", "mobilenetv2:width=0.25"]
    by_model = {s["model"]: s for s in result["students"]}
    for spec, s in by_model.items():
        net = igkd.build_model(spec, 10, 1)
        assert s["params"] == igkd.count_parameters(net)
        assert s["compression"] == pytest.approx(590_122 / s["params"])
        assert s["latency"]["median_ms"] > 0 and s["latency"]["threads"] == 1 and s["latency"]["reps"] >= 10
    # truncation removes parameters but few MACs; width cuts both
    t = result["teacher_cost"]
    deep = by_model["mobilenetv2:width=0.5,drop=17"]
    assert deep["params"] < by_model["mobilenetv2:width=0.5,drop=13"]["params"] < t["params"]
    assert by_model["mobilenetv2:width=0.25"]["macs"] < t["macs"] / 3
    assert len(result["runs"]) == 3 and all(0 <= r["test_accuracy"] <= 100 for r in result["runs"])
    table = (exp_dir / "compression.md").read_text()
    for m in models:
        assert f"| {m} |" in table
    assert "| teacher mobilenetv2:width=0.5 | 590,122 | 1.00x |" in table


# ---------------------------------------------------------------- search, two workers
def test_two_search_workers_share_one_sqlite_study_without_duplicates(exp_dir, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    cfg = write_config(tmp_path / "s.yaml", {"search": {
        "sampler": "grid", "search_method": "kd", "T_values": [1, 4], "alpha_values": [0.3, 0.7]}})
    db = tmp_path / "shared" / "study.db"
    db.parent.mkdir()
    url = f"sqlite:///{db}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "igkd.cli", "experiment", "search", "--config", str(cfg), "--out", str(exp_dir),
           "--storage", url]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="igkd-search", storage=url)
    trials = study.get_trials()
    points = sorted((t.params["T"], t.params["alpha"]) for t in trials)
    assert points == [(1.0, 0.3), (1.0, 0.7), (4.0, 0.3), (4.0, 0.7)]  # every grid point exactly once
    assert all(t.state.name == "COMPLETE" for t in trials)
    # the objective is the validation accuracy of the trial's run, never the test accuracy
    for t in trials:
        summary = json.loads((exp_dir / t.user_attrs["run"] / "summary.json").read_text())
        assert t.value == summary["val_accuracy"] and t.user_attrs["test_accuracy"] == summary["test_accuracy"]
        cfg_run = yaml.safe_load((exp_dir / t.user_attrs["run"] / "config.yaml").read_text())
        assert (cfg_run["T"], cfg_run["alpha"], cfg_run["method"]) == (t.params["T"], t.params["alpha"], "kd")
    assert len({t.user_attrs["worker"] for t in trials}) >= 1
    joined = "".join(err for _, err in outputs)
    assert "created study" in joined and "joined study" in joined
    result = json.loads((exp_dir / "search.json").read_text())
    assert result["objective"] == "val_accuracy" and result["complete"] == 4
    assert result["best"]["val_accuracy"] == max(t.value for t in trials)
    # a worker started after the grid is done trains nothing
    code, _, err = igkd_main(capsys, "experiment", "search", "--config", cfg, "--out", exp_dir, "--storage", url)
    assert code == 0 and "this worker ran 0 trial(s); 4 complete" in err
    assert len(optuna.load_study(study_name="igkd-search", storage=url).trials) == 4
    # a worker with another search space is refused, the study is left alone
    code, _, err = igkd_main(capsys, "experiment", "search", "--config", cfg, "--out", exp_dir, "--storage", url,
                             "--T-values", "1,2")
    assert code == 2 and err.splitlines()[-1].startswith(
        "igkd: error: study 'igkd-search' in this storage searches grid kd over {'T': [1.0, 4.0]")
    assert len(optuna.load_study(study_name="igkd-search", storage=url).trials) == 4
    # the search never scores on the test split: no validation split, no search
    code, _, err = igkd_main(capsys, "experiment", "search", "--config", cfg, "--out", tmp_path / "new",
                             "--val-fraction", "0")
    assert code == 2 and "scored on the validation split" in err and not (tmp_path / "new").exists()


def test_search_requeues_the_point_of_a_dead_worker(exp_dir, tmp_path):
    """A worker that died mid-trial (no heartbeat for 3 intervals) leaves its point to the next worker."""
    optuna = pytest.importorskip("optuna")
    from igkd.experiments.search import claim_waiting, make_storage, open_study, run_search, search_space
    cfg = resolve("search", write_config(tmp_path / "s.yaml", {"search": {
        "search_method": "kd", "T_values": [1], "alpha_values": [0.3, 0.7], "heartbeat": 1}}),
        {"storage": f"sqlite:///{tmp_path / 'dead.db'}", "study": "dead-worker"})
    storage = make_storage(cfg.storage, cfg.heartbeat)
    study, created = open_study(cfg, storage, search_space(cfg), None)
    assert created
    claimed = claim_waiting(study)  # a worker takes a point, beats once, and dies
    storage.record_heartbeat(claimed)
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == {} and len(study.trials) == 2
    time.sleep(5)  # past the grace period of 3 heartbeats (the storage keeps whole seconds)
    result = run_search(cfg, exp_dir, quiet=True)  # the runs exist already (the two-worker test): no training
    states = sorted(t["state"] for t in result["trials"])
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]
    done = sorted(t["params"]["alpha"] for t in result["trials"] if t["state"] == "COMPLETE")
    assert done == [0.3, 0.7] and result["complete"] == 2


def test_tpe_search_samples_within_the_ranges_up_to_the_trial_budget(exp_dir, tmp_path, monkeypatch):
    pytest.importorskip("optuna")
    import fcntl

    from igkd.experiments import search
    from igkd.experiments.search import run_search
    cfg = resolve("search", write_config(tmp_path / "s.yaml", {"search": {
        "sampler": "tpe", "trials": 2, "search_method": "kd", "T_values": [2], "alpha_values": [0.2, 0.8]}}),
        {"storage": f"sqlite:///{tmp_path / 'tpe.db'}", "study": "tpe"})
    result = run_search(cfg, exp_dir, quiet=True)
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    assert len(result["trials"]) == 2 and len(done) == 2
    for t in done:
        assert t["params"]["T"] == 2 and 0.2 <= t["params"]["alpha"] <= 0.8
        summary = json.loads((exp_dir / t["run"] / "summary.json").read_text())
        assert t["val_accuracy"] == summary["val_accuracy"]
    # a worker reads the study and writes search.json under the folder's lock: two workers finishing
    # at once could otherwise leave the file as the one that read the study first saw it
    collect, held = search.collect, []

    def collect_checking_the_lock(*args):
        with open(exp_dir / ".setup.lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return collect(*args)
    monkeypatch.setattr(search, "collect", collect_checking_the_lock)
    assert run_search(cfg, exp_dir, quiet=True)["complete"] == 2  # the budget is spent: no third trial
    assert held == [True]


def test_missing_optuna_is_a_one_line_install_hint(monkeypatch):
    from igkd.errors import UserError
    from igkd.experiments.search import optuna_or_error
    monkeypatch.setitem(sys.modules, "optuna", None)  # what an environment without Optuna looks like
    with pytest.raises(UserError, match=r'pip install "igkd\[search\]"'):
        optuna_or_error()


# ---------------------------------------------------------------- report
def test_report_renders_every_section_with_plots(exp_dir):
    if not (exp_dir / "search.json").exists() or not (exp_dir / "compression.json").exists():
        pytest.skip("needs the Monte Carlo, compression and search tests of this module to have run")
    r = igkd_cli("report", exp_dir, "--format", "png,pdf,svg")
    assert r.returncode == 0, r.stderr[-2000:]
    text = (exp_dir / "report.md").read_text()
    for heading in ("## Monte Carlo", "## Compression sweep", "## Hyper-parameter search", "## Teacher maps",
                    "## Training curves", "### Under corruptions"):
        assert heading in text
    assert "its map (IG " in text  # the store's attribution, as its registry entry describes it
    for png in ("montecarlo.png", "montecarlo_bars.png", "montecarlo_differences.png", "compression.png",
                "search.png", "gallery.png", "curves.png", "montecarlo_corruptions.png", "ablation_corruptions.png"):
        assert f"({png})" in text
        with Image.open(exp_dir / png) as im:
            im.verify()
        assert (exp_dir / png).with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (exp_dir / png).with_suffix(".svg").read_bytes()[:2000]
    assert "| kd+ig - student |" in r.stdout and "## Compression sweep" in r.stdout  # terminal summary
    # every table also as CSV (full precision) and LaTeX
    import csv
    mc = json.loads((exp_dir / "montecarlo.json").read_text())
    rows = list(csv.reader((exp_dir / "tables" / "montecarlo.csv").open()))
    assert rows[0][0] == "method" and float(rows[1][2]) == mc["summary"][rows[1][0]]["mean"]
    assert "\\begin{tabular}" in (exp_dir / "tables" / "montecarlo.tex").read_text()
    assert (exp_dir / "tables" / "montecarlo_2.csv").exists() and (exp_dir / "tables" / "compression.csv").exists()
    # curves grouped by experiment, method and budget: Monte Carlo and compression runs apart
    from igkd.report import curve_groups
    groups = curve_groups(exp_dir)
    assert any(g.startswith("montecarlo: kd+ig (1 ep)") for g in groups), list(groups)
    assert any(g.startswith("compression: ") for g in groups) and not any(g.startswith("search") for g in groups)
    assert all(len({len(h) for h in hs}) == 1 for hs in groups.values())  # runs of one budget only


@pytest.mark.parametrize("name", ["cifar10-cpu", "cifar10-cpu-alpha0.01"])
def test_committed_results_regenerate_their_own_report(tmp_path, name):
    """``igkd report results/cifar10-cpu`` rebuilds the committed report from the committed
    artifacts alone. Their map store was a cache on the machine that ran them: the gallery drawn
    then stays, described from the record, instead of a note naming that machine's cache."""
    from igkd.report import write_report
    committed = Path(__file__).resolve().parents[1] / "results" / name
    copy = tmp_path / name
    shutil.copytree(committed, copy)
    write_report(copy)
    assert (copy / "report.md").read_text() == (committed / "report.md").read_text()
    assert "![gallery](gallery.png)" in (copy / "report.md").read_text()
    (copy / "gallery.png").unlink()
    text = write_report(copy)
    assert "The map store is gone from this machine; re-run the experiment" in text and "/.cache/" not in text


def test_curves_keep_experiments_and_budgets_apart(tmp_path):
    """One-epoch ablation runs and three-epoch Monte Carlo runs of one method are two curves, not
    one mean cut to the shortest run."""
    from igkd.report import curve_groups, curves_section
    for name, experiment, epochs in [("a0", "ablation", 1), ("m0", "montecarlo", 3), ("m1", "montecarlo", 3)]:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"tags": {"method": "kd"}, "experiment": experiment,
                                                "config": {"epochs": epochs}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "val_accuracy": 50.0 + e + (name == "m1"),
                                                             "loss": 1.0 / e}) + "\n" for e in range(1, epochs + 1)))
    groups = curve_groups(tmp_path)
    assert sorted(groups) == ["ablation: kd (1 ep)", "montecarlo: kd (3 ep)"]
    assert [len(h) for h in groups["montecarlo: kd (3 ep)"]] == [3, 3]
    assert "+/- one standard deviation" in curves_section(tmp_path)
    with Image.open(tmp_path / "curves.png") as im:
        im.verify()


def test_report_hook_takes_extra_sections(exp_dir, tmp_path):
    from igkd import report
    (tmp_path / "summary.json").write_text(json.dumps({"method": "kd", "model": "m", "params": 10, "best_epoch": 1,
                                                       "val_accuracy": 50.0, "test_accuracy": 40.0,
                                                       "dataset": "demo", "epochs": 1}))
    sections = report.SECTIONS + [("deployment", lambda d: "## Deployment\n\nfrom a hook\n")]
    text = report.write_report(tmp_path, sections)
    assert "## Run" in text and "| kd | m | 10 | 1 | 50.00 | 40.00 |" in text and text.rstrip().endswith("from a hook")


# ---------------------------------------------------------------- configs, keys, errors
def test_run_key_ignores_speed_fields_and_fields_the_method_does_not_use():
    base = ExperimentConfig(**TINY)
    student = distill_config(base, method="student")
    assert run_key(student) == run_key(distill_config(base, method="student", alpha=0.9, T=7, threads=2,
                                                      eval_batch_size=7, teacher=""))
    kd = distill_config(base, method="kd")
    assert run_key(kd) != run_key(distill_config(base, method="kd", alpha=0.9))
    assert run_key(kd) == run_key(distill_config(base, method="kd", p=0.9, ig_steps=5, store="/elsewhere"))
    assert run_key(kd) != run_key(distill_config(base, method="kd", seed=1))
    assert run_key(distill_config(base, method="kd+ig")) != run_key(distill_config(base, method="kd+ig", p=0.2))
    assert run_key(distill_config(base, subset=0.5, subset_seed=1)) != run_key(distill_config(base, subset=0.5))
    # a map-reading method keys the maps' own settings only: another attribution's options are not its
    grad = distill_config(base, method="kd+ig", attribution="gradcam")
    assert run_key(grad) == run_key(distill_config(base, method="kd+ig", attribution="gradcam", ig_steps=5,
                                                   smoothgrad_samples=3))
    assert run_key(grad) != run_key(distill_config(base, method="kd+ig", attribution="gradcam", gradcam_layer="conv"))
    assert run_key(distill_config(base, method="kd+ig")) != run_key(distill_config(base, method="kd+ig", ig_steps=5))
    # a run recorded before an option existed matches when the option is at its default
    now = semantic_config(distill_config(base, method="kd", subset=1.0))
    older = {k: v for k, v in now.items() if k != "subset"}
    assert same_run(older, now) and not same_run(older, {**now, "subset": 0.5})
    assert not same_run({**older, "alpha": 0.1}, now)


def test_a_spec_in_another_option_order_is_the_same_run(tmp_path):
    # --model mobilenetv2:width=0.5,drop=5 and mobilenetv2:drop=5,width=0.5 trained twice
    base = ExperimentConfig(**TINY)
    a = distill_config(base, method="kd", model="mobilenetv2:width=0.5,drop=14", data="demo:size=12,gray=0")
    b = distill_config(base, method="kd", model="mobilenetv2:drop=14,width=0.5", data="demo:gray=0,size=12")
    assert run_key(a) == run_key(b) and semantic_config(a)["model"] == "mobilenetv2:drop=14,width=0.5"
    assert run_key(a) != run_key(distill_config(base, method="kd", model="mobilenetv2:drop=13,width=0.5"))
    # a finished run an older igkd keyed and recorded with the options in the order given is found
    older = {**semantic_config(a), "model": "mobilenetv2:width=0.5,drop=14", "data": "demo:size=12,gray=0"}
    folder = tmp_path / "runs" / "kd--0123456789abcdef"
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"key": "0123456789abcdef", "config": older}))
    (folder / "summary.json").write_text("{}")
    assert run_dir(tmp_path, Job("kd", b)) == folder
    assert run_dir(tmp_path, Job("kd", distill_config(base, method="kd", model="mobilenetv2:drop=13,width=0.5"))) \
        != folder


def test_shipped_configs_resolve_for_every_experiment():
    for name in ("cifar10_paper", "demo_experiments"):  # shipped recipes, by name
        for kind in ("ablation", "montecarlo", "compression", "search"):
            resolve(kind, name)
    paper = {k: resolve(k, "cifar10_paper") for k in ("ablation", "montecarlo", "compression", "search")}
    assert paper["montecarlo"].mc_subset == 0.8 and paper["montecarlo"].epochs == 100
    assert paper["compression"].depths == "3,5,7,9,11,13,15,17"
    from igkd.experiments.search import grid_points, search_space
    assert 5 <= len(search_space(paper["search"])["T"]) <= 9 and len(grid_points(search_space(paper["search"]))) > 100
    assert "2.5" in paper["search"].T_values.split(",") and "0.01" in paper["search"].alpha_values.split(",")
    demo = resolve("ablation", "demo_experiments")  # the overlay against modern baselines and its controls
    from igkd.experiments.common import methods_of
    assert {"kd", "dkd", "dist", "kd+ig", "dkd+ig", "explain", "kd+cutmix", "kd+ig-shuffled",
            "kd+overlay-constant"} <= set(methods_of(demo)) and demo.dkd_warmup == 2


def test_gpu_evidence_config_loads_and_validates():
    """cifar10_evidence_gpu (issue 15): the paper's full protocol for the evidence comparison on a GPU;
    every one of its 60 runs builds a valid distill config (nothing is trained or loaded here)."""
    from igkd.evaluate.corruptions import NAMES
    from igkd.experiments.common import methods_of
    from igkd.experiments.config import corruption_names
    from igkd.experiments.montecarlo import montecarlo_jobs
    mc = resolve("montecarlo", "cifar10_evidence_gpu")
    assert methods_of(mc) == ["student", "kd", "kd+ig", "kd+ig-shuffled", "ig", "kd+overlay-constant"]
    assert (mc.runs, mc.mc_subset, mc.epochs, mc.batch_size, mc.optimizer, mc.lr) == (10, 1.0, 100, 64, "adam", 0.001)
    assert corruption_names(mc) == list(NAMES) and mc.corruption_images == 0 and mc.device == "cuda"
    assert mc.teacher.endswith("CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt")
    assert mc.teacher_model == "mobilenetv2:drop=5" and mc.normalize == "none"
    jobs = montecarlo_jobs(mc, methods_of(mc))
    assert len(jobs) == 60 and len({j.key for j in jobs}) == 60
    assert {j.cfg.subset for j in jobs} == {1.0} and {j.cfg.seed for j in jobs} == set(range(10))
    assert resolve("ablation", "cifar10_evidence_gpu").seeds == 1


def test_experiment_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path / "e.yaml")
    r = igkd_cli("experiment", "ablation", "--config", cfg, "--out", tmp_path / "a", "--methods", "student,kd+xx")
    assert r.returncode == 2 and r.stderr.startswith("igkd: error: unknown method 'kd+xx'") and r.stderr.count("\n") == 1
    assert not (tmp_path / "a").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    for kind in ("ablation", "montecarlo", "compression", "search"):
        code, _, err = igkd_main(capsys, "experiment", kind, "--config", cfg, "--out", foreign)
        assert code == 2 and err.startswith("igkd: error: ") and "not an igkd experiment folder" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    for args, message in ((["compression", "--depths", "3,x"], "--depths '3,x' must be comma-separated int"),
                          (["montecarlo", "--runs", "1"], "--runs 1 is out of range"),
                          (["montecarlo", "--mc-subset", "0"], "--mc-subset 0.0 is out of range"),
                          (["montecarlo", "--corruptions", "contrast,fog"], "unknown corruption 'fog'; use a comma "
                           "list of gaussian_noise, gaussian_blur, contrast, brightness, jpeg, or all"),
                          (["search", "--sampler", "random"], "argument --sampler: invalid choice: 'random'"),
                          (["search", "--search-method", "student"], "nothing to search for method 'student'"),
                          (["ablation", "--teacher", tmp_path / "none.safetensors"], "none.safetensors")):
        code, _, err = igkd_main(capsys, "experiment", args[0], "--config", cfg, "--out", tmp_path / "x", *args[1:])
        assert code == 2 and err.startswith("igkd: error: ") and message in err, err
        assert err.count("\n") == 1 and not (tmp_path / "x").exists()
    code, _, err = igkd_main(capsys, "report", tmp_path / "nothing")
    assert code == 2 and err.startswith("igkd: error:")


def test_latex_tables_escape_each_special_character_once():
    from igkd.report import table_csv, table_latex
    tex = table_latex(["method_name", "acc (%)"], [["kd+ig \\ {x}", 91.234]])
    assert "method\\_name & acc (\\%) \\\\" in tex and "{lr}" in tex
    assert "kd+ig \\textbackslash{} \\{x\\} & 91.23 \\\\" in tex  # not \textbackslash\{\}
    assert table_csv(["m", "acc"], [["kd", 91.234], ["x", None]]) == "m,acc\nkd,91.234\nx,\n"
