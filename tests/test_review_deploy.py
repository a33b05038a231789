"""Review of the deployment commands (export, bench latency, audit) and the model card:
defects found and fixed, each test failing on the code before its fix."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import igkd
from helpers_cli import run_igkd
from helpers_data import write_image_folder
from igkd.models import build_model, read_metadata, save_checkpoint

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
TINY = "mobilenetv2:width=0.25,drop=14"


def one_line_error(r, *words) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), lines
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_demo_model(stem: Path) -> Path:
    """A tiny untrained checkpoint for the demo data (``stem``.safetensors and .json): the
    demo teacher's export and IG cost seconds on a loaded 2-core machine, this one's little."""
    torch.manual_seed(0)
    return save_checkpoint(stem, build_model(TINY, 10, 1), {
        "model": TINY, "num_classes": 10, "in_channels": 1, "classes": igkd.load_dataset("demo").classes,
        "image_size": [28, 28], "dataset": "demo", "preprocessing": {"normalize": "none"}})


# ---------------------------------------------------------------- export: what it may overwrite


def test_export_never_overwrites_the_checkpoint_or_a_file_it_did_not_write(tmp_path):
    run = tmp_path / "run"  # a training run's folder: model.safetensors + model.json, summary.json
    tiny_demo_model(run / "model")
    (run / "summary.json").write_text('{"test_accuracy": 87.8}\n')
    before = {p.name: digest(p) for p in run.iterdir()}
    weights = run / "model.safetensors"
    # --output run/model (TorchScript needs no suffix): its sidecar run/model.json replaced the
    # checkpoint's metadata, and the checkpoint no longer loaded
    one_line_error(run_igkd("export", "--weights", weights, "--format", "torchscript", "--output", run / "model",
                            "--images", "10"), "model.json", "overwrite the checkpoint", "another --output")
    # the sidecar would replace a file of the run's that is no export's metadata
    one_line_error(run_igkd("export", "--weights", weights, "--format", "torchscript", "--output", run / "summary",
                            "--images", "10"), "summary.json", "not an igkd export's")
    # the export written over the very checkpoint it exports
    foreign = tmp_path / "foreign.pt"
    torch.save(build_model(TINY, 10, 1).state_dict(), foreign)
    kept = digest(foreign)
    one_line_error(run_igkd("export", "--weights", foreign, "--model", TINY, "--data", "demo", "--format",
                            "torchscript", "--output", foreign, "--images", "10", "--normalize", "none"),
                   "overwrite the checkpoint")
    assert digest(foreign) == kept
    assert {p.name: digest(p) for p in run.iterdir()} == before
    assert read_metadata(weights)["format"] == "igkd-checkpoint/1"
    # an export's own earlier sidecar is still replaced by a rerun
    out = tmp_path / "teacher.pt"
    Path(f"{out}.json").write_text('{"format": "igkd-export/1", "int8": false}\n')
    r = run_igkd("export", "--weights", weights, "--format", "torchscript", "--output", out, "--images", "10",
                 "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(Path(f"{out}.json").read_text())["source"]["weights"] == str(weights)


def test_export_refuses_data_of_another_image_size_than_the_model_learnt(tmp_path):
    # the export's input size is the data's: a 32-pixel model exported with 20-pixel data was
    # written for 20x20 inputs, its sidecar saying so, without a word
    write_image_folder(tmp_path / "img", 2, 20, ("a", "b"))
    weights = save_checkpoint(tmp_path / "m" / "model", build_model(TINY, 2, 3), {
        "model": TINY, "num_classes": 2, "in_channels": 3, "classes": ["a", "b"], "image_size": [32, 32]})
    one_line_error(run_igkd("export", "--weights", weights, "--data", f"imagefolder:{tmp_path / 'img'}", "--output",
                            tmp_path / "m.onnx"), "trained on 32x32 images", "has 20x20", "size=32x32")
    assert not list(tmp_path.glob("m.onnx*"))
    # the same data at the model's size exports
    r = igkd.export_model(weights, tmp_path / "m.onnx", data=f"imagefolder:{tmp_path / 'img'},size=32", quiet=True)
    assert json.loads((tmp_path / "m.onnx.json").read_text())["input"]["shape"] == ["batch", 3, 32, 32]
    assert r["parity"]["images"] == 4


def test_export_says_the_missing_dataset_came_from_the_checkpoint(tmp_path):
    # a run records its --data as typed: a relative folder is not found from elsewhere, and the
    # error named a folder the user never typed
    weights = save_checkpoint(tmp_path / "m" / "model", build_model(TINY, 2, 3), {
        "model": TINY, "num_classes": 2, "in_channels": 3, "classes": ["a", "b"], "dataset": "imagefolder:imgs"})
    one_line_error(run_igkd("export", "--weights", weights, "--output", tmp_path / "m.onnx"),
                   "imagefolder:imgs, from its metadata", "pass --data SPEC")
    assert not list(tmp_path.glob("m.onnx*"))


FFT_NET = '''
import torch
from torch import nn


class Net(nn.Module):  # an operator ONNX has no form for
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.fc = nn.Linear(in_channels * 28 * 15, num_classes)

    def forward(self, x):
        return self.fc(torch.fft.rfft2(x).abs().flatten(1))


def make(num_classes=10, in_channels=3):
    return Net(num_classes, in_channels)
'''


def test_a_model_onnx_cannot_express_is_one_line_and_torchscript_still_exports(tmp_path, capfd):
    # torch.onnx's UnsupportedOperatorError came out as a traceback from export and from
    # bench latency --runtime onnxruntime
    (tmp_path / "fftnet.py").write_text(FFT_NET)
    spec = f"py:{tmp_path / 'fftnet.py'}:make"
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "m", build_model(spec, 10, 1), {"model": spec, "num_classes": 10,
                                                                        "in_channels": 1})
    args = ["--weights", weights, "--model", spec, "--data", "demo", "--images", "20", "--normalize", "none"]
    r = run_igkd("export", *args, "--output", tmp_path / "out" / "m.onnx", "--quiet")
    one_line_error(r, "cannot be exported to ONNX", "aten::fft_rfft2", "--format torchscript")
    assert r.stdout == "" and capfd.readouterr().out == ""  # torch's exporter dumped its IR graph on fd 1
    assert not (tmp_path / "out").exists()
    one_line_error(run_igkd("bench", "latency", "--model", spec, "--input", "1x28x28", "--runtime", "onnxruntime",
                            "--warmup", "0", "--min-time", "0", "--min-reps", "1"), "--runtime eager")
    r = run_igkd("export", *args, "--format", "torchscript", "--output", tmp_path / "m.pt", "--quiet")
    assert r.returncode == 0, r.stderr


FIXED_BATCH_NET = FFT_NET.replace("torch.fft.rfft2(x).abs().flatten(1)", "x.reshape(int(x.shape[0]), -1)")\
    .replace("28 * 15", "28 * 28")


def test_a_model_that_makes_its_batch_size_a_constant_fails_in_one_line(tmp_path):
    # int(x.shape[0]) is a constant in the traced graph: the ONNX file runs at batch 1 alone,
    # the TorchScript one at 2; the parity check (and bench latency at batch 4) died in ONNX
    # Runtime's or TorchScript's traceback
    (tmp_path / "fixed.py").write_text(FIXED_BATCH_NET)
    # and one that runs, one row of logits for the whole batch: that row was broadcast over the
    # batch and compared as if it were every image's
    (tmp_path / "rows.py").write_text(FIXED_BATCH_NET.replace("x.reshape(int(x.shape[0]), -1)",
                                                              "x.reshape(int(x.shape[0]), -1)[:, :784]"))
    for module in ("fixed", "rows"):
        spec = f"py:{tmp_path / module}.py:make"
        weights = save_checkpoint(tmp_path / module, build_model(spec, 10, 1), {"model": spec, "num_classes": 10,
                                                                               "in_channels": 1})
        args = ["--weights", weights, "--model", spec, "--data", "demo", "--images", "5", "--normalize", "none",
                "--quiet"]
        for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"))[:2 if module == "fixed" else 1]:
            one_line_error(run_igkd("export", *args, "--format", fmt, "--output", tmp_path / "out" / name),
                           "parity check failed", "cannot run 5 test images", "nothing written", "int(x.shape[0])")
    spec = f"py:{tmp_path / 'fixed'}.py:make"
    assert not (tmp_path / "out").exists()
    one_line_error(run_igkd("bench", "latency", "--model", spec, "--input", "1x28x28", "--runtime", "onnxruntime",
                            "--batch-size", "1,4", "--warmup", "0", "--min-time", "0", "--min-reps", "1", "--quiet",
                            "--out", tmp_path / "run"), "fails in runtime onnxruntime at batch size 4")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- bench latency


def test_bench_latency_measures_a_repeated_batch_size_or_runtime_once():
    # "1,1": each measured twice, and the reference's second measurement was the base of both
    # blocks: the reference's own first row read a speed-up other than 1.00x
    r = igkd.bench_latency(TINY, batch_size=["1", "2,1"], runtime="eager,eager", threads=1, input="3x8x8", warmup=0,
                           min_time=0.0, min_reps=1, quiet=True)
    assert [(row["runtime"], row["batch"]) for row in r["rows"]] == [("eager", 1), ("eager", 2)]
    assert [row["speedup"] for row in r["rows"]] == [1.0, 1.0]


def test_bench_latency_of_a_model_that_cannot_take_the_input_is_one_line(tmp_path):
    # a 1-channel TorchScript model against the default --input 3x32x32 failed inside the
    # timing loop with a TorchScript traceback
    path = tmp_path / "gray.pt"
    torch.jit.save(torch.jit.freeze(torch.jit.script(build_model(TINY, 10, 1).eval())), str(path))
    one_line_error(run_igkd("bench", "latency", "--model", f"torchscript:{path}", "--threads", "1", "--warmup", "0",
                            "--min-time", "0", "--min-reps", "1", "--out", tmp_path / "run"),
                   "fails on a 3x32x32 input", "to have 1 channels", "--input")
    assert not (tmp_path / "run").exists()
    r = igkd.bench_latency(f"torchscript:{path}", input="1x8x8", threads=1, warmup=0, min_time=0.0, min_reps=1,
                           quiet=True)
    assert r["rows"][0]["macs"] > 0


# ---------------------------------------------------------------- audit


def test_audit_and_export_take_a_torchscript_model_as_distill_does(tmp_path):
    # --teacher torchscript:FILE (what export writes, as distill's --teacher takes it) was looked
    # for as a file named "torchscript:FILE": "does not exist"
    student = tiny_demo_model(tmp_path / "model")
    teacher = tmp_path / "teacher.pt"  # traced and frozen, as export writes it
    from igkd.export import torchscript_module
    torch.jit.save(torchscript_module(igkd.load_model(student)[0], (1, 28, 28)), str(teacher))
    r = run_igkd("audit", "--teacher", f"torchscript:{teacher}", "--student", student, "--data", "demo",
                 "--images", "2", "--ig-steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["teacher"]["model"] == f"torchscript:{teacher}" and result["teacher"]["params"] is None
    assert result["students"][0]["spearman_mean"] == pytest.approx(1.0)  # the same function, exported
    one_line_error(run_igkd("audit", "--teacher", f"torchscript:{tmp_path / 'gone.pt'}", "--student", DEMO_TEACHER,
                            "--data", "demo"), f"{tmp_path / 'gone.pt'} does not exist")
    # export took it neither: "weights file torchscript:FILE does not exist"
    r = igkd.export_model(f"torchscript:{teacher}", tmp_path / "t.onnx", data="demo", images=10, quiet=True)
    assert r["parity"]["top1_agreement"] == 100.0
    assert json.loads((tmp_path / "t.onnx.json").read_text())["source"]["sha256"] == digest(teacher)


def test_an_audit_whose_agreement_is_undefined_still_renders_in_the_report(tmp_path):
    # images equal to the IG baseline: every map is zero, the agreement undefined (NaN, null in
    # audit.json); the report then refused the file as "not as igkd writes it"
    import numpy as np
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "black" / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "black" / split / c / f"{i}.png")
    weights = save_checkpoint(tmp_path / "m" / "model", build_model(TINY, 2, 3), {
        "model": TINY, "num_classes": 2, "in_channels": 3, "classes": ["a", "b"]})
    r = igkd.audit(str(weights), str(weights), f"imagefolder:{tmp_path / 'black'}", images=4, ig_steps=2, gallery=0,
                   out=tmp_path / "run", quiet=True)
    assert r["students"][0]["spearman_mean"] != r["students"][0]["spearman_mean"]  # NaN
    assert json.loads((tmp_path / "run" / "audit.json").read_text())["students"][0]["spearman_mean"] is None
    section = igkd.deployment_section(tmp_path / "run")
    row = next(line for line in section.splitlines() if line.startswith("| m/model"))
    assert row.split(" | ")[3:6] == ["n/a", "n/a", "100.0%"]


# ---------------------------------------------------------------- model card


def test_model_card_of_a_module_or_torchscript_teacher_says_what_it_knows():
    from igkd.modelcard import model_card
    summary = {"model": TINY, "dataset": "demo", "params": 10, "epochs": 1, "method": "kd", "val_images": 4,
               "teacher": {"path": None, "model": "module:Sequential", "params": 100, "fingerprint": "ab12"}}
    line = next(line for line in model_card(summary, {}).splitlines() if line.startswith("- **Teacher:**"))
    assert "None" not in line and "handed to the API as a module" in line and "100 parameters" in line
    summary["teacher"]["path"] = "runs/t/model.safetensors"
    assert "from `runs/t/model.safetensors`" in model_card(summary, {})
    # a frozen TorchScript teacher (--teacher torchscript:FILE) counts 0 parameters: its weights
    # are constants of its code, and the card said "0 parameters"
    summary["teacher"].update(path="t.pt", model="torchscript:t.pt", params=0)
    line = next(line for line in model_card(summary, {}).splitlines() if line.startswith("- **Teacher:**"))
    assert " 0 parameters" not in line and "parameters not countable" in line


def test_audit_takes_one_student_model_per_foreign_student(tmp_path):
    # one --student-model was applied to every student: a plain student and a compressed one of
    # another architecture, both foreign files, could not be audited together
    torch.manual_seed(0)
    teacher = tiny_demo_model(tmp_path / "teacher")
    torch.save(build_model(TINY, 10, 1).state_dict(), tmp_path / "a.pt")
    torch.save(build_model("resnet:depth=8,width=1", 10, 1).state_dict(), tmp_path / "b.pt")
    students = f"{tmp_path / 'a.pt'},{tmp_path / 'b.pt'}"
    r = igkd.audit(teacher, students, "demo", images=2, ig_steps=2, gallery=0, quiet=True,
                   student_model=f"{TINY}; resnet:depth=8,width=1")
    assert [s["model"] for s in r["students"]] == [TINY, "resnet:depth=8,width=1"]
    with pytest.raises(igkd.UserError, match="--student-model gives 3 specs for 2 --student files"):
        igkd.audit(teacher, students, "demo", images=2, gallery=0, quiet=True, student_model=f"{TINY};{TINY};x")
    # one spec still serves every student
    r = igkd.audit(teacher, f"{tmp_path / 'a.pt'},{tmp_path / 'a.pt'}", "demo", images=2, ig_steps=2, gallery=0,
                   quiet=True, student_model=TINY)
    assert [s["model"] for s in r["students"]] == [TINY, TINY]
    # one spec for two students of different architectures: the error says how to give one each
    with pytest.raises(igkd.UserError, match=r"was applied to every --student: .* separated by ';', empty where "
                                             r"the file names its own"):
        igkd.audit(teacher, students, "demo", images=2, gallery=0, quiet=True, student_model=TINY)
