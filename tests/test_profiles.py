"""Startup profiles through the real daemon and a real nginx stor on loopback: recorded on a
node's first cold start and learned by the next node from a shared grid directory, recorded
by an operator and published with the tree, hostile profiles refused, signed refs covering
the profile (see aysfsd.tree.profile, aysfsd.fuse.profiles)."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from aysfsd.fuse.profiles import EARLY_ITEMS, PACK_WORTH, WINDOW
from aysfsd.stores.layout import grid_profile_path, profile_ref_path, ref_path, start_path
from aysfsd.tree.objects import CHUNK_SIZE
from aysfsd.tree.packs import tree_path
from aysfsd.tree.profile import DIR_INDEX, Item, Profile, ProfileError, decode
from aysfsd.tree.ref import Ref, RefError, decode_ref, sign, verify
from aysfsd.tree.signing import keygen, load_private
from bench.slowlink import SlowLink
from tests.harness import (
    BIN,
    LINK_DELAY_MS,
    aysctl,
    config,
    sample_tree,
    start,
    status,
    stor_dir_objects,
    wait_for,
)
from tests.servers import Nginx

AYS = "jumpscale|profiles!main"
# an "app start": files read in an order that is not the tree's (nested dirs, packed small
# files, a file of three chunks, files too big for packs: more blobs than WINDOW)
APP = [f"app/mod{n:02d}.so" for n in random.Random(7).sample(range(24), 24)]
START = ["lib/logging/handlers.py", "lib/json/decoder.py", *APP[:8], "data/big.bin", "lib/email/mime/text.py",
         *APP[8:16], "lib/email/parser.py", "lib/json/__init__.py", "bin/tool.sh", *APP[16:],
         "lib/email/_policybase.py"]


@pytest.fixture
def tree(work: Path) -> Path:
    return make_tree(work)


def make_tree(work: Path) -> Path:
    """The sample tree with the app's 24 modules."""
    src = sample_tree(work / "src")
    (src / "app").mkdir()
    rnd = random.Random(8)
    for n in range(24):
        (src / "app" / f"mod{n:02d}.so").write_bytes(rnd.randbytes(150 * 1024 + n))
    return src


@pytest.fixture
def stor(work: Path) -> Any:
    server = Nginx(work / "stor", work / "nginx", put=True, access_log=True).start()
    yield server
    server.stop()


@pytest.fixture
def link(stor: Nginx, work: Path) -> Iterator[SlowLink]:
    """The stor behind a simulated network link (20 ms round trip, as `make bench`'s remote rows)."""
    with SlowLink(stor.port, work / "link", delay_ms=LINK_DELAY_MS) as slow:
        yield slow


def publish(src: Path, url: str, *extra: str) -> str:
    return aysctl("publish", str(src), "--ays", AYS, "--stor", url, *extra).stdout.split()[1]


def app_start(mnt: Path, src: Path) -> None:
    for rel in START:
        assert (mnt / rel).read_bytes() == (src / rel).read_bytes(), rel


def foreign_blob(work: Path, stor: Nginx, text: str) -> str:
    """The hash of a blob of another tree, published to the same stor."""
    other = work / "other"
    other.mkdir()
    (other / "secret.txt").write_text(text)
    aysctl("publish", str(other), "--ays", "jumpscale|other!main", "--stor", stor.url)
    return hashlib.sha256(text.encode()).hexdigest()


def blob_gets(stor: Nginx) -> list[str]:
    return [p.rsplit("/", 1)[1] for p in stor.requests() if p.startswith("/blobs/")]


def mount_status(work: Path, name: str) -> dict[str, Any]:
    return status(work, name)["mounts"][0]


def wait_profile(work: Path, name: str, state: str) -> dict[str, Any]:
    wait_for(lambda: (mount_status(work, name).get("profile") or {}).get("state") == state, 30,
             f"profile state {state} on {name}")
    return mount_status(work, name)["profile"]


def targets(src_stor: Path, profile: Profile) -> list[str]:
    """The blobs a node fetches for a profile's file items, in order: a packed file's pack when
    the profile reads at least PACK_WORTH of the pack's bytes, else the file alone, and the
    chunks of other files (directory objects left out: their packs come one level ahead)."""
    packed: dict[str, str] = {}
    pack_size: dict[str, int] = {}
    for obj in stor_dir_objects(src_stor):
        pack_size.update((h, s) for h, s in obj.get("packs", []))
        for e in obj["entries"]:
            if "p" in e and e["t"] == "f":
                packed[e["h"]] = obj["packs"][e["p"][0]][0]
    read: dict[str, int] = {}
    for i in profile.items:
        if i.index == 0 and i.hash in packed:
            read[packed[i.hash]] = read.get(packed[i.hash], 0) + i.size
    whole = {p for p, n in read.items() if n >= PACK_WORTH * pack_size[p]}
    assert whole and len(whole) < len(read), "the start reads some packs mostly and others barely"
    out: list[str] = []
    for i in profile.items:
        if i.index == DIR_INDEX:
            continue
        t = packed.get(i.hash, i.hash) if i.index == 0 else i.hash
        t = t if t in whole else i.hash
        if t not in out:
            out.append(t)
    return out


def assert_in_order(seen: list[str], want: list[str], window: int) -> None:
    """Every blob of `want` was requested, and `want[i]` before `want[j]` whenever j - i >= window.
    A node hands the blobs to its fetchers in order, WINDOW in flight; each first misses in the
    grid directory (a thread hop), so the stor sees them in that order give or take a window."""
    pos: dict[str, int] = {}
    for n, h in enumerate(seen):
        pos.setdefault(h, n)
    missing = [h for h in want if h not in pos]
    assert not missing, f"never requested: {missing}"
    for i, a in enumerate(want):
        for b in want[i + window:]:
            assert pos[a] < pos[b], f"{a[:12]} (#{i}) requested after {b[:12]} (#{want.index(b)})"


# -- the format ---------------------------------------------------------------------------------


def test_profile_format_is_canonical_bounded_and_strict() -> None:
    root, h = "a" * 64, "b" * 64
    p = Profile(root, (Item("", DIR_INDEX, root, 0), Item("lib/x.py", 0, h, 10), Item("big", 2, h, CHUNK_SIZE)))
    data = p.encode()
    assert data.startswith(b'{"aysfs":"profile","v":1,"root":"' + root.encode())
    assert decode(data, root) == p
    with pytest.raises(ProfileError, match="not " + "c" * 12):
        decode(data, "c" * 64)

    def bad(obj: dict[str, Any], match: str) -> None:
        with pytest.raises(ProfileError, match=match):
            decode(json.dumps(obj, separators=(",", ":")).encode())

    base = {"aysfs": "profile", "v": 1, "root": root}
    bad({**base, "items": [["x", 0, h, 1 << 40]]}, "absurd size")
    bad({**base, "items": [["x", 0, h, -1]]}, "absurd size")
    bad({**base, "items": [["x", DIR_INDEX, h, 5]]}, "absurd size")
    bad({**base, "items": [["x", 0, h, 1.5]]}, "absurd size")
    bad({**base, "items": [["x", 0, "B" * 64, 1]]}, "bad hash")
    bad({**base, "items": [["a/../../etc/passwd", 0, h, 1]]}, "hostile name")
    bad({**base, "items": [["/etc/passwd", 0, h, 1]]}, "hostile name")
    bad({**base, "items": [["x", -2, h, 1]]}, "bad index")
    bad({**base, "items": [["x", 0, h]]}, r"not \[path")
    bad({**base, "items": [["x", 0, h, 1]] * 65537}, "at most")
    bad({**base, "items": [[f"f{n}", 0, h, CHUNK_SIZE] for n in range(300)]}, "more than")
    bad({**base, "items": [], "extra": 1}, "unknown fields")
    bad({**base, "v": 2, "items": []}, "v1")
    with pytest.raises(ProfileError, match="canonical"):
        decode(json.dumps({**base, "items": []}, indent=1).encode())
    with pytest.raises(ProfileError, match="bytes, more than"):
        decode(b" " * (9 << 20))


def test_signed_ref_covers_the_profile(work: Path) -> None:
    keygen(str(work / "k"))
    key = load_private(str(work / "k"))
    ref = sign(Ref(AYS, "a" * 64, 3, 1.0, profile="b" * 64), key)
    trusted = [ref.key]
    back = decode_ref(ref.encode(), AYS)
    assert back.profile == "b" * 64
    verify(back, trusted)
    obj = json.loads(ref.encode())
    obj["profile"] = "c" * 64
    with pytest.raises(RefError, match="bad signature"):
        verify(decode_ref(json.dumps(obj).encode(), AYS), trusted)
    del obj["profile"]
    with pytest.raises(RefError, match="bad signature"):
        verify(decode_ref(json.dumps(obj).encode(), AYS), trusted)
    # refs without a profile decode as before
    assert decode_ref(Ref(AYS, "a" * 64, 1, 1.0).encode(), AYS).profile == ""


# -- learned on the grid ------------------------------------------------------------------------


def test_second_node_learns_the_profile_from_the_grid_and_fetches_in_its_order(
        work: Path, tree: Path, stor: Nginx, link: SlowLink) -> None:
    """Both nodes reach the stor across a simulated 20 ms link (the order is that of the
    stor's access log, on the far side of it)."""
    root = publish(tree, stor.url)
    grid = work / "grid"
    grid.mkdir()

    def cfg(name: str, mnt: Path) -> str:
        return config(work / name, [{"url": link.url}], [{"id": AYS, "mnt": str(mnt)}],
                      [{"mnt": str(grid), "writable": True}], profile_idle=1)

    m1, m2 = work / "m1", work / "m2"
    with start(work, "n1", cfg("n1", m1), [m1]) as d1:
        app_start(m1, tree)
        p1 = wait_profile(work, "n1", "recorded")
        assert p1["source"] == "none" and p1["written"] == [str(grid)]
        assert "recorded a startup profile" in d1.log()
    profile = decode((grid / grid_profile_path(root)).read_bytes(), root)
    files = [(i.path, i.index) for i in profile.items if i.index != DIR_INDEX]
    want = [(rel, n) for rel in START for n in (range(3) if rel == "data/big.bin" else [0])]
    assert files == want  # the order of first need, every chunk of the big file
    dirs = [i.path for i in profile.items if i.index == DIR_INDEX]
    assert dirs[:3] == ["", "lib", "lib/logging"] and "lib/email/mime" in dirs

    # node 2: an empty local cache, the same grid directory; its blobs are dropped from the
    # grid so that node 2's fetches show, in order, in the stor's access log
    subprocess.run(["rm", "-rf", str(grid / "blobs")], check=True)
    stor.access_log.write_text("")  # type: ignore[union-attr]
    with start(work, "n2", cfg("n2", m2), [m2]) as d2:
        p2 = wait_profile(work, "n2", "done")
        assert p2["source"] == "grid" and p2["items"] == len(profile.items) and p2["ignored"] == 0
        assert p2["errors"] == 0 and p2["fetched_blobs"] == len(targets(stor.root, profile))
        assert_in_order(blob_gets(stor), targets(stor.root, profile), 2 * WINDOW)
        before = len(blob_gets(stor))
        app_start(m2, tree)
        assert blob_gets(stor)[before:] == []  # the start found everything fetched ahead
        p2 = mount_status(work, "n2")["profile"]
        assert p2["read"] == p2["items"]  # and read every item of the profile
        assert "startup profile from the grid" in d2.log()
        plain = aysctl("status", "--socket", str(work / "n2" / "aysfsd.sock")).stdout
        assert f"profile\t{mount_status(work, 'n2')['name']}\tgrid\tdone\t{p2['read']}\t{p2['items']}" in plain


def test_hostile_profiles_cost_no_bytes(work: Path, tree: Path, stor: Nginx) -> None:
    root = publish(tree, stor.url)
    foreign = foreign_blob(work, stor, "not of this tree\n" * 100)
    json_init = tree / "lib/json/__init__.py"
    good = hashlib.sha256((tree / "bin/tool.sh").read_bytes()).hexdigest()
    grid = work / "grid"
    (grid / "profiles").mkdir(parents=True)
    mnt = work / "mnt"
    text = config(work / "n", [{"url": stor.url}], [{"id": AYS, "mnt": str(mnt)}],
                  [{"mnt": str(grid), "writable": False}], profile_idle=1)

    # absurd sizes: the whole profile is refused
    absurd = {"aysfs": "profile", "v": 1, "root": root, "items": [["bin/tool.sh", 0, good, 1 << 40]]}
    (grid / grid_profile_path(root)).write_text(json.dumps(absurd, separators=(",", ":")))
    with start(work, "n", text, [mnt]) as d:
        p = wait_profile(work, "n", "none")
        assert p["source"] == "none"
        assert "refused the profile in grid cache" in d.log() and "absurd size" in d.log()
    subprocess.run(["rm", "-rf", str(work / "n" / "cache")], check=True)

    # foreign hashes at real paths, paths the tree does not have: ignored item by item
    hostile = Profile(root, (
        Item("lib/json/__init__.py", 0, foreign, 1700),  # another tree's blob at a real path
        Item("lib/json/nope.py", 0, foreign, 1700),  # no such path
        Item("lib/json", DIR_INDEX, foreign, 0),  # not its directory object
        Item("bin/tool.sh", 0, good, (tree / "bin/tool.sh").stat().st_size),  # a true one
    ))
    (grid / grid_profile_path(root)).write_bytes(hostile.encode())
    stor.access_log.write_text("")  # type: ignore[union-attr]
    with start(work, "n", text, [mnt]) as d:
        p = wait_profile(work, "n", "done")
        assert p["source"] == "grid" and p["items"] == 4 and p["ignored"] == 3 and p["fetched_blobs"] == 1
        assert d.log().count("ignored: ") == 3
        assert foreign not in blob_gets(stor) and good in blob_gets(stor)
        assert (mnt / "lib/json/__init__.py").read_bytes() == json_init.read_bytes()
        assert (mnt / "bin/tool.sh").read_bytes() == (tree / "bin/tool.sh").read_bytes()
        assert foreign not in blob_gets(stor)


# -- recorded by an operator, published with the tree --------------------------------------------


def record(work: Path, name: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([str(BIN / "aysctl"), "--socket", str(work / name / "aysfsd.sock"), "profile",
                             "record", AYS, "-o", str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (mount_status(work, name).get("watch") or {}).get("recording") is True, 10,
             "the recording to be armed")
    return proc


def test_operator_records_and_publishes_a_profile_used_on_a_cold_mount(work: Path, tree: Path, stor: Nginx) -> None:
    root = publish(tree, stor.url)
    m1, m2 = work / "m1", work / "m2"
    out = work / "start.profile"
    with start(work, "n1", config(work / "n1", [{"url": stor.url}], [{"id": AYS, "mnt": str(m1)}]), [m1]):
        # nothing read: stopping ends the recording with nothing to write
        proc = record(work, "n1", out, "--idle", "60")
        aysctl("--socket", str(work / "n1" / "aysfsd.sock"), "profile", "stop", AYS)
        assert proc.wait(30) == 1 and "nothing" in proc.communicate()[1] and not out.exists()
        proc = record(work, "n1", out, "--idle", "60", "--json")
        app_start(m1, tree)
        r = aysctl("--socket", str(work / "n1" / "aysfsd.sock"), "profile", "stop", AYS)
        assert "stopped the recording" in r.stdout
        assert proc.wait(30) == 0, proc.communicate()
        summary = json.loads(proc.communicate()[0])
        assert summary["reason"] == "stopped" and summary["root"] == root and summary["file"] == str(out)
    profile = decode(out.read_bytes(), root)
    assert [i.path for i in profile.items if i.index == 0] == START
    assert summary["items"] == len(profile.items)

    r = aysctl("publish", str(tree), "--ays", AYS, "--stor", stor.url, "--profile", str(out))
    assert "unchanged" in r.stdout and f"profile {hashlib.sha256(out.read_bytes()).hexdigest()}" in r.stdout
    plain = json.loads((stor.root / ref_path(AYS)).read_text())
    assert set(plain) == {"aysfs", "v", "ays", "root", "revision", "time"}  # what daemons before profiles read
    named = decode_ref((stor.root / profile_ref_path(AYS)).read_bytes(), AYS)
    assert named.root == root and named.profile == hashlib.sha256(out.read_bytes()).hexdigest()

    stor.access_log.write_text("")  # type: ignore[union-attr]
    with start(work, "n2", config(work / "n2", [{"url": stor.url}], [{"id": AYS, "mnt": str(m2)}]), [m2]):
        p = wait_profile(work, "n2", "done")
        assert p["source"] == "ref" and p["hash"] == named.profile and p["ignored"] == 0
        before = len(blob_gets(stor))
        app_start(m2, tree)
        assert blob_gets(stor)[before:] == []
        assert mount_status(work, "n2")["profile"]["read"] == len(profile.items)

    # a profile of another version is refused by publish
    (tree / "new-file").write_text("a new version\n")
    r = aysctl("publish", str(tree), "--ays", AYS, "--stor", stor.url, "--profile", str(out), check=False)
    assert r.returncode == 1 and "record it again" in r.stderr


def test_tampered_profile_in_a_signed_ref_is_refused(work: Path, tree: Path, stor: Nginx) -> None:
    keygen(str(work / "k"))
    pub = (work / "k.pub").read_text().strip()
    root = publish(tree, stor.url, "--sign-key", str(work / "k"))
    size = (tree / "bin/tool.sh").stat().st_size
    good = Profile(root, (Item("bin/tool.sh", 0, hashlib.sha256((tree / "bin/tool.sh").read_bytes()).hexdigest(),
                                size),))
    (work / "p").write_bytes(good.encode())
    publish(tree, stor.url, "--sign-key", str(work / "k"), "--profile", str(work / "p"))
    named = stor.root / profile_ref_path(AYS)
    original = named.read_bytes()
    obj = json.loads(original)
    evil = Profile(root, (Item("data/big.bin", 1, "e" * 64, 10),))
    obj["profile"] = hashlib.sha256(evil.encode()).hexdigest()
    named.write_text(json.dumps(obj))

    def node(name: str) -> str:
        mnt = work / f"m-{name}"
        text = config(work / name, [{"url": stor.url}], [{"id": AYS, "mnt": str(mnt)}])
        text = text.replace("[main]\n", f'[main]\ntrusted_keys = ["{pub}"]\n', 1)
        with start(work, name, text, [mnt]) as d:
            state = "none" if name == "a" else "done"
            p = wait_profile(work, name, state)
            assert (mnt / "bin/tool.sh").read_bytes() == (tree / "bin/tool.sh").read_bytes()
            return f"{p['source']} {d.log()}"

    got = node("a")
    assert got.startswith("none ") and "refused the profile named by the ref" in got and "bad signature" in got
    named.write_bytes(original)
    assert node("b").startswith("ref ")


def test_a_reader_ahead_of_the_profile_fetches_its_file_alone_not_its_directory_packs(
        work: Path, tree: Path, stor: Nginx) -> None:
    """The profile names lib/json/decoder.py after 24 app modules: it reads a quarter of its
    directory's pack, so the profile fetches the file alone. A reader that needs it while the
    modules are still on their way (a 10 Mbit/s link: ~3 s) fetches it alone too: a miss of a
    blob the profile is fetching does not start the directory's packs (the profile knows what
    the start reads)."""
    root = publish(tree, stor.url)
    rel = "lib/json/decoder.py"
    data = (tree / rel).read_bytes()
    h = hashlib.sha256(data).hexdigest()
    mods = [Item(m, 0, hashlib.sha256((tree / m).read_bytes()).hexdigest(), (tree / m).stat().st_size) for m in APP]
    profile = Profile(root, (*mods, Item(rel, 0, h, len(data))))
    (work / "p").write_bytes(profile.encode())
    publish(tree, stor.url, "--profile", str(work / "p"))
    [json_pack] = {p for obj in stor_dir_objects(stor.root) for e in obj["entries"] if e.get("h") == h
                   for p in [obj["packs"][e["p"][0]][0]]}
    mnt = work / "mnt"
    stor.access_log.write_text("")  # type: ignore[union-attr]
    with SlowLink(stor.port, work / "link", delay_ms=LINK_DELAY_MS, rate_mbit=10) as slow:
        with start(work, "n", config(work / "n", [{"url": slow.url}], [{"id": AYS, "mnt": str(mnt)}]), [mnt]):
            wait_profile(work, "n", "fetching")
            assert (mnt / rel).read_bytes() == data  # read while the profile fetches the modules
            p = wait_profile(work, "n", "done")
            assert p["errors"] == 0 and p["ignored"] == 0
    gets = blob_gets(stor)
    assert json_pack not in gets and gets.count(h) == 1  # the file alone, once
    assert all(gets.count(m.hash) == 1 for m in mods)


def test_a_cold_start_asks_for_the_profile_ref_and_start_file_with_the_ref(work: Path, tree: Path, stor: Nginx) -> None:
    """Behind a 100 ms round trip, seen at the stor. A node that may start cold asks for the
    profile ref and the start file beside the ref (not a round trip after it); the start file
    carries the profile (its blob is not asked for) and the tree packs (the tree index is not
    asked for), so the packs and the profile's first items leave a round trip after the ref.
    Without a start file (an older publish), the profile's first items go out by their hash as
    soon as the profile is here, before the tree could place them, EARLY_ITEMS at most: an item
    the tree does not name at its place then costs its bytes only (counted ignored; the reader
    gets the tree's bytes). A restart with the version cached asks for neither file."""
    root = publish(tree, stor.url)
    foreign = foreign_blob(work, stor, "# not of this tree\n" * 50)
    files = [rel for rel in START if rel != "data/big.bin"]

    def item(rel: str) -> Item:
        return Item(rel, 0, hashlib.sha256((tree / rel).read_bytes()).hexdigest(), (tree / rel).stat().st_size)

    items = [item(rel) for rel in files[:3]] + [Item("lib/email/parser.py", 0, foreign, 950)]
    items += [item(rel) for rel in files[3:] if rel != "lib/email/parser.py"]
    assert len(items) > EARLY_ITEMS
    (work / "p").write_bytes(Profile(root, tuple(items)).encode())
    publish(tree, stor.url, "--profile", str(work / "p"))
    profile_hash = decode_ref((stor.root / profile_ref_path(AYS)).read_bytes(), AYS).profile
    packs = {p[0] for p in json.loads((stor.root / tree_path(root)).read_bytes())["packs"]}
    assert packs
    mnt = work / "mnt"
    delay = 50.0
    rtt = 2 * delay / 1000
    ref_name = ref_path(AYS).rsplit("/", 1)[1]

    def cold_start(name: str) -> tuple[dict[str, float], list[str]]:
        """(when each path's last component was first asked for, the paths asked for)"""
        stor.access_log.write_text("")  # type: ignore[union-attr]
        with SlowLink(stor.port, work / f"link-{name}", delay_ms=delay) as slow:
            text = config(work / name, [{"url": slow.url}], [{"id": AYS, "mnt": str(mnt)}])
            with start(work, name, text, [mnt]):
                p = wait_profile(work, name, "done")
                assert p["source"] == "ref" and p["ignored"] == 1 and p["errors"] == 0
                for rel in files:
                    assert (mnt / rel).read_bytes() == (tree / rel).read_bytes(), rel
        first: dict[str, float] = {}
        for t, path in stor.timed_requests():
            first.setdefault(unquote(path).rsplit("/", 1)[1], t)
        assert abs(first[ref_name + ".profile"] - first[ref_name]) < rtt / 2, "the profile ref a round trip late"
        assert abs(first[ref_name + ".start"] - first[ref_name]) < rtt / 2, "the start file a round trip late"
        return first, [unquote(r) for r in stor.requests()]

    first, asked = cold_start("a")
    assert profile_hash not in first and f"/{tree_path(root)}" not in asked
    t0 = first[ref_name]
    assert min(first[h] for h in packs) < t0 + 1.5 * rtt, "the tree packs two round trips after the ref"
    assert first[items[0].hash] < t0 + 1.5 * rtt, "the profile's first item two round trips after the ref"

    (stor.root / start_path(AYS)).unlink()
    first, asked = cold_start("b")
    assert profile_hash in first and f"/{tree_path(root)}" in asked
    back = min(first[h] for h in packs) + rtt / 2  # a request after the tree's packs came back is later
    early = [i.hash for i in items if first.get(i.hash, back) < back]
    assert items[0].hash in early and foreign in early, "the profile's first items waited for the tree"
    assert len(early) <= EARLY_ITEMS

    stor.access_log.write_text("")  # type: ignore[union-attr]
    with start(work, "b", config(work / "b", [{"url": stor.url}], [{"id": AYS, "mnt": str(mnt)}]), [mnt]):
        assert (mnt / files[0]).read_bytes() == (tree / files[0]).read_bytes()
    assert stor.requests() and not [r for r in stor.requests() if r.endswith((".profile", ".start"))]
