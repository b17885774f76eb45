"""SHA-256 of a blob, large ones in a worker thread (off the trio loop)."""

from __future__ import annotations

import hashlib

import trio

HASH_IN_THREAD = 1 << 20  # hash blobs larger than this off the trio loop


async def sha256_of(data: bytes) -> str:
    if len(data) > HASH_IN_THREAD:
        return await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()
