"""`aysctl debug pull`: bring a mount's debug edits from Redis into a local directory.

Idempotent: a file already holding the recorded content is left alone. Never writes
outside the target directory: hostile paths (absolute, `..`, NUL, through a symlink
in the target) are refused and reported, nothing is written for them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from aysfsd.debug.store import DebugStore, DebugStoreError, PathState


class HostilePath(ValueError):
    pass


@dataclass
class Summary:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def changed(self) -> int:
        return len(self.created) + len(self.updated) + len(self.removed)


def _parent_fd(root: Path, path: str, create: bool) -> tuple[int, str] | None:
    """An fd of the directory that holds `path` under `root`, walked without following
    symlinks; None when a parent is missing and `create` is false."""
    if not path or path.startswith("/") or "\x00" in path or "\\" in path:
        raise HostilePath("absolute, empty or NUL-bearing path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise HostilePath("'.', '..' or empty component")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for comp in parts[:-1]:
            try:
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    os.close(fd)
                    return None
                os.mkdir(comp, 0o755, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                raise HostilePath(f"{comp!r} in the target is not a plain directory ({e.strerror})") from None
            os.close(fd)
            fd = nfd
        return fd, parts[-1]
    except BaseException:
        os.close(fd)
        raise


def _current_md5(dfd: int, name: str) -> str | None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return None
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def apply(store: DebugStore, root: Path, st: PathState, summary: Summary) -> None:
    """Make `root/st.path` match the recorded state."""
    try:
        got = _parent_fd(root, st.path, create=not st.deleted)
    except HostilePath as e:
        summary.refused.append((st.path, str(e)))
        return
    if got is None:
        summary.unchanged += 1
        return
    dfd, name = got
    try:
        if st.deleted:
            try:
                os.unlink(name, dir_fd=dfd)
                summary.removed.append(st.path)
            except FileNotFoundError:
                summary.unchanged += 1
            return
        cur = _current_md5(dfd, name)
        if cur == st.md5:
            summary.unchanged += 1
            return
        data = store.content(st.md5)
        tmp = f".{name}.aysctl-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        (summary.updated if cur is not None else summary.created).append(st.path)
    except (OSError, DebugStoreError) as e:
        summary.errors.append((st.path, str(e)))
    finally:
        os.close(dfd)


def pull_once(store: DebugStore, root: Path, summary: Summary) -> int:
    """Apply every recorded path and check the whole log; returns the log length seen."""
    n = store.log_length()
    states = store.all_paths()
    for _, path, _ in store.log_entries(0, n - 1) if n else []:
        if path not in states:
            try:
                _check(path)
            except HostilePath as e:
                summary.refused.append((path, str(e)))
    for path in sorted(states):
        apply(store, root, states[path], summary)
    return n


def _check(path: str) -> None:
    if not path or path.startswith("/") or "\x00" in path or any(p in ("", ".", "..") for p in path.split("/")):
        raise HostilePath("absolute, empty, NUL, '.' or '..' path")


def follow(store: DebugStore, root: Path, pos: int, summary: Summary, interval: float = 0.5,
           on_change=None) -> None:  # type: ignore[no-untyped-def]
    """Apply new log entries as they come, until interrupted (KeyboardInterrupt)."""
    while True:
        time.sleep(interval)
        n = store.log_length()
        if n <= pos:
            continue
        paths = {p for _, p, _ in store.log_entries(pos, n - 1)}
        pos = n
        states = store.all_paths()
        for path in sorted(paths):
            if path in states:
                before = summary.changed
                apply(store, root, states[path], summary)
                if on_change is not None and summary.changed != before:
                    on_change(path, states[path])
            else:
                try:
                    _check(path)
                except HostilePath as e:
                    summary.refused.append((path, str(e)))


def _redis_settings(args) -> tuple[str, int, str, int]:  # type: ignore[no-untyped-def]
    """--redis/--password/--db, else [debug] of --config (or /etc/aysfs/aysfs.toml), else defaults."""
    from aysfsd.config import ConfigError, DebugConfig, load

    cfg = DebugConfig()
    path = args.config or ("/etc/aysfs/aysfs.toml" if os.path.exists("/etc/aysfs/aysfs.toml") else None)
    if path:
        try:
            cfg = load(path).debug
        except ConfigError:
            if args.config:
                raise
    host, port = cfg.redis_addr, cfg.redis_port
    if args.redis:
        h, _, p = args.redis.rpartition(":")
        if not h or not p.isdigit():
            raise ValueError(f"--redis wants HOST:PORT, got {args.redis!r}")
        host, port = h, int(p)
    password = args.password if args.password is not None else os.environ.get("AYSFS_REDIS_PASSWORD",
                                                                               cfg.redis_passwd)
    return host, port, password, args.db if args.db is not None else cfg.redis_db


def _print_summary(s: Summary, root: Path) -> None:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    for p in s.created:
        out.print(f"[green]created[/]  {p}")
    for p in s.updated:
        out.print(f"[yellow]updated[/]  {p}")
    for p in s.removed:
        out.print(f"[red]removed[/]  {p}")
    for p, why in s.refused:
        out.print(f"[bold red]REFUSED[/]  {p!r}: {why}")
    for p, why in s.errors:
        out.print(f"[bold red]error[/]    {p}: {why}")
    out.print(f"{root}: {len(s.created)} created, {len(s.updated)} updated, {len(s.removed)} removed, "
              f"{s.unchanged} unchanged, {len(s.refused)} refused, {len(s.errors)} errors")


def cmd_debug_pull(args) -> int:  # type: ignore[no-untyped-def]
    import sys

    from aysfsd.config import ConfigError
    from aysfsd.debug.store import connect

    root = Path(args.to)
    try:
        host, port, password, db = _redis_settings(args)
    except (ConfigError, ValueError) as e:
        print(f"aysctl: {e}", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    store = DebugStore(connect(host, port, password, db), args.mount)
    summary = Summary()
    try:
        pos = pull_once(store, root, summary)
        _print_summary(summary, root)
        if args.follow:
            print(f"following debug:log:{args.mount} on {host}:{port} (Ctrl-C stops)", flush=True)
            try:
                follow(store, root, pos, summary,
                       on_change=lambda p, st: print(f"{'removed' if st.deleted else 'wrote'}  {p}", flush=True))
            except KeyboardInterrupt:
                _print_summary(summary, root)
    except DebugStoreError as e:
        print(f"aysctl: {e}", file=sys.stderr)
        return 1
    return 1 if summary.refused or summary.errors else 0
