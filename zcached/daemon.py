"""The run lifecycle: process safety, ordered setup/teardown, signals and sd_notify.

Owns: mlockall / PR_SET_IO_FLUSHER / oom_score_adj (the daemon sits on the swap path: it must
not itself be swapped out, throttled as a writer, or OOM-killed), the single-instance lock per
mountpoint, the order store -> FUSE mount -> loop -> swapon and its exact reverse on SIGTERM /
SIGINT or on any failure on the way up. Must NOT: parse flags or config (cli.py/config.py),
run external commands itself (swap.py), or touch FUSE/store internals.

Invariant: every resource is entered on one ``contextlib.ExitStack``; whatever raises, the stack
unwinds in reverse (swapoff before losetup -d before unmount), so nothing stays mounted/attached.
Process-safety failures only warn (documented): a daemon without mlock still works, just less
safely under memory pressure; not being root is refused earlier (mount needs it anyway).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import hashlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator

from zcached.config import Config
from zcached import swap as swapmod

log = logging.getLogger("zcached")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57
THREAD_STACK = 1 << 20  # 256 KiB overflowed (segfault) under 1 MiB FUSE writes; ONFAULT locks only touched pages
LOCK_DIR = "/run/lock"


class DaemonError(RuntimeError):
    """Start-up refused; the message is one human line."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def lock_memory() -> bool:
    threading.stack_size(THREAD_STACK)  # before any thread starts: locked stacks stay small
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        log.warning("mlockall failed: %s (daemon memory may be swapped out)",
                    os.strerror(ctypes.get_errno()))
        return False
    return True


def set_io_flusher() -> bool:
    """PR_SET_IO_FLUSHER on the calling thread (FUSE workers call this via thread_init)."""
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_IO_FLUSHER) failed on thread %s: %s",
                    threading.current_thread().name, os.strerror(ctypes.get_errno()))
        return False
    return True


def protect_from_oom() -> bool:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError as e:
        log.warning("cannot set oom_score_adj -1000: %s", e.strerror)
        return False
    return True


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
    """Refuse a busy metrics address early (the exporter binds it later)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise DaemonError(f"metrics address {host}:{port}: {e.strerror or e}") from None


@contextlib.contextmanager
def instance_lock(mountpoint: str) -> Iterator[None]:
    """One daemon per mountpoint: an flock held for the daemon's lifetime."""
    real = os.path.realpath(mountpoint)
    name = hashlib.sha256(real.encode()).hexdigest()[:16]
    os.makedirs(LOCK_DIR, exist_ok=True)
    path = os.path.join(LOCK_DIR, f"zcached-{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonError(f"mountpoint {real}: another zcached is running on it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {real}\n".encode())
        yield
    finally:
        os.close(fd)


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists(mountpoint):
        raise DaemonError(f"mountpoint {mountpoint}: does not exist")
    if not os.path.isdir(mountpoint):
        raise DaemonError(f"mountpoint {mountpoint}: not a directory")


def preflight(cfg: Config) -> None:
    """Cheap checks before anything is set up."""
    if os.geteuid() != 0:
        raise DaemonError("must run as root (FUSE mount, loop devices and swapon need it)")
    check_mountpoint(cfg.mountpoint)
    host, port = cfg.metrics_addr
    check_listen(host, port)


def run(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Raises DaemonError/MountError/SwapError on start-up failure."""
    from zcached.fuse import FuseServer
    from zcached.store import PageStore

    preflight(cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(instance_lock(cfg.mountpoint))
            lock_memory()
            protect_from_oom()
            set_io_flusher()
            store = PageStore(cfg.size, compressor=cfg.compressor, level=cfg.level,
                              mem_limit=cfg.mem_limit)
            stack.callback(store.close)
            server = FuseServer(store, cfg.mountpoint, cfg.size, thread_init=set_io_flusher)
            server.mount()
            stack.callback(server.stop)
            server.start()
            if stop.is_set():
                return 0
            if cfg.swap:
                dev = stack.enter_context(swapmod.loop(server.image_path))
                stack.enter_context(swapmod.swap_on(dev, cfg.swap_priority))
                log.info("ready: swap on %s size %d bytes loop %s priority %d",
                         server.image_path, cfg.size, dev, cfg.swap_priority)
            else:
                log.info("ready: %s size %d bytes (no swap)", server.image_path, cfg.size)
            sd_notify("READY=1")
            while not stop.wait(1.0):
                pass
            log.info("stopping: swapoff, detach, unmount")
            sd_notify("STOPPING=1")
        log.info("stopped")
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
