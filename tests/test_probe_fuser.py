"""`aysctl probe` against a live nginx stor, a dead port, a stor without the ref and an
unsigned ref under trusted_keys; `aysctl fuser` finds the processes holding a real mount."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness import Daemon, aysctl, config, wait_for
from tests.servers import Nginx, free_port

AYS = "jumpscale|probe!main"
OTHER = "jumpscale|never-published!main"


def probe(cfg: Path) -> tuple[int, list[dict[str, Any]], list[str]]:
    """Exit code, the --json checks, and the plain lines of one `aysctl probe`."""
    j = aysctl("probe", "-c", str(cfg), "--json", check=False)
    plain = aysctl("probe", "-c", str(cfg), check=False)
    assert j.returncode == plain.returncode, (j.stdout, plain.stdout, plain.stderr)
    doc = json.loads(j.stdout)
    assert doc["ok"] == (j.returncode == 0)
    return j.returncode, doc["checks"], plain.stdout.splitlines()


def only(checks: list[dict[str, Any]], check: str) -> list[dict[str, Any]]:
    return [c for c in checks if c["check"] == check]


def published(work: Path, nginx_stor: Nginx) -> None:
    src = work / "src"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "a.py").write_text("A = 1\n")
    (src / "version.txt").write_text("v1\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", nginx_stor.url)


def write(work: Path, name: str, stors: list[str], ays: list[dict[str, object]], **main: object) -> Path:
    cfg = work / f"{name}.toml"
    cfg.write_text(config(work / name, [{"url": u, "timeout": 3} for u in stors], ays, None, **main))
    return cfg


def test_probe_live_stor_dead_port_missing_ref_unsigned_ref(work: Path, nginx_stor: Nginx) -> None:
    published(work, nginx_stor)
    mnt = str(work / "mnt")
    live = nginx_stor.url
    rev_line = f"ok\tstor\t{live} m\trtt "

    # all well: exit 0; the daemon does not run, so the mountpoints are skipped, not failed
    rc, checks, lines = probe(write(work, "good", [live], [{"id": AYS, "mnt": mnt, "name": "m"}]))
    assert rc == 0, lines
    assert [c["check"] for c in checks] == ["config", "fuse", "cache_dir", "stor", "daemon"]
    assert all(c["state"] in ("ok", "skip", "warn") for c in checks)
    (s,) = only(checks, "stor")
    assert s["state"] == "ok" and s["data"]["revision"] == 1 and s["data"]["signature"] == "unsigned"
    assert s["data"]["rtt_ms"] > 0
    assert any(line.startswith(rev_line) and "revision 1, root " in line and "unsigned (no trusted_keys)" in line
               for line in lines), lines
    assert only(checks, "daemon")[0]["state"] == "skip"
    assert only(checks, "fuse")[0]["state"] == "ok"
    assert only(checks, "cache_dir")[0]["data"]["free_bytes"] > 0

    # a dead port: exit 1, the reason on its line
    dead = f"http://127.0.0.1:{free_port()}"
    rc, checks, lines = probe(write(work, "dead", [dead, live], [{"id": AYS, "mnt": mnt, "name": "m"}]))
    assert rc == 1
    bad = [line for line in lines if line.startswith("FAIL")]
    assert len(bad) == 1 and bad[0].startswith(f"FAIL\tstor\t{dead} m\tunreachable: ") and "Connect" in bad[0], lines
    assert any(line.startswith(rev_line) for line in lines)  # the live one still checked

    # a stor that answers 404 for the ref
    rc, checks, lines = probe(write(work, "missing", [live], [{"id": OTHER, "mnt": mnt, "name": "o"}]))
    assert rc == 1
    bad = [line for line in lines if line.startswith("FAIL")]
    assert len(bad) == 1 and bad[0].startswith(f"FAIL\tstor\t{live} o\trtt "), lines
    assert f"no ref for {OTHER!r} (not published here)" in bad[0]

    # an unsigned ref under trusted_keys
    aysctl("keygen", str(work / "release.key"))
    pub = (work / "release.key.pub").read_text().strip()
    cfg = write(work, "trust", [live], [{"id": AYS, "mnt": mnt, "name": "m"}])
    cfg.write_text(cfg.read_text().replace("[main]\n", f"[main]\ntrusted_keys = {json.dumps([pub])}\n", 1))
    rc, checks, lines = probe(cfg)
    assert rc == 1
    bad = [line for line in lines if line.startswith("FAIL")]
    assert len(bad) == 1 and bad[0].startswith(f"FAIL\tstor\t{live} m\trtt "), lines
    assert "revision 1" in bad[0] and "signature refused: " in bad[0] and "is not signed" in bad[0]
    assert only(checks, "stor")[0]["data"]["signature"] == "refused"

    # an invalid config: exit 1, the config line says why, nothing else is tried
    broken = work / "broken.toml"
    broken.write_text("[main]\ncache_size = 'lots'\n")
    rc, checks, lines = probe(broken)
    assert rc == 1 and len(checks) == 1 and lines[0].startswith(f"FAIL\tconfig\t{broken}\t")
    assert "cache_size" in lines[0]


def test_probe_sees_the_running_daemons_mounts(work: Path, nginx_stor: Nginx) -> None:
    published(work, nginx_stor)
    mnt = work / "mnt"
    cfg = write(work, "d", [nginx_stor.url], [{"id": AYS, "mnt": str(mnt), "name": "m"}])
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        rc, checks, lines = probe(cfg)
        assert rc == 0, lines
        assert only(checks, "daemon")[0]["state"] == "ok"
        (m,) = only(checks, "mount")
        assert m["state"] == "ok" and m["target"] == f"{mnt} m" and m["data"]["revision"] == 1
        assert d.stop() == 0
    rc, checks, _ = probe(cfg)
    assert rc == 0 and only(checks, "daemon")[0]["state"] == "skip" and not only(checks, "mount")


def test_fuser_finds_an_open_file_holder_and_a_cwd_holder(work: Path, nginx_stor: Nginx) -> None:
    published(work, nginx_stor)
    mnt = work / "mnt"
    cfg = write(work, "d", [nginx_stor.url], [{"id": AYS, "mnt": str(mnt), "name": "m"}])
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        r = aysctl("fuser", "-c", str(cfg), "--json", check=False)
        assert r.returncode == 1 and json.loads(r.stdout)["processes"] == []  # nobody yet
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                                   "print(f.read(), flush=True); time.sleep(60)", str(mnt / "version.txt")],
                                  stdout=subprocess.PIPE, text=True)
        sitter = subprocess.Popen(["sleep", "60"], cwd=mnt / "lib")
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "v1\n"  # it has the file open
            r = aysctl("fuser", "-c", str(cfg), "--json")
            doc = json.loads(r.stdout)
            assert doc["mounts"] == {"m": str(mnt)}
            by_pid = {p["pid"]: p for p in doc["processes"]}
            assert set(by_pid) == {holder.pid, sitter.pid}, by_pid
            assert by_pid[holder.pid]["uses"] == ["file"]
            assert by_pid[holder.pid]["paths"] == [str(mnt / "version.txt")]
            assert by_pid[sitter.pid]["uses"] == ["cwd"] and by_pid[sitter.pid]["paths"] == [str(mnt / "lib")]
            assert by_pid[sitter.pid]["command"] == "sleep 60" and by_pid[sitter.pid]["user"] == "root"
            # by mountpoint, by name; the plain lines
            for which in (str(mnt), "m", AYS):
                lines = aysctl("fuser", "-c", str(cfg), which).stdout.splitlines()
                assert sorted(int(line.split("\t")[1]) for line in lines) == sorted([holder.pid, sitter.pid])
            assert f"m\t{sitter.pid}\troot\tcwd\tsleep 60" in aysctl("fuser", "-c", str(cfg)).stdout
            bad = aysctl("fuser", "-c", str(cfg), "nope", check=False)
            assert bad.returncode == 2 and "no mount 'nope'" in bad.stderr
        finally:
            for p in (holder, sitter):
                p.kill()
                p.wait(10)
        wait_for(lambda: aysctl("fuser", "-c", str(cfg), check=False).returncode == 1, 10, "no holders left")
        assert d.stop() == 0
