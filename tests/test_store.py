"""The precompute store: index keying, fingerprints, resume, corruption, refusal of mismatches."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from igkd.config import PrecomputeConfig
from igkd.data import Dataset, Split
from igkd.errors import UserError
from igkd.models import Normalized, build_model
from igkd.precompute import compute_chunk, precompute, store_identity
from igkd.store import StoreWriter, open_store


def tiny_dataset(n=24, seed=0, spec="tiny") -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 12, 12, generator=g) * 255).to(torch.uint8)
    labels = torch.arange(n) % 4
    split = Split(images, labels)
    return Dataset(spec, list("abcd"), 3, (12, 12), split, split)


def tiny_teacher(seed=0):
    torch.manual_seed(seed)
    return Normalized(build_model("mobilenetv2:width=0.25,drop=12", 4, 3), [0.5] * 3, [0.25] * 3).eval()


CFG = PrecomputeConfig(ig_steps=8, chunk_size=10)


def test_store_rows_are_keyed_by_sample_index(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    store = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    assert len(store) == 24 and store.maps.dtype == np.float16 and store.maps.shape == (24, 12, 12)
    # recompute samples 17 and 3 alone, in another order: same rows
    idx = torch.tensor([17, 3])
    alone = compute_chunk(teacher, data.train.images[idx], data.train.labels[idx], CFG, torch.device("cpu"))
    np.testing.assert_allclose(store.logits[[17, 3]], alone["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store.maps[[17, 3]].astype(np.float32), alone["maps"].astype(np.float32), atol=2e-3)
    assert np.all(store.maps.max(axis=(1, 2)) == 1.0)  # each map divided by its maximum


def test_store_is_reused_and_refused_for_another_teacher_or_dataset(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    first = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    again = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    assert again.manifest == first.manifest
    with pytest.raises(UserError, match="another teacher"):
        precompute(tiny_teacher(seed=1), data, CFG, tmp_path / "s", quiet=True)
    with pytest.raises(UserError, match="another dataset"):
        precompute(teacher, tiny_dataset(seed=5), CFG, tmp_path / "s", quiet=True)
    with pytest.raises(UserError) as e:  # what differs, named: not "a fingerprint differs"
        precompute(teacher, data, PrecomputeConfig(ig_steps=9, chunk_size=10), tmp_path / "s", quiet=True)
    assert f"with other map settings (ig_steps {CFG.ig_steps} there, 9 now)" in str(e.value)
    with pytest.raises(UserError, match=r"map 'sum_c\|IG\| / max, float16' there, 'sum_c\|IG\| / max, uint8' now"):
        precompute(teacher, data, dataclasses.replace(CFG, map_dtype="uint8"), tmp_path / "s", quiet=True)


def test_default_store_location_is_fingerprinted(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    a = precompute(teacher, data, CFG, quiet=True)
    b = precompute(teacher, data, PrecomputeConfig(ig_steps=4, chunk_size=10), quiet=True)
    assert a.path != b.path and a.manifest["identity"] == store_identity(teacher, data, CFG)


def test_interrupted_store_resumes_and_ends_byte_identical(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    full = precompute(teacher, data, CFG, tmp_path / "full", quiet=True)
    # a run that finished chunks 0 and 2 only, then died
    assert precompute(teacher, data, CFG, tmp_path / "part", quiet=True, chunks=[0, 2]) is None
    assert not (tmp_path / "part" / "manifest.json").exists()
    resumed = precompute(teacher, data, CFG, tmp_path / "part", quiet=True)
    for name in ("logits.npy", "maps.npy", "map_scale.npy", "delta.npy", "gap.npy"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "part" / name).read_bytes()
    assert resumed.manifest["files"] == full.manifest["files"]


def test_corrupt_or_truncated_chunk_is_detected_and_recomputed(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    identity = store_identity(teacher, data, CFG)
    precompute(teacher, data, CFG, tmp_path / "s", quiet=True, chunks=[0, 1, 2])
    writer = StoreWriter(tmp_path / "s", identity, 24, 10)
    assert writer.pending() == []
    chunk = tmp_path / "s" / "chunks" / "000001.npz"
    data_bytes = bytearray(chunk.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data_bytes))
    (tmp_path / "s" / "chunks" / "000002.npz").write_bytes(chunk.read_bytes()[:100])
    assert writer.pending() == [1, 2]
    store = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    ref = precompute(teacher, data, CFG, tmp_path / "ref", quiet=True)
    assert store.manifest["files"] == ref.manifest["files"]


def test_open_store_verifies_checksums_and_refuses_non_stores(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    store = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    open_store(store.path, verify=True)
    arr = np.load(store.path / "logits.npy")
    arr[0, 0] += 1
    np.save(store.path / "logits.npy", arr)
    with pytest.raises(UserError, match="checksum"):
        open_store(store.path, verify=True)
    with pytest.raises(UserError, match="not a complete igkd store"):
        open_store(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="not an igkd store"):
        precompute(teacher, data, CFG, tmp_path / "other", quiet=True)
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["completeness_delta"]["max_abs"] >= 0
