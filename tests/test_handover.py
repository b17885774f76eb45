"""Restart without unmounting: the next daemon process resumes the same FUSE connection
(aysfsd.fuse.handover), so readers see a pause, never ENOENT, ENOTCONN or EIO, and inode numbers
and open files stay valid. `aysctl restart` re-executes the daemon; a killed daemon is resumed
from descriptors someone kept (systemd's fd store in production; this test takes them itself)."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyfuse3
import pytest

from aysfsd.fuse import lib as fuselib
from tests.harness import BIN, Daemon, aysctl, basic_config, fuse_fd_flags, mounted, sample_tree, wait_for
from tests.servers import Nginx

AYS = "jumpscale|handover!main"
PLAIN_READDIR = getattr(pyfuse3, "READDIR_PLAIN_PATCH", 0) >= 1
SYS_pidfd_getfd = 438

READER = r"""
import os, sys, time
root, stop = sys.argv[1], sys.argv[2]
ok = errors = 0
last = ""
deadline = time.monotonic() + 120
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        names = os.listdir(root)
        assert "which.txt" in names, names
        with open(os.path.join(root, "which.txt")) as f:
            assert f.read().startswith("jumpscale|handover"), "content"
        os.stat(os.path.join(root, "lib", "json", "decoder.py"))
        ok += 1
    except Exception as e:
        errors += 1
        last = repr(e)
    time.sleep(0.02)
print(ok, errors, last)
"""


def _take_fd(pid: int, fd: int) -> int:
    """A duplicate of another process's descriptor (the same open file, like systemd's fd store)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        if got < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(got)
    finally:
        os.close(pidfd)


def _fds_of(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if link == "/dev/fuse":
            out.setdefault("aysfs-fuse", int(n))
        elif link.startswith("/memfd:aysfs-state"):
            out.setdefault("aysfs-state", int(n))
    return out


class _Held:
    """What a process holds across a restart: data/big.bin open with only its first 4 KiB read
    and, with `pin`, three paths kept open (the kernel cannot forget them; drop_caches elsewhere
    would) with their inode numbers."""

    def __init__(self, mnt: Path, published: Path, pin: bool = True) -> None:
        self.mnt = mnt
        self.big = mnt / "data" / "big.bin"
        self.want = (published / "data" / "big.bin").read_bytes()
        self.f = open(self.big, "rb")
        assert self.f.read(4096) == self.want[:4096]
        paths = ("which.txt", "lib/json", "lib/json/decoder.py") if pin else ()
        self.pinned = {p: os.open(mnt / p, os.O_RDONLY) for p in paths}
        self.inos = {p: os.fstat(fd).st_ino for p, fd in self.pinned.items()}

    def check(self) -> None:
        """The open file goes on reading, including chunks never fetched before the restart, and
        the pinned paths keep their inode numbers; closes all of it."""
        self.f.seek(4096)
        rest = self.f.read()
        self.f.close()
        assert hashlib.sha256(self.want[4096:]).digest() == hashlib.sha256(rest).digest()
        assert {p: os.stat(self.mnt / p).st_ino for p in self.inos} == self.inos
        for fd in self.pinned.values():
            os.close(fd)


class _Successor:
    """The next daemon, started on the descriptors of one the test SIGKILLs (Daemon.kill) and
    keeps meanwhile (what systemd does with FileDescriptorStoreMax= and Restart=on-failure)."""

    def __init__(self, work: Path, d: Daemon) -> None:
        self.work = work
        self.d = d
        self.kept: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / "d2.log"

    def __enter__(self) -> _Successor:
        return self

    def __exit__(self, *a: object) -> None:
        self._close_kept()
        self.d.stop()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)

    def take(self) -> dict[str, int]:
        """Duplicates of the first daemon's /dev/fuse and state descriptors, by name."""
        assert self.d.proc is not None
        pid = self.d.proc.pid
        self.kept = {name: _take_fd(pid, fd) for name, fd in _fds_of(pid).items()}
        return self.kept

    def resume(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """aysfsd on the same config, handed the kept descriptors (AYSFS_HANDOVER_FDS)."""
        for fd in self.kept.values():
            os.set_inheritable(fd, True)
        fds = ",".join(f"{k}={v}" for k, v in self.kept.items())
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "aysfsd"), "--config", str(self.work / "aysfs.toml"), "--log-level", "debug"],
            stdout=logf, stderr=subprocess.STDOUT, pass_fds=list(self.kept.values()),
            env=dict(os.environ, **(env or {}), AYSFS_HANDOVER_FDS=fds))
        logf.close()
        self._close_kept()
        return self.proc

    def wait_ready(self, timeout: float = 20, or_exit: bool = False) -> None:
        proc = self.proc
        assert proc is not None
        wait_for(lambda: " ready: " in self.log() or (or_exit and proc.poll() is not None), timeout,
                 "the second daemon")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _close_kept(self) -> None:
        for fd in self.kept.values():
            os.close(fd)
        self.kept = {}


@pytest.fixture
def published(work: Path, nginx_stor: Nginx) -> Path:
    src = work / "src"
    sample_tree(src, big_size=9 * 1024 * 1024 + 12345)  # three chunks: reads after the restart are uncached
    (src / "which.txt").write_text(AYS + "\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", nginx_stor.url)
    return src


def _start(work: Path, nginx_stor: Nginx, name: str) -> tuple[Daemon, Path]:
    mnt = work / "mnt"
    cfg = work / "aysfs.toml"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {AYS: str(mnt)}))
    return Daemon(cfg, work / f"{name}.log").start(wait_mounts=[mnt]), mnt


class _Reader:
    """READER in a child process: lists, reads and stats under `mnt` in a loop until stop()."""

    def __init__(self, mnt: Path, work: Path) -> None:
        self.stop_file = work / "stop-reader"
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(mnt), str(self.stop_file)],
                                     stdout=subprocess.PIPE, text=True)

    def stop(self) -> tuple[int, int, str]:
        """(loops that went right, loops that failed, the whole output)."""
        self.stop_file.write_text("")
        out, _ = self.proc.communicate(timeout=60)
        ok, errors, _last = out.split(" ", 2)
        return int(ok), int(errors), out


def test_aysctl_restart_keeps_mounts_open_files_and_inodes(work: Path, nginx_stor: Nginx, published: Path) -> None:
    d, mnt = _start(work, nginx_stor, "d")
    try:
        pid = d.proc.pid if d.proc else 0
        held = _Held(mnt, published)
        reader = _Reader(mnt, work)
        time.sleep(0.5)
        r = aysctl("restart", "--socket", str(work / "st" / "aysfsd.sock"))
        assert f"pid {pid}" in r.stdout, r.stdout
        wait_for(lambda: "resuming the FUSE session" in d.log(), 15, "the resumed session")
        time.sleep(0.5)
        ok, errors, out = reader.stop()
        assert errors == 0, f"reader errors through the restart: {out}"
        assert ok > 10
        assert d.proc is not None and d.proc.poll() is None and d.proc.pid == pid
        assert mounted(mnt)
        # loop.patch: the resumed session's device was made non-blocking again after its INIT
        assert bool(fuse_fd_flags(pid) & os.O_NONBLOCK) is fuselib.fast_loop()
        held.check()
        log = d.log()
        assert "removed stale mount" not in log
        assert "Traceback" not in log
    finally:
        d.stop()
    assert not mounted(mnt)


def test_killed_daemon_is_resumed_from_kept_descriptors(work: Path, nginx_stor: Nginx, published: Path) -> None:
    """What systemd does with FileDescriptorStoreMax= and Restart=on-failure, done by the test."""
    d, mnt = _start(work, nginx_stor, "d1")
    with _Successor(work, d) as s:
        held = _Held(mnt, published)
        kept = s.take()
        assert set(kept) == {"aysfs-fuse", "aysfs-state"}, kept
        reader = _Reader(mnt, work)
        time.sleep(0.3)
        d.kill()
        time.sleep(0.3)  # requests queue in the kernel meanwhile
        s.resume()
        s.wait_ready()
        time.sleep(0.5)
        _ok, errors, out = reader.stop()
        assert errors == 0, f"reader errors through the kill: {out}"
        held.check()
        text = s.log()
        assert "resuming the FUSE session" in text and "removed stale mount" not in text
    assert not mounted(mnt)


PREAD = r"""
import errno, hashlib, os, sys
fd, off, n = (int(a) for a in sys.argv[1:4])
try:
    print("ok", hashlib.sha256(os.pread(fd, n, off)).hexdigest())
except OSError as e:
    print("err", errno.errorcode.get(e.errno, e.errno))
"""


def _pread_elsewhere(fd: int, off: int, n: int) -> str:
    """pread of an inherited descriptor in a child: a read that would hang fails the test
    by its timeout instead of hanging it."""
    r = subprocess.run([sys.executable, "-c", PREAD, str(fd), str(off), str(n)], pass_fds=[fd],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def _debian_pyfuse3(work: Path) -> Path | None:
    """A directory holding only Debian's pyfuse3 (python3-pyfuse3, stock) for this Python, or None."""
    import sysconfig

    so = Path("/usr/lib/python3/dist-packages") / f"pyfuse3{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not so.is_file():
        return None
    d = work / "debian-pyfuse3"
    d.mkdir()
    for f in (so, so.parent / "_pyfuse3.py"):  # the module imports its helpers from _pyfuse3
        if f.is_file():
            (d / f.name).symlink_to(f)
    return d


@pytest.mark.parametrize("unpatched", ["ignored", "debian"])
def test_no_open_session_is_not_resumed_without_the_patch(work: Path, nginx_stor: Nginx, published: Path,
                                                          unpatched: str) -> None:
    """A session in the kernel's no_open mode sends READs with handle 0, which a stock pyfuse3
    cannot map to a file: the next process, on such a pyfuse3, refuses the hand-over and mounts
    afresh (as after a crash without the descriptors). The old session's open file answers an
    error, never wrong bytes; new opens read right. `ignored`: AYSFS_IGNORE_PYFUSE3_PATCH=1;
    `debian`: the second process really runs Debian's python3-pyfuse3."""
    env = {"AYSFS_IGNORE_PYFUSE3_PATCH": "1"}
    if unpatched == "debian":
        d = _debian_pyfuse3(work)
        if d is None:
            pytest.skip("no Debian python3-pyfuse3 for this Python")
        env = {"PYTHONPATH": str(d)}
    d1, mnt = _start(work, nginx_stor, "d1")
    sock = str(work / "st" / "aysfsd.sock")
    with _Successor(work, d1) as s:
        st1 = json.loads(aysctl("status", "--json", "--socket", sock).stdout)["daemon"]
        if not st1["no_open"]:
            pytest.skip(f"the first daemon runs no no_open session: {st1['fuse_mode']} (needs the patched pyfuse3)")
        held = _Held(mnt, published, pin=False)
        f, want, big = held.f, held.want, held.big
        # a close sends FLUSH until the daemon has answered one ENOSYS: the fork that starts d2
        # closes our `f` (close_fds), and with no daemon alive that FLUSH would wait forever
        assert (mnt / "which.txt").read_text() == AYS + "\n"
        assert set(s.take()) == {"aysfs-fuse", "aysfs-state"}
        d1.kill()
        d2 = s.resume(env)
        s.wait_ready(30, or_exit=True)
        text = s.log()
        assert d2.poll() is None, text
        assert "cannot resume the FUSE session: it runs in the kernel's no_open mode, which this pyfuse3 " \
               "cannot serve" in text, text
        assert "resuming the FUSE session" not in text and "removed stale mount" in text, text
        assert "Traceback" not in text, text
        st2 = json.loads(aysctl("status", "--json", "--socket", sock).stdout)["daemon"]
        assert st2["resumed_session"] is False and st2["no_open"] is False, st2
        assert st2["pyfuse3"]["patched"] is False, st2
        if unpatched == "debian":
            assert st2["pyfuse3"]["version"] != "3.5.0" and st2["pyfuse3"]["patch_ignored"] is False, st2
        else:
            assert st2["pyfuse3"]["patch_ignored"] is True, st2
        # the old session's file: what the kernel kept reads right, the rest is an error
        first = _pread_elsewhere(f.fileno(), 0, 4096)
        assert first in (f"ok {hashlib.sha256(want[:4096]).hexdigest()}", "err ENOTCONN", "err EIO"), first
        tail = _pread_elsewhere(f.fileno(), len(want) - 8192, 8192)
        assert tail in ("err ENOTCONN", "err EIO"), tail
        f.close()
        # the new session serves the tree
        assert hashlib.sha256(big.read_bytes()).digest() == hashlib.sha256(want).digest()
        assert (mnt / "which.txt").read_text() == AYS + "\n"
    assert not mounted(mnt)


def test_journal_restores_nodes_from_directory_objects_and_skips_what_it_cannot() -> None:
    """The journal names places (parent inode + name); entries come from the directory objects."""
    from aysfsd.config import AysConfig
    from aysfsd.fuse.nodes import MountPoint, Node
    from aysfsd.fuse.statejournal import StateJournal, recorded_no_open, restore
    from aysfsd.tree.objects import Entry
    from aysfsd.tree.ref import Ref

    root_h, sub_h = "a" * 64, "b" * 64
    dirs = {
        root_h: [Entry("sub", "d", 0o755, 0, 1, hash=sub_h), Entry('we"ird\nname', "f", 0o644, 3, 1, hash="c" * 64)],
        sub_h: [Entry("x.py", "f", 0o644, 5, 1, hash="d" * 64)],
    }
    cfg = AysConfig(id="a|b!c", mnt="/nowhere", name="a_b_c")
    mp = MountPoint(cfg, 2, ref=Ref("a|b!c", root_h, 1, 1.0))
    top = Node(2, mp, mp.top_entry(), 1, lookups=1)
    sub = Node(3, mp, dirs[root_h][0], 2)
    odd = Node(4, mp, dirs[root_h][1], 2)
    x = Node(5, mp, dirs[sub_h][0], 3)
    j = StateJournal()
    j.mount(mp)
    for n in (sub, odd, x):
        j.node(n)
    j.opened(7, 5)
    j.opened(8, 4)
    j.released(8)
    j.node(Node(6, mp, Entry("gone.txt", "f", 0o644, 1, 1, hash="e" * 64), 3))  # not in sub's object
    j.dropped(4)
    written = j.writes
    assert len(j.lines()) == 1  # the mount record (written at once); the rest waits for a reply
    j.flush()
    assert j.writes == written + 1  # nodes, opens and drops of a request: one write
    os.write(j.fd, b"n 9 3 \"torn")  # a crash in the middle of a write
    st = restore(j.lines(), [cfg], lambda h: dirs.get(h))
    assert set(st.nodes) == {2, 3, 5}
    assert st.nodes[5].entry == dirs[sub_h][0] and st.nodes[5].parent == 3
    assert st.nodes[3].children == {"x.py": 5}
    assert set(st.open_files) == {7} and st.open_files[7].node is st.nodes[5]
    assert st.next_ino == 7 and st.next_fh == 9  # past every number handed out, dropped ones too
    assert st.skipped == 2  # gone.txt and the torn line
    assert st.mounts[cfg.name].ref == mp.ref
    # a graceful snapshot keeps exact lookup counts; a mount no longer configured is "gone"
    top.lookups = 1
    st.nodes[5].lookups = 4
    j2 = StateJournal()
    from aysfsd.fuse.statejournal import snapshot_lines

    j2.snapshot(snapshot_lines(st.mounts.values(), st.nodes, st.open_files, st.next_ino, st.next_fh))
    assert not recorded_no_open(j2.lines())
    j2.session(True)
    assert recorded_no_open(j2.lines()) and restore(j2.lines(), [cfg], lambda h: dirs.get(h)).no_open
    j2.snapshot(snapshot_lines(st.mounts.values(), st.nodes, st.open_files, st.next_ino, st.next_fh))
    again = restore(j2.lines(), [cfg], lambda h: dirs.get(h))
    assert again.nodes[5].lookups == 4 and set(again.nodes) == {2, 3, 5}
    assert restore(j2.lines(), [], lambda h: dirs.get(h)).gone == {cfg.name: "/nowhere"}


def _syscw(pid: int) -> int:
    """write(2)/writev(2) calls of a process so far (all its threads)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("syscw:"))


BIG_DIR = 3000


def test_big_listing_is_journaled_in_batches_and_survives_sigkill(work: Path, nginx_stor: Nginx) -> None:
    """A READDIRPLUS reply hands the kernel a page of new inodes: journaled in one write before
    the reply, not one write per node; after a SIGKILL the next daemon knows every one of them."""
    src = work / "src"
    (src / "big").mkdir(parents=True)
    for i in range(BIG_DIR):
        (src / "big" / f"f{i:04d}").write_text(str(i))
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(nginx_stor.root))  # 3,000 PUTs: minutes on Debian 12's httpx
    d, mnt = _start(work, nginx_stor, "d1")
    with _Successor(work, d) as s:
        assert d.proc is not None
        big = mnt / "big"
        assert (big / "f0000").read_text() == "0"  # the directory object is loaded and cached
        before = _syscw(d.proc.pid)
        names = os.listdir(big)
        writes = _syscw(d.proc.pid) - before
        assert sorted(names) == [f"f{i:04d}" for i in range(BIG_DIR)]
        # replies plus at most one journal write each (~990 here); a write per node was > 3,000
        assert writes < BIG_DIR // 2, writes
        if PLAIN_READDIR:  # READDIRPLUS for the first reply only, then plain READDIR: no nodes
            assert os.statvfs(mnt).f_files < BIG_DIR // 2
        inos = {n: os.lstat(big / n).st_ino for n in names}  # the kernel now holds every one
        assert len(set(inos.values())) == BIG_DIR
        assert {e.name: e.inode() for e in os.scandir(big)} == inos  # d_ino is st_ino
        s.take()
        d.kill()
        s.resume()
        s.wait_ready()
        # every inode the kernel got from the listing names a node of the new daemon: a read
        # (READ, or OPEN on a stock pyfuse3) of an inode it does not know would fail (ESTALE)
        for i in range(BIG_DIR):
            n = f"f{i:04d}"
            assert os.lstat(big / n).st_ino == inos[n]
            assert (big / n).read_text() == str(i), n
        assert {e.name: e.inode() for e in os.scandir(big)} == inos
        text = s.log()
        assert "resuming the FUSE session" in text and "Traceback" not in text
    assert not mounted(mnt)
