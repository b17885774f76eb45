"""End to end: publish a real tree to a real nginx stor, mount it with aysfsd, read it back."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from aysfsd.stores.layout import blob_path, ref_path
from aysfsd.tree.ref import decode_ref
from tests.harness import (
    Daemon,
    aysctl,
    basic_config,
    corrupted,
    ctl,
    mounted,
    sample_tree,
    stor_dir_objects,
    stor_tree_packs,
    tree_listing,
)
from tests.servers import Nginx

AYS = "jumpscale|sample!main"


def publish(src: Path, stor: str, ays: str = AYS) -> str:
    out = aysctl("publish", str(src), "--ays", ays, "--stor", stor).stdout
    return out.split()[1]


@pytest.fixture
def published(work: Path, nginx_stor: Nginx) -> tuple[Path, Nginx, str]:
    src = sample_tree(work / "src")
    root = publish(src, nginx_stor.url)
    return src, nginx_stor, root


def start(work: Path, stors: list[str], mounts: dict[str, str], name: str = "d") -> Daemon:
    cfg = work / f"{name}.toml"
    cfg.write_text(basic_config(work / name, stors, mounts))
    return Daemon(cfg, work / f"{name}.log").start(wait_mounts=mounts.values())


def test_publish_again_uploads_nothing(published: tuple[Path, Nginx, str]) -> None:
    src, nginx, root = published
    out = aysctl("publish", str(src), "--ays", AYS, "--stor", nginx.url).stdout
    assert out.split()[1] == root
    assert "uploaded 0 blobs (0 bytes)" in out and "unchanged" in out
    ref = decode_ref((nginx.root / ref_path(AYS)).read_bytes(), AYS)
    assert ref.root == root and ref.revision == 1
    assert (nginx.root / "refs" / "jumpscale%7Csample%21main").is_file()
    # the 9 MiB file is three chunks, each a blob named by its hash
    big = (src / "data" / "big.bin").read_bytes()
    for i in range(0, len(big), 4 << 20):
        h = hashlib.sha256(big[i:i + (4 << 20)]).hexdigest()
        assert (nginx.root / blob_path(h)).read_bytes() == big[i:i + (4 << 20)]


def test_mount_is_identical_to_source(work: Path, published: tuple[Path, Nginx, str]) -> None:
    src, nginx, _ = published
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}):
        assert tree_listing(mnt) == tree_listing(src)
        # every distinct blob of file content was downloaded once, and credited once to the mount
        blobs: dict[str, int] = {}
        for p in src.rglob("*"):
            if p.is_file() and not p.is_symlink():
                data = p.read_bytes()
                for i in range(0, max(len(data), 1), 4 << 20):
                    blobs[hashlib.sha256(data[i:i + (4 << 20)]).hexdigest()] = len(data[i:i + (4 << 20)])
        st = ctl(work / "d" / "aysfsd.sock", {"cmd": "status"})[-1]
        assert st["mounts"][0]["bytes_by_tier"]["stor"] == sum(blobs.values())
        subprocess.run(["diff", "-r", "--no-dereference", str(src), str(mnt)], check=True)
        lst = os.lstat(mnt / "bin" / "tool.sh")
        assert (lst.st_uid, lst.st_gid) == (0, 0) and lst.st_mode & 0o777 == 0o755
        assert os.stat(mnt / "space name").st_mtime_ns == 1_000_000_000_123_456_789
        assert os.readlink(mnt / "abs-link") == "/etc/hostname"
        # a big file at random offsets, across chunk boundaries
        big = (src / "data" / "big.bin").read_bytes()
        rnd = random.Random(7)
        with open(mnt / "data" / "big.bin", "rb", buffering=0) as f:
            for _ in range(200):
                off = rnd.randrange(len(big) + 10)
                n = rnd.choice([1, 4096, 100_000, 5 << 20])
                f.seek(off)
                assert f.read(n) == big[off:off + n]
        # applications run from the mount: python imports a package from it
        r = subprocess.run(["python3", "-c", "import json, sys; print(json.__file__); print(json.dumps([1]))"],
                           env={"PYTHONPATH": str(mnt / "lib"), "PATH": os.environ["PATH"]},
                           capture_output=True, text=True, check=True)
        assert r.stdout.splitlines() == [str(mnt / "lib/json/__init__.py"), "[1]"]


def test_everything_is_read_only(work: Path, published: tuple[Path, Nginx, str]) -> None:
    _, nginx, _ = published
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}):
        attempts = [
            lambda: open(mnt / "new", "w"),
            lambda: open(mnt / "space name", "a"),
            lambda: open(mnt / "space name", "r+"),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.unlink(mnt / "space name"),
            lambda: os.rmdir(mnt / "empty-dir"),
            lambda: os.chmod(mnt / "space name", 0o777),
            lambda: os.rename(mnt / "space name", mnt / "x"),
            lambda: os.symlink("x", mnt / "l"),
            lambda: os.truncate(mnt / "space name", 0),
            lambda: os.utime(mnt / "space name"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        assert (mnt / "space name").read_text() == "spaces\n"


def test_two_mounts_share_the_cache_and_survive_stor_down(work: Path, published: tuple[Path, Nginx, str]) -> None:
    src, nginx, _ = published
    a, b = work / "a", work / "b"
    cfg = work / "two.toml"
    text = basic_config(work / "st", [nginx.url], {AYS: str(a)})
    text += f"\n[[ays]]\nid = '{AYS}'\nname = 'second'\nmnt = \"{b}\"\n"
    cfg.write_text(text)
    with Daemon(cfg, work / "two.log").start(wait_mounts=[a, b]):
        assert tree_listing(a) == tree_listing(src)
        nginx.stop()
        assert tree_listing(b) == tree_listing(src)  # every byte from the shared local cache
    # a new daemon with the stor still down: metadata and data come from LMDB
    with Daemon(cfg, work / "two2.log").start(wait_mounts=[a, b]) as d:
        assert tree_listing(b) == tree_listing(src)
        assert "using the last good version" in d.log()
    assert not mounted(a) and not mounted(b)


def dir_object(stor: Path, root: str, rel: str) -> dict:
    """The decoded directory object at `rel` (a/b) of the tree `root` in a directory stor."""
    obj = json.loads((stor / blob_path(root)).read_bytes())
    for part in filter(None, rel.split("/")):
        h = next(e["h"] for e in obj["entries"] if e["n"] == part)
        obj = json.loads((stor / blob_path(h)).read_bytes())
    return obj


def pack_of(stor: Path, root: str, rel: str) -> str:
    """The hash of the pack holding the small file `rel`."""
    d, name = rel.rsplit("/", 1)
    obj = dir_object(stor, root, d)
    e = next(e for e in obj["entries"] if e["n"] == name)
    return obj["packs"][e["p"][0]][0]


def test_small_files_are_published_in_packs_and_fetched_by_pack(
        work: Path, published: tuple[Path, Nginx, str]) -> None:
    src, nginx, root = published
    obj = dir_object(nginx.root, root, "lib/email")
    packs = [(h, size, (nginx.root / blob_path(h)).read_bytes()) for h, size in obj["packs"]]
    packed = 0
    for e in obj["entries"]:
        data = (src / "lib" / "email" / e["n"]).read_bytes() if e["t"] == "f" else b""
        if "p" in e:  # the pack holds the file's bytes at its offset, and the file is a blob of its own too
            pack = packs[e["p"][0]][2]
            assert pack[e["p"][1]:e["p"][1] + e["s"]] == data
            assert (nginx.root / blob_path(e["h"])).read_bytes() == data
            packed += 1
        elif e["t"] == "f":
            assert len(data) > 128 * 1024 or not data, e["n"]
    assert packed >= 20 and all(len(p) == size <= 4 << 20 for _, size, p in packs)
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}):
        files = sorted(p for p in (src / "lib" / "email").iterdir() if p.is_file() and p.stat().st_size)
        for p in files:
            assert (mnt / "lib" / "email" / p.name).read_bytes() == p.read_bytes()
        st = ctl(work / "d" / "aysfsd.sock", {"cmd": "status"})[-1]
        unpacked = sum(1 for e in obj["entries"] if e["t"] == "f" and e["s"] and "p" not in e)
        # directory objects (at most all of them, alone or in packs of a directory's subdirectory
        # objects: they are fetched ahead), the email packs, the files too big for a pack: far
        # fewer requests than files
        dirs = 1 + sum(1 for p in src.rglob("*") if p.is_dir() and not p.is_symlink())
        dir_packs = sum(1 for o in stor_dir_objects(nginx.root) for e in o["entries"] if e["t"] == "d" and "p" in e)
        assert st["cache"]["packs"] >= len(packs) and st["cache"]["pack_members"] >= packed
        assert st["sources"][0]["fetched_blobs"] <= dirs + dir_packs + len(packs) + unpacked
        assert len(packs) + unpacked <= len(files) // 5
        assert st["sources"][0]["corrupt"] == 0


def test_corrupt_pack_costs_speed_not_data(work: Path, published: tuple[Path, Nginx, str]) -> None:
    src, nginx, root = published
    pack = pack_of(nginx.root, root, "lib/json/decoder.py")
    good = (nginx.root / blob_path(pack)).read_bytes()
    (nginx.root / blob_path(pack)).write_bytes(good.replace(b"def ", b"DEF "))
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}) as d:
        # in reverse name order: not a bulk walk (see aysfsd.fuse.bulkread), which would fetch the
        # next directories' packs
        for p in sorted((src / "lib" / "json").iterdir(), reverse=True):
            if p.is_file():
                assert (mnt / "lib" / "json" / p.name).read_bytes() == p.read_bytes()
        assert f"corrupt blob {pack} from {nginx.url}" in d.log()
        st = ctl(work / "d" / "aysfsd.sock", {"cmd": "status"})[-1]
        # no file came from a pack; the directory objects but the root's did, from the tree pack
        dir_members = len(stor_tree_packs(nginx.root)[1] - {root})
        assert st["sources"][0]["corrupt"] == 1 and st["cache"]["pack_members"] == dir_members > 0


def test_corrupt_blob_gives_eio_never_bad_bytes(work: Path, published: tuple[Path, Nginx, str]) -> None:
    src, nginx, root = published
    data = (src / "lib" / "json" / "decoder.py").read_bytes()
    h = hashlib.sha256(data).hexdigest()
    (nginx.root / blob_path(h)).write_bytes(data.replace(b"def ", b"DEF "))
    pack = pack_of(nginx.root, root, "lib/json/decoder.py")  # and the pack holding it: no good copy left
    (nginx.root / blob_path(pack)).write_bytes(corrupted((nginx.root / blob_path(pack)).read_bytes()))
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}) as d:
        with pytest.raises(OSError) as e:
            (mnt / "lib" / "json" / "decoder.py").read_bytes()
        assert e.value.errno == errno.EIO
        log = d.log()
        assert f"corrupt blob {h} from {nginx.url}" in log and f"corrupt blob {pack} from {nginx.url}" in log
        assert (mnt / "lib" / "json" / "encoder.py").read_bytes() == (src / "lib/json/encoder.py").read_bytes()
        # truncated: same answer
        big = (src / "data" / "big.bin").read_bytes()
        h2 = hashlib.sha256(big[4 << 20:8 << 20]).hexdigest()
        (nginx.root / blob_path(h2)).write_bytes(big[4 << 20:6 << 20])
        with open(mnt / "data" / "big.bin", "rb") as f:
            assert f.read(4096) == big[:4096]
            f.seek(5 << 20)
            with pytest.raises(OSError) as e:
                f.read(4096)
            assert e.value.errno == errno.EIO


def test_unreachable_stor_gives_eio_in_bounded_time(work: Path, published: tuple[Path, Nginx, str]) -> None:
    import time

    src, nginx, _ = published
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}):
        os.listdir(mnt / "lib" / "json")
        nginx.stop()
        t = time.monotonic()
        with pytest.raises(OSError) as e:
            (mnt / "lib" / "json" / "scanner.py").read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - t < 12  # fetch_timeout = 10


def test_small_siblings_fetched_together(work: Path, published: tuple[Path, Nginx, str]) -> None:
    from tests.harness import wait_for

    src, nginx, _ = published
    mnt = work / "mnt"
    with start(work, [nginx.url], {AYS: str(mnt)}):
        names = sorted(p.name for p in (src / "lib" / "email").iterdir() if p.is_file())
        assert (mnt / "lib" / "email" / names[0]).read_bytes() == (src / "lib" / "email" / names[0]).read_bytes()
        cache = work / "d" / "cache" / "lmdb"

        def all_local() -> bool:
            import lmdb

            env = lmdb.open(str(cache), max_dbs=4, readonly=True, lock=False)
            try:
                with env.begin(db=env.open_db(b"blobs", create=False)) as txn:
                    return all(txn.get(hashlib.sha256((src / "lib/email" / n).read_bytes()).digest()) is not None
                               for n in names)
            finally:
                env.close()

        wait_for(all_local, 10, "the directory's small files in the local cache")
        nginx.stop()
        for n in names:  # every sibling reads with the stor gone: fetched with the first
            assert (mnt / "lib" / "email" / n).read_bytes() == (src / "lib" / "email" / n).read_bytes()


def test_a_stop_right_after_reads_keeps_every_fetched_blob(work: Path, nginx_stor: Nginx) -> None:
    """What readers fetched is in the local cache after a stop, however soon the stop comes: the
    local write queue is written before the daemon exits (it used to be cancelled with the
    daemon's tasks, and the next start, with the stor down, answered EIO for the lost blobs)."""
    src = work / "src"
    (src / "small").mkdir(parents=True)
    rnd = random.Random(19)
    for i in range(64):
        (src / f"f{i:02}.bin").write_bytes(rnd.randbytes(1 << 20))  # one blob each (not packed)
    for i in range(300):
        (src / "small" / f"s{i:03}.txt").write_bytes(rnd.randbytes(2000))  # packs
    publish(src, nginx_stor.url)
    want = tree_listing(src)
    mnt = work / "m"
    cfg = work / "d.toml"
    cfg.write_text(basic_config(work / "st", [nginx_stor.url], {AYS: str(mnt)}))
    d = Daemon(cfg, work / "d1.log").start(wait_mounts=[mnt])
    try:
        procs = [subprocess.Popen(["cat", *sorted(str(p) for p in (mnt / "small").iterdir())],
                                  stdout=subprocess.DEVNULL)]
        procs += [subprocess.Popen(["cat", str(mnt / f"f{i:02}.bin")], stdout=subprocess.DEVNULL)
                  for i in range(64)]
        assert [p.wait(60) for p in procs] == [0] * len(procs)
    finally:
        assert d.stop() == 0  # at once, right after the last read
    nginx_stor.stop()
    with Daemon(cfg, work / "d2.log").start(wait_mounts=[mnt]):
        assert tree_listing(mnt) == want  # every byte from the local cache
