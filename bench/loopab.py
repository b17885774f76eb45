"""A/B two aysfsd commands on the rows where a FUSE request's cost shows (e.g. the same aysfsd
on a pyfuse3 with and one without a patch): per row, the FUSE requests per run, their mean
latency from send to reply (bench/fusetrace.py) and the daemon's CPU time (user + system);
each round mounts every variant afresh, the variants alternate within a round.

    BENCH_AB='A=CMD ...;B=CMD ...' [BENCH_AB_ROUNDS=4] flock /tmp/aysfs-bench.lock \\
        .venv/bin/python bench/loopab.py

e.g. A='env -C /tmp PYTHONPATH=/tmp/pf-a:/work/main /work/main/.venv/bin/python -m aysfsd.daemon.main'
(a pyfuse3 built by `PYFUSE3_PATCHES=... packaging/pyfuse3/build.sh PY --target /tmp/pf-a`).
Rows: tar cold (fresh mount, empty cache), tar warm, find warm, app warm (page cache dropped
before each: the local cache holds the data), app hot (nothing dropped). BENCH_QUICK=1 for the
stdlib subset. Prints one line per variant and row (medians over the rounds).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fusetrace  # noqa: E402
from bench.peers import Aysfs, Cleanup, LoggedNginx, drop_caches, umount_lazy_under  # noqa: E402
from bench.run import Check, Data, build_data, do_app, do_find, do_tar, log  # noqa: E402

NO_REPLY = {"FUSE_FORGET", "FUSE_BATCH_FORGET", "FUSE_INTERRUPT"}
Row = tuple[str, Callable[[Data, Aysfs], Check], bool]  # name, what runs, drop the page cache first
ROWS: list[Row] = [("tar_warm", do_tar, True), ("find_warm", do_find, True),
                   ("app_warm", do_app, True), ("app_hot", do_app, False)]


def cpu_seconds(pid: int) -> float:
    """CPU time of all the process's threads (schedstat: nanoseconds, where /proc/PID/stat
    counts 10 ms ticks; a warm find costs a few tens of ms)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def variants() -> list[tuple[str, str]]:
    spec = os.environ.get("BENCH_AB", "")
    out = [tuple(x.split("=", 1)) for x in spec.split(";") if "=" in x]
    if len(out) < 2:
        raise SystemExit("BENCH_AB='A=CMD;B=CMD' (two or more daemon commands)")
    return [(a.strip(), b.strip()) for a, b in out]


def one(data: Data, peer: Aysfs, fn: Callable[[Data, Aysfs], Check], drop: bool) -> dict[str, float]:
    """One run of a row: wall seconds, requests, mean send-to-reply us, daemon CPU seconds."""
    assert peer.proc is not None
    if drop:
        drop_caches()
    traces: list[fusetrace.Trace] = []
    c0 = cpu_seconds(peer.proc.pid)
    with fusetrace.traced(traces, fusetrace.connection_of(peer.root)):
        wall, problem = fn(data, peer)
    cpu = cpu_seconds(peer.proc.pid) - c0
    if problem:
        raise SystemExit(f"WRONG: {problem}")
    replied = [s for op, s in traces[0].ops.items() if op not in NO_REPLY]
    n = sum(s.count for s in replied)
    mean = sum(s.total_us for s in replied) / n if n else 0.0
    return {"wall": wall, "requests": traces[0].total, "mean_us": mean, "cpu": cpu}


def main() -> int:
    if os.geteuid() != 0 or not fusetrace.available():
        print("loopab: run as root, on a kernel with the fuse tracepoints", file=sys.stderr)
        return 2
    work = Path(os.environ.get("BENCH_DIR", "/tmp/aysbench-ab"))
    rounds = max(1, int(os.environ.get("BENCH_AB_ROUNDS", "4")))
    vs = variants()
    cleanup = Cleanup()
    try:
        umount_lazy_under(work)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        data = build_data(work)
        stor = LoggedNginx(work / "stor", work / "nginx-stor", put=True)
        cleanup.add(stor.stop)
        stor.start()
        peer = Aysfs(work, cleanup, data.root, stor.url)
        peer.prepare()
        res: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in range(rounds):
            for name, cmd in (vs if r % 2 == 0 else vs[::-1]):
                os.environ["BENCH_AYSFSD"] = cmd
                peer.mount_cold()
                try:
                    res.setdefault((name, "tar_cold"), []).append(one(data, peer, do_tar, False))
                    for row, fn, drop in ROWS:
                        res.setdefault((name, row), []).append(one(data, peer, fn, drop))
                finally:
                    peer.unmount()
                log(f"round {r + 1}/{rounds} {name} done (load {os.getloadavg()[0]:.1f})")
        print(f"# {rounds} rounds, load at end {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
        print("| row | variant | requests/run | mean send-to-reply | daemon CPU/run | wall/run |")
        print("|---|---|---:|---:|---:|---:|")
        for row in ["tar_cold", *(r[0] for r in ROWS)]:
            for name, _ in vs:
                runs = res[(name, row)]
                med = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                print(f"| {row} | {name} | {med['requests']:.0f} | {med['mean_us']:.1f} us | "
                      f"{med['cpu'] * 1000:.0f} ms | {med['wall']:.3f} s |")
        return 0
    finally:
        cleanup.run()
        umount_lazy_under(work)


if __name__ == "__main__":
    sys.exit(main())
