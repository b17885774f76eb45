"""The filesystems under test: native, aysfs and the peers, each behind one small interface.

A peer mounts the same data at ``<home>/lib/python3.X`` (so the interpreter can use the mount as
its PYTHONHOME for the app-start row), keeps its local cache in its own work directory, and can
be remounted "cold": unmounted, cache removed, page cache dropped, mounted again. Every process
started here is registered with `Cleanup` and stopped at the end even when a row fails.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers import Nginx  # noqa: E402

BIN = Path(sys.executable).parent
MOUNT_TIMEOUT = 60.0
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"
AYS_ID = "bench|stdlib!main"


class NotAvailable(Exception):
    """A peer (or one row of it) cannot be measured here: the message says why."""


# -- small system helpers -----------------------------------------------------------------------


def drop_caches() -> None:
    """sync, then drop page cache, dentries and inodes (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def is_mounted(path: Path | str) -> bool:
    return os.path.normpath(str(path)) in mountpoints()


def umount_lazy_under(path: Path | str) -> None:
    """Leave no mount at or below `path` (deepest first, lazily)."""
    p = os.path.normpath(str(path))
    for mp in sorted((m for m in mountpoints() if m == p or m.startswith(p + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def proc_status(pid: int, key: str) -> int | None:
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in bytes, None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def du_bytes(path: Path) -> int:
    """Allocated bytes of every file below `path` (like du, sparse files count what is stored)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def tail(path: Path, n: int = 3000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode(errors="replace")


class Cleanup:
    """Callables run in reverse order at the end, whatever happened."""

    def __init__(self) -> None:
        self._fns: list[Callable[[], None]] = []

    def add(self, fn: Callable[[], None]) -> None:
        self._fns.append(fn)

    def run(self) -> None:
        while self._fns:
            fn = self._fns.pop()
            try:
                fn()
            except Exception as e:  # keep cleaning up
                print(f"bench: cleanup step failed: {e!r}", file=sys.stderr)


class Proc:
    """A foreground daemon in its own session, output to a log file; stop() is reliable."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.log = log
        with open(log, "ab") as f:
            f.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            f.flush()
            self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=env)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def wait_mounted(path: Path, proc: Proc | None, timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and not proc.alive():
            raise NotAvailable(f"exited with {proc.p.returncode} before mounting: {tail(proc.log, 600)}")
        if time.monotonic() > deadline:
            raise NotAvailable(f"not mounted after {timeout:.0f}s")
        time.sleep(0.002)


class LoggedNginx(Nginx):
    """nginx with an access log: `answered()` counts the requests it answered so far."""

    def __init__(self, root: Path, workdir: Path, put: bool = True) -> None:
        super().__init__(root, workdir, put=put, access_log=True)
        self._counted = (0, 0)  # (bytes of the log read, lines in them)

    def answered(self) -> int:
        """Requests logged so far (nginx writes each line when the request ends)."""
        offset, lines = self._counted
        assert self.access_log is not None
        try:
            with open(self.access_log, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return lines
        end = data.rfind(b"\n") + 1  # whole lines only
        self._counted = (offset + end, lines + data.count(b"\n", 0, end))
        return self._counted[1]

    def logged_since(self, lines: int) -> list[str]:
        """The access log's lines after the first `lines`."""
        assert self.access_log is not None
        try:
            return self.access_log.read_text().splitlines()[lines:]
        except FileNotFoundError:
            return []


class AutoindexNginx(LoggedNginx):
    """nginx serving a plain tree read-only with directory listings (for httpdirfs and rclone)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        super().__init__(root, workdir, put=False)

    def _prepare(self) -> None:
        super()._prepare()
        conf = self.conf_path.read_text()
        conf = conf.replace("autoindex off;", "autoindex on;\n        autoindex_exact_size on;")
        self.conf_path.write_text(conf)


# -- the filesystems ----------------------------------------------------------------------------


class Peer:
    """One filesystem: where its tree is, how to (re)mount it cold, its daemon and its cache."""

    name = "peer"
    native = False

    def __init__(self, work: Path, cleanup: Cleanup) -> None:
        self.work = work / self.name
        self.cleanup = cleanup
        self.na: str | None = None  # set when the peer cannot be measured at all
        self.proc: Proc | None = None
        self.peak_rss = 0  # max VmHWM over every daemon instance
        self.peak_anon = 0  # max RssAnon (heap, not file mappings such as LMDB) seen at unmount
        self.log = self.work / f"{self.name}.log"

    @property
    def home(self) -> Path:
        """PYTHONHOME whose lib/pythonX.Y is the tree."""
        return self.work / "home"

    @property
    def root(self) -> Path:
        return self.home / "lib" / PYVER

    def prepare(self) -> None:
        """One-time set-up (images, publishing); raise NotAvailable when impossible."""
        self.work.mkdir(parents=True, exist_ok=True)

    def clear_cache(self) -> None:
        """Empty the local cache (for a cold mount)."""

    def _start(self) -> Proc:
        raise NotImplementedError

    def mount_cold(self) -> float:
        """Unmount, empty the local cache, drop the page cache, mount: seconds until mounted."""
        self.unmount()
        self.clear_cache()
        self.root.mkdir(parents=True, exist_ok=True)
        drop_caches()
        t0 = time.perf_counter()
        self.proc = self._start()
        self.cleanup.add(self._cleanup_instance(self.proc))
        wait_mounted(self.root, self.proc)
        return time.perf_counter() - t0

    def _cleanup_instance(self, proc: Proc) -> Callable[[], None]:
        def fn() -> None:
            if proc.alive():
                umount_lazy_under(self.work)
                proc.stop()

        return fn

    def record_rss(self) -> None:
        if self.proc is not None and self.proc.alive():
            self.peak_rss = max(self.peak_rss, proc_status(self.proc.pid, "VmHWM") or 0)
            self.peak_anon = max(self.peak_anon, proc_status(self.proc.pid, "RssAnon") or 0)

    def _stop_proc(self) -> None:
        assert self.proc is not None
        if is_mounted(self.root):
            r = subprocess.run(["umount", str(self.root)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.root)], capture_output=True)
        self.proc.stop()

    def unmount(self) -> None:
        if self.proc is None:
            return
        self.record_rss()
        try:
            self._stop_proc()
        finally:
            umount_lazy_under(self.work)
            self.proc = None

    def cache_bytes(self) -> int | None:
        return None


class Native(Peer):
    """The source directory itself: the reference every ratio is taken against."""

    name = "native"
    native = True

    def __init__(self, work: Path, cleanup: Cleanup, src_home: Path) -> None:
        super().__init__(work, cleanup)
        self._home = src_home

    @property
    def home(self) -> Path:
        return self._home

    def mount_cold(self) -> float:
        drop_caches()
        return 0.0

    def unmount(self) -> None:
        pass


class Aysfs(Peer):
    """aysfsd with one stor (nginx with PUT on loopback, or a directory), a fresh LMDB cache per cold mount.

    `stor_url` is what the daemon reads from; `publish_url` (default the same) is where `prepare()`
    publishes the tree, unless `publish` is False (another peer published it already)."""

    name = "aysfs"

    def __init__(self, work: Path, cleanup: Cleanup, src: Path, stor_url: str, name: str = "aysfs",
                 log_level: str = "info", publish_url: str | None = None, publish: bool = True,
                 ays_id: str = AYS_ID) -> None:
        self.name = name
        super().__init__(work, cleanup)
        self.src = src
        self.stor_url = stor_url
        self.publish_url = publish_url or stor_url
        self.publish = publish
        self.ays_id = ays_id
        self.log_level = log_level
        self.config = self.work / "aysfs.toml"
        self.publish_seconds = 0.0

    def aysctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "aysctl"), *args], capture_output=True, text=True, timeout=timeout)

    def publish_tree(self, *extra: str, ays_id: str | None = None) -> None:
        t0 = time.perf_counter()
        r = self.aysctl("publish", str(self.src), "--ays", ays_id or self.ays_id, "--stor", self.publish_url, *extra)
        self.publish_seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise NotAvailable(f"aysctl publish failed: {r.stderr.strip()[-300:]}")

    def prepare(self) -> None:
        super().prepare()
        if self.publish:
            self.publish_tree()
        self.config.write_text(f"""[main]
cache_dir = "{self.work}/cache"
cache_size = "4GiB"
control_socket = "{self.work}/aysfsd.sock"
fuse_root = "{self.work}/fuse"
fetch_timeout = 60
log_level = "{self.log_level}"
{os.environ.get("BENCH_MAIN_CONFIG", "")}

[[stor]]
url = "{self.stor_url}"

[[ays]]
id = '{self.ays_id}'
mnt = "{self.root}"
{os.environ.get("BENCH_AYS_CONFIG", "")}
""")

    def clear_cache(self) -> None:
        shutil.rmtree(self.work / "cache", ignore_errors=True)

    def _start(self) -> Proc:
        # BENCH_AYSFSD: another daemon command to measure (e.g. a patched build), split like a shell would
        cmd = shlex.split(os.environ.get("BENCH_AYSFSD", "")) or [str(BIN / "aysfsd")]
        return Proc([*cmd, "--config", str(self.config)], self.log)

    def _stop_proc(self) -> None:
        assert self.proc is not None
        self.proc.stop(signal.SIGTERM, timeout=30)  # SIGTERM unmounts everything

    def cache_bytes(self) -> int | None:
        p = self.work / "cache" / "lmdb" / "data.mdb"
        if not p.exists():
            found = list((self.work / "cache").rglob("data.mdb"))
            if not found:
                return None
            p = found[0]
        return p.stat().st_blocks * 512


class Squashfuse(Peer):
    """squashfuse of a local squashfs image of the same tree (the local FUSE reference)."""

    name = "squashfuse"

    def __init__(self, work: Path, cleanup: Cleanup, src: Path) -> None:
        super().__init__(work, cleanup)
        self.src = src
        self.image = self.work / "tree.sqfs"

    def prepare(self) -> None:
        super().prepare()
        for tool in ("mksquashfs", "squashfuse"):
            if shutil.which(tool) is None:
                raise NotAvailable(f"{tool} not installed (apt-get install squashfuse squashfs-tools)")
        self.image.unlink(missing_ok=True)
        help_text = subprocess.run(["mksquashfs", "-help"], capture_output=True, text=True).stdout
        comp = ["-comp", "zstd"] if "zstd" in help_text else []
        r = subprocess.run(["mksquashfs", str(self.src), str(self.image), "-noappend", "-quiet", "-no-progress",
                            "-processors", str(os.cpu_count() or 1), *comp], capture_output=True, text=True)
        if r.returncode != 0:
            raise NotAvailable(f"mksquashfs failed: {r.stderr.strip()[-300:]}")

    def _start(self) -> Proc:
        return Proc(["squashfuse", "-f", str(self.image), str(self.root)], self.log)

    def cache_bytes(self) -> int | None:
        return self.image.stat().st_blocks * 512


class _WebPeer(Peer):
    """A FUSE client of an http remote (nginx autoindex of the plain tree) with its cache in
    work/cache; `tool` is its command (and its Debian package)."""

    tool = ""

    def __init__(self, work: Path, cleanup: Cleanup, web: Nginx, url: str | None = None,
                 name: str | None = None) -> None:
        self.name = name or self.name
        super().__init__(work, cleanup)
        self.url = url or web.url  # url: the same server behind a simulated link

    def prepare(self) -> None:
        super().prepare()
        if shutil.which(self.tool) is None:
            raise NotAvailable(f"{self.tool} not installed (apt-get install {self.tool})")

    def clear_cache(self) -> None:
        shutil.rmtree(self.work / "cache", ignore_errors=True)

    def cache_bytes(self) -> int | None:
        return du_bytes(self.work / "cache")


class Rclone(_WebPeer):
    """rclone mount of an http remote (nginx autoindex of the plain tree), full VFS cache, read-only."""

    name = tool = "rclone"

    def prepare(self) -> None:
        super().prepare()
        (self.work / "rclone.conf").write_text("")

    def _start(self) -> Proc:
        return Proc(["rclone", "mount", ":http:", str(self.root), "--http-url", self.url + "/",
                     "--read-only", "--vfs-cache-mode", "full", "--cache-dir", str(self.work / "cache"),
                     "--config", str(self.work / "rclone.conf"), "--log-level", "NOTICE"], self.log)


class Httpdirfs(_WebPeer):
    """httpdirfs with its cache, over nginx autoindex of the plain tree."""

    name = tool = "httpdirfs"

    def _start(self) -> Proc:
        (self.work / "cache").mkdir(parents=True, exist_ok=True)
        # --no-range-check: 1.2.5's check rejects nginx, which does serve ranges (206 + Content-Range)
        return Proc(["httpdirfs", "-f", "--cache", "--no-range-check", "--cache-location", str(self.work / "cache"),
                     self.url + "/", str(self.root)], self.log)
