"""IG precompute throughput: igkd against the paper's captum setting, in one process.

    python benchmarks/ig_throughput.py [--images 64] [--steps 50] [--threads 2] [--weights FILE]

Measures, on the same teacher (CIFAR MobileNetV2 by default) and the same images:

* reference: captum ``IntegratedGradients.attribute`` on batches of 8 images, n_steps=50,
  gausslegendre, no internal batching (the paper's code);
* igkd: ``igkd.integrated_gradients`` with its defaults at the same n_steps;
* the bound: the same network's batched forward+backward (input gradients, batch 64),
  images/s divided by n_steps, i.e. what IG would cost with no overhead at all;
* map error of both against a 512-step Gauss-Legendre reference on ``--error-images``
  images (relative L1 over the map sum_c |IG|).

Prints images/s of each, the ratio igkd / reference, igkd's efficiency against the
bound, and both map errors. Timings are medians over ``--repeats`` runs, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def load_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real CIFAR-10 test images (JPEG copy) when at hand, else random ones."""
    for root in (Path("/tmp/igkd-test-data/cifar10-jpg"), Path("data/cifar10-jpg")):
        if (root / "test").is_dir():
            import igkd
            test = igkd.load_dataset(f"imagefolder:{root}").test
            idx = torch.linspace(0, len(test) - 1, n).long()
            return test.images[idx].float() / 255, test.labels[idx]
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel_l1(maps: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of sum|M - R| / sum|R|."""
    return ((maps - ref).abs().flatten(1).sum(1) / ref.abs().flatten(1).sum(1)).mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64, help="images timed (default 64)")
    ap.add_argument("--steps", type=int, default=50, help="IG steps of both (default 50, the paper's)")
    ap.add_argument("--error-images", type=int, default=16, help="images for the 512-step error check")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions, median reported")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--model", default="mobilenetv2", help="model spec (default: the CIFAR MobileNetV2 teacher)")
    ap.add_argument("--weights", default="", help="weights for --model (default: random init, seed 0)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc as is (both sides)")
    args = ap.parse_args(argv)

    from captum.attr import IntegratedGradients

    import igkd
    from igkd.attribution import attribution_map, integrated_gradients
    from igkd.runtime import tune_malloc

    tuned = False if args.no_malloc_tuning else tune_malloc()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.weights:
        model, _ = igkd.load_model(args.weights, args.model)
    else:
        model = igkd.build_model(args.model).eval()
    x, y = load_images(args.images)
    n, steps = len(x), args.steps

    def reference():
        ig = IntegratedGradients(model)
        return torch.cat([ig.attribute(x[i:i + 8], target=y[i:i + 8], n_steps=steps, method="gausslegendre")
                          for i in range(0, n, 8)])

    def ours():
        return integrated_gradients(model, x, y, n_steps=steps)

    from igkd.attribution.ig import _prepare
    fast_net, _ = _prepare(model, x, True)  # the network igkd differentiates: BN folded, channels_last
    reps = -(-64 // n)
    xb = x.repeat(reps, 1, 1, 1)[:64].contiguous(memory_format=torch.channels_last)
    yb = y.repeat(reps)[:64]

    def bound_pass():
        xg = xb.detach().requires_grad_(True)
        out = fast_net(xg).gather(1, yb.view(-1, 1))
        torch.autograd.grad(out.sum(), xg)

    print(f"model {args.model} ({igkd.count_parameters(model):,} params), {n} images "
          f"{tuple(x.shape[1:])}, {steps} gausslegendre steps, {torch.get_num_threads()} threads, "
          f"malloc tuning {'on' if tuned else 'off'}", flush=True)
    ours(), bound_pass()  # warm-up (one reference batch too)
    IntegratedGradients(model).attribute(x[:8], target=y[:8], n_steps=steps, method="gausslegendre")
    ref_times, our_times, bound_times = [], [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit all alike
        ref_times.append(timed(reference, 1))
        our_times.append(timed(ours, 1))
        bound_times.append(timed(bound_pass, 3))
    t_ref, t_ours, t_bound = map(statistics.median, (ref_times, our_times, bound_times))
    ref_ips, our_ips = n / t_ref, n / t_ours
    bound_ips = 64 / t_bound / steps
    print(f"reference (captum, batch 8, paper's code): {ref_ips:8.2f} images/s")
    print(f"igkd integrated_gradients (defaults):      {our_ips:8.2f} images/s")
    print(f"bound (forward+backward at batch 64 / {steps}):  {bound_ips:8.2f} images/s")
    print(f"ratio igkd / reference: {our_ips / ref_ips:.2f}x; igkd efficiency vs bound: "
          f"{100 * our_ips / bound_ips:.0f}%", flush=True)

    k = min(args.error_images, n)
    xe, ye = x[:k], y[:k]
    exact = attribution_map(integrated_gradients(model, xe, ye, n_steps=512, fast=False))
    ref_map = attribution_map(IntegratedGradients(model).attribute(xe, target=ye, n_steps=steps,
                                                                   method="gausslegendre"))
    our_map = attribution_map(integrated_gradients(model, xe, ye, n_steps=steps))
    print(f"map error vs 512-step reference ({k} images, relative L1): reference {100 * rel_l1(ref_map, exact):.2f}%,"
          f" igkd {100 * rel_l1(our_map, exact):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
