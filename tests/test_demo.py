"""`igkd demo` end to end, as a user runs it: a real process, the shipped dataset and teacher."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from igkd.cli import main

pytestmark = pytest.mark.slow


# a shorter budget than the recipe's (10 epochs, 10 IG steps), through the options a user has:
# the same steps and files in about half the time; 4 epochs still take both students
# well above chance (about 70-80%)
EPOCHS, IG_STEPS = 4, 2
BUDGET = ["--epochs", str(EPOCHS), "--ig-steps", str(IG_STEPS)]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(out), *BUDGET], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "demo done" in r.stdout
    return out


def test_demo_writes_report_metrics_and_gallery(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert set(metrics["students"]) == {"student", "kd+ig"}
    assert metrics["teacher"]["params"] == 590_122 and metrics["teacher"]["test_accuracy"] > 80
    for s in metrics["students"].values():
        assert s["params"] == 151_594 and 50 < s["test_accuracy"] <= 100
    report = (demo_dir / "report.md").read_text()
    for row in ("| teacher |", "| student |", "| kd+ig |", "gallery.png", "curves.png"):
        assert row in report
    for name, min_width in (("gallery.png", 1000), ("curves.png", 600), ("accuracy.png", 200)):
        with Image.open(demo_dir / name) as im:
            im.verify()
        with Image.open(demo_dir / name) as im:
            assert im.format == "PNG" and im.size[0] >= min_width
    # both students trained with the same seed and budget on the same store
    for m in ("student", "kd+ig"):
        cfg = (demo_dir / "runs" / m / "config.yaml").read_text()
        assert "seed: 0" in cfg and f"epochs: {EPOCHS}" in cfg and f"ig_steps: {IG_STEPS}" in cfg
    assert (demo_dir / "store" / "manifest.json").exists()
    assert metrics["ig"]["steps"] == IG_STEPS and f"trained {EPOCHS} epochs" in report
    assert f"({metrics['ig']['method']}, {IG_STEPS} steps" in report


def test_demo_rerun_reuses_finished_work(demo_dir, capsys):
    before = json.loads((demo_dir / "metrics.json").read_text())
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(demo_dir), *BUDGET],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing store" in r.stderr and "already trained" in r.stderr
    after = json.loads((demo_dir / "metrics.json").read_text())
    assert after["students"] == before["students"]
    # another budget would be reported as the old one's: refused in one line, nothing changed
    for other, words in ((["--epochs", str(EPOCHS + 1), "--ig-steps", str(IG_STEPS)], f"--epochs {EPOCHS}"),
                         (["--ig-steps", str(IG_STEPS + 1), "--epochs", str(EPOCHS)], f"--ig-steps {IG_STEPS}"),
                         ([], f"--epochs {EPOCHS}, --ig-steps {IG_STEPS}")):
        with pytest.raises(SystemExit) as e:  # in this process: the check comes before any work
            main(["demo", "--out", str(demo_dir), *other])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert e.value.code == 2 and len(lines) == 1 and words in lines[0] and "another --out" in lines[0], lines
    assert json.loads((demo_dir / "metrics.json").read_text()) == after


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "not an igkd demo directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
