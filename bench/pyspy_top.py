"""Summarise a `py-spy record --format raw` profile (as written by BENCH_PROFILE=row,...).

    .venv/bin/python bench/pyspy_top.py bench/results/profile-tar_cold.txt [N]

Prints the functions with the most samples where they are running (self) and where they are on
the stack (inclusive), as a share of all non-idle samples.
"""

from __future__ import annotations

import re
import sys
from collections import Counter

_LOC = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    m = _LOC.match(frame.strip())
    if not m:
        return frame.strip()
    f = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in f:
            f = f.split(marker, 1)[1]
    return f"{m.group('fn')} ({f})"


def main() -> int:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            try:
                k = int(count)
            except ValueError:
                continue
            frames = [frame_name(x) for x in stack.split(";") if x and not x.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += k
            self_c[frames[-1]] += k
            for fr in set(frames):
                incl[fr] += k
    print(f"{path}: {total} samples")
    print("\nself (running):")
    for fr, k in self_c.most_common(n):
        print(f"  {100 * k / total:5.1f}%  {fr}")
    print("\ninclusive (on the stack):")
    for fr, k in incl.most_common(n):
        print(f"  {100 * k / total:5.1f}%  {fr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
