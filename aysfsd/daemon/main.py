"""`aysfsd`: the daemon's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from ..config import ConfigError, load
from . import logsetup

DEFAULT_CONFIG = "/etc/aysfs/aysfs.toml"
log = logging.getLogger("aysfsd")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aysfsd", description="aysfs daemon: mounts ays trees read-only (FUSE).")
    p.add_argument("-c", "--config", default=os.environ.get("AYSFS_CONFIG", DEFAULT_CONFIG),
                   help=f"config file (default: $AYSFS_CONFIG or {DEFAULT_CONFIG})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level (default: [main] log_level, else info)")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"aysfsd: invalid config:\n{e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK ({len(cfg.ays)} mounts, {len(cfg.stors)} stors, {len(cfg.caches)} grid caches)")
        return 0
    logsetup.setup(args.log_level or cfg.main.log_level)
    if os.geteuid() != 0:
        log.warning("not running as root: mounting needs CAP_SYS_ADMIN")
    from .core import Daemon
    from .instance import AlreadyRunning, InstanceLocks

    locks = InstanceLocks()
    try:
        locks.acquire_all(cfg.main.cache_dir, cfg.main.control_socket, cfg.main.fuse_root)
    except AlreadyRunning as e:
        log.error("refusing to start: %s", e)
        return 1
    except OSError as e:
        log.error("refusing to start: cannot take the lock of %s: %s", e.filename or "a lock file", e.strerror or e)
        return 1
    try:
        daemon = Daemon(args.config, cfg)
        trio.run(daemon.run)
    except KeyboardInterrupt:
        return 0
    except Exception as e:
        log.exception("aysfsd failed: %s", e)
        return 1
    finally:
        locks.close()  # (an exec would close them too; the next program takes them again)
    if daemon.exec_fds:  # `aysctl restart`: the same process, the new program, the same mounts
        reexec(daemon.exec_fds, argv)
    return 0


def reexec(fds: dict[str, int], argv: list[str] | None) -> None:
    from ..fuse import handover

    for fd in fds.values():
        os.set_inheritable(fd, True)
    os.environ[handover.ENV_FDS] = ",".join(f"{name}={fd}" for name, fd in fds.items())
    rest = sys.argv[1:] if argv is None else argv
    if os.path.isfile(sys.argv[0]) and os.access(sys.argv[0], os.X_OK):
        args = [sys.argv[0], *rest]  # /usr/bin/aysfsd: after an upgrade, the new program
    else:
        args = [sys.executable, "-m", "aysfsd.daemon.main", *rest]
    log.info("re-executing: %s", " ".join(args))
    logging.shutdown()
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main())
