"""`aysctl probe`: is this node set up to serve its mounts? (no daemon needed)

Like `cvmfs_config probe` and `chksetup`: the config, FUSE, the cache directory, every stor
(reachable, round-trip time, each mount's ref found, its revision and signature state,
its root directory object present), every grid cache (reachable), and, when the daemon
runs, each mountpoint as the host's mount namespace sees it. The stors are asked with the
same store code and ref checks the daemon uses, in parallel, each bounded by its timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aysctl.client import DEFAULT_CONFIG, ControlError, call
from aysctl.render import human_bytes
from aysfsd.config import AysConfig, Config, ConfigError, GridCacheConfig, StorConfig, load
from aysfsd.stores import DirStore, Store, StoreError, open_store
from aysfsd.stores.layout import blob_path, ref_path
from aysfsd.tree.ref import RefError, decode_ref, verify

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
FSTYPE = "fuse.aysfs"
MIN_FREE = 64 << 20  # below this, the cache cannot take even a few chunks
STATUS_TIMEOUT = 10.0


@dataclass
class Check:
    check: str  # config, fuse, cache_dir, stor, grid, daemon, mount
    target: str
    state: str  # ok, warn (worth a look, not an error), FAIL, skip
    detail: str
    data: dict[str, Any] = field(default_factory=dict)  # numbers for --json (rtt_ms, revision, ...)


def probe(config_path: str, status: Callable[[str], dict[str, Any] | None]) -> list[Check]:
    """Every check, in a fixed order. `status(socket)` is the daemon's status, or None when
    it does not run."""
    try:
        cfg = load(config_path)
    except ConfigError as e:
        return [Check("config", config_path, FAIL, str(e).replace("\n", "; "))]
    out = [Check("config", config_path, OK, f"{len(cfg.ays)} mounts, {len(cfg.stors)} stors, "
                                            f"{len(cfg.caches)} grid caches")]
    out.append(check_fuse())
    out.append(check_cache_dir(cfg))
    with ThreadPoolExecutor(max_workers=8) as pool:
        stors = [pool.submit(check_stor, s, cfg) for s in cfg.stors]
        grids = [pool.submit(check_grid, c) for c in cfg.caches]
        for f in stors:
            out += f.result()
        out += [f.result() for f in grids]
    if not cfg.stors:
        out.append(Check("stor", "-", FAIL if cfg.ays else SKIP, "no [[stor]] configured"))
    out += check_mounts(cfg, status(cfg.main.control_socket))
    return out


def failed(checks: list[Check]) -> bool:
    return any(c.state == FAIL for c in checks)


# -- the node ---------------------------------------------------------------------------------


def check_fuse() -> Check:
    problems = []
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["fuse"] for line in f):
                problems.append("the kernel has no fuse filesystem (modprobe fuse)")
    except OSError as e:
        problems.append(f"/proc/filesystems: {e.strerror}")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        problems.append(f"/dev/fuse: {e.strerror}")
    try:
        from aysfsd.fuse import lib as fuselib

        version = fuselib.summary(fuselib.describe())
    except ImportError as e:
        problems.append(f"pyfuse3: {e}")
        version = "-"
    if problems:
        return Check("fuse", "/dev/fuse", FAIL, "; ".join(problems))
    return Check("fuse", "/dev/fuse", OK, f"kernel fuse, /dev/fuse opens, {version}")


def check_cache_dir(cfg: Config) -> Check:
    path, size = cfg.main.cache_dir, cfg.main.cache_size
    existing = path
    while not os.path.isdir(existing) and existing != os.path.dirname(existing):
        existing = os.path.dirname(existing)  # the daemon creates the missing part
    try:
        fd, tmp = tempfile.mkstemp(prefix=".aysctl-probe-", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return Check("cache_dir", path, FAIL, f"not writable: {existing}: {e.strerror}")
    free = shutil.disk_usage(existing).free
    mdb = os.path.join(path, "lmdb", "data.mdb")
    used = os.stat(mdb).st_blocks * 512 if os.path.exists(mdb) else 0
    data = {"free_bytes": free, "cache_size": size, "cache_file_bytes": used}
    detail = f"writable, {human_bytes(free)} free, cache_size {human_bytes(size)}, cache file {human_bytes(used)}"
    if free < MIN_FREE:
        return Check("cache_dir", path, FAIL, f"only {human_bytes(free)} free", data)
    if free + used < size:
        return Check("cache_dir", path, WARN, detail + ": the cache cannot grow to cache_size", data)
    return Check("cache_dir", path, OK, detail, data)


# -- stors and grid caches ----------------------------------------------------------------------


def _open(url: str, s: StorConfig | None, c: GridCacheConfig | None) -> Store:
    if s is not None:
        return open_store(url, timeout=s.timeout, proxy=s.proxy, ssh_key=s.ssh_key,
                          ssh_known_hosts=s.ssh_known_hosts, ssh_accept_unknown_host=s.ssh_accept_unknown_host)
    assert c is not None
    return open_store(url, timeout=c.timeout, proxy=c.proxy)


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.monotonic()
    r = fn()
    return r, (time.monotonic() - t0) * 1000


def _dir_missing(store: Store) -> str:
    if isinstance(store, DirStore) and not store.root.is_dir():
        return f"{store.root} is not a directory"
    return ""


def check_stor(s: StorConfig, cfg: Config) -> list[Check]:
    """One line per mount (its ref in this stor), or one for reachability when no mount."""
    try:
        store = _open(s.url, s, None)
    except (ValueError, StoreError) as e:
        return [Check("stor", s.url, FAIL, str(e))]
    try:
        if missing := _dir_missing(store):
            return [Check("stor", s.url, FAIL, f"unreachable: {missing}")]
        if not cfg.ays:
            try:
                _, rtt = _timed(lambda: store.read(ref_path("aysctl-probe")))
            except StoreError as e:
                return [Check("stor", s.url, FAIL, f"unreachable: {e}")]
            return [Check("stor", s.url, OK, f"reachable, rtt {rtt:.1f} ms", {"rtt_ms": round(rtt, 2)})]
        return [_ref_check(store, s.url, a, cfg) for a in cfg.ays]
    finally:
        store.close()


def _ref_check(store: Store, url: str, a: AysConfig, cfg: Config) -> Check:
    target = f"{url} {a.name}"
    try:
        raw, rtt = _timed(lambda: store.read(ref_path(a.id)))
    except StoreError as e:
        return Check("stor", target, FAIL, f"unreachable: {e}")
    data: dict[str, Any] = {"rtt_ms": round(rtt, 2), "ays": a.id, "mount": a.name}
    if raw is None:
        return Check("stor", target, FAIL, f"rtt {rtt:.1f} ms; no ref for {a.id!r} (not published here)", data)
    try:
        ref = decode_ref(raw, a.id)
    except RefError as e:
        return Check("stor", target, FAIL, f"rtt {rtt:.1f} ms; invalid ref: {e}", data)
    data.update(revision=ref.revision, root=ref.root, signed=ref.signed)
    trusted = a.trusted_keys if a.trusted_keys is not None else cfg.main.trusted_keys
    head = f"rtt {rtt:.1f} ms; revision {ref.revision}, root {ref.root[:12]}"
    if trusted:
        try:
            verify(ref, list(trusted))
        except RefError as e:
            data["signature"] = "refused"
            return Check("stor", target, FAIL, f"{head}; signature refused: {e}", data)
        data["signature"] = "trusted"
        sig = f"signed by trusted key {ref.key[:12]}"
    elif ref.signed:
        data["signature"] = "unchecked"
        sig = f"signed by {ref.key[:12]} (not checked: no trusted_keys)"
    else:
        data["signature"] = "unsigned"
        sig = "unsigned (no trusted_keys)"
    try:
        has_root = store.exists(blob_path(ref.root))
    except StoreError as e:
        return Check("stor", target, FAIL, f"{head}; {sig}; checking the root blob: {e}", data)
    if not has_root:
        return Check("stor", target, FAIL, f"{head}; {sig}; the root directory object is missing", data)
    return Check("stor", target, OK, f"{head}; {sig}", data)


def check_grid(c: GridCacheConfig) -> Check:
    try:
        store = _open(c.mnt, None, c)
    except (ValueError, StoreError) as e:
        return Check("grid", c.mnt, FAIL, str(e))
    try:
        if missing := _dir_missing(store):
            return Check("grid", c.mnt, FAIL, f"unreachable: {missing}")
        try:
            _, rtt = _timed(lambda: store.exists(blob_path("0" * 64)))
        except StoreError as e:
            return Check("grid", c.mnt, FAIL, f"unreachable: {e}")
        mode = "writable" if c.writable else "read-only"
        return Check("grid", c.mnt, OK, f"reachable, rtt {rtt:.1f} ms ({mode})", {"rtt_ms": round(rtt, 2)})
    finally:
        store.close()


# -- the running daemon's mounts ----------------------------------------------------------------


def host_mounts(mountinfo: str = "/proc/1/mountinfo") -> dict[str, str]:
    """mountpoint -> fstype in the mount namespace of PID 1 (the host's, seen from here)."""
    out = {}
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out[_unescape(fields[4])] = fields[sep + 1]
    return out


def _unescape(p: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        p = p.replace(esc, ch)
    return p


def check_mounts(cfg: Config, st: dict[str, Any] | None) -> list[Check]:
    sock = cfg.main.control_socket
    if st is None:
        return [Check("daemon", sock, SKIP, "aysfsd is not running: mountpoints not checked")]
    d = st.get("daemon", {})
    out = [Check("daemon", sock, OK, f"aysfsd {d.get('version', '?')} pid {d.get('pid', '?')}: {d.get('status', '')}")]
    try:
        seen = host_mounts()
    except OSError as e:
        return out + [Check("mount", "-", FAIL, f"/proc/1/mountinfo: {e.strerror}")]
    by_name = {m.get("name"): m for m in st.get("mounts", []) if isinstance(m, dict)}
    for a in cfg.ays:
        m = by_name.get(a.name)
        target = f"{a.mnt} {a.name}"
        if m is None:
            out.append(Check("mount", target, FAIL, "not in the daemon's mounts (reload pending?)"))
        elif m.get("state") != "up":
            out.append(Check("mount", target, FAIL, f"{m.get('state')}: {m.get('error') or '-'}"))
        elif seen.get(os.path.normpath(a.mnt)) != FSTYPE:
            out.append(Check("mount", target, FAIL, "up in the daemon but not visible in the host's mount "
                                                    "namespace (/proc/1/mountinfo)"))
        else:
            out.append(Check("mount", target, OK, f"mounted, revision {m.get('revision')}",
                             {"revision": m.get("revision"), "root": m.get("root")}))
    return out


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": not failed(checks), "checks": [asdict(c) for c in checks]}


# -- the command ------------------------------------------------------------------------------

STATE_STYLES = {OK: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def _daemon_status(socket_arg: str | None) -> Callable[[str], dict[str, Any] | None]:
    def status(sock: str) -> dict[str, Any] | None:
        try:
            return call(socket_arg or sock, {"cmd": "status"}, STATUS_TIMEOUT)
        except ControlError:
            return None

    return status


def cmd_probe(args: argparse.Namespace) -> int:
    """Check the config, FUSE, the cache, every stor and grid cache, and the running mounts."""
    checks = probe(args.config or DEFAULT_CONFIG, _daemon_status(args.socket))
    if args.json:
        print(json.dumps(as_json(checks), indent=2, ensure_ascii=False))
    elif sys.stdout.isatty():
        table = Table(box=box.SIMPLE_HEAD)
        for col in ("check", "target", "state", "detail"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(c.check, c.target, Text(c.state, style=STATE_STYLES.get(c.state, "")), c.detail)
        Console(highlight=False).print(table)
    else:
        for c in checks:
            print(f"{c.state}\t{c.check}\t{c.target}\t{c.detail}")
    return 1 if failed(checks) else 0
