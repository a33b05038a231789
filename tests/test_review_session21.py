"""Session 21: --augment auto (the augmentation chosen by image size, as DESIGN.md asks)."""
import pytest
import torch
import yaml
from torch import nn

import igkd
from igkd.data import from_tensors
from igkd.distill.augment import resolve_augment


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _images(h, w):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, h, w), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


def test_auto_crops_random_boxes_from_128_pixels_on_the_shorter_side():
    assert resolve_augment("auto", (32, 32)) == "pad-crop"
    assert resolve_augment("auto", (96, 96)) == "pad-crop"          # STL-10
    assert resolve_augment("auto", (100, 224)) == "pad-crop"        # the shorter side decides
    assert resolve_augment("auto", (128, 160)) == "random-resized-crop"
    assert resolve_augment("auto", (224, 224)) == "random-resized-crop"
    assert resolve_augment("pad-crop", (224, 224)) == "pad-crop"    # a choice is kept
    assert resolve_augment("random-resized-crop", (32, 32)) == "random-resized-crop"
    assert igkd.TrainConfig().augment == igkd.DistillConfig().augment == "auto"


@pytest.mark.parametrize("size,chosen,words", [((128, 160), "random-resized-crop", "random resized crops + flip"),
                                               ((32, 32), "pad-crop", "pad-crop 4 + flip")])
def test_a_run_records_and_says_what_auto_chose(tmp_path, capsys, size, chosen, words):
    cfg = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, threads=1)
    igkd.train(cfg, tmp_path / "run", model=_net(), data=_images(*size))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["augment"] == chosen
    assert f"lr 0.05, {words}, device cpu" in capsys.readouterr().err


def test_a_run_recorded_with_pad_crop_resumes_under_auto_and_keeps_its_experiment_key(tmp_path):
    """Runs made before auto recorded pad-crop: a resume with the new default, and an
    experiment looking for its finished runs, must take them as the same run."""
    data = _images(32, 32)
    old = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, threads=1, augment="pad-crop")
    igkd.train(old, tmp_path / "run", quiet=True, model=_net(), data=data)
    new = igkd.TrainConfig(data="demo", epochs=2, batch_size=4, val_fraction=0.0, threads=1)
    assert igkd.train(new, tmp_path / "run", resume=True, quiet=True, model=_net(), data=data)["epochs"] == 2
    from igkd.experiments.runs import know_image_size, run_key
    auto, pad, rrc = (run_key(igkd.DistillConfig(data="memory:sizes", augment=a))
                      for a in ("auto", "pad-crop", "random-resized-crop"))
    assert len({auto, pad, rrc}) == 3  # the data's size not known yet: nothing is loaded to resolve auto
    know_image_size("memory:sizes", data)  # as an experiment's start() does
    assert run_key(igkd.DistillConfig(data="memory:sizes")) == pad != rrc


def test_a_delayed_progress_is_silent_for_quick_work_and_a_plain_one_is_not():
    import io
    from igkd.progress import Progress
    for delay, shown in ((3600.0, False), (0.0, True)):
        out = io.StringIO()
        with Progress(3, "check", "img", stream=out, delay=delay) as bar:
            for _ in range(3):
                bar.update(1)
        assert ("check: 3/3 img (100%)" in out.getvalue()) == shown, out.getvalue()
