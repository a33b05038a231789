"""scripts/gpu_check.sh, the one prepared GPU run of issue 15, proven where there is no GPU.

A GPU machine is lent for minutes at a time, so the script must work the first time it meets
one: these run it for real on the CPU, refusing without a GPU, refusing a stage it does not
know, and rehearsing its test stage (GPU_CHECK_DEVICE=cpu), whose summary and archive are
what comes back from the GPU machine.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_check(tmp_path, **env):
    """The script as a user runs it, with this interpreter (its torch, its packages)."""
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="there is a GPU here: the refusal is for machines without one")
def test_refuses_without_a_gpu(tmp_path):
    r = run_check(tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines == ["gpu_check: no CUDA GPU (torch.cuda.is_available() is False); run it where there is one, "
                     "or GPU_CHECK_DEVICE=cpu for a rehearsal of the script on the CPU"], r.stderr
    assert not (tmp_path / "out" / "summary.md").exists()


@pytest.mark.parametrize("env, wrong", [({"GPU_CHECK_STAGES": "gpu_tests,benchmarks"}, "names no stage 'benchmarks'"),
                                        ({"GPU_CHECK_DEVICE": "mps"}, "must be cuda or cpu, not 'mps'")])
def test_refuses_bad_settings(tmp_path, env, wrong):
    r = run_check(tmp_path, **env)
    assert r.returncode == 2 and wrong in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_rehearsal_of_the_test_stage(tmp_path):
    """The gpu tests stage end to end on the CPU: every gpu test is collected and skips with its
    reason, the summary lists each one, the archive holds the summary and the JUnit XML, and
    stages not asked for leave no line."""
    r = run_check(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES="gpu_tests", GPU_CHECK_SECONDS="300")
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    assert "device: REHEARSAL on the CPU" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert len(rows) == 1 and rows[0].startswith("| gpu_tests | passed |"), summary
    import test_gpu  # the module the stage ran: one summary line per gpu test in it
    names = [n for n in dir(test_gpu) if n.startswith("test_")
             and any(m.name == "gpu" for m in getattr(getattr(test_gpu, n), "pytestmark", []))]
    assert names
    listed = [line for line in summary.splitlines() if line.startswith("- ")]
    assert len(listed) >= len(names), summary
    for line in listed:
        assert ": skipped (" in line and "needs a CUDA GPU" in line, line
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        members = {Path(m).name for m in tar.getnames()}
    assert {"summary.md", "gpu_tests.xml", "gpu_tests.log", "device.txt"} <= members, members


def test_stages_are_named_with_or_without_spaces(tmp_path):
    """GPU_CHECK_STAGES='gpu_tests, train_throughput' asks for both stages (here each is skipped
    at once: 40 s leave no stage its 30 s)."""
    r = run_check(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STAGES=" gpu_tests,  train_throughput ",
                  GPU_CHECK_SECONDS="40")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split(" | ")[0] for line in (tmp_path / "out" / "summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]
    assert rows == ["| gpu_tests", "| train_throughput"], rows


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_help_and_a_stray_argument(script, tmp_path):
    path = REPO / "scripts" / script
    h = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert h.returncode == 0 and "IGKD_SHARED" in h.stdout and not h.stdout.startswith("#"), h.stdout
    if script == "gpu_check.sh":
        assert all(k in h.stdout for k in ("GPU_CHECK_SECONDS", "GPU_CHECK_STAGES", "GPU_CHECK_DEVICE"))
    r = subprocess.run(["bash", str(path), "--stages"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == (f"{script}: takes no arguments, only environment settings, "
                                                     "got '--stages' (--help lists them)"), r.stderr
    assert not (REPO / ".gpu-carry.partial").exists()
