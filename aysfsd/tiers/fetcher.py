"""The Fetcher: a verified blob from the nearest tier, one download per blob at a time.

The whole fetch is bounded by `fetch_timeout`: then FetchError, which the filesystem
answers with EIO.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

import trio

from ..stores import describe
from .counters import Account, Counters
from .flight import FetchError, Flight, Foreground
from .keep import Keeper
from .local import LocalCache
from .memory import MEMORY_BUDGET, MemoryLRU
from .packs import Members, Packs
from .sources import Search, Source, search

log = logging.getLogger("aysfsd.fetch")

MAX_READAHEAD = 8  # chunks fetched ahead of sequential readers at once (32 MiB in flight, at most)
FAILED_SECONDS = 2.0  # a failed fetch answers its blob's next reads at once for this long
FAILED_BLOBS = 4096  # failed fetches remembered at most


class _Remembered(FetchError):
    """A fetch of this blob failed a moment ago (see Fetcher._remember_failure)."""


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
        self._failed: OrderedDict[str, tuple[float, FetchError]] = OrderedDict()  # blob -> (until, error)
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

    def waiting(self) -> int:
        """Fetches waiting on a download in progress (a reader's request, a profile's or a
        listing's load): what a stor that does not answer holds up (status)."""
        return sum(f.waiters for f in self._inflight.values())

    async def wait_foreground_idle(self) -> None:
        """Return once no foreground (reader) fetch is going to the network."""
        await self.foreground.wait_idle()

    def warm(self, n: int) -> None:
        """Have `n` connections open to each source that is up, opened in the background: a
        cold start's first requests go out together, and a new connection costs a round trip."""
        if self.nursery is None:
            return
        for src in self.grid + self.stors:
            if not src.is_down():
                self.nursery.start_soon(src.store.warm, n)

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
        """The whole blob `h`, verified. Raises FetchError within `timeout` seconds, however
        it is had (a download of its own, another one's, a pack's and then alone).

        `local`/`grid`: keep the blob in the local cache / write it back to the grid caches.
        `account` (a mount's bytes-by-tier) is credited with the bytes downloaded from a grid
        cache or stor, once per download (the mount's reads credit "local" themselves).
        `background` (prefetch) fetches wait while foreground fetches are in progress.
        `keep` False: not kept in memory either (a pack, whose members are what is kept)."""
        if background:
            await self.wait_foreground_idle()
        try:
            return await self._get(h, local=local, grid=grid, account=account, background=background, keep=keep)
        except _Remembered:
            raise
        except FetchError as e:
            self._remember_failure(h, e)
            raise

    async def _get(self, h: str, *, local: bool, grid: bool, account: dict[str, int] | None, background: bool,
                   keep: bool) -> bytes:
        deadline = trio.current_time() + self.timeout
        for _ in range(3):  # a pack that failed a member sends us round again; bounded
            data = self._cached(h)
            if data is not None:
                return data
            failed = self._failed.get(h)
            if failed is not None and failed[0] > time.monotonic():
                self.counters.errors_remembered += 1
                e = failed[1]
                raise _Remembered(str(e), corrupt_only=e.corrupt_only, timed_out=e.timed_out)
            flight = self._inflight.get(h)
            until = deadline
            if flight is None:
                flight = self._start(h, deadline, local=local, grid=grid, account=account, background=background,
                                     keep=keep)
                if flight.scope is None:  # no nursery: fetched by this task
                    await self._fly(h, flight, deadline, local=local, grid=grid, account=account,
                                    background=background, keep=keep)
                until = math.inf  # it ends by our deadline, and its error says more
            if not await flight.wait(until):
                raise FetchError(f"blob {h} not available: gave up after fetch_timeout {self.timeout:g}s "
                                 f"waiting for its download", timed_out=True)
            if flight.result is not None:
                if local and not flight.local:
                    await self.keeper.store_local(h, flight.result)
                return flight.result
            if not flight.retry:
                f = flight.failure
                raise FetchError(flight.error, corrupt_only=f is not None and f.corrupt_only,
                                 timed_out=f is not None and f.timed_out)
        raise FetchError(f"blob {h}: still in flight after 3 waits")

    def _start(self, h: str, deadline: float, *, local: bool, grid: bool, account: dict[str, int] | None,
               background: bool, keep: bool) -> Flight:
        """A new flight for `h`, run in the background when there is a nursery: so that it can
        be cancelled when no reader waits for it anymore, whoever started it."""
        flight = self._inflight[h] = Flight(local)
        if not background:
            self.foreground.enter()
        if self.nursery is not None:
            flight.scope = trio.CancelScope()
            self.nursery.start_soon(lambda: self._fly(h, flight, deadline, local=local, grid=grid, account=account,
                                                      background=background, keep=keep))
        return flight

    async def _fly(self, h: str, flight: Flight, deadline: float, *, local: bool, grid: bool,
                   account: dict[str, int] | None, background: bool, keep: bool) -> None:
        """Run one flight to its end (by `deadline`, its starter's); never raises but
        trio.Cancelled from outside it."""
        try:
            with flight.scope or trio.CancelScope():
                flight.result, flight.tier = await self._fetch(h, deadline, local=local, grid=grid, account=account,
                                                               defer_local=not background, keep=keep)
            if flight.result is None:
                flight.error = f"blob {h}: fetch cancelled (no reader waits for it anymore)"
                flight.retry = True  # a reader that came just now: it starts another
                log.debug("%s", flight.error, extra={"BLOB": h})
        except FetchError as e:
            flight.error, flight.failure = str(e), e
        except Exception as e:  # noqa: BLE001 - a flight must not end the daemon's nursery
            log.exception("fetching blob %s", h, extra={"BLOB": h})
            flight.error = f"blob {h}: fetch failed: {describe(e)}"
        except BaseException as e:
            flight.error = f"blob {h}: fetch interrupted ({e!r})"
            raise
        finally:
            del self._inflight[h]
            flight.done.set()
            if not background:
                self.foreground.exit()

    def _remember_failure(self, h: str, e: FetchError) -> None:
        """A failed fetch is not tried again for FAILED_SECONDS: the kernel retries a failed
        READ at once, and that retry gets its EIO now instead of waiting again."""
        self._failed[h] = (time.monotonic() + FAILED_SECONDS, e)
        self._failed.move_to_end(h)
        while len(self._failed) > FAILED_BLOBS:
            self._failed.popitem(last=False)

    async def _fetch(self, h: str, deadline: float, *, local: bool, grid: bool, account: dict[str, int] | None,
                     defer_local: bool = False, keep: bool = True) -> tuple[bytes, str]:
        """Download and verify `h`; `keep` False: a pack, kept in no cache (its members are)."""
        self.counters.misses += 1
        t0 = time.monotonic()
        st = Search()
        found: tuple[bytes, Source] | None = None
        with trio.move_on_at(deadline) as scope:
            found = await search(self.grid + self.stors, h, st)
        if found is None:
            self.counters.errors += 1
            if scope.cancelled_caught:
                st.gave_up(h, self.timeout)
                st.problems.append(f"gave up after fetch_timeout {self.timeout:g}s")
            raise FetchError(f"blob {h} not available: " + "; ".join(st.problems or ["no sources configured"]),
                             corrupt_only=bool(st.corrupt) and len(st.corrupt) == len(st.problems),
                             timed_out=scope.cancelled_caught)
        self._failed.pop(h, None)
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
        await self.keeper.keep(h, data, src, self.grid, local=local, grid=grid, corrupt=st.corrupt,
                               defer_local=defer_local, memory=keep)
        return data, src.tier

    async def drain(self) -> None:
        """Wait until no write-back is queued (tests, shutdown)."""
        await self.keeper.drain()

    async def flushed(self) -> None:
        """Wait until every blob queued for the local cache is written (shutdown: drain() waits
        only for the grid write-backs)."""
        await self.keeper.flushed()
