"""The C core (zcached.core.CoreStore) against its reference model (zcached.store.PageStore over
zcached.xcfmalloc.XcfMalloc): the same operations on both, every byte and counter compared.

Compressed sizes.  The model compresses with the Python ``lz4`` and ``zstandard`` packages (their
own bundled builds of liblz4 1.9.4 and libzstd 1.5.7), the core with the system liblz4 and
libzstd it links (1.9.4 and 1.5.4 here).  They do not give the same sizes.  Measured by
:func:`test_compressed_sizes_core_and_python_libraries` (512 pages, graded compressibility):
lz4 gives the same size for 4 of the 248 pages both compress, differs by 29 bytes a page on
average and 127 at worst, 0.45% in total, and 2 pages are huge in one store only; zstd-3 agrees
on 210 of 300, differs by 6 bytes at worst, 0.008% in total.  So compr_data_size and huge_pages
are not compared raw.  Instead :class:`PageSizes` computes each page's object size both ways:
the model's with zcached.codec, the core's with csrc/codec.c's own calls replayed through
ctypes on the very liblz4.so.1 / libzstd.so.1 the extension links (the process has them
loaded), and each store's counters must equal its sums *exactly*.
mem_used_total differs by design (the core keeps a 4-byte handle header in each non-raw
object); invariants are asserted for it instead, and a bound after full compaction.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import random
import struct
import threading
from collections.abc import Callable
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from zcached import _core
from zcached.codec import DEFAULT_HUGE_THRESHOLD, Codec, same_filled
from zcached.core import CoreStore
from zcached.store import PageStore, StoreError, StoreStats
from zcached.xcfmalloc import XcfMalloc

PS = _core.PAGE_SIZE
MAX_REQ = _core.MAX_REQUEST  # 1 MiB
XCF_HDR = 4  # csrc/xcfmalloc.h: the handle header of every non-raw object in the core
ZSTD_LEVEL = 3
COLD_LEVEL = 1  # the zstd level the machines recompress with

# Counters that must be equal in the core and the model after any sequence of operations.
EXACT = (
    "orig_data_size",
    "pages_stored",
    "same_pages",
    "reads",
    "writes",
    "discards",
    "failed_reads",
    "failed_writes",
    "checksum_errors",
    "npages",
)


# ---- the core's object sizes, from its own libraries ------------------------------------------


class _CoreCodec:
    """csrc/codec.c's compress_page() through ctypes: same library, same parameters."""

    # zstd.h: ZSTD_c_compressionLevel, ZSTD_c_format (= ZSTD_c_experimentalParam2),
    # ZSTD_c_contentSizeFlag, ZSTD_c_checksumFlag, ZSTD_c_dictIDFlag; ZSTD_f_zstd1_magicless
    _ZSTD_PARAMS = ((100, None), (10, 1), (200, 0), (201, 0), (202, 0))
    OUT_MAX = PS + 1024  # ZC_CODEC_OUT_MAX

    def __init__(self, compressor: str, level: int) -> None:
        self.compressor = compressor
        self.level = level
        self.out = ctypes.create_string_buffer(self.OUT_MAX)
        self.lock = threading.Lock()
        if compressor == "lz4":
            lz4 = ctypes.CDLL("liblz4.so.1")
            fn = lz4.LZ4_compress_fast
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
            fn.argtypes += [ctypes.c_int]
            fn.restype = ctypes.c_int
            self._lz4 = fn
            return
        z = ctypes.CDLL("libzstd.so.1")
        z.ZSTD_createCCtx.restype = ctypes.c_void_p
        z.ZSTD_CCtx_setParameter.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        z.ZSTD_CCtx_setParameter.restype = ctypes.c_size_t
        z.ZSTD_CCtx_setPledgedSrcSize.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
        z.ZSTD_CCtx_setPledgedSrcSize.restype = ctypes.c_size_t
        z.ZSTD_compress2.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        z.ZSTD_compress2.argtypes += [ctypes.c_char_p, ctypes.c_size_t]
        z.ZSTD_compress2.restype = ctypes.c_size_t
        z.ZSTD_isError.argtypes = [ctypes.c_size_t]
        z.ZSTD_isError.restype = ctypes.c_uint
        self._z = z
        self._cctx = z.ZSTD_createCCtx()
        assert self._cctx
        for param, value in self._ZSTD_PARAMS:
            rc = z.ZSTD_CCtx_setParameter(self._cctx, param, level if value is None else value)
            assert not z.ZSTD_isError(rc), param

    def compressed_len(self, page: bytes) -> int:
        """What compress_page() returns: the length, or 0 when the compressor gave up."""
        with self.lock:
            if self.compressor == "lz4":
                return max(0, int(self._lz4(page, self.out, PS, self.OUT_MAX, self.level)))
            z = self._z
            z.ZSTD_CCtx_setPledgedSrcSize(self._cctx, PS)
            n = int(z.ZSTD_compress2(self._cctx, self.out, self.OUT_MAX, page, PS))
            return 0 if z.ZSTD_isError(n) else n


class PageSizes:
    """The object size each store keeps for one page (0: same-filled, no object)."""

    def __init__(self, compressor: str, level: int | None) -> None:
        self.codec = Codec(compressor, level)
        self.core = _CoreCodec(compressor, self.codec.level)
        self.threshold = DEFAULT_HUGE_THRESHOLD

    def model(self, page: bytes) -> int:
        _kind, payload, _csum = self.codec.encode(page)
        return 0 if isinstance(payload, int) else len(payload)

    def core_len(self, page: bytes) -> int:
        if same_filled(page) is not None:
            return 0
        n = self.core.compressed_len(page)
        return PS if n == 0 or n >= self.threshold else n


@functools.cache
def page_sizes(compressor: str, level: int | None) -> PageSizes:
    return PageSizes(compressor, level)


# ---- payloads ---------------------------------------------------------------------------------

_WORDS = [
    b"kernel", b"swap", b"page", b"zcached", b"memory", b"return", b"0x7f3a", b"struct",
    b"{", b"}", b"=", b"int", b"\n", b"static", b"alpha", b"omega", b"\x00\x00\x00\x00",
]  # fmt: skip


def _text_page(rng: random.Random, noise: float) -> bytes:
    """Text-like bytes with ``noise`` of its 32-byte runs replaced by random bytes."""
    page = bytearray(b" ".join(rng.choices(_WORDS, k=1200))[:PS])
    for run in range(0, PS, 32):
        if rng.random() < noise:
            page[run : run + 32] = rng.randbytes(32)
    return bytes(page)


_rng = random.Random(20261202)
# Pages of graded compressibility: page k has (k * 7 % 11) / 12 of its runs replaced by noise,
# so its objects land in many size classes (and some near the huge threshold).
CORPUS = b"".join(_text_page(_rng, (k * 7 % 11) / 12) for k in range(128))  # 512 KiB
# 64 KiB at each of those 11 noise levels: a run of pages from one of them fills a few size
# classes with many objects (what compaction has work in).
TEXT_LEVELS = [b"".join(_text_page(_rng, k / 12) for _ in range(16)) for k in range(11)]
SHAPES = ("zero", "fill", "text", "graded", "random")


def _cyclic(region: bytes, start: int, length: int) -> bytes:
    return (region * (length // len(region) + 2))[start : start + length]


def payload(shape: str, offset: int, length: int, seed: int, word: int) -> bytes:
    """``length`` bytes to write at device ``offset``: zeros, an 8-byte fill word repeated
    (in phase with the device's pages, so whole pages are same-filled), compressible text-like
    bytes of one compressibility ("text") or of graded compressibility ("graded"), or random
    bytes (huge pages)."""
    if shape == "zero":
        return bytes(length)
    if shape == "fill":
        w = word.to_bytes(8, "little")
        rot = offset % 8
        return ((w[rot:] + w[:rot]) * (length // 8 + 2))[:length]
    rng = random.Random(seed)
    if shape == "text":
        region = TEXT_LEVELS[seed % len(TEXT_LEVELS)]
        return _cyclic(region, rng.randrange(len(region)), length)
    if shape == "graded":
        return _cyclic(CORPUS, rng.randrange(len(CORPUS)), length)
    return rng.randbytes(length)


def random_payload(rng: random.Random, offset: int, length: int) -> bytes:
    return payload(rng.choice(SHAPES), offset, length, rng.getrandbits(32), rng.getrandbits(64))


def first_difference(got: bytes, want: bytes | bytearray) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    i = next(i for i in range(len(got)) if got[i] != want[i])
    return f"first difference at byte {i}: {got[i : i + 8]!r} != {bytes(want[i : i + 8])!r}"


def pages_of(offset: int, length: int) -> range:
    """Pages a request of ``length`` bytes at ``offset`` touches."""
    if length == 0:
        return range(0)
    return range(offset // PS, (offset + length - 1) // PS + 1)


def full_pages_of(offset: int, length: int) -> range:
    """Pages a request covers wholly."""
    return range(-(-offset // PS), (offset + length) // PS)


def expected_sizes(sizes: PageSizes, device: bytes | bytearray, stored: bytes | bytearray) -> tuple[
    int, int, int, int
]:  # fmt: skip
    """(core compr_data_size, core huge_pages, model compr_data_size, model huge_pages)."""
    c = ch = m = mh = 0
    for p, on in enumerate(stored):
        if on:
            page = bytes(device[p * PS : (p + 1) * PS])
            cl, ml = sizes.core_len(page), sizes.model(page)
            c, ch, m, mh = c + cl, ch + (cl == PS), m + ml, mh + (ml == PS)
    return c, ch, m, mh


def check_pool_invariants(core: CoreStore) -> None:
    """What must hold of the core's pool whatever its layout."""
    s = core.stats()
    raw = core.raw_stats()
    objects = s.pages_stored - s.same_pages
    assert raw["objects"] == objects
    assert s.mem_used_total % PS == 0
    assert s.mem_used_total >= s.compr_data_size + XCF_HDR * (objects - s.huge_pages)
    assert s.mem_used_max >= s.mem_used_total
    frag = core.allocator.fragmentation()
    assert sum(pool for _, pool, _ in frag) == s.mem_used_total
    assert sum(req for _, _, req in frag) == s.compr_data_size
    core.allocator.check()


# ---- compressed sizes: the core's libraries and the model's -----------------------------------


@pytest.mark.parametrize(("compressor", "level"), [("lz4", None), ("zstd", ZSTD_LEVEL)])
def test_compressed_sizes_core_and_python_libraries(compressor: str, level: int | None) -> None:
    """Object sizes page by page (the compr_data_size delta of each first write): the core's
    equal PageSizes.core_len exactly, the model's equal zcached.codec's, and the two agree within
    the tolerance measured here (module docstring)."""
    sizes = page_sizes(compressor, level)
    n = len(CORPUS) // PS * 4
    core = CoreStore(n * PS, compressor=compressor, level=level)
    model = PageStore(n * PS, compressor=compressor, level=level, allocator=XcfMalloc(heaps=1))
    rng = random.Random(7)
    diffs: list[int] = []
    huge_disagree = 0
    prev_c = prev_m = 0
    try:
        for p in range(n):
            page = CORPUS[(p % (n // 4)) * PS :][:PS]
            if p >= n // 4:  # then random tails of random length: all the way to huge
                cut = rng.randrange(PS)
                page = page[:cut] + rng.randbytes(PS - cut)
            core.write(p * PS, page)
            model.write(p * PS, page)
            c, m = core.stats().compr_data_size, model.stats().compr_data_size
            cl, ml = c - prev_c, m - prev_m
            prev_c, prev_m = c, m
            assert cl == sizes.core_len(page), p
            assert ml == sizes.model(page), p
            if (cl == PS) != (ml == PS):
                huge_disagree += 1
            elif cl != PS:
                diffs.append(cl - ml)
        same = sum(1 for d in diffs if d == 0)
        worst = max(abs(d) for d in diffs)
        total = abs(prev_c - prev_m) / prev_m
        if compressor == "lz4":  # measured: 4 of 248 equal, worst 127 B, total 0.45%, 2 huge
            assert worst <= 192 and total < 0.01 and huge_disagree <= n // 32
        else:  # measured: 210 of 300 equal, worst 6 B, total 0.008%, 0 huge
            assert same >= len(diffs) // 2 and worst <= 24 and total < 0.001
            assert huge_disagree <= 2
    finally:
        core.close()
        model.close()


# ---- the state machine ------------------------------------------------------------------------

NPAGES = 320  # 1.25 MiB: room for 1 MiB reads and many-page discards
DEVICE = NPAGES * PS
MAX_WRITE = 64 * 1024

offsets = st.one_of(
    st.integers(0, NPAGES - 1).map(lambda p: p * PS),
    st.integers(0, DEVICE - 1),
    st.tuples(st.integers(1, NPAGES - 1), st.integers(-16, 16)).map(lambda t: t[0] * PS + t[1]),
)
byte_lengths = st.one_of(st.integers(1, 64), st.integers(1, 2 * PS), st.integers(1, MAX_WRITE))
read_lengths = st.one_of(st.integers(0, 2 * PS), st.integers(0, MAX_WRITE), st.just(MAX_REQ))
discard_lengths = st.one_of(
    st.integers(1, 3 * PS),
    st.integers(1, NPAGES).map(lambda n: n * PS),
    st.integers(1, DEVICE),
    st.just(DEVICE),
)
shapes = st.sampled_from(SHAPES)
seeds = st.integers(0, 2**32 - 1)
words = st.one_of(
    st.sampled_from([0, 1, 0xFFFFFFFF, 0xFFFFFFFF00000000, 0x0123456789ABCDEF, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


class CoreModelMachine(RuleBasedStateMachine):
    """Writes, reads, discards, compactions and scrubs on a CoreStore and a PageStore."""

    compressor: ClassVar[str] = "lz4"
    level: ClassVar[int | None] = None
    heaps: ClassVar[int] = 1

    def __init__(self) -> None:
        super().__init__()
        self.core = CoreStore(
            DEVICE, compressor=self.compressor, level=self.level, heaps=self.heaps
        )
        self.model = PageStore(
            DEVICE, compressor=self.compressor, level=self.level,
            allocator=XcfMalloc(heaps=self.heaps),
        )  # fmt: skip
        self.sizes = page_sizes(self.compressor, self.level)
        self.shadow = bytearray(DEVICE)
        self.stored = bytearray(NPAGES)  # 1: the page has a table entry (written, not discarded)
        self.core_len = [0] * NPAGES  # the object size each store keeps for the page
        self.model_len = [0] * NPAGES
        # Recompression, as both stores must do it (zcached/store.py's docstring): the clock,
        # each page's age, and per store which pages are cold or tried (their sizes differ).
        self.cold_sizes = page_sizes("zstd", COLD_LEVEL)
        self.epoch = 0
        self.age = [0] * NPAGES
        self.cold = {"core": [0] * NPAGES, "model": [0] * NPAGES}
        self.tried = {"core": [0] * NPAGES, "model": [0] * NPAGES}

    def _touch(self, pages: range | list[int]) -> None:
        for p in pages:
            self.age[p] = self.epoch & 0x7F
            for side in ("core", "model"):
                self.tried[side][p] = 0

    def _rewritten(self, pages: range | list[int]) -> None:
        for p in pages:
            for side in ("core", "model"):
                self.cold[side][p] = 0

    def _refresh(self, pages: range) -> None:
        for p in pages:
            if self.stored[p]:
                page = bytes(self.shadow[p * PS : (p + 1) * PS])
                self.core_len[p] = self.sizes.core_len(page)
                self.model_len[p] = self.sizes.model(page)
            else:
                self.core_len[p] = self.model_len[p] = 0

    def _write(self, offset: int, length: int, shape: str, seed: int, word: int) -> None:
        data = payload(shape, offset, length, seed, word)
        self.core.write(offset, data)
        self.model.write(offset, data)
        self.shadow[offset : offset + length] = data
        touched = pages_of(offset, length)
        for p in touched:
            self.stored[p] = 1
        self._touch(touched)
        self._rewritten(touched)
        self._refresh(touched)

    @rule(
        page=st.integers(0, NPAGES - 1), n=st.integers(1, 16), shape=shapes, seed=seeds, word=words
    )
    def write_pages(self, page: int, n: int, shape: str, seed: int, word: int) -> None:
        self._write(page * PS, min(n, NPAGES - page) * PS, shape, seed, word)

    @rule(page=st.integers(0, NPAGES - 1), n=st.integers(16, 64), seed=seeds)
    def fill_run(self, page: int, n: int, seed: int) -> None:
        """A run of text pages of one compressibility, in 64 KiB writes: many objects in a
        few size classes (punch_holes then makes them sparse)."""
        end = min(page + n, NPAGES)
        for p in range(page, end, 16):
            self._write(p * PS, (min(p + 16, end) - p) * PS, "text", seed, 0)

    @rule(offset=offsets, length=byte_lengths, shape=shapes, seed=seeds, word=words)
    def write_bytes(self, offset: int, length: int, shape: str, seed: int, word: int) -> None:
        self._write(offset, min(length, DEVICE - offset), shape, seed, word)

    @rule(offset=offsets, length=read_lengths)
    def read(self, offset: int, length: int) -> None:
        length = min(length, DEVICE - offset)
        want = self.shadow[offset : offset + length]
        got = self.core.read(offset, length)
        assert got == want, first_difference(got, want)
        got = self.model.read(offset, length)
        assert got == want, first_difference(got, want)
        self._touch(pages_of(offset, length))

    @rule(offset=offsets, length=discard_lengths)
    def discard(self, offset: int, length: int) -> None:
        self._discard(offset, min(length, DEVICE - offset))

    @rule(page=st.integers(0, NPAGES - 1), n=st.integers(2, 64), stride=st.integers(2, 4))
    def punch_holes(self, page: int, n: int, stride: int) -> None:
        """Every stride-th page of a run discarded: sparse vpages, work for compaction."""
        for p in range(page, min(page + n, NPAGES), stride):
            self._discard(p * PS, PS)

    def _discard(self, offset: int, length: int) -> None:
        self.core.discard(offset, length)
        self.model.discard(offset, length)
        full = full_pages_of(offset, length)
        merged = [  # partial edge pages holding something: zeros merged in, stored again
            p for p in pages_of(offset, length)
            if p not in full and self.stored[p] and any(self.shadow[p * PS : (p + 1) * PS])
        ]  # fmt: skip
        self._touch(merged)
        self._rewritten([*merged, *full])
        self.shadow[offset : offset + length] = bytes(length)
        for p in full_pages_of(offset, length):
            self.stored[p] = 0  # partial edge pages keep their entry (zeros merged in)
        self._refresh(pages_of(offset, length))

    @rule(max_moves=st.one_of(st.none(), st.integers(1, 40)))
    def compact(self, max_moves: int | None) -> None:
        moved = self.core.allocator.compact(max_moves), self.model.allocator.compact(max_moves)
        event(f"compaction moved objects: core {min(moved[0], 1)}, model {min(moved[1], 1)}")

    @rule()
    def tick(self) -> None:
        self.core.tick()
        self.model.tick()
        self.epoch += 1

    @rule(idle=st.integers(1, 3))
    def recompress(self, idle: int) -> None:
        """A whole pass on both stores; each must take exactly the idle pages, and recompress
        exactly those whose cold form is smaller by its own libraries' sizes."""
        for side, store, lens in (
            ("core", self.core, self.core_len), ("model", self.model, self.model_len)
        ):  # fmt: skip
            nxt, got = store.recompress(0, 0, idle, COLD_LEVEL)
            want = dict.fromkeys(("candidates", "recompressed", "kept", "bytes_after"), 0)
            for p in range(NPAGES):
                if not (self.stored[p] and lens[p]) or self.cold[side][p]:
                    continue
                if self.tried[side][p] or (self.epoch - self.age[p]) & 0x7F < idle:
                    continue
                want["candidates"] += 1
                n = self._cold_len(side, p)
                if n and n < lens[p]:
                    want["recompressed"] += 1
                    want["bytes_after"] += n
                    self.cold[side][p] = 1
                    lens[p] = n
                else:
                    want["kept"] += 1
                    self.tried[side][p] = 1
            assert nxt == NPAGES
            assert {k: got[k] for k in want} == want, (side, got, want)
            assert got["raced"] == got["failed"] == got["dict"] == 0, (side, got)
            event(f"recompressed pages: {side} {min(got['recompressed'], 1)}")

    @rule(page=st.integers(0, NPAGES - 1), n=st.integers(1, 3), idle=st.integers(1, 3))
    def read_keeps_young(self, page: int, n: int, idle: int) -> None:
        """Pages old enough, some read just before a pass: those must stay (a read makes a
        page young, and takes back its tried mark)."""
        for _ in range(idle):
            self.tick()
        self.read(page * PS, min(n, NPAGES - page) * PS)
        self.recompress(idle)

    def _cold_len(self, side: str, p: int) -> int:
        """The size of page p in the cold format by that store's libraries (0: none)."""
        page = bytes(self.shadow[p * PS : (p + 1) * PS])
        if side == "core":
            n = self.cold_sizes.core.compressed_len(page)
            return n + 1 if n else 0
        return len(self.cold_sizes.codec.compress(page)) + 1

    @rule()
    def scrub(self) -> None:
        assert self.core.scrub() == []
        assert self.model.scrub() == []

    @invariant()
    def counters_agree(self) -> None:
        c, m = self.core.stats(), self.model.stats()
        for name in EXACT:
            assert getattr(c, name) == getattr(m, name), (name, getattr(c, name), getattr(m, name))
        assert c.pages_stored == sum(self.stored)
        # Exact, page by page from each side's libraries (module docstring).
        assert c.compr_data_size == sum(self.core_len)
        assert m.compr_data_size == sum(self.model_len)
        assert c.huge_pages == self.core_len.count(PS)
        assert m.huge_pages == self.model_len.count(PS)
        for st_, side, lens in ((c, "core", self.core_len), (m, "model", self.model_len)):
            cold = [p for p in range(NPAGES) if self.cold[side][p]]
            assert st_.cold_pages == len(cold), (side, st_.cold_pages, len(cold))
            assert st_.cold_bytes == sum(lens[p] for p in cold), side
        for s in (c, m):
            assert s.mem_used_total >= s.compr_data_size
            assert s.mem_used_total % PS == 0
        assert self.model.allocator.stats().objects == m.pages_stored - m.same_pages
        check_pool_invariants(self.core)

    def teardown(self) -> None:
        try:
            self._final_checks()
        finally:
            self.core.close()
            self.model.close()

    def _final_checks(self) -> None:
        for off in range(0, DEVICE, MAX_REQ):
            n = min(MAX_REQ, DEVICE - off)
            assert self.core.read(off, n) == self.shadow[off : off + n]
        self.core.allocator.compact()
        self.model.allocator.compact()
        check_pool_invariants(self.core)
        # Measured over these examples: the core's pool is at most 3 pages (3%) above the model's.
        core_pool, model_pool = self.core.stats().mem_used_total, self.model.stats().mem_used_total
        assert core_pool <= model_pool * 1.05 + 8 * PS, (core_pool, model_pool)
        for off in range(0, DEVICE, MAX_REQ):
            n = min(MAX_REQ, DEVICE - off)
            assert self.core.read(off, n) == self.shadow[off : off + n]
        self.core.discard(0, DEVICE)
        self.model.discard(0, DEVICE)
        for s in (self.core.stats(), self.model.stats()):
            assert (s.mem_used_total, s.compr_data_size, s.pages_stored) == (0, 0, 0)
        assert self.core.raw_stats()["objects"] == 0
        assert self.model.allocator.stats().objects == 0
        assert self.model.allocator.pool_bytes == 0
        self.core.allocator.check()


MACHINE_SETTINGS = settings(
    max_examples=18,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Lz4Heap1(CoreModelMachine):
    compressor, level, heaps = "lz4", None, 1


class Lz4Heap2(CoreModelMachine):
    compressor, level, heaps = "lz4", None, 2


class ZstdHeap1(CoreModelMachine):
    compressor, level, heaps = "zstd", ZSTD_LEVEL, 1


class ZstdHeap2(CoreModelMachine):
    compressor, level, heaps = "zstd", ZSTD_LEVEL, 2


TestCoreModelLz4Heap1 = Lz4Heap1.TestCase
TestCoreModelLz4Heap2 = Lz4Heap2.TestCase
TestCoreModelZstdHeap1 = ZstdHeap1.TestCase
TestCoreModelZstdHeap2 = ZstdHeap2.TestCase
TestCoreModelLz4Heap1.settings = MACHINE_SETTINGS
TestCoreModelLz4Heap2.settings = MACHINE_SETTINGS
TestCoreModelZstdHeap1.settings = MACHINE_SETTINGS
TestCoreModelZstdHeap2.settings = MACHINE_SETTINGS


# ---- pool size after full compaction ----------------------------------------------------------


@pytest.mark.parametrize(
    ("compressor", "level", "heaps"), [("lz4", None, 1), ("zstd", ZSTD_LEVEL, 2)]
)
def test_pool_after_full_compaction_close_to_model(
    compressor: str, level: int | None, heaps: int
) -> None:
    """Same pages, same churn (so sparse vpages in many classes), full compaction on both: the
    core's pool is within 5% + 8 pages of the model's.  Measured at 03267a4: lz4 0.99x (313
    pages vs 315), zstd-3 with two heaps 1.01x (287 vs 283); the handle header moves about a
    quarter of the objects up one 16-byte class.  Before 03267a4 (the C compaction stopped once
    a class had less than a vpage of free slots, and never packed a lone partial vpage) both
    measured 1.32x (415 vs 315, 375 vs 283) and this test failed."""
    n = 1024
    core = CoreStore(n * PS, compressor=compressor, level=level, heaps=heaps)
    model = PageStore(n * PS, compressor=compressor, level=level, allocator=XcfMalloc(heaps=heaps))
    rng = random.Random(11)
    try:
        for off in range(0, n * PS, MAX_WRITE):
            data = payload("text", off, MAX_WRITE, rng.getrandbits(32), 0)
            core.write(off, data)
            model.write(off, data)
        for _ in range(600):
            off = rng.randrange(n) * PS
            length = min(rng.randint(1, 4) * PS, n * PS - off)
            if rng.random() < 0.7:
                core.discard(off, length)
                model.discard(off, length)
            else:
                data = random_payload(rng, off, length)
                core.write(off, data)
                model.write(off, data)
        before = core.stats().mem_used_total, model.stats().mem_used_total
        assert core.allocator.compact() > 0 and model.allocator.compact() > 0
        check_pool_invariants(core)
        core_pool, model_pool = core.stats().mem_used_total, model.stats().mem_used_total
        assert core_pool < before[0] and model_pool < before[1]
        assert core_pool <= model_pool * 1.05 + 8 * PS, (core_pool, model_pool)
        assert core.stats().compr_data_size <= model.stats().compr_data_size * 1.01
    finally:
        core.close()
        model.close()


# ---- concurrency ------------------------------------------------------------------------------


def run_threads(targets: list[Callable[[], None]], background: list[Callable[[], None]]) -> None:
    """Run ``targets`` to completion while ``background`` loop until they are done; re-raise the
    first failure of any of them."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)
                stop.set()

        return run

    def loop(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not stop.is_set():
                fn()

        return guard(run)

    workers = [threading.Thread(target=guard(t)) for t in targets]
    helpers = [threading.Thread(target=loop(b)) for b in background]
    for t in workers + helpers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


class Compactor:
    """A background loop body: compactions of assorted sizes, pool checks and stats."""

    def __init__(self, store: CoreStore, seed: int, limit: int = 0) -> None:
        self.store = store
        self.rng = random.Random(seed)
        self.limit = limit
        self.moves = 0
        self.rounds = 0

    def __call__(self) -> None:
        self.moves += self.store.allocator.compact(self.rng.choice([None, 1, 4, 32]))
        self.rounds += 1
        self.store.allocator.check()
        s = self.store.stats()
        assert s.mem_used_total % PS == 0
        if self.limit:
            assert s.mem_used_total <= self.limit


@pytest.mark.parametrize(("compressor", "level"), [("lz4", None), ("zstd", ZSTD_LEVEL)])
def test_threads_on_disjoint_ranges_while_compacting(compressor: str, level: int | None) -> None:
    """Three threads, each on its own range, write/read/discard random sizes and check every byte
    against their own shadow while a fourth compacts in a loop; then the whole device is the
    union of the shadows and every counter adds up."""
    nthreads, span = 3, 96  # pages per thread
    core = CoreStore(nthreads * span * PS, compressor=compressor, level=level, heaps=2)
    shadows = [bytearray(span * PS) for _ in range(nthreads)]
    stored = bytearray(nthreads * span)
    io = [[0, 0, 0] for _ in range(nthreads)]  # pages read, written, discarded
    ops = 2500

    def worker(t: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(100 + t)
            base, shadow, count = t * span * PS, shadows[t], io[t]
            for _ in range(ops):
                off = rng.randrange(span) * PS if rng.random() < 0.5 else rng.randrange(span * PS)
                length = rng.choice([PS, rng.randint(1, MAX_WRITE), rng.randint(1, 32) * PS])
                length = min(length, span * PS - off)
                r = rng.random()
                if r < 0.45:
                    data = random_payload(rng, base + off, length)
                    core.write(base + off, data)
                    shadow[off : off + length] = data
                    for p in pages_of(base + off, length):
                        stored[p] = 1
                    count[1] += len(pages_of(off, length))
                elif r < 0.8:
                    got = core.read(base + off, length)
                    assert got == shadow[off : off + length], first_difference(
                        got, shadow[off : off + length]
                    )
                    count[0] += len(pages_of(off, length))
                else:
                    core.discard(base + off, length)
                    shadow[off : off + length] = bytes(length)
                    for p in full_pages_of(base + off, length):
                        stored[p] = 0
                    count[2] += len(full_pages_of(off, length))

        return run

    compactor = Compactor(core, 5)
    try:
        run_threads([worker(t) for t in range(nthreads)], [compactor])
        assert compactor.rounds > 10 and compactor.moves > 0
        device = b"".join(shadows)
        for off in range(0, len(device), MAX_REQ):
            got = core.read(off, min(MAX_REQ, len(device) - off))
            assert got == device[off : off + MAX_REQ], first_difference(got, device[off:][:MAX_REQ])
        check_pool_invariants(core)
        s = core.stats()
        assert s.reads == sum(c[0] for c in io) + nthreads * span
        assert s.writes == sum(c[1] for c in io)
        assert s.discards == sum(c[2] for c in io)
        assert (s.failed_reads, s.failed_writes, s.checksum_errors) == (0, 0, 0)
        assert s.pages_stored == sum(stored)
        c, ch, _, _ = expected_sizes(page_sizes(compressor, level), device, stored)
        assert (s.compr_data_size, s.huge_pages) == (c, ch)
        core.allocator.compact()
        check_pool_invariants(core)
        assert core.read(0, MAX_REQ) == device[:MAX_REQ]
    finally:
        core.close()


def version_page(w: int, s: int, p: int) -> bytes:
    """Writer w's s-th version of page p: same-filled, compressible or huge by (w + s) % 3."""
    kind = (w + s) % 3
    if kind == 0:
        return struct.pack("<BBHI", 0xA5, w, p, s) * (PS // 8)
    head = struct.pack("<4sBxHI", b"ZCv1", w, p, s)
    rng = random.Random((w << 40) | (s << 16) | p)
    if kind == 1:
        start = rng.randrange(len(CORPUS) - PS)
        return head + CORPUS[start : start + PS - len(head)]
    return head + rng.randbytes(PS - len(head))


def parse_version(page: bytes) -> tuple[int, int, int]:
    """(writer, seq, page) of a page from :func:`version_page`; AssertionError for anything
    else (a mix of two versions, garbage)."""
    if page[0] == 0xA5:
        _tag, w, p, s = struct.unpack_from("<BBHI", page)
    else:
        magic, w, p, s = struct.unpack_from("<4sBxHI", page)
        assert magic == b"ZCv1", page[:16]
    assert page == version_page(w, s, p), f"page claims writer {w} seq {s} page {p} but differs"
    return w, s, p


def test_threads_writing_the_same_pages_never_mix_versions() -> None:
    """Two writers overwrite the same 8 pages with whole 4K versions (same-filled, compressible
    and huge in turn) while two readers read single pages and the whole range and a compactor
    runs: every page read is exactly one version that was written."""
    npages, nwriters, rounds = 8, 2, 500
    core = CoreStore(npages * PS, heaps=2)
    issued = [0] * (nwriters + 1)  # next seq of each writer; writer nwriters wrote the start
    for p in range(npages):
        core.write(p * PS, version_page(nwriters, 0, p))
    issued[nwriters] = 1
    seen = [0]

    def writer(w: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(w)
            for s in range(rounds):
                issued[w] = s + 1
                for p in rng.sample(range(npages), 3):
                    core.write(p * PS, version_page(w, s, p))

        return run

    def check(page: bytes, p: int) -> None:
        w, s, q = parse_version(page)
        assert q == p and s < issued[w], (w, s, q, p)
        seen[0] += 1

    def reader_one() -> None:
        p = random.randrange(npages)
        check(core.read(p * PS, PS), p)

    def reader_all() -> None:
        data = core.read(0, npages * PS)
        for p in range(npages):
            check(data[p * PS : (p + 1) * PS], p)

    compactor = Compactor(core, 6)
    try:
        run_threads([writer(w) for w in range(nwriters)], [reader_one, reader_all, compactor])
        assert seen[0] > 100
        for p in range(npages):
            check(core.read(p * PS, PS), p)
        s = core.stats()
        assert s.writes == npages + nwriters * rounds * 3 and s.pages_stored == npages
        check_pool_invariants(core)
    finally:
        core.close()


@functools.lru_cache(maxsize=32)
def megabyte_write(wid: int, length: int) -> bytes:
    """Write ``wid``'s content of a range: every page (4K of the range) names wid and its index
    in its first 8 bytes; the rest is stamps (compressible), random (huge) or the stamp repeated
    (same-filled when aligned), by wid % 3."""
    kind = wid % 3
    rng = random.Random(wid)
    out = bytearray()
    for i in range(-(-length // PS)):
        stamp = struct.pack("<II", wid, i)
        if kind == 0:
            page = b"".join(struct.pack("<II", wid, i * 512 + j) for j in range(PS // 8))
            out += stamp + page[8:]
        elif kind == 1:
            out += stamp + rng.randbytes(PS - 8)
        else:
            out += stamp * (PS // 8)
    return bytes(out[:length])


def test_megabyte_writes_are_atomic_for_readers() -> None:
    """1 MiB writes (an aligned range of 256 pages, and an unaligned one spanning 257) by two
    writers each, read back whole by two readers while a compactor runs: a read always sees
    one write's content in full, never pages from two writes."""
    ranges = [(0, MAX_REQ), (MAX_REQ + 1000, MAX_REQ)]
    core = CoreStore(3 * MAX_REQ, heaps=2)
    wids = iter(range(1, 1 << 30))
    lock = threading.Lock()
    issued = [1]
    for off, length in ranges:
        core.write(off, megabyte_write(0, length))
    seen = [0, 0]

    def writer(k: int) -> Callable[[], None]:
        def run() -> None:
            off, length = ranges[k % 2]
            for _ in range(25):
                with lock:
                    wid = next(wids)
                    issued[0] = max(issued[0], wid + 1)
                core.write(off, megabyte_write(wid, length))

        return run

    def reader(k: int) -> Callable[[], None]:
        def run() -> None:
            off, length = ranges[k]
            data = core.read(off, length)
            wid = struct.unpack_from("<I", data)[0]
            assert wid < issued[0], wid
            want = megabyte_write(wid, length)
            if data != want:
                stamps = {struct.unpack_from("<I", data, i)[0] for i in range(0, length, PS)}
                pytest.fail(f"read of range {k} mixes writes {sorted(stamps)}")
            seen[k] += 1

        return run

    compactor = Compactor(core, 7)
    try:
        run_threads([writer(k) for k in range(4)], [reader(0), reader(1), compactor])
        assert min(seen) > 0, seen
        check_pool_invariants(core)
        s = core.stats()
        assert s.writes == 256 + 257 + 50 * 256 + 50 * 257
        assert (s.failed_reads, s.failed_writes) == (0, 0)
    finally:
        core.close()


# ---- the memory limit -------------------------------------------------------------------------


def test_mem_limit_enospc_keeps_old_contents() -> None:
    """At a small limit, writes that need pool pages past it fail with ENOSPC and change no
    byte (checked against a shadow), mem_used_total never passes the limit (compaction
    included), failed_writes counts each failure, and after discards writes succeed again."""
    npages, limit_pages = 256, 40
    limit = limit_pages * PS
    core = CoreStore(npages * PS, mem_limit=limit)
    shadow = bytearray(npages * PS)
    rng = random.Random(3)
    failures = successes_after_failure = 0

    def verify() -> None:
        for off in range(0, npages * PS, MAX_REQ):
            assert core.read(off, MAX_REQ) == shadow[off : off + MAX_REQ]

    def bounded() -> None:
        s = core.stats()
        assert s.mem_used_total <= limit and s.mem_used_max <= limit and s.mem_limit == limit

    try:
        # Fill with huge pages (one pool page each) until the limit refuses one.
        p = 0
        with pytest.raises(StoreError) as exc:
            while True:
                data = rng.randbytes(PS)
                core.write(p * PS, data)
                shadow[p * PS : (p + 1) * PS] = data
                p += 1
        assert exc.value.errno == errno.ENOSPC and p == limit_pages
        assert core.stats().failed_writes == 1 and core.stats().mem_used_total == limit
        # An overwrite at the limit fails too (the new object is stored before the old is freed)
        with pytest.raises(StoreError) as exc:
            core.write(0, rng.randbytes(PS))
        assert exc.value.errno == errno.ENOSPC
        # A multi-page write is all or nothing; same-filled pages need no pool memory.
        with pytest.raises(StoreError):
            core.write(PS * 30, bytes(PS) + rng.randbytes(3 * PS))
        core.write(PS * 100, struct.pack("<Q", 42) * (PS // 8 * 4))
        shadow[PS * 100 : PS * 104] = struct.pack("<Q", 42) * (PS // 8 * 4)
        verify()
        bounded()
        assert core.stats().failed_writes == 3
        failures = 3
        # Random work at the limit.
        for _ in range(400):
            off = rng.randrange(npages) * PS if rng.random() < 0.5 else rng.randrange(npages * PS)
            length = min(rng.choice([PS, rng.randint(1, 3 * PS), rng.randint(1, 8) * PS]),
                         npages * PS - off)  # fmt: skip
            r = rng.random()
            try:
                if r < 0.65:
                    data = random_payload(rng, off, length)
                    core.write(off, data)
                    shadow[off : off + length] = data
                    if failures:
                        successes_after_failure += 1
                elif r < 0.9:
                    core.discard(off, length)
                    shadow[off : off + length] = bytes(length)
                else:
                    core.allocator.compact(rng.choice([None, 2]))
            except StoreError as e:
                assert e.errno == errno.ENOSPC, e
                # failed_writes counts writes only (a partial discard that cannot re-store its
                # edge page is not a write; the model counts it the same way).
                failures += r < 0.65
            got = core.read(off, length)
            assert got == shadow[off : off + length], first_difference(
                got, shadow[off : off + length]
            )
            bounded()
            check_pool_invariants(core)
        verify()
        s = core.stats()
        assert s.failed_writes == failures and failures > 10 and successes_after_failure > 10
        # Make room: writes succeed again.
        core.discard(0, npages * PS)
        shadow[:] = bytes(len(shadow))
        for p in range(limit_pages // 2):
            data = rng.randbytes(PS)
            core.write(p * PS, data)
            shadow[p * PS : (p + 1) * PS] = data
        verify()
        bounded()
    finally:
        core.close()


def test_mem_limit_same_outcomes_as_model_for_huge_and_same_pages() -> None:
    """Huge objects take one whole pool page in both stores (the raw class has no header), so
    with only huge and same-filled pages the core and the model hit the limit at the same
    writes: every outcome and every exact counter agrees."""
    npages, limit = 64, 24 * PS
    core = CoreStore(npages * PS, mem_limit=limit)
    model = PageStore(npages * PS, mem_limit=limit, allocator=XcfMalloc(heaps=1))
    rng = random.Random(4)
    outcomes: list[int | None] = []
    try:
        for _ in range(300):
            page, n = rng.randrange(npages), rng.randint(1, 4)
            n = min(n, npages - page)
            data = b""
            if rng.random() < 0.75:
                data = b"".join(
                    rng.randbytes(PS) if rng.random() < 0.7 else struct.pack("<Q", i) * (PS // 8)
                    for i in range(n)
                )
            results: list[int | None] = []
            for store in (core, model):
                try:
                    if data:
                        store.write(page * PS, data)
                    else:
                        store.discard(page * PS, n * PS)
                    results.append(0)
                except StoreError as e:
                    results.append(e.errno)
            assert results[0] == results[1], results
            outcomes.append(results[0])
            c, m = core.stats(), model.stats()
            for name in (*EXACT, "huge_pages", "compr_data_size", "mem_used_total"):
                assert getattr(c, name) == getattr(m, name), name
            assert c.mem_used_total <= limit
        assert outcomes.count(errno.ENOSPC) > 10 and outcomes.count(0) > 100
        assert core.read(0, npages * PS) == model.read(0, npages * PS)
    finally:
        core.close()
        model.close()


def test_mem_limit_below_one_page_refuses_objects_like_the_model() -> None:
    """A limit of less than one page leaves no room for any object (the model refuses every
    non-same-filled page); the core must not take a page past it.  Fails at 6b57033:
    zc_store_open passes mem_limit / 4096 = 0 pages to xcf_create, where 0 means no limit."""
    core = CoreStore(16 * PS, mem_limit=1000)
    model = PageStore(16 * PS, mem_limit=1000, allocator=XcfMalloc(heaps=1))
    try:
        core.write(0, bytes(PS))  # same-filled: no pool memory
        model.write(0, bytes(PS))
        data = random.Random(5).randbytes(PS)
        with pytest.raises(StoreError) as exc:
            model.write(PS, data)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(StoreError) as exc:
            core.write(PS, data)
        assert exc.value.errno == errno.ENOSPC
        assert core.stats().mem_used_total <= 1000
    finally:
        core.close()
        model.close()


# ---- integrity --------------------------------------------------------------------------------


def corrupt_model(model: PageStore, page: int) -> None:
    """What CoreStore.corrupt does, on the model: flip the object's first byte (xcf_corrupt)."""
    h = model._handle[page]
    blob = bytearray(model.allocator.read(h))
    blob[0] ^= 0x5A
    model.allocator.write(h, bytes(blob))


def test_corruption_is_detected_reported_and_healed() -> None:
    """A corrupted page reads as EIO (checksum_errors, failed_reads), scrub names it, the other
    pages read fine, a whole-page overwrite heals it; every counter as in the model."""
    npages = 16
    core = CoreStore(npages * PS)
    model = PageStore(npages * PS, allocator=XcfMalloc(heaps=1))
    rng = random.Random(6)
    pages = [
        payload("text", 0, PS, 1, 0), rng.randbytes(PS), bytes(PS), payload("fill", 0, PS, 0, 77)
    ] * (npages // 4)  # fmt: skip
    data = b"".join(pages)
    bad = [4, 5]  # a compressed page and a huge one

    def same_counters() -> StoreStats:
        c, m = core.stats(), model.stats()
        for name in (*EXACT, "huge_pages"):
            assert getattr(c, name) == getattr(m, name), name
        return c

    try:
        for store in (core, model):
            store.write(0, data)
        for p in bad:
            core.corrupt(p)
            corrupt_model(model, p)
        with pytest.raises(OSError) as os_exc:
            core.corrupt(2)  # same-filled: no object to corrupt
        assert os_exc.value.errno == errno.ENOENT
        before = same_counters()
        for p in bad:
            for store in (core, model):
                with pytest.raises(StoreError) as exc:
                    store.read(p * PS, PS)
                assert exc.value.errno == errno.EIO
                with pytest.raises(StoreError) as exc:
                    store.read(p * PS + 100, 10)  # a few bytes of it
                assert exc.value.errno == errno.EIO
        for store in (core, model):
            with pytest.raises(StoreError) as exc:
                store.read(0, npages * PS)  # a multi-page read that covers them
            assert exc.value.errno == errno.EIO
        s = same_counters()
        assert s.checksum_errors - before.checksum_errors == 5
        assert s.failed_reads - before.failed_reads == 5
        for p in range(npages):
            if p not in bad:
                assert core.read(p * PS, PS) == model.read(p * PS, PS) == pages[p]
        assert core.scrub() == bad
        assert model.scrub() == bad
        s = same_counters()
        assert s.checksum_errors - before.checksum_errors == 7
        # A whole-page overwrite heals (nothing to read first); an aligned multi-page one too.
        for store in (core, model):
            store.write(4 * PS, pages[0])
            store.write(5 * PS, pages[1] + pages[2])
        assert core.read(4 * PS, 2 * PS) == model.read(4 * PS, 2 * PS) == pages[0] + pages[1]
        assert core.scrub() == [] and model.scrub() == []
        same_counters()
        check_pool_invariants(core)
    finally:
        core.close()
        model.close()


def test_failed_merges_are_counted_as_in_the_model() -> None:
    """A request that fails while merging an edge page changes no byte and is counted as in the
    model: an unaligned write onto a corrupt page (model: checksum_errors, failed_reads and
    failed_writes +1), a partial discard of a corrupt page (checksum_errors, failed_reads +1),
    a partial discard of a huge page at the memory limit (ENOSPC; nothing counted).  Fails at
    6b57033: store.c's merge_edge() counts no failed read, and zc_store_discard() counts a
    failed write for any failure (the model counts a failed discard in no request counter)."""
    page = payload("text", 0, PS, 9, 0)
    huge = random.Random(9).randbytes(4 * PS)
    cases: list[tuple[str, int, Callable[[PageStore | CoreStore], None]]] = [
        ("unaligned write onto a corrupt page", errno.EIO, lambda s: s.write(3 * PS + 100, b"x")),
        ("partial discard of a corrupt page", errno.EIO, lambda s: s.discard(2 * PS + 100, PS)),
        ("partial discard at the limit", errno.ENOSPC, lambda s: s.discard(100, 200)),
    ]
    mismatches = []
    for what, err, call in cases:
        limit = 4 * PS if err == errno.ENOSPC else 0
        core = CoreStore(8 * PS, mem_limit=limit)
        model = PageStore(8 * PS, mem_limit=limit, allocator=XcfMalloc(heaps=1))
        try:
            for store in (core, model):
                store.write(0, huge if limit else page * 8)
            if not limit:
                core.corrupt(3)
                corrupt_model(model, 3)
            before = core.stats(), model.stats()
            for store in (core, model):
                with pytest.raises(StoreError) as exc:
                    call(store)
                assert exc.value.errno == err, what
            for store in (core, model):  # the edges are as they were
                assert store.read(0, PS) == (huge[:PS] if limit else page), what
                if not limit:
                    assert store.read(2 * PS, PS) == page, what
            after = core.stats(), model.stats()
            delta = [
                {n: getattr(a, n) - getattr(b, n) for n in EXACT}
                for a, b in zip(after, before, strict=True)
            ]
            differ = {n: (delta[0][n], delta[1][n]) for n in EXACT if delta[0][n] != delta[1][n]}
            if differ:
                mismatches.append(f"{what}: (core, model) change {differ}")
        finally:
            core.close()
            model.close()
    assert not mismatches, "counter changes differ:\n" + "\n".join(mismatches)


# ---- bad arguments ----------------------------------------------------------------------------


def test_bad_requests_are_einval_and_change_nothing() -> None:
    size = 64 * PS
    core = CoreStore(size)
    model = PageStore(size, allocator=XcfMalloc(heaps=1))
    try:
        for store in (core, model):
            store.write(0, payload("text", 0, 4 * PS, 1, 0))
        before = core.stats()
        bad_reads = [(-1, 10), (size, 1), (size - 10, 11), (0, size + 1), (2**63, PS), (0, -1)]
        bad_reads.append((0, MAX_REQ + 1))  # in range, over 1 MiB: only the core refuses
        for off, n in bad_reads:
            with pytest.raises(StoreError) as exc:
                core.read(off, n)
            assert exc.value.errno == errno.EINVAL, (off, n)
        bad_writes = [(-1, 10), (size, 1), (size - 10, 11), (2**63, 1), (0, MAX_REQ + 1)]
        for off, n in bad_writes:
            with pytest.raises(StoreError) as exc:
                core.write(off, bytes(n))
            assert exc.value.errno == errno.EINVAL, (off, n)
        for off, n in [(-1, 10), (size, 1), (size - 10, 11), (0, -1), (2**63, 2**63)]:
            with pytest.raises(StoreError) as exc:
                core.discard(off, n)
            assert exc.value.errno == errno.EINVAL, (off, n)
        assert core.stats() == before
        # Edge cases that are fine: empty requests at the end, a discard of the whole device.
        assert core.read(size, 0) == b"" and model.read(size, 0) == b""
        core.write(size, b"")
        assert core.read(0, size) == model.read(0, size)
        core.discard(0, size)
        assert core.read(0, PS) == bytes(PS)
        check_pool_invariants(core)
    finally:
        core.close()
        model.close()


def test_raw_binding_refuses_what_it_cannot_serve() -> None:
    """zcached._core.Store directly (no CoreStore range checks in front): no crash, no short
    or wrong-sized answer."""
    raw = _core.Store(16 * PS)
    try:
        with pytest.raises(ValueError):
            raw.read(0, MAX_REQ + 1)
        with pytest.raises(ValueError):
            raw.write(0, bytes(MAX_REQ + 1))
        for call in (
            lambda: raw.read(2**64 - 1, 1),
            lambda: raw.read(16 * PS - 1, 2),
            lambda: raw.write(2**63, b"x"),
            lambda: raw.write(16 * PS - 1, b"xy"),
            lambda: raw.discard(2**64 - 1, 2),
            lambda: raw.discard(PS, 2**64 - 1),
            lambda: raw.corrupt(2**64 - 1),
        ):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno in (errno.EINVAL, errno.EFBIG, errno.ENOENT)
        # A length past 32 bits must not be cut down to its low bits (4 GiB + 4096 read as 4096).
        with pytest.raises((ValueError, OverflowError)):
            raw.read(0, 2**32 + PS)
        assert raw.check() == 0
    finally:
        raw.close()
    with pytest.raises(ValueError):
        raw.read(0, PS)  # closed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size_bytes": 0},
        {"size_bytes": -PS},
        {"size_bytes": PS + 1},
        {"size_bytes": 1 << 50},  # more pages than handles
        {"compressor": "gzip"},
        {"compressor": "lz4", "level": 0},
        {"compressor": "lz4", "level": 65538},
        {"compressor": "zstd", "level": 23},
        {"heaps": 0},
        {"heaps": 65},
        {"huge_threshold": 0},
        {"huge_threshold": PS + 1},
        {"mem_limit": -1},
    ],
)
def test_bad_configuration_is_valueerror(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"size_bytes": 16 * PS, **kwargs}
    with pytest.raises(ValueError):
        CoreStore(**args)  # type: ignore[arg-type]


def test_configurations_the_model_accepts_the_core_accepts() -> None:
    for level in (-7, 1, 22):
        CoreStore(PS, compressor="zstd", level=level).close()
    for level in (1, 65537):
        CoreStore(PS, compressor="lz4", level=level).close()
    CoreStore(PS, heaps=64, huge_threshold=1).close()
    CoreStore(PS, huge_threshold=PS, mem_limit=PS).close()


def test_hoard_worker_heap_hands_sparse_vpages_to_the_global_heap() -> None:
    """Frees that leave a worker heap more than a quarter (and K vpages) empty hand its
    sparsest vpage to the global heap (xcfmalloc's Hoard bound), and its objects stay intact."""
    rng = random.Random(11)
    npages = 2048
    core = CoreStore(npages * PS, heaps=2)
    try:
        pages = [rng.randbytes(PS // 2) + bytes(PS // 2) for _ in range(npages)]
        for p, data in enumerate(pages):
            core.write(p * PS, data)
        assert core.allocator.stats().vpages_to_global == 0
        gone = set(rng.sample(range(npages), npages * 3 // 4))
        for p in gone:
            core.discard(p * PS, PS)
        assert core.allocator.stats().vpages_to_global > 0
        core.allocator.check()
        for p, data in enumerate(pages):
            assert core.read(p * PS, PS) == (bytes(PS) if p in gone else data)
    finally:
        core.close()
