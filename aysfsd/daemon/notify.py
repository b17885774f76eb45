"""sd_notify: READY, RELOADING, STOPPING, STATUS and WATCHDOG for a Type=notify unit."""

from __future__ import annotations

import os
import time

from systemd import daemon as sd


def notify(*lines: str) -> None:
    """Send `lines` (e.g. "READY=1", "STATUS=...") when NOTIFY_SOCKET is set; no-op otherwise."""
    if os.environ.get("NOTIFY_SOCKET"):
        sd.notify("\n".join(lines))


def reloading() -> None:
    notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval() -> float | None:
    """Half the WATCHDOG_USEC systemd asked for (when it is meant for this process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.1)
    except ValueError:
        return None
