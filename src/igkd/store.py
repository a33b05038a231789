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

Finalisation streams the chunks into each array with ordinary writes (no memory map:
a full disk is an ENOSPC error naming the file, not a SIGBUS), fsyncs it, renames it
into place, fsyncs the directory, and writes manifest.json last: a store is complete
exactly when its manifest exists.

Verification on open (``verify``: always | auto | never, ``--verify-store``):

* always, whatever the mode: manifest.json is valid and of this format, and every array
  exists, has a valid .npy header, the dtype and shape the manifest implies (N rows,
  float32 logits with one column per class, float16 or uint8 maps...) and exactly the
  file size that header implies. Cheap: no array data is read.
* auto (default): also the sha256 of every array not verified since it last changed.
  ``verified.json`` records, per array, the size, mtime_ns, ctime_ns and inode it had
  when its sha256 was last checked (by the writer at write time, or by a later check);
  an array whose record differs (rewritten, edited, copied, touched) is hashed again.
* always: the sha256 of every array on every open. never: the cheap check only.

A store that fails is never used. :func:`igkd.precompute.precompute` (``igkd precompute``
and ``igkd distill``) then deletes the damaged store's arrays and manifest, warns on
stderr naming the file and the fault, and computes the store again: a store is a pure
function of its teacher, data and settings, so recomputing gives the same arrays. A
manifest that is not valid JSON, or of another format, is refused with one line instead
(igkd cannot tell what the folder was for, and deletes nothing it cannot identify).

Writers hold the store's lock (:mod:`igkd.lock`, ``.igkd.lock``); a second precompute
of the same store waits for the first, then reuses its result. Leftover temporaries
(``.*.tmp``) of a killed writer are removed by the next writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import atomic_path, disk_full_names, fsync_path, write_json
from .lock import LOCK_NAME

FORMAT = "igkd-store/1"
ARRAYS = ("logits", "maps", "map_scale", "delta", "gap")
VERIFIED = "verified.json"
VERIFY_MODES = ("always", "auto", "never")
# what a store's identity (manifest "identity") holds: the teacher (weights, architecture and
# input normalisation), the training images, and the settings of the maps
IDENTITY = ("dataset", "teacher", "settings")
# what its logits depend on: the teacher's outputs on the clean training images. The map
# settings (attribution, steps, baseline, map dtype and size) decide the maps alone, so a
# method that reads only the logits (kd, dkd, dist) may use a store whatever they were:
# it was refused as "computed with other map settings" by a kd run after 'igkd demo'
LOGITS_IDENTITY = ("dataset", "teacher")
# dtypes and dimensions every store array must have (maps: --map-dtype)
LAYOUT = {"logits": (("<f4",), 2), "maps": (("<f2", "|u1"), 3), "map_scale": (("<f4",), 1),
          "delta": (("<f4",), 1), "gap": (("<f4",), 1)}


class StoreDamaged(UserError):
    """An array of a store is missing, truncated, malformed or changed since it was written."""

    def __init__(self, path: Path, file: str, problem: str):
        self.path, self.file, self.problem = Path(path), file, problem
        super().__init__(f"store {path}: {file} {problem}; run 'igkd precompute' with the same options to "
                         "recompute it (or delete the store)")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def read_manifest(path: Path) -> dict:
    """manifest.json of the store at ``path``, checked to be a manifest of this format."""
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise UserError(f"{path} is not a complete igkd store (no manifest.json); run 'igkd precompute' to build it")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise UserError(f"store {path}: manifest.json is unreadable or not valid JSON ({type(e).__name__}); "
                        f"delete {path} and run 'igkd precompute' again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        # say how to get a usable store: "rebuild it" named no command, and a store of another
        # igkd version can also be read by that version
        if isinstance(fmt, str) and fmt.startswith("igkd-store/"):
            raise UserError(f"store {path} was written by another igkd version (format {fmt}; this igkd reads "
                            f"{FORMAT}); delete {path} and run 'igkd precompute' again, or use the igkd that wrote it")
        raise UserError(f"{path}/manifest.json is not an igkd store manifest (store format {fmt!r}, expected "
                        f"{FORMAT}); delete {path} and run 'igkd precompute' again, or choose another --store "
                        "directory")
    files, n = manifest.get("files"), manifest.get("num_samples")
    if not (isinstance(files, dict) and all(isinstance(files.get(f"{a}.npy"), str) and len(files[f"{a}.npy"]) == 64
                                            for a in ARRAYS)
            and isinstance(n, int) and n >= 0 and isinstance(manifest.get("identity"), dict)):
        raise UserError(f"store {path}: manifest.json is damaged (no num_samples, identity or sha256 of every "
                        f"array); delete {path} and run 'igkd precompute' again")
    return manifest


def _npy_header(f) -> tuple[tuple, bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy version {version}")


def check_array(path: Path, name: str, manifest: dict) -> os.stat_result:
    """The cheap check of one array (see the module docstring); returns its stat."""
    file = f"{name}.npy"
    f = path / file
    try:
        with open(f, "rb") as fh:
            st = os.fstat(fh.fileno())
            shape, fortran, dtype = _npy_header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise StoreDamaged(path, file, "is missing") from None
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        why = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise StoreDamaged(path, file, f"has no valid .npy header ({why})") from None
    dtypes, ndim = LAYOUT[name]
    n = manifest["num_samples"]
    recorded = (manifest.get("arrays") or {}).get(name)
    classes = manifest.get("classes")
    if (fortran or dtype.str not in dtypes or len(shape) != ndim or shape[0] != n
            or (recorded is not None and (recorded.get("dtype") != dtype.str or list(shape) != recorded.get("shape")))
            or (name == "logits" and isinstance(classes, list) and shape[1] != len(classes))):
        raise StoreDamaged(path, file, f"holds {dtype.str} {tuple(shape)}{' (Fortran order)' if fortran else ''}, "
                                       f"not the layout its manifest gives ({n} rows)")
    # Python ints: numpy's int64 product wraps for a forged header (4 x 2**32 x 2**32 float16 is 0 bytes),
    # which then matched a header-only file and failed in np.load with a traceback
    size = offset + math.prod(shape) * dtype.itemsize
    if st.st_size != size:
        raise StoreDamaged(path, file, f"is {'truncated' if st.st_size < size else 'too long'}: {st.st_size} bytes, "
                                       f"its header says {size}")
    return st


def _record(st: os.stat_result, sha: str) -> dict:
    """What verified.json keeps of an array whose sha256 was checked: any change re-checks it."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sha256": sha}


def _read_verified(path: Path) -> dict:
    try:
        records = json.loads((path / VERIFIED).read_text()).get("arrays", {})
        return records if isinstance(records, dict) else {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return {}  # absent or damaged: everything counts as unverified


def _write_verified(path: Path, records: dict) -> None:
    try:
        write_json(path / VERIFIED, {"arrays": records})
    except OSError:
        pass  # a read-only or full store: it is verified again next time, nothing is lost


def verify_store(path: str | Path, manifest: dict, mode: str = "auto") -> None:
    """Check the store's arrays as ``mode`` says (see the module docstring); raise StoreDamaged."""
    if mode not in VERIFY_MODES:
        raise UserError(f"--verify-store {mode!r} is not one of {', '.join(VERIFY_MODES)}")
    path = Path(path)
    stats = {name: check_array(path, name, manifest) for name in ARRAYS}
    if mode == "never":
        return
    old = _read_verified(path)
    records = {}
    for name, st in stats.items():
        file, want = f"{name}.npy", manifest["files"][f"{name}.npy"]
        rec = _record(st, want)
        if mode == "auto" and old.get(file) == rec:
            records[file] = rec
            continue
        with open(path / file, "rb") as fh:
            before = os.fstat(fh.fileno())
            h = hashlib.sha256()
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            after = os.fstat(fh.fileno())
        if h.hexdigest() != want:
            raise StoreDamaged(path, file, "does not match its checksum (the sha256 in the manifest; changed since it "
                                           "was written)")
        if _record(before, want) == _record(after, want):  # not written to while we read it
            records[file] = _record(after, want)
    if records != old:
        _write_verified(path, records)


def open_store(path: str | Path, identity: dict | None = None, verify: str | bool = "auto",
               maps: bool = True) -> Store:
    """Open a complete store after verifying it (``verify``: always | auto | never, see the
    module docstring; True/False mean always/never); refuse one made for another teacher,
    dataset or settings (``maps=False``: for a reader of its logits alone, another teacher or
    dataset only; see :data:`LOGITS_IDENTITY`). A damaged array raises :class:`StoreDamaged`,
    other faults UserError."""
    path = Path(path)
    mode = {True: "always", False: "never"}.get(verify, verify)
    manifest = read_manifest(path)
    if identity is not None:
        check_identity(path, manifest["identity"], identity, IDENTITY if maps else LOGITS_IDENTITY)
    verify_store(path, manifest, mode)
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in ARRAYS}
    return Store(path, manifest, **arrays)


def remove_store_files(path: Path) -> None:
    """Delete a finished store's files (not the folder, not what igkd did not write): the
    arrays and verified.json first, manifest.json last, so that a kill in between leaves a
    store that fails verification again rather than a folder igkd no longer recognises."""
    for name in (*(f"{a}.npy" for a in ARRAYS), VERIFIED, "manifest.json"):
        (path / name).unlink(missing_ok=True)
    fsync_path(path)


def settings_difference(have: dict, want: dict) -> str:
    """'ig_method 'gausslegendre' there, 'riemann_middle' now; ...': how the map settings of
    two store identities differ ('' when they do not)."""
    old, new = have.get("settings"), want.get("settings")
    if old == new:
        return ""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return "settings fingerprint differs"
    return "; ".join(f"{k} {old.get(k, '(none)')!r} there, {new.get(k, '(none)')!r} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))


def check_identity(path: Path, have: dict, want: dict, keys: tuple[str, ...] = IDENTITY) -> None:
    """Refuse a store (or unfinished store) whose identity ``have`` differs from ``want`` in
    one of ``keys``."""
    for key in keys:
        if have.get(key) == want.get(key):
            continue
        if key == "settings" and isinstance(have.get(key), dict) and isinstance(want.get(key), dict):
            # name what differs: "other IG settings (settings fingerprint differs)" left the user to
            # guess that a recipe's map_dtype: uint8 met a store built as float16
            diff = settings_difference(have, want)
            raise UserError(f"store {path} was computed with other map settings ({diff}); pass the options it was "
                            "built with, or use another --store directory, or delete this one to recompute")
        what = {"dataset": "another dataset (or other images of it)",
                "teacher": "another teacher (other weights, architecture or --teacher-normalize)",
                "settings": "other map settings"}[key]
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
        plan = self.chunk_dir / "plan.json"
        if not plan.exists() and self.chunk_dir.is_dir() and not any(self.chunk_dir.iterdir()):
            # a writer killed between making chunks/ and writing its plan: nothing was computed yet
            self.chunk_dir.rmdir()
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()):
            if not plan.exists():
                raise UserError(f"{self.path} exists and is not an igkd store; choose an empty or new --store directory")
            try:
                old = json.loads(plan.read_text())
                if not (isinstance(old, dict) and isinstance(old.get("identity"), dict)):
                    raise ValueError("no identity")
            except (OSError, ValueError) as e:  # written atomically, so damaged from outside: the chunks'
                # owner is unknown, and they are not used
                raise UserError(f"unfinished store {self.path}: chunks/plan.json is unreadable "
                                f"({type(e).__name__}); delete {self.chunk_dir} and run the command again") from None
            if old.get("chunk_size") != chunk_size or old.get("num_samples") != num_samples:
                raise UserError(f"unfinished store {self.path} was started with --chunk-size {old.get('chunk_size')} "
                                f"on {old.get('num_samples')} images (now {chunk_size} on {num_samples}); rerun with "
                                f"--chunk-size {old.get('chunk_size')} to continue it, or delete {self.path}")
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

    def saved_estimate(self, check: dict) -> dict | None:
        """The error estimate an earlier run of this store saved with the same ``check`` settings
        (see :meth:`save_estimate`), or None."""
        try:
            saved = json.loads((self.chunk_dir / "estimate.json").read_text())
            return saved["estimate"] if saved.get("check") == check and isinstance(saved["estimate"], dict) else None
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None  # absent or damaged: estimated again

    def save_estimate(self, check: dict, estimate: dict | None) -> None:
        """Keep the error estimate beside the chunks until the manifest takes it: a run that
        resumes after the last chunk (killed while finalising), or assembles chunks computed
        by hand, has nothing left to compute and wrote ``error_estimate: null`` without it."""
        write_json(self.chunk_dir / "estimate.json", {"check": check, "estimate": estimate})

    def write_chunk(self, i: int, **arrays: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
        data = buf.getvalue()
        with atomic_path(self._chunk_file(i).with_suffix(".sha256")) as tmp:
            tmp.write_text(sha256_bytes(data) + "\n")
        with atomic_path(self._chunk_file(i)) as tmp:
            tmp.write_bytes(data)

    def finalize(self, extra: dict | None = None, labels: np.ndarray | None = None) -> Store:
        """Assemble verified chunks into the final arrays and write the manifest last.
        ``labels`` (one per sample): the manifest also records ``teacher_accuracy``, the share
        of samples whose largest stored logit is their label's, counted on the way.

        Each array is streamed chunk by chunk into a temporary file with ordinary writes
        (hashed on the way), fsynced and renamed; nothing is memory-mapped, so a full disk
        is an OSError(ENOSPC) naming the array, and the temporaries are removed."""
        missing = self.pending()
        if missing:
            raise RuntimeError(f"cannot finalize {self.path}: {len(missing)} chunk(s) missing, e.g. {missing[0]}")
        with np.load(self._chunk_file(0)) as first:
            layout = {name: (first[name].dtype, first[name].shape[1:]) for name in ARRAYS}
        hashes = {name: hashlib.sha256() for name in ARRAYS}
        delta, gap = [], []
        correct = 0
        with ExitStack() as stack:
            tmps = {name: stack.enter_context(atomic_path(self.path / f"{name}.npy")) for name in ARRAYS}
            # unbuffered: every write reaches the file now, so an ENOSPC surfaces at the write naming its
            # array, never later in a close
            files = {name: stack.enter_context(open(tmps[name], "wb", buffering=0)) for name in ARRAYS}
            for name, (dtype, row) in layout.items():
                header = io.BytesIO()
                np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                              "fortran_order": False,
                                                              "shape": (self.num_samples, *row)})
                self._write(files[name], hashes[name], header.getvalue(), name)
            for i in range(self.num_chunks):
                with np.load(self._chunk_file(i)) as z:
                    for name, (dtype, row) in layout.items():
                        a = z[name]
                        if a.dtype != dtype or a.shape[1:] != row:
                            raise RuntimeError(f"chunk {i} of {self.path} holds {name} {a.dtype} {a.shape}")
                        self._write(files[name], hashes[name], np.ascontiguousarray(a).tobytes(), name)
                    delta.append(z["delta"])
                    gap.append(z["gap"])
                    if labels is not None:
                        lo, hi = self.chunk_range(i)
                        correct += int((z["logits"].argmax(1) == labels[lo:hi]).sum())
            for f in files.values():
                f.close()  # atomic_path then fsyncs and renames each, last array first
        outs = {name: h.hexdigest() for name, h in hashes.items()}
        # written and hashed just now: verified at write time (see verify_store)
        _write_verified(self.path, {f"{n}.npy": _record(os.stat(self.path / f"{n}.npy"), outs[n]) for n in ARRAYS})
        manifest = {
            "format": FORMAT,
            "identity": self.identity,
            "num_samples": self.num_samples,
            "files": {f"{k}.npy": v for k, v in outs.items()},
            "arrays": {k: {"dtype": np.dtype(d).str, "shape": [self.num_samples, *row]}
                       for k, (d, row) in layout.items()},
            "completeness_delta": summarize_delta(np.concatenate(delta).astype(np.float64),
                                                  np.concatenate(gap).astype(np.float64)),
            **(extra or {}),
        }
        if labels is not None and self.num_samples:
            manifest["teacher_accuracy"] = {"percent": 100.0 * correct / self.num_samples, "correct": correct,
                                            "images": self.num_samples}
        write_json(self.path / "manifest.json", manifest)
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        return open_store(self.path, verify="never")  # just verified while written

    def _write(self, f, h, data: bytes, name: str) -> None:
        view = memoryview(data)
        with disk_full_names(self.path / f"{name}.npy"):
            while view:  # a raw write may take only part of the buffer
                view = view[f.write(view):]
        h.update(data)


def summarize_delta(delta: np.ndarray, gap: np.ndarray) -> dict | None:
    """Completeness error in logit units, and relative to |F_y(x) - F_y(x')|."""
    if not np.isfinite(delta).any():  # attributions without a completeness property (saliency...)
        return None
    a = np.abs(delta)
    rel = a / np.maximum(np.abs(gap), 1e-12)
    return {"mean_abs": float(a.mean()), "median_abs": float(np.median(a)), "p99_abs": float(np.quantile(a, 0.99)),
            "max_abs": float(a.max()), "median_relative": float(np.median(rel)),
            "p90_relative": float(np.quantile(rel, 0.9))}
