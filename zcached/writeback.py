"""The writeback tier's Python side: its backing file, and the thread that spills cold pages.

Owns: opening (creating 0600, preallocating) and checking the backing file or block device
before anything is mounted, so a bad one is a one-line start-up error; the policy of
background writeback (the watermarks, the byte budget, when to compact after it), the log line
when the backing file is full, and the counters the metrics exporter reads.
Must not: move pages itself (the C core's zc_store_writeback copies objects out, writes one
O_DIRECT segment and republishes the pages, outside the GIL; see csrc/store.c, WRITEBACK), or
hold any lock between its steps.

The policy.  Every ``interval`` seconds, or at once while it is behind, the thread reads the
pool's size.  Above ``high_watermark`` x ``mem_limit`` it writes back segments (256 KiB of
compressed objects each, the pages idle longest first: those untouched for a recompressor tick,
then any, from where the last batch stopped) until the pool is below ``high_watermark - 0.05``
of the limit, at most ``rate`` bytes of objects per second, then compacts the pool so that the
freed objects become freed pages.  Outstanding I/O is one segment write at a time.  A write
that still finds the pool at its limit does one batch itself (direct reclaim, csrc/store.c) and
is not counted against the budget: it is the fallback that keeps a write from failing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from zcached.background import BackgroundThread

log = logging.getLogger("zcached.writeback")

SEGMENT = 256 << 10  # csrc/backing.h ZC_SEG_BYTES
MIN_SIZE = 4096 + 2 * SEGMENT  # csrc/backing.h ZC_BK_MIN_BYTES
HYSTERESIS = 0.05  # the pool goes this far (of the limit) below the high watermark
COMPACT_MOVES = 4096  # object moves per compaction after a round of writeback


class BackingError(Exception):
    """The backing file cannot be used: one line naming it and why."""


def open_backing(path: str, size: int) -> tuple[int, int]:
    """(descriptor, bytes) of the backing file or block device at ``path``: a file is made
    (0600) if missing and preallocated to ``size`` bytes, so that writeback never allocates
    blocks under memory pressure; a block device is used whole, or its first ``size`` bytes.
    Opened O_DIRECT.  BackingError if it cannot be."""
    flags = os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BackingError(f"writeback.path {path}: {e.strerror}") from None
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackingError(f"writeback.path {path}: not a regular file or a block device")
    try:
        fd = os.open(path, flags | (os.O_CREAT if st is None else 0), 0o600)
    except OSError as e:
        why = "no O_DIRECT on its filesystem" if e.errno == errno.EINVAL else e.strerror
        raise BackingError(f"writeback.path {path}: {why}") from None
    try:
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            have = os.lseek(fd, 0, os.SEEK_END)
            size = min(size, have) if size else have
        else:
            if not size:
                raise BackingError(f"writeback.path {path}: a file needs writeback.size")
            os.posix_fallocate(fd, 0, size)
        if size < MIN_SIZE:
            raise BackingError(
                f"writeback.path {path}: {size} bytes is less than the {MIN_SIZE} it needs"
            )
    except OSError as e:
        os.close(fd)
        raise BackingError(f"writeback.path {path}: {e.strerror}") from None
    except BackingError:
        os.close(fd)
        raise
    return fd, size


class Store(Protocol):
    """What the writeback thread needs of a store: zcached.core.CoreStore."""

    def raw_stats(self) -> dict[str, int]: ...

    def writeback(self, max_bytes: int, idle_ticks: int) -> dict[str, int]: ...


@dataclass(frozen=True)
class WritebackPolicy:
    mem_limit: int  # the pool's limit (bytes); writeback needs one
    high_watermark: float = 0.9  # fraction of mem_limit at which spilling starts
    rate: int = 64 << 20  # bytes of objects per second at most (background writeback)
    interval: float = 0.1  # seconds between checks of the pool

    def __post_init__(self) -> None:
        if self.mem_limit <= 0:
            raise ValueError("writeback needs a mem_limit")
        if not 0.1 <= self.high_watermark <= 1.0:
            raise ValueError("writeback high_watermark must be in [0.1, 1]")
        if self.rate < SEGMENT:
            raise ValueError(f"writeback rate must be at least {SEGMENT} bytes per second")

    @property
    def high_bytes(self) -> int:
        return int(self.mem_limit * self.high_watermark)

    @property
    def low_bytes(self) -> int:
        return int(self.mem_limit * max(0.05, self.high_watermark - HYSTERESIS))


class Writeback(BackgroundThread):
    """Runs the policy on ``store`` in a daemon thread between :meth:`start` and :meth:`stop`.

    Counters (written by the thread only): ``rounds`` (times it found the pool above the high
    watermark), ``pages``, ``bytes`` (written back by it), ``full`` (times it found no free
    segment), ``errors`` (failed segment writes)."""

    def __init__(
        self,
        store: Store,
        policy: WritebackPolicy,
        *,
        compact: Callable[[int], object] | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        super().__init__("zcached-writeback", thread_init)
        self.store = store
        self.policy = policy
        self._compact = compact
        self.rounds = self.pages = self.bytes = self.full = self.errors = 0
        self._full_logged = False

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval):
            try:
                self.run_round()
            except Exception:  # the data path never depends on this thread: log, go on
                log.exception("writeback round failed")

    def _pool(self) -> int:
        return self.store.raw_stats()["mem_used_total"]

    def run_round(self) -> int:
        """Write back until the pool is below the low watermark, within the byte budget;
        returns the pages written back."""
        p = self.policy
        if self._pool() <= p.high_bytes:
            return 0
        self.rounds += 1
        t0, spent, done = time.monotonic(), 0, 0
        while self._pool() > p.low_bytes and not self._stop.is_set():
            allowed = p.rate * (time.monotonic() - t0 + p.interval) - spent
            if allowed < SEGMENT:  # over budget: wait for it to refill
                self._stop.wait((SEGMENT - allowed) / p.rate)
                continue
            report = self._batch()
            if report is None or not report["pages"]:
                break
            spent += report["bytes"]
            done += report["pages"]
            if self._compact is not None:
                self._compact(COMPACT_MOVES)
        self.pages += done
        self.bytes += spent
        return done

    def _batch(self) -> dict[str, int] | None:
        """One segment: idle pages first, then any; None when the backing file is full or a
        write failed (logged)."""
        try:
            report = self.store.writeback(SEGMENT, 1)
            if not report["pages"]:
                report = self.store.writeback(SEGMENT, 0)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                self.full += 1
                if not self._full_logged:
                    log.error(
                        "writeback: the backing file is full: writes at the memory limit fail"
                        " (ENOSPC) until pages are discarded or rewritten"
                    )
                    self._full_logged = True
            else:
                self.errors += 1
                log.error("writeback: %s (the pages stay in memory)", e.strerror)
            return None
        if self._full_logged:
            log.info("writeback: the backing file has room again")
            self._full_logged = False
        return report
