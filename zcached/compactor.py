"""The compactor: a background thread that gives fragmented pool memory back to the OS.

Owns: the policy of when to compact (fragmentation thresholds, on-demand requests), the pacing
(a CPU budget), and the counters the metrics exporter reads (runs, time spent, objects moved).
Must not: move objects itself (xcfmalloc.XcfMalloc.compact does, one class lock at a time, in
batches), touch the page table, or hold any lock between its steps.

Swap frees pages in random order, so vpages go sparse (kernel zsmalloc holds ~2x the compressed
bytes after a random half of its pages is discarded, until it compacts).  Every ``interval``
seconds the thread compares the pool with the bytes it holds:

    wasted = pool_bytes - requested_bytes
    compact when wasted >= min_wasted_bytes and pool_bytes >= min_ratio * requested_bytes

or at once when :meth:`Compactor.trigger` is called (``zcached compact``, SIGUSR1).

That threshold has hysteresis on purpose (a busy pool is not compacted for every few frees), so a
burst of frees that stops just short of it, or goes on after a run began, can leave up to
``min_ratio`` of waste for good.  Hence the idle tidy-up: once the bytes in use have changed by
at most ``idle_min_bytes`` over each of the last ``idle_checks`` intervals (swap is quiet), and a
complete compaction would give back at least ``idle_reclaim_bytes`` (XcfMalloc.reclaimable_bytes:
pages beyond a packed layout, so not the class rounding that no move can reclaim), the thread
runs once more, and not again until the bytes in use change.  A quiet pool is cheap to pack
(the moves are few and nothing competes), so the tidy-up takes even 64 KiB: after
recompression, whose frees leave a partial vpage in most of the 256 classes, that was 1 MB of
the 45 MB pool for 256 MiB of heap pages.  Measured: with the daemon's
defaults, 256 MiB of heap pages and a random half discarded ended at 0.96x-1.02x zram's
mem_used_total after its compact, depending on where the discards stopped relative to a check,
before the tidy-up; see bench/compact_bench.py for the figures with it.

A run calls
``compact(max_moves=step_moves)`` until a step moves fewer than ``step_moves`` objects; after
each step of ``t`` CPU seconds (the thread's own) it sleeps ``t * (1 - cpu_budget) / cpu_budget``,
so it uses at most ``cpu_budget`` of one core and the I/O threads get the class locks (and the
GIL) between steps.

Counters (read without a lock by the metrics exporter; each is written by the compactor thread
only): ``runs``, ``seconds`` (wall time of finished runs, pacing sleeps included),
``cpu_seconds`` (the compactor thread's CPU in finished runs), ``objects_moved``, and
``last_run`` / ``recent_runs`` (:class:`RunRecord`, wall-clock times for benchmarks that line a run
up with an I/O log).  Pages given back by moves are the allocator's ``pages_compacted``.

Measured by bench/compact_bench.py (256 MiB of heap pages, a random half discarded, the daemon's
default policy): see the "compact" entry of bench/results/latest.json.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class _PoolStats(Protocol):
    @property
    def pages_compacted(self) -> int: ...


class Pool(Protocol):
    """What the compactor needs of an allocator: zcached.xcfmalloc.XcfMalloc (the model) or
    zcached.core.CorePool (the C core, which moves objects without the GIL)."""

    @property
    def pool_bytes(self) -> int: ...

    @property
    def requested_bytes(self) -> int: ...

    def compact(self, max_moves: int | None = None) -> int: ...

    def reclaimable_bytes(self) -> int: ...

    def stats(self) -> _PoolStats: ...


log = logging.getLogger("zcached.compactor")


@dataclass(frozen=True)
class RunRecord:
    """One finished compaction run (``started``/``finished`` are time.time() values)."""

    started: float
    finished: float
    cpu_seconds: float
    objects_moved: int
    pool_bytes_before: int
    pool_bytes_after: int


@dataclass(frozen=True)
class CompactionPolicy:
    interval: float = 5.0  # seconds between fragmentation checks
    min_ratio: float = 1.10  # compact when pool_bytes >= min_ratio * requested_bytes ...
    min_wasted_bytes: int = 4 << 20  # ... and at least this much is wasted
    cpu_budget: float = 0.25  # fraction of one core a run may use
    step_moves: int = 256  # objects moved per step
    idle_checks: int = 2  # quiet checks in a row before an idle tidy-up (0 = never tidy up)
    idle_min_bytes: int = 1 << 20  # most change in bytes in use over a quiet interval
    idle_reclaim_bytes: int = 64 << 10  # least a tidy-up must give back

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("compaction interval must be > 0")
        if self.min_ratio < 1.0:
            raise ValueError("compaction min_ratio must be >= 1.0")
        if self.min_wasted_bytes < 0:
            raise ValueError("compaction min_wasted_bytes must be >= 0")
        if not 0 < self.cpu_budget <= 1:
            raise ValueError("compaction cpu_budget must be in (0, 1]")
        if self.step_moves < 1:
            raise ValueError("compaction step_moves must be >= 1")
        if self.idle_checks < 0:
            raise ValueError("compaction idle_checks must be >= 0")
        if self.idle_min_bytes < 4096:
            raise ValueError("compaction idle_min_bytes must be >= 4096")
        if self.idle_reclaim_bytes < 4096:
            raise ValueError("compaction idle_reclaim_bytes must be >= 4096")

    def due(self, pool_bytes: int, requested_bytes: int) -> bool:
        wasted = pool_bytes - requested_bytes
        return wasted >= self.min_wasted_bytes and pool_bytes >= self.min_ratio * requested_bytes


class Compactor:
    """Runs compaction of one pool in a daemon thread; start(), trigger(), stop()."""

    def __init__(
        self,
        pool: Pool,
        policy: CompactionPolicy | None = None,
        *,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.policy = policy or CompactionPolicy()
        self._thread_init = thread_init
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._requested = False
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        # counters, read by the metrics exporter at scrape time
        self.runs = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.objects_moved = 0
        self.last_run_pages_freed = 0
        self.last_run: RunRecord | None = None
        self.recent_runs: deque[RunRecord] = deque(maxlen=32)
        self.idle_runs = 0  # runs started by the idle tidy-up (counted in runs too)
        self._quiet = 0  # checks in a row with the bytes in use (nearly) unchanged
        self._last_requested = -1
        self._tidied_at = -1  # requested_bytes after the last idle tidy-up
        self._running = threading.Event()

    @property
    def pages_compacted(self) -> int:
        return self.pool.stats().pages_compacted

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name="zcached-compactor", daemon=True
            )
            self._thread.start()

    @property
    def running(self) -> bool:
        """A run is under way (in the thread or in :meth:`run_once`)."""
        return self._running.is_set()

    def stop(self) -> None:
        """Stop the thread, ending a run between two steps; start() may be called again."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop.clear()
        self._wake.clear()
        self._requested = False
        self._idle.set()

    def trigger(self) -> None:
        """Ask for a run now, whatever the thresholds say (safe from a signal handler)."""
        self._requested = True
        self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no run is pending or under way (for tests and benchmarks)."""
        return self._idle.wait(timeout)

    def run_once(self) -> int:
        """One paced compaction run in the calling thread; returns objects moved."""
        self._running.set()
        try:
            return self._run()
        finally:
            self._running.clear()

    def _run(self) -> int:
        policy = self.policy
        started, wall0, cpu0 = time.time(), time.monotonic(), time.thread_time()
        pool_before = self.pool.pool_bytes
        moved = 0
        while not self._stop.is_set():
            t0 = time.thread_time()
            step = self.pool.compact(max_moves=policy.step_moves)
            moved += step
            if step < policy.step_moves:
                break
            spent = time.thread_time() - t0
            if policy.cpu_budget < 1 and self._stop.wait(
                spent * (1 - policy.cpu_budget) / policy.cpu_budget
            ):
                break
        elapsed, cpu = time.monotonic() - wall0, time.thread_time() - cpu0
        pool_after = self.pool.pool_bytes
        self.last_run = RunRecord(started, time.time(), cpu, moved, pool_before, pool_after)
        self.recent_runs.append(self.last_run)
        self.runs += 1
        self.seconds += elapsed
        self.cpu_seconds += cpu
        self.objects_moved += moved
        self.last_run_pages_freed = max(0, (pool_before - pool_after) // 4096)
        log.info(
            "compaction: moved %d objects, pool %d -> %d bytes in %.2fs (%.2fs CPU)",
            moved,
            pool_before,
            pool_after,
            elapsed,
            cpu,
        )
        return moved

    def pending(self) -> bool:
        """Whether the thread would run at a check now (the thresholds, or a tidy-up once
        quiet); for benchmarks that wait for it to be done."""
        pool_bytes, requested = self.pool.pool_bytes, self.pool.requested_bytes
        return self._requested or self.policy.due(pool_bytes, requested) or self._untidy(requested)

    def _untidy(self, requested: int) -> bool:
        """A tidy-up would give back enough, and none has run at these bytes in use."""
        policy = self.policy
        return (
            policy.idle_checks > 0
            and requested != self._tidied_at
            and self.pool.reclaimable_bytes() >= policy.idle_reclaim_bytes
        )

    def _check(self) -> str | None:
        """Why to run now ("requested", "threshold", "idle") or None; counts quiet checks."""
        policy = self.policy
        pool_bytes, requested = self.pool.pool_bytes, self.pool.requested_bytes
        quiet = abs(requested - self._last_requested) <= policy.idle_min_bytes
        self._quiet = self._quiet + 1 if quiet else 0
        self._last_requested = requested
        asked, self._requested = self._requested, False
        if asked:
            return "requested"
        if policy.due(pool_bytes, requested):
            return "threshold"
        if policy.idle_checks and self._quiet >= policy.idle_checks and self._untidy(requested):
            return "idle"
        return None

    def _loop(self) -> None:
        if self._thread_init is not None:
            self._thread_init()
        while not self._stop.is_set():
            self._wake.wait(self.policy.interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            why = self._check()
            if why is not None:
                self._idle.clear()
                try:
                    self.run_once()
                except Exception:  # a bug here must not take the I/O path down with it
                    log.exception("compaction run failed")
                if why == "idle":
                    self.idle_runs += 1
                    self._tidied_at = self.pool.requested_bytes
            if not self._requested:
                self._idle.set()
