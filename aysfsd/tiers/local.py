"""The local cache: blobs and last-good refs in one LMDB environment, shared by all mounts.

LMDB has no LRU of its own: access stamps live in a second database and are batched
in memory (`touch`) and written with the next write transaction, so a cache hit costs
one read transaction and no write. Stamps are nanoseconds, strictly increasing within
the process, so the eviction order is the access order even for hits within one second.
Writes run in worker threads (`trio.to_thread`), one whole transaction per call: an LMDB
write transaction belongs to the thread that opened it.

The bound (`limit`) is on the bytes of blob data; a put that would cross it first evicts
least-recently-used blobs down to LOW_WATER of the bound, in the same write transaction,
so the committed size never exceeds the bound. Blobs in use by open files (`set_pinned`)
are never evicted; when they alone fill the cache, new blobs are not stored (the
fetcher then serves them from memory).

The cache also follows its filesystem (`min_free`: bytes to keep free there), see
aysfsd.tiers.room: a put asks its Room first, and a commit that fails (ENOSPC arrives from LMDB
as EIO) is retried once after evicting, then the room puts the cache in its "memory" state. A
failed commit leaves the last committed state: never part of a blob.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import lmdb

from .room import PAGE_SLACK, Room, mib

log = logging.getLogger("aysfsd.tiers.local")

_U64 = struct.Struct("<Q")
_SIZE_KEY = b"size"
LOW_WATER = 0.9  # evict down to this fraction of the bound
# A blob larger than the headroom between the bound and the low-water mark (10% of the
# bound, `max_blob`) is not stored: keeping it would evict a large share of the cache for
# one blob, and a tiny cache would evict everything for every 4 MiB chunk read (thrashing).
# Such blobs are served from the fetcher's memory LRU instead; with the default 10 GiB
# bound no blob is affected (chunks are at most 4 MiB).


@dataclass
class CacheStats:
    entries: int
    bytes: int
    limit: int
    evicted_blobs: int
    evicted_bytes: int


def _key(h: str) -> bytes:
    return bytes.fromhex(h)


class LocalCache:
    """Blobs by SHA-256, bounded by `limit` bytes of blob data with LRU eviction."""

    def __init__(self, path: str, limit: int, map_size: int | None = None,
                 min_free: Callable[[int], int] = lambda total: 0) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.limit = limit
        self.room = Room(path, self, min_free)
        self.max_blob = limit - self._low_water(0)  # 10% of the bound
        # map_size is address space only; leave room for LMDB's own pages and free list.
        if map_size is None:
            map_size = max(limit * 2 + (256 << 20), 1 << 30)
        self.env = lmdb.open(path, map_size=map_size, max_dbs=4, sync=False, metasync=False,
                             readahead=False, max_readers=512)
        self.blobs = self.env.open_db(b"blobs")
        self.atime = self.env.open_db(b"atime")
        self.meta = self.env.open_db(b"meta")
        self._touched: dict[bytes, int] = {}
        self._lock = threading.Lock()  # guards _touched, _clock and the eviction counters
        self._clock = 0
        self._pinned: Callable[[], Iterable[str]] = lambda: ()
        self.evicted_blobs = 0
        self.evicted_bytes = 0
        self.skipped_blobs = 0  # puts refused: too large, cache full of pinned blobs, map full
        if self.size() > limit:  # the bound was lowered since the last run
            self.evict(self._low_water(0))

    def set_pinned(self, fn: Callable[[], Iterable[str]]) -> None:
        """`fn` returns hashes that open readers are using: never evicted.

        It is called from worker threads during eviction, so it must only read
        (Inodes.pinned_blobs copies the open-file table in one C-level step)."""
        self._pinned = fn

    def close(self) -> None:
        self.flush()
        self.env.close()

    def _low_water(self, room: int) -> int:
        """Bytes to evict down to so that `room` more bytes fit under LOW_WATER of the bound."""
        return self.limit * int(LOW_WATER * 1000) // 1000 - room

    def _stamp_locked(self) -> int:
        t = max(time.time_ns(), self._clock + 1)
        self._clock = t
        return t

    def _stamp(self) -> int:
        with self._lock:
            return self._stamp_locked()

    # -- reads (cheap, fine on the trio thread) -------------------------------------------------

    def _touch(self, k: bytes) -> None:
        with self._lock:
            self._touched[k] = self._stamp_locked()

    def get(self, h: str) -> bytes | None:
        k = _key(h)
        with self.env.begin(db=self.blobs, buffers=True) as txn:
            v = txn.get(k)
            data = bytes(v) if v is not None else None
        if data is not None:
            self._touch(k)
        return data

    def get_range(self, h: str, off: int, size: int) -> bytes | None:
        """Bytes [off, off+size) of blob `h`, copied out of the map (no whole-blob copy)."""
        k = _key(h)
        with self.env.begin(db=self.blobs, buffers=True) as txn:
            v = txn.get(k)
            data = bytes(v[off:off + size]) if v is not None else None
        if data is not None:
            self._touch(k)
        return data

    def has(self, h: str) -> bool:
        with self.env.begin(db=self.blobs, buffers=True) as txn:
            return txn.get(_key(h)) is not None

    def get_meta(self, key: str) -> bytes | None:
        with self.env.begin(db=self.meta) as txn:
            return txn.get(key.encode())

    def size(self) -> int:
        """Bytes of blob data stored (the quantity bounded by `limit`)."""
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(_SIZE_KEY)
        return _U64.unpack(v)[0] if v else 0

    def stats(self) -> CacheStats:
        with self.env.begin() as txn:
            n = txn.stat(self.blobs)["entries"]
            v = txn.get(_SIZE_KEY, db=self.meta)
        return CacheStats(n, _U64.unpack(v)[0] if v else 0, self.limit, self.evicted_blobs, self.evicted_bytes)

    # -- room for writes (see aysfsd.tiers.room) ---------------------------------------------

    def reusable(self) -> int:
        """Bytes of pages inside the LMDB file that are free for reuse (about: the free list's
        own pages and the last two transactions' are counted too)."""
        psize = self.env.stat()["psize"]
        last = self.env.info()["last_pgno"]
        with self.env.begin() as txn:
            used = sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                       for st in (self.env.stat(), txn.stat(self.blobs), txn.stat(self.atime), txn.stat(self.meta)))
        return max(0, last + 1 - 2 - used) * psize

    def evict_for(self, nbytes: int) -> int:
        """Evict about `nbytes` of LRU blobs and make their pages reusable; bytes freed."""
        try:
            freed = self.evict(max(0, self.size() - nbytes))
            with self.env.begin(write=True, db=self.meta) as txn:  # one more transaction: see the docstring
                txn.put(_SIZE_KEY, _U64.pack(self._total(txn, self.meta)))
        except lmdb.Error as e:
            log.warning("local cache %s: evicting to make room failed: %s", self.path, e)
            return 0
        return freed

    # -- writes (blocking: call through trio.to_thread) -----------------------------------------

    def _flush_touched(self, txn: lmdb.Transaction) -> None:
        with self._lock:
            touched, self._touched = self._touched, {}
        for k, t in touched.items():
            if txn.get(k, db=self.blobs) is not None:
                txn.put(k, _U64.pack(t), db=self.atime)

    def flush(self) -> None:
        """Write the batched access stamps (with a full map or disk they are dropped: LRU
        precision only)."""
        try:
            with self.env.begin(write=True, buffers=True) as txn:
                self._flush_touched(txn)
        except lmdb.MapFullError:
            self._make_room()
        except lmdb.Error as e:
            log.warning("local cache %s: could not write access times: %s", self.path, e)

    def _make_room(self) -> int:
        """After MapFullError: evict half of the blob bytes (deletes fit in a full map, and
        their pages are reused by the next transactions). Returns bytes freed."""
        try:
            freed = self.evict(self.size() // 2)
        except lmdb.MapFullError:
            freed = 0
        log.warning("local cache: LMDB map full (%d bytes); evicted %d bytes of least-recently-used blobs",
                    self.env.info()["map_size"], freed)
        return freed

    @staticmethod
    def _total(txn: lmdb.Transaction, db: lmdb._Database) -> int:
        v = txn.get(_SIZE_KEY, db=db)
        return _U64.unpack(v)[0] if v else 0

    def _evict_in(self, txn: lmdb.Transaction, total: int, target: int) -> tuple[int, int]:
        """Within `txn`, drop LRU unpinned blobs until `total` - freed <= target: (bytes, blobs)."""
        pinned = {_key(h) for h in self._pinned()}
        order = sorted((_U64.unpack(t)[0], bytes(k)) for k, t in txn.cursor(db=self.atime))
        freed = n = 0
        for _, k in order:
            if total - freed <= target:
                break
            if k in pinned:
                continue
            v = txn.get(k, db=self.blobs)
            if v is not None:
                freed += len(v)
                n += 1
                txn.delete(k, db=self.blobs)
            txn.delete(k, db=self.atime)
        return freed, n

    def _count_evicted(self, freed: int, n: int) -> None:
        with self._lock:
            self.evicted_bytes += freed
            self.evicted_blobs += n

    def put(self, h: str, data: bytes) -> bool:
        """Store a verified blob, evicting LRU blobs to stay within the bound.

        Returns False when the blob was not stored: larger than `max_blob` (see LOW_WATER),
        the cache is full of pinned blobs, or the LMDB map stays full even after evicting
        half of the cache. Never raises MapFullError."""
        if len(data) > self.max_blob or not self.room.allows(len(data)):
            self.skipped_blobs += 1
            return False
        k = _key(h)
        try:
            return self._put(k, data)
        except lmdb.MapFullError:
            self._make_room()
        except lmdb.Error as e:  # the disk is full (LMDB reports ENOSPC as EIO) or failing
            log.warning("local cache %s: storing blob %s (%d bytes) failed: %s (%s free on its filesystem); "
                        "evicting and trying once more", self.path, h, len(data), e, mib(self.room.disk()[0]))
            self.evict_for(max(2 * len(data), self.size() // 10) + PAGE_SLACK)
        try:
            return self._put(k, data)
        except lmdb.MapFullError:
            log.warning("local cache: LMDB map still full: blob %s (%d bytes) not cached", h, len(data))
        except lmdb.Error as e:
            self.room.write_failed(e)
        self.skipped_blobs += 1
        return False

    def _put(self, k: bytes, data: bytes) -> bool:
        with self.env.begin(write=True, buffers=True) as txn:
            self._flush_touched(txn)
            stored, freed, n = self._put_in(txn, k, data)
        self._count_evicted(freed, n)  # after the commit: an aborted eviction freed nothing
        if not stored:
            self.skipped_blobs += 1
        return stored

    def _put_in(self, txn: lmdb.Transaction, k: bytes, data: bytes) -> tuple[bool, int, int]:
        """One blob into an open write transaction: (stored, bytes evicted, blobs evicted)."""
        freed = n = 0
        stamp = _U64.pack(self._stamp())
        if txn.get(k, db=self.blobs) is not None:
            txn.put(k, stamp, db=self.atime)
            return True, 0, 0
        total = self._total(txn, self.meta)
        stored = False
        if total + len(data) > self.limit:
            freed, n = self._evict_in(txn, total, self._low_water(len(data)))
            total -= freed
        if total + len(data) <= self.limit:
            txn.put(k, data, db=self.blobs)
            txn.put(k, stamp, db=self.atime)
            total += len(data)
            stored = True
        txn.put(_SIZE_KEY, _U64.pack(total), db=self.meta)
        return stored, freed, n

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Store several verified blobs in one write transaction (one commit, one thread hop);
        falls back to one `put` each when the map or the disk fills up. Same bound and rules
        as `put`."""
        results: list[bool] = []
        freed_all = n_all = 0
        if not self.room.allows(sum(len(d) for _, d in items if len(d) <= self.max_blob)):
            return [self.put(h, data) for h, data in items]
        try:
            with self.env.begin(write=True, buffers=True) as txn:
                self._flush_touched(txn)
                for h, data in items:
                    if len(data) > self.max_blob:
                        results.append(False)
                        continue
                    stored, freed, n = self._put_in(txn, _key(h), data)
                    freed_all += freed
                    n_all += n
                    results.append(stored)
        except lmdb.Error:  # map or disk full: one at a time, with their own fallbacks
            return [self.put(h, data) for h, data in items]
        self._count_evicted(freed_all, n_all)
        self.skipped_blobs += results.count(False)
        return results

    def put_meta(self, key: str, value: bytes) -> bool:
        """Store a small metadata value (a last-good ref), making room if the map or the disk is
        full; False (logged) when it could not be stored."""
        for attempt in (0, 1):
            try:
                with self.env.begin(write=True, db=self.meta) as txn:
                    txn.put(key.encode(), value)
                return True
            except lmdb.MapFullError:
                if attempt:
                    raise
                self._make_room()
            except lmdb.Error as e:
                if attempt:
                    log.error("local cache %s: could not store %s: %s", self.path, key, e)
                    return False
                self.evict_for(PAGE_SLACK)
        return False

    def evict(self, target: int) -> int:
        """Drop least-recently-used unpinned blobs until at most `target` bytes remain; bytes freed."""
        with self.env.begin(write=True, buffers=True) as txn:
            self._flush_touched(txn)
            total = self._total(txn, self.meta)
            if total <= target:
                return 0
            freed, n = self._evict_in(txn, total, target)
            txn.put(_SIZE_KEY, _U64.pack(total - freed), db=self.meta)
        self._count_evicted(freed, n)
        return freed

    def delete(self, hashes: Iterable[str]) -> int:
        """Remove the given blobs; returns bytes freed."""
        freed = 0
        with self.env.begin(write=True, buffers=True) as txn:
            for h in hashes:
                k = _key(h)
                v = txn.get(k, db=self.blobs)
                if v is not None:
                    freed += len(v)
                    txn.delete(k, db=self.blobs)
                txn.delete(k, db=self.atime)
            total = self._total(txn, self.meta)
            txn.put(_SIZE_KEY, _U64.pack(max(0, total - freed)), db=self.meta)
        return freed

    def purge(self) -> int:
        """Remove every blob (refs kept: they are the last good versions); returns bytes freed.

        The LMDB file keeps its size: its pages are reused by later puts."""
        with self.env.begin(write=True, buffers=True) as txn:
            freed = self._total(txn, self.meta)
            txn.drop(self.blobs, delete=False)
            txn.drop(self.atime, delete=False)
            txn.put(_SIZE_KEY, _U64.pack(0), db=self.meta)
        with self._lock:
            self._touched.clear()
        return freed
