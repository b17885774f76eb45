"""bench/slowlink.py, the simulated link of the benchmark's remote rows, against a real nginx.

Times are only bounded from below (the delay and the cap must be at least what was asked);
everything else is counted: connections, bytes each way, bytes in flight.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.slowlink import BURST, HOST, SlowLink, check_loopback
from tests.harness import wait_for
from tests.servers import Nginx, free_port

MiB = 1 << 20
SLACK = 0.9  # lower bounds only, with room for timer rounding


def get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, (r.status, body[:200])
    return body


def test_each_direction_is_delayed_and_a_new_connection_costs_a_round_trip(nginx_stor: Nginx, tmp_path: Path) -> None:
    small = os.urandom(1000)
    (nginx_stor.root / "small").write_bytes(small)
    delay = 0.025
    with SlowLink(nginx_stor.port, tmp_path / "link", delay_ms=delay * 1000, rate_mbit=0) as link:
        conn = http.client.HTTPConnection(HOST, link.port, timeout=10)
        t0 = time.perf_counter()
        assert get(conn, "/small") == small
        first = time.perf_counter() - t0  # handshake RTT + request + response
        t0 = time.perf_counter()
        assert get(conn, "/small") == small
        again = time.perf_counter() - t0  # same connection: one RTT
        conn.close()
        s = link.stats()
    assert first >= SLACK * 4 * delay, first
    assert again >= SLACK * 2 * delay, again
    assert s.connections == 1
    assert s.bytes_down > 2 * len(small)
    assert 0 < s.bytes_up < 1000  # two GET requests, nothing else


def test_the_rate_cap_is_one_link_shared_by_all_connections(nginx_stor: Nginx, tmp_path: Path) -> None:
    body = os.urandom(2 * MiB)
    (nginx_stor.root / "big").write_bytes(body)
    rate_mbit = 40.0  # 5 MB/s: 2 MiB take >= 0.4 s alone, 4 MiB on two connections >= 0.8 s
    got: list[bytes] = []

    def fetch() -> None:
        conn = http.client.HTTPConnection(HOST, link.port, timeout=30)
        got.append(get(conn, "/big"))
        conn.close()

    with SlowLink(nginx_stor.port, tmp_path / "link", delay_ms=1, rate_mbit=rate_mbit) as link:
        rate = link.rate_bps
        t0 = time.perf_counter()
        fetch()
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        threads = [threading.Thread(target=fetch) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        both = time.perf_counter() - t0
        s = link.stats()
    assert got == [body] * 3
    assert s.connections == 3
    assert s.bytes_down >= 3 * len(body)
    assert alone >= SLACK * (len(body) - BURST) / rate, alone
    assert both >= SLACK * (2 * len(body) - BURST) / rate, both  # not twice the rate: one link


def test_the_delay_does_not_limit_throughput(nginx_stor: Nginx, tmp_path: Path) -> None:
    """Bytes are queued with their delivery time: many are in flight at once, not one chunk per delay."""
    body = os.urandom(8 * MiB)
    (nginx_stor.root / "big").write_bytes(body)
    with SlowLink(nginx_stor.port, tmp_path / "link", delay_ms=50, rate_mbit=0) as link:
        conn = http.client.HTTPConnection(HOST, link.port, timeout=30)
        assert get(conn, "/big") == body
        conn.close()
        s = link.stats()
    assert s.max_inflight_down >= 1 * MiB, s


def test_connections_end_and_upstream_refusals_are_counted(nginx_stor: Nginx, tmp_path: Path) -> None:
    (nginx_stor.root / "x").write_bytes(b"x" * 100)
    with SlowLink(nginx_stor.port, tmp_path / "link", delay_ms=2, rate_mbit=0) as link:
        for _ in range(5):
            conn = http.client.HTTPConnection(HOST, link.port, timeout=10)
            assert get(conn, "/x") == b"x" * 100
            conn.close()
        wait_for(lambda: link.stats().open_connections == 0, 10, "closed connections to be gone")
        assert link.stats().connections == 5
    dead = free_port()
    with SlowLink(dead, tmp_path / "link2", delay_ms=2, rate_mbit=0) as link:
        with socket.create_connection((HOST, link.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert s.recv(100) == b""  # closed, no bytes
            except ConnectionResetError:
                pass
        s2 = link.stats()
    assert (s2.connections, s2.refused, s2.bytes_down) == (1, 1, 0)


def test_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        check_loopback("192.0.2.1")
    r = subprocess.run([sys.executable, "bench/slowlink.py", "--upstream", "192.0.2.1:80"],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "loopback" in r.stderr
