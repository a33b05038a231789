"""Session 22: a module trained in place is scored and exported behind the normalisation its
run trained it with; train's --help offers only the starts train has."""
import json

import pytest
import torch
from torch import nn

import igkd
from igkd.data import from_tensors
from igkd.errors import UserError


def _data():
    # class 1 brighter than class 0, both far from mean 0 / std 1: a network trained on
    # normalised pixels scores differently on raw ones
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 2
    x = (torch.randint(90, 140, (48, 3, 12, 12), generator=g) + 60 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return from_tensors((x[:32], y[:32]), (x[32:], y[32:]), ["dark", "bright"])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_module_trained_in_place_is_scored_and_exported_behind_its_runs_normalisation(tmp_path):
    pytest.importorskip("onnxruntime")
    data, net = _data(), _net()
    cfg = igkd.TrainConfig(epochs=1, batch_size=8, val_fraction=0.0, threads=1, normalize="dataset", lr=0.1)
    summary = igkd.train(cfg, tmp_path / "run", model=net, data=data, quiet=True)
    scored = igkd.evaluate(net, data)
    assert "trained with cross-entropy on" in (tmp_path / "run" / "README.md").read_text()  # not "with `student`"
    # raw pixels into a network trained on normalised ones: the score was another network's
    assert scored["preprocessing"]["normalize"] == "dataset"
    assert scored["confusion"] == summary["test"]["confusion"]
    assert igkd.evaluate(net, data, normalize="none")["preprocessing"] == {"normalize": "none"}  # said, kept

    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training module
    out = tmp_path / "m.onnx"
    result = igkd.export_model(net, out, data=data, quiet=True)
    flags = [m.training for m in net.modules()]
    assert flags == [True, True, False, True, True, True, True]  # the module's flags as they were, each its own
    assert result["weights"] is None and result["model"] == "module:Sequential"
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["source"]["module"] == "Sequential" and side["source"]["weights_fingerprint"] == \
        igkd.models.weights_fingerprint(net)
    assert side["preprocessing"]["normalize"] == "dataset" and side["preprocessing"]["in_graph"]
    import onnxruntime as ort
    x = data.test.images.float().numpy() / 255  # the deployment's input: pixels / 255
    logits = ort.InferenceSession(str(out)).run(None, {"images": x})[0]
    assert int((torch.from_numpy(logits).argmax(1) == data.test.labels).sum()) == summary["test"]["correct"]

    with pytest.raises(UserError, match="a module records no dataset; pass data="):
        igkd.export_model(net, tmp_path / "n.onnx", quiet=True)
    with pytest.raises(UserError, match="a module to export and a model spec"):
        igkd.export_model(net, tmp_path / "n.onnx", data=data, model="mobilenetv2", quiet=True)
    assert not (tmp_path / "n.onnx").exists()


def test_train_help_offers_the_starts_train_has(capsys):
    from igkd.cli import main
    for command, shown in (("train", "--init scratch|FILE"), ("distill", "--init scratch|teacher|FILE")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert shown in text and ("or teacher:" in text.split("\n  --init ", 1)[1][:700]) == (command == "distill")


def test_a_progress_line_cut_by_an_exception_ends_on_a_terminal():
    import io

    from igkd.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    out = Terminal()
    with pytest.raises(KeyboardInterrupt):
        with Progress(10, "precompute", "img", stream=out) as p:
            p.update(3)
            raise KeyboardInterrupt
    assert "3/10 img" in out.getvalue() and out.getvalue().endswith("\n") and out.getvalue().count("\n") == 1
    quiet = Terminal()
    with pytest.raises(ValueError), Progress(10, "x", stream=quiet, delay=60) as p:  # nothing shown: nothing ended
        p.update(1)
        raise ValueError
    assert quiet.getvalue() == ""


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_teacher_trained_in_place_teaches_behind_its_runs_normalisation(tmp_path, capsys):
    data, net = _data(), _net()
    cfg = igkd.TrainConfig(epochs=1, batch_size=8, val_fraction=0.0, threads=1, normalize="dataset", lr=0.1)
    igkd.train(cfg, tmp_path / "t", model=net, data=data, quiet=True)
    pcfg = igkd.PrecomputeConfig(ig_steps=2, check_images=0)
    store = igkd.precompute(net, data, pcfg, store=tmp_path / "store", quiet=True, threads=1)
    pre = json.loads((tmp_path / "t" / "model.json").read_text())["preprocessing"]  # what the run trained behind
    assert pre["normalize"] == "dataset"
    x = data.train.images.float() / 255
    mean, std = torch.tensor(pre["mean"]).view(1, -1, 1, 1), torch.tensor(pre["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        normalised, raw = net.eval()((x - mean) / std), net(x)
    logits = torch.as_tensor(store.logits[:]).float()  # by sample index: the train split's 0..31
    # the store's logits are the normalised teacher's (the bare module on raw pixels gave others)
    assert torch.allclose(logits, normalised, atol=1e-4) and not torch.allclose(logits, raw, atol=1e-2)
    # the store counts how often its teacher is right on the training images (where a wrong
    # normalisation or image size shows), and says so
    right = int((normalised.argmax(1) == data.train.labels).sum())
    assert store.manifest["teacher_accuracy"] == {"percent": 100.0 * right / 32, "correct": right, "images": 32}
    igkd.precompute(net, data, pcfg, store=tmp_path / "store", threads=1)  # reused: said again
    assert f"the teacher is right on {100 * right / 32:.1f}% of its 32 training images" in capsys.readouterr().err


def test_a_checkpoint_given_images_of_another_size_is_warned_about(tmp_path, capsys):
    from igkd.models import build_model, save_checkpoint
    data = _data()  # 12 x 12
    spec = "mobilenetv2:width=0.25,drop=14"
    net = build_model(spec, 2, 3)
    path = save_checkpoint(tmp_path / "m.safetensors", net, {"model": spec, "num_classes": 2, "in_channels": 3,
                                                             "classes": data.classes, "image_size": [16, 16]})
    igkd.evaluate(str(path), data)
    err = capsys.readouterr().err
    assert "was trained on 16x16 images and is given 12x12" in err and "add ,size=16x16" in err
    save_checkpoint(path, net, {"model": spec, "num_classes": 2, "in_channels": 3, "classes": data.classes,
                                "image_size": [12, 12]})
    igkd.evaluate(str(path), data)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_predict_classifies_files_as_evaluate_and_the_export_see_them(tmp_path, capsys):
    """igkd predict decodes each file as the model's data was (here resize=shorter: shorter
    side to 16, centre crop; an RGBA and a grayscale file among them), so its probabilities
    are those of the model on the dataset's own test images, and an export's are the same."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from PIL import Image

    from igkd.cli import main
    from igkd.models import build_model, load_model, save_checkpoint
    rng = np.random.default_rng(0)
    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i, (h, w) in enumerate([(20, 30), (24, 18), (16, 16)]):
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (22, 26, 4), dtype=np.uint8), "RGBA").save(root / "test" / "a" / "3.png")
    Image.fromarray(rng.integers(0, 255, (26, 20), dtype=np.uint8), "L").save(root / "test" / "b" / "3.png")
    spec_data = f"imagefolder:{root},size=16,resize=shorter"
    data = igkd.load_dataset(spec_data)
    spec = "mobilenetv2:width=0.25,drop=14"
    torch.manual_seed(0)
    model = build_model(spec, 2, 3)
    with torch.no_grad():  # logits far apart: a file decoded otherwise shows in its probabilities
        model.classifier[-1].weight.mul_(300)
    path = save_checkpoint(tmp_path / "m.safetensors", model,
                           {"model": spec, "num_classes": 2, "in_channels": 3, "classes": data.classes,
                            "image_size": [16, 16], "dataset": spec_data, "preprocessing": {"normalize": "none"}})
    net = load_model(str(path))[0]
    with torch.no_grad():
        want = torch.softmax(net(data.test.images.float() / 255).double(), 1)  # class a's files, then b's

    r = igkd.predict(str(path), [root / "test"], top=2, quiet=True)
    assert [p["file"] for p in r["predictions"]] == [str(root / "test" / c / f"{i}.png") for c in "ab" for i in range(4)]
    got = torch.tensor([[dict(p["top"])[c] for c in data.classes] for p in r["predictions"]], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5)
    assert r["image"]["resize"] == "shorter" and r["image"]["size"] == [16, 16]

    out = tmp_path / "m.onnx"
    igkd.export_model(str(path), out, quiet=True)
    assert json.loads((tmp_path / "m.onnx.json").read_text())["image"] == r["image"]  # a deployment's recipe
    def run(*argv):
        try:
            main(["predict", *argv])
        except SystemExit as e:
            return e.code or 0
        return 0
    assert run("--weights", str(out), "--json", "--quiet", str(root / "test" / "b"), str(root / "test" / "a")) == 0
    exported = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["file"] for p in exported][:1] == [str(root / "test" / "b" / "0.png")]  # the order given
    got = torch.tensor([[dict(p["top"])[c] for c in data.classes] for p in exported[4:] + exported[:4]],
                       dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-4)

    for argv, message in (([str(tmp_path / "none.png")], "does not exist; give image files or folders"),
                          ([], "no image files given"), ([str(tmp_path / "shapes" / "..")], None)):
        code = run("--weights", str(path), "--quiet", *argv)
        captured = capsys.readouterr()
        assert (code, message is None or message in captured.err) == (2 if message else 0, True)
    assert "shapes/train/b/2.png  b" in captured.out or "shapes/train/b/2.png  a" in captured.out  # a folder's images
    torch.save(build_model(spec, 2, 3).state_dict(), tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="records no class names; pass --classes"):
        igkd.predict(str(tmp_path / "foreign.pt"), [root / "test"], model=spec)
    r = igkd.predict(str(tmp_path / "foreign.pt"), [root / "test" / "a" / "3.png"], model=spec, classes="x,y",
                     size="16", quiet=True)
    assert r["predictions"][0]["class"] in ("x", "y") and r["image"]["resize"] == "fixed"


PLUGIN = '''
import torch
from igkd.distill.parts import Part


class Cos(Part):
    name = "test-cos"
    needs_teacher = needs_logits = True

    def loss(self, state, step):
        s, t = step.logits, step.teacher_logits
        return {"cos": (SCALE, 1 - torch.nn.functional.cosine_similarity(s, t).mean())}
'''


def _plugin(tmp_path, monkeypatch, scale):
    import importlib
    import sys

    from igkd.distill import parts as registry
    registry.parts()
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))
    (tmp_path / "test_s22_plugin.py").write_text(PLUGIN.replace("SCALE", scale))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("test_s22_plugin", None)
    igkd.register_part(importlib.import_module("test_s22_plugin").Cos())


def test_a_plug_in_parts_code_keys_its_runs_and_resumes(tmp_path, monkeypatch):
    """An edited plug-in loss is another run: an experiment reported the old loss's numbers
    under the new code's name ("8 runs, 8 already finished"), and a resume went on with it."""
    from igkd.distill.parts import parse_method
    from igkd.experiments.runs import run_key
    _plugin(tmp_path, monkeypatch, "1.0")
    teacher = str(__import__("pathlib").Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors")
    cfg = igkd.DistillConfig(data="demo", teacher=teacher, method="kd+test-cos", subset=0.05, epochs=1,
                             batch_size=32, val_fraction=0.0, threads=1, logits="online")
    plain = run_key(igkd.DistillConfig(data="demo", teacher=teacher, method="kd"))
    before = run_key(cfg)
    run = dict(quiet=True, teacher=_net(), student=_net(), data=_data())  # tiny: the key is what is tested
    small = __import__("dataclasses").replace(cfg, teacher="", subset=1.0, batch_size=8)
    summary = igkd.distill(small, tmp_path / "run", **run)
    assert summary["part_code"]["test-cos"]["class"] == "test_s22_plugin.Cos"
    (tmp_path / "test_s22_plugin.py").write_text(PLUGIN.replace("SCALE", "100.0"))  # the loss edited
    assert run_key(cfg) != before
    assert run_key(igkd.DistillConfig(data="demo", teacher=teacher, method="kd")) == plain  # igkd's own: as was
    with pytest.raises(UserError, match=r"the code of method part\(s\) test-cos changed since the run started"):
        igkd.distill(__import__("dataclasses").replace(small, epochs=2), tmp_path / "run", resume=True,
                     **{**run, "student": _net()})
    part = parse_method("kd+test-cos").parts[1]
    monkeypatch.setattr(type(part), "version", "2", raising=False)  # a declared version is the identity instead
    key = run_key(cfg)
    (tmp_path / "test_s22_plugin.py").write_text(PLUGIN.replace("SCALE", "3.0"))
    assert run_key(cfg) == key
    # options of parts the method lacks are not recorded (they changed nothing, and a run's
    # config.yaml failed once the plug-in that owned them was gone)
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert "dkd_beta" not in recorded and "alpha:" in recorded


def test_an_option_typed_for_a_part_the_method_lacks_is_refused(tmp_path, capsys):
    from igkd.cli import main
    with pytest.raises(SystemExit) as e:
        main(["distill", "--data", "demo", "--method", "kd", "--dkd-beta", "4", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--dkd-beta is an option of method part(s) dkd, which --method kd does not have" \
        in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_folder_of_some_of_the_models_classes_is_scored_on_them(tmp_path, capsys):
    from igkd.models import build_model, load_model, save_checkpoint
    spec = "mobilenetv2:width=0.25,drop=14"
    torch.manual_seed(0)
    model = build_model(spec, 3, 3)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(300)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {"model": spec, "num_classes": 3, "in_channels": 3,
                                                               "classes": ["a", "b", "c"], "image_size": [12, 12]})
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (20, 3, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.arange(20) % 2
    some = from_tensors(None, (x, y), ["a", "c"])  # a held-out folder with two of the three classes
    r = igkd.evaluate(str(path), some)
    with torch.no_grad():
        pred = load_model(str(path))[0](x.float() / 255).argmax(1)
    want = int((pred == torch.tensor([0, 2])[y]).sum())  # a is the model's 0, c its 2
    assert r["correct"] == want and r["total"] == 20 and r["class_map"]["source"] == "the data's class names"
    assert "has 2 of the model's 3 classes (by name)" in capsys.readouterr().err
    other = from_tensors(None, (x, y), ["a", "z"])
    with pytest.raises(UserError, match=r"was trained on 3 classes: a, b, c; memory:sha256=\w+ has 2 classes: a, z;"):
        igkd.evaluate(str(path), other)


def test_errors_name_the_python_keyword_beside_the_flag(tmp_path):
    from igkd.models import build_model, load_model, save_checkpoint
    path = save_checkpoint(tmp_path / "m.safetensors", build_model("mobilenetv2:width=0.25,drop=14", 2, 3),
                           {"model": "module:Net", "num_classes": 2, "in_channels": 3})
    with pytest.raises(UserError, match=r"pass --model SPEC \(model= in Python\)"):
        load_model(str(path))
    with pytest.raises(UserError, match=r"pass --teacher-model SPEC \(teacher_model= in Python\)"):
        load_model(str(path), flag="--teacher-model")


def test_an_experiment_says_which_runs_predict_one_class(tmp_path, capsys):
    """Per-run warnings scroll by (or are quiet); the experiment's own line names the runs
    whose accuracy is a class's share, before their table is read as methods doing the same."""
    import shutil

    from igkd.experiments.runs import Job, run_dir, run_jobs
    from test_review_session22b import _collapsed, _distill
    _distill(tmp_path / "one", "student", _collapsed())  # a real run whose model predicts class 'a' only
    job = Job("student-seed0", igkd.DistillConfig(data="demo", method="student"))
    out = tmp_path / "exp"
    shutil.copytree(tmp_path / "one", run_dir(out, job))  # found as a finished run of the experiment
    fingerprint = json.loads((tmp_path / "one" / "model.json").read_text())["dataset_fingerprint"]
    results = run_jobs([job], out, "ablation", data={"demo": {"train": fingerprint, "test": "-"}})
    assert results[0]["test_accuracy"] == 50.0
    assert "igkd: warning: 1 of 1 runs predict one class for every test image (student-seed0)" in \
        capsys.readouterr().err


NET = '''
import torch.nn as nn


def make(num_classes, in_channels, width=4):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes)){EXTRA}
'''


def test_an_edited_py_network_is_another_run_and_does_not_resume(tmp_path):
    """helper-68 edited their factory between experiments: '6 runs, 6 already finished' with the
    old network's numbers; a resume after the edit was a 30-line load_state_dict traceback."""
    import dataclasses

    from igkd.experiments.runs import run_key
    net = tmp_path / "mynet.py"
    net.write_text(NET.replace("{EXTRA}", ""))
    spec = f"py:{net}:make"
    cfg = igkd.DistillConfig(data="demo", method="student", model=spec, epochs=1, batch_size=8, val_fraction=0.0,
                             threads=1)
    before = run_key(cfg)
    igkd.distill(cfg, tmp_path / "run", quiet=True, data=_data())
    net.write_text(NET.replace("{EXTRA}", "  # a comment: the file is what is keyed"))
    assert run_key(cfg) != before
    with pytest.raises(UserError, match=r"the source of --model .* changed since the run started"):
        igkd.distill(dataclasses.replace(cfg, epochs=2), tmp_path / "run", resume=True, quiet=True, data=_data())
    # weights that do not fit (a run recorded before the code was kept): one line, not a traceback
    import sys
    for name in [n for n, m in sys.modules.items() if getattr(m, "__file__", None) == str(net.resolve())]:
        del sys.modules[name]  # imported again, as a new process would
    state_file = tmp_path / "run" / "last.pt"
    state = torch.load(state_file, weights_only=True)
    state["model_code"] = None
    torch.save(state, state_file)
    net.write_text(NET.replace("{EXTRA}", "").replace("width=4", "width=6"))
    with pytest.raises(UserError, match=r"its weights do not fit the model --model .* builds now .*was its code "
                                        r"edited\?"):
        igkd.distill(dataclasses.replace(cfg, epochs=2), tmp_path / "run", resume=True, quiet=True, data=_data())


def test_an_unknown_model_names_the_spelling_igkd_uses():
    for typed, hint in (("resnet20", "did you mean resnet:depth=20, the CIFAR ResNet?"),
                        ("wrn-16-2", "did you mean wrn:depth=16,k=2?"), ("mobilnetv2", "did you mean 'mobilenetv2'?")):
        with pytest.raises(UserError, match=f"unknown model '{typed}' in spec '{typed}' \\({hint.replace('?', '[?]')}"):
            igkd.build_model(typed, 10, 3)


def test_a_sweep_knob_the_factory_lacks_is_named_as_the_options_mistake(tmp_path):
    from igkd.experiments.compression import sweep_knobs
    from igkd.spec import parse_spec
    net = tmp_path / "sweepnet.py"
    net.write_text("def make(num_classes, in_channels, depth=2, width=1.0):\n    pass\n")
    base = parse_spec(f"py:{net}:make")
    assert sweep_knobs(base, "depth=depth,width=width") == {"depth": "depth", "width": "width"}
    with pytest.raises(UserError, match=r"--sweep-knobs depth=blocks: .*make takes no keyword 'blocks' \(it takes "
                                        r"depth, in_channels, num_classes, width\)"):
        sweep_knobs(base, "depth=blocks,width=width")
