"""Defects found in session 14's review of own models, the Python API and the security of
loading, each with the check that failed before its fix: specs a weights file records are
never run, tied weights save, outputs that do not fit the data are one line."""

import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import igkd
from helpers_cli import run_igkd
from igkd.errors import UserError
from igkd.modelcard import model_card
from igkd.models import build_model, load_model, save_checkpoint

TINY = "mobilenetv2:width=0.25,drop=14"

EVIL = """
from pathlib import Path
Path(__file__).with_name("pwned").write_text("imported")

def make(num_classes=10, in_channels=3):
    from igkd.models import build_model
    return build_model("mobilenetv2:width=0.25,drop=14", num_classes, in_channels)
"""


def crafted(tmp_path: Path, spec: str) -> Path:
    """A real tiny checkpoint whose metadata (beside it and in its header) names ``spec``."""
    path = save_checkpoint(tmp_path / "model", build_model(TINY, 10, 1), {"model": spec, "num_classes": 10,
                                                                          "in_channels": 1, "dataset": "demo"})
    return path


# ---------------------------------------------------------------- 1. a weights file never runs code
@pytest.mark.parametrize("spec", ["py:{dir}/evil.py:make", "torchscript:{dir}/evil.pt",
                                  "py:logging:basicConfig,filename={dir}/pwned,filemode=w"])
def test_a_weights_file_never_runs_the_code_its_metadata_names(tmp_path, spec):
    (tmp_path / "evil.py").write_text(EVIL)
    torch.jit.save(torch.jit.script(build_model(TINY, 10, 1)), str(tmp_path / "evil.pt"))
    spec = spec.format(dir=tmp_path)
    weights = crafted(tmp_path, spec)
    with pytest.raises(UserError, match="runs code from outside the file; igkd runs no code a weights file names: "
                                        r"if you trust it, pass --model "):
        load_model(weights)
    # every command that reads a checkpoint's metadata: one line naming the spec to pass, nothing run
    for args, flag in [(("evaluate", "--weights", weights, "--data", "demo"), "--model"),
                       (("export", "--weights", weights, "--output", tmp_path / "m.onnx"), "--model"),
                       (("evaluate", "--weights", weights, "--data", "demo", "--model", TINY, "--teacher", weights),
                        "--teacher"),
                       (("precompute", "--teacher", weights, "--data", "demo", "--store", tmp_path / "s"),
                        "--teacher-model")]:
        r = run_igkd(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"if you trust it, pass {flag} {shlex.quote(spec)}" in r.stderr, r.stderr
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "s").exists()
    if spec.startswith("py:") and "evil.py" in spec:  # named by the user, it runs: their choice
        net, meta = load_model(weights, spec)
        assert (tmp_path / "pwned").read_text() == "imported" and meta["model"] == spec


def test_a_module_checkpoint_asks_for_a_factory(tmp_path):
    weights = crafted(tmp_path, "module:Net")
    with pytest.raises(UserError, match=r"was trained from a Python module igkd cannot rebuild \(module:Net\); "
                                        r"pass --model SPEC"):
        load_model(weights)


def test_the_model_card_names_a_py_model_in_its_commands():
    summary = {"model": "py:my nets.py:make,width=16", "dataset": "demo", "params": 10, "epochs": 1,
               "test_accuracy": 50.0, "method": "student"}
    card = model_card(summary, {})
    evaluate = next(line for line in card.splitlines() if line.startswith("igkd evaluate"))
    assert shlex.split(evaluate)[shlex.split(evaluate).index("--model") + 1] == summary["model"]
    assert "igkd.load_model(\"model.safetensors\", 'py:my nets.py:make,width=16')" in card
    assert "--model" not in model_card({**summary, "model": TINY}, {})


def test_evaluate_names_a_bad_teacher_before_evaluating(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save(build_model(TINY, 10, 1).state_dict(), foreign)
    weights = crafted(tmp_path, TINY)
    for teacher, words in [(foreign, "has no igkd metadata; pass the teacher's architecture spec as --teacher"),
                           (tmp_path / "missing.safetensors", "does not exist"),
                           ("no_such_family", "unknown model 'no_such_family'")]:
        r = run_igkd("evaluate", "--weights", weights, "--data", "demo", "--teacher", teacher, "--json")
        assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run_igkd("evaluate", "--weights", weights, "--data", "demo", "--teacher", "mobilenetv2", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["teacher_params"] == igkd.count_parameters(build_model("mobilenetv2", 10, 3))


# ---------------------------------------------------------------- 2. the spec recorded for a module
class StridedNet(nn.Module):
    """Its stride changes no tensor's shape: only the function tells stride 2 from 1."""

    def __init__(self, num_classes=10, in_channels=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=stride, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.conv(x).relu().amax((2, 3)))


def test_a_module_is_recorded_by_a_spec_only_when_it_rebuilds_the_same_function():
    from igkd.api import module_spec
    torch.manual_seed(0)
    assert module_spec(StridedNet(5, 3), 5, 3) == "py:test_review_fixes:StridedNet"
    assert module_spec(StridedNet(5, 3, stride=2), 5, 3) == "module:StridedNet"  # was the stride-1 class
    # a built-in network handed in keeps the spec it was built from (was py:...:MobileNetV2, the CIFAR one)
    net = build_model("mobilenetv2_imagenet:width=0.25,drop=16", 5, 3)
    state = torch.get_rng_state()
    assert module_spec(net, 5, 3, (64, 64)) == "mobilenetv2_imagenet:drop=16,width=0.25"
    assert torch.equal(torch.get_rng_state(), state)  # the rebuild draws no random number of the run
