"""The local cache's room on its filesystem: `cache_min_free` kept free there, and the
cache's state ("ok", or "memory": new blobs are not stored for now).

LMDB's file never shrinks, but pages freed by an eviction are reused: so while a put would
leave less than `min_free` free, least-recently-used blobs are evicted first (their own
transaction, then a small one, so that their pages are reusable: LMDB reuses pages freed two
transactions back), and the file does not grow. When a commit fails anyway (ENOSPC arrives
from LMDB as EIO), the cache evicts and retries once, then stops storing ("memory" state,
with the reason; the fetcher keeps blobs in memory) and tries again after RETRY_SECONDS or as
soon as the filesystem has room.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("aysfsd.tiers.local")

RETRY_SECONDS = 30.0  # after a failed write, blobs go to memory only for this long
PAGE_SLACK = 64 * 1024  # LMDB pages a put needs besides the blob (tree, free list)


def mib(n: int) -> str:
    return f"{n / 1048576:.1f} MiB"


class Pages(Protocol):
    """What the room asks of the cache's LMDB file."""

    def reusable(self) -> int: ...
    def evict_for(self, nbytes: int) -> int: ...


class Room:
    """Whether a write of so many bytes may go ahead on the cache's filesystem (see the
    module docstring); the cache's state and its reason."""

    def __init__(self, path: str, pages: Pages, min_free: Callable[[int], int]) -> None:
        self.path = path
        self.pages = pages
        self.min_free = min_free  # filesystem size -> bytes to keep free on it
        self.state = "ok"  # or "memory": not storing blobs for now (reason in `reason`)
        self.reason = ""
        self._retry_at = 0.0  # monotonic time when storing is tried again after a failed write
        self._space_problem = False  # the "memory" state is for want of space (ends when there is room)

    def disk(self) -> tuple[int, int, int]:
        """(bytes free for us, filesystem size, bytes to keep free) of the cache's filesystem."""
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        return st.f_bavail * st.f_frsize, total, self.min_free(total)

    def _set_state(self, state: str, reason: str = "") -> None:
        if state == self.state:
            self.reason = reason or self.reason
            return
        self.state, self.reason = state, reason
        if state == "ok":
            log.warning("local cache %s: storing blobs again (%s)", self.path, reason)
        else:
            log.error("local cache %s: %s; serving new blobs from memory, trying again in %ds or when "
                      "there is room", self.path, reason, RETRY_SECONDS)

    def allows(self, need: int) -> bool:
        """Make sure a write of `need` blob bytes leaves `min_free` free, evicting LRU blobs
        when LMDB has too few free pages for it (then its file would grow). False when it
        cannot (then nothing should be stored)."""
        free, total, keep = self.disk()
        short = keep - (free - need - PAGE_SLACK)
        if self.state != "ok" and time.monotonic() < self._retry_at and (short > 0 or not self._space_problem):
            return False
        if short > 0 and self.pages.reusable() < 2 * (need + PAGE_SLACK):
            # the file must not grow: free pages for the new blob by evicting as much
            self.pages.evict_for(need + PAGE_SLACK)
            if self.pages.reusable() < need + PAGE_SLACK:
                self._retry_at = time.monotonic() + RETRY_SECONDS
                self._space_problem = True
                self._set_state("memory", f"its filesystem has {mib(free)} free of {mib(total)}, less than "
                                          f"cache_min_free ({mib(keep)}) plus this blob, and nothing left to evict")
                return False
        if self.state != "ok":
            self._set_state("ok", f"{mib(free)} free on its filesystem")
        return True

    def write_failed(self, e: Exception) -> None:
        """A commit failed even after evicting: store nothing for RETRY_SECONDS (or until there is room)."""
        free, total, keep = self.disk()
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._space_problem = free < keep + PAGE_SLACK
        self._set_state("memory", f"writing to {self.path} failed ({e}) with {mib(free)} free of {mib(total)} "
                                  f"on its filesystem (cache_min_free {mib(keep)})")
