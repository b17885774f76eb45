"""aysctl's control subcommands: status, reload, cache purge, prefetch, profile and debug tail.

Each takes the parsed argparse namespace (``socket``, ``config``, ``json`` plus its own options)
and returns the exit code; errors are printed as ``aysctl: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from aysctl import render
from aysctl.client import ControlError, Reply, call, find_socket, request

READ_TIMEOUT = 30.0  # seconds without a reply line before a request fails
RELOAD_TIMEOUT = 120.0  # a reload checks the refs within fetch_timeout (30 s by default), then mounts
PREFETCH_READ_TIMEOUT = 300.0  # between two prefetch events (one big blob may take a while)
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


def control(func: Command) -> Command:
    """Turn ControlError, Ctrl-C and a closed stdout pipe into a message and an exit code."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except ControlError as e:
            if getattr(args, "json", False) and e.reply is not None:
                _print_json(e.reply)
            print(f"aysctl: {e}", file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt:
            print("aysctl: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. `aysctl debug tail -f | head`: the reader is gone
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
            except (OSError, ValueError):
                pass
            return 0

    return wrapper


def _socket(args: argparse.Namespace) -> str:
    return find_socket(getattr(args, "socket", None), getattr(args, "config", None))


def _print_json(obj: Any, indent: int | None = 2) -> None:
    print(json.dumps(obj, indent=indent, ensure_ascii=False))


def _tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _console() -> Console:
    return Console(highlight=False)


@control
def cmd_status(args: argparse.Namespace) -> int:
    """Show the daemon, its mounts, the local cache and the sources."""
    st = call(_socket(args), {"cmd": "status"}, READ_TIMEOUT)
    if args.json:
        _print_json(st)
    elif _tty():
        render.print_status(_console(), st)
    else:
        for line in render.status_plain(st):
            print(line)
        if err := render.config_error(st):
            print(f"{render.CONFIG_ERROR_HEADING}:\n{err}", file=sys.stderr)
        if note := render.upgrade_note(st):
            print(f"aysctl: {note}", file=sys.stderr)
    return 0


@control
def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the daemon to re-read its config file."""
    try:
        final = call(_socket(args), {"cmd": "reload"}, RELOAD_TIMEOUT)
    except ControlError as e:
        if e.code != "failed":
            raise
        raise ControlError(f"reload failed, the previous config is still running:\n{e}",
                           e.exit_code, e.code, e.reply) from None
    if args.json:
        _print_json(final)
    else:
        print("reloaded")
    return 0


@control
def cmd_restart(args: argparse.Namespace) -> int:
    """Restart the daemon in place: it re-executes itself and resumes its FUSE session, so
    mounts, open files and inode numbers stay (readers see a pause, not an error)."""
    before = call(_socket(args), {"cmd": "status"}, READ_TIMEOUT).get("daemon", {}).get("started")
    reply = call(_socket(args), {"cmd": "restart"}, READ_TIMEOUT)
    deadline = time.monotonic() + READ_TIMEOUT
    while True:  # the same pid serves again once the new program answers (a new start time)
        try:
            st = call(_socket(args), {"cmd": "status"}, READ_TIMEOUT)
            if st.get("daemon", {}).get("started") != before:
                break
        except ControlError:
            pass
        if time.monotonic() > deadline:
            raise ControlError(f"aysfsd did not answer within {READ_TIMEOUT:g}s of restarting "
                               "(see: journalctl -u aysfsd)", 1)
        time.sleep(0.1)
    if args.json:
        _print_json({"ok": True, "pid": reply.get("pid"), "status": st})
    else:
        print(f"restarted (pid {reply.get('pid')}); mounts kept: "
              + (", ".join(sorted(m.get("name", "?") for m in st.get("mounts", []))) or "none"))
    return 0


@control
def cmd_cache_purge(args: argparse.Namespace) -> int:
    """Drop cached blobs: all of them, or those of one ays."""
    req: dict[str, Any] = {"cmd": "cache.purge"}
    if args.ays:
        req["ays"] = args.ays
    final = call(_socket(args), req, READ_TIMEOUT)
    if args.json:
        _print_json(final)
    else:
        where = f" of {args.ays}" if args.ays else ""
        print(f"purged the cache{where}: freed {render.human_bytes(final.get('freed_bytes', 0))} "
              f"({render.as_int(final.get('blobs'))} blobs)")
    return 0


@control
def cmd_cache_verify(args: argparse.Namespace) -> int:
    """Hash every blob in the local cache; corrupt ones are dropped (and refetched when read)."""
    final = call(_socket(args), {"cmd": "cache.verify"}, None)
    if args.json:
        _print_json(final)
    else:
        bad = final.get("dropped") or []
        print(f"verified {render.as_int(final.get('checked'))} blobs: {len(bad)} corrupt, dropped")
        for h in bad:
            print(f"  dropped {h}")
    return 1 if final.get("dropped") else 0


@control
def cmd_prefetch(args: argparse.Namespace) -> int:
    """Fetch a whole ays tree into the local cache (the default) and/or the grid caches."""
    local, grid = bool(args.local), bool(args.grid)
    if not local and not grid:
        local = True
    req = {"cmd": "prefetch", "ays": args.ays, "local": local, "grid": grid}
    path = _socket(args)
    final: Reply
    if not args.json and _tty():
        final = {}
        into = " and ".join(name for name, on in (("local cache", local), ("grid caches", grid)) if on)
        with render.PrefetchProgress(_console(), f"prefetching {args.ays} into the {into}") as bar:
            for msg in request(path, req, PREFETCH_READ_TIMEOUT):
                if msg.get("event") == "progress":
                    bar.update(msg)
                elif "ok" in msg:
                    final = msg
    else:
        final = call(path, req, PREFETCH_READ_TIMEOUT)
    if args.json:
        _print_json(final)
    else:
        print(render.prefetch_summary(final))
    errors = render.as_int(final.get("errors"))
    if errors:
        print(f"aysctl: {errors} errors while prefetching {args.ays}; see: aysctl debug tail", file=sys.stderr)
        return 1
    return 0


def _write_file(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@control
def cmd_profile_record(args: argparse.Namespace) -> int:
    """Record the next start of a mount as a startup profile, into a file."""
    req: dict[str, Any] = {"cmd": "profile.record", "ays": args.ays, "timeout": args.timeout}
    if args.idle is not None:
        req["idle"] = args.idle
    final = call(_socket(args), req, args.timeout * 2 + READ_TIMEOUT)
    profile = final.pop("profile", None)
    if not isinstance(profile, str):
        raise ControlError("aysfsd sent no profile")
    try:
        _write_file(args.output, profile.encode("utf-8", "surrogateescape"))
    except OSError as e:
        raise ControlError(f"cannot write {args.output}: {e.strerror or e}") from None
    final["file"] = args.output
    if args.json:
        _print_json(final)
    else:
        print(f"recorded the start of {args.ays} (version {render.short_root(final.get('root'))}): "
              f"{render.as_int(final.get('items'))} items, {render.human_bytes(final.get('bytes', 0))} in "
              f"{final.get('seconds')} s (ended: {final.get('reason')}); wrote {args.output}")
    return 0


@control
def cmd_profile_stop(args: argparse.Namespace) -> int:
    """End a mount's recording now (the waiting `profile record` then writes what it has)."""
    final = call(_socket(args), {"cmd": "profile.stop", "ays": args.ays}, READ_TIMEOUT)
    if args.json:
        _print_json(final)
    else:
        print("stopped the recording" if final.get("stopped") else f"no recording of {args.ays} was running")
    return 0


@control
def cmd_debug_tail(args: argparse.Namespace) -> int:
    """Print the daemon's recent log lines (debug level included); with -f keep following."""
    req: dict[str, Any] = {"cmd": "log.tail", "lines": args.lines, "follow": bool(args.follow), "debug": True}
    if args.mount:
        req["mount"] = args.mount
    console = _console() if not args.json and _tty() else None
    try:
        for msg in request(_socket(args), req, None if args.follow else READ_TIMEOUT):
            if msg.get("event") != "log":
                continue
            if args.json:
                print(json.dumps(msg, ensure_ascii=False), flush=True)
            elif console is not None:
                console.print(render.log_text(msg), soft_wrap=True)
            else:
                print(render.log_plain(msg), flush=True)
    except KeyboardInterrupt:
        if args.follow:
            return 0  # Ctrl-C is how one stops following
        raise
    return 0


__all__ = ["cmd_cache_purge", "cmd_debug_tail", "cmd_prefetch", "cmd_profile_record", "cmd_profile_stop",
           "cmd_reload", "cmd_status", "control"]
