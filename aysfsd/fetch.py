"""The tiered fetch: local cache, then grid caches in order, then stors in order, each blob verified.

One fetch per blob is in flight at a time (single-flight): concurrent readers of a
missing blob wait for the same download. A blob that fails its hash check is an error
of that source (logged, next source tried), never data for a reader.

Failover: every request is bounded by its source's `timeout` (the store enforces it:
per connect/read phase over HTTP and SSH, per operation for a directory); a transport
error is retried RETRIES times with backoff (a timeout is not: it already waited long);
a source that still fails is marked down for DOWN_SECONDS and skipped while others
remain. When no source that is up could serve a blob, the sources marked down get one
probe each (at most one in flight per source), so a stor that came back is used at
once and a dead one costs one refused connection. The whole fetch is bounded by
`fetch_timeout`: then FetchError, which the filesystem answers with EIO.

Packs (see aysfs.tree): `fetch_pack` downloads one blob holding a directory's small
files and keeps each member as a blob of its own once it matches its own hash; readers
of the members wait for it as for any download in flight. A member the pack did not
deliver (pack missing, corrupt, or a member that does not match) is fetched alone.

Write-back: with the mount's `cache.grid` on, a blob fetched from a later tier is
written to every writable grid cache tried before it (so a grid cache that missed it,
or held a corrupt copy, is filled or repaired), in the background.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from .cache import LocalCache
from .layout import blob_path
from .stores import Store, StoreError, StoreTimeout

log = logging.getLogger("aysfsd.fetch")

DOWN_SECONDS = 15.0
RETRIES = 2
BACKOFF = 0.1  # seconds before the first retry; tripled for each further one
MAX_READAHEAD = 4  # chunks fetched ahead of sequential readers at once
LOCAL_BATCH = 64  # blobs per LMDB write transaction when storing in the background
HASH_IN_THREAD = 1 << 20  # hash blobs larger than this off the trio loop
WRITEBACK_BUDGET = 64 << 20  # bytes of blobs queued for grid write-back; beyond it write-back is skipped
MEMORY_BUDGET = 64 << 20
BAD_PACKS = 4096  # packs remembered as failed: not tried again for a while (see _pack_failed)


class FetchError(Exception):
    """A blob could not be had from any tier (missing, corrupt or unreachable everywhere)."""

    def __init__(self, message: str, corrupt_only: bool = False) -> None:
        super().__init__(message)
        self.corrupt_only = corrupt_only  # every source that answered had a corrupt copy


@dataclass(eq=False)
class Source:
    """A grid cache or stor with its health and counters."""

    store: Store
    tier: str  # "grid" or "stor"
    writable: bool = True
    down_until: float = 0.0
    failures: int = 0
    fetched_blobs: int = 0
    fetched_bytes: int = 0
    corrupt: int = 0
    probing: bool = False
    probe_done: trio.Event = field(default_factory=trio.Event)  # set when a probe ends

    @property
    def name(self) -> str:
        return self.store.url

    def is_down(self) -> bool:
        return time.monotonic() < self.down_until

    def mark_down(self, reason: str, blob: str = "") -> None:
        self.failures += 1
        self.down_until = time.monotonic() + DOWN_SECONDS
        log.warning("source %s marked down for %gs: %s", self.name, DOWN_SECONDS, reason,
                    extra={"BLOB": blob, "SOURCE": self.name})

    def mark_up(self) -> None:
        if self.down_until:
            self.down_until = 0.0
            log.info("source %s answers again", self.name, extra={"SOURCE": self.name})


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    memory_hits: int = 0
    errors: int = 0
    bytes_by_tier: dict[str, int] = field(default_factory=lambda: {"local": 0, "grid": 0, "stor": 0})
    writebacks: int = 0
    writeback_errors: int = 0
    writebacks_skipped: int = 0
    packs: int = 0  # packs downloaded
    pack_members: int = 0  # blobs (files, directory objects) had from them


class MemoryLRU:
    """Recently fetched blobs kept in memory: for mounts with the local cache off, and for
    blobs the local cache did not take (too large for it, or full of pinned blobs)."""

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

    def __init__(self, local: bool) -> None:
        self.done = trio.Event()
        self.local = local  # whether the owner stores the result in the local cache
        self.result: bytes | None = None
        self.tier = ""
        self.error = ""
        self.retry = False  # a pack's member the pack did not deliver: fetch it alone


class Fetcher:
    """Gets verified blobs from the nearest tier; see the module docstring."""

    def __init__(self, cache: LocalCache, grid: list[Source], stors: list[Source],
                 timeout: float = 30.0) -> None:
        self.cache = cache
        self.grid = grid
        self.stors = stors
        self.timeout = timeout
        self.memory = MemoryLRU(MEMORY_BUDGET)
        self.counters = Counters()
        self._inflight: dict[str, _Flight] = {}
        self._readaheads = 0
        self._pending_local: list[tuple[str, bytes]] = []
        self._writer_running = False
        self._many_limit = trio.CapacityLimiter(8)
        self.nursery: trio.Nursery | None = None  # for background grid write-back
        self._writeback_limit = trio.CapacityLimiter(4)
        self._writeback_pending = 0  # bytes queued or being written back
        self._foreground = 0  # foreground network fetches in progress
        self._foreground_idle = trio.Event()
        self._foreground_idle.set()
        self._packs_inflight: set[str] = set()
        self._bad_packs: OrderedDict[str, float] = OrderedDict()  # pack -> when it may be tried again

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

    async def wait_foreground_idle(self) -> None:
        """Return once no foreground (reader) fetch is going to the network."""
        while self._foreground:
            await self._foreground_idle.wait()

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
                    await self._store_local(h, flight.result)
                return flight.result
            if not flight.retry:
                raise FetchError(flight.error)
        else:
            raise FetchError(f"blob {h}: still in flight after 3 waits")
        flight = self._inflight[h] = _Flight(local)
        if not background:
            self._foreground_enter()
        try:
            flight.result, flight.tier = await self._fetch(h, local=local, grid=grid, account=account,
                                                           defer_local=not background, keep=keep)
        except FetchError as e:
            flight.error = str(e)
            raise
        except BaseException as e:
            flight.error = f"blob {h}: fetch interrupted ({e!r})"
            raise
        finally:
            del self._inflight[h]
            flight.done.set()
            if not background:
                self._foreground_exit()
        return flight.result

    def _foreground_enter(self) -> None:
        if self._foreground == 0:
            self._foreground_idle = trio.Event()
        self._foreground += 1

    def _foreground_exit(self) -> None:
        self._foreground -= 1
        if self._foreground == 0:
            self._foreground_idle.set()

    def _pack_failed(self, pack: str, corrupt: bool) -> None:
        """A pack that did not deliver: its members are fetched alone for a while (for good
        when it is corrupt: its bytes cannot change; DOWN_SECONDS when it was unreachable)."""
        self._bad_packs[pack] = float("inf") if corrupt else time.monotonic() + DOWN_SECONDS
        self._bad_packs.move_to_end(pack)
        if len(self._bad_packs) > BAD_PACKS:
            self._bad_packs.popitem(last=False)

    def _pack_bad(self, pack: str) -> bool:
        until = self._bad_packs.get(pack)
        return until is not None and time.monotonic() < until

    def missing(self, h: str) -> bool:
        """Not cached (locally or in memory) and not being fetched."""
        return h not in self._inflight and self.memory.get(h) is None and not self.cache.has(h)

    def fetch_pack(self, pack: str, members: list[tuple[str, int, int]], *, local: bool, grid: bool,
                   account: dict[str, int] | None) -> None:
        """Fetch pack `pack` in the background for its members (hash, offset, size) that are
        missing; from the moment this returns, readers of those members wait for the pack."""
        if self.nursery is None:
            return
        flights = self._pack_flights(pack, members, local)
        if flights:
            self._foreground_enter()
            self.nursery.start_soon(self._fetch_pack, pack, flights, local, grid, account, True)

    async def load_pack(self, pack: str, members: list[tuple[str, int, int]], *, local: bool,
                        grid: bool, data: bytes | None = None) -> list[str]:
        """Prefetch: fetch pack `pack` now (after foreground fetches; or take its verified
        bytes `data`) for its missing members, stored before this returns; returns the members
        it did not deliver (fetch them alone)."""
        await self.wait_foreground_idle()
        if self._pack_bad(pack):
            return [h for h, _, _ in members if self.missing(h)]
        flights = self._pack_flights(pack, members, local)
        if flights:
            await self._fetch_pack(pack, flights, local, grid, None, False, data)
        return [h for h, (f, _, _) in flights.items() if f.result is None]

    async def assembled(self, pack: str, members: list[tuple[str, int, int]]) -> bytes | None:
        """Pack `pack` rebuilt from its members (hash, offset, size) when all of them are here
        (local cache or memory) and the result matches the pack's hash; else None. Spares a
        download when a grid cache needs a pack whose members were fetched already."""
        for h, _, _ in members:  # e.g. the pack itself still coming for a reader
            f = self._inflight.get(h)
            if f is not None:
                await f.done.wait()
        parts: list[bytes] = []
        pos = 0
        for h, off, size in members:
            if off != pos:
                return None
            b = self.cache.get(h)
            if b is None:
                b = self.memory.get(h)
            if b is None or len(b) != size:
                return None
            parts.append(b)
            pos += size
        data = b"".join(parts)
        return data if await sha256_of(data) == pack else None

    def _pack_flights(self, pack: str, members: list[tuple[str, int, int]],
                      local: bool) -> dict[str, tuple[_Flight, int, int]]:
        """In-flight records for the missing members of a pack not already coming or failed."""
        if pack in self._packs_inflight or self._pack_bad(pack):
            return {}
        flights: dict[str, tuple[_Flight, int, int]] = {}
        for h, off, size in members:
            if h not in flights and self.missing(h):
                flights[h] = (_Flight(local), off, size)
        for h, (f, _, _) in flights.items():
            self._inflight[h] = f
        if flights:
            self._packs_inflight.add(pack)
        return flights

    async def _fetch_pack(self, pack: str, flights: dict[str, tuple[_Flight, int, int]], local: bool,
                          grid: bool, account: dict[str, int] | None, foreground: bool,
                          data: bytes | None = None) -> None:
        error = ""
        corrupt = False
        try:
            try:
                if data is None:
                    data = await self.get(pack, local=False, grid=grid, account=account, keep=False)
                self.counters.packs += 1
            except FetchError as e:
                error = str(e)
                corrupt = e.corrupt_only
            if data is not None:
                pieces = {h: data[off:off + size] for h, (_, off, size) in flights.items()}

                def verify() -> dict[str, bool]:
                    return {h: hashlib.sha256(p).hexdigest() == h for h, p in pieces.items()}

                good = await trio.to_thread.run_sync(verify) if len(data) > HASH_IN_THREAD else verify()
                keep: list[tuple[str, bytes]] = []
                for h, (f, _, size) in flights.items():
                    if good[h] and len(pieces[h]) == size:
                        f.result, f.tier = pieces[h], "pack"
                        self.counters.pack_members += 1
                        keep.append((h, f.result))
                    elif not error:
                        error, corrupt = f"pack {pack}: member {h} does not match its hash", True
                        log.error("%s: members fetched alone", error, extra={"BLOB": pack})
                if not local:
                    for h, b in keep:
                        self.memory.put(h, b)
                elif foreground:  # readers have the bytes at once; the LMDB write follows
                    for h, b in keep:
                        self.memory.put(h, b)
                        self._queue_local(h, b)
                else:  # prefetch: in the local cache when it returns
                    await self._put_local(keep)
            if error:
                self._pack_failed(pack, corrupt)
        finally:
            for h, (f, _, _) in flights.items():
                if f.result is None:
                    f.error = error or f"pack {pack}: fetch interrupted"
                    f.retry = True
                if self._inflight.get(h) is f:
                    del self._inflight[h]
                f.done.set()
            self._packs_inflight.discard(pack)
            if foreground:
                self._foreground_exit()

    async def _fetch(self, h: str, *, local: bool, grid: bool, account: dict[str, int] | None,
                     defer_local: bool = False, keep: bool = True) -> tuple[bytes, str]:
        """Download and verify `h`; `keep` False: a pack, kept in no cache (its members are)."""
        self.counters.misses += 1
        t0 = time.monotonic()
        problems: list[str] = []
        corrupt: list[Source] = []
        found: tuple[bytes, Source] | None = None
        with trio.move_on_after(self.timeout) as scope:
            found = await self._search(h, problems, corrupt)
        if found is None:
            self.counters.errors += 1
            if scope.cancelled_caught:
                problems.append(f"gave up after fetch_timeout {self.timeout:g}s")
            raise FetchError(f"blob {h} not available: " + "; ".join(problems or ["no sources configured"]),
                             corrupt_only=bool(corrupt) and len(corrupt) == len(problems))
        data, src = found
        log.debug("fetched %s (%d bytes) from %s in %.1f ms", h, len(data), src.name, (time.monotonic() - t0) * 1e3,
                  extra={"BLOB": h, "SOURCE": src.name})
        src.fetched_blobs += 1
        src.fetched_bytes += len(data)
        self.counters.bytes_by_tier[src.tier] += len(data)
        if account is not None:
            account[src.tier] += len(data)
        await self._keep(h, data, src, local=local, grid=grid, corrupt=corrupt, defer_local=defer_local,
                         memory=keep)
        return data, src.tier

    async def _search(self, h: str, problems: list[str], corrupt: list[Source]) -> tuple[bytes, Source] | None:
        rel = blob_path(h)
        skipped: list[Source] = []
        for src in self.grid + self.stors:
            if src.is_down():
                problems.append(f"{src.name}: down")
                skipped.append(src)
                continue
            data = await self._from(src, rel, h, problems, corrupt, RETRIES)
            if data is not None:
                return data, src
        for src in skipped:  # last resort: one probe of each source marked down
            if src.probing:
                # another fetch is probing it: wait for that answer rather than skip the source
                await src.probe_done.wait()
                if src.is_down():
                    continue
                data = await self._from(src, rel, h, problems, corrupt, 0)
            else:
                src.probing = True
                src.probe_done = trio.Event()
                try:
                    data = await self._from(src, rel, h, problems, corrupt, 0)
                finally:
                    src.probing = False
                    src.probe_done.set()
            if data is not None:
                return data, src
        return None

    async def _from(self, src: Source, rel: str, h: str, problems: list[str], corrupt: list[Source],
                    retries: int) -> bytes | None:
        """The verified blob from one source, or None (reason appended to `problems`)."""
        attempt = 0
        while True:
            try:
                data = await src.store.fetch(rel)
                break
            except StoreError as e:
                if attempt < retries and not isinstance(e, StoreTimeout):
                    await trio.sleep(BACKOFF * 3 ** attempt)
                    attempt += 1
                    continue
                src.mark_down(str(e), h)
                problems.append(f"{src.name}: {e}")
                return None
        src.mark_up()
        if data is None:
            problems.append(f"{src.name}: not found")
            return None
        if await sha256_of(data) != h:
            src.corrupt += 1
            corrupt.append(src)
            log.error("corrupt blob %s from %s (%s, %d bytes, hash mismatch): skipped", h, src.name,
                      "grid cache" if src.tier == "grid" else "stor", len(data),
                      extra={"BLOB": h, "SOURCE": src.name})
            problems.append(f"{src.name}: corrupt (hash mismatch)")
            return None
        return data

    # -- keeping what was fetched -----------------------------------------------------------------

    def _queue_local(self, h: str, data: bytes) -> None:
        """Queue a blob for the local cache; one writer task commits the queue in batches."""
        self._pending_local.append((h, data))
        if not self._writer_running and self.nursery is not None:
            self._writer_running = True
            self.nursery.start_soon(self._local_writer)

    async def _local_writer(self) -> None:
        try:
            while self._pending_local:
                batch, self._pending_local = self._pending_local[:LOCAL_BATCH], self._pending_local[LOCAL_BATCH:]
                await self._put_local(batch)
        finally:
            self._writer_running = False

    async def _put_local(self, blobs: list[tuple[str, bytes]]) -> None:
        try:
            stored = await trio.to_thread.run_sync(self.cache.put_many, blobs)
        except Exception as e:  # a broken disk must not fail reads
            log.error("local cache: could not store %d blobs: %s", len(blobs), e)
            stored = [False] * len(blobs)
        for (h, data), ok in zip(blobs, stored, strict=True):
            if not ok:
                self.memory.put(h, data)

    async def _store_local(self, h: str, data: bytes) -> None:
        try:
            stored = await trio.to_thread.run_sync(self.cache.put, h, data)
        except Exception as e:  # a broken disk must not fail the read
            log.error("local cache: could not store blob %s: %s", h, e, extra={"BLOB": h})
            stored = False
        if not stored:
            self.memory.put(h, data)

    async def _keep(self, h: str, data: bytes, src: Source, *, local: bool, grid: bool,
                    corrupt: list[Source], defer_local: bool = False, memory: bool = True) -> None:
        if not memory:
            pass
        elif local and defer_local and self.nursery is not None:
            # the reader gets the bytes now; the LMDB write (a thread hop and a copy) follows,
            # and the in-memory cache serves the blob until it has landed
            self.memory.put(h, data)
            self._queue_local(h, data)
        elif local:
            await self._store_local(h, data)
        else:
            self.memory.put(h, data)
        if not grid:
            return
        # fill (and so repair) every writable grid cache tried before the one that answered
        for g in self.grid:
            if g is src:
                break
            if not g.writable or g.is_down():
                continue
            if g in corrupt:
                log.warning("grid cache %s: repairing corrupt blob %s by write-back", g.name, h,
                            extra={"BLOB": h, "SOURCE": g.name})
            if self.nursery is None:
                await self._write_back(g, h, data, queued=False)
            elif self._writeback_pending + len(data) > WRITEBACK_BUDGET:
                self.counters.writebacks_skipped += 1
                log.debug("grid cache %s: write-back of %s skipped (%d bytes already queued)", g.name, h,
                          self._writeback_pending, extra={"BLOB": h})
            else:
                self._writeback_pending += len(data)
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
                self._writeback_pending -= len(data)

    async def drain(self) -> None:
        """Wait until no write-back is queued (tests, shutdown)."""
        while self._writeback_pending:
            await trio.sleep(0.01)
