"""Defects found in a review of every file igkd reads that it did not write in this process
(weights, metadata, dataset files, stores, caches, recipes), each with the check that failed
before its fix: a damaged file is one line saying so, what a file's metadata names is never
fetched or run, and a forged header costs neither a traceback nor unbounded memory."""

import gzip
import hashlib
import io
import json
import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from helpers_cli import run_igkd
from igkd.errors import UserError
from igkd.models import build_model, load_model, read_metadata, save_checkpoint

TINY = "mobilenetv2:width=0.25,drop=14"
DEEP = "[" * 5000 + "]" * 5000  # JSON nested past Python's recursion limit
DEEP_YAML = "[" * 700 + "]" * 700  # PyYAML takes several frames a level (and scans deep text slowly)


def checkpoint(tmp_path: Path, **meta) -> Path:
    """A real tiny checkpoint with ``meta`` in its metadata (beside it and in its header)."""
    return save_checkpoint(tmp_path / "model", build_model(TINY, 10, 1),
                           {"model": TINY, "num_classes": 10, "in_channels": 1, **meta})


# ---------------------------------------------------------------- damaged .safetensors
def test_a_damaged_safetensors_file_says_so_not_that_it_lacks_metadata(tmp_path):
    """A truncated or foreign X.safetensors was reported as "has no igkd metadata; say which
    architecture it is with --model": the user was sent to an option that cannot help."""
    good = checkpoint(tmp_path).read_bytes()
    files = {"garbage": os.urandom(100), "empty": b"", "truncated": good[:-100]}
    for name, data in files.items():
        (tmp_path / f"{name}.safetensors").write_bytes(data)
        with pytest.raises(UserError, match=f"{name}.safetensors is not a readable safetensors file .*; it is "
                                            "truncated, damaged or of another format"):
            load_model(tmp_path / f"{name}.safetensors")
    r = run_igkd("evaluate", "--weights", tmp_path / "truncated.safetensors", "--data", "demo", "--model", TINY)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a readable safetensors file" in r.stderr, r.stderr


# ---------------------------------------------------------------- export: the dataset a file records
def test_export_fetches_nothing_and_runs_no_plugin_a_checkpoint_names(tmp_path, monkeypatch):
    """export loaded whatever dataset spec the checkpoint recorded: cifar10:DIR created DIR
    where the file said and downloaded into it, and an installed plug-in's kind ran on the
    file's say. Only igkd's own kinds are taken from a file, never downloading."""
    from igkd.data import DATASETS
    from igkd.data import cifar_archive
    called = []
    monkeypatch.setattr(cifar_archive.urllib.request, "urlopen", lambda *a, **k: called.append(a) or 1 / 0)
    monkeypatch.setitem(DATASETS, "evil", lambda spec: called.append(spec) or 1 / 0)
    for spec, words in [(f"cifar10:{tmp_path}/new/sub", "cannot be loaded: dataset directory"),
                        (f"cifar100:{tmp_path}/new,download=1", "cannot be loaded: dataset directory"),
                        ("evil:x", "records dataset 'evil:x', which is not one of igkd's own kinds")]:
        weights = checkpoint(tmp_path, dataset=spec)
        r = run_igkd("export", "--weights", weights, "--output", tmp_path / "m.pt", "--format", "torchscript")
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert words in r.stderr and "pass --data SPEC" in r.stderr, r.stderr
    assert not called and not (tmp_path / "new").exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("meta, words", [({"dataset": 5}, "has dataset 5, not a dataset spec string"),
                                         ({"image_size": 5}, r"has image_size 5, not \[height, width\]"),
                                         ({"image_size": [28]}, r"has image_size \[28\], not \[height, width\]")])
def test_metadata_export_and_bench_read_is_checked(tmp_path, meta, words):
    """A number as the recorded dataset or image size was a traceback in export and bench latency."""
    weights = checkpoint(tmp_path, **meta)
    with pytest.raises(UserError, match=words):
        read_metadata(weights)
    (tmp_path / "model.json").unlink()  # the copy in the header is checked alike
    with pytest.raises(UserError, match=words):
        read_metadata(weights)


# ---------------------------------------------------------------- nesting past the recursion limit
@pytest.fixture
def default_recursion_limit():
    """Python's default limit for the test: torch.compile (inductor) raises it to 2000 for the rest
    of the process, and an earlier test that compiled then let PyYAML compose 700 levels (no error
    to turn into a line; the file is then refused as the wrong kind of document, also one line)."""
    was = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(was)


def test_files_nested_thousands_deep_are_one_line_not_a_recursion_error(tmp_path, default_recursion_limit):
    """json and PyYAML parse nested lists recursively: a small file of brackets raised
    RecursionError (a traceback) from a checkpoint's metadata, a recipe or class map, a store's
    manifest, and the decoded-image cache's header."""
    from igkd.config import read_yaml_file
    from igkd.data.image_cache import _read_header
    from igkd.store import _read_verified, read_manifest
    weights = checkpoint(tmp_path)
    (tmp_path / "model.json").write_text(DEEP)
    with pytest.raises(UserError, match="model.json is not valid JSON"):
        read_metadata(weights)
    (tmp_path / "model.json").unlink()
    weights.write_bytes(save({"w": torch.zeros(1)}, metadata={"igkd": DEEP}))
    with pytest.raises(UserError, match="igkd metadata in the header of .* is not valid JSON"):
        read_metadata(weights)
    (tmp_path / "map.yaml").write_text(DEEP_YAML)
    with pytest.raises(UserError, match="class map .*map.yaml nests lists or mappings thousands of levels deep"):
        read_yaml_file(tmp_path / "map.yaml", "class map")
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text(DEEP)
    with pytest.raises(UserError, match="manifest.json is unreadable or not valid JSON"):
        read_manifest(store)
    (store / "verified.json").write_text(DEEP)
    assert _read_verified(store) == {}  # a damaged record: everything is checked again
    (tmp_path / "images.bin").write_bytes(DEEP[:4000].encode().ljust(4096))
    fd = os.open(tmp_path / "images.bin", os.O_RDONLY)
    try:
        assert _read_header(fd, tmp_path / "images.bin") == (None, "has a damaged header")  # rebuilt
    finally:
        os.close(fd)


# ---------------------------------------------------------------- stores
def test_a_store_array_header_whose_size_wraps_int64_is_damage_not_a_traceback(tmp_path):
    """check_array multiplied the .npy header's shape in int64: 4 x 2**32 x 2**32 float16 is 0
    bytes there, so a header-only maps.npy passed the size check and np.load raised ValueError
    (a traceback) instead of StoreDamaged, which precompute answers by recomputing."""
    from igkd.store import StoreDamaged, open_store
    n, files = 4, {}
    arrays = {"logits": np.zeros((n, 10), "<f4"), "maps": None, "map_scale": np.ones(n, "<f4"),
              "delta": np.zeros(n, "<f4"), "gap": np.ones(n, "<f4")}
    for name, a in arrays.items():
        buf = io.BytesIO()
        if a is None:
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False,
                                                       "shape": (n, 2 ** 32, 2 ** 32)})
        else:
            np.save(buf, a)
        (tmp_path / f"{name}.npy").write_bytes(buf.getvalue())
        files[f"{name}.npy"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "igkd-store/1", "identity": {},
                                                        "num_samples": n, "files": files}))
    for mode in ("never", "auto"):
        with pytest.raises(StoreDamaged, match="maps.npy is truncated: .* its header says 1475739525896764"):
            open_store(tmp_path, None, mode)


# ---------------------------------------------------------------- IDX files
def test_a_gzipped_idx_file_is_read_no_further_than_its_header_says(tmp_path, monkeypatch):
    """read_idx decompressed the whole .gz before looking at its header: a few hundred KB of
    padding after a 1 x 28 x 28 header took hundreds of MB of memory (a gzip bomb, without bound)."""
    from igkd.data import fashion_mnist
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    with open(path, "wb") as f:
        f.write(packer.compress(b"".join(v.to_bytes(4, "big") for v in (0x0803, 1, 28, 28))))
        for _ in range(16):
            f.write(packer.compress(bytes(1 << 20)))
        f.write(packer.flush())
    returned = []

    class Counting(gzip.GzipFile):
        def read(self, size=-1):
            data = super().read(size)
            returned.append(len(data))
            return data
    monkeypatch.setattr(fashion_mnist.gzip, "open", lambda p, mode: Counting(p, mode))
    with pytest.raises(UserError, match=r"is truncated or padded: header says \(1, 28, 28\), 785\+ data bytes"):
        fashion_mnist.read_idx(path, 3)
    assert sum(returned) < 1 << 20, sum(returned)


# ---------------------------------------------------------------- experiment caches
def test_a_damaged_teacher_json_is_scored_again(tmp_path, monkeypatch):
    """An experiment folder's teacher.json (a cache of the teacher's test accuracy) that was
    not JSON, or JSON but not an object, was a JSONDecodeError or AttributeError traceback."""
    import igkd.api
    from igkd.experiments.common import teacher_facts
    from igkd.experiments.config import resolve
    scored = []  # the scoring itself is igkd evaluate's, tested elsewhere; here: whether it is redone
    monkeypatch.setattr(igkd.api, "evaluate", lambda *a, **k: scored.append(a) or
                        {"model": TINY, "params": 1, "accuracy": 50.0, "total": 1000})
    (tmp_path / "foreign.pt").write_bytes(b"weights")
    cfg = resolve("ablation", overrides=dict(teacher=str(tmp_path / "foreign.pt"), teacher_model=TINY, data="demo"))
    for damaged in ("{trunc", "[1, 2]"):
        (tmp_path / "teacher.json").write_text(damaged)
        assert teacher_facts(cfg, tmp_path, quiet=True)["model"] == TINY
        assert json.loads((tmp_path / "teacher.json").read_text())["model"] == TINY  # cached again
    assert len(scored) == 2
    assert teacher_facts(cfg, tmp_path, quiet=True)["model"] == TINY and len(scored) == 2  # the cache is used
