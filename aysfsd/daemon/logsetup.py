"""Logging: the journal (with structured fields) under systemd, plain stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys
from collections import deque


class RecentLogs(logging.Handler):
    """The last log lines in memory, for `aysctl debug tail` / status; listeners get new ones."""

    def __init__(self, size: int = 1000) -> None:
        super().__init__()
        self.lines: deque[dict[str, object]] = deque(maxlen=size)
        self.listeners: set[object] = set()
        self.serial = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.serial += 1
        item = {"n": self.serial, "time": record.created, "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        for k in ("AYSFS_MOUNT", "AYS_ID", "BLOB", "SOURCE"):
            if k in record.__dict__:
                item[k] = record.__dict__[k]
        self.lines.append(item)
        for cb in list(self.listeners):
            try:
                cb(item)  # type: ignore[operator]
            except Exception:
                self.listeners.discard(cb)


recent = RecentLogs()


def under_journal() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:ino)."""
    js = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (dev, ino)
    except (ValueError, OSError):
        return False


def setup(level: str = "info") -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if under_journal():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="aysfsd")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.addHandler(recent)
    root.setLevel(level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.WARNING)
