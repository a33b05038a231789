"""`igkd demo` end to end, as a user runs it: a real process, the shipped dataset and teacher."""

import json
import subprocess
import sys

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(out)], capture_output=True,
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
        assert "seed: 0" in cfg and "epochs: 10" in cfg
    assert (demo_dir / "store" / "manifest.json").exists()


def test_demo_rerun_reuses_finished_work(demo_dir):
    before = json.loads((demo_dir / "metrics.json").read_text())
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(demo_dir)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing store" in r.stderr and "already trained" in r.stderr
    after = json.loads((demo_dir / "metrics.json").read_text())
    assert after["students"] == before["students"]


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "igkd.cli", "demo", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "not an igkd demo directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
