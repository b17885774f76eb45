"""Prometheus metrics: `/metrics` served from a thread, read from the daemon's own counters.

Nothing is counted for Prometheus on the read path: at each scrape, the collector asks the
trio loop for the status snapshot that `aysctl status` shows (`Daemon.status_dict`, a few
dict look-ups, taken on the loop so it is consistent) and turns it into metric families
(`families`) in the HTTP server's thread (`server`: prometheus_client's WSGI app on wsgiref,
a thread per request). A hung or stopped loop makes a scrape fail, never the filesystem.
prometheus_client is imported only when `metrics_listen` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .server import MetricsServer

log = logging.getLogger("aysfsd.metrics")

Snapshot = Mapping[str, Any]


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
        try:
            from .server import MetricsServer  # prometheus_client: only when metrics are asked for

            server = MetricsServer(listen, self._from_thread)
            server.start()
        except ImportError as e:
            self.error = f"metrics_listen {listen}: {e} (install prometheus-client)"
            log.error("%s", self.error)
            return
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
