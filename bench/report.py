"""The results table (plain text and markdown), the ratio bar chart and the speed bars of issue 7."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

PEERS = ["native", "aysfs", "squashfuse", "rclone", "httpdirfs"]


@dataclass
class Cell:
    value: float | None = None
    runs: list[float] = field(default_factory=list)
    na: str | None = None  # why it could not be measured
    wrong: str | None = None  # why the result is wrong (content differs)
    text: str | None = None  # a non-numeric result


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str  # "s", "MiB/s", "ops/s", "MiB", "x", ""
    kind: str  # "time" (lower is better), "rate" (higher is better), "abs" (no native ratio), "text"


ROWS = [
    Row("mount", "mount time (median of the cold mounts)", "s", "abs"),
    Row("find_cold", "find, cold", "s", "time"),
    Row("find_warm", "find, warm", "s", "time"),
    Row("find_dropped", "find, warm, page cache dropped", "s", "time"),
    Row("stat", "stat every file (page cache dropped)", "s", "time"),
    Row("tar_cold", "small files (tar cf -), cold", "s", "time"),
    Row("tar_warm", "small files (tar cf -), warm", "s", "time"),
    Row("tar_hot", "small files (tar cf -), hot", "s", "time"),
    Row("seq_cold", "large file sequential, cold", "MiB/s", "rate"),
    Row("seq_warm", "large file sequential, warm", "MiB/s", "rate"),
    Row("seq_hot", "large file sequential, hot", "MiB/s", "rate"),
    Row("rand_cold", "4 KiB random reads, cold", "ops/s", "rate"),
    Row("rand_warm", "4 KiB random reads, warm", "ops/s", "rate"),
    Row("app_cold", "app start (import 15 modules), cold", "s", "time"),
    Row("app_warm", "app start, warm", "s", "time"),
    Row("app_hot", "app start, hot", "s", "time"),
    Row("rss", "daemon peak RSS (VmHWM)", "MiB", "abs"),
    Row("anon", "daemon anon RSS at unmount (RssAnon, max)", "MiB", "abs"),
    Row("cache", "local cache bytes per source byte read", "x", "abs"),
    Row("content", "content check (sha256 of every file)", "", "text"),
    Row("d50k_cold", "50,000-file directory: ls -f, cold", "s", "time"),
    Row("d50k_warm", "50,000-file directory: ls -f, warm (caches dropped)", "s", "time"),
    Row("d50k_hot", "50,000-file directory: ls -f, hot", "s", "time"),
    Row("m100k", "100k-file tree: mount time", "s", "abs"),
    Row("rss100k", "100k-file tree: daemon RSS after find", "MiB", "abs"),
]
ROW = {r.key: r for r in ROWS}

Results = dict[str, dict[str, Cell]]  # row key -> peer -> cell


def fmt_value(row: Row, v: float) -> str:
    if row.unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if row.unit in ("MiB/s", "ops/s"):
        return f"{v:,.0f} {row.unit}" if v >= 10 else f"{v:.2f} {row.unit}"
    if row.unit == "MiB":
        return f"{v:.0f} MiB"
    if row.unit == "x":
        return f"{v:.3f}"
    return f"{v:g}"


def ratio(results: Results, key: str, peer: str) -> float | None:
    """How many times slower than native (1.0 = same, lower is better); None when not comparable."""
    row = ROW[key]
    if row.kind not in ("time", "rate"):
        return None
    c, n = results.get(key, {}).get(peer), results.get(key, {}).get("native")
    if c is None or n is None or c.value is None or n.value is None or c.value <= 0 or n.value <= 0:
        return None
    return c.value / n.value if row.kind == "time" else n.value / c.value


def cell_text(results: Results, key: str, peer: str, width: int = 40) -> tuple[str, str]:
    """(value, ratio) strings for the table."""
    row = ROW[key]
    c = results.get(key, {}).get(peer)
    if c is None:
        return "-", ""
    if c.na is not None:
        s = "n/a: " + c.na
        return (s if len(s) <= width else s[: width - 1] + "…"), ""
    if c.text is not None:
        v = c.text
    elif c.value is None:
        return "-", ""
    else:
        v = fmt_value(row, c.value)
    if c.wrong:
        v += " WRONG"
    r = ratio(results, key, peer)
    rs = "" if r is None or peer == "native" else f"{r:.2f}x"
    return v, rs


def table_rows(results: Results, width: int = 40) -> tuple[list[str], list[list[str]]]:
    head = ["row"]
    for p in PEERS:
        head += [p] if p == "native" else [p, "x native"]
    body = []
    for row in ROWS:
        if row.key not in results:
            continue
        line = [row.label + (f" [{row.unit}]" if row.unit and row.unit != "x" else "")]
        for p in PEERS:
            v, r = cell_text(results, row.key, p, width)
            line += [v] if p == "native" else [v, r]
        body.append(line)
    return head, body


def plain_table(results: Results) -> str:
    head, body = table_rows(results, width=34)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), sep, *(fmt(r) for r in body)])


def markdown_table(results: Results) -> str:
    head, body = table_rows(results, width=80)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def notes(results: Results) -> list[str]:
    """Full n/a reasons and wrong-result explanations."""
    out = []
    for row in ROWS:
        for p in PEERS:
            c = results.get(row.key, {}).get(p)
            if c is None:
                continue
            if c.na and len(c.na) > 30:
                out.append(f"n/a  {p:10} {row.label}: {c.na}")
            if c.wrong:
                out.append(f"WRONG {p:10} {row.label}: {c.wrong}")
    return out


# -- the bars of issue 7 --------------------------------------------------------------------------


@dataclass
class Bar:
    label: str
    ok: bool | None  # None: could not be evaluated
    detail: str

    def line(self) -> str:
        state = {True: "PASS", False: "FAIL", None: "N/A "}[self.ok]
        return f"{state}  {self.label}: {self.detail}"


def _val(results: Results, key: str, peer: str) -> float | None:
    c = results.get(key, {}).get(peer)
    if c is None or c.value is None or c.na is not None:
        return None
    return c.value


def _wrong(results: Results, key: str, peer: str) -> bool:
    c = results.get(key, {}).get(peer)
    return bool(c and c.wrong)


def _within(results: Results, key: str, limit: float) -> tuple[bool | None, str]:
    r = ratio(results, key, "aysfs")
    if r is None:
        return None, "not measured"
    if _wrong(results, key, "aysfs"):
        return False, f"{r:.2f}x but the result was WRONG"
    return r <= limit, f"{r:.2f}x native (limit {limit}x)"


def _faster(results: Results, key: str, peer: str, factor: float = 1.0) -> tuple[bool | None, str]:
    """aysfs at least `factor` times as fast as `peer` on row `key`."""
    a, b = _val(results, key, "aysfs"), _val(results, key, peer)
    row = ROW[key]
    if a is None:
        return None, "aysfs not measured"
    if b is None:
        c = results.get(key, {}).get(peer)
        return None, f"{peer} not measured" + (f" ({c.na})" if c and c.na else "")
    speedup = b / a if row.kind == "time" else a / b  # >1: aysfs faster
    ok = speedup >= factor and not _wrong(results, key, "aysfs")
    wrong_peer = " (its result was WRONG)" if _wrong(results, key, peer) else ""
    return ok, (f"aysfs {fmt_value(row, a)} vs {peer} {fmt_value(row, b)}{wrong_peer}: "
                f"{speedup:.2f}x as fast (need >= {factor:g}x)")


def _and(*parts: tuple[bool | None, str]) -> tuple[bool | None, str]:
    oks = [p[0] for p in parts]
    ok: bool | None
    if any(o is False for o in oks):
        ok = False
    elif any(o is None for o in oks):
        ok = None
    else:
        ok = True
    return ok, "; ".join(p[1] for p in parts)


def bars(results: Results) -> list[Bar]:
    out = []
    for key in ("tar_hot", "seq_hot", "app_hot"):
        out.append(Bar(f"hot row '{ROW[key].label}' within 1.2x of native", *_within(results, key, 1.2)))
    for key in ("tar_warm", "find_warm", "find_dropped"):
        out.append(Bar(f"'{ROW[key].label}' within 1.5x of native and faster than squashfuse",
                       *_and(_within(results, key, 1.5), _faster(results, key, "squashfuse"))))
    out.append(Bar("cold small-file read within 2.5x of native, faster than rclone and httpdirfs",
                   *_and(_within(results, "tar_cold", 2.5), _faster(results, "tar_cold", "rclone"),
                         _faster(results, "tar_cold", "httpdirfs"))))
    out.append(Bar("large file cold >= 2x rclone's MB/s", *_faster(results, "seq_cold", "rclone", 2.0)))
    out.append(Bar("large file warm >= squashfuse's MB/s", *_faster(results, "seq_warm", "squashfuse", 1.0)))
    out.append(Bar("app start cold within 1.3x of native", *_within(results, "app_cold", 1.3)))
    out.append(Bar("app start warm within 1.1x of native", *_within(results, "app_warm", 1.1)))
    out.append(Bar("(issue 15) a warm listing of a 50,000-file directory within 3x of the source's",
                   *_within(results, "d50k_warm", 3.0)))
    rss = _val(results, "rss100k", "aysfs")
    out.append(Bar("daemon RSS for a 100,000-file tree under 150 MB",
                   None if rss is None else rss * 1048576 < 150e6,
                   "not measured" if rss is None else f"{rss * 1.048576:.0f} MB"))
    c = results.get("m100k", {}).get("aysfs")
    mt = _val(results, "m100k", "aysfs")
    extra = f" (runs: {', '.join(f'{x:.3f}' for x in c.runs)} s)" if c and c.runs else ""
    out.append(Bar("mounting a 100,000-file tree under 1 s", None if mt is None else mt < 1.0,
                   "not measured" if mt is None else f"{mt:.3f} s{extra}"))
    return out


# -- chart ----------------------------------------------------------------------------------------


def chart(results: Results, path: Path) -> str | None:
    """A grouped bar chart of the ratios to native (log scale); returns an error text or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed ({e}): no chart"
    keys = [r.key for r in ROWS if r.kind in ("time", "rate") and r.key in results]
    peers = [p for p in PEERS if p != "native"]
    fig, ax = plt.subplots(figsize=(max(10, len(keys) * 1.1), 6))
    width = 0.8 / len(peers)
    colors = {"aysfs": "#d62728", "squashfuse": "#1f77b4", "rclone": "#2ca02c", "httpdirfs": "#9467bd"}
    for i, p in enumerate(peers):
        xs, ys = [], []
        for j, k in enumerate(keys):
            r = ratio(results, k, p)
            c = results.get(k, {}).get(p)
            if r is not None and math.isfinite(r) and not (c and c.wrong):  # wrong results are not drawn
                xs.append(j + (i - (len(peers) - 1) / 2) * width)
                ys.append(r)
        ax.bar(xs, ys, width, label=p, color=colors.get(p))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([ROW[k].label.replace(", ", "\n", 1) for k in keys], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("x slower than native (log)")
    ax.set_title("times slower than native (lower is better; WRONG results left out)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
