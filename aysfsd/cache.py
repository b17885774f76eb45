"""The local cache: blobs and last-good refs in one LMDB environment, shared by all mounts.

LMDB has no LRU of its own: access times live in a second database and are
batched in memory (`touch`) and written with the next write transaction, so a cache
hit costs one read transaction and no write. Writes run in worker threads
(`trio.to_thread`), one whole transaction per call: an LMDB write transaction
belongs to the thread that opened it.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lmdb

_U64 = struct.Struct("<Q")
_SIZE_KEY = b"size"
LOW_WATER = 0.9  # evict down to this fraction of the bound


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

    def __init__(self, path: str, limit: int) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.limit = limit
        # map_size is address space only; leave room for LMDB's own pages beyond `limit`.
        self.env = lmdb.open(path, map_size=max(limit * 2 + (256 << 20), 1 << 30), max_dbs=4,
                             sync=False, metasync=False, readahead=False, max_readers=512)
        self.blobs = self.env.open_db(b"blobs")
        self.atime = self.env.open_db(b"atime")
        self.meta = self.env.open_db(b"meta")
        self._touched: dict[bytes, int] = {}
        self._touch_lock = threading.Lock()
        self._pinned: Callable[[], Iterable[str]] = lambda: ()
        self.evicted_blobs = 0
        self.evicted_bytes = 0

    def set_pinned(self, fn: Callable[[], Iterable[str]]) -> None:
        """`fn` returns hashes that open readers are using: never evicted."""
        self._pinned = fn

    def close(self) -> None:
        self.flush()
        self.env.close()

    # -- reads (cheap, fine on the trio thread) -------------------------------------------------

    def _touch(self, k: bytes) -> None:
        with self._touch_lock:
            self._touched[k] = int(time.time())

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
        with self.env.begin(db=self.meta) as txn:
            v = txn.get(_SIZE_KEY)
        return _U64.unpack(v)[0] if v else 0

    def stats(self) -> CacheStats:
        with self.env.begin() as txn:
            n = txn.stat(self.blobs)["entries"]
        return CacheStats(n, self.size(), self.limit, self.evicted_blobs, self.evicted_bytes)

    # -- writes (blocking: call through trio.to_thread) -----------------------------------------

    def _flush_touched(self, txn: lmdb.Transaction) -> None:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
        for k, t in touched.items():
            if txn.get(k, db=self.blobs) is not None:
                txn.put(k, _U64.pack(t), db=self.atime)

    def flush(self) -> None:
        with self.env.begin(write=True, buffers=True) as txn:
            self._flush_touched(txn)

    def put(self, h: str, data: bytes) -> None:
        """Store a verified blob; evicts least-recently-used blobs when over the bound."""
        if len(data) > self.limit * (1 - LOW_WATER):
            return  # would evict most of the cache for one blob; serve it uncached
        k = _key(h)
        try:
            self._put(k, data)
        except lmdb.MapFullError:
            self.evict(self.size() // 2)
            self._put(k, data)
        if self.size() > self.limit:
            self.evict(int(self.limit * LOW_WATER))

    def _put(self, k: bytes, data: bytes) -> None:
        with self.env.begin(write=True, buffers=True) as txn:
            self._flush_touched(txn)
            if txn.put(k, data, db=self.blobs, overwrite=False):
                size = txn.get(_SIZE_KEY, db=self.meta)
                total = (_U64.unpack(size)[0] if size else 0) + len(data)
                txn.put(_SIZE_KEY, _U64.pack(total), db=self.meta)
            txn.put(k, _U64.pack(int(time.time())), db=self.atime)

    def put_meta(self, key: str, value: bytes) -> None:
        with self.env.begin(write=True, db=self.meta) as txn:
            txn.put(key.encode(), value)

    def evict(self, target: int) -> int:
        """Drop least-recently-used unpinned blobs until at most `target` bytes remain."""
        pinned = {_key(h) for h in self._pinned()}
        with self.env.begin(write=True, buffers=True) as txn:
            self._flush_touched(txn)
            size = txn.get(_SIZE_KEY, db=self.meta)
            total = _U64.unpack(size)[0] if size else 0
            if total <= target:
                return 0
            order = sorted((_U64.unpack(t)[0], bytes(k)) for k, t in txn.cursor(db=self.atime))
            freed = 0
            for _, k in order:
                if total - freed <= target:
                    break
                if k in pinned:
                    continue
                v = txn.get(k, db=self.blobs)
                if v is not None:
                    freed += len(v)
                    txn.delete(k, db=self.blobs)
                    self.evicted_blobs += 1
                txn.delete(k, db=self.atime)
            self.evicted_bytes += freed
            txn.put(_SIZE_KEY, _U64.pack(total - freed), db=self.meta)
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
            size = txn.get(_SIZE_KEY, db=self.meta)
            total = _U64.unpack(size)[0] if size else 0
            txn.put(_SIZE_KEY, _U64.pack(max(0, total - freed)), db=self.meta)
        return freed

    def purge(self) -> int:
        """Remove every blob (refs kept: they are the last good versions); returns bytes freed."""
        freed = self.size()
        with self.env.begin(write=True, buffers=True) as txn:
            txn.drop(self.blobs, delete=False)
            txn.drop(self.atime, delete=False)
            txn.put(_SIZE_KEY, _U64.pack(0), db=self.meta)
        with self._touch_lock:
            self._touched.clear()
        return freed
