"""The daemon for real: several mounts, reload (signal and inotify), sd_notify, control socket."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest

from tests.harness import (
    Daemon,
    NotifySocket,
    aysctl,
    basic_config,
    ctl,
    mounted,
    sample_tree,
    tree_listing,
    wait_for,
)
from tests.servers import Nginx

A, B, C = "jumpscale|alpha!main", "jumpscale|beta!main", "jumpscale|gamma!main"


@pytest.fixture
def trees(work: Path, nginx_stor: Nginx) -> dict[str, Path]:
    srcs = {}
    for ays in (A, B, C):
        src = work / ays.split("|")[1].split("!")[0]
        sample_tree(src, big_size=5 * 1024 * 1024 + 1)
        (src / "which.txt").write_text(ays + "\n")
        aysctl("publish", str(src), "--ays", ays, "--stor", nginx_stor.url)
        srcs[ays] = src
    return srcs


def test_notify_sequence_reload_and_stop(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    mounts = {A: str(work / "a"), B: str(work / "b")}
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], mounts))
    ns = NotifySocket(work / "notify.sock")
    d = Daemon(cfg, work / "d.log", env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "2000000"})
    try:
        d.start(wait_mounts=mounts.values())
        msgs = ns.collect("READY=1")
        assert "STATUS=2/2 mounts up" in msgs[-1].split("\n")
        assert mounted(work / "a") and mounted(work / "b")
        assert (work / "a" / "which.txt").read_text() == A + "\n"
        assert tree_listing(work / "b") == tree_listing(trees[B])
        ns.messages.clear()
        d.signal(signal.SIGHUP)
        msgs = ns.collect("READY=1")
        reload_msg = [m for m in msgs if "RELOADING=1" in m.split("\n")]
        assert reload_msg, msgs
        usec = [ln for ln in reload_msg[0].split("\n") if ln.startswith("MONOTONIC_USEC=")]
        assert usec and abs(int(usec[0].split("=")[1]) - time.monotonic_ns() // 1000) < 30_000_000
        assert msgs.index(reload_msg[0]) < len(msgs) - 1  # READY=1 comes after RELOADING=1
        # the watchdog is fed (WATCHDOG_USEC=2s: every second)
        ns.messages.clear()
        ns.collect("WATCHDOG=1", timeout=3)
        ns.messages.clear()
        d.signal(signal.SIGTERM)
        ns.collect("STOPPING=1")
        assert d.proc is not None and d.proc.wait(15) == 0
        assert not mounted(work / "a") and not mounted(work / "b") and not mounted(work / "st" / "fuse")
    finally:
        d.stop()
        ns.close()


def test_config_edits_change_mounts_and_bad_config_keeps_old(work: Path, nginx_stor: Nginx,
                                                            trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    a, b, c = work / "a", work / "b", work / "c"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a), B: str(b)}))
    sock = work / "st" / "aysfsd.sock"
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a, b]) as d:
        f = open(a / "data" / "big.bin", "rb")  # an open file on an untouched mount
        first = f.read(1 << 20)
        # editor-style replace: write a new file and rename it over the config
        tmp = work / ".aysfs.toml.swp"
        tmp.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a), C: str(c)}))
        os.rename(tmp, cfg)
        wait_for(lambda: mounted(c) and not mounted(b), 10, "c mounted and b unmounted")
        assert (c / "which.txt").read_text() == C + "\n"
        assert first + f.read() == (trees[A] / "data" / "big.bin").read_bytes()
        f.close()
        # an invalid edit: the old mounts keep serving, status shows the error with file:line
        cfg.write_text(cfg.read_text() + "\n[[ays]]\nid = 'x'\nmnt = 'relative'\nbogus = 1\n")
        def has_error() -> bool:
            st = ctl(sock, {"cmd": "status"})[-1]
            return bool(st["daemon"]["config_error"])
        wait_for(has_error, 10, "config error in status")
        st = ctl(sock, {"cmd": "status"})[-1]
        assert f"{cfg}:" in st["daemon"]["config_error"] and "bogus" in st["daemon"]["config_error"]
        assert {m["name"] for m in st["mounts"]} == {"jumpscale_alpha_main", "jumpscale_gamma_main"}
        assert all(m["state"] == "up" for m in st["mounts"])
        assert (a / "which.txt").read_text() == A + "\n" and (c / "which.txt").read_text() == C + "\n"
        assert "reload refused, keeping the running config" in d.log()
        # reload over the socket reports the same error
        r = ctl(sock, {"cmd": "reload"})[-1]
        assert r["ok"] is False and "bogus" in r["error"]
    assert not any(mounted(p) for p in (a, b, c))


def test_new_version_on_reload(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    src = trees[A]
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a]) as d:
        old = (a / "which.txt").read_text()
        f = open(a / "lib" / "json" / "decoder.py", "rb")
        (src / "which.txt").write_text("version two\n")
        (src / "new-file").write_text("new\n")
        dec = (src / "lib" / "json" / "decoder.py").read_bytes()
        (src / "lib" / "json" / "decoder.py").write_bytes(b"# v2\n")
        aysctl("publish", str(src), "--ays", A, "--stor", nginx_stor.url)
        d.signal(signal.SIGHUP)
        wait_for(lambda: (a / "which.txt").read_text() != old, 10, "new version visible")
        assert (a / "which.txt").read_text() == "version two\n"
        assert (a / "new-file").read_text() == "new\n"
        assert (a / "lib" / "json" / "decoder.py").read_bytes() == b"# v2\n"
        assert f.read() == dec  # the open file keeps its version
        f.close()


def test_failed_mount_is_retried_and_does_not_stop_others(work: Path, nginx_stor: Nginx,
                                                           trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    a, z = work / "a", work / "z"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a), "nope|missing!main": str(z)}))
    sock = work / "st" / "aysfsd.sock"
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a]) as d:
        st = ctl(sock, {"cmd": "status"})[-1]
        bad = [m for m in st["mounts"] if m["id"] == "nope|missing!main"][0]
        assert bad["state"] == "error" and "no version" in bad["error"]
        assert not mounted(z)
        aysctl("publish", str(trees[B]), "--ays", "nope|missing!main", "--stor", nginx_stor.url)
        d.wait_mounted(z, timeout=12)
        assert (z / "which.txt").read_text() == B + "\n"


def test_control_socket_robustness_and_prefetch(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    import socket

    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    sock = str(work / "st" / "aysfsd.sock")
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a]):
        for junk in (b"not json\n", b"[1,2]\n", b'{"cmd": 5}\n', b'{"cmd":"nope"}\n', b"x" * 70000 + b"\n"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(sock)
            s.sendall(junk)
            reply = s.makefile("rb").readline()
            s.close()
            assert b'"ok": false' in reply and b"bad-request" in reply, (junk[:20], reply)
        r = ctl(sock, {"cmd": "prefetch", "ays": "jumpscale|nope!x"})[-1]
        assert r["ok"] is False and r["code"] == "unknown-ays"
        lines = ctl(sock, {"cmd": "prefetch", "ays": A, "local": True})
        final = lines[-1]
        # blobs: directory objects (alone or packed), the big file's chunks, small files by the pack
        assert final["ok"] and final["errors"] == 0 and final["blobs"] >= 10 and final["bytes"] > 5 << 20
        assert any(x.get("event") == "progress" for x in lines[:-1])
        nginx_stor.stop()
        assert tree_listing(a) == tree_listing(trees[A])  # every byte is local now
        st = ctl(sock, {"cmd": "status"})[-1]
        assert st["mounts"][0]["prefetch"]["state"] == "done"
        # purge while a file is open: the open file refetches (stor back up)
        nginx_stor.start()
        f = open(a / "data" / "big.bin", "rb")
        r = ctl(sock, {"cmd": "cache.purge", "ays": A})[-1]
        assert r["ok"] and r["freed_bytes"] > 5 * 1024 * 1024
        with open("/proc/sys/vm/drop_caches", "w") as dc:
            dc.write("3\n")
        assert f.read() == (trees[A] / "data" / "big.bin").read_bytes()
        f.close()


def test_sigterm_with_busy_mount_leaves_nothing(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[a])
    f = open(a / "which.txt")
    cwd = os.getcwd()
    os.chdir(a / "lib")
    try:
        assert d.stop() == 0
    finally:
        os.chdir(cwd)
    assert not mounted(a) and not mounted(work / "st" / "fuse")
    with pytest.raises(OSError) as e:
        f.read()
    assert e.value.errno in (errno.ENOTCONN, errno.EIO, errno.ENODEV)
    with pytest.raises(OSError):
        f.close()  # the session is gone: even close reports it


def test_crash_leaves_no_stale_mount_for_next_start(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[a])
    d.kill()
    assert mounted(a)  # stale: transport endpoint is not connected
    with Daemon(cfg, work / "d2.log").start() as d2:
        d2.wait_ready()
        assert mounted(a)
        assert (a / "which.txt").read_text() == A + "\n"
        assert "stale mount" in d2.log()


def test_aysctl_against_live_daemon(work: Path, nginx_stor: Nginx, trees: dict[str, Path]) -> None:
    import json

    cfg = work / "aysfs.toml"
    a, b = work / "a", work / "b"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a), B: str(b)}))
    sock = str(work / "st" / "aysfsd.sock")
    # no daemon yet: a clear message and exit code 3
    r = aysctl("--socket", sock, "status", check=False)
    assert r.returncode == 3 and "aysfsd is not running" in r.stderr
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a, b]):
        st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)
        assert {m["id"] for m in st["mounts"]} == {A, B} and all(m["state"] == "up" for m in st["mounts"])
        plain = aysctl("--config", str(cfg), "status").stdout
        assert "jumpscale_alpha_main\tjumpscale|alpha!main\t" + str(a) + "\tup" in plain
        out = aysctl("--config", str(cfg), "prefetch", A).stdout
        assert "prefetched" in out and "0 errors" in out
        r = aysctl("--config", str(cfg), "prefetch", "jumpscale|nope!main", check=False)
        assert r.returncode == 5 and "no mount of" in r.stderr
        assert "reloaded" in aysctl("--config", str(cfg), "reload").stdout
        out = aysctl("--config", str(cfg), "cache", "purge", "--ays", B).stdout
        assert out.startswith("purged the cache of " + B)
        st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)
        ma = [m for m in st["mounts"] if m["id"] == A][0]
        assert ma["prefetch"]["state"] == "done" and ma["prefetch"]["blobs_done"] == ma["prefetch"]["blobs_total"]
        assert st["cache"]["entries"] > 0 and st["sources"][0]["url"] == nginx_stor.url
