"""Debug mode with a real redis-server (password), through the real daemon and FUSE."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.harness import Daemon, aysctl, basic_config, ctl, sample_tree
from tests.servers import Nginx, Redis

AYS = "jumpscale|dev!main"
NAME = "devmount"


@pytest.fixture
def setup(work: Path, nginx_stor: Nginx, redis_server: Redis) -> tuple[Path, Path, Path]:
    src = sample_tree(work / "src", big_size=5 << 20)
    (src / "lib" / "big_mod.py").write_bytes(b"# a module over 64 KiB\n" + b"X = 1\n" * 20_000)
    aysctl("publish", str(src), "--ays", AYS, "--stor", nginx_stor.url)
    cfg = work / "aysfs.toml"
    mnt = work / "mnt"
    text = basic_config(work / "st", [nginx_stor.url], {})
    text += f"""
[debug]
debug_filter = ['.*\\.py', 'conf/.*\\.hrd']
redis.addr = "127.0.0.1"
redis.port = {redis_server.port}
redis.passwd = "{redis_server.password}"

[[ays]]
id = '{AYS}'
name = '{NAME}'
mnt = "{mnt}"
debug = true
"""
    cfg.write_text(text)
    return src, cfg, mnt


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_write_matching_file_goes_to_redis(work: Path, setup: tuple[Path, Path, Path], redis_server: Redis) -> None:
    src, cfg, mnt = setup
    r = redis_server.client()
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
        target = mnt / "lib" / "json" / "decoder.py"
        new = b"# edited on the node\nX = 1\n"
        target.write_bytes(new)
        assert target.read_bytes() == new
        assert os.stat(target).st_size == len(new)
        h = md5(new)
        assert r.hget(f"debug:paths:{NAME}", "lib/json/decoder.py") == f"{h},{len(new)}".encode()
        assert r.hget(f"debug:files:{NAME}", h) == new
        log = [json.loads(x) for x in r.lrange(f"debug:log:{NAME}", 0, -1)]
        assert log[-1][1:] == ["lib/json/decoder.py", h] and isinstance(log[-1][0], int)
        # append mode keeps the old content
        with open(target, "a") as f:
            f.write("Y = 2\n")
        assert target.read_bytes() == new + b"Y = 2\n"
        # a new matching file in an existing directory; then removed
        (mnt / "lib" / "new_mod.py").write_text("print('new')\n")
        assert "new_mod.py" in os.listdir(mnt / "lib")
        os.unlink(mnt / "lib" / "new_mod.py")
        assert "new_mod.py" not in os.listdir(mnt / "lib")
        assert r.hget(f"debug:paths:{NAME}", "lib/new_mod.py") == b"deleted"
        # non-matching writes stay read-only; so do directories
        for attempt in (lambda: (mnt / "space name").write_text("x"),
                        lambda: (mnt / "lib" / "notes.txt").write_text("x"),
                        lambda: os.mkdir(mnt / "lib" / "newdir"),
                        lambda: os.unlink(mnt / "space name")):
            with pytest.raises(OSError) as e:
                attempt()
            assert e.value.errno == errno.EROFS
        # truncate and python importing the edited module from the mount
        (mnt / "lib" / "json" / "tool.py").write_text("VALUE = 42\n")
        (mnt / "lib" / "edited_mod.py").write_text("from pathlib import Path\nVALUE = 42\n")
        out = subprocess.run(["python3", "-c", "import edited_mod as t; print(t.VALUE)"],
                             env={"PYTHONPATH": str(mnt / "lib"), "PATH": os.environ["PATH"]},
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "42"
        os.truncate(mnt / "lib" / "json" / "tool.py", 5)
        assert (mnt / "lib" / "json" / "tool.py").read_bytes() == b"VALUE"
        # tail through the daemon
        sock = work / "st" / "aysfsd.sock"
        lines = ctl(sock, {"cmd": "log.tail", "lines": 3, "debug": True, "mount": NAME})
        assert lines[-1]["ok"] and len(lines) == 4
        assert lines[-2]["path"] == "lib/json/tool.py" and lines[-2]["hash"] == md5(b"VALUE")
    # restart: the debug version still wins
    with Daemon(cfg, work / "d2.log").start(wait_mounts=[mnt]):
        assert (mnt / "lib" / "json" / "decoder.py").read_bytes() == new + b"Y = 2\n"
        assert not (mnt / "lib" / "new_mod.py").exists()
        assert (mnt / "lib" / "json" / "encoder.py").read_bytes() == (src / "lib/json/encoder.py").read_bytes()


def test_rename_of_a_published_file_over_64_kib(work: Path, setup: tuple[Path, Path, Path],
                                                redis_server: Redis) -> None:
    """A rename records the file's whole published content (read from the tree, over 64 KiB)
    under the new name, and the old name as deleted."""
    src, cfg, mnt = setup
    r = redis_server.client()
    want = (src / "lib" / "big_mod.py").read_bytes()
    assert len(want) > 65536
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
        os.rename(mnt / "lib" / "big_mod.py", mnt / "lib" / "big_mod2.py")
        assert (mnt / "lib" / "big_mod2.py").read_bytes() == want
        assert not (mnt / "lib" / "big_mod.py").exists()
        assert r.hget(f"debug:files:{NAME}", md5(want)) == want
        assert r.hget(f"debug:paths:{NAME}", "lib/big_mod.py") == b"deleted"


def test_redis_down_then_back(work: Path, setup: tuple[Path, Path, Path], redis_server: Redis) -> None:
    src, cfg, mnt = setup
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        target = mnt / "lib" / "json" / "scanner.py"
        target.write_bytes(b"v1\n")
        redis_server.stop()
        with pytest.raises(OSError) as e:
            target.write_bytes(b"v2\n")
        assert e.value.errno == errno.EIO
        assert "the change is NOT saved" in d.log()
        # reads keep working (tree files; the edited one from memory or the tree)
        assert (mnt / "lib" / "json" / "encoder.py").read_bytes() == (src / "lib/json/encoder.py").read_bytes()
        redis_server.start()
        target.write_bytes(b"v3\n")
        assert target.read_bytes() == b"v3\n"
        assert redis_server.client().hget(f"debug:paths:{NAME}", "lib/json/scanner.py") == (md5(b"v3\n") + ",3").encode()


def test_debug_pull(work: Path, setup: tuple[Path, Path, Path], redis_server: Redis) -> None:
    src, cfg, mnt = setup
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
        (mnt / "lib" / "json" / "decoder.py").write_bytes(b"decoder v2\n")
        (mnt / "lib" / "json" / "extra.py").write_bytes(b"extra\n")
        os.unlink(mnt / "lib" / "json" / "encoder.py")
    home = work / "home"
    subprocess.run(["cp", "-a", str(src), str(home)], check=True)
    args = ["debug", "pull", "--mount", NAME, "--to", str(home), "--redis", f"127.0.0.1:{redis_server.port}",
            "--password", redis_server.password or ""]
    out = aysctl(*args).stdout
    assert (home / "lib/json/decoder.py").read_bytes() == b"decoder v2\n"
    assert (home / "lib/json/extra.py").read_bytes() == b"extra\n"
    assert not (home / "lib/json/encoder.py").exists()
    assert "1 created" in out and "1 updated" in out and "1 removed" in out
    out2 = aysctl(*args).stdout
    assert "0 created" in out2 and "0 updated" in out2 and "0 removed" in out2
    # hostile entries are refused, nothing written outside
    r = redis_server.client()
    r.hset(f"debug:paths:{NAME}", "../escape.py", f"{md5(b'x')},1")
    r.hset(f"debug:files:{NAME}", md5(b"x"), b"x")
    r.rpush(f"debug:log:{NAME}", json.dumps([1, "../escape.py", md5(b"x")]))
    r.rpush(f"debug:log:{NAME}", json.dumps([1, "/etc/evil.py", md5(b"x")]))
    os.symlink("/tmp", home / "lib" / "sneaky")
    r.hset(f"debug:paths:{NAME}", "lib/sneaky/evil.py", f"{md5(b'x')},1")
    res = aysctl(*args, check=False)
    assert res.returncode == 1
    assert "../escape.py" in res.stdout + res.stderr and "/etc/evil.py" in res.stdout + res.stderr
    assert "lib/sneaky/evil.py" in res.stdout + res.stderr
    assert not (work / "escape.py").exists() and not Path("/tmp/evil.py").exists()


def test_debug_tail_follows_new_entries(work: Path, setup: tuple[Path, Path, Path]) -> None:
    import socket

    src, cfg, mnt = setup
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]):
        (mnt / "lib" / "json" / "decoder.py").write_bytes(b"one\n")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(work / "st" / "aysfsd.sock"))
        s.sendall(json.dumps({"cmd": "log.tail", "lines": 1, "follow": True, "debug": True}).encode() + b"\n")
        f = s.makefile("rb")
        first = json.loads(f.readline())
        assert first["event"] == "log" and first["path"] == "lib/json/decoder.py" and first["hash"] == md5(b"one\n")
        os.unlink(mnt / "lib" / "json" / "scanner.py")
        nxt = json.loads(f.readline())  # within the socket timeout: followed, not polled by us
        assert nxt["path"] == "lib/json/scanner.py" and nxt["hash"] == "" and nxt["AYSFS_MOUNT"] == NAME
        s.close()


def super_options(path: Path) -> set[str]:
    """The superblock options of the mount at `path` (from /proc/self/mountinfo)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(path):
            return set(line.split(" - ")[1].split()[2].split(","))
    raise AssertionError(f"{path} is not mounted")


def test_session_read_only_until_a_debug_mount_comes(work: Path, setup: tuple[Path, Path, Path]) -> None:
    src, cfg, mnt = setup
    debug_text = cfg.read_text()
    plain = work / "plain"
    # first without the debug mount: the session superblock is read-only
    cfg.write_text(debug_text.replace(f"id = '{AYS}'\nname = '{NAME}'\nmnt = \"{mnt}\"\ndebug = true",
                                      f"id = '{AYS}'\nname = 'plain'\nmnt = \"{plain}\""))
    with Daemon(cfg, work / "d.log").start(wait_mounts=[plain]):
        assert "ro" in super_options(work / "st" / "fuse")
        with pytest.raises(OSError) as e:
            (plain / "lib" / "json" / "decoder.py").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        # a reload adds the debug mount: the session becomes writable, the plain mount stays read-only
        cfg.write_text(cfg.read_text() + debug_text.split("[[ays]]", 1)[1].join(["\n[[ays]]", ""]))
        r = ctl(work / "st" / "aysfsd.sock", {"cmd": "reload"})[-1]
        assert r["ok"], r
        assert "rw" in super_options(work / "st" / "fuse")
        (mnt / "lib" / "json" / "decoder.py").write_bytes(b"X = 2\n")
        assert (mnt / "lib" / "json" / "decoder.py").read_bytes() == b"X = 2\n"
        with pytest.raises(OSError) as e:
            (plain / "lib" / "json" / "decoder.py").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        assert (plain / "lib" / "json" / "decoder.py").read_bytes() == (src / "lib/json/decoder.py").read_bytes()


def test_restart_saves_pending_writes_and_keeps_edits(work: Path, setup: tuple[Path, Path, Path],
                                                      redis_server: Redis) -> None:
    """`aysctl restart` with a file open for writing: what was written is in Redis, the edited
    files stay edited through the resumed session."""
    src, cfg, mnt = setup
    r = redis_server.client()
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        done = mnt / "lib" / "json" / "decoder.py"
        done.write_bytes(b"A = 1\n")
        pending = open(mnt / "lib" / "json" / "encoder.py", "wb")
        pending.write(b"B = 2\n")
        pending.flush()  # written to the daemon, not yet released (no close)
        aysctl("restart", "--socket", str(work / "st" / "aysfsd.sock"))
        assert "resuming the FUSE session" in d.log()
        assert r.hget(f"debug:files:{NAME}", md5(b"B = 2\n")) == b"B = 2\n"
        assert done.read_bytes() == b"A = 1\n"
        assert (mnt / "lib" / "json" / "encoder.py").read_bytes() == b"B = 2\n"
        assert (mnt / "lib" / "json" / "scanner.py").read_bytes() == (src / "lib" / "json" / "scanner.py").read_bytes()
        with pytest.raises(OSError) as e:  # the descriptor of the old process is gone
            pending.write(b"more")
            pending.flush()
        assert e.value.errno == errno.EBADF
        del pending


def test_debug_session_keeps_open_and_release(work: Path, setup: tuple[Path, Path, Path]) -> None:
    """A session started with a debug mount is not in kernel no_open mode: its writes are held
    per open file and recorded at close (errors reported by close())."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import fusetrace

    if not fusetrace.available():
        pytest.skip("no fuse tracepoints (Linux >= 6.15)")
    src, cfg, mnt = setup
    with Daemon(cfg, work / "d.log").start(wait_mounts=[mnt]) as d:
        assert "no_open" not in d.log()
        target = mnt / "lib" / "json" / "decoder.py"
        out: list[fusetrace.Trace] = []
        with fusetrace.traced(out, fusetrace.connection_of(mnt)):
            target.write_bytes(b"X = 3\n")
            assert target.read_bytes() == b"X = 3\n"
        ops = {op.removeprefix("FUSE_"): s.count for op, s in out[0].ops.items()}
        assert ops.get("OPEN", 0) >= 2 and ops.get("RELEASE", 0) >= 1, ops
