"""The bulk-read window (aysfsd.bulkread) through the real daemon, nginx and a counting proxy:
a reader going through a tree's files in order has the next directories' packs asked for
before it gets there; a listing, or reads out of order (an import), ask for nothing more."""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

from aysfsd.bulkread import RUN, WINDOW_DIRS
from aysfsd.tree import decode_dir
from tests.harness import stor_roots
from tests.servers import Nginx
from tests.test_tiers import AYS, ForwardProxy, config, publish, start, status
from tests.test_treepacks import meta_listing

DIRS = 12
FILES = 12


def blob(stor: Path, h: str) -> bytes:
    return (stor / "blobs" / h[:2] / h).read_bytes()


def make_tree(dst: Path) -> Path:
    """DIRS directories of FILES small files (one pack each) and a file too big for a pack."""
    rnd = random.Random(7)
    for d in range(DIRS):
        for f in range(FILES):
            p = dst / f"d{d:02d}" / f"f{f:02d}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(rnd.randbytes(6000))
        (dst / f"d{d:02d}" / "z-big.bin").write_bytes(rnd.randbytes(200_000))
    return dst


def dir_packs(stor: Path) -> dict[str, set[str]]:
    """Directory name -> the blobs reading its files fetches: its pack, its big file."""
    root = next(iter(stor_roots(stor)))
    out = {}
    for e in decode_dir(blob(stor, root), root):
        out[e.name] = {x.pack or x.hash for x in decode_dir(blob(stor, e.hash), e.hash)}
    return out


def pack_gets(p: ForwardProxy, packs: set[str]) -> set[str]:
    return {path.rsplit("/", 1)[1] for (m, _, path) in p.seen if m == "GET"} & packs


def wait_gets(p: ForwardProxy, packs: set[str], timeout: float = 10.0) -> set[str]:
    """The packs asked for, once all of `packs` were or `timeout` passed (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not packs <= pack_gets(p, packs):
        time.sleep(0.02)
    return pack_gets(p, packs)


def test_a_bulk_reader_keeps_the_next_directories_in_flight(work: Path, nginx_stor: Nginx,
                                                            stor_proxy: ForwardProxy) -> None:
    src = make_tree(work / "src")
    publish(src, nginx_stor.url)
    packs = dir_packs(nginx_stor.root)
    assert all(len(v) == 2 for v in packs.values())
    everything = set().union(*packs.values())
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        assert meta_listing(mnt) == meta_listing(src)
        assert not pack_gets(stor_proxy, everything)  # a listing reads no file: no pack
        names = sorted(p.name for p in (src / "d00").iterdir())
        for n in names[:RUN]:  # a reader going through d00 in order
            assert (mnt / "d00" / n).read_bytes() == (src / "d00" / n).read_bytes()
        ahead = {d: packs[d] for d in (f"d{i:02d}" for i in range(1, 1 + WINDOW_DIRS))}
        ahead["d00"] = packs["d00"]  # its big file too
        got = wait_gets(stor_proxy, set().union(*ahead.values()))
        # more than one directory in flight before the reader enters any of them; not all
        assert got == set().union(*ahead.values()) and len(ahead) > 1
        assert not pack_gets(stor_proxy, packs[f"d{1 + WINDOW_DIRS:02d}"])
        # going on through the tree: every pack is asked for once, and by the time the reader
        # gets to a directory its pack was asked for already (the window moved along)
        for d in sorted(packs):
            assert packs[d] <= wait_gets(stor_proxy, packs[d]), d  # asked for before any read in d
            for n in names:
                assert (mnt / d / n).read_bytes() == (src / d / n).read_bytes()
        assert pack_gets(stor_proxy, everything) == everything
        gets = [path for (m, _, path), n in stor_proxy.seen.items() for _ in range(n) if m == "GET"]
        assert len(gets) == len(set(gets))  # nothing twice
        print(f"\nbulk read: {len(gets)} GETs for {DIRS} directories of {FILES + 1} files; "
              f"{status(work, 'd')['cache']['packs']} packs")


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
