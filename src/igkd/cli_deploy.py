"""Command line of the deployment commands (``bench latency``, ``export``, ``audit``):
argument parsing only; the work is in :mod:`igkd.deploy`."""

from __future__ import annotations

import argparse

from .attribution import registry as attribution_registry
from .cli_types import NON_NEGATIVE, POSITIVE, float_range, int_range

RAW = argparse.RawDescriptionHelpFormatter


def add_deploy_commands(sub, epilog: str = "") -> None:
    bench = sub.add_parser("bench", help="measure inference cost (igkd bench latency)",
                           description="Inference benchmarks.", epilog=epilog, formatter_class=RAW)
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_sub.required = True
    p = bench_sub.add_parser(
        "latency", help="latency, throughput, params, MACs and size of models side by side",
        description="Measure CPU inference latency properly (warm-up, then repetitions until both a time and a "
        "count budget are met; median, p10, p90, images/s) at a fixed thread count, with parameters, MACs "
        "(multiply-accumulates of convolutions and linear layers for one image) and weight size on disk. The "
        "first model is the reference (the teacher): every other row shows its speed-up, measured in this run at "
        "the same runtime and batch size.", epilog=epilog, formatter_class=RAW)
    p.add_argument("--model", action="append", default=[], metavar="SPEC[,SPEC...]",
                   help="model specs, the reference (teacher) first; repeatable (default: from --weights metadata)")
    p.add_argument("--weights", action="append", default=[], metavar="FILE[,FILE...]",
                   help="checkpoints, one per --model (or alone, with igkd metadata); they give the size on disk "
                   "(default: none, untrained weights: latency does not depend on their values)")
    p.add_argument("--batch", default="1", metavar="N[,N...]", help="batch sizes (default: 1)")
    p.add_argument("--threads", type=POSITIVE, default=1, help="CPU threads: torch.set_num_threads and ONNX Runtime "
                   "intra_op_num_threads (default: 1)")
    p.add_argument("--runtime", default="eager", metavar="R[,R...]",
                   help="eager (PyTorch), compiled (torch.compile, compiled during warm-up) and/or onnxruntime "
                   "(exported to ONNX; needs igkd[export]) (default: eager)")
    p.add_argument("--input", default="3x32x32", metavar="CxHxW",
                   help="image shape for models given by spec (default: 3x32x32; checkpoints use their metadata)")
    p.add_argument("--classes", type=POSITIVE, default=10, help="classes of models given by spec (default: 10)")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=10, help="untimed calls first (default: 10)")
    p.add_argument("--min-time", type=float_range(0.0), default=1.0, help="seconds of timed calls at least (default: 1.0)")
    p.add_argument("--min-reps", type=POSITIVE, default=10, help="timed calls at least (default: 10)")
    p.add_argument("--max-reps", type=POSITIVE, default=10000, help="timed calls at most (default: 10000)")
    p.add_argument("--out", default="", metavar="DIR", help="run directory to write latency.json to (default: none)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX or TorchScript (optionally int8), with a parity check",
        description="Export a checkpoint with its preprocessing inside the graph (inputs: float32 NCHW pixels in "
        "[0, 1]) and write FILE.json beside it (input shape, dtype, value range, preprocessing, class names). "
        "The export is checked on the test split of --data: it is written only if its logits match PyTorch's "
        "within --atol and top-1 agrees on at least --min-agreement percent. --int8 writes an ONNX Runtime "
        "static int8 model instead and reports its accuracy and speed-up next to fp32. ONNX needs "
        "'pip install \"igkd[export]\"'.", epilog=epilog, formatter_class=RAW)
    p.add_argument("--weights", required=True, metavar="FILE", help=".safetensors (igkd) or .pt/.pth state dict")
    p.add_argument("--model", default="", metavar="SPEC",
                   help="architecture, required for files without igkd metadata (default: from the metadata)")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="output format (default: onnx)")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="file to write (*.onnx for ONNX, e.g. *.pt for TorchScript)")
    p.add_argument("--data", default="", metavar="SPEC",
                   help="dataset for the parity check (its test split) and int8 calibration (its training split) "
                   "(default: the dataset named in the checkpoint's metadata)")
    p.add_argument("--normalize", default="auto", choices=["auto", "none", "dataset"],
                   help="preprocessing: auto = as the checkpoint's metadata says (none for foreign files), "
                   "none = raw [0,1] pixels, dataset = train-set mean/std (default: auto)")
    p.add_argument("--images", type=NON_NEGATIVE, default=0, help="parity on the first N test images; 0 = all (default: 0)")
    p.add_argument("--atol", type=float_range(0.0), default=1e-3, help="largest allowed |logit difference| (default: 0.001)")
    p.add_argument("--min-agreement", type=float_range(0.0, 100.0), default=99.9,
                   help="least top-1 agreement with PyTorch, percent (default: 99.9)")
    p.add_argument("--int8", action="store_true", help="write a static int8 model (ONNX Runtime QDQ, per-channel)")
    p.add_argument("--calibration-images", type=POSITIVE, default=256,
                   help="training images to calibrate int8 activation ranges on (default: 256)")
    p.add_argument("--threads", type=POSITIVE, default=1, help="threads for the int8 vs fp32 latency (default: 1)")
    p.add_argument("--min-time", type=float_range(0.0), default=1.0, help="seconds per latency measurement (default: 1.0)")
    p.add_argument("--report-dir", default="", metavar="DIR",
                   help="run directory to write export.json to (default: none)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the summary")

    p = sub.add_parser(
        "audit", help="do students attribute like their teacher? (IG map agreement)",
        description="Integrated-gradient maps of the teacher and each student on the same test images; per "
        "student: mean Spearman rank correlation with the teacher's maps, IoU of their top-k% pixels, top-1 "
        "agreement with the teacher and accuracy on these images. Writes audit.json and a gallery audit.png "
        "(image | teacher map | student maps) to --out.", epilog=epilog, formatter_class=RAW)
    p.add_argument("--teacher", required=True, metavar="CKPT", help="teacher checkpoint")
    p.add_argument("--student", action="append", required=True, metavar="CKPT[,CKPT...]",
                   help="student checkpoints (e.g. a KD+IG one and a plain one); repeatable")
    p.add_argument("--data", required=True, metavar="SPEC", help="dataset spec; images come from its test split")
    p.add_argument("--teacher-model", default="", metavar="SPEC",
                   help="architecture of a foreign teacher file (default: from its metadata)")
    p.add_argument("--student-model", default="", metavar="SPEC",
                   help="architecture of foreign student files, e.g. mobilenetv2:drop=5 for the paper's "
                   "(default: from their metadata)")
    p.add_argument("--images", type=POSITIVE, default=64, help="test images, evenly spaced over the split (default: 64)")
    p.add_argument("--target", default="label", choices=["label", "predicted"],
                   help="class each model attributes: the true label (the same question for all) or its own "
                   "prediction (default: label)")
    p.add_argument("--topk", type=float_range(0.0, 100.0), default=10.0, help="percent of pixels in the top-k overlap (default: 10)")
    p.add_argument("--steps", type=int_range(1, 4096), default=32, help="IG steps, Gauss-Legendre (default: 32)")
    p.add_argument("--attribution", default=attribution_registry.DEFAULT, choices=list(attribution_registry.NAMES),
                   help="attribution whose maps are compared: " + attribution_registry.help_text()
                   + "; --steps and --baseline apply to ig, the others take precompute's defaults and gradcam "
                   "each model's auto layer (default: ig)")
    p.add_argument("--baseline", default="black", choices=["black", "zero", "blur"],
                   help="IG baseline, the same pixels for every model unless zero (= each model's normalised "
                   "zero) (default: black)")
    p.add_argument("--gallery", type=NON_NEGATIVE, default=8, help="rows (images) in audit.png; 0 = none (default: 8)")
    p.add_argument("--out", default="", metavar="DIR", help="directory for audit.json and audit.png (default: none)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run_deploy(args) -> bool:
    """Run a deployment command; False when ``args.command`` is not one of them."""
    from . import deploy
    from .fileio import dumps
    if args.command == "bench":
        r = deploy.bench_latency(args.model, args.weights, args.batch, args.threads, args.runtime, args.input,
                                 args.classes, args.warmup, args.min_time, args.min_reps, args.max_reps, args.out,
                                 args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.latency_table(r))
    elif args.command == "export":
        r = deploy.export_model(args.weights, args.out, args.format, args.model, args.data, args.normalize, args.int8,
                                args.images, args.calibration_images, args.atol, args.min_agreement, args.threads,
                                args.min_time, args.report_dir, args.quiet)
        print(dumps(r, indent=2) if args.json else deploy.export_summary(r))
    elif args.command == "audit":
        r = deploy.audit(args.teacher, args.student, args.data, args.teacher_model, args.student_model, args.images,
                         args.target, args.topk, args.steps, args.baseline, args.gallery, args.out, args.quiet,
                         args.attribution)
        print(dumps(r, indent=2) if args.json else deploy.audit_table(r))
    else:
        return False
    return True
