"""Session 21: what a user bringing 224-pixel-class images is told about the augmentation."""
import pytest
import torch
from torch import nn

import igkd
from igkd.data import from_tensors


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.fixture(scope="module")
def large_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 128, 160), dtype=torch.uint8, generator=g)
    y = torch.tensor([0, 1] * 4)
    return from_tensors((x, y), (x[:4], y[:4]), ["a", "b"])


@pytest.mark.parametrize("augment,noted", [("pad-crop", True), ("random-resized-crop", False)])
def test_pad_crop_on_large_images_says_what_suits_them(large_images, tmp_path, capsys, augment, noted):
    cfg = igkd.TrainConfig(data="demo", epochs=1, batch_size=4, val_fraction=0.0, augment=augment, threads=1)
    igkd.train(cfg, tmp_path / "run", model=_net(), data=large_images)
    err = capsys.readouterr().err
    assert ("--augment pad-crop shifts the 128-pixel images by at most 4 pixels" in err) == noted, err
    assert ("random-resized-crop, as --config imagefolder224 sets" in err) == noted
