"""Deployment figures of the README: latency, MACs, parameters, int8, in one run.

    python benchmarks/deploy.py [--threads 2] [--min-time 2] [--data SPEC] [--weights FILE] [--cold-only]

Measures side by side, at a fixed thread count (default 2), batch 1 and 32, PyTorch eager
and ONNX Runtime:

* the teacher ``mobilenetv2`` (2,236,682 params);
* the paper's 4.12x student ``mobilenetv2:drop=5`` (543,498 params, truncation);
* ``mobilenetv2:width=0.47`` (526,874 params), the width multiplier closest in
  parameters to drop=5 (width=0.46: 517,354; 0.48: 577,498; 0.5: 590,410);

and then the published KD+IG student (``--weights``) exported to int8 with ONNX Runtime
(static, per-channel, calibrated on 256 training images): test accuracy of int8 and fp32
on the JPEG CIFAR-10 test split (10,000 images) and int8 latency against fp32.
Latency does not depend on weight values: the three architectures run with untrained
weights. Also prints the paper's way of timing (one un-warmed call per model, each
order, and each model alone in a fresh process; ``--cold-only`` prints just that) for
comparison. Run it on an otherwise idle machine (check ``uptime``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO.parent / "shared" / "checkpoints" / "nordlinglab" / \
    "CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt"
MODELS = "mobilenetv2,mobilenetv2:drop=5,mobilenetv2:width=0.47"


def default_data() -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers_data import cifar10_jpg_dir  # unpacks shared/data/cifar10-jpg.tar.gz once
    folder = cifar10_jpg_dir()
    if folder is None:
        sys.exit("no JPEG CIFAR-10 (shared/data/cifar10-jpg.tar.gz); pass --data imagefolder:DIR")
    return f"imagefolder:{folder}"


COLD_CALL = """
import sys, time, torch, igkd
torch.set_num_threads(int(sys.argv[1]))
nets = [igkd.build_model(spec).eval() for spec in sys.argv[2:]]
x = torch.rand(1, 3, 32, 32)
for net in nets:
    t0 = time.perf_counter()
    with torch.no_grad():
        net(x)
    print(1e3 * (time.perf_counter() - t0))
"""


def cold_calls_ms(specs: list[str], threads: int) -> list[float]:
    """The paper's measurement: perf_counter around ONE first forward call at batch 1 of each
    model, in that order, in a fresh process (the first call also pays the process's one-time
    set-up: thread pool, kernel selection)."""
    import subprocess
    r = subprocess.run([sys.executable, "-c", COLD_CALL, str(threads), *specs], capture_output=True, text=True,
                       check=True)
    return [float(line) for line in r.stdout.split()]


def cold_table(threads: int) -> str:
    """The paper's way in both orders and with each model alone in its process: which of the two
    networks is timed first decides most of the ratio."""
    t, s = "mobilenetv2", "mobilenetv2:drop=5"
    (t1, s1), (s2, t2) = cold_calls_ms([t, s], threads), cold_calls_ms([s, t], threads)
    (ta,), (sa,) = cold_calls_ms([t], threads), cold_calls_ms([s], threads)
    lines = ["the paper's way (one un-warmed eager call per model, batch 1, perf_counter), fresh processes:"]
    for what, tm, sm in (("teacher timed first, then student", t1, s1), ("student timed first, then teacher", t2, s2),
                         ("each alone in its own process", ta, sa)):
        lines.append(f"  {what:36s} teacher {tm:7.1f} ms, student {sm:7.1f} ms, ratio {tm / sm:5.2f}x")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement (default: 2)")
    ap.add_argument("--data", default="", help="dataset spec of CIFAR-10 (default: the shared JPEG copy)")
    ap.add_argument("--weights", default=str(PUBLISHED), help="4.12x student to quantise (default: published KD+IG)")
    ap.add_argument("--cold-only", action="store_true", help="print only the paper's way of timing (seconds)")
    args = ap.parse_args(argv)
    if args.cold_only:
        print(cold_table(args.threads))
        return

    import igkd
    from igkd.evaluate.cost import measure_latency
    from igkd.export import onnx_bytes
    from igkd.report import markdown_table
    from igkd.runtime import tune_malloc
    tune_malloc()  # as the igkd command does
    torch.set_num_threads(args.threads)

    cold = cold_table(args.threads)  # first, in fresh processes, before this one has warmed anything
    lat = igkd.bench_latency(MODELS, batch_size="1,32", threads=args.threads, runtime="eager,onnxruntime",
                             min_time=args.min_time)
    print(igkd.deploy.latency_table(lat))

    data = args.data or default_data()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "student-int8.onnx"
        r = igkd.export_model(args.weights, out, "onnx", model="mobilenetv2:drop=5", data=data, int8=True,
                              threads=args.threads, min_time=args.min_time)
        student, _ = igkd.load_model(args.weights, "mobilenetv2:drop=5")
        fp32 = onnx_bytes(student, (3, 32, 32))
        teacher_ort = {row["batch"]: row["median_ms"] for row in lat["rows"]
                       if row["model"] == "mobilenetv2" and row["runtime"] == "onnxruntime"}
        rows = []
        for batch in (1, 32):
            f = measure_latency(fp32, (3, 32, 32), batch, args.threads, min_time=args.min_time, runtime="onnxruntime")
            q = measure_latency(out, (3, 32, 32), batch, args.threads, min_time=args.min_time, runtime="onnxruntime")
            rows.append([batch, f"{f['median_ms']:.3f}", f"{q['median_ms']:.3f}",
                         f"{f['median_ms'] / q['median_ms']:.2f}x", f"{teacher_ort[batch] / q['median_ms']:.2f}x"])
    q = r["int8_check"]
    print(f"\nint8 (ONNX Runtime static QDQ, per-channel, {q['calibration_images']} calibration images) of "
          f"{Path(args.weights).name}, {q['images']} test images of {data}:")
    print(f"accuracy fp32 {q['accuracy_fp32']:.2f}%, int8 {q['accuracy_int8']:.2f}% ({q['accuracy_change']:+.2f} "
          f"points), top-1 agreement {q['top1_agreement']:.2f}%, file {r['bytes']:,} bytes")
    print(markdown_table(["batch", "fp32 ORT ms", "int8 ORT ms", "int8 speed-up vs fp32",
                          "int8 student vs fp32 teacher (ORT)"], rows))
    print("\n" + cold)

if __name__ == "__main__":
    main()
