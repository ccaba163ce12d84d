"""The recompressor: a background thread that stores idle pages again with zstd.

Owns: the policy of recompression (the clock of page ages, how often the page table is
scanned, the pacing by a CPU budget) and the counters the metrics exporter reads.
Must not: touch pages itself (the C core's zc_store_recompress decodes, re-encodes and
publishes, outside the GIL, one stripe lock at a time; see csrc/store.c, PAGE AGE and S5),
or hold any lock between its steps.

The clock.  Every page carries the tick of its last read or write (7 bits, in the arena).  The
thread advances the store's clock every ``idle / IDLE_TICKS`` seconds, so a page untouched for
IDLE_TICKS ticks has been idle for at least ``idle * (IDLE_TICKS - 1) / IDLE_TICKS`` seconds
and at most ``idle``: no clock is read per request.

A pass.  After every tick the thread scans the whole page table once, in steps of
``step_pages`` entries; every idle page not yet in the cold format is recompressed (zstd at
``level``) when that is smaller, else marked tried and left until it is touched again.  After a
step of ``t`` CPU seconds (the thread's own) it sleeps ``t * (1 - cpu_budget) / cpu_budget``,
so it uses at most ``cpu_budget`` of one core.  A pass longer than a tick just goes on; the
next starts at the first tick after it ended.

Counters (written by the thread only, read without a lock): ``runs`` (finished passes),
``seconds`` (their wall time, pacing included), ``cpu_seconds``, and the sums of the core's
reports (scanned, recompressed, kept, raced, failed, bytes_before, bytes_after).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("zcached.recompressor")

IDLE_TICKS = 4  # a page is idle after this many ticks untouched (the core takes 1..64)
REPORT_KEYS = (
    "scanned",
    "candidates",
    "recompressed",
    "kept",
    "raced",
    "failed",
    "bytes_before",
    "bytes_after",
)


class Store(Protocol):
    """What the recompressor needs of a store: zcached.core.CoreStore."""

    @property
    def npages(self) -> int: ...

    def tick(self) -> None: ...

    def recompress(
        self, start: int, max_scan: int, idle_ticks: int, level: int
    ) -> tuple[int, dict[str, int]]: ...


@dataclass(frozen=True)
class RecompressPolicy:
    idle: float = 600.0  # seconds untouched before a page is recompressed
    level: int = 3  # zstd level
    cpu_budget: float = 0.1  # fraction of one core
    step_pages: int = 4096  # page table entries per step

    def __post_init__(self) -> None:
        if self.idle <= 0:
            raise ValueError("recompress idle must be > 0")
        if not 0 < self.cpu_budget <= 1:
            raise ValueError("recompress cpu_budget must be in (0, 1]")
        if self.step_pages < 1:
            raise ValueError("recompress step_pages must be >= 1")

    @property
    def tick_seconds(self) -> float:
        return self.idle / IDLE_TICKS


class Recompressor:
    """Runs the policy on ``store`` in a daemon thread between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        policy: RecompressPolicy,
        *,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.runs = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.totals = dict.fromkeys(REPORT_KEYS, 0)
        self._thread_init = thread_init
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zcached-recompress", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        next_tick = time.monotonic() + self.policy.tick_seconds
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            self.store.tick()
            next_tick += self.policy.tick_seconds
            next_tick = max(next_tick, time.monotonic())
            try:
                self.run_pass()
            except Exception:  # the data path never depends on this thread: log, go on
                log.exception("recompression pass failed")

    def run_pass(self) -> None:
        """One scan of the page table, paced; returns early when stopped."""
        p = self.policy
        t0, c0 = time.monotonic(), time.thread_time()
        cursor = 0
        while cursor < self.store.npages and not self._stop.is_set():
            s0 = time.thread_time()
            cursor, report = self.store.recompress(cursor, p.step_pages, IDLE_TICKS, p.level)
            for k in REPORT_KEYS:
                self.totals[k] += report[k]
            spent = time.thread_time() - s0
            if spent > 0 and p.cpu_budget < 1:
                self._stop.wait(spent * (1 - p.cpu_budget) / p.cpu_budget)
        self.runs += 1
        self.seconds += time.monotonic() - t0
        self.cpu_seconds += time.thread_time() - c0
