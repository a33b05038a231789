"""Data a notebook holds, through the Python API (``data=``, ``igkd.data.from_tensors``), and
export leaving the caller's module as it was."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

import igkd
from helpers_cli import run_igkd
from igkd.data import Dataset, Split, from_tensors
from igkd.errors import UserError


def tiny(channels=1, classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


def demo_tensors(train=None, test=None):
    demo = igkd.load_dataset("demo")
    tr, te = demo.train, demo.test
    return dict(train=(tr.images[:train], tr.labels[:train]), test=(te.images[:test], te.labels[:test]),
                classes=demo.classes)


def test_distill_kd_ig_on_tensors_gives_the_weights_of_the_same_data_as_a_spec(tmp_path):
    """The demo set as tensors and as the spec "demo", same seed: bitwise the same store and the
    same student (torch.equal, not a tolerance: the same uint8 pixels and labels go through the
    same CPU operations in the same order, so nothing may differ, not even rounding). The run
    records the data by content, and the store is checked by the same fingerprint."""
    mem = from_tensors(**demo_tensors())
    cfg = dict(method="kd+ig", epochs=1, batch_size=32, subset=0.05, ig_steps=2, check_images=0, threads=1,
               normalize="none")
    spec = igkd.distill(igkd.DistillConfig(data="demo", store=str(tmp_path / "s1"), **cfg), tmp_path / "spec",
                        teacher=tiny(), student=tiny(), quiet=True)
    given = igkd.distill(igkd.DistillConfig(data="cifar10:/nowhere", store=str(tmp_path / "s2"), **cfg),
                         tmp_path / "mem", teacher=tiny(), student=tiny(), quiet=True, data=mem)  # data= wins
    a, b = load_file(tmp_path / "spec" / "model.safetensors"), load_file(tmp_path / "mem" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert given["test"] == spec["test"] and given["dataset"] == mem.spec
    assert mem.spec.startswith("memory:sha256=") and len(mem.spec) == len("memory:sha256=") + 32
    assert yaml.safe_load((tmp_path / "mem" / "config.yaml").read_text())["data"] == mem.spec
    meta = json.loads((tmp_path / "mem" / "model.json").read_text())
    assert meta["dataset"] == mem.spec and meta["dataset_fingerprint"] == igkd.load_dataset("demo").fingerprint()
    s1, s2 = (json.loads((tmp_path / s / "manifest.json").read_text()) for s in ("s1", "s2"))
    assert s1["identity"] == s2["identity"] and s2["dataset_spec"] == mem.spec
    other = from_tensors(**{**demo_tensors(), "train": (mem.train.images.flip(0), mem.train.labels.flip(0))})
    with pytest.raises(UserError, match=r"store .*s2 was computed for another dataset .*fingerprint differs"):
        igkd.precompute(tiny(), other, igkd.PrecomputeConfig(ig_steps=2, check_images=0), tmp_path / "s2")


def test_train_evaluate_resume_and_reloading_on_tensors(tmp_path):
    """Train and evaluate on tensors; what the run records loads nothing: the command given its
    config or its data spec is refused in one line naming what to pass, and the model card says
    how to score the model instead (the Python call on the same tensors, not a command that is
    refused); resuming takes the same data (rebuilt from the same tensors) and nothing else."""
    tensors = demo_tensors(200, 100)
    mem = from_tensors(**tensors)
    net = dict(model="mobilenetv2:width=0.25,drop=14", batch_size=32, threads=1, normalize="none")
    run = tmp_path / "run"
    summary = igkd.train(igkd.TrainConfig(epochs=1, **net), run, data=mem, quiet=True)
    assert summary["dataset"] == mem.spec
    result = igkd.evaluate(run / "model.safetensors", data=mem)
    assert result["accuracy"] == summary["test_accuracy"] and result["data"] == mem.spec
    for args in (("train", "--config", run / "config.yaml", "--out", tmp_path / "again"),
                 ("evaluate", "--weights", run / "model.safetensors", "--data", mem.spec)):
        r = run_igkd(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"dataset {mem.spec} was given to igkd's Python API in memory (data=) and cannot be loaded" in r.stderr
        assert "pass the same data again as data=" in r.stderr
    assert not (tmp_path / "again").exists()
    card = (run / "README.md").read_text()
    assert "igkd evaluate" not in card and "--data memory:" not in card
    assert 'data = igkd.from_tensors(train=(x_train, y_train), test=(x_test, y_test), classes=meta["classes"])' in card
    assert 'igkd.evaluate("model.safetensors", data=data)' in card and f"in memory ({mem.spec})" in card
    assert "igkd export --weights model.safetensors --data SPEC --format onnx" in card
    r = run_igkd("export", "--weights", run / "model.safetensors", "--output", tmp_path / "m.pt", "--format",
                 "torchscript")  # the parity check's data, from the file's metadata
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "given to igkd's Python API in memory" in r.stderr
    assert "pass the same data as igkd.export_model(..., data=dataset), or --data SPEC of it on disk" in r.stderr
    assert not (tmp_path / "m.pt").exists()
    longer = igkd.TrainConfig(epochs=2, **net)
    fewer = from_tensors(**{**tensors, "train": (tensors["train"][0][:150], tensors["train"][1][:150])})
    for data in (fewer, None, "demo"):
        with pytest.raises(UserError, match=rf"^cannot resume {run}: it was trained on {mem.spec}, this call gives "
                                            r".* pass data= the same images, labels and classes"):
            igkd.train(longer, run, resume=True, data=data, quiet=True)
    again = from_tensors(**tensors)  # another object, the same content
    assert igkd.train(longer, run, resume=True, data=again, quiet=True)["epochs"] == 2


def test_datasets_given_as_data_are_recorded_truly():
    """A dataset load_dataset returned is recorded as its spec (it reloads it); one built from
    splits by hand is recorded by content, as from_tensors records the same tensors; float
    pixels that were uint8 / 255 are the same data as the uint8 ones."""
    from igkd.data.memory import in_memory
    demo = igkd.load_dataset("demo")
    assert in_memory(demo) == (demo, "demo")
    images, labels = demo.test.images[:20], demo.test.labels[:20]
    mem = from_tensors(train=(images, labels), test=(images, labels), classes=demo.classes)
    by_hand, spec = in_memory(Dataset("mine", demo.classes, 1, (28, 28), Split(images, labels), Split(images, labels)))
    assert spec == by_hand.spec == mem.spec
    floats = from_tensors(train=(images.float() / 255, labels), test=(images.double() / 255, labels.int()),
                          classes=demo.classes)
    assert floats.spec == mem.spec
    test_only = from_tensors(train=None, test=(images, labels), classes=demo.classes)
    assert not test_only.has_train and test_only.spec != mem.spec
    images[0] = 0  # the caller's tensor changes afterwards: the dataset (and its recorded digest) does not
    assert from_tensors(train=(images, labels), test=(images, labels), classes=demo.classes).spec != mem.spec
    assert in_memory(mem)[1] == mem.spec


U8 = (torch.arange(256) % 2).reshape(4, 1, 8, 8).to(torch.uint8)
Y = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(train=(U8.float() * 2, Y)), r"^train images are float with values in \[0, 2\]; float pixels must lie in "
                                      r"\[0, 1\] \(divide uint8 pixels by 255"),
    (dict(train=(U8.float() * float("nan"), Y)), r"^train images are float with values in \[nan, nan\]"),
    (dict(train=(U8.long(), Y)), r"^train images are torch.int64; pass uint8 pixels \(0..255\) or float pixels"),
    (dict(train=(U8[:, 0], Y)), r"^train images must be 4-D N x C x H x W, got shape \(4, 8, 8\); add the channel "
                                r"dimension with images.unsqueeze\(1\)$"),
    (dict(train=(U8.reshape(4, 8, 8, 1), Y)), r"^train images of shape \(4, 8, 8, 1\) look channels-last .*"
                                              r"images.permute\(0, 3, 1, 2\)"),
    (dict(train=(U8[:0], Y[:0])), r"^train images are empty \(0 of shape \(1, 8, 8\)\); give at least one image$"),
    (dict(train=(U8, Y[:3])), r"^train labels hold 3 entries for 4 images; give one label per image$"),
    (dict(train=(U8, Y + 1)), r"^train labels run from 1 to 2, outside 0..1 \(2 class names given\)"),
    (dict(train=(U8, Y.float())), r"^train labels are torch.float32; pass integer class indices"),
    (dict(train=(U8, Y[:, None])), r"^train labels must be 1-D \(one class index per image\), got shape \(4, 1\)"),
    (dict(train=(U8[:, :, :0], Y)), r"^train images of shape \(4, 1, 0, 8\) have no pixels; give images of at "
                                    r"least 1 x 1 pixel$"),
    (dict(train=(U8, np.array(list("abab")))), r"^train labels are a numpy array of <U1; pass numbers"),
    (dict(classes=np.array([["a", "b"], ["c", "d"]])), r"^classes must be a non-empty list of class names \(strings\), got a "
                                           r"ndarray$"),
    (dict(train=U8), r"^train= must be a pair \(images, labels\), got Tensor$"),
    (dict(train=([1], Y)), r"^train images must be a torch.Tensor \(or numpy array\), got list$"),
    (dict(test=(torch.zeros(4, 1, 9, 9, dtype=torch.uint8), Y)), r"^train images are 1x8x8 but test images are "
                                                                  r"1x9x9 \(C x H x W\); give both splits the same"),
    (dict(classes="ab"), r"^classes must be a non-empty list of class names"),
    (dict(classes=["a", "a"]), r"^classes name 'a' twice; give each class its own name$"),
])
def test_bad_tensors_are_one_line_errors(kwargs, message):
    args = {"train": (U8, Y), "test": (U8, Y), "classes": ["a", "b"], **kwargs}
    with pytest.raises(UserError, match=message) as e:
        from_tensors(**args)
    assert "\n" not in str(e.value)


def test_a_dataset_where_a_spec_goes_is_one_line_naming_data(tmp_path):
    mem = from_tensors(train=(U8, Y), test=(U8, Y), classes=["a", "b"])
    with pytest.raises(UserError, match=r"^--data takes a dataset spec string; pass a Dataset as "
                                        r"igkd.train\(cfg, out, data=dataset\)"):
        igkd.DistillConfig(data=mem)
    with pytest.raises(UserError, match=r"^data= takes an igkd.data.Dataset .* got dict$"):
        igkd.train(igkd.TrainConfig(epochs=1), tmp_path / "run", data={"x": U8})
    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's
def test_export_leaves_the_callers_module_as_it_was():
    """onnx_bytes and torchscript_module export the module in eval mode on the CPU; the caller's
    module keeps its parameter tensors (the same objects and storage), gradients and training
    flags (they put it in eval mode for good). Its device is kept too: tests/test_gpu.py."""
    from igkd.export import onnx_bytes, torchscript_module
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    net.train()
    net[1].eval()  # mixed modes, as a caller may keep them
    net(torch.rand(2, 1, 8, 8)).sum().backward()
    for export in (lambda: torchscript_module(net, (1, 8, 8)), lambda: onnx_bytes(net, (1, 8, 8))):
        modes = [m.training for m in net.modules()]
        before = [(id(t), t.data_ptr()) for p in net.parameters() for t in (p, p.grad)] + \
            [(id(b), b.data_ptr()) for b in net.buffers()]
        assert export()
        assert [m.training for m in net.modules()] == modes
        assert [(id(t), t.data_ptr()) for p in net.parameters() for t in (p, p.grad)] + \
            [(id(b), b.data_ptr()) for b in net.buffers()] == before


def test_arrays_as_a_notebook_holds_them():
    """A reversed numpy view (x[::-1]; torch.from_numpy refuses it), a read-only array, numpy
    int32 labels, class names as a numpy array and channels-last uint8 are taken, each image
    copied once into a contiguous tensor; float pixels are converted block by block (here one
    image a block) to what the whole tensor gives, and a bad value names the whole range."""
    from igkd.data import memory
    ref = from_tensors(train=(U8.flip(0), Y.flip(0)), test=(U8, Y), classes=["a", "b"])
    ro = U8.numpy().copy()
    ro.flags.writeable = False
    mem = from_tensors(train=(U8.numpy()[::-1], Y.numpy()[::-1].astype(np.int32)), test=(ro, Y),
                       classes=np.array(["a", "b"]))
    assert mem.spec == ref.spec and mem.classes == ["a", "b"]
    last = U8.contiguous(memory_format=torch.channels_last).expand(4, 3, 8, 8).contiguous(
        memory_format=torch.channels_last)
    rgb = from_tensors(train=(last, Y), test=(last, Y), classes=["a", "b"])
    assert rgb.train.images.is_contiguous() and torch.equal(rgb.train.images, last)
    floats = torch.rand(5, 3, 4, 6, dtype=torch.float64)
    whole = floats.mul(255).round().to(torch.uint8)
    memory.BLOCK_BYTES, saved = 4 * 3 * 4 * 6, memory.BLOCK_BYTES
    try:
        got = from_tensors(train=(floats, torch.zeros(5, dtype=torch.long)), test=(floats, torch.zeros(5, dtype=torch.long)),
                           classes=["a"])
        assert torch.equal(got.train.images, whole)
        floats[4, 0, 0, 0] = 1.5  # in the last block: the error names the whole tensor's range
        with pytest.raises(UserError, match=rf"^train images are float with values in \[{floats.min():g}, 1.5\]"):
            from_tensors(train=(floats, torch.zeros(5, dtype=torch.long)), test=(U8, Y), classes=["a"])
    finally:
        memory.BLOCK_BYTES = saved


def test_a_split_over_the_memory_budget_is_refused_unless_it_is_a_file_map(tmp_path, monkeypatch):
    """from_tensors copies a tensor into memory: above the memory budget (README "Memory
    model") that copy is refused in one line, not left to the OOM killer; a uint8 array that
    np.load(FILE, mmap_mode="r") gave (or a slice of one) is mapped from its file, not copied,
    and trains streaming as an image folder's mapped cache does. A write through the split
    never reaches the file (a copy-on-write map)."""
    demo = igkd.load_dataset("demo")
    x, y = demo.train.images[:64], demo.train.labels[:64]
    np.save(tmp_path / "x.npy", x.numpy())
    monkeypatch.setenv("IGKD_DATA_MEMORY", "40K")  # 64 images of 28 x 28: 49 KiB
    with pytest.raises(UserError, match=r"^train images take 49.0 KiB as uint8, more than the memory budget of "
                                        r"40.0 KiB .* pass np.load\(FILE, mmap_mode='r'\) \(mapped, not copied\)"):
        from_tensors(train=(x, y), test=(x[:8], y[:8]), classes=demo.classes)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    mapped = from_tensors(train=(mm, y), test=(mm[8:24], y[8:24]), classes=demo.classes)
    assert mapped.train.mapped == mapped.test.mapped == tmp_path / "x.npy"
    assert torch.equal(mapped.test.images, x[8:24])  # the slice's own rows, not its parent's first ones
    monkeypatch.setenv("IGKD_DATA_MEMORY", "1G")
    assert mapped.spec == from_tensors(train=(x, y), test=(x[8:24], y[8:24]), classes=demo.classes).spec
    monkeypatch.setenv("IGKD_DATA_MEMORY", "40K")
    summary = igkd.train(igkd.TrainConfig(epochs=1, batch_size=16, threads=1, normalize="dataset"),
                         tmp_path / "run", model=tiny(), data=mapped, quiet=True)
    assert summary["dataset"] == mapped.spec and summary["train_images"] + summary["val_images"] == 64
    mapped.train.images[0] = 7
    assert np.array_equal(np.load(tmp_path / "x.npy"), x.numpy())


def test_model_card_of_a_module_trained_on_tensors_names_its_factory_in_the_python_call():
    from igkd.modelcard import model_card
    summary = {"model": "module:Sequential", "dataset": "memory:sha256=" + "0" * 32, "params": 10, "epochs": 1,
               "method": "student", "val_images": 4}
    card = model_card(summary, {})
    assert 'igkd.evaluate("model.safetensors", data=data, model=\'py:FILE.py:CALLABLE\')' in card
    assert "igkd evaluate" not in card
    assert "igkd export --weights model.safetensors --model py:FILE.py:CALLABLE --data SPEC --format onnx" in card
    assert "igkd evaluate --weights model.safetensors --data demo" in model_card({**summary, "model": "resnet:depth=8",
                                                                                  "dataset": "demo"}, {})


TORCHRUN = """
import os, sys, torch, igkd
from pathlib import Path
rank = int(os.environ["RANK"])
demo = igkd.load_dataset("demo")
tr, te = demo.train, demo.test
cfg = igkd.DistillConfig(model="mobilenetv2:width=0.25,drop=14", method="student", epochs=1, batch_size=16,
                         threads=1, check_images=0, normalize="none", channels_last=False, val_fraction=0)
mem = igkd.from_tensors(train=(tr.images[rank:64 + rank], tr.labels[:64]), test=(te.images[:16], te.labels[:16]),
                        classes=demo.classes)  # each process its own images, as an unseeded random pick gives
try:
    igkd.distill(cfg, sys.argv[1], data=mem, quiet=True)
except igkd.UserError as e:
    Path(sys.argv[1] + f".rank{rank}").write_text(str(e))
"""


def test_distill_on_tensors_under_torchrun(tmp_path):
    """Two gloo processes, each building its tensors, given different images: each process
    trained on its own (or, with a store, one rank alone failed at its check and the other with
    a gloo error); every process is now refused in one line, before any work. (Given
    the same tensors, they train and record the same spec on every rank.)"""
    (tmp_path / "script.py").write_text(TORCHRUN)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(tmp_path / "script.py"),
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    refused = [(tmp_path / f"run.rank{rank}").read_text() for rank in (0, 1)]
    assert refused[0] == refused[1] and "\n" not in refused[0], refused
    assert re.fullmatch(r"the torchrun processes were given different data: rank 0 (memory:sha256=\w+), rank 1 "
                        r"(memory:sha256=\w+); build the same data in every process \(seed any random choice\)",
                        refused[0])
    assert not (tmp_path / "run" / "model.safetensors").exists()
