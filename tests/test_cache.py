"""LocalCache on a real LMDB environment: bound, LRU order, pinning, map full, purge, ranges."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from aysfsd.tiers.local import LocalCache


def blob(i: int, size: int) -> tuple[str, bytes]:
    data = random.Random(i).randbytes(size)
    return hashlib.sha256(data).hexdigest(), data


def present(c: LocalCache, hashes: list[str]) -> list[str]:
    return [h for h in hashes if c.has(h)]


def stored_bytes(c: LocalCache, blobs: list[tuple[str, bytes]]) -> int:
    return sum(len(d) for h, d in blobs if c.has(h))


def test_put_get_range_and_accounting(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)
    h, d = blob(1, 5000)
    assert c.get(h) is None and c.get_range(h, 0, 10) is None and not c.has(h)
    assert c.put(h, d) is True
    assert c.put(h, d) is True  # again: no double count
    assert c.size() == 5000 and c.stats().entries == 1
    assert c.get(h) == d
    assert c.get_range(h, 0, 10) == d[:10]
    assert c.get_range(h, 4990, 100) == d[4990:]  # clipped at the end
    assert c.get_range(h, 5000, 10) == b""
    assert c.get_range(h, 1234, 2000) == d[1234:3234]
    c.put_meta("ref:x", b"{}")
    c.close()
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)  # persisted
    assert c.get(h) == d and c.size() == 5000 and c.get_meta("ref:x") == b"{}"
    c.close()


def test_blob_over_a_tenth_of_the_bound_is_not_stored(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 100_000)
    h, d = blob(1, 10_001)
    assert c.put(h, d) is False and not c.has(h) and c.size() == 0
    h, d = blob(2, 10_000)
    assert c.put(h, d) is True


def test_eviction_is_lru_in_touch_order(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 100_000)
    blobs = [blob(i, 10_000) for i in range(10)]
    for h, d in blobs:
        assert c.put(h, d)
    assert c.size() == 100_000 and c.evicted_blobs == 0
    # touch in a scrambled order, all within the same second: the order must still count
    order = [3, 7, 0, 9, 1, 5, 8, 2, 6, 4]
    for i in order:
        assert c.get_range(blobs[i][0], 0, 1) is not None
    h, d = blob(100, 10_000)
    assert c.put(h, d)
    # over the bound: evicted down to 90% minus room for the new blob: the two oldest touched
    gone = [i for i in range(10) if not c.has(blobs[i][0])]
    assert gone == sorted(order[:2])
    assert c.size() == 90_000 == stored_bytes(c, blobs + [(h, d)])
    assert c.evicted_blobs == 2 and c.evicted_bytes == 20_000
    # a put of an existing blob counts as a use
    c.put(blobs[order[2]][0], blobs[order[2]][1])
    for j in range(2):
        hj, dj = blob(200 + j, 10_000)
        assert c.put(hj, dj)
    assert c.has(blobs[order[2]][0]) and not c.has(blobs[order[3]][0])
    assert c.size() <= c.limit
    c.close()


def test_pinned_blobs_are_never_evicted(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 100_000)
    blobs = [blob(i, 10_000) for i in range(10)]
    for h, d in blobs:
        c.put(h, d)
    pinned = {blobs[0][0], blobs[1][0]}  # the two oldest
    c.set_pinned(lambda: pinned)
    for i in range(20, 40):
        h, d = blob(i, 10_000)
        assert c.put(h, d)
        assert c.size() <= c.limit
    assert all(c.has(h) for h in pinned)
    # everything pinned: nothing can go, a new blob is refused and the bound holds
    every = [blob(i, 10_000) for i in range(20, 40)]
    all_hashes = {h for h, _ in blobs + every if c.has(h)}
    c.set_pinned(lambda: all_hashes)
    h, d = blob(99, 10_000)
    assert c.put(h, d) is False and not c.has(h)
    assert c.size() <= c.limit and all(c.has(x) for x in all_hashes)
    assert c.evict(0) == 0
    c.set_pinned(lambda: ())
    before = c.size()
    assert c.evict(0) == before > 0
    assert c.size() == 0 and c.stats().entries == 0
    c.close()


def test_map_full_is_handled(tmp_path: Path) -> None:
    # a 1 MiB map with a bound far above it: puts run into MapFullError, never raise it
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 30, map_size=1 << 20)
    blobs = [blob(i, 50_000) for i in range(60)]
    results = [c.put(h, d) for h, d in blobs]
    assert results[0] is True
    assert c.evicted_blobs > 0  # the map-full path evicted
    assert sum(results) > 20  # and puts kept succeeding after it
    # the accounting matches what is really there, and what is there is right
    assert c.size() == stored_bytes(c, blobs)
    for h, d in blobs:
        got = c.get(h)
        assert got is None or got == d
    assert c.get(blobs[-1][0]) == blobs[-1][1]  # the newest survived
    # the other writers cope with a full map too
    for h, _ in blobs:
        c.get(h)
    c.flush()
    for i in range(40):
        c.put_meta(f"ref:{i}", bytes(2000))
    assert c.get_meta("ref:39") == bytes(2000)
    c.close()


def test_delete_and_purge_accounting(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 10 << 20)
    blobs = [blob(i, 1000 + i) for i in range(20)]
    for h, d in blobs:
        c.put(h, d)
    total = sum(len(d) for _, d in blobs)
    assert c.size() == total
    drop = [h for h, _ in blobs[:5]] + ["ab" * 32]  # one never stored
    freed = c.delete(drop)
    assert freed == sum(len(d) for _, d in blobs[:5])
    assert c.size() == total - freed == stored_bytes(c, blobs)
    assert c.stats().entries == 15
    c.put_meta("ref:a", b"last good")
    assert c.purge() == total - freed
    assert c.size() == 0 and c.stats().entries == 0 and present(c, [h for h, _ in blobs]) == []
    assert c.get_meta("ref:a") == b"last good"  # refs survive a purge
    h, d = blobs[0]
    assert c.put(h, d) and c.size() == len(d)  # usable afterwards
    c.close()


def test_concurrent_puts_never_cross_the_bound(tmp_path: Path) -> None:
    limit = 400_000
    c = LocalCache(str(tmp_path / "lmdb"), limit)
    blobs = [blob(i, 5_000 + (i % 7) * 5_000) for i in range(240)]
    observed: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            observed.append(c.size())

    def writer(k: int) -> None:
        for h, d in blobs[k::6]:
            c.put(h, d)
            c.get(blobs[(len(d) * 7) % len(blobs)][0])

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert observed and max(observed) <= limit
    assert c.size() == stored_bytes(c, blobs) <= limit
    assert c.evicted_blobs > 0
    c.close()


def test_lowered_bound_applies_at_open(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)
    blobs = [blob(i, 50_000) for i in range(10)]
    for h, d in blobs:
        c.put(h, d)
    c.get(blobs[0][0])  # the most recently used
    c.close()
    c = LocalCache(str(tmp_path / "lmdb"), 200_000)
    assert c.size() <= 180_000 and c.size() == stored_bytes(c, blobs)
    assert c.has(blobs[0][0]) and c.has(blobs[-1][0]) and not c.has(blobs[1][0])
    c.close()


@pytest.mark.parametrize("size", [0, 1, 4096])
def test_small_and_empty_blobs(tmp_path: Path, size: int) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)
    data = os.urandom(size)
    h = hashlib.sha256(data).hexdigest()
    assert c.put(h, data) and c.get(h) == data and c.size() == size
    c.close()


def test_put_many_one_transaction_same_rules(tmp_path: Path) -> None:
    c = LocalCache(str(tmp_path / "lmdb"), 1 << 20)
    small = [blob(i, 50_000) for i in range(30)]  # 1.5 MB into a 1 MiB bound
    big = blob(99, 200_000)  # over a tenth of the bound: never stored
    results = c.put_many(small + [big, small[0]])
    assert results[-2] is False and results[-1] is True and all(results[:30])
    assert c.size() <= 1 << 20 and c.size() == stored_bytes(c, small)
    assert not c.has(big[0])
    kept = present(c, [h for h, _ in small])
    assert small[-1][0] in kept and small[0][0] in kept  # the newest and the one put again
    assert c.stats().evicted_blobs == 31 - len(kept) and c.stats().entries == len(kept)  # small[0] went twice
    for h, d in small:
        assert c.get(h) in (None, d)
    c.close()
