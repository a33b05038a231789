"""IG accuracy by quadrature and steps, on trained networks: how igkd's default was chosen.

    python benchmarks/ig_quadrature.py student   # the paper's published KD+IG 4.1x student, CIFAR-10 (JPEG copy)
    python benchmarks/ig_quadrature.py demo      # the shipped demo teacher, the demo set (Fashion-MNIST)
    python benchmarks/ig_quadrature.py checkpoint --weights RUN/model.safetensors --data SPEC   # any igkd checkpoint

For 64 evenly spaced training images: the map error (relative L1 of sum_c |IG|, mean
over images) of captum's Gauss-Legendre x 50 (the paper's setting) and of igkd's
integrated_gradients with each quadrature at several step counts, all against a
512-step Gauss-Legendre reference. ``--fitted 12,16,25``: also schedules fitted to the
network (``--ig-method fitted``, :mod:`igkd.attribution.fitted`) on ``--fit-images``
seeded training images that are none of the 64, so their errors are held out; each fit's
time is printed. ``--bounds 16,25,36``: how far those pass counts could go at best: a
schedule fitted on the scored images themselves, an oracle's per-image step counts, and
the completeness-corrected trapezoid (:func:`bounds`; about 64 x 1,800 passes more).
Accuracy only; no timing of the rules (1 thread, safe to run beside other work). Takes
about 30 minutes on 1 CPU thread for ``student``, plus about 2 minutes per fitted schedule.
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
    ap.add_argument("network", choices=["student", "demo", "checkpoint"])
    ap.add_argument("--weights", help="checkpoint: an igkd checkpoint (model.safetensors with its model.json)")
    ap.add_argument("--data", help="checkpoint: the dataset spec it was trained on, e.g. imagefolder:data/cifar10-jpg")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", default="16,24,32,36,40,44,50")
    ap.add_argument("--methods", default="riemann_middle,gausslegendre,riemann_trapezoid")
    ap.add_argument("--fitted", default="", help="step counts of fitted schedules, e.g. 12,16,25")
    ap.add_argument("--fit-images", type=int, default=32)
    ap.add_argument("--fit-reference", type=int, default=512)
    ap.add_argument("--bounds", default="", help="pass counts at which to estimate what no schedule can beat: "
                    "a schedule fitted on the scored images themselves, the per-image step allocation of an "
                    "oracle, and the completeness-corrected trapezoid, e.g. 16,25,36")
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
    name = args.network
    if args.network == "student":
        sys.path.insert(0, str(REPO / "tests"))
        from helpers_data import cifar10_jpg_dir
        model, _ = igkd.load_model(PUBLISHED, "mobilenetv2:drop=5")
        data = igkd.load_dataset(f"imagefolder:{cifar10_jpg_dir()}").train
    elif args.network == "demo":
        model, _ = igkd.load_model(REPO / "src" / "igkd" / "assets" / "demo_teacher.safetensors")
        data = igkd.load_dataset("demo").train
    else:
        if not (args.weights and args.data):
            ap.error("checkpoint needs --weights FILE and --data SPEC")
        model, meta = igkd.load_model(args.weights)
        data = igkd.load_dataset(args.data).train
        name = meta["model"]
    idx = torch.linspace(0, len(data) - 1, args.images).long()
    x, y = data.images[idx].float() / 255, data.labels[idx]
    ref = attribution_map(integrated_gradients(model, x, y, n_steps=512, fast=False))

    def err(maps):
        return 100 * relative_l1(maps, ref).mean().item()

    cap = IntegratedGradients(model).attribute(x, target=y, n_steps=50, method="gausslegendre",
                                               internal_batch_size=400)
    paper = err(attribution_map(cap))
    print(f"{name}: captum gausslegendre x 50 (the paper's) {paper:.2f}%", flush=True)
    if args.bounds:
        bounds(name, model, x, y, ref, paper, [int(n) for n in args.bounds.split(",")], args.fit_reference)
    for method in args.methods.split(","):
        for steps in map(int, args.steps.split(",")):
            maps = attribution_map(integrated_gradients(model, x, y, n_steps=steps, method=method))
            print(f"{name}: igkd {method} x {steps} {err(maps):.2f}%", flush=True)
    if args.map_sizes:
        from igkd.precompute import downsample_maps, upsample_maps
        default = attribution_map(integrated_gradients(model, x, y, n_steps=50, method="riemann_middle"))
        for size in map(int, args.map_sizes.split(",")):
            back = lambda m: upsample_maps(downsample_maps(m, size), tuple(m.shape[-2:]))  # noqa: E731
            print(f"{name}: maps stored at {size}x{size}: reference {err(back(ref)):.2f}%, igkd default "
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
            print(f"{name}: igkd fitted x {steps} {err(maps):.2f}% (held out; fitted on {len(fit)} images "
                  f"in {took:.0f} s on 1 thread)", flush=True)
    return 0


def allocate(errors, counts, target):
    """The fewest mean passes an oracle that knows every image's error (``errors``: images x
    ``counts``) needs for a mean error of at most ``target``: greedily give the image with
    the largest error drop per extra pass a larger count. Returns (mean passes, count per
    image), or None when even the largest counts miss the target."""
    import numpy as np
    level = np.zeros(errors.shape[0], dtype=int)
    rows = np.arange(errors.shape[0])
    while errors[rows, level].mean() > target:
        best = (0.0, -1, -1)
        for i in rows:
            for j in range(level[i] + 1, len(counts)):
                gain = (errors[i, level[i]] - errors[i, j]) / (counts[j] - counts[level[i]])
                if gain > best[0]:
                    best = (gain, i, j)
        if best[1] < 0:
            return None
        level[best[1]] = best[2]
    chosen = np.asarray(counts)[level]
    return float(chosen.mean()), chosen


def completeness_corrected(model, x, y, n):
    """IG by the trapezoid rule over ``n`` equal intervals (``n + 1`` passes) with each
    interval's two weights moved so that the interval integrates ``dF/dalpha`` to the
    logit change ``F(b) - F(a)`` exactly (the logits come free with the gradients). Exact
    when an interval holds at most one kink of a piecewise-linear network's path."""
    from igkd.attribution.engine import _eval_without_param_grads, _prepare
    alphas = torch.linspace(0, 1, n + 1)
    h, view = 1.0 / n, (-1,) + (1,) * (x.dim() - 1)
    out = torch.zeros_like(x)
    with torch.inference_mode(False), torch.enable_grad():
        net, fmt = _prepare(model, x, True)
        with _eval_without_param_grads(net):
            for i in range(x.shape[0]):
                pts = (alphas.view(-1, 1, 1, 1) * x[i:i + 1]).contiguous(memory_format=fmt).requires_grad_(True)
                logit = net(pts)[:, int(y[i])]
                (g,) = torch.autograd.grad(logit.sum(), pts)
                c, f = (g * x[i:i + 1]).double(), logit.detach().double()  # zero baseline: x - x' = x
                s = c.flatten(1).sum(1)  # dF/dalpha at the nodes
                den = s[:-1] - s[1:]
                theta = torch.where(den.abs() > 1e-12 * (s[:-1].abs() + s[1:].abs() + 1e-30),
                                    ((f[1:] - f[:-1]) / h - s[1:]) / den, torch.full_like(den, 0.5)).clamp(0, 1)
                out[i] = (h * (theta.view(view) * c[:-1] + (1 - theta.view(view)) * c[1:])).sum(0).float()
    return out


def bounds(name, model, x, y, ref, paper, passes, reference_steps):
    """What no schedule of ``passes`` points is likely to beat here, against ``paper``
    (the error of captum's Gauss-Legendre x 50 on the same images):

    * a schedule fitted (:mod:`igkd.attribution.fitted`) on the very images it is scored
      on: a held-out fit does worse, so a fitted schedule that misses the paper's error
      here misses it anywhere;
    * per-image step counts chosen by an oracle that knows each image's error at every
      midpoint count: what any adaptive rule (completeness gap or other) could at most save;
    * whether the completeness gap ``|sum IG - (F(x) - F(x'))|`` tells the images with a
      large map error, the criterion such a rule would refine by;
    * the completeness-corrected trapezoid (:func:`completeness_corrected`), which uses the
      logits the passes compute anyway.
    """
    import numpy as np
    from scipy.stats import spearmanr

    from igkd.attribution import attribution_map, integrated_gradients
    from igkd.attribution.fitted import exchange, gram
    from igkd.precompute import relative_l1

    def per_image(ig):
        return 100 * relative_l1(attribution_map(ig), ref).numpy()

    cand, K, b = gram(model, x, y, torch.zeros_like(x), reference_steps)
    for n in passes:
        idx, w, _ = exchange(K, b, float(x.shape[0]), n)
        e = per_image(integrated_gradients(model, x, y, schedule=(cand[idx].tolist(), w.tolist()))).mean()
        print(f"{name}: bound: fitted x {n} on the scored images themselves {e:.2f}% "
              f"(the paper's x 50: {paper:.2f}%)", flush=True)
    counts = [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 64, 80, 96]
    gap_steps = 24  # the count at which the completeness gap is compared with the map error
    errors, gaps = np.zeros((x.shape[0], len(counts))), None
    for j, n in enumerate(counts):
        ig, delta = integrated_gradients(model, x, y, n_steps=n, method="riemann_middle", return_delta=True)
        errors[:, j] = per_image(ig)
        if n == gap_steps:
            gaps = delta.abs().numpy()
    print(f"{name}: midpoint per image at {counts} passes: mean " +
          ", ".join(f"{e:.2f}%" for e in errors.mean(0)), flush=True)
    uniform = next((c for c, e in zip(counts, errors.mean(0)) if e <= paper), None)
    print(f"{name}: one midpoint count for every image reaching the paper's {paper:.2f}%: "
          f"{uniform if uniform else f'more than {counts[-1]}'} passes", flush=True)
    got = allocate(errors, counts, paper)
    if got is None:
        print(f"{name}: bound: per-image oracle: even {counts[-1]} passes miss {paper:.2f}%", flush=True)
    else:
        mean, chosen = got
        spread = ", ".join(f"{c}: {int((chosen == c).sum())}" for c in counts if (chosen == c).any())
        print(f"{name}: bound: per-image oracle reaches the paper's {paper:.2f}% with {mean:.1f} passes per image "
              f"on average (images per count: {spread})", flush=True)
    rho = float(spearmanr(gaps, errors[:, counts.index(gap_steps)]).statistic)
    print(f"{name}: completeness gap vs map error, midpoint x {gap_steps}, per image: Spearman {rho:+.2f}",
          flush=True)
    for n in passes:
        e = per_image(completeness_corrected(model, x, y, n - 1)).mean()
        print(f"{name}: completeness-corrected trapezoid x {n} passes {e:.2f}%", flush=True)


if __name__ == "__main__":
    sys.exit(main())
