"""One options dataclass per command (issue 17, items 2 and 7): evaluate, bench latency,
export and audit take their options, --help, YAML sections and API defaults from
igkd.command_options; unified names with deprecated aliases; --data required on the
command line; missing weights files named. CLI behaviour through real `python -m igkd`
processes."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import igkd
from helpers_cli import run_igkd
from igkd.command_options import AuditConfig, EvaluateConfig, ExportConfig, LatencyConfig, api_config

DEMO_TEACHER = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
TINY = "mobilenetv2:width=0.25,drop=14"
FAST_BENCH = ["--warmup", "0", "--min-time", "0", "--min-reps", "2", "--input", "1x8x8", "--quiet"]


def igkd_cli(*args, cwd=None, process=False):
    return run_igkd(*args, cwd=cwd, process=process)


def stderr_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


def one_line_error(r, *words) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = stderr_lines(r)
    assert len(lines) == 1 and lines[0].startswith("igkd: error: "), r.stderr
    assert all(w in lines[0] for w in words), (words, lines[0])
    return lines[0]


# ---------------------------------------------------------------- --help


@pytest.mark.parametrize("argv,choices,defaults", [
    (["evaluate"], ["{auto,none,dataset,imagenet}"], ["(default: 128)", "(default: 0)"]),
    (["bench", "latency"], [], ["(default: 1)", "(default: eager)", "(default: 3x32x32)", "(default: 10000)"]),
    (["export"], ["{auto,onnx,torchscript}", "{auto,none,dataset,imagenet}"], ["(default: auto)", "(default: 0.001)",
                                                                 "(default: 99.9)", "(default: 256)"]),
    (["audit"], ["{label,predicted}", "{black,zero,blur}", "{ig,saliency"], ["(default: 32)", "(default: black)",
                                                                            "(default: 64)", "(default: 8)"]),
    (["train"], ["{sgd,adam}"], ["(default: 30)"]),
    (["distill"], ["{precomputed,online}"], ["(default: kd+ig)", "(default: 2.5)"]),
])
def test_every_command_help_shows_choices_defaults_and_hides_old_names(capsys, argv, choices, defaults):
    from igkd.cli import main
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help lines wrap at the terminal's width
    assert e.value.code == 0
    for text in choices + defaults:
        assert text in out, text
    for old in ("--steps ", "--baseline ", "--batch ", "--out FILE"):
        assert old not in out, old  # deprecated aliases work but are not advertised
    assert "(required)" in out or argv == ["bench", "latency"]


def test_distill_and_train_help_list_data_teacher_model_method_first(capsys):
    from igkd.cli import main
    for cmd, first in (("distill", ["--data", "--teacher", "--model", "--method"]), ("train", ["--data", "--model"])):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = capsys.readouterr().out
        body = out[out.index("\nmain options:"):]
        assert body.index("main options:") < body.index("\noptions:")  # the group comes before all others
        main_group = body[:body.index("\noptions:")]
        flags = [line.split()[0] for line in main_group.splitlines()[1:] if line.startswith("  --")]
        assert flags == first, flags
        assert "--data SPEC" in main_group and "(required)" in main_group


def test_help_needs_no_torch():
    code = "import sys, igkd.cli; igkd.cli.make_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["False"], r.stderr


# ---------------------------------------------------------------- --data required, missing files


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{tmp}/r"],
    ["distill", "--teacher", DEMO_TEACHER, "--out", "{tmp}/r"],
    ["evaluate", "--weights", DEMO_TEACHER],
    ["audit", "--teacher", DEMO_TEACHER, "--student", DEMO_TEACHER],
])
def test_data_is_required_in_one_line(capsys, tmp_path, argv):
    from igkd.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a).format(tmp=tmp_path) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("igkd: error: --data is required") and "--config" in lines[0], lines[0]
    assert not (tmp_path / "r").exists()


def test_data_required_as_a_process_and_precompute_too(tmp_path):
    one_line_error(igkd_cli("train", "--out", tmp_path / "r", "--epochs", 1, process=True), "--data is required")
    one_line_error(igkd_cli("precompute", "--teacher", DEMO_TEACHER), "--data")
    # data from the YAML section is enough (here it fails later, on the bad value, not as missing)
    (tmp_path / "c.yaml").write_text("train:\n  data: mnist9\n")
    one_line_error(igkd_cli("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "r"), "unknown dataset")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [
    ["evaluate", "--weights", "{tmp}/missing.pt", "--data", "demo"],
    ["export", "--weights", "{tmp}/missing.pt", "--data", "demo", "--output", "{tmp}/m.onnx"],
    ["audit", "--teacher", "{tmp}/missing.pt", "--student", DEMO_TEACHER, "--data", "demo"],
    ["audit", "--teacher", DEMO_TEACHER, "--student", "{tmp}/missing.pt", "--data", "demo"],
    ["bench", "latency", "--weights", "{tmp}/missing.pt"],
])
def test_missing_weights_file_is_named(capsys, tmp_path, argv):
    from igkd.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a).format(tmp=tmp_path) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert f"{tmp_path}/missing.pt does not exist" in lines[0], lines[0]
    assert not list(tmp_path.glob("m.*"))


def test_missing_evaluate_weights_as_a_process(tmp_path):
    one_line_error(igkd_cli("evaluate", "--weights", tmp_path / "missing.pt", "--data", "demo", process=True),
                   "missing.pt does not exist")


# ---------------------------------------------------------------- unified names and deprecated aliases


def test_unified_names_work_without_warning(tmp_path):
    r = igkd_cli("bench", "latency", "--model", TINY, "--batch-size", "1,2", "--threads", 1, "--classes", 3,
                 *FAST_BENCH, "--json")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    rows = json.loads(r.stdout)["rows"]
    assert sorted(row["batch"] for row in rows) == [1, 2]
    r = igkd_cli("export", "--weights", DEMO_TEACHER, "--format", "torchscript", "--images", 20,
                 "--output", tmp_path / "t.pt", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr and json.loads(r.stdout)["out"] == str(tmp_path / "t.pt")
    assert (tmp_path / "t.pt").is_file() and (tmp_path / "t.pt.json").is_file()


def test_deprecated_aliases_work_and_warn_once(tmp_path):
    r = igkd_cli("bench", "latency", "--model", TINY, "--batch", "2", *FAST_BENCH, "--json")
    assert r.returncode == 0, r.stderr
    assert stderr_lines(r) == ["igkd: warning: --batch is deprecated; use --batch-size"], r.stderr
    assert [row["batch"] for row in json.loads(r.stdout)["rows"]] == [2]

    r = igkd_cli("export", "--weights", DEMO_TEACHER, "--format", "torchscript", "--images", 20,
                 "--out", tmp_path / "t.pt", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert stderr_lines(r) == ["igkd: warning: --out is deprecated; use --output"], r.stderr
    assert (tmp_path / "t.pt").is_file()

    r = igkd_cli("audit", "--teacher", DEMO_TEACHER, "--student", DEMO_TEACHER, "--data", "demo", "--images", 2,
                 "--steps", 3, "--baseline", "zero", "--gallery", 0, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert stderr_lines(r) == ["igkd: warning: --steps is deprecated; use --ig-steps",
                               "igkd: warning: --baseline is deprecated; use --ig-baseline"], r.stderr
    ig = json.loads(r.stdout)["ig"]
    assert ig["steps"] == 3 and ig["baseline"] == "zero"


def test_deprecated_alias_values_are_checked_as_the_new_option(capsys):
    from igkd.cli import main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["audit", "--teacher", str(DEMO_TEACHER), "--student", str(DEMO_TEACHER), "--data", "demo",
              "--steps", "0"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2
    assert lines == ["igkd: warning: --steps is deprecated; use --ig-steps",
                     "igkd: error: --ig-steps 0 is out of range; use a value in [1, 4096]"], lines


# ---------------------------------------------------------------- YAML sections


def test_yaml_sections_of_the_new_commands(tmp_path):
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(f"""\
evaluate:
  weights: {DEMO_TEACHER}
  data: demo
  batch_size: 500
bench:
  model: [{TINY}]
  batch: 3          # the old name: accepted with a warning
  warmup: 0
  min_time: 0
  min_reps: 2
  input: 1x8x8
export:
  weights: {DEMO_TEACHER}
  format: torchscript
  images: 20
audit:
  teacher: {DEMO_TEACHER}
  student: [{DEMO_TEACHER}, {DEMO_TEACHER}]
  data: demo
  images: 2
  ig_steps: 2
  gallery: 0
""")
    r = igkd_cli("evaluate", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == 1000
    r = igkd_cli("bench", "latency", "--config", cfg, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert stderr_lines(r) == [f"igkd: warning: 'batch' in {cfg} is deprecated; use 'batch_size'"], r.stderr
    assert [row["batch"] for row in json.loads(r.stdout)["rows"]] == [3]
    r = igkd_cli("export", "--config", cfg, "--output", tmp_path / "t.pt", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parity"]["images"] == 20
    r = igkd_cli("audit", "--config", cfg, "--ig-steps", 3, "--json", "--quiet")  # the option overrides the file
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["students"]) == 2 and out["ig"]["steps"] == 3 and out["images"] == 2
    (tmp_path / "bad.yaml").write_text("audit:\n  colour: blue\n")
    one_line_error(igkd_cli("audit", "--config", tmp_path / "bad.yaml"), "unknown option 'colour'")
    (tmp_path / "five.yaml").write_text("export: 5\n")
    one_line_error(igkd_cli("export", "--config", tmp_path / "five.yaml", "--output", tmp_path / "x.onnx"),
                   "section 'export:'", "not a mapping")


# ---------------------------------------------------------------- the API


def test_api_defaults_are_the_dataclasses():
    assert LatencyConfig().threads == 1 and EvaluateConfig().threads == 0 and AuditConfig().threads == 0
    assert ExportConfig().atol == 1e-3 and AuditConfig().ig_steps == 32
    cfg = api_config(AuditConfig, None, {"teacher": Path("t.pt"), "student": ["a.pt", Path("b.pt")],
                                         "images": None}, "audit")
    assert cfg.teacher == "t.pt" and cfg.student == "a.pt,b.pt" and cfg.images == 64
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        api_config(AuditConfig, None, {"colour": "blue"}, "audit")
    with pytest.raises(igkd.UserError, match=r"--ig-steps 0 is out of range"):
        api_config(AuditConfig, None, {"ig_steps": 0}, "audit")


def test_api_old_keywords_warn_and_still_work():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = api_config(AuditConfig, None, {"steps": 4, "baseline": "zero", "students": "a.pt",
                                             "gallery_images": 0}, "audit")
        bench = api_config(LatencyConfig, None, {"batches": [1, 32], "runtimes": ["eager"], "input_shape": "1x8x8",
                                                 "num_classes": 3, "models": TINY}, "bench_latency")
    assert (cfg.ig_steps, cfg.ig_baseline, cfg.student, cfg.gallery) == (4, "zero", "a.pt", 0)
    assert (bench.batch_size, bench.runtime, bench.input, bench.classes, bench.model) == ("1,32", "eager", "1x8x8",
                                                                                        3, TINY)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert "audit(steps=...) is deprecated; use ig_steps=..." in messages and len(messages) == 9


def test_api_function_with_old_keyword_and_config(tmp_path):
    with pytest.warns(DeprecationWarning, match=r"audit\(steps=...\)"):
        r = igkd.audit(DEMO_TEACHER, DEMO_TEACHER, "demo", images=2, steps=2, gallery_images=0, quiet=True)
    assert r["ig"]["steps"] == 2 and r["images"] == 2
    r = igkd.audit(config=AuditConfig(teacher=str(DEMO_TEACHER), student=str(DEMO_TEACHER), data="demo", images=2,
                                      ig_steps=2, gallery=0), quiet=True)
    assert r["ig"]["steps"] == 2
    with pytest.raises(igkd.UserError, match="does not exist"):
        igkd.evaluate(tmp_path / "missing.pt", "demo")


def test_precompute_options_come_from_one_config():
    from dataclasses import fields
    from igkd.command_options import PrecomputeCommandConfig
    from igkd.config import PrecomputeConfig
    cfg = PrecomputeCommandConfig(teacher="t.safetensors", data="demo", ig_steps=7, threads=2)
    settings = cfg.settings()  # the store's identity is made of the settings alone
    assert type(settings) is PrecomputeConfig and settings.ig_steps == 7
    assert {f.name for f in fields(PrecomputeCommandConfig)} - {f.name for f in fields(PrecomputeConfig)} == {
        "teacher", "teacher_model", "teacher_normalize", "data", "store", "device", "threads"}
