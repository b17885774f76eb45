"""Every tier through the real daemon on loopback: ssh:// stors, directory and HTTP grid caches
(write-back, sharing, corrupt-blob repair), failover between stors, the bounded local cache,
per-ays cache flags, prefetch flags and HTTP proxies."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import lmdb
import pytest

from aysfsd.tree.objects import CHUNK_SIZE
from tests.harness import (
    AYS,
    aysctl,
    blob_files,
    config,
    ctl,
    pack_holding,
    publish,
    sample_tree,
    start,
    status,
    stor_dir_objects,
    stor_packs,
    stor_roots,
    stor_tree_packs,
    tree_listing,
    wait_for,
)
from tests.servers import ForwardProxy, Nginx, Sshd

BIG = 5 * 1024 * 1024 + 4321  # two chunks
EMPTY = hashlib.sha256(b"").hexdigest()  # an empty file is never read, so never fetched


# -- helpers --------------------------------------------------------------------------------------


def read_set(stor: Path) -> set[str]:
    """The blobs reading every file fetches: small files come as their packs, the directory
    objects (but the root's) as tree packs, so not in packs of a directory's subdirectories."""
    tree_packs, dir_objects = stor_tree_packs(stor)
    dir_packs = {o["packs"][e["p"][0]][0] for o in stor_dir_objects(stor) for e in o["entries"]
                 if e["t"] == "d" and "p" in e}
    return (set(blob_files(stor)) - stor_packs(stor)[1] - dir_objects - dir_packs - {EMPTY}) | stor_roots(stor)


def cached_set(stor: Path) -> set[str]:
    """The blobs the local cache holds once every file was read: packs' members, not packs."""
    return set(blob_files(stor)) - stor_packs(stor)[0] - stor_tree_packs(stor)[0]


def assert_blobs_valid(root: Path) -> None:
    """Every blob in a grid cache is named by its content's hash; no temp file is left."""
    for h, p in blob_files(root).items():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == h, p
        assert p.parent.name == h[:2]
    leftovers = [p for p in (root / "blobs").rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not leftovers, leftovers


def file_blobs(src: Path) -> set[str]:
    """Hashes of the blobs holding the files' bytes (chunks for files over 4 MiB)."""
    out: set[str] = set()
    for p in src.rglob("*"):
        if p.is_symlink() or not p.is_file():
            continue
        with open(p, "rb") as f:
            while True:
                data = f.read(CHUNK_SIZE)
                out.add(hashlib.sha256(data).hexdigest())
                if len(data) < CHUNK_SIZE:
                    break
    return out


def lmdb_blobs(cache_dir: Path) -> set[str]:
    """Hashes in the daemon's LMDB blob database, read directly (another process may run)."""
    env = lmdb.open(str(cache_dir / "lmdb"), readonly=True, max_dbs=4, lock=True)
    try:
        db = env.open_db(b"blobs", create=False)
        with env.begin(db=db) as txn:
            return {bytes(k).hex() for k, _ in txn.cursor()}
    finally:
        env.close()


def drop_page_cache() -> None:
    """So that reads go through FUSE again (the kernel keeps file pages: keep_cache)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def list_files(root: Path) -> list[Path]:
    """Every regular file below root, found by listing every directory: loads the
    directory objects, reads no file."""
    files = []
    for dirpath, _, filenames in os.walk(root):
        files += [Path(dirpath) / n for n in filenames]
    return [f for f in files if not f.is_symlink()]


@pytest.fixture
def tree(work: Path) -> Path:
    return sample_tree(work / "src", big_size=BIG)


def second_nginx(work: Path, name: str) -> Nginx:
    return Nginx(work / name, work / f"{name}-nginx", put=True).start()


# -- ssh:// stor ------------------------------------------------------------------------------------


def test_ssh_stor_end_to_end(work: Path, tree: Path, sshd_server: Sshd) -> None:
    path = work / "sshstor"
    path.mkdir()
    url = sshd_server.url(str(path))
    root = publish(tree, url, "--ssh-key", str(sshd_server.client_key),
                   "--ssh-known-hosts", str(sshd_server.known_hosts))
    assert (path / "blobs" / root[:2] / root).is_file()
    mnt = work / "mnt"
    text = config(work / "d", [{"url": url, "ssh.key": str(sshd_server.client_key),
                                "ssh.known_hosts": str(sshd_server.known_hosts), "timeout": 5}],
                  [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        assert tree_listing(mnt) == tree_listing(tree)
        st = status(work, "d")
        src = st["sources"][0]
        assert src["url"] == url and src["tier"] == "stor"
        # every blob once: alone, or as a member of a pack (the packs are blobs of the stor too)
        assert src["fetched_blobs"] == len(read_set(path))
        assert st["cache"]["pack_members"] == len(cached_set(path) - read_set(path) - {EMPTY})
        assert st["cache"]["packs"] >= 3 and not src["down"]


# -- grid caches ------------------------------------------------------------------------------------


def test_two_daemons_share_a_directory_grid_cache(work: Path, tree: Path, nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    want = read_set(nginx_stor.root)  # what reading every file fetches
    grid = work / "grid"
    grid.mkdir()
    m1, m2 = work / "m1", work / "m2"

    def cfg(name: str, mnt: Path) -> str:
        return config(work / name, [{"url": nginx_stor.url}], [{"id": AYS, "mnt": str(mnt)}],
                      [{"mnt": str(grid), "writable": True}])

    with start(work, "d1", cfg("d1", m1), [m1]):
        assert tree_listing(m1) == tree_listing(tree)
        wait_for(lambda: set(blob_files(grid)) == want, 10, "write-back of every blob to the grid cache")
        assert_blobs_valid(grid)
        assert status(work, "d1")["sources"][1]["fetched_blobs"] == len(want)  # all from the stor
    with start(work, "d2", cfg("d2", m2), [m2]):  # the ref still comes from the stor
        nginx_stor.stop()
        assert tree_listing(m2) == tree_listing(tree)  # every blob from the grid cache
        srcs = status(work, "d2")["sources"]
        assert [s["tier"] for s in srcs] == ["grid", "stor"]
        assert srcs[0]["fetched_blobs"] == len(want) and srcs[1]["fetched_blobs"] == 0
    assert_blobs_valid(grid)


def test_http_grid_cache_write_back_and_corrupt_blob_repair(work: Path, tree: Path, nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    want = read_set(nginx_stor.root)  # what reading every file fetches
    gridsrv = second_nginx(work, "gridroot")
    try:
        def cfg(name: str, mnt: Path) -> str:
            return config(work / name, [{"url": nginx_stor.url}], [{"id": AYS, "mnt": str(mnt)}],
                          [{"mnt": gridsrv.url, "timeout": 5}])

        m1, m2 = work / "m1", work / "m2"
        with start(work, "d1", cfg("d1", m1), [m1]):
            assert tree_listing(m1) == tree_listing(tree)
            wait_for(lambda: set(blob_files(gridsrv.root)) == want, 10, "write-back over HTTP PUT")
        assert_blobs_valid(gridsrv.root)
        # corrupt, in the grid cache, the pack that holds a file
        good = (tree / "lib" / "json" / "decoder.py").read_bytes()
        h = pack_holding(gridsrv.root, good)
        gpath = gridsrv.root / "blobs" / h[:2] / h
        gpath.write_bytes(gpath.read_bytes().replace(b"def ", b"DEF "))
        with start(work, "d2", cfg("d2", m2), [m2]) as d2:
            assert (m2 / "lib" / "json" / "decoder.py").read_bytes() == good  # from the stor
            log = d2.log()
            assert f"corrupt blob {h} from {gridsrv.url} (grid cache" in log
            assert f"grid cache {gridsrv.url}: repairing corrupt blob {h}" in log
            wait_for(lambda: hashlib.sha256(gpath.read_bytes()).hexdigest() == h, 10, "the grid copy repaired")
            srcs = status(work, "d2")["sources"]
            assert srcs[0]["corrupt"] == 1 and srcs[1]["fetched_blobs"] == 1
            assert tree_listing(m2) == tree_listing(tree)
        assert_blobs_valid(gridsrv.root)
    finally:
        gridsrv.stop()


# -- failover ---------------------------------------------------------------------------------------


def test_stor_killed_mid_run_fails_over_then_all_down_gives_eio(work: Path, tree: Path,
                                                                nginx_stor: Nginx) -> None:
    b = second_nginx(work, "storb")
    try:
        assert publish(tree, nginx_stor.url) == publish(tree, b.url)
        mnt = work / "mnt"
        text = config(work / "d", [{"url": nginx_stor.url, "timeout": 2}, {"url": b.url, "timeout": 2}],
                      [{"id": AYS, "mnt": str(mnt)}], fetch_timeout=5)
        with start(work, "d", text, [mnt]) as d:
            files = list_files(mnt)  # directory objects cached, no file read yet
            cached = [mnt / "bin" / "tool.sh", mnt / "data" / "big.bin"]
            for p in cached:
                assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
            # read in reverse name order: not a bulk walk, which would fetch logging/ ahead
            # (see aysfsd.fuse.bulkread)
            json_files = [p for p in reversed(files) if "/lib/json/" in str(p)]
            email_files = [p for p in reversed(files) if "/lib/email/" in str(p)]
            logging_files = [p for p in files if "/lib/logging/" in str(p)]
            nginx_stor.stop()
            t = time.monotonic()
            first = json_files[0]
            assert first.read_bytes() == (tree / first.relative_to(mnt)).read_bytes()
            failover = time.monotonic() - t
            print(f"\nfailover: stor A killed -> first read from stor B in {failover:.3f}s")
            assert failover < 3.0
            slowest = 0.0
            for p in json_files[1:] + email_files:
                t = time.monotonic()
                assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
                slowest = max(slowest, time.monotonic() - t)
            print(f"then {len(json_files) - 1 + len(email_files)} files from B, slowest {slowest:.3f}s")
            assert slowest < 0.5  # A is marked down and skipped
            srcs = status(work, "d")["sources"]
            assert srcs[0]["down"] and srcs[0]["failures"] >= 1 and not srcs[1]["down"]
            distinct = {hashlib.sha256((tree / p.relative_to(mnt)).read_bytes()).hexdigest()
                        for p in json_files + email_files} - {EMPTY}
            assert srcs[1]["fetched_blobs"] >= 1
            assert srcs[1]["fetched_blobs"] + status(work, "d")["cache"]["pack_members"] >= len(distinct)
            assert f"source {nginx_stor.url} marked down" in d.log()
            # every stor down: uncached files fail with EIO in bounded time, cached ones read fine
            b.stop()
            for p in logging_files[:3]:
                t = time.monotonic()
                with pytest.raises(OSError) as e:
                    p.read_bytes()
                took = time.monotonic() - t
                assert e.value.errno == errno.EIO and took < 5 + 2, took
            drop_page_cache()
            for p in cached + json_files:
                assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
            # a stor back up is used at once (down sources are probed when nothing else answers)
            b.start()
            time.sleep(2.1)  # (a fetch that failed answers EIO at once for 2 s: the kernel's retry)
            p = logging_files[0]
            assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
    finally:
        b.stop()


def test_hanging_stor_times_out_per_request_and_fails_over(work: Path, tree: Path, nginx_stor: Nginx) -> None:
    """A stor that accepts connections but never answers (frozen): the per-request timeout
    (1 s here), not fetch_timeout, decides when the next stor is asked."""
    b = second_nginx(work, "storb")
    frozen = False
    try:
        publish(tree, nginx_stor.url)
        publish(tree, b.url)
        mnt = work / "mnt"
        text = config(work / "d", [{"url": nginx_stor.url, "timeout": 1}, {"url": b.url, "timeout": 1}],
                      [{"id": AYS, "mnt": str(mnt)}], fetch_timeout=8)
        with start(work, "d", text, [mnt]):
            files = list_files(mnt)
            assert nginx_stor.pid is not None
            os.killpg(nginx_stor.pid, signal.SIGSTOP)  # master and worker: the kernel still accepts
            frozen = True
            t = time.monotonic()
            p = mnt / "lib" / "json" / "decoder.py"
            assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
            took = time.monotonic() - t
            print(f"\nfrozen stor: first read from the next stor in {took:.3f}s (request timeout 1s)")
            assert 0.9 <= took < 3.0
            t = time.monotonic()
            for p in files[:20]:
                assert p.read_bytes() == (tree / p.relative_to(mnt)).read_bytes()
            assert time.monotonic() - t < 2.0  # the frozen stor is skipped now
            assert status(work, "d")["sources"][0]["down"]
    finally:
        if frozen and nginx_stor.pid is not None:
            os.killpg(nginx_stor.pid, signal.SIGCONT)
        b.stop()


# -- the bounded local cache -------------------------------------------------------------------


def test_cache_smaller_than_tree_stays_bounded_and_purge(work: Path, nginx_stor: Nginx) -> None:
    src = work / "src"
    rnd = random.Random(5)
    total = 0
    for i in range(40):
        d = src / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.randrange(1 << 20, 2 << 20)
        (d / f"f{i:02d}.bin").write_bytes(rnd.randbytes(size))
        total += size
    assert total > 55 << 20
    publish(src, nginx_stor.url)
    limit = 24 << 20
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url}], [{"id": AYS, "mnt": str(mnt)}], cache_size="24MiB")
    sock = work / "d" / "aysfsd.sock"
    with start(work, "d", text, [mnt]):
        observed: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                observed.append(ctl(sock, {"cmd": "status"})[-1]["cache"]["bytes"])
                time.sleep(0.02)

        w = threading.Thread(target=watch)
        w.start()
        try:
            for _ in range(2):
                assert tree_listing(mnt) == tree_listing(src)
                drop_page_cache()
        finally:
            stop.set()
            w.join()
        # the second pass may be served from memory while LMDB writes lag behind: wait for the queue
        deadline = time.monotonic() + 30
        while (c := status(work, "d")["cache"])["queued_blobs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c["queued_blobs"] == 0 and c["queued_bytes"] == 0
        observed.append(c["bytes"])
        mdb = (work / "d" / "cache" / "lmdb" / "data.mdb").stat().st_size
        print(f"\ncache bound: limit {limit} bytes, max observed {max(observed)} bytes over {len(observed)} "
              f"samples; evicted {c['evicted_blobs']} blobs ({c['evicted_bytes']} bytes); data.mdb {mdb} bytes")
        assert c["limit"] == limit
        assert max(observed) <= limit
        assert c["evicted_blobs"] > 0 and c["bytes"] > limit // 2
        # aysctl cache purge frees the space; reads still work (from the stor)
        r = aysctl("cache", "purge", "--socket", str(sock))
        assert "freed" in r.stdout
        c = status(work, "d")["cache"]
        assert c["bytes"] == 0 and c["entries"] == 0
        drop_page_cache()
        assert tree_listing(mnt) == tree_listing(src)


# -- per-ays flags and prefetch ------------------------------------------------------------------


def test_cache_flags_off_keep_file_blobs_out_of_local_and_grid(work: Path, tree: Path,
                                                                nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    grid = work / "grid"
    grid.mkdir()
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url}],
                  [{"id": AYS, "mnt": str(mnt), "cache.local": False, "cache.grid": False}], [{"mnt": str(grid)}])
    with start(work, "d", text, [mnt]):
        assert tree_listing(mnt) == tree_listing(tree)
        drop_page_cache()
        assert tree_listing(mnt) == tree_listing(tree)
        in_lmdb = lmdb_blobs(work / "d" / "cache")
        assert status(work, "d")["cache"]["bytes"] < 1 << 20
        time.sleep(0.3)  # write-back, if any, is asynchronous
    files = file_blobs(tree)
    dirs = set(blob_files(nginx_stor.root)) - files
    assert in_lmdb and in_lmdb <= dirs  # directory objects only
    assert not in_lmdb & files
    assert not set(blob_files(grid)) & files  # cache.grid = false: no file blob written back
    print(f"\ncache.grid = false: {len(blob_files(grid))} directory objects in the grid cache")


def wait_prefetch_done(work: Path, name: str) -> None:
    def done() -> bool:
        pf = status(work, name)["mounts"][0]["prefetch"]
        return pf is not None and pf["state"] == "done"

    wait_for(done, 20, "prefetch done", interval=0.1)


def test_prefetch_local_fills_the_local_cache(work: Path, tree: Path, nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    want = cached_set(nginx_stor.root)
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url}],
                  [{"id": AYS, "mnt": str(mnt), "prefetch.cache.local": True}])
    with start(work, "d", text, [mnt]):
        def done() -> bool:
            pf = status(work, "d")["mounts"][0]["prefetch"]
            assert pf is None or pf["state"] in ("running", "done"), pf
            return pf is not None and pf["state"] == "done"

        wait_for(done, 20, "prefetch done", interval=0.1)
        st = status(work, "d")
        pf = st["mounts"][0]["prefetch"]
        assert pf["blobs_done"] == pf["blobs_total"] == len(read_set(nginx_stor.root) | {EMPTY})
        assert pf["errors"] == 0 and st["cache"]["packs"] >= 3
        assert st["cache"]["entries"] == len(want)
        assert lmdb_blobs(work / "d" / "cache") == want  # the tier itself, read directly
        nginx_stor.stop()
        assert tree_listing(mnt) == tree_listing(tree)  # every byte is local


def test_prefetch_grid_with_local_off_fills_only_the_grid_cache(work: Path, tree: Path,
                                                                 nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    want = read_set(nginx_stor.root) | {EMPTY}
    grid = work / "grid"
    grid.mkdir()
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url}],
                  [{"id": AYS, "mnt": str(mnt), "cache.local": False, "prefetch.cache.grid": True}],
                  [{"mnt": str(grid)}])
    with start(work, "d", text, [mnt]):
        wait_prefetch_done(work, "d")
        assert set(blob_files(grid)) == want
        assert_blobs_valid(grid)
        st = status(work, "d")
        assert st["cache"]["bytes"] < 1 << 20  # directory objects only
        in_lmdb = lmdb_blobs(work / "d" / "cache")
    files = file_blobs(tree)
    dir_objects = (set(blob_files(nginx_stor.root)) - files - stor_packs(nginx_stor.root)[0]
                   - stor_tree_packs(nginx_stor.root)[0])
    assert not in_lmdb & files and in_lmdb <= dir_objects


# -- HTTP proxy -------------------------------------------------------------------------------------


def test_http_stor_and_grid_cache_through_a_proxy(work: Path, tree: Path, nginx_stor: Nginx,
                                                  stor_proxy: ForwardProxy) -> None:
    publish(tree, nginx_stor.url)
    want = read_set(nginx_stor.root)  # what reading every file fetches
    gridsrv = second_nginx(work, "gridroot")
    try:
        mnt = work / "mnt"
        text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}],
                      [{"mnt": gridsrv.url, "proxy": stor_proxy.url}])
        with start(work, "d", text, [mnt]):
            assert tree_listing(mnt) == tree_listing(tree)
            wait_for(lambda: set(blob_files(gridsrv.root)) == want, 10, "write-back through the proxy")
        stor_host, grid_host = urlsplit(nginx_stor.url).netloc, urlsplit(gridsrv.url).netloc
        seen = stor_proxy.seen
        got = {(m, host) for m, host, _ in seen}
        assert {("GET", stor_host), ("GET", grid_host), ("PUT", grid_host)} <= got
        blob_gets = {p.rsplit("/", 1)[1] for m, host, p in seen if m == "GET" and host == stor_host
                     and p.startswith("/blobs/")}
        assert blob_gets == want  # every blob came from the stor through the proxy
        assert any(p.startswith("/refs/") for m, host, p in seen if host == stor_host)  # the ref too
        puts = {p.rsplit("/", 1)[1] for m, host, p in seen if m == "PUT" and host == grid_host}
        assert puts == want
    finally:
        gridsrv.stop()


def test_prefetch_local_and_grid_fetches_each_blob_once(work: Path, tree: Path, nginx_stor: Nginx) -> None:
    publish(tree, nginx_stor.url)
    grid = work / "grid"
    grid.mkdir()
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url}],
                  [{"id": AYS, "mnt": str(mnt), "prefetch.cache.local": True, "prefetch.cache.grid": True}],
                  [{"mnt": str(grid)}])
    with start(work, "d", text, [mnt]):
        wait_prefetch_done(work, "d")
        st = status(work, "d")
        assert st["mounts"][0]["prefetch"]["errors"] == 0
        assert set(blob_files(grid)) == read_set(nginx_stor.root) | {EMPTY}  # packs, not their members
        assert_blobs_valid(grid)
        assert lmdb_blobs(work / "d" / "cache") == cached_set(nginx_stor.root)  # members, not packs
        # each blob once: a tree pack (directory objects), fetched by the walk for the
        # directories, goes to the grid caches rebuilt from its members (checked against its hash)
        tree_packs = stor_tree_packs(nginx_stor.root)[0]
        assert tree_packs and tree_packs <= set(blob_files(grid))
        stor = st["sources"][1]
        want = len(read_set(nginx_stor.root) | {EMPTY})
        assert stor["tier"] == "stor" and stor["fetched_blobs"] == want
        nginx_stor.stop()
        assert tree_listing(mnt) == tree_listing(tree)
