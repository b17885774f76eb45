"""pyfuse3's request loop with aysfs's loop.patch (packaging/pyfuse3/): the worker that read a
request reads the next one itself when the handler answered without waiting, and gives the
/dev/fuse lock up only to a handler that waits. So: handlers that wait (uncached reads on a
silent stor) must not stop the others (requests answered from the local cache or memory), and
those that waited must finish once the stor answers, while others keep coming.

Counts, not times: how many requests were answered, which bytes."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aysfsd.fuse import lib as fuselib
from aysfsd.stores.layout import blob_path
from aysfsd.tree.packs import tree_path
from tests.harness import Daemon, aysctl, basic_config, ctl, fuse_fd_flags, wait_blocked, wait_for
from tests.servers import BadStor

AYS = "jumpscale|loop!main"
SLOW = 8  # uncached readers, each waiting on a blob of its own
FAST = 40  # small files, in one pack: cached once the first is read
BIG = 200 * 1024  # over the pack limit: one blob each
STREAM = r"""
import os, sys
root, n, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ok = 0
for i in range(1, n):
    with open(os.path.join(root, "fast", f"f{i:02d}"), "rb") as f:
        if f.read() == bytes([i]) * (100 + i):
            ok += 1
for i in range(200):  # negative lookups: answered from memory, one request each
    try:
        os.stat(os.path.join(root, "fast", f"nope{i}"))
    except FileNotFoundError:
        ok += 1
print(ok, flush=True)
# then a steady stream of requests, while the slow readers' handlers finish
i = 0
while not os.path.exists(stop) and i < 20000:
    try:
        os.stat(os.path.join(root, "fast", f"gone{i}"))
    except FileNotFoundError:
        pass
    i += 1
print(i, flush=True)
"""


@dataclass
class Setup:
    src: Path
    mnt: Path
    stor: BadStor
    daemon: Daemon


def content(i: int) -> bytes:
    return bytes([i]) * 97 + os.urandom(BIG - 97)


@pytest.fixture
def setup(work: Path) -> Iterator[Setup]:
    src = work / "src"
    (src / "slow").mkdir(parents=True)
    (src / "fast").mkdir()
    for i in range(SLOW):
        (src / "slow" / f"s{i}").write_bytes(content(i))
    for i in range(FAST):
        (src / "fast" / f"f{i:02d}").write_bytes(bytes([i]) * (100 + i))
    stor = work / "stor"
    root = aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor)).stdout.split()[1]
    (stor / tree_path(root)).unlink(missing_ok=True)  # directory objects and packs one at a time
    silent = tuple(sorted(blob_path(hashlib.sha256((src / "slow" / f"s{i}").read_bytes()).hexdigest())
                          for i in range(SLOW)))
    bad = BadStor(stor, mode="silent", prefixes=silent).start()
    cfg = work / "d.toml"
    cfg.write_text(basic_config(work / "d", [bad.url], {AYS: str(work / "mnt")}, extra_main="low_speed_limit = 0")
                   .replace("fetch_timeout = 10", "fetch_timeout = 60"))
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[work / "mnt"])
    try:
        yield Setup(src, work / "mnt", bad, d)
    finally:
        bad.mode = "ok"
        d.stop()
        bad.stop()


def test_cached_requests_answered_while_handlers_wait(setup: Setup, work: Path) -> None:
    s = setup
    assert (s.mnt / "fast" / "f00").read_bytes() == bytes([0]) * 100  # the pack: f01..f39 now cached
    assert sorted(os.listdir(s.mnt / "slow")) == [f"s{i}" for i in range(SLOW)]
    readers = [subprocess.Popen([sys.executable, "-c", "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())",
                                 str(s.mnt / "slow" / f"s{i}")], stdout=subprocess.PIPE) for i in range(SLOW)]
    stop = work / "stop"
    stream: subprocess.Popen[str] | None = None
    try:
        # every slow blob asked for: eight handlers wait on a silent stor
        wait_for(lambda: sum(1 for p in s.stor.requests if p in s.stor.prefixes) == SLOW, 20,
                 f"{SLOW} blob requests at the stor")
        for p in readers:
            wait_blocked(p)
        stream = subprocess.Popen([sys.executable, "-c", STREAM, str(s.mnt), str(FAST), str(stop)],
                                  stdout=subprocess.PIPE, text=True)
        assert stream.stdout is not None
        ready, _, _ = select.select([stream.stdout], [], [], 60)  # bounded: a starved loop never answers
        answered = int(stream.stdout.readline() or "0") if ready else 0
        assert answered == (FAST - 1) + 200  # every cached read and lookup, right bytes
        assert [p.poll() for p in readers] == [None] * SLOW  # ...while all eight still waited
        s.stor.mode = "ok"  # the stor answers while the stream goes on
        outs = [p.communicate(timeout=60)[0] for p in readers]
        assert [o == content_of(s.src, i) for i, o in enumerate(outs)] == [True] * SLOW
        stop.write_text("")
        assert int(stream.communicate(timeout=60)[0].strip() or "0") > 0
    finally:
        stop.write_text("")
        procs: list[subprocess.Popen[Any]] = [*readers, *([stream] if stream else [])]
        for p in procs:
            p.kill()
            p.wait()
    st = ctl(work / "d" / "aysfsd.sock", {"cmd": "status"})[-1]
    assert st["daemon"]["pyfuse3"]["loop"] is fuselib.fast_loop()
    assert "Traceback" not in s.daemon.log()


def content_of(src: Path, i: int) -> bytes:
    return (src / "slow" / f"s{i}").read_bytes()


def test_the_loop_reads_a_nonblocking_device_only_with_the_patch(setup: Setup) -> None:
    """The patched loop reads /dev/fuse non-blocking (EAGAIN, then wait); the stock one waits
    for readability and reads a blocking descriptor: the flag tells which loop runs."""
    assert setup.daemon.proc is not None
    flags = fuse_fd_flags(setup.daemon.proc.pid)
    assert bool(flags & os.O_NONBLOCK) is fuselib.fast_loop(), oct(flags)
    assert (setup.mnt / "fast" / "f01").read_bytes() == bytes([1]) * 101


@pytest.mark.parametrize("loop", [True, False], ids=["loop-patch", "stock-loop"])
def test_resume_leaves_the_device_blocking_for_a_stock_loop(loop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The device's open file (and its O_NONBLOCK) is shared with the process that handed it
    over: a successor on a stock pyfuse3 gets it blocking back (its loop takes EAGAIN for a
    fatal error); the patched loop sets the flag itself after INIT, so it is left alone."""
    import pyfuse3

    from aysfsd.fuse import handover

    if loop:
        monkeypatch.setattr(pyfuse3, "AYSFS_LOOP", 1, raising=False)
    else:
        monkeypatch.delattr(pyfuse3, "AYSFS_LOOP", raising=False)
    dev = os.open("/dev/fuse", os.O_RDWR | os.O_NONBLOCK)  # as a predecessor with loop.patch left it
    r = handover.Resume(dev)
    fd = r._libfuse.fileno()
    try:
        r.finish()
        assert handover.is_fuse_device(fd)
        assert os.get_blocking(fd) is not loop
        assert os.get_blocking(dev) is not loop  # one open file: the flag is shared
    finally:
        os.close(fd)
        os.close(dev)


LOOKUPS = r"""
import os, sys, time
root, prefix, n, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
for i in range(n):  # a name never looked up before: one LOOKUP each, answered from memory
    try:
        os.stat(os.path.join(root, f"{prefix}{i}"))
    except FileNotFoundError:
        pass
    if gap:
        time.sleep(gap)
"""


def lookups(mnt: Path, prefix: str, n: int, gap: float) -> None:
    subprocess.run([sys.executable, "-c", LOOKUPS, str(mnt), prefix, str(n), str(gap)], check=True, timeout=120)


@pytest.mark.skipif(fuselib.spin() is None, reason="pyfuse3 without loop.patch's spin")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spin stays off with one CPU")
def test_the_loop_spins_for_close_requests_not_for_sparse_ones_and_a_reload_turns_it_off(work: Path) -> None:
    """With fuse_spin_us set, a reader sending requests back to back has them caught by the
    spin (counted by the patched pyfuse3); a reader sending one every 5 ms costs at most a
    fruitless spin or two (the spin is adaptive), not one per request; after a reload with
    fuse_spin_us = 0 no spin runs at all."""
    src = work / "src"
    src.mkdir()
    (src / "f").write_bytes(b"spin\n")
    stor = work / "stor"
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor))
    cfg = work / "d.toml"
    text = basic_config(work / "d", [str(stor)], {AYS: str(work / "mnt")}, extra_main="fuse_spin_us = 1000")
    cfg.write_text(text)
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[work / "mnt"])
    sock = work / "d" / "aysfsd.sock"

    def spins() -> tuple[int, int]:
        info = ctl(sock, {"cmd": "status"})[-1]["daemon"]["pyfuse3"]
        return info["spins"]["caught"], info["spins"]["missed"]

    try:
        assert (work / "mnt" / "f").read_bytes() == b"spin\n"
        assert ctl(sock, {"cmd": "status"})[-1]["daemon"]["pyfuse3"]["spin_us"] == 1000
        c0, m0 = spins()
        lookups(work / "mnt", "close", 1000, 0)
        c1, m1 = spins()
        assert c1 - c0 >= 500, (c0, m0, c1, m1)  # most of the 1,000 LOOKUPs were caught spinning
        lookups(work / "mnt", "sparse", 100, 0.005)
        c2, m2 = spins()
        assert m2 - m1 <= 5, (c1, m1, c2, m2)  # not one fruitless spin per request
        assert c2 - c1 <= 5, (c1, m1, c2, m2)

        cfg.write_text(text.replace("fuse_spin_us = 1000", "fuse_spin_us = 0"))
        assert ctl(sock, {"cmd": "reload"})[-1] == {"ok": True}
        assert ctl(sock, {"cmd": "status"})[-1]["daemon"]["pyfuse3"]["spin_us"] == 0
        lookups(work / "mnt", "off", 1000, 0)
        assert spins() == (c2, m2)
        assert "Traceback" not in d.log()
    finally:
        d.stop()
