"""Precompute at scale: sharded under torchrun, killed and resumed, error estimate, cheaper
attributions, uint8 maps. Real processes on a small real image folder (conftest.small_real)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from captum.attr import Saliency

from igkd.attribution import saliency, smoothgrad
from igkd.config import PrecomputeConfig
from igkd.precompute import bytes_per_image, estimate_error, precompute
from igkd.store import open_store

from test_store import tiny_dataset, tiny_teacher

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def precompute_args(small_real, store, *extra):
    return ["precompute", "--teacher", str(small_real / "teacher.safetensors"), "--data",
            f"imagefolder:{small_real / 'data'},gray=1", "--store", str(store), "--threads", "1",
            "--ig-steps", "8", "--chunk-size", "32", "--check-images", "0", *extra]


def files_of(store) -> dict:
    return json.loads((store / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def single_store(small_real, tmp_path_factory):
    """The store of one uninterrupted single-process run (the reference)."""
    store = tmp_path_factory.mktemp("single") / "store"
    run = subprocess.run([sys.executable, "-m", "igkd.cli", *precompute_args(small_real, store)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return store


def test_two_gloo_processes_write_the_single_process_store(small_real, single_store, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "igkd.cli",
                          *precompute_args(small_real, tmp_path / "two")],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("store:") == 1  # rank 0 alone prints
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["processes"] == 2 and not (tmp_path / "two" / "chunks").exists()
    assert files_of(tmp_path / "two") == files_of(single_store)  # sha256 of every array: byte-identical


def test_sigkill_then_rerun_gives_the_uninterrupted_store(small_real, single_store, tmp_path):
    store = tmp_path / "killed"
    cmd = [sys.executable, "-m", "igkd.cli", *precompute_args(small_real, store)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 120
    while len(list((store / "chunks").glob("*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((store / "chunks").glob("*.npz"))
    assert not (store / "manifest.json").exists() and 3 <= len(done) < 16, "killed too late to test resuming"
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming:" in rerun.stderr  # it continued rather than starting over
    assert files_of(store) == files_of(single_store)


def test_error_estimate_falls_with_steps_and_is_zero_at_the_reference():
    data, teacher = tiny_dataset(), tiny_teacher()
    # a freshly initialised network is nearly linear along the path (every error ~1e-6, float
    # noise, which ordered 2 and 8 steps by chance): larger BatchNorm scales make it bend
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.mul_(3.0)
    est = {s: estimate_error(teacher, data, PrecomputeConfig(ig_steps=s, ig_method="gausslegendre", check_images=6,
                                                             check_steps=64), torch.device("cpu"))["median"]
           for s in (2, 8, 64)}
    assert est[64] == 0.0  # the same computation as the reference
    assert est[2] > est[8] > 0.01  # 165% and 115% here
    assert estimate_error(teacher, data, PrecomputeConfig(check_images=0), torch.device("cpu")) is None


def test_estimate_is_printed_before_the_run_and_kept_in_the_manifest(small_real, tmp_path):
    run = subprocess.run([sys.executable, "-m", "igkd.cli",
                          *precompute_args(small_real, tmp_path / "s", "--check-images", "4", "--check-steps", "32",
                                           "--ig-steps", "4")], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    first_progress = next(i for i, line in enumerate(lines) if line.startswith("precompute: ") and "img (" in line)
    estimate_line = next(i for i, line in enumerate(lines) if "map error vs a 32-step IG reference on 4 images" in line)
    assert estimate_line < first_progress
    est = json.loads((tmp_path / "s" / "manifest.json").read_text())["error_estimate"]
    assert est["images"] == 4 and est["reference_steps"] == 32 and 0 < est["median"] <= est["max"]


def test_smoothgrad_is_the_mean_saliency_over_the_same_noisy_copies():
    teacher = tiny_teacher()
    x = tiny_dataset().train.images[:3].float() / 255
    y = torch.tensor([0, 2, 1])
    ours = smoothgrad(teacher, x, y, samples=5, sigma=0.2, generator=torch.Generator().manual_seed(3), fast=False)
    noise = torch.randn((3, 5, *x.shape[1:]), generator=torch.Generator().manual_seed(3))
    sal = Saliency(teacher)
    expected = torch.stack([sal.attribute(x[i:i + 1] + 0.2 * noise[i], target=int(y[i])).mean(0) for i in range(3)])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(smoothgrad(teacher, x, y, samples=3, sigma=0.0), saliency(teacher, x, y))


@pytest.mark.parametrize("kind", ["saliency", "input_x_gradient", "smoothgrad"])
def test_cheaper_attributions_make_stores(tmp_path, kind):
    data, teacher = tiny_dataset(), tiny_teacher()
    cfg = PrecomputeConfig(attribution=kind, smoothgrad_samples=4, chunk_size=10, check_images=0)
    store = precompute(teacher, data, cfg, tmp_path / kind, quiet=True)
    ig = precompute(teacher, data, PrecomputeConfig(ig_steps=4, chunk_size=10, check_images=0), tmp_path / "ig",
                    quiet=True)
    assert store.manifest["identity"]["settings"] != ig.manifest["identity"]["settings"]
    assert store.manifest["completeness_delta"] is None and np.isnan(store.delta).all()
    assert np.isfinite(store.maps.astype(np.float32)).all() and (store.maps.max(axis=(1, 2)) == 1).all()
    np.testing.assert_array_equal(store.logits, ig.logits)  # same teacher outputs
    # rebuilt from scratch with the same seed by index: the same maps
    again = precompute(teacher, data, cfg, tmp_path / "again", quiet=True)
    assert again.manifest["files"] == store.manifest["files"]


def test_uint8_maps_halve_the_store_and_match_float16(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    f16 = precompute(teacher, data, PrecomputeConfig(ig_steps=4, check_images=0), tmp_path / "f16", quiet=True)
    u8 = precompute(teacher, data, PrecomputeConfig(ig_steps=4, check_images=0, map_dtype="uint8"),
                    tmp_path / "u8", quiet=True)
    assert u8.maps.dtype == np.uint8 and (u8.maps.max(axis=(1, 2)) == 255).all()
    assert np.abs(u8.maps / 255.0 - f16.maps.astype(np.float64)).max() <= 0.5 / 255 + 1e-3  # float16 rounding
    for store, dtype in ((f16, "float16"), (u8, "uint8")):
        on_disk = sum((store.path / name).stat().st_size - 128 for name in store.manifest["files"])  # npy headers
        assert on_disk == len(data.train) * bytes_per_image(4, 12, 12, dtype)
    assert open_store(tmp_path / "u8").maps.dtype == np.uint8
