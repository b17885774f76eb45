"""Which pyfuse3 this process runs, and whether it carries aysfs's patch (packaging/pyfuse3/).

The Debian package ships pyfuse3 with the patch, compiled for the release's Python, in a
private directory (/usr/lib/aysfs/python, see README.Debian); /usr/bin/aysfsd and aysctl
call `use_private()` before anything imports pyfuse3. When that copy is missing (a package
built without it) or cannot be loaded, Debian's python3-pyfuse3 is used instead, and the
reason is kept for the start-up log and `aysctl status`: aysfsd then runs as on any stock
pyfuse3, with an OPEN and a RELEASE per file.

`AYSFS_IGNORE_PYFUSE3_PATCH=1` makes the daemon act as on a pyfuse3 without the patch (for
tests, and to compare the two modes on one machine).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
from collections.abc import Callable
from typing import Any

IGNORE_PATCH_ENV = "AYSFS_IGNORE_PYFUSE3_PATCH"
_fallback = ""  # why the private copy is not the one in use ("" when it is, or none was asked for)


def use_private(directory: str, load: bool = True) -> None:
    """Put `directory` first on sys.path for pyfuse3 when it holds one built for this Python
    and (`load`) it imports; aysctl, which needs pyfuse3 for `probe` only, skips the import."""
    global _fallback
    pkg = os.path.join(directory, "pyfuse3")
    if not os.path.isdir(pkg):
        _fallback = f"no pyfuse3 in {directory} (the package was built without aysfs's patched pyfuse3)"
        return
    if not any(os.path.exists(os.path.join(pkg, "__init__" + s)) for s in importlib.machinery.EXTENSION_SUFFIXES):
        _fallback = f"the pyfuse3 in {directory} was built for another Python than {sys.version.split()[0]}"
        return
    sys.path.insert(0, directory)
    if not load:
        return
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        sys.path.remove(directory)
        for name in [m for m in sys.modules if m == "pyfuse3" or m.startswith("pyfuse3.")]:
            del sys.modules[name]
        _fallback = f"the pyfuse3 in {directory} cannot be loaded: {e}"


def has_patch() -> bool:
    """The loaded pyfuse3 has aysfs's patch (`pyfuse3.NO_OPEN_PATCH`)."""
    import pyfuse3

    return getattr(pyfuse3, "NO_OPEN_PATCH", 0) >= 1


def patched() -> bool:
    """The daemon may rely on the patch: READ and READDIR name the inode when the kernel sends
    no handle (kernel no_open mode), and symlinks may be cached."""
    return has_patch() and not os.environ.get(IGNORE_PATCH_ENV)


def fast_loop() -> bool:
    """The loaded pyfuse3 has aysfs's loop patch (`pyfuse3.AYSFS_LOOP`): a request answered
    without waiting costs no task switch, lock hand-off or epoll_ctl (packaging/pyfuse3/)."""
    import pyfuse3

    return getattr(pyfuse3, "AYSFS_LOOP", 0) >= 1


def _spin_api(name: str) -> Callable[..., Any] | None:
    """loop.patch's spin function `name` (`aysfs_fuse_spin...`; AYSFS_LOOP 2), None without it."""
    import pyfuse3

    return getattr(pyfuse3, name, None) if getattr(pyfuse3, "AYSFS_LOOP", 0) >= 2 else None


def set_spin(us: int) -> int | None:
    """Let the request loop spin up to `us` microseconds for the next request before it sleeps
    (see packaging/pyfuse3/README.md); the spin in effect, None when this pyfuse3 cannot. With
    one CPU to run on it stays off: the reader could not send a request while the loop spins."""
    fn = _spin_api("aysfs_fuse_spin")
    return None if fn is None else int(fn(us if len(os.sched_getaffinity(0)) > 1 else 0))


def spin() -> int | None:
    """The request loop's spin in microseconds (None: this pyfuse3 has none)."""
    fn = _spin_api("aysfs_fuse_spin")
    return None if fn is None else int(fn())


def spin_stats() -> dict[str, int] | None:
    """How many of the loop's spins caught a request and how many ended without one."""
    fn = _spin_api("aysfs_fuse_spin_stats")
    if fn is None:
        return None
    caught, missed = fn()
    return {"caught": int(caught), "missed": int(missed)}


def describe() -> dict[str, object]:
    """The pyfuse3 in use, for the log and `aysctl status` (daemon.pyfuse3)."""
    import pyfuse3

    path = getattr(pyfuse3, "__file__", None) or ""
    return {"version": getattr(pyfuse3, "__version__", "?"), "path": os.path.dirname(path),
            "patched": patched(), "loop": fast_loop(), "spin_us": spin(), "spins": spin_stats(),
            "patch_ignored": has_patch() and not patched(), "fallback": _fallback}


def summary(info: dict[str, object]) -> str:
    """One line: 'pyfuse3 3.5.0 with aysfs's patch (/usr/lib/aysfs/python/pyfuse3)'."""
    if info["patched"]:
        what = "with aysfs's patch"
    elif info["patch_ignored"]:
        what = f"with aysfs's patch, ignored ({IGNORE_PATCH_ENV})"
    else:
        what = "without aysfs's patch"
    line = f"pyfuse3 {info['version']} {what} ({info['path']})"
    if info["fallback"]:
        line += f"; {info['fallback']}"
    return line
