"""One daemon per cache_dir, control_socket and fuse_root: flock'ed lock files.

Each resource has a lock file that the running daemon holds an exclusive flock(2) on for its
whole life and in which it wrote its pid. The kernel drops the lock when the process dies
(however it dies), so a lock that can be taken means nobody owns the resource: a leftover mount
found there is stale. A second daemon on any of the same paths refuses to start and names
the one that runs.

    cache_dir       <cache_dir>/aysfsd.lock
    control_socket  <dir>/.<socket name>.lock, beside the socket
    fuse_root       <dir>/.<root name>.lock, beside the root (inside it would be hidden
                    by the mount)
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass


class AlreadyRunning(Exception):
    """Another live daemon holds one of our locks."""


@dataclass(frozen=True)
class Lock:
    what: str  # "cache_dir", "control_socket" or "fuse_root"
    path: str  # the resource
    lock_path: str


def lock_path(what: str, path: str) -> str:
    if what == "cache_dir":
        return os.path.join(path, "aysfsd.lock")
    head, tail = os.path.split(os.path.normpath(path))
    return os.path.join(head, f".{tail}.lock")


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(raw) if raw else None
    except (OSError, ValueError):
        return None


def holder(what: str, path: str) -> int | None:
    """The pid of the live daemon owning `path` (as `what`), None when nobody holds the lock."""
    lp = lock_path(what, path)
    try:
        fd = os.open(lp, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_pid(fd) or -1
            return None
        return None  # we could lock it: nobody holds it
    finally:
        os.close(fd)


class InstanceLocks:
    """The locks of one running daemon (released by close() or by the process's death)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def acquire(self, what: str, path: str) -> None:
        """Take the lock of `path`, or raise AlreadyRunning naming the pid that holds it."""
        lp = lock_path(what, path)
        os.makedirs(os.path.dirname(lp), mode=0o700 if what == "cache_dir" else 0o755, exist_ok=True)
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"pid {pid}" if pid else "another process"
            raise AlreadyRunning(f"another aysfsd ({who}) is running with {what} {path} (it holds {lp}); "
                                 f"stop it first, or give this one its own {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fds[lp] = fd

    def acquire_all(self, cache_dir: str, control_socket: str, fuse_root: str) -> None:
        try:
            for what, path in (("cache_dir", cache_dir), ("control_socket", control_socket),
                               ("fuse_root", fuse_root)):
                if lock_path(what, path) not in self.fds:  # e.g. a socket and a root of the same name
                    self.acquire(what, path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
