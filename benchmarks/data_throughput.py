"""Data throughput at 224 pixels: igkd's streaming loader against a DataLoader, and the step it feeds.

Three figures, same run, same machine, threads and batch (``kd+ig``, random resized crop
and flip, IG maps at ``--map-size`` upsampled on the device):

(a) igkd's streaming loader: ``Trainer.batches`` with ``--stream on`` over the
    memory-mapped decoded-image cache (``imagefolder:DIR,mmap=1``) and memory-mapped
    maps and logits, each batch gathered by sample index on the prefetch thread, then
    overlay, random resized crop and flip as batched tensor ops: ready-to-train batches/s;
(b) the reference way: a ``torch.utils.data.DataLoader`` (``--workers`` processes) over a
    ``Dataset`` that opens and decodes each JPEG with PIL, overlays its map (upsampled with
    PIL) with probability p, draws a random resized crop (torchvision's box sampling),
    resizes it and flips it with PIL, and makes a float tensor: what torchvision-style
    training code does per sample;
(c) the step the loader feeds: ``Trainer.train_step`` of the ImageNet ResNet-18
    (``resnet18``, KD on precomputed logits) on batches made beforehand.

The loader must deliver at least twice what the step consumes (so it is never the
bottleneck) and more than the reference. It is timed alone, as is the step: on a real
run both share the cores, which the 2x margin is for.

Data: ``--images`` 224-pixel JPEGs written once to ``--dir`` from the JPEG CIFAR-10
(upscaled, when ``/tmp/igkd-test-data/cifar10-jpg`` or the shared archive is present) or
else smooth random images; maps and logits are random (throughput does not depend on
their values) and live in ``.npy`` files read through memory maps, as a store's. The page
cache is warm after the first round: these are in-RAM figures for data on disk; cold
reads add the disk's time to both ways alike. Each variant runs ``--warmup`` batches,
then ``--steps`` timed ones; the variants take turns for ``--rounds`` rounds and the
median is reported. Check that nothing else loads the CPU (``uptime``) first.

    python benchmarks/data_throughput.py [--images 2000] [--batch 64] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SIZE = 224
CIFAR_DIR = Path("/tmp/igkd-test-data/cifar10-jpg")


def write_images(root: Path, n: int, classes: int = 10) -> str:
    """``n`` 224-pixel JPEGs under ``root/train/<class>/`` (plus a small test split); once."""
    from PIL import Image
    done = root / ".complete"
    source = sorted((CIFAR_DIR / "train").glob("*/*.jpg"))[::max(1, 50000 // n)] if (CIFAR_DIR / "train").is_dir() else []
    what = "JPEG CIFAR-10 images upscaled to 224" if len(source) >= n else "smooth random images"
    if done.exists() and done.read_text() == f"{n} {what}":
        return what
    for split in ("train", "test"):  # a folder written for another --images held more than asked for
        shutil.rmtree(root / split, ignore_errors=True)
    done.unlink(missing_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 10 * classes)):
        for i in range(count):
            c = i % classes
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            if split == "train" and len(source) >= n:
                im = Image.open(source[i]).convert("RGB")
            else:
                im = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
            im.resize((SIZE, SIZE), Image.BICUBIC).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{n} {what}")
    return what


def rrc_box(w: int, h: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: (left, top, width, height)."""
    area = w * h
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return random.randint(0, w - cw), random.randint(0, h - ch), cw, ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side, side


class ReferenceDataset(torch.utils.data.Dataset):
    """Per-sample PIL decoding and transforms, as torchvision-style training code does."""

    def __init__(self, files: list[Path], labels: list[int], maps: Path, logits: Path, p: float):
        self.files, self.labels, self.maps_path, self.logits_path, self.p = files, labels, maps, logits, p
        self.maps = self.logits = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        if self.maps is None:  # opened in the worker
            self.maps = np.load(self.maps_path, mmap_mode="r")
            self.logits = np.load(self.logits_path, mmap_mode="r")
        im = Image.open(self.files[i]).convert("RGB")
        if random.random() < self.p:  # the overlay: the map upsampled, min-max scaled, blended halfway
            m = np.asarray(Image.fromarray(np.asarray(self.maps[i], dtype=np.float32)).resize(im.size, Image.BILINEAR))
            m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
            im = Image.fromarray((0.5 * np.asarray(im, dtype=np.float32) + 0.5 * 255 * m[..., None]).astype(np.uint8))
        left, top, cw, ch = rrc_box(*im.size)
        im = im.resize((SIZE, SIZE), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if random.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return x, self.labels[i], torch.from_numpy(np.array(self.logits[i]))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(take, warmup: int, steps: int, batch: int, device) -> float:
    for _ in range(warmup):
        take()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        take()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000, help="224-pixel training images (default 2000)")
    ap.add_argument("--dir", default="/tmp/igkd-bench-224", help="where the JPEGs are written once "
                    "(default /tmp/igkd-bench-224)")
    ap.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes of the reference "
                    "(default: one per core)")
    ap.add_argument("--steps", type=int, default=20, help="timed batches per variant and round (default 20)")
    ap.add_argument("--step-steps", type=int, default=3, help="timed training steps per round (default 3: "
                    "a ResNet-18 step at 224 takes seconds on a CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches before each timing (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants, median reported (default 3)")
    ap.add_argument("--map-size", type=int, default=56, help="stored map side, upsampled on the device (default 56)")
    ap.add_argument("--p", type=float, default=0.1, help="overlay probability (default 0.1, the paper's)")
    args = ap.parse_args(argv)

    from igkd.config import DistillConfig, build
    from igkd.data import load_dataset
    from igkd.distill.trainer import Trainer
    from igkd.models import build_model
    from igkd.runtime import tune_malloc

    tune_malloc()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or cores)
    device = torch.device(args.device)
    root = Path(args.dir)
    what = write_images(root, args.images)
    data = load_dataset(f"imagefolder:{root},mmap=1")  # the memory-mapped decoded-image cache
    train = data.train
    n, classes = len(train), len(data.classes)
    g = torch.Generator().manual_seed(0)
    maps_path, logits_path = root / "maps.npy", root / "logits.npy"
    np.save(maps_path, torch.rand(n, args.map_size, args.map_size, generator=g).half().numpy())
    np.save(logits_path, torch.randn(n, classes, generator=g).numpy())
    store = type("MappedStore", (), {"maps": np.load(maps_path, mmap_mode="r"),
                                     "logits": np.load(logits_path, mmap_mode="r")})()

    cfg = build(DistillConfig, dict(model="resnet18", normalize="none", method="kd+ig", batch_size=args.batch,
                                    optimizer="sgd", lr=0.05, warmup_epochs=0, p=args.p, device=args.device,
                                    augment="random-resized-crop", stream="on", val_fraction=0.0, T=4.0, alpha=0.9))
    torch.manual_seed(0)
    trainer = Trainer(cfg, build_model("resnet18", classes, 3), data, "/nonexistent", device, store=store,
                      quiet=True)
    assert trainer.streaming
    trainer.train_model.train()
    epochs = itertools.count(1)
    batches = itertools.chain.from_iterable(trainer.batches(next(epochs)) for _ in itertools.count())
    premade = [next(batches) for _ in range(args.step_steps + 1)]
    step_batches = itertools.cycle(premade)

    files = sorted((root / "train").glob("*/*.jpg"))
    classes_of = {c: i for i, c in enumerate(sorted({f.parent.name for f in files}))}
    ref = ReferenceDataset(files, [classes_of[f.parent.name] for f in files], maps_path, logits_path, args.p)
    workers = args.workers or cores
    loader = torch.utils.data.DataLoader(ref, batch_size=args.batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True, pin_memory=device.type == "cuda",
                                         prefetch_factor=4)
    ref_batches = itertools.chain.from_iterable(loader for _ in itertools.count())

    def ref_take():
        x, y, t = next(ref_batches)
        return x.to(device, non_blocking=True), y.to(device), t.to(device)

    variants = {
        "(a) igkd streaming loader (memory-mapped cache, gather thread, batched augmentation)":
            (lambda: next(batches), args.steps),
        f"(b) reference: DataLoader, {workers} workers, PIL decode + per-sample transforms":
            (ref_take, args.steps),
        "(c) the step it feeds: ResNet-18 kd+ig train_step": (lambda: trainer.train_step(next(step_batches)),
                                                              args.step_steps),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (take, steps) in variants.items():
            rates[name].append(timed(take, args.warmup if steps > 3 else 1, steps, args.batch, device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    loader_rate, ref_rate, step_rate = med.values()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{n} training images ({what}) at {SIZE}x{SIZE}, {train.nbytes / 2**30:.2f} GiB decoded, memory-mapped; "
          f"batch {args.batch}, {dev}, median of {args.rounds} rounds")
    for name, v in med.items():
        print(f"  {v:9.1f} img/s  {name}")
    print(f"loader / step: {loader_rate / step_rate:.1f}x (must be >= 2); loader / reference: "
          f"{loader_rate / ref_rate:.1f}x (must be > 1)")
    ok = loader_rate >= 2 * step_rate and loader_rate > ref_rate
    print("OK" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
