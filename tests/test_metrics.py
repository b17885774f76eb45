"""Prometheus metrics through the real daemon: real nginx stor, a directory grid cache, real
HTTP scrapes before and after reads from each tier; the counters move by the right amounts."""

from __future__ import annotations

import random
import shutil
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aysfsd.tree.profile import decode
from tests import test_profiles as profiles
from tests.harness import Daemon, aysctl, config, ctl, wait_for
from tests.harness import start as start_named
from tests.servers import Nginx, free_port

AYS = "jumpscale|metrics!main"
SIZE = 300 * 1024  # one blob: above the pack limit (128 KiB) and the sibling prefetch (256 KiB)

Samples = dict[str, float]


def scrape(port: int) -> Samples:
    """`name{label="v",...}` -> value of every sample of a real HTTP scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def delta(before: Samples, after: Samples) -> Samples:
    """What moved between two scrapes (histograms and info aside: checked by name)."""
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def m(mount: str = "m", **labels: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in sorted({"mount": mount, **labels}.items()))


def src(url: str, tier: str) -> str:
    return f'source="{url}",tier="{tier}"'


@pytest.fixture
def setup(work: Path, nginx_stor: Nginx) -> tuple[Path, Path]:
    """Three one-blob files published to the nginx stor; an empty directory grid cache."""
    tree = work / "src"
    tree.mkdir()
    rnd = random.Random(14)
    for name in ("a.bin", "b.bin", "c.bin"):
        (tree / name).write_bytes(rnd.randbytes(SIZE))
    aysctl("publish", str(tree), "--ays", AYS, "--stor", nginx_stor.url)
    grid = work / "grid"
    grid.mkdir()
    return tree, grid


def blob_of(stor: Path, data: bytes) -> Path:
    import hashlib

    h = hashlib.sha256(data).hexdigest()
    return stor / "blobs" / h[:2] / h


def start(work: Path, name: str, stor_url: str, grid: Path, port: int) -> Daemon:
    cfg = work / f"{name}.toml"
    cfg.write_text(config(work / "state", [{"url": stor_url}], [{"id": AYS, "mnt": str(work / "mnt"), "name": "m"}],
                          [{"mnt": str(grid)}], metrics_listen=f"127.0.0.1:{port}"))
    return Daemon(cfg, work / f"{name}.log").start(wait_mounts=[work / "mnt"])


def test_metrics_move_by_the_right_amounts_for_each_tier(work: Path, setup: tuple[Path, Path],
                                                         nginx_stor: Nginx) -> None:
    tree, grid = setup
    mnt, port, stor = work / "mnt", free_port(), nginx_stor.url
    gsrc, ssrc = src(str(grid), "grid"), src(stor, "stor")
    with start(work, "d1", stor, grid, port) as d:
        assert sorted(p.name for p in mnt.iterdir()) == ["a.bin", "b.bin", "c.bin"]  # root directory loaded
        s0 = scrape(port)
        assert s0["aysfs_build_info{version=\"0.1.0\"}"] == 1
        st = ctl(work / "state" / "aysfsd.sock", {"cmd": "status"})[-1]
        root, rev = st["mounts"][0]["root"], st["mounts"][0]["revision"]
        assert s0[f'aysfs_mount_info{{id="{AYS}",mnt="{mnt}",mount="m",revision="{rev}",root="{root}"}}'] == 1
        assert s0[f"aysfs_mount_revision{{{m()}}}"] == rev
        assert s0[f"aysfs_mount_up{{{m()}}}"] == 1
        assert s0[f"aysfs_mount_degraded{{{m()}}}"] == 0
        assert s0[f"aysfs_source_up{{{ssrc}}}"] == 1
        assert s0["aysfs_cache_limit_bytes{}"] == 10 * 1024**3

        # from the stor: the grid cache asked first (not there), then the stor
        assert (mnt / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
        s1 = scrape(port)
        moved = delta(s0, s1)
        assert moved[f"aysfs_mount_read_bytes_total{{{m()}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_bytes_total{{{m(tier='stor')}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_reads_total{{{m(tier='stor')}}}"] == 1
        assert f"aysfs_mount_tier_reads_total{{{m(tier='grid')}}}" not in moved
        assert moved[f"aysfs_mount_misses_total{{{m()}}}"] >= 1
        assert moved[f"aysfs_source_requests_total{{{gsrc}}}"] == 1
        assert moved[f"aysfs_source_not_found_total{{{gsrc}}}"] == 1
        assert moved[f"aysfs_source_requests_total{{{ssrc}}}"] == 1
        assert moved[f"aysfs_source_blobs_total{{{ssrc}}}"] == 1
        assert moved[f"aysfs_source_bytes_total{{{ssrc}}}"] == SIZE
        assert moved[f"aysfs_source_fetch_seconds_count{{{ssrc}}}"] == 1
        assert moved[f'aysfs_source_fetch_seconds_bucket{{le="+Inf",{ssrc}}}'] == 1
        assert moved["aysfs_cache_misses_total{}"] == 1
        assert f"aysfs_source_request_errors_total{{{ssrc}}}" not in moved

        # from the grid cache: its blob put there by hand; the stor is not asked
        b_blob = blob_of(nginx_stor.root, (tree / "b.bin").read_bytes())
        (grid / "blobs" / b_blob.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(b_blob, grid / "blobs" / b_blob.parent.name / b_blob.name)
        assert (mnt / "b.bin").read_bytes() == (tree / "b.bin").read_bytes()
        s2 = scrape(port)
        moved = delta(s1, s2)
        assert moved[f"aysfs_mount_read_bytes_total{{{m()}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_bytes_total{{{m(tier='grid')}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_reads_total{{{m(tier='grid')}}}"] == 1
        assert moved[f"aysfs_source_blobs_total{{{gsrc}}}"] == 1
        assert moved[f"aysfs_source_bytes_total{{{gsrc}}}"] == SIZE
        assert f"aysfs_source_requests_total{{{ssrc}}}" not in moved
        assert f"aysfs_mount_tier_bytes_total{{{m(tier='stor')}}}" not in moved

        # a stor that is down: EIO counted as "unavailable", the source marked down
        nginx_stor.stop()
        with pytest.raises(OSError):
            (mnt / "c.bin").read_bytes()
        s3 = scrape(port)
        moved = delta(s2, s3)
        # one per FUSE read answered EIO (the kernel may send several, and retries a failed page)
        eios = d.log().count("mount m: read of 'c.bin' failed: ")
        assert eios >= 1
        assert moved[f"aysfs_mount_eio_total{{{m(cause='unavailable')}}}"] == eios
        assert f"aysfs_mount_eio_total{{{m(cause='timeout')}}}" not in moved
        # the first fetch: one request and two retries, then marked down; each later one: one probe
        downs = d.log().count(f"source {stor} marked down")
        assert moved[f"aysfs_source_marked_down_total{{{ssrc}}}"] == downs >= 1
        assert moved[f"aysfs_source_request_errors_total{{{ssrc}}}"] == 2 + downs
        assert s3[f"aysfs_source_up{{{ssrc}}}"] == 0
        nginx_stor.start()

        # reloads and a refused one (one write of the file: one reload by the file watch)
        cfg = work / "d1.toml"
        good = cfg.read_text()
        cfg.write_text(good + "\n[main2]\n")
        wait_for(lambda: "reload refused, keeping the running config" in d.log(), 10, "the refused reload")
        s4 = scrape(port)
        assert delta(s3, s4)["aysfs_config_reload_failures_total{}"] == 1
        assert s4["aysfs_config_error{}"] == 1
        cfg.write_text(good)
        wait_for(lambda: "reloaded " in d.log(), 10, "the reload")
        s5 = scrape(port)
        assert s5["aysfs_config_error{}"] == 0
        assert delta(s4, s5)["aysfs_config_reloads_total{}"] == 1
        assert d.log().count("reload refused") == 1 and d.log().count("reloaded ") == 1
        assert d.stop() == 0

    # the local cache: a new daemon (new FUSE session, empty page cache) reads a.bin from LMDB
    with start(work, "d2", stor, grid, port) as d:
        assert sorted(p.name for p in mnt.iterdir()) == ["a.bin", "b.bin", "c.bin"]
        s0 = scrape(port)
        assert s0["aysfs_cache_entries{}"] >= 3  # a.bin, b.bin, the root directory object
        assert (mnt / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
        s1 = scrape(port)
        moved = delta(s0, s1)
        assert moved[f"aysfs_mount_read_bytes_total{{{m()}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_bytes_total{{{m(tier='local')}}}"] == SIZE
        assert moved[f"aysfs_mount_tier_reads_total{{{m(tier='local')}}}"] >= 1
        assert not [k for k in moved if k.startswith(("aysfs_source_", "aysfs_mount_misses"))]
        assert d.stop() == 0


def test_metrics_address_taken_is_a_clear_error_and_mounts_still_serve(work: Path, setup: tuple[Path, Path],
                                                                       nginx_stor: Nginx) -> None:
    tree, grid = setup
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    sock = work / "state" / "aysfsd.sock"
    try:
        with start(work, "d", nginx_stor.url, grid, port) as d:
            assert (work / "mnt" / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
            st = ctl(sock, {"cmd": "status"})[-1]["daemon"]
            assert st["metrics"]["listen"] == ""
            assert f"metrics_listen 127.0.0.1:{port}: cannot listen: " in st["metrics"]["error"]
            assert "in use" in st["metrics"]["error"]
            assert f"metrics_listen 127.0.0.1:{port}: cannot listen" in d.log()
            taken.close()
            aysctl("reload", "--socket", str(sock))  # the address is free now: tried again
            wait_for(lambda: ctl(sock, {"cmd": "status"})[-1]["daemon"]["metrics"]["listen"] != "", 10,
                     "the metrics endpoint")
            assert scrape(port)[f"aysfs_mount_read_bytes_total{{{m()}}}"] == SIZE
            assert d.stop() == 0
    finally:
        taken.close()


@pytest.fixture
def logged_stor(work: Path) -> Iterator[Nginx]:
    server = Nginx(work / "stor", work / "nginx", put=True, access_log=True).start()
    yield server
    server.stop()


def test_startup_profile_progress(work: Path, logged_stor: Nginx) -> None:
    """A profile recorded by an operator and published; the
    next cold start plays it: source, state, items, what it fetched, and the items its start read,
    scraped exactly as `aysctl status` reports them."""
    tree, stor = profiles.make_tree(work), logged_stor
    root = profiles.publish(tree, stor.url)
    m1, m2, out = work / "m1", work / "m2", work / "start.profile"
    port = free_port()
    cfg1 = config(work / "n1", [{"url": stor.url}], [{"id": profiles.AYS, "mnt": str(m1)}],
                  metrics_listen=f"127.0.0.1:{port}")
    with start_named(work, "n1", cfg1, [m1]):
        name = profiles.mount_status(work, "n1")["name"]
        proc = profiles.record(work, "n1", out, "--idle", "60")
        profiles.app_start(m1, tree)
        p = profiles.mount_status(work, "n1")["profile"]
        s = scrape(port)
        assert s[f"aysfs_mount_profile_info{{{m(name, source=p['source'], state=p['state'])}}}"] == 1
        assert s[f"aysfs_mount_profile_items{{{m(name, kind='recorded')}}}"] == p["recorded"]
        aysctl("--socket", str(work / "n1" / "aysfsd.sock"), "profile", "stop", profiles.AYS)
        assert proc.wait(30) == 0, proc.communicate()
    items = len(decode(out.read_bytes(), root).items)
    aysctl("publish", str(tree), "--ays", profiles.AYS, "--stor", stor.url, "--profile", str(out))

    port = free_port()
    cfg2 = config(work / "n2", [{"url": stor.url}], [{"id": profiles.AYS, "mnt": str(m2)}],
                  metrics_listen=f"127.0.0.1:{port}")
    with start_named(work, "n2", cfg2, [m2]):
        p = profiles.wait_profile(work, "n2", "done")
        before = scrape(port)
        assert before[f"aysfs_mount_profile_info{{{m(name, source='ref', state='done')}}}"] == 1
        assert before[f"aysfs_mount_profile_items{{{m(name, kind='total')}}}"] == items == p["items"]
        assert before[f"aysfs_mount_profile_items{{{m(name, kind='ignored')}}}"] == 0
        assert before[f"aysfs_mount_profile_items{{{m(name, kind='recorded')}}}"] == 0
        assert before[f"aysfs_mount_profile_errors{{{m(name)}}}"] == 0
        assert before[f"aysfs_mount_profile_fetched_blobs{{{m(name)}}}"] == p["fetched_blobs"] > 0
        assert before[f"aysfs_mount_profile_fetched_bytes{{{m(name)}}}"] == p["fetched_bytes"] > 0
        assert before[f"aysfs_mount_profile_items{{{m(name, kind='read')}}}"] == p["read"] < items
        profiles.app_start(m2, tree)
        after = scrape(port)
        assert after[f"aysfs_mount_profile_items{{{m(name, kind='read')}}}"] == items
        assert after[f"aysfs_mount_profile_fetched_blobs{{{m(name)}}}"] == p["fetched_blobs"]  # nothing more
