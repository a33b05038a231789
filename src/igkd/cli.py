"""Command line: argument parsing only; every command calls the library (igkd.api).

Errors a user can fix print one line ``igkd: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .cli_types import Parser, config_command, int_range, resolve
from .errors import UserError
from .fileio import dumps, is_disk_full

SPEC_HELP = """\
spec strings:
  datasets  demo                       small Fashion-MNIST subset shipped in the package
            cifar10:DIR[,download=0][,verify=0]   official python archive (downloaded when missing; md5-checked)
            cifar100:DIR[,labels=fine|coarse][,download=0][,verify=0]   the same for CIFAR-100 (100 or 20 classes)
            imagefolder:DIR[,size=N|HxW][,resize=fixed|shorter][,test=F[,seed=S]][,gray=1][,mmap=auto|0|1][,cache=0]
                                       DIR/train/<class>/* with DIR/test/<class>/* or DIR/val/<class>/*
                                       (ImageNet layout); resize=shorter: shorter side to N, centre crop
            fashion-mnist[:DIR]        IDX files (default /usr/share/datasets/fashion-mnist)
  models    mobilenetv2                CIFAR MobileNetV2 teacher (2,236,682 params at 10 classes)
            mobilenetv2:drop=K         paper's student: last K feature blocks removed (K=5: 4.12x)
            mobilenetv2:width=W        width-multiplied student (e.g. 0.5, 0.35)
            mobilenetv2_imagenet       torchvision's ImageNet MobileNetV2, 224-pixel images (same options)
            resnet:depth=D[,width=W]   CIFAR ResNet, D = 6n+2 (20, 32, 44, 56, 110); depth=8,width=4: ResNet8x4
            wrn:depth=D,k=K            Wide ResNet WRN-D-K (wrn:depth=40,k=2, wrn:depth=16,k=2)
            resnet18 resnet34 resnet50 ImageNet ResNets with torchvision's state_dict keys
            py:MODULE:CALLABLE[,k=v]   your factory(num_classes=, in_channels=, **options); MODULE may be a .py file
                                       (or n_classes, timm's in_chans...; no channels argument: RGB images only)
            torchscript:FILE           a TorchScript teacher (--teacher torchscript:FILE; no hooks, so no 'at')
"""


def spec_help() -> str:
    """:data:`SPEC_HELP` and, when packages extend igkd, a line per kind naming what they add
    (``tinycnn (mypkg)``): a user who installed a plug-in finds its spec name in ``--help``."""
    from .plugins import installed
    found = installed()
    if not found:
        return SPEC_HELP
    lines = [f"  {kind:<13} " + ", ".join(f"{name} ({dist})" for name, dist in entries)
             for kind, entries in found.items()]
    return SPEC_HELP + "installed plug-ins (entry points igkd.KIND; 'igkd methods' lists parts):\n" + \
        "\n".join(lines) + "\n"


def _config_parser(sub, name: str, cls, help: str, description: str, *, epilog: str, out_required: bool = True):
    p = config_command(sub, name, cls, help=help, description=description, epilog=epilog,
                       main=("data", "teacher", "model", "method"))
    if out_required:
        p.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
        p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    return p


def make_parser() -> argparse.ArgumentParser:
    # the configs are built on import from the registries, which load installed plug-ins: inside
    # main's error handling, a plug-in that fails to load is one line, not a traceback
    from .command_options import EvaluateConfig, PrecomputeCommandConfig
    from .config import DistillConfig, PrecomputeConfig, TrainConfig
    epilog = spec_help()
    parser = Parser(
        prog="igkd", description="Compress an image classifier by knowledge distillation with integrated-gradient "
        "overlays. Run 'igkd demo' for a five-minute tour, 'igkd COMMAND --help' for a command's options.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"igkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _config_parser(sub, "train", TrainConfig, "train a model (a teacher) with cross-entropy",
                   "Train a model from scratch with cross-entropy, random crop and flip. Writes a checkpoint "
                   "(model.safetensors + model.json), metrics.jsonl and summary.json to --out.", epilog=epilog)

    p = _config_parser(sub, "precompute", PrecomputeCommandConfig, "compute teacher logits and IG maps once",
                       "Compute teacher logits and integrated-gradient maps for every training image "
                       "(clean, by sample index) into a fingerprinted, resumable store: rerunning the same "
                       "command after an interruption continues where it stopped. Before a new store is "
                       "computed, the map error of the chosen settings is estimated on a few images "
                       "(--check-images). Under 'torchrun --nproc_per_node=N -m igkd.cli precompute ...' N "
                       "processes share the chunks (gloo on CPU, nccl on GPU).", epilog=epilog,
                       out_required=False)

    _config_parser(sub, "distill", DistillConfig, "train a student with KD, IG overlays, DKD, DIST, AT, ...",
                   "Train a student from scratch with the chosen method: parts joined with '+' (kd+ig is the "
                   "paper's; 'igkd methods' lists every part with its formula, options and defaults). "
                   "Teacher logits and IG maps come from the precompute store, built on first use. Under "
                   "'torchrun --nproc_per_node=N -m igkd.cli distill ...' N processes train with DDP "
                   "(--batch-size per process).", epilog=epilog)

    config_command(sub, "evaluate", EvaluateConfig, main=("weights", "data", "model"), epilog=epilog,
                   help="score a checkpoint on a dataset's test split",
                   description="Accuracy, per-class accuracy, confusion matrix (in --json) and parameter count of a "
                   "checkpoint on the test split of a dataset; with --corruptions, also its accuracy under common corruptions "
                   "(CIFAR-10-C's five severities, computed on the fly, seeded).")

    p = sub.add_parser("demo", help="the whole method on the embedded dataset, CPU, a few minutes",
                       description="Loads the shipped demo teacher (or trains one), precomputes IG maps, trains "
                       "'student' and 'kd+ig' students with the same seed and budget, evaluates them and writes "
                       "report.md, metrics.json, gallery.png, accuracy.png and curves.png.")
    p.add_argument("--out", default="igkd-demo", metavar="DIR", help="report directory (default: igkd-demo)")
    p.add_argument("--config", default="", metavar="YAML", help="demo recipe, a file or a shipped name (default: demo, see 'igkd config show demo')")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher instead of using the shipped one")
    _budget_option(p, "epochs", DistillConfig, "student epochs")
    _budget_option(p, "ig_steps", PrecomputeConfig, "integrated-gradients steps of the precomputed maps (more: a "
                   "smaller quadrature error, a slower precompute)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.add_argument("--json", action="store_true", help="print the demo's metrics as JSON instead of the summary")

    p = sub.add_parser("methods", help="list the method parts: formula, options, defaults, search lists",
                       description="Every registered method part (built in, or from a package's 'igkd.parts' entry "
                       "point): what it adds to the loss or the batch, its options with their defaults, and the "
                       "values 'igkd experiment search' tries by default. A method joins parts with '+'.")
    p.add_argument("--json", action="store_true", help="print the parts as JSON")

    p = sub.add_parser("config", help="list or print the shipped YAML recipes",
                       description="The recipes shipped inside igkd, usable by name with --config NAME: 'igkd "
                       "config list' lists them, 'igkd config show NAME > my.yaml' copies one to edit.")
    p.add_argument("action", choices=["list", "show"], help="list the recipes, or show one")
    p.add_argument("name", nargs="?", default=None, help="recipe name for 'show' (e.g. cifar10_paper)")

    # --- deployment commands (issue 6): bench latency, export, audit, predict ---
    from .cli_deploy import add_deploy_commands
    add_deploy_commands(sub, epilog)
    # --- end deployment commands ---

    # --- research workflows (issue 5): experiment ablation|montecarlo|compression|search, report ---
    from .cli_experiments import add_experiment_commands
    add_experiment_commands(sub, epilog)
    # --- end research workflows ---
    return parser


def _budget_option(p: argparse.ArgumentParser, name: str, cls, help: str) -> None:
    """A demo option overriding a recipe value, with the range of the config field it sets
    (shown in --help as every config option's is, and checked by argparse)."""
    from dataclasses import fields
    m = next(f for f in fields(cls) if f.name == name).metadata
    p.add_argument("--" + name.replace("_", "-"), type=int_range(m["low"], m["high"]), default=None,
                   metavar=name.upper(), help=f"{help} [{m['low']}, {m['high']}] (default: from the recipe)")


def check_cache_dir() -> None:
    """Refuse, in one line naming IGKD_CACHE_DIR, a cache folder that cannot hold a store:
    the failure came later from deep inside (creating the store's lock) and named only a
    store path the user never gave, with "choose another path" as the advice."""
    import os
    from .fileio import writable_dir
    from .runtime import cache_dir
    root = cache_dir()
    if os.environ.get("IGKD_CACHE_DIR"):
        writable_dir(root, "IGKD_CACHE_DIR", fix="set IGKD_CACHE_DIR to a writable folder, or pass --store DIR")
    else:
        writable_dir(root, "the cache folder", fix="set IGKD_CACHE_DIR to a writable folder, or pass --store DIR")


def _refuse_other_parts_options(args, cfg, method) -> None:
    """An option typed for a part the method lacks (``--method kd --dkd-beta 4``, or a plug-in's
    option with ``+mine`` forgotten) trained without that part and recorded the option, silently.
    Only the command line is held to it: a recipe's YAML may set the options of several methods'
    parts (cifar10_strong's gamma, for its +at methods)."""
    from .distill.parts import field_owners
    owners = field_owners()
    typed = sorted(k for k, v in vars(args).items() if v is not None and k in owners and k not in method.fields)
    if typed:
        flags = ", ".join("--" + k.replace("_", "-") for k in typed)
        parts = sorted({owners[k].split("'")[1] for k in typed})
        raise UserError(f"{flags} {'is an option' if len(typed) == 1 else 'are options'} of method part(s) "
                        f"{', '.join(parts)}, which --method {cfg.method} does not have, so it would change nothing; "
                        "name the part in --method ('igkd methods' lists them) or drop the option")


def _print_train_summary(s: dict, as_json: bool = False) -> None:
    from .progress import fmt_percent, is_rank0
    if not is_rank0():  # under torchrun only rank 0 prints
        return
    if as_json:
        print(dumps(s, indent=2))
        return
    val = fmt_percent(s["val_accuracy"])
    print(f"{'cross-entropy' if s['method'] == 'student' else s['method']}: {s['model']} ({s['params']:,} params) test accuracy {s['test_accuracy']:.2f}% "
          f"(best epoch {s['best_epoch']}, val {val})")


def run(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # parse_args said '(see igkd --help)', the top level's help, for an option the command lacks
        chosen = [getattr(args, n, None) for n in ("command", "kind", "bench_command")]
        Parser(prog=" ".join(["igkd", *filter(None, chosen)])).error(f"unrecognized arguments: {' '.join(extra)}")
    from . import api
    from .command_options import EvaluateConfig, PrecomputeCommandConfig
    from .config import DistillConfig, TrainConfig
    from .progress import is_rank0

    if args.command == "train":
        _print_train_summary(api.train(resolve(args, TrainConfig, "train"), args.out, args.resume, args.quiet),
                             args.json)
    elif args.command == "distill":
        from .distill.parts import parse_method
        cfg = resolve(args, DistillConfig, "distill")
        _refuse_other_parts_options(args, cfg, parse_method(cfg.method))
        if not cfg.store:
            if api.needs_store(parse_method(cfg.method), cfg):  # the store goes to the cache
                check_cache_dir()
        _print_train_summary(api.distill(cfg, args.out, args.resume, args.quiet), args.json)
    elif args.command == "precompute":
        cfg = resolve(args, PrecomputeCommandConfig, "precompute")
        if not cfg.store:
            check_cache_dir()
        store = api.precompute(cfg.teacher, cfg.data, cfg.settings(), cfg.store, cfg.teacher_model, cfg.device,
                               args.quiet, cfg.threads, cfg.teacher_normalize)
        if is_rank0():
            print(dumps({"store": str(store.path), "images": len(store), **store.manifest}, indent=2) if args.json
                  else f"store: {store.path} ({len(store)} images)")
    elif args.command == "evaluate":
        # --json only moves the result to stdout as JSON; progress stays on stderr (--quiet hides it)
        r = api.evaluate(config=resolve(args, EvaluateConfig, "evaluate"), quiet=args.quiet)
        if args.json:
            print(dumps(r, indent=2))
        else:
            print(format_evaluation(r))
    elif args.command == "methods":
        show_methods(args.json)
    elif args.command == "config":
        show_config(args.action, args.name)
    elif args.command == "demo":
        from .demo import run_demo
        metrics = run_demo(args.out, args.config or None, train_teacher=args.train_teacher, epochs=args.epochs,
                           ig_steps=args.ig_steps, quiet=args.quiet, print_summary=not args.json)
        if args.json:
            print(dumps(metrics, indent=2))
    elif args.command in ("bench", "export", "audit", "predict"):  # deployment commands (issue 6)
        from .cli_deploy import run_deploy
        run_deploy(args)
    elif args.command in ("experiment", "report"):  # research workflows (issue 5)
        from .cli_experiments import run_experiment_command
        run_experiment_command(args)
    return 0


def _option_text(name: str, value) -> str:
    """An option with its default as it is typed on the command line: on/off options are
    ``--flag`` / ``--no-flag`` (BooleanOptionalAction); '--kd-standardize False' is refused."""
    import shlex
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {shlex.quote(str(value))}"


def show_methods(as_json: bool) -> None:
    import json
    from dataclasses import fields
    from .config import DistillConfig
    from .distill.parts import part_origin, parts
    defaults = {f.name: f.default for f in fields(DistillConfig)}
    # "package": where a plug-in part came from (None: igkd's own), as --help names plug-ins' packages
    rows = [{"part": p.name, "help": p.help, "formula": p.formula, "reference": p.reference,
             "package": part_origin(p.name),
             "options": {k: defaults[k] for k in p.fields}, "search": p.search,
             "needs": [n for n in ("teacher", "logits") if getattr(p, f"needs_{n}")]
             + (["maps"] if p.needs_maps or p.aligned_maps else [])
             + (["online teacher"] if p.online_teacher else [])} for p in parts().values()]
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        print(f"{r['part']}: {r['help']}\n    loss/batch: {r['formula']}")
        # each line only where it says something: "from: " printed empty for a part without a paper
        if r["reference"]:
            print(f"    reference: {r['reference']}")
        print(f"    needs: {', '.join(r['needs']) or 'nothing (no teacher)'}")
        if r["package"]:
            o = r["package"]
            print(f"    package: {o['package'] or 'none'} ("
                  + (f"entry point {o['entry_point']}" if o["entry_point"] else "igkd.register_part")
                  + f", class {o['class']})")
        if r["options"]:
            print("    options: " + ", ".join(_option_text(k, v) for k, v in r["options"].items()))
        if r["search"]:
            print("    search: " + "; ".join(f"{k}={','.join(map(str, v))}" for k, v in r["search"].items()))
    print("\nA method joins parts with '+', e.g. kd+ig (the paper's), dkd+ig, kd+cutmix; 'student' is "
          "cross-entropy alone.")


def show_config(action: str, name: str | None) -> None:
    from .config import recipe_text, shipped_configs
    shipped = shipped_configs()
    if action == "list":
        if name is not None:  # 'list NAME' printed the whole list, as if the name were understood
            raise UserError("igkd config list takes no recipe name; to print one: igkd config show NAME")
        width = max(map(len, shipped), default=0)  # names in one column, however long the longest
        for stem, path in shipped.items():
            first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.strip()), "")
            print(f"{stem:{width}s}  {first}")
        return
    if not name:
        raise UserError("igkd config show needs a recipe name, e.g. igkd config show demo (igkd config list "
                        "shows them)")
    if name not in shipped:
        raise UserError(f"no shipped recipe named '{name}'; known: {', '.join(shipped)} (igkd config list)")
    print(recipe_text(shipped[name]), end="")  # its shipped files by absolute path: a copy runs anywhere


def _first_names(names: list[str], k: int) -> str:
    """'a, b, c' or, past k names, 'a, b, c and 4 more' (a cut list read as the whole one)."""
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _preprocessing_name(pre: dict) -> str:
    """none, dataset, or imagenet where the mean/std are torchvision's (--normalize imagenet is
    stored as a "dataset" normalisation with ImageNet's figures: printing "dataset" for it told
    the user that their --normalize imagenet had been ignored)."""
    from .models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    name = pre.get("normalize", "none")
    figures = [*pre.get("mean", []), *pre.get("std", [])]
    imagenet = [*IMAGENET_MEAN, *IMAGENET_STD]
    if name == "dataset" and len(figures) == len(imagenet) and all(abs(a - b) < 1e-6 for a, b in zip(figures, imagenet)):
        return "imagenet"
    return name


def format_evaluation(r: dict) -> str:
    lines = [f"{r['model']} on {r['data']} ({r['split']}, {r['total']} images, preprocessing "
             f"{_preprocessing_name(r['preprocessing'])})",
             f"accuracy: {r['accuracy']:.2f}% ({r['correct']}/{r['total']})",
             f"balanced accuracy: {_figure(r['balanced_accuracy'], '.2f', '%')}, Cohen's kappa: "
             f"{_figure(r['kappa'], '.4f')}",
             f"parameters: {r['params']:,}"]
    if "compression" in r:
        lines.append(f"compression: {r['compression']:.2f}x (teacher {r['teacher_params']:,} params)")
    if "class_map" in r:
        cm = r["class_map"]
        lines.append(f"class map {cm['source']}: {len(cm['map'])} class(es) mapped, {cm['dropped_images']} image(s) "
                     f"of {len(cm['dropped_classes'])} unmapped class(es) dropped"
                     + (f" ({_first_names(cm['dropped_classes'], 5)})" if cm["dropped_classes"] else ""))
    if "teacher_correct" in r:
        tc = r["teacher_correct"]
        lines.append(f"teacher-correct: scored on the {tc['images']} of {tc['of']} image(s) that teacher {tc['teacher']} "
                     f"classifies correctly (teacher accuracy {tc['teacher_accuracy']:.2f}%)")
    lines.append("per class: " + ", ".join(f"{c} {a:.1f}" for c, a in r["per_class"].items() if a is not None))
    if "corruptions" in r:
        lines += format_corruptions(r["corruptions"])
    return "\n".join(lines)


def format_corruptions(c: dict) -> list[str]:
    """Accuracy per corruption at severities 1-5 and the means, one line per corruption."""
    width = max(len(n) for n in c["names"]) if c["names"] else 0
    lines = [f"corruptions ({c['images']} images, seed {c['seed']}; clean accuracy on them {c['clean_accuracy']:.2f}%), "
             f"accuracy % at severities 1-5 and their mean:"]
    for name in c["names"]:
        levels = c["levels"][name]
        values = "/".join(f"{v:g}" for v in levels["values"])
        lines.append(f"  {name:<{width}}  " + "  ".join(f"{a:6.2f}" for a in c["accuracy"][name])
                     + f"  mean {c['mean'][name]:6.2f}   ({levels['parameter']} {values})")
    lines.append(f"mean over {len(c['names'])} corruption(s): {c['overall_mean']:.2f}%")
    return lines


def _figure(value, fmt: str, unit: str = "") -> str:
    """A metric for the text output; 'undefined' for None or NaN (e.g. kappa with one class)."""
    return "undefined" if value is None or value != value else f"{value:{fmt}}{unit}"


def _stdout_to_devnull() -> None:
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (in-process capture): nothing to flush at exit
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a job scheduler's stop), raised where Ctrl-C raises KeyboardInterrupt.
    Its default action ended the process at once, skipping the clean-up written for Ctrl-C:
    a search trial stayed RUNNING, so a rerun waited three heartbeats for it or ended with the
    point untrained, 'still running on other workers'."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def _catch_sigterm():
    """Install :func:`_terminated` for SIGTERM; returns the handler to restore (None: left as it
    was, e.g. ignored by the parent, under torchrun, or not the main thread, where no handler
    can be set)."""
    import os
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    # under torchrun, SIGTERM is the agent stopping the ranks after one failed: a rank blocked in a
    # collective would run a Python handler only once the collective returned, so it kept running
    # until the agent's SIGKILL 30 s later; the default action ends it at once
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _terminated)


def main(argv: list[str] | None = None) -> None:
    import signal

    from .runtime import tune_malloc
    tune_malloc()
    previous = _catch_sigterm()
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe (igkd methods | head -1) raises here, not at exit, where it is a traceback
    except BrokenPipeError:
        # the reader went away: not an error of the command. As the Python docs advise, point
        # stdout at devnull so the flush at exit does not raise again, and exit quietly
        _stdout_to_devnull()
        code = 1
    except UserError as e:
        print(f"igkd: error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:  # the user's file system: a full disk, a path that cannot be read or written
        if is_disk_full(e):  # ENOSPC or EDQUOT, as fileio's writers name them
            print(f"igkd: error: disk full at {e.filename or 'the output folder'}; free space and rerun (finished "
                  "work is kept)", file=sys.stderr)
        elif e.filename:
            print(f"igkd: error: cannot use {e.filename} ({e.strerror or e}); check the path and its permissions",
                  file=sys.stderr)
        else:
            raise
        code = 2
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"igkd: {stopped}; finished epochs/chunks are kept: rerun the same command (with --resume for "
              "train/distill) to continue", file=sys.stderr)
        code = 143 if isinstance(e, Terminated) else 130  # 128 + the signal, as the shell reports a kill
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)


if __name__ == "__main__":
    main()
