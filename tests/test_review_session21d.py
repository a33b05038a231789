"""Review of session 21's resume and py: factory commits (helper 21d): a teacher known by its
program, not its weights alone; a part state a resume can read; a factory's error as one line."""
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import igkd
from igkd.data import from_tensors
from igkd.errors import UserError


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


BASE = dict(data="demo", method="kd", batch_size=4, val_fraction=0.0, threads=1)


def _distill(out, epochs, resume=False, **kw):
    return igkd.distill(igkd.DistillConfig(**BASE, epochs=epochs, **{k: v for k, v in kw.items() if k != "t"}),
                        out, resume=resume, quiet=True, student=_net(), data=_DATA,
                        teacher=kw.get("t"))


_DATA = _data()


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_a_frozen_torchscript_teacher_at_another_path_resumes_only_as_the_same_program(tmp_path):
    """Frozen TorchScript teachers have no state dict: one weights fingerprint for all of them,
    so any other one at another path was taken for the run's."""
    from igkd.export import torchscript_module
    from igkd.models import build_model
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"t{seed}.pt")
        torch.jit.save(torchscript_module(build_model("resnet:depth=8", 2, 3).eval(), (3, 32, 32)), str(paths[-1]))
    _distill(tmp_path / "run", 1, teacher=f"torchscript:{paths[0]}")
    with pytest.raises(UserError, match="differs in teacher .* its weights are compared, not its path"):
        _distill(tmp_path / "run", 2, resume=True, teacher=f"torchscript:{paths[1]}")
    moved = tmp_path / "moved.pt"
    shutil.copy(paths[0], moved)  # the same program elsewhere: resumes
    assert _distill(tmp_path / "run", 2, resume=True, teacher=f"torchscript:{moved}")["epochs"] == 2


def test_a_teacher_trained_again_into_the_runs_own_path_is_refused(tmp_path):
    from igkd.models import build_model, save_checkpoint

    def save(seed):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / "teacher", build_model("resnet:depth=8", 2, 3), {
            "model": "resnet:depth=8", "num_classes": 2, "in_channels": 3, "classes": ["a", "b"],
            "preprocessing": {"normalize": "none"}})
    save(0)
    teacher = str(tmp_path / "teacher.safetensors")
    _distill(tmp_path / "run", 1, teacher=teacher)
    save(1)
    with pytest.raises(UserError, match=r"--teacher .*teacher.safetensors has other weights than the teacher the run "
                                        "started with"):
        _distill(tmp_path / "run", 2, resume=True, teacher=teacher)
    save(0)  # the run's own teacher back: resumes
    assert _distill(tmp_path / "run", 2, resume=True, teacher=teacher)["epochs"] == 2


def test_a_teacher_module_resumes_as_itself_and_another_module_is_refused(tmp_path):
    torch.manual_seed(0)
    first = _net()
    _distill(tmp_path / "run", 1, t=first)
    torch.manual_seed(1)
    with pytest.raises(UserError, match="the teacher module has other weights"):
        _distill(tmp_path / "run", 2, resume=True, t=_net())
    assert _distill(tmp_path / "run", 2, resume=True, t=first)["epochs"] == 2


def test_a_part_state_a_resume_cannot_read_is_refused_when_saved_not_when_resumed(tmp_path, monkeypatch):
    """A NumPy number in a plug-in part's state: last.pt was written and every resume then
    called it damaged."""
    from igkd.distill import parts as registry
    registry.parts()
    monkeypatch.setattr(registry, "_parts", dict(registry._parts))

    class Ema(registry.Part):
        name = "test-numpy-ema"

        def setup(self, run):
            return {"ema": 0.0}

        def loss(self, state, step):
            state["ema"] = np.float64(0.9 * state["ema"] + 0.1)
            return {}

        def state_dict(self, state):
            return {"ema": state["ema"]}
    igkd.register_part(Ema())
    with pytest.raises(UserError, match="method part 'test-numpy-ema' keeps a state a resume cannot read "
                                        r"\(.*numpy.*\); its state_dict must return tensors and plain values"):
        igkd.distill(igkd.DistillConfig(method="test-numpy-ema", data="demo", batch_size=4, val_fraction=0.0,
                                        threads=1, epochs=1), tmp_path / "run", quiet=True, student=_net(), data=_DATA)
    assert not (tmp_path / "run" / "last.pt").exists()


FACTORIES = '''
import torch.nn as nn
from igkd.errors import UserError

def igkds_own(num_classes, **kw):
    raise UserError("data spec 'x' names no folder; pass imagefolder:PATH")

def silent(num_classes, **kw):
    raise ValueError()

def deep(num_classes, **kw):
    return nn.Conv2d(3, "four", 3)

def bad(num_classes, **kw):
    raise RuntimeError("bad width")

def interrupted(num_classes, **kw):
    raise KeyboardInterrupt
'''


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "facs21d.py"
    path.write_text(FACTORIES)
    return path


def test_a_factorys_exception_is_one_short_line_naming_the_factorys_own_line(factories):
    from igkd.models import build_model
    with pytest.raises(UserError) as e:
        build_model(f"py:{factories}:igkds_own", 2, 3)
    assert str(e.value) == "data spec 'x' names no folder; pass imagefolder:PATH"  # igkd's own, as it is
    with pytest.raises(UserError, match=r":silent raised ValueError \(at facs21d.py line 9\) when"):
        build_model(f"py:{factories}:silent", 2, 3)
    with pytest.raises(UserError, match=r":deep raised TypeError: .* \(at facs21d.py line 12, raised in conv.py "):
        build_model(f"py:{factories}:deep", 2, 3)
    with pytest.raises(UserError) as e:
        build_model(f"py:{factories}:bad,note={'x' * 5000}", 2, 3)
    assert len(str(e.value)) < 400 and "note='xxx" in str(e.value) and "..." in str(e.value)
    with pytest.raises(KeyboardInterrupt):  # not an Exception: Ctrl-C stays Ctrl-C
        build_model(f"py:{factories}:interrupted", 2, 3)
