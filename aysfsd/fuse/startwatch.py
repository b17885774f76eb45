"""Watching a mount's start: which blobs it needs first, in what order, until it goes idle.

The FUSE operations report every blob a mount needs (a directory's object on a lookup or
listing, a file's chunk on open and read) to the mount's StartWatch, if it has one. A watch
begins at the first need and ends when no need came for `idle` seconds, at `timeout`, when
stopped, or (recording) when the recording is full. It serves two purposes:
- recording a profile: each blob's first need, as its tree position (see aysfsd.tree.profile);
- counting how much of a profile that was used the start actually read.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import trio

from ..tree.profile import MAX_DATA, MAX_ITEMS, Item, Profile

log = logging.getLogger("aysfsd.tree.profile")

Locate = Callable[[], "tuple[str, int] | None"]  # (path, index) of the need, None when unknown


class StartWatch:
    def __init__(self, root: str, *, idle: float, timeout: float, record: bool, first_wait: float = math.inf,
                 profiled: set[str] | None = None, max_items: int = MAX_ITEMS, max_bytes: int = MAX_DATA) -> None:
        self.root = root
        self.idle = idle
        self.timeout = timeout  # from the first need
        self.first_wait = first_wait  # for the first need
        self.record = record
        self.profiled = profiled  # hashes a profile fetched ahead: `hits` counts those needed
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.items: list[Item] = []
        self.bytes = 0
        self.hits = 0
        self.started: float | None = None  # monotonic time of the first need
        self.last = 0.0
        self.ended = 0.0
        self.reason = ""  # idle | timeout | stopped | full | replaced
        self.done = trio.Event()
        self._seen: set[str] = set()
        self._wake = trio.Event()

    @property
    def active(self) -> bool:
        return not self.done.is_set()

    def need(self, h: str, size: int, locate: Locate) -> None:
        """A blob `h` of `size` bytes was needed (called by the FUSE operations)."""
        if self.done.is_set():
            return
        now = time.monotonic()
        if self.started is None:
            self.started = now
            self._wake.set()
        self.last = now
        if h in self._seen:
            return
        self._seen.add(h)
        if self.profiled is not None and h in self.profiled:
            self.hits += 1
        if not self.record:
            return
        pos = locate()
        if pos is None:
            return
        self.items.append(Item(pos[0], pos[1], h, size))
        self.bytes += size
        if len(self.items) >= self.max_items or self.bytes >= self.max_bytes:
            self.stop("full")

    def measure(self, profiled: set[str]) -> None:
        """Stop recording (a profile was found after all) and count the needs of `profiled`."""
        self.record = False
        self.items.clear()
        self.bytes = 0
        self.profiled = profiled
        self.hits = len(self._seen & profiled)

    def stop(self, reason: str) -> None:
        if not self.done.is_set():
            self.reason = reason
            self.ended = time.monotonic()
            self.done.set()
            self._wake.set()
            self._seen = set()  # only the counts and the recorded items are kept

    def profile(self) -> Profile:
        return Profile(self.root, tuple(self.items))

    @property
    def seconds(self) -> float:
        if self.started is None:
            return 0.0
        return round((self.ended or time.monotonic()) - self.started, 3)

    async def run(self) -> None:
        """Wait for the first need (at most `first_wait` seconds), then until `idle` seconds
        pass without one (at most `timeout` seconds); then the watch is done."""
        with trio.move_on_after(self.first_wait):
            if self.started is None:
                await self._wake.wait()
        if self.started is None:
            self.stop("timeout")
            return
        with trio.move_on_after(self.timeout - (time.monotonic() - self.started)):
            while not self.done.is_set():
                left = self.idle - (time.monotonic() - self.last)
                if left <= 0:
                    self.stop("idle")
                    return
                with trio.move_on_after(left):
                    await self.done.wait()
        self.stop("timeout")

    def public(self) -> dict[str, object]:
        return {"recording": self.record, "active": self.active, "items": len(self.items), "bytes": self.bytes,
                "hits": self.hits, "seconds": self.seconds, "reason": self.reason}
