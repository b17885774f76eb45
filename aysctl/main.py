"""`aysctl`: publish trees, check configs, and talk to a running aysfsd."""

from __future__ import annotations

import argparse
import sys

from aysfsd.config import ConfigError, load
from aysfsd.publish import Publisher
from aysfsd.stores import StoreError, open_store

DEFAULT_CONFIG = "/etc/aysfs/aysfs.toml"


def cmd_publish(args: argparse.Namespace) -> int:
    store = open_store(args.stor, ssh_key=args.ssh_key, ssh_known_hosts=args.ssh_known_hosts,
                       ssh_accept_unknown_host=args.ssh_accept_unknown_host)
    try:
        res = Publisher(store).publish(args.src, args.ays)
    except (StoreError, OSError, ValueError) as e:
        print(f"aysctl publish: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"root {res.root}")
    print(f"ays {args.ays}: revision {res.ref.revision} ({'new' if res.ref_changed else 'unchanged'}); "
          f"{res.files} files, {res.dirs} dirs, {res.symlinks} symlinks, {res.bytes} bytes; "
          f"uploaded {res.uploaded_blobs} blobs ({res.uploaded_bytes} bytes), "
          f"{res.skipped_blobs} already in the stor")
    for p in res.skipped_special:
        print(f"skipped (not a file, dir or symlink): {p}", file=sys.stderr)
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(cfg.ays)} mounts, {len(cfg.stors)} stors, {len(cfg.caches)} grid caches)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aysctl", description="Control aysfs: publish trees, talk to aysfsd.")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    sub = p.add_subparsers(dest="cmd", required=True)

    pub = sub.add_parser("publish", help="publish a directory as an ays tree into a stor")
    pub.add_argument("src", help="directory to publish")
    pub.add_argument("--ays", required=True, help="ays id, e.g. 'jumpscale|mongodb!main'")
    pub.add_argument("--stor", required=True, help="stor: directory, file://, http(s):// (PUT) or ssh://")
    pub.add_argument("--ssh-key", help="private key for ssh:// stors")
    pub.add_argument("--ssh-known-hosts", help="known_hosts file for ssh:// stors")
    pub.add_argument("--ssh-accept-unknown-host", action="store_true",
                     help="accept an ssh host key not in known_hosts (insecure)")
    pub.set_defaults(func=cmd_publish)

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="config_cmd", required=True)
    chk = csub.add_parser("check", help="validate a config file")
    chk.add_argument("file", nargs="?", help="config file (default: --config)")
    chk.set_defaults(func=lambda a: cmd_config_check(argparse.Namespace(config=a.file or a.config)))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
