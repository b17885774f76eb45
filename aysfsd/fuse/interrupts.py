"""Giving up FUSE requests whose caller is dying or gone (needs aysfs's pyfuse3 patch,
packaging/pyfuse3/interrupt.patch): the request is answered EINTR at once, its wait for a
download ends, and the download is cancelled when nobody else waits for it (aysfsd.tiers).

Two ways in:
* The kernel sends an INTERRUPT for a request whose caller got a signal, and waits for the
  answer even when the caller was killed (a LOOKUP or READDIR is waited for that way). The
  request is given up only when the caller is dying: SIGKILL pending in its thread, which is
  also how the kernel marks a fatal signal that the process does not handle (SIGINT or SIGTERM
  by default). A signal it handles (Go's SIGURG every few ms, SIGCHLD, SIGWINCH) keeps the
  request going as stock pyfuse3 does: a read of a regular file is not expected to fail with
  EINTR, and giving up would start the download again after each signal.
* A reader's READs are mostly read-ahead, which the kernel sends without waiting (no
  INTERRUPT ever comes for them): a killed `cat` exits at once and its READs would wait out
  `fetch_timeout`. `CallerWatch.run` looks at the requests in progress every POLL_SECONDS and
  gives up those whose caller is dying or gone (which also covers a caller killed after a
  signal it handled: the kernel sends one INTERRUPT per request).

A process that waits on the same pages in the page cache as a given-up read-ahead is not known
to the daemon: it sends a READ of its own when the read-ahead fails, and the blob is asked for
again. The caller is a thread id in the daemon's pid namespace; 0 (not visible) is never given up.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import pyfuse3
import trio

log = logging.getLogger("aysfsd.fuse.ops")

POLL_SECONDS = 0.5
_SIGKILL = 1 << (signal.SIGKILL - 1)


def available() -> bool:
    """Whether pyfuse3 has aysfs's interrupt patch."""
    return getattr(pyfuse3, "AYSFS_INTERRUPT", 0) >= 1


def caller_state(tid: int) -> str:
    """"dying" (SIGKILL pending), "gone" (no such thread), "alive" or "unknown" (tid 0, or
    /proc cannot tell)."""
    if tid <= 0:
        return "unknown"
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")):
            try:
                if int(line.split()[1], 16) & _SIGKILL:
                    return "dying"
            except (IndexError, ValueError):
                return "unknown"
        elif line.startswith(b"State:") and line.split()[1:2] in ([b"Z"], [b"X"]):
            return "gone"
    return "alive"


class CallerWatch:
    """Gives up the requests of dying or gone callers; counts them (status, metrics)."""

    def __init__(self, pending: Callable[[], list[tuple[int, Callable[[], None]]]] | None = None) -> None:
        self._pending = pending if pending is not None else getattr(pyfuse3, "pending_requests", list)
        self.interrupted = 0  # INTERRUPTs received
        self.given_up = 0  # requests answered EINTR

    def on_interrupt(self, tid: int) -> bool:
        """The kernel interrupted a request of `tid`: give it up now? (called by pyfuse3 on the
        trio thread, inside the processing of the INTERRUPT: must not block, must not raise)"""
        self.interrupted += 1
        state = caller_state(tid)
        if state in ("dying", "gone"):
            self.given_up += 1
            log.debug("request of thread %d interrupted: answered EINTR (caller %s)", tid, state)
            return True
        log.debug("request of thread %d interrupted by a signal it handles: goes on", tid)
        return False

    def sweep(self) -> int:
        """Give up every request in progress whose caller is dying or gone; how many."""
        states: dict[int, str] = {}
        n = 0
        for tid, cancel in self._pending():
            state = states.get(tid)
            if state is None:
                state = states[tid] = caller_state(tid)
            if state in ("dying", "gone"):
                cancel()
                n += 1
        if n:
            self.given_up += n
            log.debug("%d requests given up: their callers are dying or gone", n)
        return n

    async def run(self) -> None:
        """Sweep every POLL_SECONDS, for good (the daemon's nursery cancels it)."""
        while True:
            await trio.sleep(POLL_SECONDS)
            self.sweep()
