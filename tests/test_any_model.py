"""Any teacher, any student (issue 11), end to end on small real images: `igkd distill
--method kd+ig+at` for one epoch on pairs within and across families (random-init
teachers, few images, 2 IG steps), a user's py: model through the igkd command and back
through evaluate and export without its spec, a TorchScript teacher, and --init teacher."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from igkd.attribution.ig import integrated_gradients
from igkd.cli import run
from igkd.data import load_dataset
from igkd.errors import UserError
from igkd.models import build_model, copy_matching, count_parameters, save_checkpoint

HERE = Path(__file__).resolve().parent
CLASSES = ["c0", "c1", "c2"]


def small_net(num_classes, in_channels, width=8):
    """A user's own network, reached as py:test_any_model:small_net,width=8."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def not_a_module(num_classes, in_channels):
    return "a string"


def _folder(root: Path, train: int, test: int) -> Path:
    """Demo images (real Fashion-MNIST) of three classes as PNG class folders."""
    demo = load_dataset("demo")
    for split, n in (("train", train), ("test", test)):
        data, count = getattr(demo, split), {c: 0 for c in range(3)}
        for i in range(len(data.labels)):
            c = int(data.labels[i])
            if c < 3 and count[c] < n // 3:
                (root / split / CLASSES[c]).mkdir(parents=True, exist_ok=True)
                Image.fromarray(data.images[i, 0].numpy()).save(root / split / CLASSES[c] / f"{i}.png")
                count[c] += 1
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-model")
    return {32: f"imagefolder:{_folder(root / 'small', 24, 12)},size=32",
            224: f"imagefolder:{_folder(root / 'large', 3, 3)},size=224", "root": root}


def teacher(root: Path, spec: str) -> Path:
    """A randomly initialised teacher checkpoint (no training: the pipeline is under test)."""
    path = root / spec.replace(":", "_").replace(",", "_").replace("=", "")
    if not path.with_suffix(".safetensors").exists():
        torch.manual_seed(0)
        save_checkpoint(path, build_model(spec, 3, 3), {"model": spec, "num_classes": 3, "in_channels": 3,
                                                          "classes": CLASSES, "preprocessing": {"normalize": "none"}})
    return path.with_suffix(".safetensors")


def distill_args(data_spec, teacher_path, student, out, method="kd+ig+at", *extra):
    return ["distill", "--data", data_spec, "--teacher", str(teacher_path), "--model", student, "--method", method,
            "--epochs", "1", "--batch-size", "8", "--ig-steps", "2", "--check-images", "0", "--val-fraction",
            "0.2", "--eval-batch-size", "16", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("size,teacher_spec,student,layers", [
    (32, "resnet:depth=56", "resnet:depth=20", ("layer2.8", "layer2.2")),
    (32, "wrn:depth=40,k=2", "wrn:depth=16,k=2", ("block2.layer", "block2.layer")),
    (32, "resnet:depth=32,width=4", "resnet:depth=8,width=4", ("layer2.4", "layer2.0")),
    (32, "mobilenetv2", "resnet:depth=20", ("features.6", "layer2.2")),
    (224, "resnet50", "mobilenetv2_imagenet", ("layer1.2", "features.3")),
])
def test_kd_ig_at_one_epoch_for_each_pair(data, tmp_path, size, teacher_spec, student, layers):
    out = tmp_path / "run"
    # ResNet-50 at 224 pixels costs about a second per image and IG step on 2 CPU cores: one image per class
    large = ["--batch-size", "3", "--val-fraction", "0", "--ig-steps", "1"] if size == 224 else []
    assert run(distill_args(data[size], teacher(data["root"], teacher_spec), student, out, "kd+ig+at", *large)) == 0
    s = json.loads((out / "summary.json").read_text())
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert s["method"] == "kd+ig+at" and s["model"] == student and s["teacher"]["model"] == teacher_spec
    assert (s["at"]["teacher_layer"], s["at"]["student_layer"]) == layers
    assert row["kd"] == row["kd"] and row["at"] > 0 and 0 <= s["test_accuracy"] <= 100
    assert s["params"] == sum(p.numel() for p in build_model(student, 3, 3).parameters())


def test_py_model_distills_through_the_command_then_evaluates_and_exports_with_its_spec(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}

    def igkd(*args):
        return subprocess.run([sys.executable, "-m", "igkd.cli", *args], env=env, capture_output=True, text=True,
                              cwd=tmp_path)

    spec = "py:test_any_model:small_net,width=6"
    r = igkd(*distill_args(data[32], teacher(data["root"], "resnet:depth=20"), spec, tmp_path / "run", "kd+ig"))
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["model"] == spec
    # the recorded py: spec is never run from the file: the command names it (and says how)
    r = igkd("evaluate", "--weights", str(tmp_path / "run" / "model.safetensors"), "--data", data[32], "--json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"runs code from outside the file; igkd runs no code a weights file names: if you trust it, pass " \
           f"--model {shlex.quote(spec)}" in r.stderr
    r = igkd("evaluate", "--weights", str(tmp_path / "run" / "model.safetensors"), "--model", spec, "--data", data[32],
             "--json")
    assert r.returncode == 0, r.stderr
    # conv 3->6 with bias, BatchNorm(6), conv 6->6 with bias, linear 6->3
    assert json.loads(r.stdout)["model"] == spec and json.loads(r.stdout)["params"] == (6 * 3 * 9 + 6) + 12 \
        + (6 * 6 * 9 + 6) + (6 * 3 + 3)
    r = igkd("export", "--weights", str(tmp_path / "run" / "model.safetensors"), "--out", str(tmp_path / "m.onnx"),
             "--model", spec, "--data", data[32], "--quiet")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0
    # a bad py: spec through the command: one line, exit 2, nothing written
    r = igkd(*distill_args(data[32], teacher(data["root"], "resnet:depth=20"), "py:no_such_module:f", tmp_path / "b",
                           "kd"))
    assert r.returncode == 2 and "cannot import module 'no_such_module'" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("bad,words", [("py:test_any_model:nothing", "has no callable 'nothing'"),
                                       ("py:test_any_model:not_a_module", "returned str, not a torch.nn.Module"),
                                       ("py:test_any_model:small_net,depth=3", "cannot be called with"),
                                       ("py:test_any_model", "needs a module and a callable")])
def test_bad_py_specs_are_one_line(data, tmp_path, bad, words):
    with pytest.raises(UserError, match=words) as e:
        run(distill_args(data[32], teacher(data["root"], "resnet:depth=20"), bad, tmp_path / "bad", "kd"))
    assert "\n" not in str(e.value) and not (tmp_path / "bad").exists()


def test_torchscript_teacher_gives_the_same_ig_and_distills(data, tmp_path, capsys):
    torch.manual_seed(0)
    eager = build_model("resnet:depth=20", 3, 3).eval()
    for m in eager.modules():  # BatchNorm statistics of a trained network
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
    torch.jit.save(torch.jit.script(eager), tmp_path / "t.pt")
    scripted = torch.jit.load(tmp_path / "t.pt")
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x))
    ours, theirs = integrated_gradients(scripted, x, y, n_steps=8), integrated_gradients(eager, x, y, n_steps=8)
    assert torch.linalg.norm(ours - theirs) <= 2e-3 * torch.linalg.norm(theirs)
    ts = f"torchscript:{tmp_path / 't.pt'}"
    assert run(distill_args(data[32], ts, "resnet:depth=8", tmp_path / "run", "kd+ig")) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["teacher"]["model"] == ts and s["teacher"]["params"] == sum(p.numel() for p in eager.parameters())
    with pytest.raises(UserError, match="TorchScript module, which cannot take the forward hooks") as e:
        run(distill_args(data[32], ts, "resnet:depth=8", tmp_path / "at", "kd+at"))
    assert "\n" not in str(e.value) and not (tmp_path / "at").exists()
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="is not a TorchScript file"):
        run(distill_args(data[32], f"torchscript:{tmp_path / 'junk.pt'}", "resnet:depth=8", tmp_path / "j", "kd"))


def test_init_teacher_copies_exactly_the_matching_tensors(data, tmp_path):
    torch.manual_seed(0)
    t, s = build_model("mobilenetv2", 3, 3), build_model("mobilenetv2:drop=5", 3, 3)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    copied = copy_matching(s, t)
    # the truncated student shares features.0-13 and the head's bias; its head weight is 96 x 3, not 1280 x 3
    assert set(copied) == set(before) - {"classifier.1.weight"}
    for k, v in s.state_dict().items():
        assert torch.equal(v, t.state_dict()[k] if k in copied else before[k]), k
    # through the command, on a narrow pair (the same structure, cheaper to train)
    narrow, student = "mobilenetv2:width=0.25", "mobilenetv2:width=0.25,drop=5"
    assert run(distill_args(data[32], teacher(data["root"], narrow), student, tmp_path / "r", "student",
                            "--init", "teacher")) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["init"] == {
        "from": "teacher", "copied": len(copied), "of": len(before)}
    # the copied layers keep the input they were trained on: a teacher trained on normalised
    # pixels (train's default) gives the student its normalisation, not distill's raw pixels
    pre = {"normalize": "dataset", "mean": [0.25, 0.5, 0.75], "std": [0.5, 0.25, 0.125]}
    torch.manual_seed(0)
    normed = save_checkpoint(tmp_path / "normed", build_model(narrow, 3, 3), {
        "model": narrow, "num_classes": 3, "in_channels": 3, "classes": CLASSES, "preprocessing": pre})
    assert run(distill_args(data[32], normed, student, tmp_path / "rn", "student", "--init", "teacher")) == 0
    assert json.loads((tmp_path / "rn" / "model.json").read_text())["preprocessing"] == pre
    assert yaml.safe_load((tmp_path / "rn" / "config.yaml").read_text())["normalize"] == "dataset"
    assert json.loads((tmp_path / "r" / "model.json").read_text())["preprocessing"] == {"normalize": "none"}
    with pytest.raises(UserError, match="shares no tensor") as e:
        run(distill_args(data[32], teacher(data["root"], narrow), "resnet:depth=20", tmp_path / "n", "student",
                         "--init", "teacher"))
    assert "\n" not in str(e.value) and not (tmp_path / "n").exists()


def test_python_api_takes_modules_for_teacher_and_student(data, tmp_path):
    import igkd
    from igkd.config import DistillConfig, build
    cfg = build(DistillConfig, dict(data=data[32], method="kd+ig+at", epochs=1, batch_size=8, ig_steps=2,
                                    check_images=0, val_fraction=0.2))
    torch.manual_seed(0)
    s = igkd.distill(cfg, tmp_path / "run", quiet=True, teacher=build_model("resnet:depth=20", 3, 3),
                     student=small_net(3, 3, 4))
    assert s["model"] == "module:Sequential"
    assert (s["at"]["teacher_layer"], s["at"]["student_layer"]) == ("layer2.2", "4")
    assert s["params"] == sum(p.numel() for p in small_net(3, 3, 4).parameters())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_new_families_export_with_parity_and_audit(data, tmp_path, fmt):
    import igkd
    wrn, resnet = teacher(data["root"], "wrn:depth=16,k=2"), teacher(data["root"], "resnet:depth=20")
    r = igkd.export_model(wrn, tmp_path / f"m.{fmt}", fmt, data=data[32], quiet=True)
    assert r["parity"]["images"] == 12 and r["parity"]["max_abs_diff"] <= 1e-3
    if fmt == "onnx":  # audit: IG agreement of a ResNet student with a WRN teacher, and with itself
        a = igkd.audit(str(wrn), f"{wrn},{resnet}", data[32], images=4, ig_steps=4, gallery=1, quiet=True)
        same, other = a["students"]
        assert same["spearman_mean"] == pytest.approx(1.0) and other["model"] == "resnet:depth=20"


@pytest.mark.parametrize("spec,gmacs", [("resnet18", 1.81), ("resnet34", 3.66), ("resnet50", 4.09),
                                        ("mobilenetv2_imagenet", 0.30)])
def test_macs_match_torchvisions_published_gflops(spec, gmacs):
    from igkd.evaluate.cost import count_macs
    assert round(count_macs(build_model(spec, 1000, 3), (3, 224, 224)) / 1e9, 2) == gmacs


def test_compression_sweep_walks_any_familys_knobs_and_explicit_students():
    from igkd.experiments.compression import student_specs
    from igkd.experiments.config import resolve
    cfg = resolve("compression", overrides=dict(sweep_base="wrn:depth=40,k=2", depths="16,28", widths="1",
                                                students="resnet:depth=20;mobilenetv2:drop=5"))
    assert student_specs(cfg) == [("depth", 16, "wrn:depth=16,k=2"), ("depth", 28, "wrn:depth=28,k=2"),
                                  ("width", 1.0, "wrn:depth=40,k=1"), ("spec", 0, "resnet:depth=20"),
                                  ("spec", 1, "mobilenetv2:drop=5")]
    cfg = resolve("compression", overrides=dict(sweep_base="resnet18", depths="", widths="0.5"))
    with pytest.raises(UserError, match="model 'resnet18' has no width knob"):
        student_specs(cfg)


def test_compression_sweeps_a_py_factory_by_the_knobs_its_user_names(tmp_path):
    """A py: factory's size options are its own keyword arguments, which igkd cannot know:
    --sweep-knobs names them, and the sweep builds each student through the factory."""
    from igkd.experiments.compression import student_specs
    from igkd.experiments.config import resolve
    (tmp_path / "mynet.py").write_text(
        "from torch import nn\n"
        "def make(num_classes=10, in_channels=3, blocks=3, mult=1.0):\n"
        "    c, layers = max(1, round(16 * mult)), []\n"
        "    for i in range(blocks):\n"
        "        layers += [nn.Conv2d(in_channels if i == 0 else c, c, 3, padding=1), nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))\n")
    base = f"py:{tmp_path}/mynet.py:make,blocks=3"
    cfg = resolve("compression", overrides=dict(sweep_base=base, depths="1,2", widths="0.5",
                                                sweep_knobs="depth=blocks, width=mult"))
    specs = student_specs(cfg)
    assert specs == [("depth", 1, f"py:{tmp_path}/mynet.py:make,blocks=1"),
                     ("depth", 2, f"py:{tmp_path}/mynet.py:make,blocks=2"),
                     ("width", 0.5, f"py:{tmp_path}/mynet.py:make,blocks=3,mult=0.5")]
    params = [count_parameters(build_model(spec, 10, 3)) for _, _, spec in specs]
    # 3->16 conv (448) + head (170); + a 16->16 conv (2320); 8 channels: 224 + 2 x 584 + 90
    assert params == [618, 2938, 1482]
    with pytest.raises(UserError, match="model 'py' has no depth knob to sweep; name the option --depths sets "
                                        "with --sweep-knobs depth=NAME"):
        student_specs(resolve("compression", overrides=dict(sweep_base=base, depths="1", widths="")))
    for bad in ("blocks", "height=blocks", "depth=", "depth=a-b"):
        with pytest.raises(UserError, match="is not 'depth=NAME,width=NAME'"):
            student_specs(resolve("compression", overrides=dict(sweep_base=base, sweep_knobs=bad)))


def test_compression_sweeps_one_model_once_however_it_is_named(capsys):
    from igkd.experiments.compression import student_specs
    from igkd.experiments.config import resolve
    # depth 5 of the base, the same model as an explicit student with its options in another
    # order, and a width listed twice: each was a table row and a curve point of its own
    cfg = resolve("compression", overrides=dict(sweep_base="mobilenetv2:width=0.5", depths="5", widths="0.5,0.5",
                                                students="mobilenetv2:drop=5,width=0.5;resnet:depth=20"))
    assert student_specs(cfg) == [("depth", 5, "mobilenetv2:width=0.5,drop=5"),
                                  ("width", 0.5, "mobilenetv2:width=0.5"), ("spec", 1, "resnet:depth=20")]
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == 2 and all(w.startswith("igkd: warning: student ") for w in warned)
    assert "mobilenetv2:drop=5,width=0.5 (spec 0) is the same model as mobilenetv2:width=0.5,drop=5" in warned[1]


def test_a_module_is_recorded_as_a_py_spec_only_when_its_class_rebuilds_it():
    from igkd.api import module_spec
    from test_families import TinyCNN
    assert module_spec(TinyCNN(5, 3), 5, 3) == "py:test_families:TinyCNN"
    assert module_spec(TinyCNN(5, 3, width=6), 5, 3) == "module:TinyCNN"  # the defaults build width 8
    assert module_spec(small_net(5, 3), 5, 3) == "module:Sequential"
