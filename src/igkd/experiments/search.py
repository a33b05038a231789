"""``igkd experiment search``: grid or TPE search over the options of a method's parts
(T, alpha, p, the overlay's blend weight, DKD's beta, ...) and the learning rate.

Scored on the validation split (carved from the training set, ``--val-fraction``); the
test accuracy of each trial is recorded for the report but never used to choose.

The study lives in an Optuna storage: by default the SQLite file ``search.db`` in the
experiment folder; ``--storage URL`` (``postgresql://...``, ``mysql://...``, or a SQLite
file on a shared disk) lets several processes or machines work on one study: start the
same command on each (same ``--study``, same search space).

* grid: the process that creates the study queues every grid point once as a waiting
  trial; every worker claims waiting trials one at a time by an atomic state change in
  the storage (WAITING -> RUNNING), so each point is trained by exactly one worker.
* tpe: Optuna's TPE sampler (constant liar, so concurrent workers spread out) within the
  range [min, max] of each value list (T and lr on a log scale) until ``--trials``
  trials exist over all workers.

Workers send a heartbeat every ``--heartbeat`` seconds while training; a running trial
without one for three heartbeats (a killed worker) is marked failed by the next worker
and its point queued again, so a restarted search finishes the grid. The study keeps the
heartbeat of the worker that created it, and every worker uses that one. The study also
keeps its recipe (the run config without the searched values): a worker with another
recipe (epochs, model, data, teacher, seed...) is refused. The training runs
themselves are keyed by resolved config (:mod:`igkd.experiments.runs`): a trial whose run
finished before its worker died is not retrained, and an interrupted run resumes.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from itertools import product
from pathlib import Path

from dataclasses import fields

from ..config import DistillConfig, TrainConfig, recorded_defaults
from ..distill.parts import parse_method
from ..distill.trainer import TrainingDiverged
from ..errors import UserError
from ..progress import log
from ..config import to_dict
from ..report import _plt, _save, figure, figure_text, markdown_table, read_json, recipe_line, saved_recipe, shown
from ..report import recipe as options_recipe  # recipe() below is the study's
from ..spec import Spec, parse_spec
from .common import save_results, start
from .config import ExperimentConfig, distill_config, entry_point, split_list
from .runs import Job, canonical_specs, prepare_out, run_jobs, run_record, semantic_config

# the pre-parts options for value lists: option -> its flag (--space covers every other)
LEGACY_LISTS = {"T": "--T-values", "alpha": "--alpha-values", "p": "--p-values", "lr": "--lr-values"}
# bookkeeping numbers that are not hyper-parameters
NOT_SEARCHABLE = {"epochs", "seed", "subset_seed", "threads", "eval_batch_size", "log_every", "val_fraction", "subset"}


def optuna_or_error():
    try:
        import optuna
    except ImportError:
        raise UserError('igkd experiment search needs Optuna; install it with: pip install "igkd[search]"') from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # fail_stale_trials
    return optuna


def search_space(cfg: ExperimentConfig) -> dict[str, list[float]]:
    """The value list of each searched option. Defaults come from the parts of
    ``--search-method`` (each part's ``search`` lists: kd's T and alpha, the overlay's p,
    ...); ``--T-values``, ``--alpha-values``, ``--p-values`` and ``--lr-values`` replace
    theirs, and ``--space "NAME=v1,v2;NAME=..."`` sets any numeric option of the method's
    parts or of the training recipe (``blend=0.25,0.5,0.75`` asks the blend-weight
    question). An empty list drops an option."""
    method = parse_method(cfg.search_method)
    space: dict[str, list[float]] = {}
    allowed = searchable(method)
    for part in method.parts:
        for k, vals in part.search.items():
            # a plug-in's lists are read here first: a word (a choice option's values) or a name the
            # part lacks was a traceback, and the search can only vary numbers
            if k not in allowed or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                own = ", ".join(n for n in allowed if n in part.fields) or "none"
                raise UserError(f"method part {part.name!r} lists search values {list(vals)!r} for {k!r}, which is "
                                f"not one of its numeric options ({own}); fix the part's 'search' lists")
            space[k] = [float(v) for v in vals]
    given = parse_space(cfg.space, method)
    for name, flag in LEGACY_LISTS.items():
        text = getattr(cfg, name + "_values")
        if not text.strip():
            continue
        # said, not dropped in silence: a list the search will not try (a recipe's p list under
        # --search-method kd, or a list --space replaces) would otherwise look searched
        if name not in space and name != "lr":
            _warn(f"{flag} is not searched: method {cfg.search_method!r} has no option {name} "
                  f"(pass {flag} '' to drop it)")
        elif name in given:
            _warn(f"{flag} is not searched: --space {name}=... replaces it")
        else:
            space[name] = split_list(text, float, flag)
    space.update(given)
    # one value written twice (2, 2.0, 2e0) is one grid point, not two trials of the same run
    space = {k: list(dict.fromkeys(v)) for k, v in space.items() if v}
    fields_by_name = {f.name: f for f in fields(DistillConfig)}
    for name, values in space.items():
        m = fields_by_name[name].metadata
        for v in values:
            if m.get("low") is not None and (v < m["low"] or v > m["high"] or (m.get("low_open") and v == m["low"])):
                raise UserError(f"search value {v:g} is out of range for {name}; use values in "
                                f"{'(' if m.get('low_open') else '['}{m['low']}, {m['high']}]")
        # refused rather than sampled linearly: the parts put on a log scale what spans decades
        # (a linear draw over [0, 100] would almost never try gamma below 1)
        if cfg.sampler == "tpe" and log_scale(name, cfg) and min(values) != max(values) and min(values) <= 0:
            flag = LEGACY_LISTS.get(name, f"--space {name}=...")
            raise UserError(f"tpe samples {name} on a log scale, so its range cannot start at {min(values):g}; give a "
                            f"smallest value above 0 in {flag} (e.g. {max(values) / 1000:g}), or use --sampler grid")
    if not space:
        raise UserError(f"nothing to search for method {cfg.search_method!r}: give --space NAME=v1,v2 (any numeric "
                        "option of its parts, or lr) or --lr-values")
    return space


def _warn(text: str) -> None:
    print(f"igkd: warning: {text}", file=sys.stderr, flush=True)


def searchable(method) -> dict[str, type]:
    """Numeric options a search of ``method`` may vary: its parts' and the training recipe's."""
    base = {f.name for f in fields(TrainConfig)}
    return {f.name: type(f.default) for f in fields(DistillConfig)
            if (f.name in method.fields or f.name in base) and type(f.default) in (int, float)
            and f.name not in NOT_SEARCHABLE}


def parse_space(text: str, method) -> dict[str, list[float]]:
    """``"blend=0.25,0.5;lr=0.01,0.05"`` -> {"blend": [0.25, 0.5], "lr": [0.01, 0.05]}."""
    out: dict[str, list[float]] = {}
    allowed = searchable(method)
    for item in filter(None, (t.strip() for t in text.replace("\n", ";").split(";"))):
        name, eq, values = item.partition("=")
        name = name.strip().replace("-", "_")
        if not eq:
            raise UserError(f"--space item {item!r} must be NAME=v1,v2,...")
        if name not in allowed:
            raise UserError(f"--space: {name!r} is not a numeric option of {method.name} or the training recipe; "
                            f"choose from {', '.join(sorted(allowed))}")
        out[name] = split_list(values, float, f"--space {name}")
    return out


def log_scale(name: str, cfg: ExperimentConfig) -> bool:
    """TPE samples these on a log scale: the learning rate and what the parts declare (temperatures...)."""
    return name == "lr" or any(name in p.log_scale for p in parse_method(cfg.search_method).parts)


def grid_points(space: dict[str, list[float]]) -> list[dict[str, float]]:
    names = list(space)
    return [dict(zip(names, combo)) for combo in product(*(space[n] for n in names))]


def check_points(cfg: ExperimentConfig, space: dict[str, list[float]]) -> None:
    """Refuse (one line) a space holding an invalid run: every grid point, or with tpe every
    corner of the ranges (where pairs like exponent_min <= exponent_max break first), must
    build a DistillConfig and pass its parts' checks that need no model. Queued, such a
    point failed at every try and was queued again forever."""
    method = parse_method(cfg.search_method)
    points = grid_points(space) if cfg.sampler == "grid" else \
        grid_points({k: list(dict.fromkeys((min(v), max(v)))) for k, v in space.items()})
    for point in points:
        try:
            run = distill_config(cfg, method=method.name, **point)
            for part in method.parts:
                try:
                    part.check(run, None, None, None)
                except UserError:
                    raise
                except Exception:  # noqa: BLE001 - this check needs the models (layer names): it runs at training
                    pass
        except UserError as e:
            where = "search point" if cfg.sampler == "grid" else "corner of the tpe ranges"
            raise UserError(f"{where} {', '.join(f'{k}={v:g}' for k, v in point.items())} is not a valid run: "
                            f"{e}; change the value lists") from None


def recipe(cfg: ExperimentConfig, space: dict) -> dict:
    """What every trial of a study shares: the run config's fields that decide its result
    (:func:`~igkd.experiments.runs.semantic_config`: the teacher by its file's sha256)
    without the searched ones. The data spec counts without its folder, which may differ
    between machines (each with its own copy of the data); its kind and options must agree."""
    d = semantic_config(distill_config(cfg, method=parse_method(cfg.search_method).name))
    for name in space:
        d.pop(name, None)
    data = parse_spec(d["data"], "dataset spec")
    d["data"] = str(Spec(data.kind, None, data.canonical().options))
    return json.loads(json.dumps(d))


def recipe_difference(have: dict, want: dict, most: int = 4) -> str:
    """'epochs 1 (here 2), lr 0.002 (here 0.01)': the settings two recipes disagree on."""
    names = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    text = ", ".join(f"{k} {have.get(k, 'unset')} (here {want.get(k, 'unset')})" for k in names[:most])
    return text + (f" and {len(names) - most} more" if len(names) > most else "")


def objective_value(summary: dict) -> float:
    """What the search maximises: the validation accuracy of the run's best epoch."""
    return float(summary["val_accuracy"])


def storage_url(cfg: ExperimentConfig, out: Path) -> str:
    return cfg.storage or f"sqlite:///{(out / 'search.db').resolve()}"


def safe_url(url: str) -> str:
    """The storage URL without credentials (for logs and results)."""
    scheme, sep, rest = url.partition("://")
    return url if "@" not in rest else f"{scheme}{sep}...@{rest.rsplit('@', 1)[1]}"


def make_storage(url: str, heartbeat: int):
    optuna = optuna_or_error()
    kwargs = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat}
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback  # the name before Optuna 4.9
    callback = retry(max_retry=None)
    kwargs["heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params
           else "failed_trial_callback"] = callback
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
        except Exception as e:  # noqa: BLE001 - bad URL, unreachable server, missing driver
            if attempt == 4 or not url.startswith("sqlite"):  # sqlite: maybe a worker creating the tables now
                raise UserError(f"cannot open Optuna storage {safe_url(url)!r}: {str(e).splitlines()[0]}") from None
            time.sleep(1 + attempt)


def retrying(fn, attempts: int = 30):
    """Call ``fn`` again when the storage is busy (SQLite locks under concurrent writers)."""
    optuna = optuna_or_error()
    for i in range(attempts):
        try:
            return fn()
        except optuna.exceptions.StorageInternalError:
            if i == attempts - 1:
                raise
            time.sleep(0.2 + 0.1 * i)


def open_study(cfg: ExperimentConfig, storage, space: dict, sampler) -> tuple[object, bool]:
    """Create the study (returns True) or load it (False) and check it searches the same space
    with the same recipe. Its ``igkd`` user attribute keeps both, and the heartbeat."""
    optuna = optuna_or_error()
    meta = {"sampler": cfg.sampler, "method": parse_method(cfg.search_method).name, "space": space,
            "recipe": recipe(cfg, space), "heartbeat": cfg.heartbeat}
    try:
        study = retrying(lambda: optuna.create_study(study_name=cfg.study, storage=storage, direction="maximize",
                                                     sampler=sampler, load_if_exists=False))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = retrying(lambda: optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler))
        created = False
    if created:
        if cfg.sampler == "grid":
            for i, point in enumerate(grid_points(space)):
                retrying(lambda: study.enqueue_trial(point, user_attrs={"grid_point": i}))
        retrying(lambda: study.set_user_attr("igkd", meta))
        return study, True
    deadline = time.monotonic() + 300
    while "igkd" not in study.user_attrs:  # the creating worker is still queueing the grid
        if time.monotonic() > deadline:
            raise UserError(f"study {cfg.study!r} exists but was never set up by igkd (its creator may have died "
                            "while queueing the grid); use another --study name")
        time.sleep(0.5)
    have = study.user_attrs["igkd"]
    if not _igkd_attr(have):
        # a study of the same name set up by another tool (or a damaged storage): its trials are
        # not igkd's, and reading its attribute as igkd's was an AttributeError or a ValueError
        raise UserError(f"study {cfg.study!r} in this storage was not set up by igkd (its 'igkd' attribute, a "
                        f"{type(have).__name__}, is not the record igkd writes); use another --study name")
    meta = json.loads(json.dumps(meta))
    if any(meta[k] != have.get(k) for k in ("sampler", "method", "space")):
        raise UserError(f"study {cfg.study!r} in this storage searches {have['sampler']} {have['method']} over "
                        f"{have['space']}, not {cfg.sampler} {meta['method']} over {space}; use the same options "
                        "or another --study name")
    # trials of another recipe (epochs, model, data, teacher...) are not comparable: TPE would
    # learn from both, and a finished grid would report the other recipe's trials as this one's
    stored = _as_now(have["recipe"], meta["recipe"]) if "recipe" in have else None
    if stored is not None and stored != meta["recipe"]:
        raise UserError(f"study {cfg.study!r} in this storage was run with another recipe: "
                        f"{recipe_difference(stored, meta['recipe'])}; use the study's settings, or another "
                        "--study name (or --storage, or --out for the default search.db)")
    return study, False


def _igkd_attr(have) -> bool:
    """Whether a study's ``igkd`` user attribute has the shape :func:`open_study` writes."""
    beat = have.get("heartbeat", 1) if isinstance(have, dict) else None
    return (isinstance(have, dict) and all(isinstance(have.get(k), str) for k in ("sampler", "method"))
            and isinstance(have.get("space"), dict) and isinstance(have.get("recipe", {}), dict)
            and isinstance(beat, int) and not isinstance(beat, bool) and beat > 0)


def _as_now(recipe: dict, now: dict) -> dict:
    """A stored recipe as this igkd writes one: specs in canonical option order (older studies
    kept the order given) and options added since at their defaults (as for finished runs,
    :func:`~igkd.experiments.runs.same_run`), so a new option does not orphan a study."""
    defaults = recorded_defaults(DistillConfig)  # augment: pad-crop, as every study before it
    recipe = canonical_specs(recipe)
    return {**{k: defaults[k] for k in now if k not in recipe and k in defaults}, **recipe}


def study_heartbeat(study, cfg: ExperimentConfig) -> int:
    """The heartbeat every worker of the study uses: its creator's (a study made by an older
    igkd keeps none: then this worker's --heartbeat). A worker judging staleness by a shorter
    heartbeat of its own failed live trials of workers beating at the study's."""
    return int(study.user_attrs["igkd"].get("heartbeat", cfg.heartbeat))


def claim_waiting(study) -> int | None:
    """Atomically move one WAITING trial to RUNNING; its id, or None when none is left."""
    optuna = optuna_or_error()
    from optuna.trial import TrialState
    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # optuna wraps an RDBStorage in a cache
    atomic = isinstance(backend, optuna.storages.RDBStorage)
    for t in retrying(lambda: study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
        try:
            if atomic:
                won = retrying(lambda: claim_row(backend, t._trial_id))
            else:  # in-memory and journal storages apply state changes one at a time themselves
                won = retrying(lambda: storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING))
            if won:
                if hasattr(storage, "record_heartbeat"):  # (an in-memory storage keeps none)
                    retrying(lambda: storage.record_heartbeat(t._trial_id))  # a trial without one is never stale
                return t._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def claim_row(storage, trial_id: int) -> bool:
    """WAITING -> RUNNING as one conditional UPDATE; True when this call made the change.

    Optuna's set_trial_state_values reads the state, then writes it: SQLite ignores its
    SELECT ... FOR UPDATE, so two workers could both read WAITING and both train the point.
    ``UPDATE ... WHERE state = 'WAITING'`` is decided by the database (SQLite's write lock,
    PostgreSQL's and MySQL's row locks re-check the condition): one row count of 1 only."""
    import sqlalchemy.exc
    import sqlalchemy.orm
    from datetime import datetime
    from optuna.exceptions import StorageInternalError
    from optuna.storages._rdb import models
    from optuna.trial import TrialState
    table = models.TrialModel.__table__
    try:
        with sqlalchemy.orm.Session(storage.engine) as session, session.begin():
            claim = table.update().where(table.c.trial_id == trial_id, table.c.state == TrialState.WAITING)
            won = session.execute(claim.values(state=TrialState.RUNNING)).rowcount == 1
            if won:  # through the model, which stores the time as this optuna version does
                session.get(models.TrialModel, trial_id).datetime_start = datetime.now()
    except sqlalchemy.exc.OperationalError as e:  # a busy database: retrying() tries again
        raise StorageInternalError(str(e).splitlines()[0]) from e
    return won


@contextmanager
def heartbeat(storage, trial_id: int, every: int):
    """Record the trial's heartbeat every ``every`` seconds while the block runs."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried next time
                pass
            if stop.wait(every):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def folder_lock(path: Path):
    """An exclusive lock (flock) on ``path``: one worker at a time builds shared artifacts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def suggest(trial, cfg: ExperimentConfig, space: dict) -> dict[str, float]:
    params: dict = {}
    kinds = {f.name: type(f.default) for f in fields(DistillConfig)}
    for name, values in space.items():
        if cfg.sampler == "grid" or min(values) == max(values):
            params[name] = float(trial.suggest_categorical(name, sorted(set(values))))
        elif kinds[name] is int:  # a float batch size or epoch count is no run (check_points: whole ends)
            params[name] = trial.suggest_int(name, int(min(values)), int(max(values)), log=log_scale(name, cfg))
        else:
            params[name] = float(trial.suggest_float(name, min(values), max(values), log=log_scale(name, cfg)))
    return params


def finish(study, trial, value: float | None = None, failed: bool = False, **attrs) -> bool:
    """Record the trial's attributes and outcome; False when it was finished meanwhile by
    another worker, which took it for dead (its heartbeat too late: a stalled machine)."""
    optuna = optuna_or_error()
    from optuna.trial import TrialState
    state = TrialState.FAIL if failed else TrialState.COMPLETE
    try:
        if retrying(lambda: study._storage.get_trial(trial._trial_id)).state.is_finished():
            return False
        for k, v in attrs.items():
            retrying(lambda: trial.set_user_attr(k, v))
        told = retrying(lambda: study.tell(trial, None if failed else value, state=state, skip_if_finished=True))
        return told.state == state
    except optuna.exceptions.UpdateFinishedTrialError:  # finished between the check and the update
        return False


@entry_point
def run_search(cfg: ExperimentConfig, out: str | Path, quiet: bool = False) -> dict:
    """Work on the study until no grid point (or trial budget) is left; return the results."""
    optuna = optuna_or_error()
    from optuna.trial import TrialState
    if cfg.val_fraction <= 0:
        raise UserError("the search is scored on the validation split; set --val-fraction above 0 (e.g. 0.1)")
    space = search_space(cfg)
    check_points(cfg, space)
    method = parse_method(cfg.search_method).name
    storage = make_storage(cfg.storage, cfg.heartbeat) if cfg.storage else None  # a bad URL fails first
    out = prepare_out(out, "search")
    with folder_lock(out / ".setup.lock"):  # concurrent workers: one builds the store, the others reuse it
        out, ctx, data = start(cfg, out, "search", [method], quiet)
    url = storage_url(cfg, out)
    storage = storage or make_storage(url, cfg.heartbeat)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, constant_liar=True) if cfg.sampler == "tpe" else None
    study, created = open_study(cfg, storage, space, sampler)
    beat = study_heartbeat(study, cfg)
    if beat != cfg.heartbeat:  # stale trials are judged by the study's heartbeat, as its other workers judge them
        log(f"search: study {cfg.study!r} keeps its creator's heartbeat of {beat} s; this worker uses it, not "
            f"--heartbeat {cfg.heartbeat}", quiet)
        storage = make_storage(url, beat)
        study = retrying(lambda: optuna.load_study(study_name=cfg.study, storage=storage, sampler=sampler))
    if "recipe" not in study.user_attrs["igkd"]:
        log(f"search: study {cfg.study!r} was made by an older igkd that kept no recipe: make sure its trials ran "
            "with this command's settings", quiet)
    if cfg.sampler == "tpe" and not created:  # another seed per worker start: no repeated start-up points
        study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials) + os.getpid() % 1000,
                                                   constant_liar=True)
    size = len(grid_points(space)) if cfg.sampler == "grid" else cfg.trials
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log(f"search: {'created' if created else 'joined'} study {cfg.study!r} in {safe_url(url)} as worker {worker}; "
        f"{cfg.sampler} over {', '.join(f'{k} {v}' for k, v in space.items())} ({size} trials), method {method}, "
        "objective: validation accuracy", quiet)
    done_here = 0
    while True:
        retrying(lambda: optuna.storages.fail_stale_trials(study))
        trial_id = claim_waiting(study)
        if trial_id is None and cfg.sampler == "grid":
            break
        if trial_id is None:
            alive = retrying(lambda: study.get_trials(deepcopy=False, states=(
                TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.PRUNED)))
            if len(alive) >= cfg.trials:
                break
            with warnings.catch_warnings():  # igkd sends the heartbeats itself (see heartbeat())
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = retrying(study.ask)
        else:
            trial = optuna.trial.Trial(study, trial_id)
        params = None
        # from here on the trial is RUNNING in the storage: whatever fails must finish it, or it
        # stayed RUNNING for good (no heartbeat: never stale) and counted against --trials
        try:
            with heartbeat(storage, trial._trial_id, beat):
                params = suggest(trial, cfg, space)
                retrying(lambda: trial.set_user_attr("worker", worker))
                job = Job(f"{method} " + " ".join(f"{k}={v:g}" for k, v in params.items()),
                          distill_config(cfg, method=method, **params), {"method": method, **params})
                summary = run_jobs([job], out, f"search trial {trial.number}", quiet, data=data)[0]
        except TrainingDiverged as e:  # a bad point (e.g. too high a learning rate), not a broken worker
            finish(study, trial, failed=True, diverged=str(e))
            log(f"search trial {trial.number}: diverged, recorded as failed ({e})", quiet)
            continue
        except UserError as e:  # the options are wrong: the same point would fail again, so not queued again
            finish(study, trial, failed=True, error=str(e))
            raise
        except optuna.exceptions.UpdateFinishedTrialError:  # failed by another worker as stale: it re-queued it
            log(f"search trial {trial.number}: taken over by another worker (no heartbeat of this one for "
                f"{3 * beat} s)", quiet)
            continue
        except BaseException:
            if finish(study, trial, failed=True) and params is not None:  # (taken over: re-queued already)
                retrying(lambda: study.enqueue_trial(params, user_attrs={"retry_of": trial.number}))
            raise
        rec = run_record(summary, job, out)
        if not finish(study, trial, objective_value(summary), run=rec["run"], val_accuracy=summary["val_accuracy"],
                      test_accuracy=summary["test_accuracy"]):
            # its run is finished and keyed: the worker that re-queued the point reuses it
            log(f"search trial {trial.number}: another worker took it for dead (no heartbeat of this one for "
                f"{3 * beat} s) and queued its point again; its finished run will be reused there", quiet)
            continue
        done_here += 1
    # collected and written under the folder's lock: two workers finishing at once could each read
    # the study, then the one that read it first wrote last, leaving search.json a trial behind
    with folder_lock(out / ".setup.lock"):
        result = collect(study, cfg, space, ctx, url)
        table = search_table(result)
        save_results(out, "search", result, table, cfg)
    running = sum(1 for t in result["trials"] if t["state"] == "RUNNING")
    best = result["best"]
    log(f"search: this worker ran {done_here} trial(s); {result['complete']} complete"
        + (f", {running} still running on other workers" if running else "")
        + (f"; best val {best['val_accuracy']:.2f}% at " + ", ".join(f"{k}={best['params'][k]:g}" for k in space)
           if best else ""), quiet)
    return result


def collect(study, cfg: ExperimentConfig, space: dict, ctx: dict, url: str) -> dict:
    trials = []
    for t in study.get_trials(deepcopy=False):
        trials.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                       "val_accuracy": t.value, "test_accuracy": t.user_attrs.get("test_accuracy"),
                       "run": t.user_attrs.get("run"), "worker": t.user_attrs.get("worker"),
                       "diverged": "diverged" in t.user_attrs})  # a failed trial's why, for the section
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    best = max(complete, key=lambda t: t["val_accuracy"]) if complete else None
    return {**ctx, "sampler": cfg.sampler, "method": parse_method(cfg.search_method).name, "space": space,
            "storage": safe_url(url), "study": cfg.study, "model": cfg.model, "epochs": cfg.epochs,
            "base_lr": cfg.lr, "val_fraction": cfg.val_fraction, "objective": "val_accuracy",
            "complete": len(complete), "trials": trials, "best": best,
            "recipe": options_recipe(to_dict(cfg), [parse_method(cfg.search_method).name], searched=space)}


def search_table(result: dict, top: int = 20) -> str:
    names = list(result["space"])
    done = sorted((t for t in result["trials"] if t["state"] == "COMPLETE"), key=lambda t: -t["val_accuracy"])
    rows = [[t["number"], *[shown(t["params"].get(n, float("nan")), "g") for n in names], t["val_accuracy"],
             t["test_accuracy"] if t["test_accuracy"] is not None else ""] for t in done[:top]]
    return markdown_table(["trial", *names, "val acc (%) [objective]", "test acc (%) [not used]"], rows)


@figure
def heat_map(path: Path, result: dict) -> Path | None:
    """Mean validation accuracy over (T, alpha) (other parameters averaged); TPE trials as a scatter."""
    done = [t for t in result["trials"] if t["state"] == "COMPLETE"]
    if not done or not {"T", "alpha"} <= set(result["space"]):
        return None
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    if result["sampler"] == "grid":
        ts, als = sorted(set(result["space"]["T"])), sorted(set(result["space"]["alpha"]))
        grid = np.full((len(als), len(ts)), np.nan)
        for i, a in enumerate(als):
            for j, T in enumerate(ts):
                vals = [t["val_accuracy"] for t in done if t["params"]["T"] == T and t["params"]["alpha"] == a]
                if vals:
                    grid[i, j] = float(np.mean(vals))
        im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", norm=_accuracy_norm(grid))
        ax.set_xticks(range(len(ts)), [f"{v:g}" for v in ts])
        ax.set_yticks(range(len(als)), [f"{v:g}" for v in als])
        for i in range(len(als)):
            for j in range(len(ts)):
                if np.isfinite(grid[i, j]):
                    # white on viridis' yellow end could not be read, and those are the best cells
                    light = im.norm(grid[i, j]) > 0.6
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=7,
                            color="k" if light else "w")
    else:
        values = [t["val_accuracy"] for t in done]
        im = ax.scatter([t["params"]["T"] for t in done], [t["params"]["alpha"] for t in done],
                        c=values, cmap="viridis", s=30, norm=_accuracy_norm(values))
        ax.set_xscale("log")
        from .compression import log_ticks  # plain numbers (1, 2, 5), not 10^0 and 2x10^0
        log_ticks(ax, [t["params"]["T"] for t in done])
    fig.colorbar(im, ax=ax, label="validation accuracy (%)")
    ax.set_xlabel("temperature T")
    ax.set_ylabel("KD weight alpha")
    others = [figure_text(n) for n in result["space"] if n not in ("T", "alpha")]
    # "trials" said neither what the colour is nor that a grid cell is a mean
    ax.set_title(("validation accuracy per (T, alpha), mean over " + ", ".join(others) if others else
                  "validation accuracy per (T, alpha)") if result["sampler"] == "grid" else
                 f"validation accuracy of each of the {len(done)} trials", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _accuracy_norm(values):
    """The colour scale of validation accuracies: their range, padded by a point where they are
    (nearly) all equal, and never past [0, 100]: trials that all scored 100% had a colour bar
    from 90 to 110%."""
    import numpy as np
    from matplotlib.colors import Normalize
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return Normalize(0.0, 100.0)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1.0:
        lo, hi = lo - 1.0, hi + 1.0
    lo, hi = max(lo, 0.0), min(hi, 100.0)
    if hi - lo < 1.0:  # at an end of [0, 100]: the point inside it
        lo, hi = (hi - 1.0, hi) if hi >= 100.0 else (lo, lo + 1.0)
    return Normalize(lo, hi)


def _failed_text(r: dict) -> str:
    """The failed trials, in words: a gap in the trial numbers (0, 2, 3) was explained nowhere."""
    failed = [t for t in r["trials"] if t["state"] == "FAIL"]
    if not failed:
        return ""
    numbers = ", ".join(str(t["number"]) for t in failed)
    s = "s" * (len(failed) != 1)
    if all("diverged" in t for t in failed):  # results written since collect() records why
        div = sum(bool(t["diverged"]) for t in failed)
        why = (f"{len(failed) - div} interrupted (its point queued again as a new trial)" if div < len(failed) else "")
        why += ("; " if why and div else "") + (f"{div} diverged (not retried: the same point would diverge again)"
                                                 if div else "")
        return f" {len(failed)} failed trial{s} ({numbers}): {why}."
    return (f" {len(failed)} failed trial{s} ({numbers}; interrupted or diverged): an interrupted trial's point is "
            "queued again as a new trial.")


def section(run_dir: Path) -> str | None:
    r = read_json(run_dir / "search.json")
    if r is None:
        return None
    img = heat_map(run_dir / "search.png", r)
    best = r["best"]
    best_text = ("Best by validation accuracy: trial {} ({}), val {:.2f}%, test {:.2f}%.".format(
        best["number"], ", ".join(f"{k}={v:g}" for k, v in best["params"].items()), best["val_accuracy"],
        best["test_accuracy"]) if best else "No trial has finished yet.")
    # TPE draws from each list's range, not its values: 'T in {1, 4}' read as the two points tried
    ranged = r["sampler"] == "tpe"
    space = "; ".join(f"{k} in [{min(vals):g}, {max(vals):g}]" if ranged and len(set(vals)) > 1
                      else f"{k} in {{{', '.join(f'{v:g}' for v in vals)}}}" for k, vals in r["space"].items())
    rec = recipe_line(saved_recipe(run_dir, "search", r, [r["method"]], searched=r["space"]))
    return (f"## Hyper-parameter search\n\n{r['sampler']} search of `{r['method']}` (student `{r['model']}`, "
            f"{r['epochs']} epochs) over {space}; {r['complete']} complete trial(s) in study `{r['study']}` "
            f"({r['storage']}).{_failed_text(r)} Objective: accuracy on the validation split ({100 * r['val_fraction']:.0f}% of the "
            f"training set); test accuracy is shown, never used to choose. {best_text}\n\n"
            + (f"{rec}\n\n" if rec else "") + f"{search_table(r)}\n"
            + ("\n![search heat map](search.png)\n" if img else ""))


__all__ = ["grid_points", "objective_value", "run_search", "search_space", "search_table", "section"]
