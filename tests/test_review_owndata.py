"""An engineer's own image folder (grayscale, 4 classes, 8-pixel images), their own py: networks
and the paper's experiments run on them: what only worked for CIFAR-shaped data, or was
silently ignored, each fixed and checked here in-process on tiny real files."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_TEACHER
from helpers_data import write_image_folder
from igkd.errors import UserError
from igkd.experiments import resolve
from igkd.models import Normalized, build_model, save_checkpoint

CLASSES = ("ant", "cat", "dog", "owl")

# a depthwise stem, one filter bank per input channel: valid for 1 channel at any width, and
# for 3 channels only at widths divisible by 3
FACTORY = '''
import torch.nn as nn
def make(num_classes, in_channels, width=8, depth=2):
    layers = [nn.Conv2d(in_channels, width, 3, padding=1, groups=in_channels), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    root = tmp_path_factory.mktemp("owndata")
    write_image_folder(root / "data", per_class=3, side=8, classes=CLASSES)
    (root / "dwnet.py").write_text(FACTORY)
    torch.manual_seed(0)
    teacher = Normalized(build_model(TINY_TEACHER, len(CLASSES), 1), [0.5], [0.25])
    save_checkpoint(root / "teacher", teacher, {"model": TINY_TEACHER, "num_classes": len(CLASSES), "in_channels": 1,
                                                "classes": list(CLASSES), "preprocessing": {
                                                    "normalize": "dataset", "mean": [0.5], "std": [0.25]}})
    return root


def _base(root) -> dict:
    return {"data": f"imagefolder:{root / 'data'},gray=1,cache=0", "teacher": str(root / "teacher.safetensors"),
            "normalize": "none", "epochs": 1, "batch_size": 8, "val_fraction": 0.25, "threads": 1,
            "eval_batch_size": 64, "check_images": 0}


def test_compression_sweeps_a_grayscale_students_own_factory(own, tmp_path):
    """The sweep's up-front check built every student for CIFAR's 10 classes and 3 channels:
    a student valid for the user's 1-channel data (a depthwise stem of width 8) was refused
    with a torch traceback before anything trained."""
    from igkd.experiments import run_compression
    cfg = resolve("compression", None, {**_base(own), "methods": "student", "latency": False,
                                        "sweep_base": f"py:{own / 'dwnet.py'}:make,width=8,depth=2",
                                        "sweep_knobs": "depth=depth,width=width", "depths": "1", "widths": ""})
    result = run_compression(cfg, tmp_path / "exp", quiet=True)
    assert result["input_shape"] == [1, 8, 8]
    by_model = {s["model"]: s for s in result["students"]}
    spec = f"py:{own / 'dwnet.py'}:make,width=8,depth=1"
    assert by_model[spec]["params"] == sum(p.numel() for p in build_model(spec, len(CLASSES), 1).parameters())
    assert {r["model"] for r in result["runs"]} == set(by_model)


@pytest.mark.parametrize("kind, option, value", [("compression", "seeds", 3), ("ablation", "runs", 4),
                                                  ("search", "corruptions", "all"), ("search", "methods", "kd"),
                                                  ("montecarlo", "depths", "3"), ("ablation", "T_values", "1,2")])
def test_an_option_of_another_experiment_is_refused_not_dropped(own, tmp_path, capsys, kind, option, value):
    """`igkd experiment compression --seeds 3` trained one seed per point and `search
    --corruptions all` scored nothing, without a word: each kind ignores the others' options."""
    from igkd.cli import main
    flag = "--" + option.replace("_", "-")
    with pytest.raises(SystemExit) as e:
        main(["experiment", kind, "--data", _base(own)["data"], "--out", str(tmp_path / "x"), flag, str(value)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"igkd: error: {flag} ") and err.count("\n") == 1, err
    assert f"'igkd experiment {kind}' does not read" in err and not (tmp_path / "x").exists()
    # the same in the kind's own section of a recipe; the shared 'experiment:' section may hold it
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"distill: {{data: demo}}\nexperiment:\n  {option}: {value}\n  {kind}:\n    {option}: {value}\n")
    with pytest.raises(UserError, match=f"'{option}' on 'experiment: {kind}:' in .*does not read"):
        resolve(kind, recipe)
    recipe.write_text(f"distill: {{data: demo}}\nexperiment:\n  {option}: {value}\n")
    resolve(kind, recipe)
    # and the kinds that read it take it
    reader = {"seeds": "ablation", "runs": "montecarlo", "corruptions": "montecarlo", "methods": "ablation",
              "depths": "compression", "T_values": "search"}[option]
    assert str(getattr(resolve(reader, None, {option: value}), option)) == str(value)


# a student that stops its own process with SIGTERM (as `kill PID` or a job scheduler would)
# at its first training step, once; where igkd left SIGTERM at its default action (which ends the
# process there and then, and pytest with it) it raises instead, so the test fails, not the session
STOPPING = '''
import os
import signal
import torch.nn as nn
class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(4, num_classes))
    def forward(self, x):
        if self.training and os.environ.pop("IGKD_TEST_SIGTERM", None):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                raise RuntimeError("SIGTERM left at its default action: the process would end without clean-up")
            os.kill(os.getpid(), signal.SIGTERM)
        return self.body(x)
'''


def test_sigterm_mid_search_requeues_the_trial_as_ctrl_c_does(own, tmp_path, capsys, monkeypatch):
    """A search worker stopped by SIGTERM died on the spot: its trial stayed RUNNING, and a rerun
    ended at once with the point untrained ('1 still running on other workers') until three
    heartbeats had passed. SIGTERM now takes Ctrl-C's path: the trial is failed and its point
    queued again for the rerun to train (resuming its run), and the exit status is 143."""
    import signal
    optuna = pytest.importorskip("optuna")
    from optuna.trial import TrialState

    from igkd.cli import main
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process handles SIGTERM itself")
    (tmp_path / "stopping.py").write_text(STOPPING)
    base = _base(own)
    url = f"sqlite:///{tmp_path / 's.db'}"
    argv = ["experiment", "search", "--data", base["data"], "--teacher", base["teacher"], "--out", str(tmp_path / "x"),
            "--model", f"py:{tmp_path / 'stopping.py'}:Net", "--normalize", "none", "--epochs", "1", "--batch-size",
            "8", "--threads", "1", "--search-method", "kd", "--logits", "online", "--T-values", "2",
            "--alpha-values", "0.5", "--storage", url, "--quiet"]
    monkeypatch.setenv("IGKD_TEST_SIGTERM", "1")
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 143 and "igkd: terminated" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main put back what it found
    states = [t.state for t in optuna.load_study(study_name="igkd-search", storage=url).trials]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # the next worker claims the point at once


def test_report_gives_a_tpe_search_its_ranges_not_its_lists_end_points(tmp_path):
    """TPE draws each option from the range of its list; the report said 'T in {1, 4}', which
    reads as a grid of two temperatures, for trials at T = 2.14, 2.31, 1.80..."""
    import json

    from igkd.experiments.search import section
    result = {"sampler": "tpe", "method": "kd+ig", "model": "resnet:depth=8", "epochs": 1, "study": "tpe1",
              "storage": "sqlite:///search.db", "val_fraction": 0.1, "complete": 0, "trials": [], "best": None,
              "space": {"T": [1.0, 4.0], "alpha": [0.3, 0.7], "p": [0.1]}}
    (tmp_path / "search.json").write_text(json.dumps(result))
    assert " over T in [1, 4]; alpha in [0.3, 0.7]; p in {0.1}; " in section(tmp_path)
    (tmp_path / "search.json").write_text(json.dumps({**result, "sampler": "grid"}))
    assert " over T in {1, 4}; alpha in {0.3, 0.7}; p in {0.1}; " in section(tmp_path)


def test_runs_of_an_image_folder_whose_files_changed_are_not_reused(own, tmp_path):
    """A finished run is found by its config, whose data is the spec's text: after the user
    added a test image to their folder, the rerun reported the old runs' accuracies (and the
    teacher's, cached by spec) as results on the new images. Now the teacher is scored again
    and a run trained on other images is refused, naming it, before any training."""
    import shutil

    import numpy as np
    from PIL import Image

    from igkd.experiments import run_ablation
    from igkd.experiments.common import teacher_facts
    shutil.copytree(own / "data", tmp_path / "data")
    cfg = resolve("ablation", None, {**_base(own), "data": f"imagefolder:{tmp_path / 'data'},gray=1,cache=0",
                                     "methods": "student"})
    out = tmp_path / "exp"
    run_ablation(cfg, out, quiet=True)
    assert teacher_facts(cfg, out, quiet=True)["test_images"] == 12
    run_ablation(cfg, out, quiet=True)  # the same images: reused
    # a run recorded before the splits' sha256 were kept is checked on its checkpoint's train split
    import json
    (record,) = out.glob("runs/*/run.json")
    kept = record.read_text()
    record.write_text(json.dumps({k: v for k, v in json.loads(kept).items() if k != "data_sha256"}))
    assert run_ablation(cfg, out, quiet=True)["runs"]
    record.write_text(kept)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "data" / "test" / "ant" / "new.png")
    assert teacher_facts(cfg, out, quiet=True)["test_images"] == 13
    with pytest.raises(UserError, match=r"student_seed_0--\w+ was trained on other images than imagefolder:.*its test "
                                        r"split changed"):
        run_ablation(cfg, out, quiet=True)


def test_a_damaged_record_in_an_experiment_folder_is_one_line_naming_the_fix(own, tmp_path):
    """A run's summary.json or run.json cut short from outside (a partial copy of the folder)
    was a JSONDecodeError traceback when the experiment was run again."""
    from igkd.experiments import run_ablation
    cfg = resolve("ablation", None, {**_base(own), "methods": "student"})
    out = tmp_path / "exp"
    run_ablation(cfg, out, quiet=True)
    (run,) = out.glob("runs/*")
    for name in ("summary.json", "run.json"):
        kept = (run / name).read_text()
        (run / name).write_text(kept[:20])
        with pytest.raises(UserError, match=rf"{name} is damaged \(JSONDecodeError\); delete .*{run.name} to train "
                                            "that run again"):
            run_ablation(cfg, out, quiet=True)
        (run / name).write_text(kept)
    (out / "experiment.json").write_text("[1]")
    with pytest.raises(UserError, match=r"experiment.json is damaged \(not a JSON object\); delete it"):
        run_ablation(cfg, out, quiet=True)
