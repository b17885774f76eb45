"""Packs (see aysfsd.tree.objects): one blob holding a directory's small files.

A pack is downloaded like any blob, and each member is kept as a blob of its own once it
matches its own hash; readers of the members wait for it as for any download in flight.
A member the pack did not deliver (pack missing, corrupt, or a member that does not match)
is fetched alone.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from . import sources
from .counters import Counters
from .flight import FetchError, Flight, Foreground
from .keep import Keeper
from .verify import HASH_IN_THREAD, sha256_of

log = logging.getLogger("aysfsd.fetch")

BAD_PACKS = 4096  # packs remembered as failed: not tried again for a while (see failed)

Members = list[tuple[str, int, int]]  # (hash, offset, size) of each member
GetBlob = Callable[..., Awaitable[bytes]]  # Fetcher.get


class Packs:
    """Fetches packs for their members; shares the fetcher's in-flight records."""

    def __init__(self, inflight: dict[str, Flight], foreground: Foreground, keeper: Keeper,
                 counters: Counters, get: GetBlob, missing: Callable[[str], bool]) -> None:
        self._inflight = inflight
        self._foreground = foreground
        self._keeper = keeper
        self._counters = counters
        self._get = get
        self._missing = missing
        self._packs_inflight: set[str] = set()
        self.bad: OrderedDict[str, float] = OrderedDict()  # pack -> when it may be tried again

    def failed(self, pack: str, corrupt: bool) -> None:
        """A pack that did not deliver: its members are fetched alone for a while (for good
        when it is corrupt: its bytes cannot change; DOWN_SECONDS when it was unreachable)."""
        self.bad[pack] = float("inf") if corrupt else time.monotonic() + sources.DOWN_SECONDS
        self.bad.move_to_end(pack)
        if len(self.bad) > BAD_PACKS:
            self.bad.popitem(last=False)

    def is_bad(self, pack: str) -> bool:
        until = self.bad.get(pack)
        return until is not None and time.monotonic() < until

    def fetch(self, pack: str, members: Members, *, local: bool, grid: bool,
              account: dict[str, int] | None) -> None:
        """Fetch pack `pack` in the background for its members that are missing; from the
        moment this returns, readers of those members wait for the pack."""
        nursery = self._keeper.nursery
        if nursery is None:
            return
        flights = self._flights(pack, members, local)
        if flights:
            self._foreground.enter()
            nursery.start_soon(self._fetch, pack, flights, local, grid, account, True)

    async def get(self, pack: str, members: Members, *, local: bool, grid: bool,
                  account: dict[str, int] | None) -> None:
        """Fetch pack `pack` now, as a reader would, for its missing members (readers of them
        wait for it); returns once they are had (or left for their readers to fetch alone)."""
        flights = self._flights(pack, members, local)
        if flights:
            self._foreground.enter()
            await self._fetch(pack, flights, local, grid, account, True)

    async def load(self, pack: str, members: Members, *, local: bool, grid: bool,
                   data: bytes | None = None) -> list[str]:
        """Prefetch: fetch pack `pack` now (after foreground fetches; or take its verified
        bytes `data`) for its missing members, stored before this returns; returns the members
        it did not deliver (fetch them alone)."""
        await self._foreground.wait_idle()
        if self.is_bad(pack):
            return [h for h, _, _ in members if self._missing(h)]
        flights = self._flights(pack, members, local)
        if flights:
            await self._fetch(pack, flights, local, grid, None, False, data)
        return [h for h, (f, _, _) in flights.items() if f.result is None]

    async def load_many(self, packs: list[tuple[str, Members]], *, grid: bool, at_once: int,
                        claimed: trio.Event | None = None) -> int:
        """Fetch many packs for their missing members, kept in the local cache (a version's
        directory objects: see aysfsd.fuse.treeload), `at_once` at a time, in order, as readers
        need them (like `fetch`, not after foreground fetches like `load`). Every missing member is
        claimed first (`claimed` is set then): a reader that needs one waits for its pack
        rather than asking for it alone. Returns how many packs delivered."""
        todo = [(p, self._flights(p, ms, True)) for p, ms in packs]
        if claimed is not None:
            claimed.set()
        limit = trio.CapacityLimiter(at_once)
        delivered = 0

        async def one(pack: str, flights: dict[str, tuple[Flight, int, int]]) -> None:
            nonlocal delivered
            try:
                async with limit:
                    # as a reader's: the members are served at once (from memory) while their
                    # LMDB write follows, and prefetch waits
                    self._foreground.enter()
                    await self._fetch(pack, flights, True, grid, None, True)
            finally:
                for h, (f, _, _) in flights.items():  # never fetched (cancelled while waiting): released
                    if not f.done.is_set():
                        f.error, f.retry = f"pack {pack}: not fetched", True
                        if self._inflight.get(h) is f:
                            del self._inflight[h]
                        f.done.set()
                self._packs_inflight.discard(pack)
            delivered += any(f.result is not None for f, _, _ in flights.values())

        async with trio.open_nursery() as n:
            for pack, flights in todo:
                if flights:
                    n.start_soon(one, pack, flights)
        return delivered

    async def assembled(self, pack: str, members: Members) -> bytes | None:
        """Pack `pack` rebuilt from its members when all of them are here (local cache or
        memory) and the result matches the pack's hash; else None. Spares a download when a
        grid cache needs a pack whose members were fetched already."""
        for h, _, _ in members:  # e.g. the pack itself still coming for a reader
            f = self._inflight.get(h)
            if f is not None:
                await f.done.wait()
        parts: list[bytes] = []
        pos = 0
        for h, off, size in members:
            if off != pos:
                return None
            b = self._keeper.cache.get(h)
            if b is None:
                b = self._keeper.memory.get(h)
            if b is None or len(b) != size:
                return None
            parts.append(b)
            pos += size
        data = b"".join(parts)
        return data if await sha256_of(data) == pack else None

    def _flights(self, pack: str, members: Members, local: bool) -> dict[str, tuple[Flight, int, int]]:
        """In-flight records for the missing members of a pack not already coming or failed."""
        if pack in self._packs_inflight or self.is_bad(pack):
            return {}
        flights: dict[str, tuple[Flight, int, int]] = {}
        for h, off, size in members:
            # (a member that is the pack itself, as a hostile tree can say: the pack's own
            # download brings it; a flight of its own would wait for itself)
            if h not in flights and h != pack and self._missing(h):
                flights[h] = (Flight(local), off, size)
        for h, (f, _, _) in flights.items():
            self._inflight[h] = f
        if flights:
            self._packs_inflight.add(pack)
        return flights

    async def _fetch(self, pack: str, flights: dict[str, tuple[Flight, int, int]], local: bool,
                     grid: bool, account: dict[str, int] | None, foreground: bool,
                     data: bytes | None = None) -> None:
        error = ""
        corrupt = False
        try:
            try:
                if data is None:
                    data = await self._get(pack, local=False, grid=grid, account=account, keep=False)
                self._counters.packs += 1
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
                        self._counters.pack_members += 1
                        keep.append((h, f.result))
                    elif not error:
                        error, corrupt = f"pack {pack}: member {h} does not match its hash", True
                        log.error("%s: members fetched alone", error, extra={"BLOB": pack})
                memory = self._keeper.memory
                if not local:
                    for h, b in keep:
                        memory.put(h, b)
                elif foreground and not self._keeper.queue_full():  # readers have the bytes; the LMDB write follows
                    for h, b in keep:
                        memory.put(h, b)
                        self._keeper.queue_local(h, b)
                else:  # prefetch (or a long queue): in the local cache when it returns
                    await self._keeper.put_local(keep)
            if error:
                self.failed(pack, corrupt)
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
                self._foreground.exit()
