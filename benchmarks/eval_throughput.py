"""Inference throughput of ``igkd evaluate``'s networks, BatchNorm folded or not.

    python benchmarks/eval_throughput.py [--threads 2] [--images 2560] [--batch 128] [--repeats 3]
                                         [--models "SPEC;..."] [--size 32]

``igkd evaluate`` (and the corruption scores, and ``--teacher-correct``'s teacher) loads a
network to infer only, so it folds each BatchNorm into the convolution before it
(:func:`igkd.models.inference_copy`). This prints, per network, images/s of
``igkd.evaluate.metrics.predict`` on the unfolded network (the reference) and on the
folded one, measured alternately in the same run (best of ``--repeats``), their ratio,
and the largest logit difference. Weights and BatchNorm statistics are random (speed does
not depend on them). Run it on an otherwise idle machine (check ``uptime``).
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=2560)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--models", default="mobilenetv2:drop=5;mobilenetv2;resnet:depth=20;wrn:depth=16,k=2;resnet18",
                    help="model specs separated by ;")
    a = ap.parse_args()

    from igkd.evaluate.metrics import predict
    from igkd.models import build_model, inference_copy
    from igkd.runtime import tune_malloc
    from igkd.spec import split_specs
    tune_malloc()  # as the igkd command does
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (a.images, 3, a.size, a.size), dtype=torch.uint8)
    print(f"{a.images} images of {a.size}x{a.size}, batch {a.batch}, {a.threads} threads, torch {torch.__version__}")
    print(f"{'network':<24} {'BN folded':>9} {'unfolded img/s':>15} {'folded img/s':>13} {'ratio':>6} {'max |diff|':>11}")
    for spec in split_specs(a.models, "--models"):
        net = build_model(spec, 10, 3)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        net.eval()
        folded = inference_copy(net, images[:4].float() / 255)
        n = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) - \
            sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        diff = (predict(net, images[:a.batch], a.batch) - predict(folded, images[:a.batch], a.batch)).abs().max()
        best = {"unfolded": 0.0, "folded": 0.0}
        for _ in range(a.repeats):
            for name, model in (("unfolded", net), ("folded", folded)):
                start = time.perf_counter()
                predict(model, images, a.batch)
                best[name] = max(best[name], a.images / (time.perf_counter() - start))
        print(f"{spec:<24} {n:>9} {best['unfolded']:>15.0f} {best['folded']:>13.0f} "
              f"{best['folded'] / best['unfolded']:>5.2f}x {diff.item():>11.2e}")


if __name__ == "__main__":
    main()
