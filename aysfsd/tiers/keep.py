"""Keeping what was fetched: the local cache (written by one background task in batches)
and write-back to the grid caches.

Write-back: with the mount's `cache.grid` on, a blob fetched from a later tier is
written to every writable grid cache tried before it (so a grid cache that missed it,
or held a corrupt copy, is filled or repaired), in the background.
"""

from __future__ import annotations

import logging

import trio

from ..stores import StoreError
from ..stores.layout import blob_path
from .counters import Counters
from .local import LocalCache
from .memory import MemoryLRU
from .sources import Source

log = logging.getLogger("aysfsd.fetch")

LOCAL_BATCH = 64  # blobs per LMDB write transaction when storing in the background
LOCAL_QUEUE_BUDGET = 128 << 20  # bytes queued for LMDB; beyond it a reader writes its blob itself
WRITEBACK_BUDGET = 64 << 20  # bytes of blobs queued for grid write-back; beyond it write-back is skipped


class Keeper:
    """Puts fetched blobs in the local cache (or memory) and writes them back to grid caches."""

    def __init__(self, cache: LocalCache, memory: MemoryLRU, counters: Counters) -> None:
        self.cache = cache
        self.memory = memory
        self.counters = counters
        self.nursery: trio.Nursery | None = None  # for the background writer and write-back
        self._pending_local: list[tuple[str, bytes]] = []
        self._writing: list[tuple[str, bytes]] = []  # the batch being committed
        self._queued = 0  # bytes in both
        self._writer_running = False
        self._writeback_limit = trio.CapacityLimiter(4)
        self.writeback_pending = 0  # bytes queued or being written back

    def queue_local(self, h: str, data: bytes) -> None:
        """Queue a blob for the local cache; one writer task commits the queue in batches."""
        self._pending_local.append((h, data))
        self._queued += len(data)
        if not self._writer_running and self.nursery is not None:
            self._writer_running = True
            self.nursery.start_soon(self._local_writer)

    def queue_full(self) -> bool:
        """True when blobs should be written by their reader rather than queued: no writer task,
        or LOCAL_QUEUE_BUDGET queued already (a cold read faster than LMDB writes must not
        hold the whole tree in memory)."""
        return self.nursery is None or self._queued >= LOCAL_QUEUE_BUDGET

    def local_queue(self) -> tuple[int, int]:
        """(blobs, bytes) fetched and not yet committed to the local cache (served from memory)."""
        return len(self._pending_local) + len(self._writing), self._queued

    async def flushed(self) -> None:
        """Return once every blob queued for the local cache is written (prefetch's end)."""
        while (self._pending_local or self._writer_running) and self.nursery is not None:
            await trio.sleep(0.01)

    async def _local_writer(self) -> None:
        try:
            while self._pending_local:
                batch, self._pending_local = self._pending_local[:LOCAL_BATCH], self._pending_local[LOCAL_BATCH:]
                self._writing = batch
                try:
                    await self.put_local(batch)
                finally:
                    self._queued -= sum(len(d) for _, d in batch)
                    self._writing = []
        finally:
            self._writer_running = False

    async def put_local(self, blobs: list[tuple[str, bytes]]) -> None:
        try:
            stored = await trio.to_thread.run_sync(self.cache.put_many, blobs)
        except Exception as e:  # a broken disk must not fail reads
            log.error("local cache: could not store %d blobs: %s", len(blobs), e)
            stored = [False] * len(blobs)
        for (h, data), ok in zip(blobs, stored, strict=True):
            if not ok:
                self.memory.put(h, data)

    async def store_local(self, h: str, data: bytes) -> None:
        try:
            stored = await trio.to_thread.run_sync(self.cache.put, h, data)
        except Exception as e:  # a broken disk must not fail the read
            log.error("local cache: could not store blob %s: %s", h, e, extra={"BLOB": h})
            stored = False
        if not stored:
            self.memory.put(h, data)

    async def keep(self, h: str, data: bytes, src: Source, grids: list[Source], *, local: bool, grid: bool,
                   corrupt: list[Source], defer_local: bool = False, memory: bool = True) -> None:
        """Keep blob `h`, had from `src`; `grids`: the grid caches in order."""
        if not memory:
            pass
        elif local and defer_local and not self.queue_full():
            # the reader gets the bytes now; the LMDB write (a thread hop and a copy) follows,
            # and the in-memory cache serves the blob until it has landed
            self.memory.put(h, data)
            self.queue_local(h, data)
        elif local:
            await self.store_local(h, data)
        else:
            self.memory.put(h, data)
        if not grid:
            return
        # fill (and so repair) every writable grid cache tried before the one that answered
        for g in grids:
            if g is src:
                break
            if not g.writable or g.is_down():
                continue
            if g in corrupt:
                log.warning("grid cache %s: repairing corrupt blob %s by write-back", g.name, h,
                            extra={"BLOB": h, "SOURCE": g.name})
            if self.nursery is None:
                await self._write_back(g, h, data, queued=False)
            elif self.writeback_pending + len(data) > WRITEBACK_BUDGET:
                self.counters.writebacks_skipped += 1
                log.debug("grid cache %s: write-back of %s skipped (%d bytes already queued)", g.name, h,
                          self.writeback_pending, extra={"BLOB": h})
            else:
                self.writeback_pending += len(data)
                self.nursery.start_soon(self._write_back, g, h, data, True)

    async def _write_back(self, g: Source, h: str, data: bytes, queued: bool) -> None:
        try:
            async with self._writeback_limit:
                await g.store.store(blob_path(h), data)
            self.counters.writebacks += 1
            log.debug("grid cache %s: wrote back blob %s", g.name, h, extra={"BLOB": h, "SOURCE": g.name})
        except StoreError as e:
            self.counters.writeback_errors += 1
            log.warning("grid cache %s: write-back of %s failed: %s", g.name, h, e,
                        extra={"BLOB": h, "SOURCE": g.name})
        finally:
            if queued:
                self.writeback_pending -= len(data)

    async def drain(self) -> None:
        """Wait until no write-back is queued (tests, shutdown)."""
        while self.writeback_pending:
            await trio.sleep(0.01)
