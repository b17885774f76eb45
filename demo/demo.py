"""`make demo`: publish a sample tree to a local stor, mount it with aysfsd, read it, show status.

Everything lives under /tmp/aysfs-demo (removed and recreated on each run).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

D = Path(os.environ.get("AYSFS_DEMO_DIR", "/tmp/aysfs-demo"))
BIN = Path(sys.executable).parent
AYS = "demo|stdlib!main"


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run(*cmd: str) -> str:
    print("$ " + " ".join(f"'{c}'" if " " in c or "|" in c else c for c in cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout.rstrip())
    if r.returncode != 0:
        print(r.stderr, file=sys.stderr)
        raise SystemExit(f"demo: {cmd[0]} failed ({r.returncode})")
    return r.stdout


def is_mounted(p: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(p) for line in f)


def drop_caches() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed_read(p: Path) -> tuple[float, str]:
    t = time.perf_counter()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return time.perf_counter() - t, h.hexdigest()


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("demo: run as root (FUSE mounts)")
    for m in (D / "mnt", D / "fuse"):
        if is_mounted(m):
            subprocess.run(["umount", "-l", str(m)])
    shutil.rmtree(D, ignore_errors=True)
    src, stor, mnt = D / "src", D / "stor", D / "mnt"
    say("a sample tree: part of Python's standard library and a 12 MiB file (chunked: 4 MiB chunks)")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json", "email", "http", "logging", "asyncio", "xml"):
        shutil.copytree(stdlib / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "big.bin").write_bytes(random.Random(1).randbytes(12 << 20))
    nfiles = sum(len(f) for _, _, f in os.walk(src))
    print(f"{src}: {nfiles} files")

    say("publish it to a local stor (twice: the second upload is empty)")
    run(str(BIN / "aysctl"), "publish", str(src), "--ays", AYS, "--stor", str(stor))
    run(str(BIN / "aysctl"), "publish", str(src), "--ays", AYS, "--stor", str(stor))

    cfg = D / "aysfs.toml"
    cfg.write_text(f"""# demo config: everything else is the built-in default
[main]
cache_dir = "{D}/cache"
control_socket = "{D}/aysfsd.sock"
fuse_root = "{D}/fuse"

[[stor]]
url = "{stor}"

[[ays]]
id = "{AYS}"
mnt = "{mnt}"
""")
    say(f"start aysfsd --config {cfg}")
    log = open(D / "aysfsd.log", "wb")
    proc = subprocess.Popen([str(BIN / "aysfsd"), "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                print((D / "aysfsd.log").read_text(), file=sys.stderr)
                raise SystemExit("demo: aysfsd did not mount")
            time.sleep(0.05)
        print(f"mounted at {mnt}")
        say("list and read it")
        run("ls", "-la", str(mnt))
        run("head", "-3", str(mnt / "json" / "__init__.py"))
        bad = 0
        for dirpath, _, files in os.walk(src):
            for f in files:
                rel = Path(dirpath, f).relative_to(src)
                if (mnt / rel).read_bytes() != (src / rel).read_bytes():
                    bad += 1
        print(f"{nfiles} files read through the mount, {bad} differ from the source")
        r = subprocess.run(["python3", "-c", "import json; print('imported', json.__file__)"],
                           env={"PYTHONPATH": str(mnt), "PATH": os.environ["PATH"]}, capture_output=True, text=True)
        print(r.stdout.strip())
        # the big file: already read once above (from the stor); read it fresh from the local cache
        drop_caches()
        t, h = timed_read(mnt / "big.bin")
        ok = h == hashlib.sha256((src / "big.bin").read_bytes()).hexdigest()
        print(f"big.bin again after dropping the page cache: {12 / t:.0f} MiB/s from the local LMDB cache, "
              f"sha256 {'matches' if ok else 'DIFFERS'}")
        t, _ = timed_read(mnt / "big.bin")
        print(f"big.bin once more: {12 / t:.0f} MiB/s from the kernel page cache")
        say("status (aysctl status; a table on a terminal)")
        subprocess.run([str(BIN / "aysctl"), "--config", str(cfg), "status"])
        r = subprocess.run([str(BIN / "aysctl"), "--config", str(cfg), "status", "--json"],
                           capture_output=True, text=True, check=True)
        st = json.loads(r.stdout)
        tiers = st["mounts"][0]["bytes_by_tier"]
        print(f"downloaded from the stor: {tiers['stor']:,} bytes (each blob once); read from the local "
              f"cache: {tiers['local']:,} bytes (the kernel's page cache served the rest without asking aysfsd)")
    finally:
        say("stop aysfsd (SIGTERM unmounts)")
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        log.close()
    print(f"exit code {proc.returncode}; still mounted: {is_mounted(mnt)}")
    say("where everything was")
    for what, p in (("source tree", src), ("stor", stor), ("config", cfg), ("local cache (LMDB)", D / "cache"),
                    ("mountpoint", mnt), ("daemon log", D / "aysfsd.log")):
        print(f"  {what:20} {p}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
