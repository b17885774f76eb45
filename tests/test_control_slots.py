"""The control socket stays available to root while other users hold connections open."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from aysfsd.daemon import control
from tests.harness import Daemon, aysctl, traversable, wait_for

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
AYSCTL = str(Path(sys.executable).parent / "aysctl")

# Run as an unprivileged uid: open N connections to the socket and send nothing; report what
# each got (a "busy" refusal at once, or the idle-timeout answer later), as JSON on stdout.
HOG = r"""
import json, socket, sys, time
path, n, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.settimeout(hold)
    socks.append(s)
print("connected", flush=True)
answers = []
for s in socks:
    try:
        answers.append(json.loads(s.makefile("rb").readline() or b"null"))
    except (TimeoutError, OSError) as e:
        answers.append({"exception": type(e).__name__})
print(json.dumps(answers), flush=True)
"""


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A directory every uid can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="aysfs-ctl-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextmanager
def open_daemon(work: Path, rundir: Path) -> Iterator[tuple[Daemon, Path]]:
    """aysfsd without mounts, ready, its control socket in `rundir` open to every uid (0666: uid
    nobody connects without the group aysfs): (the daemon, its socket)."""
    sock = rundir / "aysfsd.sock"
    cfg = work / "aysfs.toml"
    cfg.write_text(f'[main]\ncache_dir = "{work}/cache"\ncontrol_socket = "{sock}"\n'
                   f'fuse_root = "{work}/fuse"\n')
    with Daemon(cfg, work / "d.log").start() as d:
        d.wait_ready()
        os.chmod(sock, 0o666)
        yield d, sock


def test_idle_unprivileged_connections_cannot_deny_root(work: Path, rundir: Path) -> None:
    with open_daemon(work, rundir) as (d, sock), traversable(sys.executable):
        n = control.MAX_CLIENTS + 10
        hogs = [subprocess.Popen([*AS_NOBODY, sys.executable, "-c", HOG, str(sock), str(n), "30"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            for h in hogs:
                assert h.stdout is not None and h.stdout.readline().strip() == "connected"
            # the hogs' connections are open and idle: root still gets its status, at once
            st = json.loads(aysctl("--socket", str(sock), "status", "--json", timeout=20).stdout)
            assert st["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]
            for _ in range(5):
                assert aysctl("--socket", str(sock), "reload", timeout=20).returncode == 0
            outs = [json.loads(h.communicate(timeout=60)[0].splitlines()[-1]) for h in hogs]
        finally:
            for h in hogs:
                if h.poll() is None:
                    h.kill()
                    h.wait(10)
    answers = [a for out in outs for a in out]
    busy = [a for a in answers if a and a.get("code") == "busy"]
    idle = [a for a in answers if a and a.get("code") == "bad-request"]
    # one uid: at most MAX_PER_UID connections admitted, every other one refused as busy
    assert len(idle) == control.MAX_PER_UID, answers[:8]
    assert len(busy) == 2 * n - control.MAX_PER_UID
    assert all("no complete request within 2s" in a["error"] for a in idle)
    assert "uid 65534 has 4 connections open" in busy[0]["error"]


def test_unprivileged_status_still_works(work: Path, rundir: Path) -> None:
    with open_daemon(work, rundir) as (d, sock), traversable(AYSCTL):
        wait_for(lambda: sock.exists(), 5, "the socket")
        r = subprocess.run([*AS_NOBODY, AYSCTL, "--socket", str(sock), "status", "--json"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["daemon"]["pid"] == d.proc.pid  # type: ignore[union-attr]
        r = subprocess.run([*AS_NOBODY, AYSCTL, "--socket", str(sock), "reload"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 4 and "permission denied" in r.stderr
