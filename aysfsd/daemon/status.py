"""The parts of the status snapshot (`aysctl status`, `--json`, the metrics, systemd's status
line) that describe the cache, the sources and the mounts; the daemon puts them together."""

from __future__ import annotations

from ..fuse.nodes import MountPoint
from ..tiers import Source
from ..tiers.counters import Counters
from ..tiers.local import LocalCache


def mount_status(mp: MountPoint) -> dict[str, object]:
    pf = mp.prefetch
    degraded = mp.degraded() if mp.state == "up" else ""
    return {
        "name": mp.name, "id": mp.cfg.id, "mnt": mp.cfg.mnt, "state": "degraded" if degraded else mp.state,
        "error": mp.error or degraded,
        "root": mp.ref.root if mp.ref else None, "revision": mp.ref.revision if mp.ref else None,
        "debug": mp.cfg.debug, "hits": mp.hits, "misses": mp.misses, "bytes_read": mp.bytes_read,
        "bytes_by_tier": dict(mp.bytes_by_tier), "blobs_by_tier": dict(mp.bytes_by_tier.blobs),
        "eio": dict(mp.eio),
        "prefetch": pf.public() if pf is not None else None,
        "profile": mp.profile.public() if mp.profile is not None else None,
        "watch": mp.watch.public() if mp.watch is not None else None,
        "import_hints": mp.hints.public() if mp.hints is not None else None,
    }


def cache_status(cache: LocalCache, k: Counters, queue: tuple[int, int], waiting: int) -> dict[str, object]:
    """`queue`: (blobs, bytes) fetched and still waiting for their LMDB write; `waiting`:
    fetches waiting on a download in progress."""
    c = cache.stats()
    try:
        fs_free, fs_size, min_free = cache.room.disk()
    except OSError:
        fs_free = fs_size = min_free = -1
    return {"dir": cache.path, "state": cache.room.state, "reason": cache.room.reason,
            "fs_free": fs_free, "fs_size": fs_size, "min_free": min_free,
            "entries": c.entries, "bytes": c.bytes, "limit": c.limit,
            "hits": k.hits, "misses": k.misses, "memory_hits": k.memory_hits,
            "evicted_blobs": c.evicted_blobs, "evicted_bytes": c.evicted_bytes,
            "skipped_blobs": cache.skipped_blobs, "writebacks": k.writebacks,
            "writeback_errors": k.writeback_errors, "writebacks_skipped": k.writebacks_skipped,
            "packs": k.packs, "pack_members": k.pack_members,
            "tree_packs": k.tree_packs, "queued_blobs": queue[0], "queued_bytes": queue[1],
            "fetches_waiting": waiting}


def source_status(s: Source) -> dict[str, object]:
    return {"url": s.name, "tier": s.tier, "down": s.is_down(), "failures": s.failures,
            "fetched_blobs": s.fetched_blobs, "fetched_bytes": s.fetched_bytes, "corrupt": s.corrupt,
            "requests": s.requests, "request_errors": s.request_errors, "not_found": s.not_found,
            "latency": s.latency.public()}


def status_line(mounts: list[MountPoint], config_error: str, metrics_error: str) -> str:
    """systemd's one-line STATUS= (and `aysctl status`'s first line), at most 400 characters."""
    up = sum(m.state == "up" for m in mounts)
    s = f"{up}/{len(mounts)} mounts up"
    bad = [f"{m.name}: {m.error}" for m in mounts if m.state == "error"]
    if bad:
        s += "; errors: " + "; ".join(bad)
    degraded = [f"{m.name}: {m.degraded()}" for m in mounts if m.state == "up" and m.unreadable]
    if degraded:
        s += "; degraded: " + "; ".join(degraded)
    if config_error:
        s += "; config error (running the previous config)"
    if metrics_error:
        s += f"; {metrics_error}"
    return s[:400]
