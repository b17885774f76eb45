"""Watch the config file with inotify and call back when it may have changed.

Watches the file's directory, not the file, so editors that write a new file and
rename it over the old one are seen; when the directory does not exist yet, the
nearest existing parent is watched until it appears.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio
from inotify_simple import INotify
from inotify_simple import flags as F

log = logging.getLogger("aysfsd.daemon.watch")

DEBOUNCE = 0.3
FILE_EVENTS = F.CLOSE_WRITE | F.MOVED_TO | F.CREATE | F.DELETE | F.MOVED_FROM | F.ATTRIB
DIR_GONE = F.DELETE_SELF | F.MOVE_SELF | F.IGNORED


def _nearest_existing(path: str) -> str:
    p = path
    while not os.path.isdir(p) and p != os.path.dirname(p):
        p = os.path.dirname(p)
    return p


async def watch_config(path: str, on_change: Callable[[], Awaitable[object]]) -> None:
    path = os.path.abspath(path)
    target_dir, name = os.path.dirname(path), os.path.basename(path)
    while True:
        ino = INotify()
        try:
            watched = _nearest_existing(target_dir)
            waiting_for_dir = watched != target_dir
            ino.add_watch(watched, FILE_EVENTS | DIR_GONE)
            if waiting_for_dir:
                log.info("config directory %s does not exist yet; watching %s", target_dir, watched)
            rearm = False
            while not rearm:
                await trio.lowlevel.wait_readable(ino.fileno())
                changed = False
                # collect a burst of events (editors write, rename, chmod) into one reload
                with trio.move_on_after(DEBOUNCE):
                    while True:
                        for ev in ino.read(timeout=0):
                            if ev.mask & DIR_GONE:
                                rearm = True
                            elif waiting_for_dir:
                                rearm = True  # something appeared on the way to the config dir
                                changed = True
                            elif ev.name == name:
                                changed = True
                        await trio.lowlevel.wait_readable(ino.fileno())
                if changed and os.path.exists(path):
                    log.info("config file %s changed: reloading", path)
                    await on_change()
        finally:
            ino.close()
