"""Runs of an experiment, found again by their resolved configuration.

Every training run of an experiment is one :class:`~igkd.config.DistillConfig`. Its key is
the sha256 of that config with the fields that cannot change the result removed (threads,
device, store location, evaluation batch, speed switches) and the fields its method does
not use removed too (the options of parts not in its method, the store's settings unless
it reads maps, the teacher unless it needs one or the student starts from its weights,
``init: teacher``); the teacher is named by the sha256 of its file, not its path, and the
model and data specs by their options in key order. A run
lives in ``OUT/runs/<label>--<key>/``:

* ``summary.json`` present: finished; the experiment reuses it and trains nothing;
* ``last.pt`` present: interrupted; it is resumed after its last finished epoch;
* otherwise it is trained from the start.

So a killed experiment, re-run with the same command, redoes only unfinished work, and
experiments sharing an output folder share identical runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import api
from ..attribution import registry as attribution_registry
from ..config import DistillConfig, PrecomputeConfig, init_file, recorded_defaults, to_dict
from ..distill.parts import config_fields as part_config_fields, parse_method
from ..distill.parts.provenance import method_code
from ..models.user import code_sha256
from ..distill.augment import resolve_augment
from ..distill.trainer import TrainingDiverged, one_class
from ..errors import UserError
from ..fileio import file_sha256, native_path, new_folder, write_json
from ..lock import folder_held
from ..models import weights_file
from ..progress import fmt_percent, fmt_seconds, log
from ..spec import canonical_spec

# fields that do not change what a run computes (speed, placement, bookkeeping)
NON_SEMANTIC = ("threads", "stream", "device", "store", "eval_batch_size", "channels_last", "optimizer_impl", "compile",
                "chunk_size", "ig_batch", "check_images", "check_steps", "verify_store", "log", "log_every")
# every setting of the stored maps (attribution, steps, baseline, ...): they matter to methods using maps
STORE_FIELDS = tuple(f.name for f in fields(PrecomputeConfig))
TEACHER_FIELDS = ("teacher", "teacher_model", "teacher_normalize")
MARKER = "experiment.json"

_file_hashes: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: str | Path) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _file_hashes:
        _file_hashes[key] = file_sha256(p)
    return _file_hashes[key]


def teacher_file(teacher: str) -> Path | None:
    """The file holding a teacher's weights: the checkpoint ``teacher`` names, or the program
    of a spec that holds its own weights (``--teacher torchscript:FILE``, which ``igkd distill``
    takes); None without a teacher. The spec is no path: checked as one, experiments refused
    such a teacher as missing, and a key from the spec's text would not change with its file."""
    if not teacher:
        return None
    from ..models import holds_own_weights
    from ..spec import parse_spec
    if holds_own_weights(str(teacher)):
        return Path(parse_spec(str(teacher), "--teacher").arg or "")
    return Path(teacher)


def semantic_config(cfg: DistillConfig) -> dict:
    """The fields of ``cfg`` that decide a run's result, canonicalised."""
    method = parse_method(cfg.method)
    d = to_dict(cfg)
    d["method"] = method.name
    size = _image_sizes.get(_size_key(cfg.data))
    if d.get("augment") == "auto" and size is not None:
        # as the run will resolve and record it: runs made before auto existed recorded pad-crop.
        # The size is the one start() saw; a key asked for before any data was loaded keeps auto
        # rather than load the data for it (a config checked without its data at hand)
        d["augment"] = resolve_augment("auto", size)
    drop = set(NON_SEMANTIC)
    drop.update(name for name in part_config_fields() if name not in method.fields)  # other parts' options
    if not method.needs_logits:
        drop.add("logits")
    if not method.needs_maps:
        drop.update(STORE_FIELDS)
    else:  # the maps' own settings: another attribution's options change nothing (a run was trained twice)
        keep = {"attribution", "map_size", "map_dtype", *attribution_registry.get(cfg.attribution).option_names()}
        drop.update(f for f in STORE_FIELDS if f not in keep)
    if init_file(cfg.init) and weights_file(cfg.init).is_file():  # the weights by content, as the teacher's
        d["init"] = "sha256:" + cached_file_sha256(weights_file(cfg.init))  # (model.json: its .safetensors)
    # --init teacher copies the teacher's weights into the student: then the teacher decides the
    # result even for a method without one (student runs from two teachers shared one key)
    weights = teacher_file(cfg.teacher)
    if not method.needs_teacher and cfg.init != "teacher":
        drop.update(TEACHER_FIELDS)
    elif weights is not None and weights.is_file():
        d["teacher"] = "sha256:" + cached_file_sha256(weights)
    if cfg.subset == 1.0:
        drop.add("subset_seed")
    code = method_code(method)  # a plug-in part's code: an edited loss is another run
    if code:
        d["part_code"] = code
    for name in ("model", "teacher_model"):  # a py: factory's source: an edited network is another run
        if name not in drop and (sha := code_sha256(d.get(name) or "")):
            d[f"{name}_code"] = sha
    return canonical_specs({k: v for k, v in sorted(d.items()) if k not in drop})


SPEC_FIELDS = ("model", "teacher_model", "data")


def canonical_specs(config: dict) -> dict:
    """``config`` with its spec fields in canonical option order (:func:`~igkd.spec.canonical_spec`):
    ``--model mobilenetv2:width=0.5,drop=5`` and ``mobilenetv2:drop=5,width=0.5`` are one run.
    Also applied to the configs older runs recorded, whose specs kept the order they were given in."""
    return {k: canonical_spec(v) if k in SPEC_FIELDS and isinstance(v, str) and v else v for k, v in config.items()}


def run_key(cfg: DistillConfig) -> str:
    return hashlib.sha256(json.dumps(semantic_config(cfg), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Job:
    """One run of an experiment: a label for people, its config, and tags for the tables."""

    label: str
    cfg: DistillConfig
    tags: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return run_key(self.cfg)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "+-.=" else "_" for c in text)[:60]


def same_run(recorded: dict, wanted: dict) -> bool:
    """Whether a run recorded with config ``recorded`` is the run ``wanted`` describes.

    Compared on the fields that matter now; a field the recorded run predates counts with
    its default value, so adding an option to igkd does not orphan finished runs."""
    defaults = recorded_defaults(DistillConfig)  # augment: pad-crop, as every run before it
    recorded = canonical_specs(recorded)
    return all(recorded.get(k, defaults.get(k)) == v for k, v in wanted.items())


_records: dict[tuple[str, int], dict] = {}


def _recorded_config(path: Path) -> dict:
    """The config a run.json records (read once per file version)."""
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _records:
        _records[key] = read_record(path).get("config", {})
    return _records[key]


def run_dir(out: Path, job: Job) -> Path:
    """The run's folder: an existing one for the same resolved config (finished first, then
    interrupted), else a new ``<label>--<key>`` folder."""
    key = job.key
    runs = out / "runs"
    found = sorted(runs.glob(f"*--{key}")) if runs.is_dir() else []
    if not any((d / "summary.json").exists() for d in found) and runs.is_dir():
        wanted = semantic_config(job.cfg)
        for record in sorted(runs.glob("*/run.json")):
            d = record.parent
            if d not in found and same_run(_recorded_config(record), wanted):
                found.append(d)
    found.sort(key=lambda d: (not (d / "summary.json").exists(), not (d / "last.pt").exists(), d.name))
    return found[0] if found else runs / f"{_slug(job.label)}--{key}"


def finished(out: Path, job: Job) -> dict | None:
    path = run_dir(out, job) / "summary.json"
    return read_record(path) if path.exists() else None


def read_record(path: Path, fix: str = "") -> dict:
    """A JSON record igkd wrote (atomically) into a run or experiment folder; damaged from
    outside (a truncated copy, an editor), it was a JSONDecodeError traceback: one line naming
    it and the fix (default: delete the run folder it belongs to, which trains that run again)."""
    fix = fix or f"delete {path.parent} to train that run again"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}); {fix}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged (not a JSON object); {fix}")
    return record


def prepare_out(out: str | Path, kind: str) -> Path:
    """Check ``out`` is new, empty or an igkd experiment folder; mark it as one."""
    out = native_path(out, "--out")  # its runs' checkpoints are opened by safetensors: UTF-8 names only
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the experiment")
    # hidden names are other workers' temporary files and locks (several workers may start at once)
    if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()) and not (out / MARKER).exists():
        raise UserError(f"{out} exists and is not an igkd experiment folder; choose another --out")
    # read and written back under the folder's flock: two experiments started at once into one
    # --out each wrote the marker it had read, and the other's kind was lost
    with new_folder(out), folder_held(out):
        marker = read_record(out / MARKER, "delete it (the folder is marked again)") if (out / MARKER).exists() \
            else {"igkd": "experiment"}
        kinds = marker.setdefault("kinds", [])
        if kind not in kinds:
            kinds.append(kind)
        write_json(out / MARKER, marker)
    return out


_image_sizes: dict[str, tuple[int, int]] = {}  # data spec -> image size, as start() loaded it


def know_image_size(spec: str, dataset) -> None:
    """Record the image size of the data ``spec`` names (``dataset``: it, loaded), by which run
    keys resolve ``--augment auto`` (:func:`semantic_config`)."""
    _image_sizes[_size_key(spec)] = tuple(dataset.image_size)


def _size_key(spec: str) -> str:
    # the spec in canonical option order, as run keys compare it (canonical_specs): one data
    # spec written in two orders resolved auto for one spelling and kept it for the other
    return canonical_spec(spec) if isinstance(spec, str) and spec else spec


def data_sha256(data) -> dict:
    """sha256 of the train and test splits of a dataset (a spec, or a loaded
    :class:`~igkd.data.Dataset`): its images, not its text."""
    from ..data import load_dataset
    dataset = load_dataset(data) if isinstance(data, str) else data
    return {"train": dataset.fingerprint("train"), "test": dataset.fingerprint("test")}


def check_same_data(path: Path, now: dict, spec: str) -> None:
    """Refuse to reuse or resume the run in ``path`` if the images of ``spec`` are not those
    it was trained (and scored) on. A run is found by its config, whose data is a spec: files
    added to or replaced in an image folder left the spec as it was, and the old runs' figures
    were reported, beside a teacher scored again, as results on the new images."""
    record = read_record(path / "run.json") if (path / "run.json").exists() else {}
    was = record.get("data_sha256")
    if was is None and (path / "model.json").exists():  # a run recorded before: its checkpoint names the train split
        fingerprint = read_record(path / "model.json").get("dataset_fingerprint")
        was = {"train": fingerprint} if fingerprint else None
    changed = [split for split in ("train", "test") if (was or {}).get(split, now[split]) != now[split]]
    if changed:
        raise UserError(f"{path} was trained on other images than {spec} holds now (its {' and '.join(changed)} "
                        f"split changed since); give the changed data another --out, or delete {path} to train it "
                        "again")


def run_jobs(jobs: list[Job], out: Path, what: str, quiet: bool = False, train_quiet: bool | None = None,
             data: dict[str, dict] | None = None) -> list[dict]:
    """Train (or reuse, or resume) every job in order; returns their summaries.

    ``data``: the :func:`data_sha256` of data specs already fingerprinted (by
    :func:`~igkd.experiments.common.start`); the others are loaded to fingerprint them.
    One line per run on stderr: ``what run i/N label: ...`` with accuracy and ETA.
    """
    train_quiet = quiet if train_quiet is None else train_quiet
    data = {spec: (data or {}).get(spec) or data_sha256(spec) for spec in dict.fromkeys(j.cfg.data for j in jobs)}
    for job in jobs:  # before any work: a finished or interrupted run on other images is not this run
        path = run_dir(out, job)
        if (path / "summary.json").exists() or (path / "last.pt").exists():
            check_same_data(path, data[job.cfg.data], job.cfg.data)
    todo = [j for j in jobs if finished(out, j) is None]
    log(f"{what}: {len(jobs)} runs, {len(jobs) - len(todo)} already finished, {len(todo)} to train -> {out}", quiet)
    results, trained, spent = [], 0, 0.0
    for i, job in enumerate(jobs, 1):
        path = run_dir(out, job)
        head = f"{what} run {i}/{len(jobs)} {job.label}"
        summary = finished(out, job)
        if summary is not None:
            log(f"{head}: finished earlier (test {summary['test_accuracy']:.2f}%, val "
                f"{fmt_percent(summary['val_accuracy'])}), skipped", quiet)
            results.append(summary)
            continue
        resume = (path / "last.pt").exists()
        log(f"{head}: {'resuming' if resume else 'training'} in {path}", quiet)
        write_json(path / "run.json", {"key": job.key, "label": job.label, "tags": job.tags,
                                       "experiment": what.split()[0], "config": semantic_config(job.cfg),
                                       "data_sha256": data[job.cfg.data]})
        start = time.perf_counter()
        try:
            summary = api.distill(job.cfg, path, resume=resume, quiet=train_quiet)
        except TrainingDiverged as e:
            if len(jobs) == 1:  # a search trial: its caller names it
                raise
            # the experiment stops here, and under --quiet its one line named no run of the N
            raise TrainingDiverged(f"{head} ({path.relative_to(out)}): {e}") from None
        trained += 1
        spent += time.perf_counter() - start
        left = sum(1 for j in jobs[i:] if any(j is t for t in todo))
        log(f"{head}: test {summary['test_accuracy']:.2f}%, val {fmt_percent(summary['val_accuracy'])} in "
            f"{fmt_seconds(time.perf_counter() - start)}; ETA {fmt_seconds(spent / trained * left)} "
            f"({left} run(s) left)", quiet)
        results.append(summary)
    collapsed = [j.label for j, s in zip(jobs, results) if one_class(s.get("test") or {}) is not None]
    if collapsed:  # a table of equal accuracies read as "the methods do the same"
        log(f"igkd: warning: {len(collapsed)} of {len(jobs)} runs predict one class for every test image "
            f"({', '.join(collapsed[:4])}{', ...' if len(collapsed) > 4 else ''}): their accuracy is that class's "
            "share whatever the method; train more steps (epochs, images) before comparing them", quiet)
    return results


def run_record(summary: dict, job: Job, out: Path, corruptions: dict | None = None) -> dict:
    """The row an experiment keeps of one run (tags + the numbers that matter; with
    ``corruptions``, the run's accuracies under them, :func:`corruption_scores`)."""
    row = {**job.tags, "label": job.label, "run": str(run_dir(out, job).relative_to(out)),
           "test_accuracy": summary["test_accuracy"], "val_accuracy": summary["val_accuracy"],
           "params": summary["params"], "best_epoch": summary["best_epoch"], "seed": job.cfg.seed,
           "train_images": summary.get("train_images"), "train_seconds": summary.get("train_seconds")}
    if corruptions is not None:
        row["corruptions"] = {k: corruptions[k] for k in ("images", "test_images", "clean_accuracy", "accuracy", "mean",
                                                          "overall_mean") if k in corruptions}
    return row


CORRUPTIONS_FILE = "corruptions.json"


def corruption_scores(jobs: list[Job], out: Path, names: list[str], seed: int, images: int, what: str,
                      quiet: bool = False) -> list[dict | None]:
    """Each finished run's best checkpoint scored under the corruptions ``names`` (None
    each when there are none), as :func:`igkd.evaluate` reports them.

    Kept in the run's ``corruptions.json`` with what it was computed from (the names,
    seed, image count, dataset and the checkpoint's sha256): the runs' own files
    (summary.json and the rest, the trainer's) stay as trained, a rerun scores nothing
    twice, and other corruption settings score the same runs again without training."""
    if not names:
        return [None] * len(jobs)
    from ..data import RowView, load_dataset
    from ..evaluate.corruptions import evaluate_corruptions, evenly_spaced
    from ..models import load_model
    from ..models.fold import for_inference
    from ..runtime import resolve_device
    rows, datasets = [], {}
    for i, job in enumerate(jobs, 1):
        d = run_dir(out, job)
        weights = d / "model.safetensors"
        key = {"names": list(names), "seed": seed, "images": images, "data": job.cfg.data,
               "weights_sha256": cached_file_sha256(weights)}
        try:  # a cache: damaged, it is computed again
            cached = read_record(d / CORRUPTIONS_FILE) if (d / CORRUPTIONS_FILE).exists() else {}
        except UserError:
            cached = {}
        if cached.get("key") == key:
            rows.append(cached["result"])
            continue
        start = time.perf_counter()
        if job.cfg.data not in datasets:
            datasets[job.cfg.data] = load_dataset(job.cfg.data)
        dataset = datasets[job.cfg.data]
        # the spec this experiment trained: a py: model's recorded spec is not run from the file
        net, _ = load_model(weights, job.cfg.model or None, len(dataset.classes), dataset.channels)
        device = resolve_device(job.cfg.device)
        pick = evenly_spaced(len(dataset.test.labels), images)  # as igkd evaluate --corruption-images picks them
        scored = RowView(dataset.test.images, pick)
        net = for_inference(net, scored, device)  # loaded here to infer only: BatchNorm folded
        r = evaluate_corruptions(net, scored, dataset.test.labels[pick], pick, names,
                                 seed, job.cfg.eval_batch_size, device)
        r["test_images"] = len(dataset.test.labels)  # whether the scored images are a subset of them
        write_json(d / CORRUPTIONS_FILE, {"key": key, "result": r})
        log(f"{what} run {i}/{len(jobs)} {job.label}: mean accuracy under {len(names)} corruption(s) "
            f"{r['overall_mean']:.2f}% (clean {r['clean_accuracy']:.2f}% on the same {r['images']} images) in "
            f"{fmt_seconds(time.perf_counter() - start)}", quiet)
        rows.append(r)
    return rows


__all__ = ["CORRUPTIONS_FILE", "Job", "canonical_specs", "corruption_scores", "finished", "prepare_out", "run_dir",
           "run_jobs", "run_key", "run_record", "semantic_config", "teacher_file"]
