"""Bad input: one line naming the problem and the fix, exit status 2, nothing half-written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from igkd.models import build_model, save_checkpoint


def igkd(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "igkd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_user_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A real tiny image folder: 2 classes x 6 PNGs, train and test."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, folder):
    path = tmp_path_factory.mktemp("teacher") / "model"
    save_checkpoint(path, build_model("mobilenetv2:width=0.25,drop=12", 2, 3),
                    {"model": "mobilenetv2:width=0.25,drop=12", "num_classes": 2, "in_channels": 3,
                     "classes": ["cat", "dog"], "preprocessing": {"normalize": "none"}})
    return path.with_suffix(".safetensors")


def test_missing_dataset_directory(tmp_path):
    r = igkd("train", "--data", f"imagefolder:{tmp_path / 'nope'}", "--out", tmp_path / "run", "--epochs", 1)
    assert_user_error(r, "does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,words", [
    (["--data", "mnist9"], ["unknown dataset kind", "known kinds"]),
    (["--model", "resnet9000"], ["unknown model", "known models"]),
    (["--model", "mobilenetv2:drop=40"], ["out of range"]),
])
def test_unknown_specs(tmp_path, args, words):
    r = igkd("train", *args, "--out", tmp_path / "run", "--epochs", 1)
    assert_user_error(r, *words)
    assert not (tmp_path / "run").exists()


def test_weights_for_another_architecture(tmp_path, folder):
    weights = save_checkpoint(tmp_path / "w", build_model("mobilenetv2:drop=13", 2, 3), {})
    r = igkd("evaluate", "--model", "mobilenetv2:drop=5", "--weights", weights, "--data", f"imagefolder:{folder}")
    assert_user_error(r, "do not fit", "--model")


@pytest.mark.parametrize("flag,value,words", [
    ("--p", "1.5", ["--p", "[0.0, 1.0]"]), ("--p", "-0.1", ["--p"]),
    ("--T", "0", ["--T", "(0.0"]), ("--T", "-2", ["--T"]),
    ("--alpha", "1.01", ["--alpha"]), ("--alpha", "-1", ["--alpha"]), ("--p", "nan", ["--p"]),
])
def test_out_of_range_method_settings(tmp_path, flag, value, words):
    r = igkd("distill", flag, value, "--out", tmp_path / "run", "--epochs", 1)
    assert_user_error(r, "out of range", *words)
    assert not (tmp_path / "run").exists()


def test_unreadable_image(tmp_path, folder, teacher_ckpt):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "test" / "dog" / "3.png").write_bytes(b"\x89PNG this is not an image")
    r = igkd("evaluate", "--weights", teacher_ckpt, "--data", f"imagefolder:{bad},cache=0")
    assert_user_error(r, "3.png")


def test_store_of_another_dataset_or_teacher_is_refused(tmp_path, folder, teacher_ckpt):
    store = tmp_path / "store"
    ok = igkd("precompute", "--teacher", teacher_ckpt, "--data", f"imagefolder:{folder}", "--store", store,
              "--ig-steps", 2)
    assert ok.returncode == 0, ok.stderr
    before = sorted(p.name for p in store.iterdir())
    other = tmp_path / "other"
    import shutil
    shutil.copytree(folder, other)
    img = np.asarray(Image.open(other / "train" / "cat" / "0.png")).copy()
    img[0, 0] ^= 0xFF
    Image.fromarray(img).save(other / "train" / "cat" / "0.png")
    r = igkd("precompute", "--teacher", teacher_ckpt, "--data", f"imagefolder:{other}", "--store", store,
             "--ig-steps", 2)
    assert_user_error(r, "another dataset")
    other_teacher = save_checkpoint(tmp_path / "t2", build_model("mobilenetv2:width=0.25,drop=12", 2, 3),
                                    {"model": "mobilenetv2:width=0.25,drop=12", "classes": ["cat", "dog"]})
    r = igkd("precompute", "--teacher", other_teacher, "--data", f"imagefolder:{folder}", "--store", store,
             "--ig-steps", 2)
    assert_user_error(r, "another teacher")
    assert sorted(p.name for p in store.iterdir()) == before


def test_bad_config_file_and_unknown_option(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 3\n  colour: blue\n")
    assert_user_error(igkd("train", "--config", cfg, "--out", tmp_path / "r"), "unknown option 'colour'")
    assert_user_error(igkd("train", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "r"),
                      "does not exist")
    assert not (tmp_path / "r").exists()


def test_help_lists_every_command_and_spec_strings():
    r = igkd("--help")
    assert r.returncode == 0
    for cmd in ("train", "precompute", "distill", "evaluate", "demo", "mobilenetv2:drop=K", "imagefolder:DIR"):
        assert cmd in r.stdout
    r = igkd("distill", "--help")
    for opt in ("--T", "--alpha", "--p", "--method", "--logits", "(default: 2.5)", "--ig-steps", "--resume"):
        assert opt in r.stdout, opt
