"""Session 22c review fixes: a logits-only method reuses a store of other map settings (A),
shipped recipes run from any folder (B), a broken plug-in spoils only what needs it (C),
override typos are one line (D), 'igkd methods' (E)."""

import dataclasses
import json

import pytest

import igkd
from igkd.config import PrecomputeConfig
from igkd.errors import UserError
from igkd.precompute import precompute
from igkd.store import StoreWriter

from test_store import tiny_dataset, tiny_teacher

CFG = PrecomputeConfig(ig_steps=4, chunk_size=10, check_images=0)


# ---------------------------------------------------------------- A: logits-only store reuse

def _distill(tmp_path, name, method, teacher, **over):
    cfg = igkd.DistillConfig(method=method, store=tmp_path / "store", model="mobilenetv2:width=0.25,drop=12",
                             epochs=1, batch_size=8, val_fraction=0.25, threads=1, ig_steps=2, check_images=0,
                             **over)
    return igkd.distill(cfg, tmp_path / name, teacher=teacher, data=tiny_dataset(), quiet=True)


def test_logits_only_method_reads_a_store_of_other_map_settings(tmp_path):
    teacher = tiny_teacher()
    built = precompute(teacher, tiny_dataset(), CFG, tmp_path / "store", quiet=True)  # 4 IG steps
    before = (tmp_path / "store" / "manifest.json").read_text()
    # kd reads the logits alone, which no map setting changes: the 2-step store options do not matter
    summary = _distill(tmp_path, "kd", "kd", teacher)
    assert summary["logits"] == "precomputed" and "maps" not in summary
    assert (tmp_path / "store" / "manifest.json").read_text() == before  # used as it is, not recomputed
    assert json.loads(before)["identity"]["settings"] == built.manifest["identity"]["settings"]
    # a method reading the maps is still held to them
    with pytest.raises(UserError, match="other map settings .*ig_steps 4 there, 2 now"):
        _distill(tmp_path, "ig", "kd+ig", teacher)
    # and the logits still belong to one teacher and one set of images
    with pytest.raises(UserError, match="another teacher"):
        _distill(tmp_path, "other", "kd", tiny_teacher(seed=1))
    # the public precompute (what an experiment of logits-only methods calls) takes maps= too
    other = dataclasses.replace(CFG, ig_steps=2)
    assert igkd.precompute(teacher, tiny_dataset(), other, tmp_path / "store", quiet=True, maps=False).path \
        == tmp_path / "store"
    with pytest.raises(UserError, match="other map settings"):
        igkd.precompute(teacher, tiny_dataset(), other, tmp_path / "store", quiet=True)


def test_logits_only_precompute_keeps_the_store_strict_where_it_computes(tmp_path):
    data, teacher = tiny_dataset(), tiny_teacher()
    other = dataclasses.replace(CFG, ig_steps=2)
    # a fresh store for a logits-only reader is a normal store of the settings given
    fresh = precompute(teacher, data, other, tmp_path / "fresh", quiet=True, maps=False)
    assert fresh.manifest["identity"]["settings"]["ig_steps"] == 2 and fresh.maps.shape == (24, 12, 12)
    assert precompute(teacher, data, other, tmp_path / "fresh", quiet=True).manifest == fresh.manifest
    # an unfinished store would be finished with these settings: chunks of two settings must not mix
    StoreWriter(tmp_path / "part", {**fresh.manifest["identity"],
                                    "settings": {**fresh.manifest["identity"]["settings"], "ig_steps": 9}},
                len(data.train), CFG.chunk_size)
    with pytest.raises(UserError, match="other map settings"):
        precompute(teacher, data, other, tmp_path / "part", quiet=True, maps=False)
    with pytest.raises(UserError, match="another dataset"):
        precompute(teacher, tiny_dataset(seed=5), CFG, tmp_path / "fresh", quiet=True, maps=False)


# ---------------------------------------------------------------- B: shipped recipes from any folder

def test_shipped_recipe_names_its_shipped_teacher_from_any_folder(tmp_path, monkeypatch):
    from pathlib import Path

    from igkd.experiments import resolve
    from helpers_cli import run_igkd
    teacher = Path(igkd.__file__).parent / "assets" / "demo_teacher.safetensors"
    monkeypatch.chdir(tmp_path)  # not the repository root: src/igkd/assets/... is not here
    assert Path(resolve("ablation", "demo_experiments").teacher) == teacher.resolve()
    # what 'igkd config show' prints runs as it is, copied anywhere
    shown = run_igkd("config", "show", "demo_experiments")
    assert shown.returncode == 0 and "assets/demo_teacher.safetensors" in shown.stdout
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "copy.yaml").write_text(shown.stdout)
    monkeypatch.chdir(tmp_path / "sub")
    assert Path(resolve("ablation", "copy.yaml").teacher) == teacher.resolve()
    # a user's own relative path keeps its meaning: relative to the current folder
    (tmp_path / "sub" / "mine.yaml").write_text("distill:\n  data: demo\n  teacher: assets/demo_teacher.safetensors\n")
    assert resolve("ablation", "mine.yaml").teacher == "assets/demo_teacher.safetensors"
    # the README's command gets past its teacher (then stops at the data given here, before any work)
    r = run_igkd("experiment", "ablation", "--config", "demo_experiments", "--out", tmp_path / "exp", "--methods",
                 "kd", "--data", "imagefolder:nowhere")
    assert r.returncode == 2 and "teacher checkpoint" not in r.stderr and "nowhere does not exist" in r.stderr


# ---------------------------------------------------------------- C: a broken plug-in

BROKEN = '''import nosuch_module_for_igkd_tests
PARTS = []
FAMILY = None
'''

SCRIPT = r'''
import contextlib, io, json, sys
from igkd.cli import main
out = []
for argv in sys.argv[1:]:
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        try:
            main(json.loads(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
    out.append([code, err.getvalue(), std.getvalue()])
print(json.dumps(out))
'''


def test_a_broken_plugin_is_a_warning_until_something_asks_for_it(tmp_path):
    import subprocess
    import sys

    from helpers_cli import installed_plugin
    env = installed_plugin(tmp_path, "broken_plug", BROKEN,
                           "[igkd.parts]\nmine = broken_plug:PARTS\n[igkd.models]\nbrokenfam = broken_plug:FAMILY\n")
    out = tmp_path / "run"
    commands = [["--help"], ["methods"], ["config", "list"],
                ["distill", "--method", "kd", "--data", "demo", "--out", str(out), "--epochs", "0"],
                ["distill", "--method", "kd+mine", "--data", "demo", "--out", str(out)],
                ["distill", "--method", "kd+coslogit", "--data", "demo", "--out", str(out)],
                ["train", "--model", "brokenfam", "--data", "demo", "--out", str(out)]]
    r = subprocess.run([sys.executable, "-c", SCRIPT, *map(json.dumps, commands)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    (help_, methods, listed, kd, mine, unknown, model) = json.loads(r.stdout)
    why = ("(ModuleNotFoundError: No module named 'nosuch_module_for_igkd_tests', at "
           f"{tmp_path / 'plugin' / 'broken_plug.py'} line 1); fix or uninstall broken-plug")
    # --help: one warning naming the distribution and the failing line, and the help
    assert help_[0] == 0 and "usage: igkd" in help_[2]
    assert help_[1] == ("igkd: warning: cannot load method part 'mine' from entry point broken_plug:PARTS of "
                        f"broken-plug 0.1 {why}; igkd goes on without it\n")
    # commands that do not need it run (the warning was given once, for the process)
    assert methods[0] == 0 and "kd: " in methods[2] and listed[0] == 0 and "demo_experiments" in listed[2]
    assert kd[0] == 2 and kd[1] == "igkd: error: --epochs 0 is out of range; use a value in [1, 100000]\n"
    # what asks for it fails with why it did not load
    assert mine[0] == 2 and mine[1] == ("igkd: error: cannot load method part 'mine' from entry point "
                                        f"broken_plug:PARTS of broken-plug 0.1 {why}\n")
    assert unknown[0] == 2 and unknown[1].count("\n") == 1 and "unknown method part 'coslogit'" in unknown[1]
    assert unknown[1].endswith(f"cannot load method part 'mine' from entry point broken_plug:PARTS of broken-plug 0.1 "
                               f"{why}\n")
    assert model[0] == 2 and model[1].splitlines()[-1] == (
        "igkd: error: cannot load model family 'brokenfam' from entry point broken_plug:FAMILY of broken-plug 0.1 "
        f"{why}")
    assert not out.exists()


# ---------------------------------------------------------------- D: override typos

def test_an_unknown_override_is_one_line_with_the_near_miss():
    from igkd.command_options import AuditConfig
    from igkd.config import build
    from igkd.experiments import resolve
    with pytest.raises(UserError, match=r"unknown option 'alpah' in the overrides \(did you mean 'alpha'\?\); known"):
        resolve("ablation", "demo_experiments", {"alpah": 3})
    with pytest.raises(UserError, match=r"unknown option 'coslogit_wieght' in the overrides; known options: T, "):
        resolve("ablation", "demo_experiments", {"coslogit_wieght": 3})
    with pytest.raises(UserError, match=r"unknown option 'epoch' in the overrides \(did you mean 'epochs'\?\)"):
        build(igkd.DistillConfig, None, {"epoch": None})  # unknown, whatever its value
    # an old name is taken with its warning, as in a YAML file
    assert build(AuditConfig, None, {"teacher": "t", "data": "demo", "steps": 7}).ig_steps == 7


# ---------------------------------------------------------------- E: igkd methods

def test_methods_say_needs_reference_and_the_package_of_a_plugin_part(tmp_path):
    import subprocess
    import sys

    from helpers_cli import installed_plugin
    code = ("from igkd.distill.parts import Part\n"
            "class A(Part):\n    name = 'plug-a'\n    help = 'first'\n    formula = 'x'\n    needs_teacher = True\n"
            "    needs_logits = True\n"
            "class B(Part):\n    name = 'plug-b'\n    help = 'second'\n    formula = 'y'\n    aligned_maps = True\n"
            "PARTS = [A(), B()]\n")
    env = installed_plugin(tmp_path, "two_parts", code, "[igkd.parts]\nboth = two_parts:PARTS\n")
    text, as_json = (subprocess.run([sys.executable, "-m", "igkd", "methods", *extra], capture_output=True,
                                    text=True, env=env, timeout=120) for extra in ([], ["--json"]))
    assert text.returncode == 0 and text.stderr == "", text.stderr
    body = text.stdout.split("\n\nA method joins")[0]
    blocks = {b.split(":", 1)[0]: b for b in body.replace("\n    ", "\t").splitlines()}  # one line per part
    assert blocks["plug-a"] == ("plug-a: first\tloss/batch: x\tneeds: teacher, logits\tpackage: two-parts 0.1 "
                                "(entry point both, class two_parts.A)")
    assert "needs: maps\tpackage: two-parts 0.1 (entry point both, class two_parts.B)" in blocks["plug-b"]
    assert "from:" not in text.stdout and "reference: Hinton" in blocks["kd"] and "needs: teacher, logits" in blocks["kd"]
    assert "needs: teacher, maps" in blocks["ig"]
    rows = {r["part"]: r for r in json.loads(as_json.stdout)}
    assert rows["plug-a"]["package"] == {"package": "two-parts 0.1", "entry_point": "both", "class": "two_parts.A"}
    assert rows["kd"]["package"] is None and rows["plug-b"]["needs"] == ["maps"]
