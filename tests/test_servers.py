"""Prove that the throwaway test servers in tests/servers.py really work."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import httpx
import paramiko
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests import servers
from tests.servers import Nginx, Redis, Sshd, free_port, port_open

# Make the fixtures visible to this module (harmless if conftest also provides them).
nginx_stor = servers.nginx_stor
redis_server = servers.redis_server
sshd_server = servers.sshd_server

NO_RETRY = Retry(NoBackoff(), 0)

# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert not port_open(port)


# ---------------------------------------------------------------------------
# nginx
# ---------------------------------------------------------------------------


def test_nginx_put_get_roundtrip(nginx_stor: Nginx) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    with httpx.Client(base_url=nginx_stor.url, timeout=10) as c:
        r = c.put("/blob.bin", content=data)
        assert r.status_code in (201, 204), r.text
        r = c.get("/blob.bin")
        assert r.status_code == 200
        assert r.content == data
        # overwrite
        r = c.put("/blob.bin", content=b"v2")
        assert r.status_code in (201, 204)
        assert c.get("/blob.bin").content == b"v2"
    on_disk = nginx_stor.root / "blob.bin"
    assert on_disk.read_bytes() == b"v2"
    assert stat.S_IMODE(on_disk.stat().st_mode) == 0o644
    # The PUT temp files must not land inside the served root.
    assert sorted(p.name for p in nginx_stor.root.iterdir()) == ["blob.bin"]


def test_nginx_serves_preexisting_files_and_404(nginx_stor: Nginx) -> None:
    (nginx_stor.root / "sub").mkdir()
    (nginx_stor.root / "sub" / "f.txt").write_bytes(b"hello\n")
    with httpx.Client(base_url=nginx_stor.url, timeout=10) as c:
        r = c.get("/sub/f.txt")
        assert r.status_code == 200 and r.content == b"hello\n"
        assert c.get("/missing/file").status_code == 404
        assert c.get("/nope.bin").status_code == 404
        # autoindex off: a directory is not listed
        assert c.get("/sub/").status_code in (403, 404)


def test_nginx_put_creates_nested_dirs(nginx_stor: Nginx) -> None:
    with httpx.Client(base_url=nginx_stor.url, timeout=10) as c:
        r = c.put("/a/b/c/d.txt", content=b"deep")
        assert r.status_code in (201, 204), r.text
        assert c.get("/a/b/c/d.txt").content == b"deep"
        assert c.delete("/a/b/c/d.txt").status_code == 204
        assert c.get("/a/b/c/d.txt").status_code == 404
    assert (nginx_stor.root / "a" / "b" / "c").is_dir()


def test_nginx_stop_and_restart(nginx_stor: Nginx) -> None:
    with httpx.Client(base_url=nginx_stor.url, timeout=5) as c:
        assert c.put("/x", content=b"persist").status_code in (201, 204)
    port = nginx_stor.port
    nginx_stor.stop()
    assert not nginx_stor.running
    with pytest.raises(httpx.ConnectError), httpx.Client(base_url=nginx_stor.url, timeout=5) as c:
        c.get("/x")
    t0 = time.monotonic()
    nginx_stor.restart()
    assert time.monotonic() - t0 < 2
    assert nginx_stor.port == port
    with httpx.Client(base_url=nginx_stor.url, timeout=5) as c:
        assert c.get("/x").content == b"persist"


def test_nginx_keepalive_connection_is_cut_on_stop(nginx_stor: Nginx) -> None:
    (nginx_stor.root / "f").write_bytes(b"1")
    with httpx.Client(base_url=nginx_stor.url, timeout=5) as c:
        assert c.get("/f").status_code == 200
        nginx_stor.stop()
        with pytest.raises(httpx.TransportError):
            c.get("/f")


def test_nginx_readonly(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    root.mkdir()
    (root / "f").write_bytes(b"ro")
    with Nginx(root, tmp_path / "ngx", put=False) as ngx, httpx.Client(base_url=ngx.url, timeout=5) as c:
        assert c.get("/f").content == b"ro"
        assert c.put("/g", content=b"x").status_code == 405
        assert c.delete("/f").status_code == 405
    assert not ngx.running
    assert not port_open(ngx.port)


# ---------------------------------------------------------------------------
# redis
# ---------------------------------------------------------------------------


def test_redis_set_get_with_password(redis_server: Redis) -> None:
    r = redis_server.client()
    assert r.set(b"k", b"\x00\xffv")
    assert r.get(b"k") == b"\x00\xffv"
    assert redis_server.password == "testpass"
    r.close()


def test_redis_requires_password(redis_server: Redis) -> None:
    # NB: redis-py's AuthenticationError is a ConnectionError and is retried with
    # backoff by default; NO_RETRY keeps this fast.
    anon = redis.Redis(host="127.0.0.1", port=redis_server.port, retry=NO_RETRY)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):  # 4.3: WRONGPASS is a ResponseError
        anon.get(b"k")
    anon.close()
    wrong = redis.Redis(host="127.0.0.1", port=redis_server.port, password="wrong", retry=NO_RETRY)
    with pytest.raises((redis.AuthenticationError, redis.ResponseError)):  # 4.3: WRONGPASS is a ResponseError
        wrong.ping()
    wrong.close()


def test_redis_stop_and_restart(redis_server: Redis) -> None:
    r = redis_server.client(socket_connect_timeout=2, socket_timeout=2)
    r.set(b"k", b"v")
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        r.ping()
    t0 = time.monotonic()
    redis_server.restart()
    assert time.monotonic() - t0 < 2
    assert r.ping()
    assert r.get(b"k") is None  # not persisted (--save '')
    r.close()


def test_redis_start_failure_reports_log(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        srv = Redis(tmp_path / "r", port=blocker.getsockname()[1])
        with pytest.raises(RuntimeError, match="(?i)address already in use"):
            srv.start()
        assert not srv.running


def test_redis_without_password(tmp_path: Path) -> None:
    with Redis(tmp_path / "r", password=None) as srv:
        r = redis.Redis(host="127.0.0.1", port=srv.port)
        assert r.ping()
        r.close()


# ---------------------------------------------------------------------------
# sshd
# ---------------------------------------------------------------------------


def _strict_client(known_hosts: Path | None) -> paramiko.SSHClient:
    c = paramiko.SSHClient()
    if known_hosts is not None:
        c.load_host_keys(str(known_hosts))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    return c


def test_sshd_sftp_reads_file(sshd_server: Sshd, tmp_path: Path) -> None:
    f = tmp_path / "data" / "hello.bin"
    f.parent.mkdir()
    payload = os.urandom(200_000)
    f.write_bytes(payload)
    client = _strict_client(sshd_server.known_hosts)
    client.connect(
        "127.0.0.1",
        port=sshd_server.port,
        username=sshd_server.user,
        key_filename=str(sshd_server.client_key),
        look_for_keys=False,
        allow_agent=False,
        timeout=5,
    )
    try:
        sftp = client.open_sftp()
        with sftp.open(str(f), "rb") as fh:
            assert fh.read() == payload
        assert sftp.stat(str(f)).st_size == len(payload)
        sftp.close()
    finally:
        client.close()
    assert sshd_server.url("/srv/x") == f"ssh://root@127.0.0.1:{sshd_server.port}/srv/x"
    assert sshd_server.user == "root"


def test_sshd_unknown_host_key_rejected(sshd_server: Sshd, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    client = _strict_client(empty)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(
            "127.0.0.1",
            port=sshd_server.port,
            username="root",
            key_filename=str(sshd_server.client_key),
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()


def test_sshd_wrong_client_key_rejected(sshd_server: Sshd, tmp_path: Path) -> None:
    other = paramiko.Ed25519Key.from_private_key_file(str(sshd_server.host_key))  # any non-authorized key
    client = _strict_client(sshd_server.known_hosts)
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(
            "127.0.0.1",
            port=sshd_server.port,
            username="root",
            pkey=other,
            look_for_keys=False,
            allow_agent=False,
            timeout=5,
        )
    client.close()


def test_sshd_stop_and_restart(sshd_server: Sshd, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    client = sshd_server.connect()
    sftp = client.open_sftp()
    assert sftp.stat(str(tmp_path / "f")).st_size == 3
    sshd_server.stop()
    # existing sessions die with the server, new connections are refused
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        sftp.stat(str(tmp_path / "f"))
    client.close()
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        sshd_server.connect(timeout=2)
    t0 = time.monotonic()
    sshd_server.restart()
    assert time.monotonic() - t0 < 2
    client = sshd_server.connect()  # same host key: known_hosts still valid
    try:
        sftp = client.open_sftp()
        with sftp.open(str(tmp_path / "f"), "rb") as fh:
            assert fh.read() == b"abc"
    finally:
        client.close()
