"""The run lifecycle: process safety, ordered setup/teardown, signals and sd_notify.

Owns: mlockall / PR_SET_IO_FLUSHER / oom_score_adj (the daemon sits on the swap path: it must
not itself be swapped out, throttled as a writer, or OOM-killed), the single-instance lock per
mountpoint, the order lock -> port check -> store -> compactor -> exporter -> FUSE mount ->
loop -> swapon and its exact reverse on SIGTERM / SIGINT or on any failure on the way up.
Must NOT: parse flags or config (cli.py/config.py), run external commands itself (swap.py), or
touch FUSE/store internals.

Invariant: every resource is entered on one ``contextlib.ExitStack``; whatever raises, the stack
unwinds in reverse (swapoff before losetup -d before unmount), so nothing stays mounted/attached.
Everything that can be refused without side effects (flags, config, root, mountpoint, a second
instance, the metrics port) is refused before the mount; after the mount only losetup, mkswap and
swapon can fail, and they unwind. Before the unmount, a swap someone else put on a loop device
over the file is swapped off too (``_release_other_users``), and a failed swapoff is retried
until it succeeds while the daemon keeps serving (swap.py): no unwinding step may drop pages that
are still out on the device. External commands run in their own session, so a second Ctrl-C
(SIGINT to the whole process group) cannot interrupt a swapoff half-way. Signals run no handler:
they are blocked in every thread and taken in the main thread (``Signals``), so the teardown
cannot be interrupted and a second SIGTERM only gets logged.
Process-safety failures only warn (documented): a daemon without mlock still works, just less
safely under memory pressure; not being root is refused earlier (mount needs it anyway).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator

from zcached import _core, keeper, transport, writeback
from zcached import swap as swapmod
from zcached.compactor import CompactionPolicy
from zcached.config import Config, ConfigError
from zcached.config import load as cfgload
from zcached.core import CoreStore
from zcached.fuse import FuseMount, mounted_zcached
from zcached.process import (
    Signals,
    lock_memory,
    protect_from_oom,
    set_io_flusher,
)

log = logging.getLogger("zcached")

LOCK_DIR = "/run/lock"


class DaemonError(RuntimeError):
    """Start-up refused; the message is one human line."""


def sd_notify(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    target = "\0" + addr[1:] if addr.startswith("@") else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), target)
    except OSError as e:
        log.warning("sd_notify %s failed: %s", state, e)
        return False
    return True


def check_listen(host: str, port: int) -> None:
    """Refuse a metrics address the exporter could not bind, before anything is set up.

    Binds the way the exporter does (IPv4, SO_REUSEADDR) and lets go at once; the exporter then
    binds it again before the FUSE mount, so a port taken in between still unwinds nothing."""
    if ":" in host:
        raise DaemonError(f"metrics address [{host}]:{port}: IPv6 is not supported, use IPv4")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise DaemonError(f"metrics address {host}:{port}: {e.strerror or e}") from None


def lock_path(mountpoint: str) -> str:
    real = os.path.realpath(mountpoint)
    name = hashlib.sha256(real.encode()).hexdigest()[:16]
    return os.path.join(LOCK_DIR, f"zcached-{name}.lock")


def _locked_fd(path: str, real: str) -> int:
    """A descriptor of the lock file ``path`` holding its exclusive flock.

    A daemon removes its lock file on exit; a starter that locked the removed file (opened just
    before) sees that ``path`` is no longer that file and retries with the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonError(f"mountpoint {real}: another zcached is running on it") from None
        try:
            st = os.stat(path)
            held = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def instance_lock(mountpoint: str) -> Iterator[None]:
    """One daemon per mountpoint: an flock held for the daemon's lifetime, holding its pid.
    The file is removed on exit, while still locked, so none is left behind."""
    real = os.path.realpath(mountpoint)
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = lock_path(mountpoint)
    fd = _locked_fd(path, real)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {real}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def running_pid(mountpoint: str) -> int:
    """Pid of the daemon serving ``mountpoint``; DaemonError if none holds its lock."""
    real = os.path.realpath(mountpoint)
    try:
        fd = os.open(lock_path(mountpoint), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DaemonError(f"no zcached is running on {real}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the daemon is alive
            text = os.pread(fd, 256, 0).decode(errors="replace").split()
            if text and text[0].isdigit():
                return int(text[0])
            raise DaemonError(f"lock file of {real} has no pid") from None
        raise DaemonError(f"no zcached is running on {real}")
    finally:
        os.close(fd)


def request_compaction(mountpoint: str) -> int:
    """``zcached compact``: SIGUSR1 to the daemon on ``mountpoint``; returns its pid."""
    pid = running_pid(mountpoint)
    os.kill(pid, signal.SIGUSR1)
    return pid


def request_upgrade(
    mountpoint: str, config: str | None, metrics_listen: str | None, timeout: float = 120.0
) -> str:
    """``zcached upgrade``: ask the keeper on ``mountpoint`` to hand its live store to a new
    server (the code installed now, optionally a new config file and metrics address), and wait
    until that server serves.  Returns a line saying so; DaemonError if refused or late."""
    pid = running_pid(mountpoint)
    state = state_path(mountpoint)
    before = keeper.read_state(state)
    request = upgrade_request_path(mountpoint)
    doc = {"config": os.path.abspath(config) if config else None, "metrics_listen": metrics_listen}
    with open(f"{request}.tmp", "w") as f:
        json.dump(doc, f)
    os.replace(f"{request}.tmp", request)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = keeper.read_state(state)
        if os.path.exists(request):
            continue  # not taken yet
        if now.get("last_upgrade_error"):
            raise DaemonError(f"upgrade refused: {now['last_upgrade_error']}")
        upgrades = now.get("upgrades", 0)
        new_server = now.get("server_pid") not in (None, before.get("server_pid"))
        more = isinstance(upgrades, int) and upgrades > int(str(before.get("upgrades", 0)))
        if more and new_server:
            return (
                f"upgraded: server {before.get('server_pid')} -> {now['server_pid']}"
                f" (generation {now.get('generation')}), serving again after"
                f" {now.get('last_recovery_ms')} ms"
            )
    raise DaemonError(f"no new server within {timeout:.0f} s (see the keeper's log, pid {pid})")


def check_mountpoint(mountpoint: str) -> None:
    """An existing directory, and not the dead mount a killed zcached leaves behind."""
    try:
        st = os.stat(mountpoint)
    except FileNotFoundError:
        raise DaemonError(f"mountpoint {mountpoint}: does not exist") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise DaemonError(
                f"mountpoint {mountpoint}: a dead FUSE mount is still there (its daemon died);"
                f" swapoff/losetup -d its users and umount it first"
            ) from None
        raise DaemonError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"mountpoint {mountpoint}: not a directory")
    if mounted_zcached(mountpoint):
        try:  # statfs always asks the server; the stat above may be answered from the cache
            os.statvfs(mountpoint)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise DaemonError(
                    f"mountpoint {mountpoint}: a dead FUSE mount is still there (its daemon"
                    f" died); swapoff/losetup -d its users and umount it first"
                ) from None


def preflight(cfg: Config) -> None:
    """Cheap checks before anything is set up (the metrics port is checked under the lock)."""
    if os.geteuid() != 0:
        raise DaemonError("must run as root (FUSE mount, loop devices and swapon need it)")
    check_mountpoint(cfg.mountpoint)


def compaction_policy(cfg: Config) -> CompactionPolicy:
    """Config's ``fragmentation`` (wasted / pool bytes) as the compactor's pool/requested ratio."""
    c = cfg.compaction
    return CompactionPolicy(
        interval=c.interval, min_ratio=1.0 / (1.0 - c.fragmentation), cpu_budget=c.cpu_budget
    )


def _make_arena(cfg: Config, nthreads: int) -> int:
    """The live store's memfd arena, one Hoard heap per FUSE worker (keeper.make_arena)."""

    def store() -> CoreStore:
        return CoreStore(
            cfg.size, compressor=cfg.compressor, level=cfg.level, mem_limit=cfg.mem_limit,
            heaps=nthreads,
        )  # fmt: skip

    return keeper.make_arena(store)


def _open_backing(cfg: Config, stack: contextlib.ExitStack) -> tuple[int, int] | None:
    """The writeback tier's backing file, opened (and made, preallocated) by the keeper, which
    keeps it across servers; DaemonError before anything is mounted if it cannot be."""
    wb = cfg.writeback
    if wb.path is None:  # not enabled
        return None
    try:
        fd, size = writeback.open_backing(wb.path, wb.size)
    except writeback.BackingError as e:
        raise DaemonError(str(e)) from None
    stack.callback(os.close, fd)
    log.info("writeback: %s, %d MiB, from %.0f%% of mem_limit", wb.path, size >> 20,
             wb.high_watermark * 100)  # fmt: skip
    return fd, size


def _choose_transport(
    cfg: Config, stack: contextlib.ExitStack
) -> tuple[transport.Choice, tuple[int, _core.Hold] | None]:
    """``io_transport``: /dev/fuse, or FUSE over io_uring with the ring area the keeper holds
    (zcached/transport.py); DaemonError before anything is mounted if "uring" cannot be had."""
    try:
        choice = transport.choose(cfg.io_transport)
    except transport.TransportError as e:
        raise DaemonError(str(e)) from None
    stack.callback(choice.restore)  # a failed start-up leaves enable_uring as it was
    log.info("transport: %s", choice.why)
    if choice.name != "uring":
        return choice, None
    fd = transport.make_ring_area()
    stack.callback(os.close, fd)
    hold = _core.Hold(fd)
    stack.callback(hold.close)
    return choice, (fd, hold)


def _activate_swap(cfg: Config, stack: contextlib.ExitStack, image: str) -> str:
    """losetup (direct I/O) + mkswap + swapon on ``stack``; returns the loop device."""
    dev = stack.enter_context(swapmod.loop(image))
    stack.enter_context(
        swapmod.swap_on(dev, cfg.swap_priority, log.warning, progress=_swapoff_progress(dev))
    )
    return dev


def _release_other_users(image: str, ours: str | None) -> None:
    """Before unmounting: swapoff any swap someone else put on a loop device over ``image``
    (unmounting under it would lose its pages), and name the loop devices that will get I/O
    errors once the file is gone. Ours (``ours``) is handled by its own context."""
    try:
        others = [d for d in swapmod.loops_backing(image) if d != ours]
    except swapmod.SwapError as e:
        log.warning("cannot list loop devices over %s: %s", image, e)
        return
    for dev in others:
        if dev in swapmod.active_swaps():
            log.warning("%s (over %s) is a swap zcached did not set up: swapoff", dev, image)
            swapmod.swapoff_until_done(dev, log.warning)
        log.warning("%s is still attached to %s: I/O errors after the unmount", dev, image)


def state_path(mountpoint: str) -> str:
    """The keeper's state file (server pid, restarts, loop device), beside its lock."""
    return lock_path(mountpoint)[: -len(".lock")] + ".json"


def upgrade_request_path(mountpoint: str) -> str:
    """Where ``zcached upgrade`` leaves its request before it sends SIGHUP."""
    return state_path(mountpoint)[: -len(".json")] + ".upgrade"


def _read_upgrade_request(state_file: str, current: keeper.ServerArgs) -> keeper.ServerArgs:
    """The server arguments an upgrade asks for: ``current`` with the request's config file and
    metrics address, if it left any (a plain SIGHUP, e.g. from systemd, changes neither)."""
    path = state_file[: -len(".json")] + ".upgrade"
    try:
        with open(path) as f:
            req = json.load(f)
    except FileNotFoundError:
        return current
    except (OSError, ValueError) as e:
        raise DaemonError(f"upgrade request {path}: {e}") from None
    overrides = dict(current.overrides)
    if req.get("metrics_listen"):
        overrides["metrics_listen"] = req["metrics_listen"]
    return keeper.ServerArgs(
        config=req.get("config") or current.config, overrides=overrides, verbose=current.verbose
    )


def _upgrade(cfg: Config, sup: keeper.Supervisor, state: keeper.KeeperState) -> None:
    """SIGHUP: check what the upgrade asks for, then hand the live store to a new server."""
    request = state.path[: -len(".json")] + ".upgrade"
    try:
        args = _read_upgrade_request(state.path, sup.args)
        new = cfgload(args.config, args.overrides)
        if new.metrics_listen != cfg.metrics_listen:
            check_listen(*new.metrics_addr)
        why = sup.probe_installed()
        if why is not None:
            raise DaemonError(
                f"the installed version cannot take over the live store: {why} "
                "(restart the service instead: that swaps everything in first)"
            )
    except (DaemonError, ConfigError) as e:
        log.error("upgrade refused: %s", e)
        state.last_upgrade_error = str(e)
        state.save()
        with contextlib.suppress(OSError):
            os.unlink(request)  # after the save: `zcached upgrade` reads the outcome then
        return
    state.last_upgrade_error = None
    state.save()
    with contextlib.suppress(OSError):
        os.unlink(request)
    for key in ("size", "compressor", "level", "mem_limit", "mountpoint", "swap",
                "swap_priority", "io_threads"):  # fmt: skip
        if getattr(new, key) != getattr(cfg, key):
            log.warning("upgrade: %s changed in the config: it takes a restart", key)
    sup.upgrade(args)


def _keep(
    cfg: Config, stack: contextlib.ExitStack, stop: Signals, args: keeper.ServerArgs
) -> tuple[keeper.Supervisor, keeper.KeeperState] | None:
    """Enter every part on ``stack`` in order; return once ready (None if ``stop`` came first).

    Order: arena (and the keeper's locked mapping of it), FUSE mount and one descriptor per
    worker, the first server (it recovers the new arena, answers INIT, serves), then loop
    device + swapon.  Unwinding: swapoff, losetup -d, unmount, stop the server, close."""
    nthreads = cfg.worker_threads
    state = keeper.KeeperState(state_path(cfg.mountpoint))  # before the mount: realpath stats
    real = os.path.realpath(cfg.mountpoint)
    arena_fd = _make_arena(cfg, nthreads)
    stack.callback(os.close, arena_fd)
    hold = _core.Hold(arena_fd)
    stack.callback(hold.close)
    backing = _open_backing(cfg, stack)
    choice, rings = _choose_transport(cfg, stack)
    mnt = FuseMount(cfg.mountpoint)
    mnt.mount()
    stack.callback(mnt.close)
    fds = keeper.clone_fds(mnt, nthreads)
    stack.callback(state.remove)
    sup = keeper.Supervisor(arena_fd, fds, hold, state, args, real, backing, rings)
    stack.callback(sup.stop)
    sup.start(stop.is_set)
    choice.restore()  # INIT is answered: the connection keeps what it negotiated
    stack.callback(mnt.unmount)
    stack.callback(sup.quiesce)  # before the unmount: the server's exit then is no death
    image = os.path.join(mnt.mountpoint, "swap.img")
    info: dict[str, str | None] = {"loop_device": None}
    stack.callback(lambda: _release_other_users(image, info["loop_device"]))
    stop.on_compact(sup.request_compaction)
    stop.on_upgrade(lambda: _upgrade(cfg, sup, state))
    if stop.is_set():
        return None
    if not cfg.swap:
        log.info(
            "ready: %s (%d bytes, no swap), metrics on %s, server %s",
            image, cfg.size, cfg.metrics_listen, state.server_pid,
        )  # fmt: skip
        return sup, state
    dev = info["loop_device"] = state.loop_device = _activate_swap(cfg, stack, image)
    state.save()
    log.info(
        "ready: swap on %s (%s, %d bytes, priority %d), metrics on %s, server %s",
        dev, image, cfg.size, cfg.swap_priority, cfg.metrics_listen, state.server_pid,
    )  # fmt: skip
    return sup, state


def _swapoff_progress(dev: str) -> swapmod.Progress:
    def report(kib: int) -> None:
        log.info("swapoff %s: %d KiB (%d pages) still out on it", dev, kib, kib // 4)

    return report


def run(cfg: Config, args: keeper.ServerArgs | None = None) -> int:
    """Keep the service until SIGTERM/SIGINT (this process is the keeper; the server is its
    child, ``args`` says how it is started).  Raises DaemonError/MountError/SwapError/
    KeeperError on start-up failure.

    A stop signal during start-up ends it at the next step (see ``Signals``): it unwinds and
    returns 0 like a stop after ready. The handled signals stay blocked when it returns: the
    process exits next, and a late Ctrl-C must not turn a clean stop into KeyboardInterrupt or
    a SIGTERM into exit 143."""
    signals = Signals()
    signals.block()  # before any thread starts: every thread inherits the mask
    if args is None:
        args = keeper.ServerArgs(config=None, overrides=config_overrides(cfg))
    try:
        preflight(cfg)
        with contextlib.ExitStack() as stack:
            stack.enter_context(instance_lock(cfg.mountpoint))
            check_listen(*cfg.metrics_addr)  # after the lock: a 2nd instance is named as such
            lock_memory()
            protect_from_oom()
            set_io_flusher()
            if not signals.is_set():
                _keep(cfg, stack, signals, args)
            if not signals.is_set():  # else a signal came during start-up: unwind at once
                sd_notify("READY=1")
                signals.wait()
            log.info("stopping: swapoff, detach, unmount")
            sd_notify("STOPPING=1")
        signals.drain()  # logs the signals that came during the teardown
        log.info("stopped")
        return 0
    finally:
        signals.drain()


def config_overrides(cfg: Config) -> dict[str, object]:
    """A config as overrides: a server started with these and no file gets ``cfg`` again."""
    c = cfg.compaction
    return {
        "size": cfg.size, "compressor": cfg.compressor, "level": cfg.level,
        "mem_limit": cfg.mem_limit, "mountpoint": cfg.mountpoint, "swap": cfg.swap,
        "swap_priority": cfg.swap_priority, "metrics_listen": cfg.metrics_listen,
        "io_threads": cfg.io_threads, "io_transport": cfg.io_transport,
        "compaction": {"interval": c.interval, "fragmentation": c.fragmentation,
                       "cpu_budget": c.cpu_budget},
        **({"writeback": {"path": w.path, "size": w.size, "high_watermark": w.high_watermark,
                          "rate": w.rate}} if (w := cfg.writeback).path else {}),
    }  # fmt: skip
