"""Command line of the deployment commands (``bench latency``, ``export``, ``audit``, ``predict``):
argument parsing only. Their options are the dataclasses of :mod:`igkd.command_options`
(also the YAML sections ``bench:``, ``export:``, ``audit:`` and the API defaults); the
work is in :mod:`igkd.deploy`."""

from __future__ import annotations

import argparse

from .cli_types import Deprecated, config_command, resolve
from .command_options import AuditConfig, ExportConfig, LatencyConfig, PredictConfig
from .errors import UserError

RAW = argparse.RawDescriptionHelpFormatter


def add_deploy_commands(sub, epilog: str = "") -> None:
    bench = sub.add_parser("bench", help="measure inference cost (igkd bench latency)",
                           description="Inference benchmarks.", epilog=epilog, formatter_class=RAW)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_sub.required = True
    p = config_command(
        bench_sub, "latency", LatencyConfig, section="bench", main=("model", "weights"), epilog=epilog,
        help="latency, throughput, params, MACs and size of models side by side",
        description="Measure CPU inference latency properly (warm-up, then repetitions until both a time and a "
        "count budget are met; median, p10, p90, images/s) at a fixed thread count, with parameters, MACs "
        "(multiply-accumulates of convolutions, matrix products and attention for one image) and weight size "
        "on disk. The first model is the reference (the teacher): every other row shows its speed-up, measured "
        "in this run at the same runtime and batch size.")
    p.add_argument("--out", default="", metavar="DIR", help="run directory to write latency.json to (default: none)")

    p = config_command(
        sub, "export", ExportConfig, main=("weights", "data", "model", "format"), epilog=epilog,
        help="export a checkpoint to ONNX or TorchScript (optionally int8), with a parity check",
        description="Export a checkpoint with its preprocessing inside the graph (inputs: float32 NCHW pixels in "
        "[0, 1]) to --output FILE and write FILE.json beside it (input shape, dtype, value range, preprocessing, "
        "class names). The export is checked on the test split of --data: it is written only if its logits match "
        "PyTorch's within --atol and top-1 agrees on at least --min-agreement percent. --int8 writes an ONNX "
        "Runtime static int8 model instead and reports its accuracy and speed-up next to fp32. ONNX needs "
        "'pip install \"igkd[export]\"'.")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="file to write: *.onnx for ONNX, e.g. *.pt for TorchScript (required)")
    p.add_argument("--out", dest="output", metavar="FILE", action=Deprecated, new="--output", help=argparse.SUPPRESS)
    p.add_argument("--report-dir", default="", metavar="DIR",
                   help="run directory to write export.json to (default: none)")

    p = config_command(
        sub, "audit", AuditConfig, main=("teacher", "student", "data"), epilog=epilog,
        help="do students attribute like their teacher? (IG map agreement)",
        description="Integrated-gradient maps of the teacher and each student on the same test images; per "
        "student: mean Spearman rank correlation with the teacher's maps, IoU of their top-k% pixels, top-1 "
        "agreement with the teacher and accuracy on these images. Writes audit.json and a gallery audit.png "
        "(image | teacher map | student maps) to --out.")
    p.add_argument("--out", default="", metavar="DIR", help="directory for audit.json and audit.png (default: none)")

    p = config_command(
        sub, "predict", PredictConfig, main=("weights",), epilog=epilog,
        help="classify image files with a checkpoint or an export",
        description="Classify image files (a folder: the images under it) with an igkd checkpoint, an igkd export "
        "(.onnx, or TorchScript with its FILE.json) or a foreign state dict (--model, --classes, --size). Each file "
        "is decoded as the model's training images were: the recorded dataset's size and resize policy, Pillow's "
        "bilinear filter, RGB or grayscale, alpha dropped; so a checkpoint gives the prediction igkd evaluate "
        "scored, and an export the one its deployment makes from the same file. Prints each file's class, "
        "probability (softmax) and runners-up (--top).")
    p.add_argument("files", nargs="*", metavar="FILE", help="image files or folders of them")


def run_deploy(args) -> bool:
    """Run a deployment command; False when ``args.command`` is not one of them."""
    from . import deploy
    from .fileio import dumps
    if args.command == "bench":
        r = deploy.bench_latency(config=resolve(args, LatencyConfig, "bench"), out=args.out, quiet=args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.latency_table(r))
    elif args.command == "export":
        cfg = resolve(args, ExportConfig, "export")
        if not args.output:
            raise UserError("--output is required; pass --output FILE (*.onnx for ONNX, e.g. *.pt for TorchScript)")
        r = deploy.export_model(config=cfg, output=args.output, report_dir=args.report_dir, quiet=args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.export_summary(r))
    elif args.command == "predict":
        r = deploy.predict(config=resolve(args, PredictConfig, "predict"), files=args.files, quiet=args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.predict_table(r))
    elif args.command == "audit":
        r = deploy.audit(config=resolve(args, AuditConfig, "audit"), out=args.out, quiet=args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.audit_table(r))
    else:
        return False
    return True
