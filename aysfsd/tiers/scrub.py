"""Scrubbing the local cache: every stored blob hashed again, the corrupt ones dropped
(blocking: call through trio.to_thread)."""

from __future__ import annotations

import hashlib

from .local import LocalCache


def scrub(cache: LocalCache, batch: int = 256) -> tuple[int, list[str]]:
    """Hash every cached blob; drop the ones whose bytes no longer match their hash
    (disk corruption), so they are refetched instead of served. Returns (checked, dropped).
    Reads in batches of short transactions, so long scrubs do not pin old LMDB pages."""
    checked, bad = 0, []
    last = b""
    while True:
        with cache.env.begin(db=cache.blobs, buffers=True) as txn:
            cur = txn.cursor()
            if not (cur.set_range(last) if last else cur.first()):
                break
            n = 0
            for k, v in cur:
                kb = bytes(k)
                if kb == last:
                    continue
                if hashlib.sha256(v).digest() != kb:
                    bad.append(kb.hex())
                checked += 1
                last = kb
                n += 1
                if n >= batch:
                    break
            if n == 0:
                break
    if bad:
        cache.delete(bad)
    return checked, bad
