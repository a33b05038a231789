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
            assert_user_error(igkd("evaluate", "--weights", weights, "--data", spec))
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
                      "--out", tmp_path)
    assert "--out" in line and "is a folder" in line


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
        (["export", "--weights", teacher_ckpt, "--data", data, "--out", tmp_path / "m.onnx", "--atol", "nan"],
         ["--atol", "finite"]),
        (["export", "--weights", teacher_ckpt, "--data", data, "--out", tmp_path / "m.onnx", "--min-agreement", 101],
         ["--min-agreement"]),
        (["audit", "--teacher", teacher_ckpt, "--student", teacher_ckpt, "--data", data, "--steps", 0], ["--steps"]),
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
