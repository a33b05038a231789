import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True, scope="session")
def _cpu_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


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
