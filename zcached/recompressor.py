"""The recompressor: a background thread that stores idle pages again with zstd.

Owns: the policy of recompression (the clock of page ages, how often the page table is
scanned, the pacing by a CPU budget, when to sample pages and train a zstd dictionary) and the
counters the metrics exporter reads.
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

The dictionary.  With ``dictionary`` on and no dictionary in the store yet, the thread starts
the core's sample reservoir (``samples`` pages, one in 8 x ``sample_stride`` of the pages
writers store: samples of the pages as they arrive) and trains a dictionary of ``dict_bytes``
on it (libzstd's ZDICT, in C, outside the GIL) once it is full, or, from the first pass that
may find idle pages on, before a pass once it holds enough samples (pages recompressed without
a dictionary stay so until rewritten, so a poorer dictionary beats none).  Every pass then
uses the current one.  The ratio that the first pass of at least ``min_pages`` pages gets with
a dictionary (bytes after / bytes before) is its baseline; a later pass more than ``drift``
worse starts the reservoir again, and a new dictionary is trained when it is full.  The old
one is freed by the core when no page uses it.  Measured in-process on the benchmarks' 256 MiB
of heap pages: 1024 samples do as well as 4096, and 64 KiB of dictionary take the pool of
zstd-3 from 0.62x to 0.55x of lz4's (32 KiB: 0.56x); other ZDICT parameters gained nothing.

Counters (written by the thread only, read without a lock): ``runs`` (finished passes),
``seconds`` (their wall time, pacing and training included), ``cpu_seconds`` (the same),
``trainings``, and the sums of the core's reports (scanned, recompressed, kept, raced, failed,
bytes_before, bytes_after).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from zcached.background import BackgroundThread

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

    def raw_stats(self) -> dict[str, int]: ...

    def sample(self, pages: int, stride: int = 1) -> None: ...

    def train_dictionary(self, dict_bytes: int, level: int) -> int | None: ...

    def recompress(
        self, start: int, max_scan: int, idle_ticks: int, level: int
    ) -> tuple[int, dict[str, int]]: ...


@dataclass(frozen=True)
class RecompressPolicy:
    idle: float = 600.0  # seconds untouched before a page is recompressed
    level: int = 3  # zstd level
    cpu_budget: float = 0.1  # fraction of one core
    step_pages: int = 4096  # page table entries per step
    dictionary: bool = True
    dict_bytes: int = 64 << 10
    samples: int = 1024  # pages in the reservoir
    sample_stride: int = 2  # one in 8 x this of the pages written is sampled
    drift: float = 0.10  # retrain when a pass gets this much worse than the baseline
    min_pages: int = 256  # pages a pass must recompress for its ratio to count

    def __post_init__(self) -> None:
        if self.idle <= 0:
            raise ValueError("recompress idle must be > 0")
        if not 0 < self.cpu_budget <= 1:
            raise ValueError("recompress cpu_budget must be in (0, 1]")
        if self.step_pages < 1:
            raise ValueError("recompress step_pages must be >= 1")
        if not 1024 <= self.dict_bytes <= 64 << 10:
            raise ValueError("recompress dict_bytes must be in 1 KiB .. 64 KiB")

    @property
    def tick_seconds(self) -> float:
        return self.idle / IDLE_TICKS


class Recompressor(BackgroundThread):
    """Runs the policy on ``store`` in a daemon thread between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        policy: RecompressPolicy,
        *,
        thread_init: Callable[[], None] | None = None,
        compact: Callable[[], None] | None = None,
    ) -> None:
        super().__init__("zcached-recompress", thread_init)
        self.store = store
        self._compact = compact
        self.policy = policy
        self.runs = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.trainings = 0
        self.baseline: float | None = None  # the current dictionary's first ratio
        self.totals = dict.fromkeys(REPORT_KEYS, 0)

    def _run(self) -> None:
        if self.policy.dictionary and not self.store.raw_stats()["dict_current"]:
            self._start_sampling()
        next_tick = time.monotonic() + self.policy.tick_seconds
        while not self._stop.wait(max(0.0, next_tick - time.monotonic())):
            self.store.tick()
            next_tick += self.policy.tick_seconds
            next_tick = max(next_tick, time.monotonic())
            try:
                self.run_pass()
            except Exception:  # the data path never depends on this thread: log, go on
                log.exception("recompression pass failed")

    def _start_sampling(self) -> None:
        p = self.policy
        self.store.sample(p.samples, p.sample_stride)
        log.info("recompress: sampling %d pages for a dictionary", p.samples)

    def _pace(self, cpu: float) -> None:
        """Sleep so that ``cpu`` seconds of work stay within the budget."""
        b = self.policy.cpu_budget
        if cpu > 0 and b < 1:
            self._stop.wait(cpu * (1 - b) / b)

    def maybe_train(self, *, before_pass: bool) -> None:
        """Train a dictionary when the reservoir is full (or, before a pass, holds any); the
        caller paces the CPU it took."""
        if not self.policy.dictionary:
            return
        st = self.store.raw_stats()
        if not st["sample_cap"] or (st["samples"] < st["sample_cap"] and not before_pass):
            return
        c0 = time.thread_time()
        try:
            new = self.store.train_dictionary(self.policy.dict_bytes, self.policy.level)
        except OSError as e:  # no slot free, nothing to learn: keep the current one
            log.warning("recompress: no new dictionary: %s", e.strerror)
            self.store.sample(0)
            new = None
        spent = time.thread_time() - c0  # in the pass's CPU (run_pass measures around it)
        if new is not None:
            self.trainings += 1
            self.baseline = None
            log.info("recompress: dictionary %d trained on %d pages (%.2f s CPU)",
                     new, st["samples"], spent)  # fmt: skip

    def run_pass(self) -> None:
        """One scan of the page table, paced; returns early when stopped."""
        p = self.policy
        t0, c0 = time.monotonic(), time.thread_time()
        # Pages written before the first tick may be idle from this pass on: from then, a
        # partial reservoir is trained on rather than let pages go cold without a dictionary.
        self.maybe_train(before_pass=self.runs >= IDLE_TICKS - 1)
        self._pace(time.thread_time() - c0)
        cursor = 0
        done = dict.fromkeys(REPORT_KEYS, 0)
        while cursor < self.store.npages and not self._stop.is_set():
            s0 = time.thread_time()
            cursor, report = self.store.recompress(cursor, p.step_pages, IDLE_TICKS, p.level)
            for k in REPORT_KEYS:
                done[k] += report[k]
            self.maybe_train(before_pass=False)
            self._pace(time.thread_time() - s0)  # all of the step's CPU, its stats reads too
        for k in REPORT_KEYS:
            self.totals[k] += done[k]
        self.runs += 1
        self.seconds += time.monotonic() - t0
        self.cpu_seconds += time.thread_time() - c0
        self._watch_drift(done)
        if done["recompressed"] and self._compact is not None:
            self._compact()  # its frees left a partial vpage in most classes: pack them

    def _watch_drift(self, done: dict[str, int]) -> None:
        """Baseline the current dictionary's ratio; sample again when it has drifted."""
        p = self.policy
        st = self.store.raw_stats()
        if not p.dictionary or st["sample_cap"] or not st["dict_current"]:
            return
        if done["recompressed"] < p.min_pages or not done["bytes_before"]:
            return
        ratio = done["bytes_after"] / done["bytes_before"]
        if self.baseline is None:
            self.baseline = ratio
        elif ratio > self.baseline * (1 + p.drift):
            log.info("recompress: ratio %.3f against %.3f at training: a new dictionary",
                     ratio, self.baseline)  # fmt: skip
            self._start_sampling()
