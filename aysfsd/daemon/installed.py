"""The aysfs version installed on disk, which can differ from the running one after an upgrade
that did not restart the daemon (one started by hand, say): `aysctl status` then says so.

importlib.metadata reads the installed distribution's metadata from disk on each call (its
path cache is keyed on the directory's mtime, which an upgrade changes).
"""

from __future__ import annotations

import importlib.metadata

from .. import __version__

DIST = "aysfs"


def installed_version() -> str | None:
    """The version of the aysfs distribution on disk now; None when there is none."""
    try:
        return importlib.metadata.version(DIST)
    except (importlib.metadata.PackageNotFoundError, OSError, ValueError):
        return None


def upgrade_note(installed: str | None, running: str = __version__) -> str:
    """"" when the installed version is the running one (or unknown), else what to do."""
    if not installed or installed == running:
        return ""
    return (f"aysfs {installed} is installed, {running} is running: restart aysfsd to run it "
            "(systemctl restart aysfsd, or aysctl restart: mounts and open files stay)")
