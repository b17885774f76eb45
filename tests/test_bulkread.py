"""The bulk-read window (aysfsd.fuse.bulkread) through the real daemon, nginx and a counting proxy:
a reader going through a tree's files in order has the next directories' packs asked for
before it gets there, up to WINDOW_BYTES ahead of it, also through a long chain of small
directories; a listing, or reads out of order (an import), ask for nothing more; a sequential
reader of a chunked file has READAHEAD_CHUNKS chunks asked for ahead of it, no more."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

from aysfsd.fuse.bulkread import CREDIT, RUN, WINDOW_BYTES
from aysfsd.fuse.content import READAHEAD_CHUNKS
from aysfsd.tree.objects import CHUNK_SIZE, KIND_DIR, KIND_FILE, decode_dir
from bench.slowlink import SlowLink
from tests.harness import AYS, config, publish, start, status, stor_roots
from tests.servers import ForwardProxy, Nginx
from tests.test_treepacks import meta_listing

DIRS = 12
FILES = 12


def blob(stor: Path, h: str) -> bytes:
    return (stor / "blobs" / h[:2] / h).read_bytes()


def make_tree(dst: Path, big: int = 200_000) -> Path:
    """DIRS directories of FILES small files (one pack each) and a file too big for a pack (`big` bytes)."""
    rnd = random.Random(7)
    for d in range(DIRS):
        for f in range(FILES):
            p = dst / f"d{d:02d}" / f"f{f:02d}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(6000))
        (dst / f"d{d:02d}" / "z-big.bin").write_bytes(rnd.randbytes(big))
    return dst


def dir_packs(stor: Path) -> dict[str, set[str]]:
    """Directory name -> the blobs reading its files fetches: its pack, its big file."""
    root = next(iter(stor_roots(stor)))
    out = {}
    for e in decode_dir(blob(stor, root), root):
        out[e.name] = {x.pack or x.hash for x in decode_dir(blob(stor, e.hash), e.hash)}
    return out


def gets(p: ForwardProxy) -> list[str]:
    """Every GET's path, as often as it was sent."""
    return [path for (m, _, path), n in p.seen.items() for _ in range(n) if m == "GET"]


def pack_gets(p: ForwardProxy, packs: set[str]) -> set[str]:
    return {path.rsplit("/", 1)[1] for (m, _, path) in p.seen if m == "GET"} & packs


def wait_gets(p: ForwardProxy, packs: set[str], timeout: float = 10.0) -> set[str]:
    """The packs asked for, once all of `packs` were or `timeout` passed (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not packs <= pack_gets(p, packs):
        time.sleep(0.02)
    return pack_gets(p, packs)


def test_a_bulk_reader_keeps_the_next_directories_in_flight(work: Path, nginx_stor: Nginx,
                                                            stor_proxy: ForwardProxy, stor_link: SlowLink) -> None:
    """Across a network (the stor behind a simulated 20 ms link), where being in flight at once
    is what keeps the link busy: the counting proxy sees the requests overlap."""
    big = 2_000_000  # so that WINDOW_BYTES holds a few directories, not all
    src = make_tree(work / "src", big)
    publish(src, nginx_stor.url)
    packs = dir_packs(nginx_stor.root)
    assert all(len(v) == 2 for v in packs.values())
    everything = set().union(*packs.values())
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_link.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        assert meta_listing(mnt) == meta_listing(src)
        assert not pack_gets(stor_proxy, everything)  # a listing reads no file: no pack
        stor_proxy.max_active = 0
        names = sorted(p.name for p in (src / "d00").iterdir())
        for n in names[:RUN]:  # a reader going through d00 in order
            assert (mnt / "d00" / n).read_bytes() == (src / "d00" / n).read_bytes()
        # its big file, then whole directories until WINDOW_BYTES are asked for ahead of it
        per_dir = sum(len(blob(nginx_stor.root, h)) for h in packs["d01"])
        k = next(k for k in range(1, DIRS) if big + k * per_dir >= WINDOW_BYTES)
        ahead = {d: packs[d] for d in (f"d{i:02d}" for i in range(1, 1 + k))}
        ahead["d00"] = packs["d00"]
        got = wait_gets(stor_proxy, set().union(*ahead.values()))
        # more than one directory in flight before the reader enters any of them; not all
        assert got == set().union(*ahead.values()) and k > 1 and 1 + k < DIRS
        # a directory is two blobs (its pack, its big file): three requests at once are more
        # than one directory in flight
        assert stor_proxy.max_active >= 3, stor_proxy.max_active
        assert not pack_gets(stor_proxy, packs[f"d{1 + k:02d}"])
        # going on through the tree: every pack is asked for once, and by the time the reader
        # gets to a directory its pack was asked for already (the window moved along)
        for d in sorted(packs):
            assert packs[d] <= wait_gets(stor_proxy, packs[d]), d  # asked for before any read in d
            for n in names:
                assert (mnt / d / n).read_bytes() == (src / d / n).read_bytes()
        assert pack_gets(stor_proxy, everything) == everything
        assert len(gets(stor_proxy)) == len(set(gets(stor_proxy)))  # nothing twice
        print(f"\nbulk read: {len(gets(stor_proxy))} GETs for {DIRS} directories of {FILES + 1} files; "
              f"{status(work, 'd')['cache']['packs']} packs; at most {stor_proxy.max_active} in flight at once")


def test_the_window_follows_a_bulk_reader_through_many_small_directories(work: Path, nginx_stor: Nginx,
                                                                         stor_proxy: ForwardProxy) -> None:
    """tar through a test suite's data: many directories of a file or two, one pack each.
    Each is asked for before the reader enters it (far more of them than CREDIT: every
    directory the walk planned moves it on, however small)."""
    rnd = random.Random(11)
    src = work / "src"
    for f in range(FILES):  # a directory of ordinary size starts the walk
        p = src / "a" / f"f{f:02d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(3000))
    small = [f"s{i:02d}" for i in range(3 * CREDIT)]
    for d in small:
        for f in range(2):
            p = src / "a" / "data" / d / f"x{f}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(500))
    publish(src, nginx_stor.url)
    root = next(iter(stor_roots(nginx_stor.root)))
    a = next(e for e in decode_dir(blob(nginx_stor.root, root), root) if e.name == "a")
    data = next(e for e in decode_dir(blob(nginx_stor.root, a.hash), a.hash) if e.name == "data")
    pack_of = {e.name: {x.pack for x in decode_dir(blob(nginx_stor.root, e.hash), e.hash)}
               for e in decode_dir(blob(nginx_stor.root, data.hash), data.hash)}
    assert all(len(v) == 1 and "" not in v for v in pack_of.values())
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        for f in range(FILES):
            assert (mnt / "a" / f"f{f:02d}.txt").read_bytes() == (src / "a" / f"f{f:02d}.txt").read_bytes()
        for d in small:
            assert pack_of[d] <= wait_gets(stor_proxy, pack_of[d]), d  # asked for before any read in d
            for f in range(2):
                rel = Path("a", "data", d, f"x{f}.txt")
                assert (mnt / rel).read_bytes() == (src / rel).read_bytes()
        everything = set().union(*pack_of.values())
        assert pack_gets(stor_proxy, everything) == everything
        assert len(gets(stor_proxy)) == len(set(gets(stor_proxy)))  # nothing twice


def test_listing_and_reads_out_of_order_fetch_no_other_directory(work: Path, nginx_stor: Nginx,
                                                                 stor_proxy: ForwardProxy) -> None:
    src = make_tree(work / "src")
    publish(src, nginx_stor.url)
    packs = dir_packs(nginx_stor.root)
    everything = set().union(*packs.values())
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        assert meta_listing(mnt) == meta_listing(src)
        # as an import reads a package: some files, out of name order, in a few directories
        for d in ("d03", "d07"):
            for n in ("f05.txt", "f01.txt", "f09.txt", "f02.txt", "f03.txt", "f11.txt"):
                assert (mnt / d / n).read_bytes() == (src / d / n).read_bytes()
        # every file of a directory in order, but one skipped: not a bulk walk either
        for n in ("f00.txt", "f01.txt", "f03.txt", "f04.txt", "f06.txt", "f07.txt"):
            assert (mnt / "d05" / n).read_bytes() == (src / "d05" / n).read_bytes()
        time.sleep(0.5)  # anything the window would have asked for would be on its way
        bigs = {hashlib.sha256((src / d / "z-big.bin").read_bytes()).hexdigest() for d in packs}
        read = (packs["d03"] | packs["d07"] | packs["d05"]) - bigs
        assert pack_gets(stor_proxy, everything) == read
        st = status(work, "d")
        stor_bytes = st["mounts"][0]["bytes_by_tier"]["stor"]
        assert stor_bytes == sum(len(blob(nginx_stor.root, h)) for h in read)  # the three packs, nothing else


def dir_packs_at(stor: Path, *path: str) -> dict[str, str]:
    """Directory name -> its one file pack, for the directories at `path` (from the root) that hold files."""
    h = next(iter(stor_roots(stor)))
    for name in path:
        h = next(e.hash for e in decode_dir(blob(stor, h), h) if e.name == name)
    out = {}
    for e in decode_dir(blob(stor, h), h):
        if e.kind == KIND_DIR:
            packs = {x.pack for x in decode_dir(blob(stor, e.hash), e.hash) if x.kind == KIND_FILE}
            if packs:  # (a directory of directories has none)
                assert len(packs) == 1 and "" not in packs, (e.name, packs)
                out[e.name] = packs.pop()
    return out


def test_a_small_package_read_whole_is_not_a_bulk_walk_two_in_a_row_are(work: Path, nginx_stor: Nginx,
                                                                       stor_proxy: ForwardProxy) -> None:
    """An import reads a small package whole, in name order (tomllib: four modules): alone,
    that starts no walk (`make bench`'s app start had fetched ~1.1 MB of the directories after
    tomllib). A reader going through two small directories whole, one straight after the
    other, is a bulk reader: the directories after them are asked for before it enters them."""
    rnd = random.Random(13)
    src = work / "src"
    layout = {"pkg": RUN, "big": 3 * RUN, **{f"t/s{i}": 2 for i in range(6)}}
    for d, n in layout.items():
        for f in range(n):
            p = src / d / f"m{f}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(700))
    publish(src, nginx_stor.url)
    top = dir_packs_at(nginx_stor.root)
    small = dir_packs_at(nginx_stor.root, "t")
    everything = {*top.values(), *small.values()}
    mnt = work / "mnt"

    def read(d: str, names: list[str]) -> None:
        for n in names:
            assert (mnt / d / n).read_bytes() == (src / d / n).read_bytes()

    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        read("big", ["m5.py"])  # a module of a bigger package
        read("pkg", [f"m{f}.py" for f in range(RUN)])  # a small package, whole, in name order
        read("big", ["m2.py"])
        read("t/s0", ["m0.py", "m1.py"])  # another one, whole, but not straight after the first
        time.sleep(0.5)  # anything a walk would have asked for would be on its way
        assert pack_gets(stor_proxy, everything) == {top["big"], top["pkg"], small["s0"]}
        read("t/s1", ["m0.py", "m1.py"])  # straight after s0, whole: a bulk reader
        later = {small[f"s{i}"] for i in range(2, 6)}
        assert later <= wait_gets(stor_proxy, later)  # asked for before the reader enters them
        for i in range(2, 6):
            read(f"t/s{i}", ["m0.py", "m1.py"])
        assert pack_gets(stor_proxy, everything) == everything
        assert len(gets(stor_proxy)) == len(set(gets(stor_proxy)))  # nothing twice


def test_a_sequential_reader_has_readahead_chunks_asked_for_ahead_not_more(work: Path, nginx_stor: Nginx,
                                                                           stor_proxy: ForwardProxy) -> None:
    """A chunked file read from its start: READAHEAD_CHUNKS chunks are asked for ahead of the
    reader (memory bounded in bytes), each chunk once, and the bytes are right."""
    n = READAHEAD_CHUNKS + 3
    src = work / "src"
    src.mkdir()
    content = random.Random(5).randbytes(n * CHUNK_SIZE - 1000)
    (src / "big.bin").write_bytes(content)
    publish(src, nginx_stor.url)
    root = next(iter(stor_roots(nginx_stor.root)))
    e = next(e for e in decode_dir(blob(nginx_stor.root, root), root) if e.name == "big.bin")
    chunks = [h for h, _ in e.blobs()]
    assert len(chunks) == n == len(set(chunks))
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]), open(mnt / "big.bin", "rb") as f:
        assert f.read(1 << 20) == content[:1 << 20]
        first = set(chunks[:1 + READAHEAD_CHUNKS])
        assert wait_gets(stor_proxy, first) == first
        time.sleep(0.5)  # anything more would be on its way
        assert pack_gets(stor_proxy, set(chunks)) == first
        assert f.read() == content[1 << 20:]
        assert pack_gets(stor_proxy, set(chunks)) == set(chunks)
        got = [g for g in gets(stor_proxy) if g.rsplit("/", 1)[1] in chunks]
        assert len(got) == n  # each chunk once
