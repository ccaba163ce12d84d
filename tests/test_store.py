"""store: the page store over a real XcfMalloc pool.

Unit tests, corruption of stored bytes through the allocator's API, the memory limit, stats, a
threaded test, and a hypothesis state machine against a bytearray model of the device.
"""

from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zcached.codec import COMPRESSED, HUGE, SAME
from zcached.store import PAGE_SIZE, TABLE_BYTES_PER_PAGE, PageStore, StoreError
from zcached.xcfmalloc import XcfMalloc

MiB = 1 << 20


def text(n: int, seed: int = 0) -> bytes:
    """Compressible, never same-filled data."""
    rnd = random.Random(seed)
    words = [b"kernel ", b"swap ", b"page ", b"\x00\x00\x00\x00", b"\x10\x22\x7f\x00", b"zcached "]
    out = bytearray()
    while len(out) < n:
        out += rnd.choice(words)
    return bytes(out[:n])


def state_of(store: PageStore, page: int) -> int:
    return store._state[page]


def check_accounting(store: PageStore) -> None:
    """The counters agree with the page table and the allocator."""
    s = store.stats()
    states = bytes(store._state)
    stored = store.npages - states.count(0)
    assert s.pages_stored == stored and s.orig_data_size == stored * PAGE_SIZE
    assert s.same_pages == states.count(SAME)
    assert s.huge_pages == states.count(HUGE)
    objects = states.count(COMPRESSED) + states.count(HUGE)
    pool = store.allocator.stats()
    assert pool.objects == objects
    assert s.compr_data_size == pool.requested_bytes
    assert s.mem_used_total == pool.pool_bytes


# ---- basics ---------------------------------------------------------------------------------


def test_unwritten_reads_zeros_and_sizes() -> None:
    store = PageStore(4 * MiB)
    assert store.npages == 1024 and store.size_bytes == 4 * MiB
    assert store.read(0, 4 * MiB) == bytes(4 * MiB)
    assert store.read(12345, 7) == bytes(7)
    assert store.read(100, 0) == b""
    assert store.stats().table_bytes == 1024 * TABLE_BYTES_PER_PAGE


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
def test_aligned_write_read(compressor: str) -> None:
    store = PageStore(4 * MiB, compressor=compressor)
    data = text(64 * PAGE_SIZE, 1)
    store.write(8 * PAGE_SIZE, data)
    assert store.read(8 * PAGE_SIZE, len(data)) == data
    assert store.read(0, 8 * PAGE_SIZE) == bytes(8 * PAGE_SIZE)
    assert store.read(8 * PAGE_SIZE + 100, 5000) == data[100:5100]
    check_accounting(store)


@pytest.mark.parametrize(
    ("offset", "length"),
    [(1, 10), (4090, 12), (100, 4096), (4096 + 7, 3 * 4096), (0, 4095), (8191, 1), (5, 70000)],
)
def test_unaligned_writes_merge_with_neighbours(offset: int, length: int) -> None:
    store = PageStore(1 * MiB)
    base = text(1 * MiB, 2)
    store.write(0, base)
    model = bytearray(base)
    patch = os.urandom(length)
    store.write(offset, patch)
    model[offset : offset + length] = patch
    assert store.read(0, 1 * MiB) == model
    check_accounting(store)


def test_bytearray_and_memoryview_input() -> None:
    store = PageStore(1 * MiB)
    data = bytearray(text(3 * PAGE_SIZE, 3))
    store.write(0, data)
    store.write(3 * PAGE_SIZE, memoryview(data)[PAGE_SIZE:])
    assert store.read(0, 5 * PAGE_SIZE) == bytes(data) + bytes(data[PAGE_SIZE:])


def test_out_of_range_is_einval() -> None:
    store = PageStore(1 * MiB)
    for call in (
        lambda: store.read(-1, 10),
        lambda: store.read(MiB - 10, 11),
        lambda: store.write(MiB, b"x"),
        lambda: store.write(-4096, bytes(4096)),
        lambda: store.discard(0, MiB + 1),
        lambda: store.read(0, -1),
    ):
        with pytest.raises(StoreError) as info:
            call()
        assert info.value.errno == errno.EINVAL
    assert store.stats().pages_stored == 0


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        PageStore(1000)
    with pytest.raises(ValueError):
        PageStore(0)
    with pytest.raises(ValueError):
        PageStore(MiB, mem_limit=-1)
    with pytest.raises(ValueError):
        PageStore(MiB, compressor="brotli")


def test_overwrite_frees_the_old_object() -> None:
    store = PageStore(1 * MiB)
    store.write(0, text(PAGE_SIZE, 1))
    old = store._handle[0]
    store.write(0, text(PAGE_SIZE, 2))
    assert store._handle[0] not in (0, old)  # the new object was stored before the old went
    with pytest.raises(ValueError):
        store.allocator.size(old)  # freed
    assert store.allocator.stats().objects == 1
    assert store.read(0, PAGE_SIZE) == text(PAGE_SIZE, 2)
    check_accounting(store)


# ---- page kinds -----------------------------------------------------------------------------


def test_same_filled_pages_use_no_pool_memory() -> None:
    store = PageStore(4 * MiB)
    patterns = [bytes(PAGE_SIZE), b"\xab" * PAGE_SIZE, bytes(range(8)) * 512, b"\xff" * PAGE_SIZE]
    data = b"".join(patterns) * 64
    store.write(0, data)
    s = store.stats()
    assert s.same_pages == 256 and s.pages_stored == 256
    assert s.compr_data_size == 0 and s.mem_used_total == 0
    assert store.allocator.stats().objects == 0
    assert store.read(0, len(data)) == data
    assert all(state_of(store, p) == SAME for p in range(256))
    # an overwrite by a compressible page goes to the pool, and back again
    store.write(PAGE_SIZE, text(PAGE_SIZE))
    assert store.stats().same_pages == 255 and store.allocator.stats().objects == 1
    store.write(PAGE_SIZE, patterns[1])
    assert store.stats().same_pages == 256 and store.allocator.stats().objects == 0
    check_accounting(store)


def test_random_pages_are_stored_raw() -> None:
    store = PageStore(1 * MiB)
    data = os.urandom(10 * PAGE_SIZE)
    store.write(0, data)
    s = store.stats()
    assert s.huge_pages == 10 and s.compr_data_size == 10 * PAGE_SIZE
    for p in range(10):
        assert state_of(store, p) == HUGE
        assert store.allocator.read(store._handle[p]) == data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
    assert store.read(0, len(data)) == data
    check_accounting(store)


@pytest.mark.parametrize("level", [1, 9, 19])
def test_zstd_with_a_level(level: int) -> None:
    store = PageStore(4 * MiB, compressor="zstd", level=level)
    data = text(MiB, level)  # 256 pages: the multi-threaded batch path
    store.write(0, data)
    store.write(MiB + 3, data[:5000])
    assert store.read(0, MiB) == data
    assert store.read(MiB + 3, 5000) == data[:5000]
    s = store.stats()
    assert s.compr_data_size < MiB // 2
    check_accounting(store)
    store.close()


def test_zstd_compresses_better_than_lz4_here() -> None:
    data = text(MiB, 5)
    sizes = {}
    for name, level in (("lz4", None), ("zstd", 19)):
        store = PageStore(MiB, compressor=name, level=level)
        store.write(0, data)
        sizes[name] = store.stats().compr_data_size
        store.close()
    assert sizes["zstd"] < sizes["lz4"]


# ---- discard ----------------------------------------------------------------------------------


def test_discard_frees_at_once_and_reads_zeros() -> None:
    store = PageStore(4 * MiB)
    data = text(2 * MiB, 4)
    store.write(0, data)
    pool_before = store.allocator.pool_bytes
    store.discard(0, MiB)
    assert store.allocator.pool_bytes < pool_before
    assert store.read(0, MiB) == bytes(MiB)
    assert store.read(MiB, MiB) == data[MiB:]
    assert store.stats().discards == 256
    store.discard(0, 4 * MiB)
    s = store.stats()
    assert s.pages_stored == 0 and s.compr_data_size == 0
    assert store.allocator.stats().objects == 0 and store.allocator.pool_bytes == 0
    check_accounting(store)


def test_partial_discard_zeroes_the_edges() -> None:
    store = PageStore(1 * MiB)
    data = text(16 * PAGE_SIZE, 6)
    store.write(0, data)
    model = bytearray(data)
    for off, ln in (
        (100, 200),
        (4000, 5000),
        (3 * PAGE_SIZE + 1, 4 * PAGE_SIZE),
        (15 * 4096, 4096),
    ):
        store.discard(off, ln)
        model[off : off + ln] = bytes(ln)
        assert store.read(0, len(model)) == model
    assert state_of(store, 15) == 0  # a whole page discarded holds nothing
    check_accounting(store)


def test_discard_of_a_page_that_becomes_zero_keeps_no_object() -> None:
    store = PageStore(1 * MiB)
    store.write(0, b"\x00" * 100 + b"x" * 10 + b"\x00" * (PAGE_SIZE - 110))
    store.discard(100, 10)
    assert state_of(store, 0) == SAME and store.allocator.stats().objects == 0
    check_accounting(store)


# ---- integrity --------------------------------------------------------------------------------


def tamper(store: PageStore, page: int, where: int = 17) -> None:
    """Flip one byte of the page's stored object, through the allocator's API."""
    handle = store._handle[page]
    stored = bytearray(store.allocator.read(handle))
    stored[where % len(stored)] ^= 0x40
    store.allocator.write(handle, bytes(stored))


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
@pytest.mark.parametrize("where", [0, 5, 17, 200, -1])
def test_corrupt_object_is_eio_never_data(compressor: str, where: int) -> None:
    store = PageStore(1 * MiB, compressor=compressor)
    data = text(4 * PAGE_SIZE, 7)
    store.write(0, data)
    tamper(store, 2, where)
    with pytest.raises(StoreError) as info:
        store.read(2 * PAGE_SIZE, PAGE_SIZE)
    assert info.value.errno == errno.EIO
    with pytest.raises(StoreError):
        store.read(0, 4 * PAGE_SIZE)  # a multi-page read containing it fails as a whole
    assert store.read(0, 2 * PAGE_SIZE) == data[: 2 * PAGE_SIZE]  # the others are fine
    s = store.stats()
    assert s.checksum_errors == 2 and s.failed_reads == 2


def test_counters_of_4k_writes_and_of_other_requests_add_up() -> None:
    """4K writes count in per-stripe counters, other requests under the stats lock; stats()
    must add them up to what the page table holds, whatever mix of requests ran."""
    store = PageStore(2 * MiB)
    rnd = random.Random(9)
    writes = 0
    kinds = [text(PAGE_SIZE, 1), bytes(PAGE_SIZE), b"\x05" * PAGE_SIZE, os.urandom(PAGE_SIZE)]
    for _ in range(400):
        p = rnd.randrange(store.npages - 4)
        op = rnd.randrange(4)
        if op == 0:
            store.write(p * PAGE_SIZE, rnd.choice(kinds))  # the 4K fast path
            writes += 1
        elif op == 1:
            store.write(p * PAGE_SIZE, b"".join(rnd.choice(kinds) for _ in range(3)))
            writes += 3
        elif op == 2:
            store.write(p * PAGE_SIZE + 100, rnd.choice(kinds))  # two edge pages
            writes += 2
        else:
            store.discard(p * PAGE_SIZE, rnd.choice((PAGE_SIZE, 3 * PAGE_SIZE, 5000)))
        check_accounting(store)
    s = store.stats()
    assert s.writes == writes
    assert s.same_pages > 0 and s.huge_pages > 0 and s.discards > 0


def test_read_counters_only_grow() -> None:
    """Reads are counted per stripe under the stripe lock when the request takes its snapshot,
    so a failed request's pages count as read too (and in failed_reads): the counter never
    goes down."""
    store = PageStore(2 * MiB)
    data = text(200 * PAGE_SIZE, 3)
    store.write(0, data)
    store.read(0, PAGE_SIZE)  # the 4K fast path
    store.read(70 * PAGE_SIZE, 100)  # a part of one page
    store.read(60 * PAGE_SIZE + 5, 10 * PAGE_SIZE)  # 11 pages across two stripes
    assert store.stats().reads == 1 + 1 + 11
    tamper(store, 65)
    with pytest.raises(StoreError):
        store.read(65 * PAGE_SIZE, PAGE_SIZE)
    with pytest.raises(StoreError):
        store.read(60 * PAGE_SIZE, 10 * PAGE_SIZE)
    s = store.stats()
    assert s.reads == 13 + 1 + 10 and s.failed_reads == 2 and s.checksum_errors == 2


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
def test_every_read_shape_matches_the_data(compressor: str) -> None:
    """Aligned 4K, unaligned and multi-page reads (over stripe boundaries, over empty, same and
    huge pages, over objects that straddle two pool pages) all return the written bytes."""
    store = PageStore(2 * MiB, compressor=compressor)
    rnd = random.Random(5)
    model = bytearray(2 * MiB)
    for i in range(300):  # pages of many compressed sizes, so objects straddle pool pages
        page = text(rnd.randrange(1, PAGE_SIZE), i) + os.urandom(rnd.randrange(0, 2000))
        page = os.urandom(PAGE_SIZE) if i % 10 == 9 else (page + bytes(PAGE_SIZE))[:PAGE_SIZE]
        store.write(i * PAGE_SIZE, page)
        model[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = page
    store.write(300 * PAGE_SIZE, b"\x07" * PAGE_SIZE)  # a same-filled page
    model[300 * PAGE_SIZE : 301 * PAGE_SIZE] = b"\x07" * PAGE_SIZE
    assert {store._state[p] for p in range(301)} >= {SAME, COMPRESSED, HUGE}
    P = PAGE_SIZE
    for off, length in [(0, P), (299 * P, P), (63 * P, 2 * P),
                        (10, P), (5, 1), (0, 256 * PAGE_SIZE), (123, 256 * PAGE_SIZE),
                        (298 * PAGE_SIZE, 10 * PAGE_SIZE), (2 * MiB - PAGE_SIZE, PAGE_SIZE),
                        (2 * MiB - 1, 1), (0, 0)]:  # fmt: skip
        assert store.read(off, length) == bytes(model[off : off + length]), (off, length)
    for _ in range(300):
        p = rnd.randrange(320)
        assert store.read(p * PAGE_SIZE, PAGE_SIZE) == bytes(
            model[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        )
    with pytest.raises(StoreError):
        store.read(2 * MiB, PAGE_SIZE)  # past the end: not the fast path's business
    with pytest.raises(StoreError):
        store.read(-PAGE_SIZE, PAGE_SIZE)


def test_scrub_finds_corrupt_pages() -> None:
    store = PageStore(1 * MiB)
    store.write(0, text(100 * PAGE_SIZE, 11) + os.urandom(PAGE_SIZE) + bytes(PAGE_SIZE))
    assert store.scrub() == []
    tamper(store, 3)
    tamper(store, 77, 1)
    tamper(store, 100, 4000)  # the huge page
    assert store.scrub() == [3, 77, 100]
    s = store.stats()
    assert s.checksum_errors == 3 and s.failed_reads == 0


def test_corrupt_huge_page_is_eio() -> None:
    store = PageStore(1 * MiB)
    store.write(0, os.urandom(PAGE_SIZE))
    assert state_of(store, 0) == HUGE
    tamper(store, 0, 4000)
    with pytest.raises(StoreError) as info:
        store.read(0, 10)
    assert info.value.errno == errno.EIO
    assert store.stats().checksum_errors == 1


def test_corrupt_checksum_slot_is_eio() -> None:
    store = PageStore(1 * MiB)
    store.write(0, text(PAGE_SIZE))
    store._csum[0] ^= 1
    with pytest.raises(StoreError):
        store.read(0, PAGE_SIZE)


def test_unaligned_write_onto_a_corrupt_page_fails_and_changes_nothing() -> None:
    store = PageStore(1 * MiB)
    store.write(0, text(2 * PAGE_SIZE, 8))
    tamper(store, 1)
    objects = store.allocator.stats().objects
    handles = (store._handle[0], store._handle[1])
    with pytest.raises(StoreError) as info:
        store.write(100, b"y" * PAGE_SIZE)  # whole of nothing, edges on pages 0 and 1
    assert info.value.errno == errno.EIO
    assert (store._handle[0], store._handle[1]) == handles
    assert store.allocator.stats().objects == objects
    assert store.read(0, PAGE_SIZE) == text(2 * PAGE_SIZE, 8)[:PAGE_SIZE]
    assert store.stats().failed_writes == 1
    store.write(PAGE_SIZE, text(PAGE_SIZE))  # a whole-page overwrite heals it
    assert store.read(PAGE_SIZE, PAGE_SIZE) == text(PAGE_SIZE)


def test_compaction_keeps_every_page_intact() -> None:
    store = PageStore(8 * MiB)
    rnd = random.Random(9)
    model = bytearray(8 * MiB)
    for p in range(2048):
        page = text(rnd.randrange(300, PAGE_SIZE), p).ljust(PAGE_SIZE, b"\x01")
        store.write(p * PAGE_SIZE, page)
        model[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = page
    for p in rnd.sample(range(2048), 1400):
        store.discard(p * PAGE_SIZE, PAGE_SIZE)
        model[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
    before = store.allocator.pool_bytes
    assert store.allocator.compact() > 0
    assert store.allocator.pool_bytes < before
    assert store.read(0, 8 * MiB) == model
    assert store.stats().pages_compacted > 0
    check_accounting(store)


# ---- memory limit -----------------------------------------------------------------------------


def test_limit_gives_enospc_and_keeps_old_data() -> None:
    store = PageStore(16 * MiB, mem_limit=256 * 1024)
    assert store.stats().mem_limit == 256 * 1024
    model = bytearray(16 * MiB)
    written = 0
    with pytest.raises(StoreError) as info:
        for p in range(4096):
            page = os.urandom(PAGE_SIZE)  # huge pages: 4K of pool each
            store.write(p * PAGE_SIZE, page)
            model[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] = page
            written += 1
    assert info.value.errno == errno.ENOSPC
    assert 0 < written <= 64
    assert store.allocator.pool_bytes <= 256 * 1024
    # overwriting a stored page at the limit fails too and keeps the old page
    with pytest.raises(StoreError):
        store.write(0, os.urandom(PAGE_SIZE))
    # same-filled pages need no pool memory: they still go in
    store.write(PAGE_SIZE, bytes(PAGE_SIZE))
    model[PAGE_SIZE : 2 * PAGE_SIZE] = bytes(PAGE_SIZE)
    assert store.read(0, 16 * MiB) == model
    s = store.stats()
    assert s.failed_writes == 2 and s.mem_used_max <= 256 * 1024
    check_accounting(store)
    # raising the limit lets writes through again
    store.mem_limit = 0
    store.write(0, b"z" * PAGE_SIZE)
    assert store.read(0, 1) == b"z"


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])  # zstd: the helper-thread path
def test_a_batch_that_hits_the_limit_changes_nothing(compressor: str) -> None:
    store = PageStore(16 * MiB, compressor=compressor, mem_limit=128 * 1024)
    first = text(8 * PAGE_SIZE, 10)
    store.write(0, first)
    objects = store.allocator.stats().objects
    with pytest.raises(StoreError) as info:
        store.write(0, os.urandom(64 * PAGE_SIZE) + b"q")  # 256 KiB raw > limit, unaligned tail
    assert info.value.errno == errno.ENOSPC
    assert store.allocator.stats().objects == objects  # nothing leaked
    assert store.read(0, 65 * PAGE_SIZE) == first + bytes(57 * PAGE_SIZE)
    assert store.stats().failed_writes == 1
    check_accounting(store)
    store.close()


def test_limit_on_a_shared_allocator() -> None:
    alloc = XcfMalloc()
    store = PageStore(MiB, allocator=alloc, mem_limit=8192)
    assert store.allocator is alloc and alloc.max_pool_bytes == 8192


# ---- threads ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
def test_threads_disjoint_and_overlapping(compressor: str) -> None:
    npages = 512
    store = PageStore(npages * PAGE_SIZE, compressor=compressor)
    errors: list[BaseException] = []
    # Pages 0..439: one 110-page region per thread.  Pages 442..505: 16 groups of 4 pages that
    # every thread overwrites as whole 4-page requests (group 446..449 spans two lock stripes).
    groups = [442 + 4 * k for k in range(16)]

    def version(tid: int, n: int) -> bytes:
        """A 4-page request whose every page names its writer and sequence number."""
        tag = f"[{tid}:{n}]".encode()
        return (tag * (PAGE_SIZE // len(tag) + 1))[:PAGE_SIZE] * 4

    def work(tid: int) -> None:
        rnd = random.Random(tid)
        lo, hi = tid * 110 * PAGE_SIZE, (tid + 1) * 110 * PAGE_SIZE
        mine = bytearray(hi - lo)
        try:
            for n in range(150):
                off = rnd.randrange(0, hi - lo - 20000)
                ln = rnd.choice([PAGE_SIZE, 3 * PAGE_SIZE, rnd.randrange(1, 20000)])
                if rnd.random() < 0.8:
                    if rnd.random() < 0.5:
                        off &= ~(PAGE_SIZE - 1)
                        ln = max(PAGE_SIZE, ln & ~(PAGE_SIZE - 1))
                    chunk = text(ln, tid * 1000 + n) if n % 3 else os.urandom(ln)
                    store.write(lo + off, chunk)
                    mine[off : off + ln] = chunk
                else:
                    store.discard(lo + off, ln)
                    mine[off : off + ln] = bytes(ln)
                assert store.read(lo + off, ln) == mine[off : off + ln]
                # a shared group: written whole, read whole, so never a mix of two writers
                base = rnd.choice(groups)
                store.write(base * PAGE_SIZE, version(tid, n))
                got = store.read(base * PAGE_SIZE, 4 * PAGE_SIZE)
                assert got[:PAGE_SIZE] * 4 == got, "torn request"
            assert store.read(lo, hi - lo) == mine
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for base in groups:  # every group holds one whole request of one writer
        got = store.read(base * PAGE_SIZE, 4 * PAGE_SIZE)
        tag = got[: got.index(b"]") + 1]
        assert tag.startswith(b"[") and (tag * PAGE_SIZE)[:PAGE_SIZE] * 4 == got
    check_accounting(store)
    store.allocator.check()
    store.close()


def test_threads_at_the_limit_lose_nothing() -> None:
    """Writers racing for the last pool pages: every ENOSPC leaves that writer's pages as they
    were, every success is kept."""
    store = PageStore(4 * MiB, mem_limit=96 * PAGE_SIZE)
    errors: list[BaseException] = []
    refused = [0] * 4

    def work(tid: int) -> None:
        rnd = random.Random(tid)
        lo = tid * 256 * PAGE_SIZE
        mine = bytearray(256 * PAGE_SIZE)
        try:
            for n in range(200):
                off = rnd.randrange(0, 250) * PAGE_SIZE + rnd.choice([0, 0, 100])
                ln = rnd.choice([PAGE_SIZE, 2 * PAGE_SIZE, 5000])
                chunk = os.urandom(ln) if n % 2 else text(ln, n)
                try:
                    if rnd.random() < 0.2:
                        store.discard(lo + off, ln)
                        chunk = bytes(ln)
                    else:
                        store.write(lo + off, chunk)
                except StoreError as e:
                    assert e.errno == errno.ENOSPC
                    refused[tid] += 1
                else:
                    mine[off : off + ln] = chunk
                assert store.read(lo + off, ln) == mine[off : off + ln]
            assert store.read(lo, len(mine)) == mine
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(refused) > 0
    assert store.allocator.pool_bytes <= 96 * PAGE_SIZE
    check_accounting(store)


# ---- model-based ------------------------------------------------------------------------------

NPAGES = 24
DEVICE = NPAGES * PAGE_SIZE

offsets = st.one_of(
    st.integers(0, NPAGES - 1).map(lambda p: p * PAGE_SIZE),
    st.integers(0, DEVICE - 1),
)
contents = st.sampled_from(["zero", "fill", "text", "random"])


class StoreMachine(RuleBasedStateMachine):
    compressor = "lz4"

    def __init__(self) -> None:
        super().__init__()
        self.store = PageStore(DEVICE, compressor=self.compressor)
        self.model = bytearray(DEVICE)
        self.seed = 0

    def _data(self, kind: str, length: int) -> bytes:
        self.seed += 1
        if kind == "zero":
            return bytes(length)
        if kind == "fill":
            return (bytes([self.seed % 251, 1, 2, 3, 4, 5, 6, 7]) * (length // 8 + 1))[:length]
        if kind == "text":
            return text(length, self.seed)
        return random.Random(self.seed).randbytes(length)

    @rule(offset=offsets, pages=st.integers(0, 6), extra=st.integers(-100, 100), kind=contents)
    def write(self, offset: int, pages: int, extra: int, kind: str) -> None:
        length = max(0, min(pages * PAGE_SIZE + extra, DEVICE - offset))
        data = self._data(kind, length)
        try:
            self.store.write(offset, data)
        except StoreError as e:
            assert e.errno == errno.ENOSPC
            assert self.store.mem_limit
            event("write hit the limit")
            return
        self.model[offset : offset + length] = data

    @rule(offset=offsets, length=st.integers(0, 8 * PAGE_SIZE))
    def discard(self, offset: int, length: int) -> None:
        length = min(length, DEVICE - offset)
        try:
            self.store.discard(offset, length)
        except StoreError as e:  # an edge page re-stored smaller can still hit the limit
            assert e.errno == errno.ENOSPC and self.store.mem_limit
            return
        self.model[offset : offset + length] = bytes(length)

    @rule(offset=offsets, length=st.integers(0, 8 * PAGE_SIZE))
    def read(self, offset: int, length: int) -> None:
        length = min(length, DEVICE - offset)
        assert self.store.read(offset, length) == self.model[offset : offset + length]

    @rule(pages=st.integers(0, 12))
    def set_limit(self, pages: int) -> None:
        self.store.mem_limit = pages * PAGE_SIZE

    @rule()
    def compact(self) -> None:
        self.store.allocator.compact()

    @invariant()
    def accounting(self) -> None:
        check_accounting(self.store)

    def teardown(self) -> None:
        assert self.store.read(0, DEVICE) == self.model
        self.store.close()


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestStoreMachine = StoreMachine.TestCase


class ZstdStoreMachine(StoreMachine):
    compressor = "zstd"


ZstdStoreMachine.TestCase.settings = settings(
    max_examples=15, stateful_step_count=40, deadline=None
)
TestZstdStoreMachine = ZstdStoreMachine.TestCase
