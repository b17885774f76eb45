"""The local cache follows its filesystem: a small tmpfs, real LMDB (cache_min_free, ENOSPC)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aysfsd.tiers.local import LocalCache
from aysfsd.tiers.scrub import scrub

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def blob(i: int, size: int) -> tuple[str, bytes]:
    data = random.Random(i).randbytes(size)
    return hashlib.sha256(data).hexdigest(), data


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_min_free_is_kept_and_newest_blobs_stay(tmpfs: Path) -> None:
    keep = 4 * MiB  # 25 % of the tmpfs
    c = LocalCache(str(tmpfs / "lmdb"), 1 << 30, min_free=lambda total: total // 4)
    blobs = [blob(i, 200 * 1024 + i) for i in range(150)]  # ~30 MiB through a 16 MiB filesystem
    stored = 0
    lowest = free_bytes(tmpfs)
    for h, d in blobs:
        stored += c.put(h, d)
        lowest = min(lowest, free_bytes(tmpfs))
    assert stored == len(blobs)  # every put was stored: old blobs made room
    assert lowest >= keep - 2 * MiB, f"free fell to {lowest}"
    assert c.room.state == "ok" and c.evicted_blobs > 50
    assert all(c.get(h) == d for h, d in blobs[-10:])  # the newest are there, whole
    assert scrub(c) == (c.stats().entries, [])
    c.close()


def test_enospc_evicts_retries_then_serves_from_memory(tmpfs: Path) -> None:
    # min_free below zero switches the guard off: the puts run into the real ENOSPC
    c = LocalCache(str(tmpfs / "lmdb"), 1 << 30, min_free=lambda total: -(1 << 40))
    blobs = [blob(i, 300 * 1024) for i in range(120)]  # 36 MiB
    results = [c.put(h, d) for h, d in blobs]
    assert sum(results) > 20  # filled the filesystem, evicted and kept storing ...
    assert c.evicted_blobs > 0
    for (h, d), ok in zip(blobs, results, strict=True):
        got = c.get(h)
        assert got is None or got == d  # ... and never holds part of a blob
        assert got is None or ok  # what it holds, it said it stored
    assert scrub(c)[1] == []
    c.close()


def test_full_disk_memory_state_and_back(tmpfs: Path) -> None:
    c = LocalCache(str(tmpfs / "lmdb"), 1 << 30, min_free=lambda total: MiB)
    h0, d0 = blob(0, 100 * 1024)
    assert c.put(h0, d0)
    c.purge()
    filler = tmpfs / "filler"
    with open(filler, "wb") as f:  # someone else fills the filesystem
        try:
            while True:
                f.write(b"\0" * MiB)
                f.flush()
        except OSError:
            pass
    h1, d1 = blob(1, 100 * 1024)
    assert c.put(h1, d1) is False and c.get(h1) is None
    assert c.room.state == "memory" and "less than cache_min_free (1.0 MiB)" in c.room.reason
    filler.unlink()
    assert c.put(h1, d1) is True and c.get(h1) == d1  # room again: stored at once
    assert c.room.state == "ok"
    c.close()


def test_daemon_on_a_small_tmpfs(work: Path, nginx_stor) -> None:  # type: ignore[no-untyped-def]
    """cache_dir on a 24 MiB tmpfs with cache_size 1 GiB: correct bytes throughout, the free
    share kept; a full disk is survived (served from memory) and said in the status and log."""
    import json

    from tests.harness import Daemon, aysctl, basic_config

    ays = "jumpscale|small!main"
    src = work / "src"
    files: dict[str, bytes] = {}
    for group, n in (("a", 30), ("b", 4), ("c", 3)):
        (src / group).mkdir(parents=True)
        for i in range(n):
            data = random.Random(f"{group}{i}").randbytes(MiB + i)
            (src / group / f"{i}.bin").write_bytes(data)
            files[f"{group}/{i}.bin"] = data
    aysctl("publish", str(src), "--ays", ays, "--stor", nginx_stor.url)
    small = work / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "tmpfs", str(small)], check=True)
    mnt = work / "mnt"
    cfg = work / "aysfs.toml"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {ays: str(mnt)}, extra_main=(
        'cache_size = "1GiB"\ncache_min_free = "25%"')).replace(f'cache_dir = "{work}/st/cache"',
                                                                  f'cache_dir = "{small}/cache"'))
    try:
        with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
            lowest = free_bytes(small)
            for i in range(30):
                assert (mnt / "a" / f"{i}.bin").read_bytes() == files[f"a/{i}.bin"]
                lowest = min(lowest, free_bytes(small))
            assert lowest >= 6 * MiB - 2 * MiB, f"free fell to {lowest}"  # 25 % of 24 MiB, less slack
            st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)["cache"]
            assert st["state"] == "ok" and st["evicted_blobs"] > 0 and st["min_free"] == 6 * MiB
        # a new cache on a filesystem that someone else filled up (all but 1 MiB)
        shutil.rmtree(small / "cache")
        with open(small / "filler", "wb") as f:
            f.write(b"\0" * (free_bytes(small) - MiB))
        with Daemon(cfg, work / "d2.log").start(wait_mounts=[mnt]) as d:
            for i in reversed(range(4)):  # not in name order: a bulk walk would fetch c/ ahead (aysfsd.fuse.bulkread)
                assert (mnt / "b" / f"{i}.bin").read_bytes() == files[f"b/{i}.bin"]
            st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)["cache"]
            assert st["state"] == "memory" and "less than cache_min_free (6.0 MiB)" in st["reason"], st
            assert f"local cache {small}/cache/lmdb: its filesystem has" in d.log()
            assert "\tmemory\tits filesystem has" in aysctl("--config", str(cfg), "status").stdout
            (small / "filler").unlink()
            for i in range(3):
                assert (mnt / "c" / f"{i}.bin").read_bytes() == files[f"c/{i}.bin"]
            st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)["cache"]
            assert st["state"] == "ok" and d.proc is not None and d.proc.poll() is None
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["umount", "-l", str(small)], check=False)
