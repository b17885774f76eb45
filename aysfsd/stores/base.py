"""What every store shares: the Store interface, its errors, the path check and the low-speed
limit (a transfer slower than N bytes/s for T seconds is a failure, like CernVM-FS's
CVMFS_LOW_SPEED_LIMIT)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class StoreError(Exception):
    """A store could not be reached or answered with an error (not "not found")."""


class StoreTimeout(StoreError):
    """A store did not answer within its per-request timeout (not worth retrying at once)."""


class StoreSlow(StoreTimeout):
    """A transfer ran below the low-speed limit (a trickling server: a failure, like a dead one)."""


@dataclass(frozen=True)
class LowSpeed:
    """A transfer that receives fewer than `limit` bytes/s over `seconds` fails (limit 0: off)."""

    limit: int = 0  # off until the daemon sets the configured limit (low_speed_limit) on the store
    seconds: float = 10.0


class Store(Protocol):
    url: str
    timeout: float  # seconds one request may take (the fetcher bounds each request by it)
    low_speed: LowSpeed

    def read(self, rel: str) -> bytes | None: ...
    def write(self, rel: str, data: bytes) -> None: ...
    def exists(self, rel: str) -> bool: ...
    def close(self) -> None: ...
    async def fetch(self, rel: str) -> bytes | None: ...
    async def store(self, rel: str, data: bytes) -> None: ...
    async def contains(self, rel: str) -> bool: ...
    async def aclose(self) -> None: ...
    async def warm(self, n: int) -> None: ...


def check_rel(rel: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel:
        raise ValueError(f"unsafe store path {rel!r}")
    return rel


def describe(e: BaseException) -> str:
    """What happened, never empty: the message and the exception's class."""
    if isinstance(e, EOFError) and not str(e):
        return "connection closed by the server (EOFError)"
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror  # str() would add "[Errno N] "
    else:
        text = str(e) or ("timed out" if isinstance(e, TimeoutError) else "")
    name = e.__class__.__name__
    return f"{text} ({name})" if text and text != name else name


class Progress:
    """Bytes received so far by a transfer; `started` once its answer began (HTTP headers, an
    open remote file): the low-speed limit applies from then on. Written by a worker thread for
    SSH, read by the trio loop (plain ints under the GIL)."""

    def __init__(self) -> None:
        self.started = False
        self.bytes = 0


async def within_low_speed(low: LowSpeed, where: str, fn: Callable[[Progress], Awaitable[T]]) -> T:
    """fn(progress), failing with StoreSlow when, once started, a window of `low.seconds`
    brings fewer than `low.limit * low.seconds` bytes."""
    p = Progress()
    if low.limit <= 0:
        return await fn(p)
    result: list[T] = []
    error: list[Exception] = []  # raised after the nursery: not wrapped in an exception group
    slow = ""

    async def run(cancel: trio.CancelScope) -> None:
        try:
            result.append(await fn(p))
        except Exception as e:
            error.append(e)
        cancel.cancel()

    async def watch(cancel: trio.CancelScope) -> None:
        nonlocal slow
        while not p.started:
            await trio.sleep(min(0.1, low.seconds))
        while True:
            before = p.bytes
            await trio.sleep(low.seconds)
            got = p.bytes - before
            if got < low.limit * low.seconds:
                slow = (f"{where}: too slow: {got} bytes in {low.seconds:g}s (low_speed_limit "
                        f"{low.limit} bytes/s; {p.bytes} bytes received)")
                cancel.cancel()
                return

    async with trio.open_nursery() as n:
        n.start_soon(run, n.cancel_scope)
        n.start_soon(watch, n.cancel_scope)
    if error:
        raise error[0]
    if result:
        return result[0]
    raise StoreSlow(slow or f"{where}: transfer abandoned")
