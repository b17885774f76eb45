"""Tests for aysfsd.config: parsing, defaults, validation and operator-facing messages."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aysfsd.config import (
    AysConfig,
    Config,
    ConfigError,
    DebugConfig,
    GridCacheConfig,
    MainConfig,
    StorConfig,
    default_name,
    load,
    parse,
    parse_size,
)

SEED = r"""[main]
id="aUniqueIdForThisClient"


[[ays.cache]]
#cache at gridlevel, can have more than 1, will try all till found what it needs
mnt="/mnt/gridnode1/"

[[ays.cache]]
mnt="http://192.168.1.1:8080"

[[ays.stor]]
#cache at gridlevel, can have more than 1, will try all till found what it needs
url="http://stor1.aydo.com:8080"
cache.expiration = 0

[[ays.stor]]
url="ssh://stor2.aydo.com:8080/mnt/1"
cache.expiration = 0

[[debug]]
debug_filter = [".*\.py",".*\.hrd"]
redis.addr="127.0.0.1"
redis.port=555
redis.passwd=""

[[ays]]
id="jumpscale|mongodb!main"
prefetch.cache.grid=0
prefetch.cache.local=0
cache.grid=1
cache.local=1

[[ays]]
id="jumpscale|mysql!main"
prefetch.cache.grid=0
prefetch.cache.local=0
"""

FULL = r"""
[main]
id = "node-7"
cache_dir = "/srv/aysfs/cache"
cache_size = "512MiB"
control_socket = "/run/a/ctl.sock"
fuse_root = "/run/a/root"
fetch_timeout = 12.5
log_level = "debug"
fuse_spin_us = 50

[[stor]]
url = "ssh://stor2.aydo.com:2222/mnt/1"
cache.expiration = 3600
timeout = 5
proxy = "socks5://127.0.0.1:1080"
ssh.key = "/etc/aysfs/id_ed25519"
ssh.known_hosts = "/etc/aysfs/known_hosts"
ssh.accept_unknown_host = true

[[stor]]
url = "/srv/stor"

[[cache]]
mnt = "/mnt/gridnode1/"
timeout = 2.5
writable = false

[[cache]]
mnt = "http://192.168.1.1:8080"
proxy = "http://proxy:3128"

[[ays]]
id = "jumpscale|mongodb!main"
mnt = "/opt/mongodb/"
cache.local = false
cache.grid = false
prefetch.cache.local = true
prefetch.cache.grid = true
debug = true
import_hints = false

[[ays]]
id = "jumpscale|mysql!main"
mnt = "/opt/mysql"
name = "mysql"

[debug]
debug_filter = ['.*\.py', ".*\\.hrd"]
redis.addr = "10.0.0.1"
redis.port = 555
redis.passwd = "secret"
redis.db = 3
"""


def errors(text: str, tmp_path: Path, name: str = "aysfs.toml") -> str:
    """Write `text` to a file, load it, and return the ConfigError message (paths relative to tmp_path)."""
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(f)
    assert str(info.value) == "\n".join(info.value.problems)
    assert all(p.startswith(f"{f}:") for p in info.value.problems)
    return str(info.value).replace(f"{tmp_path}/", "")


def line_of(text: str, needle: str, nth: int = 0) -> int:
    """1-based line number of the `nth` line containing `needle`."""
    return [i for i, line in enumerate(text.split("\n"), 1) if needle in line][nth]


def test_full_config_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "full.toml"
    f.write_text(FULL)
    cfg = load(f)
    assert cfg.path == str(f)
    assert cfg.main == MainConfig(
        id="node-7", cache_dir="/srv/aysfs/cache", cache_size=512 * 1024**2, control_socket="/run/a/ctl.sock",
        fuse_root="/run/a/root", fetch_timeout=12.5, log_level="debug", fuse_spin_us=50,
    )
    assert cfg.stors == (
        StorConfig(url="ssh://stor2.aydo.com:2222/mnt/1", expiration=3600, timeout=5.0,
                   proxy="socks5://127.0.0.1:1080", ssh_key="/etc/aysfs/id_ed25519",
                   ssh_known_hosts="/etc/aysfs/known_hosts", ssh_accept_unknown_host=True),
        StorConfig(url="/srv/stor"),
    )
    assert cfg.caches == (
        GridCacheConfig(mnt="/mnt/gridnode1/", timeout=2.5, writable=False),
        GridCacheConfig(mnt="http://192.168.1.1:8080", proxy="http://proxy:3128"),
    )
    assert cfg.ays == (
        AysConfig(id="jumpscale|mongodb!main", mnt="/opt/mongodb", name="jumpscale_mongodb_main",
                  cache_local=False, cache_grid=False, prefetch_local=True, prefetch_grid=True, debug=True, import_hints=False),
        AysConfig(id="jumpscale|mysql!main", mnt="/opt/mysql", name="mysql"),
    )
    assert cfg.debug == DebugConfig(debug_filter=(r".*\.py", r".*\.hrd"), redis_addr="10.0.0.1",
                                    redis_port=555, redis_passwd="secret", redis_db=3)
    assert isinstance(cfg.stors[0].timeout, float)


def test_defaults() -> None:
    cfg = parse("")
    assert cfg == Config(path="<string>", main=MainConfig(), stors=(), caches=(), ays=(), debug=DebugConfig())
    assert cfg.main.id == socket.gethostname()
    assert cfg.main.cache_dir == "/var/cache/aysfs"
    assert cfg.main.cache_size == 10 * 1024**3
    assert cfg.main.control_socket == "/run/aysfs/aysfsd.sock"
    assert cfg.main.fuse_root == "/run/aysfs/root"
    assert cfg.main.fetch_timeout == 30.0
    assert cfg.main.log_level == "info"
    assert cfg.main.fuse_spin_us == 200
    assert cfg.debug == DebugConfig((), "127.0.0.1", 6379, "", 0)
    assert not cfg.debug.matches("a.py")
    a = parse('[[ays]]\nid = "x"\nmnt = "/x"\n[[stor]]\nurl = "https://s"\n[[cache]]\nmnt = "/c"\n')
    assert a.ays == (AysConfig(id="x", mnt="/x", name="x", cache_local=True, cache_grid=True,
                               prefetch_local=False, prefetch_grid=False, debug=False, import_hints=True),)
    assert a.stors == (StorConfig("https://s", 0, 10.0, None, None, None, False),)
    assert a.caches == (GridCacheConfig("/c", 10.0, None, True),)


def test_seed_example_backslash_hint(tmp_path: Path) -> None:
    msg = errors(SEED, tmp_path, "seed.toml")
    n = line_of(SEED, "debug_filter")
    assert f"seed.toml:{n}:" in msg
    assert "regular expressions are easiest as TOML literal strings in single quotes" in msg
    assert "'.*\\.py'" in msg and '".*\\\\.py"' in msg
    assert 'debug_filter = [".*\\.py",".*\\.hrd"]' in msg  # the offending line, quoted
    assert f"seed.toml:{line_of(SEED, '[[debug]]')}: [[debug]] declares an array of tables" in msg


def test_seed_example_with_backslashes_fixed_gives_ays_hint(tmp_path: Path) -> None:
    text = SEED.replace("\\.", "\\\\.")
    msg = errors(text, tmp_path, "seed.toml")
    assert f"seed.toml:{line_of(text, '[[ays]]')}:" in msg
    assert "grid caches are top-level [[cache]] and stors top-level [[stor]]" in msg
    assert "[[ays]] is only for mounts" in msg


def test_nested_ays_cache_that_parses_gets_same_hint(tmp_path: Path) -> None:
    text = '[main]\nid = "x"\n\n[[ays.cache]]\nmnt = "/mnt/g"\n'
    msg = errors(text, tmp_path)
    assert "aysfs.toml:4:" in msg and "[[ays]] is only for mounts" in msg
    text = '[[ays]]\nid = "a"\nmnt = "/a"\n[[ays.stor]]\nurl = "/s"\n'
    msg = errors(text, tmp_path)
    assert "aysfs.toml:4:" in msg and "[[ays]] is only for mounts" in msg


def test_double_bracket_debug_and_main(tmp_path: Path) -> None:
    msg = errors('[main]\nid = "x"\n\n[[debug]]\nredis.port = 555\n', tmp_path)
    assert msg == ("aysfs.toml:4: [[debug]] declares an array of tables; write [debug] (single brackets): "
                   "there is one debug section")
    msg = errors('[[main]]\nid = "x"\n', tmp_path)
    assert "aysfs.toml:1: [[main]] declares an array of tables; write [main]" in msg


def test_single_bracket_stor(tmp_path: Path) -> None:
    msg = errors('[stor]\nurl = "/srv"\n', tmp_path)
    assert "aysfs.toml:1:" in msg and "write [[stor]]" in msg


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    text = '[[ays]]\nid = "a"\nmnt = "/a"\n\n[[ays]]\nid = "b"\nmnt = "/b"\ncache.locl = true\n'
    msg = errors(text, tmp_path)
    assert msg.startswith("aysfs.toml:8: [[ays]] cache.locl: unknown key")
    assert "did you mean cache.local?" in msg and "prefetch.cache.grid" in msg


def test_unknown_table(tmp_path: Path) -> None:
    assert "did you mean main?" in errors("[mian]\nid = 'x'\n", tmp_path)


def test_int_boolean_rejected_with_fix(tmp_path: Path) -> None:
    text = '[[ays]]\nid = "a"\nmnt = "/a"\n[[ays]]\nid = "b"\nmnt = "/b"\ncache.local = 1\n'
    msg = errors(text, tmp_path)
    assert msg.startswith("aysfs.toml:7: [[ays]] cache.local: expected true or false")
    assert "Fix: write true or false" in msg


def test_type_errors(tmp_path: Path) -> None:
    msg = errors('[main]\nfetch_timeout = "5"\ncache_size = true\n[debug]\nredis.port = 0\n', tmp_path)
    assert "aysfs.toml:2: [main] fetch_timeout: expected a number of seconds" in msg
    assert "aysfs.toml:3: [main] cache_size" in msg
    assert "aysfs.toml:5: [debug] redis.port: must be between 1 and 65535" in msg


def test_low_speed_limit_main_per_source_and_errors(tmp_path: Path) -> None:
    """[main] low_speed_limit/low_speed_time with their defaults, a stor's or grid cache's own
    (None: [main]'s), and clear errors for what is not a limit."""
    assert (MainConfig().low_speed_limit, MainConfig().low_speed_time) == (1024, 10.0)
    cfg = parse('[main]\nlow_speed_limit = 0\nlow_speed_time = 2.5\n[[stor]]\nurl = "http://s"\n'
                'low_speed_limit = 4096\n[[stor]]\nurl = "http://t"\n[[cache]]\nmnt = "/c"\nlow_speed_time = 3\n')
    assert (cfg.main.low_speed_limit, cfg.main.low_speed_time) == (0, 2.5)
    assert (cfg.stors[0].low_speed_limit, cfg.stors[0].low_speed_time) == (4096, None)
    assert (cfg.stors[1].low_speed_limit, cfg.stors[1].low_speed_time) == (None, None)
    assert (cfg.caches[0].low_speed_limit, cfg.caches[0].low_speed_time) == (None, 3.0)
    msg = errors('[main]\nlow_speed_limit = -1\nlow_speed_time = 0\n[[stor]]\nurl = "http://s"\n'
                 'low_speed_limit = "1KiB"\n[[cache]]\nmnt = "/c"\nlow_speed_time = "10s"\n', tmp_path)
    assert "aysfs.toml:2: [main] low_speed_limit: must be 0 or more, got -1" in msg
    assert "aysfs.toml:3: [main] low_speed_time: must be a positive number of seconds, got 0" in msg
    assert "aysfs.toml:6: [[stor]] low_speed_limit: expected a whole number" in msg
    assert "aysfs.toml:9: [[cache]] low_speed_time: expected a number of seconds" in msg


def test_fuse_spin_us(tmp_path: Path) -> None:
    assert parse("[main]\nfuse_spin_us = 0\n").main.fuse_spin_us == 0
    assert parse("[main]\nfuse_spin_us = 1000\n").main.fuse_spin_us == 1000
    msg = errors('[main]\nfuse_spin_us = 1001\n', tmp_path)
    assert "aysfs.toml:2: [main] fuse_spin_us: must be between 0 and 1000, got 1001" in msg
    msg = errors('[main]\nfuse_spin_us = "200us"\n', tmp_path)
    assert "aysfs.toml:2: [main] fuse_spin_us: expected a whole number" in msg


def test_missing_id_and_mnt(tmp_path: Path) -> None:
    text = '[main]\nid = "x"\n\n[[ays]]\nname = "n"\n'
    msg = errors(text, tmp_path)
    assert "aysfs.toml:4: [[ays]] id: missing required key" in msg
    assert "aysfs.toml:4: [[ays]] mnt: missing required key" in msg
    assert "aysfs.toml:1: [[stor]] url: missing required key" in errors("[[stor]]\ntimeout = 1\n", tmp_path)


def test_duplicate_mnt(tmp_path: Path) -> None:
    text = '[[ays]]\nid = "a"\nmnt = "/opt/a"\n[[ays]]\nid = "b"\nmnt = "/opt/a/"\n'
    msg = errors(text, tmp_path)
    assert "aysfs.toml:6: [[ays]] mnt: duplicate mnt '/opt/a'" in msg and "line 1" in msg


def test_nested_mnt_and_duplicate_name(tmp_path: Path) -> None:
    text = '[[ays]]\nid = "a"\nmnt = "/opt"\n[[ays]]\nid = "a"\nmnt = "/opt/b"\n'
    msg = errors(text, tmp_path)
    assert "aysfs.toml:4: [[ays]] name: duplicate name 'a'" in msg and "set name =" in msg
    assert "aysfs.toml:6: [[ays]] mnt: '/opt/b' is nested inside '/opt'" in msg


def test_relative_mnt(tmp_path: Path) -> None:
    msg = errors('[[ays]]\nid = "a"\nmnt = "opt/a"\n', tmp_path)
    assert "aysfs.toml:3: [[ays]] mnt: must be an absolute path" in msg


def test_bad_regex(tmp_path: Path) -> None:
    msg = errors("[debug]\ndebug_filter = ['.*\\.py', '(unclosed']\n", tmp_path)
    assert "aysfs.toml:2: [debug] debug_filter: '(unclosed' is not a valid regular expression" in msg
    assert "missing )" in msg


def test_bad_urls(tmp_path: Path) -> None:
    msg = errors('[[stor]]\nurl = "ftp://x"\n[[stor]]\nurl = "ssh:///p"\n[[cache]]\nmnt = "ssh://h/p"\n', tmp_path)
    assert "aysfs.toml:2: [[stor]] url: 'ftp://x' unsupported scheme 'ftp'" in msg
    assert "aysfs.toml:4: [[stor]] url: 'ssh:///p' has no host" in msg
    assert "aysfs.toml:6: [[cache]] mnt: 'ssh://h/p' unsupported scheme 'ssh'" in msg


def test_bad_cache_size_string(tmp_path: Path) -> None:
    msg = errors('[main]\ncache_size = "10 potatoes"\n', tmp_path)
    assert "aysfs.toml:2: [main] cache_size: '10 potatoes' is not a size" in msg
    assert "must be greater than 0" in errors('[main]\ncache_size = "0k"\n', tmp_path)


def test_cache_sizes() -> None:
    assert parse('[main]\ncache_size = "512MiB"\n').main.cache_size == 512 * 1024**2
    assert parse('[main]\ncache_size = "10G"\n').main.cache_size == 10 * 1024**3
    assert parse("[main]\ncache_size = 4096\n").main.cache_size == 4096
    assert parse_size("1.5GB") == 3 * 1024**3 // 2
    assert parse_size("100k") == 102400
    assert parse_size("2tib") == 2 * 1024**4
    with pytest.raises(ValueError):
        parse_size("5iB")


def test_syntax_error_location(tmp_path: Path) -> None:
    msg = errors('[main]\nid = "x"\nlog_level = True\n', tmp_path)
    assert msg.startswith('aysfs.toml:3:13: "log_level = True": Invalid value. Fix:')


def test_missing_and_non_utf8_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml: cannot read the config file"):
        load(tmp_path / "nope.toml")
    f = tmp_path / "bin.toml"
    f.write_bytes(b"[main]\nid = '\xff'\n")
    with pytest.raises(ConfigError, match="bin.toml:2: the file is not valid UTF-8"):
        load(f)


def test_several_problems_sorted_by_line(tmp_path: Path) -> None:
    msg = errors('[main]\nlog_level = "loud"\n[debug]\nredis.db = -1\n', tmp_path)
    lines = msg.split("\n")
    assert len(lines) == 2 and lines[0].startswith("aysfs.toml:2:") and lines[1].startswith("aysfs.toml:4:")
    assert all(". Fix: " in line for line in lines)


def test_default_name() -> None:
    assert default_name("jumpscale|mongodb!main") == "jumpscale_mongodb_main"
    assert default_name("a.b-c_d") == "a.b-c_d"
    assert default_name("..x/y") == "__x_y"
    assert default_name("é") == "_"


def test_debug_matches_is_fullmatch() -> None:
    d = DebugConfig(debug_filter=(r".*\.py", r"lib/.*\.hrd"))
    assert d.matches("a/b.py")
    assert not d.matches("a/b.pyc")
    assert d.matches("lib/x.hrd")
    assert not d.matches("x/lib/x.hrd")
    assert d == DebugConfig(debug_filter=(r".*\.py", r"lib/.*\.hrd"))
    assert hash(d) == hash(DebugConfig(debug_filter=(r".*\.py", r"lib/.*\.hrd")))
    assert set(dataclasses.asdict(d)) == {"debug_filter", "redis_addr", "redis_port", "redis_passwd", "redis_db"}
    with pytest.raises(re.error):
        DebugConfig(debug_filter=("(",))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_anything_but_config_error(text: str) -> None:
    try:
        assert isinstance(parse(text), Config)
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) for p in e.problems)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "[main]", "[[ays]]", "[debug]", "[[stor]]", "[[cache]]", "[[ays.cache]]", "[[debug]]", "[stor]",
    'id = "a"', 'mnt = "/a"', 'mnt = "/a/b"', "cache.local = 1", "cache.local = true", 'url = "ssh://h/x"',
    "redis.port = 0", 'debug_filter = ["(", ".*"]', 'cache_size = "1x"', "x = 1", 'name = ".."',
    'url = "http://[::1"', "timeout = -1", "proxy = 3", "ays = 5",
]), max_size=12))
def test_parse_structured_garbage(lines: list[str]) -> None:
    try:
        parse("\n".join(lines))
    except ConfigError as e:
        assert all(p.startswith("<string>:") for p in e.problems)


def test_trusted_keys_base64_beginning_with_a_slash_is_a_key_not_a_path(tmp_path: Path) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    def pub() -> str:
        raw = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    slash = next(k for k in (pub() for _ in range(5000)) if k.startswith("/"))  # 1 in 64
    other = pub()
    (tmp_path / "release.pub").write_text(other + "\n")
    f = tmp_path / "aysfs.toml"
    f.write_text(f'[main]\ntrusted_keys = ["{slash}", "{tmp_path}/release.pub"]\n')
    assert load(f).main.trusted_keys == (slash, other)
    assert "cannot read /nope.pub: No such file or directory" in errors('[main]\ntrusted_keys = ["/nope.pub"]\n',
                                                                      tmp_path)
