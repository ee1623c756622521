"""One process per run folder: an advisory ``fcntl.flock`` on ``<run folder>/.lock``.

Two runs writing one folder would log every id twice and time each other's samples, and a
concurrent ``--force`` would move the other run's rows into its backup. So a run holds the folder's
lock from before it reads the folder until its summary is written.

The lock is the kernel's, on an open file: a process that dies (``kill -9``, a crash) releases it
with its file descriptors, so a crash never leaves a folder locked. The file keeps the holder's
PID so that a refusal can name it; a file left by a dead process is a stale lock and is taken
over. On release the holder deletes the file while still holding the lock; an acquirer checks that
the file it locked is still the one at the path, else it retries, so two processes can never both
believe they hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from prunevid_bench.errors import PruneVidError

LOCK_FILE = ".lock"
META_LOCK_FILE = ".meta-lock"  # held for a moment around writes every rank of a split run shares


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def lock_holder(path: Path) -> int | None:
    """The process id written in a lock file (None: none, or unreadable)."""
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """``with RunLock(run_dir, wait=False, note=print):`` — refuses (PruneVidError naming the
    holder's PID) or, with ``wait``, blocks until the holder is done."""

    def __init__(self, run_dir: Path, *, wait: bool = False, note: Callable[[str], None] | None = None,
                 name: str = LOCK_FILE):
        self.path = Path(run_dir) / name  # a rank of a split run locks its own name (harness.shard)
        self.wait = wait
        self.note = note or (lambda text: None)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                self._lock(fd)
                if self._is_current(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder deleted this file as we waited for it: lock the new one
        previous = lock_holder(self.path)
        if previous is not None and previous != os.getpid() and not pid_alive(previous):
            self.note(f"{self.path.parent}: taking over a stale lock left by process {previous} (no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        self._fd = fd

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise PruneVidError(f"cannot write in {self.path.parent} ({exc.strerror}); "
                                "pass a writable --results-dir") from None

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = lock_holder(self.path)
        who = f"process {holder}" if holder is not None else "another process"
        if not self.wait:
            raise PruneVidError(
                f"{self.path.parent} is in use by {who}; wait for it to finish, or pass --wait to queue behind it"
            )
        self.note(f"waiting for {who}, which holds {self.path.parent}")
        fcntl.flock(fd, fcntl.LOCK_EX)

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see the module docstring
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def held_locks(run_dir: Path, own: str) -> list[str]:
    """Names of the run locks (``.lock``, ``.lock.rank-*``) of ``run_dir`` that another open file
    holds now, ``own`` left out. A probe takes a shared lock without waiting and drops it."""
    held = []
    for path in sorted(Path(run_dir).glob(f"{LOCK_FILE}*")):
        if path.name == own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # released (and deleted) as we looked
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(path.name)
        finally:
            os.close(fd)
    return held


@contextlib.contextmanager
def meta_lock(run_dir: Path):
    """Serialise the short writes the ranks of one split run share (the header, the summary),
    so that no two of them replace one file at once and the last summary sees every log."""
    fd = os.open(Path(run_dir) / META_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
