#!/usr/bin/python3
"""Debian system trees for the packaging checks, made once and cached between CI steps.

    /usr/bin/python3 packaging/debian_tree.py path RELEASE [PKG...]
    /usr/bin/python3 packaging/debian_tree.py run RELEASE [PKG...] [--bind[-ro] SRC:DST]... -- CMD...

A tree is Debian RELEASE (bookworm, trixie) debootstrapped from Debian's registry with systemd
(bootable by systemd-nspawn), plus PKG... installed with apt-get inside it. Trees are cached in
/var/cache/aysfs-ci/RELEASE/: the debootstrapped base once (rebuilt after MAX_AGE_DAYS, so a
long-lived machine still tests current packages), and one copy of it per package list (its
name is a hash of the list). `path` prints the tree's directory (making it when missing); `run`
runs CMD on it with writes going to memory (systemd-nspawn --volatile=overlay: a tmpfs over the
tree, made in a moment where --ephemeral's copy of a tree takes over a minute), /dev/fuse bound,
the host's network and loopback, and exits with CMD's status. Callers never change a cached tree.

debootstrap and apt-get run under /tmp/aysfs-apt.lock (the lock every apt user here takes);
/var/cache/aysfs-ci/RELEASE.lock keeps two callers from making the same tree at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path(os.environ.get("AYSFS_CI_CACHE", "/var/cache/aysfs-ci"))
MIRROR = os.environ.get("AYSFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
APT_LOCK = "/tmp/aysfs-apt.lock"
MAX_AGE_DAYS = 7
KEEP_LAYERS = 4  # package lists kept per release (the newest used)
BASE = ["systemd", "systemd-sysv", "dbus", "man-db", "passwd", "procps"]
RELEASES = {"bookworm": "12", "trixie": "13"}
SYS_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
ENV = {"PATH": SYS_PATH, "LANG": "C.UTF-8"}


def log(msg: str) -> None:
    print(f"debian-tree: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def flocked(path: str | Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], timeout: float = 1800) -> None:
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout, env=ENV)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}")


def _rm(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _fresh(stamp: Path, want: str) -> bool:
    return (stamp.is_file() and stamp.read_text() == want
            and time.time() - stamp.stat().st_mtime < MAX_AGE_DAYS * 86400)


def need_tools() -> None:
    missing = [pkg for tool, pkg in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container"))
               if not shutil.which(tool, path=SYS_PATH)]
    if missing:
        log(f"installing {' '.join(missing)}")
        with flocked(APT_LOCK):
            _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], 900)


def base_tree(release: str) -> Path:
    """RELEASE debootstrapped with BASE (caller holds the release lock)."""
    d = CACHE / release
    root, stamp = d / "base", d / "base.stamp"
    want = f"{release} {MIRROR} {' '.join(BASE)}\n"
    if root.is_dir() and _fresh(stamp, want):
        return root
    need_tools()
    t0 = time.monotonic()
    tmp = d / "base.tmp"
    _rm(tmp)
    d.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {release} from {MIRROR} into {root}")
    with flocked(APT_LOCK):
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE)}", release, str(tmp), MIRROR])
    stamp.unlink(missing_ok=True)
    _rm(root)
    tmp.rename(root)
    stamp.write_text(want)
    log(f"debootstrapped {release} in {time.monotonic() - t0:.0f} s")
    return root


def tree(release: str, packages: list[str]) -> tuple[Path, str]:
    """The cached tree of RELEASE with `packages` installed, and how it was got."""
    if release not in RELEASES:
        raise SystemExit(f"debian-tree: unknown release {release!r} (known: {', '.join(RELEASES)})")
    CACHE.mkdir(parents=True, exist_ok=True)
    pkgs = sorted(set(packages))
    key = hashlib.sha256(" ".join(pkgs).encode()).hexdigest()[:12]
    d = CACHE / release
    root, stamp = d / key, d / f"{key}.stamp"
    with flocked(CACHE / f"{release}.lock"):
        base = base_tree(release)
        if not pkgs:
            return base, "cached base"
        want = f"{(d / 'base.stamp').stat().st_mtime_ns} {' '.join(pkgs)}\n"
        if root.is_dir() and _fresh(stamp, want):
            os.utime(stamp)  # used: kept longest
            return root, "cached"
        t0 = time.monotonic()
        tmp = d / f"{key}.tmp"
        _rm(tmp)
        _run(["cp", "-a", "--reflink=auto", str(base), str(tmp)])
        log(f"apt-get install in {release} tree: {' '.join(pkgs)}")
        # apt-get inside the tree (debootstrap alone cannot resolve virtual packages such as
        # the ones python3-cffi needs)
        with flocked(APT_LOCK):
            _run(["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "-D", str(tmp),
                  "--setenv=DEBIAN_FRONTEND=noninteractive", "sh", "-c",
                  "apt-get update -qq && apt-get install -y -q --no-install-recommends \"$@\" && apt-get clean",
                  "sh", *pkgs])
        stamp.unlink(missing_ok=True)
        _rm(root)
        tmp.rename(root)
        stamp.write_text(want)
        # forget the package lists not used for the longest time
        stamps = sorted((s for s in d.glob("*.stamp") if s.name != "base.stamp"), key=lambda s: s.stat().st_mtime)
        for old in stamps[:-KEEP_LAYERS]:
            old.unlink()
            _rm(d / old.name.removesuffix(".stamp"))
        return root, f"made in {time.monotonic() - t0:.0f} s"


def run_in(root: Path, cmd: list[str], binds: list[str], binds_ro: list[str], env: list[str]) -> int:
    """CMD in a throw-away copy of `root`: its exit status."""
    # pidfd_getfd, which nspawn's system call filter refuses: the hand-over tests take a
    # daemon's descriptors with it, as systemd's fd store keeps them
    argv = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--volatile=overlay", "--as-pid2",
            "--console=pipe", "--system-call-filter=pidfd_getfd", "--bind=/dev/fuse", "-D", str(root),
            "--setenv=LANG=C.UTF-8", "--setenv=CI=" + os.environ.get("CI", "")]
    argv += [f"--bind={b}" for b in binds] + [f"--bind-ro={b}" for b in binds_ro] + [f"--setenv={e}" for e in env]
    # /proc/sys and /sys writable (SYSTEMD_NSPAWN_API_VFS_WRITABLE): the test suite drops the
    # page cache (/proc/sys/vm/drop_caches) and aysfsd sets a FUSE session's read_ahead_kb
    return subprocess.run([*argv, *cmd], stdin=subprocess.DEVNULL,
                          env=dict(ENV, SYSTEMD_NSPAWN_API_VFS_WRITABLE="1")).returncode


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("path", "run"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    what, release, rest = argv[0], argv[1], argv[2:]
    cmd: list[str] = []
    if "--" in rest:
        i = rest.index("--")
        rest, cmd = rest[:i], rest[i + 1:]
    pkgs: list[str] = []
    binds: list[str] = []
    binds_ro: list[str] = []
    env: list[str] = []
    it = iter(rest)
    for a in it:
        if a in ("--bind", "--bind-ro", "--setenv"):
            {"--bind": binds, "--bind-ro": binds_ro, "--setenv": env}[a].append(next(it))
        else:
            pkgs += a.split()
    root, how = tree(release, pkgs)
    if what == "path":
        print(root)
        return 0
    if not cmd:
        print("debian-tree: run needs a command after --", file=sys.stderr)
        return 2
    log(f"{release} tree {root} ({how})")
    return run_in(root, cmd, binds, binds_ro, env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
