"""Streaming the training data: each batch gathered by sample index on a background thread.

The trainer's fast path keeps the whole training split, its IG maps and teacher logits on
the training device (the CIFAR design: 150 MB). Data larger than memory cannot; for it
the trainer *streams*: the images stay where the dataset has them (an in-memory tensor or
the memory-mapped decoded-image cache, :mod:`igkd.data.image_cache`), the maps and logits
stay in the store's memory-mapped ``.npy`` files, and a :class:`Prefetcher` thread gathers
the rows of each step's sample indices from all of them together, a few steps ahead:

* the gather is ``numpy.take`` into a fresh buffer, which releases the GIL and runs on one
  core, so it overlaps the training step without competing for torch's thread pool;
* on a GPU the buffer is pinned memory and the main thread copies it to the device on a
  side stream one step ahead (non-blocking), so the copy overlaps the previous step;
* under torchrun each rank gathers only its own slice of each global batch.

Nothing random happens in the loader: the trainer draws the permutation and every
augmentation from the same generator in the same order on both paths, so streaming and
in-memory training see identical batches (indices, pixels, maps, logits) for a seed.

A part that looks up maps or logits by other rows than the batch's own (the shuffled-map
control) reads them through :class:`Rows`, which gathers those few rows synchronously.

Which path runs (:func:`choose`): ``--stream on|off`` forces it; ``auto`` streams when
the training images are memory-mapped (an image folder larger than the memory budget,
:func:`igkd.data.base.memory_budget`, or one with ``mmap=1``, or a memory-mapped array
given to :func:`igkd.data.from_tensors`), when the maps and logits would not fit the budget
beside the images in memory, or, on a GPU, when images and maps would take more than half
of its free memory.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import numpy as np
import torch

DEPTH = 3  # batches gathered ahead: enough to hide a slow read behind a step, little memory


def as_numpy(source) -> np.ndarray:
    """A CPU tensor or numpy array (a memory map stays one) as a numpy array, no copy."""
    if isinstance(source, torch.Tensor):
        if source.device.type != "cpu":
            raise ValueError("streamed sources must be in host memory")
        return source.numpy()
    return np.asarray(source)


def gather(source: np.ndarray, idx: np.ndarray, pin: bool = False) -> torch.Tensor:
    """Rows ``idx`` of ``source`` as a new CPU tensor (pinned with ``pin``); reads only those rows."""
    out = torch.empty((len(idx), *source.shape[1:]), dtype=torch.from_numpy(np.empty(0, source.dtype)).dtype, pin_memory=pin)
    np.take(source, idx, axis=0, out=out.numpy())
    return out


class Rows:
    """Rows of a host array (a memory-mapped store file) by sample index, as device tensors.

    The trainer hands it each step's prefetched rows (:meth:`ready`); a lookup with that
    very index tensor returns them, any other lookup gathers its rows now."""

    def __init__(self, source, device: torch.device):
        self.source, self.device = as_numpy(source), device
        self._ready: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    def ready(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        self._ready = (idx, rows)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        key, rows = self._ready
        if idx is key:
            return rows
        return gather(self.source, idx.cpu().numpy()).to(self.device)


_END = object()


class Prefetcher:
    """Gathers the rows of named host arrays for a sequence of index sets on a thread.

    ``sources``: name -> CPU tensor or numpy array (memory maps welcome), all indexed by
    sample. :meth:`batches` yields, per index set, name -> tensor on ``device``."""

    def __init__(self, sources: dict, device: torch.device, depth: int = DEPTH):
        self.sources = {name: as_numpy(s) for name, s in sources.items()}
        self.device, self.depth = device, depth
        self.cuda = device.type == "cuda"

    def _work(self, steps: Iterable[np.ndarray], out: queue.Queue, stop: threading.Event) -> None:
        def put(message) -> bool:
            """Queue ``message`` unless the consumer stops first. Every message, the end marker
            and an error included, must give up on ``stop``: a consumer that stopped early (a
            NaN loss a few steps before the end) no longer takes from the full queue, and
            :meth:`batches` joins this thread."""
            while not stop.is_set():
                try:
                    out.put(message, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for idx in steps:
                if not put({name: gather(src, idx, pin=self.cuda) for name, src in self.sources.items()}):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer, with its traceback
            put(e)

    def batches(self, steps: Iterable[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        worker = threading.Thread(target=self._work, args=(steps, q, stop), daemon=True, name="igkd-prefetch")
        worker.start()
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        try:
            pending = self._to_device(self._take(q), stream)
            while pending is not None:
                nxt = self._take(q)
                if stream is not None:  # this step's copy must be done before it is used
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    for t in pending.values():
                        t.record_stream(torch.cuda.current_stream(self.device))
                upcoming = self._to_device(nxt, stream)  # queued now: overlaps the step below
                yield pending
                pending = upcoming
        finally:
            stop.set()
            worker.join()

    @staticmethod
    def _take(q: queue.Queue):
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        return None if item is _END else item

    def _to_device(self, item, stream):
        if item is None:
            return None
        if stream is None:
            return {k: v.to(self.device) for k, v in item.items()}
        with torch.cuda.stream(stream):
            return {k: v.to(self.device, non_blocking=True) for k, v in item.items()}


def choose(mode: str, images: torch.Tensor, mapped: bool, extra_bytes: int, device: torch.device) -> tuple[bool, str]:
    """Whether to stream, and why (for the training log line); see the module docstring."""
    from ..data.base import memory_budget
    from ..data.image_cache import human_bytes
    if mode in ("on", "off"):
        return mode == "on", f"--stream {mode}"
    if mapped:
        # mapped where an image folder's cache exceeds the budget, but also as given (mmap=1, a
        # np.load(mmap_mode="r") array through from_tensors), which may be far smaller
        size, budget = images.numel() * images.element_size(), memory_budget()
        if size > budget:
            return True, (f"the training images are memory-mapped ({human_bytes(size)}, more than the memory "
                          f"budget of {human_bytes(budget)})")
        return True, (f"the data gives the training images memory-mapped ({human_bytes(size)}, within the memory "
                      f"budget of {human_bytes(budget)}; read from their file, not copied)")
    if device.type == "cuda":
        need, free = images.numel() + extra_bytes, torch.cuda.mem_get_info(device)[0]
        if need > free // 2:
            return True, f"images and maps ({human_bytes(need)}) exceed half the GPU's free memory"
        return False, ""
    budget = memory_budget()  # what is left with the images already in memory, halved
    if extra_bytes > budget:
        return True, f"the maps and logits ({human_bytes(extra_bytes)}) exceed the memory budget ({human_bytes(budget)})"
    return False, ""


__all__ = ["DEPTH", "Prefetcher", "Rows", "as_numpy", "choose", "gather"]
