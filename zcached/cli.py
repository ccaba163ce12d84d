"""Command line: argparse for ``zcached run`` and turning expected errors into one line.

Owns: flag names, mapping flags onto config keys, exit codes (0 ok, 1 runtime failure,
2 usage/config error) and the ``zcached: error: ...`` line. Must NOT: validate values itself
(config.py does), set anything up (daemon.py does), or let a traceback reach the user for an
expected error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from zcached import config as cfgmod


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (argparse prints usage too)
        print(f"zcached: error: {message}", file=sys.stderr)
        sys.exit(2)


def _die(msg: str, code: int) -> int:
    print(f"zcached: error: {msg}", file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="zcached", description="userspace compressed swap daemon")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run the daemon in the foreground")
    r.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config (default {cfgmod.DEFAULT_CONFIG} if it exists)",
    )
    r.add_argument(
        "--size",
        metavar="SIZE",
        help="device size: bytes, K/M/G suffix or %% of RAM; multiple of 4096 "
        "(default 50%% of RAM, at most 64G)",
    )
    r.add_argument(
        "--mountpoint",
        metavar="DIR",
        help=f"FUSE mount point (default {cfgmod.DEFAULT_MOUNTPOINT})",
    )
    r.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"Prometheus exporter address (default {cfgmod.DEFAULT_METRICS_LISTEN})",
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument(
        "--swap",
        dest="swap",
        action="store_true",
        default=None,
        help="attach a loop device and swapon it (default)",
    )
    g.add_argument("--no-swap", dest="swap", action="store_false", help="only serve the file")
    r.add_argument("--compressor", choices=cfgmod.COMPRESSORS, help="default lz4")
    r.add_argument("--level", type=int, metavar="N", help="compression level")
    r.add_argument("--mem-limit", metavar="SIZE", help="cap on pool memory (0 = none)")
    r.add_argument(
        "--swap-priority",
        type=int,
        metavar="N",
        help=f"swapon priority (default {cfgmod.DEFAULT_SWAP_PRIORITY}, above disk)",
    )
    r.add_argument(
        "--io-transport",
        choices=cfgmod.TRANSPORTS,
        help="FUSE requests over /dev/fuse (dev) or io_uring (uring); default auto",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    st = sub.add_parser("status", help="zramctl-like table from the running daemon")
    st.add_argument("--json", action="store_true", help="print the raw status document")
    st.add_argument("--config", metavar="FILE", help="read metrics_listen from this config")
    st.add_argument("--metrics-listen", metavar="HOST:PORT", help="daemon's exporter address")
    c = sub.add_parser("compact", help="ask the running daemon to compact its pool now")
    c.add_argument("--config", metavar="FILE", help="read mountpoint from this config")
    c.add_argument("--mountpoint", metavar="DIR", help="the daemon's mountpoint")
    u = sub.add_parser(
        "upgrade", help="hand the live store to a server of the version installed now"
    )
    u.add_argument("--config", metavar="FILE", help="the new server's config (and mountpoint)")
    u.add_argument("--mountpoint", metavar="DIR", help="the daemon's mountpoint")
    u.add_argument("--metrics-listen", metavar="HOST:PORT", help="the new exporter address")
    return p


def _upgrade(args: argparse.Namespace) -> int:
    from zcached import daemon

    try:
        cfg = cfgmod.load(args.config, {"mountpoint": args.mountpoint})
        if args.metrics_listen is not None:
            cfgmod.parse_listen(args.metrics_listen, "--metrics-listen")
        line = daemon.request_upgrade(cfg.mountpoint, args.config, args.metrics_listen)
    except (cfgmod.ConfigError, daemon.DaemonError) as e:
        return _die(str(e), 2 if isinstance(e, cfgmod.ConfigError) else 1)
    except OSError as e:
        return _die(f"cannot reach the daemon: {e.strerror or e}", 1)
    print(f"zcached: {line}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from zcached import status

    try:
        cfg = cfgmod.load(args.config, {"metrics_listen": args.metrics_listen})
    except cfgmod.ConfigError as e:
        return _die(str(e), 2)
    return status.main(["--metrics-listen", cfg.metrics_listen] + (["--json"] if args.json else []))


def _compact(args: argparse.Namespace) -> int:
    from zcached import daemon

    try:
        cfg = cfgmod.load(args.config, {"mountpoint": args.mountpoint})
        pid = daemon.request_compaction(cfg.mountpoint)
    except (cfgmod.ConfigError, daemon.DaemonError) as e:
        return _die(str(e), 2 if isinstance(e, cfgmod.ConfigError) else 1)
    except OSError as e:
        return _die(f"cannot signal the daemon: {e.strerror or e}", 1)
    print(f"zcached: compaction requested from pid {pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "status":
        return _status(args)
    if args.cmd == "compact":
        return _compact(args)
    if args.cmd == "upgrade":
        return _upgrade(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="zcached: %(message)s",
        stream=sys.stderr,
    )
    overrides = {
        "size": args.size,
        "mountpoint": args.mountpoint,
        "metrics_listen": args.metrics_listen,
        "swap": args.swap,
        "compressor": args.compressor,
        "level": args.level,
        "mem_limit": args.mem_limit,
        "swap_priority": args.swap_priority,
        "io_transport": args.io_transport,
    }
    try:
        cfg = cfgmod.load(args.config, overrides)
    except cfgmod.ConfigError as e:
        return _die(str(e), 2)
    from zcached import daemon
    from zcached.fuse import MountError
    from zcached.keeper import KeeperError, ServerArgs
    from zcached.swap import SwapError

    server = ServerArgs(config=args.config, overrides=overrides, verbose=args.verbose)
    try:
        return daemon.run(cfg, server)
    except (daemon.DaemonError, MountError, SwapError, KeeperError) as e:
        return _die(str(e), 1)
    except OSError as e:
        return _die(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", 1)
    except ValueError as e:
        return _die(str(e), 1)
    except KeyboardInterrupt:
        return 1
    except Exception as e:  # a bug: one line, the traceback only with -v
        logging.getLogger("zcached").debug("internal error", exc_info=True)
        return _die(f"internal error: {type(e).__name__}: {e} (run with -v for details)", 1)


if __name__ == "__main__":
    sys.exit(main())
