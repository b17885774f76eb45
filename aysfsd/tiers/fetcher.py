"""The Fetcher: a verified blob from the nearest tier, one download per blob at a time.

The whole fetch is bounded by `fetch_timeout`: then FetchError, which the filesystem
answers with EIO.
"""

from __future__ import annotations

import logging
import time

import trio

from ..cache import LocalCache
from .counters import Account, Counters
from .flight import FetchError, Flight, Foreground
from .keep import Keeper
from .memory import MEMORY_BUDGET, MemoryLRU
from .packs import Members, Packs
from .sources import Source, search

log = logging.getLogger("aysfsd.fetch")

MAX_READAHEAD = 4  # chunks fetched ahead of sequential readers at once


class Fetcher:
    """Gets verified blobs from the nearest tier; see the package docstring."""

    def __init__(self, cache: LocalCache, grid: list[Source], stors: list[Source],
                 timeout: float = 30.0) -> None:
        self.cache = cache
        self.grid = grid
        self.stors = stors
        self.timeout = timeout
        self.memory = MemoryLRU(MEMORY_BUDGET)
        self.counters = Counters()
        self.keeper = Keeper(cache, self.memory, self.counters)
        self.foreground = Foreground()
        self._inflight: dict[str, Flight] = {}
        self.packs = Packs(self._inflight, self.foreground, self.keeper, self.counters, self.get, self.missing)
        self._readaheads = 0
        self._many_limit = trio.CapacityLimiter(8)

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where background work runs (read-ahead, packs, the local writer, write-back)."""
        return self.keeper.nursery

    @nursery.setter
    def nursery(self, n: trio.Nursery | None) -> None:
        self.keeper.nursery = n

    # -- lookup ---------------------------------------------------------------------------------

    def _cached(self, h: str) -> bytes | None:
        data = self.cache.get(h)
        if data is not None:
            self.counters.hits += 1
        else:
            data = self.memory.get(h)
            if data is None:
                return None
            self.counters.memory_hits += 1
        self.counters.bytes_by_tier["local"] += len(data)
        return data

    def missing(self, h: str) -> bool:
        """Not cached (locally or in memory) and not being fetched."""
        return h not in self._inflight and self.memory.get(h) is None and not self.cache.has(h)

    async def wait_foreground_idle(self) -> None:
        """Return once no foreground (reader) fetch is going to the network."""
        await self.foreground.wait_idle()

    def readahead(self, h: str, *, local: bool, grid: bool, account: dict[str, int] | None) -> None:
        """Start fetching `h` in the background unless it is cached, in flight or too many
        read-aheads run already; a failure is left for the reader that needs the blob."""
        if (self.nursery is None or h in self._inflight or self._readaheads >= MAX_READAHEAD
                or self.memory.get(h) is not None or self.cache.has(h)):
            return
        self._readaheads += 1
        self.nursery.start_soon(self._readahead, h, local, grid, account)

    async def _readahead(self, h: str, local: bool, grid: bool, account: dict[str, int] | None) -> None:
        try:
            await self.get(h, local=local, grid=grid, account=account)
        except FetchError:
            pass
        finally:
            self._readaheads -= 1

    def fetch_many(self, hashes: list[str], *, local: bool, grid: bool, account: dict[str, int] | None) -> None:
        """Fetch the missing ones of `hashes` in the background, a few at a time."""
        if self.nursery is None:
            return
        todo = [h for h in hashes if h not in self._inflight and self.memory.get(h) is None and not self.cache.has(h)]
        if todo:
            self.nursery.start_soon(self._fetch_many, todo, local, grid, account)

    async def _fetch_many(self, todo: list[str], local: bool, grid: bool, account: dict[str, int] | None) -> None:
        async def one(h: str) -> None:
            async with self._many_limit:
                try:
                    await self.get(h, local=local, grid=grid, account=account)
                except FetchError:
                    pass  # the reader that needs it will try again and report

        async with trio.open_nursery() as n:
            for h in todo:
                n.start_soon(one, h)

    # -- packs (see .packs) -----------------------------------------------------------------------

    def fetch_pack(self, pack: str, members: Members, *, local: bool, grid: bool,
                   account: dict[str, int] | None) -> None:
        """Fetch pack `pack` in the background for its missing members (hash, offset, size)."""
        self.packs.fetch(pack, members, local=local, grid=grid, account=account)

    async def get_pack(self, pack: str, members: Members, *, local: bool, grid: bool,
                       account: dict[str, int] | None) -> None:
        """Fetch pack `pack` now, as a reader would (a startup profile ahead of its reader)."""
        await self.packs.get(pack, members, local=local, grid=grid, account=account)

    async def load_pack(self, pack: str, members: Members, *, local: bool, grid: bool,
                        data: bytes | None = None) -> list[str]:
        """Prefetch pack `pack` now; returns the members it did not deliver."""
        return await self.packs.load(pack, members, local=local, grid=grid, data=data)

    async def load_packs(self, packs: list[tuple[str, Members]], *, grid: bool, at_once: int,
                         claimed: trio.Event | None = None) -> int:
        """Fetch many packs, their missing members claimed at once (see Packs.load_many)."""
        return await self.packs.load_many(packs, grid=grid, at_once=at_once, claimed=claimed)

    async def assembled(self, pack: str, members: Members) -> bytes | None:
        """Pack `pack` rebuilt from its members when all are here and it matches; else None."""
        return await self.packs.assembled(pack, members)

    # -- single-flight fetch ----------------------------------------------------------------------

    async def get(self, h: str, *, local: bool = True, grid: bool = True,
                  account: dict[str, int] | None = None, background: bool = False, keep: bool = True) -> bytes:
        """The whole blob `h`, verified. Raises FetchError within `timeout` seconds.

        `local`/`grid`: keep the blob in the local cache / write it back to the grid caches.
        `account` (a mount's bytes-by-tier) is credited with the bytes downloaded from a grid
        cache or stor, once per download (the mount's reads credit "local" themselves).
        `background` (prefetch) fetches wait while foreground fetches are in progress.
        `keep` False: not kept in memory either (a pack, whose members are what is kept)."""
        if background:
            await self.wait_foreground_idle()
        for _ in range(3):  # a pack that failed a member sends us round again; bounded
            data = self._cached(h)
            if data is not None:
                return data
            flight = self._inflight.get(h)
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                if local and not flight.local:
                    await self.keeper.store_local(h, flight.result)
                return flight.result
            if not flight.retry:
                f = flight.failure
                raise FetchError(flight.error, corrupt_only=f is not None and f.corrupt_only,
                                 timed_out=f is not None and f.timed_out)
        else:
            raise FetchError(f"blob {h}: still in flight after 3 waits")
        flight = self._inflight[h] = Flight(local)
        if not background:
            self.foreground.enter()
        try:
            flight.result, flight.tier = await self._fetch(h, local=local, grid=grid, account=account,
                                                           defer_local=not background, keep=keep)
        except FetchError as e:
            flight.error, flight.failure = str(e), e
            raise
        except BaseException as e:
            flight.error = f"blob {h}: fetch interrupted ({e!r})"
            raise
        finally:
            del self._inflight[h]
            flight.done.set()
            if not background:
                self.foreground.exit()
        return flight.result

    async def _fetch(self, h: str, *, local: bool, grid: bool, account: dict[str, int] | None,
                     defer_local: bool = False, keep: bool = True) -> tuple[bytes, str]:
        """Download and verify `h`; `keep` False: a pack, kept in no cache (its members are)."""
        self.counters.misses += 1
        t0 = time.monotonic()
        problems: list[str] = []
        corrupt: list[Source] = []
        found: tuple[bytes, Source] | None = None
        with trio.move_on_after(self.timeout) as scope:
            found = await search(self.grid + self.stors, h, problems, corrupt)
        if found is None:
            self.counters.errors += 1
            if scope.cancelled_caught:
                problems.append(f"gave up after fetch_timeout {self.timeout:g}s")
            raise FetchError(f"blob {h} not available: " + "; ".join(problems or ["no sources configured"]),
                             corrupt_only=bool(corrupt) and len(corrupt) == len(problems),
                             timed_out=scope.cancelled_caught)
        data, src = found
        log.debug("fetched %s (%d bytes) from %s in %.1f ms", h, len(data), src.name, (time.monotonic() - t0) * 1e3,
                  extra={"BLOB": h, "SOURCE": src.name})
        src.fetched_blobs += 1
        src.fetched_bytes += len(data)
        self.counters.bytes_by_tier[src.tier] += len(data)
        if account is not None:
            account[src.tier] += len(data)
            if isinstance(account, Account):
                account.blobs[src.tier] += 1
        await self.keeper.keep(h, data, src, self.grid, local=local, grid=grid, corrupt=corrupt,
                               defer_local=defer_local, memory=keep)
        return data, src.tier

    async def drain(self) -> None:
        """Wait until no write-back is queued (tests, shutdown)."""
        await self.keeper.drain()
