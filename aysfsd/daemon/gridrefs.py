"""Signed refs in grid caches, so that a node can start when no stor is reachable.

A grid cache is a shared, writable place: anybody who can write to it can put any ref
there. So refs are taken from grid caches only when they are signed and `trusted_keys` is
set (a signature by a trusted key makes the place a ref came from irrelevant), and only the
newest valid one, never older than the ref the node last accepted (the rollback rule).
A node that accepted a signed ref from a stor writes it to the writable grid caches, unless
one of them already holds that revision or a newer one.
"""

from __future__ import annotations

import logging

import trio

from ..stores import StoreError
from ..stores.layout import ref_path
from ..tiers import Source
from ..tree.ref import Ref, RefError, decode_ref, verify

log = logging.getLogger("aysfsd.daemon.gridrefs")

UNTRUSTED = ("grid caches are not trusted for refs without trusted_keys "
             "(sign the refs and set trusted_keys to start from the grid)")


def newer(ref: Ref, than: Ref | None) -> bool:
    """True when `ref` may replace `than` under the rollback rule (the same ref counts too)."""
    if than is None:
        return True
    return ref.revision > than.revision or (ref.revision == than.revision and ref.root == than.root)


async def _read(src: Source, ays_id: str, timeout: float) -> Ref | None:
    with trio.fail_after(timeout):
        raw = await src.store.fetch(ref_path(ays_id))
    return decode_ref(raw, ays_id) if raw is not None else None


async def newest(ays_id: str, grid: list[Source], trusted: list[str], last: Ref | None,
                 timeout: float) -> tuple[Ref | None, list[str]]:
    """The newest validly signed ref of `ays_id` in the grid caches that is not older than
    `last`, with the reasons why the others were not taken. Bounded by `timeout` in all."""
    best: Ref | None = None
    problems: list[str] = []
    with trio.move_on_after(timeout) as scope:
        for src in grid:
            try:
                ref = await _read(src, ays_id, timeout)
                if ref is None:
                    problems.append(f"grid {src.name}: no ref")
                    continue
                verify(ref, trusted)
            except RefError as e:
                problems.append(f"grid {src.name}: {e}")
                continue
            except (StoreError, trio.TooSlowError) as e:
                problems.append(f"grid {src.name}: {e or 'timed out'}")
                continue
            if not newer(ref, last):
                assert last is not None
                problems.append(f"grid {src.name}: rollback refused: revision {ref.revision} (root "
                                f"{ref.root[:12]}) is older than the accepted revision {last.revision}")
                continue
            if best is None or ref.revision > best.revision:
                best = ref
    if scope.cancelled_caught:
        problems.append(f"grid caches: no answer within {timeout:g} s")
    return best, problems


async def share(ref: Ref, grid: list[Source], timeout: float) -> int:
    """Write an accepted signed ref to the writable grid caches that do not hold it or a newer
    revision; returns how many were written. Failures are logged, never raised."""
    written = 0
    for src in grid:
        if not src.writable:
            continue
        try:
            with trio.fail_after(timeout):
                try:
                    there = await _read(src, ref.ays, timeout)
                    if there is not None:
                        verify(there, [ref.key])
                except RefError:
                    there = None  # garbage, unsigned or badly signed: replace it
                if there is not None and there.revision >= ref.revision:
                    continue
                await src.store.store(ref_path(ref.ays), ref.encode())
            written += 1
            log.info("wrote the signed ref of %s (revision %d) to the grid cache %s", ref.ays, ref.revision,
                     src.name, extra={"AYS_ID": ref.ays, "SOURCE": src.name})
        except (StoreError, trio.TooSlowError) as e:
            log.warning("could not write the ref of %s to the grid cache %s: %s", ref.ays, src.name,
                        e or "timed out", extra={"AYS_ID": ref.ays, "SOURCE": src.name})
    return written
