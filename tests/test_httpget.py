"""The lean blob GET client (aysfsd.stores.httpget) behind HttpStore.fetch: blobs over kept-alive
connections from a real nginx (one connection for many sequential GETs), answers it does not
handle (chunked, redirects) handed to httpx with the right bytes, a connection the server
closed while idle replaced, a truncated body an error (never short bytes), and through the
daemon a corrupt chunk, a corrupt pack and a truncated blob in an HTTP stor give EIO or the
next way to the right bytes, never wrong bytes."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from aysfsd.stores import HttpStore, StoreError
from aysfsd.stores.layout import blob_path
from aysfsd.tree.objects import CHUNK_SIZE
from tests.harness import blob_files, config, corrupted, pack_holding, publish, start, status
from tests.servers import Nginx, free_port

AYS = "jumpscale|tiers!main"


class RawServer:
    """A loopback HTTP server written on raw sockets, answering GET /blobs/.. for `blobs`
    (hash -> bytes) as `mode` says: "close" (a right answer, then the connection is closed
    without a Connection: close header), "chunked" (Transfer-Encoding: chunked, kept alive),
    "redirect" (301 to `target` + path), "short" (Content-Length, then half the body and close),
    "huge" (a Content-Length of 1 TiB, then the body and close).
    Counts connections and requests."""

    def __init__(self, blobs: dict[str, bytes], mode: str, target: str = "") -> None:
        self.blobs = blobs
        self.mode = mode
        self.target = target
        self.connections = 0
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buf = b""
        with conn:
            for _ in range(100):
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.requests += 1
                path = head.split(b" ")[1].decode()
                body = self.blobs.get(path.rsplit("/", 1)[-1])
                if body is None:
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                if self.mode == "redirect":
                    conn.sendall(f"HTTP/1.1 301 Moved\r\nLocation: {self.target}{path}\r\n"
                                 f"Content-Length: 0\r\n\r\n".encode())
                elif self.mode == "chunked":
                    half = len(body) // 2
                    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:half], body[half:]))
                                 + b"0\r\n\r\n")
                else:
                    sent = body[:len(body) // 2] if self.mode == "short" else body
                    length = 1 << 40 if self.mode == "huge" else len(body)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + sent)
                    if self.mode in ("close", "short", "huge"):
                        return


def blobs_of(n: int, size: int = 200_000) -> dict[str, bytes]:
    out = {}
    for _ in range(n):
        b = os.urandom(size)
        out[hashlib.sha256(b).hexdigest()] = b
    return out


def put_blobs(root: Path, blobs: dict[str, bytes]) -> None:
    for h, b in blobs.items():
        p = root / blob_path(h)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)


def fetch_all(store: HttpStore, hashes: list[str]) -> list[bytes | None]:
    async def main() -> list[bytes | None]:
        try:
            return [await store.fetch(blob_path(h)) for h in hashes]
        finally:
            await store.aclose()

    return trio.run(main)


@pytest.fixture
def logged_nginx(work: Path) -> Iterator[Nginx]:
    (work / "stor").mkdir()
    with Nginx(work / "stor", work / "nginx", put=True, access_log=True) as server:
        yield server


def test_blobs_over_one_kept_alive_connection_from_nginx(logged_nginx: Nginx) -> None:
    nginx_stor = logged_nginx
    blobs = blobs_of(6) | blobs_of(2, 3 * 1024 * 1024) | blobs_of(2, 10)
    put_blobs(nginx_stor.root, blobs)
    store = HttpStore(nginx_stor.url, timeout=5)
    assert store._gets is not None  # a plain http:// stor: the lean client
    missing = "0" * 64
    got = fetch_all(store, [*blobs, missing])
    assert got[:-1] == list(blobs.values()) and got[-1] is None
    assert store._gets.connections == 1  # 11 GETs, a 404 among them, on one connection
    assert len([r for r in nginx_stor.requests() if r.startswith("/blobs/")]) == len(blobs) + 1


def test_concurrent_gets_keep_their_connections_for_the_next_burst(logged_nginx: Nginx) -> None:
    blobs = blobs_of(40, 100_000)
    put_blobs(logged_nginx.root, blobs)
    store = HttpStore(logged_nginx.url, timeout=5)
    got: dict[str, bytes | None] = {}

    async def one(h: str) -> None:
        got[h] = await store.fetch(blob_path(h))

    async def main() -> None:
        try:
            for _ in range(2):  # two bursts of 40 GETs, 32 at a time
                async with trio.open_nursery() as n:
                    for h in blobs:
                        n.start_soon(one, h)
                assert got == blobs
                got.clear()
        finally:
            await store.aclose()

    trio.run(main)
    assert store._gets is not None
    # every connection the first burst opened is kept for the second (each costs a round trip)
    assert store._gets.connections <= 32


def test_warm_opens_connections_ahead_that_the_next_gets_use(logged_nginx: Nginx) -> None:
    """A cold start's first requests go out together on connections opened beforehand (each new
    one costs a round trip across a real link): warm() opens them all at once, tops up, never
    raises."""
    blobs = blobs_of(6, 1000)
    put_blobs(logged_nginx.root, blobs)
    store = HttpStore(logged_nginx.url, timeout=5)
    down = HttpStore(f"http://127.0.0.1:{free_port()}", timeout=5)  # nothing listens there
    pool = store._gets
    assert pool is not None and down._gets is not None
    got: dict[str, bytes | None] = {}

    async def one(h: str) -> None:
        got[h] = await store.fetch(blob_path(h))

    async def main() -> tuple[int, int, int, int]:
        try:
            opened = await pool.warm(6), await pool.warm(6)  # the second finds them idle
            async with trio.open_nursery() as n:
                for h in blobs:
                    n.start_soon(one, h)
            await store.warm(8)  # tops up to 8 idle
            return *opened, pool.connections, await down._gets.warm(3)  # type: ignore[union-attr]
        finally:
            await store.aclose()

    first, second, connections, refused = trio.run(main)
    assert got == blobs
    assert (first, second, refused) == (6, 0, 0)
    assert connections == 8  # the 6 GETs at once opened none of their own; the top-up opened 2
    assert len([r for r in logged_nginx.requests() if r.startswith("/blobs/")]) == len(blobs)


@pytest.mark.parametrize("mode", ["chunked", "redirect"])
def test_answers_it_does_not_handle_go_to_httpx(mode: str, logged_nginx: Nginx) -> None:
    nginx_stor = logged_nginx
    blobs = blobs_of(3)
    put_blobs(nginx_stor.root, blobs)
    srv = RawServer(blobs, mode, target=nginx_stor.url)
    try:
        assert fetch_all(HttpStore(srv.url, timeout=5), list(blobs)) == list(blobs.values())
        assert srv.requests == 2 * len(blobs)  # asked by the lean client, then by httpx
        if mode == "redirect":
            assert len([r for r in nginx_stor.requests() if r.startswith("/blobs/")]) == len(blobs)
    finally:
        srv.close()


def test_a_connection_closed_while_idle_is_replaced() -> None:
    blobs = blobs_of(4)
    srv = RawServer(blobs, "close")
    try:
        store = HttpStore(srv.url, timeout=5)
        assert fetch_all(store, list(blobs)) == list(blobs.values())
        assert srv.connections == len(blobs) and srv.requests == len(blobs)  # no request lost or repeated
    finally:
        srv.close()


def test_a_truncated_body_is_an_error_not_short_bytes() -> None:
    blobs = blobs_of(1)
    srv = RawServer(blobs, "short")
    try:
        with pytest.raises(StoreError, match=r"closed by the server after 100000 of the body's 200000 bytes"):
            fetch_all(HttpStore(srv.url, timeout=5), list(blobs))
    finally:
        srv.close()


def test_a_huge_content_length_is_not_allocated_up_front() -> None:
    """A body longer than MAX_BODY (here a lying header: 1 TiB, then 200 KB and close) is not
    allocated from the header's word: httpx takes it, streamed, and fails on the short body."""
    blobs = blobs_of(1)
    srv = RawServer(blobs, "huge")
    try:
        with pytest.raises(StoreError):
            fetch_all(HttpStore(srv.url, timeout=5), list(blobs))
        assert srv.requests == 2  # the lean client's, then httpx's
    finally:
        srv.close()


@pytest.fixture
def tree(work: Path) -> Path:
    src = work / "src"
    (src / "lib").mkdir(parents=True)
    for i in range(6):
        (src / "lib" / f"m{i}.py").write_text(f"# module {i}\n" * (40 + i))
    (src / "big.bin").write_bytes(os.urandom(CHUNK_SIZE + 12345))
    return src


def read_errno(path: Path) -> int | None:
    try:
        path.read_bytes()
    except OSError as e:
        return e.errno
    return None


def test_corrupt_and_truncated_blobs_in_an_http_stor_never_give_wrong_bytes(work: Path, tree: Path,
                                                                            nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    stor = nginx_stor.root
    files = blob_files(stor)
    big = (tree / "big.bin").read_bytes()
    c0, c1 = hashlib.sha256(big[:CHUNK_SIZE]).hexdigest(), hashlib.sha256(big[CHUNK_SIZE:]).hexdigest()
    files[c0].write_bytes(corrupted(files[c0].read_bytes()))  # a chunk corrupted
    files[c1].write_bytes(files[c1].read_bytes()[:100])  # a chunk truncated
    m0 = (tree / "lib" / "m0.py").read_bytes()
    m1 = (tree / "lib" / "m1.py").read_bytes()
    pack = pack_holding(stor, m0)
    assert pack_holding(stor, m1) == pack
    files[pack].write_bytes(files[pack].read_bytes().replace(b"module", b"MODULE"))  # a pack corrupted
    h0 = hashlib.sha256(m0).hexdigest()
    files[h0].write_bytes(files[h0].read_bytes().replace(b"module", b"MODULE"))  # and m0's own blob
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "timeout": 5}], [{"id": AYS, "mnt": str(mnt)}],
                  fetch_timeout=10)
    with start(work, "d", text, [mnt]) as d:
        assert (mnt / "lib" / "m1.py").read_bytes() == m1  # the pack refused, m1 fetched alone
        assert read_errno(mnt / "lib" / "m0.py") == errno.EIO  # its pack and its own blob corrupt
        with open(mnt / "big.bin", "rb") as f:
            with pytest.raises(OSError) as e0:
                f.read(4096)
            assert e0.value.errno == errno.EIO
            f.seek(CHUNK_SIZE)
            with pytest.raises(OSError) as e1:
                f.read(4096)
            assert e1.value.errno == errno.EIO
        log = d.log()
        for h in (c0, c1, pack, h0):
            assert f"corrupt blob {h} from {nginx_stor.url}" in log
        assert status(work, "d")["sources"][0]["corrupt"] >= 4
