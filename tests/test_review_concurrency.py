"""Review of concurrent use: two igkd processes (here: a lock held by this test process, or two
threads, which flock tells apart as it does processes) on one run folder or one export."""

import json
import os
import socket
import threading

import torch

import igkd
from helpers_cli import run_igkd
from helpers_data import write_image_folder
from igkd.deploy import export as deploy_export
from igkd.export import read_export_metadata
from igkd.lock import DirLock
from igkd.models import build_model, save_checkpoint

TINY = "mobilenetv2:width=0.25,drop=12"


def test_a_run_into_a_folder_another_run_writes_is_refused_naming_it_before_any_work(tmp_path):
    # the run directory was locked only in Trainer.fit: a second distill first loaded the teacher
    # and data and computed its whole store, then was refused; one that came after the first's
    # epoch 1 was told "already holds a run; pass --resume" (and a second experiment sharing the
    # run died on that line), never that another process was writing it
    out = tmp_path / "run"
    holder = f"run directory {out} is being written by igkd pid {os.getpid()} on host {socket.gethostname()}"
    with DirLock(out, "run directory").acquire():
        for name in ("config.yaml", "metrics.jsonl", "last.pt"):  # the first run, after its first epoch
            (out / name).write_text("")
        store = tmp_path / "store"
        r = run_igkd("distill", "--teacher", tmp_path / "missing.safetensors", "--data", "demo", "--store", store,
                     "--out", out, "--method", "kd+ig", "--threads", 1)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"igkd: error: {holder}"), r.stderr
        assert "choose another --out" in lines[0] and not store.exists()
        r = run_igkd("train", "--data", tmp_path / "nodata", "--out", out, "--threads", 1)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"igkd: error: {holder}"), r.stderr
    # a folder nobody writes: the look leaves it as it was and takes nothing
    r = run_igkd("train", "--data", tmp_path / "nodata", "--out", out, "--threads", 1)
    assert r.returncode == 2 and "already holds a run" in r.stderr, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pt", "metrics.jsonl"]


def test_two_exports_to_one_output_leave_a_sidecar_that_describes_the_file(tmp_path, monkeypatch):
    # export A renamed its file over --output, then wrote output.json; export B's whole final step
    # fitted in between, so B's file ended beside A's sidecar (A's weights, sha256 and parity)
    data = write_image_folder(tmp_path / "imgs", 2, 8)
    weights = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / name, build_model(TINY, 2, 3),
                        {"model": TINY, "num_classes": 2, "in_channels": 3, "classes": ["cat", "dog"],
                         "preprocessing": {"normalize": "none"}})
        weights[name] = tmp_path / f"{name}.safetensors"
    output = tmp_path / "out" / "model.pt"
    a_renamed, b_done = threading.Event(), threading.Event()
    write_json = deploy_export.write_json

    def slow_sidecar(path, obj):  # export A, between its file's rename and its sidecar
        if threading.current_thread().name == "export-a" and str(path) == f"{output}.json":
            a_renamed.set()
            b_done.wait(timeout=2)  # B done meanwhile (old code); B waiting for A's flock times this out
        write_json(path, obj)

    monkeypatch.setattr(deploy_export, "write_json", slow_sidecar)

    def export(name):
        igkd.export_model(weights[name], output, "torchscript", data=f"imagefolder:{data}", threads=1, quiet=True)

    a = threading.Thread(target=export, args=("a",), name="export-a")
    a.start()
    try:
        assert a_renamed.wait(timeout=60)
        export("b")
        b_done.set()
    finally:
        b_done.set()
        a.join(timeout=60)
    sidecar = json.loads((output.parent / "model.pt.json").read_text())
    assert sidecar == read_export_metadata(output)
    assert sidecar["source"]["weights"] == str(weights["b"])  # B came last: its file and its sidecar


def test_two_experiments_starting_at_once_in_one_folder_both_mark_it(tmp_path, monkeypatch):
    # each read experiment.json (none yet), added its kind and wrote it back: the last writer's
    # marker won and the report's "Experiments in this folder" lost the other kind
    from igkd.experiments import runs
    out = tmp_path / "exp"
    a_writes, b_done = threading.Event(), threading.Event()
    write_json = runs.write_json

    def slow_marker(path, obj):
        if threading.current_thread().name == "ablation":
            a_writes.set()
            b_done.wait(timeout=1)  # the montecarlo marks the folder meanwhile (old code) or waits for the flock
        write_json(path, obj)

    monkeypatch.setattr(runs, "write_json", slow_marker)
    a = threading.Thread(target=runs.prepare_out, args=(out, "ablation"), name="ablation")
    a.start()
    try:
        assert a_writes.wait(timeout=10)
        runs.prepare_out(out, "montecarlo")
    finally:
        b_done.set()
        a.join(timeout=10)
    assert sorted(json.loads((out / "experiment.json").read_text())["kinds"]) == ["ablation", "montecarlo"]
