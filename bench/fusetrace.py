"""Count the FUSE requests a workload sends, per opcode, with their latency (kernel tracepoints).

Uses the `fuse:fuse_request_send` / `fuse:fuse_request_end` tracepoints (Linux >= 6.15) through
tracefs. Used by run.py when BENCH_FUSE_TRACE=1; also usable on its own:

    .venv/bin/python bench/fusetrace.py [--mount DIR] -- tar -cf /dev/stdout -C /mnt/x . > /dev/null

(--mount: only requests of the FUSE connection behind DIR; other mounts are ignored.)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
_serial = itertools.count()
_SEND = re.compile(r"fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\)")
_END = re.compile(r"\s(\d+\.\d+): fuse_request_end: connection (\d+) req (\d+) len \d+ error (-?\d+)")
_TS = re.compile(r"\s(\d+\.\d+): fuse_request_send")


@dataclass
class OpStats:
    count: int = 0
    errors: int = 0
    total_us: float = 0.0

    @property
    def mean_us(self) -> float:
        return self.total_us / self.count if self.count else 0.0


@dataclass
class Trace:
    ops: dict[str, OpStats] = field(default_factory=dict)
    lost: bool = False

    def summary(self, top: int = 8) -> str:
        items = sorted(self.ops.items(), key=lambda kv: -kv[1].total_us)[:top]
        return ", ".join(f"{op.removeprefix('FUSE_')} {s.count}x{s.mean_us:.0f}us"
                         + (f" ({s.errors} err)" if s.errors else "") for op, s in items)

    @property
    def total(self) -> int:
        return sum(s.count for s in self.ops.values())


def available() -> bool:
    if not (TRACEFS / "events").is_dir():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True)
    return (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir()


def connection_of(path: str | Path) -> int:
    """The FUSE connection number (the superblock's anonymous device) behind a mounted path."""
    st = os.stat(path)
    return (os.major(st.st_dev) << 20) | os.minor(st.st_dev)


def _set(inst: Path, enable: bool, connection: int | None = None) -> None:
    for ev in ("fuse_request_send", "fuse_request_end"):
        d = inst / "events" / "fuse" / ev
        if enable:
            (d / "filter").write_text(f"connection == {connection}\n" if connection is not None else "0\n")
        (d / "enable").write_text("1\n" if enable else "0\n")


def parse(text: str) -> Trace:
    sends: dict[tuple[str, str], tuple[str, float]] = {}
    t = Trace()
    for line in text.splitlines():
        m = _SEND.search(line)
        if m:
            ts = _TS.search(line)
            sends[(m.group(1), m.group(2))] = (m.group(3), float(ts.group(1)) if ts else 0.0)
            continue
        m = _END.search(line)
        if m:
            key = (m.group(2), m.group(3))
            if key not in sends:
                continue
            op, t0 = sends.pop(key)
            s = t.ops.setdefault(op, OpStats())
            s.count += 1
            s.total_us += (float(m.group(1)) - t0) * 1e6
            if m.group(4) != "0":
                s.errors += 1
        elif "LOST" in line:
            t.lost = True
    for op, _ in sends.values():  # no reply seen (e.g. FORGET has none)
        t.ops.setdefault(op, OpStats()).count += 1
    return t


@contextlib.contextmanager
def traced(out: list[Trace], connection: int | None = None) -> Iterator[None]:
    """Trace FUSE requests (of one connection, or all) while the block runs; appends to `out`.
    In a tracing instance of its own (its own buffer and event switches), so that two traces
    at once (a benchmark and a test, two tests) neither see nor switch off each other's events."""
    inst = TRACEFS / "instances" / f"aysfs-fusetrace-{os.getpid()}-{next(_serial)}"
    inst.mkdir()
    try:
        (inst / "buffer_size_kb").write_text("65536\n")
        _set(inst, True, connection)
        try:
            yield
        finally:
            _set(inst, False)
            out.append(parse((inst / "trace").read_text(errors="replace")))
    finally:
        inst.rmdir()


def main() -> int:
    args = sys.argv[1:]
    conn = None
    if args[:1] == ["--mount"]:
        conn = connection_of(args[1])
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args or not available():
        print(__doc__ if args else "usage: fusetrace.py [--mount DIR] -- COMMAND...", file=sys.stderr)
        return 2
    res: list[Trace] = []
    with traced(res, conn):
        rc = subprocess.run(args).returncode
    t = res[0]
    print(f"{t.total} FUSE requests" + (" (trace buffer overflowed)" if t.lost else ""), file=sys.stderr)
    for op, s in sorted(t.ops.items(), key=lambda kv: -kv[1].total_us):
        print(f"  {op:22} {s.count:8} x {s.mean_us:8.1f} us = {s.total_us / 1e3:9.1f} ms"
              + (f"  ({s.errors} errors)" if s.errors else ""), file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
