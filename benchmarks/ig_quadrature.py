"""IG accuracy by quadrature and steps, on trained networks: how igkd's default was chosen.

    python benchmarks/ig_quadrature.py student   # the paper's published KD+IG 4.1x student, CIFAR-10 (JPEG copy)
    python benchmarks/ig_quadrature.py demo      # the shipped demo teacher, the demo set (Fashion-MNIST)

For 64 evenly spaced training images: the map error (relative L1 of sum_c |IG|, mean
over images) of captum's Gauss-Legendre x 50 (the paper's setting) and of igkd's
integrated_gradients with each quadrature at several step counts, all against a
512-step Gauss-Legendre reference. ``--fitted 12,16,25``: also schedules fitted to the
network (``--ig-method fitted``, :mod:`igkd.attribution.fitted`) on ``--fit-images``
seeded training images that are none of the 64, so their errors are held out; each fit's
time is printed. Accuracy only; no timing of the rules (1 thread, safe to run beside
other work). Takes about 30 minutes on 1 CPU thread for ``student``, plus about 2 minutes
per fitted schedule.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PUBLISHED = REPO.parent / "shared" / "checkpoints" / "nordlinglab" / \
    "CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("network", choices=["student", "demo"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", default="16,24,32,36,40,44,50")
    ap.add_argument("--methods", default="riemann_middle,gausslegendre,riemann_trapezoid")
    ap.add_argument("--fitted", default="", help="step counts of fitted schedules, e.g. 12,16,25")
    ap.add_argument("--fit-images", type=int, default=32)
    ap.add_argument("--fit-reference", type=int, default=512)
    ap.add_argument("--map-sizes", default="", help="also the error of maps stored at these sizes (--map-size), "
                    "e.g. 16,8: the default's maps and the reference itself, area-averaged and upsampled back")
    args = ap.parse_args(argv)

    from captum.attr import IntegratedGradients

    import igkd
    import time

    from igkd.attribution import attribution_map, integrated_gradients
    from igkd.attribution.fitted import fit_images, fit_schedule
    from igkd.precompute import relative_l1
    from igkd.runtime import tune_malloc

    tune_malloc()
    torch.set_num_threads(1)
    if args.network == "student":
        sys.path.insert(0, str(REPO / "tests"))
        from helpers_data import cifar10_jpg_dir
        model, _ = igkd.load_model(PUBLISHED, "mobilenetv2:drop=5")
        data = igkd.load_dataset(f"imagefolder:{cifar10_jpg_dir()}").train
    else:
        model, _ = igkd.load_model(REPO / "src" / "igkd" / "assets" / "demo_teacher.safetensors")
        data = igkd.load_dataset("demo").train
    idx = torch.linspace(0, len(data) - 1, args.images).long()
    x, y = data.images[idx].float() / 255, data.labels[idx]
    ref = attribution_map(integrated_gradients(model, x, y, n_steps=512, fast=False))

    def err(maps):
        return 100 * relative_l1(maps, ref).mean().item()

    cap = IntegratedGradients(model).attribute(x, target=y, n_steps=50, method="gausslegendre",
                                               internal_batch_size=400)
    print(f"{args.network}: captum gausslegendre x 50 (the paper's) {err(attribution_map(cap)):.2f}%", flush=True)
    for method in args.methods.split(","):
        for steps in map(int, args.steps.split(",")):
            maps = attribution_map(integrated_gradients(model, x, y, n_steps=steps, method=method))
            print(f"{args.network}: igkd {method} x {steps} {err(maps):.2f}%", flush=True)
    if args.map_sizes:
        from igkd.precompute import downsample_maps, upsample_maps
        default = attribution_map(integrated_gradients(model, x, y, n_steps=50, method="riemann_middle"))
        for size in map(int, args.map_sizes.split(",")):
            back = lambda m: upsample_maps(downsample_maps(m, size), tuple(m.shape[-2:]))  # noqa: E731
            print(f"{args.network}: maps stored at {size}x{size}: reference {err(back(ref)):.2f}%, igkd default "
                  f"(midpoint x 50) {err(back(default)):.2f}%", flush=True)
    if args.fitted:
        fit = torch.from_numpy(fit_images(len(data), args.fit_images, 0, idx.numpy()))
        xf, yf = data.images[fit].float() / 255, data.labels[fit]
        for steps in map(int, args.fitted.split(",")):
            t0 = time.perf_counter()
            # zero baseline, as the reference and the rules above (integrated_gradients' default)
            s = fit_schedule(model, xf, yf, torch.zeros_like(xf), steps, args.fit_reference)
            took = time.perf_counter() - t0
            maps = attribution_map(integrated_gradients(model, x, y, schedule=(s.alphas, s.weights)))
            print(f"{args.network}: igkd fitted x {steps} {err(maps):.2f}% (held out; fitted on {len(fit)} images "
                  f"in {took:.0f} s on 1 thread)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
