"""Bad input and faults: one line naming the problem and the fix, exit status 2, nothing
half-written. Issue 16's "What broke" list is covered here: #1 hostile CIFAR pickles, #3
deep images (tests/test_data.py has the pixel values), #6 config sections, #8 bad paths,
files and numbers, #9 misleading messages (the systematic pass), and, in the last section,
#2 damaged stores, #4 two writers, #5 full disks and #7 a second precompute: stores
verified on open and recomputed when damaged, one writer per store and per run directory
(igkd.lock), a full disk reported in one line with nothing half-written."""

import errno
import hashlib
import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import igkd.store as store_module
from helpers_cli import run_igkd
from helpers_data import write_image_folder
from helpers_fs import tmpfs
from igkd.lock import LOCK_NAME, DirLock
from igkd.models import build_model, save_checkpoint
from igkd.precompute import precompute
from igkd.store import ARRAYS, VERIFIED, StoreDamaged, open_store
from test_store import CFG, tiny_dataset, tiny_teacher


def igkd(*args, cwd=None, process=False):
    """In this process unless the test is about processes (see helpers_cli)."""
    return run_igkd(*args, cwd=cwd, process=process, module="igkd.cli")


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
    return write_image_folder(tmp_path_factory.mktemp("imgs"), 6, 16)


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
    r = igkd("train", "--data", "demo", *args, "--out", tmp_path / "run", "--epochs", 1)  # a later --data wins
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
    text = " ".join(r.stdout.split())  # argparse wraps at the terminal width
    for opt in ("--T", "--alpha", "--p", "--method", "--logits", "(default: 2.5)", "--ig-steps", "--resume",
                "--dkd-beta", "--explain-method", "--cutmix-p", "--blend", "dkd: decoupled KD"):
        assert opt in text, opt


# ---------------------------------------------------------------- the systematic pass (issue 16)
# In-process (igkd.cli.main, the same code as the command minus interpreter start-up) so the whole
# table costs seconds; the hostile-pickle case below runs as a real process.

def main_error(capsys, *args) -> str:
    """Run ``igkd ARGS`` in this process; assert one line, exit 2, no traceback; return the line."""
    from igkd.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert e.value.code == 2, (e.value.code, err)
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), err
    return lines[0]


def test_hostile_cifar_pickles_run_nothing_through_the_command(tmp_path):
    """What broke #1: a pickle at cifar-10-batches-py/batches.meta, and one inside a local
    cifar-10-python.tar.gz, would run a shell command; igkd evaluate refuses both."""
    import io
    import pickle
    import tarfile

    marker = tmp_path / "MARKER"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = pickle.dumps({b"label_names": [Hostile()]}, protocol=2)
    extracted = tmp_path / "extracted" / "cifar-10-batches-py"
    extracted.mkdir(parents=True)
    (extracted / "batches.meta").write_bytes(evil)
    archived = tmp_path / "archived"
    archived.mkdir()
    with tarfile.open(archived / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = len(evil)
        tar.addfile(info, io.BytesIO(evil))
    weights = save_checkpoint(tmp_path / "m", build_model("mobilenetv2:width=0.25,drop=12", 10, 3),
                              {"model": "mobilenetv2:width=0.25,drop=12"})
    for root in (extracted.parent, archived):
        for spec in (f"cifar10:{root}", f"cifar10:{root},verify=0"):
            assert_user_error(igkd("evaluate", "--weights", weights, "--data", spec, process=True))
    assert not marker.exists()


@pytest.fixture(scope="module")
def afile(tmp_path_factory):
    f = tmp_path_factory.mktemp("paths") / "afile"
    f.write_text("x")
    return f


@pytest.mark.parametrize("where,words", [
    ("{afile}", ["is an existing file"]),
    ("{afile}/sub", ["is under", "which is a file"]),
    ("/proc/igkd-run", ["inside /proc"]),
    ("/sys/igkd-run", ["inside /sys"]),
])
def test_output_folders_that_cannot_be_written(capsys, tmp_path, afile, folder, teacher_ckpt, where, words):
    """What broke #8: --out/--store that is a file, under a file, or under /proc or /sys."""
    path = where.format(afile=afile)
    data = f"imagefolder:{folder}"
    small = ["--model", "mobilenetv2:width=0.25,drop=12", "--epochs", 1]
    for args, flag in [
        (["train", "--data", data, "--out", path, *small], "--out"),
        (["distill", "--data", data, "--teacher", teacher_ckpt, "--out", path, *small], "--out"),
        (["distill", "--data", data, "--teacher", teacher_ckpt, "--out", tmp_path / "r", "--store", path, *small],
         "--store"),
        (["precompute", "--teacher", teacher_ckpt, "--data", data, "--store", path], "--store"),
        (["demo", "--out", path], "--out"),
        (["experiment", "ablation", "--out", path, "--data", data], "--out"),
        (["bench", "latency", "--model", "mobilenetv2:drop=12", "--out", path], "--out"),
    ]:
        line = main_error(capsys, *args)
        assert flag in line and all(w in line for w in words), (args, line)
    assert not (tmp_path / "r").exists()


def test_export_out_that_is_a_folder(capsys, tmp_path, folder, teacher_ckpt):
    line = main_error(capsys, "export", "--weights", teacher_ckpt, "--data", f"imagefolder:{folder}",
                      "--output", tmp_path)
    assert "--output" in line and "is a folder" in line


def _with_metadata(tmp_path, teacher_ckpt, text: str):
    import shutil
    weights = tmp_path / "m.safetensors"
    shutil.copy(teacher_ckpt, weights)
    (tmp_path / "m.json").write_text(text)
    return weights


@pytest.mark.parametrize("text,words", [
    ("[1, 2]", ["holds a JSON list"]),
    ('{"model": 5}', ["has model 5"]),
    ('{"model": "mobilenetv2:width=0.25,drop=12", "preprocessing": 3}', ["has preprocessing 3"]),
    ('{"model": "mobilenetv2:width=0.25,drop=12", "in_channels": 3, "preprocessing": {"normalize": "dataset", '
     '"mean": [0.1], "std": [0.2, 0.2, 0.2]}}', ["1 value(s) for 3 input channel(s)"]),
    ('{"model": "mobilenetv2:width=0.25,drop=12", "preprocessing": {"normalize": "dataset", '
     '"mean": [0.1], "std": [0.2]}}', ["1 channel mean(s) but the data has 3"]),
    ("{not json", ["is not valid JSON"]),
])
def test_nonsense_metadata(capsys, tmp_path, folder, teacher_ckpt, text, words):
    weights = _with_metadata(tmp_path, teacher_ckpt, text)
    line = main_error(capsys, "evaluate", "--weights", weights, "--data", f"imagefolder:{folder}")
    assert all(w in line for w in words), line


def test_empty_and_device_weights_files(capsys, tmp_path, folder):
    (tmp_path / "empty.pt").write_bytes(b"")
    for weights in (tmp_path / "empty.pt", "/dev/null"):
        line = main_error(capsys, "evaluate", "--weights", weights, "--model", "mobilenetv2",
                          "--data", f"imagefolder:{folder}")
        assert f"cannot read weights from {weights}" in line
    line = main_error(capsys, "precompute", "--teacher", tmp_path / "empty.pt", "--data", f"imagefolder:{folder}",
                      "--store", tmp_path / "s")
    assert "--teacher-model SPEC" in line  # the flag precompute has (it said --model, which precompute rejects)
    assert not (tmp_path / "s").exists()
    line = main_error(capsys, "evaluate", "--weights", tmp_path / "missing.pt", "--data", f"imagefolder:{folder}")
    assert "missing.pt does not exist" in line


def test_hostile_truncated_last_pt_and_resume_messages(capsys, tmp_path, folder):
    import pickle
    marker = tmp_path / "MARKER"

    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    args = ["train", "--data", f"imagefolder:{folder}", "--model", "mobilenetv2:width=0.25,drop=12", "--epochs", 1,
            "--quiet", "--batch-size", 8]
    run = tmp_path / "run"
    run.mkdir()
    for content in (pickle.dumps({"model": Hostile()}), b"PK\x03\x04 truncated"):
        (run / "last.pt").write_bytes(content)
        line = main_error(capsys, *args, "--out", run, "--resume")
        assert "last.pt is damaged or not igkd's" in line and "delete it" in line
    assert not marker.exists()
    (run / "last.pt").unlink()
    from igkd.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args + ["--out", tmp_path / "done"]])
    assert e.value.code == 0
    (tmp_path / "done" / "last.pt").unlink(missing_ok=True)
    line = main_error(capsys, *args, "--out", tmp_path / "done", "--resume")
    assert "has finished" in line and "pass --resume" not in line


def test_image_folder_faults(capsys, tmp_path, folder, teacher_ckpt):
    import shutil
    loop = tmp_path / "loop"
    shutil.copytree(folder, loop)
    (loop / "train" / "x1").symlink_to(loop / "train" / "x2")
    (loop / "train" / "x2").symlink_to(loop / "train" / "x1")
    line = main_error(capsys, "evaluate", "--weights", teacher_ckpt, "--data", f"imagefolder:{loop},cache=0")
    assert "cannot read" in line and "x" in line
    line = main_error(capsys, "evaluate", "--weights", teacher_ckpt, "--data", f"imagefolder:{folder},size=99999999")
    assert "too large" in line
    # a corrupt test image is found before the first epoch, not after training
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / "test" / "dog" / "3.png").write_bytes(b"\x89PNG not an image")
    for cmd in (["train"], ["distill", "--teacher", teacher_ckpt, "--method", "student"]):
        line = main_error(capsys, *cmd, "--data", f"imagefolder:{bad},cache=0", "--out", tmp_path / "r",
                          "--model", "mobilenetv2:width=0.25,drop=12", "--epochs", 1)
        assert "3.png" in line
    assert not (tmp_path / "r").exists()


def test_bad_numbers_config_sections_and_encodings(capsys, tmp_path, folder, teacher_ckpt):
    data = f"imagefolder:{folder}"
    for args, words in [
        (["evaluate", "--weights", teacher_ckpt, "--data", data, "--batch-size", 0], ["--batch-size", "out of range"]),
        (["export", "--weights", teacher_ckpt, "--data", data, "--output", tmp_path / "m.onnx", "--atol", "nan"],
         ["--atol", "finite"]),
        (["export", "--weights", teacher_ckpt, "--data", data, "--output", tmp_path / "m.onnx", "--min-agreement", 101],
         ["--min-agreement"]),
        (["audit", "--teacher", teacher_ckpt, "--student", teacher_ckpt, "--data", data, "--ig-steps", 0], ["--ig-steps"]),
        (["bench", "latency", "--model", "mobilenetv2", "--threads", "x"], ["--threads", "not an integer"]),
    ]:
        line = main_error(capsys, *args)
        assert all(w in line for w in words), line
    assert not (tmp_path / "m.onnx").exists()
    (tmp_path / "d5.yaml").write_text("distill: 5\n")
    line = main_error(capsys, "distill", "--config", tmp_path / "d5.yaml", "--out", tmp_path / "r", "--data", data)
    assert "section 'distill:'" in line and "not a mapping" in line
    (tmp_path / "bad.yaml").write_bytes(b"train:\n  epochs: \xff\xfe\n")
    line = main_error(capsys, "train", "--config", tmp_path / "bad.yaml", "--out", tmp_path / "r")
    assert "not UTF-8" in line
    (tmp_path / "cm.json").write_bytes(b'{"a": "\xff"}')
    line = main_error(capsys, "evaluate", "--weights", teacher_ckpt, "--data", data, "--class-map", tmp_path / "cm.json")
    assert "class map" in line and "not UTF-8" in line
    assert not (tmp_path / "r").exists()


def test_no_nan_in_json_outputs(tmp_path, folder, capsys):
    """What broke #9: --val-fraction 0 wrote bare NaN tokens (not JSON) into summary.json."""
    import json
    from igkd.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", f"imagefolder:{folder}", "--model", "mobilenetv2:width=0.25,drop=12", "--epochs", "1",
              "--val-fraction", "0", "--quiet", "--json", "--out", str(tmp_path / "r")])
    assert e.value.code == 0

    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)  # --json: stdout is strict JSON alone
    assert printed["val_accuracy"] is None and printed["test_accuracy"] >= 0

    files = [p for p in (tmp_path / "r").iterdir() if p.suffix in (".json", ".jsonl")]
    assert {"summary.json", "metrics.jsonl"} <= {p.name for p in files}
    for p in files:
        for line in (p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]):
            json.loads(line, parse_constant=refuse)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["val_accuracy"] is None


@pytest.mark.parametrize("command", [["train"], ["distill"], ["precompute"], ["evaluate"], ["demo"],
                                     ["bench", "latency"], ["export"], ["audit"], ["experiment", "ablation"],
                                     ["experiment", "montecarlo"], ["experiment", "compression"],
                                     ["experiment", "search"], ["report"]])
def test_every_command_with_a_result_has_json(command, capsys):
    from igkd.cli import main
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert "--json" in capsys.readouterr().out


# ---------------------------------------------------------------- stores, locks, full disks (#2, #4, #5, #7)
# Real igkd processes on the tiny image folder above (2 classes x 6 PNGs).

TINY = "mobilenetv2:width=0.25,drop=12"
FILES = [f"{a}.npy" for a in ARRAYS]


def pre_args(teacher_ckpt, folder, store, *extra):
    return ["precompute", "--teacher", teacher_ckpt, "--data", f"imagefolder:{folder}", "--store", store,
            "--ig-steps", 2, "--check-images", 0, "--threads", 1, "--chunk-size", 4, *extra]


def distill_args(teacher_ckpt, folder, store, out, *extra):
    return ["distill", "--teacher", teacher_ckpt, "--data", f"imagefolder:{folder}", "--store", store, "--out", out,
            "--ig-steps", 2, "--check-images", 0, "--threads", 1, "--chunk-size", 4, "--model", TINY,
            "--batch-size", 4, "--epochs", 1, "--method", "kd+ig", "--p", 0.5, *extra]


def train_args(folder, out, *extra):
    return ["train", "--data", f"imagefolder:{folder}", "--out", out, "--model", TINY, "--batch-size", 4,
            "--threads", 1, "--quiet", *extra]


def arrays(store: Path) -> dict:
    return {f: (store / f).read_bytes() for f in FILES}


def temporaries(root: Path) -> list:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher_ckpt, folder):
    """A store computed once without interruption (the expected bytes)."""
    store = tmp_path_factory.mktemp("ref") / "store"
    r = igkd(*pre_args(teacher_ckpt, folder, store))
    assert r.returncode == 0, r.stderr
    return store


def copy_store(reference, tmp_path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    return store


# ------------------------------------------------------------------ verification on open
def flip_bytes(f: Path) -> None:
    """Damage the data of an array as a disk or a stray write would: same size, new mtime."""
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.seek(size - 40)
        chunk = bytearray(fh.read(16))
        fh.seek(size - 40)
        fh.write(bytes(b ^ 0x5A for b in chunk))
    assert f.stat().st_size == size


def test_flipped_maps_are_recomputed_before_distill_trains(reference, teacher_ckpt, folder, tmp_path):
    store = copy_store(reference, tmp_path)
    flip_bytes(store / "maps.npy")
    assert (store / "maps.npy").read_bytes() != (reference / "maps.npy").read_bytes()
    r = igkd(*distill_args(teacher_ckpt, folder, store, tmp_path / "run", "--quiet"))
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("igkd: warning:")]
    assert len(warnings) == 1 and "maps.npy" in warnings[0] and "checksum" in warnings[0], r.stderr
    # the store the student trained on is the correct one: recomputed byte for byte
    assert arrays(store) == arrays(reference)
    assert (tmp_path / "run" / "summary.json").exists()
    # verified again and recorded: the next run neither warns nor recomputes
    again = igkd(*distill_args(teacher_ckpt, folder, store, tmp_path / "run2", "--quiet"))
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr


@pytest.mark.parametrize("damage,words", [
    ("truncate", ["maps.npy", "truncated"]),
    ("missing", ["logits.npy", "missing"]),
    ("header", ["delta.npy", "header"]),
    ("shape", ["gap.npy", "layout"]),
])
def test_damaged_array_is_recomputed_in_one_line(reference, teacher_ckpt, folder, tmp_path, damage, words):
    store = copy_store(reference, tmp_path)
    if damage == "truncate":
        with open(store / "maps.npy", "r+b") as f:
            f.truncate((store / "maps.npy").stat().st_size - 100)
    elif damage == "missing":
        (store / "logits.npy").unlink()
    elif damage == "header":
        (store / "delta.npy").write_bytes(b"not an npy file at all" * 10)
    else:  # a valid .npy of the wrong length
        np.save(store / "gap.npy", np.zeros(5, np.float32))
    r = igkd(*pre_args(teacher_ckpt, folder, store, "--quiet"))
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("igkd: warning: ") and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert arrays(store) == arrays(reference) and not (store / "chunks").exists()


@pytest.mark.parametrize("manifest", ["{ not json", "[1, 2]", '{"format": "igkd-store/1"}'])
def test_damaged_manifest_is_refused_in_one_line_and_nothing_is_deleted(reference, teacher_ckpt, folder, tmp_path,
                                                                        manifest):
    store = copy_store(reference, tmp_path)
    (store / "manifest.json").write_text(manifest)
    before = sorted(p.name for p in store.iterdir())
    r = igkd(*pre_args(teacher_ckpt, folder, store))
    assert_user_error(r, "manifest.json" if manifest != "[1, 2]" else "store format")
    assert sorted(p.name for p in store.iterdir()) == before  # igkd cannot tell what it is: it deletes nothing
    d = igkd(*distill_args(teacher_ckpt, folder, store, tmp_path / "run"))
    assert_user_error(d)
    assert not (tmp_path / "run").exists()  # never trained


def test_verify_modes_hash_what_changed_since_last_verified(tmp_path, monkeypatch):
    store = precompute(tiny_teacher(), tiny_dataset(), CFG, tmp_path / "s", quiet=True).path
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(store_module.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    manifest = json.loads((store / "manifest.json").read_text())
    assert set(json.loads((store / VERIFIED).read_text())["arrays"]) == set(FILES)  # verified at write time
    open_store(store)
    assert hashed == []  # auto: nothing changed since the write
    open_store(store, verify="always")
    assert len(hashed) == len(FILES)
    hashed.clear()
    os.utime(store / "gap.npy", ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: re-checked once
    open_store(store)
    open_store(store)
    assert len(hashed) == 1
    # damage that keeps the size and even restores the mtime: ctime still tells (auto), never does not look
    st = (store / "maps.npy").stat()
    flip_bytes(store / "maps.npy")
    os.utime(store / "maps.npy", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(StoreDamaged, match="maps.npy does not match its checksum"):
        open_store(store)
    assert open_store(store, verify="never").manifest == manifest  # size and header are intact
    with pytest.raises(StoreDamaged, match="checksum"):
        open_store(store, verify="always")


def test_store_without_verification_record_is_hashed_once(tmp_path, monkeypatch):
    """Stores written before verified.json existed (or whose record is damaged): auto
    hashes every array on first use, records it, then trusts the record."""
    store = precompute(tiny_teacher(), tiny_dataset(), CFG, tmp_path / "s", quiet=True).path
    (store / VERIFIED).write_text("{ damaged")
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(store_module.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    open_store(store)
    assert len(hashed) == len(FILES)
    open_store(store)
    assert len(hashed) == len(FILES)


def test_verify_store_is_an_option_and_not_part_of_the_identity(reference, teacher_ckpt, folder, tmp_path):
    store = copy_store(reference, tmp_path)
    flip_bytes(store / "maps.npy")
    # never: only size and header, so the damage goes unseen (and the same store is reused, not another one)
    r = igkd(*pre_args(teacher_ckpt, folder, store, "--verify-store", "never"))
    assert r.returncode == 0 and "reusing store" in r.stderr and "warning" not in r.stderr, r.stderr
    r = igkd(*pre_args(teacher_ckpt, folder, store, "--verify-store", "always", "--quiet"))
    assert r.returncode == 0 and "maps.npy" in r.stderr and "recomputing" in r.stderr, r.stderr
    assert arrays(store) == arrays(reference)
    assert_user_error(igkd(*pre_args(teacher_ckpt, folder, store, "--verify-store", "sometimes")), "--verify-store")


# ------------------------------------------------------------------ second precompute, store lock
def test_second_precompute_reuses_the_finished_store(reference, teacher_ckpt, folder, tmp_path):
    store = copy_store(reference, tmp_path)
    (store / "chunks").mkdir()  # as left by an older igkd killed after writing the manifest
    (store / ".maps.npy.abcd1234.tmp").write_bytes(b"x" * 1000)  # a killed writer's temporary
    r = igkd(*pre_args(teacher_ckpt, folder, store))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "reusing store" in r.stderr and "complete" in r.stderr and "store:" in r.stdout
    assert not (store / "chunks").exists() and not temporaries(store) and not (store / LOCK_NAME).exists()
    assert arrays(store) == arrays(reference)


def test_precompute_waits_for_the_store_writer_then_reuses(reference, teacher_ckpt, folder, tmp_path):
    store = tmp_path / "store"
    lock = DirLock(store, "store").acquire()  # this test process is writing the store
    proc = subprocess.Popen([sys.executable, "-m", "igkd.cli", *map(str, pre_args(teacher_ckpt, folder, store))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "waiting for store" in line and f"pid {os.getpid()}" in line, line
        time.sleep(0.5)
        assert proc.poll() is None and not (store / "chunks").exists()  # it waits, touching nothing
        shutil.copytree(reference, store, dirs_exist_ok=True, ignore=shutil.ignore_patterns(LOCK_NAME))
    finally:
        lock.release()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "reusing store" in err, err
    assert arrays(store) == arrays(reference)


def test_concurrent_precomputes_build_one_store(reference, teacher_ckpt, folder, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "igkd.cli", *map(str, pre_args(teacher_ckpt, folder, store))]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(rc == 0 and "Traceback" not in err for _, err, rc in results), results
    assert sum("reusing store" in err for _, err, _ in results) == 1, results  # one built it, one reused it
    assert arrays(store) == arrays(reference)
    assert sorted(p.name for p in store.iterdir()) == sorted([*FILES, "manifest.json", VERIFIED])


# ------------------------------------------------------------------ run directory lock
def test_two_trainings_into_one_out_leave_one_consistent_run(folder, tmp_path):
    out = tmp_path / "run"
    procs = {lr: subprocess.Popen([sys.executable, "-m", "igkd.cli", *map(str, train_args(folder, out, "--lr", lr,
                                                                                          "--epochs", 3))],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lr in ("0.01", "0.02")}
    done = {lr: p.communicate(timeout=300) + (p.returncode, p.pid) for lr, p in procs.items()}
    assert sorted(d[2] for d in done.values()) == [0, 2], done
    (won, (_, _, _, won_pid)), = [(lr, d) for lr, d in done.items() if d[2] == 0]
    lost = next(d for d in done.values() if d[2] == 2)
    refused = subprocess.CompletedProcess([], lost[2], lost[0], lost[1])
    assert_user_error(refused, f"run directory {out}")
    assert f"pid {won_pid} on host {socket.gethostname()}" in lost[1] or "already holds a run" in lost[1], lost[1]
    # everything in the folder belongs to the winner
    config = yaml.safe_load((out / "config.yaml").read_text())
    state = torch.load(out / "last.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert config["lr"] == state["config"]["lr"] == summary["lr"] == float(won)
    assert len(metrics) == state["epoch"] == 3 and [m["epoch"] for m in metrics] == [1, 2, 3]
    assert json.loads((out / "model.json").read_text())["metrics"]["epoch"] == summary["best_epoch"]
    assert not (out / LOCK_NAME).exists() and not temporaries(out)


def test_run_directory_being_written_is_refused_in_one_line(folder, tmp_path):
    out = tmp_path / "run"
    with DirLock(out, "run directory").acquire():
        r = igkd(*train_args(folder, out, "--epochs", 1), process=True)
        assert_user_error(r, f"run directory {out} is being written by igkd pid {os.getpid()} on host "
                             f"{socket.gethostname()}", "choose another --out")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # it wrote nothing
    assert not out.exists()  # the lock created the folder and removed it again, empty


def test_stale_lock_of_a_killed_process_is_taken_over(folder, tmp_path):
    out = tmp_path / "run"
    code = ("import os, signal, sys; from igkd.lock import DirLock; "
            "DirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    dead = subprocess.Popen([sys.executable, "-c", code, str(out)])
    assert dead.wait(timeout=120) == -signal.SIGKILL
    info = json.loads((out / LOCK_NAME).read_text())  # the lock file outlives its owner
    assert info["pid"] == dead.pid and info["host"] == socket.gethostname()
    (out / ".last.pt.k1ll3d00.tmp").write_bytes(b"half a checkpoint")  # as a run killed mid-save leaves it
    r = igkd(*train_args(folder, out, "--epochs", 1), process=True)
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists() and not (out / LOCK_NAME).exists() and not temporaries(out)


# ------------------------------------------------------------------ disk full
OTHERWISE = "test_disk_full_is_injected_at_the_write covers the code path"


def store_bytes(reference) -> int:
    return sum((reference / f).stat().st_size for f in FILES)


def test_full_disk_during_precompute_is_one_line_and_resumes_to_the_same_store(small_real, tmp_path):
    args = ["precompute", "--teacher", small_real / "teacher.safetensors", "--data",
            f"imagefolder:{small_real / 'data'},gray=1", "--threads", 1, "--ig-steps", 2, "--chunk-size", 32,
            "--check-images", 0, "--quiet"]
    ref = tmp_path / "ref"
    assert igkd(*args, "--store", ref, process=True).returncode == 0
    need = store_bytes(ref)  # ~0.8 MB; the chunks take about as much again, plus a 4 KiB page per small file
    with tmpfs(tmp_path / "disk", f"{need // 3 // 1024}k", OTHERWISE) as resize:
        store = tmp_path / "disk" / "store"
        r = igkd(*args, "--store", store, process=True)  # full while writing the chunks
        assert_user_error(r, "disk full at", str(store / "chunks"), "free space and rerun")
        assert not temporaries(tmp_path / "disk") and not (store / "manifest.json").exists()
        resize(f"{(need * 3 // 2 + 160 * 1024) // 1024}k")  # the chunks fit, the final arrays do not
        r = igkd(*args, "--store", store, process=True)
        assert_user_error(r, "disk full at", str(store), ".npy", "free space and rerun")
        assert not temporaries(tmp_path / "disk") and not (store / "manifest.json").exists()
        assert len(list((store / "chunks").glob("*.npz"))) == 16  # finished work is kept
        resize("16m")
        r = igkd(*args, "--store", store, process=True)
        assert r.returncode == 0, r.stderr
        assert arrays(store) == arrays(ref) and not (store / "chunks").exists() and not temporaries(store)


def test_full_disk_during_training_is_one_line(folder, tmp_path):
    with tmpfs(tmp_path / "disk", "12k", OTHERWISE):  # three 4 KiB pages: the lock, config.yaml, then nothing
        out = tmp_path / "disk" / "run"
        r = igkd(*train_args(folder, out, "--epochs", 1), process=True)
        assert_user_error(r, "disk full at", str(out), "free space and rerun")
        assert not temporaries(tmp_path / "disk") and not (out / LOCK_NAME).exists()


def test_disk_full_is_injected_at_the_write(tmp_path, monkeypatch):
    """Without a size-limited filesystem: ENOSPC at finalisation names the array, leaves no
    temporary and no manifest; the rerun finishes the same store."""
    data, teacher = tiny_dataset(), tiny_teacher()
    ref = precompute(teacher, data, CFG, tmp_path / "ref", quiet=True)
    precompute(teacher, data, CFG, tmp_path / "s", quiet=True, chunks=[0, 1, 2])
    real = store_module.StoreWriter._write

    class FullDisk:  # a file on a full disk: the write fails, as os.write does, without a file name
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full(self, f, h, data, name):  # the first chunk of maps fails
        real(self, FullDisk() if name == "maps" and len(data) > 1000 else f, h, data, name)
    monkeypatch.setattr(store_module.StoreWriter, "_write", full)
    with pytest.raises(OSError) as e:
        precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "s" / "maps.npy")
    assert not temporaries(tmp_path / "s") and not (tmp_path / "s" / "manifest.json").exists()
    monkeypatch.undo()
    again = precompute(teacher, data, CFG, tmp_path / "s", quiet=True)
    assert again.manifest["files"] == ref.manifest["files"] and arrays(tmp_path / "s") == arrays(ref.path)
