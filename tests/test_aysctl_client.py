"""aysctl's control commands against a fake aysfsd: a real Unix-socket server with canned replies."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from aysctl import client, commands, render
from aysctl.client import ControlError, find_socket, request
from aysctl.main import main

AYS = "jumpscale|mongodb!main"
ROOT = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"

STATUS: dict[str, Any] = {
    "ok": True,
    "daemon": {"pid": 4242, "version": "0.1.0", "uptime": 3725.5, "config": "/etc/aysfs/aysfs.toml",
               "config_error": "", "reloads": 2, "status": "running"},
    "cache": {"dir": "/var/cache/aysfs", "entries": 120, "bytes": 5 * 2**20, "limit": 10 * 2**30, "hits": 900,
              "misses": 100, "memory_hits": 400, "evicted_blobs": 3, "evicted_bytes": 4096},
    "sources": [
        {"url": "http://grid1:8080", "tier": "grid", "down": False, "failures": 0, "fetched_blobs": 10,
         "fetched_bytes": 2048, "corrupt": 0},
        {"url": "ssh://deploy@stor/srv/aysfs", "tier": "stor", "down": True, "failures": 7, "fetched_blobs": 50,
         "fetched_bytes": 3 * 2**20, "corrupt": 1},
    ],
    "mounts": [
        {"name": "jumpscale_mongodb_main", "id": AYS, "mnt": "/opt/mongodb", "state": "up", "error": "",
         "root": ROOT, "revision": 7, "debug": False, "hits": 10, "misses": 2, "bytes_read": 1234,
         "bytes_by_tier": {"local": 1000, "grid": 200, "stor": 34},
         "prefetch": {"state": "running", "blobs_done": 3, "blobs_total": 9, "bytes_done": 30,
                      "bytes_total": 90, "errors": 0}},
        {"name": "web", "id": "jumpscale|web!main", "mnt": "/opt/web", "state": "error",
         "error": "ref not found in any stor", "root": None, "revision": None, "debug": True, "hits": 0,
         "misses": 0, "bytes_read": 0, "bytes_by_tier": {"local": 0, "grid": 0, "stor": 0}, "prefetch": None},
    ],
}


class Interrupt:
    """A reply item: wait a moment, send SIGINT to the main thread (a Ctrl-C), then wait for the
    client to hang up."""


Item = dict[str, Any] | bytes | Interrupt
Reply = list[Item] | Callable[[dict[str, Any]], list[Item]]


class FakeDaemon(socketserver.ThreadingUnixStreamServer):
    """Answers each request with the canned lines for its "cmd" and records the requests."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.replies: dict[str, Reply] = {}
        self.requests: list[dict[str, Any]] = []
        self.hung_up = threading.Event()
        super().__init__(path, _Handler)


class _Handler(socketserver.StreamRequestHandler):
    server: FakeDaemon

    def handle(self) -> None:
        req = json.loads(self.rfile.readline(65537))
        self.server.requests.append(req)
        reply = self.server.replies.get(req["cmd"], [{"ok": False, "code": "bad-request", "error": "unknown cmd"}])
        for item in reply(req) if callable(reply) else reply:
            if isinstance(item, Interrupt):
                time.sleep(0.3)
                signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                self.rfile.read()  # until the client closes the connection
                self.server.hung_up.set()
                return
            self.wfile.write(item if isinstance(item, bytes) else json.dumps(item).encode() + b"\n")


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    d = tempfile.mkdtemp(prefix="aysctl-", dir="/tmp")  # short: AF_UNIX paths are limited to 108 bytes
    srv = FakeDaemon(os.path.join(d, "ctl.sock"))
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        shutil.rmtree(d)


def run(daemon: FakeDaemon, *argv: str) -> int:
    return main(["--socket", daemon.path, *argv])


def log_events(req: dict[str, Any]) -> list[Item]:
    return [{"event": "log", "time": 1_700_000_000.0 + i, "level": "debug", "logger": "aysfsd.fuse.ops",
             "message": f"line {i}", "AYSFS_MOUNT": req.get("mount") or "web"} for i in range(req["lines"])]


# --- status -----------------------------------------------------------------------------------

def test_status_plain(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["status"] = [STATUS]
    assert run(daemon, "status") == 0
    out = capsys.readouterr().out.splitlines()
    assert daemon.requests == [{"cmd": "status"}]
    assert out[0].startswith("#")
    assert f"jumpscale_mongodb_main\t{AYS}\t/opt/mongodb\tup\t{ROOT[:12]}\t7\t10\t2\t-" in out
    assert "web\tjumpscale|web!main\t/opt/web\terror\t-\t-\t0\t0\tref not found in any stor" in out
    assert f"cache\t{5 * 2**20}\t{10 * 2**30}\t120\t-\t-" in out  # state, reason: an older daemon
    assert "source\thttp://grid1:8080\tgrid\tup" in out
    assert "source\tssh://deploy@stor/srv/aysfs\tstor\tdown" in out
    assert not any("│" in line or "┃" in line for line in out)


def test_status_cache_state(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    reason = "its filesystem has 0.2 MiB free of 16.0 MiB, less than cache_min_free (4.0 MiB)"
    daemon.replies["status"] = [{**STATUS, "cache": {**STATUS["cache"], "state": "memory", "reason": reason,
                                                     "fs_free": 200 * 1024, "fs_size": 16 * 2**20,
                                                     "min_free": 4 * 2**20, "queued_bytes": 3 * 2**20,
                                                     "fetches_waiting": 2}}]
    assert run(daemon, "status") == 0
    assert f"cache\t{5 * 2**20}\t{10 * 2**30}\t120\tmemory\t{reason}" in capsys.readouterr().out.splitlines()
    console = Console(file=io.StringIO(), width=300)
    replies = daemon.replies["status"]
    assert isinstance(replies, list) and isinstance(replies[0], dict)
    render.print_status(console, replies[0])
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "free on its filesystem (keeps 4.0 MiB)" in text and f"cache state memory: {reason}" in text
    assert "3.0 MiB waiting for their write" in text and "2 fetches waiting on downloads" in text


def test_status_json(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["status"] = [STATUS]
    assert run(daemon, "--json", "status") == 0
    assert json.loads(capsys.readouterr().out) == STATUS
    assert run(daemon, "status", "--json") == 0  # also accepted after the subcommand
    assert json.loads(capsys.readouterr().out) == STATUS


def test_status_config_error_plain_goes_to_stderr(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["status"] = [{**STATUS, "daemon": {**STATUS["daemon"], "config_error": "x.toml:3: bad"}}]
    assert run(daemon, "status") == 0
    cap = capsys.readouterr()
    assert "config error (the previous config is still running)" in cap.err and "x.toml:3: bad" in cap.err
    assert "x.toml" not in cap.out


def test_status_rich_rendering() -> None:
    buf = io.StringIO()
    st = {**STATUS, "daemon": {**STATUS["daemon"], "config_error": "x.toml:3: main cache_size: bad"}}
    render.print_status(Console(file=buf, width=220, color_system=None), st)
    text = buf.getvalue()
    for want in ("pid 4242", "up 1h 02m", "jumpscale_mongodb_main", AYS, "/opt/mongodb", f"{ROOT[:12]} r7",
                 "10/2", "1000 B / 200 B / 34 B", "running 3/9", "web: ref not found in any stor",
                 "config error (the previous config is still running)", "x.toml:3: main cache_size: bad",
                 "5.0 MiB / 10.0 GiB used", "120 entries", "DOWN", "http://grid1:8080", "50 blobs, 3.0 MiB"):
        assert want in text, want


def test_status_shows_pyfuse3_and_the_session_mode(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fast = {"version": "3.5.0", "path": "/usr/lib/aysfs/python/pyfuse3", "patched": True,
            "patch_ignored": False, "fallback": "", "spin_us": 200}
    slow = {"version": "3.2.1", "path": "/usr/lib/python3/dist-packages", "patched": False, "patch_ignored": False,
            "fallback": "no pyfuse3 in /usr/lib/aysfs/python (the package was built without aysfs's patched pyfuse3)"}
    for info, no_open, mode, plain in (
            (fast, True, "no_open (kernel caches pages and listings)", "fuse\t3.5.0\tpatched\tno_open\t"
                                                                        "/usr/lib/aysfs/python/pyfuse3"),
            (slow, False, "open/release per file (pyfuse3 without aysfs's patch)",
             "fuse\t3.2.1\tunpatched\topen\t/usr/lib/python3/dist-packages")):
        st = {**STATUS, "daemon": {**STATUS["daemon"], "pyfuse3": info, "no_open": no_open, "fuse_mode": mode}}
        buf = io.StringIO()
        render.print_status(Console(file=buf, width=220, color_system=None), st)
        text = buf.getvalue()
        what = "with aysfs's patch" if info["patched"] else "without aysfs's patch"
        assert f"fuse pyfuse3 {info['version']} {what} ({info['path']}), {mode}" in text, text
        assert ("the package was built without" in text) == bool(info["fallback"])
        assert ("the request loop spins up to 200 us for the next request" in text) == ("spin_us" in info)
        daemon.replies["status"] = [st]
        assert run(daemon, "status") == 0
        assert plain in capsys.readouterr().out.splitlines()
    daemon.replies["status"] = [STATUS]  # an older daemon: no line
    assert run(daemon, "status") == 0
    assert not any(line.startswith("fuse") for line in capsys.readouterr().out.splitlines())


def test_status_tolerates_missing_fields(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["status"] = [{"ok": True, "mounts": [{"name": "x"}]}]
    assert run(daemon, "status") == 0
    render.print_status(Console(file=io.StringIO()), {"ok": True, "mounts": [{"name": "x", "prefetch": {}}]})
    assert "x\t-\t-\t-\t-\t-\t0\t0\t-" in capsys.readouterr().out


# --- reload, purge ----------------------------------------------------------------------------

def test_reload(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["reload"] = [{"ok": True}]
    assert run(daemon, "reload") == 0
    assert capsys.readouterr().out == "reloaded\n"
    assert daemon.requests == [{"cmd": "reload"}]


def test_reload_failure(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    error = "/etc/aysfs/aysfs.toml:4: [main] cache_size: 'lots' is not a size\n/etc/aysfs/aysfs.toml:9: [[ays]] mnt: x"
    daemon.replies["reload"] = [{"ok": False, "code": "failed", "error": error}]
    assert run(daemon, "reload") == 1
    cap = capsys.readouterr()
    assert cap.err.startswith("aysctl: reload failed")
    assert error in cap.err and "reloaded" not in cap.out
    assert run(daemon, "--json", "reload") == 1  # --json: the raw failure object on stdout
    assert json.loads(capsys.readouterr().out)["error"] == error


def test_cache_purge(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["cache.purge"] = [{"ok": True, "freed_bytes": 3 * 2**20, "blobs": 12}]
    assert run(daemon, "cache", "purge") == 0
    assert "freed 3.0 MiB (12 blobs)" in capsys.readouterr().out
    assert run(daemon, "cache", "purge", "--ays", AYS) == 0
    assert f"of {AYS}" in capsys.readouterr().out
    assert daemon.requests == [{"cmd": "cache.purge"}, {"cmd": "cache.purge", "ays": AYS}]


# --- prefetch ---------------------------------------------------------------------------------

PREFETCH_DONE = {"ok": True, "blobs": 40, "bytes": 5 * 2**20, "fetched_blobs": 30, "fetched_bytes": 2 * 2**20,
                 "errors": 0, "seconds": 1.25}
PROGRESS: list[Item] = [{"event": "progress", "blobs_done": i, "blobs_total": 10 + 10 * i, "bytes_done": 100 * i,
             "bytes_total": 1000 * i} for i in range(4)]


def test_prefetch(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["prefetch"] = [*PROGRESS, PREFETCH_DONE]
    assert run(daemon, "prefetch", AYS) == 0
    assert daemon.requests == [{"cmd": "prefetch", "ays": AYS, "local": True, "grid": False}]
    assert capsys.readouterr().out == \
        "prefetched 40 blobs (5.0 MiB) in 1.2 s, fetched 30 blobs (2.0 MiB), 0 errors\n"
    assert run(daemon, "prefetch", "--grid", AYS) == 0
    assert run(daemon, "prefetch", "--grid", "--local", AYS) == 0
    assert [(r["local"], r["grid"]) for r in daemon.requests[1:]] == [(False, True), (True, True)]


def test_prefetch_errors_exit_1(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["prefetch"] = [{**PREFETCH_DONE, "errors": 2}]
    assert run(daemon, "prefetch", AYS) == 1
    cap = capsys.readouterr()
    assert "2 errors" in cap.out and "aysctl: 2 errors" in cap.err
    assert run(daemon, "--json", "prefetch", AYS) == 1
    assert json.loads(capsys.readouterr().out)["errors"] == 2


def test_prefetch_progress_bar(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr(commands, "_tty", lambda: True)
    monkeypatch.setattr(commands, "_console", lambda: Console(file=buf, width=150, color_system=None))
    daemon.replies["prefetch"] = [*PROGRESS, PREFETCH_DONE]
    assert run(daemon, "prefetch", AYS) == 0
    assert "3/40 blobs" in buf.getvalue()


def test_unknown_ays_exit_5(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["prefetch"] = [{"ok": False, "code": "unknown-ays", "error": "no ays 'nope' is configured"}]
    assert run(daemon, "prefetch", "nope") == 5
    assert capsys.readouterr().err == "aysctl: no ays 'nope' is configured\n"


# --- transport errors -------------------------------------------------------------------------

def test_missing_socket_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--socket", str(tmp_path / "none.sock"), "status"]) == 3
    err = capsys.readouterr().err
    assert "not running" in err and "systemctl start aysfsd" in err and "Traceback" not in err


def test_refused_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    d = tempfile.mkdtemp(prefix="aysctl-", dir="/tmp")
    try:
        path = os.path.join(d, "stale.sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)  # a stale socket file: bound, never listening
        assert main(["--socket", path, "reload"]) == 3
        assert "not running" in capsys.readouterr().err
    finally:
        shutil.rmtree(d)


def test_permission_reply_exit_4(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["cache.purge"] = [{"ok": False, "code": "permission", "error": "only root may purge"}]
    assert run(daemon, "cache", "purge") == 4
    assert capsys.readouterr().err == "aysctl: only root may purge\n"


def test_closed_without_final_line_exit_1(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["prefetch"] = PROGRESS[:2]
    assert run(daemon, "prefetch", AYS) == 1
    assert "aysfsd closed the connection" in capsys.readouterr().err


def test_not_json_exit_1(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["status"] = [b"HTTP/1.1 400 Bad Request\n"]
    assert run(daemon, "status") == 1
    assert "not JSON" in capsys.readouterr().err


def test_final_line_without_newline_is_accepted(daemon: FakeDaemon) -> None:
    daemon.replies["reload"] = [b'{"ok": true}']
    assert list(request(daemon.path, {"cmd": "reload"})) == [{"ok": True}]


def test_read_timeout(daemon: FakeDaemon) -> None:
    def slow(req: dict[str, Any]) -> list[Item]:
        time.sleep(2)
        return []

    daemon.replies["status"] = slow
    t0 = time.monotonic()
    with pytest.raises(ControlError, match="no answer") as exc:
        list(request(daemon.path, {"cmd": "status"}, timeout=0.3))
    assert exc.value.exit_code == 1 and time.monotonic() - t0 < 1.5


def test_busy_daemon_is_tried_again_until_it_answers(daemon: FakeDaemon) -> None:
    answers: Iterator[list[Any]] = iter([[{"ok": False, "code": "busy", "error": "too many clients"}]] * 3
                                        + [[{"ok": True, "n": 1}]])
    daemon.replies["status"] = lambda req: next(answers)
    assert list(request(daemon.path, {"cmd": "status"}, timeout=10)) == [{"ok": True, "n": 1}]
    assert len(daemon.requests) == 4


def test_busy_daemon_until_the_timeout(daemon: FakeDaemon) -> None:
    daemon.replies["status"] = [{"ok": False, "code": "busy", "error": "too many clients (uid 7 has 4 open)"}]
    with pytest.raises(ControlError, match="too many clients") as exc:
        list(request(daemon.path, {"cmd": "status"}, timeout=1.0))
    assert exc.value.exit_code == 1 and 3 <= len(daemon.requests) <= 20


def test_full_backlog_waits_for_the_daemon() -> None:
    """A Unix socket whose listen backlog is full makes connect() fail with EAGAIN at once;
    aysctl waits (up to its timeout) for the daemon to accept instead of failing."""
    d = tempfile.mkdtemp(prefix="aysctl-", dir="/tmp")
    path = os.path.join(d, "ctl.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        srv.bind(path)
        srv.listen(0)
        for _ in range(16):  # fill the backlog: connect until the kernel says EAGAIN
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            fillers.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        else:
            raise AssertionError("the backlog never filled")
        accepted: list[int] = []

        def serve() -> None:
            time.sleep(0.5)
            for _ in range(len(fillers) + 1):
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(5)
                    req = conn.makefile("rb").readline() if len(accepted) >= len(fillers) - 1 else b""
                    accepted.append(len(req))
                    if req:
                        conn.sendall(b'{"ok": true, "waited": true}\n')
                        return

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        assert client.call(path, {"cmd": "status"}, timeout=10) == {"ok": True, "waited": True}
        t.join(10)
        assert accepted and accepted[-1] > 0
    finally:
        for c in fillers:
            c.close()
        srv.close()
        shutil.rmtree(d)


def test_request_too_large(daemon: FakeDaemon) -> None:
    with pytest.raises(ControlError, match="too large") as exc:
        list(request(daemon.path, {"cmd": "prefetch", "ays": "x" * 70000}))
    assert exc.value.exit_code == 2


# --- debug tail -------------------------------------------------------------------------------

def test_debug_tail(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["log.tail"] = lambda req: [*log_events(req), {"ok": True}]
    assert run(daemon, "debug", "tail", "-n", "5") == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5
    assert out[0].split()[1:] == ["DEBUG", "web", "line", "0"] and out[0].startswith("2023-11-14T")
    assert daemon.requests == [{"cmd": "log.tail", "lines": 5, "follow": False, "debug": True}]
    assert run(daemon, "--json", "debug", "tail", "jumpscale_mongodb_main", "-n", "3") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["message"] for e in events] == ["line 0", "line 1", "line 2"]
    assert daemon.requests[1]["mount"] == "jumpscale_mongodb_main"


def test_debug_tail_follow_ctrl_c(daemon: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["log.tail"] = lambda req: [*log_events(req), Interrupt()]
    assert run(daemon, "debug", "tail", "-f", "-n", "3") == 0
    cap = capsys.readouterr()
    assert len(cap.out.splitlines()) == 3 and "Traceback" not in cap.err
    assert daemon.requests[0]["follow"] is True
    assert daemon.hung_up.wait(5)  # the client hung up, which ends the follow on the daemon's side


# --- find_socket ------------------------------------------------------------------------------

def test_find_socket_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "aysfs.toml"
    cfg.write_text('[main]\ncontrol_socket = "/tmp/x.sock"\n')
    system = tmp_path / "system.toml"
    monkeypatch.setattr(client, "DEFAULT_CONFIG", str(system))
    assert find_socket("/tmp/s.sock", str(cfg)) == "/tmp/s.sock"
    assert find_socket(None, str(cfg)) == "/tmp/x.sock"
    assert find_socket(None, None) == "/run/aysfs/aysfsd.sock"  # no system config
    system.write_text('[main]\ncontrol_socket = "/tmp/system.sock"\n')
    assert find_socket(None, None) == "/tmp/system.sock"
    system.write_text("[main]\ncontrol_socket = 12\n")  # invalid: ignored
    assert find_socket(None, None) == "/run/aysfs/aysfsd.sock"
    with pytest.raises(ControlError) as exc:  # but an invalid --config is an error
        find_socket(None, str(system))
    assert exc.value.exit_code == 2 and "control_socket" in str(exc.value)


def test_config_option_picks_the_socket(daemon: FakeDaemon, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    daemon.replies["reload"] = [{"ok": True}]
    cfg = tmp_path / "aysfs.toml"
    cfg.write_text(f'[main]\ncontrol_socket = "{daemon.path}"\n')
    assert main(["-c", str(cfg), "reload"]) == 0
    assert main(["reload", "--config", str(cfg)]) == 0
    cfg.write_text("[main]\nbogus = 1\n")
    assert main(["--config", str(cfg), "reload"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_config_check_still_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "aysfs.toml"
    cfg.write_text('[main]\ncontrol_socket = "/tmp/x.sock"\n')
    assert main(["config", "check", str(cfg)]) == 0
    assert main(["--config", str(cfg), "config", "check"]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
