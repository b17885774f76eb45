"""Prometheus metrics: `/metrics` served from a thread, read from the daemon's own counters.

Nothing is counted for Prometheus on the read path: at each scrape, the collector asks the
trio loop for the status snapshot that `aysctl status` shows (`Daemon.status_dict`, a few
dict look-ups, taken on the loop so it is consistent) and turns it into metric families in
the HTTP server's thread. prometheus_client's own server (wsgiref, a thread per request)
does the HTTP; a hung or stopped loop makes a scrape fail, never the filesystem.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from .config import parse_listen

log = logging.getLogger("aysfsd.metrics")

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
    for m in mounts:
        name = str(m["name"])
        info.add_metric([name], {"id": str(m["id"]), "mnt": str(m["mnt"]), "root": str(m["root"] or ""),
                                 "revision": "" if m["revision"] is None else str(m["revision"])})
        if m["revision"] is not None:
            rev.add_metric([name], m["revision"])
        up.add_metric([name], 1 if m["state"] == "up" else 0)
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
    yield from (info, rev, up, read, tb, reads, miss, eio, pf_blobs, pf_bytes, pf_run)


class _Collector:
    def __init__(self, snapshot: Callable[[], Snapshot | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        st = self.snapshot()
        if st is not None:
            yield from families(st)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


class MetricsServer:
    """`/metrics` on HOST:PORT from a thread; `snapshot` runs in that thread at each scrape."""

    def __init__(self, listen: str, snapshot: Callable[[], Snapshot | None]) -> None:
        self.listen = listen
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(snapshot))  # type: ignore[arg-type]
        self._app = make_wsgi_app(registry)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; OSError (e.g. the address is taken) with the address in its message."""
        host, port = parse_listen(self.listen)
        server_cls = _Server6 if ":" in host else _Server
        try:
            self._server = make_server(host, port, self._app, server_class=server_cls, handler_class=_Quiet)
        except OSError as e:
            raise OSError(e.errno, f"metrics_listen {self.listen}: cannot listen: {e.strerror or e}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="aysfsd-metrics", daemon=True)
        self._thread.start()
        log.info("metrics at http://%s/metrics", self.listen)

    def stop(self) -> None:
        """Blocking (up to the poll interval): call it from a worker thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class MetricsEndpoint:
    """The daemon's side: (re)start the server when `metrics_listen` changes; a failure to
    listen is kept in `error` (shown by `aysctl status`) and does not stop the mounts."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot
        self._token: trio.lowlevel.TrioToken | None = None
        self.server: MetricsServer | None = None
        self.error = ""

    def _from_thread(self) -> Snapshot | None:
        try:
            return trio.from_thread.run_sync(self._snapshot, trio_token=self._token)
        except trio.RunFinishedError:  # the daemon is stopping
            return None

    async def configure(self, listen: str) -> None:
        if self.server is not None and self.server.listen == listen:
            return
        await self.close()
        if not listen:
            return
        self._token = trio.lowlevel.current_trio_token()
        server = MetricsServer(listen, self._from_thread)
        try:
            server.start()
        except OSError as e:
            self.error = str(e)
            log.error("%s; no metrics until the address is free and the config is reloaded", e)
            return
        self.server = server

    async def close(self) -> None:
        self.error = ""
        if self.server is not None:
            server, self.server = self.server, None
            await trio.to_thread.run_sync(server.stop)

    def public(self) -> dict[str, str]:
        return {"listen": self.server.listen if self.server else "", "error": self.error}
