"""Startup profiles on a mount: found, played ahead of the reader, or recorded for the grid.

On a cold start of a version (its root directory object not in the local cache) the daemon
looks for a profile (see aysfsd.tree.profile): first the one the ref names (published with
`aysctl publish --profile`), then the grid caches in order (`profiles/<root>`). Found, its
items are resolved through the verified tree and fetched in their order, WINDOW at a time
(a packed file with its pack when the profile reads PACK_WORTH of the pack's bytes, else
alone): the reader's own misses are not queued behind them (they fetch at once, or join a
fetch of the same blob already in flight, without their directory's packs). Not found, and
with a writable grid cache, the start is recorded (see aysfsd.fuse.startwatch) and the
profile written to the writable grid caches, so the next node of the grid starts with it.
Either way a StartWatch counts how much of the profile the start read. A bad profile costs
bandwidth and log lines, never bytes.
"""

from __future__ import annotations

import logging

import pyfuse3
import trio

from ..stores import StoreError
from ..stores.layout import grid_profile_path, profile_ref_path, sha256_hex
from ..tiers import Fetcher, FetchError
from ..tree.objects import KIND_DIR, KIND_FILE, Entry, pack_members
from ..tree.profile import DIR_INDEX, Item, Profile, ProfileError, decode
from ..tree.ref import Ref, RefError, decode_ref, verify
from .catalog import Catalog
from .nodes import MountPoint
from .progress import ProfileUse
from .startfiles import StartAsk, StorFile
from .startwatch import StartWatch

log = logging.getLogger("aysfsd.tree.profile")

WINDOW = 24  # profile items fetched at once (the HTTP pool holds 32 connections: some stay the reader's)
PACK_WORTH = 0.5  # a pack is fetched whole when the profile reads at least this share of its bytes
EARLY_ITEMS = WINDOW  # a ref's profile items fetched before the tree is here to place them (at most)
READER_CONNECTIONS = 4  # connections opened ahead for the reader's own misses, beside WINDOW
LOGGED_IGNORED = 5  # ignored items logged one by one; the rest are counted
HASH_ON_LOOP = 1 << 20  # a carried profile bigger than this is hashed in a worker thread
RECORD_SECONDS = 300.0  # an automatic recording ends after this long (from the first need)


def _extra(mp: MountPoint) -> dict[str, str]:
    return {"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id}


# -- finding ------------------------------------------------------------------------------------


async def from_ref(fetcher: Fetcher, mp: MountPoint, ref: Ref, trusted: list[str], timeout: float,
                   asked: StartAsk | None = None) -> tuple[str, Profile] | None:
    """The profile named by the ref published beside `ref` (same fields), if any and valid;
    `asked`: that ref and the start file (which may carry the profile's bytes), asked for with
    `ref`."""
    if asked is None:
        pfile = StorFile(fetcher, profile_ref_path(mp.cfg.id), timeout)
        await pfile.run()
    else:
        pfile = asked.profile_ref
    found = await pfile.get()
    if found is None:
        return None
    name, raw = found
    try:
        pref = decode_ref(raw, mp.cfg.id)
        if (pref.root, pref.revision, pref.time) != (ref.root, ref.revision, ref.time) or not pref.profile:
            log.debug("mount %s: the profile ref at %s is for another version", mp.name, name, extra=_extra(mp))
            return None
        if trusted:
            verify(pref, trusted)
        # the profile's first fetches go out together once it is here, a round trip from now:
        # their connections are opened meanwhile
        fetcher.warm(WINDOW + READER_CONNECTIONS)
        data = await _carried(asked, ref.root, pref.profile)
        if data is None:
            data = await fetcher.get(pref.profile, local=False, grid=False)
        return pref.profile, decode(data, ref.root)
    except (RefError, ProfileError, FetchError) as e:
        log.error("mount %s: refused the profile named by the ref at %s: %s", mp.name, name, e, extra=_extra(mp))
        return None


async def _carried(asked: StartAsk | None, root: str, h: str) -> bytes | None:
    """The profile blob `h` as the start file of version `root` carries it, when it does."""
    sf = await asked.start_file(root) if asked is not None else None
    if sf is None or sf.profile is None:
        return None
    data = sf.profile
    digest = await trio.to_thread.run_sync(sha256_hex, data) if len(data) > HASH_ON_LOOP else sha256_hex(data)
    return data if digest == h else None


async def from_grid(fetcher: Fetcher, mp: MountPoint, root: str) -> Profile | None:
    rel = grid_profile_path(root)
    for g in fetcher.grid:
        if g.is_down():
            continue
        try:
            raw = await g.store.fetch(rel)
        except StoreError as e:
            log.debug("mount %s: grid cache %s: no profile: %s", mp.name, g.name, e, extra=_extra(mp))
            continue
        if raw is None:
            continue
        try:
            return decode(raw, root)
        except ProfileError as e:
            log.error("mount %s: refused the profile in grid cache %s: %s", mp.name, g.name, e, extra=_extra(mp))
    return None


async def to_grid(fetcher: Fetcher, mp: MountPoint, profile: Profile) -> list[str]:
    """Write a recorded profile to every writable grid cache (atomically, like blobs)."""
    data = profile.encode()
    done = []
    for g in fetcher.grid:
        if not g.writable or g.is_down():
            continue
        try:
            await g.store.store(grid_profile_path(profile.root), data)
            done.append(g.name)
        except StoreError as e:
            log.warning("mount %s: could not write the startup profile to grid cache %s: %s", mp.name, g.name, e,
                        extra=_extra(mp))
    return done


# -- playing ------------------------------------------------------------------------------------


async def _place(catalog: Catalog, mp: MountPoint, root: str, item: Item) -> tuple[Entry, list[Entry]] | None:
    """The entry at an item's path and its directory's entries (for a directory item: the
    entry is the directory's own); None when the tree has nothing there."""
    grid = mp.cfg.cache_grid
    parts = item.parts()
    entries, index = await catalog.load_root(root, grid=grid)
    if not parts:
        return Entry("", KIND_DIR, 0, 0, 0, hash=root), entries
    for n, name in enumerate(parts):
        i = index.get(name)
        if i is None:
            return None
        e = entries[i]
        if n == len(parts) - 1:
            return e, entries
        if e.kind != KIND_DIR:
            return None
        entries, index = await catalog.load_dir(e.hash, grid=grid)
    return None


Target = tuple[str, str, int, list[tuple[str, int, int]]]  # (blob or pack, item hash, bytes, pack members)


def _first_blobs(profile: Profile) -> dict[str, set[str]]:
    """The names of the files whose first blob a profile lists, by directory path."""
    out: dict[str, set[str]] = {}
    for item in profile.items:
        if item.index == 0:
            parent, _, name = item.path.rpartition("/")
            out.setdefault(parent, set()).add(name)
    return out


def _worth_pack(pack: str, size: int, entries: list[Entry], names: set[str]) -> bool:
    """Whether the profile reads enough of pack `pack` (`size` bytes) to fetch it whole rather
    than its files alone: a pack is a directory's small files, and a start often reads a few of
    them (1 KB of a 377 KB pack in the bench's app start), where the link's bytes are its time."""
    read = sum(e.size for e in entries if e.kind == KIND_FILE and e.pack == pack and e.name in names)
    return read >= PACK_WORTH * size


async def play(catalog: Catalog, mp: MountPoint, profile: Profile, use: ProfileUse, *, early: bool = False) -> None:
    """Fetch the blobs a profile names, in its order, WINDOW at a time; items the tree does not
    name at their place are ignored with a log line.

    One task resolves the items in order through the tree (starting each directory object's
    load as soon as its place is checked) and hands the blobs to WINDOW fetchers in that
    order: what the stor sees is the profile's order, however long each fetch takes.

    `early` (a profile named by the ref, so trusted as the ref is): until the tree is here to
    place the first file item, up to EARLY_ITEMS file items go out by their hash alone, a round
    trip before the tree would let them. Each is checked against its hash like every blob, and
    placed by the tree afterwards like every item (one it does not name is counted ignored):
    a wrong one costs its bytes, never the reader's."""
    fetcher = catalog.fetcher
    cfg = mp.cfg
    root = profile.root
    started: set[str] = set()  # directory objects, blobs and packs asked for already
    first_blobs = _first_blobs(profile)
    whole: dict[str, bool] = {}  # pack -> fetched whole (else its files the profile reads, alone)
    send, recv = trio.open_memory_channel[Target](0)  # a fetcher takes the next blob when free
    placed = trio.Event()  # the tree has placed a file item: no more items go out unplaced

    def ignore(n: int, item: Item, why: str) -> None:
        use.ignored += 1
        if use.ignored <= LOGGED_IGNORED:
            log.warning("mount %s: profile item %d (%r, %d, %s) ignored: %s", mp.name, n, item.path, item.index,
                        item.hash[:12], why, extra={**_extra(mp), "BLOB": item.hash})
        elif use.ignored == LOGGED_IGNORED + 1:
            log.warning("mount %s: more profile items ignored (counted in the status)", mp.name, extra=_extra(mp))

    def failed(what: str, e: Exception) -> None:
        use.errors += 1
        log.warning("mount %s: profile %s: %s", mp.name, what, e, extra=_extra(mp))

    async def load(h: str, path: str) -> None:
        try:
            await catalog.load_dir(h, grid=cfg.cache_grid)
        except (FetchError, pyfuse3.FUSEError) as e:
            failed(f"directory {path!r}", e)

    def target(n: int, item: Item, e: Entry, entries: list[Entry], dirs: trio.Nursery) -> Target | None:
        """What to fetch for an item whose place is known, None when nothing (or ignored)."""
        if item.index == DIR_INDEX:
            if e.kind != KIND_DIR or e.hash != item.hash:
                ignore(n, item, "the tree names another directory object there")
            elif item.hash not in started:
                started.add(item.hash)
                dirs.start_soon(load, item.hash, item.path)
            return None
        pieces = e.blobs()
        if e.kind != KIND_FILE or item.index >= len(pieces) or pieces[item.index] != (item.hash, item.size):
            ignore(n, item, "the tree names another blob (or size) there")
            return None
        if item.hash in started:  # (fetched ahead of the tree, or named twice)
            return None
        if item.index == 0 and e.pack:
            if e.pack in started or not fetcher.missing(item.hash):
                return None
            w = whole.get(e.pack)
            if w is None:
                w = whole[e.pack] = _worth_pack(e.pack, e.pack_size, entries,
                                                first_blobs.get(item.path.rpartition("/")[0], set()))
            if w:
                started.add(e.pack)
                return e.pack, item.hash, e.pack_size, pack_members(entries, KIND_FILE).get(e.pack, [])
        if not fetcher.missing(item.hash):
            return None
        started.add(item.hash)
        return item.hash, item.hash, item.size, []

    async def ahead(send: trio.MemorySendChannel[Target]) -> None:
        async with send:
            sent = 0
            for item in profile.items:
                if placed.is_set() or sent == EARLY_ITEMS:
                    return
                if item.index == DIR_INDEX or item.hash in started or not fetcher.missing(item.hash):
                    continue
                started.add(item.hash)
                sent += 1
                await send.send((item.hash, item.hash, item.size, []))

    async def resolve() -> None:
        async with send, trio.open_nursery() as dirs:
            for n, item in enumerate(profile.items):
                try:
                    place = await _place(catalog, mp, root, item)
                except (FetchError, pyfuse3.FUSEError) as e:
                    failed(f"item {n} ({item.path!r})", e)
                    continue
                finally:
                    if item.index != DIR_INDEX:  # (a directory's place comes before its files')
                        placed.set()
                if place is None:
                    ignore(n, item, "no such path in this version")
                    continue
                t = target(n, item, place[0], place[1], dirs)
                if t is not None:
                    await send.send(t)

    async def fetch(recv: trio.MemoryReceiveChannel[Target]) -> None:
        async with recv:
            async for h, item_hash, size, members in recv:
                try:
                    if members:
                        await fetcher.get_pack(h, members, local=cfg.cache_local, grid=cfg.cache_grid,
                                               account=mp.bytes_by_tier)
                    else:
                        await fetcher.get(h, local=cfg.cache_local, grid=cfg.cache_grid, account=mp.bytes_by_tier)
                except FetchError as e:
                    failed(f"blob {item_hash}", e)
                    continue
                use.fetched_blobs += 1
                use.fetched_bytes += size

    async with trio.open_nursery() as nursery:
        if early:
            nursery.start_soon(ahead, send.clone())
        nursery.start_soon(resolve)
        for _ in range(WINDOW):
            nursery.start_soon(fetch, recv.clone())
        await recv.aclose()


async def _load_tree(catalog: Catalog, mp: MountPoint, root: str, asked: StartAsk | None) -> None:
    """The version's root object and tree packs, beside the search for a profile: the reader's
    first lookup and the profile's first items need them (errors are the reader's to report).
    The packs are those of the start file when it is of this version."""
    if asked is not None:
        catalog.trees.start(root, grid=mp.cfg.cache_grid, asked=asked)
    try:
        await catalog.load_root(root, grid=mp.cfg.cache_grid)
    except (FetchError, pyfuse3.FUSEError) as e:
        log.debug("mount %s: loading the tree ahead: %s", mp.name, e, extra=_extra(mp))


# -- a cold start -------------------------------------------------------------------------------


def arm(fetcher: Fetcher, mp: MountPoint, ref: Ref, idle: float) -> StartWatch:
    """Watch the start of `ref`'s version from its first need: call it before the mount can be
    read (cold_start then decides whether the watch records or measures)."""
    record = mp.cfg.cache_grid and any(g.writable for g in fetcher.grid)
    watch = StartWatch(ref.root, idle=idle, timeout=RECORD_SECONDS, record=record)
    if mp.watch is not None:
        mp.watch.stop("replaced")
    mp.watch = watch
    mp.profile = ProfileUse(ref.root, watch=watch)
    return watch


async def cold_start(catalog: Catalog, mp: MountPoint, ref: Ref, watch: StartWatch, *, trusted: list[str],
                     timeout: float, asked: StartAsk | None = None) -> None:
    """Find and play a profile for `ref`'s version, or record one for the grid (see the module
    docstring), with the watch `arm` gave. Runs in the background once the mount is up;
    `asked`: the profile ref and start file, when the mount asked for them beside its ref."""
    fetcher = catalog.fetcher
    use = mp.profile
    if use is None or use.watch is not watch:
        return  # armed again since
    record = watch.record
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch.run)
            nursery.start_soon(_load_tree, catalog, mp, ref.root, asked)
            found: tuple[str, Profile] | None = await from_ref(fetcher, mp, ref, trusted, timeout, asked)
            if found is not None:
                use.source, use.hash = "ref", found[0]
            else:
                p = await from_grid(fetcher, mp, ref.root)
                if p is not None:
                    fetcher.warm(WINDOW + READER_CONNECTIONS)
                    use.source, found = "grid", ("", p)
            if mp.ref is not ref:
                watch.stop("replaced")
                return
            if found is not None:
                profile = found[1]
                use.items, use.state = len(profile.items), "fetching"
                watch.measure({i.hash for i in profile.items})
                log.info("mount %s: startup profile from the %s: %d items, fetching ahead", mp.name, use.source,
                         use.items, extra=_extra(mp))
                await play(catalog, mp, profile, use, early=use.source == "ref")
                use.state = "done"
                log.info("mount %s: startup profile fetched: %d blobs (%d bytes), %d items ignored, %d errors",
                         mp.name, use.fetched_blobs, use.fetched_bytes, use.ignored, use.errors, extra=_extra(mp))
                return
            if not record:
                use.state = "none"
                watch.stop("no profile")
                return
            use.state = "recording"
            await watch.done.wait()
    finally:
        if mp.watch is watch and not watch.active:
            mp.watch = None
    if watch.reason == "replaced" or not watch.items:
        use.state = "none"
        return
    recorded = watch.profile()
    watch.items = []  # kept as `recorded` until written; the status keeps the count
    use.written = await to_grid(fetcher, mp, recorded)
    use.items, use.state = len(recorded.items), "recorded"
    log.info("mount %s: recorded a startup profile of %d items (%d bytes) in %.1fs (%s); written to %s", mp.name,
             len(recorded.items), recorded.data_bytes, watch.seconds, watch.reason,
             ", ".join(use.written) or "no grid cache", extra=_extra(mp))
