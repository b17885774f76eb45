"""Kernel mounts around the FUSE session: bind mounts onto mountpoints, unmounts, stale cleanup."""

from __future__ import annotations

import logging
import os
import subprocess

import trio

from ..daemon import instance

log = logging.getLogger("aysfsd.mount")

FSNAME = "aysfs"


def _unescape(field: str) -> str:
    """/proc/self/mountinfo escapes space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape")


def _mountinfo() -> list[tuple[str, str, str, bool]]:
    """(mount point, device, root within the filesystem, ours?) of every mount."""
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                fstype, source = (right.split() + ["", ""])[:2]
                ours = fstype in ("fuse.aysfs", "fuse") and source == FSNAME
                out.append((_unescape(fields[4]), fields[2], _unescape(fields[3]), ours))
    except OSError:
        pass
    return out


def our_mounts() -> list[str]:
    """Mount points of this filesystem (the session and its bind mounts), deepest first."""
    found = [mp for mp, _, _, ours in _mountinfo() if ours]
    return sorted(set(found), key=len, reverse=True)


def is_mounted(path: str) -> bool:
    # no realpath(): a stat of our own mount from the daemon's thread would wait on itself
    return os.path.normpath(path) in {os.path.normpath(p) for p in our_mounts()}


def unmount_session(path: str) -> None:
    """Unmount the FUSE session root of a resumed session (libfuse did not mount it, so it
    does not unmount it either)."""
    r = subprocess.run(["umount", "-l", path], capture_output=True, text=True)
    if r.returncode != 0 and is_mounted(path):
        log.error("could not unmount %s: %s", path, r.stderr.strip())


def owner(path: str) -> int | None:
    """The pid of another live aysfsd whose FUSE session serves the mount at `path`, else None.

    A bind mount shares its device with the session mounted (root "/") at that daemon's
    fuse_root, and a live daemon holds the lock of its fuse_root (see instance.py)."""
    info = _mountinfo()
    devs = {dev for mp, dev, _, ours in info if ours and mp == os.path.normpath(path)}
    for mp, dev, root, ours in info:
        if ours and dev in devs and root == "/":
            pid = instance.holder("fuse_root", mp)
            if pid is not None and pid != os.getpid():
                return pid
    return None


def cleanup_stale(paths: list[str]) -> list[str]:
    """Lazily unmount leftovers of a dead daemon at `paths` (or below them); a mount served by
    another live daemon is left alone."""
    cleaned = []
    for mp in our_mounts():
        if any(mp == p or mp.startswith(p.rstrip("/") + "/") for p in paths):
            pid = owner(mp)
            if pid is not None:
                log.warning("%s is served by the running aysfsd pid %d: left alone", mp, pid)
                continue
            r = subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
            if r.returncode == 0:
                cleaned.append(mp)
                log.warning("removed stale mount %s left by an earlier run", mp)
            else:
                log.error("could not remove stale mount %s: %s", mp, r.stderr.strip())
    return cleaned


def set_read_ahead(mountpoint: str, kb: int) -> bool:
    """Raise the kernel's read-ahead for a FUSE mount (its bdi): bigger sequential reads reach
    the daemon, since pyfuse3 cannot raise max_read. Found via mountinfo, without touching the
    mount itself (a stat of our own mount from the daemon's thread would wait on itself)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if _unescape(fields[4]) == mountpoint:
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as ra:
                        ra.write(f"{kb}\n")
                    return True
    except OSError as e:
        log.warning("could not set read_ahead_kb of %s: %s", mountpoint, e)
    return False


class MountError(Exception):
    pass


async def _run(*cmd: str, env: dict[str, str] | None = None) -> None:
    r = await trio.run_process(list(cmd), capture_stdout=True, capture_stderr=True, check=False,
                               env={**os.environ, **env} if env else None)
    if r.returncode != 0:
        raise MountError(f"{' '.join(cmd)}: {r.stderr.decode(errors='replace').strip() or r.returncode}")


async def bind(source: str, target: str, read_only: bool) -> None:
    """Bind `source` (a mount top in the session) onto `target`; the session must be serving."""
    os.makedirs(target, exist_ok=True)
    await _run("mount", "--bind", source, target)
    if read_only:
        try:
            await _run("mount", "-o", "remount,bind,ro", target)
        except MountError:
            await unbind(target)
            raise


async def remount_rw(mountpoint: str) -> None:
    """Make the FUSE session's superblock writable (its read-only bind mounts stay read-only).

    With the classic mount(2) call: util-linux 2.39+ (Debian 13) remounts through the new mount
    API by default, which leaves a FUSE superblock read-only while saying it succeeded."""
    await _run("mount", "-i", "-o", "remount,rw", mountpoint, env={"LIBMOUNT_FORCE_MOUNT2": "always"})


async def unbind(target: str) -> bool:
    """Unmount a bind mount; lazily when busy. True when it was unmounted at once."""
    try:
        await _run("umount", target)
        return True
    except MountError as e:
        log.warning("%s is busy (%s): detaching lazily", target, e)
        await _run("umount", "-l", target)
        return False
