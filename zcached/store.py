"""store: the page store, a page table from page index to stored object.

Owns: the page table of the block device (one entry per 4K page), the read/write/discard paths
with their byte-offset handling (read-modify-write of unaligned edges), integrity checking on
read, the memory limit as seen by callers (ENOSPC), the per-page locks, and the zram-style
counters (mm_stat, io_stat).
Must not: know compression formats (zcached.codec does), how objects are laid out in memory
(zcached.xcfmalloc does), or anything about FUSE (zcached's FUSE front turns StoreError into
``-errno``).  Compaction is the compactor's business; handles stay valid across it.

Page table (five flat arrays indexed by page number, 11 bytes per page of the device)::

    _state[p]   bytearray   EMPTY (0)       never written, or discarded: reads as zeros
                            SAME  (1)       every 8-byte word is the same: no pool memory
                            COMPRESSED (2)  an allocator object holds the compressed page
                            HUGE  (3)       an allocator object holds the raw 4096 bytes
    _handle[p]  array('I')  COMPRESSED/HUGE: the allocator handle (never 0);
                            SAME: the low 32 bits of the fill word; EMPTY: 0
    _csum[p]    array('I')  COMPRESSED/HUGE: checksum of the *uncompressed* page (codec.checksum);
                            SAME: the high 32 bits of the fill word; EMPTY: 0
    _cold[p]    bytearray   1: the COMPRESSED object is in the cold format (codec.encode_cold)
    _age[p]     bytearray   tried << 7 | the tick (7 bits) of the page's last read or write

Recompression (csrc/store.c: PAGE AGE, S5; this is its specification).  :meth:`tick` advances
the clock.  A page is idle after ``idle_ticks`` ticks untouched (ticks counted mod 128); a read
or a write of it (every page a request covers; a discard's merged edge pages) stamps it with
the current tick and clears tried.  :meth:`recompress` takes every idle page that holds an
object not in the cold format and not tried, and stores it again in the cold format when
that is smaller than its object; else it marks it tried.  It replaces the entry only if the
entry is still the one it decoded (checked under the stripe lock), keeping the checksum, and
frees the old object after.  A write always stores the fast format again.

The checksum lives beside the handle, not beside the data, so a stray write into the pool
cannot corrupt both.  Metadata per stored page: 9 B of page table here (allocated up front for
every page of the device), plus what xcfmalloc keeps per object (4 B handle table + 4 B
back-reference) and per pool page (~6 B per 4K of pool); see bench/store_bench.py.

INVARIANTS
 * ``_state[p] in (COMPRESSED, HUGE)`` iff ``_handle[p]`` is a live allocator handle owned by
   this store, and no other page entry holds the same handle.
 * A handle is freed exactly once: only by the thread that removed it from the table, after
   it removed it.  Once out of the table no other thread can reach it, so the free happens
   after the stripe lock is released.
 * A new object is stored *before* the table entry changes, and the old one freed after: a
   failed allocation (ENOSPC) leaves the page as it was (zram does the same, so an overwrite
   at the limit fails even if the new object would fit after freeing the old one).
 * A write request is atomic with respect to other requests: its new objects are all stored
   first (or all freed again on failure) and then committed under every stripe lock it covers
   at once, so no reader sees half a request and two overlapping writers never interleave
   page by page.
 * Bytes handed back by :meth:`PageStore.read` have matched their checksum (or are zero/same
   fill pages, which have no stored bytes to rot); anything else raises EIO.  The checksum is
   verified on every read, and on the read half of every read-modify-write (unaligned write or
   partial discard).  Objects moved by compaction are checked by xcfmalloc itself, which
   compares every copy with its source byte for byte before it repoints the handle (stronger
   than a checksum); the allocator offers no hook through which the store could also check its
   checksum at move time, so that happens at the next read (or :meth:`PageStore.scrub`).

LOCKING
 * NSTRIPES stripe locks; page ``p`` belongs to stripe ``(p >> STRIPE_SHIFT) % NSTRIPES``
   (runs of 64 pages = 256 KiB share a stripe, so a 1 MiB request takes at most 5 locks).  The
   stripe lock guards the three table entries of its pages.  A request takes the locks of all
   the stripes it covers, in ascending stripe order (no deadlock), and holds them only for
   the table lookups/updates plus copying object bytes out of/into the allocator; compression
   and decompression of whole pages happen outside any lock.  Unaligned edge pages of a write
   or discard are read, merged and re-encoded under the lock (a read-modify-write must not
   race another writer of the same page).
 * xcfmalloc's own locks are taken inside stripe locks (through its methods), never the other
   way round.
 * ``_stat_lock`` guards the counters; it is a leaf lock held for a few integer additions
   (taken after the stripe locks are released, never inside them).  compr_data_size is the
   allocator's requested_bytes (the pool holds only this store's objects), so replacing an
   object needs no ``size()`` call.

One path per act.  The C core (csrc/store.c) carries the speed; this module is its
specification, so a 4K swap-in and a 1 MiB write take the same path: a read snapshots its pages
under their stripe locks and decodes them after; a write encodes and stores its whole pages
outside the locks, then merges its unaligned edges and commits everything under the locks
(:meth:`PageStore._commit_request`).  Earlier versions had a 4K fast path and helper threads
for zstd batches while this was the data path; they went when the C core took it over.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

from zcached import codec
from zcached.codec import COMPRESSED, HUGE, PAGE_SIZE, SAME, ZSTD_LEVELS, Codec, CodecError
from zcached.xcfmalloc import PoolFullError, XcfMalloc

PAGE_SHIFT: Final = 12
PAGE_MASK: Final = PAGE_SIZE - 1
EMPTY: Final = 0
STRIPE_SHIFT: Final = 6  # 64 pages per stripe run
NSTRIPES: Final = 64
STRIPE_MASK: Final = NSTRIPES - 1
U32: Final = 0xFFFFFFFF
TABLE_BYTES_PER_PAGE: Final = 4 + 4 + 1 + 1 + 1  # _handle, _csum, _state, _cold, _age
AGE_TRIED: Final = 0x80
AGE_EPOCH: Final = 0x7F
MAX_IDLE_TICKS: Final = 64
RECOMPRESS_REPORT: Final = (
    "scanned", "candidates", "recompressed", "kept", "raced", "failed",
    "bytes_before", "bytes_after", "dict",
)  # fmt: skip

Entry = tuple[int, int, int, int, int]  # (page, state, handle or word low, csum or word high, size)

_ZERO_PAGE: Final = bytes(PAGE_SIZE)
_CLEAR_RUN: Final = 512  # pages scanned per slice when a discard clears a range


class StoreError(OSError):
    """A request the store cannot serve; ``.errno`` is what the FUSE front replies (negated)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the counters; field names follow zram's mm_stat and io_stat."""

    # mm_stat
    orig_data_size: int  # bytes of pages stored (incl. same-filled pages), like zram
    compr_data_size: int  # bytes of the objects in the pool (compressed sizes, huge = 4096)
    mem_used_total: int  # pool bytes taken from the OS (allocator pool_bytes)
    mem_limit: int  # 0 = no limit
    mem_used_max: int  # high-water mark of mem_used_total
    same_pages: int  # pages stored as a fill word (no pool memory)
    pages_compacted: int  # pool pages freed by compaction (allocator)
    huge_pages: int  # pages stored raw because they did not compress
    # io_stat and friends (counts in pages, or requests for failed_*)
    failed_reads: int
    failed_writes: int
    checksum_errors: int  # pages whose stored object failed verification (EIO)
    reads: int  # pages read (a failed request's pages too; the failure is in failed_reads)
    writes: int
    discards: int  # whole pages discarded
    # the page table itself
    pages_stored: int
    npages: int
    table_bytes: int  # bytes of the page table (TABLE_BYTES_PER_PAGE x npages)
    # recompression
    cold_pages: int = 0  # pages whose object is in the cold format
    cold_bytes: int = 0  # bytes of those objects
    recompressed: int = 0  # pages recompressed so far


class PageStore:
    """A block device of ``size_bytes`` kept as compressed 4K pages in an XcfMalloc pool."""

    def __init__(
        self,
        size_bytes: int,
        *,
        compressor: str = "lz4",
        level: int | None = None,
        mem_limit: int = 0,
        allocator: XcfMalloc | None = None,
        huge_threshold: int = codec.DEFAULT_HUGE_THRESHOLD,
    ) -> None:
        if size_bytes <= 0 or size_bytes & PAGE_MASK:
            raise ValueError(f"device size must be a positive multiple of {PAGE_SIZE} bytes")
        if mem_limit < 0:
            raise ValueError("mem_limit must be >= 0 (0 = no limit)")
        self.size_bytes = size_bytes
        self.npages = size_bytes >> PAGE_SHIFT
        self.codec = Codec(compressor, level, huge_threshold=huge_threshold)
        self.allocator = allocator if allocator is not None else XcfMalloc()
        if mem_limit:
            self.allocator.max_pool_bytes = mem_limit
        n = self.npages
        self._state = bytearray(n)
        self._handle = array("I", bytes(4 * n))
        self._csum = array("I", bytes(4 * n))
        self._cold = bytearray(n)
        self._age = bytearray(n)
        self._epoch = 0
        self._recompressed = 0
        self._locks = [threading.Lock() for _ in range(NSTRIPES)]
        self._stat_lock = threading.Lock()
        self._pages_stored = 0
        self._same = 0
        self._huge = 0
        self._failed_reads = 0
        self._failed_writes = 0
        self._checksum_errors = 0
        self._reads = 0
        self._writes = 0
        self._discards = 0

    # ---- limits ------------------------------------------------------------------------------

    @property
    def mem_limit(self) -> int:
        return self.allocator.max_pool_bytes or 0

    @mem_limit.setter
    def mem_limit(self, value: int) -> None:
        if value < 0:
            raise ValueError("mem_limit must be >= 0 (0 = no limit)")
        self.allocator.max_pool_bytes = value or None

    # ---- locking -----------------------------------------------------------------------------

    def _locks_for(self, first: int, last: int) -> list[threading.Lock]:
        """The stripe locks of pages first..last (inclusive), in acquisition order."""
        lo, hi = first >> STRIPE_SHIFT, last >> STRIPE_SHIFT
        if lo == hi:
            return [self._locks[lo & STRIPE_MASK]]
        if hi - lo >= STRIPE_MASK:
            return self._locks
        return [self._locks[i] for i in sorted({r & STRIPE_MASK for r in range(lo, hi + 1)})]

    @contextlib.contextmanager
    def _locked(self, first: int, last: int) -> Iterator[None]:
        """Hold the stripe locks of pages first..last (inclusive)."""
        locks = self._locks_for(first, last)
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise StoreError(
                errno.EINVAL,
                f"range {offset}+{length} is outside the device ({self.size_bytes} bytes)",
            )

    # ---- read --------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; StoreError(EIO) if any page fails verification."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        start = offset & PAGE_MASK
        return b"".join(self._read_pages(first, last))[start : start + length]

    def _read_pages(self, first: int, last: int) -> list[bytes]:
        """Pages first..last, verified: one snapshot of them all under their stripe locks (so
        the request sees no half-done write), then decoding and checks outside the locks.  The
        pages count as read once snapshotted, also those of a request that then fails."""
        with self._locked(first, last):
            snaps = [self._snapshot(p) for p in range(first, last + 1)]
            for p in range(first, last + 1):
                self._touch(p)
        with self._stat_lock:
            self._reads += len(snaps)
        return [self._materialise(p, snap) for p, snap in enumerate(snaps, first)]

    def _touch(self, p: int) -> None:
        """Page p was read or written (caller holds its stripe lock): young, not tried."""
        self._age[p] = self._epoch & AGE_EPOCH

    def _decode_entry(self, state: int, cold: int, stored: bytes, csum: int) -> bytes:
        """The page an object holds, verified against csum; CodecError otherwise."""
        if not cold:
            return self.codec.decode_checked(state, stored, csum)
        page = codec.decode_cold(stored)
        if codec.checksum(page) != csum:
            raise CodecError("checksum mismatch")
        return page

    def _snapshot(self, p: int) -> tuple[int, int, int | bytes, int]:
        """(state, csum, handle-or-stored-bytes, cold) of page p; caller holds its stripe
        lock."""
        state = self._state[p]
        if state == EMPTY:
            return EMPTY, 0, 0, 0
        if state == SAME:
            return SAME, self._csum[p], self._handle[p], 0
        return state, self._csum[p], self.allocator.read(self._handle[p]), self._cold[p]

    def _materialise(self, p: int, entry: tuple[int, int, int | bytes, int]) -> bytes:
        """The page from a snapshot, verified; StoreError(EIO) on any mismatch."""
        state, csum, stored, cold = entry
        if state == EMPTY:
            return _ZERO_PAGE
        if state == SAME:
            assert isinstance(stored, int)
            return codec.fill_page((csum << 32) | stored)
        assert isinstance(stored, bytes)
        try:
            return self._decode_entry(state, cold, stored, csum)
        except CodecError as e:
            self._integrity_error(p, str(e))

    def _integrity_error(self, p: int, why: str) -> NoReturn:
        with self._stat_lock:
            self._checksum_errors += 1
            self._failed_reads += 1
        raise StoreError(errno.EIO, f"page {p} (offset {p << PAGE_SHIFT}) is corrupt: {why}")

    # ---- write -------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``.  ENOSPC at the pool limit, EIO if an unaligned edge page
        it must merge with is corrupt; either way no page of the device changes."""
        buf = bytes(data)
        length = len(buf)
        self._check_range(offset, length)
        if length == 0:
            return
        end = offset + length
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        full_lo = (offset + PAGE_MASK) >> PAGE_SHIFT  # first page the request covers wholly
        full_hi = end >> PAGE_SHIFT  # one past the last page it covers wholly
        new: list[Entry] = []
        try:
            pos = (full_lo << PAGE_SHIFT) - offset
            for p in range(full_lo, full_hi):  # whole pages: encoded and stored outside locks
                new.append(self._encode_store(p, buf[pos : pos + PAGE_SIZE]))
                pos += PAGE_SIZE
            old = self._commit_request(offset, buf, first, last, full_lo, full_hi, new)
        except BaseException as e:
            self._drop(new)
            with self._stat_lock:
                self._failed_writes += 1
            if isinstance(e, PoolFullError):
                raise StoreError(errno.ENOSPC, f"pool memory limit reached: {e}") from None
            raise
        self._release(old, added=new, io_pages=last - first + 1)

    def close(self) -> None:
        """Nothing to release: the store holds no threads or descriptors (CoreStore's
        interface, which does)."""

    def _commit_request(
        self,
        offset: int,
        buf: bytes,
        first: int,
        last: int,
        full_lo: int,
        full_hi: int,
        new: list[Entry],
    ) -> list[tuple[int, int, int]]:
        """Under the request's stripe locks: read-modify-write its unaligned first and last
        page (if any), then commit all its entries at once; returns the replaced entries."""
        end = offset + len(buf)
        with self._locked(first, last):
            for p in sorted({first, last}):
                if full_lo <= p < full_hi:
                    continue  # covered wholly: already encoded
                base = p << PAGE_SHIFT
                lo, hi = max(offset, base), min(end, base + PAGE_SIZE)
                page = self._materialise(p, self._snapshot(p))
                merged = page[: lo - base] + buf[lo - offset : hi - offset] + page[hi - base :]
                new.append(self._encode_store(p, merged))
            return self._commit_locked(new)

    def _encode_store(self, p: int, page: bytes) -> Entry:
        kind, payload, csum = self.codec.encode(page)
        if kind == SAME:
            assert isinstance(payload, int)
            return p, SAME, payload & U32, payload >> 32, 0
        assert isinstance(payload, bytes)
        return p, kind, self.allocator.store(payload), csum, len(payload)

    def _commit_locked(self, new: list[Entry]) -> list[tuple[int, int, int]]:
        """Point the table at the new entries; returns the old (state, handle, page) entries."""
        state, handle, csums = self._state, self._handle, self._csum
        old = []
        for p, st, h, c, _ in new:
            if state[p]:
                old.append((state[p], handle[p], p))
            state[p] = st
            handle[p] = h
            csums[p] = c
            self._cold[p] = 0
            self._touch(p)
        return old

    def _drop(self, new: list[Entry]) -> None:
        """Free the objects of entries that were never committed."""
        free = self.allocator.free
        for _, st, h, _, _ in new:
            if st in (COMPRESSED, HUGE):
                free(h)
        new.clear()

    def _release(
        self,
        old: list[tuple[int, int, int]],
        *,
        added: list[Entry] | None = None,
        io_pages: int = 0,
        discarded: int = 0,
    ) -> None:
        """Free replaced objects (no lock held) and account for the change."""
        free = self.allocator.free
        d_stored = d_same = d_huge = 0
        for st, h, _ in old:
            d_stored -= 1
            if st == SAME:
                d_same -= 1
            else:
                free(h)
                if st == HUGE:
                    d_huge -= 1
        for _, st, _, _, _ in added or ():
            d_stored += 1
            if st == SAME:
                d_same += 1
            elif st == HUGE:
                d_huge += 1
        with self._stat_lock:
            self._pages_stored += d_stored
            self._same += d_same
            self._huge += d_huge
            if discarded:
                self._discards += discarded
            else:
                self._writes += io_pages

    # ---- discard -----------------------------------------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset``: whole pages are freed at once, partial edge
        pages get zeros, so the whole range reads back as zeros (FALLOC_FL_PUNCH_HOLE)."""
        self._check_range(offset, length)
        if length == 0:
            return
        end = offset + length
        first = offset >> PAGE_SHIFT
        last = (end - 1) >> PAGE_SHIFT
        full_lo = (offset + PAGE_MASK) >> PAGE_SHIFT
        full_hi = end >> PAGE_SHIFT
        edges = [p for p in {first, last} if not full_lo <= p < full_hi]
        new: list[Entry] = []
        old: list[tuple[int, int, int]] = []
        with self._locked(first, last):
            try:
                for p in sorted(edges):
                    if self._state[p] == EMPTY or (
                        self._state[p] == SAME and self._handle[p] == 0 and self._csum[p] == 0
                    ):
                        continue  # already zeros
                    base = p << PAGE_SHIFT
                    lo, hi = max(offset, base) - base, min(end, base + PAGE_SIZE) - base
                    page = self._materialise(p, self._snapshot(p))
                    new.append(self._encode_store(p, page[:lo] + bytes(hi - lo) + page[hi:]))
            except BaseException as e:
                self._drop(new)
                if isinstance(e, PoolFullError):
                    raise StoreError(errno.ENOSPC, f"pool memory limit reached: {e}") from None
                raise
            old = self._commit_locked(new)
            if full_lo < full_hi:
                old += self._clear_locked(full_lo, full_hi)
        self._release(old, added=new, discarded=max(0, full_hi - full_lo))

    def _clear_locked(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Empty pages lo..hi-1; returns their old entries.  Caller holds their stripe locks."""
        state, handle, csums = self._state, self._handle, self._csum
        old = []
        for i in range(lo, hi, _CLEAR_RUN):
            j = min(i + _CLEAR_RUN, hi)
            run = state[i:j]
            if run.count(EMPTY) == j - i:
                continue  # a run of empty pages costs one C-level scan
            for k, st in enumerate(run, i):
                if st:
                    old.append((st, handle[k], k))
                    handle[k] = 0
                    csums[k] = 0
            state[i:j] = bytes(j - i)
            self._cold[i:j] = bytes(j - i)
        return old

    # ---- recompression (the module docstring) ------------------------------------------------

    def tick(self) -> None:
        """Advance the clock of page ages by one tick."""
        self._epoch += 1

    def recompress(
        self, start: int, max_scan: int, idle_ticks: int, level: int
    ) -> tuple[int, dict[str, int]]:
        """Store the idle pages of start..start+max_scan-1 (0: to the end) again in the cold
        format at zstd ``level`` when smaller; where to go on, and the report (the names of
        csrc/store.h's struct zc_recompress_report; ``dict`` is always 0 here)."""
        if not 1 <= idle_ticks <= MAX_IDLE_TICKS or level not in ZSTD_LEVELS:
            raise ValueError("recompress: idle_ticks must be in 1..64 and level a zstd level")
        end = min(start + max_scan, self.npages) if max_scan else self.npages
        report = dict.fromkeys(RECOMPRESS_REPORT, 0)
        for p in range(start, end):
            report["scanned"] += 1
            entry = (self._state[p], self._handle[p], self._csum[p])
            if not self._is_candidate(p, idle_ticks):
                continue
            report["candidates"] += 1
            self._recompress_page(p, entry, level, report)
        return end, report

    def _is_candidate(self, p: int, idle_ticks: int) -> bool:
        age = self._age[p]
        idle = (self._epoch - (age & AGE_EPOCH)) & AGE_EPOCH
        return (
            self._state[p] > SAME and not self._cold[p] and not age & AGE_TRIED
            and idle >= idle_ticks
        )  # fmt: skip

    def _recompress_page(
        self, p: int, entry: tuple[int, int, int], level: int, report: dict[str, int]
    ) -> None:
        lock = self._locks[(p >> STRIPE_SHIFT) & STRIPE_MASK]
        age = self._age[p]
        with lock:
            if (self._state[p], self._handle[p], self._csum[p]) != entry:
                report["raced"] += 1
                return
            snap = self._snapshot(p)
        state, _h, csum = entry
        stored = snap[2]
        assert isinstance(stored, bytes)
        try:
            page = self._decode_entry(state, 0, stored, csum)
        except CodecError:
            with self._stat_lock:
                self._checksum_errors += 1
            report["failed"] += 1
            return
        blob = codec.encode_cold(page, level)
        if blob is None or len(blob) >= len(stored):
            with lock:
                if self._age[p] == age:
                    self._age[p] = age | AGE_TRIED
            report["kept"] += 1
            return
        try:
            h = self.allocator.store(blob)
        except PoolFullError:
            report["failed"] += 1
            return
        with lock:
            done = (self._state[p], self._handle[p], self._csum[p]) == entry
            if done:
                self._state[p] = COMPRESSED
                self._handle[p] = h
                self._cold[p] = 1
        if not done:
            self.allocator.free(h)
            report["raced"] += 1
            return
        self.allocator.free(entry[1])
        with self._stat_lock:
            self._recompressed += 1
            if state == HUGE:
                self._huge -= 1
        report["recompressed"] += 1
        report["bytes_before"] += len(stored)
        report["bytes_after"] += len(blob)

    # ---- scrubbing ---------------------------------------------------------------------------

    def scrub(self) -> list[int]:
        """Verify every stored page (e.g. after compaction); returns the pages that fail.

        Each failure also counts in checksum_errors (not in failed_reads: no request failed).
        Runs one lock stripe-run at a time, so I/O goes on meanwhile.
        """
        bad = []
        run = 1 << STRIPE_SHIFT
        for lo in range(0, self.npages, run):
            hi = min(lo + run, self.npages)
            with self._locks[(lo >> STRIPE_SHIFT) & STRIPE_MASK]:
                entries = [(p, self._snapshot(p)) for p in range(lo, hi) if self._state[p] > SAME]
            for p, (state, csum, stored, cold) in entries:
                assert isinstance(stored, bytes)
                try:
                    self._decode_entry(state, cold, stored, csum)
                    ok = True
                except CodecError:
                    ok = False
                if not ok:
                    bad.append(p)
                    with self._stat_lock:
                        self._checksum_errors += 1
        return bad

    # ---- stats -------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        pool = self.allocator.stats()
        cold = [p for p, c in enumerate(self._cold) if c]
        cold_pages = len(cold)
        cold_bytes = sum(self.allocator.size(self._handle[p]) for p in cold)
        with self._stat_lock:
            stored = self._pages_stored
            return StoreStats(
                orig_data_size=stored << PAGE_SHIFT,
                compr_data_size=pool.requested_bytes,  # the pool holds only our objects
                mem_used_total=pool.pool_bytes,
                mem_limit=self.mem_limit,
                mem_used_max=pool.pool_bytes_max,
                same_pages=self._same,
                pages_compacted=pool.pages_compacted,
                huge_pages=self._huge,
                failed_reads=self._failed_reads,
                failed_writes=self._failed_writes,
                checksum_errors=self._checksum_errors,
                reads=self._reads,
                writes=self._writes,
                discards=self._discards,
                pages_stored=stored,
                npages=self.npages,
                table_bytes=TABLE_BYTES_PER_PAGE * self.npages,
                cold_pages=cold_pages,
                cold_bytes=cold_bytes,
                recompressed=self._recompressed,
            )

    def metadata_bytes(self) -> int:
        """Bytes the page table occupies (the arrays' buffers, not the Python object headers)."""
        return TABLE_BYTES_PER_PAGE * self.npages
