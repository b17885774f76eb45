"""The metric families of one status snapshot (`Daemon.status_dict`): names, labels, help."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

Snapshot = Mapping[str, Any]
TIERS = ("local", "grid", "stor")
EIO_CAUSES = ("timeout", "unavailable", "corrupt", "bad_tree", "debug_store")


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def families(st: Snapshot) -> Iterator[Metric]:
    """The metric families of one status snapshot (see Daemon.status_dict)."""
    d, c = st["daemon"], st["cache"]
    yield InfoMetricFamily("aysfs_build", "the aysfsd version", value={"version": str(d["version"])})
    yield CounterMetricFamily("aysfs_config_reloads", "config reloads applied", value=d["reloads"])
    yield CounterMetricFamily("aysfs_config_reload_failures", "reloads refused (invalid config)",
                              value=d.get("reload_failures", 0))
    yield GaugeMetricFamily("aysfs_config_error", "1 while the config file on disk is invalid (the previous runs)",
                            value=1 if d["config_error"] else 0)
    yield CounterMetricFamily("aysfs_fuse_internal_errors", "EIO answers to unexpected errors (a bug; see the log)",
                              value=d.get("internal_errors", 0))

    # the local cache and the fetcher
    yield GaugeMetricFamily("aysfs_cache_bytes", "bytes of blobs in the local cache", value=c["bytes"])
    yield GaugeMetricFamily("aysfs_cache_limit_bytes", "the local cache's bound (cache_size)", value=c["limit"])
    yield GaugeMetricFamily("aysfs_cache_entries", "blobs in the local cache", value=c["entries"])
    yield GaugeMetricFamily("aysfs_cache_queued_bytes", "bytes fetched and waiting for their local cache write",
                            value=c.get("queued_bytes", 0))
    yield CounterMetricFamily("aysfs_cache_evicted_blobs", "blobs evicted from the local cache",
                              value=c["evicted_blobs"])
    yield CounterMetricFamily("aysfs_cache_evicted_bytes", "bytes evicted from the local cache",
                              value=c["evicted_bytes"])
    yield CounterMetricFamily("aysfs_cache_hits", "blob look-ups answered by the local cache (all mounts)",
                              value=c["hits"])
    yield CounterMetricFamily("aysfs_cache_memory_hits", "blob look-ups answered by the in-memory cache",
                              value=c["memory_hits"])
    yield CounterMetricFamily("aysfs_cache_misses", "blobs downloaded (a grid cache or stor asked)",
                              value=c["misses"])
    yield CounterMetricFamily("aysfs_writebacks", "blobs written back to grid caches", value=c["writebacks"])
    yield CounterMetricFamily("aysfs_writeback_errors", "failed grid cache write-backs",
                              value=c["writeback_errors"])
    yield CounterMetricFamily("aysfs_packs", "packs downloaded", value=c["packs"])
    yield CounterMetricFamily("aysfs_pack_members", "blobs had from packs", value=c["pack_members"])

    yield from _sources(st["sources"])
    yield from _mounts(st["mounts"])


def _sources(sources: list[Snapshot]) -> Iterator[Metric]:
    labels = ["source", "tier"]
    up = GaugeMetricFamily("aysfs_source_up", "1 unless the source is marked down", labels=labels)
    req = _counter("aysfs_source_requests", "blob requests sent (retries and probes included)", labels)
    err = _counter("aysfs_source_request_errors", "blob requests that failed (transport, timeout, HTTP error)",
                   labels)
    nf = _counter("aysfs_source_not_found", "blob requests answered 'not there'", labels)
    down = _counter("aysfs_source_marked_down", "times the source was marked down", labels)
    blobs = _counter("aysfs_source_blobs", "verified blobs fetched from the source", labels)
    nbytes = _counter("aysfs_source_bytes", "bytes of verified blobs fetched from the source", labels)
    corrupt = _counter("aysfs_source_corrupt", "blobs from the source that failed their hash check", labels)
    lat = HistogramMetricFamily("aysfs_source_fetch_seconds", "time of the blob requests that got an answer",
                                labels=labels)
    for s in sources:
        lv = [str(s["url"]), str(s["tier"])]
        up.add_metric(lv, 0 if s["down"] else 1)
        req.add_metric(lv, s.get("requests", 0))
        err.add_metric(lv, s.get("request_errors", 0))
        nf.add_metric(lv, s.get("not_found", 0))
        down.add_metric(lv, s["failures"])
        blobs.add_metric(lv, s["fetched_blobs"])
        nbytes.add_metric(lv, s["fetched_bytes"])
        corrupt.add_metric(lv, s["corrupt"])
        h = s.get("latency")
        if h:
            cum, buckets = 0, []
            for le, n in zip([*h["buckets"], float("inf")], h["counts"], strict=True):
                cum += n
                buckets.append((repr(float(le)) if le != float("inf") else "+Inf", cum))
            lat.add_metric(lv, buckets, h["sum"])
    yield from (up, req, err, nf, down, blobs, nbytes, corrupt, lat)


def _mounts(mounts: list[Snapshot]) -> Iterator[Metric]:
    info = InfoMetricFamily("aysfs_mount", "what each mount serves: ays id, mountpoint, root hash, revision",
                            labels=["mount"])
    rev = GaugeMetricFamily("aysfs_mount_revision", "the revision a mount serves", labels=["mount"])
    up = GaugeMetricFamily("aysfs_mount_up", "1 when the mount is up", labels=["mount"])
    degraded = GaugeMetricFamily("aysfs_mount_degraded",
                                 "1 when the mount is mounted but its root or a directory cannot be read",
                                 labels=["mount"])
    read = _counter("aysfs_mount_read_bytes", "bytes returned to the mount's readers", ["mount"])
    tb = _counter("aysfs_mount_tier_bytes", "bytes had from each tier for the mount's reads", ["mount", "tier"])
    reads = _counter("aysfs_mount_tier_reads",
                     "reads served by each tier: local = reads answered by the local cache, "
                     "grid/stor = blobs downloaded from it for the mount's readers", ["mount", "tier"])
    miss = _counter("aysfs_mount_misses", "reads that found their blob not in the local cache", ["mount"])
    eio = _counter("aysfs_mount_eio", "EIO answered to the mount's readers, by cause", ["mount", "cause"])
    pf_blobs = GaugeMetricFamily("aysfs_mount_prefetch_blobs", "the last prefetch's blobs (and packs): done, total",
                                 labels=["mount", "kind"])
    pf_bytes = GaugeMetricFamily("aysfs_mount_prefetch_bytes", "the last prefetch's bytes: done, total",
                                 labels=["mount", "kind"])
    pf_run = GaugeMetricFamily("aysfs_mount_prefetch_running", "1 while a prefetch of the mount runs",
                               labels=["mount"])
    pr_info = InfoMetricFamily("aysfs_mount_profile", "the startup profile of the version a mount serves: "
                               "where it came from (ref, grid, none) and its state", labels=["mount"])
    pr_items = GaugeMetricFamily("aysfs_mount_profile_items", "startup profile items: total (in the profile), "
                                 "read (by the start so far), ignored (not in the tree), recorded",
                                 labels=["mount", "kind"])
    pr_blobs = GaugeMetricFamily("aysfs_mount_profile_fetched_blobs", "blobs the startup profile fetched ahead",
                                 labels=["mount"])
    pr_bytes = GaugeMetricFamily("aysfs_mount_profile_fetched_bytes", "bytes the startup profile fetched ahead",
                                 labels=["mount"])
    pr_errors = GaugeMetricFamily("aysfs_mount_profile_errors", "startup profile fetches that failed",
                                  labels=["mount"])
    ih_modules = GaugeMetricFamily("aysfs_mount_import_hints_modules", "modules a cold start's import hints "
                                   "fetched ahead (aysfsd.fuse.importhints)", labels=["mount"])
    ih_bytes = GaugeMetricFamily("aysfs_mount_import_hints_bytes", "bytes a cold start's import hints asked for "
                                 "(a packed module counts its pack)", labels=["mount"])
    for m in mounts:
        name = str(m["name"])
        info.add_metric([name], {"id": str(m["id"]), "mnt": str(m["mnt"]), "root": str(m["root"] or ""),
                                 "revision": "" if m["revision"] is None else str(m["revision"])})
        if m["revision"] is not None:
            rev.add_metric([name], m["revision"])
        up.add_metric([name], 1 if m["state"] == "up" else 0)
        degraded.add_metric([name], 1 if m["state"] == "degraded" else 0)
        read.add_metric([name], m["bytes_read"])
        miss.add_metric([name], m["misses"])
        by_tier, blobs = m["bytes_by_tier"], m.get("blobs_by_tier", {})
        for tier in TIERS:
            tb.add_metric([name, tier], by_tier.get(tier, 0))
            reads.add_metric([name, tier], m["hits"] if tier == "local" else blobs.get(tier, 0))
        causes = m.get("eio", {})
        for cause in sorted(set(EIO_CAUSES) | set(causes)):
            eio.add_metric([name, cause], causes.get(cause, 0))
        pf = m.get("prefetch")
        if pf:
            pf_blobs.add_metric([name, "done"], pf["blobs_done"])
            pf_blobs.add_metric([name, "total"], pf["blobs_total"])
            pf_bytes.add_metric([name, "done"], pf["bytes_done"])
            pf_bytes.add_metric([name, "total"], pf["bytes_total"])
        pf_run.add_metric([name], 1 if pf and pf["state"] == "running" else 0)
        pr = m.get("profile")
        if isinstance(pr, Mapping):
            pr_info.add_metric([name], {"source": str(pr.get("source", "")), "state": str(pr.get("state", ""))})
            for kind, key in (("total", "items"), ("read", "read"), ("ignored", "ignored"), ("recorded", "recorded")):
                pr_items.add_metric([name, kind], pr.get(key, 0))
            pr_blobs.add_metric([name], pr.get("fetched_blobs", 0))
            pr_bytes.add_metric([name], pr.get("fetched_bytes", 0))
            pr_errors.add_metric([name], pr.get("errors", 0))
        ih = m.get("import_hints")
        if isinstance(ih, Mapping):
            ih_modules.add_metric([name], ih.get("modules", 0))
            ih_bytes.add_metric([name], ih.get("bytes", 0))
    yield from (info, rev, up, degraded, read, tb, reads, miss, eio, pf_blobs, pf_bytes, pf_run,
                pr_info, pr_items, pr_blobs, pr_bytes, pr_errors, ih_modules, ih_bytes)
