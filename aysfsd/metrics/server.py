"""`/metrics` over HTTP from a thread of its own (prometheus_client's WSGI app on wsgiref)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import Metric

from ..config import parse_listen
from .families import Snapshot, families

log = logging.getLogger("aysfsd.metrics")


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
