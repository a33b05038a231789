"""Regressions of the data path found in review: image folders whose images silently
vanished (dangling links, images in subfolders or beside the class folders), ImageNet's
unlabelled test/ beside a sorted val/, and an IDX header whose size overflows."""

from __future__ import annotations

import importlib.util
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from igkd.data import load_dataset
from igkd.data.fashion_mnist import read_idx
from igkd.errors import UserError


def _png(path: Path, value: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def _folder(tmp_path, monkeypatch, splits=("train", "test")) -> Path:
    """``splits``/ with classes a and b of two 4x4 PNGs each; a private cache."""
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "folder"
    for split in splits:
        for c in ("a", "b"):
            for i in range(2):
                _png(root / split / c / f"{i}.png")
    return root


# ---------------------------------------------------------------- nothing vanishes without a word


def test_dangling_symlink_to_an_image_is_refused_naming_the_link(tmp_path, monkeypatch):
    root = _folder(tmp_path, monkeypatch)
    # the image a link points at was moved away: it used to be dropped from the class unsaid
    os.symlink(tmp_path / "moved" / "2.png", root / "train" / "a" / "2.png")
    with pytest.raises(UserError, match=r"cannot read .*train/a/2\.png \(a symbolic link to .*moved/2\.png: "
                                        r"No such file or directory\); fix or remove the link") as e:
        load_dataset(f"imagefolder:{root}")
    assert "\n" not in str(e.value)
    (root / "train" / "a" / "2.png").unlink()
    os.symlink("3.png", root / "train" / "a" / "3.png")  # a loop was refused already; still one line
    with pytest.raises(UserError, match=r"3\.png .*Too many levels of symbolic links.*; fix or remove"):
        load_dataset(f"imagefolder:{root}")


def test_dangling_symlink_to_a_class_folder_is_refused(tmp_path, monkeypatch):
    root = _folder(tmp_path, monkeypatch)
    for split in ("train", "test"):  # in both splits, so no class mismatch gave it away either
        os.symlink(tmp_path / "elsewhere" / "c", root / split / "c")
    with pytest.raises(UserError, match=r"cannot read .*train/c \(a symbolic link to .*elsewhere/c: No such file"):
        load_dataset(f"imagefolder:{root}")


def test_images_in_subfolders_or_beside_class_folders_are_named_in_a_warning(tmp_path, monkeypatch, caplog):
    root = _folder(tmp_path, monkeypatch)
    _png(root / "train" / "b" / "2019" / "x.png")  # torchvision's ImageFolder reads these; igkd does not
    _png(root / "train" / "b" / "2020" / "y.png")
    for i in range(3):
        _png(root / "train" / f"loose{i}.png")
    (root / "train" / "a" / ".thumbnails").mkdir()  # hidden: not worth a word
    with caplog.at_level(logging.WARNING, logger="igkd.data.imagefolder"):
        train = load_dataset(f"imagefolder:{root}").train
    assert len(train) == 4
    assert "skipped 2 folders inside class folders (e.g. b/2019)" in caplog.text
    assert "skipped 3 images that are not in a class folder (e.g. loose0.png)" in caplog.text
    assert ".thumbnails" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igkd.data.imagefolder"):  # a clean folder: no word
        load_dataset(f"imagefolder:{root / 'test'},test=0.5").train
    assert caplog.text == ""


def test_imagenet_unlabelled_test_folder_beside_sorted_val_says_to_move_it(tmp_path, monkeypatch):
    root = _folder(tmp_path, monkeypatch, splits=("train", "val"))
    for i in range(3):  # ILSVRC/Data/CLS-LOC/test: loose images without labels
        _png(root / "test" / f"ILSVRC2012_test_{i:08d}.JPEG")
    with pytest.raises(UserError, match=r"test has no class subfolders \(unlabelled images, like ImageNet's test "
                                        r"set\?\), and test/ is the test split whenever it exists; move .*/test out"):
        load_dataset(f"imagefolder:{root}")
    (root / "test").rename(tmp_path / "imagenet-test")
    assert load_dataset(f"imagefolder:{root}").test.labels.tolist() == [0, 0, 1, 1]  # val/


# ---------------------------------------------------------------- fashion-mnist: a forged IDX header


def test_idx_header_whose_size_overflows_int64_is_a_one_line_error(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(struct.pack(">IIII", 0x0803, 2**31, 2**31, 4))  # numpy's int64 product of it wraps to 0
    with pytest.raises(UserError, match=r"is truncated or padded: header says \(2147483648, 2147483648, 4\)"):
        read_idx(p, 3)


# ---------------------------------------------------------------- what the README says of deep images


def test_16_bit_colour_png_reads_as_its_high_byte_as_the_readme_says(tmp_path):
    """Pins the README's corrected sentence (it promised round(v * 255 / 65535) for every
    16-bit image): Pillow has no 16-bit colour mode and keeps the high byte of each value."""
    from igkd.data.imagefolder import _decode_one
    v = np.array([255, 383, 0x7F80, 0x80FF, 65535], np.uint16)
    rows = b"\x00" + np.repeat(v, 3).astype(">u2").tobytes()  # one row, filter 0, RGB

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    p = tmp_path / "deep.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", len(v), 1, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    got = _decode_one(p, "RGB", (1, len(v)), None, p)
    assert got[0, :, 0].tolist() == (v >> 8).tolist() == [0, 1, 127, 128, 255]


def test_decode_threads_follow_the_cpus_the_process_may_use():
    """Image decoding used min(8, the machine's CPU count) threads: in a container or under
    taskset limited to fewer CPUs it oversubscribed them. It now follows the affinity."""
    import os
    from igkd.data.image_cache import decode_threads
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert decode_threads() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert decode_threads() == min(8, len(before))


def test_a_class_named_like_a_split_is_a_class_when_test_is_given(tmp_path):
    """DIR/<class> with test=0.5 and a class called 'train' (or 'val'): read as half a
    train/test layout, refused with advice to add the test= already given."""
    from helpers_data import write_image_folder
    from igkd.data import load_dataset
    write_image_folder(tmp_path / "src", per_class=4, side=8, classes=("train", "zebra"))
    ds = load_dataset(f"imagefolder:{tmp_path / 'src' / 'train'},test=0.5,cache=0")
    assert ds.classes == ["train", "zebra"] and len(ds.train) + len(ds.test) == 8


STRIP_CHILD = r'''
import resource, sys
from pathlib import Path
from igkd.data.imagefolder import _decode_one
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (768 << 20), resource.RLIM_INFINITY))  # 768 MiB more
a = _decode_one(Path(sys.argv[1]), "RGB", (224, 224), "shorter", Path(sys.argv[1]))
print(a.shape)
'''


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from Linux's /proc")
def test_resize_shorter_of_an_extreme_strip_resizes_only_the_crop(tmp_path):
    import subprocess
    import sys
    # a 2 x 20000 strip at size=224 was first resized whole, to 224 x 2,240,000 (1.5 GB), then
    # cropped: in a process allowed 768 MiB more it failed with MemoryError
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (20000, 2, 3), dtype=np.uint8)).save(tmp_path / "strip.png")
    r = subprocess.run([sys.executable, "-c", STRIP_CHILD, str(tmp_path / "strip.png")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "(224, 224, 3)", r.stderr[-1500:]
    # a smaller strip, both ways: the crop's region resized alone is within one grey level of the whole
    from igkd.data.imagefolder import LONG_RESIZE, _decode_one, shorter_geometry
    strip = rng.integers(0, 256, (4000, 3, 3), dtype=np.uint8)
    Image.fromarray(strip).save(tmp_path / "small.png")
    new, box = shorter_geometry(3, 4000, 16, 16)
    assert new[0] * new[1] > LONG_RESIZE * 16 * 16  # takes the crop-only path
    whole = np.asarray(Image.fromarray(strip).resize(new, Image.BILINEAR).crop(box)).astype(int)
    got = _decode_one(tmp_path / "small.png", "RGB", (16, 16), "shorter", tmp_path).astype(int)
    assert got.shape == whole.shape and np.abs(got - whole).max() <= 1


# ---------------------------------------------------------------- a folder of test/ (or val/) alone


def _held_out(tmp_path, split="test", classes=("cat", "dog")) -> Path:
    """``root/split/<class>/`` alone: 3 random 8x8 PNGs per class (no train/)."""
    import shutil
    from helpers_data import write_image_folder
    root = write_image_folder(tmp_path / "held", 3, 8, classes)
    shutil.rmtree(root / "train")
    if split != "test":
        (root / "test").rename(root / split)
    return root


def _tiny_checkpoint(path: Path, classes=("cat", "dog")) -> Path:
    import torch
    from conftest import TINY_TEACHER
    from igkd.models import build_model, save_checkpoint
    torch.manual_seed(0)
    return save_checkpoint(path, build_model(TINY_TEACHER, len(classes), 3),
                           {"model": TINY_TEACHER, "num_classes": len(classes), "in_channels": 3,
                            "classes": list(classes), "preprocessing": {"normalize": "none"}})


@pytest.mark.parametrize("split", ["test", "val"])
def test_folder_of_a_test_split_alone_loads_without_train(tmp_path, split):
    """Such a folder was refused ('has test/ but no train/; add it'): users made up a train/
    of one image per class to score a model on it."""
    root = _held_out(tmp_path, split)
    ds = load_dataset(f"imagefolder:{root}")
    assert ds.classes == ["cat", "dog"] and ds.image_size == (8, 8) and not ds.has_train
    files = sorted((root / split).glob("*/*.png"))
    want = np.stack([np.asarray(Image.open(f)) for f in files]).transpose(0, 3, 1, 2)
    assert np.array_equal(ds.test.images.numpy(), want) and ds.test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.fingerprint("test")
    # whatever reads the train split gets one line naming the folder and what to add
    advice = f"{root} has {split}/ but no train/, so it can be scored (igkd evaluate), not trained on; add " \
             f"{root}/train/<class>/ with the class folders of {split}/"
    for read in (lambda: ds.train, lambda: ds.fingerprint("train"), ds.channel_stats, ds.require_train):
        with pytest.raises(UserError) as e:
            read()
        assert str(e.value).endswith(advice) and "\n" not in str(e.value)
    # its size: the first image's, as for a train split
    Image.fromarray(np.zeros((5, 6, 3), np.uint8)).save(root / split / "cat" / "0.png")
    assert load_dataset(f"imagefolder:{root}").image_size == (5, 6)
    assert load_dataset(f"imagefolder:{root},size=4").test.images.shape == (6, 3, 4, 4)


def test_folder_of_a_test_split_alone_refuses_test_and_seed_and_strays(tmp_path):
    root = _held_out(tmp_path)
    for opts, given in ((",test=0.2", "test="), (",seed=3", "seed="), (",test=0.5,seed=1", "test= and seed=")):
        with pytest.raises(UserError, match=rf"holds only test/, a test split to score; drop {given} \(or use "
                                            rf"imagefolder:.*/test,test=0.2 to split"):
            load_dataset(f"imagefolder:{root}{opts}")
    (root / "val").mkdir()  # test/ is the test split whenever it exists, as beside train/
    assert load_dataset(f"imagefolder:{root}").test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (root / "val").rmdir()
    (root / "notes").mkdir()  # another folder: neither a folder to score nor class folders: said
    with pytest.raises(UserError, match=r"has test/ but no train/, and other folders beside it \(notes\); keep only "
                                        r"test/<class>/ there to score it"):
        load_dataset(f"imagefolder:{root}")
    (root / "notes").rmdir()
    # ImageNet's unlabelled test/ beside a sorted val/, without train/: told to move test/ away
    (root / "test").rename(root / "val")
    _png(root / "test" / "ILSVRC2012_test_00000001.JPEG")
    with pytest.raises(UserError, match=r"test has no class subfolders \(unlabelled images"):
        load_dataset(f"imagefolder:{root}")


def test_evaluate_scores_a_folder_of_test_alone_through_the_cli(tmp_path):
    import json
    from helpers_cli import run_igkd
    root = _held_out(tmp_path)
    weights = _tiny_checkpoint(tmp_path / "model")
    r = run_igkd("evaluate", "--weights", weights, "--data", f"imagefolder:{root}", "--json")
    assert r.returncode == 0, r.stderr
    plain = json.loads(r.stdout)
    assert plain["total"] == 6 and plain["split"] == "test"
    # renamed classes, one unmapped, and the teacher-correct protocol (the model as its own teacher)
    import shutil
    renamed = tmp_path / "renamed"
    for old, new in (("cat", "bird"), ("cat", "kitty"), ("dog", "puppy")):
        shutil.copytree(root / "test" / old, renamed / "test" / new)
    (tmp_path / "map.yaml").write_text("kitty: cat\npuppy: dog\n")
    r = run_igkd("evaluate", "--weights", weights, "--data", f"imagefolder:{renamed}", "--class-map",
                 tmp_path / "map.yaml", "--teacher-correct", weights, "--json")
    assert r.returncode == 0, r.stderr
    mapped = json.loads(r.stdout)
    assert mapped["class_map"]["dropped_images"] == 3 and mapped["class_map"]["dropped_classes"] == ["bird"]
    # kitty and puppy are the images of cat and dog: the model gets the same ones right
    assert mapped["teacher_correct"]["of"] == 6 and mapped["teacher_correct"]["images"] == plain["correct"]
    assert mapped["total"] == mapped["correct"] == plain["correct"]


def test_training_on_a_folder_of_test_alone_is_one_line_and_writes_nothing(tmp_path):
    from helpers_cli import run_igkd
    from conftest import TINY_TEACHER
    root = _held_out(tmp_path)
    weights = _tiny_checkpoint(tmp_path / "model")
    data = f"imagefolder:{root}"
    advice = f"{root} has test/ but no train/"
    runs = {"train": ["train", "--data", data, "--model", TINY_TEACHER, "--epochs", 1, "--out", tmp_path / "t"],
            "distill": ["distill", "--data", data, "--teacher", weights, "--model", TINY_TEACHER, "--epochs", 1,
                        "--store", tmp_path / "s1", "--out", tmp_path / "d"],
            "precompute": ["precompute", "--data", data, "--teacher", weights, "--store", tmp_path / "s2"],
            "experiment": ["experiment", "ablation", "--data", data, "--teacher", weights, "--model", TINY_TEACHER,
                           "--epochs", 1, "--out", tmp_path / "e"],
            "normalize": ["evaluate", "--weights", weights, "--data", data, "--normalize", "dataset"]}
    if importlib.util.find_spec("onnxruntime"):  # said before the fp32 export, not after it
        runs["int8"] = ["export", "--weights", weights, "--data", data, "--output", tmp_path / "m.onnx", "--int8"]
    for name, args in runs.items():
        r = run_igkd(*args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and advice in lines[0], (name, r.stderr)
        assert name != "normalize" or "the others are none and imagenet" in lines[0]  # the way out without train/
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held", "model.json", "model.safetensors"]
