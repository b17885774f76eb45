"""Trust and hostile input: signed refs, rollback, hostile metadata, the socket's access rules, fuzzing."""

from __future__ import annotations

import errno
import grp
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aysfsd.stores.layout import blob_path, ref_path
from aysfsd.tree.objects import CHUNK_SIZE, PACK_SIZE, TreeError, decode_dir, encode_dir
from aysfsd.tree.ref import RefError, decode_ref
from tests.harness import Daemon, aysctl, basic_config, ctl, mounted, wait_for

AYS = "jumpscale|signed!main"


def make_src(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "version.txt").write_text(text)
    (root / "lib").mkdir(exist_ok=True)
    (root / "lib" / "a.py").write_text("A = 1\n")
    return root


def keypair(work: Path, name: str = "release") -> tuple[Path, str]:
    key = work / f"{name}.key"
    out = aysctl("keygen", str(key)).stdout
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    pub = (work / f"{name}.key.pub").read_text().strip()
    assert pub in out
    return key, pub


def config(work: Path, stor: Path, mnt: Path, keys: list[str] | None) -> Path:
    extra = f"trusted_keys = {json.dumps(keys)}" if keys is not None else ""
    cfg = work / "aysfs.toml"
    cfg.write_text(basic_config(work / "st", [str(stor)], {AYS: str(mnt)}, extra_main=extra))
    return cfg


def test_signed_refs_accepted_and_rollback_refused(work: Path) -> None:
    key, pub = keypair(work)
    stor, mnt = work / "stor", work / "mnt"
    src = make_src(work / "src", "v1\n")
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
    ref1 = (stor / ref_path(AYS)).read_bytes()
    assert json.loads(ref1)["revision"] == 1 and json.loads(ref1)["key"] == pub
    cfg = config(work, stor, mnt, [pub])
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        assert (mnt / "version.txt").read_text() == "v1\n"
        make_src(src, "v2\n")
        aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
        d.signal(signal.SIGHUP)
        wait_for(lambda: (mnt / "version.txt").read_text() == "v2\n", 10, "v2")
        # an attacker puts the old (validly signed) ref back: refused, v2 stays
        (stor / ref_path(AYS)).write_bytes(ref1)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "rollback refused: revision 1" in d.log(), 10, "rollback refusal in the log")
        assert (mnt / "version.txt").read_text() == "v2\n"
        assert "no trusted_keys configured" not in d.log()


@pytest.mark.parametrize("case", ["unsigned", "bad-signature", "other-ays", "untrusted-key"])
def test_refused_refs(work: Path, case: str) -> None:
    key, pub = keypair(work)
    stor, mnt = work / "stor", work / "mnt"
    src = make_src(work / "src", "v1\n")
    if case == "unsigned":
        aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor))
        expect = "is not signed"
    elif case == "bad-signature":
        aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(key))
        obj = json.loads((stor / ref_path(AYS)).read_bytes())
        obj["revision"] = 99  # changed after signing
        (stor / ref_path(AYS)).write_text(json.dumps(obj))
        expect = "bad signature"
    elif case == "other-ays":
        aysctl("publish", str(src), "--ays", "jumpscale|other!main", "--stor", str(stor), "--sign-key", str(key))
        shutil.copy(stor / ref_path("jumpscale|other!main"), stor / ref_path(AYS))
        expect = "names another ays"
    else:
        other, _ = keypair(work, "mallory")
        aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor), "--sign-key", str(other))
        expect = "untrusted key"
    cfg = config(work, stor, mnt, [pub])
    with Daemon(cfg, work / "d.log").start() as d:
        d.wait_ready()
        st = ctl(work / "st" / "aysfsd.sock", {"cmd": "status"})[-1]
        m = st["mounts"][0]
        assert m["state"] == "error" and m["root"] is None
        assert expect in m["error"]
        assert f"refused the ref from {stor}" in d.log() and expect in d.log()
        assert not mounted(mnt)


def test_unsigned_without_keys_warns_once(work: Path) -> None:
    stor, mnt = work / "stor", work / "mnt"
    aysctl("publish", str(make_src(work / "src", "v1\n")), "--ays", AYS, "--stor", str(stor))
    cfg = config(work, stor, mnt, None)
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        d.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in d.log(), 10, "reload")
        assert d.log().count("no trusted_keys configured") == 1


# -- hostile metadata ---------------------------------------------------------------------------

H = "a" * 64


def dir_bytes(entries: list[dict], **top: object) -> bytes:
    return json.dumps({"aysfs": "dir", "v": 1, "entries": entries, **top}).encode()


def f(name: object, **kw: object) -> dict:
    return {"n": name, "t": "f", "m": 0o644, "s": 1, "mt": 0, "h": H, **kw}


HOSTILE: dict[str, tuple[Any, ...]] = {
    "dotdot": ([f("..")], "hostile name '..'"),
    "dot": ([f(".")], "hostile name '.'"),
    "slash": ([f("a/b")], "hostile name 'a/b'"),
    "nul": ([f("a\x00b")], "hostile name"),
    "empty": ([f("")], "hostile name ''"),
    "not-a-string": ([f(5)], "name is not a string"),
    "duplicate": ([f("a"), f("a")], "duplicate name 'a'"),
    "unsorted": ([f("b"), f("a")], "not sorted"),
    "absurd-size": ([f("a", s=1 << 60)], "want an integer"),
    "negative-size": ([f("a", s=-1)], "want an integer"),
    "big-unchunked": ([f("a", s=CHUNK_SIZE + 1)], "unchunked file"),
    "chunks-dont-add-up": ([{"n": "a", "t": "f", "m": 0o644, "s": 10, "mt": 0, "c": [[H, 4]]}], "add up to 4"),
    "short-middle-chunk": ([{"n": "a", "t": "f", "m": 0o644, "s": CHUNK_SIZE + 2, "mt": 0,
                             "c": [[H, 2], [H, CHUNK_SIZE]]}], "every chunk but the last"),
    "bad-hash": ([f("a", h="../../etc/passwd")], "bad hash"),
    "bad-kind": ([f("a", t="x")], "unknown kind"),
    "bad-mode": ([f("a", m=0o170000)], "'m'"),
    "link-nul": ([{"n": "l", "t": "l", "m": 0o777, "s": 1, "mt": 0, "l": "a\x00"}], "bad symlink target"),
    "unknown-field": ([f("a", x=1)], "unknown entry fields"),
    "unknown-top-field": ([f("a")], "unknown fields ['x']", {"x": 1}),
    "pack-index-out-of-range": ([f("a", p=[1, 0])], "bad pack reference", {"packs": [[H, 10]]}),
    "pack-without-packs": ([f("a", p=[0, 0])], "bad pack reference"),
    "pack-member-past-end": ([f("a", s=5, p=[0, 6])], "do not fit its pack of 10", {"packs": [[H, 10]]}),
    "pack-negative-offset": ([f("a", p=[0, -1])], "do not fit", {"packs": [[H, 10]]}),
    "pack-too-big": ([f("a", p=[0, 0])], "bad pack", {"packs": [[H, PACK_SIZE + 1]]}),
    "pack-bad-hash": ([f("a", p=[0, 0])], "bad hash", {"packs": [["../x", 10]]}),
    "pack-empty-list": ([f("a")], "packs must be a non-empty list", {"packs": []}),
    "pack-of-a-link": ([{"n": "l", "t": "l", "m": 0o777, "s": 1, "mt": 0, "l": "a", "p": [0, 0]}],
                       "only a file or a directory can be in a pack", {"packs": [[H, 10]]}),
    "dir-pack-offset-past-end": ([f("a", t="d", p=[0, 10])], "do not fit its pack of 10", {"packs": [[H, 10]]}),
    "pack-of-chunked": ([{"n": "a", "t": "f", "m": 0o644, "s": 4, "mt": 0, "c": [[H, 4]], "p": [0, 0]}],
                        "without 'h' or 'p'", {"packs": [[H, 10]]}),
    "pack-big-member": ([f("a", s=(128 << 10) + 1, p=[0, 0])], "bad pack reference", {"packs": [[H, PACK_SIZE]]}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_directory_objects_refused(case: str) -> None:
    entries, message, *top = HOSTILE[case]
    data = dir_bytes(entries, **(top[0] if top else {}))
    with pytest.raises(TreeError) as e:
        decode_dir(data, "objhash")
    assert "directory object objhash" in str(e.value) and message in str(e.value), str(e.value)


def test_hostile_directory_object_served_as_eio(work: Path) -> None:
    stor, mnt = work / "stor", work / "mnt"
    aysctl("publish", str(make_src(work / "src", "v1\n")), "--ays", AYS, "--stor", str(stor))
    # replace the lib/ directory object by a hostile one (with a matching hash: the stor is hostile)
    bad = dir_bytes([f(".."), f("a")])
    h = hashlib.sha256(bad).hexdigest()
    (stor / blob_path(h)).parent.mkdir(parents=True, exist_ok=True)
    (stor / blob_path(h)).write_bytes(bad)
    root = json.loads((stor / ref_path(AYS)).read_bytes())["root"]
    top = json.loads((stor / blob_path(root)).read_bytes())
    for e in top["entries"]:
        if e["n"] == "lib":
            e["h"] = h
    top_bytes = json.dumps(top, separators=(",", ":")).encode()
    top_h = hashlib.sha256(top_bytes).hexdigest()
    (stor / blob_path(top_h)).parent.mkdir(parents=True, exist_ok=True)
    (stor / blob_path(top_h)).write_bytes(top_bytes)
    ref = json.loads((stor / ref_path(AYS)).read_bytes())
    ref["root"], ref["revision"] = top_h, 2
    (stor / ref_path(AYS)).write_text(json.dumps(ref))
    cfg = config(work, stor, mnt, None)
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        assert (mnt / "version.txt").read_text() == "v1\n"
        with pytest.raises(OSError) as e:
            os.listdir(mnt / "lib")
        assert e.value.errno == errno.EIO
        assert f"directory object {h}: hostile name '..'" in d.log()


# -- fuzzing ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_fuzz_decode_dir_only_tree_errors(data: bytes) -> None:
    try:
        decode_dir(data, "x")
    except TreeError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["n", "t", "m", "s", "mt", "h", "c", "l", "zz"]), json_values, max_size=8))
def test_fuzz_entries(entry: dict) -> None:
    try:
        es = decode_dir(dir_bytes([entry]), "x")
        assert encode_dir(es) and es[0].name not in ("", ".", "..")
    except TreeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["aysfs", "v", "ays", "root", "revision", "time", "key", "sig", "x"]),
                       json_values, max_size=9) | st.binary(max_size=200).map(lambda b: {"raw": b.hex()}))
def test_fuzz_decode_ref_only_ref_errors(obj: dict) -> None:
    try:
        r = decode_ref(json.dumps(obj).encode(), "a|b!c")
        assert r.ays == "a|b!c"
    except RefError:
        pass


@pytest.fixture
def daemon_sock(work: Path) -> Iterator[Path]:
    stor, mnt = work / "stor", work / "mnt"
    aysctl("publish", str(make_src(work / "src", "v1\n")), "--ays", AYS, "--stor", str(stor))
    cfg = config(work, stor, mnt, None)
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
        yield work / "st" / "aysfsd.sock"


def test_fuzz_control_protocol(daemon_sock: Path) -> None:
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
           | st.dictionaries(st.just("cmd"), st.sampled_from(["status", "reload", "prefetch", "cache.purge",
                                                              "log.tail", "x"]) | json_values)
           .map(lambda d: json.dumps(d).encode()))
    def one(req: bytes) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(str(daemon_sock))
        s.sendall(req.replace(b"\n", b" ") + b"\n")
        lines = s.makefile("rb").read().splitlines()
        s.close()
        final = json.loads(lines[-1])
        assert final["ok"] in (True, False)
        if not final["ok"]:
            assert final["code"] in ("bad-request", "unknown-ays", "failed", "permission") and final["error"]

    one()
    assert ctl(daemon_sock, {"cmd": "status"})[-1]["ok"]


# -- the control socket's access ----------------------------------------------------------------

@pytest.fixture
def users() -> Iterator[tuple[str, str]]:
    """A member and a non-member of group aysfs (created for the test, removed after)."""
    created_group = False
    try:
        grp.getgrnam("aysfs")
    except KeyError:
        subprocess.run(["groupadd", "--system", "aysfs"], check=True)
        created_group = True
    names = ("aysfs-t-member", "aysfs-t-other")
    for n in names:
        subprocess.run(["userdel", n], capture_output=True)
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", n], check=True)
    subprocess.run(["usermod", "-aG", "aysfs", names[0]], check=True)
    try:
        yield names
    finally:
        for n in names:
            subprocess.run(["userdel", n], capture_output=True)
        if created_group:
            subprocess.run(["groupdel", "aysfs"], capture_output=True)


def as_user(user: str, argv: list[str]) -> tuple[int, str]:
    """Run aysctl's main() in a forked child that has become `user` (the venv's interpreter
    lives under /root, which other users cannot exec, so no new process is started)."""
    import io
    import sys
    import traceback

    import aysctl.commands
    import aysctl.main
    import aysctl.render  # noqa: F401  (imported before the fork: /root is closed to `user`)

    pw = pwd.getpwnam(user)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 99
        try:
            os.close(r)
            os.setgroups(os.getgrouplist(user, pw.pw_gid))
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            buf = io.StringIO()
            sys.stdout = sys.stderr = buf
            from aysctl.main import main

            code = main(argv)
            os.write(w, buf.getvalue().encode())
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code != 99, out
    return code, out


def test_socket_access(work: Path, users: tuple[str, str]) -> None:
    member, other = users
    run = Path("/run") / f"aysfs-test-{os.getpid()}"
    run.mkdir(mode=0o755, exist_ok=True)
    try:
        stor, mnt = work / "stor", work / "mnt"
        aysctl("publish", str(make_src(work / "src", "v1\n")), "--ays", AYS, "--stor", str(stor))
        cfg = work / "aysfs.toml"
        cfg.write_text(basic_config(work / "st", [str(stor)], {AYS: str(mnt)}).replace(
            f'control_socket = "{work}/st/aysfsd.sock"', f'control_socket = "{run}/aysfsd.sock"'))
        with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
            sock = run / "aysfsd.sock"
            stt = os.stat(sock)
            assert oct(stt.st_mode & 0o777) == "0o660" and stt.st_gid == grp.getgrnam("aysfs").gr_gid
            rc, out = as_user(member, ["--socket", str(sock), "status", "--json"])
            assert rc == 0 and json.loads(out)["mounts"][0]["id"] == AYS
            assert as_user(member, ["--socket", str(sock), "reload"])[0] == 0
            rc, out = as_user(other, ["--socket", str(sock), "status"])
            assert rc == 4 and "permission denied" in out
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_cache_verify_drops_corrupt_local_blobs(work: Path) -> None:
    import lmdb

    stor, mnt = work / "stor", work / "mnt"
    src = make_src(work / "src", "v1\n")
    (src / "lib" / "b.py").write_text("B = 2\n" * 1000)
    aysctl("publish", str(src), "--ays", AYS, "--stor", str(stor))
    cfg = config(work, stor, mnt, None)
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        good = (mnt / "lib" / "b.py").read_bytes()
        h = hashlib.sha256(good).digest()
        # the disk flips bytes under the daemon (another process writes the LMDB file)
        env = lmdb.open(str(work / "st" / "cache" / "lmdb"), max_dbs=4, map_size=1 << 30)
        db = env.open_db(b"blobs")

        def landed() -> bool:  # the daemon writes to LMDB just after serving the read
            with env.begin(db=db) as txn:
                return txn.get(h) == good

        wait_for(landed, 10, "the blob in the local cache")
        with env.begin(write=True, db=db) as txn:
            txn.put(h, good.replace(b"B", b"X"))
        env.close()
        r = aysctl("--config", str(cfg), "cache", "verify", check=False)
        assert r.returncode == 1 and f"dropped {h.hex()}" in r.stdout and "1 corrupt" in r.stdout
        assert f"blob {h.hex()} was corrupt on disk" in d.log()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        assert (mnt / "lib" / "b.py").read_bytes() == good  # refetched from the stor
        assert aysctl("--config", str(cfg), "cache", "verify").returncode == 0


def test_connection_flood_does_not_stall_the_filesystem(daemon_sock: Path) -> None:
    mnt = daemon_sock.parent.parent / "mnt"
    socks = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(daemon_sock))
            socks.append(s)
        # idle clients hold connections; reads on the mount are unaffected
        for _ in range(50):
            assert (mnt / "version.txt").read_text() == "v1\n"
            assert sorted(os.listdir(mnt / "lib")) == ["a.py"]
    finally:
        for s in socks:
            s.close()
    def status_ok() -> bool:
        try:
            return bool(ctl(daemon_sock, {"cmd": "status"})[-1]["ok"])
        except OSError:  # the daemon is still shedding the flood's connections
            return False

    wait_for(status_ok, 15, "status after the flood")


def test_publish_packs_at_most_max_packs_per_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aysfsd.stores import DirStore
    from aysfsd.tree import publish

    monkeypatch.setattr(publish, "MAX_PACKS", 2)
    monkeypatch.setattr(publish, "PACK_SIZE", 3000)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02}").write_bytes(bytes([i]) * 1000)
    store = DirStore(str(tmp_path / "stor"))
    res = publish.Publisher(store).publish(str(src), AYS)
    entries = decode_dir((tmp_path / "stor" / blob_path(res.root)).read_bytes(), res.root)
    packed = [e for e in entries if e.pack]
    assert res.packs == 2 and len({e.pack for e in packed}) == 2 and len(packed) == 6  # 3 files a pack
    for e in packed:  # each member where the directory object says, and each file a blob of its own
        pack = (tmp_path / "stor" / blob_path(e.pack)).read_bytes()
        assert pack[e.pack_off:e.pack_off + e.size] == (src / e.name).read_bytes()
    assert all((tmp_path / "stor" / blob_path(e.hash)).is_file() for e in entries)
