"""Import hints (aysfsd.fuse.importhints): the import lines that run at import time are found,
and through the real daemon, nginx and a counting proxy, a cold read of one module has the
modules it imports, and theirs, asked for before anything reads them (a package's pack, an
extension module in lib-dynload), while a module imported only inside a function, or never,
is not asked for."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from aysfsd.fuse.importhints import imports
from aysfsd.tree.objects import KIND_DIR, KIND_FILE, Entry, decode_dir
from tests.harness import AYS, config, ctl, publish, start, status, stor_roots
from tests.servers import ForwardProxy, Nginx
from tests.test_bulkread import blob, gets, pack_gets, wait_gets

SOURCE = b'''"""A module. Its docstring says: import nothing_from_here"""
from __future__ import annotations
import os, sys as system
import json.decoder
from . import sibling
from ..up import (a,
    b as c)
try:
    from _speedups import fast
except ImportError:  # import in a comment is no import
    fast = None
if system.platform == "win32":
    import winreg

    def helper():
        import inside_a_nested_def


def function():
    import lazy_one
    from lazy_two import x


class Thing:
    import in_a_class

    def method(self):
        from lazy_three import y
import last  ; import not_seen
'''


def test_the_imports_that_run_at_import_time_are_found() -> None:
    assert imports(SOURCE) == [
        (0, "__future__", ["annotations"]), (0, "os", []), (0, "sys", []), (0, "json.decoder", []),
        (1, "", ["sibling"]), (2, "up", ["a", "b"]), (0, "_speedups", ["fast"]), (0, "winreg", []),
        (0, "in_a_class", []), (0, "last", []),
    ]
    assert imports(b"") == [] and imports(b"\xff\xfe import \x00") == []  # not source: nothing, no error


def lib_packs(stor: Path) -> dict[str, str]:
    """lib/ (".") and its directories -> its file pack, for those that have one."""
    root = next(iter(stor_roots(stor)))
    lib = next(e.hash for e in decode_dir(blob(stor, root), root) if e.name == "lib")
    out = {}
    for e in [Entry(".", KIND_DIR, 0o755, 0, 0, hash=lib), *decode_dir(blob(stor, lib), lib)]:
        packs = {x.pack for x in decode_dir(blob(stor, e.hash), e.hash) if x.kind == KIND_FILE and x.pack} \
            if e.kind == KIND_DIR else set()
        if packs:
            out[e.name] = packs.pop()
    return out


def write(p: Path, text: str | bytes) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(text.encode() if isinstance(text, str) else text)


def make_tree(src: Path) -> bytes:
    """lib/ is a sys.path entry: main.py imports pkg_a (whose __init__ imports its .mod1 and
    pkg_b.sub), pkg_b.sub imports the extension module ext (in lib/lib-dynload, too big for a
    pack: a blob of its own; returned); pkg_lazy is imported in a function, pkg_never never."""
    write(src / "lib/main.py", "import sys\nimport pkg_a\n\ndef later():\n    import pkg_lazy\n")
    write(src / "lib/other.py", "x = 1\n")
    write(src / "lib/pkg_a/__init__.py", "from . import mod1, empty\nfrom pkg_b.sub import thing\n")
    write(src / "lib/pkg_a/empty/__init__.py", "")  # no blob to fetch
    write(src / "lib/pkg_a/mod1.py", "VALUE = 1\n")
    write(src / "lib/pkg_b/__init__.py", "B = 1\n")
    write(src / "lib/pkg_b/sub.py", "try:\n    import ext\nexcept ImportError:\n    ext = None\nthing = 2\n")
    ext = bytes(range(256)) * 2048  # 512 KiB: no pack takes it
    write(src / "lib/lib-dynload/ext.cpython-311-x86_64-linux-gnu.so", ext)
    write(src / "lib/lib-dynload/other.cpython-311-x86_64-linux-gnu.so", ext[::-1])
    write(src / "lib/pkg_lazy/__init__.py", "LAZY = 1\n")
    write(src / "lib/pkg_never/__init__.py", "NEVER = 1\n")
    for d in ("pkg_lazy", "pkg_never"):
        write(src / "lib" / d / "mod.py", "M = 1\n")  # (a directory of one file gets no pack)
    return ext


def test_a_cold_module_read_has_its_imports_fetched_ahead_not_lazy_ones(work: Path, nginx_stor: Nginx,
                                                                       stor_proxy: ForwardProxy) -> None:
    """lib/ is a sys.path entry: main.py imports pkg_a (whose __init__ imports its .mod1 and
    pkg_b.sub), pkg_b.sub imports the extension module ext (in lib/lib-dynload, too big for a
    pack: a blob of its own). Reading main.py alone asks for all of that, three levels down;
    pkg_lazy (imported in a function) and pkg_never are not asked for."""
    src = work / "src"
    ext = make_tree(src)
    publish(src, nginx_stor.url)
    packs = lib_packs(nginx_stor.root)
    ext_blob = hashlib.sha256(ext).hexdigest()
    other_blob = hashlib.sha256(ext[::-1]).hexdigest()
    everything = {*packs.values(), ext_blob, other_blob}
    wanted = {packs["pkg_a"], packs["pkg_b"], ext_blob}
    assert {"pkg_a", "pkg_b", "pkg_lazy", "pkg_never"} <= packs.keys()
    mnt = work / "mnt"
    text = config(work / "d", [{"url": nginx_stor.url, "proxy": stor_proxy.url}], [{"id": AYS, "mnt": str(mnt)}])
    with start(work, "d", text, [mnt]):
        assert (mnt / "lib/main.py").read_bytes() == (src / "lib/main.py").read_bytes()
        assert wanted <= wait_gets(stor_proxy, wanted)  # three levels of imports, nothing else read
        time.sleep(0.5)  # anything more would be on its way
        read = {packs["."], *wanted}  # main.py came with its directory's pack
        assert pack_gets(stor_proxy, everything) == read
        assert len(gets(stor_proxy)) == len(set(gets(stor_proxy)))  # nothing asked for twice
        assert not [g for g in gets(stor_proxy) if g.endswith(hashlib.sha256(b"").hexdigest())]
        st = status(work, "d")["mounts"][0]
        # asked for: pkg_a/__init__ (mod1 came in its pack), pkg_b/__init__ (sub too), ext
        assert st["import_hints"] == {"modules": 3, "bytes": sum(len(blob(nginx_stor.root, h)) for h in wanted)}
        before = st["bytes_by_tier"]["stor"]
        assert before == sum(len(blob(nginx_stor.root, h)) for h in read)  # counted as the mount's
        for rel in ("lib/pkg_a/__init__.py", "lib/pkg_a/mod1.py", "lib/pkg_b/sub.py",
                    "lib/lib-dynload/ext.cpython-311-x86_64-linux-gnu.so"):
            assert (mnt / rel).read_bytes() == (src / rel).read_bytes()  # from the cache: no request
        assert pack_gets(stor_proxy, everything) == read
        assert status(work, "d")["mounts"][0]["bytes_by_tier"]["stor"] == before


def test_import_hints_false_asks_for_nothing_ahead_and_a_reload_turns_them_on(
        work: Path, nginx_stor: Nginx, stor_proxy: ForwardProxy) -> None:
    """With `import_hints = false` a cold read of main.py asks for its own pack only; after a
    reload with hints on (no remount), a cold module read has its imports fetched ahead again."""
    src = work / "src"
    ext = make_tree(src)
    publish(src, nginx_stor.url)
    packs = lib_packs(nginx_stor.root)
    ext_blob = hashlib.sha256(ext).hexdigest()
    everything = {*packs.values(), ext_blob, hashlib.sha256(ext[::-1]).hexdigest()}
    mnt = work / "mnt"
    stors: list[dict[str, object]] = [{"url": nginx_stor.url, "proxy": stor_proxy.url}]
    text = config(work / "d", stors, [{"id": AYS, "mnt": str(mnt), "import_hints": False}])
    with start(work, "d", text, [mnt]):
        assert (mnt / "lib/main.py").read_bytes() == (src / "lib/main.py").read_bytes()
        time.sleep(1.0)  # hints would have asked by now (the test above waits for less)
        assert pack_gets(stor_proxy, everything) == {packs["."]}
        assert status(work, "d")["mounts"][0]["import_hints"] in (None, {"modules": 0, "bytes": 0})
        (work / "d.toml").write_text(config(work / "d", stors, [{"id": AYS, "mnt": str(mnt)}]))
        assert ctl(work / "d" / "aysfsd.sock", {"cmd": "reload"})[-1] == {"ok": True}
        assert (mnt / "lib/pkg_b/sub.py").read_bytes() == (src / "lib/pkg_b/sub.py").read_bytes()
        assert ext_blob in wait_gets(stor_proxy, {ext_blob})  # sub.py imports ext: asked ahead
        assert pack_gets(stor_proxy, everything) == {packs["."], packs["pkg_b"], ext_blob}
        assert status(work, "d")["mounts"][0]["import_hints"]["modules"] == 1
