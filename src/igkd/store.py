"""Index-keyed, fingerprinted, resumable store of teacher outputs for a training set.

Layout of a store directory::

    manifest.json        what it is for: teacher fingerprint, dataset fingerprint, IG settings,
                         shapes, per-file sha256, completeness-delta summary
    logits.npy           float32 N x classes   teacher logits on the clean image i
    maps.npy             float16 N x H x W     IG overlay map of image i, divided by its maximum
                         (or uint8, that map x 255 rounded: --map-dtype uint8)
    map_scale.npy        float32 N             that maximum (maps.npy * scale = sum_c |IG|)
    delta.npy            float32 N             IG completeness delta of image i: sum IG - gap
                                               (NaN for saliency-type attributions)
    gap.npy              float32 N             F_y(x) - F_y(x') of image i (delta / gap = relative error)
    chunks/              resumable work in progress (removed once the store is complete)

Row i always belongs to training sample i of the dataset (its stable index), whatever
order anything was computed in. Storing maps divided by their per-image maximum loses
nothing the overlay needs (it min-max normalises ``M ** g``, which is scale-free) and
keeps float16 accurate.

A chunk is written to a temporary name and renamed, with its sha256 beside it, so a
killed run leaves only whole chunks; on resume every chunk is re-hashed and a corrupt
or truncated one is recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_path, write_json

FORMAT = "igkd-store/1"
ARRAYS = ("logits", "maps", "map_scale", "delta", "gap")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_key(identity: dict) -> str:
    """Fingerprint of what a store is for (teacher, dataset, settings)."""
    return sha256_bytes(json.dumps(identity, sort_keys=True).encode())[:20]


@dataclass
class Store:
    """An opened, complete store: arrays are memory-mapped, never read whole."""

    path: Path
    manifest: dict
    logits: np.ndarray
    maps: np.ndarray
    map_scale: np.ndarray
    delta: np.ndarray
    gap: np.ndarray

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])


def open_store(path: str | Path, identity: dict | None = None, verify: bool = False) -> Store:
    """Open a complete store; refuse one made for another teacher, dataset or settings."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{path} is not a complete igkd store (no manifest.json); run 'igkd precompute' to build it")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} has store format {manifest.get('format')!r}, expected {FORMAT}; rebuild it")
    if identity is not None:
        check_identity(path, manifest["identity"], identity)
    arrays = {}
    for name in ARRAYS:
        f = path / f"{name}.npy"
        if verify and sha256_file(f) != manifest["files"][f"{name}.npy"]:
            raise UserError(f"{f} does not match its checksum; delete {path} and run 'igkd precompute' again")
        arrays[name] = np.load(f, mmap_mode="r")
    return Store(path, manifest, **arrays)


def check_identity(path: Path, have: dict, want: dict) -> None:
    for key in ("dataset", "teacher", "settings"):
        if have.get(key) != want.get(key):
            what = {"dataset": "another dataset", "teacher": "another teacher",
                    "settings": "other IG settings"}[key]
            raise UserError(f"store {path} was computed for {what} ({key} fingerprint differs); "
                            "use another --store directory or delete this one to recompute")


class StoreWriter:
    """Builds a store chunk by chunk; resumes from whole, verified chunks."""

    def __init__(self, path: str | Path, identity: dict, num_samples: int, chunk_size: int):
        self.path = Path(path)
        self.identity = identity
        self.num_samples = num_samples
        self.chunk_size = chunk_size
        self.chunk_dir = self.path / "chunks"
        if (self.path / "manifest.json").exists():
            raise UserError(f"store {self.path} is already complete; open it instead of writing it")
        if self.path.exists() and any(self.path.iterdir()):
            plan = self.chunk_dir / "plan.json"
            if not plan.exists():
                raise UserError(f"{self.path} exists and is not an igkd store; choose an empty or new --store directory")
            old = json.loads(plan.read_text())
            if old.get("chunk_size") != chunk_size or old.get("num_samples") != num_samples:
                raise UserError(f"unfinished store {self.path} was started with another chunk size or dataset size; "
                                "delete it or use the same settings")
            check_identity(self.path, old["identity"], identity)
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.chunk_dir / "plan.json",
                   {"identity": identity, "num_samples": num_samples, "chunk_size": chunk_size})

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min(self.num_samples, (i + 1) * self.chunk_size)

    def _chunk_file(self, i: int) -> Path:
        return self.chunk_dir / f"{i:06d}.npz"

    def chunk_ok(self, i: int) -> bool:
        """True when chunk i exists, matches its recorded sha256 and has the right rows."""
        f, sha = self._chunk_file(i), self._chunk_file(i).with_suffix(".sha256")
        if not (f.exists() and sha.exists()):
            return False
        data = f.read_bytes()
        if sha256_bytes(data) != sha.read_text().strip():
            return False
        try:
            with np.load(io.BytesIO(data)) as z:
                lo, hi = self.chunk_range(i)
                return all(z[name].shape[0] == hi - lo for name in ARRAYS)
        except Exception:  # noqa: BLE001 - unreadable means recompute
            return False

    def pending(self, chunks: list[int] | None = None) -> list[int]:
        """Chunks (of ``chunks``, default all) that still need computing; bad ones are removed."""
        todo = []
        for i in chunks if chunks is not None else range(self.num_chunks):
            if not self.chunk_ok(i):
                self._chunk_file(i).unlink(missing_ok=True)
                self._chunk_file(i).with_suffix(".sha256").unlink(missing_ok=True)
                todo.append(i)
        return todo

    def write_chunk(self, i: int, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
        data = buf.getvalue()
        with atomic_path(self._chunk_file(i).with_suffix(".sha256")) as tmp:
            tmp.write_text(sha256_bytes(data) + "\n")
        with atomic_path(self._chunk_file(i)) as tmp:
            tmp.write_bytes(data)

    def finalize(self, extra: dict | None = None) -> Store:
        """Assemble verified chunks into the final arrays and write the manifest last."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: {len(missing)} chunk(s) missing, e.g. {missing[0]}")
        first = np.load(self._chunk_file(0))
        outs = {}
        for name in ARRAYS:
            shape = (self.num_samples,) + first[name].shape[1:]
            with atomic_path(self.path / f"{name}.npy") as tmp:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=first[name].dtype, shape=shape)
                for i in range(self.num_chunks):
                    lo, hi = self.chunk_range(i)
                    with np.load(self._chunk_file(i)) as z:
                        arr[lo:hi] = z[name]
                arr.flush()
                del arr
            outs[name] = sha256_file(self.path / f"{name}.npy")
        delta = np.load(self.path / "delta.npy", mmap_mode="r")
        gap = np.load(self.path / "gap.npy", mmap_mode="r")
        manifest = {
            "format": FORMAT,
            "identity": self.identity,
            "num_samples": self.num_samples,
            "files": {f"{k}.npy": v for k, v in outs.items()},
            "completeness_delta": summarize_delta(np.asarray(delta, dtype=np.float64), np.asarray(gap, np.float64)),
            **(extra or {}),
        }
        write_json(self.path / "manifest.json", manifest)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return open_store(self.path)


def summarize_delta(delta: np.ndarray, gap: np.ndarray) -> dict | None:
    """Completeness error in logit units, and relative to |F_y(x) - F_y(x')|."""
    if not np.isfinite(delta).any():  # attributions without a completeness property (saliency...)
        return None
    a = np.abs(delta)
    rel = a / np.maximum(np.abs(gap), 1e-12)
    return {"mean_abs": float(a.mean()), "median_abs": float(np.median(a)), "p99_abs": float(np.quantile(a, 0.99)),
            "max_abs": float(a.max()), "median_relative": float(np.median(rel)),
            "p90_relative": float(np.quantile(rel, 0.9))}
