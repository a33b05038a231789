"""Search and run-key fixes, on real Optuna studies in SQLite files: a study refuses another
recipe and keeps its creator's heartbeat, grid claims are atomic across processes, TPE draws
integers for integer options, invalid spaces are refused before anything is queued, a trial
failing with a user error is not queued again, duplicate grid values are one point, an
``init: teacher`` run is keyed by its teacher, and the training curves average only the runs
an experiment's results list.

Most tests call the study, claim and key functions directly (no training); the runs that
train are ``student`` searches of one epoch on a tenth of the demo set, which need neither a
teacher nor a store."""

import json
from pathlib import Path

import pytest
import yaml

import igkd
from igkd.errors import UserError
from igkd.experiments import resolve
from igkd.experiments.config import distill_config
from igkd.experiments.runs import run_key, semantic_config

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from igkd.experiments import search  # noqa: E402

TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
TINY = {"data": "demo", "teacher": str(TEACHER), "model": "mobilenetv2:width=0.5,drop=9", "normalize": "none",
        "epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 0.002, "crop_padding": 2, "subset": 0.1,
        "val_fraction": 0.1, "seed": 0, "T": 2.5, "alpha": 0.5, "p": 0.5, "ig_steps": 1, "threads": 1,
        "eval_batch_size": 500, "check_images": 0}


def config(tmp_path: Path, search_opts: dict, overrides: dict | None = None, **distill):
    path = tmp_path / f"s{len(list(tmp_path.glob('s*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"distill": {**TINY, **distill}, "experiment": {"search": search_opts}}))
    return resolve("search", path, overrides or {})


def study_of(cfg, heartbeat: int | None = None):
    storage = search.make_storage(cfg.storage, heartbeat or cfg.heartbeat)
    return search.open_study(cfg, storage, search.search_space(cfg), None), storage


# ---------------------------------------------------------------- 1. the study's recipe
@pytest.mark.parametrize("attr", ["x", ["a"], {"sampler": "grid", "method": "kd", "space": {}, "heartbeat": "soon"}])
def test_a_study_another_tool_set_up_is_refused_in_one_line(tmp_path, attr):
    """A study of igkd's name whose 'igkd' attribute is not igkd's record was an AttributeError
    (a string or list) or a ValueError (a heartbeat that is not a number) in every worker."""
    cfg = config(tmp_path, {"search_method": "kd", "T_values": [1], "alpha_values": [0.5]},
                 {"storage": f"sqlite:///{tmp_path / 'other.db'}", "study": "other"})
    optuna.create_study(study_name="other", storage=cfg.storage).set_user_attr("igkd", attr)
    with pytest.raises(UserError, match=r"^study 'other' in this storage was not set up by igkd \(its 'igkd' "
                                        r"attribute, a (str|list|dict), .*; use another --study name$"):
        study_of(cfg)


def test_a_study_refuses_a_worker_with_another_recipe(tmp_path):
    """Rerun with --epochs 2, the study reported (and TPE learnt from) 1-epoch trials."""
    db = {"storage": f"sqlite:///{tmp_path / 'recipe.db'}", "study": "recipe"}
    opts = {"search_method": "kd", "T_values": [1, 4], "alpha_values": [0.5]}
    (study, created), _ = study_of(config(tmp_path, opts, db))
    with pytest.raises(UserError) as e:
        study_of(config(tmp_path, opts, {**db, "epochs": 2}))
    assert created and study.user_attrs["igkd"]["recipe"]["epochs"] == 1
    assert "T" not in study.user_attrs["igkd"]["recipe"]  # the searched values are the trials' own
    assert str(e.value) == ("study 'recipe' in this storage was run with another recipe: epochs 1 (here 2); use the "
                            "study's settings, or another --study name (or --storage, or --out for the default "
                            "search.db)")
    other_teacher = tmp_path / "other.safetensors"
    other_teacher.write_bytes(TEACHER.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"another recipe: lr 0\.002 \(here 0\.01\), model mobilenetv2:drop=9,"
                                        r"width=0\.5 \(here mobilenetv2:drop=8,width=0\.5\), teacher sha256:"):
        study_of(config(tmp_path, opts, {**db, "lr": 0.01, "model": "mobilenetv2:width=0.5,drop=8",
                                         "teacher": str(other_teacher)}))
    # what cannot change a result joins: threads, the teacher's path (same file), the heartbeat
    same_teacher = tmp_path / "copy.safetensors"
    same_teacher.write_bytes(TEACHER.read_bytes())
    (_, created), _ = study_of(config(tmp_path, opts, {**db, "threads": 2, "teacher": str(same_teacher),
                                                       "heartbeat": 5}))
    assert not created and len(study.trials) == 2
    # the model in another option order is the same recipe, also against a study whose recipe
    # an older igkd stored in the order it was given
    (_, created), _ = study_of(config(tmp_path, opts, {**db, "model": "mobilenetv2:drop=9,width=0.5"}))
    assert not created
    attrs = study.user_attrs["igkd"]
    older = {k: v for k, v in attrs["recipe"].items() if k != "teacher_normalize"}  # before that option existed
    study.set_user_attr("igkd", {**attrs, "recipe": {**older, "model": "mobilenetv2:width=0.5,drop=9"}})
    (_, created), _ = study_of(config(tmp_path, opts, db))
    assert not created
    with pytest.raises(UserError, match=r"another recipe: teacher_normalize auto \(here none\); "):  # not its default
        study_of(config(tmp_path, opts, {**db, "teacher_normalize": "none"}))


# ---------------------------------------------------------------- 2. init: teacher keys
def test_init_teacher_runs_are_keyed_by_their_teacher(tmp_path):
    base = resolve("search", None, {**TINY, "search_method": "kd"})
    a, b, a_copy = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "a_copy.safetensors"
    a.write_bytes(b"teacher a")
    b.write_bytes(b"teacher b")
    a_copy.write_bytes(b"teacher a")

    def key(teacher, init):
        return run_key(distill_config(base, method="student", init=init, teacher=str(teacher)))
    assert key(a, "teacher") != key(b, "teacher")  # they start from other weights: two runs
    assert key(a, "teacher") == key(a_copy, "teacher")  # named by the file's sha256, not its path
    assert key(a, "teacher") != key(a, "scratch")
    # a run from scratch ignores the teacher, as before (committed results depend on these keys)
    assert key(a, "scratch") == key(b, "scratch") == run_key(distill_config(base, method="student", teacher=""))
    assert "teacher" not in semantic_config(distill_config(base, method="student", teacher=str(a)))


# ---------------------------------------------------------------- 3. atomic claims
def claimer(url: str, barrier, out) -> None:
    """One worker process: claim until no waiting trial is left, report the trial ids."""
    try:
        study = optuna.load_study(study_name="race", storage=search.make_storage(url, 60))
        barrier.wait(timeout=60)
        got = []
        while (t := search.claim_waiting(study)) is not None:
            got.append(t)
        out.put(got)
    except BaseException as e:  # noqa: BLE001 - reported to the test, not lost in a child
        out.put(repr(e))


def test_grid_claims_from_several_processes_take_each_trial_once(tmp_path):
    """Optuna's WAITING -> RUNNING is a read, then a write: four processes on one SQLite file
    claimed 319 times from 300 waiting trials (50 times from 40 here). The processes are
    forked, so that they start without importing igkd again."""
    import multiprocessing
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork to start the workers in time")
    url = f"sqlite:///{tmp_path / 'race.db'}"
    study = optuna.create_study(study_name="race", storage=search.make_storage(url, 60), direction="maximize")
    n, workers = 40, 4
    for i in range(n):
        study.enqueue_trial({"x": float(i)})
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=claimer, args=(url, barrier, out)) for _ in range(workers)]
    for p in procs:
        p.start()
    claims = []
    for _ in procs:
        got = out.get(timeout=120)
        assert isinstance(got, list), got
        claims += got
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(claims) == sorted(t._trial_id for t in study.get_trials())  # each exactly once
    assert all(t.state == TrialState.RUNNING and t.datetime_start is not None for t in study.get_trials())
    # an in-memory study (no database) claims as before
    memory = optuna.create_study()
    memory.enqueue_trial({"x": 1.0})
    assert search.claim_waiting(memory) == memory.trials[0]._trial_id and search.claim_waiting(memory) is None


# ---------------------------------------------------------------- 4. the study's heartbeat
def test_a_worker_with_a_shorter_heartbeat_leaves_live_trials_alone(tmp_path):
    """A worker started with --heartbeat 1 failed the trial of a live worker beating every 60 s
    (the study's heartbeat), which then crashed on its own trial."""
    db = {"storage": f"sqlite:///{tmp_path / 'beat.db'}", "study": "beat"}
    opts = {"search_method": "student", "lr_values": [0.002, 0.004]}
    (study, _), storage = study_of(config(tmp_path, opts, {**db, "heartbeat": 60}))
    live = search.claim_waiting(study)  # a worker beating every 60 s, last 10 s ago
    storage.engine.dispose()
    import sqlite3
    with sqlite3.connect(tmp_path / "beat.db") as con:
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-10 seconds') WHERE trial_id = ?",
                    (live,))
    result = search.run_search(config(tmp_path, opts, {**db, "heartbeat": 1}), tmp_path / "out", quiet=True)
    states = {t["number"]: t["state"] for t in result["trials"]}
    assert states == {0: "RUNNING", 1: "COMPLETE"}  # the live trial is left to its worker
    # ... and when another worker does fail it (a worker silent too long), its own worker finishes
    # cleanly: its result is not recorded, nothing raises
    trial = optuna.trial.Trial(study, live)
    optuna.load_study(study_name="beat", storage=db["storage"]).tell(0, state=TrialState.FAIL)
    assert search.finish(study, trial, 50.0, run="runs/x") is False
    assert study.trials[0].state == TrialState.FAIL and "run" not in study.trials[0].user_attrs


# ---------------------------------------------------------------- 5. TPE on integers and log ranges
def test_tpe_draws_integers_for_integer_options(tmp_path):
    """TPE suggested --batch-size 49.56, the run was refused and the trial stayed RUNNING."""
    cfg = config(tmp_path, {"sampler": "tpe", "trials": 1, "search_method": "student", "space": "batch_size=32,64"},
                 {"storage": f"sqlite:///{tmp_path / 'int.db'}", "study": "int"})
    result = search.run_search(cfg, tmp_path / "out", quiet=True)
    (trial,) = result["trials"]
    assert trial["state"] == "COMPLETE" and isinstance(trial["params"]["batch_size"], int)
    assert 32 <= trial["params"]["batch_size"] <= 64
    run_cfg = yaml.safe_load((tmp_path / "out" / trial["run"] / "config.yaml").read_text())
    assert run_cfg["batch_size"] == trial["params"]["batch_size"]


def test_tpe_refuses_a_log_range_starting_at_zero(tmp_path):
    for method, space, name in (("kd+at", "gamma=0,10", "gamma"), ("kd+explain", "explain_lambda=0,1",
                                                                   "explain_lambda")):
        cfg = config(tmp_path, {"sampler": "tpe", "search_method": method, "space": space})
        with pytest.raises(UserError) as e:
            search.search_space(cfg)
        assert str(e.value).startswith(f"tpe samples {name} on a log scale, so its range cannot start at 0; give a "
                                       f"smallest value above 0 in --space {name}=...")
        grid = config(tmp_path, {"sampler": "grid", "search_method": method, "space": space})
        assert min(search.search_space(grid)[name]) == 0  # a grid samples nothing: 0 is a point like any


# ---------------------------------------------------------------- 6. invalid grid points
def test_an_invalid_grid_point_is_refused_before_anything_is_queued(tmp_path):
    """exponent_min=3 with exponent_max=2 was queued, failed, and queued again forever."""
    cfg = config(tmp_path, {"search_method": "kd+ig", "T_values": [2], "alpha_values": [0.5], "p_values": [0.1],
                            "space": "exponent_min=1,3;exponent_max=2"},
                 {"storage": f"sqlite:///{tmp_path / 'bad.db'}"})
    with pytest.raises(UserError) as e:
        search.run_search(cfg, tmp_path / "out", quiet=True)
    assert str(e.value).startswith("search point T=2, alpha=0.5, p=0.1, exponent_min=3, exponent_max=2 is not a valid "
                                   "run: --exponent-min 3.0 is above --exponent-max 2.0")
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad.db").exists()
    tpe = config(tmp_path, {"sampler": "tpe", "search_method": "kd+ig", "space": "exponent_min=1,3;exponent_max=2,4"})
    with pytest.raises(UserError, match="corner of the tpe ranges .*exponent_min=3, exponent_max=2 is not a valid"):
        search.check_points(tpe, search.search_space(tpe))


def test_a_trial_failing_with_a_user_error_is_not_queued_again(tmp_path):
    """A point whose run is refused (here a layer the student does not have) fails the same way
    at every try: it is recorded as failed with the error, and the worker stops with it."""
    cfg = config(tmp_path, {"search_method": "at", "space": "gamma=1"},
                 {"storage": f"sqlite:///{tmp_path / 'user.db'}", "study": "user"}, at_student_layer="no.such.layer")
    with pytest.raises(UserError, match="no.such.layer"):
        search.run_search(cfg, tmp_path / "out", quiet=True)
    trials = optuna.load_study(study_name="user", storage=cfg.storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] and "no.such.layer" in trials[0].user_attrs["error"]


# ---------------------------------------------------------------- 7. duplicate grid values
def test_duplicate_grid_values_are_one_point():
    cfg = resolve("search", None, {**TINY, "search_method": "kd", "T_values": "2,2.0,2e0,4", "alpha_values": "0.5,.5"})
    space = search.search_space(cfg)
    assert space == {"T": [2.0, 4.0], "alpha": [0.5]}
    assert search.grid_points(space) == [{"T": 2.0, "alpha": 0.5}, {"T": 4.0, "alpha": 0.5}]


# ---------------------------------------------------------------- 8. training curves
def test_curves_average_only_the_runs_the_results_list(tmp_path):
    """An older ablation run with another lr and search trials over p sat in runs/ beside the
    ablation's run and were averaged into its curve."""
    from igkd.report import curve_groups
    runs = {"kd--new": ("ablation", {"method": "kd"}, 60.0), "kd--old-lr": ("ablation", {"method": "kd"}, 20.0),
            "ig--p0.1": ("search", {"method": "ig", "p": 0.1}, 30.0)}
    for name, (experiment, tags, acc) in runs.items():
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"tags": tags, "experiment": experiment, "config": {"epochs": 1}}))
        (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_accuracy": acc, "loss": 1.0}) + "\n")
    (tmp_path / "ablation.json").write_text(json.dumps({"runs": [{"method": "kd", "run": "runs/kd--new"}]}))
    (tmp_path / "search.json").write_text(json.dumps({"trials": [{"run": "runs/ig--p0.1"}]}))
    groups = curve_groups(tmp_path)
    assert list(groups) == ["ablation: kd (1 ep)"]
    assert [[e["val_accuracy"] for e in h] for h in groups["ablation: kd (1 ep)"]] == [[60.0]]
