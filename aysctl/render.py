"""Rendering of control replies: rich tables and progress for a terminal, plain lines otherwise.

Replies come from a separately written daemon, so every field is read defensively: a missing or
odd value shows as "-" instead of crashing the CLI.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

Reply = dict[str, Any]

STATE_STYLES = {"up": "green", "starting": "yellow", "stopping": "yellow", "error": "bold red",
                "degraded": "bold yellow"}
LEVEL_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red", "critical": "bold red"}


# --- small formatters ------------------------------------------------------------------------

def _num(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def as_int(v: object) -> int:
    n = _num(v)
    return int(n) if n is not None else 0


def _str(v: object, default: str = "-") -> str:
    return v if isinstance(v, str) and v else default


def _dict(v: object) -> Reply:
    return v if isinstance(v, dict) else {}


def _dicts(v: object) -> list[Reply]:
    return [x for x in v if isinstance(x, dict)] if isinstance(v, list) else []


def human_bytes(n: object) -> str:
    """1536 -> "1.5 KiB" (powers of 1024); "-" for a missing value."""
    value = _num(n)
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def mib(n: object) -> str:
    """Bytes as "12.3 MiB"."""
    return f"{as_int(n) / 2**20:.1f} MiB"


def human_duration(seconds: object) -> str:
    """3725 -> "1h 02m"; "-" for a missing value."""
    s = _num(seconds)
    if s is None or s < 0:
        return "-"
    secs = int(s)
    d, rest = divmod(secs, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d {h:02d}h"
    if h:
        return f"{h}h {m:02d}m"
    if m:
        return f"{m}m {sec:02d}s"
    return f"{s:.1f}s" if s < 10 else f"{sec}s"


def short_root(root: object) -> str:
    """The first 12 hex digits of a root hash, "-" if none."""
    return root[:12] if isinstance(root, str) and root else "-"


def version(mount: Reply) -> str:
    """ "a1b2c3d4e5f6 r7" from a mount's root and revision."""
    rev = mount.get("revision")
    root = short_root(mount.get("root"))
    if isinstance(rev, int) and not isinstance(rev, bool):
        return f"{root} r{rev}" if root != "-" else f"r{rev}"
    return root


def _one_line(text: str) -> str:
    """Make `text` safe for a tab-separated field."""
    return " ".join(text.replace("\t", " ").splitlines()).strip()


# --- status ----------------------------------------------------------------------------------

def _prefetch_cell(p: object) -> str:
    if not isinstance(p, dict):
        return "-"
    state = _str(p.get("state"))
    done, total, errors = as_int(p.get("blobs_done")), as_int(p.get("blobs_total")), as_int(p.get("errors"))
    text = f"{state} {done}/{total}" if state == "running" else state
    return f"{text}, {errors} errors" if errors else text


def profile_cell(p: object) -> str:
    """A mount's startup profile: "grid, read 110/120 items", "recording", "none"."""
    if not isinstance(p, dict):
        return "-"
    source, state = _str(p.get("source")), _str(p.get("state"))
    if state == "recording":
        return f"recording ({as_int(p.get('recorded'))} items)"
    if state == "recorded":
        return f"recorded {as_int(p.get('items'))} items"
    if source == "none":
        return "none" if state in ("none", "-") else state
    text = f"{source}, read {as_int(p.get('read'))}/{as_int(p.get('items'))} items"
    if state != "done":
        text += f" ({state})"
    ignored = as_int(p.get("ignored"))
    return f"{text}, {ignored} ignored" if ignored else text


def mounts_table(mounts: list[Reply]) -> Table:
    """The mounts as a rich table."""
    with_prefetch = any(isinstance(m.get("prefetch"), dict) for m in mounts)
    with_profile = any(isinstance(m.get("profile"), dict) for m in mounts)
    t = Table(title="mounts", title_justify="left", title_style="bold")
    for col in ("name", "ays id", "mountpoint", "state", "version", "hits/misses", "read local/grid/stor"):
        t.add_column(col, justify="right" if col in ("hits/misses", "read local/grid/stor") else "left")
    if with_prefetch:
        t.add_column("prefetch")
    if with_profile:
        t.add_column("profile")
    for m in mounts:
        state = _str(m.get("state"))
        state_text = Text(state, style=STATE_STYLES.get(state, ""))
        if m.get("debug") is True:
            state_text.append(" debug", style="dim")
        tiers = _dict(m.get("bytes_by_tier"))
        row: list[str | Text] = [
            Text(_str(m.get("name"))), Text(_str(m.get("id"))), Text(_str(m.get("mnt"))), state_text,
            version(m), f"{as_int(m.get('hits'))}/{as_int(m.get('misses'))}",
            " / ".join(human_bytes(tiers.get(k, 0)) for k in ("local", "grid", "stor")),
        ]
        if with_prefetch:
            row.append(_prefetch_cell(m.get("prefetch")))
        if with_profile:
            row.append(profile_cell(m.get("profile")))
        t.add_row(*row)
    return t


def sources_table(sources: list[Reply]) -> Table:
    """The stors and grid caches as a rich table."""
    t = Table(title="sources", title_justify="left", title_style="bold")
    for col in ("url", "tier", "state", "fetched", "corrupt", "failures"):
        t.add_column(col, justify="right" if col in ("fetched", "corrupt", "failures") else "left")
    for s in sources:
        down = s.get("down") is True
        corrupt, failures = as_int(s.get("corrupt")), as_int(s.get("failures"))
        t.add_row(
            Text(_str(s.get("url"))), _str(s.get("tier")),
            Text("DOWN", style="bold red") if down else Text("up", style="green"),
            f"{as_int(s.get('fetched_blobs'))} blobs, {human_bytes(s.get('fetched_bytes', 0))}",
            Text(str(corrupt), style="red" if corrupt else ""), Text(str(failures), style="yellow" if failures else ""),
        )
    return t


def daemon_line(daemon: Reply) -> Text:
    """ "aysfsd pid 123, version 0.1.0, up 2h 03m, status running, config ..., 2 reloads"."""
    text = Text("aysfsd", style="bold")
    text.append(f" pid {as_int(daemon.get('pid'))}, version {_str(daemon.get('version'))}, "
                f"up {human_duration(daemon.get('uptime'))}, status ")
    status = _str(daemon.get("status"))
    text.append(status, style="yellow" if "error" in status or status == "-" else "green")
    text.append(f", config {_str(daemon.get('config'))}, {as_int(daemon.get('reloads'))} reloads")
    metrics = _dict(daemon.get("metrics"))
    if isinstance(metrics.get("listen"), str) and metrics["listen"]:
        text.append(f", metrics at http://{metrics['listen']}/metrics")
    if isinstance(metrics.get("error"), str) and metrics["error"]:
        text.append(f", {metrics['error']}", style="bold red")
    return text


def fuse_line(daemon: Reply) -> Text | None:
    """ "fuse pyfuse3 3.5.0 with aysfs's patch (...), no_open (...)"; None from an older daemon."""
    info = _dict(daemon.get("pyfuse3"))
    if not info:
        return None
    text = Text("fuse", style="bold")
    what = ("with aysfs's patch" if info.get("patched") is True
            else "with aysfs's patch, ignored" if info.get("patch_ignored") is True else "without aysfs's patch")
    text.append(f" pyfuse3 {_str(info.get('version'))} {what} ({_str(info.get('path'))}), ")
    text.append(_str(daemon.get("fuse_mode")), style="green" if daemon.get("no_open") is True else "yellow")
    spin = info.get("spin_us")
    if isinstance(spin, int) and spin > 0:
        text.append(f"; the request loop spins up to {spin} us for the next request")
    fallback = info.get("fallback")
    if isinstance(fallback, str) and fallback:
        text.append(f"\n{fallback}", style="yellow")
    return text


def cache_line(cache: Reply) -> Text:
    """One line summarising the local cache."""
    text = Text("cache", style="bold")
    text.append(
        f" {_str(cache.get('dir'))}: {human_bytes(cache.get('bytes', 0))} / {human_bytes(cache.get('limit', 0))} used, "
        f"{as_int(cache.get('entries'))} entries, hits {as_int(cache.get('hits'))} "
        f"(memory {as_int(cache.get('memory_hits'))}) / misses {as_int(cache.get('misses'))}, "
        f"{as_int(cache.get('pack_members'))} blobs from {as_int(cache.get('packs'))} packs "
        f"({as_int(cache.get('tree_packs'))} tree packs), "
        f"evicted {as_int(cache.get('evicted_blobs'))} blobs ({human_bytes(cache.get('evicted_bytes', 0))})")
    if as_int(cache.get("fetches_waiting")) > 0:
        text.append(f", {as_int(cache.get('fetches_waiting'))} fetches waiting on downloads")
    if as_int(cache.get("queued_bytes")) > 0:
        text.append(f", {human_bytes(cache.get('queued_bytes', 0))} waiting for their write")
    if as_int(cache.get("fs_size")) > 0:
        text.append(f", {human_bytes(cache.get('fs_free', 0))} free on its filesystem "
                    f"(keeps {human_bytes(cache.get('min_free', 0))})")
    state = cache.get("state")
    if isinstance(state, str) and state != "ok":
        text.append(f"\ncache state {state}: {_str(cache.get('reason'))}", style="bold red")
    return text


CONFIG_ERROR_HEADING = "config error (the previous config is still running)"


def print_status(console: Console, st: Reply) -> None:
    """Render a status reply for a terminal."""
    daemon, cache = _dict(st.get("daemon")), _dict(st.get("cache"))
    mounts, sources = _dicts(st.get("mounts")), _dicts(st.get("sources"))
    console.print(daemon_line(daemon))
    if (fuse := fuse_line(daemon)) is not None:
        console.print(fuse)
    if upgrade := upgrade_note(st):
        console.print(Text(upgrade, style="bold yellow"))
    config_error = daemon.get("config_error")
    if isinstance(config_error, str) and config_error:
        console.print(Text(CONFIG_ERROR_HEADING, style="bold red"))
        console.print(Text(config_error, style="red"))
    if mounts:
        console.print(mounts_table(mounts))
    else:
        console.print(Text("no mounts configured", style="yellow"))
    for m in mounts:
        if m.get("state") == "error" or (isinstance(m.get("error"), str) and m.get("error")):
            line = Text(f"{_str(m.get('name'))}: ", style="bold red")
            line.append(_str(m.get("error"), "error (no details)"), style="red")
            console.print(line)
    console.print(cache_line(cache))
    if sources:
        console.print(sources_table(sources))


def status_plain(st: Reply) -> list[str]:
    """A status reply as tab-separated lines, for scripts and pipes."""
    cache = _dict(st.get("cache"))
    lines = ["#name\tid\tmnt\tstate\troot\trevision\thits\tmisses\terror"]
    for m in _dicts(st.get("mounts")):
        rev = m.get("revision")
        lines.append("\t".join([
            _one_line(_str(m.get("name"))), _one_line(_str(m.get("id"))), _one_line(_str(m.get("mnt"))),
            _str(m.get("state")), short_root(m.get("root")),
            str(rev) if isinstance(rev, int) and not isinstance(rev, bool) else "-",
            str(as_int(m.get("hits"))), str(as_int(m.get("misses"))), _one_line(_str(m.get("error"))),
        ]))
    for m in _dicts(st.get("mounts")):
        p = m.get("profile")
        if isinstance(p, dict):
            lines.append(f"profile\t{_one_line(_str(m.get('name')))}\t{_str(p.get('source'))}\t{_str(p.get('state'))}\t"
                         f"{as_int(p.get('read'))}\t{as_int(p.get('items'))}")
    daemon = _dict(st.get("daemon"))
    info = _dict(daemon.get("pyfuse3"))
    if info:  # pyfuse3's version, patched/ignored/unpatched, the session's mode (no_open/open)
        patch = ("patched" if info.get("patched") is True
                 else "ignored" if info.get("patch_ignored") is True else "unpatched")
        lines.append(f"fuse\t{_str(info.get('version'))}\t{patch}\t{'no_open' if daemon.get('no_open') is True else 'open'}"
                     f"\t{_one_line(_str(info.get('path')))}")
    lines.append(f"cache\t{as_int(cache.get('bytes'))}\t{as_int(cache.get('limit'))}\t{as_int(cache.get('entries'))}"
                 f"\t{_str(cache.get('state'))}\t{_one_line(_str(cache.get('reason')))}")
    for s in _dicts(st.get("sources")):
        lines.append(f"source\t{_one_line(_str(s.get('url')))}\t{_str(s.get('tier'))}\t"
                     f"{'down' if s.get('down') is True else 'up'}")
    return lines


def upgrade_note(st: Reply) -> str:
    """What the daemon says about a different aysfs version installed than the running one."""
    note = _dict(st.get("daemon")).get("upgrade")
    return note if isinstance(note, str) else ""


def config_error(st: Reply) -> str:
    """The daemon's pending config error text, "" if none."""
    err = _dict(st.get("daemon")).get("config_error")
    return err if isinstance(err, str) else ""


# --- prefetch --------------------------------------------------------------------------------

class PrefetchProgress:
    """A rich progress bar fed with prefetch ``progress`` events (totals may grow)."""

    def __init__(self, console: Console, label: str) -> None:
        self.console, self.label = console, label
        self.progress = Progress(
            BarColumn(bar_width=24), TextColumn("{task.fields[blobs]}"), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), TimeElapsedColumn(), console=console,
        )
        self.task: TaskID = self.progress.add_task(label, total=None, blobs="0/0 blobs")

    def __enter__(self) -> PrefetchProgress:
        self.console.print(Text(self.label, style="bold"))
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event: Reply) -> None:
        total = as_int(event.get("bytes_total"))
        self.progress.update(
            self.task, completed=as_int(event.get("bytes_done")), total=total or None,
            blobs=f"{as_int(event.get('blobs_done'))}/{as_int(event.get('blobs_total'))} blobs")


def prefetch_summary(final: Reply) -> str:
    """ "prefetched N blobs (X MiB) in T s, fetched M blobs (Y MiB), E errors"."""
    seconds = _num(final.get("seconds")) or 0.0
    return (f"prefetched {as_int(final.get('blobs'))} blobs ({mib(final.get('bytes'))}) in {seconds:.1f} s, "
            f"fetched {as_int(final.get('fetched_blobs'))} blobs ({mib(final.get('fetched_bytes'))}), "
            f"{as_int(final.get('errors'))} errors")


# --- logs ------------------------------------------------------------------------------------

def iso_time(t: object) -> str:
    """A UNIX time as local ISO 8601 with milliseconds and UTC offset."""
    n = _num(t)
    if n is None:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(n).astimezone().isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return "-"


def log_fields(event: Reply) -> tuple[str, str, str, str]:
    """(time, LEVEL, mount, message) of a ``log`` event."""
    level = _str(event.get("level"), "?").upper()
    message = event.get("message")
    return (iso_time(event.get("time")), level, _str(event.get("AYSFS_MOUNT")),
            message if isinstance(message, str) else str(message))


def log_plain(event: Reply) -> str:
    """A log event as one plain line."""
    t, level, mount, message = log_fields(event)
    return f"{t} {level:<8} {mount} {message}"


def log_text(event: Reply) -> Text:
    """A log event as a coloured line."""
    t, level, mount, message = log_fields(event)
    text = Text(f"{t} ", style="dim")
    text.append(f"{level:<8}", style=LEVEL_STYLES.get(level.lower(), ""))
    text.append(f" {mount} ", style="cyan")
    text.append(message)
    return text
