"""Kill-and-resume review: a run or an export interrupted between two of its writes leaves
files that agree with each other, and igkd's own readers do not stop a run from resuming.

Each test stops the work (KeyboardInterrupt, as Ctrl-C or a kill there would) at the exact
point between two renames, in this process; tests/test_trainer.py and tests/test_precompute.py
kill real processes."""

import json
import os
from pathlib import Path

import pytest
import torch

from igkd.fileio import file_sha256
from igkd.models import build_model, read_metadata, save_checkpoint
from test_trainer import stop_in_epoch, trainer

from conftest import TINY_TEACHER


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread (as --threads 1): two spinning threads on a busy
    2-core machine ran these seconds-long tests for a minute (conftest restores the count)."""
    torch.set_num_threads(1)


def _interrupt_after_replace(monkeypatch, name: str, nth: int) -> None:
    """Raise KeyboardInterrupt right after the ``nth`` os.replace onto a file called ``name``."""
    real, seen = os.replace, [0]

    def replace(src, dst, *args, **kw):
        real(src, dst, *args, **kw)
        if Path(dst).name == name:
            seen[0] += 1
            if seen[0] == nth:
                raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", replace)


def _epoch_of(run: Path) -> tuple:
    """(epoch model.json names, whether its sha256 is model.safetensors')."""
    meta = json.loads((run / "model.json").read_text())
    return meta.get("epoch"), meta.get("sha256") == file_sha256(run / "model.safetensors")


def test_a_kill_between_the_checkpoint_renames_is_completed_and_a_report_does_not_block_resume(tmp_path, monkeypatch):
    """Killed between model-pending.safetensors -> model.safetensors and model-pending.json ->
    model.json (epoch 2 of 3, every epoch the best without a validation split): the resumed run
    dropped the pending .json, and model.json described epoch 1 (epoch, sha256, as
    igkd.load_model returns them) beside epoch 2's weights until the run finished. It is now
    renamed on resume. And `igkd report RUN` on the interrupted run wrote report.md, curves.png
    and tables/ into it, after which --resume refused the folder as not an igkd run's."""
    from igkd.report import write_report
    run = tmp_path / "run"
    _interrupt_after_replace(monkeypatch, "model.safetensors", 2)
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, "kd", epochs=3, val_fraction=0).fit()
    monkeypatch.undo()
    assert (run / "model-pending.json").exists() and _epoch_of(run) == (1, False)  # the state a kill leaves
    stop_in_epoch(trainer(tmp_path, "kd", epochs=3, val_fraction=0), 3, resume=True)  # resumed, interrupted again
    assert torch.load(run / "last.pt", weights_only=True)["best"]["epoch"] == 2
    assert _epoch_of(run) == (2, True) and not (run / "model-pending.json").exists()
    assert read_metadata(run / "model.safetensors")["epoch"] == 2

    write_report(run)  # a look at the interrupted run, then the same command resumes it
    assert {"report.md", "curves.png"} <= {p.name for p in run.iterdir()}
    summary = trainer(tmp_path, "kd", epochs=3, val_fraction=0).fit(resume=True)
    assert summary["best_epoch"] == 3 and _epoch_of(run) == (None, True)  # metadata of the finished run


def test_summary_json_is_the_last_file_a_finished_run_writes(tmp_path, monkeypatch):
    """summary.json marks a run finished: an experiment reuses such a run as it is. It was written
    before README.md, so a run killed between the two stayed without its model card (and with
    the card's temporary) for good. Now a run stopped there has no summary.json and resumes."""
    import importlib
    trainer_module = importlib.import_module("igkd.distill.trainer")
    real = trainer_module.model_card

    def card(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_module, "model_card", card)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, "student", epochs=1).fit()
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(trainer_module, "model_card", real)
    trainer(tmp_path, "student", epochs=1).fit(resume=True)
    assert (run / "summary.json").exists() and (run / "README.md").exists()


def _checkpoint(path: Path, spec: str, seed: int) -> Path:
    from igkd.data import load_dataset
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(spec, 10, 1), {"model": spec, "num_classes": 10, "in_channels": 1,
                                                     "classes": load_dataset("demo").classes,
                                                     "preprocessing": {"normalize": "none"}, "dataset": "demo"})
    return path.with_suffix(".safetensors")


def test_an_export_killed_before_its_sidecar_leaves_no_sidecar_of_another_model(tmp_path, monkeypatch):
    """Exporting over an earlier export writes FILE, then FILE.json: a kill between the two left
    the new model beside the old model's metadata (another spec, source and sha256). The old
    sidecar is now removed before the new file is renamed into place."""
    import igkd
    import igkd.deploy.export as export_module
    from igkd.export import read_export_metadata
    first = _checkpoint(tmp_path / "a", TINY_TEACHER, 0)
    second = _checkpoint(tmp_path / "b", "mobilenetv2:width=0.25,drop=14", 1)
    out = tmp_path / "m.pt"
    report = tmp_path / "run"
    report.mkdir()
    igkd.export_model(first, out, "torchscript", data="demo", images=16, report_dir=report, quiet=True)
    assert json.loads(Path(f"{out}.json").read_text())["model"] == TINY_TEACHER
    assert json.loads((report / "export.json").read_text())["model"] == TINY_TEACHER

    real = export_module.write_json

    def write_json(path, obj):
        if Path(path).name == f"{out.name}.json":
            raise KeyboardInterrupt  # killed after the file's rename, before its sidecar's
        real(path, obj)
    monkeypatch.setattr(export_module, "write_json", write_json)
    with pytest.raises(KeyboardInterrupt):
        igkd.export_model(second, out, "torchscript", data="demo", images=16, report_dir=report, quiet=True)
    assert read_export_metadata(out)["model"] == "mobilenetv2:width=0.25,drop=14"  # the new file
    sidecar = Path(f"{out}.json")
    assert not sidecar.exists() or json.loads(sidecar.read_text())["source"]["sha256"] == file_sha256(second)
    # nor a report folder's export.json describing the old export (its model, parity, sha256)
    assert not (report / "export.json").exists()
