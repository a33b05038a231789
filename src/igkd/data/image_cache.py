"""The decoded-image cache: one uint8 file per split, built once in parallel, resumable, memory-mapped.

A source that decodes images (today: image folders) hands :func:`load_cached` a cache
folder, a *source fingerprint* (what the decoded bytes depend on: for an image folder
every file's name, size, mtime, ctime and inode plus the decoding options), the labels,
the shape ``N x C x H x W`` and a function that decodes rows ``[start, stop)`` into a buffer.

File ``FOLDER/images.bin``::

    bytes 0 .. 4095      JSON header, space-padded: format, version, source fingerprint,
                         shape, offsets, total file size, sha256 of the contents
    4096 ..              the images, uint8, N x C x H x W, row-major
    labels_offset ..     the labels, little-endian int64 (offset rounded up to 8)

The sha256 is :func:`igkd.data.base.content_digest` of the split, the very value
:meth:`Dataset.fingerprint` returns, so a split read from a checked cache carries its
fingerprint and nothing hashes the pixels twice.

Opening a finished file checks, every time: the header, the source fingerprint (a folder
that changed since is rebuilt, never used), the shape, the exact file size (truncation)
and the labels. The sha256 (corruption) is checked whenever the file is read whole into
memory (it costs little beside the read) and, for a memory-mapped split, when the file
was not checked since it last changed: ``images.bin.verified.json`` records its size,
mtime, ctime and inode at the last check, as precompute stores do. Any failure logs one
line naming the file and what is wrong, and the cache is rebuilt.

Building takes the folder's lock (:mod:`igkd.lock`; a second process waits, then uses
the finished file), preallocates ``images.bin.partial`` at its final size (a disk that
cannot hold it fails at once), decodes chunks of rows in a thread pool (Pillow releases
the GIL) and writes each with ``pwrite`` at its offset. ``images.bin.progress.json``
lists the finished chunks; it is written (after an fdatasync of the data) every few
seconds and when the build stops for any reason, so an interrupted build (Ctrl-C, a
kill, an image that cannot be decoded) resumes where it stopped when rerun with the same
source (replacing the image that failed changes the source: that build starts over).
When every chunk is there, the header with the sha256 is written, the file is fsynced
and renamed to ``images.bin``: a partial file is never taken for a finished cache. A
full disk removes the partial file and progress (the space is given back) and ends with
one line.

Memory-mapped splits are ``torch.from_numpy(np.memmap(..., mode="c"))``: a read-only map
(``mode="r"``) works too, but torch warns that the tensor is not writable and any in-place
write through it kills the process with SIGSEGV; a copy-on-write map reads the same
(clean pages are file-backed, counted in ``RssFile``, not ``RssAnon``) and a stray write
only copies the pages it touches into private memory, never into the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from ..fileio import fsync_path, is_disk_full, write_json
from ..lock import DirLock
from ..progress import Progress
from .base import Split, digest_prefix

log = logging.getLogger(__name__)

FORMAT, VERSION = "igkd-decoded-images", 1
HEADER_BYTES = 4096
FILE = "images.bin"
CHUNK_BYTES = 8 << 20   # decoded bytes per chunk of rows: one buffer per thread, and the unit of resumption
SYNC_SECONDS = 3.0      # how often finished chunks are made durable and recorded
READ_BYTES = 16 << 20   # block size when a cache file is read or hashed
MAX_THREADS = 8  # Pillow decoding stops scaling well past this many threads per process


def decode_threads() -> int:
    """Threads that decode images: the CPUs this process may run on (its affinity, as a
    container or taskset gives it, not the machine's count), at most MAX_THREADS. Not
    --threads, which is torch's compute: decoding is a one-time, GIL-free cache build that
    one process does while the others of a torchrun wait for it."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_THREADS, n))


Decode = Callable[[int, int, np.ndarray], None]  # (start, stop, out k x C x H x W): fill out with rows start..stop-1


class CacheUnwritable(UserError):
    """The cache folder cannot be created or written (not a full disk): a source may decode in memory instead."""


def layout(shape: tuple[int, int, int, int]) -> dict:
    n = shape[0]
    images = math.prod(shape)
    labels_offset = HEADER_BYTES + (images + 7) // 8 * 8
    return {"shape": [int(d) for d in shape], "images_offset": HEADER_BYTES, "labels_offset": labels_offset,
            "size": labels_offset + 8 * n}


def chunk_rows(shape: tuple[int, int, int, int]) -> int:
    return max(1, min(512, CHUNK_BYTES // max(1, math.prod(shape[1:]))))


def decode_in_memory(shape: tuple[int, int, int, int], decode: Decode, desc: str) -> np.ndarray:
    """Every row decoded into one in-memory array (no cache), by the same thread pool."""
    out = np.empty(shape, dtype=np.uint8)
    rows = chunk_rows(shape)
    chunks = range(math.ceil(shape[0] / rows))

    def work(c: int) -> None:
        start, stop = c * rows, min(shape[0], (c + 1) * rows)
        decode(start, stop, out[start:stop])

    with Progress(shape[0], desc, "img", quiet=shape[0] < 5000) as progress:
        _parallel(chunks, work, lambda c: progress.update(min(rows, shape[0] - c * rows)))
    return out


def _parallel(chunks, work: Callable[[int], None], on_done: Callable[[int], None]) -> None:
    """Run ``work(c)`` for every chunk in a thread pool, ``on_done(c)`` in this thread as each
    finishes. On the first failure (or Ctrl-C) no further chunk starts; chunks already running
    finish and are reported done; then the first error is raised."""
    failed = threading.Event()

    def guarded(c: int) -> bool:
        if failed.is_set():
            return False
        try:
            work(c)
        except BaseException:
            failed.set()
            raise
        return True

    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        pending = {pool.submit(guarded, c): c for c in chunks}
        error: BaseException | None = None
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    c = pending.pop(f)
                    if f.exception() is not None:
                        error = error or f.exception()
                    elif f.result():
                        on_done(c)
                if error is not None:
                    raise error
        finally:
            failed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for f, c in pending.items():  # those running when we stopped: keep what finished
                if not f.cancelled() and f.exception() is None and f.result():
                    on_done(c)


# ---------------------------------------------------------------- reading

def _read_header(fd: int, path: Path) -> tuple[dict | None, str]:
    raw = os.pread(fd, HEADER_BYTES, 0)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return None, "has a damaged header"
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None, "is not an igkd decoded-image cache"
    if header.get("version") != VERSION:
        return None, f"has format version {header.get('version')}, not {VERSION}"
    return header, ""


def _hash_file(fd: int, lay: dict, into: np.ndarray | None, desc: str) -> str:
    """:func:`content_digest` of the file's contents, read in blocks (into ``into`` when given)."""
    shape = tuple(lay["shape"])
    h = hashlib.sha256(digest_prefix(shape))
    total = math.prod(shape)
    dest = memoryview(into.reshape(-1)) if into is not None else None
    buf = bytearray(READ_BYTES) if into is None else None
    with Progress(max(1, total >> 20), desc, "MiB", quiet=total < 1 << 30) as progress:
        done = 0
        while done < total:
            k = min(READ_BYTES, total - done)
            view = dest[done:done + k] if dest is not None else memoryview(buf)[:k]
            got = os.preadv(fd, [view], lay["images_offset"] + done)
            if got != k:
                raise OSError(errno.EIO, "short read")
            h.update(view)
            done += k
            progress.update((done >> 20) - progress.done)
    h.update(os.pread(fd, 8 * shape[0], lay["labels_offset"]))
    return h.hexdigest()


def _stat_record(st: os.stat_result, sha: str) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "sha256": sha}


def _open(folder: Path, source: str, labels: np.ndarray, shape: tuple, mmap: bool) -> tuple[Split | None, str]:
    """The finished cache as a Split, or (None, why it cannot be used; "" when there is none)."""
    path = folder / FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    try:
        st = os.fstat(fd)
        header, why = _read_header(fd, path)
        if header is None:
            return None, why
        lay = layout(shape)
        if header.get("source") != source:
            return None, "no longer matches its image folder (files added, removed or changed, or other options)"
        if {k: header.get(k) for k in lay} != lay:
            return None, f"has shape {header.get('shape')}, expected {list(shape)}"
        if st.st_size != lay["size"]:
            return None, f"is {'truncated' if st.st_size < lay['size'] else 'too long'} ({st.st_size} bytes, " \
                         f"its header says {lay['size']})"
        stored = np.frombuffer(os.pread(fd, 8 * shape[0], lay["labels_offset"]), dtype="<i8")
        if not np.array_equal(stored, labels):
            return None, "holds other labels than its folder's class folders"
        want = header.get("sha256")
        if not mmap:
            images = np.empty(shape, dtype=np.uint8)
            if _hash_file(fd, lay, images, f"reading {path}") != want:
                return None, "is corrupt (its contents do not match the sha256 in its header)"
            return Split(torch.from_numpy(images), torch.from_numpy(labels.copy()), digest=want), ""
        stamp = folder / f"{FILE}.verified.json"
        try:
            checked = json.loads(stamp.read_text()) == _stat_record(st, want)
        except (OSError, ValueError):
            checked = False
        if not checked:
            if _hash_file(fd, lay, None, f"checking {path}") != want:
                return None, "is corrupt (its contents do not match the sha256 in its header)"
            try:
                write_json(stamp, _stat_record(st, want))
            except OSError:
                pass  # a read-only or full cache folder: checked again next time, nothing lost
        # mapped through the descriptor checked above, not the path, which a rebuild may have replaced since
        with os.fdopen(os.dup(fd), "rb") as f:
            mapped = np.memmap(f, dtype=np.uint8, mode="c", offset=lay["images_offset"], shape=shape)
        return Split(torch.from_numpy(mapped), torch.from_numpy(labels.copy()), mapped=path, digest=want), ""
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    finally:
        os.close(fd)


# ---------------------------------------------------------------- building

def _remove(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _disk_full(folder: Path, lay: dict) -> UserError:
    return UserError(f"disk full while writing the dataset cache {folder} (it needs {human_bytes(lay['size'])}); "
                     f"free space or point IGKD_CACHE_DIR at a larger disk and rerun, or add ',cache=0' to the "
                     f"spec to decode into memory (nothing was left half-written)")


def _build(folder: Path, source: str, labels: np.ndarray, shape: tuple, decode: Decode, desc: str) -> None:
    lay = layout(shape)
    n, row = shape[0], math.prod(shape[1:])
    rows = chunk_rows(shape)
    nchunks = math.ceil(n / rows)
    partial, progress_file = folder / f"{FILE}.partial", folder / f"{FILE}.progress.json"
    plan = {"source": source, **lay, "chunk_rows": rows}
    done = None
    try:
        prog = json.loads(progress_file.read_text())
        if {k: prog.get(k) for k in plan} == plan and partial.stat().st_size == lay["size"]:
            done = bytearray(bytes.fromhex(prog["done"]))
            done = done if len(done) == nchunks and set(done) <= {0, 1} else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable partial build: start afresh
    try:
        if done is None:
            _remove(partial, progress_file)
            done = bytearray(nchunks)
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            try:
                try:  # reserve every block now: a disk too small fails here, before any decoding
                    os.posix_fallocate(fd, 0, lay["size"])
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    os.ftruncate(fd, lay["size"])  # no fallocate here: a full disk shows at a write instead
                _pwrite_all(fd, np.ascontiguousarray(labels, dtype="<i8").tobytes(), lay["labels_offset"])
            finally:
                os.close(fd)
            # no progress record yet: the first one is written after SYNC_SECONDS or when the build
            # stops, so a build that finishes sooner (any small dataset) never writes one
        elif any(done):
            # shown (a warning: igkd sets no logging handler, so only warnings reach stderr): a user who
            # stopped a long decode should see it resume, not wonder whether it started over
            log.warning("resuming the dataset cache %s: %d of %d chunks were already decoded", folder, sum(done),
                        nchunks)
        _fill(partial, progress_file, plan, lay, done, rows, row, n, decode, desc)
        fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC)
        try:
            digest = _hash_file(fd, lay, None, f"hashing {partial}")
            header = json.dumps({"format": FORMAT, "version": VERSION, "source": source, **lay, "sha256": digest})
            _pwrite_all(fd, header.encode().ljust(HEADER_BYTES - 1) + b"\n", 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        final = folder / FILE
        os.replace(partial, final)
        fsync_path(folder)
        _remove(progress_file)
        try:
            write_json(folder / f"{FILE}.verified.json", _stat_record(final.stat(), digest))
        except OSError:
            pass  # checked on its first memory-mapped use instead
    except OSError as e:
        if is_disk_full(e):
            _remove(partial, progress_file)  # give the space back: nothing half-written stays
            raise _disk_full(folder, lay) from None
        raise


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        k = os.pwrite(fd, view, offset)
        view, offset = view[k:], offset + k


def _fill(partial: Path, progress_file: Path, plan: dict, lay: dict, done: bytearray, rows: int, row: int, n: int,
          decode: Decode, desc: str) -> None:
    """Decode every chunk not yet ``done`` into ``partial``, recording progress as it goes."""
    shape = tuple(lay["shape"])
    fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC)
    started = time.monotonic()
    last = [started]

    def sync() -> None:  # data first, then the record that says it is there
        os.fdatasync(fd)
        write_json(progress_file, {**plan, "done": done.hex()})
        last[0] = time.monotonic()

    def work(c: int) -> None:
        start, stop = c * rows, min(n, (c + 1) * rows)
        buf = np.empty((stop - start, *shape[1:]), dtype=np.uint8)
        decode(start, stop, buf)
        _pwrite_all(fd, buf, lay["images_offset"] + start * row)

    def finished(c: int) -> None:
        done[c] = 1
        progress.update(min(rows, n - c * rows))
        if time.monotonic() - last[0] > SYNC_SECONDS:
            sync()

    try:
        with Progress(n, desc, "img", quiet=n < 5000) as progress:
            progress.update(sum(min(rows, n - c * rows) for c in range(len(done)) if done[c]))
            try:
                _parallel([c for c in range(len(done)) if not done[c]], work, finished)
            except BaseException:
                try:  # keep what was decoded, so that a rerun resumes here
                    sync()
                except OSError:
                    pass  # the last record stands: it names only chunks whose data was synced before it
                raise
            if time.monotonic() - started > SYNC_SECONDS:
                sync()  # a long build: a kill while it is hashed below must not cost the last chunks
            else:
                os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- entry point

def load_cached(folder: Path, source: str, labels: np.ndarray, shape: tuple[int, int, int, int], decode: Decode,
                mmap: bool, desc: str) -> Split:
    """The split cached in ``folder``: opened if finished and valid for ``source``, else (re)built
    first. ``mmap``: memory-map the images instead of reading them into memory.

    Raises :class:`CacheUnwritable` when ``folder`` cannot be created or written."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    shape = tuple(int(d) for d in shape)
    split, why = _open(folder, source, labels, shape, mmap)
    if split is not None:
        return split
    if why:
        log.warning("dataset cache %s %s; rebuilding it", folder / FILE, why)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(folder, layout(shape)) from None
        raise CacheUnwritable(f"cannot create the dataset cache {folder} ({e.strerror})") from None
    if not writable:
        raise CacheUnwritable(f"cannot write the dataset cache {folder} (permission denied)")
    try:
        lock = DirLock(folder, "dataset cache", "wait for it to finish").acquire(wait=True)
    except OSError as e:
        if is_disk_full(e):
            raise _disk_full(folder, layout(shape)) from None
        raise
    try:
        with lock:
            split, why2 = _open(folder, source, labels, shape, mmap)  # built by another process while we waited?
            if split is not None:
                return split
            if why2:
                _remove(folder / FILE, folder / f"{FILE}.verified.json")  # unusable: free its space first
            _build(folder, source, labels, shape, decode, desc)
            split, why = _open(folder, source, labels, shape, mmap)
    except BaseException:
        if created:
            try:
                folder.rmdir()  # only if the build left nothing (a partial build stays, to be resumed)
            except OSError:
                pass
        raise
    if split is None:
        raise UserError(f"the dataset cache {folder / FILE} just written {why}; the disk may be failing: "
                        f"point IGKD_CACHE_DIR at another disk, or add ',cache=0' to the spec")
    return split
