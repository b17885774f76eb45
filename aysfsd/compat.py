"""Differences between the library versions we run on: PyPI's and Debian 12's (trio 0.22,
paramiko 2.12, httpx 0.23)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")

# trio >= 0.23 calls it abandon_on_cancel; 0.22 (Debian 12) cancellable
_ABANDON = ("abandon_on_cancel" if "abandon_on_cancel" in inspect.signature(trio.to_thread.run_sync).parameters
            else "cancellable")


async def run_abandonable(fn: Callable[..., T], *args: Any, limiter: trio.CapacityLimiter | None = None) -> T:
    """trio.to_thread.run_sync that a cancelled caller does not wait for (the thread finishes
    on its own): for blocking I/O that may hang, e.g. a dead NFS server or SSH peer."""
    kw: dict[str, Any] = {_ABANDON: True}
    if limiter is not None:
        kw["limiter"] = limiter
    return await trio.to_thread.run_sync(fn, *args, **kw)
