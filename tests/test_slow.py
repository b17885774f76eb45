"""Slow and lying stors through the real daemon (issue 16, item 6): a trickling stor is a failure
bounded by fetch_timeout and marked down, a failed READ's retry is answered at once, the
low-speed limit fails a trickle before fetch_timeout ([main] or per stor), a reload onto
trickling stors returns within its bound, a stor answering HTML is marked down and a mount
whose root cannot be read is degraded (with the reason) until it reads again, and a start on
trickling stors is ready within fetch_timeout."""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness import Daemon, ctl, wait_for
from tests.harness import aysctl as run_aysctl
from tests.servers import BadStor, free_port
from tests.test_metrics import scrape
from tests.test_treepacks import live_fetcher

AYS = "jumpscale|slow!main"


@pytest.fixture
def stor(work: Path) -> Iterator[BadStor]:
    """A published tree (a big file, small files, nested directories) behind a BadStor."""
    src = work / "src"
    (src / "lib").mkdir(parents=True)
    (src / "deep" / "a" / "b").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(6 << 20))
    for i in range(8):
        (src / "lib" / f"m{i}.py").write_text(f"# module {i}\n" * (50 + i))
    (src / "deep" / "a" / "b" / "leaf.txt").write_text("leaf\n")
    root = work / "stor"
    root.mkdir()
    run_aysctl("publish", str(src), "--ays", AYS, "--stor", str(root))
    with BadStor(root) as s:
        yield s


def start(work: Path, stor: BadStor, *, fetch_timeout: float, timeout: float, extra_main: str = "",
          extra_stor: str = "", more: str = "") -> Daemon:
    """The daemon on `stor`, mounting the tree at work/mnt (`more`: further tables)."""
    mnt = work / "mnt"
    cfg = work / "aysfs.toml"
    cfg.write_text(f"""[main]
cache_dir = "{work}/cache"
control_socket = "{work}/aysfsd.sock"
fuse_root = "{work}/fuse"
fetch_timeout = {fetch_timeout}
{extra_main}

[[stor]]
url = "{stor.url}"
timeout = {timeout}
{extra_stor}

[[ays]]
id = '{AYS}'
mnt = "{mnt}"
{more}
""")
    d = Daemon(cfg, work / "aysfsd.log").start(wait_mounts=[mnt])
    wait_for(lambda: (work / "aysfsd.sock").exists(), 10, "the control socket")
    return d


def status(work: Path) -> dict[str, Any]:
    return ctl(work / "aysfsd.sock", {"cmd": "status"}, timeout=5)[-1]


def read_eio(path: Path) -> float:
    """Read `path`, expect EIO; the seconds it took."""
    t = time.monotonic()
    with pytest.raises(OSError) as e:
        path.read_bytes()
    assert e.value.errno == errno.EIO
    return time.monotonic() - t


def test_trickling_stor_is_bounded_marked_down_and_retries_fail_at_once(work: Path, stor: BadStor) -> None:
    """The issue's case: fetch_timeout 5, the stor's timeout 2, a body sent a byte every 0.5 s
    (the low-speed limit at its default, 1024 bytes/s over 10 s: fetch_timeout comes first)."""
    mnt = work / "mnt"
    # a second stor (the same tree) and a second mount of the ays: a reload's ref checks are
    # bounded over all stors and made for all mounts at once
    with BadStor(stor.root) as stor2, start(work, stor, fetch_timeout=5, timeout=2, more=f"""
[[stor]]
url = "{stor2.url}"
timeout = 2

[[ays]]
id = '{AYS}'
name = "second"
mnt = "{work}/mnt2"
""") as d:
        wait_for(lambda: [m["state"] for m in status(work)["mounts"]] == ["up", "up"], 10, "both mounts")
        os.listdir(mnt / "lib")
        stor.mode = stor2.mode = "trickle"
        # a big file and a small one: EIO within fetch_timeout + 1 s, whatever the kernel asks
        took = [read_eio(mnt / "big.bin"), read_eio(mnt / "lib" / "m3.py")]
        print(f"\ntrickling stor: EIO after {took[0]:.2f} s (big file), {took[1]:.2f} s (small file)")
        assert max(took) < 5 + 1
        src = status(work)["sources"][0]
        assert src["url"] == stor.url and src["down"] and src["failures"] >= 1
        assert f"source {stor.url} marked down" in d.log()
        # the retry of a read that just failed: EIO at once, no request to the stor
        before = stor.blob_requests() + stor2.blob_requests()
        assert read_eio(mnt / "lib" / "m3.py") < 0.5
        assert stor.blob_requests() + stor2.blob_requests() == before
        # a reload while both stors trickle their refs: bounded by fetch_timeout, a reason logged
        stor.prefixes = stor2.prefixes = ("blobs/", "refs/")
        refs = sum(n for rel, n in stor.requests.items() if rel.startswith("refs/"))
        t = time.monotonic()  # (through the socket: aysctl's own start takes seconds on a loaded machine)
        assert ctl(work / "aysfsd.sock", {"cmd": "reload"}, timeout=30)[-1].get("ok") is True
        took_reload = time.monotonic() - t
        print(f"reload onto the trickling stor: {took_reload:.2f} s")
        assert took_reload < 5 + 1
        assert sum(n for rel, n in stor.requests.items() if rel.startswith("refs/")) == refs + 2  # one per mount
        line = next(x for x in d.log().splitlines() if "no stor answered for" in x)
        assert f"{stor.url}: no complete answer for the ref within fetch_timeout 5s" in line, line
        assert f"{stor.url}: \n" not in d.log() and not d.log().rstrip().endswith(f"{stor.url}:")
        st = status(work)
        assert [m["state"] for m in st["mounts"]] == ["up", "up"]  # the version they had
        assert all(s["down"] for s in st["sources"])


@pytest.mark.parametrize("where", ["main", "stor"])
def test_low_speed_limit_fails_a_trickle_before_fetch_timeout(work: Path, stor: BadStor, where: str) -> None:
    """low_speed_time 1 ([main]'s, or the stor's own): a transfer under 1024 bytes/s for 1 s is a
    failure of its source (marked down) long before fetch_timeout 20."""
    mnt = work / "mnt"
    extra = {"extra_main" if where == "main" else "extra_stor": "low_speed_time = 1"}
    with start(work, stor, fetch_timeout=20, timeout=10, **extra) as d:
        os.listdir(mnt)
        stor.mode = "trickle"
        took = read_eio(mnt / "big.bin")
        print(f"\nlow-speed limit 1024 bytes/s over 1 s ({where}): EIO after {took:.2f} s (fetch_timeout 20)")
        assert took < 5
        assert status(work)["sources"][0]["down"]
        assert "too slow: " in d.log() and "low_speed_limit 1024 bytes/s" in d.log()


def test_low_speed_limit_zero_turns_the_check_off(work: Path, stor: BadStor) -> None:
    """low_speed_limit 0: a trickle is bounded by fetch_timeout alone (no "too slow")."""
    mnt = work / "mnt"
    with start(work, stor, fetch_timeout=3, timeout=10, extra_main="low_speed_limit = 0\nlow_speed_time = 1") as d:
        os.listdir(mnt)
        stor.mode = "trickle"
        took = read_eio(mnt / "big.bin")
        assert took < 3 + 1
        assert "too slow: " not in d.log() and "no complete answer within fetch_timeout 3s" in d.log()


def test_html_answering_stor_is_marked_down_and_the_mount_degraded(work: Path, stor: BadStor) -> None:
    """A stor answering an HTML page for every blob: the root cannot be read, so the mount is
    degraded with the reason (status, --json's state), up again once the stor serves blobs
    (read again by the daemon, no reader needed); corrupt answers in a row mark it down."""
    mnt = work / "mnt"
    stor.mode = "html"
    port = free_port()
    with start(work, stor, fetch_timeout=5, timeout=2, extra_main=f'metrics_listen = "127.0.0.1:{port}"') as d:
        # the mountpoint shows before the bring-up ends ("starting"); nothing read yet: up
        wait_for(lambda: status(work)["mounts"][0]["state"] != "starting", 10, "the bring-up to end")
        assert status(work)["mounts"][0]["state"] == "up"
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.EIO
        m = status(work)["mounts"][0]
        assert m["state"] == "degraded", m
        assert "the root directory cannot be read" in m["error"] and "corrupt" in m["error"], m
        assert "degraded: " in status(work)["daemon"]["status"]
        plain = run_aysctl("status", "--socket", str(work / "aysfsd.sock")).stdout  # not a tty: plain lines
        assert "\tdegraded\t" in plain and "the root directory cannot be read" in plain, plain
        samples = scrape(port)
        assert (samples['aysfs_mount_degraded{mount="jumpscale_slow_main"}'],
                samples['aysfs_mount_up{mount="jumpscale_slow_main"}']) == (1, 0)
        # the stor is fixed: the daemon reads the root again by itself, and the mount is up
        stor.mode = "ok"
        wait_for(lambda: status(work)["mounts"][0]["state"] == "up", 15, "the mount to be up again")
        assert status(work)["mounts"][0]["error"] == ""
        assert sorted(os.listdir(mnt)) == ["big.bin", "deep", "lib"]
        os.listdir(mnt / "lib")
        # HTML for every blob again: corrupt answers in a row mark the stor down
        stor.mode = "html"
        for i in range(3):
            read_eio(mnt / "lib" / f"m{i}.py")
        src = status(work)["sources"][0]
        assert src["down"] and src["corrupt"] >= 3, src
        assert "corrupt blobs in a row" in d.log()
        assert status(work)["mounts"][0]["state"] == "up"  # files, not directories, failed


def _logged_at(line: str) -> datetime.datetime:
    return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")


def test_start_on_trickling_stors_is_bounded(work: Path, stor: BadStor) -> None:
    """A daemon starting while both its stors trickle their refs is ready within fetch_timeout
    (its own log's clock, not the interpreter's start), mounted at the last good version."""
    with BadStor(stor.root) as stor2:
        more = f'[[stor]]\nurl = "{stor2.url}"\ntimeout = 2\n'
        with start(work, stor, fetch_timeout=5, timeout=2, more=more):
            pass  # the ref is now the last good one in the local cache
        stor.mode = stor2.mode = "trickle"
        stor.prefixes = stor2.prefixes = ("refs/",)
        first = len((work / "aysfsd.log").read_text(errors="replace"))  # both starts log to one file
        with start(work, stor, fetch_timeout=5, timeout=2, more=more) as d:
            wait_for(lambda: " ready: " in d.log()[first:], 30, "the second daemon's ready line")
            lines = d.log()[first:].splitlines()
            began = _logged_at(next(x for x in reversed(lines) if " FUSE session at " in x))
            ready = _logged_at(next(x for x in reversed(lines) if " ready: " in x))
            took = (ready - began).total_seconds()
            print(f"\nstart with two trickling stors: ready {took:.2f} s after the FUSE session")
            assert took < 5 + 1
            st = status(work)
            assert st["mounts"][0]["state"] == "up" and st["sources"][0]["down"]


def test_recheck_reads_again_what_failed_never_an_invalid_object(work: Path) -> None:
    """What made a mount degraded is read again: a directory whose fetch failed (up again once
    it reads), not an invalid directory object (a content address never mends: no request)."""
    from aysfsd.config import AysConfig
    from aysfsd.fuse.ops import MountPoint, Operations
    from aysfsd.stores import DirStore
    from aysfsd.stores.layout import blob_path, ref_path
    from aysfsd.tiers.local import LocalCache
    from aysfsd.tree.ref import decode_ref

    src = work / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f\n")
    root_dir = work / "stor"
    root_dir.mkdir()
    run_aysctl("publish", str(src), "--ays", AYS, "--stor", str(root_dir))
    ref = decode_ref((root_dir / ref_path(AYS)).read_bytes(), AYS)
    bad = b"not a directory object\n"
    bad_h = hashlib.sha256(bad).hexdigest()
    (root_dir / blob_path(bad_h)).parent.mkdir(parents=True, exist_ok=True)
    (root_dir / blob_path(bad_h)).write_bytes(bad)
    gone = "ab" * 32
    asked: list[str] = []

    class Counting(DirStore):
        async def fetch(self, rel: str) -> bytes | None:
            asked.append(rel)
            return await super().fetch(rel)

    mp = MountPoint(AysConfig(id=AYS, mnt=str(work / "mnt"), name="m"), top_ino=2, ref=ref)
    mp.unreadable_dir(ref.root, "the stor answered HTML")
    mp.unreadable_dir(bad_h, f"directory object {bad_h} is invalid", invalid=True)
    mp.unreadable_dir(gone, "not found")
    assert mp.degraded() == "the root directory cannot be read (3 directories in all): the stor answered HTML"
    cache = LocalCache(str(work / "lmdb"), 16 << 20)

    async def main() -> None:
        async with live_fetcher(cache, Counting(str(root_dir)), timeout=5) as f:
            with trio.fail_after(10):
                await Operations(f, cache).recheck_unreadable(mp)

    try:
        trio.run(main)
    finally:
        cache.close()
    assert sorted(asked) == sorted([blob_path(ref.root), blob_path(gone)])
    assert list(mp.unreadable) == [bad_h, gone] and mp.retryable_dirs() == [gone]
    assert mp.degraded().startswith("a directory cannot be read (2 directories in all): ")
