"""Tree packs (aysfsd.tree.packs): a version's directory objects in a few requests.

The decoder refuses hostile indexes; publish writes packs that hold every directory object in
walk order; through the real daemon, nginx and a counting HTTP proxy, a cold walk of a deep
tree costs a few requests instead of one per level, and a missing, corrupt or truncated pack
or a bad index only costs requests: the listing stays exact."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from aysfsd.stores import DirStore, Store
from aysfsd.stores.layout import blob_path, start_path
from aysfsd.tiers import Fetcher, Source
from aysfsd.tiers.local import LocalCache
from aysfsd.tree.objects import PACK_SIZE, decode_dir
from aysfsd.tree.packs import (
    TREE_MAX_PACKS,
    TREE_PACK_SIZE,
    TreeIndexError,
    decode_index,
    encode_index,
    plan,
    tree_path,
)
from aysfsd.tree.start import StartFileError, decode_start, encode_start
from bench.slowlink import SlowLink
from tests.harness import AYS, aysctl, config, publish, start, status, tree_listing, wait_for
from tests.servers import ForwardProxy, Nginx

DEPTH = 12
H = "ab" * 32


# -- the format -------------------------------------------------------------------------------------


def test_index_round_trip_and_plan_bounds() -> None:
    objs = [(hashlib.sha256(b"%d" % i).hexdigest(), b"x" * 1000) for i in range(1200)]
    packs = plan(objs + objs[:5])  # duplicates once
    assert sum(len(p) for p in packs) == 1200
    assert all(sum(len(d) for _, d in p) <= TREE_PACK_SIZE for p in packs)
    assert [h for p in packs for h, _ in p] == [h for h, _ in objs]  # walk order kept
    big = plan([(H, b"y" * (TREE_PACK_SIZE + 1))] + objs[:2])
    assert [[h for h, _ in p] for p in big] == [[objs[0][0], objs[1][0]]]  # too big: alone
    many = plan([(hashlib.sha256(b"%d" % i).hexdigest(), b"z" * (TREE_PACK_SIZE // 2 - 1)) for i in range(500)])
    assert len(many) == TREE_MAX_PACKS and all(len(p) == 2 for p in many)
    # a pack of one member would be that member's own blob (same bytes, same hash): not made
    lone = [(hashlib.sha256(b"%d" % i).hexdigest(), b"w" * (TREE_PACK_SIZE // 2 + 1)) for i in range(3)]
    assert plan(lone) == [] and plan(objs[:1]) == []
    assert all(len(p) > 1 for p in packs)
    listed = [(hashlib.sha256(b"".join(d for _, d in p)).hexdigest(), [(h, len(d)) for h, d in p]) for p in packs]
    got = decode_index(encode_index(H, listed), H)
    assert [(p.hash, p.size) for p in got] == [(h, sum(s for _, s in ms)) for h, ms in listed]
    assert got[0].members[:2] == ((objs[0][0], 0, 1000), (objs[1][0], 1000, 1000))


@pytest.mark.parametrize("obj, why", [
    ({"aysfs": "trees", "v": 2, "root": H, "packs": []}, "v1"),
    ({"aysfs": "trees", "v": 1, "root": "cd" * 32, "packs": []}, "another root"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [], "x": 1}, "unknown fields"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [["../etc", 3, [[H, 3]]]]}, "bad hash"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, PACK_SIZE + 1, [[H, PACK_SIZE + 1]]]]}, "out of bounds"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, 10, [[H, 4], [H, 4]]]]}, "add up"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, 10, [[H, -1], [H, 11]]]]}, "bad member"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, True, [[H, 1]]]]}, "bad pack"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, 1, [[H, 1]]]] * (TREE_MAX_PACKS + 1)}, "at most"),
    # a pack listed as its own member: its members' flights would wait for itself
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [[H, 2, [["cd" * 32, 1], [H, 1]]]]}, "its own member"),
    ({"aysfs": "trees", "v": 1, "root": H, "packs": [["cd" * 32, 2, [["ef" * 32, 2]]]]}, "its own member"),
])
def test_index_decoder_refuses_hostile_fields(obj: dict[str, object], why: str) -> None:
    with pytest.raises(TreeIndexError, match=why):
        decode_index(json.dumps(obj).encode(), H)
    with pytest.raises(TreeIndexError, match="not valid JSON"):
        decode_index(b"[" * 100_000, H)


# -- through the daemon -----------------------------------------------------------------------------


def deep_tree(dst: Path) -> Path:
    """DEPTH levels, each with a file, a symlink and a leaf directory beside the next level."""
    d = dst
    for i in range(DEPTH):
        d.mkdir(parents=True)
        (d / f"f{i}.txt").write_text(f"level {i}\n")
        (d / f"leaf{i}").mkdir()
        (d / f"leaf{i}" / "x").write_text("x\n")
        (d / "up").symlink_to("..")
        d = d / f"level{i + 1}"
    return dst


def index_of(stor: Path, root: str) -> dict[str, object]:
    return json.loads((stor / tree_path(root)).read_bytes())


def blob(stor: Path, h: str) -> Path:
    return stor / "blobs" / h[:2] / h


@pytest.fixture
def deep(work: Path, nginx_stor: Nginx) -> Iterator[tuple[Path, str]]:
    src = deep_tree(work / "src")
    yield src, publish(src, nginx_stor.url)


def test_publish_writes_every_directory_object_in_walk_order(deep: tuple[Path, str], nginx_stor: Nginx) -> None:
    src, root = deep
    idx = index_of(nginx_stor.root, root)
    packs = decode_index(json.dumps(idx).encode(), root)
    members = [m for p in packs for m in p.members]
    assert members[0][0] == root
    for p in packs:
        data = blob(nginx_stor.root, p.hash).read_bytes()
        assert hashlib.sha256(data).hexdigest() == p.hash and len(data) == p.size
        for h, off, size in p.members:
            assert hashlib.sha256(data[off:off + size]).hexdigest() == h
            assert blob(nginx_stor.root, h).read_bytes() == data[off:off + size]  # a blob of its own too
    # every directory of the tree, depth first in name order
    order: list[str] = []

    def walk(h: str) -> None:
        order.append(h)
        for e in decode_dir(blob(nginx_stor.root, h).read_bytes(), h):
            if e.kind == "d":
                walk(e.hash)

    walk(root)
    assert [h for h, _, _ in members] == list(dict.fromkeys(order))
    assert len(order) == 2 * DEPTH  # DEPTH levels and a leaf directory in each


def blob_gets(p: ForwardProxy) -> int:
    return sum(n for (m, _, path), n in p.seen.items() if m == "GET" and path.startswith("/blobs/"))


def meta_listing(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry's kind, mode, size, mtime and symlink target: what `find` needs, no file read."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns,
                                             os.readlink(p) if p.is_symlink() else "")
    return out


def cold_walk(work: Path, name: str, nginx_stor: Nginx, proxy: ForwardProxy, src: Path,
              via: str | None = None) -> tuple[int, str]:
    """A cold daemon lists the whole tree (no file read), then reads it: (blob GETs the listing
    sent to the stor, the daemon's log). `via`: the proxy URL the daemon is given (default:
    `proxy` itself; a link in front of it for the remote case)."""
    mnt = work / f"mnt-{name}"
    text = config(work / name, [{"url": nginx_stor.url, "proxy": via or proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    proxy.seen.clear()
    with start(work, name, text, [mnt]) as d:
        assert meta_listing(mnt) == meta_listing(src)
        gets = blob_gets(proxy)
        assert tree_listing(mnt) == tree_listing(src)
        log = d.log()
        print(f"\n{name}: {gets} blob GETs to list {DEPTH * 2} directories; cache {status(work, name)['cache']}")
    return gets, log


def test_cold_walk_costs_a_few_requests_not_one_per_level(work: Path, deep: tuple[Path, str], nginx_stor: Nginx,
                                                         stor_proxy: ForwardProxy, stor_link: SlowLink) -> None:
    """Across a network (the stor behind a simulated 20 ms link): counted at the stor's side."""
    src, root = deep
    with_packs, _ = cold_walk(work, "packs", nginx_stor, stor_proxy, src, via=stor_link.url)
    # the root object, its subdirectories' pack (asked while the index comes), the tree pack
    assert with_packs <= 3
    (nginx_stor.root / tree_path(root)).unlink()  # the start file lists the packs too
    start_only, _ = cold_walk(work, "start", nginx_stor, stor_proxy, src, via=stor_link.url)
    assert start_only <= 3
    (nginx_stor.root / start_path(AYS)).unlink()  # as published by an older aysctl
    without, _ = cold_walk(work, "old", nginx_stor, stor_proxy, src, via=stor_link.url)
    assert without >= DEPTH  # one level after another
    assert stor_link.stats().bytes_down > 0  # the daemon's requests did cross the link


def test_a_cold_mount_loads_its_tree_before_the_first_lookup(work: Path, deep: tuple[Path, str],
                                                            nginx_stor: Nginx, stor_proxy: ForwardProxy) -> None:
    """A cold start fetches the version's root object and tree packs at once, beside the search
    for a startup profile (the reader right after the mount, an app start, finds them on their
    way), and no file content: the walk after it asks the stor nothing. The packs are listed by
    the start file, asked for with the ref: the tree index is not asked for."""
    src, root = deep
    mnt = work / "mnt"
    text = config(work / "n", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    stor_proxy.seen.clear()
    with start(work, "n", text, [mnt]):
        wait_for(lambda: status(work, "n")["cache"]["tree_packs"] >= 1, 15, "the tree packs, with nobody reading")
        ahead = {path for (m, _, path), _ in stor_proxy.seen.items() if m == "GET"}
        assert f"/{start_path(AYS).replace('%', '%25')}" in ahead and f"/{tree_path(root)}" not in ahead
        assert blob_gets(stor_proxy) <= 3  # root object, tree pack(s)
        stor_proxy.seen.clear()
        assert meta_listing(mnt) == meta_listing(src)
        assert blob_gets(stor_proxy) == 0


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "bad index", "hostile index"])
def test_damaged_tree_pack_falls_back_and_the_listing_is_exact(work: Path, deep: tuple[Path, str],
                                                               nginx_stor: Nginx, stor_proxy: ForwardProxy,
                                                               damage: str) -> None:
    src, root = deep
    idx = index_of(nginx_stor.root, root)
    pack = blob(nginx_stor.root, idx["packs"][0][0])  # type: ignore[index]
    data = pack.read_bytes()
    if damage == "missing":
        pack.unlink()
    elif damage == "corrupt":
        pack.write_bytes(data.replace(b'"t":"f"', b'"t":"l"', 1))
    elif damage == "truncated":
        pack.write_bytes(data[: len(data) // 2])
    elif damage == "bad index":  # and a bad start file: the index is then asked for
        (nginx_stor.root / tree_path(root)).write_bytes(b'{"aysfs":"trees","v":1,')
        (nginx_stor.root / start_path(AYS)).write_bytes(b'{"aysfs":"start","v":1,')
    else:  # an index and a start file naming foreign blobs: refused as a whole
        idx["packs"][0][2][0][1] += 1  # type: ignore[index]
        (nginx_stor.root / tree_path(root)).write_text(json.dumps(idx))
        sf = json.loads((nginx_stor.root / start_path(AYS)).read_bytes())
        sf["packs"] = idx["packs"]
        (nginx_stor.root / start_path(AYS)).write_text(json.dumps(sf))
    gets, log = cold_walk(work, "d", nginx_stor, stor_proxy, src)
    assert gets >= DEPTH  # the objects came one by one (or per level): slower, exact
    if damage in ("corrupt", "truncated"):
        assert f"corrupt blob {idx['packs'][0][0]}" in log  # type: ignore[index]
    if damage in ("bad index", "hostile index"):
        assert f"tree index of {root}" in log and f"start file for {root}" in log and "ignored" in log


def test_start_file_round_trip_and_refusals() -> None:
    a, b = "cd" * 32, "ef" * 32
    data = encode_start(H, [(H, [(a, 10), (b, 20)])], b"profile \xff bytes")
    sf = decode_start(data, H)
    assert sf.root == H and sf.profile == b"profile \xff bytes"
    assert [(p.hash, p.size, p.members) for p in sf.packs] == [(H, 30, ((a, 0, 10), (b, 10, 20)))]
    assert decode_start(encode_start(H, [], None), H) == decode_start(b'{"aysfs":"start","v":1,"root":"%s","packs":[]}'
                                                                      % H.encode(), H)
    with pytest.raises(StartFileError, match="another version"):
        decode_start(data, a)
    good = json.loads(data)
    for bad in (b"{", json.dumps({**good, "v": 2}).encode(), json.dumps({**good, "extra": 1}).encode(),
                json.dumps({**good, "profile": "not base64!"}).encode(), json.dumps({**good, "profile": 7}).encode(),
                json.dumps({**good, "packs": [[H, 31, [[a, 10], [b, 20]]]]}).encode(),
                json.dumps({**good, "packs": [[H, 10, [[H, 10]]]]}).encode()):
        with pytest.raises(StartFileError, match=f"start file for {H}"):
            decode_start(bad, H)


def test_a_start_file_of_another_version_is_ignored(work: Path, deep: tuple[Path, str], nginx_stor: Nginx,
                                                     stor_proxy: ForwardProxy) -> None:
    """A start file left by a publish under way (of the next version) is not used: the tree index
    of the version the ref names is asked for instead, and the walk is as fast and exact."""
    src, root = deep
    other = work / "other"
    (other / "d").mkdir(parents=True)
    (other / "d" / "x").write_text("another version\n")
    (other / "e").mkdir()
    other_root = aysctl("publish", str(other), "--ays", "jumpscale|other!main", "--stor", nginx_stor.url).stdout.split()[1]
    assert other_root != root
    (nginx_stor.root / start_path(AYS)).write_bytes((nginx_stor.root / start_path("jumpscale|other!main")).read_bytes())
    gets, log = cold_walk(work, "stale", nginx_stor, stor_proxy, src)
    asked = {path for (m, _, path), _ in stor_proxy.seen.items() if m == "GET"}
    assert f"/{tree_path(root)}" in asked and gets <= 3
    assert f"start file for {root}: of another version" in log


@asynccontextmanager
async def live_fetcher(cache: LocalCache, stor: Store, timeout: float) -> AsyncIterator[Fetcher]:
    """A Fetcher on `stor` alone, its background work in a nursery cancelled when the block ends."""
    f = Fetcher(cache, [], [Source(stor, "stor")], timeout=timeout)
    async with trio.open_nursery() as n:
        f.nursery = n
        yield f
        n.cancel_scope.cancel()


def test_a_pack_that_is_its_own_member_is_fetched_not_waited_for(tmp_path: Path) -> None:
    """A hostile directory object or tree index can name a pack as one of its own members;
    the pack's download must not wait for itself (it would never end: no fetch_timeout)."""
    stor = DirStore(str(tmp_path / "stor"))
    data = b"a blob that is its own pack\n"
    h = hashlib.sha256(data).hexdigest()
    stor.write(blob_path(h), data)
    other = b"another member"
    cache = LocalCache(str(tmp_path / "lmdb"), 1 << 20)
    got: list[bytes] = []

    async def main() -> None:
        async with live_fetcher(cache, stor, timeout=5) as f:
            with trio.fail_after(5):
                await f.load_packs([(h, [(h, 0, len(data)), (hashlib.sha256(other).hexdigest(), len(data), 1)])],
                                   grid=False, at_once=2)
                got.append(await f.get(h))

    try:
        trio.run(main)
    finally:
        cache.close()
    assert got == [data]


def test_loader_fetches_many_packs_a_few_at_a_time_each_member_once(tmp_path: Path) -> None:
    """More tree packs than are fetched at once (a big tree): every member delivered, each
    pack fetched once, and the loader ends (in process, a real directory stor)."""
    from aysfsd.fuse.treeload import PACKS_AT_ONCE, TreeLoader

    stor = DirStore(str(tmp_path / "stor"))
    root = hashlib.sha256(b"root").hexdigest()
    listed = []
    members = []
    for i in range(3 * PACKS_AT_ONCE + 1):
        ms = [b"member %d.%d" % (i, j) * 50 for j in range(3)]
        data = b"".join(ms)
        ph = hashlib.sha256(data).hexdigest()
        stor.write(blob_path(ph), data)
        listed.append((ph, [(hashlib.sha256(m).hexdigest(), len(m)) for m in ms]))
        members += ms
    stor.write(tree_path(root), encode_index(root, listed))
    cache = LocalCache(str(tmp_path / "lmdb"), 16 << 20)
    counts: list[int] = []

    async def main() -> None:
        async with live_fetcher(cache, stor, timeout=5) as f:
            with trio.fail_after(10):
                counts.append(await TreeLoader(f).load(root, False))
                await f.keeper.flushed()  # members are served from memory, written to LMDB behind
                counts.append(await TreeLoader(f).load(root, False))  # all cached: nothing fetched
            counts.append(f.counters.packs)
            counts.append(f.counters.pack_members)

    try:
        trio.run(main)
        for m in members:
            assert cache.get(hashlib.sha256(m).hexdigest()) == m
    finally:
        cache.close()
    assert counts == [len(listed), 0, len(listed), len(members)]


def test_a_first_lookup_during_another_waits_for_its_tree_pack_claims(work: Path) -> None:
    """Two first lookups of a version (a startup profile's player and a reader): the second,
    arriving once the root object is loaded but before the tree index came and the packs'
    members were claimed, waits for those claims too, so the directory it then lists comes in
    its tree pack, not alone (in process, a directory stor whose tree index comes after 1 s)."""
    from aysfsd.fuse.catalog import Catalog

    src = deep_tree(work / "src")
    root = publish(src, str(work / "stor"))
    level1 = next(e.hash for e in decode_dir(blob(work / "stor", root).read_bytes(), root) if e.name == "level1")
    asked: list[str] = []

    class SlowIndexStor(DirStore):
        async def fetch(self, rel: str) -> bytes | None:
            asked.append(rel)
            if rel.startswith("trees/"):
                await trio.sleep(1.0)
            return await super().fetch(rel)

    cache = LocalCache(str(work / "lmdb"), 16 << 20)
    listed: list[list[str]] = []

    async def main() -> None:
        async with live_fetcher(cache, SlowIndexStor(str(work / "stor")), timeout=10) as f:
            catalog = Catalog(f, cache)
            assert f.nursery is not None
            with trio.fail_after(10):
                f.nursery.start_soon(catalog.load_root, root)  # the first: waits for the index
                while catalog.in_memory(root) is None:
                    await trio.sleep(0.01)
                assert tree_path(root) in asked and not catalog.trees._claimed[root].is_set()
                await catalog.load_root(root)  # the second
                entries, _ = await catalog.load_dir(level1)
                listed.append(sorted(e.name for e in entries))

    try:
        trio.run(main)
    finally:
        cache.close()
    assert listed == [sorted(os.listdir(src / "level1"))]
    assert blob_path(level1) not in asked, asked  # it came in its tree pack
