"""`aysctl fuser`: which processes use each mount (what a restart or an unmount would touch).

Walks /proc: every process's working directory, root, executable, open files and mapped
files. Only link targets and /proc/PID/maps are read, never a file on the mount, so a hung
daemon cannot hang this command. A path is on a mount when it is the mountpoint or below it,
or below the mount's directory in the daemon's FUSE session (`fuse_root`/NAME). Paths are as
/proc shows them in this mount namespace: processes in another one are matched by the
paths they see.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from aysctl.client import DEFAULT_CONFIG, DEFAULT_SOCKET, EXIT_USAGE, ControlError, call
from aysfsd.config import ConfigError, MainConfig, load

USES = ("cwd", "root", "exe", "file", "mmap")
STATUS_TIMEOUT = 10.0


@dataclass
class Holder:
    mount: str
    pid: int
    user: str
    command: str
    uses: list[str] = field(default_factory=list)  # of USES, in that order
    paths: list[str] = field(default_factory=list)  # the paths on the mount, each once


def _links(pid: str) -> list[tuple[str, str]]:
    """(use, path) of one process; what cannot be read (gone, not permitted) is left out."""
    base = f"/proc/{pid}"
    out = []
    for use in ("cwd", "root", "exe"):
        try:
            out.append((use, os.readlink(f"{base}/{use}")))
        except OSError:
            pass
    try:
        fds = os.listdir(f"{base}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            out.append(("file", os.readlink(f"{base}/fd/{fd}")))
        except OSError:
            pass
    try:
        with open(f"{base}/maps") as f:
            for line in f:
                parts = line.rstrip("\n").split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    out.append(("mmap", parts[5]))
    except OSError:
        pass
    return [(use, p.removesuffix(" (deleted)")) for use, p in out]


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().rstrip(b"\0").split(b"\0")
        cmd = " ".join(a.decode(errors="replace") for a in args if a)
        if cmd:
            return cmd
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"[{f.read().strip()}]"
    except OSError:
        return "?"


def _user(pid: str) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _on(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def scan(mounts: dict[str, list[str]], proc: str = "/proc") -> list[Holder]:
    """Holders of each mount; `mounts` maps a mount's name to its paths (mountpoint, its
    directory in the FUSE session). This process is left out."""
    me = str(os.getpid())
    holders: list[Holder] = []
    for pid in sorted((p for p in os.listdir(proc) if p.isdigit()), key=int):
        if pid == me:
            continue
        links = _links(pid)
        for name, prefixes in mounts.items():
            hits = [(use, p) for use, p in links if _on(p, prefixes)]
            if not hits:
                continue
            uses = {use for use, _ in hits}
            paths = list(dict.fromkeys(p for _, p in hits))
            holders.append(Holder(name, int(pid), _user(pid), _command(pid), [u for u in USES if u in uses], paths))
    return holders


def as_json(mounts: dict[str, list[str]], holders: list[Holder]) -> dict[str, Any]:
    return {"mounts": {name: paths[0] for name, paths in mounts.items()}, "processes": [asdict(h) for h in holders]}


# -- the command ------------------------------------------------------------------------------


def _targets(args: argparse.Namespace) -> dict[str, list[str]]:
    """Each mount's paths: the running daemon's mounts, else the config's; only MOUNT if given."""
    path = args.config or DEFAULT_CONFIG
    cfg = None
    if args.config or os.path.exists(path):
        try:
            cfg = load(path)
        except ConfigError as e:
            raise ControlError(str(e), EXIT_USAGE) from None
    fuse_root = cfg.main.fuse_root if cfg else MainConfig.fuse_root
    sock = args.socket or (cfg.main.control_socket if cfg else DEFAULT_SOCKET)
    try:
        st = call(sock, {"cmd": "status"}, STATUS_TIMEOUT)
        mounts = [(str(m.get("name")), str(m.get("id")), str(m.get("mnt"))) for m in st.get("mounts", [])
                  if isinstance(m, dict)]
    except ControlError:
        if cfg is None:
            raise ControlError(f"aysfsd is not running and there is no config at {path}: "
                               "which mounts? (use --config)", EXIT_USAGE) from None
        mounts = [(a.name, a.id, a.mnt) for a in cfg.ays]
    if args.mount:
        want = args.mount
        mounts = [m for m in mounts if want in (m[0], m[1]) or os.path.normpath(want) == os.path.normpath(m[2])]
        if not mounts:
            raise ControlError(f"no mount {want!r} (a name, ays id or mountpoint)", EXIT_USAGE)
    return {name: [os.path.normpath(mnt), os.path.join(fuse_root, name)] for name, _, mnt in mounts}


def cmd_fuser(args: argparse.Namespace) -> int:
    """Processes using each mount; exit 0 when there are some, 1 when none (like fuser(1))."""
    try:
        mounts = _targets(args)
    except ControlError as e:
        print(f"aysctl fuser: {e}", file=sys.stderr)
        return e.exit_code
    holders = scan(mounts)
    if args.json:
        print(json.dumps(as_json(mounts, holders), indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        table = Table(box=box.SIMPLE_HEAD)
        for col in ("mount", "pid", "user", "uses", "command", "paths"):
            table.add_column(col, overflow="fold")
        for h in holders:
            table.add_row(h.mount, str(h.pid), h.user, ",".join(h.uses), h.command[:120], "\n".join(h.paths[:3]))
        console = Console(highlight=False)
        console.print(table if holders else f"no process uses {', '.join(mounts) or 'any mount'}")
    else:
        for h in holders:
            print(f"{h.mount}\t{h.pid}\t{h.user}\t{','.join(h.uses)}\t{h.command}")
    return 0 if holders else 1
