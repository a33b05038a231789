"""``ExperimentConfig``: a base distillation config plus the fields of the four experiments.

Built with the same :func:`igkd.config.opt` machinery as every other config, so each field
is a YAML key, a command-line option ``--field-name`` with its range and default in
``--help``, and validated the same way. Lists (methods, depths, grid values) are
comma-separated strings on the command line; YAML may give them as lists.

A YAML recipe is read in layers, later ones winning::

    distill:            the base student recipe (every DistillConfig field)
    experiment:         experiment fields, and any distill field to change for experiments
      ablation: {...}   fields for one experiment kind only (also montecarlo, compression, search)

A flat file (no sections) is read as one mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar


from ..config import (DistillConfig, attribution_owners, build, find_config, load_yaml, opt, read_yaml_file,
                      refuse_taken, validate)
from ..distill.parts import field_owners
from ..distill.methods import parse_method
from ..errors import UserError
from ..spec import split_specs

KINDS = ("ablation", "montecarlo", "compression", "search")

# the options only some experiments read (every other one is a run's, read by all four). Given
# where only one kind can mean them (its command line, its 'experiment: KIND:' section), another
# kind's option was dropped without a word: 'compression --seeds 3' trained one seed, 'search
# --corruptions all' scored nothing. The shared 'experiment:' section may hold them for its kinds.
READ_BY = {"methods": ("ablation", "montecarlo", "compression"), "seeds": ("ablation",),
           "runs": ("montecarlo",), "mc_subset": ("montecarlo",),
           **dict.fromkeys(("corruptions", "corruption_seed", "corruption_images"), ("ablation", "montecarlo")),
           **dict.fromkeys(("depths", "widths", "sweep_base", "sweep_knobs", "students", "latency", "latency_batch",
                            "latency_threads", "latency_min_time"), ("compression",)),
           **dict.fromkeys(("sampler", "search_method", "T_values", "alpha_values", "p_values", "space",
                            "lr_values", "trials", "storage", "study", "heartbeat"), ("search",))}


def check_read_by(kind: str, names, where: str) -> None:
    """One-line UserError when ``where`` (the command line, a kind's section) sets an option
    that experiment ``kind`` does not read."""
    for name in names:
        key = name.replace("-", "_") if isinstance(name, str) else name  # a key that is no text: refused later
        kinds = READ_BY.get(key)
        if kinds and kind not in kinds:
            flag = "--" + key.replace("_", "-") if where == "the command line" else f"'{name}'"
            raise UserError(f"{flag} on {where} is an option of experiment {' and '.join(kinds)}, which "
                            f"'igkd experiment {kind}' does not read; drop it (or run {kinds[0]})")


@dataclass
class ExperimentConfig(DistillConfig):
    """Options of ``igkd experiment``: the base distill recipe, then the experiments' own."""

    takes_modules: ClassVar[bool] = False  # the run_* functions read files only

    methods: str = opt("student,kd,ig,kd+ig,ig-shuffled", "comma-separated methods to train (ablation, montecarlo, "
                       "compression); the first one, or 'student' when present, is the baseline gains are "
                       "measured against")
    seeds: int = opt(1, "ablation: runs per method, seeds seed, seed+1, ...; with 2 or more the table shows "
                     "mean and 95%% CI", low=1, high=1000)
    runs: int = opt(5, "montecarlo: number of runs; run r draws its own stratified --mc-subset of the training "
                    "set with seed seed+r, shared by all methods of that run", low=2, high=10000)
    mc_subset: float = opt(0.8, "montecarlo: stratified share of the training set each run trains on (the "
                           "paper's 80%%)", low=0.0, high=1.0, low_open=True)
    depths: str = opt("3,5,7,9,11,13,15,17", "compression: values of the base family's depth knob (mobilenetv2: "
                      "truncation drop=K; resnet, wrn: depth); empty for none")
    widths: str = opt("0.75,0.5,0.35,0.25", "compression: values of the base family's width knob (mobilenetv2, "
                      "resnet: width; wrn: k); empty for none")
    sweep_base: str = opt("mobilenetv2", "compression: model spec whose size knobs --depths and --widths set "
                          "(mobilenetv2: drop=K and width=W; resnet: depth and width; wrn: depth and k)")
    sweep_knobs: str = opt("", "compression: the options of --sweep-base that --depths and --widths set, "
                           "'depth=NAME,width=NAME' (either alone); empty: its family's (for a py: factory, name "
                           "its own keyword arguments, e.g. depth=blocks,width=mult)")
    students: str = opt("", "compression: further student specs, any family, separated by ';' (a list in YAML), "
                        "e.g. 'resnet:depth=20;wrn:depth=16,k=2' (quote a path holding ';': py:\"/a;b/net.py\":make)")
    latency: bool = opt(True, "compression: measure CPU latency of the teacher and every student (batch "
                        "--latency-batch, --latency-threads threads, median of repeated calls)")
    latency_batch: int = opt(1, "compression: images per timed call", low=1, high=65536, unit="images")
    latency_threads: int = opt(1, "compression: torch threads while timing (fixed, for comparable numbers)",
                               low=1, high=1024)
    latency_min_time: float = opt(1.0, "compression: seconds of timed calls per model (after 10 warm-up calls)",
                                  low=0.0, high=3600.0, unit="s")
    sampler: str = opt("grid", "search: grid (every point of the value lists, each exactly once across workers) "
                       "or tpe (Optuna's TPE within the range of each list)", choices=["grid", "tpe"])
    search_method: str = opt("kd+ig", "search: the method whose hyper-parameters are searched (its parts give "
                             "the default value lists)")
    T_values: str = opt("", "search: temperatures of kd (grid points; tpe: the range, log scale); empty: kd's "
                        "list 1,2,2.5,4,8")
    alpha_values: str = opt("", "search: KD weights (grid points; tpe: the range); empty: kd's list 0.01,0.1,0.5,0.9")
    p_values: str = opt("", "search: overlay probabilities (grid points; tpe: the range); empty: the overlay's "
                        "list 0,0.1,0.25,0.5")
    space: str = opt("", "search: value lists of any numeric option of the method's parts or the recipe, "
                     "'NAME=v1,v2;NAME=...' (e.g. 'blend=0.25,0.5,0.75' for the overlay's blend weight, "
                     "'dkd_beta=2,8'); replaces the parts' default lists (`igkd methods` shows them)")
    lr_values: str = opt("", "search: learning rates (grid points; tpe: the range, log scale); empty: the base "
                         "--lr only")
    trials: int = opt(20, "search with tpe: total trials over all workers (grid: all points)", low=1, high=100000)
    storage: str = opt("", "search: Optuna storage URL shared by all workers, e.g. sqlite:///DIR/search.db or "
                       "postgresql://user:pass@host/db; empty: sqlite file search.db in --out")
    study: str = opt("igkd-search", "search: Optuna study name within the storage")
    heartbeat: int = opt(60, "search: seconds between a worker's heartbeats; a running trial silent for 3 "
                         "heartbeats is taken to be dead and its point is queued again", low=1, high=86400,
                         unit="s")
    corruptions: str = opt("", "ablation, montecarlo: also score every run's best checkpoint under these "
                           "corruptions (names as igkd evaluate --corruptions, or all; a YAML list too), cached in "
                           "the run's corruptions.json; the tables add the mean over the five severities per "
                           "corruption and over the corruptions, with the same paired statistics as the clean "
                           "accuracy (default: none)", metavar="NAME[,NAME...]")
    corruption_seed: int = opt(0, "ablation, montecarlo: seed of the corruptions' noise (the same corrupted images for "
                               "every run and method)", low=0, high=2**31 - 1)
    corruption_images: int = opt(0, "ablation, montecarlo: test images scored under corruptions, evenly spaced (0 = "
                                 "all; each corruption costs five passes over them per run)", low=0, high=1 << 30,
                                 unit="images")

    def __post_init__(self) -> None:
        super().__post_init__()
        corruption_names(self)  # an unknown corruption: one line listing the valid ones, wherever built


# an option of a part or attribution named like an experiment's (runs, space, ...) was replaced by it
refuse_taken("ExperimentConfig", ExperimentConfig.__annotations__, {**attribution_owners(), **field_owners()})


def split_list(text: str, cast=str, flag: str = "") -> list:
    """``"a, b,c"`` -> [cast(a), cast(b), cast(c)]; one-line UserError on bad items."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        return [cast(s) for s in items]
    except ValueError:
        raise UserError(f"{flag or 'list'} {text!r} must be comma-separated {cast.__name__} values") from None


def _flatten_lists(values: dict) -> dict:
    # model specs hold commas themselves, so a list of students is joined with ';'; a search
    # space may be a mapping NAME: [values] in YAML
    def flat(k, v):
        if k == "space" and isinstance(v, dict):
            return ";".join(f"{n}=" + ",".join(map(str, vals if isinstance(vals, (list, tuple)) else [vals]))
                            for n, vals in v.items())
        if isinstance(v, (list, tuple)) and k == "students":
            for spec in map(str, v):  # joined with ';', one holding ';' itself would become two
                if len(split_specs(spec, "students entry")) > 1:
                    raise UserError(f"students entry '{spec}' holds a ';'; quote the part that holds it, e.g. "
                                    "py:\"/a;b/net.py\":make")
            return ";".join(map(str, v))
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v))
        return v
    return {k: flat(k, v) for k, v in values.items()}


def yaml_layers(path: str | Path | None, kind: str) -> dict:
    """Merged YAML values for experiment ``kind``: distill <- experiment <- experiment.<kind>."""
    if not path:
        return {}
    flat = load_yaml(path, None)  # existence, syntax and mapping checks, with one-line errors
    doc = read_yaml_file(find_config(path)) or {}
    if not any(isinstance(doc.get(s), dict) for s in ("distill", "experiment")):
        return _flatten_lists(flat)
    exp = dict(doc.get("experiment") or {})
    specific = exp.pop(kind, None) or {}
    for other in KINDS:
        exp.pop(other, None)
    if not isinstance(specific, dict):
        raise UserError(f"'experiment: {kind}:' in {path} must be a mapping of option: value")
    check_read_by(kind, specific, f"'experiment: {kind}:' in {path}")
    return _flatten_lists({**(doc.get("distill") or {}), **exp, **specific})


def resolve(kind: str, config: str | Path | None = None, overrides: dict | None = None,
            cli: bool = False) -> ExperimentConfig:
    """Defaults <- YAML layers <- overrides, validated; methods and lists checked too.
    ``cli``: the command line's required options (--data) must be given."""
    check_read_by(kind, [k for k, v in (overrides or {}).items() if v is not None],
                  "the command line" if cli else "the overrides")
    cfg = build(ExperimentConfig, yaml_layers(config, kind), overrides, source=str(config or "options"), cli=cli)
    return check(cfg)


def entry_point(function):
    """Decorate ``run_KIND(cfg, out, quiet)``, an experiment's API function: ``cfg`` must be
    an ExperimentConfig (a dict or a DistillConfig would fail deep inside with an
    AttributeError), and ``cfg.threads`` holds for the call only."""
    import functools

    from ..runtime import keeps_threads
    name, kind = function.__name__, function.__name__.removeprefix("run_")

    @functools.wraps(function)
    def call(cfg, *args, **kwargs):
        if not isinstance(cfg, ExperimentConfig):
            raise UserError(f"{name}() needs an igkd.ExperimentConfig as its config, got {type(cfg).__name__}; build "
                            f"one with igkd.experiments.resolve({kind!r}, CONFIG, overrides)")
        return function(cfg, *args, **kwargs)
    return keeps_threads(call)


def check(cfg: ExperimentConfig) -> ExperimentConfig:
    validate(cfg)
    methods = split_list(cfg.methods, str, "--methods")
    if not methods:
        raise UserError("--methods is empty; give e.g. student,kd+ig")
    canon = [parse_method(m).name for m in methods]
    if len(set(canon)) != len(canon):
        raise UserError(f"--methods {cfg.methods!r} names a method twice")
    parse_method(cfg.search_method)
    corruption_names(cfg)
    for name in ("depths",):
        split_list(getattr(cfg, name), int, "--" + name)
    for name in ("widths", "T_values", "alpha_values", "p_values", "lr_values"):
        split_list(getattr(cfg, name), float, "--" + name.replace("_", "-"))
    return cfg


def corruption_names(cfg: ExperimentConfig) -> list[str]:
    """The corruptions every run is scored under (a one-line UserError names unknown ones)."""
    from ..evaluate.corruptions import parse
    return parse(cfg.corruptions)


def base_fields() -> set[str]:
    """Names of the DistillConfig fields (what a single run is configured by)."""
    return {f.name for f in fields(DistillConfig)}


def distill_config(cfg: ExperimentConfig, **changes) -> DistillConfig:
    """The DistillConfig of one run: the base fields of ``cfg`` with ``changes``."""
    values = {name: getattr(cfg, name) for name in base_fields()}
    values.update(changes)
    return validate(DistillConfig(**values))


__all__ = ["ExperimentConfig", "KINDS", "check", "corruption_names", "distill_config", "entry_point", "resolve",
           "split_list", "yaml_layers"]
