"""Review fixes: torchrun's process group across several igkd calls in one script, export's
parity check on in-memory data, and the streaming line naming why the images are mapped."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import igkd
from helpers_data import write_image_folder
from igkd.data import from_tensors, load_dataset
from igkd.distill.stream import choose
from igkd.errors import UserError
from igkd.models import load_model, read_metadata, save_checkpoint

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"

TWICE = """
import os, sys, torch, torch.distributed as dist, igkd
from pathlib import Path
out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
demo = igkd.load_dataset("demo")
tr, te = demo.train, demo.test
mem = igkd.from_tensors(train=(tr.images[:32], tr.labels[:32]), test=(te.images[:8], te.labels[:8]),
                        classes=demo.classes)
cfg = igkd.DistillConfig(model="mobilenetv2:width=0.25,drop=14", method="student", epochs=1, batch_size=8,
                         threads=1, check_images=0, normalize="none", channels_last=False, val_fraction=0)
def twice(tag):
    for i in (0, 1):
        igkd.distill(cfg, out / f"{tag}{i}", data=mem, quiet=True)
# a group of the script's own (on a file store, not torchrun's): igkd uses it and leaves it
dist.init_process_group("gloo", store=dist.FileStore(str(out.parent / "filestore"), 2), rank=rank, world_size=2)
mine = dist.group.WORLD
twice("user")
assert dist.group.WORLD is mine
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2
dist.destroy_process_group()
twice("igkd")  # igkd creates the group through torchrun's store and keeps it between the calls
assert dist.is_initialized()
(out.parent / f"ok{rank}").write_text("ok")
"""


def test_distill_twice_under_torchrun_with_igkd_s_group_and_the_caller_s(tmp_path):
    """2 gloo processes: a group igkd created was destroyed after each call and created again
    through torchrun's store, whose keys still held the first group's addresses (the second or
    third call died with "Gloo connectFullMesh ... Connection refused", or hung), and a group the
    script created itself was destroyed by igkd's first call."""
    (tmp_path / "script.py").write_text(TWICE)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(tmp_path / "script.py"),
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
    # the first call of the process is a fresh single call: every later one trains the same weights
    fresh = (tmp_path / "runs" / "user0" / "model.safetensors").read_bytes()
    for run in ("user1", "igkd0", "igkd1"):
        assert (tmp_path / "runs" / run / "model.safetensors").read_bytes() == fresh, run


def test_export_takes_an_in_memory_dataset_for_its_parity_check(tmp_path):
    """A checkpoint trained on tensors records memory:sha256=HEX, which loads nothing, and
    export_model refused a Dataset as data=: a notebook had to write its data to disk first."""
    demo = load_dataset("demo")
    mem = from_tensors(train=None, test=(demo.test.images[:16], demo.test.labels[:16]), classes=demo.classes)
    meta = read_metadata(DEMO_TEACHER)
    net, _ = load_model(DEMO_TEACHER, None, len(demo.classes), 1, meta["preprocessing"])
    weights = save_checkpoint(tmp_path / "t.safetensors", net,
                              {k: v for k, v in meta.items() if k not in ("format", "sha256")} | {"dataset": mem.spec})
    with pytest.raises(UserError, match=r"pass the same data as igkd\.export_model\(\.\.\., data=dataset\), or "
                                        r"--data SPEC of it on disk, for the parity check"):
        igkd.export_model(weights, tmp_path / "t.pt", "torchscript", quiet=True)
    r = igkd.export_model(weights, tmp_path / "t.pt", "torchscript", data=mem, report_dir=tmp_path, quiet=True)
    assert r["data"] == mem.spec and r["parity"]["images"] == 16 and r["parity"]["top1_agreement"] == 100
    assert json.loads((tmp_path / "export.json").read_text())["data"] == mem.spec
    assert json.loads((tmp_path / "t.pt.json").read_text())["parity"]["images"] == 16


def test_the_streaming_line_says_why_the_images_are_mapped(tmp_path, monkeypatch):
    """Every memory-mapped split was said to be "larger than the memory budget", also a few KiB
    np.load(mmap_mode="r") gave from_tensors, which is mapped as given whatever its size."""
    cpu = torch.device("cpu")
    demo = load_dataset("demo")
    np.save(tmp_path / "x.npy", demo.train.images[:8].numpy())
    given = from_tensors(train=(np.load(tmp_path / "x.npy", mmap_mode="r"), demo.train.labels[:8]),
                         test=(demo.test.images[:4], demo.test.labels[:4]), classes=demo.classes).train
    assert given.mapped is not None
    on, why = choose("auto", given.images, True, 0, cpu)
    assert on and why.startswith("the data gives the training images memory-mapped (6.1 KiB, within the memory "
                                 "budget of "), why
    assert why.endswith("; read from their file, not copied)"), why
    monkeypatch.setenv("IGKD_DATA_MEMORY", "1K")  # an image folder's cache larger than that is mapped
    folder = load_dataset(f"imagefolder:{write_image_folder(tmp_path / 'data', per_class=4, side=8)}").train
    assert folder.mapped is not None
    assert choose("auto", folder.images, True, 0, cpu) == (
        True, "the training images are memory-mapped (1.5 KiB, more than the memory budget of 1.0 KiB)")
