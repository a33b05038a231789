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
