"""IG precompute throughput: igkd against the paper's captum setting, in one process.

    python benchmarks/ig_throughput.py [--images 64] [--threads 2] [--weights FILE --model SPEC] [--device cuda]

On the same network (the CIFAR MobileNetV2 teacher by default) and the same real
CIFAR-10 images it measures:

* reference: captum ``IntegratedGradients.attribute`` on batches of 8 images,
  n_steps=50, gausslegendre, no internal batching (the paper's code);
* igkd's default: ``igkd.integrated_gradients`` with the precompute defaults
  (``PrecomputeConfig``: quadrature and steps);
* igkd at the reference's n_steps and quadrature (the engine alone);
* the bound: the network igkd differentiates (BatchNorm folded, channels_last),
  forward+backward for input gradients at batch 64, images/s divided by n_steps: IG
  with no overhead at all;
* the cheaper attributions (saliency, input x gradient, SmoothGrad): cost and
  similarity to IG;
* map errors against a 512-step Gauss-Legendre reference on ``--error-images`` images
  (relative L1 over the map sum_c |A|, mean over images). ``--error-weights`` (with
  ``--error-model``) computes them on another, trained network: a randomly initialised
  network is nearly linear along the path and gives misleadingly small errors.

Timings are medians over ``--repeats`` interleaved runs (drifts in machine load hit all
sides alike); glibc malloc tuning (what the igkd command applies) is on for all sides
unless ``--no-malloc-tuning``. The reference is also timed as the paper's code runs,
with glibc's default malloc settings, in a child process (mallopt is process-wide):
its 400-image passes then page-fault on every activation. Prints images/s, the ratios
and the errors.

``--batch-sizes 1024,3200`` then times igkd's default IG at each number of interpolated
samples per pass beside the engine's default for the device (64 at 32x32 on the CPU, 256 on
CUDA, the latter chosen without a GPU), with the peak CUDA memory of one call; a size that
does not fit is reported as out of memory. ``scripts/gpu_check.sh`` runs it on the GPU.

``--device cuda`` runs every side on the GPU (models, images and the error check), with
the device synchronised around each timing; the glibc-malloc child is skipped there
(host malloc does not hold GPU activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REF_STEPS, REF_METHOD, REF_BATCH = 50, "gausslegendre", 8


def load_images(n: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """n real CIFAR-10 images (JPEG copy, evenly spaced) when at hand, else random ones."""
    for root in (Path("/tmp/igkd-test-data/cifar10-jpg"), Path("data/cifar10-jpg")):
        if (root / split).is_dir():
            import igkd
            data = getattr(igkd.load_dataset(f"imagefolder:{root}"), split)
            idx = torch.linspace(0, len(data) - 1, n).long()
            return data.images[idx].float() / 255, data.labels[idx]
    print("note: CIFAR-10 JPEG copy not found (unpack ../shared/data/cifar10-jpg.tar.gz to "
          "/tmp/igkd-test-data); using random images", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


DEVICE = torch.device("cpu")  # set by --device


def sync() -> None:
    """Wait for the GPU's queued work: CUDA calls return before their kernels finish."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of the Spearman correlation of two maps (ties broken by order)."""
    def ranks(m):
        return m.flatten(1).argsort(1).argsort(1).double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return ((ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))).mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images timed (default 64)")
    ap.add_argument("--error-images", type=int, default=32, help="images for the 512-step error check (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timed repetitions, median reported (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--model", default="mobilenetv2", help="model spec timed (default: the CIFAR MobileNetV2 teacher)")
    ap.add_argument("--weights", default="", help="weights for --model (default: random init, seed 0)")
    ap.add_argument("--error-model", default="", help="model spec for the error check (default: --model)")
    ap.add_argument("--error-weights", default="", help="weights for the error check (default: --weights)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as is (all sides)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where every side runs (default cpu)")
    ap.add_argument("--fitted", type=int, default=0,
                    help="also a schedule of this many points fitted to each network (--ig-method fitted) on "
                    "--fit-images CIFAR-10 test images, its fitting time spread over --amortize images")
    ap.add_argument("--fit-images", type=int, default=32)
    ap.add_argument("--amortize", type=int, default=50000, help="images the fit is spread over (default 50000)")
    ap.add_argument("--batch-sizes", default="",
                    help="comma-separated interpolated samples per pass to sweep after the main table, e.g. "
                    "256,1024,4096: igkd's default IG at each, images/s and (CUDA) peak memory; the data for the "
                    "engine's per-device default (256 on CUDA, chosen without a GPU)")
    ap.add_argument("--reference-only", action="store_true",
                    help="time only the reference and print images/s as JSON (the child process the benchmark "
                    "starts to time the paper's code as it runs: with glibc's default malloc settings)")
    args = ap.parse_args(argv)
    try:
        sweep = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        ap.error(f"--batch-sizes takes comma-separated positive integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in sweep):
        ap.error(f"--batch-sizes takes positive integers, got {args.batch_sizes!r}")

    from captum.attr import IntegratedGradients

    import igkd
    from igkd.attribution import attribution_map, input_x_gradient, integrated_gradients, saliency, smoothgrad
    from igkd.attribution.engine import _default_batch_size, _prepare
    from igkd.config import PrecomputeConfig
    from igkd.precompute import relative_l1
    from igkd.runtime import tune_malloc

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA GPU is available")
    tuned = False if args.no_malloc_tuning else tune_malloc()
    torch.set_num_threads(args.threads)
    default = PrecomputeConfig()

    def load(spec, weights):
        if weights:
            return igkd.load_model(weights, spec)[0].eval().to(DEVICE)
        torch.manual_seed(0)
        return igkd.build_model(spec).eval().to(DEVICE)

    model = load(args.model, args.weights)
    x, y = (t.to(DEVICE) for t in load_images(args.images))
    n = len(x)
    where = (f"{torch.cuda.get_device_name(DEVICE)}" if DEVICE.type == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"model {args.model}{' (' + args.weights + ')' if args.weights else ' (random init)'}, "
          f"{igkd.count_parameters(model):,} params, {n} CIFAR-10 test images, {where}, "
          f"malloc tuning {'on' if tuned else 'off'} (all sides)", flush=True)

    def reference(net=model, xs=x, ys=y):
        ig = IntegratedGradients(net)
        return torch.cat([ig.attribute(xs[i:i + REF_BATCH], target=ys[i:i + REF_BATCH], n_steps=REF_STEPS,
                                       method=REF_METHOD) for i in range(0, len(xs), REF_BATCH)])

    def ours(net=model, xs=x, ys=y):
        return integrated_gradients(net, xs, ys, n_steps=default.ig_steps, method=default.ig_method)

    def ours_equal(net=model, xs=x, ys=y):
        return integrated_gradients(net, xs, ys, n_steps=REF_STEPS, method=REF_METHOD)

    cheap = {
        "saliency": lambda net=model, xs=x, ys=y: saliency(net, xs, ys),
        "input x gradient": lambda net=model, xs=x, ys=y: input_x_gradient(net, xs, ys),
        f"smoothgrad ({default.smoothgrad_samples})": lambda net=model, xs=x, ys=y: smoothgrad(
            net, xs, ys, default.smoothgrad_samples, default.smoothgrad_sigma, torch.Generator().manual_seed(0)),
    }

    fast_net, fmt = _prepare(model, x, True)  # the network igkd differentiates, in the format it is fed
    xb = x.repeat(-(-64 // n), 1, 1, 1)[:64].contiguous(memory_format=fmt)
    yb = y.repeat(-(-64 // n))[:64]

    def bound_pass():
        xg = xb.detach().requires_grad_(True)
        torch.autograd.grad(fast_net(xg).gather(1, yb.view(-1, 1)).sum(), xg)

    if args.reference_only:
        reference(model, x[:REF_BATCH], y[:REF_BATCH])
        print(json.dumps({"images_per_s": n / timed(reference, args.repeats), "malloc_tuning": tuned}))
        return 0

    # the paper's code as it runs (glibc malloc defaults): mallopt is process-wide, so in a child
    untuned_ips = None
    if DEVICE.type == "cpu":
        child = subprocess.run([sys.executable, __file__, "--reference-only", "--no-malloc-tuning",
                                *[a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-malloc-tuning"]],
                               capture_output=True, text=True, check=True)
        untuned_ips = json.loads(child.stdout.strip().splitlines()[-1])["images_per_s"]

    fitted_sides, fit_seconds = {}, None
    if args.fitted:
        from igkd.attribution.fitted import fit_schedule

        def fit(net):  # on test images: the error check below uses training images, so it is held out
            xf, yf = (t.to(DEVICE) for t in load_images(args.fit_images, "test"))
            sync()
            t0 = time.perf_counter()
            s = fit_schedule(net, xf, yf, torch.zeros_like(xf), args.fitted)
            sync()
            return s, time.perf_counter() - t0

        schedule, fit_seconds = fit(model)
        print(f"fitted {args.fitted} points on {args.fit_images} images in {fit_seconds:.1f} s "
              f"({fit_seconds / args.amortize * 1000:.2f} ms per image over {args.amortize:,})", flush=True)

        def ours_fitted(net=model, xs=x, ys=y, s=schedule):
            return integrated_gradients(net, xs, ys, schedule=(s.alphas, s.weights))
        fitted_sides = {"fitted": ours_fitted}

    sides = {"reference": reference, "default": ours, "equal": ours_equal, **fitted_sides, **cheap}
    for fn in sides.values():  # warm-up
        fn(model, x[:REF_BATCH], y[:REF_BATCH])
    bound_pass()
    times = {k: [] for k in [*sides, "bound"]}
    for _ in range(args.repeats):
        for k, fn in sides.items():
            times[k].append(timed(fn))
        times["bound"].append(timed(bound_pass, 3))
    ips = {k: n / statistics.median(v) for k, v in times.items() if k != "bound"}
    if fit_seconds is not None:  # counted fairly: the fit's time spread over the images it serves
        ips["fitted"] = 1 / (1 / ips["fitted"] + fit_seconds / args.amortize)
    bound_pass_ips = 64 / statistics.median(times["bound"])  # forward+backward images/s

    # errors against 512 steps, on the error network
    emodel = load(args.error_model or args.model, args.error_weights if args.error_model or args.error_weights
                  else args.weights)
    k = min(args.error_images, n)
    xe, ye = (t.to(DEVICE) for t in load_images(k, "train"))
    exact = attribution_map(integrated_gradients(emodel, xe, ye, n_steps=512, fast=False))
    maps = {"reference": reference, "default": ours, "equal": ours_equal, **cheap}
    if args.fitted:
        eschedule = fit(emodel)[0] if emodel is not model else schedule
        maps["fitted"] = lambda net, xs, ys, s=eschedule: integrated_gradients(net, xs, ys, schedule=(s.alphas,
                                                                                                      s.weights))
    maps = {name: attribution_map(fn(emodel, xe, ye)) for name, fn in maps.items()}
    err = {name: relative_l1(m, exact).mean().item() for name, m in maps.items()}

    def unit(m):
        return m / m.flatten(1).sum(1).clamp_min(1e-30)[:, None, None]

    print("\n| attribution | images/s | vs reference | passes/image | efficiency vs bound | map error vs IG-512 |"
          " rank corr. with IG-512 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("reference", f"captum IG {REF_METHOD} {REF_STEPS}, batch {REF_BATCH} (paper)", REF_STEPS),
            ("default", f"igkd IG {default.ig_method} {default.ig_steps} (default)", default.ig_steps),
            ("equal", f"igkd IG {REF_METHOD} {REF_STEPS}", REF_STEPS),
            *([("fitted", f"igkd IG fitted {args.fitted}, fit time spread over {args.amortize:,} images",
                args.fitted)] if args.fitted else []),
            *[(name, f"igkd {name}", default.smoothgrad_samples if name.startswith("smooth") else 1)
              for name in cheap]]
    if untuned_ips is not None:
        print(f"| captum IG {REF_METHOD} {REF_STEPS}, batch {REF_BATCH} (paper), glibc malloc defaults "
              f"(child process) | {untuned_ips:.2f} | {untuned_ips / ips['reference']:.2f}x | {REF_STEPS} | "
              f"{100 * untuned_ips * REF_STEPS / bound_pass_ips:.0f}% | = reference | = reference |")
    for key, label, passes in rows:
        eff = ips[key] * passes / bound_pass_ips
        ig = key in ("reference", "default", "equal", "fitted")
        e = err[key] if ig else relative_l1(unit(maps[key]), unit(exact)).mean()
        print(f"| {label} | {ips[key]:.2f} | {ips[key] / ips['reference']:.2f}x | {passes} | {100 * eff:.0f}% | "
              f"{100 * float(e):.2f}%{'' if ig else ' (sum-normalised)'} | "
              f"{rank_correlation(maps[key], exact):.3f} |")
    print(f"\nbound: forward+backward at batch 64 = {bound_pass_ips:.1f} images/s "
          f"({bound_pass_ips / REF_STEPS:.2f} IG-{REF_STEPS} images/s)")
    print(f"errors on {args.error_model or args.model}"
          f"{' (' + (args.error_weights or args.weights) + ')' if (args.error_weights or args.weights) else ' (random init)'}"
          f", {k} CIFAR-10 train images")
    as_runs = (f", {ips['default'] / untuned_ips:.2f}x (reference as the paper's code runs, glibc defaults)"
               if untuned_ips is not None else "")
    on = "" if DEVICE.type == "cpu" else f" {DEVICE}:"  # the CPU line reads as it always did
    print(f"RESULT{on} default/reference {ips['default'] / ips['reference']:.2f}x (reference with igkd's "
          f"malloc tuning){as_runs}; engine at equal steps "
          f"{ips['equal'] / ips['reference']:.2f}x, efficiency at equal steps "
          f"{100 * ips['equal'] * REF_STEPS / bound_pass_ips:.0f}%, errors: reference {100 * err['reference']:.2f}% "
          f"default {100 * err['default']:.2f}%", flush=True)
    if args.fitted:
        as_runs = f", {ips['fitted'] / untuned_ips:.2f}x as the paper's code runs" if untuned_ips is not None else ""
        print(f"RESULT{on} fitted {args.fitted} (fit included)/reference {ips['fitted'] / ips['reference']:.2f}x"
              f"{as_runs}, error {100 * err['fitted']:.2f}%", flush=True)
    if sweep:
        batch_sweep(model, x, y, default, sweep, args.repeats, _default_batch_size(x))
    return 0


def batch_sweep(model, x, y, default, sizes, repeats, engine_default) -> None:
    """igkd's default IG at each number of interpolated samples per pass: images/s and, on
    CUDA, the peak memory of one call (what a larger default would cost)."""
    from igkd.attribution import integrated_gradients
    n = len(x)
    print(f"\n| samples per pass | images/s | vs engine default ({engine_default}) | peak memory |")
    print("|---:|---:|---:|---:|")
    rows = []
    for b in sorted({engine_default, *sizes}):
        def run(b=b):
            return integrated_gradients(model, x, y, n_steps=default.ig_steps, method=default.ig_method, batch_size=b)
        try:
            run()  # warm-up (cuDNN picks its kernels per shape)
            peak = None
            if DEVICE.type == "cuda":
                torch.cuda.reset_peak_memory_stats(DEVICE)
                base = torch.cuda.memory_allocated(DEVICE)
                run()
                sync()
                peak = (torch.cuda.max_memory_allocated(DEVICE) - base) / 2**20
            rows.append((b, n / timed(run, repeats), peak))
        except torch.OutOfMemoryError:  # the size this device cannot take: a row, not the end of the sweep
            torch.cuda.empty_cache()
            rows.append((b, None, None))
    at_default = next(ips for b, ips, _ in rows if b == engine_default) or float("nan")
    for b, ips, peak in rows:
        if ips is None:
            print(f"| {b} | out of memory | | |")
            continue
        print(f"| {b} | {ips:.1f} | {ips / at_default:.2f}x | {'n/a (CPU)' if peak is None else f'{peak:.0f} MiB'} |")
    fitting = [r for r in rows if r[1] is not None]
    if fitting:
        best = max(fitting, key=lambda r: r[1])
        print(f"SWEEP{'' if DEVICE.type == 'cpu' else ' ' + str(DEVICE) + ':'} best {best[0]} samples per pass, "
              f"{best[1] / at_default:.2f}x the engine default ({engine_default}), {n} images x "
              f"{default.ig_steps} steps", flush=True)


if __name__ == "__main__":
    sys.exit(main())
