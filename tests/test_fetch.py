"""The Fetcher in process (trio, real LMDB and directory stores, no FUSE): single-flight,
verification, tier order, write-back and repair, failover, timeouts, foreground priority."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from aysfsd.stores import DirStore, StoreError, StoreTimeout
from aysfsd.stores.layout import blob_path
from aysfsd.tiers import Fetcher, FetchError, Source, keep, sources
from aysfsd.tiers.local import LocalCache


class CountingStore(DirStore):
    """A real directory store that counts requests, can be slow, fail or hang."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(str(root), timeout=2.0)
        self.delay = delay
        self.fetches = 0
        self.stores = 0
        self.fail: str | None = None  # "error", "timeout" or "hang"

    async def fetch(self, rel: str) -> bytes | None:
        self.fetches += 1
        if self.fail == "hang":
            await trio.sleep_forever()
        if self.fail == "error":
            raise StoreError(f"{self.url}: connection refused (test)")
        if self.fail == "timeout":
            raise StoreTimeout(f"{self.url}: timed out (test)")
        await trio.sleep(self.delay)
        return await super().fetch(rel)

    async def store(self, rel: str, data: bytes) -> None:
        self.stores += 1
        await super().store(rel, data)

    def put(self, data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        self.write(blob_path(h), data)
        return h

    def path(self, h: str) -> Path:
        return self.root / blob_path(h)


def payload(i: int, size: int = 100_000) -> bytes:
    return random.Random(i).randbytes(size)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[LocalCache]:
    c = LocalCache(str(tmp_path / "lmdb"), 64 << 20)
    yield c
    c.close()


def make(cache: LocalCache, grid: list[CountingStore], stors: list[CountingStore],
         timeout: float = 5.0, writable: bool = True) -> Fetcher:
    return Fetcher(cache, [Source(g, "grid", writable=writable) for g in grid],
                   [Source(s, "stor") for s in stors], timeout=timeout)


def test_single_flight(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor", delay=0.2)
    data = payload(1, 3 << 20)
    h = stor.put(data)
    f = make(cache, [], [stor])
    results: list[bytes] = []

    async def main() -> None:
        async def one() -> None:
            results.append(await f.get(h))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)

    trio.run(main)
    assert stor.fetches == 1
    assert len(results) == 20 and all(r == data for r in results)
    assert cache.get(h) == data
    assert f.counters.misses == 1


def test_single_flight_failure_reaches_every_waiter(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor", delay=0.1)
    h = hashlib.sha256(b"missing").hexdigest()
    f = make(cache, [], [stor])
    errors: list[str] = []

    async def main() -> None:
        async def one() -> None:
            try:
                await f.get(h)
            except FetchError as e:
                errors.append(str(e))

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(one)

    trio.run(main)
    assert stor.fetches == 1 and len(errors) == 10
    assert all("not found" in e for e in errors)


def test_hash_mismatch_is_an_error_never_bytes(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor")
    data = payload(2)
    h = stor.put(data)
    stor.path(h).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    f = make(cache, [], [stor])
    with pytest.raises(FetchError, match="corrupt"):
        trio.run(f.get, h)
    assert not cache.has(h) and f.memory.get(h) is None
    assert f.stors[0].corrupt == 1 and not f.stors[0].is_down()  # corrupt is not "down"


def test_tiers_in_order_write_back_and_repair(tmp_path: Path, cache: LocalCache,
                                              caplog: pytest.LogCaptureFixture) -> None:
    g1, g2 = CountingStore(tmp_path / "g1"), CountingStore(tmp_path / "g2")
    stor = CountingStore(tmp_path / "stor")
    a, b, c = payload(10), payload(11), payload(12)
    ha, hb, hc = stor.put(a), stor.put(b), stor.put(c)
    g2.put(b)
    g1.path(hc).parent.mkdir(parents=True, exist_ok=True)
    g1.path(hc).write_bytes(b"garbage")  # corrupt in the first grid cache
    f = make(cache, [g1, g2], [stor])

    async def main() -> None:
        assert await f.get(ha) == a  # from the stor: written back to both grid caches
        assert await f.get(hb) == b  # from g2: written back to g1 only
        assert await f.get(hc) == c  # corrupt in g1, found in the stor: g1 repaired

    trio.run(main)
    assert [s.fetched_blobs for s in f.grid + f.stors] == [0, 1, 2]
    assert g1.path(ha).read_bytes() == a and g2.path(ha).read_bytes() == a
    assert g1.path(hb).read_bytes() == b
    assert g1.path(hc).read_bytes() == c  # repaired
    assert g2.stores == 2  # a and c (c was missing in g2)
    assert f"corrupt blob {hc} from {g1.url} (grid cache" in caplog.text
    assert "repairing corrupt blob" in caplog.text
    assert not list(g1.root.rglob("*.tmp.*"))  # atomic writes leave no temp files


def test_no_write_back_when_grid_flag_off_or_not_writable(tmp_path: Path, cache: LocalCache) -> None:
    g = CountingStore(tmp_path / "g")
    stor = CountingStore(tmp_path / "stor")
    h1, h2 = stor.put(payload(20)), stor.put(payload(21))
    f = make(cache, [g], [stor])
    trio.run(lambda: f.get(h1, grid=False))
    assert g.stores == 0
    f2 = make(cache, [g], [stor], writable=False)
    trio.run(f2.get, h2)
    assert g.stores == 0 and not g.path(h2).exists()


def test_local_off_keeps_blobs_out_of_lmdb(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor")
    data = payload(30)
    h = stor.put(data)
    f = make(cache, [], [stor])

    async def main() -> None:
        assert await f.get(h, local=False) == data
        assert await f.get(h, local=False) == data  # from memory, not the stor again

    trio.run(main)
    assert not cache.has(h) and stor.fetches == 1 and f.counters.memory_hits == 1


def test_blob_too_big_for_the_local_cache_is_served_from_memory(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)  # 1 MiB: blobs over ~100 KiB are not stored
    stor = CountingStore(tmp_path / "stor")
    data = payload(31, 300_000)
    h = stor.put(data)
    f = make(c, [], [stor])

    async def main() -> None:
        for _ in range(5):
            assert await f.get(h) == data

    trio.run(main)
    assert not c.has(h) and stor.fetches == 1
    c.close()


def test_failover_down_marking_and_recovery(tmp_path: Path, cache: LocalCache,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DOWN_SECONDS", 60.0)
    a, b = CountingStore(tmp_path / "a"), CountingStore(tmp_path / "b")
    blobs = [payload(40 + i) for i in range(4)]
    hs = [a.put(d) for d in blobs]
    for d in blobs:
        b.put(d)
    f = make(cache, [], [a, b])
    a.fail = "error"

    async def main() -> None:
        t = trio.current_time()
        assert await f.get(hs[0]) == blobs[0]
        took = trio.current_time() - t
        assert a.fetches == 1 + sources.RETRIES  # retried with backoff, then marked down
        assert 0.1 <= took < 1.5
        assert f.stors[0].is_down() and f.stors[0].failures == 1
        assert await f.get(hs[1]) == blobs[1]
        assert a.fetches == 1 + sources.RETRIES  # skipped while down
        # everything down: the down sources get one probe each, then EIO quickly
        b.fail = "error"
        t = trio.current_time()
        with pytest.raises(FetchError) as e:
            await f.get(hs[2])
        assert trio.current_time() - t < 1.5
        assert "down" in str(e.value)
        # the first stor comes back: the probe finds it at once, no waiting for DOWN_SECONDS...
        a.fail = None
        requests = a.fetches + b.fetches
        # ...but the blob whose fetch just failed answers at once for FAILED_SECONDS (the kernel
        # retries a failed READ at once): no request
        with pytest.raises(FetchError) as again:
            await f.get(hs[2])
        assert str(again.value) == str(e.value) and a.fetches + b.fetches == requests
        assert f.counters.errors_remembered == 1
        assert await f.get(hs[3]) == blobs[3]
        assert not f.stors[0].is_down()
        # cached data is unaffected by sources being down
        a.fail = b.fail = "error"
        assert await f.get(hs[0]) == blobs[0]

    trio.run(main)


def test_timeouts_are_not_retried(tmp_path: Path, cache: LocalCache) -> None:
    a, b = CountingStore(tmp_path / "a"), CountingStore(tmp_path / "b")
    data = payload(50)
    h = a.put(data)
    b.put(data)
    a.fail = "timeout"
    f = make(cache, [], [a, b])
    assert trio.run(f.get, h) == data
    assert a.fetches == 1 and f.stors[0].is_down()


def test_fetch_timeout_bounds_a_hanging_source(tmp_path: Path, cache: LocalCache) -> None:
    a = CountingStore(tmp_path / "a")
    h = a.put(payload(60))
    a.fail = "hang"
    f = make(cache, [], [a], timeout=0.5)
    t = time.monotonic()
    with pytest.raises(FetchError, match="gave up after fetch_timeout 0.5s"):
        trio.run(f.get, h)
    assert time.monotonic() - t < 1.5
    assert f.stors[0].is_down()  # slow is a failure: it held the fetch to its end


def test_background_waits_for_foreground(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor", delay=0.3)
    fg, bg = payload(70), payload(71)
    hf, hb = stor.put(fg), stor.put(bg)
    f = make(cache, [], [stor])
    done: list[tuple[str, float]] = []

    async def main() -> None:
        t0 = trio.current_time()

        async def get(h: str, name: str, background: bool) -> None:
            await f.get(h, background=background)
            done.append((name, trio.current_time() - t0))

        async with trio.open_nursery() as n:
            n.start_soon(get, hf, "fg", False)
            await trio.sleep(0.05)
            n.start_soon(get, hb, "bg", True)

    trio.run(main)
    assert [d[0] for d in done] == ["fg", "bg"]
    assert done[1][1] >= 0.55  # started only after the foreground fetch finished


def test_waiter_wanting_local_stores_what_a_local_off_owner_fetched(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor", delay=0.2)
    data = payload(80)
    h = stor.put(data)
    f = make(cache, [], [stor])

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(lambda: f.get(h, local=False))
            await trio.sleep(0.05)
            n.start_soon(lambda: f.get(h, local=True))

    trio.run(main)
    assert stor.fetches == 1 and cache.get(h) == data


def test_background_write_back_in_a_nursery(tmp_path: Path, cache: LocalCache) -> None:
    g = CountingStore(tmp_path / "g")
    stor = CountingStore(tmp_path / "stor")
    blobs = [payload(90 + i) for i in range(8)]
    hs = [stor.put(d) for d in blobs]
    f = make(cache, [g], [stor])

    async def main() -> None:
        async with trio.open_nursery() as n:
            f.nursery = n
            for h, d in zip(hs, blobs, strict=True):
                assert await f.get(h) == d
            with trio.fail_after(5):
                await f.drain()

    trio.run(main)
    assert all(g.path(h).read_bytes() == d for h, d in zip(hs, blobs, strict=True))
    assert f.counters.writebacks == 8 and f.keeper.writeback_pending == 0


class SlowDiskCache(LocalCache):
    """The real LMDB cache on a disk that commits slowly (a busy or network disk)."""

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        time.sleep(0.05)
        return super().put_many(items)


def test_local_write_queue_is_bounded_when_the_disk_is_slower_than_the_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keep, "LOCAL_QUEUE_BUDGET", 1 << 20)
    cache = SlowDiskCache(str(tmp_path / "lmdb"), 64 << 20)
    stor = CountingStore(tmp_path / "stor")
    blobs = [payload(300 + i, 200_000) for i in range(40)]
    hs = [stor.put(d) for d in blobs]
    f = make(cache, [], [stor])
    most = 0

    async def main() -> None:
        nonlocal most
        async with trio.open_nursery() as n:
            f.nursery = n
            for h, d in zip(hs, blobs, strict=True):
                assert await f.get(h) == d
                most = max(most, f.keeper.local_queue()[1])
            with trio.fail_after(10):
                await f.flushed()

    try:
        trio.run(main)
        assert f.keeper.local_queue() == (0, 0)
        # the queue filled to its budget, then readers wrote their own blobs (back-pressure)
        assert (1 << 20) <= most < (1 << 20) + 200_000
        assert all(cache.get(h) == d for h, d in zip(hs, blobs, strict=True))
    finally:
        cache.close()


# -- packs ------------------------------------------------------------------------------------------


def make_pack(stor: CountingStore, files: list[bytes]) -> tuple[str, list[tuple[str, int, int]]]:
    """A pack of `files` in the stor (each also a blob of its own): (pack hash, members)."""
    members, off = [], 0
    for d in files:
        members.append((stor.put(d), off, len(d)))
        off += len(d)
    return stor.put(b"".join(files)), members


def test_pack_delivers_its_members_with_one_request(tmp_path: Path, cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor", delay=0.05)
    files = [payload(200 + i, 1000 + i) for i in range(30)]
    pack, members = make_pack(stor, files)
    f = make(cache, [], [stor])

    async def main() -> None:
        async with trio.open_nursery() as n:
            f.nursery = n
            f.fetch_pack(pack, members, local=True, grid=False, account=None)
            f.fetch_pack(pack, members, local=True, grid=False, account=None)  # already coming: nothing
            got = [await f.get(h) for h, _, _ in members]  # readers wait for the pack
            assert got == files

    trio.run(main)
    assert stor.fetches == 1
    assert f.counters.packs == 1 and f.counters.pack_members == 30
    assert all(cache.get(h) == d for (h, _, _), d in zip(members, files, strict=True))  # kept one by one
    assert not cache.has(pack) and f.memory.get(pack) is None  # the pack itself is kept nowhere


def test_pack_assembled_from_its_members_only_when_all_are_here_and_it_matches(tmp_path: Path,
                                                                              cache: LocalCache) -> None:
    stor = CountingStore(tmp_path / "stor")
    files = [payload(400 + i, 700 + i) for i in range(6)]
    pack, members = make_pack(stor, files)
    f = make(cache, [], [stor])
    cache.put_many([(h, d) for (h, _, _), d in zip(members[:-1], files[:-1], strict=True)])

    async def main() -> None:
        assert await f.assembled(pack, members) is None  # the last member is missing
        f.memory.put(members[-1][0], files[-1])  # in memory counts (a mount without local cache)
        assert await f.assembled(pack, members) == b"".join(files)
        lying = members[:2] + [(members[3][0], members[2][1], members[3][2])] + members[3:]
        assert await f.assembled(pack, lying) is None  # not the pack's bytes: its hash says so
        gap = [(h, off + 1, size) for h, off, size in members]
        assert await f.assembled(pack, gap) is None  # members must lie back to back from 0

    trio.run(main)
    assert stor.fetches == 0


@pytest.mark.parametrize("damage", ["pack-corrupt", "member-mismatch", "pack-unreachable"])
def test_pack_that_does_not_deliver_costs_requests_not_data(tmp_path: Path, cache: LocalCache, damage: str) -> None:
    stor = CountingStore(tmp_path / "stor")
    files = [payload(300 + i, 500) for i in range(5)]
    pack, members = make_pack(stor, files)
    if damage == "pack-corrupt":
        stor.path(pack).write_bytes(b"x" + stor.path(pack).read_bytes()[1:])
    elif damage == "member-mismatch":  # a hostile tree: the pack is intact, an offset lies
        members[2] = (members[2][0], members[2][1] + 1, members[2][2])
    f = make(cache, [], [stor])

    async def main() -> None:
        async with trio.open_nursery() as n:
            f.nursery = n
            if damage == "pack-unreachable":
                stor.fail = "error"
            f.fetch_pack(pack, members, local=True, grid=False, account=None)
            with trio.fail_after(30):  # the pack fails (retries included); a count, not a time
                while pack in f.packs._packs_inflight or not f.packs.is_bad(pack):
                    await trio.sleep(0.05)
            stor.fail = None
            f.stors[0].mark_up()
            got = [await f.get(h) for h, _, _ in members]
            assert got == files  # every member right: from the pack, or alone
            fetched = stor.fetches
            f.fetch_pack(pack, members, local=True, grid=False, account=None)  # everything cached: nothing
            assert stor.fetches == fetched

    trio.run(main)
    alone = {"pack-corrupt": 5, "member-mismatch": 1, "pack-unreachable": 5}[damage]
    assert f.counters.pack_members == 5 - alone
    assert f.packs.is_bad(pack)  # not tried again at once...
    forever = f.packs.bad[pack] == float("inf")
    assert forever == (damage != "pack-unreachable")  # ...for good when corrupt, for a while when unreachable


class HangingStore(CountingStore):
    """Hangs on every fetch (a silent stor) and counts the fetches that were cancelled."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cancelled = 0

    async def fetch(self, rel: str) -> bytes | None:
        self.fetches += 1
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


def test_fetch_cancelled_when_its_last_reader_is_interrupted(tmp_path: Path, cache: LocalCache) -> None:
    """An interrupted reader (its FUSE request cancelled) leaves its flight; the download is
    cancelled when nobody else waits for it, and goes on while someone does."""
    s = HangingStore(tmp_path / "s")
    f = make(cache, [], [s], timeout=30.0)
    h1, h2 = hashlib.sha256(b"one").hexdigest(), hashlib.sha256(b"two").hexdigest()

    async def main() -> None:
        async with trio.open_nursery() as n:
            f.nursery = n
            # one reader, interrupted: its download is cancelled at once
            with trio.move_on_after(0.2) as reader:
                reader.shield = False
                async with trio.open_nursery() as r:
                    scope = trio.CancelScope()

                    async def read(h: str) -> None:
                        with scope:
                            await f.get(h)

                    r.start_soon(read, h1)
                    await trio.sleep(0.05)
                    scope.cancel()  # what an INTERRUPT does to the request's handler
            await trio.sleep(0.05)
            assert s.fetches == 1 and s.cancelled == 1 and f.missing(h1)
            # two readers of the same blob, one interrupted: the download goes on for the other
            first, second = trio.CancelScope(), trio.CancelScope()
            errors: list[str] = []

            async def read2(scope: trio.CancelScope) -> None:
                with scope:
                    try:
                        await f.get(h2)
                    except FetchError as e:
                        errors.append(str(e))

            async with trio.open_nursery() as r:
                r.start_soon(read2, first)
                r.start_soon(read2, second)
                await trio.sleep(0.05)
                first.cancel()
                await trio.sleep(0.05)
                assert s.fetches == 2 and s.cancelled == 1 and not f.missing(h2)  # still in flight
                second.cancel()
            await trio.sleep(0.05)
            assert s.cancelled == 2 and f.missing(h2) and not errors
            n.cancel_scope.cancel()

    trio.run(main)


def test_source_answering_corrupt_blobs_is_marked_down(tmp_path: Path, cache: LocalCache) -> None:
    """A source that keeps answering corrupt blobs (e.g. a portal's HTML page for every path) is
    marked down after CORRUPT_DOWN of them in a row; a good answer in between resets the count."""
    a, b = CountingStore(tmp_path / "a"), CountingStore(tmp_path / "b")
    blobs = [payload(60 + i, 1000) for i in range(6)]
    hs = [b.put(d) for d in blobs]
    for h in hs:
        a.path(h).parent.mkdir(parents=True, exist_ok=True)
        a.path(h).write_bytes(b"<html>portal</html>")
    a.put(blobs[0])  # one good copy
    f = make(cache, [], [a, b])

    async def main() -> None:
        assert await f.get(hs[1]) == blobs[1]  # corrupt in a, from b
        assert await f.get(hs[0]) == blobs[0]  # good in a: the run starts again
        for h, d in zip(hs[2:2 + sources.CORRUPT_DOWN], blobs[2:], strict=False):
            assert not f.stors[0].is_down()
            assert await f.get(h) == d
        assert f.stors[0].is_down() and f.stors[0].failures == 1
        before = a.fetches
        assert await f.get(hs[5]) == blobs[5]
        assert a.fetches == before  # skipped while down

    trio.run(main)


def test_source_still_sending_at_fetch_timeout_is_marked_down(tmp_path: Path, cache: LocalCache) -> None:
    """A source still transferring when the whole fetch runs out of fetch_timeout failed it: it is
    marked down (like a dead one), and the error says why."""
    s = HangingStore(tmp_path / "s")
    f = make(cache, [], [s], timeout=0.3)
    h = hashlib.sha256(b"x").hexdigest()

    async def main() -> None:
        with pytest.raises(FetchError) as e:
            await f.get(h)
        assert f"{s.url}: no complete answer within fetch_timeout 0.3s" in str(e.value)
        assert f.stors[0].is_down() and f.stors[0].failures == 1

    trio.run(main)
