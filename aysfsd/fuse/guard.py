"""Every FUSE handler behind a guard: pyfuse3 ends the whole session on any exception but
FUSEError, so anything unexpected is logged with context and answered with EIO. The guard
also writes out the state journal's pending lines before pyfuse3 replies (aysfsd.fuse.statejournal):
whatever inode a reply hands the kernel is journaled first."""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("aysfsd.fuse.ops")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
unexpected_errors = 0  # EIO answers to unexpected exceptions (metrics: cause "internal")


def guarded(fn: F) -> F:
    """pyfuse3 ends the session on any exception but FUSEError: log it, answer EIO."""

    @functools.wraps(fn)
    async def wrapper(ops: Any, *args: Any, **kw: Any) -> Any:
        try:
            return await fn(ops, *args, **kw)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except Exception:
            global unexpected_errors
            unexpected_errors += 1
            log.exception("unexpected error in %s%r", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            ops.inodes.journal.flush()  # never raises

    return wrapper  # type: ignore[return-value]


def erofs(*_a: Any, **_k: Any) -> Awaitable[Any]:
    async def fail() -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    return fail()
