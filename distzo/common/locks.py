"""One writer per directory: an OS lock (``flock``) held for a process's whole life.

A parameter server holds its data directory's lock (``<data dir>/LOCK``); ``zoctl up`` and ``zoctl
reference --run-dir`` hold their run directory's (``<run dir>/.lock``), and ``zoctl up`` hands that
lock to every service it starts (the open file is inherited: ``pass_fds``), so the run directory stays
locked while *any* process of the run is alive, also after ``zoctl up`` itself was killed outright. The
kernel drops a lock when the last process holding it ends, however it ends: nothing stale is left to
clean up, and a second writer is refused in one line (``DirectoryBusy``, exit 2) naming who holds it.

Only the standard library: control commands import this.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from distzo.common.errors import BadInput


class DirectoryBusy(BadInput):
    """Another process holds the directory's lock."""


class DirLock:
    """The lock of ``directory`` (the file ``name`` in it), taken by ``acquire``; ``fd``: its open file."""

    def __init__(self, directory: str | Path, name: str, what: str):
        self.dir = Path(directory)
        self.path = self.dir / name
        self.what = what
        self.fd: int | None = None

    def acquire(self, wait_s: float = 0.0, holders=None) -> "DirLock":  # noqa: ANN001
        """Take the lock, waiting up to ``wait_s`` seconds for its holders to end; record this pid in it.

        ``holders()``: the pids that may hold it (named in the error). Raises DirectoryBusy, or OSError
        when the lock file cannot be made (a directory that cannot be written is refused by the caller)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    os.close(fd)
                    raise
            if time.monotonic() >= deadline:
                recorded = _read_pid(fd)
                os.close(fd)
                pids = sorted({p for p in ([recorded] if recorded else []) + list(holders() if holders else [])
                               if alive(p)})
                who = f"pid {', '.join(map(str, pids))}" if pids else "another process"
                raise DirectoryBusy(f"{self.what} {self.dir} is in use by {who}: one writer at a time; wait for it "
                                    "to end (or stop it), or use another directory")
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def busy(self) -> bool:
        """Whether another process holds the lock now (checked without taking it for long)."""
        if self.fd is not None or not self.path.is_file():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's own lock

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes with the last holder of this open file (children too)
            self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc: os.kill said it exists
