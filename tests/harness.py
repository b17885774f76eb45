"""Run the real aysfsd as a subprocess for end-to-end tests, and build sample trees."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MOUNT_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LINK_DELAY_MS = 10.0  # each way of the tests' simulated link: a 20 ms round trip, as `make bench`'s remote rows


def aysctl(*args: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None,
           user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "aysctl"), *args]
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"aysctl {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@contextlib.contextmanager
def traversable(path: str | Path) -> Iterator[None]:
    """Let every uid traverse the directories above `path` while the block runs (a checkout in
    `mktemp -d` is 0700: a test that runs the venv's aysctl as nobody could not reach it).
    Only the execute bit for others is added, and only where missing; the modes come back after."""
    changed: list[tuple[Path, int]] = []
    try:
        for d in reversed(Path(os.path.abspath(path)).parents):
            mode = d.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((d, stat.S_IMODE(mode)))
        yield
    finally:
        for d, mode in reversed(changed):
            os.chmod(d, mode)


def mounted(path: str | Path) -> bool:
    p = os.path.normpath(str(path))
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == p for line in f)


def wait_for(cond, timeout: float, what: str, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def basic_config(tmp: Path, stors: Iterable[str], mounts: dict[str, str], extra_main: str = "",
                 extra: str = "") -> str:
    """A config with `mounts` (ays id -> mountpoint) served from `stors`, state under `tmp`."""
    lines = ["[main]", f'cache_dir = "{tmp}/cache"', f'control_socket = "{tmp}/aysfsd.sock"',
             f'fuse_root = "{tmp}/fuse"', "fetch_timeout = 10", extra_main, ""]
    for s in stors:
        lines += ["[[stor]]", f'url = "{s}"', ""]
    lines.append(extra)
    for ays_id, mnt in mounts.items():
        lines += ["[[ays]]", f"id = '{ays_id}'", f'mnt = "{mnt}"', ""]
    return "\n".join(lines)


class Daemon:
    """aysfsd --config FILE in the foreground, logs to a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_mounts: Iterable[str | Path] = ()) -> Daemon:
        logf = open(self.log_path, "ab")
        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen([str(BIN / "aysfsd"), "--config", str(self.config), "--log-level", "debug"],
                                     stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        for m in wait_mounts:
            self.wait_mounted(m)
        return self

    def wait_mounted(self, path: str | Path, timeout: float = MOUNT_TIMEOUT) -> None:
        def ok() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"aysfsd exited ({self.proc.returncode}):\n{self.log()}")
            return mounted(path)

        wait_for(ok, timeout, f"mount at {path}\n{self.log()[-3000:]}")

    def wait_ready(self, timeout: float = MOUNT_TIMEOUT) -> None:
        wait_for(lambda: " ready: " in self.log(), timeout, "the daemon's ready line")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash: waits for the exit; its mounts stay behind, stale."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *a: object) -> None:
        self.stop()


def fuse_fd_flags(pid: int) -> int:
    """The file status flags (O_NONBLOCK...) of a process's /dev/fuse descriptor."""
    for n in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}") != "/dev/fuse":
                continue
            for line in Path(f"/proc/{pid}/fdinfo/{n}").read_text().splitlines():
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
        except OSError:
            continue
    raise AssertionError(f"no /dev/fuse descriptor in process {pid}")


def force_unmount_under(path: Path) -> None:
    """Leave no mount behind below `path`, whatever a test did."""
    p = str(path)
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    for mp in sorted((m for m in mps if m == p or m.startswith(p + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


def sample_tree(dst: Path, big_size: int = 9 * 1024 * 1024 + 12345) -> Path:
    """A real tree: part of the standard library, a chunked file, symlinks, odd names, empties."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "logging"):
        shutil.copytree(stdlib / name, dst / "lib" / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    rnd = random.Random(1234)
    (dst / "data").mkdir(parents=True)
    (dst / "data" / "big.bin").write_bytes(rnd.randbytes(big_size))
    (dst / "data" / "empty").write_bytes(b"")
    (dst / "empty-dir").mkdir()
    (dst / "naïve ünïcødé ✓.txt").write_text("héllo wörld\n")
    (dst / "space name").write_text("spaces\n")
    (dst / "bin").mkdir()
    (dst / "bin" / "tool.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(dst / "bin" / "tool.sh", 0o755)
    os.chmod(dst / "data" / "empty", 0o600)
    os.symlink("../lib/json/__init__.py", dst / "bin" / "json-link")
    os.symlink("/etc/hostname", dst / "abs-link")
    os.symlink("does/not/exist", dst / "dangling")
    os.utime(dst / "space name", ns=(1_000_000_000_123_456_789, 1_000_000_000_123_456_789))
    return dst


def tree_listing(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, size, mtime_ns, content sha/target) for comparing trees."""
    import hashlib

    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("d", st.st_mode, st.st_mtime_ns)
            else:
                out[rel] = ("f", st.st_mode, st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def ctl(sock: str | Path, obj: dict, timeout: float = 30.0) -> list[dict]:
    """One raw control-protocol request: every line of the answer."""
    import json
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        s.sendall(json.dumps(obj).encode() + b"\n")
        with s.makefile("rb") as f:
            return [json.loads(line) for line in f]
    finally:
        s.close()


class NotifySocket:
    """A real datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[str] = []

    def collect(self, until: str, timeout: float = 15.0) -> list[str]:
        """Read datagrams until one contains the line `until` (e.g. "READY=1")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append(msg)
            if until in msg.split("\n"):
                return self.messages
        raise AssertionError(f"no {until} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


# -- packs (see aysfsd.tree.objects) ------------------------------------------------------------------------


def stor_dir_objects(stor: Path) -> list[dict]:
    """Every directory object among the blobs of a directory stor (or grid cache), those in
    packs of directory objects included."""
    import json

    out = []
    dec = json.JSONDecoder()
    for p in (stor / "blobs").glob("*/*"):
        try:
            text, pos, objs = p.read_bytes().decode(), 0, []
            while pos < len(text):  # a directory object, or a pack of them back to back
                obj, pos = dec.raw_decode(text, pos)
                objs.append(obj)
        except (ValueError, UnicodeDecodeError):
            continue
        out += [o for o in objs if isinstance(o, dict) and o.get("aysfs") == "dir"]
    return out


def stor_packs(stor: Path) -> tuple[set[str], set[str]]:
    """(the packs, the packed files' own blobs) named by a stor's directory objects."""
    packs: set[str] = set()
    members: set[str] = set()
    for obj in stor_dir_objects(stor):
        packs.update(h for h, _ in obj.get("packs", []))
        members.update(e["h"] for e in obj["entries"] if "p" in e)
    return packs, members


def corrupted(data: bytes) -> bytes:
    """`data` with its last byte changed (every bit flipped: never the same byte again, which
    setting it to a fixed value would be for 1 in 256 random blobs)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def pack_holding(stor: Path, data: bytes) -> str:
    """The hash of the pack that holds a small file with these bytes."""
    import hashlib

    h = hashlib.sha256(data).hexdigest()
    for obj in stor_dir_objects(stor):
        for e in obj["entries"]:
            if e.get("h") == h and "p" in e:
                return obj["packs"][e["p"][0]][0]
    raise AssertionError(f"no pack holds {h}")


def stor_tree_packs(stor: Path) -> tuple[set[str], set[str]]:
    """(the tree packs, the directory objects they hold) named by a stor's tree indexes
    (see aysfsd.tree.packs)."""
    import json

    packs: set[str] = set()
    members: set[str] = set()
    for p in (stor / "trees").glob("*") if (stor / "trees").is_dir() else []:
        for h, _, ms in json.loads(p.read_bytes())["packs"]:
            packs.add(h)
            members.update(m for m, _ in ms)
    return packs, members


def stor_roots(stor: Path) -> set[str]:
    """The root hashes the refs of a stor name."""
    import json

    return {json.loads(p.read_bytes())["root"] for p in (stor / "refs").glob("*")}


def wait_blocked(p: subprocess.Popen[bytes]) -> None:
    """Until `p` waits in the kernel on a FUSE request (or a page it reads ahead)."""
    def blocked() -> bool:
        assert p.poll() is None, f"the reader ended early ({p.returncode})"
        try:
            wchan = Path(f"/proc/{p.pid}/wchan").read_text()
        except OSError:
            return False
        return "request_wait_answer" in wchan or "folio_wait" in wchan or "wait_on_page" in wchan

    wait_for(blocked, 10, "the reader to block on the FUSE mount")


# -- a daemon under test: its config, start and status; publishing to its stor -------------------

AYS = "jumpscale|tiers!main"


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def config(state: Path, stors: list[dict[str, object]], ays: list[dict[str, object]],
           caches: list[dict[str, object]] | None = None, **main: object) -> str:
    """A full config: daemon state under `state`; tables as dicts of (dotted) keys."""
    m: dict[str, object] = {"cache_dir": f"{state}/cache", "control_socket": f"{state}/aysfsd.sock",
                            "fuse_root": f"{state}/fuse", "fetch_timeout": 10}
    m.update(main)
    out = ["[main]"] + [f"{k} = {toml_value(v)}" for k, v in m.items()] + [""]
    for name, tables in (("stor", stors), ("cache", caches or []), ("ays", ays)):
        for t in tables:
            out += [f"[[{name}]]"] + [f"{k} = {toml_value(v)}" for k, v in t.items()] + [""]
    return "\n".join(out)


def start(work: Path, name: str, text: str, mnts: list[Path]) -> Daemon:
    cfg = work / f"{name}.toml"
    cfg.write_text(text)
    d = Daemon(cfg, work / f"{name}.log").start(wait_mounts=mnts)
    wait_for(lambda: (work / name / "aysfsd.sock").exists(), 10, "the control socket")
    return d


def status(work: Path, name: str) -> dict[str, Any]:
    return ctl(work / name / "aysfsd.sock", {"cmd": "status"})[-1]


def publish(src: Path, stor: str, *extra: str) -> str:
    return aysctl("publish", str(src), "--ays", AYS, "--stor", stor, *extra).stdout.split()[1]


def blob_files(root: Path) -> dict[str, Path]:
    """hash -> path of every blob under a stor/grid root (temp files excluded)."""
    d = root / "blobs"
    return {p.name: p for p in d.glob("*/*") if not p.name.startswith(".")} if d.is_dir() else {}
