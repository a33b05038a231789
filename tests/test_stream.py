"""The streaming data path: identical batches to the in-memory path, gathered by sample
index from memory maps on a background thread (issue 12)."""

import numpy as np
import pytest
import torch

from igkd.data import Dataset, RowView, Split
from igkd.distill.stream import Prefetcher, Rows, choose
from igkd.distill.trainer import Trainer
from igkd.models import build_model
from igkd.precompute import precompute

from test_trainer import config, dataset, teacher


def mapped_copy(data: Dataset, path) -> Dataset:
    """``data`` with its training images in a memory-mapped file (as the image cache gives them)."""
    src = data.train.images.numpy()
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=src.shape)
    mm[:] = src
    mm.flush()
    images = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c", shape=src.shape))
    split = Split(images, data.train.labels, mapped=path)
    return Dataset(data.spec, data.classes, data.channels, data.image_size, split, data.test)


def pair(tmp_path, method, device="cpu", dist=None, **kw):
    """Two trainers of the same run, one per data path; the streaming one reads mapped images."""
    data = dataset(n=80)
    cfg = config(method=method, subset=0.9, check_images=0, **kw)
    t = teacher()
    store = precompute(t, data, cfg, tmp_path / "store", quiet=True)
    runs = []
    for stream, d in (("off", data), ("on", mapped_copy(data, tmp_path / "images.u8"))):
        torch.manual_seed(cfg.seed)
        student = build_model(cfg.model, 4, 3)
        c = config(method=method, subset=0.9, check_images=0, stream=stream, **kw)
        runs.append(Trainer(c, student, d, tmp_path / f"run-{stream}", torch.device(device), teacher=t, store=store,
                            quiet=True, dist=dist))
    assert not runs[0].streaming and runs[1].streaming
    return runs


def batches(tr: Trainer, epoch: int) -> list[dict]:
    out = []
    for b in tr.batches(epoch):
        logits = tr.teacher_outputs(b)
        out.append({"idx": b.idx.clone(), "x": b.x.clone(), "y": b.y.clone(),
                    "maps": None if b.maps is None else b.maps.clone(),
                    "logits": None if logits is None else logits.clone()})
    return out


def assert_same_batches(memory: Trainer, streamed: Trainer) -> None:
    for epoch in (1, 2):
        a, b = batches(memory, epoch), batches(streamed, epoch)
        assert len(a) == len(b) == memory.steps_per_epoch
        for x, y in zip(a, b):
            for key in x:
                if x[key] is None:
                    assert y[key] is None, key
                else:
                    assert torch.equal(x[key], y[key]), (epoch, key)
    # the batches use the overlay, the maps and the logits at all (not a vacuous comparison)
    assert any(v is not None for v in (a[0]["maps"], a[0]["logits"]))


@pytest.mark.parametrize("method,kw", [("kd+ig", {"p": 0.5}), ("kd+ig-shuffled", {"p": 0.5}),
                                       ("kd+ig", {"p": 0.5, "map_size": 6}), ("explain", {})])
def test_streaming_gives_the_in_memory_batches(tmp_path, method, kw):
    assert_same_batches(*pair(tmp_path, method, **kw))


def test_each_rank_streams_only_its_slice_of_the_global_batch(tmp_path):
    """Under torchrun (here: the rank and world a launcher would give, no process group)
    rank r gathers its own slice of each global batch, as on the device-resident path."""
    from igkd.distill.parallel import Dist
    steps = {}
    for rank in (0, 1):
        memory, streamed = pair(tmp_path / str(rank), "kd+ig", dist=Dist(rank=rank, world=2), p=0.5)
        assert_same_batches(memory, streamed)
        steps[rank] = [b.idx for b in streamed.batches(1)]
    for a, b in zip(steps[0], steps[1]):  # disjoint halves of one global batch
        assert len(a) == len(b) and not set(a.tolist()) & set(b.tolist())


def test_streaming_trains_the_same_weights(tmp_path):
    memory, streamed = pair(tmp_path, "kd+ig", p=0.5, epochs=1)
    for tr in (memory, streamed):
        tr.fit()
    sa, sb = memory.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert memory.best == streamed.best


def test_rows_serve_the_prefetched_batch_and_gather_other_rows():
    src = np.arange(40, dtype=np.float32).reshape(10, 4)
    rows = Rows(src, torch.device("cpu"))
    idx = torch.tensor([3, 1])
    marker = torch.full((2, 4), -1.0)
    rows.ready(idx, marker)
    assert rows[idx] is marker  # the very index tensor the loader gathered for
    assert torch.equal(rows[torch.tensor([3, 1])], torch.from_numpy(src[[3, 1]]))  # any other: read now
    assert rows.shape == (10, 4) and len(rows) == 10


def test_row_view_reads_only_the_sliced_rows():
    images = torch.arange(5 * 2).reshape(5, 2)
    view = RowView(images, torch.tensor([4, 0, 2]))
    assert len(view) == 3 and torch.equal(view[1:3], images[[0, 2]])
    narrower = view[torch.tensor([True, False, True])]  # a mask or indices: a view of those rows
    assert len(narrower) == 2 and torch.equal(narrower[0:2], images[[4, 2]])


def test_prefetcher_yields_in_order_and_stops_early():
    src = np.arange(100, dtype=np.int64)[:, None].repeat(3, 1)
    pf = Prefetcher({"a": src, "b": torch.from_numpy(src[:, 0].copy())}, torch.device("cpu"), depth=2)
    steps = [np.array([i, i + 1]) for i in range(0, 50, 2)]
    got = list(pf.batches(steps))
    assert [int(g["b"][0]) for g in got] == list(range(0, 50, 2)) and torch.equal(got[3]["a"], torch.from_numpy(src[6:8]))
    it = pf.batches(iter(steps))
    next(it)
    it.close()  # the worker thread is told to stop and joined, not left blocked on a full queue


def test_prefetcher_raises_the_workers_error():
    pf = Prefetcher({"a": np.zeros((4, 2))}, torch.device("cpu"))
    with pytest.raises(IndexError):
        list(pf.batches([np.array([0]), np.array([9])]))


def test_auto_streams_mapped_or_oversized_data(monkeypatch):
    images, cpu = torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.device("cpu")
    assert choose("on", images, False, 0, cpu)[0] and not choose("off", images, True, 0, cpu)[0]
    assert choose("auto", images, True, 0, cpu)[0]
    monkeypatch.setenv("IGKD_DATA_MEMORY", "1K")
    assert not choose("auto", images, False, 1000, cpu)[0]
    on, why = choose("auto", images, False, 5000, cpu)
    assert on and "memory budget" in why
