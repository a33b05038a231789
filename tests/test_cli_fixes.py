"""Command-line defects found in review, each through the real command (igkd.cli.main in
this process, or ``python -m igkd`` where the test is about the process): recipe names
hidden by folders, foreign folders given to ``igkd report``, deprecated aliases of
repeatable options, progress under --json, non-text YAML keys, a closed stdout pipe,
folders left by failed writes, the demo recipe's ``demo:`` section, the model card,
and smaller messages and help texts."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import igkd
from helpers_cli import run_igkd
from helpers_data import write_image_folder
from helpers_fs import tmpfs
from igkd.config import PrecomputeConfig
from igkd.fileio import atomic_path
from igkd.spec import parse_spec

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
TINY = "mobilenetv2:width=0.25,drop=14"
README = Path(__file__).resolve().parents[1] / "README.md"


def one_line_error(r, *words) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """2 classes x 4 PNGs per split, in a folder whose name needs quoting in a shell."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "my images, 2", 4, 8)


# ---------------------------------------------------------------- 1. a folder named like a recipe


def test_a_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # igkd demo --out demo made this folder; a rerun in the same place read --config demo (and
    # the demo's own default recipe) as the folder: "demo recipe demo is a folder"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text(json.dumps({"epochs": 999}))
    one_line_error(run_igkd("demo", "--out", "demo"), "holds a demo run with --epochs 999")  # the recipe was read
    (tmp_path / "cifar10_paper").mkdir()
    one_line_error(run_igkd("train", "--config", "cifar10_paper", "--out", "run", "--epochs", "0"),
                   "--epochs 0 is out of range")  # the recipe, then the option: not "is a folder"
    # a file of that name is the user's own recipe, and still wins over the shipped one
    (tmp_path / "demo_experiments").write_text("train:\n  bogus: 1\n")
    one_line_error(run_igkd("train", "--config", "demo_experiments", "--out", "run"), "unknown option 'bogus'")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 2. igkd report on foreign folders

SUMMARY = {"method": "student", "model": TINY, "dataset": "demo", "params": 10, "best_epoch": 1,
           "val_accuracy": 50.0, "test_accuracy": 40.0, "epochs": 1}


@pytest.mark.parametrize("files,words", [
    ({"summary.json": '{"a": 1}'}, ["summary.json", "'model'"]),
    ({"summary.json": "[1, 2]"}, ["summary.json", "JSON list"]),
    ({"summary.json": "{broken"}, ["summary.json", "not valid JSON"]),
    ({"ablation.json": "{broken"}, ["ablation.json", "not valid JSON"]),
    ({"montecarlo.json": "nul"}, ["montecarlo.json", "not valid JSON"]),
    ({"ablation.json": '{"rows": 3}'}, ["ablation.json", "ablation section"]),
    ({"summary.json": json.dumps(SUMMARY), "metrics.jsonl": '{"epoch": 1, "loss": 1.0}\ngarbage\n'},
     ["metrics.jsonl", "line 2"]),
])
def test_report_of_a_foreign_or_damaged_folder_is_one_line(tmp_path, files, words):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    one_line_error(run_igkd("report", tmp_path), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no report.md, figure or table


def test_report_while_a_row_is_being_appended_leaves_that_row_out(tmp_path):
    # a report run during training read a half-written last row as a damaged file
    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    rows = "".join(json.dumps({"epoch": e, "loss": 1.0 / e, "val_accuracy": 40.0 + e}) + "\n" for e in (1, 2))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"epoch": 3, "lo')
    r = run_igkd("report", tmp_path)
    assert r.returncode == 0, r.stderr
    from igkd.report import curve_groups, read_history
    assert [row["epoch"] for row in read_history(tmp_path / "metrics.jsonl")] == [1, 2]
    assert [[row["epoch"] for row in h] for h in curve_groups(tmp_path)["student (1 ep)"]] == [[1, 2]]
    # the same text as a finished line is damage, whatever line it is on
    (tmp_path / "metrics.jsonl").write_text(rows + '{"epoch": 3, "lo\n')
    one_line_error(run_igkd("report", tmp_path), "metrics.jsonl", "line 3")


def test_report_names_a_read_only_folder_not_its_temporary(tmp_path):
    folder = tmp_path / "run"
    with tmpfs(folder, "1m", otherwise="the writable_dir check is the same as --out's"):
        (folder / "summary.json").write_text(json.dumps(SUMMARY))
        (folder / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0, "val_accuracy": 50.0}\n')
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        line = one_line_error(run_igkd("report", folder), f"{folder} is not writable")
        assert ".tmp" not in line


# ---------------------------------------------------------------- 3. deprecated alias of a repeatable option

FAST_BENCH = ["--model", TINY, "--warmup", "0", "--min-time", "0", "--min-reps", "1", "--input", "1x8x8",
              "--classes", "2", "--quiet", "--json"]


@pytest.mark.parametrize("order", [["--batch", "2", "--batch-size", "3"], ["--batch-size", "3", "--batch", "2"]])
def test_deprecated_batch_adds_to_batch_size(order):
    r = run_igkd("bench", "latency", *order, *FAST_BENCH)
    assert r.returncode == 0, r.stderr  # --batch first: AttributeError; --batch-size first: 3 was dropped
    assert sorted(row["batch"] for row in json.loads(r.stdout)["rows"]) == [2, 3]
    assert r.stderr.strip() == "igkd: warning: --batch is deprecated; use --batch-size"


def test_deprecated_batch_adds_to_batch_size_in_yaml_too(tmp_path):
    (tmp_path / "b.yaml").write_text("bench:\n  batch: 2\n  batch_size: 3\n")  # the later key replaced the first
    r = run_igkd("bench", "latency", "--config", tmp_path / "b.yaml", *FAST_BENCH)
    assert r.returncode == 0, r.stderr
    assert sorted(row["batch"] for row in json.loads(r.stdout)["rows"]) == [2, 3]


# ---------------------------------------------------------------- 4. --json keeps progress on stderr


def test_json_keeps_progress_on_stderr(tmp_path):
    r = run_igkd("evaluate", "--weights", DEMO_TEACHER, "--data", "demo", "--corruptions", "contrast",
                 "--corruption-images", "4", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["corruptions"]["names"] == ["contrast"]  # stdout: the JSON alone
    assert "corruptions: 20/20 img (100%)" in r.stderr
    # the demo, stopped right after its first progress line (a teacher to train on data that is gone)
    (tmp_path / "r.yaml").write_text(f"train:\n  data: imagefolder:{tmp_path / 'gone'}\n")
    r = run_igkd("demo", "--config", tmp_path / "r.yaml", "--out", tmp_path / "out", "--train-teacher", "--json")
    assert r.returncode == 2 and r.stdout == "", r.stdout
    assert "demo: training the teacher" in r.stderr and "does not exist" in r.stderr


# ---------------------------------------------------------------- 5. YAML keys that are not text


@pytest.mark.parametrize("text,argv", [
    ("train:\n  1: 2\n", ["train", "--out", "{tmp}/run"]),
    ("epochs: 1\n2.5: x\n", ["distill", "--out", "{tmp}/run"]),
    ("experiment:\n  ablation:\n    3: 4\n", ["experiment", "ablation", "--out", "{tmp}/run", "--data", "demo"]),
])
def test_a_yaml_key_that_is_not_text_is_an_unknown_option(tmp_path, text, argv):
    (tmp_path / "r.yaml").write_text(text)
    r = run_igkd(*[a.format(tmp=tmp_path) for a in argv], "--config", tmp_path / "r.yaml")
    one_line_error(r, "unknown option", "r.yaml")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 6. a closed stdout pipe


def test_closed_stdout_pipe_exits_quietly():
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written (igkd methods | head -1, later lines)
    try:
        r = subprocess.run([sys.executable, "-m", "igkd", "methods"], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write)
    assert r.stderr == "" and r.returncode == 1, r.stderr  # no BrokenPipeError traceback


# ---------------------------------------------------------------- 7. folders of a failed write


def test_failed_write_removes_the_folders_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(ValueError), atomic_path(tmp_path / "kept" / "new" / "sub" / "f.json") as tmp:
        tmp.write_text("half")
        raise ValueError("the writer failed")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]  # its own folder stays
    with atomic_path(tmp_path / "kept" / "new" / "f.json") as tmp:
        tmp.write_text("{}")
    assert (tmp_path / "kept" / "new" / "f.json").read_text() == "{}"


def test_export_that_fails_its_parity_check_leaves_no_folder(tmp_path):
    out = tmp_path / "newdir" / "sub" / "t.pt"
    r = run_igkd("export", "--weights", DEMO_TEACHER, "--format", "torchscript", "--images", "8", "--atol", "0",
                 "--min-agreement", "100", "--output", out, "--quiet")
    if r.returncode == 0:
        pytest.skip("the TorchScript export matched PyTorch bit for bit here; no parity failure to test")
    one_line_error(r, "parity check failed")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 8. the demo recipe's demo: section


@pytest.mark.parametrize("section,words", [
    ("  gallery: abc\n", ["'gallery:'", "'abc'"]),
    ("  gallery: 0\n", ["'gallery:'", ">= 1"]),
    ("  methods: student\n", ["'methods:'", "list of method names"]),
    ("  methods: [student, kd+nope]\n", ["'methods:'", "kd+nope"]),
    ("  methods: []\n", ["'methods:'"]),
    ("  galery: 3\n", ["unknown option 'galery'", "methods, gallery"]),
])
def test_demo_section_is_checked_before_anything_is_written(tmp_path, section, words):
    recipe = (Path(igkd.__file__).parent / "configs" / "demo.yaml").read_text()
    recipe = re.sub(r"\ndemo:\n(  .*\n)*", "\n", recipe) + "demo:\n" + section
    (tmp_path / "r.yaml").write_text(recipe)
    one_line_error(run_igkd("demo", "--config", tmp_path / "r.yaml", "--out", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_demo_rerun_with_another_train_teacher_is_refused_at_once(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"distill:\n  data: imagefolder:{tmp_path / 'gone'}\n")
    out = tmp_path / "out"
    one_line_error(run_igkd("demo", "--config", recipe, "--out", out), "does not exist")
    assert not out.exists() or not any(out.iterdir())  # data that does not load: nothing recorded
    # two classes, not the shipped teacher's ten: the run gets past the data (demo.json), then stops
    recipe.write_text(f"distill:\n  data: imagefolder:{write_image_folder(tmp_path / 'two', 2, 8)}\n")
    one_line_error(run_igkd("demo", "--config", recipe, "--out", out), "classes")
    assert json.loads((out / "demo.json").read_text())["train_teacher"] is False
    line = one_line_error(run_igkd("demo", "--config", recipe, "--out", out, "--train-teacher"),
                          "holds a demo run with no --train-teacher", "another --out")
    assert "--store" not in line


# ---------------------------------------------------------------- 9. the model card


def test_model_card_quotes_the_data_and_knows_there_was_no_validation(tmp_path, images):
    data = f'imagefolder:"{images}",cache=0'
    out = tmp_path / "run"
    r = run_igkd("train", "--data", data, "--out", out, "--model", TINY, "--epochs", "1", "--batch-size", "4",
                 "--val-fraction", "0", "--threads", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert "best epoch by validation accuracy" not in card and "holds the last epoch" in card
    command = next(line for line in card.splitlines() if line.startswith("igkd evaluate"))
    argv = shlex.split(command)  # as a shell reads the line: the spec comes back whole
    assert parse_spec(argv[argv.index("--data") + 1]) == parse_spec(data)
    r = run_igkd(*argv[1:], "--weights", out / "model.safetensors", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == 8


# ---------------------------------------------------------------- 10. smaller messages and help


def test_config_command_needs_and_refuses_a_name():
    one_line_error(run_igkd("config", "show"), "needs a recipe name", "igkd config list")
    one_line_error(run_igkd("config", "list", "extra"), "takes no recipe name")


def test_methods_print_defaults_as_the_command_line_takes_them():
    r = run_igkd("methods")
    assert r.returncode == 0, r.stderr
    options = [line.split("options: ", 1)[1] for line in r.stdout.splitlines() if "    options: " in line]
    tokens = [t for line in options for item in line.split(", ") for t in shlex.split(item)]
    assert "--no-kd-standardize" in tokens and "False" not in tokens
    from igkd.cli import make_parser
    args = make_parser().parse_args(["distill", "--out", "x", *tokens])  # every printed default is accepted
    assert args.kd_standardize is False and args.dkd_standardize is False


def test_missing_class_map_is_named_as_one():
    line = one_line_error(run_igkd("evaluate", "--weights", DEMO_TEACHER, "--data", "demo", "--class-map",
                                   "nope.json"), "class map nope.json does not exist")
    assert "config list" not in line


def test_unusable_cache_dir_is_named(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("IGKD_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    one_line_error(run_igkd("precompute", "--teacher", DEMO_TEACHER, "--data", "demo"), "IGKD_CACHE_DIR",
                   "which is a file")


def test_demo_help_shows_the_ranges(capsys):
    r = run_igkd("demo", "--help")
    text = " ".join(r.stdout.split())
    assert "student epochs [1, 100000]" in text and "[1, 4096] (default: from the recipe)" in text
    one_line_error(run_igkd("demo", "--ig-steps", "5000"), "--ig-steps", "[1, 4096]")


# ---------------------------------------------------------------- 11. the README


def test_readme_states_the_ig_method_default():
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `--ig-steps`, `--ig-method`"))
    defaults = row.split(" | ")[1]
    assert f"`{PrecomputeConfig().ig_method}`" in defaults, row


@pytest.mark.parametrize("argv, sub", [(["train", "--data", "demo", "--out", "x", "--bogus"], "train"),
                                       (["experiment", "ablation", "--out", "x", "--bogus", "1"], "experiment ablation"),
                                       (["bench", "latency", "--zz"], "bench latency")])
def test_an_option_the_command_lacks_points_to_the_commands_help(argv, sub, tmp_path, monkeypatch):
    # it said '(see igkd --help)', whose help lists the commands, not their options
    monkeypatch.chdir(tmp_path)
    r = run_igkd(*argv)
    extra = " ".join(argv[argv.index(next(a for a in argv if a in ("--bogus", "--zz"))):])
    assert r.returncode == 2 and r.stderr == f"igkd: error: unrecognized arguments: {extra} (see igkd {sub} --help)\n"
    assert not (tmp_path / "x").exists()
