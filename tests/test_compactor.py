"""The background compactor: policy, thresholds, on-demand runs, and I/O running beside it."""

from __future__ import annotations

import random
import threading
import time

import pytest

from zcached.compactor import CompactionPolicy, Compactor
from zcached.xcfmalloc import MAX_OBJECT, XcfMalloc


def sparse_pool(seed: int = 3, n: int = 4000) -> tuple[XcfMalloc, dict[int, bytes]]:
    rnd = random.Random(seed)
    pool = XcfMalloc()
    data: dict[int, bytes] = {}
    for _ in range(n):
        blob = rnd.randbytes(min(MAX_OBJECT, max(1, int(rnd.lognormvariate(7.0, 0.6)))))
        data[pool.store(blob)] = blob
    for h in rnd.sample(sorted(data), n // 2):
        pool.free(h)
        del data[h]
    return pool, data


def wait_for(cond: object, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"min_ratio": 0.9},
        {"min_wasted_bytes": -1},
        {"cpu_budget": 0},
        {"cpu_budget": 1.5},
        {"step_moves": 0},
    ],
)
def test_bad_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CompactionPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_due() -> None:
    policy = CompactionPolicy(min_ratio=1.2, min_wasted_bytes=1000)
    assert policy.due(pool_bytes=3000, requested_bytes=2000)
    assert not policy.due(pool_bytes=2100, requested_bytes=2000)  # ratio too low
    assert not policy.due(pool_bytes=1300, requested_bytes=1000)  # too little wasted


def test_thread_compacts_when_fragmentation_passes_threshold() -> None:
    pool, data = sparse_pool()
    before = pool.pool_bytes
    assert before > 1.3 * pool.requested_bytes
    comp = Compactor(pool, CompactionPolicy(interval=0.05, min_ratio=1.2, min_wasted_bytes=0))
    comp.start()
    try:
        assert wait_for(lambda: comp.runs > 0 and pool.pool_bytes < 1.2 * pool.requested_bytes)
    finally:
        comp.stop()
    assert comp.objects_moved > 0 and comp.seconds > 0
    assert pool.stats().pages_compacted > 0
    pool.check()
    for h, blob in data.items():
        assert pool.read(h) == blob


def test_thread_leaves_a_tidy_pool_alone() -> None:
    pool, _ = sparse_pool()
    comp = Compactor(pool, CompactionPolicy(interval=0.02, min_wasted_bytes=1 << 40))
    comp.start()
    time.sleep(0.3)
    comp.stop()
    assert comp.runs == 0 and comp.objects_moved == 0


def test_trigger_runs_whatever_the_thresholds() -> None:
    pool, data = sparse_pool()
    comp = Compactor(pool, CompactionPolicy(interval=3600, min_wasted_bytes=1 << 40))
    comp.start()
    try:
        comp.trigger()
        assert comp.wait_idle(timeout=60)
        assert comp.runs == 1 and comp.objects_moved > 0
    finally:
        comp.stop()
    for h, blob in data.items():
        assert pool.read(h) == blob


def test_io_beside_a_busy_compactor() -> None:
    pool, data = sparse_pool(n=2000)
    lock = threading.Lock()
    comp = Compactor(
        pool, CompactionPolicy(interval=0.001, min_ratio=1.0, min_wasted_bytes=0, cpu_budget=1)
    )
    errors: list[str] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for i in range(2500):
            with lock:
                victim = rnd.choice(list(data)) if data and rnd.random() < 0.5 else None
                blob = data.pop(victim) if victim is not None else None
            if victim is not None:
                if pool.read(victim) != blob:
                    errors.append(f"object {victim:#x} changed under compaction")
                pool.free(victim)
            else:
                new = random.Random(seed * 7919 + i).randbytes(rnd.randint(1, MAX_OBJECT))
                h = pool.store(new)
                with lock:
                    data[h] = new

    comp.start()
    try:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        comp.stop()
    assert not errors
    assert comp.runs > 0
    pool.check()
    for h, blob in data.items():
        assert pool.read(h) == blob
