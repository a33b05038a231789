"""One writer per directory: an advisory fcntl lock on ``DIR/.igkd.lock``.

A run directory (``train``/``distill --out``) and a precompute store are written by one
igkd process at a time. The writer holds ``flock(LOCK_EX)`` on ``DIR/.igkd.lock`` and
writes its pid, host, start time and command line into it, so that a second writer can
say who is in the way. The kernel drops an flock when its process dies, however it dies
(SIGKILL, power loss of a client), so a lock file left behind by a killed run is stale
and simply taken over: only a live process holds the lock, never a file's mere presence.

The lock file is removed on release, while still locked. Whoever opened the old file
meanwhile may get the lock on that unlinked inode, so after locking we check that the
path still names the inode we locked, and start again if not.

flock works across processes on one machine and, on Linux, on NFS (emulated with POSIX
locks); on a filesystem without working locks two machines are not kept apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .fileio import disk_full_names, is_disk_full
from .progress import log

LOCK_NAME = ".igkd.lock"


def describe_owner(info: dict | None) -> str:
    """'igkd pid 123 on host h since 2026-...' from a lock file's contents."""
    if not info or "pid" not in info:
        return "another igkd process"
    return f"igkd pid {info['pid']} on host {info.get('host', '?')} since {info.get('started', '?')}"


class DirLock:
    """``with DirLock(folder, "run directory", advice).acquire(): ...`` writes ``folder`` alone.

    ``acquire(wait=False)`` refuses with a one-line UserError naming the holder;
    ``acquire(wait=True)`` says once on stderr whom it waits for, then blocks until the
    holder is done. The folder is created if needed, and removed again on release if
    this lock created it and nothing else was written into it.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "directory", advice: str = "wait for it to finish"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what, self.advice = what, advice
        self.fd: int | None = None
        self.created = False

    def owner(self) -> dict | None:
        """The lock file's contents (the holder, or the last holder), None if unreadable."""
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _owner_soon(self, seconds: float = 2.0) -> dict | None:
        """The holder's info, allowing it the moment between taking the lock and writing it."""
        deadline = time.monotonic() + seconds
        while True:
            info = self.owner()
            if (info and "pid" in info) or time.monotonic() > deadline:
                return info
            time.sleep(0.02)

    def refuse_if_held(self) -> None:
        """Refuse, as ``acquire()`` would, while a live process holds the lock; take nothing.

        For a command whose lock is taken only after long work (``distill`` locks its run
        directory once the data, the teacher and the precompute are ready): a second run into
        a folder being written did all that work first, then was refused; and one that looked
        at the folder meanwhile was told it "already holds a run; pass --resume". Creates
        nothing: a shared lock, got and dropped at once, fails only against a holder."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (nobody holds it), or none we may open: acquire() will say so
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{self.what} {self.folder} is being written by {describe_owner(self._owner_soon())}; "
                            f"{self.advice}") from None
        except OSError:
            pass  # a filesystem without flock: acquire() decides
        finally:
            os.close(fd)

    def _lock_now(self, fd: int) -> bool:
        """``flock(LOCK_EX | LOCK_NB)``, tried a few times over 0.1 s: a ``refuse_if_held`` look
        holds its shared lock for microseconds and must not refuse a run that starts then."""
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if attempt < 4:
                    time.sleep(0.025)
        return False

    def acquire(self, wait: bool = False, quiet: bool = False) -> "DirLock":
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.created = False
        told, rounds = False, 0
        while True:
            # (re)made on every round: a holder that created the folder removes it again on
            # release when it wrote nothing into it (a first run that failed), and a waiter
            # then finds it gone
            self._make_folder()
            rounds += 1
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                if isinstance(e, FileNotFoundError) and rounds < 100:
                    continue  # that holder's rmdir came between our mkdir and our open: make it again
                if is_disk_full(e):
                    raise
                raise UserError(f"cannot write {self.what} {self.folder}: {e.strerror}; choose another path") \
                    from None
            if not self._lock_now(fd):
                holder = describe_owner(self._owner_soon())
                if not wait:
                    os.close(fd)
                    raise UserError(f"{self.what} {self.folder} is being written by {holder}; {self.advice}") \
                        from None
                if not told:
                    log(f"igkd: waiting for {self.what} {self.folder}: it is being written by {holder}", quiet)
                    told = True
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            # locked; but the holder before us may have removed the file meanwhile
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
        try:
            with disk_full_names(self.path):
                data = (json.dumps(info) + "\n").encode()
                os.pwrite(fd, data, 0)  # then cut: the file is never empty while a reader looks
                os.ftruncate(fd, len(data))
        except BaseException:
            self.release()
            raise
        return self

    def _make_folder(self) -> None:
        exists = self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if is_disk_full(e):  # the command line says "disk full at ..."
                raise
            raise UserError(f"cannot create {self.what} {self.folder}: {e.strerror}; choose another path") from None
        if not exists:
            self.created = True  # ours to remove on release, if we leave it empty

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: see the module docstring
        finally:
            os.close(self.fd)
            self.fd = None
        if self.created:
            try:
                self.folder.rmdir()  # only succeeds if nothing was written into it
            except OSError:
                pass

    def __enter__(self) -> "DirLock":
        if self.fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def folder_held(folder: str | os.PathLike):
    """Hold ``flock(LOCK_EX)`` on the folder itself while the block runs, waiting for whoever
    holds it: for short steps that must not interleave with another process's (an export's
    file and its sidecar landing together; an experiment folder's marker, read and written
    back). No lock file is made, and a run directory's ``.igkd.lock`` (another
    file) is not touched. Where a folder cannot be flocked (NFS emulates flock with POSIX
    locks, which need a file open for writing) the block runs unlocked."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass  # not lockable here (see above): unlocked, as before
        yield
    finally:
        os.close(fd)  # drops the lock
