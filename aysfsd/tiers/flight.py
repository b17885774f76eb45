"""A download in progress (single-flight), the error a failed fetch raises, and the count of
foreground fetches that background ones wait for."""

from __future__ import annotations

import trio


class FetchError(Exception):
    """A blob could not be had from any tier (missing, corrupt or unreachable everywhere)."""

    def __init__(self, message: str, corrupt_only: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.corrupt_only = corrupt_only  # every source that answered had a corrupt copy
        self.timed_out = timed_out  # gave up after fetch_timeout

    @property
    def cause(self) -> str:
        """What a reader's EIO is counted as (metrics): timeout, corrupt or unavailable."""
        return "timeout" if self.timed_out else "corrupt" if self.corrupt_only else "unavailable"


class Flight:
    """One download in progress; concurrent readers of the same blob wait on it.

    A flight run in the background (`scope` set) is cancelled when its last waiter leaves
    before it ends (an interrupted reader): nobody wants its bytes anymore."""

    def __init__(self, local: bool) -> None:
        self.done = trio.Event()
        self.local = local  # whether the owner stores the result in the local cache
        self.result: bytes | None = None
        self.tier = ""
        self.error = ""
        self.failure: FetchError | None = None  # how the owner's fetch failed (its cause, for waiters)
        self.retry = False  # a pack's member the pack did not deliver: fetch it alone
        self.waiters = 0
        self.scope: trio.CancelScope | None = None

    async def wait(self, deadline: float) -> bool:
        """Wait for the flight to end, at most until `deadline` (trio time); False if it did not.
        A waiter cancelled (not timed out: the flight has its own bound) that was the last one
        cancels the flight."""
        self.waiters += 1
        cancelled = True
        try:
            with trio.move_on_at(deadline):
                await self.done.wait()
            cancelled = False
        finally:
            self.waiters -= 1
            if cancelled and self.waiters == 0 and not self.done.is_set() and self.scope is not None:
                self.scope.cancel()
        return self.done.is_set()


class Foreground:
    """Counts foreground (reader) fetches going to the network; prefetch waits for none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no foreground fetch is going to the network."""
        while self.count:
            await self._idle.wait()
