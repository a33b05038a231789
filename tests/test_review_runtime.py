"""Training runtime: resume bookkeeping, which rank judges the run directory, and ranks
waiting out rank 0's long final evaluation under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch

from igkd.config import DistillConfig, build
from igkd.distill import Trainer
from igkd.distill.parallel import Dist
from igkd.errors import UserError
from igkd.models import build_model

from test_trainer import dataset, stop_in_epoch

STUDENT = "mobilenetv2:width=0.25,drop=14"


def student_run(out, epochs=1, dist=None, **kw) -> Trainer:
    """A cross-entropy student on 64 synthetic images (no teacher, no store)."""
    cfg = build(DistillConfig, {**dict(model=STUDENT, normalize="none", method="student", epochs=epochs,
                                       batch_size=16, lr=0.01, val_fraction=0.25, warmup_epochs=0,
                                       eval_batch_size=64), **kw})
    torch.manual_seed(0)
    return Trainer(cfg, build_model(STUDENT, 4, 3), dataset(), out, torch.device("cpu"), quiet=True, dist=dist)


def interrupted_in_epoch_2(out, epochs=3) -> None:
    stop_in_epoch(student_run(out, epochs), 2)


def test_a_rank_other_than_0_leaves_the_run_directory_to_rank_0(tmp_path):
    # the moment rank 0 has written config.yaml and not yet metrics.jsonl: a rank that judged the
    # folder then took it for the user's and stopped alone (the others hung in their next collective)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: x\n")
    rank1 = student_run(out, dist=Dist(1, 2))  # its group is not started: its collectives return at once
    assert rank1.fit() is None  # trained its share; only rank 0 returns the summary
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # and it wrote nothing


def test_rank_0_still_refuses_a_folder_of_the_users(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an igkd run's"):
        student_run(out).fit()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # no lock file left either


def test_train_seconds_count_the_sessions_before_a_resume(tmp_path):
    out = tmp_path / "run"
    interrupted_in_epoch_2(out)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["train_seconds"] > 0
    state["train_seconds"] = 1000.0  # as if the interrupted session had trained for 1000 s
    torch.save(state, out / "last.pt")
    summary = student_run(out, epochs=3).fit(resume=True)
    assert 1000 < summary["train_seconds"] < 1000 + 600


def test_resume_refuses_fewer_epochs_than_it_has_finished(tmp_path):
    out = tmp_path / "run"
    student_run(out, epochs=2, val_fraction=0).fit()  # every epoch the best: model.* is epoch 2's
    (out / "summary.json").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # the summary said "epochs 1" of a model trained for 2, with a best epoch of 2
    with pytest.raises(UserError, match=r"finished 2 epochs, more than --epochs 1; resume with --epochs 2"):
        student_run(out, epochs=1, val_fraction=0).fit(resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_names_an_option_the_run_has_and_this_version_lacks(tmp_path):
    out = tmp_path / "run"
    student_run(out).fit()
    state = torch.load(out / "last.pt", weights_only=True)
    state["config"]["retired_option"] = 3
    torch.save(state, out / "last.pt")
    # the message named no option at all: "its config differs in ;"
    with pytest.raises(UserError, match=r"differs in retired_option \(3 in the run, not an option now\)"):
        student_run(out, epochs=2).fit(resume=True)
    with pytest.raises(UserError, match=r"differs in batch_size \(16 in the run, 8 now\)"):
        student_run(out, epochs=2, batch_size=8).fit(resume=True)


def poisoned(run: Trainer) -> Trainer:
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    return run


def test_a_diverged_run_says_what_to_do_next(tmp_path):
    out = tmp_path / "run"
    # in epoch 1: the message named a last.pt that did not exist
    with pytest.raises(UserError, match=r"at epoch 1, before any checkpoint; lower --lr and run again"):
        poisoned(student_run(out)).fit()
    assert not (out / "last.pt").exists()
    student_run(out, lr=0.005).fit()  # and so it is: the same --out, another --lr
    # later: a --resume replays the same steps and refuses another --lr, so a new --out it is
    later = student_run(out, epochs=2, lr=0.005)
    real = later.load_state
    later.load_state = lambda: (real(), poisoned(later))[0]
    with pytest.raises(UserError, match=r"last good checkpoint is .*last.pt \(epoch 1\), but --resume would "
                                        r"repeat the same steps: lower --lr and train into a new --out"):
        later.fit(resume=True)


def torchrun(script, *args, timeout=120) -> subprocess.CompletedProcess:
    """2 gloo processes of ``script``; on a timeout torchrun is stopped with its workers (SIGTERM:
    a SIGKILLed agent leaves them running, holding the output pipes open)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
                             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"torchrun still ran after {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


NODES = """
import os
import sys
from igkd.cli import main

os.chdir(sys.argv[1] if os.environ["RANK"] == "0" else sys.argv[2])  # two nodes, --out not shared
main(sys.argv[3:])
"""


def test_a_resume_whose_ranks_see_different_folders_stops_at_once(tmp_path):
    """Each rank decided alone whether to resume: rank 1, not seeing rank 0's last.pt, trained from
    epoch 1 beside a rank 0 resumed after epoch 1, and the group hung in mismatched collectives."""
    from helpers_cli import run_igkd
    from helpers_data import write_image_folder
    data = write_image_folder(tmp_path / "data", per_class=4, side=8)
    args = ["distill", "--data", f"imagefolder:{data}", "--method", "student", "--model", STUDENT, "--threads", "1",
            "--batch-size", "4", "--quiet"]
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    first = run_igkd(*args, "--epochs", "1", "--out", node0 / "run")  # in this process: no start-up
    assert first.returncode == 0, first.stderr[-2000:]
    state = torch.load(node0 / "run" / "last.pt", weights_only=True)  # as 2 processes would have written it
    torch.save({**state, "world_size": 2, "torch_rng_ranks": state["torch_rng_ranks"] * 2}, node0 / "run" / "last.pt")
    (tmp_path / "nodes.py").write_text(NODES)
    run = torchrun(tmp_path / "nodes.py", node0, node1, *args, "--epochs", "2", "--out", "run", "--resume",
                   timeout=90)
    assert run.returncode != 0
    assert "igkd: error: cannot resume run: rank 0 resumes it after epoch 1, rank 1 after epoch 0 (0: it sees no " \
        "last.pt there)" in run.stderr, run.stderr[-2000:]


SLOW_TEST_SPLIT = """
import sys
import time
from datetime import timedelta
from torch.distributed.distributed_c10d import _set_pg_timeout
from igkd.cli import main
from igkd.distill import Trainer

real_finish, real_evaluate = Trainer.finish, Trainer.evaluate


def finish(self, *args):  # the default group's timeout (30 minutes on gloo), scaled down to 1 s
    _set_pg_timeout(timedelta(seconds=1))
    return real_finish(self, *args)


def evaluate(self, indices=None, split="val"):
    if split == "test":
        time.sleep(2.5)  # a test split rank 0 takes longer to score than that timeout
    return real_evaluate(self, indices, split)


Trainer.finish, Trainer.evaluate = finish, evaluate
main(sys.argv[1:])
"""


def test_ranks_wait_out_rank_0s_long_test_evaluation(tmp_path):
    """Rank 0 alone scores the test split at the end while the others wait for its summary: they
    waited on the default group, gave up after its timeout, torchrun killed rank 0 before
    summary.json, and a --resume hit the same wall again."""
    from helpers_data import write_image_folder
    data = write_image_folder(tmp_path / "data", per_class=9, side=8)  # 18 images: uneven shares of 2 ranks
    (tmp_path / "slow_test_split.py").write_text(SLOW_TEST_SPLIT)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(tmp_path / "slow_test_split.py"), "distill", "--data", f"imagefolder:{data}",
                          "--method", "student", "--model", STUDENT, "--epochs", "1", "--threads", "1",
                          "--batch-size", "4", "--val-fraction", "0.25", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["global_batch"], summary["train_images"]) == (2, 8, 14)


def test_train_under_torchrun_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    # the refusal came from the Trainer, after the dataset was decoded (minutes for a big folder):
    # here the folder does not exist, so a data error would mean the data was read first
    from igkd.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", f"imagefolder:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "under torchrun only 'igkd distill' trains" in err, err
    assert not (tmp_path / "run").exists()
