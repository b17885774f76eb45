"""The tiered fetch: local cache, then grid caches, then stors, each blob verified.

One fetch per blob is in flight at a time (single-flight): concurrent readers of a
missing blob wait for the same download. A source that fails is marked down for a
while and skipped; a blob that fails its hash check is an error of that source, never
data for a reader.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from .cache import LocalCache
from .layout import blob_path
from .stores import Store, StoreError

log = logging.getLogger("aysfsd.fetch")

DOWN_SECONDS = 15.0
RETRIES = 2
HASH_IN_THREAD = 1 << 20  # hash blobs larger than this off the trio loop


class FetchError(Exception):
    """A blob could not be had from any tier (missing, corrupt or unreachable everywhere)."""


@dataclass
class Source:
    store: Store
    tier: str  # "grid" or "stor"
    writable: bool = True
    down_until: float = 0.0
    failures: int = 0
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    corrupt: int = 0

    @property
    def name(self) -> str:
        return self.store.url

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    errors: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: {"local": 0, "grid": 0, "stor": 0})


class MemoryLRU:
    """Recently fetched blobs kept in memory, for mounts with the local cache off."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._d: OrderedDict[str, bytes] = OrderedDict()

    def get(self, h: str) -> bytes | None:
        v = self._d.get(h)
        if v is not None:
            self._d.move_to_end(h)
        return v

    def put(self, h: str, data: bytes) -> None:
        if h in self._d or len(data) > self.budget:
            return
        self._d[h] = data
        self.used += len(data)
        while self.used > self.budget:
            _, old = self._d.popitem(last=False)
            self.used -= len(old)

    def clear(self) -> None:
        self._d.clear()
        self.used = 0


async def sha256_of(data: bytes) -> str:
    if len(data) > HASH_IN_THREAD:
        return await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


class _Flight:
    """One download in progress; concurrent readers of the same blob wait on it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None
        self.error = ""


class Fetcher:
    def __init__(self, cache: LocalCache, grid: list[Source], stors: list[Source],
                 timeout: float = 30.0) -> None:
        self.cache = cache
        self.grid = grid
        self.stors = stors
        self.timeout = timeout
        self.memory = MemoryLRU(64 << 20)
        self.counters = Counters()
        self._inflight: dict[str, _Flight] = {}
        self.nursery: trio.Nursery | None = None  # for background grid write-back
        self._writeback_limit = trio.CapacityLimiter(4)

    async def get(self, h: str, *, local: bool = True, grid: bool = True,
                  account: dict[str, int] | None = None) -> bytes:
        """The whole blob `h`, verified. Raises FetchError within `timeout` seconds.

        `account` (a mount's bytes-by-tier) is credited with where the bytes came from."""
        data = self.cache.get(h)
        if data is not None:
            self.counters.hits += 1
            self.counters.bytes_by_tier["local"] += len(data)
            if account is not None:
                account["local"] += len(data)
            return data
        data = self.memory.get(h)
        if data is not None:
            self.counters.memory_hits += 1
            return data
        flight = self._inflight.get(h)
        if flight is None:
            flight = self._inflight[h] = _Flight()
            try:
                flight.result = await self._fetch(h, local=local, grid=grid, account=account)
            except FetchError as e:
                flight.error = str(e)
            except BaseException as e:
                flight.error = f"blob {h}: fetch interrupted ({e!r})"
                raise
            finally:
                del self._inflight[h]
                flight.done.set()
        else:
            await flight.done.wait()
        if flight.result is None:
            raise FetchError(flight.error)
        return flight.result

    async def _fetch(self, h: str, *, local: bool, grid: bool, account: dict[str, int] | None) -> bytes:
        self.counters.misses += 1
        rel = blob_path(h)
        problems: list[str] = []
        with trio.move_on_after(self.timeout) as scope:
            for tier in (self.grid, self.stors):
                for src in tier:
                    if src.is_down():
                        problems.append(f"{src.name}: down")
                        continue
                    data = await self._from(src, rel, h, problems)
                    if data is None:
                        continue
                    src.fetched_blobs += 1
                    src.fetched_bytes += len(data)
                    self.counters.bytes_by_tier[src.tier] += len(data)
                    if account is not None:
                        account[src.tier] += len(data)
                    await self._keep(h, data, src, local=local, grid=grid)
                    return data
        self.counters.errors += 1
        if scope.cancelled_caught:
            problems.append(f"gave up after {self.timeout:g}s")
        raise FetchError(f"blob {h} not available: " + "; ".join(problems or ["no sources configured"]))

    async def _from(self, src: Source, rel: str, h: str, problems: list[str]) -> bytes | None:
        for attempt in range(RETRIES + 1):
            try:
                data = await src.store.fetch(rel)
            except StoreError as e:
                if attempt < RETRIES:
                    await trio.sleep(0.1 * math.pow(3, attempt))
                    continue
                src.failures += 1
                src.down_until = time.monotonic() + DOWN_SECONDS
                log.warning("source %s marked down for %ss: %s", src.name, DOWN_SECONDS, e,
                            extra={"BLOB": h, "SOURCE": src.name})
                problems.append(f"{src.name}: {e}")
                return None
            if data is None:
                problems.append(f"{src.name}: not found")
                return None
            if await sha256_of(data) != h:
                src.corrupt += 1
                log.error("corrupt blob %s from %s (%d bytes, hash mismatch): skipped", h, src.name, len(data),
                          extra={"BLOB": h, "SOURCE": src.name})
                problems.append(f"{src.name}: corrupt (hash mismatch)")
                return None
            return data
        return None

    async def _keep(self, h: str, data: bytes, src: Source, *, local: bool, grid: bool) -> None:
        if local:
            try:
                await trio.to_thread.run_sync(self.cache.put, h, data)
            except Exception as e:  # a full disk must not fail the read
                log.error("local cache: could not store blob %s: %s", h, e, extra={"BLOB": h})
                self.memory.put(h, data)
        else:
            self.memory.put(h, data)
        if grid:
            # fill (and so repair) every writable grid cache tried before the one that answered
            for g in self.grid:
                if g is src:
                    break
                if g.writable and not g.is_down():
                    if self.nursery is not None:
                        self.nursery.start_soon(self._write_back, g, h, data)
                    else:
                        await self._write_back(g, h, data)

    async def _write_back(self, g: Source, h: str, data: bytes) -> None:
        try:
            async with self._writeback_limit:
                await g.store.store(blob_path(h), data)
        except StoreError as e:
            log.warning("grid cache %s: write-back of %s failed: %s", g.name, h, e, extra={"BLOB": h})
