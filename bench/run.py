"""`make bench`: aysfs side by side with the native directory and the peers (issue 7).

Data: the installed standard library (no __pycache__, no site-packages) plus one file of random
bytes, served by nginx on loopback: as an aysfs stor (published with `aysctl publish` over HTTP
PUT) and as a plain tree with autoindex (for rclone and httpdirfs). squashfuse mounts a local
squashfs image of the same tree. Every figure is measured in this run, on this data.

    BENCH_QUICK=1    64 MiB big file and a subset of the stdlib (a run of a few minutes)
    BENCH_RUNS=N     runs per non-cold row (median; default 5, quick 3)
    BENCH_COLD_RUNS=N   cold runs (each a fresh mount; median; default 3, quick 1); a peer whose
                        first cold run of a row took over 20 s is not repeated
    BENCH_DIR=DIR    work directory (default /tmp/aysbench; wiped at the start)
    BENCH_PEERS=a,b  only these peers (native is always measured); a,b also selects their remote rows,
                     a-remote only those (BENCH_PEERS=aysfs-remote: native and remote aysfs)
    BENCH_RESULTS=DIR       write results.md/.json/ratios.png (and profiles, traces) there
    BENCH_PROFILE=row,row   py-spy record aysfsd during these rows (bench/results/profile-ROW.txt;
                            a remote row: remote-tar, remote-app, ...)
    BENCH_SKIP_100K=1       skip the 100,000-file tree
    BENCH_SKIP_50K=1        skip the 50,000-file directory listing (native, aysfs, squashfuse)
    BENCH_AYSFSD="CMD"      run this instead of .venv/bin/aysfsd (A/B a patched daemon)
    BENCH_AYS_CONFIG="K=V"  lines added to aysfs's [[ays]] table (A/B a setting, e.g. "cache.local = false")
    BENCH_MAIN_CONFIG="K=V" lines added to aysfs's [main] table (A/B a setting, e.g. "fuse_spin_us = 0")
    BENCH_FUSE_TRACE=1      count the FUSE requests of every row of aysfs and squashfuse (kernel
                            tracepoints) into bench/results/fuse-requests.md
    BENCH_REMOTE=0          skip the remote rows (the stors behind bench/slowlink.py, see bench/remote.py)
    BENCH_RTT_MS=20 BENCH_RATE_MBIT=1000   the simulated link of the remote rows (0 Mbit: no cap)
    BENCH_REMOTE_CAP=120    seconds: a remote run is stopped there (rclone and httpdirfs are slow)
    BENCH_TIMELINE=DIR      write each remote run's requests (start, end in ms from the mount's start,
                            bytes, uri, from the server's access log) to DIR/<row>-<peer>-<run>.txt

Progress goes to stderr; the table and the bars to stdout, bench/results/results.md and
bench/results/ratios.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fusetrace, remote, report  # noqa: E402
from bench.peers import (  # noqa: E402
    PYVER,
    AutoindexNginx,
    Aysfs,
    Cleanup,
    Httpdirfs,
    LoggedNginx,
    Native,
    NotAvailable,
    Peer,
    Rclone,
    Squashfuse,
    drop_caches,
    proc_status,
    umount_lazy_under,
)
from bench.report import Cell, Results  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
MiB = 1 << 20
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
RUNS = max(1, int(os.environ.get("BENCH_RUNS", "3" if QUICK else "5")))
COLD_RUNS = max(1, int(os.environ.get("BENCH_COLD_RUNS", "1" if QUICK else "3")))
SLOW_COLD = 20.0  # seconds: a cold row this slow is not repeated
REMOTE_CAP = float(os.environ.get("BENCH_REMOTE_CAP", "120"))  # seconds: a remote run is stopped here
BIG_SIZE = (64 if QUICK else 256) * MiB
SMALL_MAX = 1 * MiB  # "small files": regular files up to this size
RAND_OPS = 1000 if QUICK else 2000
RAND_CAP = 60.0
CONTENT_CAP = 30.0 if QUICK else 90.0  # seconds for the full content check of one peer  # seconds: a random-read run stops here (ops/s from what was done)
BIG_NAME = "zz-bench-random.bin"
# BENCH_QUICK: the top-level modules and the packages the app-start row needs
QUICK_DIRS = {"encodings", "json", "email", "http", "logging", "asyncio", "xml", "urllib", "unittest", "importlib",
              "collections", "concurrent", "re", "tomllib", "lib-dynload", "__phello__"}
APP_MODULES = ["json", "email.parser", "http.client", "logging", "asyncio", "xml.etree.ElementTree", "decimal",
               "argparse", "unittest", "urllib.request", "csv", "pathlib", "subprocess", "dataclasses", "tomllib"]
BASE_PYTHON = getattr(sys, "_base_executable", None) or sys.executable
T0 = time.monotonic()
LOAD0 = f"{os.getloadavg()[0]:.2f}"


def short(text: str, limit: int = 160) -> str:
    """One line out of a tool's stderr: the first line that names an error, else the first line."""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    if not lines:
        return ""
    pick = next((x for x in lines if "rror" in x), lines[0])
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return (pick if len(pick) <= limit else pick[: limit - 1] + "…") + more


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- the data -------------------------------------------------------------------------------------


@dataclass
class Data:
    home: Path
    root: Path
    entries: list[str] = field(default_factory=list)  # every path below root (relative), sorted
    files: list[str] = field(default_factory=list)  # regular files
    small: list[str] = field(default_factory=list)
    kinds: dict[str, tuple[int, int]] = field(default_factory=dict)  # rel -> (S_IFMT, size or 0)
    hashes: dict[str, str] = field(default_factory=dict)
    total_bytes: int = 0
    tar_list: Path | None = None
    tar_bytes: int | None = None  # native's tar stream length
    sample: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    rand_blocks: list[bytes] = field(default_factory=list)

    @property
    def big(self) -> str:
        return BIG_NAME


def build_data(work: Path) -> Data:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    home = work / "src" / "home"
    root = home / "lib" / PYVER

    def ignore(d: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in ("__pycache__", "site-packages")}
        if QUICK and Path(d) == stdlib:
            skip |= {n for n in names if (Path(d) / n).is_dir() and n not in QUICK_DIRS}
        return skip

    shutil.copytree(stdlib, root, symlinks=True, ignore=ignore)
    rnd = random.Random(20240607)
    with open(root / BIG_NAME, "wb") as f:
        for _ in range(BIG_SIZE // (16 * MiB)):
            f.write(rnd.randbytes(16 * MiB))
    d = Data(home, root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            d.entries.append(rel)
            fmt = stat.S_IFMT(st.st_mode)
            d.kinds[rel] = (fmt, st.st_size if fmt == stat.S_IFREG else 0)
            if fmt == stat.S_IFREG:
                d.files.append(rel)
                d.total_bytes += st.st_size
                if st.st_size <= SMALL_MAX:
                    d.small.append(rel)
    d.entries.sort()
    d.files.sort()
    d.small.sort()
    for rel in d.files:
        d.hashes[rel] = sha256_file(root / rel)
    d.sample = d.small[::5] + [BIG_NAME]
    d.tar_list = work / "small-files.list"
    d.tar_list.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in d.small))
    rr = random.Random(99)
    d.offsets = [rr.randrange(BIG_SIZE // 4096) * 4096 for _ in range(RAND_OPS)]
    with open(root / BIG_NAME, "rb") as big:
        d.rand_blocks = [os.pread(big.fileno(), 4096, off) for off in d.offsets]
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        mv = memoryview(buf)
        while n := f.readinto(buf):
            h.update(mv[:n])
    return h.hexdigest()


# -- the measurements (each returns (value, problem or None)) ---------------------------------


Check = tuple[float, str | None]


def do_find(data: Data, peer: Peer, timeout: float = 900) -> Check:
    root = str(peer.root)
    t0 = time.perf_counter()
    r = subprocess.run(["find", root], capture_output=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        return dt, f"find exited {r.returncode}: {short(r.stderr.decode(errors='replace'))}"
    rels = sorted(os.path.relpath(os.fsdecode(line), root) for line in r.stdout.split(b"\n") if line)
    rels = [x for x in rels if x != "."]
    if rels != data.entries:
        missing = sorted(set(data.entries) - set(rels))
        extra = sorted(set(rels) - set(data.entries))
        return dt, f"{len(rels)} entries, expected {len(data.entries)}; missing {missing[:3]}, extra {extra[:3]}"
    return dt, None


def do_stat(data: Data, peer: Peer) -> Check:
    root = str(peer.root) + "/"
    got: dict[str, tuple[int, int]] = {}
    errors = 0
    t0 = time.perf_counter()
    for rel in data.entries:
        try:
            st = os.lstat(root + rel)
        except OSError:
            errors += 1
            continue
        fmt = stat.S_IFMT(st.st_mode)
        got[rel] = (fmt, st.st_size if fmt == stat.S_IFREG else 0)
    dt = time.perf_counter() - t0
    bad = [r for r in data.entries if got.get(r) != data.kinds[r]]
    if bad:
        return dt, f"{len(bad)} of {len(data.entries)} differ in type/size ({errors} errors), e.g. {bad[:3]}"
    return dt, None


def do_tar(data: Data, peer: Peer, timeout: float = 900) -> Check:
    assert data.tar_list is not None
    cmd = (f"set -o pipefail; tar -cf - -C {shlex.quote(str(peer.root))} --no-recursion --null "
           f"-T {shlex.quote(str(data.tar_list))} | wc -c")
    t0 = time.perf_counter()
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        return dt, f"tar exited {r.returncode}: {short(r.stderr)}"
    n = int(r.stdout.strip())
    if peer.native:
        data.tar_bytes = n
    elif data.tar_bytes is not None and n != data.tar_bytes:
        return dt, f"tar stream is {n} bytes, native's {data.tar_bytes}"
    return dt, None


def do_seq(data: Data, peer: Peer, timeout: float | None = None) -> Check:
    """MiB/s reading the big file; with `timeout` (seconds) a slow peer's rate is taken from what it read."""
    buf = bytearray(MiB)
    n = 0
    fd = os.open(peer.root / data.big, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while k := os.readv(fd, [buf]):
            n += k
            if timeout is not None and time.perf_counter() - t0 > timeout:
                log(f"  {peer.name}: stopped reading after {timeout:.0f}s ({n // MiB} of {BIG_SIZE // MiB} MiB)")
                return n / MiB / (time.perf_counter() - t0), None
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    rate = n / MiB / dt
    return rate, None if n == BIG_SIZE else f"read {n} bytes, expected {BIG_SIZE}"


def do_rand(data: Data, peer: Peer) -> Check:
    h = hashlib.sha256()
    done = 0
    fd = os.open(peer.root / data.big, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in data.offsets:
            h.update(os.pread(fd, 4096, off))
            done += 1
            if time.perf_counter() - t0 > RAND_CAP:
                break
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    expect = hashlib.sha256(b"".join(data.rand_blocks[:done])).hexdigest()
    note = None if h.hexdigest() == expect else f"the {done} blocks read differ from native's"
    if done < len(data.offsets) and note is None:
        log(f"  {peer.name}: random reads stopped after {RAND_CAP:.0f}s ({done} of {len(data.offsets)})")
    return done / dt, note


APP_CODE = """
import sys
for m in {mods!r}:
    __import__(m)
print("\\n".join(sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}} - {{""}})))
"""


def do_app(data: Data, peer: Peer, timeout: float = 300) -> Check:
    env = {"PYTHONHOME": str(peer.home), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    # -S no site, -s no user site, -B no bytecode writes, -P no script dir on sys.path,
    # frozen_modules=off: even os, codecs, io... are read (and compiled) from the mount.
    cmd = [BASE_PYTHON, "-S", "-s", "-B", "-P", "-X", "frozen_modules=off", "-c", APP_CODE.format(mods=APP_MODULES)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=timeout)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        return dt, f"python exited {r.returncode}: {short(r.stderr)}"
    files = r.stdout.split()
    outside = [f for f in files if not f.startswith(str(peer.root) + "/")]
    if outside or len(files) < len(APP_MODULES):
        return dt, f"{len(outside)} of {len(files)} modules not imported from the tree, e.g. {outside[:3]}"
    return dt, None


def content_check(data: Data, peer: Peer, rels: list[str], cap: float | None = None) -> tuple[str | None, int, int]:
    """sha256 of `rels` through the mount against the source: (problem, files checked, their bytes).

    With `cap` (seconds) it stops early: a slow peer must not hold up the whole bench."""
    bad = []
    checked = nbytes = 0
    t0 = time.perf_counter()
    for rel in rels:
        try:
            h = sha256_file(peer.root / rel)
        except OSError as e:
            h = f"error {e.errno}"
        checked += 1
        nbytes += data.kinds[rel][1]
        if h != data.hashes[rel]:
            bad.append(rel)
        if cap is not None and time.perf_counter() - t0 > cap:
            break
    if bad:
        return f"{len(bad)} of {checked} files differ from the source (sha256), e.g. {bad[:3]}", checked, nbytes
    return None, checked, nbytes


# -- running rows -----------------------------------------------------------------------------


class Bench:
    def __init__(self, data: Data, peers: list[Peer]) -> None:
        self.data = data
        self.peers = peers
        self.results: Results = {r.key: {} for r in report.ROWS}
        self.mount_times: dict[str, list[float]] = {p.name: [] for p in peers}
        self.profile_rows = {x for x in os.environ.get("BENCH_PROFILE", "").split(",") if x}
        self.elapsed: dict[tuple[str, str], float] = {}
        self.trace = os.environ.get("BENCH_FUSE_TRACE", "") not in ("", "0") and fusetrace.available()
        self.traces: dict[tuple[str, str], tuple[fusetrace.Trace, int]] = {}

    @contextlib.contextmanager
    def fuse_traced(self, key: str, peer: Peer, runs: int, fs: str = "") -> Iterator[None]:
        """Count the FUSE requests of `peer` while the row runs (BENCH_FUSE_TRACE); `fs`: the name
        in the table (default: the peer's)."""
        if not self.trace or not isinstance(peer, (Aysfs, Squashfuse)):
            yield
            return
        out: list[fusetrace.Trace] = []
        with fusetrace.traced(out, fusetrace.connection_of(peer.root)):
            yield
        self.traces[(fs or peer.name, key)] = (out[0], runs)

    def cell(self, key: str, peer: Peer) -> Cell:
        return self.results[key].setdefault(peer.name, Cell())

    @contextlib.contextmanager
    def profiled(self, key: str, peer: Peer) -> Iterator[None]:
        """py-spy record aysfsd during a row when BENCH_PROFILE names it (a remote row: `remote-KEY`)."""
        spy = Path(sys.executable).parent / "py-spy"
        if key not in self.profile_rows or not isinstance(peer, Aysfs) or peer.proc is None or not spy.exists():
            yield
            return
        out = RESULTS_DIR / f"profile-{key}.txt"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([str(spy), "record", "--pid", str(peer.proc.pid), "--format", "raw", "--rate", "250",
                              "--nonblocking", "--threads", "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            yield
        finally:
            p.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
            if p.poll() is None:
                p.kill()
            log(f"  py-spy profile of aysfsd during {key}: {out}")

    @contextlib.contextmanager
    def remote_row(self, key: str, peer: Peer) -> Iterator[None]:
        """What a remote row runs under: its FUSE trace and py-spy (BENCH_PROFILE=remote-KEY)."""
        with self.profiled(f"remote-{key}", peer), self.fuse_traced(key, peer, 1, f"{peer.name} (link)"):
            yield

    def measure(self, key: str, peer: Peer, fn: Callable[[Data, Peer], Check], runs: int = 1,
                drop: bool = False) -> None:
        c = self.cell(key, peer)
        t0 = time.monotonic()
        with self.profiled(key, peer), self.fuse_traced(key, peer, runs):
            for _ in range(runs):
                if drop:
                    drop_caches()
                v, problem = fn(self.data, peer)
                c.runs.append(v)
                if problem and not c.wrong:
                    c.wrong = problem
        c.value = statistics.median(c.runs)
        self.elapsed[(peer.name, key)] = time.monotonic() - t0
        unit = report.ROW[key].unit
        log(f"  {peer.name:10} {key:13} {c.value:10.3f} {unit}" + (f"  WRONG: {c.wrong}" if c.wrong else ""))

    def cold_mount(self, peer: Peer) -> None:
        t = peer.mount_cold()
        if not peer.native:
            self.mount_times[peer.name].append(t)

    def section(self, name: str, keys: list[str], peer: Peer, fn: Callable[[Peer], None]) -> None:
        if peer.na is not None:
            for k in keys:
                self.cell(k, peer).na = peer.na
            return
        log(f"{name}: {peer.name}")
        try:
            fn(peer)
        except Exception as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if isinstance(e, subprocess.TimeoutExpired):
                why = f"timed out after {e.timeout:.0f}s"
            log(f"  {peer.name}: {name} failed: {why}\n{traceback.format_exc()}")
            for k in keys:
                c = self.cell(k, peer)
                if c.value is None and c.text is None:
                    c.na = f"{'' if isinstance(e, NotAvailable) else 'error: '}{why}"
        finally:
            try:
                peer.unmount()
            except Exception as e:
                log(f"  {peer.name}: unmount failed: {e!r}")

    # the sections: each starts with a cold mount

    def s_find(self, p: Peer, first: bool = True) -> None:
        self.cold_mount(p)
        self.measure("find_cold", p, do_find)
        if not first:
            return
        self.measure("find_warm", p, do_find, RUNS)
        self.measure("find_dropped", p, do_find, RUNS, drop=True)
        self.measure("stat", p, do_stat, RUNS, drop=True)

    def s_tar(self, p: Peer, first: bool = True) -> None:
        self.cold_mount(p)
        self.measure("tar_cold", p, do_tar)
        if not first:
            return
        problem, _, _ = content_check(self.data, p, self.data.sample[:-1])
        if problem:
            self.cell("tar_cold", p).wrong = problem
        self.measure("tar_warm", p, do_tar, RUNS, drop=True)
        self.measure("tar_hot", p, do_tar, RUNS)

    def s_seq(self, p: Peer, first: bool = True) -> None:
        self.cold_mount(p)
        self.measure("seq_cold", p, do_seq)
        if not first:
            return
        problem, _, _ = content_check(self.data, p, [self.data.big])
        if problem:
            self.cell("seq_cold", p).wrong = problem
        self.measure("seq_warm", p, do_seq, RUNS, drop=True)
        self.measure("seq_hot", p, do_seq, RUNS)
        self.measure("rand_warm", p, do_rand, RUNS, drop=True)

    def s_rand(self, p: Peer, first: bool = True) -> None:
        self.cold_mount(p)
        self.measure("rand_cold", p, do_rand)

    def s_app(self, p: Peer, first: bool = True) -> None:
        self.cold_mount(p)
        self.measure("app_cold", p, do_app)
        if not first:
            return
        self.measure("app_warm", p, do_app, RUNS, drop=True)
        self.measure("app_hot", p, do_app, RUNS)
        # finally read everything: the full content check, and what the local cache then holds
        # (the big file first: then a capped check still covers most bytes)
        rels = [self.data.big] + [r for r in self.data.files if r != self.data.big]
        problem, n, nbytes = content_check(self.data, p, rels, cap=CONTENT_CAP)
        c = self.cell("content", p)
        total = len(self.data.files)
        c.text = "WRONG" if problem else (f"ok ({n} files)" if n == total else f"ok ({n} of {total}, {CONTENT_CAP:.0f}s cap)")
        c.wrong = problem
        if not p.native:
            b = p.cache_bytes()
            cc = self.cell("cache", p)
            if b is None:
                cc.na = "no local cache"
            else:
                cc.value = b / nbytes
        log(f"  {p.name:10} content       {c.text}" + (f": {problem}" if problem else ""))

    def run(self) -> None:
        sections: list[tuple[str, list[str], Callable[[Peer, bool], None]]] = [
            ("find/stat", ["find_cold", "find_warm", "find_dropped", "stat"], self.s_find),
            ("small files", ["tar_cold", "tar_warm", "tar_hot"], self.s_tar),
            ("large file", ["seq_cold", "seq_warm", "seq_hot", "rand_warm"], self.s_seq),
            ("random reads cold", ["rand_cold"], self.s_rand),
            ("app start", ["app_cold", "app_warm", "app_hot", "content", "cache"], self.s_app),
        ]
        for name, keys, fn in sections:
            for rep in range(COLD_RUNS):
                for p in self.peers:  # peers interleaved per section: slow drift hits all alike
                    if rep > 0 and (self.cell(keys[0], p).na is not None or p.na is not None
                                    or self.elapsed.get((p.name, keys[0]), 0.0) > SLOW_COLD):
                        continue
                    first = rep == 0
                    self.section(name if first else f"{name} (cold run {rep + 1})", keys, p,
                                 lambda q, fn=fn, first=first: fn(q, first))  # type: ignore[misc]
        for p in self.peers:
            if p.native:
                for k in ("mount", "rss", "anon", "cache"):
                    self.cell(k, p).na = "no mount" if k != "cache" else "is the source"
                continue
            if p.na is not None:
                for k in ("mount", "rss", "anon", "cache", "content"):
                    self.cell(k, p).na = p.na
                continue
            mt = self.mount_times[p.name]
            if mt:
                c = self.cell("mount", p)
                c.runs, c.value = mt, statistics.median(mt)
            if p.peak_rss:
                self.cell("rss", p).value = p.peak_rss / MiB
            if p.peak_anon:
                self.cell("anon", p).value = p.peak_anon / MiB


def tree_100k(work: Path, cleanup: Cleanup, results: Results) -> None:
    """Mount time and daemon RSS for a synthetic tree of 100 dirs x 1000 tiny files."""
    src = work / "src"
    for i in range(100):
        d = src / f"d{i:03}"
        d.mkdir(parents=True)
        for j in range(1000):
            (d / f"f{j:04}.txt").write_bytes(b"%d\n" % (j % 97))
    stor = work / "stor"
    peer = Aysfs(work, cleanup, src, str(stor), name="aysfs100k")
    log("100k-file tree: publishing to a local directory stor")
    peer.prepare()
    log(f"  published in {peer.publish_seconds:.1f}s")
    mc, rc = Cell(), Cell()
    results["m100k"]["aysfs"], results["rss100k"]["aysfs"] = mc, rc
    for p in ("native", "squashfuse", "rclone", "httpdirfs"):
        results["m100k"][p] = Cell(na="aysfs only")
        results["rss100k"][p] = Cell(na="aysfs only")
    try:
        for _ in range(RUNS):
            mc.runs.append(peer.mount_cold())
        mc.value = statistics.median(mc.runs)
        log(f"  mount times {', '.join(f'{x:.3f}' for x in mc.runs)} s")
        assert peer.proc is not None
        before = proc_status(peer.proc.pid, "VmRSS") or 0
        t0 = time.perf_counter()
        r = subprocess.run(["find", str(peer.root)], stdout=subprocess.PIPE, timeout=900)
        dt = time.perf_counter() - t0
        n = r.stdout.count(b"\n")
        rss = proc_status(peer.proc.pid, "VmRSS") or 0
        hwm = proc_status(peer.proc.pid, "VmHWM") or 0
        anon = proc_status(peer.proc.pid, "RssAnon") or 0
        rc.value = rss / MiB
        if n != 100 * 1000 + 100 + 1:
            rc.wrong = f"find listed {n} entries, expected {100 * 1000 + 100 + 1}"
        log(f"  find over 100k files {dt:.2f}s, {n} entries; RSS {before / MiB:.0f} MiB after mount, "
            f"{rss / MiB:.0f} MiB after find (anon {anon / MiB:.0f} MiB, peak {hwm / MiB:.0f} MiB)")
    except Exception as e:
        log(f"  100k tree failed: {e!r}\n{traceback.format_exc()}")
        for c in (mc, rc):
            if c.value is None:
                c.na = f"error: {str(e)[:150]}"
    finally:
        peer.unmount()


BIGDIR_FILES = 50_000


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def big_dir(work: Path, cleanup: Cleanup, results: Results, only: set[str]) -> None:
    """`ls -f` of one directory of 50,000 tiny files (issue 15): cold (a fresh mount, empty cache,
    page cache dropped), warm (page cache, dentries and inodes dropped before each run: the
    kernel asks for the whole listing again, the local cache holds it) and hot (kernel caches).
    aysfs publishes to a directory stor; squashfuse mounts an image; native is the source."""
    home = work / "src" / "home"
    big = home / "lib" / PYVER / "big"
    big.mkdir(parents=True)
    for i in range(BIGDIR_FILES):
        (big / f"f{i:05}.txt").write_bytes(b"%d\n" % i)
    peers: list[Peer] = [Native(work, cleanup, home),
                         Aysfs(work, cleanup, big.parent, str(work / "stor"), name="aysfs", ays_id="bench|bigdir!main"),
                         Squashfuse(work, cleanup, big.parent)]
    peers = [p for p in peers if p.native or not only or p.name in only]
    keys = ("d50k_cold", "d50k_warm", "d50k_hot")
    for k in keys:
        for name in ("rclone", "httpdirfs"):
            results[k][name] = Cell(na="not measured here")
    want = BIGDIR_FILES + 2  # with . and ..

    def listing(p: Peer, c: Cell) -> None:
        t0 = time.perf_counter()
        r = subprocess.run(["ls", "-f", str(p.root / "big")], stdout=subprocess.PIPE, timeout=600)
        c.runs.append(time.perf_counter() - t0)
        n = r.stdout.count(b"\n")
        # squashfuse lists no . and .. (its row is not WRONG for that; aysfs's would be)
        ok = n == want or (n == BIGDIR_FILES and p.name == "squashfuse")
        if (r.returncode != 0 or not ok) and not c.wrong:
            c.wrong = f"ls -f listed {n} entries (exit {r.returncode}), expected {want}"

    log(f"50,000-file directory: {', '.join(p.name for p in peers)}")
    for p in peers:
        cells = {k: results[k].setdefault(p.name, Cell()) for k in keys}
        try:
            p.prepare()
            p.mount_cold()
            listing(p, cells["d50k_cold"])
            cpu: list[float] = []
            for _ in range(RUNS):
                drop_caches()
                c0 = cpu_seconds(p.proc.pid) if p.proc is not None else 0.0
                listing(p, cells["d50k_warm"])
                if p.proc is not None:
                    cpu.append(cpu_seconds(p.proc.pid) - c0)
            for _ in range(RUNS):
                listing(p, cells["d50k_hot"])
            for c in cells.values():
                c.value = statistics.median(c.runs)
            log(f"  {p.name:10} cold {cells['d50k_cold'].value:.3f} s, warm {cells['d50k_warm'].value:.3f} s"
                + (f" (daemon CPU {statistics.median(cpu):.3f} s)" if cpu else "")
                + f", hot {cells['d50k_hot'].value:.3f} s"
                + (f"  WRONG: {cells['d50k_cold'].wrong or cells['d50k_warm'].wrong}" if any(
                    c.wrong for c in cells.values()) else ""))
        except Exception as e:
            log(f"  {p.name}: 50,000-file directory failed: {e!r}\n{traceback.format_exc()}")
            for c in cells.values():
                if c.value is None:
                    c.na = f"error: {str(e)[:150]}"
        finally:
            p.unmount()


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    if os.geteuid() != 0:
        print("bench: run as root (FUSE mounts, drop_caches)", file=sys.stderr)
        return 2
    work = Path(os.environ.get("BENCH_DIR", "/tmp/aysbench"))
    only = {x for x in os.environ.get("BENCH_PEERS", "").split(",") if x}
    cleanup = Cleanup()

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        umount_lazy_under(work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        log(f"data: copying the standard library{' (subset)' if QUICK else ''} and {BIG_SIZE // MiB} MiB of random bytes")
        data = build_data(work)
        log(f"  {len(data.files)} files ({len(data.small)} small), {len(data.entries) - len(data.files)} dirs/links, "
            f"{data.total_bytes / MiB:.0f} MiB")
        stor = LoggedNginx(work / "stor", work / "nginx-stor", put=True)
        web = AutoindexNginx(data.root, work / "nginx-web")
        for s in (stor, web):
            cleanup.add(s.stop)
            s.start()
        peers: list[Peer] = [Native(work, cleanup, data.home), Aysfs(work, cleanup, data.root, stor.url),
                             Squashfuse(work, cleanup, data.root), Rclone(work, cleanup, web),
                             Httpdirfs(work, cleanup, web)]
        peers = [p for p in peers if p.native or not only or p.name in only]
        rpeers: list[remote.RemotePeer] = []
        if remote.ENABLED:
            links = remote.start_links({"stor": stor, "web": web}, work)
            for link in links.values():
                cleanup.add(link.stop)
                link.start()
            stor_wire, web_wire = remote.Wire(links["stor"], stor), remote.Wire(links["web"], web)
            published = any(p.name == "aysfs" for p in peers)  # the loopback peer publishes the tree
            rpeers = [remote.RemotePeer("aysfs", Aysfs(work, cleanup, data.root, links["stor"].url, name="aysfs-remote",
                                                       publish_url=stor.url, publish=not published), stor_wire),
                      remote.RemotePeer("rclone", Rclone(work, cleanup, web, url=links["web"].url,
                                                         name="rclone-remote"), web_wire),
                      remote.RemotePeer("httpdirfs", Httpdirfs(work, cleanup, web, url=links["web"].url,
                                                               name="httpdirfs-remote"), web_wire)]
            rpeers = [rp for rp in rpeers if not only or rp.label in only or rp.peer.name in only]
        for p in [*peers, *(rp.peer for rp in rpeers)]:
            t0 = time.perf_counter()
            try:
                p.prepare()
                log(f"prepared {p.name} in {time.perf_counter() - t0:.1f}s")
            except NotAvailable as e:
                p.na = str(e)
                log(f"{p.name}: n/a: {e}")
            except Exception as e:
                p.na = f"set-up failed: {e}"
                log(f"{p.name}: set-up failed: {e!r}\n{traceback.format_exc()}")
        bench = Bench(data, peers)
        bench.run()
        results = bench.results
        rres: remote.RResults | None = None
        link_notes: list[str] = []
        if rpeers:
            rb = remote.Remote(data, results, rpeers, {"find": do_find, "tar": do_tar, "app": do_app, "seq": do_seq},
                               content_check, COLD_RUNS, SLOW_COLD, REMOTE_CAP, log,
                               traced=bench.remote_row)
            rb.run()
            rres = rb.results
            link_notes = rb.link_notes
        if os.environ.get("BENCH_SKIP_50K", "") in ("", "0"):
            big_dir(work / "d50k", cleanup, results, only)
        else:
            for k in ("d50k_cold", "d50k_warm", "d50k_hot"):
                del results[k]
        if os.environ.get("BENCH_SKIP_100K", "") in ("", "0"):
            tree_100k(work / "t100k", cleanup, results)
        else:
            del results["m100k"], results["rss100k"]
        write_report(results, data, rres, link_notes)
        if bench.traces:
            write_traces(bench.traces)
        return 0
    finally:
        cleanup.run()
        umount_lazy_under(work)


def write_traces(traces: dict[tuple[str, str], tuple[fusetrace.Trace, int]]) -> None:
    lines = ["# FUSE requests per run (kernel tracepoints fuse_request_send/end)", "",
             "Per row and filesystem: requests per run, then the opcodes with the most total latency "
             "(count per run x mean latency from send to reply).", "",
             "| row | fs | requests/run | top opcodes (per run) |", "|---|---|---:|---|"]
    for (peer, key), (t, runs) in traces.items():
        per = fusetrace.Trace({op: fusetrace.OpStats(s.count // runs, s.errors // runs, s.total_us / runs)
                               for op, s in t.ops.items()}, t.lost)
        row = report.ROW.get(key) or remote.ROW.get(key)
        lines.append(f"| {row.label if row else key} | {peer} | {t.total / runs:.0f} | {per.summary()} |")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "fuse-requests.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS_DIR / 'fuse-requests.md'}")


def code_state() -> str:
    """git HEAD plus a digest of the daemon's sources, subpackages too (the editable install runs them as they are)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted((root / "aysfsd").rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"{r.stdout.strip() or '?'}+aysfsd:{h.hexdigest()[:10]}"


CODE0 = code_state()


def write_report(results: Results, data: Data, rres: remote.RResults | None = None,
                 link_notes: list[str] | None = None) -> None:
    bars = report.bars(results)
    tar_cold = results.get("tar_cold", {}).get("aysfs")
    loopback_tar = tar_cold.value if tar_cold is not None and not tar_cold.wrong else None
    rbars = remote.bars(rres, loopback_tar) if rres is not None else []
    head = (f"aysfs benchmark ({'BENCH_QUICK: ' if QUICK else ''}{len(data.files)} files, "
            f"{data.total_bytes / MiB:.0f} MiB incl. a {BIG_SIZE // MiB} MiB random file; "
            f"cold rows: median of {COLD_RUNS} fresh mounts, other rows: median of {RUNS} runs; "
            f"'x native' = times slower than native, lower is better; load average {LOAD0} at start, "
            f"{os.getloadavg()[0]:.2f} at end; code {CODE0})")
    notes = report.notes(results)
    code1 = code_state()
    if code1 != CODE0:
        notes.insert(0, f"WARNING: aysfsd's code changed during the run ({CODE0} -> {code1}): aysfs rows are mixed")
    for row in report.ROWS:
        if row.key.endswith("_cold"):
            for peer, c in results.get(row.key, {}).items():
                if c.value is not None and 0 < len(c.runs) < COLD_RUNS:
                    notes.append(f"runs {peer:10} {row.label}: {len(c.runs)} of {COLD_RUNS} cold runs "
                                 f"(the first took over {SLOW_COLD:.0f} s, or a later one failed)")
    if rres is not None:
        notes += remote.notes(rres) + (link_notes or [])
    text = [head, "", report.plain_table(results), ""]
    if rres is not None:
        text += [remote.plain(rres, COLD_RUNS), ""]
    if notes:
        text += ["notes:", *notes, ""]
    text += ["bars (issue 7):", *(b.line() for b in bars)]
    if rbars:
        text += ["", "bars (issue 13, remote link):", *(b.line() for b in rbars)]
    print("\n".join(text), flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = [f"# {head}", "", report.markdown_table(results), ""]
    if rres is not None:
        md += ["## Remote link", "", remote.markdown(rres, COLD_RUNS), ""]
    if notes:
        md += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    md += ["## Bars (issue 7)", "", *(f"- {b.line()}" for b in bars), ""]
    if rbars:
        md += ["## Bars (issue 13, remote link)", "", *(f"- {b.line()}" for b in rbars), ""]
    md += ["![ratios](ratios.png)", ""]
    (RESULTS_DIR / "results.md").write_text("\n".join(md))
    (RESULTS_DIR / "results.json").write_text(json.dumps(
        {"header": head, "rows": {k: {p: dataclasses.asdict(c) for p, c in v.items()} for k, v in results.items()},
         "bars": [dataclasses.asdict(b) for b in bars],
         "remote": remote.as_json(rres) if rres is not None else None,
         "remote_bars": [dataclasses.asdict(b) for b in rbars]}, indent=1))
    err = report.chart(results, RESULTS_DIR / "ratios.png")
    print(f"\nwrote {RESULTS_DIR / 'results.md'}" + (f"; {err}" if err else f" and {RESULTS_DIR / 'ratios.png'}"))
    log("done")


if __name__ == "__main__":
    sys.exit(main())
