"""Command line: argument parsing only; every command calls the library (igkd.api).

Errors a user can fix print one line ``igkd: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import DistillConfig, PrecomputeConfig, TrainConfig, add_arguments, build, load_yaml, overrides_from
from .cli_types import NON_NEGATIVE, POSITIVE, Parser
from .errors import UserError
from .fileio import dumps, is_disk_full

SPEC_HELP = """\
spec strings:
  datasets  demo                       small Fashion-MNIST subset shipped in the package
            cifar10:DIR[,download=0][,verify=0]   official python archive (downloaded when missing; md5-checked)
            imagefolder:DIR[,size=N][,test=F][,gray=1]   DIR/train/<class>/*, DIR/test/<class>/*
            fashion-mnist[:DIR]        IDX files (default /usr/share/datasets/fashion-mnist)
  models    mobilenetv2                CIFAR MobileNetV2 teacher (2,236,682 params at 10 classes)
            mobilenetv2:drop=K         paper's student: last K feature blocks removed (K=5: 4.12x)
            mobilenetv2:width=W        width-multiplied student (e.g. 0.5, 0.35)
            mobilenetv2_imagenet       torchvision's ImageNet MobileNetV2, 224-pixel images (same options)
            resnet:depth=D[,width=W]   CIFAR ResNet, D = 6n+2 (20, 32, 44, 56, 110); depth=8,width=4: ResNet8x4
            wrn:depth=D,k=K            Wide ResNet WRN-D-K (wrn:depth=40,k=2, wrn:depth=16,k=2)
            resnet18 resnet34 resnet50 ImageNet ResNets with torchvision's state_dict keys
            py:MODULE:CALLABLE[,k=v]   your factory(num_classes=, in_channels=, **options); MODULE may be a .py file
            torchscript:FILE           a TorchScript teacher (--teacher torchscript:FILE; no hooks, so no 'at')
"""


def _config_parser(sub, name: str, cls, help: str, description: str, out_required: bool = True):
    p = sub.add_parser(name, help=help, description=description, epilog=SPEC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="YAML", help=f"YAML recipe (its '{name}:' section if it has one, "
                   "else the whole file); command-line options override it")
    if out_required:
        p.add_argument("--out", metavar="DIR", required=True, help="run directory to write")
        p.add_argument("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors and the final summary")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON (progress stays on stderr)")
    add_arguments(p, cls)
    return p


def _resolve(args, cls, section: str):
    values = load_yaml(args.config, section) if args.config else {}
    return build(cls, values, overrides_from(args, cls), source=args.config or "options")


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="igkd", description="Compress an image classifier by knowledge distillation with integrated-gradient "
        "overlays. Run 'igkd demo' for a five-minute tour, 'igkd COMMAND --help' for a command's options.",
        epilog=SPEC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"igkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _config_parser(sub, "train", TrainConfig, "train a model (a teacher) with cross-entropy",
                   "Train a model from scratch with cross-entropy, random crop and flip. Writes a checkpoint "
                   "(model.safetensors + model.json), metrics.jsonl and summary.json to --out.")

    p = _config_parser(sub, "precompute", PrecomputeConfig, "compute teacher logits and IG maps once",
                       "Compute teacher logits and integrated-gradient maps for every training image "
                       "(clean, by sample index) into a fingerprinted, resumable store: rerunning the same "
                       "command after an interruption continues where it stopped. Before a new store is "
                       "computed, the map error of the chosen settings is estimated on a few images "
                       "(--check-images). Under 'torchrun --nproc_per_node=N -m igkd.cli precompute ...' N "
                       "processes share the chunks (gloo on CPU, nccl on GPU).", out_required=False)
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint")
    p.add_argument("--teacher-model", default="", metavar="SPEC",
                   help="architecture of a foreign teacher checkpoint without igkd metadata")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec")
    p.add_argument("--store", default="", metavar="DIR", help="store directory (default: fingerprinted cache folder)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--threads", type=NON_NEGATIVE, default=0, help="CPU threads for torch (default: 0 = torch's default; "
                   "under torchrun on CPU: cores // processes per machine)")

    _config_parser(sub, "distill", DistillConfig, "train a student with CE / KD / IG overlays / AT",
                   "Train a student from scratch with the chosen method (student, kd, ig, at, kd+ig, kd+at, ig+at, "
                   "kd+ig+at, or the controls ig-shuffled, kd+ig-shuffled, ig-shuffled+at, kd+ig-shuffled+at). "
                   "Teacher logits and IG maps come from the precompute store, built on first use. Under "
                   "'torchrun --nproc_per_node=N -m igkd.cli distill ...' N processes train with DDP "
                   "(--batch-size per process).")

    p = sub.add_parser("evaluate", help="score a checkpoint on a dataset's test split",
                       description="Accuracy, per-class accuracy, confusion matrix and parameter count of a "
                       "checkpoint on the test split of a dataset.", epilog=SPEC_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, metavar="FILE", help=".safetensors (igkd) or .pt/.pth state dict")
    p.add_argument("--model", default="", metavar="SPEC", help="architecture (required for files without igkd metadata)")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec; its test split is scored")
    p.add_argument("--normalize", default="auto", choices=["auto", "none", "dataset"],
                   help="input preprocessing: auto = as the checkpoint's metadata says (none for foreign files), "
                   "none = raw [0,1] pixels, dataset = train-set mean/std (default: auto)")
    p.add_argument("--teacher", default="", metavar="CKPT|SPEC", help="teacher, to report the compression factor")
    p.add_argument("--batch-size", type=POSITIVE, default=128, help="images per forward pass (default: 128)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--class-map", default=None, metavar="FILE", help="JSON/YAML mapping of the data's class names "
                   "to the model's (with 'classes:' for checkpoints without metadata); images of unmapped classes "
                   "are dropped and counted (default: none, the classes must match)")
    p.add_argument("--teacher-correct", default=None, metavar="CKPT", help="teacher-correct protocol: run this "
                   "teacher (with the same --class-map applied to its classes) on the test images and score the "
                   "model only on the images the teacher classifies correctly; reports how many that leaves and "
                   "the teacher's accuracy (default: off, every image is scored)")
    p.add_argument("--teacher-correct-model", default="", metavar="SPEC", help="architecture of the "
                   "--teacher-correct checkpoint when it has no igkd metadata (foreign .pt; fed raw [0,1] pixels) "
                   "(default: none, from its metadata)")

    p = sub.add_parser("demo", help="the whole method on the embedded dataset, CPU, a few minutes",
                       description="Loads the shipped demo teacher (or trains one), precomputes IG maps, trains "
                       "'student' and 'kd+ig' students with the same seed and budget, evaluates them and writes "
                       "report.md, metrics.json and gallery.png.")
    p.add_argument("--out", default="igkd-demo", metavar="DIR", help="report directory (default: igkd-demo)")
    p.add_argument("--config", default="", metavar="YAML", help="demo recipe, a file or a shipped name (default: demo, see 'igkd config show demo')")
    p.add_argument("--train-teacher", action="store_true", help="train the teacher instead of using the shipped one")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="student epochs (default: from the recipe)")
    p.add_argument("--ig-steps", type=POSITIVE, default=None, help="integrated-gradients steps of the precomputed "
                   "maps (more: a smaller quadrature error, a slower precompute) (default: from the recipe)")
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.add_argument("--json", action="store_true", help="print the demo's metrics as JSON instead of the summary")

    p = sub.add_parser("config", help="list or print the shipped YAML recipes",
                       description="The recipes shipped inside igkd, usable by name with --config NAME: 'igkd "
                       "config list' lists them, 'igkd config show NAME > my.yaml' copies one to edit.")
    p.add_argument("action", choices=["list", "show"], help="list the recipes, or show one")
    p.add_argument("name", nargs="?", default="", help="recipe name for 'show' (e.g. cifar10_paper)")

    # --- deployment commands (issue 6): bench latency, export, audit ---
    from .cli_deploy import add_deploy_commands
    add_deploy_commands(sub, SPEC_HELP)
    # --- end deployment commands ---

    # --- research workflows (issue 5): experiment ablation|montecarlo|compression|search, report ---
    from .cli_experiments import add_experiment_commands
    add_experiment_commands(sub, SPEC_HELP)
    # --- end research workflows ---
    return parser


def _print_train_summary(s: dict, as_json: bool = False) -> None:
    from .progress import is_rank0
    if not is_rank0():  # under torchrun only rank 0 prints
        return
    if as_json:
        print(dumps(s, indent=2))
        return
    val = "n/a" if s["val_accuracy"] is None or s["val_accuracy"] != s["val_accuracy"] else f"{s['val_accuracy']:.2f}%"
    print(f"{s['method']}: {s['model']} ({s['params']:,} params) test accuracy {s['test_accuracy']:.2f}% "
          f"(best epoch {s['best_epoch']}, val {val})")


def run(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from . import api
    from .progress import is_rank0

    if args.command == "train":
        _print_train_summary(api.train(_resolve(args, TrainConfig, "train"), args.out, args.resume, args.quiet),
                             args.json)
    elif args.command == "distill":
        _print_train_summary(api.distill(_resolve(args, DistillConfig, "distill"), args.out, args.resume, args.quiet),
                             args.json)
    elif args.command == "precompute":
        store = api.precompute(args.teacher, args.data, _resolve(args, PrecomputeConfig, "precompute"), args.store,
                               args.teacher_model, args.device, args.quiet, args.threads)
        if is_rank0():
            print(dumps({"store": str(store.path), "images": len(store), **store.manifest}, indent=2) if args.json
                  else f"store: {store.path} ({len(store)} images)")
    elif args.command == "evaluate":
        r = api.evaluate(args.weights, args.data, args.model, args.normalize, args.teacher, args.batch_size,
                         args.device, class_map=args.class_map, teacher_correct=args.teacher_correct,
                         teacher_correct_model=args.teacher_correct_model)
        if args.json:
            print(dumps(r, indent=2))
        else:
            print(format_evaluation(r))
    elif args.command == "config":
        show_config(args.action, args.name)
    elif args.command == "demo":
        from .demo import run_demo
        metrics = run_demo(args.out, args.config or None, train_teacher=args.train_teacher, epochs=args.epochs,
                           ig_steps=args.ig_steps,
                           quiet=args.quiet or args.json, print_summary=not args.json)
        if args.json:
            print(dumps(metrics, indent=2))
    elif args.command in ("bench", "export", "audit"):  # deployment commands (issue 6)
        from .cli_deploy import run_deploy
        run_deploy(args)
    elif args.command in ("experiment", "report"):  # research workflows (issue 5)
        from .cli_experiments import run_experiment_command
        run_experiment_command(args)
    return 0


def show_config(action: str, name: str) -> None:
    from .config import shipped_configs
    shipped = shipped_configs()
    if action == "list":
        for stem, path in shipped.items():
            first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.strip()), "")
            print(f"{stem:18s} {first}")
        return
    if name not in shipped:
        raise UserError(f"no shipped recipe named '{name}'; known: {', '.join(shipped)} (igkd config list)")
    print(shipped[name].read_text(), end="")


def format_evaluation(r: dict) -> str:
    lines = [f"{r['model']} on {r['data']} ({r['split']}, {r['total']} images, preprocessing "
             f"{r['preprocessing'].get('normalize', 'none')})",
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
                     + (f" ({', '.join(cm['dropped_classes'][:5])})" if cm["dropped_classes"] else ""))
    if "teacher_correct" in r:
        tc = r["teacher_correct"]
        lines.append(f"teacher-correct: scored on the {tc['images']} of {tc['of']} image(s) that teacher {tc['teacher']} "
                     f"classifies correctly (teacher accuracy {tc['teacher_accuracy']:.2f}%)")
    lines.append("per class: " + ", ".join(f"{c} {a:.1f}" for c, a in r["per_class"].items() if a is not None))
    return "\n".join(lines)


def _figure(value, fmt: str, unit: str = "") -> str:
    """A metric for the text output; 'undefined' for None or NaN (e.g. kappa with one class)."""
    return "undefined" if value is None or value != value else f"{value:{fmt}}{unit}"


def main(argv: list[str] | None = None) -> None:
    from .runtime import tune_malloc
    tune_malloc()
    try:
        code = run(argv)
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
    except KeyboardInterrupt:
        print("igkd: interrupted; finished epochs/chunks are kept: rerun the same command (with --resume for "
              "train/distill) to continue", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
