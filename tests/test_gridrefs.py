"""A node starts from the grid when its stors are down, safely (signed refs only)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

from aysfsd.stores.layout import ref_path
from tests.harness import Daemon, aysctl, tree_listing, wait_for
from tests.test_trust import keypair, make_src

AYS = "jumpscale|gridref!main"


def dead_url() -> str:
    """An HTTP stor nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def node_config(work: Path, name: str, stor: str, grid: Path, mnt: Path, keys: list[str] | None) -> Path:
    st = work / name
    extra = f"trusted_keys = {json.dumps(keys)}\n" if keys is not None else ""
    cfg = work / f"{name}.toml"
    cfg.write_text(f'[main]\ncache_dir = "{st}/cache"\ncontrol_socket = "{st}/aysfsd.sock"\n'
                   f'fuse_root = "{st}/fuse"\nfetch_timeout = 5\n{extra}\n'
                   f'[[stor]]\nurl = "{stor}"\ntimeout = 2\n\n[[cache]]\nmnt = "{grid}"\n\n'
                   f"[[ays]]\nid = '{AYS}'\nmnt = \"{mnt}\"\n")
    return cfg


def status(cfg: Path) -> dict:
    return json.loads(aysctl("--config", str(cfg), "status", "--json").stdout)


def test_signed_ref_from_the_grid_when_stors_are_down(work: Path) -> None:
    key, pub = keypair(work)
    stor, grid = work / "stor", work / "grid"
    grid.mkdir()
    src = make_src(work / "src", "v1\n")
    (src / "big.bin").write_bytes(bytes(range(256)) * 40000)
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
    # node 1 reaches the stor: it accepts the signed ref, writes it to the grid, fills the grid
    cfg1 = node_config(work, "n1", str(stor), grid, work / "m1", [pub])
    with Daemon(cfg1, work / "n1.log").start(wait_mounts=[work / "m1"]) as d1:
        wait_for(lambda: (grid / ref_path(AYS)).exists(), 10, f"the ref in the grid\n{d1.log()[-2000:]}")
        aysctl("--config", str(cfg1), "prefetch", AYS, "--grid")
    assert (grid / ref_path(AYS)).read_bytes() == (stor / ref_path(AYS)).read_bytes()
    # node 2: empty cache, its stor is down: it mounts the grid's signed ref and reads everything
    cfg2 = node_config(work, "n2", dead_url(), grid, work / "m2", [pub])
    with Daemon(cfg2, work / "n2.log").start(wait_mounts=[work / "m2"]) as d2:
        assert tree_listing(work / "m2") == tree_listing(src)
        assert "from a grid cache, signed by a trusted key" in d2.log()
        m = status(cfg2)["mounts"][0]
        assert m["state"] == "up" and m["revision"] == 1
    # a grid ref with a bad signature is not taken either
    shutil.rmtree(work / "n2" / "cache")
    raw = json.loads((grid / ref_path(AYS)).read_bytes())
    raw["revision"] = 9
    (grid / ref_path(AYS)).write_text(json.dumps(raw))
    with Daemon(cfg2, work / "n2b.log").start() as d2:
        d2.wait_ready()
        m = status(cfg2)["mounts"][0]
        assert m["state"] == "error" and "bad signature" in m["error"], m


def test_unsigned_ref_in_the_grid_waits_and_says_why(work: Path) -> None:
    stor, grid = work / "stor", work / "grid"
    grid.mkdir()
    src = make_src(work / "src", "v1\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor))
    cfg1 = node_config(work, "n1", str(stor), grid, work / "m1", None)
    with Daemon(cfg1, work / "n1.log").start(wait_mounts=[work / "m1"]):
        aysctl("--config", str(cfg1), "prefetch", AYS, "--grid")
    assert not (grid / ref_path(AYS)).exists()  # unsigned: never written to a grid cache
    (grid / ref_path(AYS)).parent.mkdir(parents=True)
    shutil.copy(stor / ref_path(AYS), grid / ref_path(AYS))  # even when someone puts it there
    cfg2 = node_config(work, "n2", dead_url(), grid, work / "m2", None)
    with Daemon(cfg2, work / "n2.log").start() as d2:
        d2.wait_ready()
        m = status(cfg2)["mounts"][0]
        assert m["state"] == "error" and "not trusted for refs without trusted_keys" in m["error"], m
        plain = aysctl("--config", str(cfg2), "status").stdout
        assert "not trusted for refs without trusted_keys" in plain
    # with trusted keys, an unsigned ref in the grid is refused too
    _, pub = keypair(work)
    cfg3 = node_config(work, "n3", dead_url(), grid, work / "m3", [pub])
    with Daemon(cfg3, work / "n3.log").start() as d3:
        d3.wait_ready()
        m = status(cfg3)["mounts"][0]
        assert m["state"] == "error" and "is not signed" in m["error"], m


def test_grid_ref_newer_is_taken_older_is_refused(work: Path) -> None:
    key, pub = keypair(work)
    stor, grid = work / "stor", work / "grid"
    grid.mkdir()
    src = make_src(work / "src", "v1\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
    ref1 = (stor / ref_path(AYS)).read_bytes()
    # node B accepts revision 1 from the stor
    cfg_b = node_config(work, "nb", str(stor), grid, work / "mb", [pub])
    with Daemon(cfg_b, work / "nb.log").start(wait_mounts=[work / "mb"]):
        aysctl("--config", str(cfg_b), "prefetch", AYS, "--grid")
    # revision 2 is published; node A accepts it and puts it (and its blobs) in the grid
    make_src(src, "v2\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
    cfg_a = node_config(work, "na", str(stor), grid, work / "ma", [pub])
    with Daemon(cfg_a, work / "na.log").start(wait_mounts=[work / "ma"]):
        aysctl("--config", str(cfg_a), "prefetch", AYS, "--grid")
        wait_for(lambda: json.loads((grid / ref_path(AYS)).read_bytes())["revision"] == 2, 10, "revision 2 in the grid")
    # the stor goes down for B: the grid's revision 2 is newer than its own 1: taken
    cfg_b = node_config(work, "nb", dead_url(), grid, work / "mb", [pub])
    with Daemon(cfg_b, work / "nb2.log").start(wait_mounts=[work / "mb"]):
        assert (work / "mb" / "version.txt").read_text() == "v2\n"
        assert status(cfg_b)["mounts"][0]["revision"] == 2
    # someone puts the validly signed revision 1 back into the grid: B keeps revision 2
    (grid / ref_path(AYS)).write_bytes(ref1)
    with Daemon(cfg_b, work / "nb3.log").start(wait_mounts=[work / "mb"]) as d:
        assert (work / "mb" / "version.txt").read_text() == "v2\n"
        assert "rollback refused: revision 1" in d.log()
        assert status(cfg_b)["mounts"][0]["revision"] == 2
    # and a node that never accepted anything takes the grid's revision 1 (nothing newer known)
    cfg_c = node_config(work, "nc", dead_url(), grid, work / "mc", [pub])
    with Daemon(cfg_c, work / "nc.log").start(wait_mounts=[work / "mc"]):
        assert (work / "mc" / "version.txt").read_text() == "v1\n"
