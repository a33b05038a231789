import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from igkd.data import load_dataset
from igkd.models import Normalized, build_model, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_TEACHER = "mobilenetv2:width=0.25,drop=12"


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    # the igkd command tunes glibc's malloc (igkd.runtime.tune_malloc); tests that call the API in
    # this process run as the command does (1.6-2x faster CPU inference, e.g. test_published)
    from igkd.runtime import tune_malloc
    tune_malloc()


@pytest.fixture(autouse=True)
def _restore_threads():
    """API calls with threads=N set torch's process-wide thread count; a test must not leave it
    changed for the next (the fast IG path's float rounding at one thread failed a later test)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Stores go to a per-session cache, never the user's; decoded datasets are shared."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("IGKD_CACHE_DIR", str(root / "igkd-cache"))


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"needs {path} (the project's shared data, absent in a plain clone; CI provides it)"
        if os.environ.get("IGKD_REQUIRE_SHARED"):
            pytest.fail(reason + "; IGKD_REQUIRE_SHARED is set, so it is mandatory here")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def small_real(tmp_path_factory):
    """512 train / 200 test demo images as PNG folders, and a tiny teacher checkpoint."""
    root = tmp_path_factory.mktemp("demo-folder")
    demo = load_dataset("demo")
    for split, n in (("train", 512), ("test", 200)):
        data = getattr(demo, split)
        for i in range(n):
            folder = root / "data" / split / f"class{int(data.labels[i]):02d}"  # demo names hold '/'
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{i:04d}.png")
    torch.manual_seed(0)
    teacher = Normalized(build_model(TINY_TEACHER, 10, 1), [0.3], [0.3])
    save_checkpoint(root / "teacher", teacher, {"model": TINY_TEACHER, "num_classes": 10, "in_channels": 1,
                                                "classes": [f"class{i:02d}" for i in range(10)], "preprocessing": {
                                                    "normalize": "dataset", "mean": [0.3], "std": [0.3]}})
    return root


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plotting function makes, drawn and kept instead of written."""
    made = []

    def keep(fig, path):
        fig.canvas.draw()
        made.append(fig)
        return Path(path)
    from igkd import report
    from igkd.experiments import compression, montecarlo, search
    for module in (report, montecarlo, compression, search):
        monkeypatch.setattr(module, "_save", keep)
    yield made
    import matplotlib.pyplot as plt
    for fig in made:
        plt.close(fig)
