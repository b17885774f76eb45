"""One daemon per cache_dir, control_socket and fuse_root (real daemons, real mounts)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness import BIN, Daemon, aysctl, basic_config, mounted, sample_tree
from tests.servers import Nginx

A = "jumpscale|alpha!main"


@pytest.fixture
def published(work: Path, nginx_stor: Nginx) -> Path:
    src = sample_tree(work / "src", big_size=1024 * 1024 + 7)
    (src / "which.txt").write_text(A + "\n")
    aysctl("publish", str(src), "--ays", A, "--stor", nginx_stor.url)
    return src


def _second(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "aysfsd"), "--config", str(cfg)], capture_output=True, text=True, timeout=60)


def _config(work: Path, url: str, *, cache: str, sock: str, root: str, mnt: Path) -> str:
    return (f'[main]\ncache_dir = "{cache}"\ncontrol_socket = "{sock}"\nfuse_root = "{root}"\n'
            f"fetch_timeout = 10\n\n[[stor]]\nurl = \"{url}\"\n\n[[ays]]\nid = '{A}'\nmnt = \"{mnt}\"\n")


def test_second_daemon_same_config_refuses_first_keeps_running(work: Path, nginx_stor: Nginx,
                                                                 published: Path) -> None:
    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    with Daemon(cfg, work / "d.log").start(wait_mounts=[a]) as d:
        assert d.proc is not None
        r = _second(cfg)
        assert r.returncode == 1, r.stderr
        assert f"another aysfsd (pid {d.proc.pid}) is running with cache_dir" in r.stderr
        assert "removed stale mount" not in r.stderr
        # the first one keeps its mount, its socket and its files
        assert d.proc.poll() is None and mounted(a)
        assert (a / "which.txt").read_text() == A + "\n"
        assert (a / "data" / "big.bin").read_bytes() == (published / "data" / "big.bin").read_bytes()
        st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)
        assert st["daemon"]["pid"] == d.proc.pid and st["mounts"][0]["state"] == "up"


@pytest.mark.parametrize("shared", ["control_socket", "fuse_root"])
def test_second_daemon_sharing_one_path_refuses(work: Path, nginx_stor: Nginx, published: Path, shared: str) -> None:
    first = dict(cache=str(work / "c1"), sock=str(work / "run1" / "s.sock"), root=str(work / "run1" / "root"))
    second = dict(cache=str(work / "c2"), sock=str(work / "run2" / "s.sock"), root=str(work / "run2" / "root"))
    key = {"control_socket": "sock", "fuse_root": "root"}[shared]
    second[key] = first[key]
    cfg1, cfg2 = work / "one.toml", work / "two.toml"
    cfg1.write_text(_config(work, nginx_stor.url, mnt=work / "a", **first))
    cfg2.write_text(_config(work, nginx_stor.url, mnt=work / "b", **second))
    with Daemon(cfg1, work / "d.log").start(wait_mounts=[work / "a"]) as d:
        assert d.proc is not None
        r = _second(cfg2)
        assert r.returncode == 1
        assert f"another aysfsd (pid {d.proc.pid}) is running with {shared} {first[key]}" in r.stderr
        assert not mounted(work / "b") and mounted(work / "a")
        assert aysctl("--socket", first["sock"], "status", "--json").returncode == 0
        assert (work / "a" / "which.txt").read_text() == A + "\n"


def test_live_mount_of_another_daemon_is_not_stale(work: Path, nginx_stor: Nginx, published: Path) -> None:
    """Two daemons with their own paths but the same mountpoint: the second must not take the
    first one's live mount for a stale one; it reports the mount as failed, naming the owner."""
    a = work / "a"
    cfg1, cfg2 = work / "one.toml", work / "two.toml"
    cfg1.write_text(_config(work, nginx_stor.url, cache=str(work / "c1"), sock=str(work / "r1" / "s.sock"),
                            root=str(work / "r1" / "root"), mnt=a))
    cfg2.write_text(_config(work, nginx_stor.url, cache=str(work / "c2"), sock=str(work / "r2" / "s.sock"),
                            root=str(work / "r2" / "root"), mnt=a))
    with Daemon(cfg1, work / "d1.log").start(wait_mounts=[a]) as d1:
        assert d1.proc is not None
        with Daemon(cfg2, work / "d2.log").start() as d2:
            d2.wait_ready()
            st = json.loads(aysctl("--socket", str(work / "r2" / "s.sock"), "status", "--json").stdout)
            m = st["mounts"][0]
            assert m["state"] == "error" and f"mounted by the running aysfsd pid {d1.proc.pid}" in m["error"]
            assert "removed stale mount" not in d2.log()
        st = json.loads(aysctl("--socket", str(work / "r1" / "s.sock"), "status", "--json").stdout)
        assert st["mounts"][0]["state"] == "up" and mounted(a)
        assert (a / "which.txt").read_text() == A + "\n"


def test_killed_daemon_leaves_its_locks_to_the_next(work: Path, nginx_stor: Nginx, published: Path) -> None:
    cfg = work / "aysfs.toml"
    a = work / "a"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {A: str(a)}))
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[a])
    d.kill()
    with Daemon(cfg, work / "d2.log").start() as d2:
        d2.wait_ready()
        assert "refusing" not in d2.log() and "stale mount" in d2.log()
        assert (a / "which.txt").read_text() == A + "\n"
