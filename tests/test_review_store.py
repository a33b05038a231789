"""Review of the precompute and the store: the lock's waiter, --map-size, the error
estimate, unfinished stores and the hints of refused ones. Real files and processes."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from igkd.config import PrecomputeConfig
from igkd.errors import UserError
from igkd.precompute import estimate_error, precompute

from helpers_cli import run_igkd
from test_store import tiny_dataset, tiny_teacher

CFG = PrecomputeConfig(ig_steps=2, chunk_size=10, check_images=0)
DEMO_TEACHER = "src/igkd/assets/demo_teacher.safetensors"

HOLDER = """
import sys
from igkd.lock import DirLock
lock = DirLock(sys.argv[1], "store").acquire()
print("held", flush=True)
sys.stdin.readline()  # until the waiter waits
lock.release()  # nothing written: the folder it created goes with it
"""

WAITER = """
import sys
from igkd.lock import DirLock
lock = DirLock(sys.argv[1], "store").acquire(wait=True)
print("got it", lock.folder.is_dir(), flush=True)
lock.release()
"""


def test_a_waiter_gets_the_lock_when_the_holder_removes_the_folder_it_created(tmp_path):
    # a first precompute of a new --store that fails before writing anything removes the folder
    # on release; the precompute waiting for it failed with "cannot write store ...: No such
    # file or directory; choose another path" instead of taking the lock
    folder = tmp_path / "new" / "store"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, "-c", WAITER, str(folder)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert "waiting for store" in waiter.stderr.readline()
        holder.stdin.write("go\n")
        holder.stdin.flush()
        out, err = waiter.communicate(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert waiter.returncode == 0 and out.strip() == "got it True", err


def test_a_map_size_larger_than_the_images_is_refused_in_one_line(tmp_path):
    # adaptive pooling "to" 50x50 repeats the pixels of a 28x28 map: a 3x larger store, and the
    # maps then came back through a bilinear resize instead of as computed
    store = tmp_path / "s"
    r = run_igkd("precompute", "--teacher", DEMO_TEACHER, "--data", "demo", "--store", store, "--threads", "1",
                 "--ig-steps", "2", "--check-images", "0", "--map-size", "50")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("igkd: error: --map-size 50 is larger than the 28x28 images; give at most 28")
    assert not store.exists()
    with pytest.raises(UserError, match="at most 12"):
        precompute(tiny_teacher(), tiny_dataset(), replace(CFG, map_size=13), tmp_path / "t", quiet=True)


def test_the_error_estimate_scores_the_maps_at_the_stored_map_size():
    # the estimate compared the full-size maps: 0% for maps kept as 3x3 area means of 12x12
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = PrecomputeConfig(ig_steps=16, ig_method="gausslegendre", check_images=4, check_steps=16)
    cpu = torch.device("cpu")
    assert estimate_error(teacher, data, cfg, cpu)["median"] == 0.0  # the reference itself
    assert estimate_error(teacher, data, replace(cfg, map_size=3), cpu)["median"] > 0.2
    assert 0 < estimate_error(teacher, data, replace(cfg, map_dtype="uint8"), cpu)["median"] < 0.02


def test_the_error_estimate_is_kept_when_nothing_is_left_to_compute(tmp_path):
    # a run that finds every chunk done (its predecessor killed while finalising, or the
    # chunks computed by hand) wrote "error_estimate": null into the manifest
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = replace(CFG, check_images=2, check_steps=8)
    whole = precompute(teacher, data, cfg, tmp_path / "whole", quiet=True)
    assert precompute(teacher, data, cfg, tmp_path / "parts", quiet=True, chunks=[0, 1, 2]) is None
    parts = precompute(teacher, data, cfg, tmp_path / "parts", quiet=True)
    assert whole.manifest["error_estimate"] is not None
    assert parts.manifest["error_estimate"] == whole.manifest["error_estimate"]
    assert parts.manifest["files"] == whole.manifest["files"]


def test_a_store_killed_before_its_plan_was_written_is_started_again(tmp_path):
    # chunks/ is made just before chunks/plan.json: a kill in between left a folder that every
    # later run refused as "exists and is not an igkd store"
    (tmp_path / "s" / "chunks").mkdir(parents=True)
    (tmp_path / "s" / "chunks" / ".plan.json.abcd1234.tmp").write_text("{")
    store = precompute(tiny_teacher(), tiny_dataset(), CFG, tmp_path / "s", quiet=True)
    assert len(store) == 24


def test_a_damaged_plan_of_an_unfinished_store_is_refused_in_one_line(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    precompute(teacher, data, CFG, tmp_path / "s", quiet=True, chunks=[0])
    plan = tmp_path / "s" / "chunks" / "plan.json"
    for damage in ("{ not json", "[1]"):
        plan.write_text(damage)
        before = sorted(p.name for p in plan.parent.iterdir())
        with pytest.raises(UserError, match=r"chunks/plan.json is unreadable .*; delete .*chunks and run") as e:
            precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
        assert "\n" not in str(e.value)
        assert sorted(p.name for p in plan.parent.iterdir()) == before  # nothing deleted


def test_an_unfinished_store_names_the_chunk_size_it_was_started_with(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    precompute(teacher, data, CFG, tmp_path / "s", quiet=True, chunks=[0])
    with pytest.raises(UserError, match="started with --chunk-size 10 .*; rerun with --chunk-size 10"):
        precompute(teacher, data, replace(CFG, chunk_size=8), tmp_path / "s", quiet=True)


def test_a_store_of_another_igkd_version_says_how_to_rebuild_it(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    store = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["format"] = "igkd-store/0"
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"another igkd version .*; delete .* and run 'igkd precompute' again"):
        precompute(teacher, data, CFG, store.path, quiet=True)
    assert (store.path / "maps.npy").exists()  # refused, not deleted


def test_an_empty_training_split_is_refused_in_one_line(tmp_path):
    # finalize read chunks/000000.npz of a store of no chunks: a FileNotFoundError traceback
    with pytest.raises(UserError, match="holds no images; there is nothing to precompute"):
        precompute(tiny_teacher(), tiny_dataset(n=0), CFG, tmp_path / "s", quiet=True)
    assert not (tmp_path / "s").exists()


def test_a_finished_store_on_a_read_only_mount_is_read_for_training(tmp_path):
    """A team's finished store on a read-only mount: distill only reads it, yet --store was
    refused as unwritable (and the lock needs a file in it). A real read-only tmpfs."""
    from helpers_data import write_image_folder
    from helpers_fs import tmpfs
    from igkd.models import build_model, save_checkpoint
    data = f"imagefolder:{write_image_folder(tmp_path / 'data', 12, 12)}"
    teacher = save_checkpoint(tmp_path / "teacher", build_model("resnet:depth=8", 2, 3),
                              {"model": "resnet:depth=8", "num_classes": 2, "in_channels": 3, "classes": ["cat", "dog"]})
    common = ["--teacher", teacher, "--data", data, "--ig-steps", "2", "--check-images", "0", "--threads", "1"]
    with tmpfs(tmp_path / "mnt", "64m") as fs:
        store = tmp_path / "mnt" / "store"
        r = run_igkd("precompute", *common, "--store", store, "--quiet")
        assert r.returncode == 0, r.stderr
        before = sorted((p.name, p.stat().st_mtime_ns) for p in store.iterdir())
        fs.read_only()
        r = run_igkd("distill", *common, "--store", store, "--method", "kd+ig", "--model",
                     "mobilenetv2:width=0.25,drop=14", "--epochs", "1", "--batch-size", "8",
                     "--out", tmp_path / "run")
        assert r.returncode == 0, r.stderr[-2000:]
        assert "reusing read-only store" in r.stderr and (tmp_path / "run" / "summary.json").exists()
        assert sorted((p.name, p.stat().st_mtime_ns) for p in store.iterdir()) == before


@pytest.mark.parametrize("attribution", ["ig", "smoothgrad"])
def test_a_chunk_computed_in_slices_is_the_chunk_computed_whole(monkeypatch, attribution):
    """compute_chunk works in slices of bounded memory (a 224-pixel chunk held gigabytes of
    temporaries, and page faults cost more than the teacher): the same arrays as one call, up
    to float32 rounding (other batch sizes may reduce in another order), SmoothGrad's
    per-index noise included (each slice passes its first dataset index; a wrong one gives
    other maps altogether)."""
    import numpy as np
    pre = __import__("importlib").import_module("igkd.precompute")  # the module (igkd.precompute is the API call)
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = replace(CFG, attribution=attribution, smoothgrad_samples=2)
    images, labels = data.train.images[:10], data.train.labels[:10]
    whole = pre.compute_chunk(teacher, images, labels, cfg, torch.device("cpu"), first_index=20)
    monkeypatch.setattr(pre, "SLICE_VALUES", 4 * images[0].numel())  # slices of 4, 4 and 2 images
    sliced = pre.compute_chunk(teacher, images, labels, cfg, torch.device("cpu"), first_index=20)
    for k in whole:
        if k == "maps":  # float16: a rounding difference may cross one half-precision step
            np.testing.assert_allclose(sliced[k].astype(np.float32), whole[k].astype(np.float32), rtol=0, atol=1e-3)
        else:
            np.testing.assert_allclose(sliced[k], whole[k], rtol=1e-5, atol=1e-9)
