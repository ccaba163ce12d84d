"""server: the serving process, a child of the keeper (``zcached serve``; not for users).

Owns: attaching the live store (the keeper's memfd arena) and recovering it, the C FUSE loop
on the keeper's /dev/fuse descriptors, the compactor, the metrics exporter, and telling the
keeper it is ready (one byte on the ready pipe).  It can die at any instruction, or be told
to go (SIGTERM: an upgrade): the keeper starts another on the same arena and descriptors, and
nothing is lost (csrc/store.c RECOVERY, csrc/fuse_loop.c TAKING OVER A CONNECTION).
Must not: mount, unmount, attach loop devices or swapon (the keeper owns all of them and
outlives every server), close the keeper's descriptors, or wait for the FUSE workers when it
ends (they are blocked in read(2) on a connection that outlives this process).
It ends on SIGTERM/SIGINT (from the keeper: upgrade or stop), or when its workers end (the
connection went away: unmounted or aborted).  If the keeper dies first, it serves on: the
swapped-out pages stay readable while it lives, but nothing restarts it.

Order, fastest route back to serving first: attach + recover -> FUSE workers (requests are
answered from here on) -> ready byte -> config, compactor, exporter.  Until the ready byte only
``zcached._core`` and ``zcached.process`` are imported: an interpreter's start and the imports
are most of a recovery's pause (bench/recovery_bench.py).  A config or metrics address that
fails after that costs the compactor or the metrics (logged), never the data path.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

from zcached import _core
from zcached.process import Signals, lock_memory, protect_from_oom, set_io_flusher

if TYPE_CHECKING:
    from collections.abc import Callable

    from zcached import config as cfgmod
    from zcached.compactor import Compactor
    from zcached.core import CoreFuseLoop, CoreStore
    from zcached.metrics import Exporter
    from zcached.recompressor import Recompressor
    from zcached.writeback import Writeback

log = logging.getLogger("zcached")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zcached serve")
    p.add_argument("--arena-fd", type=int, required=True)
    p.add_argument("--fuse-fds", required=True, help="comma-separated descriptors")
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--config", default=None)
    p.add_argument("--overrides", default="{}", help="JSON: the keeper's flag overrides")
    p.add_argument("--state-file", required=True, help="the keeper's state (for /status)")
    p.add_argument("--generation", type=int, default=0)
    p.add_argument("--file-name", default="swap.img")
    p.add_argument("--mountpoint", required=True, help="its real path (the keeper resolved it)")
    p.add_argument("--backing-fd", type=int, default=-1, help="the writeback tier's file")
    p.add_argument("--backing-size", type=int, default=0)
    p.add_argument("--ring-fd", type=int, default=-1, help="FUSE over io_uring: the ring area")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _open_exporter(  # the exporter is imported only once the server serves
    cfg: cfgmod.Config, store: CoreStore, loop: CoreFuseLoop, compactor: Compactor,
    recompressor: Recompressor | None, info: dict[str, object], state_file: str,
) -> Exporter | None:  # fmt: skip
    """The exporter, retrying a busy port for a moment (the server before us may still hold
    it as it dies); None, logged, if it stays busy."""

    def document() -> dict[str, object]:
        doc = dict(info)
        state = read_state(state_file)
        doc.update({k: state[k] for k in ("loop_device", "restarts", "upgrades") if k in state})
        doc["last_recovery_ms"] = state.get("last_recovery_ms")
        return doc

    from zcached.keeper import read_state
    from zcached.metrics import start_exporter

    deadline = time.monotonic() + 3.0
    while True:
        try:
            return start_exporter(
                cfg.metrics_listen, store, fuse=loop, compactor=compactor, info=document,
                recompressor=recompressor,
            )  # fmt: skip
        except OSError as e:
            if time.monotonic() > deadline:
                log.error("metrics address %s: %s (no metrics)", cfg.metrics_listen, e.strerror)
                return None
            time.sleep(0.1)


def _flusher() -> None:
    set_io_flusher()


def serve(args: argparse.Namespace) -> int:
    signals = Signals()
    signals.block()
    lock_memory()
    protect_from_oom()
    set_io_flusher()
    fds = [int(x) for x in args.fuse_fds.split(",")]
    t0 = time.monotonic()
    core = _core.Store(attach=args.arena_fd)
    backing_error = _set_backing(core, args)  # before any request: it recounts the segments
    fuse = _core.Fuse(core, fds[0], args.file_name, fds=fds)
    if args.ring_fd >= 0:
        fuse.set_uring(args.ring_fd, os.path.join(args.mountpoint, args.file_name))
    fuse.start()
    tell_keeper(args.ready_fd, b"R")
    up_ms = (time.monotonic() - t0) * 1000

    from zcached import config as cfgmod
    from zcached.core import CoreFuseLoop, CoreStore

    store, loop = CoreStore.wrap(core), CoreFuseLoop.wrap(fuse)
    rec = store.recovery() or {}
    log.info(
        "server %d (generation %d) serving: %d pages, %d objects, %d orphans freed, %d lost,"
        " rebuilt in %.1f ms, up in %.0f ms%s",
        os.getpid(), args.generation, rec.get("pages", 0), rec.get("objects", 0),
        rec.get("orphans", 0), rec.get("lost_pages", 0), rec.get("ns", 0) / 1e6, up_ms,
        ", resumed the connection" if loop.resumed else "",
    )  # fmt: skip
    if loop.resend_error:
        log.error(
            "FUSE_NOTIFY_RESEND failed: %s (Linux 6.9+ replays the requests a dead server had"
            " taken; without it they wait for ever)",
            os.strerror(loop.resend_error),
        )
    if args.ring_fd >= 0:
        _log_transport(fuse)
    if loop.io_flusher_failed:
        log.warning("prctl(PR_SET_IO_FLUSHER) failed in the FUSE workers (needs CAP_SYS_RESOURCE)")
    if args.backing_fd < 0 and store.raw_stats()["backed_pages"]:
        backing_error = "none configured, and this store has pages in one"
    if backing_error:
        log.error("backing file: %s (no writeback; pages already in it read as I/O errors)",
                  backing_error)  # fmt: skip
    if rec.get("lost_pages"):
        log.error("%d pages named no valid object: they read as I/O errors", rec["lost_pages"])
    try:
        cfg = cfgmod.load(args.config, json.loads(args.overrides))
    except (cfgmod.ConfigError, ValueError) as e:
        log.error("server: config: %s (serving without compactor and metrics)", e)
        os.close(args.ready_fd)
        _wait(signals, loop)
        return 2
    loop.set_spin(cfg.io_spin_us)
    compactor = _start_compactor(cfg, store, signals)
    recompressor = _start_recompressor(cfg, store, compactor.trigger)
    spiller = _start_writeback(cfg, store) if args.backing_fd >= 0 and not backing_error else None
    info: dict[str, object] = {
        "algorithm": store.compressor,
        "mountpoint": args.mountpoint,  # never stat the mount here: its attributes are cached
        "device": os.path.join(args.mountpoint, args.file_name),  # even once it is dead
        "swap_priority": cfg.swap_priority if cfg.swap else None,
        "pid": os.getppid(),
        "keeper_pid": os.getppid(),
        "server_pid": os.getpid(),
        "server_generation": args.generation,
        "recovery": rec,
    }
    exporter = _open_exporter(cfg, store, loop, compactor, recompressor, info, args.state_file)
    tell_keeper(args.ready_fd, b"M")
    os.close(args.ready_fd)
    _wait(signals, loop)
    compactor.stop()
    if recompressor is not None:
        recompressor.stop()
    if spiller is not None:
        spiller.stop()
    if exporter is not None:
        exporter.close()
    return 0


def _log_transport(fuse: _core.Fuse) -> None:
    """Which transport the connection's INIT chose (io_uring needs the kernel to offer it)."""
    st = fuse.stats()
    if st["uring"]:
        how = ", taking over its rings" if st["resumed"] else ""
        log.info("transport: FUSE over io_uring%s", how)
    else:
        log.warning("transport: /dev/fuse (the kernel did not offer io_uring in INIT)")


def tell_keeper(fd: int, what: bytes) -> None:
    """b"R": serving (the keeper's measure of a recovery); b"M": metrics up too (the keeper
    waits for it at its start, so `zcached status` answers once it says ready)."""
    try:
        os.write(fd, what)
    except BrokenPipeError:  # the keeper stopped listening: it only waits for the first
        log.debug("the keeper closed the ready pipe")


def _start_compactor(cfg: cfgmod.Config, store: CoreStore, signals: Signals) -> Compactor:
    from zcached.compactor import Compactor
    from zcached.daemon import compaction_policy

    compactor = Compactor(store.allocator, compaction_policy(cfg), thread_init=_flusher)
    compactor.start()
    signals.on_compact(compactor.trigger)
    return compactor


def _set_backing(core: _core.Store, args: argparse.Namespace) -> str | None:
    """Give the store the keeper's backing file; why not, or None."""
    if args.backing_fd < 0:
        return None
    try:
        core.set_backing(args.backing_fd, args.backing_size)
    except OSError as e:
        if e.errno == errno.EPROTO:
            return "it is not the file this store's pages were written back to"
        return e.strerror or str(e)
    return None


def _start_writeback(cfg: cfgmod.Config, store: CoreStore) -> Writeback | None:
    from zcached.writeback import Writeback, WritebackPolicy

    wb = cfg.writeback
    if not wb.enabled:  # with it, config.build has made sure of a mem_limit
        return None
    policy = WritebackPolicy(cfg.mem_limit, high_watermark=wb.high_watermark, rate=wb.rate)
    spiller = Writeback(store, policy, compact=store.allocator.compact, thread_init=_flusher)
    spiller.start()
    return spiller


def _start_recompressor(
    cfg: cfgmod.Config, store: CoreStore, compact: Callable[[], None]
) -> Recompressor | None:
    from zcached.recompressor import Recompressor, RecompressPolicy

    rc = cfg.recompress
    if not rc.enabled:
        return None
    policy = RecompressPolicy(
        idle=rc.idle, level=rc.level, cpu_budget=rc.cpu_budget, dictionary=rc.dictionary
    )
    recompressor = Recompressor(store, policy, thread_init=_flusher, compact=compact)
    recompressor.start()
    return recompressor


def _wait(signals: Signals, loop: CoreFuseLoop) -> None:
    """Until a stop signal, or the connection is gone (every worker ended)."""
    while signals.received is None and loop.alive():
        signals.take(1.0)
    if signals.received is None:
        log.info("server %d: the FUSE connection is gone (unmounted): ending", os.getpid())
    else:
        log.info("server %d: stopping (the keeper keeps the store and the mount)", os.getpid())


def probe_main(argv: list[str]) -> int:
    """``--probe-arena FD``: whether this (installed) version can take over the arena in
    memfd FD, asked by the keeper before a live upgrade stops the old server.  0, or one line
    on stderr and 3."""
    try:
        _core.probe_arena(int(argv[0]))
    except (ValueError, OSError, IndexError) as e:
        print(f"zcached: {e}", file=sys.stderr)
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe-arena"]:
        sys.exit(probe_main(argv[1:]))
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="zcached: %(message)s",
        stream=sys.stderr,
    )
    try:
        rc = serve(args)
    except Exception as e:  # a bug: logged; the keeper starts another server
        log.error("server: internal error: %s: %s", type(e).__name__, e, exc_info=args.verbose)
        rc = 1
    sys.stderr.flush()
    # Not sys.exit: the FUSE workers are blocked in read(2) and are never joined; the
    # descriptors and the arena are the keeper's, and nothing else needs unwinding.
    os._exit(rc)


if __name__ == "__main__":
    main()
