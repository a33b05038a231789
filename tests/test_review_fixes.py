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
from helpers_cli import installed_plugin, run_igkd
from igkd.errors import UserError
from igkd.experiments import run_experiment
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


def test_the_model_card_commands_name_relative_files_from_anywhere(tmp_path, monkeypatch):
    # the commands run in the run folder: 'imagefolder:data/pets' and 'py:nets.py:make' named
    # files beside the folder the run was started in, not in the run folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "pets").mkdir(parents=True)
    (tmp_path / "nets.py").write_text("")
    summary = {"model": "py:nets.py:make,width=16", "dataset": "imagefolder:data/pets,size=32", "params": 10,
               "epochs": 1, "test_accuracy": 50.0, "method": "student"}
    card = model_card(summary, {})
    evaluate = shlex.split(next(line for line in card.splitlines() if line.startswith("igkd evaluate")))
    assert evaluate[evaluate.index("--data") + 1] == f"imagefolder:{tmp_path / 'data' / 'pets'},size=32"
    assert evaluate[evaluate.index("--model") + 1] == f"py:{tmp_path / 'nets.py'}:make,width=16"
    assert f"igkd.load_model(\"model.safetensors\", 'py:{tmp_path / 'nets.py'}:make,width=16')" in card
    # what names no file here (a built-in dataset, a path that is gone) stays as recorded
    card = model_card({**summary, "dataset": "cifar10:gone,subset=100"}, {})
    assert "--data cifar10:gone,subset=100" in card


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
    # at the data's classes and channels (demo: 10, 1), as a teacher of this data has them
    assert json.loads(r.stdout)["teacher_params"] == igkd.count_parameters(build_model("mobilenetv2", 10, 1))


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


# ---------------------------------------------------------------- 3. a user's network, as Python runs it
class Tied(nn.Module):
    """A classifier registered under two names (weight tying): one storage, two state-dict keys."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)
        self.classifier = self.fc

    def forward(self, x):
        return self.classifier(self.conv(x).relu().mean((2, 3)))


def test_tied_weights_save_and_load(tmp_path):
    net = Tied(4, 3)  # safetensors refused the shared storage: the first best epoch crashed the run
    path = save_checkpoint(tmp_path / "tied", net, {"model": "py:test_review_fixes:Tied", "num_classes": 4,
                                                    "in_channels": 3})
    loaded, _ = load_model(path, "py:test_review_fixes:Tied", 4, 3)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert igkd.models.bare(loaded).classifier is igkd.models.bare(loaded).fc


NETS = """
from __future__ import annotations
from dataclasses import dataclass
from torch import nn
from sibling import width  # beside this file, as `python nets.py` would find it


@dataclass
class Options:
    width: int = width


def make(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, Options().width, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(Options().width, num_classes))
"""


def test_a_py_file_imports_as_python_would_run_it(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "nets.py").write_text(NETS)
    (tmp_path / "folder" / "sibling.py").write_text("width = 6\n")
    # a dataclass crashed (no module in sys.modules), and the sibling import failed
    net = build_model(f"py:{tmp_path / 'folder' / 'nets.py'}:make", 3, 1)
    assert net[0].out_channels == 6 and net(torch.rand(1, 1, 5, 5)).shape == (1, 3)
    assert build_model(f"py:{tmp_path / 'folder' / 'nets.py'}:make", 3, 1)[0].out_channels == 6  # imported once


FACTORIES = """
import torch
from torch import nn


class Head(nn.Module):
    def __init__(self, classes, kind="tensor", channels=1):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        y = self.fc(self.conv(x).mean((2, 3)))
        return {"tensor": y, "tuple": (y, y), "dict": {"logits": y}, "long": y.long()}[self.kind]


def fixed7(num_classes=10, in_channels=1):
    return Head(7)


def tuple_out(num_classes=10, in_channels=1):
    return Head(num_classes, "tuple")


def dict_out(num_classes=10, in_channels=1):
    return Head(num_classes, "dict")


def integers(num_classes=10, in_channels=1):
    return Head(num_classes, "long")


def rgb(num_classes=10, in_channels=1):
    return Head(num_classes, channels=3)
"""


@pytest.mark.parametrize("factory,words", [
    ("fixed7", "returns torch.float32 of shape (1, 7) for one image; demo needs float logits of shape (1, 10)"),
    ("tuple_out", "returns a tuple, not a tensor of logits; make its forward return the logits alone (N x classes), "
                  "e.g. wrap it in a module whose forward returns net(x)[0]"),
    ("dict_out", "returns a dict, not a tensor of logits; make its forward return the logits alone (N x classes), "
                 "e.g. wrap it in a module whose forward returns net(x)['logits']"),
    ("integers", "returns torch.int64 of shape (1, 10)"),
    ("rgb", "fails on one 1x28x28 image of demo (RuntimeError: "),
])
def test_a_network_that_does_not_fit_the_data_is_one_line_before_any_work(tmp_path, factory, words):
    (tmp_path / "facs.py").write_text(FACTORIES)
    spec = f"py:{tmp_path / 'facs.py'}:{factory}"
    r = run_igkd("train", "--data", "demo", "--model", spec, "--epochs", "1", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert f"model {spec}" in r.stderr and not (tmp_path / "run").exists()


def test_a_teacher_with_other_classes_is_refused_before_its_store_is_computed(tmp_path):
    (tmp_path / "facs.py").write_text(FACTORIES)
    spec = f"py:{tmp_path / 'facs.py'}:fixed7"
    torch.save(build_model(spec, 10, 1).state_dict(), tmp_path / "teacher.pt")
    # the whole store was computed, then refused as damaged, and every rerun computed it again
    r = run_igkd("precompute", "--teacher", tmp_path / "teacher.pt", "--teacher-model", spec, "--data", "demo",
                 "--store", tmp_path / "store")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"teacher {tmp_path / 'teacher.pt'} ({spec}) returns torch.float32 of shape (1, 7)" in r.stderr
    assert not (tmp_path / "store").exists()


def test_a_cut_list_of_dropped_classes_says_how_many_more():
    from igkd.cli import _first_names
    assert _first_names(list("abcdefg"), 5) == "a, b, c, d, e and 2 more"  # was "a, b, c, d, e": read as all
    assert _first_names(list("abc"), 5) == "a, b, c"


# ---------------------------------------------------------------- 4. the Python API at its entrances
def test_api_calls_with_wrong_types_are_one_line_user_errors(tmp_path):
    from igkd.attribution.ig import integrated_gradients
    net = build_model(TINY, 4, 3).eval()
    x = torch.rand(2, 3, 8, 8)
    cases = [
        (lambda: igkd.train({"data": "demo"}, tmp_path / "a"), "train() needs an igkd.TrainConfig as its config, got dict"),
        (lambda: igkd.train(None, tmp_path / "a"), "got NoneType"),
        (lambda: igkd.distill(igkd.TrainConfig(data="demo"), tmp_path / "b"),
         "distill() needs an igkd.DistillConfig as its config, got TrainConfig"),
        (lambda: igkd.precompute(net, "demo", cfg={"ig_steps": 2}), "needs an igkd.PrecomputeConfig"),
        (lambda: igkd.precompute(net, "demo", threads=-1), "threads=-1 is out of range"),
        (lambda: run_experiment("nope", None, tmp_path / "c"), "unknown experiment 'nope'; use one of: "),
        (lambda: run_experiment("ablation", {}, tmp_path / "c"), "needs an ExperimentConfig, got dict"),
        (lambda: igkd.register_part(object()), "not an igkd.distill.parts.Part"),
        (lambda: load_model(None), "the weights file must be a path, got NoneType"),
        (lambda: build_model(TINY, 0, 3), "num_classes must be a positive integer, got 0"),
        (lambda: build_model(TINY, "10", 3), "num_classes must be a positive integer, got '10'"),
        (lambda: integrated_gradients(lambda z: z.sum((2, 3)), x, 0), "the model must be a torch.nn.Module, got function"),
        (lambda: integrated_gradients(net, x[:0], 0), "inputs hold no images"),
        (lambda: integrated_gradients(net, x, 0, baseline=float("nan")), "the baseline holds NaN or infinite values"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as e:
            call()
        assert words in str(e.value) and "\n" not in str(e.value), (words, str(e.value))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_weights_for_other_channels_or_classes_say_so(tmp_path):
    torch.save(build_model("resnet18", 1000, 3).state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match=r"imagenet.pth are for 3-channel images and 1000 classes, the data has 1 "
                                        r"channel\(s\) and 10 classes; use the data they were trained on"):
        load_model(tmp_path / "imagenet.pth", "resnet18", 10, 1)  # said: pass the --model they were trained with
    with pytest.raises(UserError, match=r"are for 1000 classes, the data has 10 classes"):
        load_model(tmp_path / "imagenet.pth", "resnet18", 10, 3)
    with pytest.raises(UserError, match=r"they fit the built-in resnet18: pass --model resnet18"):  # another one
        load_model(tmp_path / "imagenet.pth", "resnet34", 1000, 3)


# ---------------------------------------------------------------- 5. a torchvision teacher's normalisation
def test_a_foreign_imagenet_teacher_gets_its_normalisation(tmp_path):
    """--teacher-normalize imagenet: a torchvision checkpoint expects ImageNet mean/std, and a
    foreign file was always fed raw pixels (logits 0.1 off its source's on real images)."""
    from helpers_data import write_image_folder
    from igkd.api import load_teacher
    from igkd.config import DistillConfig, build
    from igkd.data import load_dataset
    from igkd.experiments.runs import run_key
    from igkd.models import Normalized
    from igkd.models.preprocess import IMAGENET_MEAN, IMAGENET_STD
    folder = write_image_folder(tmp_path / "images", 3, 16)
    data = f"imagefolder:{folder},cache=0"
    torch.manual_seed(0)
    source = Normalized(build_model("resnet18", 2, 3), IMAGENET_MEAN, IMAGENET_STD).eval()  # as torchvision runs it
    torch.save(source.net.state_dict(), tmp_path / "tv.pth")
    dataset = load_dataset(data)
    x = dataset.train.images.float() / 255
    with torch.no_grad():
        want = source(x)
        teacher, meta = load_teacher(tmp_path / "tv.pth", dataset, "resnet18", "imagenet")
        torch.testing.assert_close(teacher(x), want, rtol=1e-5, atol=1e-5)
        assert meta["preprocessing"]["mean"] == IMAGENET_MEAN
        raw, _ = load_teacher(tmp_path / "tv.pth", dataset, "resnet18")  # auto: a foreign file takes raw pixels
        assert (raw(x) - want).abs().max() > 1e-3
    # the store of its logits through the command, and the runs it feeds are other runs
    r = run_igkd("precompute", "--teacher", tmp_path / "tv.pth", "--teacher-model", "resnet18", "--teacher-normalize",
                 "imagenet", "--data", data, "--ig-steps", "2", "--store", tmp_path / "store", "--check-images", "0")
    assert r.returncode == 0, r.stderr
    import numpy as np
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "store" / "logits.npy")).float(), want,
                               rtol=1e-3, atol=1e-3)
    base = dict(data=data, teacher=str(tmp_path / "tv.pth"), teacher_model="resnet18", method="kd")
    assert run_key(build(DistillConfig, base)) != run_key(build(DistillConfig, {**base, "teacher_normalize": "imagenet"}))
    # the teacher-correct protocol's teacher too: its accuracy is the source's
    student = save_checkpoint(tmp_path / "student", build_model(TINY, 2, 3), {"model": TINY, "num_classes": 2,
                                                                              "in_channels": 3, "classes": ["cat", "dog"]})
    r = igkd.evaluate(student, data, teacher_correct=str(tmp_path / "tv.pth"), teacher_correct_model="resnet18",
                      teacher_correct_normalize="imagenet")
    with torch.no_grad():
        right = (source(dataset.test.images.float() / 255).argmax(1) == dataset.test.labels).float().mean()
    assert r["teacher_correct"]["teacher_accuracy"] == pytest.approx(100.0 * float(right))
    # grayscale data has no ImageNet statistics
    with pytest.raises(UserError, match="imagenet normalisation is for RGB images; demo has 1 channel"):
        load_teacher(tmp_path / "tv.pth", load_dataset("demo"), "resnet18", "imagenet")


# ---------------------------------------------------------------- 6. maps are described by their attribution
def test_a_run_on_saliency_maps_records_and_describes_saliency(tmp_path):
    # summary.json said {"ig": {"steps": 50, "method": ..., "attribution": "saliency"}}, the card "50 steps"
    from helpers_data import write_image_folder
    folder = write_image_folder(tmp_path / "images", 4, 8)
    torch.manual_seed(0)
    cfg = igkd.DistillConfig(data=f"imagefolder:{folder},cache=0", model=TINY, method="kd+ig", attribution="saliency",
                             epochs=1, batch_size=4, threads=1, check_images=0, store=str(tmp_path / "store"))
    summary = igkd.distill(cfg, tmp_path / "run", quiet=True, teacher=build_model(TINY, 2, 3).eval())
    assert "ig" not in summary and summary["maps"]["attribution"] == "saliency"
    assert summary["maps"]["settings"]["attribution"] == "saliency"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- **Teacher maps:** saliency" in card and "steps" not in card


# ---------------------------------------------------------------- 7. an attribution brings its options
GRADSQ = '''
from igkd.attribution.registry import Attribution
from igkd.options import opt


def _compute(teacher, x, y, cfg, first_index=0, n_steps=None):
    import torch
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(teacher(x).gather(1, y.view(-1, 1)).sum(), x)
    return g.abs() ** cfg.gradsq_power, torch.full((len(x),), float("nan"))


ATTRIBUTION = Attribution(name="gradsq", help="|gradient| ** --gradsq-power, 1 pass",
                          fields={"gradsq_power": opt(2.0, "exponent of the gradient", low=0.5, high=8.0)},
                          settings=lambda cfg: {"attribution": "gradsq", "power": cfg.gradsq_power},
                          compute=_compute)
'''

ADD_GRADSQ = '''
import json, sys
from igkd.attribution import registry
registry.MODULES["gradsq"] = "gradsq"  # the registry's one line
registry.NAMES = tuple(registry.MODULES)
from igkd.cli import main
from igkd.config import DistillConfig, build
from igkd.experiments.runs import semantic_config
cfg = build(DistillConfig, {"data": "demo", "method": "kd+ig", "attribution": "gradsq", "gradsq_power": 3.0})
print(json.dumps(semantic_config(cfg)))
main(sys.argv[1:])
'''


def test_a_new_attribution_is_one_module_with_its_options(tmp_path):
    """Its option was a field of config.py (the built-ins' too): a new attribution with an
    option could not be added as one module and one registry line."""
    import subprocess
    import sys
    from dataclasses import fields
    from igkd.attribution import registry
    from igkd.config import PrecomputeConfig
    config_py = (Path(igkd.__file__).parent / "config.py").read_text()
    for e in registry.entries():  # the built-ins' own options live in their modules
        for name in e.fields:
            assert name in {f.name for f in fields(PrecomputeConfig)} and name not in config_py
    from helpers_data import write_image_folder
    (tmp_path / "gradsq.py").write_text(GRADSQ)
    (tmp_path / "add_gradsq.py").write_text(ADD_GRADSQ)
    folder = write_image_folder(tmp_path / "images", 4, 8)
    torch.save(build_model(TINY, 2, 3).state_dict(), tmp_path / "teacher.pt")
    r = subprocess.run([sys.executable, str(tmp_path / "add_gradsq.py"), "precompute", "--teacher",
                        str(tmp_path / "teacher.pt"), "--teacher-model", TINY, "--data", f"imagefolder:{folder},cache=0",
                        "--attribution", "gradsq", "--gradsq-power", "1.5", "--check-images", "0",
                        "--store", str(tmp_path / "store"), "--threads", "1", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout.splitlines()[0])
    assert key["attribution"] == "gradsq" and key["gradsq_power"] == 3.0 and "ig_steps" not in key
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["identity"]["settings"]["power"] == 1.5


# ---------------------------------------------------------------- 8. attribution details
def test_smoothgrad_noise_follows_the_image_not_its_chunk():
    # one generator per chunk: image i's noise depended on where its chunk began (--chunk-size)
    from igkd.attribution import registry
    from igkd.config import PrecomputeConfig
    entry, cfg = registry.get("smoothgrad"), PrecomputeConfig(attribution="smoothgrad", smoothgrad_samples=3)
    torch.manual_seed(0)
    net, x, y = build_model(TINY, 4, 3).eval(), torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    whole = entry.compute(net, x, y, cfg, first_index=10)[0]
    tail = entry.compute(net, x[2:], y[2:], cfg, first_index=12)[0]
    torch.testing.assert_close(whole[2:], tail, rtol=0, atol=0)
    assert entry.settings(cfg)["noise"] == "seeded by each image's index"  # other maps than before: another store


def test_the_error_estimate_of_another_attribution_compares_maps_of_one_scale():
    # saliency (a gradient) against IG (gradient x (x - x')) in raw units read 92% to 284%
    from igkd.config import PrecomputeConfig
    from igkd.data import Dataset, Split
    from igkd.precompute import estimate_error
    g = torch.Generator().manual_seed(0)
    split = Split((torch.rand(8, 3, 8, 8, generator=g) * 255).to(torch.uint8), torch.arange(8) % 4)
    data = Dataset("synthetic", list("abcd"), 3, (8, 8), split, split)
    torch.manual_seed(0)
    net = build_model(TINY, 4, 3).eval()
    est = estimate_error(net, data, PrecomputeConfig(attribution="saliency", check_images=4, check_steps=8),
                         torch.device("cpu"))
    assert est["scaled"] == "sum 1" and 0 <= est["median"] <= est["max"] <= 2
    ig = estimate_error(net, data, PrecomputeConfig(check_images=4, check_steps=8), torch.device("cpu"))
    assert "scaled" not in ig


def test_finding_a_layer_leaves_each_modules_mode_as_it_was():
    from igkd.attribution.gradcam import auto_layer
    net = build_model("resnet:depth=8", 4, 3).train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()  # frozen statistics, as a fine-tuning user keeps them
    auto_layer(net, (3, 16, 16))
    assert net.training and all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------- 9. extensions from an installed package
EXT = '''
import json
import torch
from torch import nn
from igkd.attribution.registry import Attribution
from igkd.data import Dataset, Split
from igkd.evaluate.corruptions import Corruption
from igkd.models import Family
from igkd.models.family import options
from igkd.options import opt


def _build(spec, num_classes, in_channels):
    o = options(spec, {"depth": (int, 1)}, "tinycnn:depth=2")
    layers, c = [], in_channels
    for _ in range(o["depth"]):
        layers += [nn.Conv2d(c, 4, 3, padding=1), nn.ReLU()]
        c = 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


FAMILY = Family(_build, "a tiny CNN: depth=N conv layers", depth_knob="depth")


def load_tiny(spec):
    g = torch.Generator().manual_seed(0)
    def split(n):
        return Split((torch.rand(n, 3, 8, 8, generator=g) * 255).to(torch.uint8), torch.arange(n) % 2)
    return Dataset(str(spec), ["a", "b"], 3, (8, 8), split(40), split(20))


INVERT = Corruption(lambda x, level, noise: level * (1 - x) + (1 - level) * x, (0.1, 0.2, 0.3, 0.4, 0.5),
                    "share", "inverted")


class JsonlLogger:
    def __init__(self, out, run, resume_epoch):
        self.path = out / "epochs.jsonl"

    def step(self, row):
        pass

    def epoch(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": row["epoch"]}) + "\\n")

    def close(self):
        pass


def _gradsq(teacher, x, y, cfg, first_index=0, n_steps=None):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(teacher(x).gather(1, y.view(-1, 1)).sum(), x)
    return g.abs() ** cfg.gradsq_power, torch.full((len(x),), float("nan"))


GRADSQ = Attribution(name="gradsq", help="|gradient| ** --gradsq-power", compute=_gradsq,
                     fields={"gradsq_power": opt(2.0, "exponent of the gradient", low=0.5, high=8.0)},
                     settings=lambda cfg: {"attribution": "gradsq", "power": cfg.gradsq_power})
'''

ENTRY_POINTS = """[igkd.models]
tinycnn = igkdext:FAMILY
[igkd.datasets]
tiny = igkdext:load_tiny
[igkd.corruptions]
invert = igkdext:INVERT
[igkd.loggers]
jsonl = igkdext:JsonlLogger
[igkd.attributions]
gradsq = igkdext:GRADSQ
"""


def test_models_data_corruptions_trackers_and_attributions_come_from_an_installed_package(tmp_path):
    """Only method parts could come from another package: the other registries were dicts
    inside igkd, and --attribution's choices were frozen when igkd was imported."""
    import subprocess
    import sys
    env = {**installed_plugin(tmp_path, "igkdext", EXT, ENTRY_POINTS), "PYTHONWARNINGS": "ignore"}

    def igkd_(*args):
        r = subprocess.run([sys.executable, "-m", "igkd", *map(str, args)], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    for command in ([], ["distill"]):  # what the package adds is named in --help, by spec name and package
        text = igkd_(*command, "--help").stdout
        assert "models        tinycnn (igkdext)" in text and "datasets      tiny (igkdext)" in text, text[-800:]
        assert "attributions  gradsq (igkdext)" in text and "loggers       jsonl (igkdext)" in text
    igkd_("train", "--data", "tiny", "--model", "tinycnn:depth=2", "--epochs", "2", "--batch-size", "8",
          "--log", "jsonl", "--out", "run", "--threads", "1", "--quiet")
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "epochs.jsonl").read_text().splitlines()] == [1, 2]
    r = igkd_("evaluate", "--weights", "run/model.safetensors", "--data", "tiny", "--corruptions", "all", "--json")
    assert "invert" in json.loads(r.stdout)["corruptions"]["mean"]
    igkd_("precompute", "--teacher", "run/model.safetensors", "--data", "tiny", "--attribution", "gradsq",
          "--gradsq-power", "3", "--check-images", "0", "--store", "store", "--threads", "1", "--quiet")
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["identity"]["settings"]["power"] == 3.0


def test_a_plugin_importing_a_config_built_from_plugins_is_one_line_naming_the_cycle(tmp_path):
    """igkd.config builds PrecomputeConfig from the attributions, plug-ins included: a plug-in
    importing it at module level met a half-built module, and igkd printed a traceback (the
    configs were imported with igkd.cli, outside main's error handling)."""
    import subprocess
    import sys
    env = installed_plugin(tmp_path, "cyclic", "from igkd.attribution.registry import Attribution\n"
                           "from igkd.config import PrecomputeConfig\n"
                           "A = Attribution(name='cyc', help='x', compute=None, settings=dict)\n",
                           "[igkd.attributions]\ncyc = cyclic:A\n")
    # a plug-in that does not load is a warning where nothing asks for it (session 22c: one broken
    # package disabled every command), and the one line where something does
    r = subprocess.run([sys.executable, "-m", "igkd", "precompute", "--help"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "--attribution" in r.stdout, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("igkd: warning: cannot load attribution 'cyc'")
    assert "import it inside the plug-in's functions" in r.stderr
    r = subprocess.run([sys.executable, "-m", "igkd", "precompute", "--attribution", "cyc", "--data", "demo"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.splitlines()[-1].startswith("igkd: error: cannot load attribution 'cyc'")
    assert "import it inside the plug-in's functions" in r.stderr
