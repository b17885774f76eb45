"""Debug overlay of one mount: edited files (from Redis) shown over the published tree.

Only paths matching `[debug] debug_filter` (full match, relative to the mount root) can
be written, created, truncated, renamed or removed; directories stay read-only (a new
file can be created only in a directory the tree already has). Reads check the overlay
first. Redis being down makes writes fail with EIO while reads fall back to the tree.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import trio

from ..config import DebugConfig
from .store import DebugStore, DebugStoreError, PathState, from_config

log = logging.getLogger("aysfsd.debug.overlay")
CONTENT_CACHE = 64 << 20
RETRY_LOAD = 5.0


class DebugOverlay:
    def __init__(self, mount: str, cfg: DebugConfig) -> None:
        self.mount = mount
        self.cfg = cfg
        self.store = DebugStore(from_config(cfg), mount)
        self.states: dict[str, PathState] = {}
        self.loaded = False
        self._content: OrderedDict[str, bytes] = OrderedDict()
        self._content_bytes = 0
        self._lock = trio.Lock()  # one Redis transaction of this mount at a time, in order
        self.errors = 0
        self._retry_at = 0.0  # after a failed load, lookups do not wait on a dead Redis again at once

    def matches(self, path: str) -> bool:
        return self.cfg.matches(path)

    async def load(self) -> bool:
        """(Re)read the recorded paths; False (and the old state kept) when Redis is down."""
        try:
            states = await trio.to_thread.run_sync(self.store.all_paths)
        except DebugStoreError as e:
            self.errors += 1
            self._retry_at = time.monotonic() + RETRY_LOAD
            log.error("debug: %s (reads show the published tree until redis answers)", e,
                      extra={"AYSFS_MOUNT": self.mount})
            return False
        # paths that no filter matches any more are not served from the overlay
        self.states = {p: s for p, s in states.items() if self.matches(p)}
        if not self.loaded:
            log.info("debug: mount %s has %d edited paths in redis", self.mount, len(self.states),
                     extra={"AYSFS_MOUNT": self.mount})
        self.loaded = True
        return True

    async def ensure_loaded(self) -> None:
        if not self.loaded and time.monotonic() >= self._retry_at:
            await self.load()

    def state(self, path: str) -> PathState | None:
        return self.states.get(path)

    def new_children(self, dirpath: str, existing: set[str]) -> list[tuple[str, PathState]]:
        """Files created in `dirpath` that the tree does not have."""
        prefix = dirpath + "/" if dirpath else ""
        out = []
        for p, s in self.states.items():
            if s.deleted or not p.startswith(prefix):
                continue
            name = p[len(prefix):]
            if "/" not in name and name not in existing:
                out.append((name, s))
        return sorted(out)

    async def content(self, md5: str) -> bytes:
        data = self._content.get(md5)
        if data is not None:
            self._content.move_to_end(md5)
            return data
        data = await trio.to_thread.run_sync(self.store.content, md5)
        self._content[md5] = data
        self._content_bytes += len(data)
        while self._content_bytes > CONTENT_CACHE and self._content:
            _, old = self._content.popitem(last=False)
            self._content_bytes -= len(old)
        return data

    async def record(self, path: str, data: bytes) -> PathState:
        async with self._lock:
            try:
                st = await trio.to_thread.run_sync(self.store.record, path, data)
            except DebugStoreError:
                self.errors += 1
                raise
        self.states[path] = st
        self._content[st.md5] = data
        self._content_bytes += len(data)
        log.info("debug: %s written (%d bytes, md5 %s)", path, len(data), st.md5,
                 extra={"AYSFS_MOUNT": self.mount, "DEBUG_PATH": path})
        return st

    async def remove(self, path: str) -> None:
        async with self._lock:
            try:
                await trio.to_thread.run_sync(self.store.remove, path)
            except DebugStoreError:
                self.errors += 1
                raise
        self.states[path] = PathState(path, "", 0)
        log.info("debug: %s removed", path, extra={"AYSFS_MOUNT": self.mount, "DEBUG_PATH": path})

    def close(self) -> None:
        try:
            self.store.r.close()
        except Exception:
            pass
