"""The Python API with a user's own nn.Module as teacher (no spec string involved)."""

import torch
from torch import nn

from igkd.config import DistillConfig, build
from igkd.data import Dataset, Split
from igkd.distill import Trainer
from igkd.models import build_model
from igkd.precompute import precompute


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_any_module_is_a_teacher(tmp_path):
    torch.manual_seed(0)
    images = (torch.rand(30, 3, 10, 10) * 255).to(torch.uint8)
    split = Split(images, torch.arange(30) % 3)
    data = Dataset("mine", ["x", "y", "z"], 3, (10, 10), split, split)
    teacher = TinyCNN().eval()
    cfg = build(DistillConfig, dict(model="mobilenetv2:width=0.25,drop=14", method="kd+ig", epochs=1,
                                    batch_size=8, ig_steps=4, val_fraction=0.2, normalize="none"))
    store = precompute(teacher, data, cfg, tmp_path / "store", quiet=True)
    assert store.maps.shape == (30, 10, 10) and store.logits.shape == (30, 3)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(store.logits[[7]]), teacher(images[[7]].float() / 255))
    student = build_model(cfg.model, 3, 3)
    summary = Trainer(cfg, student, data, tmp_path / "run", torch.device("cpu"), teacher=teacher, store=store,
                      quiet=True).fit()
    assert summary["method"] == "kd+ig" and (tmp_path / "run" / "model.safetensors").exists()


def test_an_out_the_run_cannot_use_is_refused_before_any_work(tmp_path):
    import pytest
    import igkd
    from igkd.errors import UserError
    teacher = str(__import__("pathlib").Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors")
    cfg = build(DistillConfig, dict(data="demo", teacher=teacher, method="kd+ig", epochs=1,
                                    store=str(tmp_path / "store")))
    mine = tmp_path / "mine"  # the user's folder: their README.md and config.yaml would be overwritten
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    (mine / "config.yaml").write_text("x: 1")
    with pytest.raises(UserError, match=r"holds files that are not an igkd run's \(README.md, config.yaml\)"):
        igkd.distill(cfg, mine, quiet=True)
    with pytest.raises(UserError, match="holds files that are not an igkd run's"):
        igkd.train(build(igkd.TrainConfig, dict(data="demo", epochs=1)), mine, quiet=True)
    assert (mine / "README.md").read_text() == "my notes"
    done = tmp_path / "done"  # a run's folder (names are what is checked): refused before the precompute
    done.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        (done / name).write_text("")
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        igkd.distill(cfg, done, quiet=True)
    with pytest.raises(UserError, match="has finished .* no last.pt to resume from"):
        igkd.distill(cfg, done, resume=True, quiet=True)
    assert not (tmp_path / "store").exists()  # no minutes of precompute spent first


class SmallBN(nn.Module):
    """A user's network with buffers (BatchNorm running statistics) and a Dropout."""

    def __init__(self, classes=2, channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1))
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(self.body(x))


def _tiny_folder(tmp_path):
    from helpers_data import write_image_folder
    return "imagefolder:" + str(write_image_folder(tmp_path / "data", 8, 16))


def test_distill_gives_back_the_callers_modules_threads_and_random_stream(tmp_path):
    import json

    import igkd
    from safetensors.torch import load_file
    data = _tiny_folder(tmp_path)
    torch.manual_seed(1)
    teacher = SmallBN().train()  # run in eval mode, given back in train mode
    student = build_model("mobilenetv2:width=0.25,drop=14", 2, 3).eval()
    student.features[0].train()  # mixed modes, as a caller may keep them
    modes = [m.training for m in student.modules()]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    torch.set_num_threads(3)  # the autouse fixture restores the session's count after the test
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    cfg = igkd.DistillConfig(data=data, method="kd", logits="online", epochs=1, batch_size=8, val_fraction=0.25,
                             threads=1)
    summary = igkd.distill(cfg, tmp_path / "run", teacher=teacher, student=student, quiet=True)
    assert torch.equal(torch.rand(3), expected)  # the run seeded torch's generator: the caller's stream goes on
    assert torch.get_num_threads() == 3
    assert all(m.training for m in teacher.modules())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics too
    assert [m.training for m in student.modules()] == modes
    assert all(p.grad is None for p in student.parameters())
    saved = load_file(tmp_path / "run" / "model.safetensors")  # the student holds the best epoch's weights
    own = student.state_dict()
    assert saved and all(torch.equal(v, own[k.split(".", 1)[1] if k not in own else k]) for k, v in saved.items())
    assert json.loads(json.dumps(summary)).keys() == json.loads((tmp_path / "run" / "summary.json").read_text()).keys()
    result = igkd.evaluate(tmp_path / "run" / "model.safetensors", data=data, threads=1)
    assert torch.get_num_threads() == 3 and result["accuracy"] == summary["test_accuracy"]


def test_train_and_precompute_give_back_the_callers_modules_and_threads(tmp_path):
    import igkd
    data = _tiny_folder(tmp_path)
    torch.set_num_threads(3)
    model = SmallBN().eval()
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    igkd.train(igkd.TrainConfig(data=data, epochs=1, batch_size=8, val_fraction=0.25, threads=1), tmp_path / "run",
               model=model, quiet=True)
    assert torch.equal(torch.rand(2), expected) and torch.get_num_threads() == 3
    assert not any(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    teacher = SmallBN().train()
    store = igkd.precompute(teacher, data, igkd.PrecomputeConfig(ig_steps=2, check_images=0), tmp_path / "store",
                            quiet=True, threads=1)
    assert store.maps.shape == (16, 16, 16) and torch.get_num_threads() == 3
    assert all(m.training for m in teacher.modules())


def test_wrong_argument_types_are_one_line_errors(tmp_path):
    from pathlib import Path

    import igkd
    import pytest
    from igkd.errors import UserError
    teacher = str(Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors")
    module = build_model("mobilenetv2:width=0.25,drop=14", 10, 1)
    with pytest.raises(UserError, match=r"dataset spec must be a string .*'imagefolder:runs/x'\), got PosixPath"):
        igkd.load_dataset(Path("runs/x"))
    with pytest.raises(UserError, match="dataset spec must be a string .* got Dataset"):
        igkd.load_dataset(igkd.load_dataset("demo"))
    with pytest.raises(UserError, match="model spec must be a string .* got int"):
        igkd.build_model(3)
    with pytest.raises(UserError, match="count_parameters.. takes a torch.nn.Module, got str"):
        igkd.count_parameters("mobilenetv2")
    with pytest.raises(UserError) as e:  # exported as it is (test_review_session22), given the data's classes
        igkd.export_model(module, tmp_path / "m.onnx")
    assert str(e.value).startswith("a module records no dataset; pass data=")
    assert igkd.evaluate(module, data="demo")["model"] == "module:MobileNetV2"  # scored as it is
    with pytest.raises(UserError, match="^--teacher takes a checkpoint path or a spec, not a MobileNetV2 module"):
        igkd.audit(teacher=module, student=teacher, data="demo")  # not sent to igkd.distill(teacher=...)
    with pytest.raises(UserError, match=r"^--data must be a string, got a ndarray$"):
        igkd.evaluate(teacher, data=__import__("numpy").zeros((40, 40)))
    for run in (igkd.run_ablation, igkd.run_montecarlo, igkd.run_compression, igkd.run_search):
        with pytest.raises(UserError, match=rf"{run.__name__}\(\) needs an igkd.ExperimentConfig .* got dict"):
            run({"data": "demo"}, tmp_path / "exp")
        assert run.__doc__
    assert not (tmp_path / "exp").exists()
    net, meta = igkd.load_teacher(teacher, "demo")  # a spec string for the dataset, as everywhere else
    assert meta["model"] == "mobilenetv2:width=0.5" and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(UserError, match="load_teacher.. needs the dataset .* got int"):
        igkd.load_teacher(teacher, 3)
    # a Path for a file field is a path, as evaluate and export take one ("must be a string" before);
    # data and model are specs, where a Path is told how to write one
    cfg = igkd.DistillConfig(data="demo", teacher=Path(teacher), store=tmp_path / "store", method="kd")
    assert cfg.teacher == teacher and cfg.store == str(tmp_path / "store")
    with pytest.raises(UserError, match=r"^--data must be a string, got PosixPath"):
        igkd.DistillConfig(data=Path("demo"))


def test_a_part_registered_again_from_a_rerun_cell_replaces_the_old_one(monkeypatch):
    import igkd
    import pytest
    from igkd.distill import parts as registry
    from igkd.errors import UserError
    registry.parts()
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))  # the registrations end with the test

    def cell(help_text):  # the class a notebook cell defines, each time it runs
        class Rerun(registry.Part):
            name = "api-rerun"
            help = help_text
        return Rerun()
    igkd.register_part(cell("first"))
    igkd.register_part(cell("edited"))  # the same class defined again: not "already registered"
    assert registry.parse_method("kd+api-rerun").parts[-1].help == "edited"

    class Other(registry.Part):
        name = "api-rerun"
    with pytest.raises(UserError, match="already registered"):
        igkd.register_part(Other())
