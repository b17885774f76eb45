"""A delaying TCP proxy on loopback: a simulated network link (this kernel has no netem).

    python bench/slowlink.py --upstream 127.0.0.1:8080 [--listen-port 0] [--delay-ms 10]
                             [--rate-mbit 1000] [--control /run/x.sock]

The link model, per direction (client -> upstream, upstream -> client), shared by every
connection like one physical link:

* a chunk that arrives at time t leaves when the link has sent what was queued before it, at
  `rate` (a token bucket with a small burst; `rate` 0 = no cap), then reaches the other side
  `delay` seconds later;
* a new connection carries its first byte no earlier than one round trip (2 x delay, the TCP
  handshake) after it was accepted;
* the delay does not limit throughput: chunks in flight wait in a timestamped queue, up to
  `window` bytes per connection and direction (then the proxy stops reading that side: TCP's
  window), so a single connection can fill the link.

The proxy counts connections and bytes each way; `--control PATH` answers every connection to
that UNIX socket with one JSON line of these counters. `SlowLink` runs it as a subprocess for
bench/run.py and the tests. Only loopback addresses are accepted, on both sides.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
KiB = 1 << 10
MiB = 1 << 20
DEFAULT_DELAY_MS = 10.0
DEFAULT_RATE_MBIT = 1000.0
BURST = 64 * KiB  # token bucket depth: absorbs timer granularity, far below a 20 ms RTT's worth
WINDOW = 8 * MiB  # bytes in flight per connection and direction before reading pauses
SOCK_BUF = 4 * MiB
START_TIMEOUT = 10.0


@dataclass
class Stats:
    """What went through the link since the proxy started (bytes as received from each side)."""

    connections: int = 0
    open_connections: int = 0
    refused: int = 0  # upstream connections that failed
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    max_inflight_down: int = 0  # most bytes queued in one connection's downstream direction
    delay_ms: float = DEFAULT_DELAY_MS
    rate_mbit: float = DEFAULT_RATE_MBIT

    def minus(self, before: Stats) -> Stats:
        """The counters between two snapshots (`before` taken first)."""
        return Stats(self.connections - before.connections, self.open_connections, self.refused - before.refused,
                     self.bytes_up - before.bytes_up, self.bytes_down - before.bytes_down,
                     self.max_inflight_down, self.delay_ms, self.rate_mbit)


def check_loopback(host: str) -> None:
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise ValueError(f"slowlink: {host} is not a loopback address (loopback only)")


# -- the link -------------------------------------------------------------------------------------


class Link:
    """One direction of the link: serialises every connection's bytes at `rate` (token bucket)."""

    def __init__(self, rate_bps: float, burst: int = BURST) -> None:
        self.rate = rate_bps  # bytes per second, 0: no cap
        self.slack = burst / rate_bps if rate_bps > 0 else 0.0
        self.free_at = 0.0

    def sent(self, n: int, now: float) -> float:
        """Time at which `n` bytes handed over at `now` have left (after what was queued before)."""
        if self.rate <= 0:
            return now
        self.free_at = max(self.free_at, now - self.slack) + n / self.rate
        return max(self.free_at, now)


class Half:
    """One direction of one connection: chunks with their delivery time, written out in order."""

    def __init__(self, proxy: Proxy, link: Link, not_before: float, down: bool) -> None:
        self.proxy = proxy
        self.link = link
        self.not_before = not_before
        self.down = down
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.src: asyncio.Transport | None = None
        self.dst: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False  # the source sent EOF / closed: after the queue, end the destination
        self.closed = False  # ... closed completely (not a half-close): close the destination
        self.done = False  # the end was passed on
        self.partner: Half | None = None  # the other direction of the same connection
        self.dead = False  # the destination is gone: drop everything
        self.window_full = False
        self.dst_full = False
        self.reading_paused = False

    def push(self, data: bytes) -> None:
        if self.dead:
            return
        loop = self.proxy.loop
        start = max(loop.time(), self.not_before)
        at = self.link.sent(len(data), start) + self.proxy.delay
        self.queue.append((at, data))
        self.queued += len(data)
        if self.down and self.queued > self.proxy.stats.max_inflight_down:
            self.proxy.stats.max_inflight_down = self.queued
        if self.queued > self.proxy.window:
            self.window_full = True
            self._update_reading()
        self._schedule()

    def _schedule(self) -> None:
        if self.timer is None and self.queue and self.dst is not None:
            self.timer = self.proxy.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self) -> None:
        self.timer = None
        if self.dead or self.dst is None:
            return
        now = self.proxy.loop.time()
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(self.queue.popleft()[1])
        if out:
            n = sum(len(b) for b in out)
            self.queued -= n
            self.dst.write(out[0] if len(out) == 1 else b"".join(out))
            if self.window_full and self.queued <= self.proxy.window // 2:
                self.window_full = False
                self._update_reading()
        if self.queue:
            self._schedule()
        elif self.eof:
            self._end()

    def _end(self) -> None:
        """Everything the source sent was delivered: pass its end on."""
        assert self.dst is not None
        self.done = True
        if self.closed or not self.dst.can_write_eof():
            self.dst.close()
        else:
            with contextlib.suppress(OSError, RuntimeError):
                self.dst.write_eof()
        if self.partner is not None and self.partner.done:  # both ways ended: nothing more can flow
            self.dst.close()
            if self.src is not None:
                self.src.close()

    def connected(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        self._schedule()
        if not self.queue and self.eof:
            self._end()

    def source_ended(self, closed: bool) -> None:
        self.closed = self.closed or closed
        if self.eof:
            if closed and self.done and self.dst is not None:
                self.dst.close()
            return
        self.eof = True
        if not self.queue and self.dst is not None and not self.dead:
            self._end()

    def destination_gone(self) -> None:
        self.dead = True
        self.queue.clear()
        self.queued = 0
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.src is not None:
            self.src.close()

    def set_dst_full(self, full: bool) -> None:
        self.dst_full = full
        self._update_reading()

    def _update_reading(self) -> None:
        want_pause = self.window_full or self.dst_full
        if self.src is None or want_pause == self.reading_paused or self.src.is_closing():
            return
        self.reading_paused = want_pause
        if want_pause:
            self.src.pause_reading()
        else:
            self.src.resume_reading()


class Side(asyncio.Protocol):
    """The protocol of one socket (client or upstream): feeds `out`, is written by `inp`."""

    def __init__(self, proxy: Proxy, out: Half, inp: Half, client: bool) -> None:
        self.proxy = proxy
        self.out = out  # bytes read here go there
        self.inp = inp  # bytes for this socket come from there
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
        self.out.src = transport
        self.inp.connected(transport)

    def data_received(self, data: bytes) -> None:
        if self.out.down:
            self.proxy.stats.bytes_down += len(data)
        else:
            self.proxy.stats.bytes_up += len(data)
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.source_ended(closed=False)
        return True  # half-close: keep writing what the other side still sends

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client:
            self.proxy.stats.open_connections -= 1
        self.out.source_ended(closed=True)
        self.inp.destination_gone()

    def pause_writing(self) -> None:
        self.inp.set_dst_full(True)

    def resume_writing(self) -> None:
        self.inp.set_dst_full(False)


class Proxy:
    """The listening side: one upstream connection per accepted client connection."""

    def __init__(self, upstream: tuple[str, int], delay: float, rate_bps: float, window: int = WINDOW) -> None:
        check_loopback(upstream[0])
        self.upstream = upstream
        self.delay = delay
        self.window = window
        self.up = Link(rate_bps)
        self.down = Link(rate_bps)
        self.stats = Stats(delay_ms=delay * 1000, rate_mbit=rate_bps * 8 / 1e6)
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()

    def client_protocol(self) -> Side:
        self.stats.connections += 1
        self.stats.open_connections += 1
        not_before = self.loop.time() + 2 * self.delay  # the handshake's round trip
        up = Half(self, self.up, not_before, down=False)
        down = Half(self, self.down, not_before, down=True)
        up.partner, down.partner = down, up
        side = Side(self, up, down, client=True)
        task = self.loop.create_task(self._connect(up, down))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return side

    async def _connect(self, up: Half, down: Half) -> None:
        try:
            await self.loop.create_connection(lambda: Side(self, down, up, client=False), *self.upstream)
        except OSError:
            self.stats.refused += 1
            up.destination_gone()
            down.source_ended(closed=True)


async def serve(upstream: tuple[str, int], listen_port: int, delay: float, rate_bps: float,
                control: str | None) -> None:
    proxy = Proxy(upstream, delay, rate_bps)
    loop = proxy.loop
    server = await loop.create_server(proxy.client_protocol, HOST, listen_port, reuse_address=True, backlog=512)
    port = server.sockets[0].getsockname()[1]

    async def answer(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(json.dumps(asdict(proxy.stats)).encode() + b"\n")
        with contextlib.suppress(OSError):
            await w.drain()
        w.close()

    ctl = None
    if control:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control)
        ctl = await asyncio.start_unix_server(answer, control)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening {HOST}:{port} -> {upstream[0]}:{upstream[1]} delay {delay * 1000:g} ms each way, "
          f"rate {'unlimited' if rate_bps <= 0 else f'{rate_bps * 8 / 1e6:g} Mbit/s'}", flush=True)
    await stop.wait()
    server.close()
    if ctl is not None:
        ctl.close()
    print(json.dumps(asdict(proxy.stats)), flush=True)


# -- the Python API: the proxy as a subprocess ------------------------------------------------------


class SlowLink:
    """The proxy as a subprocess in front of 127.0.0.1:`upstream_port`; `stats()` reads its counters."""

    def __init__(self, upstream_port: int, workdir: Path, delay_ms: float = DEFAULT_DELAY_MS,
                 rate_mbit: float = DEFAULT_RATE_MBIT, name: str = "slowlink") -> None:
        self.upstream_port = upstream_port
        self.workdir = Path(workdir)
        self.delay_ms = delay_ms
        self.rate_mbit = rate_mbit
        self.name = name
        self.control = self.workdir / f"{name}.sock"
        self.log_path = self.workdir / f"{name}.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def rate_bps(self) -> float:
        """Bytes per second of the cap (0: none)."""
        return self.rate_mbit * 1e6 / 8

    def start(self) -> SlowLink:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.control.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--upstream", f"{HOST}:{self.upstream_port}",
               "--delay-ms", str(self.delay_ms), "--rate-mbit", str(self.rate_mbit), "--control", str(self.control)]
        log = open(self.log_path, "ab")
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                          start_new_session=True)
        finally:
            log.close()
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n") and (left := deadline - time.monotonic()) > 0:
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:  # exited
                    break
                line += chunk
        if not line.startswith(b"listening ") or not self.control.exists():
            self.stop()
            raise RuntimeError(f"slowlink did not start: {line!r} {self.log_path.read_text(errors='replace')[-500:]}")
        self.port = int(line.split()[1].rsplit(b":", 1)[1])
        return self

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the proxy process used so far; None when it is not running."""
        if self._proc is None:
            return None
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> Stats:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.control))
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
        return Stats(**json.loads(buf))

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        self.control.unlink(missing_ok=True)

    def __enter__(self) -> SlowLink:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A delaying, rate-capped TCP proxy on loopback (a simulated link).")
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to (loopback)")
    ap.add_argument("--listen-port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    ap.add_argument("--delay-ms", type=float, default=DEFAULT_DELAY_MS,
                    help="one-way delay per direction (default %(default)s; RTT is twice this)")
    ap.add_argument("--rate-mbit", type=float, default=DEFAULT_RATE_MBIT,
                    help="cap per direction in Mbit/s, shared by all connections (0: none; default %(default)s)")
    ap.add_argument("--control", help="UNIX socket answering each connection with the counters as JSON")
    a = ap.parse_args(argv)
    host, _, port = a.upstream.rpartition(":")
    try:
        check_loopback(host)
    except ValueError as e:
        ap.error(str(e))
    asyncio.run(serve((host, int(port)), a.listen_port, a.delay_ms / 1000, a.rate_mbit * 1e6 / 8, a.control))
    return 0


if __name__ == "__main__":
    sys.exit(main())
