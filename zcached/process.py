"""process: what every zcached process does to itself: memory locking, IO_FLUSHER, OOM
exemption, and signals taken synchronously.

Owns: mlockall / PR_SET_IO_FLUSHER / oom_score_adj (a process on the swap path must not itself
be swapped out, throttled as a writer, or OOM-killed) and :class:`Signals`.  Used by the keeper
(daemon.py) and the server (server.py) alike; light on imports, because a server's start-up
is part of every recovery.
Must not: import the rest of zcached (the server imports this before it attaches the store).
Process-safety failures only warn (documented): a process without mlock still works, just less
safely under memory pressure.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("zcached")

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_IO_FLUSHER = 57
# 256 KiB stacks overflowed (segfault) under 1 MiB FUSE writes; MCL_ONFAULT locks only the
# stack pages a thread really touches, so 1 MiB costs little.
THREAD_STACK = 1 << 20


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD = 128 << 10


def lock_memory() -> bool:
    threading.stack_size(THREAD_STACK)  # before any thread starts: locked stacks stay small
    # Large buffers (the dictionary reservoir, zstd's trainer) must go back to the kernel when
    # freed: malloc would otherwise raise its mmap threshold after the first such free and
    # serve them from the heap, whose free pages stay resident under mlockall (MADV_DONTNEED
    # refuses locked pages).  Setting the threshold fixes it at 128 KiB for good.
    if _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed: freed buffers may stay resident")
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


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# SIGUSR1: compaction request; SIGHUP: upgrade (the keeper; a server ignores it)
HANDLED_SIGNALS = STOP_SIGNALS | {signal.SIGUSR1, signal.SIGHUP}


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
        self._upgrade: Callable[[], None] | None = None

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
        self._upgrade = None
        self.take(0)

    def on_compact(self, trigger: Callable[[], None]) -> None:
        self._compact = trigger

    def on_upgrade(self, upgrade: Callable[[], None]) -> None:
        self._upgrade = upgrade

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
        if signo == signal.SIGHUP:
            if self._upgrade is None or self.received is not None:
                log.info("SIGHUP from pid %d: nothing to upgrade now, ignored", pid)
            else:
                log.info("SIGHUP from pid %d: upgrade", pid)
                self._upgrade()
        elif signo == signal.SIGUSR1:
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
