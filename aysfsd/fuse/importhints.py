"""Python's import lines as read-ahead hints, for a cold start without a startup profile.

A Python program's start is a chain of imports: the interpreter reads a module, and only then
asks for the modules it imports, each in another directory (a package, lib-dynload's extension
modules). From a remote stor every link of the chain is a round trip. The chain is written in
the modules themselves: when a `.py` file is first read while the mount is cold (a miss in the
last COLD seconds), its import lines that run at import time (not those in a function's body:
they run later, if ever) are resolved in the tree the way the interpreter would (the file's
package, then its sys.path entry: the directory above its top package, that directory's lib-dynload and
site-packages, and every entry seen so far), and the modules found are fetched ahead: a packed
module with its pack, an extension module whole. A `.py` fetched so is read for its imports in
turn, so the rest of the chain is found a round trip per level, not one per module.

Hints can cost bandwidth, never correctness: what they fetch is verified like every blob, and
readers take it from the cache. They are bounded per mount (HINT_FILES files, HINT_BYTES
bytes), stop when reads stop missing, and give way to a startup profile (which knows better)
and to a bulk reader's pass (tar reads every module; aysfsd.fuse.bulkread has it covered).
A compiled-only tree (`__pycache__` without sources) gives no hints; a mount configured with
`import_hints = false` asks for none (a metered link, a tree that is not Python).
"""

from __future__ import annotations

import bisect
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..tiers import Fetcher
from ..tree.objects import CHUNK_SIZE, KIND_DIR, KIND_FILE, Entry, NameIndex, pack_members
from .catalog import Catalog
from .nodes import MountPoint, Node

log = logging.getLogger("aysfsd.fuse.importhints")

COLD = 2.0  # seconds after a miss during which first reads of .py files give hints
PARSE_MAX = 1 << 20  # .py files bigger than this are not read for imports
FILE_MAX = 2 * CHUNK_SIZE  # modules bigger than this are left to their reader
HINT_FILES = 2048  # modules fetched ahead per mount, at most
HINT_BYTES = 64 << 20  # bytes asked for ahead per mount, at most
SEEN_MAX = 8192  # modules found (fetched, or here already) per mount, at most
DEPTH = 16  # levels of imports followed from a file the reader read
ROOT_SUBDIRS = ("lib-dynload", "site-packages")  # CPython's sys.path entries beside the stdlib

# an import statement, from the start of its line: `import a.b as c, d` / `from .a import (b, c)`
_IMPORT = re.compile(rb"[ \t]*(?:from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]*(?:\(([^)]*)\)|([^#\n;]*))"
                     rb"|import[ \t]+([^#\n;]+))")
_BODY = re.compile(rb"(?:async[ \t]+)?def[ \t]")  # a line that starts a function's body
_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\Z")  # a module's dotted name
LOOK_BACK = 4096  # lines looked at above an indented import for its block's header, at most

Import = tuple[int, str, list[str]]  # (level: leading dots, module, names imported from it)
Where = tuple[str, ...]  # directory hashes from the mount's top down to a directory


def imports(text: bytes) -> list[Import]:
    """The imports of a module's source that run when it is imported: not those in a function's
    body (a class body runs). Found from each "import" word: a regular expression tried at
    every line costs ten times more."""
    out: list[Import] = []
    done = -1
    i = text.find(b"import")
    while i >= 0:
        start = text.rfind(b"\n", 0, i) + 1
        m = _IMPORT.match(text, start) if start > done else None
        if m is not None and m.end() >= i and not _in_body(text, start):
            done = start
            dots, mod, paren, names, plain = m.groups()
            if plain is not None:
                out += [(0, n, []) for n in _names(plain)]
            else:
                name = mod.decode("ascii", "replace")
                if not name or _NAME.match(name):
                    out.append((len(dots), name, _names(paren or names or b"")))
        i = text.find(b"import", i + 6)
    return out


def _names(listed: bytes) -> list[str]:
    """The names of `a.b as c, d`: ["a.b", "d"] (anything not a name left out)."""
    out = []
    for part in listed.split(b","):
        words = part.split()
        name = words[0].decode("ascii", "replace") if words else ""
        if _NAME.match(name):
            out.append(name)
    return out


def _in_body(text: bytes, start: int) -> bool:
    """Whether the line at `start` is in a function's body: a line above it indented less (its
    block's header), or one above that, starts with def."""
    end = text.find(b"\n", start)
    line = text[start:end if end >= 0 else len(text)]
    indent = len(line) - len(line.lstrip(b" \t"))
    pos = start
    for _ in range(LOOK_BACK):
        if indent == 0:
            return False
        if pos == 0:
            return False
        begin = text.rfind(b"\n", 0, pos - 1) + 1
        above = text[begin:pos - 1]
        pos = begin
        body = above.lstrip(b" \t")
        if not body or body.startswith(b"#") or len(above) - len(body) >= indent:
            continue
        if _BODY.match(body):
            return True
        indent = len(above) - len(body)
    return True  # too far to tell: not followed


@dataclass
class HintState:
    """A mount's import hints for its current version: what was asked for, the sys.path
    entries seen (MountPoint.hints; `aysctl status` shows modules and bytes)."""

    root: str = ""  # the version's root directory
    grid: bool = True  # the mount's cache.grid (directory objects read from, and written to, grid caches)
    last_miss: float = 0.0
    seen: set[str] = field(default_factory=set)  # blob hashes of modules found or read for imports
    roots: list[Where] = field(default_factory=list)  # sys.path entries found so far
    files: int = 0  # modules asked for (not here, not on their way)
    bytes: int = 0  # bytes asked for (a packed module's: its pack's missing members)

    def public(self) -> dict[str, object]:
        return {"modules": self.files, "bytes": self.bytes}


class ImportHints:
    """Fetch ahead what a cold Python start will import next (see the module docstring)."""

    def __init__(self, fetcher: Fetcher, catalog: Catalog, nodes: dict[int, Node],
                 in_pass: Callable[[Node], bool]) -> None:
        self.fetcher = fetcher
        self.catalog = catalog
        self.nodes = nodes
        self.in_pass = in_pass  # a bulk reader's pass (BulkWindow.in_pass): no hints

    @staticmethod
    def _of(mp: MountPoint) -> HintState:
        root = mp.ref.root if mp.ref is not None else ""
        st = mp.hints
        if st is None or st.root != root:  # a new mount, or a new version of it
            st = mp.hints = HintState(root, mp.cfg.cache_grid)
        return st

    def missed(self, mp: MountPoint) -> None:
        """A read of `mp` missed the local cache: the mount is cold."""
        self._of(mp).last_miss = time.monotonic()

    def first_read(self, node: Node) -> None:
        """A file's first read: when it is a `.py` file of a cold mount, fetch its imports ahead."""
        mp = node.mount
        e = node.entry
        if (not e.name.endswith(".py") or not 0 < e.size <= PARSE_MAX or node.dbg is not None
                or not mp.cfg.import_hints
                or self.fetcher.nursery is None or _profiled(mp)):
            return
        st = self._of(mp)
        if (time.monotonic() - st.last_miss > COLD or e.hash in st.seen or len(st.seen) >= SEEN_MAX
                or self.in_pass(node)):
            return
        where = self._where(node)
        if where is None:
            return
        st.seen.add(e.hash)
        self.fetcher.nursery.start_soon(self._follow, mp, st, where, e, 0)

    def _where(self, node: Node) -> Where | None:
        """The directory hashes from the mount's top down to `node`'s directory (None if unknown)."""
        out: list[str] = []
        n = self.nodes.get(node.parent)
        for _ in range(256):
            if n is None or not n.entry.hash or n.entry.kind != KIND_DIR:
                return None
            out.append(n.entry.hash)
            if n.ino == n.mount.top_ino:
                return tuple(reversed(out))
            n = self.nodes.get(n.parent)
        return None

    async def _follow(self, mp: MountPoint, st: HintState, where: Where, e: Entry, depth: int) -> None:
        """Read module `e` (in directory `where`) for its imports; fetch those ahead, and follow them."""
        try:
            blob = await self.fetcher.get(e.hash, local=mp.cfg.cache_local, grid=mp.cfg.cache_grid,
                                          account=mp.bytes_by_tier)
            found = await self._resolve(st, where, imports(blob))
        except Exception as err:  # a hint is only a hint (the reader gets the error, if any)
            log.debug("mount %s: no import hints from %s: %r", mp.name, e.name, err)
            return
        for dwhere, dentries, f in found:
            if not f.size or f.hash in st.seen or len(st.seen) >= SEEN_MAX:
                continue  # (an empty module has no blob to fetch)
            st.seen.add(f.hash)
            if st.files < HINT_FILES and st.bytes + f.size <= HINT_BYTES and self._fetch(mp, st, dentries, f):
                st.files += 1
            if f.name.endswith(".py") and f.size <= PARSE_MAX and depth < DEPTH and self.fetcher.nursery is not None:
                self.fetcher.nursery.start_soon(self._follow, mp, st, dwhere, f, depth + 1)

    def _fetch(self, mp: MountPoint, st: HintState, entries: list[Entry], f: Entry) -> bool:
        """Ask for module file `f` (of a directory with `entries`), with its pack or alone,
        unless it is here or on its way; whether it was asked for."""
        cfg, fetcher = mp.cfg, self.fetcher
        blobs = [h for h, _ in f.blobs()]
        if not any(fetcher.missing(h) for h in blobs):
            return False
        members = pack_members(entries, KIND_FILE).get(f.pack) if f.pack else None
        if members:
            st.bytes += sum(size for h, _, size in members if fetcher.missing(h))
            fetcher.fetch_pack(f.pack, members, local=cfg.cache_local, grid=cfg.cache_grid, account=mp.bytes_by_tier)
        else:
            st.bytes += f.size
            fetcher.fetch_many(blobs, local=cfg.cache_local, grid=cfg.cache_grid, account=mp.bytes_by_tier)
        return True

    # -- resolving a module name in the tree, as the interpreter would -----------------------------

    async def _entries(self, st: HintState, h: str) -> list[Entry]:
        return (await self.catalog.load_dir(h, grid=st.grid, ahead=False))[0]

    async def _resolve(self, st: HintState, where: Where,
                       found_imports: list[Import]) -> list[tuple[Where, list[Entry], Entry]]:
        """The module files the imports name, each with its directory (hashes, entries)."""
        # the file's package: the directories above it with an __init__.py; its sys.path entry above them
        top = len(where) - 1
        while top > 0 and _find(await self._entries(st, where[top]), "__init__.py") is not None:
            top -= 1
        root = where[:top + 1]
        if root not in st.roots:
            st.roots.append(root)
            for sub in ROOT_SUBDIRS:
                d = _find(await self._entries(st, root[-1]), sub, KIND_DIR)
                if d is not None and root + (d.hash,) not in st.roots:
                    st.roots.append(root + (d.hash,))
        out: list[tuple[Where, list[Entry], Entry]] = []
        for level, mod, names in found_imports:
            parts = [p for p in mod.split(".") if p]
            if level:
                if level > len(where):
                    continue
                bases = [where[:len(where) - level + 1]]
            else:
                bases = list(st.roots)
            for base in bases:
                got = await self._module(st, base, parts, names, out)
                if got:
                    break
        return out

    async def _module(self, st: HintState, base: Where, parts: list[str], names: list[str],
                      out: list[tuple[Where, list[Entry], Entry]]) -> bool:
        """Module `parts` under sys.path entry or package `base` (and `names` as its submodules):
        every __init__.py on the way and the module's file go to `out`. False if not there."""
        where = base
        for i, part in enumerate(parts):
            entries = await self._entries(st, where[-1])
            last = i == len(parts) - 1
            d = _find(entries, part, KIND_DIR)
            sub = await self._entries(st, d.hash) if d is not None else []
            init = _find(sub, "__init__.py")
            if d is not None and init is not None:
                where = where + (d.hash,)
                out.append((where, sub, init))
                continue
            f = _module_file(entries, part) if last else None
            if f is None:
                return False
            out.append((where, entries, f))
            return True
        if names:  # `from package import a, b`: a and b may be submodules
            entries = await self._entries(st, where[-1])
            for name in names:
                d = _find(entries, name, KIND_DIR)
                if d is not None:
                    sub = await self._entries(st, d.hash)
                    init = _find(sub, "__init__.py")
                    if init is not None:
                        out.append((where + (d.hash,), sub, init))
                    continue
                f = _module_file(entries, name)
                if f is not None:
                    out.append((where, entries, f))
        return bool(parts) or bool(names)


def _profiled(mp: MountPoint) -> bool:
    """Whether the mount's start has a startup profile (or is looking for one): it knows better."""
    return mp.profile is not None and (mp.profile.source != "none" or mp.profile.state == "looking")


def _find(entries: list[Entry], name: str, kind: str = KIND_FILE) -> Entry | None:
    """Entry `name` of kind `kind` (entries are sorted by name)."""
    i = NameIndex(entries).get(name)
    return entries[i] if i is not None and entries[i].kind == kind else None


def _module_file(entries: list[Entry], name: str) -> Entry | None:
    """`name`.py, or an extension module `name`.*.so / `name`.so, as a file of at most FILE_MAX."""
    prefix = name + "."
    i = bisect.bisect_left(entries, prefix, key=lambda x: x.name)
    for x in entries[i:i + 8]:
        if not x.name.startswith(prefix):
            break
        rest = x.name[len(name):]
        if x.kind == KIND_FILE and 0 < x.size <= FILE_MAX and (
                rest == ".py" or rest.endswith(".so") and rest.count(".") in (1, 2)):
            return x
    return None
