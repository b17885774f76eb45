#!/usr/bin/python3
"""Test the installed aysfs Debian package on this machine (`make test-installed`).

Run as root with Debian's /usr/bin/python3 (the package's Python and python3-* libraries, not
the project's venv):

    /usr/bin/python3 packaging/test_installed.py dist/aysfs_VERSION+deb12_ARCH.deb \
        [--repo dist/apt --next-repo build/apt-next] [--releases bookworm,trixie] [--nspawn auto|yes|no]

1. Installs the .deb with `apt-get install ./...deb` and checks what it installed: files, the
   conffile, the aysfs group, the enabled unit, `systemd-analyze verify` of the installed unit,
   the man pages, that the shipped config starts zero mounts, which library versions run, and
   that /usr/bin/aysfsd imports the package's private, patched pyfuse3.
2. Runs the unit's commands as systemd would (systemd is not PID 1 here): ExecStart with
   NOTIFY_SOCKET, WATCHDOG_USEC/_PID and the RuntimeDirectory/CacheDirectory made, waits for
   READY=1, publishes a tree to a local stor with aysctl, makes /etc/aysfs/aysfs.toml mount it
   and applies that with ExecReload (SIGHUP to $MAINPID), checks the mount and its bytes, that
   the daemon runs the private patched pyfuse3 and its session the kernel's no_open mode,
   `aysctl status` as root, as a member of group aysfs and as a non-member (refused), a refused
   invalid config, a crash (SIGKILL) and restart, then SIGTERM: no mount may remain.
3. For each of Debian 12 and 13, when a real systemd can be booted here (systemd-nspawn with a
   debootstrapped tree, cached by packaging/debian_tree.py): serves the signed apt repository
   (--repo, `make apt-repo`) with nginx on loopback, refuses it under a wrong Signed-By key,
   `apt-get install aysfs` through it (that release's build), then does the same as 2 with
   systemctl start/reload/stop, journalctl, a SIGKILL that Restart=on-failure recovers; then
   upgrades to the next version through the second repository (--next-repo) while a mount
   serves a reader, and purges.
4. Purges the package (apt-get purge) and checks what is gone; restores the machine.

Prints one line per check and ends with "N passed, M failed"; exit status 0 when none failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGE = "aysfs"
UNIT = "/lib/systemd/system/aysfsd.service"
CONF = "/etc/aysfs/aysfs.toml"
SYS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {"PATH": SYS_PATH, "LANG": "C.UTF-8"}
AYS_ID = "test|installed!main"
MOUNT_NAME = "installed"
MARKER = Path("/var/tmp/aysfs-test-installed.marker")  # "aysfs was installed by this test"
RELEASES = {"bookworm": "12", "trixie": "13"}
KEYRING = "/usr/share/keyrings/aysfs-archive-keyring.gpg"
APT_LOCKED = ["flock", "/tmp/aysfs-apt.lock"]  # apt and dpkg on this machine: one user at a time
PYFUSE3_DIR = "/usr/lib/aysfs/python"  # the patched pyfuse3, private (README.Debian)
EXPECTED_FILES = [
    "/usr/bin/aysfsd", "/usr/bin/aysctl", UNIT, CONF,
    "/usr/share/man/man8/aysfsd.8.gz", "/usr/share/man/man1/aysctl.1.gz", "/usr/share/man/man5/aysfs.toml.5.gz",
    "/usr/share/aysfs/vendor/inotify_simple.py", "/usr/share/doc/aysfs/README.Debian",
    "/usr/share/doc/aysfs/copyright", PYFUSE3_DIR + "/pyfuse3",
]


# -- reporting --------------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed: list[str] = []
        self.skipped: list[str] = []
        self.section = ""
        self.sections: list[list[Any]] = []  # [title, checks, failed, start]

    def head(self, title: str) -> None:
        self.section = title
        self.sections.append([title, self.passed + len(self.failed), len(self.failed), time.monotonic()])
        print(f"\n== {title}", flush=True)

    def summary(self) -> str:
        """Checks, failures and seconds per section."""
        lines = []
        ends = [s[1:] for s in self.sections[1:]] + [[self.passed + len(self.failed), len(self.failed),
                                                       time.monotonic()]]
        for (title, n0, f0, t0), (n1, f1, t1) in zip(self.sections, ends, strict=True):
            lines.append(f"{n1 - n0:4d} checks {f1 - f0:3d} failed {t1 - t0:6.0f} s  {title}")
        return "\n".join(lines)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"ok   {what}", flush=True)
        else:
            self.failed.append(f"[{self.section}] {what}")
            print(f"FAIL {what}" + (f"\n{_indent(detail)}" if detail else ""), flush=True)
        return ok

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(what)
        print(f"skip {what}: {why}", flush=True)

    def note(self, text: str) -> None:
        print(_indent(text), flush=True)


def _indent(text: str, prefix: str = "     | ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").split("\n"))


class Abort(Exception):
    """A failed check that later checks of the same phase depend on."""


R = Report()


def must(what: str, ok: bool, detail: str = "") -> None:
    if not R.check(what, ok, detail):
        raise Abort(what)


def run(cmd: list[str], *, input: str | None = None, timeout: float = 120, env: dict[str, str] | None = None,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, cwd="/",
                       env=env if env is not None else BASE_ENV, stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise Abort(f"{shlex.join(cmd)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def out(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\n{r.stdout}{r.stderr}".rstrip()


def wait_for(cond: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


# -- the published tree and its check (also run inside the container: `verify-tree`) ------------

def make_tree(root: Path) -> None:
    """A small tree with what publish must keep: modes, nesting, a symlink, an empty file,
    a non-ASCII name and a file over 4 MiB (chunked)."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "hello.txt").write_text("hello from the installed aysfs\n")
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n" * 100)
    (root / "bin" / "tool.sh").write_text("#!/bin/sh\necho tool\n")
    os.chmod(root / "bin" / "tool.sh", 0o755)
    (root / "secret.conf").write_text("mode 600\n")
    os.chmod(root / "secret.conf", 0o600)
    (root / "empty").write_bytes(b"")
    (root / "naïve ñame.txt").write_text("unicode\n")
    (root / "big.bin").write_bytes(hashlib.sha256(b"seed").digest() * (5 * 1024 * 1024 // 32 + 7))
    os.symlink("hello.txt", root / "link")
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink() and p.is_dir():
            os.chmod(p, 0o755)


def tree_listing(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """path -> (kind, mode bits, size, sha256 or link target)."""
    found: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("l", 0, 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("d", stat.S_IMODE(st.st_mode), 0, "")
            else:
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                found[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, h.hexdigest())
    return found


def verify_tree(src: Path, mnt: Path) -> list[str]:
    problems = []
    a, b = tree_listing(src), tree_listing(mnt)
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            problems.append(f"{rel}: published {a.get(rel)}, mounted {b.get(rel)}")
    try:
        with open(mnt / "new-file", "w") as f:
            f.write("x")
        problems.append("writing into the mount succeeded (it must be read-only)")
    except OSError as e:
        if e.errno not in (30, 13, 1):  # EROFS, EACCES, EPERM
            problems.append(f"writing into the mount failed with {e!r}, expected EROFS")
    return problems


# -- system helpers -----------------------------------------------------------------------------

def aysfs_mounts(mountinfo: str) -> list[str]:
    """Mount points of aysfs (the FUSE session and its bind mounts) in a mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) >= 2 and fields[0] in ("fuse.aysfs", "fuse") and fields[1] == "aysfs":
            found.append(left.split()[4].replace("\\040", " "))
    return found


def unit_settings(path: str) -> dict[str, str]:
    """[Service] settings of a unit file (last assignment wins; enough for this unit)."""
    settings: dict[str, str] = {}
    section = ""
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line:
            k, v = line.split("=", 1)
            settings[k.strip()] = v.strip()
    return settings


def seconds(value: str) -> float:
    total = 0.0
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "": 1}
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[unit]
    return total


def config_text(stor: str, mnt: str) -> str:
    return (f'# written by packaging/test_installed.py\n[[stor]]\nurl = "{stor}"\n\n'
            f'[[ays]]\nid = "{AYS_ID}"\nmnt = "{mnt}"\nname = "{MOUNT_NAME}"\n')


# -- targets: where the scenario runs ------------------------------------------------------------

class Target:
    """The machine the service runs on: this host (systemd simulated) or an nspawn container."""

    name = ""
    share: Path  # a directory both this script and the target see
    share_in: str  # ...as the target sees it
    host_view = "/proc/1"  # a process whose mounts are "the host's": the target's init

    def run(self, cmd: list[str], user: str | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        raise NotImplementedError

    def write(self, path: str, text: str) -> None:
        r = self.run(["sh", "-c", 'umask 022; cat > "$1.tmp" && mv -f "$1.tmp" "$1"', "sh", path], input=text)
        if r.returncode != 0:
            raise Abort(f"writing {path}: {out(r)}")

    def mountinfo(self) -> str:
        return self.run(["cat", f"{self.host_view}/mountinfo"]).stdout

    def status(self, user: str | None = None) -> dict[str, Any] | None:
        r = self.run(["aysctl", "status", "--json"], user=user, timeout=40)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def mount_state(self) -> str | None:
        st = self.status()
        for m in (st or {}).get("mounts", []):
            if m.get("name") == MOUNT_NAME:
                return str(m.get("state"))
        return None

    def reloads(self) -> int:
        st = self.status() or {}
        return int(st.get("daemon", {}).get("reloads", -1))

    # the service
    def start(self) -> None: ...
    def reload(self) -> subprocess.CompletedProcess[str]: raise NotImplementedError
    def stop(self) -> int: raise NotImplementedError
    def main_pid(self) -> int: raise NotImplementedError
    def crash_and_restart(self) -> None: ...
    def after_stop(self) -> None: ...


class HostTarget(Target):
    """This machine; the unit's commands are run the way systemd runs them."""

    name = "host (unit commands run as systemd would)"
    host_view = "/proc/self"  # PID 1 here is a sandbox's agent whose namespaces root cannot read: use a shell's

    def __init__(self, work: Path) -> None:
        self.share = self.work = work
        self.share_in = str(work)
        self.unit = unit_settings(UNIT)
        self.proc: subprocess.Popen[bytes] | None = None
        self.notes: list[tuple[float, str]] = []
        self.log_path = work / "aysfsd.log"
        self.notify_path = str(work / "notify.sock")
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def run(self, cmd: list[str], user: str | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return run(cmd, input=input, timeout=timeout)

    # sd_notify: a datagram socket like systemd's
    def _listen(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)
        self._sock.bind(self.notify_path)

        def reader() -> None:
            assert self._sock is not None
            while True:
                try:
                    data = self._sock.recv(65536)
                except OSError:
                    return
                with self._lock:
                    for line in data.decode(errors="replace").split("\n"):
                        self.notes.append((time.monotonic(), line))

        threading.Thread(target=reader, daemon=True).start()

    def notes_since(self, t0: float) -> list[str]:
        with self._lock:
            return [n for t, n in self.notes if t >= t0]

    def wait_note(self, t0: float, prefix: str, timeout: float) -> bool:
        return bool(wait_for(lambda: any(n.startswith(prefix) for n in self.notes_since(t0)), timeout))

    def start(self) -> None:
        """ExecStart as systemd runs it: clean environment, NOTIFY_SOCKET, WATCHDOG_USEC/PID,
        RuntimeDirectory and CacheDirectory made with their modes, stdin /dev/null."""
        if self._sock is None:
            self._listen()
        u = self.unit
        for key, base in (("RuntimeDirectory", "/run"), ("CacheDirectory", "/var/cache")):
            d = Path(base) / u[key]
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, int(u.get(key + "Mode", "0755"), 8))
        env = dict(BASE_ENV, NOTIFY_SOCKET=self.notify_path, INVOCATION_ID=os.urandom(16).hex(),
                   RUNTIME_DIRECTORY=f"/run/{u['RuntimeDirectory']}",
                   CACHE_DIRECTORY=f"/var/cache/{u['CacheDirectory']}")
        if "WatchdogSec" in u:
            env["WATCHDOG_USEC"] = str(int(seconds(u["WatchdogSec"]) * 1e6))
        argv = shlex.split(u["ExecStart"])
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        # WATCHDOG_PID is the main PID: sh's $$ becomes aysfsd's PID with exec
        self.proc = subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *argv], env=env,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/",
                                     start_new_session=True)
        log.close()
        timeout = seconds(u.get("TimeoutStartSec", "90"))
        ok = self.wait_note(t0, "READY=1", min(timeout, 60))
        must(f"ExecStart ({u['ExecStart']}) sends READY=1", ok,
             f"notifications: {self.notes_since(t0)}\nlog:\n{self.log()[-3000:]}")
        if "WatchdogSec" in u:
            R.check(f"it sends WATCHDOG=1 (WatchdogSec={u['WatchdogSec']})",
                    self.wait_note(t0, "WATCHDOG=1", 5), str(self.notes_since(t0)))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def main_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reload(self) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        cmd = [a.replace("$MAINPID", str(self.main_pid())) for a in shlex.split(self.unit["ExecReload"])]
        r = run(cmd)
        R.check("ExecReload: RELOADING=1 then READY=1",
                self.wait_note(t0, "RELOADING=1", 10) and self.wait_note(t0, "READY=1", 30),
                str(self.notes_since(t0)))
        return r

    def stop(self) -> int:
        """SIGTERM (KillSignal) to the main process, SIGKILL after TimeoutStopSec."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=seconds(self.unit.get("TimeoutStopSec", "90")))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        R.check("SIGTERM: STOPPING=1 sent", self.wait_note(t0, "STOPPING=1", 1), str(self.notes_since(t0)))
        self.proc = None
        return rc

    def crash_and_restart(self) -> None:
        """SIGKILL (a crash), then what Restart=on-failure does: ExecStart again after RestartSec."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None
        time.sleep(seconds(self.unit.get("RestartSec", "0.1")))
        # systemd removes the RuntimeDirectory when the service stops, also before a restart, unless
        # RuntimeDirectoryPreserve= (it cannot remove a directory with a mount point in it anyway)
        if self.unit.get("RuntimeDirectoryPreserve", "no") == "no":
            self._remove_runtime_dir()
        self.start()

    def _remove_runtime_dir(self) -> None:
        d = f"/run/{self.unit['RuntimeDirectory']}"
        subprocess.run(["rm", "-rf", "--one-file-system", d], capture_output=True)

    def after_stop(self) -> None:
        d = f"/run/{self.unit['RuntimeDirectory']}"
        busy = [m for m in aysfs_mounts(self.mountinfo()) if m.startswith(d)]
        R.check(f"nothing mounted under {d} when systemd would remove it", not busy, str(busy))
        self._remove_runtime_dir()

    def kill_leftovers(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self._sock is not None:
            self._sock.close()


class NspawnTarget(Target):
    """A debootstrapped Debian release booted with systemd-nspawn: a real systemd as PID 1.
    It shares this machine's network: it reaches the apt repository's nginx on loopback."""

    name = "nspawn container (real systemd)"

    def __init__(self, work: Path, release: str, rootfs: Path) -> None:
        self.share = work / f"share-{release}"
        self.share.mkdir(mode=0o755)
        self.share_in = "/srv/aysfs-test"
        self.rootfs = rootfs
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = work / f"nspawn-{release}.log"
        self.pid1 = 0

    def boot(self) -> tuple[bool, str]:
        log = open(self.log_path, "wb")
        machine = f"aysfs-test-{os.getpid()}"
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "--volatile=overlay", "--register=no", "--keep-unit", "--boot",
             "--console=passive", f"--machine={machine}", "--bind=/dev/fuse",
             f"--bind={self.share}:{self.share_in}", "-D", str(self.rootfs)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

        def pid1() -> int:
            if self.proc is None or self.proc.poll() is not None:
                return -1
            r = run(["ps", "--ppid", str(self.proc.pid), "-o", "pid=,comm="])
            for line in r.stdout.splitlines():
                pid, _, comm = line.strip().partition(" ")
                if comm.strip() == "systemd":
                    return int(pid)
            return 0

        p = wait_for(pid1, 30)
        if not p or p < 0:
            return False, f"no systemd started in the container:\n{self.log_path.read_text(errors='replace')}"
        self.pid1 = p
        # systemd's private bus socket appears a moment after it starts: until then systemctl
        # answers "Failed to connect to bus" with no state
        r = wait_for(lambda: (lambda r: r if r.stdout.strip() else None)(
            self.run(["systemctl", "is-system-running"], timeout=30)), 60, 0.5)
        if r is not None:
            r = self.run(["systemctl", "is-system-running", "--wait"], timeout=120)
        else:
            r = self.run(["systemctl", "is-system-running"], timeout=30)
        state = r.stdout.strip()
        if state not in ("running", "degraded"):
            return False, f"system state {state!r}: {out(r)}\n{self.log_path.read_text(errors='replace')[-2000:]}"
        if state == "degraded":
            R.note("container boot is degraded: " + self.run(["systemctl", "--failed", "--no-legend"]).stdout)
        return True, state

    def run(self, cmd: list[str], user: str | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return run(["nsenter", "-t", str(self.pid1), "-a", "env", "-i", *(f"{k}={v}" for k, v in BASE_ENV.items()),
                    *cmd], input=input, timeout=timeout)

    def popen(self, cmd: list[str]) -> subprocess.Popen[str]:
        """`cmd` in the container, in the background."""
        return subprocess.Popen(["nsenter", "-t", str(self.pid1), "-a", "env", "-i",
                                 *(f"{k}={v}" for k, v in BASE_ENV.items()), *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args, "aysfsd.service"])

    def main_pid(self) -> int:
        return int(self.systemctl("show", "-P", "MainPID").stdout.strip() or 0)

    def start(self) -> None:
        r = self.systemctl("start")
        must("systemctl start aysfsd", r.returncode == 0, out(r) + "\n" + self.journal())

    def reload(self) -> subprocess.CompletedProcess[str]:
        r = self.systemctl("reload")
        R.check("systemctl reload aysfsd exits 0", r.returncode == 0, out(r))
        return r

    def stop(self) -> int:
        r = self.systemctl("stop")
        R.check("systemctl stop aysfsd exits 0", r.returncode == 0, out(r))
        res = self.systemctl("show", "-P", "Result").stdout.strip()
        return 0 if res == "success" and r.returncode == 0 else 1

    def crash_and_restart(self) -> None:
        old = self.main_pid()
        before = int(self.systemctl("show", "-P", "NRestarts").stdout.strip() or 0)
        self.run(["kill", "-KILL", str(old)])
        ok = wait_for(lambda: self.main_pid() not in (0, old) and
                      self.systemctl("is-active").stdout.strip() == "active", 30)
        after = int(self.systemctl("show", "-P", "NRestarts").stdout.strip() or 0)
        must("Restart=on-failure: systemd restarted aysfsd after SIGKILL", bool(ok) and after == before + 1,
             f"NRestarts {before} -> {after}\n" + self.journal())

    def after_stop(self) -> None:
        r = self.run(["test", "-e", "/run/aysfs"])
        if r.returncode == 0:  # RuntimeDirectoryPreserve=yes: it stays, and nothing may be mounted in it
            left = [m for m in aysfs_mounts(self.mountinfo()) if m.startswith("/run/aysfs/")]
            R.check("the RuntimeDirectory /run/aysfs is kept (RuntimeDirectoryPreserve=yes), nothing mounted in it",
                    not left, str(left))
        else:
            R.check("systemd removed the RuntimeDirectory /run/aysfs", True)

    def journal(self) -> str:
        return self.run(["journalctl", "-u", "aysfsd", "--no-pager", "-o", "short-monotonic"]).stdout

    def shutdown(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to halt
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# -- the scenario shared by both targets ---------------------------------------------------------

@contextlib.contextmanager
def test_users(t: Target) -> Iterator[tuple[str, str]]:
    tag = f"{os.getpid() % 100000}"
    member, stranger = f"aysfs-tm{tag}", f"aysfs-tn{tag}"
    for user, groups in ((member, ["--groups", "aysfs"]), (stranger, [])):
        t.run(["userdel", user])
        r = t.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--no-user-group", *groups, user])
        must(f"useradd {user} {' '.join(groups)}".strip(), r.returncode == 0, out(r))
    try:
        yield member, stranger
    finally:
        for user in (member, stranger):
            t.run(["userdel", user])


def scenario(t: Target, script: Path) -> None:
    share = t.share_in
    src, stor, mnt = f"{share}/src", f"{share}/stor", f"{share}/mnt/{MOUNT_NAME}"
    cfg = f"{share}/aysfs.toml"
    make_tree(t.share / "src")
    shutil.copy(script, t.share / "test_installed.py")
    must(f"keep a copy of {CONF}", t.run(["cp", "-p", CONF, f"{share}/aysfs.toml.orig"]).returncode == 0)

    st = t.status()
    must("aysctl status as root (shipped config)", st is not None)
    assert st is not None
    R.check("the shipped config has zero mounts", st.get("mounts") == [], json.dumps(st.get("mounts")))
    pid = t.main_pid()
    ns = t.run(["readlink", f"/proc/{pid}/ns/mnt", f"{t.host_view}/ns/mnt"]).stdout.split()
    R.check(f"aysfsd runs in the mount namespace of {t.host_view} (its mounts are visible to all)",
            len(ns) == 2 and ns[0] == ns[1], str(ns))

    r = t.run(["aysctl", "publish", src, "--ays", AYS_ID, "--stor", stor])
    must(f"aysctl publish {src} --ays '{AYS_ID}' --stor {stor}", r.returncode == 0 and "root " in r.stdout, out(r))

    # /etc/aysfs/aysfs.toml becomes a symlink to a file outside /etc/aysfs: aysfsd's inotify watch
    # (of /etc/aysfs) sees the symlink appear, but not later edits of its target, so the edit
    # below is applied by the reload command and by nothing else.
    before = t.reloads()
    t.write(cfg, t.run(["cat", CONF]).stdout)
    r = t.run(["ln", "-sfn", cfg, CONF])
    must(f"{CONF} -> {cfg}", r.returncode == 0, out(r))
    wait_for(lambda: t.reloads() > before, 10)
    time.sleep(1.0)
    t.write(cfg, config_text(stor, mnt))
    time.sleep(1.5)
    R.check("no reload before the reload command (inotify does not see the symlink's target)",
            t.mount_state() is None)
    before = t.reloads()
    t.reload()
    up = wait_for(lambda: t.mount_state() == "up", 30, 0.5)
    must(f"after the reload the mount is up at {mnt}", bool(up),
         json.dumps(t.status(), indent=1)[:3000])
    R.check("the daemon counted one more reload", t.reloads() == before + 1)
    R.check(f"{mnt} is in {t.host_view}/mountinfo", mnt in aysfs_mounts(t.mountinfo()))
    r = t.run(["/usr/bin/python3", f"{share}/test_installed.py", "verify-tree", src, mnt])
    R.check("the mount has the published tree: names, modes, sizes, bytes, symlink; read-only",
            r.returncode == 0, out(r))
    r = t.run(["cat", f"{mnt}/hello.txt"])
    R.check("cat hello.txt through the mount", r.stdout == "hello from the installed aysfs\n", out(r))

    r = t.run(["aysctl", "status"])
    R.check("aysctl status as root lists the mount", r.returncode == 0 and MOUNT_NAME in r.stdout, out(r))
    fast_path(t, "")
    with test_users(t) as (member, stranger):
        r = t.run(["aysctl", "status"], user=member)
        R.check(f"aysctl status as {member} (group aysfs)", r.returncode == 0 and MOUNT_NAME in r.stdout, out(r))
        r = t.run(["aysctl", "reload"], user=member)
        R.check(f"aysctl reload as {member} (group aysfs)", r.returncode == 0, out(r))
        r = t.run(["aysctl", "status"], user=stranger)
        R.check(f"aysctl status as {stranger} (not in aysfs) is refused: non-zero exit, 'permission'",
                r.returncode != 0 and "permission" in (r.stdout + r.stderr).lower(), out(r))
        R.note(f"as {stranger}: {out(r)}")

    # an invalid config is refused by the reload; the running mount stays
    t.write(cfg, config_text(stor, mnt) + "\n[[ays]]\nid = 1\n")
    t.reload()
    st = t.status() or {}
    R.check("an invalid config on reload is refused and reported (status: config_error)",
            bool(st.get("daemon", {}).get("config_error")), json.dumps(st.get("daemon")))
    r = t.run(["cat", f"{mnt}/hello.txt"])
    R.check("...and the mount keeps serving", r.returncode == 0 and r.stdout.startswith("hello"), out(r))
    t.write(cfg, config_text(stor, mnt))
    t.reload()
    st = t.status() or {}
    R.check("a valid config again clears the error", not st.get("daemon", {}).get("config_error"))

    # a crash: the mounts are left dead; the restart removes them and mounts again
    t.crash_and_restart()
    up = wait_for(lambda: t.mount_state() == "up", 30, 0.5)
    R.check("after a crash and restart the mount is up again", bool(up), json.dumps(t.status())[:2000])
    r = t.run(["/usr/bin/python3", f"{share}/test_installed.py", "verify-tree", src, mnt])
    R.check("...and reads correctly", r.returncode == 0, out(r))

    if isinstance(t, NspawnTarget):
        # a reader through `systemctl restart` and a SIGKILL that Restart=on-failure recovers:
        # the next process resumes the FUSE connection from the fd store (aysfsd.fuse.handover)
        stopf = f"{share}/stop-reader"
        r = t.run(["sh", "-c",
                   f'rm -f "{stopf}"; /usr/bin/python3 "{share}/test_installed.py" through-restarts "{src}" "{mnt}" '
                   f'"{stopf}" > "{share}/reader.out" 2>&1 & reader=$!; sleep 1; '
                   'systemctl restart aysfsd; sleep 2; '
                   'systemctl kill -s KILL aysfsd; sleep 1; '
                   'for i in $(seq 1 100); do systemctl is-active -q aysfsd && break; sleep 0.1; done; sleep 2; '
                   f'touch "{stopf}"; wait $reader; rc=$?; cat "{share}/reader.out"; exit $rc'], timeout=180)
        R.check("a reader through systemctl restart and a SIGKILL: no error, its open file reads on",
                r.returncode == 0, out(r) + "\n" + t.journal()[-3000:])
        R.note(f"reader through the restarts: {r.stdout.strip()}")
        j = t.journal()
        R.check("...both restarts resumed the FUSE session (no stale mount removed)",
                j.count("resuming the FUSE session") >= 2 and "removed stale mount" not in j.split("resuming")[-1],
                j[-3000:])

    rc = t.stop()
    R.check("stop: aysfsd exits 0", rc == 0, str(rc))
    # this daemon's mounts only: other aysfs daemons (a test suite, a bench) may run on the host
    left = [m for m in aysfs_mounts(t.mountinfo()) if m.startswith((f"{share}/", "/run/aysfs/"))]
    R.check("stop: no aysfs mount remains", not left, "\n".join(left))
    r = t.run(["sh", "-c", f'ls -A "{mnt}" | wc -l'])
    R.check(f"stop: {mnt} is an empty directory again", r.stdout.strip() == "0", out(r))
    t.after_stop()
    r = t.run(["sh", "-c", f'rm -f "{CONF}" && cp -p "{share}/aysfs.toml.orig" "{CONF}" && cmp "{CONF}" '
               f'/dev/stdin < "{share}/aysfs.toml.orig" && test ! -L "{CONF}"'])
    R.check(f"{CONF} restored (the shipped file, not a symlink)", r.returncode == 0, out(r))


def fast_path(t: Target, when: str) -> None:
    """The daemon runs the package's private patched pyfuse3, its session the kernel's no_open mode."""
    d = (t.status() or {}).get("daemon", {})
    info = d.get("pyfuse3") or {}
    R.check(f"{when}aysfsd runs the private patched pyfuse3 ({PYFUSE3_DIR}) and a no_open session",
            str(info.get("path", "")).startswith(f"{PYFUSE3_DIR}/pyfuse3") and info.get("patched") is True
            and d.get("no_open") is True, json.dumps({k: d.get(k) for k in ("pyfuse3", "no_open", "fuse_mode")}))


# -- an upgrade N -> N+1 under a reader ------------------------------------------------------------

def reader(mnt: Path, name: str, stop: Path) -> int:
    """Keep `name` open and read 64 KiB of it at a moving offset, and list `mnt`, every 0.2 s
    until `stop` exists (at most 3 minutes); print the counts and errors as JSON."""
    counts: dict[str, Any] = {"listings": 0, "reads": 0, "errors": [], "longest_pause": 0.0}
    with open(mnt / name, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        off = 0
        deadline = time.monotonic() + 180
        while not stop.exists() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                if name not in os.listdir(mnt):
                    counts["errors"].append(f"listing without {name}")
                counts["listings"] += 1
            except OSError as e:
                counts["errors"].append(f"listdir: {e}")
            try:
                if len(os.pread(f.fileno(), 65536, off)) != min(65536, size - off):
                    counts["errors"].append(f"short read at {off}")
                counts["reads"] += 1
            except OSError as e:
                counts["errors"].append(f"read at {off}: {e}")
            off = (off + 1_048_573) % size
            counts["longest_pause"] = max(counts["longest_pause"], time.monotonic() - t0)
            time.sleep(0.2)
    print(json.dumps(counts))
    return 0


# -- phases ---------------------------------------------------------------------------------------

def dpkg_installed(pkg: str) -> bool:
    r = run(["dpkg-query", "-W", "-f=${Status}", pkg])
    return r.returncode == 0 and "install ok installed" in r.stdout


def install(deb: Path) -> None:
    R.head(f"install {deb.name} on this machine")
    env = dict(BASE_ENV, DEBIAN_FRONTEND="noninteractive")
    tools = [pkg for tool, pkg in (("man", "man-db"), ("systemd-analyze", "systemd"), ("useradd", "passwd"))
             if not shutil.which(tool, path=SYS_PATH)]
    if tools:  # what the checks below use
        run([*APT_LOCKED, "apt-get", "install", "-y", "-q", "--no-install-recommends", *tools], env=env, timeout=600)
    MARKER.write_text(f"{deb}\n")
    cmd = [*APT_LOCKED, "apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb.resolve())]
    r = run(cmd, env=env, timeout=600)
    if r.returncode != 0:  # e.g. no package lists yet on a fresh machine
        run([*APT_LOCKED, "apt-get", "update", "-qq"], env=env, timeout=600)
        r = run(cmd, env=env, timeout=600)
    must(f"apt-get install -y ./{deb.name}", r.returncode == 0, out(r)[-3000:])

    listing = run(["dpkg", "-L", PACKAGE]).stdout
    R.note("dpkg -L aysfs:\n" + listing)
    R.note("Depends: " + run(["dpkg-query", "-W", "-f=${Depends}", PACKAGE]).stdout)
    files = set(listing.split("\n"))
    missing = [f for f in EXPECTED_FILES if f not in files and f + ".gz" not in files]  # dh_compress: docs > 4 KiB
    R.check("dpkg -L aysfs has the binaries, unit, config, man pages, vendored module, docs",
            not missing, f"missing: {missing}")
    conff = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    R.check(f"{CONF} is a conffile", CONF in conff, conff)
    try:
        grp.getgrnam("aysfs")
        R.check("postinst created the system group aysfs", True)
    except KeyError:
        R.check("postinst created the system group aysfs", False)
    wants = Path("/etc/systemd/system/multi-user.target.wants/aysfsd.service")
    R.check("the unit is enabled (multi-user.target.wants/aysfsd.service)",
            wants.is_symlink() and os.readlink(wants) == UNIT, str(wants))
    r = run(["systemd-analyze", "verify", UNIT])
    R.check(f"systemd-analyze verify {UNIT}: clean", r.returncode == 0 and not (r.stdout + r.stderr).strip(), out(r))
    r = run(["/usr/bin/aysfsd", "--check", "--config", CONF])
    R.check(f"aysfsd --check --config {CONF}: zero mounts", r.returncode == 0 and "0 mounts" in r.stdout, out(r))
    text = Path(CONF).read_text()
    keys = [line for line in text.splitlines() if line and not line.startswith("#")]
    R.check("the shipped config sets nothing (every key commented out)", not keys, "\n".join(keys))
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(re.sub(r"(?m)^# (?=\[|[a-z_.]+ = )", "", text))
        f.flush()
        r = run(["/usr/bin/aysctl", "config", "check", f.name])
        R.check("the shipped config's examples, uncommented, pass aysctl config check", r.returncode == 0, out(r))
    for page in ("aysfsd", "aysctl", "aysfs.toml"):
        r = run(["man", "--warnings", page], env=dict(BASE_ENV, MANWIDTH="80", MAN_KEEP_FORMATTING="0"))
        R.check(f"man {page}: renders without warnings", r.returncode == 0 and not r.stderr.strip()
                and len(r.stdout) > 500, out(r)[:2000] if r.stderr or r.returncode else "")
    r = run(["/usr/bin/aysctl", "--help"])
    R.check("aysctl --help", r.returncode == 0 and "publish" in r.stdout, out(r))
    man_in_step()
    r = run(["/usr/bin/aysctl", "status", "--socket", "/run/aysfs-test-nothing.sock"])
    R.check("aysctl status without a daemon: exit 3, 'not running'",
            r.returncode == 3 and "not running" in r.stderr, out(r))
    # the path /usr/bin/aysfsd sets up (packaging/debian/scripts/aysfsd)
    probe = ("import sys; sys.path.append('/usr/share/aysfs/vendor')\n"
             f"from aysfsd.fuse import lib as fuselib; fuselib.use_private({PYFUSE3_DIR!r})\n"
             "import aysfsd, aysctl, importlib.metadata as m, inotify_simple, pyfuse3\n"
             "print(aysfsd.__file__); print(inotify_simple.__file__)\n"
             "print(pyfuse3.__file__, pyfuse3.__version__, fuselib.patched(), getattr(pyfuse3, 'AYSFS_INTERRUPT', 0) >= 1,"
             " repr(fuselib.describe()['fallback']))\n"
             "print(' '.join(f'{d}={m.version(d)}' for d in ('trio','httpx','redis','paramiko','rich','lmdb')))")
    r = run(["/usr/bin/python3", "-c", probe])
    lines = r.stdout.splitlines() + ["", "", ""]
    R.check("aysfsd comes from Debian's dist-packages, inotify_simple from /usr/share/aysfs/vendor",
            r.returncode == 0 and lines[0].startswith("/usr/lib/python3/dist-packages/aysfsd/")
            and lines[1].startswith("/usr/share/aysfs/vendor/"), out(r))
    R.check(f"aysfsd's pyfuse3 is the package's private build with every patch of build.sh ({PYFUSE3_DIR}, "
            "NO_OPEN_PATCH, AYSFS_INTERRUPT)",
            r.returncode == 0 and lines[2].startswith(f"{PYFUSE3_DIR}/pyfuse3/") and " True True " in lines[2], out(r))
    R.note(f"pyfuse3: {lines[2]}; Debian's libraries in use: {lines[3]}")


def _help_words(argv: list[str]) -> tuple[set[str], set[str]]:
    """The long options and (recursively) the subcommands in `argv --help`."""
    text = run([*argv, "--help"], env=dict(BASE_ENV, COLUMNS="200")).stdout
    opts = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)) - {"--help"}
    cmds: set[str] = set()
    m = re.search(r"^\s+\{([a-z0-9,-]+)\}", text, re.M)
    for sub in (m.group(1).split(",") if m else []):
        cmds.add(" ".join([*argv[1:], sub]))
        sub_opts, sub_cmds = _help_words([*argv, sub])
        opts |= sub_opts
        cmds |= sub_cmds
    return opts, cmds


def man_in_step() -> None:
    """The installed man pages name every option and command of --help, and every config key."""
    def page(name: str) -> str:
        # ASCII output (LANG=C), wide lines and no hyphenation (HY=0): names stay whole
        text = run(["man", name], env=dict(BASE_ENV, LANG="C", MANWIDTH="200", MANROFFOPT="-rHY=0")).stdout
        return re.sub(r"\s+", " ", text)

    for prog, name in (("/usr/bin/aysctl", "aysctl"), ("/usr/bin/aysfsd", "aysfsd")):
        opts, cmds = _help_words([prog])
        text = page(name)
        missing = sorted(o for o in opts if o not in text) + sorted(c for c in cmds if c not in text)
        R.check(f"man {name} names every option and command of {name} --help", not missing, f"missing: {missing}")
    r = run(["/usr/bin/python3", "-c", "from aysfsd.config import _TOP_KEYS\n"
             "for t, keys in _TOP_KEYS.items():\n    print(t, *keys)"])
    text = page("aysfs.toml")
    missing = []
    for line in r.stdout.splitlines():
        table, *keys = line.split()
        if f"[{table}]" not in text:
            missing.append(f"[{table}]")
        missing += [f"{table}.{k}" for k in keys if not re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", text)]
    R.check("man aysfs.toml names every table and key that aysfsd.config accepts",
            r.returncode == 0 and not missing, f"missing: {missing} {r.stderr}")


def host_phase(work: Path, script: Path) -> None:
    R.head("the unit's commands on this machine, as systemd would run them")
    t = HostTarget(work)
    saved = work / "aysfs.toml.orig"
    shutil.copy2(CONF, saved)
    try:
        t.start()
        scenario(t, script)
        log = t.log()
        R.check("aysfsd's log has no traceback", "Traceback" not in log, log[-3000:])
        R.note("aysfsd log (last lines):\n" + "\n".join(log.splitlines()[-12:]))
    finally:
        t.kill_leftovers()
        for m in aysfs_mounts(Path("/proc/self/mountinfo").read_text()):
            if m.startswith(str(work)) or m.startswith("/run/aysfs"):
                subprocess.run(["umount", "-l", m], capture_output=True)
        t._remove_runtime_dir()  # as systemd does when the service stops
        if os.path.islink(CONF) or not os.path.exists(CONF):  # the scenario stopped before restoring it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(CONF)
            shutil.copy2(saved, CONF)


class RepoServer:
    """nginx on loopback serving one apt repository directory at a time (`use` switches which),
    as an operator's web server would."""

    def __init__(self, work: Path, repos: dict[str, Path]) -> None:
        self.dir = work / "apt"
        self.dir.mkdir(mode=0o755, parents=True)
        for name, repo in repos.items():
            shutil.copytree(repo, self.dir / name)
        self.www = self.dir / "www"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def use(self, name: str) -> None:
        tmp = self.dir / "www.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name)
        tmp.rename(self.www)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        d = self.dir
        (d / "nginx.conf").write_text(
            f"worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{ worker_connections 64; }}\n"
            f"http {{\n  access_log {d}/access.log;\n  server {{ listen 127.0.0.1:{self.port}; root {self.www}; }}\n}}\n")
        self.proc = subprocess.Popen(["nginx", "-e", f"{d}/error.log", "-c", f"{d}/nginx.conf", "-g", "daemon off;"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=BASE_ENV, start_new_session=True)

        def up() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
                return True
            return False
        must(f"nginx serves the apt repository on 127.0.0.1:{self.port}", bool(wait_for(up, 10)),
             (d / "error.log").read_text(errors="replace") if (d / "error.log").exists() else "")

    def requests(self) -> list[str]:
        """The paths asked for so far (access log)."""
        try:
            lines = (self.dir / "access.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [urllib.parse.unquote(m.group(1)) for m in (re.search(r'"GET (\S+)', x) for x in lines) if m]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def repo_deb(repo: Path, release: str) -> Path | None:
    """The newest .deb of `release` in an apt repository made by packaging/apt-repo.sh."""
    debs = sorted((repo / "pool" / "main" / release).glob(f"{PACKAGE}_*.deb"),
                  key=lambda d: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", d.name)])
    return debs[-1] if debs else None


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def nspawn_rootfs(release: str, deb: Path) -> tuple[Path | None, str]:
    """A Debian tree with systemd and the package's dependencies (packaging/debian_tree.py: made
    once, cached in /var/cache/aysfs-ci), so that the test installs the package, not Debian."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import debian_tree  # beside this script; not needed by `verify-tree` in a container

    deps = sorted({re.split(r"[\s(:|]", d.strip())[0] for d in deb_field(deb, "Depends").split(",") if d.strip()})
    try:
        return debian_tree.tree(release, deps)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        return None, str(e)


def container_install(t: NspawnTarget, server: RepoServer, release: str, version: str) -> None:
    """What an operator types: the key, a sources entry with Signed-By, apt-get update, install."""
    apt_env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    shutil.copy(server.www / "aysfs-archive-keyring.gpg", t.share / "keyring.gpg")
    entry = (f"Types: deb\nURIs: http://127.0.0.1:{server.port}/\nSuites: {release}\nComponents: main\n"
             "Signed-By: {}\n")
    # a signature apt cannot check against the given key must be refused
    t.write("/etc/apt/sources.list.d/aysfs.sources", entry.format("/usr/share/keyrings/debian-archive-keyring.gpg"))
    r = t.run(["apt-get", "update", "-q"], timeout=300)
    R.check("with another key as Signed-By, apt-get update refuses the repository (not signed by it)",
            r.returncode != 0 and ("NO_PUBKEY" in r.stdout + r.stderr or "not signed" in r.stdout + r.stderr),
            out(r)[-2000:])
    r = t.run(["cp", f"{t.share_in}/keyring.gpg", KEYRING])
    must(f"{KEYRING} from the repository's aysfs-archive-keyring.gpg", r.returncode == 0, out(r))
    t.write("/etc/apt/sources.list.d/aysfs.sources", entry.format(KEYRING))
    before = len(server.requests())
    r = t.run(["apt-get", "update", "-q"], timeout=300)
    must("apt-get update with the aysfs sources entry (signature checked)",
         r.returncode == 0 and "W:" not in r.stdout + r.stderr, out(r)[-2000:])
    r = t.run([*apt_env, "apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE], timeout=600)
    must(f"apt-get install {PACKAGE} in the container (from http://127.0.0.1:{server.port}/ {release})",
         r.returncode == 0, out(r)[-3000:])
    got = server.requests()[before:]
    R.note(f"apt fetched from the repository: {' '.join(got)}")
    R.check(f"the package came through nginx: {release}'s InRelease and the .deb were requested",
            f"/dists/{release}/InRelease" in got and any(g.endswith(".deb") and f"/{release}/" in g for g in got),
            str(got))
    installed = t.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE]).stdout.strip()
    R.check(f"dpkg: {PACKAGE} {version} installed (Debian {RELEASES[release]}'s build)", installed == version,
            installed)


def upgrade(t: NspawnTarget, server: RepoServer, next_version: str) -> None:
    """N -> N+1 through the repository, as an operator upgrades, under a reader (its file open,
    reading it at moving offsets, listing the mount): the package's restart hands the FUSE
    session over to the new version and the reader sees no error."""
    share = t.share_in
    stor, mnt = f"{share}/stor", f"{share}/mnt/{MOUNT_NAME}"
    t.write(CONF, config_text(stor, mnt))
    t.start()
    up = wait_for(lambda: t.mount_state() == "up", 30, 0.5)
    must("upgrade: the mount is up before the upgrade (config in /etc/aysfs/aysfs.toml)", bool(up),
         t.journal()[-2000:])
    pid = t.main_pid()
    old_py = (t.status() or {}).get("daemon", {}).get("version")
    j0 = t.journal()
    resumed = j0.count("resuming the FUSE session")
    mounts0 = t.run(["grep", "-E", "fuse|aysfs", "/proc/self/mountinfo"]).stdout
    stop = f"{share}/reader.stop"
    t.run(["rm", "-f", stop])
    rd = t.popen(["/usr/bin/python3", f"{share}/test_installed.py", "reader", mnt, "big.bin", stop])
    time.sleep(2)
    server.use("next")
    before = len(server.requests())
    r = t.run(["apt-get", "update", "-q"], timeout=300)
    R.check("apt-get update sees the next version", r.returncode == 0, out(r)[-2000:])
    upstream = next_version.rsplit("+deb", 1)[0]
    r = t.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q", "--only-upgrade", PACKAGE],
              timeout=600)
    R.check(f"apt-get install --only-upgrade {PACKAGE} through the repository ({old_py} -> {upstream})",
            r.returncode == 0, out(r)[-3000:])
    R.check("the upgrade came through nginx (the new .deb was requested)",
            any(g.endswith(".deb") and f"_{next_version}_" in g for g in server.requests()[before:]),
            str(server.requests()[before:]))
    installed = t.run(["dpkg-query", "-W", "-f=${Version}", PACKAGE]).stdout.strip()
    R.check(f"dpkg: {PACKAGE} {next_version} installed", installed == next_version, installed)
    wait_for(lambda: t.mount_state() == "up", 30, 0.5)
    time.sleep(2)
    t.run(["touch", stop])
    try:
        rout, rerr = rd.communicate(timeout=60)
        counts = json.loads(rout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        rd.kill()
        rout, rerr = rd.communicate()
        counts = {"errors": [f"the reader did not report: {rout} {rerr}"], "listings": 0, "reads": 0}
    R.note(f"reader through the upgrade: {counts}")
    st = (t.status() or {}).get("daemon", {})
    j = t.journal()
    R.check(f"upgrade: the package restarted aysfsd into {upstream}, which resumed the FUSE session",
            t.main_pid() not in (0, pid) and st.get("version") == upstream and not st.get("upgrade")
            and j.count("resuming the FUSE session") > resumed,
            f"MainPID {pid} -> {t.main_pid()}; {json.dumps(st)}\n" + j[-2000:])
    R.check("upgrade: the reader kept its file open, read and listed with zero errors",
            not counts["errors"] and counts["listings"] > 5 and counts["reads"] > 5,
            json.dumps(counts) + "\nmounts before the upgrade (for a failure's diagnosis):\n" + mounts0
            + "\njournal of the daemon before the upgrade (its end):\n" + j0[-4000:])
    r = t.run(["/usr/bin/python3", f"{share}/test_installed.py", "verify-tree", f"{share}/src", mnt])
    R.check("after the upgrade the mount serves the published tree", r.returncode == 0, out(r))
    fast_path(t, "after the upgrade ")
    t.stop()
    r = t.run(["sh", "-c", f'cp -p "{share}/aysfs.toml.orig" "{CONF}"'])
    R.check(f"{CONF} restored", r.returncode == 0, out(r))


def nspawn_phase(work: Path, release: str, repo: Path | None, next_repo: Path | None, script: Path,
                 mode: str) -> None:
    n = RELEASES[release]
    R.head(f"a real systemd: Debian {n} ({release}) in systemd-nspawn, aysfs through the apt repository")
    if mode == "no":
        R.skip(f"nspawn {release}", "--nspawn no")
        return
    deb = repo_deb(repo, release) if repo else None
    if repo is None or deb is None:
        R.check(f"the apt repository has a Debian {n} build", False, f"--repo {repo}: no pool/main/{release}/*.deb")
        return
    version = deb_field(deb, "Version")
    rootfs, how = nspawn_rootfs(release, deb)
    if rootfs is None:
        if mode == "yes":
            R.check(f"a Debian {n} tree for nspawn", False, how)
        else:
            R.skip(f"nspawn {release}", how)
        return
    R.note(f"rootfs {rootfs} ({how})")
    repos = {"current": repo}
    if next_repo is not None:
        repos["next"] = next_repo
    server = RepoServer(work / release, repos)
    t = NspawnTarget(work, release, rootfs)
    try:
        server.use("current")
        server.start()
        ok, why = t.boot()
        if not ok:
            if mode == "yes":
                R.check("systemd boots in the container", False, why)
            else:
                R.skip(f"nspawn {release}", why)
            return
        R.check(f"systemd boots in the container ({why})", True)
        R.note(t.run(["sh", "-c", ". /etc/os-release; echo $PRETTY_NAME; systemctl --version | head -1; "
                      "python3 --version"]).stdout)
        container_install(t, server, release, version)
        R.check("systemctl is-enabled aysfsd: enabled", t.systemctl("is-enabled").stdout.strip() == "enabled")
        active = wait_for(lambda: t.systemctl("is-active").stdout.strip() == "active", 30)
        must("the package's postinst started aysfsd with the shipped config (is-active)", bool(active),
             t.systemctl("status", "--no-pager").stdout + t.journal())
        show = t.systemctl("show", "-p", "Type", "-p", "WatchdogUSec", "-p", "NotifyAccess", "-p", "Restart").stdout
        R.note(show)
        R.check("systemd runs it as Type=notify with a 30 s watchdog",
                "Type=notify" in show and "WatchdogUSec=30s" in show, show)
        st = t.run(["cat", f"/proc/{t.main_pid()}/status"]).stdout
        R.check("the unit's sandboxing is in force: NoNewPrivs 1, a seccomp filter (Seccomp: 2)",
                re.search(r"^NoNewPrivs:\s+1$", st, re.M) is not None and re.search(r"^Seccomp:\s+2$", st, re.M)
                is not None, st)
        r = t.run(["systemd-analyze", "security", "--no-pager", "aysfsd.service"])
        R.note("systemd-analyze security aysfsd: " + (r.stdout.strip().splitlines() or ["?"])[-1])
        r = t.run(["systemd-analyze", "verify", UNIT])
        R.check(f"systemd-analyze verify {UNIT} (Debian {n}'s systemd): clean",
                r.returncode == 0 and not (r.stdout + r.stderr).strip(), out(r))
        r = t.run(["man", "--warnings", "aysctl"])
        R.check("man aysctl works in the container", r.returncode == 0 and "aysctl" in r.stdout, out(r)[:500])
        scenario(t, script)
        j = t.journal()
        for what in ("ready", "SIGHUP: reloading", "stopped"):
            R.check(f"journalctl -u aysfsd shows '{what}'", what in j)
        R.check("journalctl -u aysfsd: no traceback", "Traceback" not in j, j[-3000:])
        denied = [line for line in j.splitlines() if "not permitted" in line or "EPERM" in line]
        R.check("journalctl -u aysfsd: nothing refused by the sandbox ('Operation not permitted')",
                not denied, "\n".join(denied))
        R.note("journalctl -u aysfsd (last lines):\n" + "\n".join(j.splitlines()[-25:]))
        nxt = repo_deb(next_repo, release) if next_repo else None
        if nxt is None:
            R.skip(f"upgrade on {release}", "no --next-repo with a build for it")
        else:
            with contextlib.suppress(Abort):
                upgrade(t, server, deb_field(nxt, "Version"))
        r = t.run(["apt-get", "purge", "-y", "-q", PACKAGE], timeout=300)
        R.check("apt-get purge aysfs in the container", r.returncode == 0, out(r)[-2000:])
        left = aysfs_mounts(t.mountinfo())
        R.check("purge stopped aysfsd: no aysfs mount remains", not left, "\n".join(left))
        r = t.run(["sh", "-c", "ls -d /etc/aysfs /var/cache/aysfs /usr/bin/aysfsd "
                   "/etc/systemd/system/multi-user.target.wants/aysfsd.service 2>/dev/null; getent group aysfs"])
        left = r.stdout.split()
        R.check("purge removed /etc/aysfs, /var/cache/aysfs, the binaries and the enablement; kept the group",
                len(left) == 1 and left[0].startswith("aysfs:"),
                r.stdout + t.run(["find", "/etc/aysfs", "/var/cache/aysfs"]).stdout)
    finally:
        t.shutdown()
        server.stop()


def purge_phase(group_existed: bool) -> None:
    R.head("apt-get purge aysfs on this machine")
    r = run([*APT_LOCKED, "apt-get", "purge", "-y", "-q", PACKAGE], env=dict(BASE_ENV, DEBIAN_FRONTEND="noninteractive"),
            timeout=300)
    R.check("apt-get purge -y aysfs", r.returncode == 0, out(r)[-2000:])
    gone = ["/usr/bin/aysfsd", "/usr/bin/aysctl", UNIT, "/etc/aysfs", "/var/cache/aysfs",
            "/usr/share/aysfs", "/etc/systemd/system/multi-user.target.wants/aysfsd.service"]
    left = [p for p in gone if os.path.lexists(p)]
    R.check("purge removed the files, /etc/aysfs, /var/cache/aysfs and the enablement", not left, str(left))
    try:
        grp.getgrnam("aysfs")
        R.check("purge keeps the aysfs group (policy: README.Debian)", True)
        if not group_existed:
            subprocess.run(["delgroup", "--quiet", "--system", "aysfs"], capture_output=True)
            with contextlib.suppress(KeyError):
                grp.getgrnam("aysfs")
                R.check("removed the aysfs group this test created", False)
    except KeyError:
        R.check("purge keeps the aysfs group (policy: README.Debian)", False)
    MARKER.unlink(missing_ok=True)


def through_restarts(src: Path, mnt: Path, stop: Path) -> int:
    """In the container: hold big.bin open (one chunk read), list and read the mount every 20 ms
    until `stop` appears, then read the rest of big.bin; print counts, exit 1 on any error."""
    want = (src / "big.bin").read_bytes()
    held = open(mnt / "big.bin", "rb")
    ok = errors = 0
    longest = 0.0
    last = time.monotonic()
    problems: list[str] = []
    assert held.read(4096) == want[:4096]
    deadline = time.monotonic() + 120
    while not stop.exists() and time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            names = os.listdir(mnt)
            assert "hello.txt" in names, f"listing {names}"
            assert (mnt / "hello.txt").read_text() == "hello from the installed aysfs\n", "content"
            os.stat(mnt / "a" / "b" / "c" / "deep.txt")
            ok += 1
        except Exception as e:  # noqa: BLE001 (counted and reported)
            errors += 1
            if len(problems) < 5:
                problems.append(repr(e))
        longest = max(longest, time.monotonic() - t0, time.monotonic() - last - 0.02)
        last = time.monotonic()
        time.sleep(0.02)
    rest = held.read()
    if rest != want[4096:]:
        errors += 1
        problems.append(f"the held big.bin read {len(rest)} bytes after the restarts, not the published ones")
    print(f"ok {ok} errors {errors} longest_pause {longest:.2f}s {'; '.join(problems)}")
    return 1 if errors or not ok else 0


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "through-restarts":
        return through_restarts(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    if len(sys.argv) >= 2 and sys.argv[1] == "reader":
        return reader(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    if len(sys.argv) >= 2 and sys.argv[1] == "verify-tree":
        problems = verify_tree(Path(sys.argv[2]), Path(sys.argv[3]))
        print("\n".join(problems) or "tree OK")
        return 1 if problems else 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("deb", type=Path, help="the .deb to install on this machine (built for its release)")
    p.add_argument("--repo", type=Path, help="the apt repository (make apt-repo) the containers install from")
    p.add_argument("--next-repo", type=Path, help="an apt repository with the next version: the upgrade test")
    p.add_argument("--releases", default="bookworm,trixie", help="the Debian releases booted in nspawn")
    p.add_argument("--nspawn", choices=["auto", "yes", "no"], default=os.environ.get("AYSFS_TEST_NSPAWN", "auto"),
                   help="also test under a real systemd in systemd-nspawn: auto (when it boots), yes (must), no")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("test_installed: run as root (it installs a package and mounts)", file=sys.stderr)
        return 2
    args.deb = args.deb.resolve()
    args.repo = args.repo.resolve() if args.repo else None
    args.next_repo = args.next_repo.resolve() if args.next_repo else None
    if not args.deb.is_file():
        print(f"test_installed: no such .deb: {args.deb} (make deb)", file=sys.stderr)
        return 2
    if dpkg_installed(PACKAGE) and not MARKER.exists():
        print("test_installed: aysfs is installed on this machine and not by this test; it would be purged. "
              f"Remove it first (apt-get purge aysfs), or create {MARKER} to allow it.", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        grp.getgrnam("aysfs")
        group_existed = True
    except KeyError:
        group_existed = False
    work = Path(tempfile.mkdtemp(prefix="aysfs-test-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # the test users read the config through it
    script = Path(__file__).resolve()
    try:
        (work / "host").mkdir(mode=0o755)
        phases: list[Callable[[], None]] = [lambda: install(args.deb), lambda: host_phase(work / "host", script)]
        phases += [functools.partial(nspawn_phase, work, rel, args.repo, args.next_repo, script, args.nspawn)
                   for rel in args.releases.split(",") if rel]
        for i, phase in enumerate(phases):
            if i == 1 and not dpkg_installed(PACKAGE):
                continue  # the host phase needs the host install (the containers do not)
            try:
                phase()
            except Abort as e:
                R.note(f"phase aborted: {str(e).splitlines()[0]}")
            except Exception:  # a bug here or an unexpected state: reported, the other phases still run
                R.check("the phase ran to its end", False, traceback.format_exc())
    finally:
        try:
            if dpkg_installed(PACKAGE):
                purge_phase(group_existed)
        finally:
            busy = [m for m in aysfs_mounts(Path("/proc/self/mountinfo").read_text()) if m.startswith(str(work))]
            if not busy:
                subprocess.run(["rm", "-rf", "--one-file-system", str(work)], capture_output=True)
    print("\n" + R.summary())
    print(f"\n{R.passed + len(R.failed)} checks in {time.monotonic() - t0:.0f} s"
          + (f"; skipped: {', '.join(R.skipped)}" if R.skipped else ""))
    for f in R.failed:
        print(f"FAILED: {f}")
    print(f"{R.passed} passed, {len(R.failed)} failed")
    return 1 if R.failed else 0


if __name__ == "__main__":
    sys.exit(main())
