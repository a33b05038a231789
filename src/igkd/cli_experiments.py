"""Command line of the research workflows (issue 5): ``igkd experiment KIND`` and ``igkd report DIR``.

Argument parsing only; the work is in :mod:`igkd.experiments` and :func:`igkd.report.write_report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import add_arguments, overrides_from
from .fileio import dumps

EXPERIMENTS = {
    "ablation": ("every method, same budget, seeds and splits: the paper's table",
                 "Train every method of --methods with the same recipe, seed(s) and splits, and write the "
                 "paper's table (method, accuracy, gain over the plain student, params, compression factor) to "
                 "ablation.md / ablation.json in --out. Finished runs are found by their resolved config and "
                 "skipped; an interrupted run resumes."),
    "montecarlo": ("repeated runs on random stratified subsets, paired statistics",
                   "Run r = 0..runs-1 trains every method on its own stratified --mc-subset share of the training "
                   "set with seed seed+r. Reports mean, std and 95% t-interval per method, and for each pair of "
                   "methods a paired t-test (Cohen's d_z) and a Wilcoxon signed-rank test (rank-biserial "
                   "correlation), Holm-corrected, in montecarlo.md / montecarlo.json."),
    "compression": ("students by truncation depth and width: accuracy vs compression, MACs, latency",
                    "Train each method on students --sweep-base with its family's depth knob set to each --depths "
                    "value (MobileNetV2: drop=K; ResNet, WRN: depth) and its width knob to each --widths value, "
                    "plus any --students specs; report params, compression factor, MACs, measured CPU latency "
                    "and accuracy in "
                    "compression.md / compression.json."),
    "search": ("grid or TPE search of the method's options (T, alpha, p, ...) and lr with Optuna (validation "
               "accuracy)",
               "Search the hyper-parameters of --search-method with Optuna, scored on the validation split. "
               "The study is kept in --storage (default: sqlite file search.db in --out); start the same command "
               "on several processes or machines with one --storage URL (e.g. postgresql://user:pass@host/db) "
               "to share the work: each grid point is trained exactly once. Results in search.md / search.json."),
}


def add_experiment_commands(sub, spec_help: str) -> None:
    """``igkd experiment {ablation,montecarlo,compression,search}`` and ``igkd report``."""
    from .experiments.config import ExperimentConfig
    p = sub.add_parser("experiment", help="ablation table, Monte Carlo statistics, compression sweep, search",
                       description="Research workflows over many training runs; each is resumable: re-run the "
                       "same command and only unfinished runs train. 'igkd report DIR' renders the results.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    for kind, (short, long) in EXPERIMENTS.items():
        k = kinds.add_parser(kind, help=short, description=long, epilog=spec_help,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        k.add_argument("--config", metavar="YAML", help="YAML recipe: its 'distill:' section, then 'experiment:' "
                       f"and 'experiment: {kind}:' override; command-line options override the file")
        k.add_argument("--out", metavar="DIR", required=True, help="experiment folder (runs/, results, report)")
        k.add_argument("--quiet", action="store_true", help="print only errors and the final table")
        k.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
        add_arguments(k, ExperimentConfig)
        for action in k._actions:  # experiments train several methods: --methods (and --search-method)
            if action.dest == "method":
                action.help = argparse.SUPPRESS

    p = sub.add_parser("report", help="render report.md with tables and plots for an experiment or run folder",
                       description="Write DIR/report.md with the tables and PNG plots of what DIR holds: a run's "
                       "summary, latency/export/audit results, ablation points, Monte Carlo distributions and tests, "
                       "compression curves, search heat map, the teacher's IG maps and overlays, training curves. "
                       "Prints the tables.")
    p.add_argument("dir", metavar="DIR", help="folder written by 'igkd experiment ... --out DIR', 'igkd train' or "
                   "'igkd distill', or by 'bench latency --out', 'export --report-dir' or 'audit --out'")
    p.add_argument("--json", action="store_true", help="print the report's path and text as JSON")
    p.add_argument("--format", default="png", metavar="F[,F...]",
                   help="figure formats: png (linked from report.md), pdf, svg; tables are always also written as "
                   "tables/*.csv and tables/*.tex (default: png)")


def run_experiment_command(args) -> None:
    if args.command == "report":
        from .report import terminal_summary, write_report
        text = write_report(args.dir, formats=args.format)
        path = f"{args.dir.rstrip('/')}/report.md"
        if args.json:
            print(dumps({"report": path, "markdown": text}, indent=2))
            return
        print(terminal_summary(text))
        print(f"\nreport: {path}")
        return
    from .errors import UserError
    from .experiments import ExperimentConfig, resolve, run_experiment
    if args.method is not None:
        raise UserError("experiments train several methods: give them as --methods student,kd+ig "
                        "(search: --search-method)")
    cfg = resolve(args.kind, args.config, overrides_from(args, ExperimentConfig), cli=True)
    if not cfg.store:  # the store of the methods' maps and logits goes to the cache: check it names IGKD_CACHE_DIR
        from . import api
        from .cli import check_cache_dir
        from .distill.parts import parse_method
        names = [cfg.search_method] if args.kind == "search" else [m for m in cfg.methods.split(",") if m.strip()]
        if any(api.needs_store(parse_method(m), cfg) for m in names):
            check_cache_dir()
    result = run_experiment(args.kind, cfg, args.out, quiet=args.quiet)
    if args.json:
        print(dumps(result, indent=2))
        return
    print((Path(args.out) / f"{args.kind}.md").read_text().rstrip())
    print(f"{args.kind} done -> {args.out} (igkd report {args.out} renders report.md)")
