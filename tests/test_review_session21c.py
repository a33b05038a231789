"""Review of --init FILE (session 21c): a resumed run or experiment whose weights file moved,
an experiment given a missing --init file, and model.json / model.safetensors as one start."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import igkd
from helpers_cli import run_igkd
from igkd.data import from_tensors
from igkd.models import build_model, save_checkpoint

MODEL = "resnet:depth=8"


def _images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A resnet:depth=8 for 5 classes as a plain state dict, as torchvision's weights are."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("init") / "pretrained.pth"
    torch.save(build_model(MODEL, 5, 3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 2-class RGB image folder of 16 + 8 tiny images (an experiment takes a data spec)."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        for i in range(n):
            (root / split / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / f"c{i % 2}" / f"{i}.png")
    return f"imagefolder:{root}"


def test_a_resume_takes_the_same_weights_at_another_path_and_names_its_own_init_otherwise(tmp_path, weights):
    mine = tmp_path / "a" / "weights.pth"
    mine.parent.mkdir()
    shutil.copy(weights, mine)
    base = dict(data="demo", model=MODEL, batch_size=4, val_fraction=0.0, threads=1)
    first = igkd.train(igkd.TrainConfig(**base, epochs=1, init=str(mine)), tmp_path / "run", quiet=True, data=_images())
    moved = tmp_path / "b" / "weights.pth"
    moved.parent.mkdir()
    mine.rename(moved)
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 for k, v in torch.load(weights, weights_only=True).items()}, other)
    with pytest.raises(igkd.UserError, match=f"--init {mine}: the run started from its weights") as e:
        igkd.train(igkd.TrainConfig(**base, epochs=2, init=str(other)), tmp_path / "run", resume=True, quiet=True,
                   data=_images())
    assert "\n" not in str(e.value)
    again = igkd.train(igkd.TrainConfig(**base, epochs=2, init=str(moved)), tmp_path / "run", resume=True,
                       quiet=True, data=_images())
    assert again["epochs"] == 2 and again["init"] == first["init"]  # the record of what was copied, from last.pt


def test_an_experiment_resumes_its_run_after_the_init_file_moved(tmp_path, weights, folder):
    def ablation(init):
        return run_igkd("experiment", "ablation", "--data", folder, "--methods", "student", "--seeds", "1",
                        "--model", MODEL, "--init", init, "--epochs", "1", "--batch-size", "8",
                        "--val-fraction", "0", "--threads", "1", "--out", tmp_path / "exp")
    first = tmp_path / "first.pth"
    shutil.copy(weights, first)
    assert ablation(first).returncode == 0
    (run,) = (tmp_path / "exp" / "runs").iterdir()
    (run / "summary.json").unlink()  # interrupted after its last epoch: last.pt is there
    moved = tmp_path / "moved.pth"
    first.rename(moved)
    r = ablation(moved)  # the run is found by the file's sha256, and was refused for its path
    assert r.returncode == 0 and "resuming in" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "exp" / "runs").iterdir()] == [run.name] and (run / "summary.json").exists()


@pytest.mark.parametrize("args,words", [
    (["--init", "missing.pth"], "--init missing.pth: no such file"),
    (["--init", "teacher"], "--init teacher copies the teacher's layers into the students; pass --teacher"),
])
def test_an_experiment_with_a_bad_init_is_refused_before_it_marks_its_folder(tmp_path, folder, args, words):
    r = run_igkd("experiment", "ablation", "--data", folder, "--methods", "student", "--seeds", "1", *args,
                 "--out", tmp_path / "exp")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "exp").exists()


def test_a_checkpoints_json_and_safetensors_key_one_run(tmp_path):
    from igkd.experiments.runs import run_key
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "model", build_model(MODEL, 2, 3), {"model": MODEL, "num_classes": 2,
                                                                             "in_channels": 3})
    key = lambda init: run_key(igkd.DistillConfig(data="demo", model=MODEL, init=str(init)))  # noqa: E731
    assert key(weights) == key(weights.with_suffix(".json")) != key("scratch")
