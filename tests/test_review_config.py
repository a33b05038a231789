"""Configuration and option handling: YAML recipes, sections, option spellings, deprecated
names and experiment trackers (a review of config.py, cli_types.py and loggers.py)."""

import dataclasses
import json
from pathlib import Path

import pytest

import igkd
from helpers_cli import run_igkd
from igkd.config import DistillConfig, TrainConfig, build, read_yaml_file, shipped_configs
from igkd.errors import UserError

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"


def error_line(r, *words) -> str:
    """The one error line of a refused command (after any warning lines), exit status 2."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("igkd: warning: ")]
    assert len(errors) == 1 and errors[0].startswith("igkd: error: "), r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


# ---------------------------------------------------------------- one key, one value


def test_a_yaml_key_given_twice_is_refused(tmp_path):
    # PyYAML keeps the last of two equal keys: the first lr was dropped without a word
    # (here and below --epochs 0 or --images 0: refused as out of range, not run, where the
    # YAML is read as it was)
    (tmp_path / "c.yaml").write_text("train:\n  data: demo\n  lr: 0.1\n  epochs: 3\n  lr: 0.01\n")
    line = error_line(run_igkd("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r", "--epochs", "0"),
                      "key 'lr' is given twice", "lines 3 and 5", "c.yaml")
    assert "keep one" in line
    assert not (tmp_path / "r").exists()
    (tmp_path / "c.json").write_text('{"a": 1, "a": 2}')  # JSON read as YAML: the same rule
    with pytest.raises(UserError, match="key 'a' is given twice"):
        read_yaml_file(tmp_path / "c.json", "class map")
    # a merge key brings defaults that the mapping's own keys may override
    (tmp_path / "m.yaml").write_text("base: &b\n  lr: 0.1\n  epochs: 3\nrun:\n  <<: *b\n  lr: 0.01\n")
    assert read_yaml_file(tmp_path / "m.yaml")["run"] == {"lr": 0.01, "epochs": 3}


def test_two_spellings_or_an_old_and_a_new_name_of_one_option_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  data: demo\n  batch-size: 4\n  batch_size: 8\n")
    error_line(run_igkd("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r", "--epochs", "0"),
               "'batch-size' and 'batch_size'", "option 'batch_size'", "keep one")
    (tmp_path / "flat.yaml").write_text("data: demo\nbatch_size: 4\nbatch-size: 8\n")
    error_line(run_igkd("train", "--config", tmp_path / "flat.yaml", "--out", tmp_path / "r", "--epochs", "0"),
               "keep one")
    (tmp_path / "a.yaml").write_text("audit:\n  steps: 3\n  ig_steps: 4\n")  # 4 won, silently
    error_line(run_igkd("audit", "--config", tmp_path / "a.yaml", "--teacher", DEMO_TEACHER, "--student",
                        DEMO_TEACHER, "--data", "demo", "--images", "0"), "'steps' and 'ig_steps'", "keep one")
    assert not (tmp_path / "r").exists()
    # an old and a new name of a list still both count (tests/test_cli_fixes.py), and one
    # spelling of an option is of course fine
    (tmp_path / "ok.yaml").write_text("train:\n  data: demo\n  batch-size: 4\n")
    from igkd.cli import make_parser
    from igkd.cli_types import resolve
    args = make_parser().parse_args(["train", "--config", str(tmp_path / "ok.yaml"), "--out", "x"])
    assert resolve(args, TrainConfig, "train").batch_size == 4


# ---------------------------------------------------------------- sections


def test_a_recipe_without_the_commands_section_is_refused(tmp_path):
    # demo_experiments holds distill: and experiment: only; igkd train read it as bare options,
    # found none and trained the 30-epoch default model as if --config had not been given
    error_line(run_igkd("train", "--config", "demo_experiments", "--data", "demo", "--out", tmp_path / "r",
                        "--epochs", "0"),
               "demo_experiments.yaml has no 'train:' section", "distill:, experiment:", "leave out --config")
    assert not (tmp_path / "r").exists()
    from igkd.cli import make_parser
    from igkd.cli_types import resolve
    from igkd.command_options import EvaluateConfig
    (tmp_path / "d.yaml").write_text("distill:\n  data: demo\n")
    args = make_parser().parse_args(["evaluate", "--config", str(tmp_path / "d.yaml"), "--weights", "w.safetensors"])
    with pytest.raises(UserError, match="no 'evaluate:' section"):
        resolve(args, EvaluateConfig, "evaluate")
    # a file of bare options is read by every command, and a recipe by the commands it has sections for
    (tmp_path / "bare.yaml").write_text("data: demo\nepochs: 2\n")
    args = make_parser().parse_args(["train", "--config", str(tmp_path / "bare.yaml"), "--out", "x"])
    assert resolve(args, TrainConfig, "train").epochs == 2
    args = make_parser().parse_args(["train", "--config", "cifar10_paper", "--out", "x"])
    assert resolve(args, TrainConfig, "train").epochs == 200


def test_an_unknown_option_or_section_names_the_near_one(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  data: demo\n  epoch: 3\n")
    error_line(run_igkd("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r"),
               "unknown option 'epoch'", "(did you mean 'epochs'?)")
    (tmp_path / "s.yaml").write_text("trian:\n  data: demo\n")
    error_line(run_igkd("train", "--config", tmp_path / "s.yaml", "--out", tmp_path / "r"),
               "unknown option 'trian'", "did you mean the section 'train:'?")
    (tmp_path / "m.yaml").write_text("train:\n  data: demo\ndistil:\n  T: 3\n")
    error_line(run_igkd("train", "--config", tmp_path / "m.yaml", "--out", tmp_path / "r"),
               "did you mean 'distill:'?")
    with pytest.raises(UserError) as e:  # nothing near: no guess
        build(TrainConfig, {"colour": "blue"})
    assert "did you mean" not in str(e.value) and "known options: amp" in str(e.value)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- option values


def test_an_out_of_range_number_is_shown_as_given():
    with pytest.raises(UserError) as e:  # int(1e300): a message of 301 digits
        build(TrainConfig, {"seed": 1e300})
    assert "--seed 1e+300 is out of range" in str(e.value) and len(str(e.value)) < 120


def test_a_repeated_deprecated_option_warns_once(capsys):
    from igkd.cli import make_parser
    capsys.readouterr()
    args = make_parser().parse_args(["bench", "latency", "--model", "mobilenetv2", "--batch", "1", "--batch", "2"])
    assert args.batch_size == ["1", "2"]
    assert capsys.readouterr().err.splitlines() == ["igkd: warning: --batch is deprecated; use --batch-size"]
    make_parser().parse_args(["audit", "--teacher", "t", "--student", "s", "--steps", "3", "--baseline", "black",
                              "--steps", "4"])
    assert capsys.readouterr().err.splitlines() == ["igkd: warning: --steps is deprecated; use --ig-steps",
                                                    "igkd: warning: --baseline is deprecated; use --ig-baseline"]


def test_log_is_a_repeatable_list_checked_with_the_config(tmp_path):
    from igkd.cli import make_parser
    from igkd.cli_types import resolve
    # a comma list like --corruptions: repeated, the first --log was dropped; a YAML list refused
    args = make_parser().parse_args(["train", "--data", "demo", "--out", "x", "--log", "csv", "--log", "csv"])
    assert resolve(args, TrainConfig, "train").log == "csv,csv"
    assert build(TrainConfig, {"log": ["csv"]}).log == "csv"
    # checked when the config is built: only the trainer checked it, so distill refused an
    # unknown tracker (or a missing package) after its precompute
    with pytest.raises(UserError, match="--log nosuch is not known"):
        DistillConfig(log="nosuch")
    r = run_igkd("distill", "--data", "demo", "--teacher", DEMO_TEACHER, "--log", "csv,nosuch", "--out",
                 tmp_path / "r", "--store", tmp_path / "store")
    error_line(r, "--log nosuch is not known")
    assert not (tmp_path / "r").exists() and not (tmp_path / "store").exists()


# ---------------------------------------------------------------- trackers


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path, capsys):
    from igkd.loggers import Trackers
    capsys.readouterr()
    t = Trackers("csv", tmp_path, {"lr": 0.1}, 0)
    t.step({"step": 1, "epoch": 1, "loss": 2.0, "lr": 0.1})
    assert (tmp_path / "log" / "steps.csv").read_text().splitlines() == ["step,epoch,loss,lr", "1,1,2.0,0.1"]
    (tmp_path / "log" / "steps.csv").unlink()
    (tmp_path / "log" / "steps.csv").mkdir()  # the file cannot be written any more
    t.step({"step": 2, "epoch": 1, "loss": 1.0, "lr": 0.1})  # raised IsADirectoryError into the training loop
    t.step({"step": 3, "epoch": 1, "loss": 1.0, "lr": 0.1})
    t.epoch({"epoch": 1, "loss": 1.5})
    t.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("igkd: warning: --log csv failed to log a step"), err
    assert "the run goes on" in err[0] and not t
    # one that cannot start (here: resuming reads the folder its CSV should be) is dropped too
    Trackers("csv", tmp_path, {}, 1).close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "--log csv failed to start" in err[0], err


# ---------------------------------------------------------------- shipped recipes


def test_every_shipped_recipe_resolves_by_name_and_as_a_shown_copy(tmp_path):
    """`igkd config show NAME > my.yaml` then `--config my.yaml` gives what `--config NAME` gives,
    for every command the recipe has a section for."""
    from igkd.cli import make_parser
    from igkd.cli_types import resolve
    from igkd.command_options import PrecomputeCommandConfig
    commands = {"train": (TrainConfig, ["train", "--out", "x"]),
                "distill": (DistillConfig, ["distill", "--out", "x"]),
                "precompute": (PrecomputeCommandConfig, ["precompute", "--teacher", "t", "--data", "demo"])}
    checked = 0
    for name, path in shipped_configs().items():
        copy = tmp_path / f"{name}.yaml"
        copy.write_text(run_igkd("config", "show", name).stdout)
        for section in read_yaml_file(path):
            if section in commands:
                cls, argv = commands[section]
                by_name = resolve(make_parser().parse_args([*argv, "--config", name]), cls, section)
                by_file = resolve(make_parser().parse_args([*argv, "--config", str(copy)]), cls, section)
                assert dataclasses.asdict(by_name) == dataclasses.asdict(by_file), (name, section)
                checked += 1
    assert checked >= 14
    assert json.loads(json.dumps(dataclasses.asdict(by_name)))  # plain values all the way


def test_the_command_line_takes_whole_numbers_as_yaml_does(tmp_path):
    # YAML's `epochs: 3.0` and the API's epochs=3.0 were accepted and --epochs 3.0 was refused
    from igkd.cli_types import int_range
    parse = int_range(1)
    assert (parse("3.0"), parse("1e3"), type(parse("2.0"))) == (3, 1000, int)
    for text in ("3.5", "inf", "nan", "three"):
        with pytest.raises(Exception, match="is not an integer"):
            parse(text)
    # through the command: parsed as 0, then refused as out of range (not as a non-integer)
    error_line(run_igkd("train", "--data", "demo", "--out", tmp_path / "r", "--epochs", "0.0"), "out of range")
    assert not (tmp_path / "r").exists()


def test_a_resumed_run_logs_no_step_twice_to_tensorboard(tmp_path):
    # TensorBoard showed the interrupted epoch's steps twice (the old and the resumed values,
    # one file each) until the resumed run's writer purged from its first step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from igkd.loggers import Trackers
    t = Trackers("tensorboard", tmp_path, {"lr": 0.1}, 0)
    for s in range(1, 6):  # 3 steps per epoch; killed after step 5, in epoch 2
        t.step({"step": s, "epoch": (s - 1) // 3 + 1, "loss": 10.0 + s})
        if s == 3:
            t.epoch({"epoch": 1, "val_accuracy": 50.0})
    t.close()
    t = Trackers("tensorboard", tmp_path, {"lr": 0.1}, 1)  # resumed from epoch 1's checkpoint
    for s in range(4, 7):
        t.step({"step": s, "epoch": 2, "loss": 20.0 + s})
    t.epoch({"epoch": 2, "val_accuracy": 60.0})
    t.close()
    events = EventAccumulator(str(tmp_path / "log" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert [(e.step, e.value) for e in events.Scalars("epoch/val_accuracy")] == [(1, 50.0), (2, 60.0)]
