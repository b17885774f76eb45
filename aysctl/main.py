"""`aysctl`: publish trees, check configs, and talk to a running aysfsd."""

from __future__ import annotations

import argparse
import sys

from aysctl import commands, fuser, probe
from aysctl.client import DEFAULT_CONFIG, DEFAULT_SOCKET
from aysctl.debugpull import cmd_debug_pull
from aysfsd.config import ConfigError, load
from aysfsd.stores import StoreError, open_store
from aysfsd.tree.profile import MAX_PROFILE_BYTES
from aysfsd.tree.publish import Publisher
from aysfsd.tree.signing import keygen, load_private


def cmd_publish(args: argparse.Namespace) -> int:
    store = open_store(args.stor, ssh_key=args.ssh_key, ssh_known_hosts=args.ssh_known_hosts,
                       ssh_accept_unknown_host=args.ssh_accept_unknown_host)
    try:
        key = load_private(args.sign_key) if args.sign_key else None
        profile = None
        if args.profile:
            with open(args.profile, "rb") as f:
                profile = f.read(MAX_PROFILE_BYTES + 1)
        res = Publisher(store).publish(args.src, args.ays, sign_key=key, profile=profile)
    except (StoreError, OSError, ValueError) as e:
        print(f"aysctl publish: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"root {res.root}")
    print(f"ays {args.ays}: revision {res.ref.revision} ({'new' if res.ref_changed else 'unchanged'}); "
          f"{res.files} files, {res.dirs} dirs, {res.symlinks} symlinks, {res.bytes} bytes; "
          f"uploaded {res.uploaded_blobs} blobs ({res.uploaded_bytes} bytes), "
          f"{res.skipped_blobs} already in the stor; {res.packs} packs (small files, directory objects), "
          f"{res.tree_packs} tree packs")
    if res.profile:
        print(f"profile {res.profile}: {res.profile_items} items, named by {res.profile_ref}")
    for p in res.skipped_special:
        print(f"skipped (not a file, dir or symlink): {p}", file=sys.stderr)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    try:
        pub = keygen(args.key)
    except OSError as e:
        print(f"aysctl keygen: {args.key}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"private key: {args.key} (keep it secret: it can publish)")
    print(f"public key:  {args.key}.pub")
    print(f'trust it in aysfs.toml: [main] trusted_keys = ["{pub}"]')
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.config}: OK ({len(cfg.ays)} mounts, {len(cfg.stors)} stors, {len(cfg.caches)} grid caches)")
    return 0


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _seconds(value: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < n <= 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400, got {value}")
    return n


def _control_options() -> argparse.ArgumentParser:
    """--socket/--config/--json, also accepted after a control subcommand (`aysctl status --json`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS, help="aysfsd control socket")
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="config file to read control_socket from")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the raw JSON reply")
    return common


def _node_options() -> argparse.ArgumentParser:
    """--config/--socket/--json of probe and fuser (they run without the daemon too)."""
    opts = argparse.ArgumentParser(add_help=False)
    opts.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                      help=f"config file to check / to take the mounts from (default {DEFAULT_CONFIG})")
    opts.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                      help="aysfsd control socket (default: control_socket of the config)")
    opts.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    return opts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aysctl", description="Control aysfs: publish trees, talk to aysfsd.",
        epilog="exit codes: 0 ok, 1 failed, 2 bad config or usage, 3 aysfsd not running, "
               "4 permission denied, 5 unknown ays, 130 interrupted")
    p.add_argument("-c", "--config", metavar="FILE", default=None,
                   help=f"config file (default {DEFAULT_CONFIG}); control commands read control_socket from it")
    p.add_argument("--socket", metavar="PATH", default=None,
                   help=f"aysfsd control socket (default: from the config, else {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", default=False,
                   help="control commands print the daemon's raw JSON reply")
    sub = p.add_subparsers(dest="cmd", required=True)

    pub = sub.add_parser("publish", help="publish a directory as an ays tree into a stor")
    pub.add_argument("src", help="directory to publish")
    pub.add_argument("--ays", required=True, help="ays id, e.g. 'jumpscale|mongodb!main'")
    pub.add_argument("--stor", required=True, help="stor: directory, file://, http(s):// (PUT) or ssh://")
    pub.add_argument("--ssh-key", help="private key for ssh:// stors")
    pub.add_argument("--ssh-known-hosts", help="known_hosts file for ssh:// stors")
    pub.add_argument("--ssh-accept-unknown-host", action="store_true",
                     help="accept an ssh host key not in known_hosts (insecure)")
    pub.add_argument("--sign-key", metavar="KEY", help="sign the ref with this Ed25519 key (aysctl keygen)")
    pub.add_argument("--profile", metavar="FILE",
                     help="a startup profile of this tree (aysctl profile record): uploaded, named by the ref")
    pub.set_defaults(func=cmd_publish)

    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing refs")
    kg.add_argument("key", metavar="FILE", help="private key file to create (the public key goes to FILE.pub)")
    kg.set_defaults(func=cmd_keygen)

    cfg = sub.add_parser("config", help="configuration tools")
    csub = cfg.add_subparsers(dest="config_cmd", required=True)
    chk = csub.add_parser("check", help="validate a config file")
    chk.add_argument("file", nargs="?", help="config file (default: --config)")
    chk.set_defaults(func=lambda a: cmd_config_check(argparse.Namespace(config=a.file or a.config or DEFAULT_CONFIG)))

    common = _control_options()
    st = sub.add_parser("status", parents=[common], help="show aysfsd, its mounts, the cache and the sources")
    st.set_defaults(func=commands.cmd_status)

    rl = sub.add_parser("reload", parents=[common], help="make aysfsd re-read its config file")
    rl.set_defaults(func=commands.cmd_reload)

    rs = sub.add_parser("restart", parents=[common],
                        help="restart aysfsd in place, keeping its mounts and open files (new code after an upgrade)")
    rs.set_defaults(func=commands.cmd_restart)

    node = _node_options()
    pr = sub.add_parser("probe", parents=[node],
                        help="check this node: config, FUSE, cache_dir, every stor and grid cache, the mounts "
                             "(no daemon needed; exit 1 if something is wrong)")
    pr.set_defaults(func=probe.cmd_probe)

    fu = sub.add_parser("fuser", parents=[node],
                        help="processes using the mounts (open files, cwd, root, exe, mmaps); exit 1 if none")
    fu.add_argument("mount", nargs="?", metavar="MOUNT", help="only this mount (name, ays id or mountpoint)")
    fu.set_defaults(func=fuser.cmd_fuser)

    cache = sub.add_parser("cache", help="local cache tools")
    cache_sub = cache.add_subparsers(dest="cache_cmd", required=True)
    purge = cache_sub.add_parser("purge", parents=[common], help="drop cached blobs (all, or of one ays)")
    purge.add_argument("--ays", metavar="ID", help="only this ays (id or mount name)")
    purge.set_defaults(func=commands.cmd_cache_purge)
    verify = cache_sub.add_parser("verify", parents=[common],
                                  help="hash every cached blob; drop corrupt ones (exit 1 if any)")
    verify.set_defaults(func=commands.cmd_cache_verify)

    pf = sub.add_parser("prefetch", parents=[common], help="fetch a whole ays tree ahead of use")
    pf.add_argument("ays", metavar="ID", help="ays id (quote it: 'jumpscale|mongodb!main') or mount name")
    pf.add_argument("--local", action="store_true", help="into the local cache (the default)")
    pf.add_argument("--grid", action="store_true", help="into the grid caches")
    pf.set_defaults(func=commands.cmd_prefetch)

    prof = sub.add_parser("profile", help="startup profiles: record a start, to publish with the tree")
    prof_sub = prof.add_subparsers(dest="profile_cmd", required=True)
    rec = prof_sub.add_parser("record", parents=[common],
                              help="record the mount's next start (blobs in the order first needed) into a file")
    rec.add_argument("ays", metavar="ID", help="ays id or mount name")
    rec.add_argument("-o", "--output", required=True, metavar="FILE", help="profile file to write")
    rec.add_argument("--idle", type=_seconds, default=None, metavar="SECONDS",
                     help="the start has ended after this long without a new blob needed (default: profile_idle, 5)")
    rec.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                     help="give up waiting for the start after this long; end a longer recording (default 600)")
    rec.set_defaults(func=commands.cmd_profile_record)
    stop = prof_sub.add_parser("stop", parents=[common], help="end a recording now (record then writes its file)")
    stop.add_argument("ays", metavar="ID", help="ays id or mount name")
    stop.set_defaults(func=commands.cmd_profile_stop)

    dbg = sub.add_parser("debug", help="debugging tools")
    dbg_sub = dbg.add_subparsers(dest="debug_cmd", required=True)
    tail = dbg_sub.add_parser("tail", parents=[common], help="show the debug transaction log (debug:log:$mountname) of debug mounts")
    tail.add_argument("mount", nargs="?", metavar="MOUNT", help="only this mount (name)")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C stops)")
    tail.add_argument("-n", "--lines", type=_count, default=10, metavar="N", help="recent lines to show (default 10)")
    tail.set_defaults(func=commands.cmd_debug_tail)

    pull = dbg_sub.add_parser("pull", help="copy a debug mount's edits from redis into a directory (no daemon needed)")
    pull.add_argument("--mount", required=True, metavar="NAME", help="the mount's name ($mountname in the keys)")
    pull.add_argument("--to", required=True, metavar="DIR", help="directory to write the edited files into")
    pull.add_argument("--redis", metavar="HOST:PORT", help="redis server (default: [debug] of the config)")
    pull.add_argument("--password", help="redis password (default: $AYSFS_REDIS_PASSWORD, else the config)")
    pull.add_argument("--db", type=int, help="redis database number (default: the config's, else 0)")
    pull.add_argument("--follow", action="store_true", help="keep applying new edits until Ctrl-C")
    pull.set_defaults(func=cmd_debug_pull)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
