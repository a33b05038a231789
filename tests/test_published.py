"""The paper's three published students, evaluated as a new user would: on the JPEG
CIFAR-10 test split, raw [0, 1] inputs (--normalize none). The counts are the ones in
the README; evaluation is deterministic (same JPEG decoder, same float32 CPU kernels),
so they must come out exactly."""

import json
import subprocess
import sys

import pytest

from conftest import shared_or_skip
from helpers_data import cifar10_jpg_dir

# correct answers out of 10,000 (README, "The paper's published checkpoints")
EXPECTED = {
    "CIFAR10_KD_IG_T2.5_alpha0.01_p0.1_gamma0_TestAcc92.28.pt": 8495,
    "CIFAR10_KD_T2.5_alpha0.01_p0_gamma0_TestAcc92.29.pt": 8121,
    "CIFAR10-Train80Rand_Student_TestAcc90.73.pt": 8002,
}


@pytest.fixture(scope="module")
def jpg_dir():
    shared_or_skip("data", "cifar10-jpg.tar.gz")
    return cifar10_jpg_dir()


# scored through the command line (--json), as a user runs it: in a fresh process each 10,000-image
# evaluation took 31 s on 2 cores, in the long-lived pytest process 50 s (API, CI dry run). The
# decoded test images come from the session's cache (conftest), which test_data's real-JPEG test
# and test_deploy's parity test fill: the JPEGs are decoded once per session, not once per test
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_published_checkpoint_accuracy_on_jpeg_cifar10(name, jpg_dir):
    path = shared_or_skip("checkpoints", "nordlinglab", name)
    out = subprocess.run([sys.executable, "-m", "igkd.cli", "evaluate", "--model", "mobilenetv2:drop=5",
                          "--weights", str(path), "--data", f"imagefolder:{jpg_dir}", "--normalize", "none",
                          "--teacher", "mobilenetv2", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["preprocessing"] == {"normalize": "none"}
    assert r["total"] == 10000 and r["params"] == 543_498 and round(r["compression"], 2) == 4.12
    assert r["correct"] == EXPECTED[name], r["accuracy"]
    assert len(r["confusion"]) == 10 and sum(map(sum, r["confusion"])) == 10000
    assert set(r["per_class"]) == {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                   "ship", "truck"}
