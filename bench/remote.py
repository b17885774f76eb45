"""The remote rows of `make bench` (issue 13): every stor behind a simulated link, same run, same data.

aysfsd reads its nginx stor, rclone and httpdirfs their autoindex nginx, each through its own
`bench/slowlink.py` proxy (`BENCH_RTT_MS`, default 20; `BENCH_RATE_MBIT`, default 1000;
`BENCH_REMOTE=0` skips all of this). Rows, all cold (a fresh mount, an empty local cache, the page
cache dropped): find, tar of the small files, app start without and with a startup profile, the
big file. Per row and peer: the requests the server's nginx logged (its access log), the bytes and
new connections that crossed the link (the proxy's counters, from the end of the mount until the
unmount, so read-ahead that outlives the reader counts too), and how busy the link was on its
way down while the row ran. Native's figures are its cold rows of the same run.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
import traceback
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.peers import BIN, Aysfs, NotAvailable, Peer
from bench.report import Bar, Cell, Results
from bench.slowlink import SlowLink, Stats

MiB = 1 << 20
RTT_MS = float(os.environ.get("BENCH_RTT_MS", "20"))
RATE_MBIT = float(os.environ.get("BENCH_RATE_MBIT", "1000"))
ENABLED = os.environ.get("BENCH_REMOTE", "") != "0"
PEERS = ["native", "aysfs", "rclone", "httpdirfs"]
PROFILED_ID = "bench|stdlib!profiled"  # the same tree, republished with a startup profile
PROFILE_IDLE = 3  # seconds without a new blob that end a recording
TIMELINE = os.environ.get("BENCH_TIMELINE", "")  # a directory: each run's requests, in time from its mount
Measure = Callable[..., tuple[float, str | None]]  # (data, peer, timeout=) -> (value, problem)


@dataclass(frozen=True)
class RRow:
    key: str
    label: str
    unit: str
    kind: str  # "time" (lower is better), "rate" (higher is better), "abs"
    native: str | None  # native's row in the loopback results


ROWS = [
    RRow("mount", "mount, cold", "s", "abs", None),
    RRow("find", "find, cold", "s", "time", "find_cold"),
    RRow("tar", "small files (tar cf -), cold", "s", "time", "tar_cold"),
    RRow("app", "app start, cold", "s", "time", "app_cold"),
    RRow("app_profile", "app start with a profile, cold", "s", "time", "app_cold"),
    RRow("seq", "large file sequential, cold", "MiB/s", "rate", "seq_cold"),
]
ROW = {r.key: r for r in ROWS}


@dataclass
class Traffic:
    """What one run cost on the link and at the server."""

    requests: int  # nginx's access log
    bytes_down: int  # server -> client through the proxy
    bytes_up: int
    connections: int  # new TCP connections through the proxy
    busy: float  # bytes down during the row / (row time x rate): the link's utilisation

    def text(self) -> str:
        return (f"{self.requests} req, {self.bytes_down / 1e6:.1f} MB, {self.connections} conn, "
                f"busy {self.busy * 100:.0f}%")


@dataclass
class RCell(Cell):
    traffic: list[Traffic] = field(default_factory=list)
    capped: float | None = None  # a run was stopped after this many seconds

    def median_traffic(self) -> Traffic | None:
        if not self.traffic:
            return None
        t = self.traffic

        def med(f: Callable[[Traffic], Any]) -> Any:
            return type(f(t[0]))(statistics.median(f(x) for x in t))

        return Traffic(med(lambda x: x.requests), med(lambda x: x.bytes_down), med(lambda x: x.bytes_up),
                       med(lambda x: x.connections), med(lambda x: x.busy))


RResults = dict[str, dict[str, RCell]]
Snap = tuple[Stats, int, float]  # the link's counters, the server's requests, perf_counter()


@dataclass
class Wire:
    """A peer's way to its server: the simulated link and the server's access log."""

    link: SlowLink
    server: Any  # bench.peers.LoggedNginx

    def snap(self) -> Snap:
        return self.link.stats(), self.server.answered(), time.perf_counter()

    def traffic(self, a: Snap, b: Snap, end: Snap, since: Snap | None = None) -> Traffic:
        """Counted from `since` (default `a`) to `end`; the link's utilisation over the row, `a` to `b`."""
        seconds = max(b[2] - a[2], 1e-9)
        rate = self.link.rate_bps
        busy = (b[0].bytes_down - a[0].bytes_down) / (seconds * rate) if rate > 0 else 0.0
        s = since or a
        return Traffic(end[1] - s[1], end[0].bytes_down - s[0].bytes_down, end[0].bytes_up - s[0].bytes_up,
                       end[0].connections - s[0].connections, busy)


@dataclass
class RemotePeer:
    label: str  # its column: aysfs, rclone, httpdirfs
    peer: Peer
    wire: Wire


class Remote:
    """Runs the remote rows; `results` holds them by row key and column."""

    def __init__(self, data: Any, native: Results, peers: list[RemotePeer], measures: dict[str, Measure],
                 check: Callable[[Any, Peer, list[str]], tuple[str | None, int, int]], cold_runs: int,
                 slow: float, cap: float, log: Callable[[str], None],
                 traced: Callable[[str, Peer], contextlib.AbstractContextManager[None]] | None = None) -> None:
        self.data = data
        self.native = native
        self.peers = peers
        self.measures = measures
        self.check = check
        self.cold_runs = cold_runs
        self.slow = slow
        self.cap = cap
        self.log = log
        self.traced = traced or (lambda key, peer: contextlib.nullcontext())  # FUSE requests (BENCH_FUSE_TRACE)
        self.results: RResults = {r.key: {} for r in ROWS}
        self.first_run: dict[tuple[str, str], float] = {}
        self.profiled: Peer | None = None
        self.profile_problem: str | None = None
        self.link_notes: list[str] = []  # what each proxy carried and its CPU time
        for r in ROWS:
            if r.native:
                nc = native.get(r.native, {}).get("native")
                c = self.results[r.key]["native"] = RCell()
                if nc is None or nc.value is None:
                    c.na = "native not measured"
                else:
                    c.value, c.runs = nc.value, list(nc.runs)
            else:
                self.results[r.key]["native"] = RCell(na="no mount")

    def cell(self, key: str, rp: RemotePeer) -> RCell:
        return self.results[key].setdefault(rp.label, RCell())

    def run(self) -> None:
        for key in ("find", "tar", "app", "seq", "app_profile"):
            for rep in range(self.cold_runs):
                for rp in self.peers:  # interleaved: slow drift of the machine hits all alike
                    c = self.cell(key, rp)
                    if rep > 0 and (c.na is not None or c.capped is not None or not c.runs
                                    or self.first_run.get((rp.label, key), 0.0) > self.slow):
                        continue
                    self.one(key, rp, rep)
        for rp in self.peers:
            c = self.cell("mount", rp)
            if c.runs:
                c.value = statistics.median(c.runs)
            elif c.na is None:
                c.na = rp.peer.na or "not mounted"
        for link in {id(rp.wire.link): rp.wire.link for rp in self.peers}.values():
            cpu, st = link.cpu_seconds(), link.stats()
            if cpu is not None:
                self.link_notes.append(f"link  {link.name}: {st.connections} connections, {st.bytes_down / 1e6:.0f} MB "
                                       f"down, {st.bytes_up / 1e6:.1f} MB up, proxy CPU {cpu:.1f} s "
                                       f"({st.bytes_down / 1e6 / max(cpu, 0.01):.0f} MB per CPU-second)")
                self.log(self.link_notes[-1])

    def one(self, key: str, rp: RemotePeer, rep: int) -> None:
        c = self.cell(key, rp)
        if rp.peer.na is not None:
            c.na = rp.peer.na
            return
        self.log(f"remote {ROW[key].label}{f' (cold run {rep + 1})' if rep else ''}: {rp.label}")
        peer = rp.peer
        measure = self.measures["app" if key == "app_profile" else key]
        t_start = time.perf_counter()
        try:
            if key == "app_profile":
                peer = self.profiled_peer(rp)
            s0 = rp.wire.snap()
            wall0 = time.time()
            mount_time = peer.mount_cold()
            s1 = rp.wire.snap()
            wall1 = time.time()
            if key == "app_profile":  # its mount may fetch the profile: counted with the row, not the mount row
                self.log(f"  mounted in {mount_time:.3f} s")
            else:
                mc = self.cell("mount", rp)
                mc.runs.append(mount_time)
                mc.traffic.append(rp.wire.traffic(s0, s1, s1))
            v: float | None = None
            problem: str | None = None
            try:
                with self.traced(key, peer):
                    v, problem = measure(self.data, peer, timeout=self.cap)
            except subprocess.TimeoutExpired:
                c.capped = self.cap
            s2 = rp.wire.snap()
            wall2 = time.time()
            if key == "app_profile" and isinstance(peer, Aysfs):  # what the daemon says of the profile's use
                st = self.mount_status(peer)
                self.log(f"  aysctl status: profile {st.get('profile')}, watch {st.get('watch')}")
            if v is not None and key == "tar" and rep == 0:  # tar compared sizes; a sample of contents too
                problem = problem or self.check(self.data, peer, self.data.sample[:-1])[0]
            peer.unmount()
            c.traffic.append(rp.wire.traffic(s1, s2, rp.wire.snap(), since=s0 if key == "app_profile" else s1))
            if TIMELINE:
                self.timeline(Path(TIMELINE) / f"{key}-{rp.label}-{rep + 1}.txt", rp, s0[1], wall0, wall1, wall2)
            if v is None:
                self.log(f"  {rp.label}: stopped after {self.cap:.0f} s  {c.traffic[-1].text()}")
                return
            c.runs.append(v)
            c.value = statistics.median(c.runs)
            if problem and not c.wrong:
                c.wrong = problem
            self.log(f"  {rp.label:10} {key:12} {v:10.3f} {ROW[key].unit}  {c.traffic[-1].text()}"
                     + (f"  WRONG: {problem}" if problem else ""))
        except Exception as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if not isinstance(e, NotAvailable):
                self.log(f"  {rp.label}: {key} failed: {why}\n{traceback.format_exc()}")
                why = f"error: {why}"
            if c.value is None:
                c.na = why
        finally:
            peer.unmount()
            if rep == 0:
                self.first_run[(rp.label, key)] = time.perf_counter() - t_start

    @staticmethod
    def timeline(path: Path, rp: RemotePeer, since: int, wall0: float, wall1: float, wall2: float) -> None:
        """The run's requests as the server logged them (nginx's `started` format: end time, seconds,
        request, status), in ms from the mount's start, with the size of the file served."""
        out = [f"# mount start 0, mounted {1e3 * (wall1 - wall0):.1f} ms, row ended {1e3 * (wall2 - wall0):.1f} ms",
               "# start_ms end_ms bytes status uri"]
        rows = []
        server = rp.wire.server
        for line in server.logged_since(since):
            parts = line.split('"')
            times, req = parts[0].split(), parts[1].split() if len(parts) > 2 else []
            if len(times) != 2 or len(req) != 3:
                continue
            end, took = float(times[0]), float(times[1])
            f = Path(server.root) / urllib.parse.unquote(req[1]).lstrip("/")
            size = f.stat().st_size if f.is_file() else 0
            rows.append((1e3 * (end - took - wall0), 1e3 * (end - wall0), size, parts[2].strip(), req[1]))
        out += [f"{a:9.1f} {b:9.1f} {n:>10} {st} {u}" for a, b, n, st, u in sorted(rows)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(out) + "\n")

    # -- app start with a startup profile (issue 13 item 4) -------------------------------------------

    def profiled_peer(self, rp: RemotePeer) -> Peer:
        """aysfs mounting the tree republished with a profile recorded on a cold start through the link."""
        if not isinstance(rp.peer, Aysfs):
            raise NotAvailable("no startup profiles")
        if self.profiled is not None:
            return self.profiled
        if self.profile_problem is None:
            try:
                self.profiled = self.record_and_publish(rp.peer)
                return self.profiled
            except NotAvailable as e:
                self.profile_problem = str(e)
            except Exception as e:
                self.profile_problem = f"recording a profile failed: {e}"
                self.log(f"  {self.profile_problem}\n{traceback.format_exc()}")
        raise NotAvailable(self.profile_problem)

    @staticmethod
    def mount_status(peer: Aysfs) -> dict[str, Any]:
        """The mount's entry of `aysctl status --json` ({} when it cannot be read)."""
        r = peer.aysctl("--config", str(peer.config), "--json", "status", timeout=30)
        try:
            mounts = json.loads(r.stdout).get("mounts", [])
        except (ValueError, AttributeError):
            return {}
        return next((m for m in mounts if m.get("id") == peer.ays_id), {})

    def wait_recording(self, peer: Aysfs, rec: subprocess.Popen[str]) -> None:
        """Until the daemon shows the recording armed (bounded): the app start must not begin before it."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and rec.poll() is None:
            watch = self.mount_status(peer).get("watch") or {}
            if watch.get("recording") and watch.get("active") and not watch.get("items"):
                return
            time.sleep(0.1)
        raise NotAvailable("aysctl profile record: the recording did not show in aysctl status")

    def record_and_publish(self, peer: Aysfs) -> Aysfs:
        if subprocess.run([str(BIN / "aysctl"), "profile", "record", "--help"], capture_output=True).returncode != 0:
            raise NotAvailable("no profile support (aysctl profile record)")
        out = peer.work / "startup.profile"
        out.unlink(missing_ok=True)
        peer.mount_cold()
        try:
            rec = subprocess.Popen([str(BIN / "aysctl"), "--config", str(peer.config), "profile", "record",
                                    peer.ays_id, "--idle", str(PROFILE_IDLE), "-o", str(out)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.wait_recording(peer, rec)
            _, problem = self.measures["app"](self.data, peer, timeout=self.cap)
            try:
                text, _ = rec.communicate(timeout=PROFILE_IDLE + 60)
            except subprocess.TimeoutExpired:
                rec.kill()
                raise NotAvailable("aysctl profile record did not end") from None
            if rec.returncode != 0 or not out.exists():
                raise NotAvailable(f"aysctl profile record failed ({rec.returncode}): {text.strip()[-200:]}")
            if problem:
                raise NotAvailable(f"the recorded app start failed: {problem}")
        finally:
            peer.unmount()
        peer.publish_tree("--profile", str(out), ays_id=PROFILED_ID)
        self.log(f"  recorded a startup profile ({out.stat().st_size} bytes), republished as {PROFILED_ID}")
        profiled = Aysfs(peer.work.parent, peer.cleanup, peer.src, peer.stor_url, name=f"{peer.name}-profiled",
                         publish=False, ays_id=PROFILED_ID)
        profiled.prepare()
        return profiled


# -- the table and the bars -----------------------------------------------------------------------------


def ratio(res: RResults, key: str, peer: str) -> float | None:
    row = ROW[key]
    c, n = res.get(key, {}).get(peer), res.get(key, {}).get("native")
    if row.kind not in ("time", "rate") or c is None or n is None or not c.value or not n.value:
        return None
    return c.value / n.value if row.kind == "time" else n.value / c.value


def cell_text(res: RResults, key: str, peer: str, width: int) -> tuple[str, str]:
    row = ROW[key]
    c = res.get(key, {}).get(peer)
    if c is None:
        return "-", ""
    if c.value is None and c.capped is not None:
        return f"> {c.capped:.0f} s (stopped)", ""
    if c.na is not None:
        s = "n/a: " + c.na
        return (s if len(s) <= width else s[: width - 1] + "…"), ""
    if c.value is None:
        return "-", ""
    v = report.fmt_value(report.Row(key, row.label, row.unit, row.kind), c.value) + (" WRONG" if c.wrong else "")
    r = ratio(res, key, peer)
    return v, ("" if r is None or peer == "native" else f"{r:.2f}x")


def tables(res: RResults, width: int = 34) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    head = ["row"]
    for p in PEERS:
        head += [p] if p == "native" else [p, "x native"]
    body = []
    for row in ROWS:
        line = [row.label + f" [{row.unit}]"]
        for p in PEERS:
            v, r = cell_text(res, row.key, p, width)
            line += [v] if p == "native" else [v, r]
        body.append(line)
    thead = ["row (per run)", *PEERS[1:]]
    tbody = []
    for row in ROWS:
        line = [row.label]
        for p in PEERS[1:]:
            c = res.get(row.key, {}).get(p)
            t = c.median_traffic() if c else None
            line.append(t.text() if t else "-")
        tbody.append(line)
    return head, body, thead, tbody


def _plain(head: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)])


def _md(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body])


def heading(cold_runs: int) -> str:
    rate = f"{RATE_MBIT:g} Mbit/s" if RATE_MBIT > 0 else "no rate cap"
    return (f"remote link (bench/slowlink.py between each client and its nginx): {RTT_MS:g} ms RTT, {rate}, "
            f"one RTT per new connection; cold rows, median of up to {cold_runs} fresh mounts; native = its cold "
            "rows above. Traffic: requests from the server's nginx access log, MB down and new connections "
            "from the proxy (mount to unmount), busy = MB down during the row / (row time x rate)")


def plain(res: RResults, cold_runs: int) -> str:
    head, body, thead, tbody = tables(res)
    return "\n".join([heading(cold_runs), "", _plain(head, body), "", _plain(thead, tbody)])


def markdown(res: RResults, cold_runs: int) -> str:
    head, body, thead, tbody = tables(res, width=80)
    return "\n".join([heading(cold_runs), "", _md(head, body), "", _md(thead, tbody)])


def notes(res: RResults) -> list[str]:
    out = []
    for row in ROWS:
        for p in PEERS:
            c = res.get(row.key, {}).get(p)
            if c is not None and c.na and len(c.na) > 30:
                out.append(f"n/a  {p:10} remote {row.label}: {c.na}")
            if c is not None and c.wrong:
                out.append(f"WRONG {p:10} remote {row.label}: {c.wrong}")
            if c is not None and c.capped is not None:
                out.append(f"stop {p:10} remote {row.label}: a run was stopped after {c.capped:.0f} s")
    return out


def _within(res: RResults, key: str, limit: float) -> tuple[bool | None, str]:
    r = ratio(res, key, "aysfs")
    c = res.get(key, {}).get("aysfs")
    if r is None or c is None:
        return None, "not measured" + (f" ({c.na})" if c is not None and c.na else "")
    if c.wrong:
        return False, f"{r:.2f}x but the result was WRONG"
    return r <= limit, f"{r:.2f}x native (limit {limit:g}x)"


def _faster(res: RResults, key: str) -> tuple[bool | None, str]:
    """aysfs faster than rclone and httpdirfs on a remote row (a peer stopped at the cap is slower than it)."""
    row = ROW[key]
    a = res.get(key, {}).get("aysfs")
    if a is None or a.value is None:
        return None, f"{key}: aysfs not measured"
    parts = []
    ok: bool | None = not a.wrong
    for p in ("rclone", "httpdirfs"):
        # the peers have no startup profiles: aysfs with one is compared with their plain app start
        b = res.get("app" if key == "app_profile" else key, {}).get(p)
        if b is not None and b.value is None and b.capped is not None:
            bv = float(b.capped) if row.kind == "time" else 0.0
            if row.kind == "time" and a.value >= bv:
                ok = False
            parts.append(f"{p} stopped after {b.capped:.0f} s")
            continue
        if b is None or b.value is None:
            ok = None if ok else ok  # False stays False
            parts.append(f"{p} not measured")
            continue
        if b.wrong:  # a wrong result (a failed import, a short listing) is no time to beat
            parts.append(f"{p} WRONG, not compared")
            continue
        speedup = b.value / a.value if row.kind == "time" else a.value / b.value
        if speedup <= 1.0:
            ok = False
        parts.append(f"{speedup:.1f}x {p}")
    return ok, f"{key} " + ", ".join(parts)


def _and(*parts: tuple[bool | None, str]) -> tuple[bool | None, str]:
    oks = [p[0] for p in parts]
    ok = False if False in oks else (None if None in oks else True)
    return ok, "; ".join(p[1] for p in parts)


def busy_ceiling(t: Traffic, loopback_tar: float | None) -> str:
    """How busy the link could be at most if it cost nothing: the tar's bytes over the time of the
    same cold tar with the stor on loopback (no link at all), from the same run."""
    if not loopback_tar:
        return ""
    most = t.bytes_down / (loopback_tar * RATE_MBIT * 1e6 / 8)
    return (f" (with no link at all the same cold tar takes {loopback_tar:.3f} s on loopback: "
            f"at most {most * 100:.0f}% busy)")


def bars(res: RResults, loopback_tar: float | None = None) -> list[Bar]:
    """The issue 13 bars; `loopback_tar` = aysfs's cold tar on loopback in the same run, if measured."""
    tar = res.get("tar", {}).get("aysfs")
    t = tar.median_traffic() if tar else None
    busy: tuple[bool | None, str] = (None, "link use not measured") if t is None else (
        t.busy >= 0.6, f"link busy {t.busy * 100:.0f}% of {RATE_MBIT:g} Mbit/s (need >= 60%)"
        + ("" if t.busy >= 0.6 else busy_ceiling(t, loopback_tar)))
    seq = res.get("seq", {}).get("aysfs")
    mbs = seq.value * MiB / 1e6 if seq and seq.value else None
    seq_wrong = bool(seq and seq.wrong)
    sp = f" ({RATE_MBIT:g} Mbit/s, {RTT_MS:g} ms RTT)"
    return [
        Bar(f"remote{sp}: cold find <= 10x native", *_within(res, "find", 10)),
        Bar(f"remote{sp}: cold tar <= 4x native, link busy >= 60%", *_and(_within(res, "tar", 4), busy)),
        Bar(f"remote{sp}: cold app start <= 1.5x native", *_within(res, "app", 1.5)),
        Bar(f"remote{sp}: cold app start with a profile <= 1.2x native", *_within(res, "app_profile", 1.2)),
        Bar(f"remote{sp}: cold 256 MiB >= 100 MB/s", None if mbs is None else (mbs >= 100 and not seq_wrong),
            "not measured" if mbs is None else f"{mbs:.0f} MB/s" + (" but WRONG" if seq_wrong else "")),
        Bar(f"remote{sp}: every row faster than rclone and httpdirfs (aysfs is Nx as fast as ...)",
            *_and(*(_faster(res, k) for k in ("find", "tar", "app", "app_profile", "seq")))),
    ]


def as_json(res: RResults) -> dict[str, Any]:
    import dataclasses

    return {k: {p: dataclasses.asdict(c) for p, c in v.items()} for k, v in res.items()}


def start_links(servers: dict[str, Any], work: Path) -> dict[str, SlowLink]:
    """One link per server (name -> LoggedNginx), each its own proxy process."""
    links = {}
    for name, server in servers.items():
        links[name] = SlowLink(server.port, work / "links", delay_ms=RTT_MS / 2, rate_mbit=RATE_MBIT,
                               name=f"link-{name}")
    return links
