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
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator

from zcached import swap as swapmod
from zcached.compactor import CompactionPolicy, Compactor
from zcached.config import Config
from zcached.core import CoreFuseServer, CoreStore
from zcached.metrics import start_exporter

log = logging.getLogger("zcached")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57
# 256 KiB stacks overflowed (segfault) under 1 MiB FUSE writes; MCL_ONFAULT locks only the
# stack pages a thread really touches, so 1 MiB costs little.
THREAD_STACK = 1 << 20
LOCK_DIR = "/run/lock"


class DaemonError(RuntimeError):
    """Start-up refused; the message is one human line."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def lock_memory() -> bool:
    threading.stack_size(THREAD_STACK)  # before any thread starts: locked stacks stay small
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        log.warning(
            "mlockall failed: %s (daemon memory may be swapped out)",
            os.strerror(ctypes.get_errno()),
        )
        return False
    return True


_flusher_warned = threading.Event()


def set_io_flusher() -> bool:
    """PR_SET_IO_FLUSHER on the calling thread (every daemon thread calls it); warns once."""
    if _libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        level = logging.DEBUG if _flusher_warned.is_set() else logging.WARNING
        _flusher_warned.set()
        log.log(
            level,
            "prctl(PR_SET_IO_FLUSHER) failed on thread %s: %s (needs CAP_SYS_RESOURCE)",
            threading.current_thread().name,
            os.strerror(ctypes.get_errno()),
        )
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


def _flusher_init() -> None:
    set_io_flusher()


def _open_store(cfg: Config, stack: contextlib.ExitStack, nthreads: int) -> CoreStore:
    """The C page store, one Hoard heap per FUSE worker."""
    store = CoreStore(
        cfg.size, compressor=cfg.compressor, level=cfg.level, mem_limit=cfg.mem_limit,
        heaps=nthreads,
    )  # fmt: skip
    stack.callback(store.close)
    return store


def _start_exporter(
    cfg: Config, stack: contextlib.ExitStack, store: CoreStore, server: CoreFuseServer,
    compactor: Compactor, info: dict[str, object],
) -> None:  # fmt: skip
    try:
        exporter = start_exporter(
            cfg.metrics_listen, store, fuse=server, compactor=compactor, info=lambda: info
        )
    except OSError as e:
        raise DaemonError(f"metrics address {cfg.metrics_listen}: {e.strerror or e}") from None
    stack.callback(exporter.close)


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


def _loop_of(info: dict[str, object]) -> str | None:
    dev = info.get("loop_device")
    return dev if isinstance(dev, str) else None


def _serve(cfg: Config, stack: contextlib.ExitStack, stop: Signals) -> None:
    """Enter every part on ``stack`` in order; return once ready (or when ``stop`` is set).

    Order: store, compactor, exporter (binding the port cannot fail after the mount), FUSE
    mount and workers, then loop device + swapon."""
    nthreads = cfg.worker_threads
    store = _open_store(cfg, stack, nthreads)
    pool = store.allocator
    server = CoreFuseServer(store, cfg.mountpoint, cfg.size, threads=nthreads)
    info: dict[str, object] = {
        "algorithm": cfg.compressor,
        "mountpoint": os.path.realpath(cfg.mountpoint),
        "device": server.image_path,
        "loop_device": None,
        "swap_priority": cfg.swap_priority if cfg.swap else None,
        "pid": os.getpid(),
    }
    compactor = Compactor(pool, compaction_policy(cfg), thread_init=_flusher_init)
    compactor.start()
    stack.callback(compactor.stop)
    stop.on_compact(compactor.trigger)
    _start_exporter(cfg, stack, store, server, compactor, info)
    server.mount()
    stack.callback(server.stop)
    server.start()
    if server.io_flusher_failed:
        log.warning("prctl(PR_SET_IO_FLUSHER) failed in the FUSE workers (needs CAP_SYS_RESOURCE)")
    stack.callback(lambda: _release_other_users(server.image_path, _loop_of(info)))
    if stop.is_set():
        return
    if not cfg.swap:
        log.info(
            "ready: %s (%d bytes, no swap), metrics on %s",
            server.image_path, cfg.size, cfg.metrics_listen,
        )  # fmt: skip
        return
    dev = info["loop_device"] = _activate_swap(cfg, stack, server.image_path)
    log.info(
        "ready: swap on %s (%s, %d bytes, priority %d), metrics on %s",
        dev, server.image_path, cfg.size, cfg.swap_priority, cfg.metrics_listen,
    )  # fmt: skip


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGUSR1}  # SIGUSR1: compaction request


class Signals:
    """SIGTERM / SIGINT (stop) and SIGUSR1 (compact now), taken synchronously: no handler runs.

    :meth:`block` blocks them in the main thread before any thread starts, so every thread
    inherits the mask and none can receive them; they stay pending until :meth:`take`, the one
    place they are received (sigtimedwait, in the main thread: its wait loop and the start-up
    checkpoints). Nothing can interrupt the teardown: signals that come during it stay pending
    (a burst coalesces into one per number) and :meth:`drain` logs them. The first stop
    signal stops the daemon; later ones are logged and change nothing. SIGUSR1 only calls the
    compactor's ``trigger`` (sets a flag); before the compactor exists it is ignored."""

    def __init__(self) -> None:
        self.received: int | None = None  # the stop signal, once one came
        self._compact: Callable[[], None] | None = None

    def block(self) -> None:
        """Block the handled signals, and set them to SIG_IGN as well.

        Blocked signals are never discarded by Linux, ignored or not (kernel/signal.c,
        sig_ignored()), so :meth:`take` still receives every one.  The SIG_IGN is for the
        commands the daemon runs (swap.py): they inherit it, so a signal sent to the daemon's
        process group in the instant between their fork and their setsid (a storm of Ctrl-Cs
        during swapoff) is dropped instead of killing a losetup or swapoff half-way."""
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        for signo in HANDLED_SIGNALS:
            signal.signal(signo, signal.SIG_IGN)

    def drain(self) -> None:
        """Take (log) what is pending, compaction requests included: no compactor any more."""
        self._compact = None
        self.take(0)

    def on_compact(self, trigger: Callable[[], None]) -> None:
        self._compact = trigger

    def is_set(self) -> bool:
        """A stop signal came (takes the pending ones first, without waiting)."""
        self.take(0)
        return self.received is not None

    def wait(self) -> None:
        """Until a stop signal comes (SIGUSR1s are handled on the way)."""
        while self.received is None:
            self.take(None)

    def take(self, timeout: float | None) -> None:
        """Handle every pending signal, waiting up to ``timeout`` s (None: for ever) for one."""
        if timeout is None:
            info: signal.struct_siginfo | None = signal.sigwaitinfo(HANDLED_SIGNALS)
        else:
            info = signal.sigtimedwait(HANDLED_SIGNALS, timeout)
        while info is not None:
            self._handle(info.si_signo, info.si_pid)
            info = signal.sigtimedwait(HANDLED_SIGNALS, 0)

    def _handle(self, signo: int, pid: int) -> None:
        name = signal.Signals(signo).name
        if signo == signal.SIGUSR1:
            if self._compact is None:
                log.debug("SIGUSR1 from pid %d: no compactor (yet/any more), ignored", pid)
            else:
                log.debug("SIGUSR1 from pid %d: compaction requested", pid)
                self._compact()
        elif self.received is None:
            self.received = signo
            log.info("%s from pid %d", name, pid)
        else:
            log.info("%s from pid %d: already stopping, ignored", name, pid)


def _swapoff_progress(dev: str) -> swapmod.Progress:
    def report(kib: int) -> None:
        log.info("swapoff %s: %d KiB (%d pages) still out on it", dev, kib, kib // 4)

    return report


def run(cfg: Config) -> int:
    """Run until SIGTERM/SIGINT. Raises DaemonError/MountError/SwapError on start-up failure.

    A stop signal during start-up ends it at the next step (see ``Signals``): it unwinds and
    returns 0 like a stop after ready. The handled signals stay blocked when it returns: the
    process exits next, and a late Ctrl-C must not turn a clean stop into KeyboardInterrupt or
    a SIGTERM into exit 143."""
    signals = Signals()
    signals.block()  # before any thread starts: every thread inherits the mask
    try:
        preflight(cfg)
        with contextlib.ExitStack() as stack:
            stack.enter_context(instance_lock(cfg.mountpoint))
            check_listen(*cfg.metrics_addr)  # after the lock: a 2nd instance is named as such
            lock_memory()
            protect_from_oom()
            set_io_flusher()
            if not signals.is_set():
                _serve(cfg, stack, signals)
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
