"""SshStore against a real sshd on 127.0.0.1 (tests.servers.Sshd)."""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
import trio

from aysfsd.stores import StoreError, open_store
from aysfsd.stores import ssh as store_ssh
from aysfsd.stores.layout import blob_path, ref_path, sha256_hex
from aysfsd.stores.ssh import SshStore
from tests.servers import Sshd, _descendants

TIMEOUT = 3.0


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd shared by the tests that do not stop it."""
    with Sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A private sshd for tests that stop, restart or freeze it."""
    with Sshd(tmp_path / "sshd") as server:
        yield server


def make_store(server: Sshd, root: Path, **kw: object) -> SshStore:
    opts: dict[str, object] = {"timeout": TIMEOUT, "key": str(server.client_key),
                               "known_hosts": str(server.known_hosts)}
    opts.update(kw)
    return SshStore(server.url(str(root)), **opts)  # type: ignore[arg-type]


@pytest.fixture
def store(sshd: Sshd, tmp_path: Path) -> Iterator[SshStore]:
    s = make_store(sshd, tmp_path / "stor")
    try:
        yield s
    finally:
        s.close()


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    return path


# -- URL parsing (no server) -------------------------------------------------------


def test_url_parsing() -> None:
    s = SshStore("ssh://example.org/srv/stor/")
    assert (s.host, s.port, s.user, s.root, s.url) == ("example.org", 22, getpass.getuser(), "/srv/stor",
                                                        "ssh://example.org/srv/stor")
    s = SshStore("ssh://bob@[::1]:2222/")
    assert (s.host, s.port, s.user, s.root) == ("::1", 2222, "bob", "")
    assert s._abs("blobs/ab/cd") == "/blobs/ab/cd"
    for bad in ("ssh://host", "ssh://u:pw@host/x", "http://host/x", "ssh:///x"):
        with pytest.raises(ValueError):
            SshStore(bad)


def test_check_rel_rejects_escapes(store: SshStore) -> None:
    for bad in ("../x", "a/../../x", "/etc/passwd", "a//b", "./a", ""):
        with pytest.raises(ValueError):
            store.read(bad)
        with pytest.raises(ValueError):
            store.write(bad, b"x")
        with pytest.raises(ValueError):
            store.exists(bad)
    assert store.connects == 0


# -- reading and writing -----------------------------------------------------------


def test_roundtrip_blobs(store: SshStore, tmp_path: Path) -> None:
    big = os.urandom(5 * 1024 * 1024 + 123)
    for data in (b"hello", b"", big):
        rel = blob_path(sha256_hex(data))
        store.write(rel, data)
        got = store.read(rel)
        assert got == data
        on_disk = tmp_path / "stor" / rel
        assert on_disk.read_bytes() == data
        assert stat.S_IMODE(on_disk.stat().st_mode) == 0o644
    # no temp files left behind
    assert not [p for p in (tmp_path / "stor").rglob(".*")]
    assert store.connects == 1  # one reused connection


def test_overwrite_is_atomic_replace(store: SshStore, tmp_path: Path) -> None:
    rel = ref_path("jumpscale|mongodb!main")
    store.write(rel, b"v1")
    store.write(rel, b"version two")
    assert store.read(rel) == b"version two"
    assert sorted(p.name for p in (tmp_path / "stor" / "refs").iterdir()) == ["jumpscale%7Cmongodb%21main"]


def test_rename_fallback_without_posix_rename(store: SshStore, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(self: paramiko.SFTPClient, old: str, new: str) -> None:
        raise OSError("Operation unsupported")

    monkeypatch.setattr(paramiko.SFTPClient, "posix_rename", unsupported)
    store.write("refs/r", b"one")
    store.write("refs/r", b"two")  # plain rename refuses to overwrite: removed first
    assert store.read("refs/r") == b"two"
    assert [p.name for p in (tmp_path / "stor" / "refs").iterdir()] == ["r"]


def test_failed_write_leaves_no_temp_file(store: SshStore, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(self: paramiko.SFTPClient, old: str, new: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    store.write("refs/r", b"old")
    monkeypatch.setattr(paramiko.SFTPClient, "posix_rename", denied)
    with pytest.raises(StoreError, match="write refs/r: Permission denied"):
        store.write("refs/r", b"new")
    assert [p.name for p in (tmp_path / "stor" / "refs").iterdir()] == ["r"]
    assert store.read("refs/r") == b"old"
    assert store.connects == 1  # an SFTP error does not cost the connection


def test_exists_and_missing(store: SshStore, tmp_path: Path) -> None:
    assert store.read("blobs/00/nothing") is None  # root does not even exist yet
    assert store.exists("blobs/00/nothing") is False
    store.write("blobs/00/something", b"x")
    assert store.exists("blobs/00/something") is True
    assert store.exists("blobs/00/other") is False
    assert store.read("blobs/00/other") is None
    # directories and paths through a file are "not there"
    assert store.exists("blobs/00") is False
    assert store.read("blobs/00") is None
    assert store.read("blobs/00/something/below") is None
    assert store.exists("blobs/00/something/below") is False


def test_nested_dirs_created(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "deep" / "er" / "stor"
    with make_store(sshd, root) as s:
        s.write("a/b/c/d/e", b"nested")
        assert (root / "a/b/c/d/e").read_bytes() == b"nested"
        s.write("a/b/x", b"sibling")  # parents partly exist
        assert s.read("a/b/x") == b"sibling"
        (root / "file").write_bytes(b"f")
        with pytest.raises(StoreError):  # a file in the way of a directory
            s.write("file/y", b"y")
        assert s.read("a/b/c/d/e") == b"nested"  # the connection survived the error


def test_permission_error_is_store_error(sshd: Sshd, tmp_path: Path) -> None:
    # root ignores permissions, so use a path under /proc that cannot be created
    with make_store(sshd, Path("/proc/self")) as s:
        with pytest.raises(StoreError, match="write"):
            s.write("nope/x", b"x")
        assert s.exists("nope/x") is False


def test_concurrent_reads_pool_bounded(store: SshStore, monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = {blob_path(sha256_hex(d)): d for d in (os.urandom(1000 + 997 * i) for i in range(20))}
    for rel, data in blobs.items():
        store.write(rel, data)
    store.close()

    # count open connections independently of the store's own bookkeeping
    lock = threading.Lock()
    live = peak = 0
    real_connect, real_close = SshStore._connect, store_ssh._Conn.close

    def connect(self: SshStore, op: str, rel: str) -> store_ssh._Conn:
        nonlocal live, peak
        conn = real_connect(self, op, rel)
        with lock:
            live += 1
            peak = max(peak, live)
        return conn

    def close(self: store_ssh._Conn) -> None:
        nonlocal live
        with lock:
            live -= 1
        real_close(self)

    monkeypatch.setattr(SshStore, "_connect", connect)
    monkeypatch.setattr(store_ssh._Conn, "close", close)

    errors: list[BaseException] = []
    rels = list(blobs)

    def reader(n: int) -> None:
        try:
            for i in range(20):
                rel = rels[(n + i) % len(rels)]
                assert store.read(rel) == blobs[rel]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert 1 <= peak <= 4
    assert store.peak_connections <= 4
    assert store.connects <= 1 + 4  # the write phase used one
    store.close()
    assert live == 0


# -- host keys and authentication --------------------------------------------------


def test_unknown_host_key_refused(sshd: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with make_store(sshd, tmp_path / "stor", known_hosts=str(empty)) as s:
        with pytest.raises(StoreError, match="host key") as ei:
            s.read("blobs/00/x")
        assert "unknown" in str(ei.value)
        assert s.peak_connections == 1 and not s._idle and s._live == 0


def test_host_key_mismatch_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host_key")
    kh = tmp_path / "known_hosts"
    pub = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    kh.write_text(f"[127.0.0.1]:{sshd.port} {pub}\n")
    with make_store(sshd, tmp_path / "stor", known_hosts=str(kh)) as s:
        with pytest.raises(StoreError, match="host key MISMATCH"):
            s.exists("blobs/00/x")


def test_accept_unknown_host(sshd: Sshd, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    caplog.set_level(logging.WARNING, logger="aysfsd.ssh")
    with make_store(sshd, tmp_path / "stor", known_hosts=str(empty), accept_unknown_host=True) as s:
        s.write("x", b"accepted")
        s.close()  # force a second connection: the key is pinned, warned about once
        assert s.read("x") == b"accepted"
        assert s.connects == 2
    warnings = [r for r in caplog.records if r.name == "aysfsd.ssh" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "host key" in warnings[0].getMessage()
    assert empty.read_text() == ""  # known_hosts is not rewritten


def test_wrong_key_is_authentication_error(sshd: Sshd, tmp_path: Path) -> None:
    wrong = keygen(tmp_path / "id_wrong")
    with make_store(sshd, tmp_path / "stor", key=str(wrong)) as s:
        with pytest.raises(StoreError, match="authentication"):
            s.read("x")
    with make_store(sshd, tmp_path / "stor", key=str(tmp_path / "missing_key")) as s:
        with pytest.raises(StoreError, match="authentication"):
            s.read("x")


# -- failures and recovery ---------------------------------------------------------


def test_stopped_server_then_restart(own_sshd: Sshd, tmp_path: Path) -> None:
    with make_store(own_sshd, tmp_path / "stor") as s:
        s.write("blobs/aa/x", b"before")
        assert s.read("blobs/aa/x") == b"before"
        own_sshd.stop()
        for op in (lambda: s.read("blobs/aa/x"), lambda: s.exists("blobs/aa/x"), lambda: s.write("y", b"y")):
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="ssh"):
                op()
            assert time.monotonic() - t0 < TIMEOUT + 2
        assert s._live == 0
        own_sshd.start()
        assert s.read("blobs/aa/x") == b"before"
        # a pooled connection gone stale across a restart is replaced transparently
        own_sshd.restart()
        assert s.read("blobs/aa/x") == b"before"
        assert s._live == 1


def test_frozen_server_times_out(own_sshd: Sshd, tmp_path: Path) -> None:
    with make_store(own_sshd, tmp_path / "stor", timeout=1.5) as s:
        s.write("x", b"x")
        pid = own_sshd.pid
        assert pid is not None
        frozen = [pid] + [p for p, _ in _descendants(pid)]
        for p in frozen:
            os.kill(p, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError, match="timed out"):
                s.read("x")
            assert time.monotonic() - t0 < 1.5 + 2
            t0 = time.monotonic()
            with pytest.raises(StoreError):  # new connection: banner never comes
                s.read("x")
            assert time.monotonic() - t0 < 1.5 + 2
        finally:
            for p in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)
        assert s.read("x") == b"x"


# -- async and open_store ----------------------------------------------------------


def test_async_fetch_store(store: SshStore) -> None:
    datas = [os.urandom(500 * i + 1) for i in range(12)]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for d in datas:
                nursery.start_soon(store.store, blob_path(sha256_hex(d)), d)
        got: dict[int, bytes | None] = {}

        async def one(i: int) -> None:
            got[i] = await store.fetch(blob_path(sha256_hex(datas[i])))

        async with trio.open_nursery() as nursery:
            for i in range(len(datas)):
                nursery.start_soon(one, i)
        assert got == dict(enumerate(datas))
        assert await store.fetch("blobs/00/missing") is None
        await store.aclose()
        assert not store._idle

    trio.run(main)
    assert store.peak_connections <= 4


def test_open_store_publish_path(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "published"
    s = open_store(sshd.url(str(root)), timeout=TIMEOUT, ssh_key=str(sshd.client_key),
                   ssh_known_hosts=str(sshd.known_hosts))
    try:
        assert isinstance(s, SshStore)
        data = b"published blob"
        h = sha256_hex(data)
        s.write(blob_path(h), data)
        s.write(ref_path("app!main"), b'{"root": "x"}')
        assert (root / "blobs" / h[:2] / h).read_bytes() == data
        assert s.exists(blob_path(h))
        assert s.read(ref_path("app!main")) == b'{"root": "x"}'
    finally:
        s.close()
