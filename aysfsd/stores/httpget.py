"""Blob GETs over plain HTTP/1.1 keep-alive connections on trio sockets, for HttpStore.fetch.

Why not httpx here: on a cold walk the daemon's trio loop is the bottleneck (2 cores shared
with the reader, the server and the link), and httpx + httpcore + h11 cost ~0.8 ms of loop CPU
per request (request and response objects, the pool's bookkeeping, cookies, redirects) plus
three copies of every byte and a pass through h11 per socket read (bench/README.md, "The
daemon's CPU on the cold path"). A stor's GET is simple: one request line, a Content-Length
body. This client reads the body straight into one buffer (`recv_into`), so per request it
costs a send, the header parse and a few `recv_into` calls.

Only the common case is handled: `http://` without credentials or a proxy (HttpStore decides),
a 200 or 404 answer with a Content-Length (up to MAX_BODY) and no content or transfer
encoding. Anything else
(a redirect, a chunked or compressed body, another status) raises `Unusual` before a byte of
the body is read: the caller asks again through httpx, which handles all of HTTP.

Timeouts as httpx's: the connect is bounded by `connect_timeout`, every read or write by
`timeout` (a slow transfer is not a dead one). Waiting for a free connection is not bounded
here (the fetcher's fetch_timeout bounds the whole fetch). A reused connection the server has
closed meanwhile (nginx's keepalive_timeout or keepalive_requests) is detected before use
(readable while idle) or by an end of stream before any answer: then the request is sent once
more on a new connection.
"""

from __future__ import annotations

import errno
import math

import trio

from .base import LowSpeed, Progress, StoreError, StoreSlow, StoreTimeout, describe

HEAD_MAX = 64 * 1024  # a response's status line and headers, at most
RECV = 256 * 1024  # largest single read of a body (into the body's own buffer)
MAX_BODY = 64 << 20  # a longer body (a huge directory object, or a hostile Content-Length) goes to httpx,
# streamed as it arrives: this client allocates the whole body up front, from the header's word


class Unusual(Exception):
    """An answer this client does not handle (ask httpx); raised before any body byte is read."""


class _Stale(Exception):
    """A reused connection ended before any answer: the server closed it while idle."""


class GetPool:
    """HTTP/1.1 GETs to one server (host, port), at most `max_connections` at once."""

    def __init__(self, host: str, port: int, host_header: str, timeout: float, connect_timeout: float,
                 max_connections: int = 32, max_idle: int = 32) -> None:
        self.host = host
        self.port = port
        self.host_header = host_header
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[trio.socket.SocketType] = []
        self.connections = 0  # opened so far (tests)
        self._warming = 0  # connections being opened by warm()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def warm(self, n: int) -> int:
        """Open connections, all at once, until `n` are idle (at most max_idle): a cold start's
        first requests then go out together, where each would otherwise pay a round trip for
        its own connection. A failure is left to the requests to report (a warm-up is a hint).
        Returns how many were opened."""
        want = min(n, self.max_idle) - len(self._idle) - self._warming
        if want <= 0:
            return 0
        self._warming += want
        opened = 0

        async def one() -> None:
            nonlocal opened
            try:
                with trio.fail_after(self.connect_timeout):
                    stream = await trio.open_tcp_stream(self.host, self.port)
            except (trio.TooSlowError, OSError):
                return
            finally:
                self._warming -= 1
            self.connections += 1
            opened += 1
            if len(self._idle) < self.max_idle:
                self._idle.append(stream.socket)
            else:
                stream.socket.close()

        async with trio.open_nursery() as nursery:
            for _ in range(want):
                nursery.start_soon(one)
        return opened

    async def get(self, path: str, p: Progress, where: str, low: LowSpeed) -> bytes | None:
        """The body of GET `path` (None on 404); StoreError/StoreTimeout/StoreSlow (`where`
        leads the message) on a transport error, a timeout or a transfer below the low-speed
        limit `low`; Unusual for what httpx must handle."""
        request = (f"GET {path} HTTP/1.1\r\nHost: {self.host_header}\r\nUser-Agent: aysfsd\r\n"
                   f"Accept-Encoding: identity\r\n\r\n").encode()
        async with self._slots:
            for _ in range(2):
                sock, reused = await self._socket(where)
                done = False
                try:
                    status, body, keep = await self._exchange(sock, request, p, reused, low, where)
                    done = True
                except _Stale:
                    continue  # (closed in finally) once more on a new connection
                except trio.TooSlowError:
                    raise StoreTimeout(f"{where}: timed out (no data for {self.timeout:g}s)") from None
                except OSError as e:
                    raise StoreError(f"{where}: {describe(e)}") from e
                finally:
                    if not (done and keep and len(self._idle) < self.max_idle):
                        sock.close()
                    else:
                        self._idle.append(sock)
                return body if status == 200 else None
            raise StoreError(f"{where}: the connection closed before an answer, twice")

    async def _socket(self, where: str) -> tuple[trio.socket.SocketType, bool]:
        while self._idle:
            sock = self._idle.pop()
            if sock.is_readable():  # closed by the server (or it sent something unasked): not usable
                sock.close()
                continue
            return sock, True
        try:
            with trio.fail_after(self.connect_timeout):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except trio.TooSlowError:
            raise StoreTimeout(f"{where}: timed out (connecting for {self.connect_timeout:g}s)") from None
        except OSError as e:
            raise StoreError(f"{where}: {describe(e)}") from e
        self.connections += 1
        return stream.socket, False

    async def _exchange(self, sock: trio.socket.SocketType, request: bytes, p: Progress, reused: bool,
                        low: LowSpeed, where: str) -> tuple[int, bytes | None, bool]:
        """Send `request`, read the answer: (status, body, connection reusable)."""
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + self.timeout
            view = memoryview(request)
            while view:
                try:
                    n = await sock.send(view)
                except (BrokenPipeError, ConnectionResetError):
                    if reused:
                        raise _Stale() from None
                    raise
                view = view[n:]
                scope.deadline = trio.current_time() + self.timeout
            head = bytearray()
            while (end := head.find(b"\r\n\r\n")) < 0:
                if len(head) > HEAD_MAX:
                    raise Unusual("headers too long")
                try:
                    chunk = await sock.recv(HEAD_MAX)
                except ConnectionResetError:
                    if reused and not head:
                        raise _Stale() from None
                    raise
                if not chunk:
                    if reused and not head:
                        raise _Stale()
                    raise OSError(errno.ECONNRESET, "connection closed by the server before the answer's end")
                head += chunk
                scope.deadline = trio.current_time() + self.timeout
        if scope.cancelled_caught:
            raise trio.TooSlowError
        status, length, keep = _parse_head(bytes(head[:end]))
        p.started = True
        rest = memoryview(head)[end + 4:]
        if len(rest) > length:
            raise Unusual("more bytes than Content-Length")  # a pipelining server? not ours
        body = bytearray(length)
        body[:len(rest)] = rest
        got = len(rest)
        p.bytes += got
        await self._body(sock, memoryview(body), got, p, low, where)
        return status, bytes(body) if status == 200 else None, keep

    async def _body(self, sock: trio.socket.SocketType, mv: memoryview, got: int, p: Progress, low: LowSpeed,
                    where: str) -> None:
        """Fill `mv` from its byte `got` on. Each read is bounded by `timeout`; with a low-speed
        limit, every `low.seconds` must bring `low.limit * low.seconds` bytes (StoreSlow), as
        within_low_speed checks for other stores (a window of its own, without a task per fetch)."""
        length = len(mv)
        now = trio.current_time()
        window_end = now + low.seconds if low.limit > 0 else math.inf
        window_got = got
        while got < length:
            if now >= window_end:
                if got - window_got < low.limit * low.seconds:
                    raise StoreSlow(f"{where}: too slow: {got - window_got} bytes in {low.seconds:g}s "
                                    f"(low_speed_limit {low.limit} bytes/s; {got} bytes received)")
                window_end, window_got = now + low.seconds, got
            read_deadline = now + self.timeout
            with trio.move_on_at(min(read_deadline, window_end)):
                n = await sock.recv_into(mv[got:], min(length - got, RECV))
                if n == 0:
                    raise OSError(errno.ECONNRESET, f"connection closed by the server after {got} of the "
                                                    f"body's {length} bytes")
                got += n
                p.bytes += n
            now = trio.current_time()
            if now >= read_deadline:
                raise trio.TooSlowError


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, keep-alive) of a response head; Unusual for what we leave to httpx."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise Unusual(f"status line {lines[0][:80]!r}")
    status = int(parts[1])
    if status not in (200, 404):
        raise Unusual(f"HTTP {status}")
    length = -1
    keep = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise Unusual("malformed header")
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise Unusual("Content-Length")
            length = int(value)
        elif name in (b"transfer-encoding", b"content-encoding") and value.lower() != b"identity":
            raise Unusual(f"{name.decode()}: {value[:40].decode(errors='replace')}")
        elif name == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            keep = b"keep-alive" in tokens if parts[0] == b"HTTP/1.0" else b"close" not in tokens
    if length < 0:
        raise Unusual("no Content-Length")
    if length > MAX_BODY:
        raise Unusual(f"Content-Length {length} over {MAX_BODY}")
    return status, length, keep


def pool_for(url: str, timeout: float, connect_timeout: float) -> GetPool | None:
    """A GetPool for `url` when it is plain http:// without credentials; else None (httpx only)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname or u.username or u.password or u.query or u.fragment:
        return None
    try:
        port = u.port or 80
    except ValueError:
        return None
    host = u.hostname
    return GetPool(host, port, u.netloc, timeout, connect_timeout)

