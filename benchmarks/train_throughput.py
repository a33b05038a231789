"""Training throughput: igkd's batched pipeline against a reference-style one, same run.

Ways to train the paper's 4.12x student (``mobilenetv2:drop=5``) with KD + IG overlay on
the same machine, batch, threads and data:

(a) reference style, as the paper's code does it: a ``torch.utils.data.Dataset`` whose
    ``__getitem__`` overlays the sample's IG map, pads and crops (F.pad + slicing) and
    flips in Python, fed by a DataLoader (num_workers 2, as the paper's code, and 0);
    eager NCHW model with torch's own ``nn.ReLU6(inplace=True)`` (as torchvision's
    MobileNetV2, which the paper's code uses), torch's default Adam. Timed twice:
    in this process, with igkd's glibc malloc tuning (``igkd.runtime.tune_malloc``, what
    the ``igkd`` command applies), and as the paper's code runs, with glibc's default
    malloc settings, in a child process (mallopt is process-wide);
(b) igkd: ``Trainer.batches`` (uint8 split on the device, a seeded permutation, the
    overlay and crop/flip as batched tensor ops) and ``Trainer.train_step`` (KD on
    precomputed logits, channels_last, igkd's copy-free in-place ReLU6, fused Adam);
(c) the compute limit: ``Trainer.train_step`` on batches made beforehand;
(d) the compute limit with torch's ``nn.ReLU6`` instead of igkd's (what that change buys);
(e) with ``--cudnn-benchmark`` on CUDA: (c) with cuDNN's autotuner off and on
    (``torch.backends.cudnn.benchmark``, on while igkd trains on CUDA), each in a child
    process: cuDNN keeps the algorithm it first chose for a convolution for the rest of
    the process, whatever the setting, so the two cannot share one. The variants (a)-(d)
    run with torch's default, autotuner off.

Data: the JPEG CIFAR-10 (``shared/data/cifar10-jpg.tar.gz``, unpacked once into
/tmp/igkd-test-data/cifar10-jpg) when present, else random 32x32 images; IG maps and
teacher logits are random (throughput does not depend on their values). Each variant
runs ``--warmup`` steps, then ``--steps`` timed steps; the variants take turns for
``--rounds`` rounds and the median images/s is reported (the child process times its
variants the same way, before the others). Check that nothing else loads the CPU
(``uptime``) before trusting the numbers.

    python benchmarks/train_throughput.py [--steps 30] [--batch 128] [--threads N] [--device cpu] [--cudnn-benchmark]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CIFAR_DIR = Path("/tmp/igkd-test-data/cifar10-jpg")
ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"
MODEL = "mobilenetv2:drop=5"
T, ALPHA = 2.5, 0.01


def load_data(seed: int = 0):
    """(Dataset, description): the JPEG CIFAR-10 if available, else random images."""
    from igkd.data import Dataset, Split, load_dataset
    if not (CIFAR_DIR / "train").is_dir() and ARCHIVE.is_file():
        CIFAR_DIR.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(ARCHIVE) as tar:
            tar.extractall(CIFAR_DIR.parent / ".bench-unpack",
                           **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        (CIFAR_DIR.parent / ".bench-unpack").rename(CIFAR_DIR)
    if (CIFAR_DIR / "train").is_dir():
        return load_dataset(f"imagefolder:{CIFAR_DIR}"), "CIFAR-10 JPEG"
    g = torch.Generator().manual_seed(seed)
    split = Split(torch.randint(0, 256, (20000, 3, 32, 32), generator=g, dtype=torch.uint8),
                  torch.randint(0, 10, (20000,), generator=g))
    return Dataset("random", [str(i) for i in range(10)], 3, (32, 32), split, split), "random 32x32"


class ReferenceDataset(torch.utils.data.Dataset):
    """Per-sample Python transforms, the way the paper's training script feeds its student."""

    def __init__(self, images, labels, maps, logits, p: float, padding: int = 4):
        self.images, self.labels, self.maps, self.logits = images, labels, maps, logits
        self.p, self.padding = p, padding

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255
        if random.random() < self.p:  # IG overlay with this sample's map
            m = self.maps[i].float().pow(math.exp(random.uniform(0, math.log(2))))
            m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
            x = 0.5 * x + 0.5 * m.expand_as(x)
        pad, (_, h, w) = self.padding, x.shape
        x = F.pad(x, (pad, pad, pad, pad))
        dy, dx = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        x = x[:, dy:dy + h, dx:dx + w]
        if random.random() < 0.5:
            x = x.flip(2)
        return x, self.labels[i], self.logits[i]


def forever(make):
    while True:
        yield from make()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_step, batches, warmup: int, steps: int, batch: int, device) -> float:
    for _ in range(warmup):
        run_step(next(batches))
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step(next(batches))
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per variant and round (default 30)")
    ap.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants, median reported (default 3)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing (default 5)")
    ap.add_argument("--p", type=float, default=0.1, help="overlay probability (default 0.1, the paper's)")
    ap.add_argument("--amp", choices=("off", "bf16"), default="off",
                    help="precision of every variant, the reference included (default off: float32; bf16: "
                         "autocast on CUDA). igkd's own --amp auto would be bf16 on a GPU: against a float32 "
                         "reference that measures the precision, not the code")
    ap.add_argument("--workers", default="2,0", help="DataLoader workers of the reference runs (default 2,0)")
    ap.add_argument("--no-child", action="store_true",
                    help="skip timing the reference with glibc's default malloc settings (child process)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="on CUDA, also time (c) with cuDNN's autotuner off and on, each in a child process, and "
                    "print the ratio (skipped with a note on the CPU)")
    ap.add_argument("--cudnn-child", choices=("on", "off"), help=argparse.SUPPRESS)  # one side of that A/B
    ap.add_argument("--reference-only", action="store_true",
                    help="time only the reference variants, glibc malloc as is, and print their images/s as JSON "
                    "(the child process the benchmark starts)")
    args = ap.parse_args(argv)

    from igkd.config import DistillConfig, build
    from igkd.distill import Trainer
    from igkd.distill.losses import kd_loss
    from igkd.models import build_model, count_parameters
    from igkd.models.mobilenetv2 import torch_relu6
    from igkd.runtime import tune_malloc

    from igkd.distill.speed import amp_dtype, autocast
    from igkd.errors import UserError
    try:
        precision = amp_dtype(args.amp, torch.device(args.device))  # bf16 is refused off CUDA, as distill does
    except UserError as e:
        ap.error(str(e))
    untuned: dict[str, float] = {}
    cudnn: dict[str, float] = {}
    if args.cudnn_child:
        args.reference_only = False
        torch.backends.cudnn.benchmark = args.cudnn_child == "on"
    elif args.cudnn_benchmark and torch.device(args.device).type == "cuda":
        own = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--cudnn-benchmark"]
        for side in ("off", "on"):
            child = subprocess.run([sys.executable, __file__, "--cudnn-child", side, *own],
                                   capture_output=True, text=True, check=True)
            cudnn[side] = json.loads(child.stdout.strip().splitlines()[-1])["(c) compute limit, pre-made batches"]
    if not args.reference_only and not args.no_child and not args.cudnn_child and args.device == "cpu":
        # the reference as the paper's code runs: glibc's default malloc (mallopt is process-wide)
        own = argv if argv is not None else sys.argv[1:]
        child = subprocess.run([sys.executable, __file__, "--reference-only", *own],
                               capture_output=True, text=True, check=True)
        untuned = json.loads(child.stdout.strip().splitlines()[-1])
    tuned = False if args.reference_only else tune_malloc()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    data, what = load_data()
    n = len(data.train)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(n, *data.image_size, generator=g).half()
    logits = torch.randn(n, len(data.classes), generator=g)
    store = type("RandomStore", (), {"maps": maps.numpy(), "logits": logits.numpy()})()

    cfg = build(DistillConfig, dict(model=MODEL, normalize="none", method="kd+ig", batch_size=args.batch,
                                    optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant",
                                    warmup_epochs=0, T=T, alpha=ALPHA, p=args.p, device=args.device,
                                    amp=args.amp))

    def make_trainer(stock_relu6: bool = False):
        torch.manual_seed(0)
        net = build_model(MODEL, len(data.classes), data.channels)
        return Trainer(cfg, torch_relu6(net) if stock_relu6 else net, data, "/nonexistent", device, store=store,
                       quiet=True)

    trainer = make_trainer()
    trainer.train_model.train()
    epochs = itertools.count(1)
    igkd_batches = forever(lambda: trainer.batches(next(epochs)))
    premade = [next(igkd_batches) for _ in range(args.steps + args.warmup)]

    torch.manual_seed(0)
    ref_model = torch_relu6(build_model(MODEL, len(data.classes), data.channels)).to(device).train()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    ref_data = ReferenceDataset(data.train.images[trainer.train_idx.cpu()], data.train.labels[trainer.train_idx.cpu()],
                                maps[trainer.train_idx.cpu()], logits[trainer.train_idx.cpu()], args.p)

    def ref_step(b):
        x, y, t = (v.to(device, non_blocking=True) for v in b)
        with autocast(precision, device):  # as igkd's step: the model under autocast, the loss in float32
            out = ref_model(x)
        loss, _ = kd_loss(out.float(), y, t, T, ALPHA)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    def igkd_step(b):
        trainer.train_step(b)

    variants = {}
    for w in ([] if args.cudnn_child else [int(v) for v in args.workers.split(",") if v != ""]):
        loader = lambda w=w: torch.utils.data.DataLoader(  # noqa: E731
            ref_data, batch_size=args.batch, shuffle=True, num_workers=w, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=w > 0)
        variants[f"(a) reference, DataLoader workers={w}"] = (ref_step, forever(loader))
    if args.cudnn_child:
        variants["(c) compute limit, pre-made batches"] = (igkd_step, itertools.cycle(premade))
    elif not args.reference_only:
        stock = make_trainer(stock_relu6=True)
        stock.train_model.train()
        variants["(b) igkd Trainer.batches + train_step"] = (igkd_step, igkd_batches)
        variants["(c) compute limit, pre-made batches"] = (igkd_step, itertools.cycle(premade))
        variants["(d) (c) with torch's nn.ReLU6"] = (lambda b: stock.train_step(b), itertools.cycle(premade))

    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (step, batches) in variants.items():
            rates[name].append(timed(step, batches, args.warmup, args.steps, args.batch, device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    if args.reference_only or args.cudnn_child:
        print(json.dumps(med))
        return med

    params = count_parameters(trainer.model)
    print(f"training throughput: {MODEL} ({params:,} params), batch {args.batch}, {threads} threads, {device}, "
          f"{'float32' if precision is None else 'bf16 autocast'} in every variant, "
          f"{what} ({n:,} images), KD+IG (T {T}, alpha {ALPHA}, p {args.p}), Adam; {args.steps} timed steps after "
          f"{args.warmup} warm-up, {args.rounds} rounds, median; glibc malloc tuning {'on' if tuned else 'off'} "
          f"except where marked")
    for k, v in med.items():
        print(f"  {k:<44} {v:8.1f} img/s   (rounds: {', '.join(f'{r:.1f}' for r in rates[k])})")
    for k, v in untuned.items():
        print(f"  {k + ', glibc malloc defaults':<44} {v:8.1f} img/s   (child process: the paper's code as it runs)")
    b, c, d = (med[k] for k in ("(b) igkd Trainer.batches + train_step", "(c) compute limit, pre-made batches",
                                "(d) (c) with torch's nn.ReLU6"))
    for k, v in med.items():
        if k.startswith("(a)"):
            w = k.split(",")[1].strip()
            line = f"  (b)/(a) {w}: {b / v:.2f}x"
            if k in untuned:
                line += f" (malloc tuning in both); {b / untuned[k]:.2f}x against the reference as it runs"
            print(line)
    print(f"  (b)/(c): {100 * b / c:.1f}% of the compute limit")
    print(f"  (c)/(d): {c / d:.2f}x from igkd's copy-free in-place ReLU6")
    if cudnn:
        for side in ("off", "on"):
            print(f"  {'(e) (c), cuDNN autotuner ' + side:<44} {cudnn[side]:8.1f} img/s   (child process)")
        print(f"  (e) autotuner on/off: {cudnn['on'] / cudnn['off']:.2f}x")
    elif args.cudnn_benchmark:
        print(f"  (e) cuDNN autotuner: not measured on {device.type} (CUDA only)")
    return med


if __name__ == "__main__":
    main()
