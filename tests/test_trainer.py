"""Trainer: index alignment of maps and logits, every method, determinism and resume."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from igkd.config import DistillConfig, PrecomputeConfig, build, load_yaml
from igkd.data import Dataset, Split
from igkd.distill.methods import METHODS, parse_method
from igkd.distill.parts.overlay import shuffled_map_index
from igkd.distill.trainer import Trainer
from igkd.errors import UserError
from igkd.models import Normalized, build_model
from igkd.precompute import precompute

REPO = Path(__file__).resolve().parents[1]


def dataset(n=64, seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    # class-dependent structure so that training can learn something
    images = torch.rand(n, 3, 12, 12, generator=g) * 120
    for c in range(4):
        images[labels == c, c % 3, 3 * c:3 * c + 3, :] += 120
    split = Split(images.clamp(0, 255).to(torch.uint8), labels)
    return Dataset("synthetic", list("abcd"), 3, (12, 12), split, split)


def teacher():
    torch.manual_seed(0)
    return Normalized(build_model("mobilenetv2:width=0.25,drop=12", 4, 3), [0.5] * 3, [0.25] * 3).eval()


def config(**kw) -> DistillConfig:
    base = dict(model="mobilenetv2:width=0.25,drop=14", normalize="none", epochs=2, batch_size=16, lr=0.01,
                val_fraction=0.25, ig_steps=4, chunk_size=32, eval_batch_size=64, warmup_epochs=0)
    return build(DistillConfig, {**base, **kw})


def trainer(tmp_path, method="kd+ig", data=None, **kw) -> Trainer:
    data = data or dataset()
    cfg = config(method=method, **kw)
    t = teacher()
    store = precompute(t, data, cfg, tmp_path / "store", quiet=True)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.model, 4, 3)
    return Trainer(cfg, student, data, tmp_path / "run", torch.device("cpu"), teacher=t, store=store, quiet=True)


def marked_maps(n):
    """Map i is all ones except a single 0 at pixel (i // 12, i % 12): after the overlay's
    min-max normalisation, that hole tells which sample's map an image received."""
    maps = torch.ones(n, 12, 12, dtype=torch.float16)
    maps[torch.arange(n), torch.arange(n) // 12, torch.arange(n) % 12] = 0
    return maps


def holes(x):
    """Where each overlaid all-zero image has its 0 (the rest is 0.5)."""
    flat = x[:, 0].flatten(1)
    assert torch.all((flat == 0).sum(1) == 1) and torch.all((flat == 0) | (flat == 0.5))
    return flat.argmin(1)


@pytest.mark.parametrize("method", ["kd+ig", "kd+ig-shuffled"])
def test_overlay_and_logits_follow_sample_index_whatever_the_order(tmp_path, method):
    data = dataset()
    zeros = Split(torch.zeros_like(data.train.images), data.train.labels)
    data = Dataset("zeros", data.classes, 3, (12, 12), zeros, zeros)
    tr = trainer(tmp_path, method, data=data, p=1.0, crop_padding=0, flip=False)
    n = len(data.train)
    tr.maps = marked_maps(n)
    tr.part_state(method.split("+")[1])["maps"] = tr.maps
    seen = []
    for epoch in (1, 2):
        for idx, x, _ in tr.batches(epoch):
            seen.append(idx)
            owner = tr.part_state("ig-shuffled")["index"][idx] if method.endswith("shuffled") else idx
            assert torch.equal(holes(x), owner)  # image idx[b] got the map of sample owner[b]
            assert method.endswith("shuffled") != torch.equal(owner, idx)
            torch.testing.assert_close(tr.teacher_logits(idx, x), tr.logits[idx])
    order = torch.cat(seen[: len(seen) // 2])
    assert not torch.equal(order, order.sort().values)  # batches really were shuffled
    # and the stored logits are the teacher's on the clean image of that index
    with torch.no_grad():
        clean = teacher()(data.train.images[[5, 2]].float() / 255)
    torch.testing.assert_close(tr.logits[[5, 2]], clean, rtol=1e-5, atol=1e-5)


def test_map_follows_its_image_through_crop_and_flip(tmp_path):
    data = dataset()
    zeros = Split(torch.zeros_like(data.train.images), data.train.labels)
    data = Dataset("zeros", data.classes, 3, (12, 12), zeros, zeros)
    tr = trainer(tmp_path, "ig", data=data, p=1.0, crop_padding=3, flip=True)
    tr.maps = marked_maps(len(data.train))
    tr.part_state("ig")["maps"] = tr.maps
    from igkd.distill.trainer import epoch_seed
    for idx, x, _ in tr.batches(1):
        # replay the epoch's random draws: the overlay's two, then crop offsets and flips
        break
    gen = torch.Generator().manual_seed(epoch_seed(tr.cfg.seed, 1))
    order = tr.train_idx[torch.randperm(len(tr.train_idx), generator=gen)]
    assert torch.equal(order[: len(idx)], idx)
    torch.rand(len(idx), generator=gen), torch.rand(len(idx), generator=gen)
    dy = torch.randint(0, 7, (len(idx),), generator=gen)
    dx = torch.randint(0, 7, (len(idx),), generator=gen)
    flip = torch.rand(len(idx), generator=gen) < 0.5
    for b, i in enumerate(idx.tolist()):
        canvas = torch.zeros(18, 18)  # zero padding of 3 around the overlaid image
        canvas[3:15, 3:15] = 0.5
        canvas[3 + i // 12, 3 + i % 12] = 0  # the hole of sample i's map
        want = canvas[int(dy[b]):int(dy[b]) + 12, int(dx[b]):int(dx[b]) + 12]
        want = want.flip(1) if flip[b] else want
        assert torch.equal(x[b, 0], want) and torch.equal(x[b, 2], want)


def test_map_follows_its_image_through_random_resized_crop(tmp_path):
    from igkd.distill.augment import resized_crop_flip
    from igkd.distill.trainer import epoch_seed
    data = dataset()
    zeros = Split(torch.zeros_like(data.train.images), data.train.labels)
    data = Dataset("zeros", data.classes, 3, (12, 12), zeros, zeros)
    tr = trainer(tmp_path, "ig", data=data, p=1.0, augment="random-resized-crop", rrc_scale_min=0.3, flip=True)
    tr.maps = marked_maps(len(data.train))
    tr.part_state("ig")["maps"] = tr.maps
    idx, x, _ = next(iter(tr.batches(1)))
    # replay: the permutation, the overlay's two draws, then the crop boxes and flips
    gen = torch.Generator().manual_seed(epoch_seed(tr.cfg.seed, 1))
    order = tr.train_idx[torch.randperm(len(tr.train_idx), generator=gen)]
    assert torch.equal(order[: len(idx)], idx)
    torch.rand(len(idx), generator=gen), torch.rand(len(idx), generator=gen)
    canvas = torch.full((len(idx), 1, 12, 12), 0.5)
    for b, i in enumerate(idx.tolist()):
        canvas[b, 0, i // 12, i % 12] = 0  # the hole of sample i's map, overlaid on a black image
    want = resized_crop_flip(canvas, (0.3, 1.0), (3 / 4, 4 / 3), True, gen)
    assert torch.allclose(x[:, 0], want[:, 0], atol=1e-6) and torch.allclose(x[:, 2], want[:, 0], atol=1e-6)
    assert not torch.allclose(want, canvas)


def test_shuffled_control_uses_other_images_maps(tmp_path):
    perm = shuffled_map_index(50, 0)
    assert sorted(perm.tolist()) == list(range(50)) and bool((perm != torch.arange(50)).all())
    # in a run: training images trade maps among themselves, never with a validation image
    t = trainer(tmp_path, "kd+ig-shuffled")
    (state,) = [s for part, s in t.parts if part.name == "ig-shuffled"]
    train, val = t.train_idx, t.val_idx
    got = state["index"][train]
    assert sorted(got.tolist()) == sorted(train.tolist()) and bool((got != train).all())
    assert not set(got.tolist()) & set(val.tolist()) and len(val) > 0


# every method runs an epoch in tests/test_at.py; here the run folder of three kinds of method
@pytest.mark.parametrize("method", ["student", "kd+ig", "kd+ig-shuffled+at"])
def test_every_kind_of_method_trains_and_writes_a_run(tmp_path, method):
    summary = trainer(tmp_path, method).fit()
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.jsonl", "last.pt", "model.safetensors", "model.json", "summary.json"):
        assert (run / f).exists(), f
    assert summary["method"] == method and 0 <= summary["test_accuracy"] <= 100
    test = json.loads((run / "summary.json").read_text())["test"]  # evaluate's metrics, kappa null if undefined
    assert test["accuracy"] == summary["test_accuracy"] and {"balanced_accuracy", "kappa"} <= test.keys()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert ("kd" in rows[0]) == parse_method(method).has("kd")
    card = (run / "README.md").read_text()  # the model card: what, data, method, accuracy, how to load
    how = "cross-entropy" if method == "student" else f"`{method}`"
    assert card.startswith(f"# {summary['model']} trained with {how}") and "igkd.load_model" in card
    assert f"{summary['test_accuracy']:.2f}%" in card


def test_training_learns(tmp_path):
    s = trainer(tmp_path, "student", epochs=12, lr=0.05, optimizer="adam", schedule="constant").fit()
    assert s["val_accuracy"] > 60  # 4 classes: chance is 25%


def stop_in_epoch(run: Trainer, epoch: int, resume: bool = False) -> None:
    """``run.fit(resume)`` interrupted (Ctrl-C) as ``epoch`` starts."""
    real = run.train_epoch

    def train_epoch(e):
        if e == epoch:
            raise KeyboardInterrupt
        return real(e)
    run.train_epoch = train_epoch
    with pytest.raises(KeyboardInterrupt):
        run.fit(resume)


@pytest.mark.parametrize("method", ["kd+ig", "kd+cutmix"])  # an overlay, and a mix that changes the labels
def test_same_seed_same_weights_and_resume_is_exact(tmp_path, method):
    a = trainer(tmp_path / "a", method, epochs=3)
    a.fit()
    again = trainer(tmp_path / "again", method, epochs=3)
    again.fit()
    # a run interrupted during epoch 2 (Ctrl-C), then resumed with the same command
    stop_in_epoch(trainer(tmp_path / "b", method, epochs=3), 2)
    assert torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)["epoch"] == 1
    trainer(tmp_path / "b", method, epochs=3).fit(resume=True)
    final = {name: torch.load(tmp_path / name / "run" / "last.pt", weights_only=True)["model"]
             for name in ("a", "again", "b")}
    for k in final["a"]:
        assert torch.equal(final["a"][k], final["again"][k]), k
        assert torch.equal(final["a"][k], final["b"][k]), k
    summary = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert summary["test_accuracy"] == json.loads((tmp_path / "a" / "run" / "summary.json").read_text())["test_accuracy"]


def test_an_extended_run_resumes_at_its_new_schedules_rate(tmp_path):
    trainer(tmp_path, "kd", epochs=2, schedule="cosine").fit()  # its cosine ends at a rate of 0
    longer = trainer(tmp_path, "kd", epochs=4, schedule="cosine")
    longer.load_state()
    sched = longer.scheduler
    want = sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch)  # 4 epochs' cosine, halfway: lr / 2
    assert want == pytest.approx(0.005, rel=0.05)
    # the first resumed step ran at the saved optimizer's rate, 0: LambdaLR's load keeps it
    assert longer.optimizer.param_groups[0]["lr"] == want and sched.get_last_lr() == [want]


def test_the_best_checkpoint_is_model_once_last_pt_names_it(tmp_path, monkeypatch):
    # val_fraction 0: every epoch is the best, so every epoch writes a checkpoint
    run = tmp_path / "run"

    def killed_at(call, name):  # the call-th call of Trainer.<name> raises, as a kill there would
        real, calls = getattr(Trainer, name), []

        def method(self, *args, **kw):
            calls.append(1)
            if len(calls) == call:
                raise KeyboardInterrupt
            return real(self, *args, **kw)
        monkeypatch.setattr(Trainer, name, method)

    # killed after epoch 2's checkpoint, before last.pt: model.* stays epoch 1's, as last.pt says
    killed_at(2, "save_state")
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, "kd", epochs=2, val_fraction=0).fit()
    monkeypatch.undo()
    assert json.loads((run / "model.json").read_text())["epoch"] == 1
    assert json.loads((run / "model-pending.json").read_text())["epoch"] == 2
    summary = trainer(tmp_path, "kd", epochs=1, val_fraction=0).fit(resume=True)  # ends at epoch 1 after all
    assert summary["best_epoch"] == 1 and not (run / "model-pending.safetensors").exists()
    last = torch.load(run / "last.pt", weights_only=True)
    from safetensors.torch import load_file
    weights = load_file(run / "model.safetensors")  # epoch 1's, not the killed attempt's epoch 2
    assert all(torch.equal(weights[k], v) for k, v in last["model"].items())

    # killed after last.pt named epoch 2 the best, before the rename: the resume completes it
    shutil.rmtree(run)
    killed_at(3, "settle_best")  # the first call is at the start, the second after epoch 1
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, "kd", epochs=2, val_fraction=0).fit()
    monkeypatch.undo()
    assert json.loads((run / "model.json").read_text())["epoch"] == 1 and (run / "model-pending.json").exists()
    summary = trainer(tmp_path, "kd", epochs=2, val_fraction=0).fit(resume=True)
    assert summary["best_epoch"] == 2 and not (run / "model-pending.json").exists()
    last = torch.load(run / "last.pt", weights_only=True)
    weights = load_file(run / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in last["model"].items())


def test_refuses_to_overwrite_or_resume_with_other_settings(tmp_path):
    trainer(tmp_path, "kd", epochs=1).fit()
    with pytest.raises(UserError, match="--resume"):
        trainer(tmp_path, "kd", epochs=1).fit()
    with pytest.raises(UserError, match="differs in T"):
        trainer(tmp_path, "kd", epochs=2, T=4.0).fit(resume=True)


def test_nan_loss_stops_with_a_clear_message_and_keeps_last_checkpoint(tmp_path):
    tr = trainer(tmp_path, "kd", epochs=2)
    tr.fit()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    tr2 = trainer(tmp_path, "kd", epochs=3)
    tr2.logits = torch.full_like(tr2.logits, float("nan"))
    with pytest.raises(UserError, match="last good checkpoint"):
        tr2.fit(resume=True)
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_unknown_method_is_a_user_error():
    with pytest.raises(UserError, match=r"unknown method 'kd\+magic': unknown method part 'magic'; parts are kd, dkd"):
        parse_method("kd+magic")


def test_method_defaults_are_the_papers_and_the_paper_recipe_pins_its_ig():
    cfg = PrecomputeConfig()  # igkd's fast IG default, as accurate as the paper's (benchmarks/ig_throughput.py)
    assert (cfg.ig_steps, cfg.ig_method, cfg.ig_baseline) == (50, "riemann_middle", "zero")
    for section in ("precompute", "distill"):
        paper = load_yaml("cifar10_paper", section)  # the shipped recipe, by name
        assert (paper["ig_steps"], paper["ig_method"], paper["ig_baseline"]) == (50, "gausslegendre", "zero")
    d = DistillConfig()
    assert (d.T, d.alpha, d.p, d.model) == (2.5, 0.01, 0.1, "mobilenetv2:drop=5")


def test_method_names_are_canonical_and_cover_the_eight_combinations():
    assert parse_method("at+kd").name == "kd+at" and parse_method("KD+IG+AT").has("at")
    assert {m for m in METHODS if "shuffled" not in m} == {"student", "kd", "ig", "at", "kd+ig", "kd+at", "ig+at",
                                                          "kd+ig+at"}
    for bad, why in (("ig+ig-shuffled", "which do the same job"), ("kd+kd", "names a part twice"),
                     ("at+student", "unknown method part 'student'"), ("kd+dkd", "which do the same job"),
                     ("kd+", "empty part")):
        with pytest.raises(UserError, match=why):
            parse_method(bad)


def test_epoch_line_shows_loss_parts_speed_and_eta(tmp_path, capsys):
    tr = trainer(tmp_path, "kd+ig+at", epochs=1)
    tr.quiet = False
    tr.fit()
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("epoch 1/1")][0]
    for part in ("loss ", "ce ", "kd ", "at ", "img/s", "ETA"):
        assert part in line, line


def test_amp_is_gpu_only_and_optimizer_kernels_agree(tmp_path):
    with pytest.raises(UserError, match="needs a CUDA device"):
        trainer(tmp_path / "a", "kd", amp="bf16")
    assert trainer(tmp_path / "b", "kd").amp is None  # auto = off on CPU
    final = {}
    for impl in ("fused", "foreach", "loop"):
        tr = trainer(tmp_path / impl, "kd", epochs=1, optimizer_impl=impl)
        tr.fit()
        final[impl] = tr.model.state_dict()
    for k in final["loop"]:
        torch.testing.assert_close(final["fused"][k], final["loop"][k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(final["foreach"][k], final["loop"][k], rtol=1e-4, atol=1e-5)


def test_distill_killed_with_sigkill_resumes_to_the_same_weights(small_real, tmp_path):
    """A real `igkd distill` process killed (SIGKILL, no clean-up) after its first epoch and
    rerun with --resume ends with the weights, best epoch and test accuracy of a run that was
    never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time
    args = [sys.executable, "-m", "igkd.cli", "distill", "--data", f"imagefolder:{small_real / 'data'},gray=1",
            "--teacher", str(small_real / "teacher.safetensors"), "--method", "kd+ig",
            "--model", "mobilenetv2:width=0.25,drop=14", "--epochs", "4", "--threads", "1", "--ig-steps", "2",
            "--batch-size", "32", "--lr", "0.05", "--p", "0.5", "--quiet"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env,
                           timeout=300)  # also builds the store the killed run reuses
    assert whole.returncode == 0, whole.stderr[-3000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    deadline = time.monotonic() + 120
    metrics = run / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None and not (
            metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    done = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= done < 4
    resumed = subprocess.run([*args, "--out", str(run), "--resume"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in ("whole", "killed"))
    assert a["epoch"] == b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():  # Adam's moments and step counts
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert a["scheduler"] == b["scheduler"]
    sa, sb = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("whole", "killed"))
    assert (sa["best_epoch"], sa["test_accuracy"]) == (sb["best_epoch"], sb["test_accuracy"])
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_log_csv_writes_per_step_rows_and_a_resume_logs_no_step_twice(tmp_path):
    """--log csv: one row per logged step (the mean over --log-every steps) and per epoch, appended;
    metrics.jsonl is appended too. An interrupted run resumed logs every step exactly once."""
    import csv
    a = trainer(tmp_path / "a", "kd+ig", epochs=2, log="csv", log_every=1)
    steps_per_epoch = a.steps_per_epoch
    a.fit()
    run = tmp_path / "a" / "run"
    steps = list(csv.DictReader((run / "log" / "steps.csv").open()))
    assert [int(r["step"]) for r in steps] == list(range(1, 2 * steps_per_epoch + 1))
    assert {"epoch", "loss", "ce", "kd", "lr"} <= set(steps[0])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    sizes = [len(b.idx) for b in a.batches(1)]  # every step's images: the epoch loss is their weighted mean
    for e in (1, 2):
        rows = [float(r["loss"]) for r in steps if int(r["epoch"]) == e]
        assert abs(sum(r * n for r, n in zip(rows, sizes)) / sum(sizes) - metrics[e - 1]["loss"]) < 1e-5
    epochs = list(csv.DictReader((run / "log" / "epochs.csv").open()))
    assert [float(r["val_accuracy"]) for r in epochs] == [m["val_accuracy"] for m in metrics]
    # interrupted in epoch 2 after logging some of its steps, then resumed
    b = trainer(tmp_path / "b", "kd+ig", epochs=2, log="csv", log_every=1)
    real_step, calls = b.train_step, [0]

    def dies_in_epoch_2(*args):
        calls[0] += 1
        if calls[0] == steps_per_epoch + 2:
            raise KeyboardInterrupt
        return real_step(*args)
    b.train_step = dies_in_epoch_2
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    assert len(list(csv.DictReader((tmp_path / "b" / "run" / "log" / "steps.csv").open()))) == steps_per_epoch + 1
    trainer(tmp_path / "b", "kd+ig", epochs=2, log="csv", log_every=1).fit(resume=True)
    resumed = list(csv.DictReader((tmp_path / "b" / "run" / "log" / "steps.csv").open()))
    assert [int(r["step"]) for r in resumed] == list(range(1, 2 * steps_per_epoch + 1))
    assert [float(r["loss"]) for r in resumed] == [float(r["loss"]) for r in steps]  # exact resume, same rows
    assert (tmp_path / "b" / "run" / "metrics.jsonl").read_text().count("\n") == 2


def test_log_refuses_unknown_trackers_before_writing_anything(tmp_path):
    with pytest.raises(UserError, match="--log nope is not known"):
        trainer(tmp_path, "student", log="csv,nope").fit()
    assert not (tmp_path / "run").exists()


def test_maps_stored_smaller_are_area_means_and_come_back_at_the_image_size(tmp_path):
    from igkd.precompute import downsample_maps, upsample_maps
    full = trainer(tmp_path / "full", "kd+ig", ig_steps=2)
    small = trainer(tmp_path / "small", "kd+ig", ig_steps=2, map_size=6)
    stored = small.maps.stored
    assert tuple(stored.shape) == (64, 6, 6) and small.maps.shape == (64, 12, 12)
    # each stored pixel is the mean of the 2x2 image pixels it covers (float16 storage)
    want = full.maps.float().view(64, 6, 2, 6, 2).mean((2, 4))
    assert torch.allclose(stored.float(), want, atol=2e-3)
    assert torch.allclose(downsample_maps(full.maps.float(), 6), want, atol=1e-6)
    idx = torch.tensor([5, 0, 63])
    got = small.maps[idx]
    assert got.shape == (3, 12, 12) and torch.equal(got, upsample_maps(stored[idx], (12, 12)))
    # bilinear at pixel centres: interior image pixels between stored centres are averages of them
    assert torch.allclose(got[:, 1, 1], stored[idx, 0, 0].float() * 0.5625 + stored[idx, 0, 1].float() * 0.1875
                          + stored[idx, 1, 0].float() * 0.1875 + stored[idx, 1, 1].float() * 0.0625, atol=1e-6)
    # another map size is another store; the overlay runs on the upsampled maps
    assert small.cfg.map_size == 6 and next(iter(small.batches(1))).x.shape[-2:] == (12, 12)
