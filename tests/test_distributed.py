"""Many processes: rank slices make up the single-process batch, and 2 gloo processes under
torchrun train to the same weights as one process with twice the per-process batch.

The torchrun comparison runs on a small real dataset (512 training and 200 test images of
the embedded Fashion-MNIST subset, written as a PNG image folder) with --no-channels-last:
torch's channels_last BatchNorm kernels on CPU are less precise (gradients ~1e-5 off a
float64 reference on this network, against ~1e-7 in NCHW), and training amplifies any
rounding difference, including between 1 and 2 threads of the same process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from igkd.config import DistillConfig, build
from igkd.data import Dataset, Split
from igkd.distill import Trainer
from igkd.distill.parallel import Dist, default_threads, rank_seed
from igkd.errors import UserError
from igkd.models import build_model

STUDENT = "mobilenetv2:width=0.25,drop=14"


def synthetic(n=64) -> Dataset:
    g = torch.Generator().manual_seed(0)
    split = Split((torch.rand(n, 3, 12, 12, generator=g) * 255).to(torch.uint8), torch.arange(n) % 4)
    return Dataset("synthetic", list("abcd"), 3, (12, 12), split, split)


def tiny_trainer(tmp_path, rank, world, batch, **kw):
    cfg = build(DistillConfig, {**dict(model=STUDENT, normalize="none", method="ig", epochs=1, batch_size=batch,
                                       val_fraction=0.25, p=0.5, crop_padding=2), **kw})
    store = type("Store", (), {"maps": torch.rand(64, 12, 12, generator=torch.Generator().manual_seed(1)).numpy()})()
    torch.manual_seed(0)
    return Trainer(cfg, build_model(STUDENT, 4, 3), synthetic(), tmp_path, torch.device("cpu"), store=store,
                   quiet=True, dist=Dist(rank, world))


def test_rank_slices_make_up_the_single_process_batch(tmp_path):
    one = list(tiny_trainer(tmp_path, 0, 1, 16).batches(3))
    ranks = [list(tiny_trainer(tmp_path, r, 2, 8).batches(3)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    for (i, x, y), (i0, x0, y0), (i1, x1, y1) in zip(one, *ranks):
        assert torch.equal(i, torch.cat([i0, i1])) and not set(i0.tolist()) & set(i1.tolist())
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))  # same augmentation


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    tiny_trainer(tmp_path, 0, 2, 8).fit()  # a (not really distributed) rank 0 of 2 writes last.pt
    with pytest.raises(UserError, match="ran with 2 process"):
        tiny_trainer(tmp_path, 0, 1, 8, epochs=2).fit(resume=True)


def test_each_rank_draws_and_resumes_its_own_random_numbers(tmp_path):
    # every rank seeded torch with --seed: the same dropout mask on every rank of a global batch
    assert rank_seed(3, 0) == 3 and len({rank_seed(3, r) for r in range(4)}) == 4
    tiny_trainer(tmp_path, 0, 2, 8).fit()  # a (not really distributed) rank 0 of 2 writes last.pt
    path = tmp_path / "last.pt"
    state = torch.load(path, weights_only=True)
    mine = [torch.manual_seed(s).get_state() for s in (11, 12)]
    torch.save({**state, "torch_rng_ranks": mine}, path)  # as 2 real ranks gather them
    for rank in (0, 1):
        tiny_trainer(tmp_path, rank, 2, 8, epochs=2).load_state()
        assert torch.equal(torch.get_rng_state(), mine[rank])  # all ranks took rank 0's state


def test_threads_are_split_between_processes():
    assert default_threads(2, cores=2) == 1 and default_threads(4, cores=16) == 4 and default_threads(3, 2) == 1


def test_two_gloo_processes_train_like_one(small_real, tmp_path):
    args = ["distill", "--data", f"imagefolder:{small_real / 'data'},gray=1", "--teacher",
            str(small_real / "teacher.safetensors"), "--method", "kd+ig+at+cutmix", "--model", STUDENT, "--epochs", "2",
            "--threads", "1", "--ig-steps", "2", "--warmup-epochs", "0", "--lr", "0.05", "--p", "0.5",
            "--alpha", "0.5", "--no-channels-last", "--val-fraction", "0.1"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "igkd.cli",
                          *args, "--batch-size", "32", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "igkd.cli", *args, "--batch-size", "64", "--out",
                          str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1  # rank 0 alone prints
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("one", "two"))
    assert (a["world_size"], b["world_size"]) == (1, 2) and a["history"][-1]["epoch"] == 2
    params = [k for k in a["model"] if "running" not in k and "num_batches" not in k]
    diff = max((a["model"][k] - b["model"][k]).abs().max().item() for k in params)
    assert diff < 1e-4, diff  # about 1e-5 here: float rounding, grown over 14 steps
    for k in set(a["model"]) - set(params):  # BatchNorm running statistics (values up to ~7)
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-4)
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert sa["test"]["confusion"] == sb["test"]["confusion"]  # identical test predictions (by class)
    assert (sb["processes"], sb["global_batch"]) == (2, 64) and sb["at"]["student_layer"] == "features.4"


CHECK_BUFFERS = """
import sys
import torch
import torch.distributed as dist
from igkd.cli import main
from igkd.distill import Trainer
from igkd.models import bare

real = Trainer.val_accuracy


def checked(self):  # the real validation, then: did every rank score with the same statistics?
    value = real(self)
    mine = torch.cat([b.double().flatten() for b in bare(self.model).buffers()])
    ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(ranks, mine)
    if not torch.equal(ranks[0], ranks[1]):
        print("BUFFERS DIFFER", (ranks[0] - ranks[1]).abs().max().item(), file=sys.stderr, flush=True)
        sys.exit(3)
    return value


Trainer.val_accuracy = checked
main(sys.argv[1:])
"""


def test_two_processes_without_sync_bn_validate_the_model_they_save(small_real, tmp_path):
    """--no-sync-bn: each rank's BatchNorm statistics drift with its own batches; validation
    scored each share with its own and reported the accuracy of a model no file held."""
    from igkd.data import load_dataset, stratified_split
    from igkd.evaluate import predict
    from igkd.models import load_model
    data = f"imagefolder:{small_real / 'data'},gray=1"
    out = tmp_path / "run"
    (tmp_path / "check_buffers.py").write_text(CHECK_BUFFERS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(tmp_path / "check_buffers.py"), "distill", "--data", data, "--method", "student",
                          "--model", "mobilenetv2:width=0.25", "--epochs", "1", "--threads", "1", "--batch-size", "16",
                          "--no-sync-bn", "--val-fraction", "0.25", "--no-channels-last", "--out", str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=120)
    assert run.returncode == 0 and "BUFFERS DIFFER" not in run.stderr, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    train = load_dataset(data).train
    _, val = stratified_split(train.labels, 0.25, 0)
    net, _ = load_model(out / "model.safetensors")
    correct = (predict(net, train.images[val], channels_last=False).argmax(1) == train.labels[val]).sum().item()
    assert summary["val_accuracy"] == pytest.approx(100.0 * correct / len(val), abs=1e-9)
    # mobilenetv2 (drop=0) has dropout: the two ranks drew from states of their own
    a, b = torch.load(out / "last.pt", weights_only=True)["torch_rng_ranks"]
    assert not torch.equal(a, b)


DIST_GRADIENT = """
import os
import torch
import torch.distributed as dist
from igkd.distill.losses import dist_terms
from igkd.distill.parallel import GlobalBatchNorm2d, gather_batch

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
student, teacher = (torch.randn(16, 10, generator=g, dtype=torch.float64) for _ in range(2))
whole = student.clone().requires_grad_()
sum(dist_terms(whole, teacher, 1.0)).backward()  # one process, the global batch
n = len(student) // world
rows = slice(rank * n, (rank + 1) * n)
mine = student[rows].clone().requires_grad_()
sum(dist_terms(gather_batch(mine), gather_batch(teacher[rows]), 1.0)).backward()
# every rank computes the global loss, so its rows' gradient is world times the global one; DDP
# divides the parameters' gradients by world
diff = torch.tensor((mine.grad / world - whole.grad[rows]).abs().max().item())
dist.all_reduce(diff, op=dist.ReduceOp.MAX)
GlobalBatchNorm2d(2).train()(torch.randn(4, 2, 3, 3, requires_grad=True)).pow(2).sum().backward()
if rank == 0:
    print(f"DIFF {diff.item():.3g}", flush=True)
dist.destroy_process_group()
gloo = [t for t in os.listdir("/proc/self/task") if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
print(f"GLOO THREADS AFTER DESTROY {len(gloo)}", flush=True)
"""


def test_a_term_relating_the_samples_of_a_batch_is_taken_over_the_global_batch(tmp_path):
    """DIST's intra-class term correlates each class over the batch: each process correlated
    over its own slice (one epoch of dist: intra 0.2151 on 2 processes, 0.2086 on one, weights
    6e-3 apart). gather_batch joins the slices, differentiably: 2 gloo processes now give one
    process's gradient of the loss on the whole batch.

    And destroying the group afterwards stops its gloo threads: through
    torch.distributed.nn.functional.all_reduce, whose default argument held the group for good,
    they ran on into the interpreter's teardown, and about 1 run in 10 aborted there
    ("terminate called without an active exception") after all its work was done."""
    (tmp_path / "dist_gradient.py").write_text(DIST_GRADIENT)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          str(tmp_path / "dist_gradient.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert float(run.stdout.split("DIFF ")[1].split()[0]) < 1e-12, run.stdout
    if sys.platform.startswith("linux"):  # threads named in /proc
        assert run.stdout.count("GLOO THREADS AFTER DESTROY 0") == 2, run.stdout
