"""A reader blocked on a silent stor (accepts, never answers) that is killed returns at once:
the daemon gives its request up (aysfsd.fuse.interrupts, with aysfs's pyfuse3 interrupt patch),
cancels the download when nobody else waits for it, and answers everyone else meanwhile.

fetch_timeout is 30 s, so that "within a few seconds" means something."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from aysfsd.fuse import interrupts
from aysfsd.stores.layout import blob_path
from aysfsd.tree.packs import tree_path
from tests.harness import Daemon, aysctl, basic_config, ctl, wait_blocked, wait_for
from tests.servers import BadStor

AYS = "jumpscale|intr!main"
FETCH_TIMEOUT = 30
EXIT_BOUND = 5.0  # a killed reader has exited by then (fetch_timeout is 30 s)
CHUNK = 4 << 20

needs_patch = pytest.mark.skipif(not interrupts.available(),
                                 reason="pyfuse3 without aysfs's interrupt patch (packaging/pyfuse3/"
                                        "interrupt.patch): a killed reader's request runs to fetch_timeout")


@dataclass
class Setup:
    src: Path
    mnt: Path
    stor: BadStor
    daemon: Daemon
    sock: Path


@pytest.fixture
def silent(work: Path) -> Iterator[Setup]:
    """A tree whose root directory object is served and every other blob is silent."""
    src = work / "src"
    (src / "d").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(CHUNK + (1 << 20)))  # two chunks
    (src / "d" / "x.txt").write_bytes(b"x" * 100)
    (src / "d" / "y.txt").write_bytes(b"y" * 100)
    stor = work / "stor"
    root = aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor)).stdout.split()[1]
    (stor / tree_path(root)).unlink(missing_ok=True)  # no tree packs: one directory object at a time
    silent_paths = {str(p.relative_to(stor)) for p in (stor / "blobs").glob("*/*")} - {blob_path(root)}
    bad = BadStor(stor, mode="silent", prefixes=tuple(sorted(silent_paths))).start()
    cfg = work / "d.toml"
    # low_speed_limit off: a silent stor would be a failure after low_speed_time (10 s), and
    # the readers here must wait as long as the test needs
    cfg.write_text(basic_config(work / "d", [bad.url], {AYS: str(work / "mnt")}, extra_main="low_speed_limit = 0")
                   .replace("fetch_timeout = 10", f"fetch_timeout = {FETCH_TIMEOUT}"))
    d = Daemon(cfg, work / "d.log").start(wait_mounts=[work / "mnt"])
    try:
        assert sorted(os.listdir(work / "mnt")) == ["big.bin", "d"]  # the root object only
        yield Setup(src, work / "mnt", bad, d, work / "d" / "aysfsd.sock")
    finally:
        bad.mode = "ok"  # let held requests end
        d.stop()
        bad.stop()


def chunk_path(src: Path, i: int) -> str:
    data = (src / "big.bin").read_bytes()[i * CHUNK:(i + 1) * CHUNK]
    return blob_path(hashlib.sha256(data).hexdigest())


def status_within_a_second(s: Setup) -> dict:
    st = ctl(s.sock, {"cmd": "status"}, timeout=1.0)[-1]  # the socket's own timeout: answered within 1 s
    assert st["mounts"][0]["state"] == "up"
    return st


@contextmanager
def reaped(*procs: subprocess.Popen[bytes]) -> Iterator[None]:
    """Kills and waits for `procs` on the way out, whatever happened inside."""
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def killed_while_blocked(s: Setup, argv: list[str], sig: int, then: Callable[[], object] = lambda: None) -> int:
    """Runs `argv` (a reader of the mount) until it blocks on the silent stor, then `then()`,
    checks the daemon still answers its status, sends `sig`: the reader's exit status, which
    it must have within EXIT_BOUND.

    Blocked on the silent stor: in the kernel's wait for an answer, and one more fetch in the
    daemon waits on a download (`fetches_waiting` in its status). A request the daemon has not
    read yet is dropped by the kernel when its caller dies, with no INTERRUPT (under CI's load,
    SIGINT once came that early)."""
    def waiting() -> int:
        return int(ctl(s.sock, {"cmd": "status"}, timeout=5.0)[-1]["cache"]["fetches_waiting"])

    before = waiting()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    with reaped(p):
        wait_blocked(p)
        wait_for(lambda: waiting() > before, 10, "the daemon to wait on the stor for the reader")
        then()
        status_within_a_second(s)
        p.send_signal(sig)
        return p.wait(EXIT_BOUND)


def assert_each_blob_asked_once(s: Setup) -> None:
    blobs = {p: n for p, n in s.stor.requests.items() if p.startswith("blobs/")}
    assert blobs and max(blobs.values()) == 1, blobs


@needs_patch
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_lookup_in_an_uncached_directory_killed(silent: Setup, sig: int) -> None:
    """A LOOKUP is waited for by the kernel even after SIGKILL: the daemon must answer it."""
    s = silent
    assert killed_while_blocked(s, ["stat", str(s.mnt / "d" / "x.txt")], sig) == -sig
    assert "interrupted: answered EINTR (caller dying)" in s.daemon.log()
    # everyone else is answered: the mount's root, the status, a second look at the same name
    # (waits again, on the same download: nothing asked twice)
    assert sorted(os.listdir(s.mnt)) == ["big.bin", "d"]
    status_within_a_second(s)
    assert_each_blob_asked_once(s)
    s.stor.mode = "ok"
    assert (s.mnt / "d" / "x.txt").read_bytes() == b"x" * 100
    assert_each_blob_asked_once(s)


@needs_patch
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_cat_killed_cancels_its_download(silent: Setup, sig: int) -> None:
    """cat's READs are read-ahead: the kernel lets a killed cat go at once and never interrupts
    them; the daemon gives them up (their caller is gone) and cancels the download."""
    s = silent
    chunk0 = chunk_path(s.src, 0)
    rc = killed_while_blocked(s, ["cat", str(s.mnt / "big.bin")], sig, then=lambda: wait_for(
        lambda: s.stor.requests[chunk0] == 1, 10, "the stor to be asked for the first chunk"))
    assert rc == -sig
    h = chunk0.rsplit("/", 1)[1]
    wait_for(lambda: f"blob {h}: fetch cancelled (no reader waits for it anymore)" in s.daemon.log(), 5,
             "the download of the first chunk to be cancelled")
    assert "requests given up: their callers are dying or gone" in s.daemon.log()
    status_within_a_second(s)
    assert s.stor.requests[chunk0] == 1
    # read again once the stor answers: right bytes, the chunk asked for a second time only
    s.stor.mode = "ok"
    assert (s.mnt / "big.bin").read_bytes() == (s.src / "big.bin").read_bytes()
    assert s.stor.requests[chunk0] == 2


@needs_patch
def test_second_reader_of_the_same_blob_is_not_disturbed(silent: Setup) -> None:
    """Two readers wait on one download (different pages of the same chunk); the first is
    killed, the second goes on waiting and gets its bytes when the stor answers: the chunk
    was asked for once."""
    s = silent
    chunk0 = chunk_path(s.src, 0)
    first = subprocess.Popen(["cat", str(s.mnt / "big.bin")], stdout=subprocess.DEVNULL)
    out = s.mnt.parent / "second.out"
    skip = 3 << 20  # within the first chunk, beyond the first reader's read-ahead window
    second = subprocess.Popen(["dd", f"if={s.mnt / 'big.bin'}", f"of={out}", "bs=64K", f"skip={skip >> 16}",
                               "count=4", "status=none"])
    with reaped(first, second):
        wait_blocked(first)
        wait_blocked(second)
        first.send_signal(signal.SIGKILL)
        assert first.wait(EXIT_BOUND) == -signal.SIGKILL
        # the first reader's requests are given up within a sweep or two; the second still waits
        # (bounded well below fetch_timeout, loose enough for a loaded machine: it failed once at 5 s)
        wait_for(lambda: "requests given up: their callers are dying or gone" in s.daemon.log(), 2 * EXIT_BOUND,
                 "the killed reader's requests to be given up")
        time.sleep(2 * interrupts.POLL_SECONDS)  # a sweep after: the second reader is alive
        assert second.poll() is None
        assert "fetch cancelled" not in s.daemon.log()
        status_within_a_second(s)
        s.stor.mode = "ok"
        assert second.wait(EXIT_BOUND) == 0
    assert out.read_bytes() == (s.src / "big.bin").read_bytes()[skip:skip + (256 << 10)]
    assert s.stor.requests[chunk0] == 1


def test_caller_state_of_live_dying_and_gone_threads() -> None:
    """/proc tells a dying thread (SIGKILL pending) from a live one; a thread that is no more
    is gone; tid 0 (not in our pid namespace) is unknown."""
    assert interrupts.caller_state(os.getpid()) == "alive"
    assert interrupts.caller_state(0) == "unknown"
    p = subprocess.Popen(["sleep", "30"])
    assert interrupts.caller_state(p.pid) == "alive"
    p.kill()
    p.wait()
    assert interrupts.caller_state(p.pid) == "gone"


def test_sweep_gives_up_only_dying_or_gone_callers() -> None:
    """What the daemon's sweep cancels, with pyfuse3's list of requests in progress faked
    (the end-to-end tests above run it for real)."""
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    cancelled: list[str] = []
    reqs = [(live.pid, lambda: cancelled.append("live")), (dead.pid, lambda: cancelled.append("dead")),
            (0, lambda: cancelled.append("unknown"))]
    w = interrupts.CallerWatch(lambda: reqs)
    try:
        assert w.sweep() == 1 and cancelled == ["dead"]
        assert w.on_interrupt(live.pid) is False  # a signal it handles: goes on
        assert w.on_interrupt(dead.pid) is True
        assert w.given_up == 2 and w.interrupted == 2
    finally:
        live.kill()
        live.wait()


HANDLED_SIGNAL_READER = """
import ctypes, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: None)
libc = ctypes.CDLL(None, use_errno=True)  # open(2) itself: Python would retry an EINTR
fd = libc.open(sys.argv[1].encode(), os.O_RDONLY)
print(fd, ctypes.get_errno(), os.read(fd, 100).decode() if fd >= 0 else "", flush=True)
"""


@needs_patch
def test_a_signal_the_reader_handles_does_not_interrupt_its_lookup(silent: Setup) -> None:
    """Go's SIGURG, SIGCHLD...: the kernel interrupts the request, the daemon lets it go on
    (open(2) of a regular file must not fail with EINTR), and it ends with the right bytes."""
    s = silent
    p = subprocess.Popen([sys.executable, "-c", HANDLED_SIGNAL_READER, str(s.mnt / "d" / "y.txt")],
                         stdout=subprocess.PIPE)
    with reaped(p):
        wait_blocked(p)
        for _ in range(3):
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
        wait_for(lambda: "interrupted by a signal it handles: goes on" in s.daemon.log(), 5,
                 "the daemon to see the INTERRUPT")
        time.sleep(2 * interrupts.POLL_SECONDS)  # and a sweep or two: not given up
        assert p.poll() is None
        s.stor.mode = "ok"
        out, _ = p.communicate(timeout=EXIT_BOUND)
    fd, err, text = out.decode().split()
    assert int(fd) >= 0 and int(err) == 0 and text == "y" * 100
    assert_each_blob_asked_once(s)
