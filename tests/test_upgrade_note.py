"""`aysctl status` says when a different aysfs is installed on disk than the one running."""

from __future__ import annotations

import json
import os
from pathlib import Path

from aysfsd import __version__
from tests.harness import Daemon, aysctl


def dist_info(where: Path, version: str) -> None:
    """An installed `aysfs` distribution's metadata, as pip or dh_python3 leave it."""
    for old in where.glob("aysfs-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    d = where / f"aysfs-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: aysfs\nVersion: {version}\n")


def test_status_names_a_newer_installed_version(work: Path) -> None:
    site = work / "site"
    dist_info(site, __version__)
    cfg = work / "aysfs.toml"
    cfg.write_text(f'[main]\ncache_dir = "{work}/cache"\ncontrol_socket = "{work}/s.sock"\n'
                   f'fuse_root = "{work}/fuse"\n')
    # the daemon finds the distribution in `site` first (as it would find the upgraded package)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with Daemon(cfg, work / "d.log", env=env).start() as d:
        d.wait_ready()
        st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)["daemon"]
        assert st["version"] == __version__ and st["installed_version"] == __version__ and st["upgrade"] == ""
        r = aysctl("--config", str(cfg), "status")
        assert "is installed" not in r.stderr
        dist_info(site, "9.9.9")  # the package was upgraded on disk; the daemon keeps running
        st = json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)["daemon"]
        assert st["version"] == __version__ and st["installed_version"] == "9.9.9"
        r = aysctl("--config", str(cfg), "status")
        assert f"aysctl: aysfs 9.9.9 is installed, {__version__} is running: restart aysfsd to run it" in r.stderr
