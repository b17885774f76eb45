"""Prefetch: fill the local cache and/or the grid caches with a mount's whole tree.

Runs in the background with a few workers only, and each worker waits while foreground
reads are fetching from the network (`Fetcher.get(background=True)`), so readers come first.
With `local`, every blob not in the local cache is fetched into it; with `grid`, every
writable grid cache that does not have a blob (HEAD / stat) gets it written. Packed small
files go as their packs (what readers fetch too): a pack is one item of the progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from ..stores import StoreError
from ..stores.layout import blob_path
from ..tiers import FetchError
from ..tree.objects import KIND_DIR, KIND_FILE, pack_members
from .catalog import Catalog
from .nodes import MountPoint
from .progress import Progress

log = logging.getLogger("aysfsd.fuse.prefetch")
WORKERS = 4


Members = list[tuple[str, int, int]]  # a pack's members: (hash, offset, size)
Item = tuple[str, int, Members]  # a blob or pack to prefetch: (hash, size, members if a pack)


async def _walk(catalog: Catalog, root: str, send: trio.MemorySendChannel[Item], p: Progress,
                grid: bool, index_to_grid: bool) -> None:
    """Send every blob of the tree (directory objects included) once; identical subtrees once."""
    seen: set[str] = set()
    # tree packs (see aysfsd.tree.packs): sent instead of the directory objects they hold (and
    # of the packs of those), as readers fetch them; claimed before the walk loads directories
    tree_packs = await catalog.trees.index(root, write_back=index_to_grid)  # (grid caches need it with the packs)
    covered = {m for tp in tree_packs for m, _, _ in tp.members}
    if tree_packs:
        await catalog.load_dir(root, grid=grid, ahead=False)  # alone, as readers get it
        catalog.trees.start(root, grid=grid, packs=tree_packs)
        await catalog.trees.wait(root)
    stack = [(root, False)]  # (directory object, whether it comes in its parent's pack)
    async with send:
        for tp in tree_packs:
            seen.add(tp.hash)
            p.blobs_total += 1
            p.bytes_total += tp.size
            await send.send((tp.hash, tp.size, list(tp.members)))
        while stack:
            h, packed = stack.pop()
            data_entries, _ = await catalog.load_dir(h, grid=grid)
            # the root object alone: readers fetch it alone, before they know of tree packs
            todo: list[Item] = [] if (packed or h in covered) and h != root else [(h, 0, [])]
            for e in data_entries:
                if e.kind == KIND_DIR:
                    if e.hash not in seen:
                        stack.append((e.hash, bool(e.pack) and e.hash not in covered))
                elif not e.pack:
                    todo.extend((bh, size, []) for bh, size in e.blobs())
            # packs of small files, and of the subdirectories' objects (for the grid caches;
            # the objects themselves are in the local cache already: the walk loaded them)
            for kind in (KIND_FILE, KIND_DIR):
                for ph, members in pack_members(data_entries, kind).items():
                    if kind == KIND_DIR and all(m in covered for m, _, _ in members):
                        continue
                    todo.append((ph, members[-1][1] + members[-1][2], members))
            for item in todo:
                if item[0] in seen:
                    continue
                seen.add(item[0])
                p.blobs_total += 1
                p.bytes_total += item[1]
                await send.send(item)


async def run(catalog: Catalog, mp: MountPoint, *, local: bool, grid: bool,
              on_progress: Callable[[Progress], None] | None = None) -> Progress:
    """Prefetch the current tree of `mp` into the chosen tiers; progress kept in `mp.prefetch`."""
    p = Progress()
    mp.prefetch = p
    fetcher = catalog.fetcher
    if mp.ref is None:
        p.state = "failed"
        return p
    root = mp.ref.root
    send, recv = trio.open_memory_channel[Item](256)
    last = 0.0

    def tick() -> None:
        nonlocal last
        now = time.monotonic()
        if on_progress is not None and (now - last > 0.1 or p.blobs_done == p.blobs_total):
            last = now
            on_progress(p)

    async def to_grid(h: str, members: Members) -> bytes | None:
        """Write `h` to every writable grid cache that lacks it; its bytes, if fetched."""
        data: bytes | None = None
        rel = blob_path(h)
        for g in list(fetcher.grid):
            if not g.writable or g.is_down():
                continue
            try:
                if await g.store.contains(rel):
                    continue
                if data is None and members:
                    # e.g. a pack of directory objects: the walk has its members already
                    data = await fetcher.assembled(h, members)
                if data is None:
                    # grid=False: written right here, not also by the fetcher's write-back; a pack
                    # is kept in no cache (its members are, below)
                    data = await fetcher.get(h, local=(local or mp.cfg.cache_local) and not members,
                                             grid=False, background=True, keep=not members)
                    p.fetched_blobs += 1
                    p.fetched_bytes += len(data)
                await g.store.store(rel, data)
            except StoreError as e:
                g.mark_down(f"prefetch: {e}", h)  # the other blobs skip it
                raise
        return data

    async def one(h: str, members: Members) -> None:
        # the grid caches first: a pack fetched for them is then split for the local cache
        # rather than fetched twice (a blob fetched for them is already in the local cache)
        data = await to_grid(h, members) if grid else None
        if local and members:
            if any(fetcher.missing(m) for m, _, _ in members):
                alone = await fetcher.load_pack(h, members, local=True, grid=mp.cfg.cache_grid and not grid,
                                                data=data)
                if data is None:
                    p.fetched_blobs += 1
                    p.fetched_bytes += sum(size for _, _, size in members)
                for m in alone:  # the ones the pack did not deliver
                    await fetcher.get(m, local=True, grid=False, background=True)
        elif local and not catalog.cache.has(h):
            # with `grid` the blob was written to the grid caches above, not also by write-back
            data = await fetcher.get(h, local=True, grid=mp.cfg.cache_grid and not grid, background=True)
            p.fetched_blobs += 1
            p.fetched_bytes += len(data)

    warned = False

    def check_size() -> None:
        nonlocal warned
        if local and not warned and p.bytes_total > catalog.cache.limit:
            warned = True
            log.warning("prefetch %s: the tree (%d bytes so far) is larger than the local cache (%d bytes): "
                        "its first blobs will be evicted", mp.name, p.bytes_total, catalog.cache.limit,
                        extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})

    async def worker(recv: trio.MemoryReceiveChannel[Item]) -> None:
        async with recv:
            async for h, size, members in recv:
                try:
                    await one(h, members)
                except (FetchError, StoreError) as e:
                    p.errors += 1
                    log.warning("prefetch %s: blob %s: %s", mp.name, h, e,
                                extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id, "BLOB": h})
                p.blobs_done += 1
                p.bytes_done += size
                check_size()
                tick()

    try:
        async with trio.open_nursery() as n:
            n.start_soon(_walk, catalog, root, send, p, mp.cfg.cache_grid, grid or mp.cfg.cache_grid)
            for _ in range(WORKERS):
                n.start_soon(worker, recv.clone())
            await recv.aclose()
    except Exception as e:
        p.state = "failed"
        p.errors += 1
        log.error("prefetch %s failed: %s", mp.name, e, extra={"AYSFS_MOUNT": mp.name, "AYS_ID": mp.cfg.id})
    else:
        await fetcher.keeper.flushed()  # e.g. the directory objects of tree packs: local when done
        p.state = "done" if p.errors == 0 else "failed"
    p.seconds = round(time.monotonic() - p.started, 3)
    if on_progress is not None:
        on_progress(p)
    log.info("prefetch %s: %d blobs (%d bytes), fetched %d, %d errors, %.1fs", mp.name, p.blobs_done,
             p.bytes_done, p.fetched_blobs, p.errors, p.seconds, extra={"AYSFS_MOUNT": mp.name})
    return p
