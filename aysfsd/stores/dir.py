"""A stor or grid cache in a local (or NFS) directory."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from ..compat import run_abandonable
from .base import LowSpeed, StoreError, StoreTimeout, check_rel

T = TypeVar("T")


class DirStore:
    """A stor or grid cache in a local (or NFS) directory; writes are temp file + rename."""

    def __init__(self, root: str, url: str | None = None, timeout: float = 10.0) -> None:
        self.root = Path(root)
        self.url = url or root
        self.timeout = timeout  # a hung NFS server: the worker thread is abandoned after this
        self.low_speed = LowSpeed(0)  # not applied: each operation is bounded by `timeout`
        self._limiter: trio.CapacityLimiter | None = None

    def _abs(self, rel: str) -> Path:
        return self.root / check_rel(rel)

    def read(self, rel: str) -> bytes | None:
        try:
            with open(self._abs(rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.EISDIR):
                return None
            raise StoreError(f"{self.url}: reading {rel}: {e.strerror}") from e

    def write(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        tmp = path.with_name(f".{path.name}.tmp.{secrets.token_hex(6)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise StoreError(f"{self.url}: writing {rel}: {e.strerror}") from e

    def exists(self, rel: str) -> bool:
        return self._abs(rel).is_file()

    def close(self) -> None:
        pass

    def _threads(self) -> trio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(16)
        return self._limiter

    async def _in_thread(self, op: str, rel: str, fn: Callable[[], T]) -> T:
        """Run a blocking file operation in a worker thread, bounded by `timeout` (a hung NFS
        server): the thread is abandoned and StoreTimeout raised."""
        try:
            with trio.fail_after(self.timeout):
                return await run_abandonable(fn, limiter=self._threads())
        except trio.TooSlowError:
            raise StoreTimeout(f"{self.url}: {op} {rel}: no answer within {self.timeout:g}s") from None

    async def fetch(self, rel: str) -> bytes | None:
        return await self._in_thread("reading", rel, lambda: self.read(rel))

    async def store(self, rel: str, data: bytes) -> None:
        await self._in_thread("writing", rel, lambda: self.write(rel, data))

    async def contains(self, rel: str) -> bool:
        return await self._in_thread("checking", rel, lambda: self.exists(rel))

    async def aclose(self) -> None:
        pass

    async def warm(self, n: int) -> None:
        """Nothing to open ahead (see HttpStore.warm)."""
