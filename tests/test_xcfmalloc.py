"""xcfmalloc: unit tests, a threaded test, and a hypothesis state machine against a dict model."""

from __future__ import annotations

import ctypes
import random
import threading

import psutil
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from zcached.xcfmalloc import (
    MAX_OBJECT,
    MAX_VPAGE_PAGES,
    PAGE_SIZE,
    PoolFullError,
    XcfMalloc,
    class_of,
    class_table,
)

_libc = ctypes.CDLL(None, use_errno=True)


def resident(address: int) -> bool:
    """Whether the kernel holds the 4K page at ``address`` in RAM (mincore(2))."""
    vec = ctypes.create_string_buffer(1)
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(PAGE_SIZE), vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return bool(vec.raw[0] & 1)


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


# ---- the class table ----------------------------------------------------------------------


def test_class_table_covers_every_size_with_little_waste() -> None:
    rows = class_table()
    assert rows[0][0] == 16 and rows[-1][0] == MAX_OBJECT
    for size, ppv, opv, waste in rows:
        assert 1 <= ppv <= MAX_VPAGE_PAGES
        assert opv * size <= ppv * PAGE_SIZE < (opv + 1) * size
        assert waste < 0.03
    assert sum(r[3] for r in rows) / len(rows) < 0.002
    for size in (1, 16, 17, 4095, 4096):
        assert rows[class_of(size)][0] >= size > rows[class_of(size)][0] - 16


# ---- basic API ------------------------------------------------------------------------------


def test_round_trip_every_size_including_objects_across_pages() -> None:
    pool = XcfMalloc()
    handles = {}
    for size in list(range(1, 200)) + list(range(200, MAX_OBJECT + 1, 37)) + [MAX_OBJECT]:
        for k in range(3):  # several per class, so some objects straddle a 4K boundary
            data = payload(size * 10 + k, size)
            handles[pool.store(data)] = data
    pool.check()
    straddling = 0
    for handle, data in handles.items():
        assert pool.read(handle) == data
        assert pool.size(handle) == len(data)
        straddling += len(pool.page_address(handle)) == 2
    assert straddling > 50
    assert all(0 < h < 2**32 for h in handles)


def test_alloc_then_write_and_overwrite() -> None:
    pool = XcfMalloc()
    handle = pool.alloc(100)
    pool.write(handle, b"a" * 100)
    assert pool.read(handle) == b"a" * 100
    pool.write(handle, memoryview(bytearray(b"b" * 100)))
    assert pool.read(handle) == b"b" * 100
    with pytest.raises(ValueError):
        pool.write(handle, b"short")


@pytest.mark.parametrize("size", [0, -1, MAX_OBJECT + 1])
def test_bad_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError):
        XcfMalloc().alloc(size)


def test_free_of_a_dead_handle_is_refused() -> None:
    pool = XcfMalloc()
    handle = pool.store(b"x" * 50)
    pool.free(handle)
    for bad in (handle, 0, handle + (1000 << 8)):
        with pytest.raises(ValueError):
            pool.free(bad)
        with pytest.raises(ValueError):
            pool.read(bad)
    pool.check()
    assert pool.objects == 0 and pool.pool_bytes == 0


# ---- pages go back to the OS one by one -----------------------------------------------------


def test_an_empty_page_is_freed_while_its_vpage_lives() -> None:
    pool = XcfMalloc()
    size = 1200  # class 1200: 5 pages per vpage, 17 objects
    handles = [pool.store(payload(i, size)) for i in range(17)]
    assert pool.stats().pages == 5
    addresses = {h: pool.page_address(h) for h in handles}
    second_page = addresses[handles[0]][0] + PAGE_SIZE
    on_second = [h for h in handles if second_page in addresses[h]]
    assert on_second and len(on_second) < len(handles)
    assert resident(second_page)
    for h in on_second:
        pool.free(h)
    pool.check()
    assert pool.stats().pages == 4  # the vpage lives on with 4 pages
    assert not resident(second_page)  # and the kernel really dropped the page
    for i, h in enumerate(handles):
        if h not in on_second:
            assert pool.read(h) == payload(i, size)


def test_rss_falls_when_objects_are_freed() -> None:
    proc = psutil.Process()
    pool = XcfMalloc()
    handles = [pool.store(payload(i, 3000)) for i in range(24 * 1024)]  # ~72 MiB of objects
    full = proc.memory_info().rss
    for h in handles:
        pool.free(h)
    assert pool.pool_bytes == 0
    assert full - proc.memory_info().rss > 48 * 2**20


# ---- memory limit ---------------------------------------------------------------------------


def test_pool_limit_refuses_without_harm() -> None:
    pool = XcfMalloc(max_pool_bytes=8 * PAGE_SIZE)
    stored = {}
    with pytest.raises(PoolFullError):
        for i in range(1000):
            data = payload(i, 1000)
            stored[pool.store(data)] = data
    assert pool.pool_bytes <= 8 * PAGE_SIZE
    pool.check()
    for handle, data in stored.items():
        assert pool.read(handle) == data
    pool.free(next(iter(stored)))
    pool.max_pool_bytes = None
    pool.store(b"y" * 4096)
    pool.check()


# ---- compaction -----------------------------------------------------------------------------


def test_compaction_keeps_handles_and_gives_memory_back() -> None:
    rnd = random.Random(7)
    pool = XcfMalloc()
    data = {}
    for i in range(6000):
        size = min(MAX_OBJECT, max(1, int(rnd.lognormvariate(7.0, 0.6))))
        blob = payload(i, size)
        data[pool.store(blob)] = blob
    victims = rnd.sample(sorted(data), len(data) // 2)
    for h in victims:
        pool.free(h)
        del data[h]
    before = pool.stats()
    moved = pool.compact()
    after = pool.stats()
    pool.check()
    assert moved > 0
    assert after.pool_bytes < before.pool_bytes * 0.8
    assert after.pages_compacted > 0
    assert after.pool_bytes <= after.requested_bytes * 1.15
    for handle, blob in data.items():
        assert pool.read(handle) == blob
    assert pool.compact() == 0  # nothing left worth moving


def test_compact_respects_max_moves() -> None:
    pool = XcfMalloc()
    handles = [pool.store(payload(i, 500)) for i in range(400)]
    for h in handles[::2]:
        pool.free(h)
    assert pool.compact(max_moves=5) == 5
    pool.check()


# ---- threads --------------------------------------------------------------------------------


def test_threads_and_compactor_never_mix_objects() -> None:
    pool = XcfMalloc()
    errors: list[str] = []
    stop = threading.Event()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        mine: dict[int, bytes] = {}
        for i in range(3000):
            if mine and rnd.random() < 0.45:
                h = rnd.choice(list(mine))
                if pool.read(h) != mine.pop(h):
                    errors.append(f"worker {seed}: object {h:#x} changed")
                pool.free(h)
            else:
                blob = payload(seed * 100000 + i, rnd.randint(1, MAX_OBJECT))
                mine[pool.store(blob)] = blob
        for h, blob in mine.items():
            if pool.read(h) != blob:
                errors.append(f"worker {seed}: object {h:#x} changed at the end")

    def compactor() -> None:
        while not stop.is_set():
            pool.compact(max_moves=200)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    comp = threading.Thread(target=compactor)
    comp.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    comp.join()
    assert not errors
    pool.check()


# ---- hypothesis: any sequence of operations against a dict model ----------------------------


class PoolMachine(RuleBasedStateMachine):
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.pool = XcfMalloc(max_pool_bytes=64 * PAGE_SIZE, heaps=2)
        self.model: dict[int, bytes] = {}

    @rule(hid=st.integers(0, 2))
    def switch_heap(self, hid: int) -> None:
        self.pool.bind_heap(hid)

    @rule(target=handles, size=st.integers(1, MAX_OBJECT), seed=st.integers(0, 2**16))
    def alloc(self, size: int, seed: int) -> int:
        data = payload(seed, size)
        try:
            handle = self.pool.store(data)
        except PoolFullError:
            assert self.pool.pool_bytes + 2 * PAGE_SIZE > 64 * PAGE_SIZE
            return 0
        assert handle not in self.model
        self.model[handle] = data
        return handle

    @rule(handle=consumes(handles))
    def free(self, handle: int) -> None:
        if handle in self.model:
            self.pool.free(handle)
            del self.model[handle]

    @rule(handle=handles, seed=st.integers(0, 2**16))
    def write(self, handle: int, seed: int) -> None:
        if handle in self.model:
            data = payload(seed, len(self.model[handle]))
            self.pool.write(handle, data)
            self.model[handle] = data

    @rule(handle=handles)
    def read(self, handle: int) -> None:
        if handle in self.model:
            assert self.pool.read(handle) == self.model[handle]

    @precondition(lambda self: bool(self.model))
    @rule(max_moves=st.one_of(st.none(), st.integers(1, 50)))
    def compact(self, max_moves: int | None) -> None:
        self.pool.compact(max_moves)

    @invariant()
    def consistent(self) -> None:
        self.pool.check()
        stats = self.pool.stats()
        assert stats.objects == len(self.model)
        assert stats.requested_bytes == sum(map(len, self.model.values()))
        assert stats.pool_bytes <= 64 * PAGE_SIZE

    def teardown(self) -> None:
        for handle, data in self.model.items():
            assert self.pool.read(handle) == data


PoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
TestPoolMachine = PoolMachine.TestCase


# ---- Hoard-style worker heaps ---------------------------------------------------------------


def test_bind_heap_range() -> None:
    pool = XcfMalloc(heaps=2)
    for bad in (-1, 3):
        with pytest.raises(ValueError):
            pool.bind_heap(bad)
    with pytest.raises(ValueError):
        XcfMalloc(heaps=-1)


def test_worker_heap_hands_empty_vpages_to_the_global_heap() -> None:
    pool = XcfMalloc(heaps=2)
    rnd = random.Random(11)
    pool.bind_heap(1)
    handles = [pool.store(payload(i, rnd.choice((300, 700, 1500)))) for i in range(6000)]
    for h in rnd.sample(handles, 5400):  # frees scattered over every vpage
        pool.free(h)
        handles.remove(h)
    pool.check()
    assert pool.stats().vpages_to_global > 0
    for hid, size, objects, capacity in pool.heap_usage():
        if hid == 1:  # Hoard: empty space bounded by max(f a, K S), give or take one vpage
            opv = next(r[2] for r in class_table() if r[0] == size)
            assert capacity - objects <= max(capacity / 4, 2 * opv) + opv, (size, objects)
    # a second worker reuses what the first gave back before asking the OS for pages
    pool.bind_heap(2)
    before = pool.pool_bytes
    more = [pool.store(payload(10**6 + i, 700)) for i in range(300)]
    assert pool.pool_bytes - before < 300 * 700 // 2
    pool.check()
    for h in more + handles:
        assert len(pool.read(h)) == pool.size(h)


MLOCKED_CHILD = """
import ctypes, random, sys
import psutil
libc = ctypes.CDLL(None, use_errno=True)
if libc.mlockall(1 | 2 | 4) != 0:  # MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, as the daemon does
    sys.exit("mlockall failed: errno %d" % ctypes.get_errno())
from zcached.xcfmalloc import XcfMalloc
proc, pool = psutil.Process(), XcfMalloc()
handles = [pool.store(random.randbytes(3000)) for _ in range(16384)]
full = proc.memory_info().rss
for h in handles:
    pool.free(h)
print(full - proc.memory_info().rss)
"""


def test_pages_are_given_back_under_mlockall() -> None:
    """The daemon locks its memory; plain MADV_DONTNEED fails on locked pages."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MLOCKED_CHILD], capture_output=True, text=True, check=True
    )
    assert int(out.stdout) > 40 * 2**20  # ~48 MiB of objects were stored, then all freed
