"""What the kernel serves without asking the daemon, counted with the kernel's FUSE tracepoints.

With aysfs's patched pyfuse3 a session without debug mounts runs in kernel no_open mode: a
second `cat` of a file and a second listing of a directory send no request at all. On a stock
pyfuse3 (Debian's: `make test-debian`) the same tests check the fallback: OPEN per file as before.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from tests.harness import Daemon, aysctl, basic_config, sample_tree, wait_for
from tests.servers import Nginx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fusetrace  # noqa: E402

AYS = "jumpscale|kcache!main"
PATCHED = getattr(pyfuse3, "NO_OPEN_PATCH", 0) >= 1

pytestmark = pytest.mark.skipif(not fusetrace.available(), reason="no fuse tracepoints (Linux >= 6.15)")


def requests(mnt: Path, fn) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The FUSE requests (opcode -> count) of mnt's connection while fn runs."""
    out: list[fusetrace.Trace] = []
    with fusetrace.traced(out, fusetrace.connection_of(mnt)):
        fn()
    assert not out[0].lost
    return {op.removeprefix("FUSE_"): s.count for op, s in out[0].ops.items()}


def twice(mnt: Path, fn) -> tuple[dict[str, int], dict[str, int]]:  # type: ignore[no-untyped-def]
    """The requests of fn's first and second run. The machine is shared: when something drops
    the kernel's caches in between (LOOKUPs again: the dentries went), measured again (3 tries)."""
    for _ in range(3):
        first = requests(mnt, fn)
        again = requests(mnt, fn)
        if "LOOKUP" not in again:
            break
    return first, again


def cat(p: Path) -> bytes:
    return subprocess.run(["cat", str(p)], capture_output=True, check=True).stdout


@pytest.fixture
def mounted_tree(work: Path, nginx_stor: Nginx) -> Iterator[tuple[Path, Path, Daemon]]:
    src = sample_tree(work / "src")
    aysctl("publish", str(src), "--ays", AYS, "--stor", nginx_stor.url)
    mnt = work / "mnt"
    cfg = work / "aysfs.toml"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {AYS: str(mnt)}))
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        yield src, mnt, d


def test_second_cat_and_listing_send_no_request(mounted_tree: tuple[Path, Path, Daemon]) -> None:
    src, mnt, d = mounted_tree
    f = mnt / "lib" / "json" / "decoder.py"
    want = (src / "lib" / "json" / "decoder.py").read_bytes()
    first, again = twice(mnt, lambda: cat(f) == want or pytest.fail("wrong bytes"))
    names = sorted(os.listdir(src / "lib" / "json"))
    list_first, list_again = twice(mnt, lambda: sorted(os.listdir(mnt / "lib" / "json")) == names
                                   or pytest.fail("names"))
    if PATCHED:
        assert "no_open (kernel caches pages and listings" in d.log()
        # at most the connection's first OPEN (answered ENOSYS: the kernel's cue), no RELEASE
        assert first.get("OPEN", 0) <= 1 and "RELEASE" not in first
        assert first.get("READ", 0) >= 1
        assert again == {}, again  # no OPEN, READ, FLUSH, RELEASE, GETATTR: the page cache alone
        assert list_first.get("READDIRPLUS", 0) >= 1 and list_first.get("OPENDIR", 0) <= 1
        assert "RELEASEDIR" not in list_first
        assert list_again == {}, list_again
    else:  # the fallback on a stock pyfuse3: as before, an OPEN and RELEASE per open file
        assert "pyfuse3 without aysfs's patch" in d.log()
        assert again.get("OPEN") == 1 and "READ" not in again  # keep_cache
        assert list_again.get("OPENDIR") == 1


def test_dots_symlinks_and_xattrs(mounted_tree: tuple[Path, Path, Daemon]) -> None:
    src, mnt, _ = mounted_tree
    # `.` and `..` as a POSIX directory lists them
    out = subprocess.run(["ls", "-fa", str(mnt / "lib")], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(out) == sorted([".", "..", *os.listdir(src / "lib")])
    assert os.stat(mnt / "lib" / ".").st_ino == os.stat(mnt / "lib").st_ino
    assert os.stat(mnt / "lib" / "..").st_ino == os.stat(mnt).st_ino
    # no extended attributes: asked once, then the kernel answers alone
    first = requests(mnt, lambda: pytest.raises(OSError, os.listxattr, mnt / "lib" / "json"))
    again = requests(mnt, lambda: pytest.raises(OSError, os.listxattr, mnt / "lib" / "email"))
    with pytest.raises(OSError) as e:
        os.getxattr(mnt / "lib", "user.x")
    assert e.value.errno in (errno.ENODATA, errno.EOPNOTSUPP)
    assert first.get("LISTXATTR", 0) <= 1 and "LISTXATTR" not in again
    # a symlink's target: read once (patched pyfuse3 asks for FUSE_CAP_CACHE_SYMLINKS)
    link = mnt / "bin" / "json-link"
    assert (src / "bin" / "json-link").is_symlink()
    target = os.readlink(src / "bin" / "json-link")
    first, again = twice(mnt, lambda: os.readlink(link) == target or pytest.fail("target"))
    assert first.get("READLINK") == 1
    assert ("READLINK" not in again) if PATCHED else again.get("READLINK") == 1


def test_new_version_not_shadowed_by_cached_pages_or_listings(work: Path, nginx_stor: Nginx,
                                                              mounted_tree: tuple[Path, Path, Daemon]) -> None:
    src, mnt, d = mounted_tree
    f = mnt / "lib" / "json" / "decoder.py"
    old = cat(f)
    old_names = os.listdir(mnt / "lib" / "json")
    top_names = os.listdir(mnt)
    with open(f, "rb") as held:
        (src / "lib" / "json" / "decoder.py").write_bytes(b"# v2\n")
        (src / "lib" / "json" / "added.py").write_text("new\n")
        (src / "top-new").write_text("top\n")
        aysctl("publish", str(src), "--ays", AYS, "--stor", nginx_stor.url)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "top-new" in os.listdir(mnt), 10, "the new version's top listing")
        assert sorted(os.listdir(mnt)) == sorted(top_names + ["top-new"])
        assert sorted(os.listdir(mnt / "lib" / "json")) == sorted(old_names + ["added.py"])
        assert cat(f) == b"# v2\n"  # a new inode: the old version's cached pages cannot show
        assert (mnt / "lib" / "json" / "added.py").read_text() == "new\n"
        assert held.read() == old  # the open file keeps its version
