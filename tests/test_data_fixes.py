"""Regressions of the data layer: forged numpy pickles, the prefetch thread on an early stop,
stale image caches, tiny held-out splits, singleton classes in a subset, CIFAR-10 labels
and LAB images."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igkd.data import load_dataset, subset_indices
from igkd.data.imagefolder import _decode_one
from igkd.data.safe_pickle import _check_data, load_data_pickle
from igkd.distill.stream import Prefetcher
from igkd.errors import UserError

# ---------------------------------------------------------------- safe_pickle: no pointers from file bytes


def _g(module: str, name: str) -> bytes:  # GLOBAL opcode
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(raw: bytes) -> bytes:  # SHORT_BINSTRING: bytes under encoding="bytes", as in Python 2's CIFAR files
    return b"U" + bytes([len(raw)]) + raw


def _dtype(code: str, flags: int = 0) -> bytes:
    """numpy.dtype(code, 0, 1) with the BUILD state numpy writes, flags as given."""
    state = b"(K\x03" + _s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK" + bytes([flags]) + b"tb"
    return _g("numpy", "dtype") + b"(" + _s(code.encode()) + b"K\x00K\x01tR" + state


def _array(dtype: bytes, shape: bytes, raw: bytes) -> bytes:
    """_reconstruct(ndarray, (0,), 'b') with its BUILD state (1, shape, dtype, False, raw), as numpy writes."""
    return (_g("numpy.core.multiarray", "_reconstruct") + _g("numpy", "ndarray") + b"K\x00\x85" + _s(b"b")
            + b"\x87R(K\x01" + shape + dtype + b"\x89" + _s(raw) + b"tb")


def _batch(data: bytes) -> bytes:
    """{b'data': <data>, b'labels': [1, 0]} at protocol 2."""
    return b"\x80\x02}(" + _s(b"data") + data + _s(b"labels") + b"](K\x01K\x00eu."


POINTER = b"\x41" * 8  # an "element" of an object array: an address the file chose
HOSTILE = {  # name: (pickle, what the refusal says)
    # the review's: numpy.ndarray((1,), dtype('O'), buffer) by REDUCE
    "ndarray-call-object": (_batch(_g("numpy", "ndarray") + b"(K\x01\x85" + _g("numpy", "dtype") + b"("
                                   + _s(b"O") + b"K\x00K\x01tR" + _s(POINTER) + b"tR"), "dtype('O')"),
    # numpy.ndarray called at all (any dtype reads the buffer as it likes)
    "ndarray-call": (_batch(_g("numpy", "ndarray") + b"(K\x01\x85" + _dtype("u8") + _s(POINTER) + b"tR"),
                     "calls numpy.ndarray directly"),
    # ... or created by NEWOBJ (ndarray.__new__(ndarray, ...)), which REDUCE checks never see
    "ndarray-newobj": (_batch(_g("numpy", "ndarray") + b"(K\x01\x85" + _dtype("u8") + _s(POINTER) + b"t\x81"),
                       "not a valid"),
    # a plain dtype whose BUILD state sets the has-object flags, in an array nested in a list
    "dtype-build-flags": (_batch(b"]" + _array(_dtype("u8", flags=0x3F), b"K\x01\x85", POINTER) + b"a"),
                          "changes the numpy dtype"),
    # an object array from _reconstruct's own typecode, nested in a list
    "reconstruct-object": (_batch(b"](" + _g("numpy.core.multiarray", "_reconstruct") + _g("numpy", "ndarray")
                                  + b"K\x00\x85" + _s(b"O") + b"\x87Re"), "dtype('O')"),
}

# load each file in a child: before the fix some of these crash the interpreter. igkd.data's
# __init__ imports torch (2 s); safe_pickle needs only numpy, so the child skips that import
_CHILD = """
import os, sys, types, igkd
pkg = types.ModuleType("igkd.data"); pkg.__path__ = [os.path.join(os.path.dirname(igkd.__file__), "data")]
sys.modules["igkd.data"] = pkg
from pathlib import Path
from igkd.data.safe_pickle import load_data_pickle
from igkd.errors import UserError
for name in sys.argv[1:]:
    try:
        load_data_pickle(Path(name), "CIFAR-10 batch", "re-extract it")
        print("loaded", flush=True)
    except UserError as e:
        print("UserError", str(e).replace(chr(10), " "), flush=True)
"""


def test_safe_pickle_refuses_forged_object_arrays_and_dtypes(tmp_path):
    files = []
    for name, (raw, _) in HOSTILE.items():
        files.append(tmp_path / name)
        files[-1].write_bytes(raw)
    r = subprocess.run([sys.executable, "-c", _CHILD, *map(str, files)], capture_output=True, text=True, timeout=120)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and len(lines) == len(HOSTILE), (r.returncode, r.stdout, r.stderr[-500:])
    for (name, (_, why)), line in zip(HOSTILE.items(), lines):
        assert line.startswith(f"UserError {tmp_path / name} is not a") and why in line, (name, line)


def test_safe_pickle_still_reads_python2_cifar_batches(tmp_path):
    """The official files' form (Python 2, protocol 2, numpy.core names, bytes as STRING opcodes)."""
    f = tmp_path / "data_batch_1"
    f.write_bytes(_batch(_array(_dtype("u1"), b"K\x02K\x03\x86", bytes(range(6)))))
    d = load_data_pickle(f, "CIFAR-10 batch", "fix")
    assert d[b"labels"] == [1, 0] and d[b"data"].dtype == np.uint8
    assert d[b"data"].tolist() == [[0, 1, 2], [3, 4, 5]]
    arr = np.arange(12, dtype=np.uint8).reshape(2, 6)  # and what numpy writes today, protocols 2 and 5
    for protocol in (2, 5):
        f.write_bytes(pickle.dumps({b"data": arr, b"labels": [3, 4], b"names": [b"a.png", "b"]}, protocol=protocol))
        d = load_data_pickle(f, "CIFAR-10 batch", "fix")
        assert np.array_equal(d[b"data"], arr) and d[b"labels"] == [3, 4] and d[b"names"] == [b"a.png", "b"]


def test_safe_pickle_walk_refuses_object_arrays_at_any_depth():
    _check_data({b"data": [np.zeros(2, np.uint8), (np.dtype("<i8"), {b"x": [1.5, None]})]})
    with pytest.raises(pickle.UnpicklingError, match="dtype"):
        _check_data({b"data": [(1, {b"deep": np.array([None, 1], dtype=object)})]})
    deep: list = [np.array([None], dtype=object)]
    for _ in range(50_000):  # nesting a file can declare cheaply: no RecursionError
        deep = [deep]
    with pytest.raises(pickle.UnpicklingError):
        _check_data(deep)


# ---------------------------------------------------------------- stream: an early stop never hangs


@pytest.mark.parametrize("end", ["finished", "error"])
def test_prefetcher_stops_while_the_worker_waits_to_send_its_last_message(end):
    """The consumer takes one batch and stops (a NaN loss near the end of an epoch) while the
    worker waits on a full queue to send its end marker or its error: closing returns."""
    exhausted = threading.Event()

    def steps():
        yield from (np.array([i]) for i in range(3))
        exhausted.set()  # the worker has queued every batch and goes on to its last message
        if end == "error":
            raise RuntimeError("the step list failed")

    it = Prefetcher({"a": np.arange(6).reshape(3, 2)}, torch.device("cpu"), depth=1).batches(steps())
    assert next(it)["a"].tolist() == [[0, 1]]
    assert exhausted.wait(30)
    closer = threading.Thread(target=it.close, daemon=True)  # stops and joins the worker
    closer.start()
    closer.join(30)
    assert not closer.is_alive()


# ---------------------------------------------------------------- imagefolder


def _bmp(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)  # BMP: the size never depends on pixels


def _two_class_folder(tmp_path, monkeypatch) -> Path:
    """train/ and test/ with classes a and b of one 4x4 BMP of value 10 each; a private cache."""
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for c in ("a", "b"):
            _bmp(root / split / c / "0.bmp", 10)
    return root


def test_imagefolder_cache_sees_a_file_replaced_with_size_and_mtime_kept(tmp_path, monkeypatch, caplog):
    root = _two_class_folder(tmp_path, monkeypatch)
    first = load_dataset(f"imagefolder:{root}")
    assert first.train.images[0, 0, 0, 0].item() == 10
    caches = sorted((tmp_path / "cache").rglob("images.bin"))
    built = [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in caches]
    # unchanged folder: the cache is used as it is, not rebuilt
    with caplog.at_level(logging.WARNING):
        again = load_dataset(f"imagefolder:{root}")
        assert torch.equal(again.train.images, first.train.images) and again.fingerprint() == first.fingerprint()
    assert [(p, p.stat().st_ino, p.stat().st_mtime_ns) for p in caches] == built
    assert "rebuilding" not in caplog.text
    # replaced as rsync -t does (a new file renamed over it), size and mtime kept
    f = root / "train" / "a" / "0.bmp"
    st = f.stat()
    _bmp(tmp_path / "new.bmp", 200)
    os.utime(tmp_path / "new.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(tmp_path / "new.bmp", f)
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = load_dataset(f"imagefolder:{root}")
    assert after.train.images[0, 0, 0, 0].item() == 200 and after.fingerprint() != first.fingerprint()
    assert after.fingerprint() == load_dataset(f"imagefolder:{root},cache=0").fingerprint()


def test_imagefolder_held_out_split_refuses_empty_sides(tmp_path):
    singles = tmp_path / "singles"  # two classes of one image each
    for c in ("a", "b"):
        _bmp(singles / c / "0.bmp", 1)
    with pytest.raises(UserError, match=r"test=0.2 holds out no image of .*singles: each of its 2 classes has a "
                                        r"single image; add images"):
        load_dataset(f"imagefolder:{singles},test=0.2")
    with pytest.raises(UserError, match=r"test=0.6 leaves classes a, b of .* with no training image .* use test=0.5"):
        load_dataset(f"imagefolder:{singles},test=0.6")
    mixed = tmp_path / "mixed"  # class b of one image, held out whole: train would lack it
    for i in range(3):
        _bmp(mixed / "a" / f"{i}.bmp", 1)
    _bmp(mixed / "b" / "0.bmp", 1)
    with pytest.raises(UserError, match=r"test=0.6 leaves class b of .* add images to that class folder"):
        load_dataset(f"imagefolder:{mixed},test=0.6")
    ds = load_dataset(f"imagefolder:{mixed},test=0.5")
    assert ds.train.labels.tolist() == [0, 1] and ds.test.labels.tolist() == [0, 0]  # round(1.5) = 2 of a held


def test_images_of_every_pillow_extension_are_read_and_other_files_named(tmp_path, monkeypatch, caplog):
    root = _two_class_folder(tmp_path, monkeypatch)
    pixels = np.full((4, 4, 3), 77, dtype=np.uint8)
    Image.fromarray(pixels).save(root / "train" / "a" / "1.tga")  # Pillow reads TGA: an image, not skipped
    Image.fromarray(pixels).save(root / "train" / "b" / "2.jfif", format="JPEG")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "b" / "labels.csv").write_text("x")
    (root / "train" / "b" / "more.csv").write_text("x")
    (root / "train" / "b" / ".DS_Store").write_text("x")  # hidden: not worth a word
    with caplog.at_level(logging.WARNING, logger="igkd.data.imagefolder"):
        train = load_dataset(f"imagefolder:{root}").train
    assert train.labels.tolist() == [0, 0, 1, 1]  # a/0.bmp a/1.tga b/0.bmp b/2.jfif
    assert train.images[1, 0, 0, 0].item() == 77
    assert "skipped 3 files that are not images by their extension (2 .csv, 1 .txt; e.g. b/" in caplog.text
    assert ".DS_Store" not in caplog.text


def test_lab_image_decodes_as_gray_through_rgb(tmp_path):
    p = tmp_path / "lab.tif"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)).convert("LAB").save(p)
    want = np.asarray(Image.open(p).convert("RGB").convert("L"))
    assert np.array_equal(_decode_one(p, "L", (4, 5), None, p), want)


# ---------------------------------------------------------------- subset: every class keeps a sample


def test_subset_keeps_singleton_classes_and_every_other_row_as_before():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1, 3])  # class 3: one sample (15)
    # what subset_indices gave before: the rows of classes 0-2 must not move (Monte Carlo results)
    before = {(0.5, 0): [0, 3, 4, 5, 7, 8, 10, 12, 15], (0.3, 1): [1, 8, 9, 12],
              (0.8, 2): [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 15]}
    for (fraction, seed), rows in before.items():
        got = subset_indices(labels, fraction, seed).tolist()
        assert got == sorted(set(rows) | {15}), (fraction, seed, got)
    assert torch.bincount(labels[subset_indices(labels, 0.1, 0)]).tolist() == [1, 1, 1, 1]


# ---------------------------------------------------------------- CIFAR labels: one check for both readers


def _cifar10(root: Path, labels: list) -> str:
    f = root / "cifar-10-batches-py"
    f.mkdir(parents=True)
    pickle.dump({b"label_names": [b"c%d" % i for i in range(10)]}, open(f / "batches.meta", "wb"), protocol=2)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": labels if i == 0 else [0, 1]}
        pickle.dump(batch, open(f / name, "wb"), protocol=2)
    return f"cifar10:{root},verify=0,download=0"


def test_cifar_labels_out_of_range_or_not_integers_are_one_line_errors(tmp_path):
    for i, (labels, why) in enumerate([([10, 0], "labels outside 0..9"), ([-1, 0], "labels outside 0..9"),
                                       (["a", 0], "labels that are not integers"),
                                       ([1.5, 0], "labels that are not integers")]):
        with pytest.raises(UserError, match=f"data_batch_1 has {why}; re-extract cifar-10-python.tar.gz"):
            load_dataset(_cifar10(tmp_path / str(i), labels)).train
    assert load_dataset(_cifar10(tmp_path / "good", [9, 0])).train.labels.tolist()[:4] == [9, 0, 0, 1]
    f = tmp_path / "c100" / "cifar-100-python"  # CIFAR-100 shares the check: 1.5 is not label 1
    f.mkdir(parents=True)
    pickle.dump({b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": []},
                open(f / "meta", "wb"), protocol=2)
    for name in ("train", "test"):
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [1.5]}, open(f / name, "wb"), protocol=2)
    with pytest.raises(UserError, match="train has fine labels that are not integers"):
        load_dataset(f"cifar100:{tmp_path / 'c100'},verify=0,download=0").train


# ---------------------------------------------------------------- memory budget: a container's limit counts

def _cgroup(tmp_path, proc_lines, files):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text("\n".join(proc_lines) + "\n")
    for rel, text in files.items():
        p = tmp_path / "sys" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return proc, tmp_path / "sys"


def test_cgroup_limits_bound_the_memory_a_split_may_take(tmp_path):
    from igkd.data.base import cgroup_memory_available
    g = 1 << 30
    # cgroup v2 inside a container: /proc names the host's path, the container's cgroup is the mount's root
    proc, root = _cgroup(tmp_path / "v2", ["0::/kubepods/pod1/abc"], {
        "memory.max": f"{2 * g}\n", "memory.current": f"{g}\n",
        "memory.stat": f"anon 100\ninactive_file {g // 4}\nactive_file 5\n"})
    assert cgroup_memory_available(proc, root) == 2 * g - g + g // 4
    # v1 (as on this build machine: hybrid, memory under memory/), a nested limit tighter than the root's
    proc, root = _cgroup(tmp_path / "v1", ["4:memory:/job/7", "0::/"], {
        "memory/memory.limit_in_bytes": str(8 * g), "memory/memory.usage_in_bytes": str(g),
        "memory/job/7/memory.limit_in_bytes": str(3 * g), "memory/job/7/memory.usage_in_bytes": str(2 * g),
        "memory/job/7/memory.stat": "cache 9\ntotal_inactive_file 0\n"})
    assert cgroup_memory_available(proc, root) == g
    # no limit anywhere: v2's "max", v1's page-rounded 2**63 - 1; no cgroup file at all
    proc, root = _cgroup(tmp_path / "none", ["0::/", "4:memory:/"], {
        "memory.max": "max\n", "memory.current": "5\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.usage_in_bytes": "5\n"})
    assert cgroup_memory_available(proc, root) is None
    assert cgroup_memory_available(tmp_path / "absent", root) is None
