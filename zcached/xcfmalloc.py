"""xcfmalloc: zcached's compressed-object allocator.

Owns: the pool of 4K pages taken from the OS (anonymous mmap), the size classes, the vpages
(arrays of 4K pages given to one class), the handles that name objects, and compaction.
Must not: know what an object holds (compression, checksums and page numbers belong to the
page store), do I/O, or allocate a Python object per stored object.

Design (N. Gupta's xcfmalloc from linux-mm, 2011; cf. mm/zsmalloc.c):

* Size classes.  Objects of 1..4096 bytes are rounded up to a multiple of CLASS_STEP (16): 256
  classes, class ``c`` holds objects of at most ``(c + 1) * 16`` bytes.  Internal waste is at
  most 15 bytes per object.

* vpages.  Each class carves its objects out of *vpages*: arrays of ``ppv`` 0-order 4K pages that
  need not be contiguous (the array holds page frame numbers, PFNs).  Objects are laid end to
  end across the array, so an object of at most 4096 bytes crosses at most one 4K boundary.
  ``ppv`` (1..32) is chosen per class to minimise the tail of the vpage that no object can use,
  the way zsmalloc picks pages per zspage; see :func:`class_table` (worst class wastes 2.7%,
  the mean 0.13%).

* Lazy pages, and freeing single pages.  A vpage starts with no pages at all: a page is taken
  from the arena when the first object that overlaps it is allocated, and it is given back to
  the OS (madvise) as soon as the last object overlapping it is freed, even while the rest of
  its vpage is in use.  That is the difference from zsmalloc, which frees a zspage only when
  all of it is empty.  ``page_users[p]`` counts the live slots that overlap page ``p``;
  INVARIANT: ``pfn[p] != NO_PAGE`` if and only if ``page_users[p] > 0``.

* Handles.  ``alloc`` returns an opaque integer handle, never a pointer::

      handle = (index << 8) | class_id        index >= 1, so 0 is never a handle

  ``index`` names an entry of the class's handle table ``h_loc``.  A live entry holds the
  object's location and length::

      h_loc[index] = (slot << 4) | (class_size - length)     slot = vpage * opv + slot_in_vpage

  Compaction moves an object by rewriting ``h_loc[index]``; the handle itself never changes.
  The back-reference ``slot_owner[slot]`` holds ``index`` for a live slot, so compaction can
  find the handle of what it moves; a free slot holds ``FREE_SLOT | next free slot`` (the
  vpage's free list is threaded through it).  Metadata per object: 4 B of ``h_loc`` + 4 B of
  ``slot_owner``, plus 6 B per 4K page (PFN and user count) and 14 B per vpage.

* Fullness groups.  Each heap keeps its vpages of a class in NGROUPS doubly linked lists (threaded
  through arrays) by how full they are: group ``inuse * 10 // opv`` for a partly used vpage,
  FULL_GROUP for a full one.  An empty vpage is released at once.  alloc takes the fullest
  non-full vpage (dense packing); compaction moves objects from the sparsest vpage into the
  fullest, and runs only while the class has at least one vpage's worth of free slots, which
  guarantees the source empties completely.

* Heaps (Hoard, Berger et al., ASPLOS 2000).  Each class is split between a global heap (0)
  and ``heaps`` worker heaps; a vpage belongs to exactly one heap (``vp_heap``), and a thread
  allocates from the heap it is bound to (``bind_heap``; else round robin on first use), so the
  I/O workers do not share a lock.  A free goes to the heap that owns the object's vpage.  The
  bound: with ``u`` live slots and ``a`` slot capacity in a worker heap, when after a free

      u < (1 - f) a   and   u < a - K S        (f = 1/4, K = 2, S = one vpage of slots)

  the heap hands its sparsest vpage, objects and all, to the global heap.  A worker heap that
  needs a vpage takes the global heap's fullest before asking the OS for pages.  So the empty
  space a worker heap holds stays within max(a/4, 2 vpages) (plus the vpage being filled),
  however the frees are spread; compaction runs in every heap.

  Why f = 1/4: it caps a worker heap's slot capacity at u / (1 - f) = 4/3 of its live slots
  between compaction runs, which is the same order as the daemon's trigger (compact when the
  pool passes 1 / (1 - 0.1) = 1.11x the bytes in use), and the real cost is lower because
  empty 4K pages inside a vpage are already given back one by one.  A smaller f would make a
  heap under random frees hand vpages over (two locks, a walk of the vpage's slots) almost
  every free; a larger one lets a worker sit on more of the pool.  Why K = 2: hysteresis for
  the many small classes where a worker heap holds one or two vpages.  With K = 0 such a heap
  would hand over its only partly used vpage once it is a quarter empty and take it straight
  back (as the global heap's fullest) at its next alloc, a round trip per free/alloc pair;
  with K = 2 it keeps up to two vpages' worth of free slots whatever f says, which costs at
  most 2 vpages of slots per class and worker (less in pages, see above).  Checked by
  tests/test_xcfmalloc.py (the bound) and measured end to end by bench/compact_bench.py.

* Locking.  Each heap of each class has its own lock (``_Heap.lock``): it guards the heap's
  groups and counters and every array entry of the vpages it owns, including the handle-table
  entries of their objects.  To reach an object by handle, read its vpage's owner, lock that
  heap and check the owner again (the vpage may have moved between heaps meanwhile).  Lock
  order: a worker heap, then the global heap, then the class's ``grow_lock`` (growth of the
  class arrays and the handle table), then the arena lock (the PFN free list and the pool
  counters; held for a few list operations).  Compaction holds one heap lock at a time, for at
  most COMPACT_BATCH moves.  Reading or freeing a handle while another thread frees it is a
  caller bug: the page store serialises each page.

* Memory from the OS.  The arena maps anonymous chunks of CHUNK_PAGES pages and hands out single
  4K pages from them.  A page given back is dropped with MADV_DONTNEED_LOCKED (the daemon runs
  under mlockall, where plain MADV_DONTNEED fails), falling back to MADV_DONTNEED on older
  kernels; its RSS falls at once.  ``pool_bytes`` = pages handed out x 4096: the same meaning as
  zram's mem_used_total.
"""

from __future__ import annotations

import itertools
import mmap
import sys
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_OBJECT = PAGE_SIZE
CLASS_STEP = 16
CLASS_SHIFT = 4
NCLASSES = MAX_OBJECT // CLASS_STEP  # 256
MAX_VPAGE_PAGES = 32

CHUNK_SHIFT = 10
CHUNK_PAGES = 1 << CHUNK_SHIFT  # 4 MiB of address space per mmap; untouched pages cost nothing
NO_PAGE = -1

HANDLE_CLASS_BITS = 8
HANDLE_CLASS_MASK = (1 << HANDLE_CLASS_BITS) - 1
MAX_HANDLE_INDEX = (1 << (32 - HANDLE_CLASS_BITS)) - 1  # handles fit in 32 bits
LOC_DELTA_BITS = 4
LOC_DELTA_MASK = (1 << LOC_DELTA_BITS) - 1
MAX_SLOTS_PER_CLASS = 1 << (32 - LOC_DELTA_BITS)
DEAD = 0xFFFFFFFF  # h_loc value of a handle index that is not live
FREE_SLOT = 0x80000000  # slot_owner tag of a free slot; low bits: next free slot in the vpage

NGROUPS = 11  # groups 0..9 by tenths of fullness, 10 = full
FULL_GROUP = NGROUPS - 1
COMPACT_BATCH = 32  # objects moved per hold of a class lock

HANDLE_BATCH = 64  # handle indexes a heap takes from its class's table at a time

DEFAULT_HEAPS = 4  # worker heaps beside the global heap (one per FUSE worker thread)
MAX_HEAPS = 64
HOARD_F_NUM, HOARD_F_DEN = 1, 4  # f = 1/4: a worker heap may be a quarter empty ...
HOARD_K = 2  # ... or hold K = 2 vpages' worth of free slots, whichever is more

MADV_DONTNEED_LOCKED = 24  # Linux 5.18+; not exported by Python's mmap module


class PoolFullError(MemoryError):
    """alloc would take the pool past max_pool_bytes."""


def class_of(size: int) -> int:
    """Size class for an object of ``size`` bytes (1..MAX_OBJECT)."""
    return (size - 1) >> CLASS_SHIFT


def pages_per_vpage(class_size: int) -> int:
    """The vpage length (in 4K pages) that wastes the least of its tail; ties go to fewer pages."""
    best, best_waste = 1, 1.0
    for n in range(1, MAX_VPAGE_PAGES + 1):
        waste = (n * PAGE_SIZE) % class_size / (n * PAGE_SIZE)
        if waste < best_waste - 1e-12:
            best, best_waste = n, waste
    return best


def class_table() -> list[tuple[int, int, int, float]]:
    """(class size, pages per vpage, objects per vpage, tail waste) for every class."""
    rows = []
    for cid in range(NCLASSES):
        size = (cid + 1) * CLASS_STEP
        ppv = pages_per_vpage(size)
        opv = ppv * PAGE_SIZE // size
        rows.append((size, ppv, opv, 1 - opv * size / (ppv * PAGE_SIZE)))
    return rows


# --------------------------------------------------------------------------------------------
# The arena: single 4K pages from anonymous mmap chunks.
# --------------------------------------------------------------------------------------------


class _Arena:
    """Hands out and takes back single 4K pages, named by PFN (chunk << CHUNK_SHIFT | page)."""

    def __init__(self, max_pool_bytes: int | None) -> None:
        self.lock = threading.Lock()
        self.chunks: list[mmap.mmap] = []
        self.views: list[memoryview] = []
        self.free_pfns = array("i")  # pages not handed out; none of them is resident
        self.pages = 0
        self.pages_max = 0
        self.pages_freed = 0
        self.max_pool_bytes = max_pool_bytes
        self._madv = MADV_DONTNEED_LOCKED

    def take(self, n: int, limited: bool) -> list[int]:
        """n pages; PoolFullError (and nothing taken) if that would pass the limit."""
        with self.lock:
            if (
                limited
                and self.max_pool_bytes is not None
                and (self.pages + n) * PAGE_SIZE > self.max_pool_bytes
            ):
                raise PoolFullError("xcfmalloc: pool limit reached")
            while len(self.free_pfns) < n:
                self._grow()
            pfns = [self.free_pfns.pop() for _ in range(n)]
            self.pages += n
            self.pages_max = max(self.pages_max, self.pages)
            return pfns

    def give_back(self, pfn: int) -> None:
        """Return one page to the OS: its contents are gone and its RSS is released."""
        self._drop(pfn)
        with self.lock:
            self.free_pfns.append(pfn)
            self.pages -= 1
            self.pages_freed += 1

    def _drop(self, pfn: int) -> None:
        chunk = self.chunks[pfn >> CHUNK_SHIFT]
        start = (pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT
        try:
            chunk.madvise(self._madv, start, PAGE_SIZE)
        except OSError:
            if self._madv == mmap.MADV_DONTNEED:
                raise
            self._madv = mmap.MADV_DONTNEED  # kernel without MADV_DONTNEED_LOCKED
            chunk.madvise(self._madv, start, PAGE_SIZE)

    def _grow(self) -> None:
        chunk = mmap.mmap(-1, CHUNK_PAGES * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = len(self.chunks) << CHUNK_SHIFT
        self.chunks.append(chunk)
        self.views.append(memoryview(chunk))
        # Pop order is low pages first, so a fresh pool fills its chunks from the start.
        self.free_pfns.extend(range(base + CHUNK_PAGES - 1, base - 1, -1))

    def read(self, pfn: int, offset: int, length: int) -> bytes:
        start = ((pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT) + offset
        return self.views[pfn >> CHUNK_SHIFT][start : start + length].tobytes()

    def write(self, pfn: int, offset: int, data: memoryview) -> None:
        start = ((pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT) + offset
        self.views[pfn >> CHUNK_SHIFT][start : start + len(data)] = data

    def address(self, pfn: int) -> int:
        """Virtual address of a page (for tests that ask the kernel about residency)."""
        import ctypes

        chunk = self.chunks[pfn >> CHUNK_SHIFT]
        base = ctypes.addressof(ctypes.c_char.from_buffer(chunk))
        return base + ((pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT)

    def metadata_bytes(self) -> int:
        return sys.getsizeof(self.free_pfns) + 200 * len(self.chunks)


# --------------------------------------------------------------------------------------------
# A size class: the arrays shared by its heaps (vpages, pages, slots, handle table).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassStats:
    size: int
    pages_per_vpage: int
    objs_per_vpage: int
    objects: int
    vpages: int
    pages: int
    requested_bytes: int
    free_slots: int


class _SizeClass:
    """Geometry and flat arrays of one class; which heap owns a vpage is in ``vp_heap``.

    ``grow_lock`` guards growth of the arrays, the free vpage ids and the handle table; entries
    of a vpage (and the handle entries of its objects) are guarded by the lock of the heap that
    owns the vpage.  Growing an array while another thread indexes it is safe in CPython: each
    index and append is one call made under the GIL.
    """

    def __init__(self, cid: int, arena: _Arena, nheaps: int) -> None:
        self.cid = cid
        self.size = (cid + 1) * CLASS_STEP
        self.ppv = pages_per_vpage(self.size)
        self.opv = self.ppv * PAGE_SIZE // self.size
        self.arena = arena
        self.grow_lock = threading.Lock()
        # per vpage
        self.vp_heap = array("b")  # owning heap; -1 = released (its id is on free_vpids)
        self.vp_inuse = array("H")
        self.vp_free_head = array("H")  # first free slot in the vpage; opv = none
        self.vp_next = array("i")
        self.vp_prev = array("i")
        self.vp_group = array("b")
        self.free_vpids = array("i")
        # per page of every vpage (vpage * ppv + page)
        self.pfn = array("i")
        self.page_users = array("H")
        # per slot of every vpage (vpage * opv + slot)
        self.slot_owner = array("I")
        # per handle index (index 0 is never used, so no handle is 0)
        self.h_loc = array("I", [DEAD])
        self.heaps = [_Heap(self, hid) for hid in range(nheaps)]

    # ---- geometry ------------------------------------------------------------------------

    def slot_pages(self, slot: int) -> range:
        """Indexes (within the vpage) of the pages that vpage-local ``slot`` overlaps."""
        off = slot * self.size
        return range(off >> PAGE_SHIFT, ((off + self.size - 1) >> PAGE_SHIFT) + 1)

    def locate(self, gslot: int) -> tuple[int, int]:
        """(index into pfn of the first page, offset in it) of a class slot."""
        vp, slot = divmod(gslot, self.opv)
        off = slot * self.size
        return vp * self.ppv + (off >> PAGE_SHIFT), off & (PAGE_SIZE - 1)

    def length_of(self, loc: int) -> int:
        return self.size - (loc & LOC_DELTA_MASK)

    # ---- object bytes --------------------------------------------------------------------

    def read_slot(self, gslot: int, length: int) -> bytes:
        p, off = self.locate(gslot)
        if off + length <= PAGE_SIZE:
            return self.arena.read(self.pfn[p], off, length)
        head = PAGE_SIZE - off
        return self.arena.read(self.pfn[p], off, head) + self.arena.read(
            self.pfn[p + 1], 0, length - head
        )

    def write_slot(self, gslot: int, data: memoryview) -> None:
        p, off = self.locate(gslot)
        if off + len(data) <= PAGE_SIZE:
            self.arena.write(self.pfn[p], off, data)
            return
        head = PAGE_SIZE - off
        self.arena.write(self.pfn[p], off, data[:head])
        self.arena.write(self.pfn[p + 1], 0, data[head:])

    # ---- growth (grow_lock) ----------------------------------------------------------------

    def new_vpage_id(self) -> int:
        """An unused vpage id, its slots threaded into a free list and no pages held."""
        opv = self.opv
        with self.grow_lock:
            if self.free_vpids:
                vp = self.free_vpids.pop()
                first = vp * opv
                for s in range(opv):
                    self.slot_owner[first + s] = FREE_SLOT | (s + 1)
                self.vp_inuse[vp] = 0
                self.vp_free_head[vp] = 0
                return vp
            vp = len(self.vp_inuse)
            if (vp + 1) * opv > MAX_SLOTS_PER_CLASS:
                raise PoolFullError(f"xcfmalloc: class {self.size} is out of slots")
            for arr, val in (
                (self.vp_heap, -1),
                (self.vp_inuse, 0),
                (self.vp_free_head, 0),
                (self.vp_next, -1),
                (self.vp_prev, -1),
                (self.vp_group, -1),
            ):
                arr.append(val)
            self.pfn.extend([NO_PAGE] * self.ppv)
            self.page_users.extend([0] * self.ppv)
            self.slot_owner.extend([FREE_SLOT | (s + 1) for s in range(opv)])
            return vp

    def free_vpage_id(self, vp: int) -> None:
        with self.grow_lock:
            self.vp_heap[vp] = -1
            self.free_vpids.append(vp)

    def new_handle_indexes(self, count: int) -> range:
        with self.grow_lock:
            first = len(self.h_loc)
            if first + count - 1 > MAX_HANDLE_INDEX:
                raise PoolFullError(f"xcfmalloc: class {self.size} is out of handles")
            self.h_loc.extend([DEAD] * count)
            return range(first + count - 1, first - 1, -1)

    def metadata_bytes(self) -> int:
        arrays = (
            self.vp_heap,
            self.vp_inuse,
            self.vp_free_head,
            self.vp_next,
            self.vp_prev,
            self.vp_group,
            self.free_vpids,
            self.pfn,
            self.page_users,
            self.slot_owner,
            self.h_loc,
        )
        return sum(sys.getsizeof(a) for a in arrays) + sum(
            sys.getsizeof(h.h_free) for h in self.heaps
        )


# --------------------------------------------------------------------------------------------
# A heap's share of a class: its vpages in fullness groups, its counters and its lock.
# --------------------------------------------------------------------------------------------


class _Heap:
    """The vpages of one class that one heap owns (heap 0 is the global heap).

    ``lock`` guards the heap's groups and counters and every array entry of the vpages it owns,
    including the handle-table entries of the objects in them.
    """

    def __init__(self, cls: _SizeClass, hid: int) -> None:
        self.cls = cls
        self.hid = hid
        self.lock = threading.Lock()
        self.group_head = [-1] * NGROUPS
        self.h_free = array("I")  # handle indexes this heap may hand out
        self.objects = 0
        self.requested = 0
        self.pages = 0
        self.live_vpages = 0
        self.pages_compacted = 0
        self.given_away = 0  # vpages handed to the global heap

    # ---- fullness groups ---------------------------------------------------------------

    def group_of(self, inuse: int) -> int:
        opv = self.cls.opv
        return FULL_GROUP if inuse == opv else inuse * FULL_GROUP // opv

    def unlink(self, vp: int) -> None:
        cls = self.cls
        prev, nxt = cls.vp_prev[vp], cls.vp_next[vp]
        if prev >= 0:
            cls.vp_next[prev] = nxt
        else:
            self.group_head[cls.vp_group[vp]] = nxt
        if nxt >= 0:
            cls.vp_prev[nxt] = prev

    def link(self, vp: int) -> None:
        cls = self.cls
        group = self.group_of(cls.vp_inuse[vp])
        head = self.group_head[group]
        cls.vp_prev[vp] = -1
        cls.vp_next[vp] = head
        if head >= 0:
            cls.vp_prev[head] = vp
        self.group_head[group] = vp
        cls.vp_group[vp] = group
        cls.vp_heap[vp] = self.hid

    def regroup(self, vp: int) -> None:
        if self.group_of(self.cls.vp_inuse[vp]) != self.cls.vp_group[vp]:
            self.unlink(vp)
            self.link(vp)

    def fullest(self, exclude: int = -1) -> int:
        """The fullest vpage with a free slot (not ``exclude``), or -1."""
        for group in range(FULL_GROUP - 1, -1, -1):
            vp = self.group_head[group]
            if vp >= 0 and vp == exclude:
                vp = self.cls.vp_next[vp]
            if vp >= 0:
                return vp
        return -1

    def sparsest(self) -> int:
        for group in range(FULL_GROUP):
            if self.group_head[group] >= 0:
                return self.group_head[group]
        return -1

    def iter_group(self, group: int) -> Iterator[int]:
        vp = self.group_head[group]
        while vp >= 0:
            yield vp
            vp = self.cls.vp_next[vp]

    # ---- vpages ----------------------------------------------------------------------------

    def new_vpage(self) -> int:
        vp = self.cls.new_vpage_id()
        self.link(vp)
        self.live_vpages += 1
        return vp

    def release_vpage(self, vp: int) -> None:
        """An empty vpage: all its pages are already gone (no slot overlaps them)."""
        self.unlink(vp)
        self.live_vpages -= 1
        self.cls.free_vpage_id(vp)

    def adopt(self, other: _Heap, vp: int) -> None:
        """Take vpage ``vp`` with its objects from ``other`` (caller holds both locks)."""
        cls = self.cls
        pages = sum(cls.pfn[vp * cls.ppv + p] != NO_PAGE for p in range(cls.ppv))
        first = vp * cls.opv
        requested = 0
        for gslot in range(first, first + cls.opv):
            owner = cls.slot_owner[gslot]
            if not owner & FREE_SLOT:
                requested += cls.length_of(cls.h_loc[owner])
        other.unlink(vp)
        for heap, sign in ((other, -1), (self, 1)):
            heap.live_vpages += sign
            heap.pages += sign * pages
            heap.objects += sign * cls.vp_inuse[vp]
            heap.requested += sign * requested
        self.link(vp)

    # ---- slots and pages ---------------------------------------------------------------------

    def hold_pages(self, vp: int, slot: int, limited: bool) -> None:
        """Count a new user of the pages under a slot, taking the ones not present."""
        cls = self.cls
        base = vp * cls.ppv
        pages = [base + p for p in cls.slot_pages(slot)]
        missing = [p for p in pages if cls.pfn[p] == NO_PAGE]
        if missing:
            for p, pfn in zip(missing, cls.arena.take(len(missing), limited), strict=True):
                cls.pfn[p] = pfn
            self.pages += len(missing)
        for p in pages:
            cls.page_users[p] += 1

    def unhold_pages(self, vp: int, slot: int) -> int:
        """Drop a user of the pages under a slot; give back those left unused.  Returns how many."""
        cls = self.cls
        base, freed = vp * cls.ppv, 0
        for p in cls.slot_pages(slot):
            users = cls.page_users[base + p] - 1
            cls.page_users[base + p] = users
            if users == 0:
                cls.arena.give_back(cls.pfn[base + p])
                cls.pfn[base + p] = NO_PAGE
                freed += 1
        self.pages -= freed
        return freed

    def take_slot(self, vp: int, limited: bool) -> int:
        """Pop the vpage's first free slot, taking the pages it needs; returns the class slot."""
        cls = self.cls
        slot = cls.vp_free_head[vp]
        self.hold_pages(vp, slot, limited)
        gslot = vp * cls.opv + slot
        cls.vp_free_head[vp] = cls.slot_owner[gslot] & ~FREE_SLOT
        cls.vp_inuse[vp] += 1
        self.regroup(vp)
        return gslot

    def put_slot(self, gslot: int) -> int:
        """Free a slot; give back pages nobody overlaps any more.  Returns pages given back."""
        cls = self.cls
        vp, slot = divmod(gslot, cls.opv)
        cls.slot_owner[gslot] = FREE_SLOT | cls.vp_free_head[vp]
        cls.vp_free_head[vp] = slot
        freed = self.unhold_pages(vp, slot)
        cls.vp_inuse[vp] -= 1
        if cls.vp_inuse[vp] == 0:
            self.release_vpage(vp)
        else:
            self.regroup(vp)
        return freed

    def new_handle(self, gslot: int, length: int) -> int:
        cls = self.cls
        if not self.h_free:
            self.h_free.extend(cls.new_handle_indexes(HANDLE_BATCH))
        index = self.h_free.pop()
        cls.h_loc[index] = (gslot << LOC_DELTA_BITS) | (cls.size - length)
        cls.slot_owner[gslot] = index
        self.objects += 1
        self.requested += length
        return (index << HANDLE_CLASS_BITS) | cls.cid

    def drop_handle(self, index: int) -> None:
        cls = self.cls
        loc = cls.h_loc[index]
        cls.h_loc[index] = DEAD
        self.h_free.append(index)
        self.objects -= 1
        self.requested -= cls.length_of(loc)
        self.put_slot(loc >> LOC_DELTA_BITS)

    # ---- Hoard's emptiness bound -------------------------------------------------------------

    def too_empty(self) -> bool:
        """u < (1 - f) a  and  u < a - K S, counted in slots (S = one vpage)."""
        capacity = self.live_vpages * self.cls.opv
        return (
            self.objects * HOARD_F_DEN < capacity * (HOARD_F_DEN - HOARD_F_NUM)
            and self.objects < capacity - HOARD_K * self.cls.opv
        )

    # ---- compaction ----------------------------------------------------------------------

    def reclaimable_pages(self) -> int:
        """Pages a complete compaction of this heap would give back: what it holds beyond its
        objects packed into full vpages plus one partial vpage packed from its start."""
        cls = self.cls
        full, rest = divmod(self.objects, cls.opv)
        need = full * cls.ppv + (-(-rest * cls.size // PAGE_SIZE))
        return max(0, self.pages - need)

    def worth_compacting(self) -> bool:
        """The heap holds at least a page more than a packed layout of its objects needs.

        Moves go from the sparsest vpage into the fullest other one, so compaction ends, at the
        latest, when a single vpage is left with free slots.
        """
        return self.reclaimable_pages() > 0

    def compact_step(self, budget: int) -> int:
        """Move up to ``budget`` objects from the sparsest vpage into the fullest others."""
        moved = 0
        while moved < budget and self.worth_compacting():
            src = self.sparsest()
            if src < 0:
                break
            dst = self.fullest(exclude=src)
            if dst < 0:  # one vpage with free slots is left: pack it towards its start
                moved += self.pack(src, budget - moved)
                break
            self.move(self.first_live_slot(src), dst)
            moved += 1
        return moved

    def first_live_slot(self, vp: int) -> int:
        cls = self.cls
        first = vp * cls.opv
        for gslot in range(first, first + cls.opv):
            if not cls.slot_owner[gslot] & FREE_SLOT:
                return gslot
        raise AssertionError("xcfmalloc: a vpage in a group has no live slot")

    def move(self, gsrc: int, dst: int) -> None:
        cls = self.cls
        index = cls.slot_owner[gsrc]
        loc = cls.h_loc[index]
        data = cls.read_slot(gsrc, cls.length_of(loc))
        gdst = self.take_slot(dst, limited=False)
        cls.write_slot(gdst, memoryview(data))
        self.verify_copy(gdst, data)
        cls.h_loc[index] = (gdst << LOC_DELTA_BITS) | (loc & LOC_DELTA_MASK)
        cls.slot_owner[gdst] = index
        self.pages_compacted += self.put_slot(gsrc)

    def pack(self, vp: int, budget: int) -> int:
        """Move the vpage's last objects into its first free slots, so its tail pages empty."""
        cls = self.cls
        first, owner = vp * cls.opv, cls.slot_owner
        low, high, moved = first, first + cls.opv - 1, 0
        while moved < budget:
            while low <= high and not owner[low] & FREE_SLOT:
                low += 1
            while high >= low and owner[high] & FREE_SLOT:
                high -= 1
            if low >= high:
                break
            self.relocate(high, low)
            moved += 1
        if moved:
            self.rebuild_free_list(vp)
        return moved

    def relocate(self, gsrc: int, gdst: int) -> None:
        """Move a live slot to a free slot of the same vpage (the free list is rebuilt after)."""
        cls = self.cls
        index = cls.slot_owner[gsrc]
        loc = cls.h_loc[index]
        data = cls.read_slot(gsrc, cls.length_of(loc))
        vp, slot = divmod(gdst, cls.opv)
        self.hold_pages(vp, slot, limited=False)
        cls.write_slot(gdst, memoryview(data))
        self.verify_copy(gdst, data)
        cls.h_loc[index] = (gdst << LOC_DELTA_BITS) | (loc & LOC_DELTA_MASK)
        cls.slot_owner[gdst] = index
        cls.slot_owner[gsrc] = FREE_SLOT
        self.pages_compacted += self.unhold_pages(vp, gsrc - vp * cls.opv)

    def rebuild_free_list(self, vp: int) -> None:
        """Thread the vpage's free slots in ascending order (lowest slot is taken first)."""
        cls = self.cls
        first, owner = vp * cls.opv, cls.slot_owner
        nxt = cls.opv
        for slot in range(cls.opv - 1, -1, -1):
            if owner[first + slot] & FREE_SLOT:
                owner[first + slot] = FREE_SLOT | nxt
                nxt = slot
        cls.vp_free_head[vp] = nxt

    def verify_copy(self, gslot: int, data: bytes) -> None:
        if self.cls.read_slot(gslot, len(data)) != data:
            raise AssertionError("xcfmalloc: an object changed while it moved")


# --------------------------------------------------------------------------------------------
# The allocator.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolStats:
    objects: int
    requested_bytes: int
    pool_bytes: int
    pool_bytes_max: int
    pages: int
    pages_freed: int
    pages_compacted: int
    metadata_bytes: int
    vpages_to_global: int
    classes: list[ClassStats] = field(repr=False)


Buffer = bytes | bytearray | memoryview


class XcfMalloc:
    """The allocator: alloc/free/read/write of objects of 1..4096 bytes by opaque handle.

    ``heaps`` worker heaps (Hoard-style) sit beside the global heap; each thread that allocates
    is given one of them, round robin, the first time it allocates.
    """

    def __init__(self, *, max_pool_bytes: int | None = None, heaps: int = DEFAULT_HEAPS) -> None:
        if not 0 <= heaps <= MAX_HEAPS:
            raise ValueError(f"xcfmalloc: heaps must be in 0..{MAX_HEAPS}")
        self._arena = _Arena(max_pool_bytes)
        self._classes = [_SizeClass(cid, self._arena, heaps + 1) for cid in range(NCLASSES)]
        self._nheaps = heaps
        self._local = threading.local()
        self._next_heap = itertools.count()

    # ---- limits and counters ---------------------------------------------------------------

    @property
    def max_pool_bytes(self) -> int | None:
        return self._arena.max_pool_bytes

    @max_pool_bytes.setter
    def max_pool_bytes(self, value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError("max_pool_bytes must be >= 0 or None")
        self._arena.max_pool_bytes = value

    @property
    def pool_bytes(self) -> int:
        return self._arena.pages * PAGE_SIZE

    @property
    def requested_bytes(self) -> int:
        return sum(h.requested for c in self._classes for h in c.heaps)

    @property
    def objects(self) -> int:
        return sum(h.objects for c in self._classes for h in c.heaps)

    # ---- objects -----------------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        """A handle to a new object of ``size`` bytes (contents undefined until written)."""
        cls = self._class_for(size)
        heap = cls.heaps[self._heap_id()]
        with heap.lock:
            return self._alloc_locked(heap, size)

    def store(self, data: Buffer) -> int:
        """alloc(len(data)) and write(data) under one hold of the heap lock.  The hot path of
        every page written: bytes go into the arena as they are (no memoryview), and the copy
        is inlined (:meth:`_write_loc`)."""
        view = data if type(data) is bytes else memoryview(data).cast("B")
        size = len(view)
        if not 1 <= size <= MAX_OBJECT:
            raise ValueError(f"xcfmalloc: object size {size} is not in 1..{MAX_OBJECT}")
        cls = self._classes[(size - 1) >> CLASS_SHIFT]
        heap = cls.heaps[self._heap_id()]
        with heap.lock:
            handle = self._alloc_locked(heap, size)
            self._write_loc(cls, cls.h_loc[handle >> HANDLE_CLASS_BITS], view)
            return handle

    def _write_loc(self, cls: _SizeClass, loc: int, data: bytes | memoryview) -> None:
        """Copy ``data`` (the object's full length) to location ``loc`` (caller holds the owner
        heap's lock); the inverse of :meth:`_read_loc`."""
        size = cls.size
        vp, slot = divmod(loc >> LOC_DELTA_BITS, cls.opv)
        off = slot * size
        pfn = cls.pfn[vp * cls.ppv + (off >> PAGE_SHIFT)]
        off &= PAGE_SIZE - 1
        start = ((pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT) + off
        views = self._arena.views
        length = len(data)
        if off + length <= PAGE_SIZE:
            views[pfn >> CHUNK_SHIFT][start : start + length] = data
            return
        head = PAGE_SIZE - off
        nxt = cls.pfn[vp * cls.ppv + ((slot * size) >> PAGE_SHIFT) + 1]
        nstart = (nxt & (CHUNK_PAGES - 1)) << PAGE_SHIFT
        views[pfn >> CHUNK_SHIFT][start : start + head] = data[:head]
        views[nxt >> CHUNK_SHIFT][nstart : nstart + length - head] = data[head:]

    def free(self, handle: int) -> None:
        cls, index = self._split(handle)
        heap = self._lock_owner(cls, index)
        try:
            heap.drop_handle(index)
            if heap.hid and heap.too_empty():
                self._give_to_global(heap)
        finally:
            heap.lock.release()

    def write(self, handle: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        cls, index = self._split(handle)
        heap = self._lock_owner(cls, index)
        try:
            loc = cls.h_loc[index]
            if len(view) != cls.length_of(loc):
                raise ValueError(
                    f"xcfmalloc: write of {len(view)} bytes to an object of {cls.length_of(loc)}"
                )
            cls.write_slot(loc >> LOC_DELTA_BITS, view)
        finally:
            heap.lock.release()

    def read(self, handle: int) -> bytes:
        """A copy of the object's bytes.  The hot path of every page read, so the common case
        (the owner heap did not change while we locked it) is inlined: one lock, one or two
        slices of the arena; anything else takes the general :meth:`_lock_owner` path."""
        cls = self._classes[handle & HANDLE_CLASS_MASK]
        index = handle >> HANDLE_CLASS_BITS
        h_loc = cls.h_loc
        if 0 < index < len(h_loc):
            loc = h_loc[index]
            if loc != DEAD:
                vp = (loc >> LOC_DELTA_BITS) // cls.opv
                hid = cls.vp_heap[vp]
                heap = cls.heaps[hid]
                with heap.lock:
                    if h_loc[index] == loc and cls.vp_heap[vp] == hid:
                        return self._read_loc(cls, loc)
        heap = self._lock_owner(cls, index)
        try:
            return self._read_loc(cls, cls.h_loc[index])
        finally:
            heap.lock.release()

    def _read_loc(self, cls: _SizeClass, loc: int) -> bytes:
        """The bytes at handle-table location ``loc`` (caller holds the owner heap's lock)."""
        size = cls.size
        length = size - (loc & LOC_DELTA_MASK)
        vp, slot = divmod(loc >> LOC_DELTA_BITS, cls.opv)
        off = slot * size
        pfn = cls.pfn[vp * cls.ppv + (off >> PAGE_SHIFT)]
        off &= PAGE_SIZE - 1
        start = ((pfn & (CHUNK_PAGES - 1)) << PAGE_SHIFT) + off
        views = self._arena.views
        if off + length <= PAGE_SIZE:
            return views[pfn >> CHUNK_SHIFT][start : start + length].tobytes()
        head = PAGE_SIZE - off
        nxt = cls.pfn[vp * cls.ppv + ((slot * size) >> PAGE_SHIFT) + 1]
        nstart = (nxt & (CHUNK_PAGES - 1)) << PAGE_SHIFT
        return (
            views[pfn >> CHUNK_SHIFT][start : start + head].tobytes()
            + views[nxt >> CHUNK_SHIFT][nstart : nstart + length - head].tobytes()
        )

    def size(self, handle: int) -> int:
        cls, index = self._split(handle)
        heap = self._lock_owner(cls, index)
        try:
            return cls.length_of(cls.h_loc[index])
        finally:
            heap.lock.release()

    # ---- compaction --------------------------------------------------------------------------

    def compact(self, max_moves: int | None = None) -> int:
        """Migrate objects out of sparse vpages; returns how many moved.

        Works heap by heap in batches of COMPACT_BATCH moves, dropping the heap lock between
        batches so that reads and writes are never held up for long.
        """
        moved = 0
        for cls in self._classes:
            for heap in cls.heaps:
                while max_moves is None or moved < max_moves:
                    left = COMPACT_BATCH if max_moves is None else max_moves - moved
                    budget = min(COMPACT_BATCH, left)
                    with heap.lock:
                        step = heap.compact_step(budget)
                    moved += step
                    if step < budget:
                        break
                    time.sleep(0)  # let a thread waiting for the GIL in (see Locking)
        return moved

    def reclaimable_bytes(self) -> int:
        """Pool bytes a complete compact() would give back now (sum of every heap's
        reclaimable pages; the compactor's idle check)."""
        total = 0
        for cls in self._classes:
            for heap in cls.heaps:
                if heap.pages:
                    with heap.lock:
                        total += heap.reclaimable_pages()
        return total * PAGE_SIZE

    def fragmentation(self) -> list[tuple[int, int, int]]:
        """(class size, pool bytes, requested bytes) of every class that holds pages."""
        out = []
        for cls in self._classes:
            pages = sum(h.pages for h in cls.heaps)
            if pages:
                out.append((cls.size, pages * PAGE_SIZE, sum(h.requested for h in cls.heaps)))
        return out

    # ---- stats ------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        classes = []
        meta = self._arena.metadata_bytes()
        compacted = 0
        for cls in self._classes:
            objects = vpages = pages = requested = 0
            for heap in cls.heaps:
                with heap.lock:
                    objects += heap.objects
                    vpages += heap.live_vpages
                    pages += heap.pages
                    requested += heap.requested
                    compacted += heap.pages_compacted
            classes.append(
                ClassStats(
                    size=cls.size,
                    pages_per_vpage=cls.ppv,
                    objs_per_vpage=cls.opv,
                    objects=objects,
                    vpages=vpages,
                    pages=pages,
                    requested_bytes=requested,
                    free_slots=vpages * cls.opv - objects,
                )
            )
            meta += cls.metadata_bytes()
        arena = self._arena
        return PoolStats(
            objects=sum(c.objects for c in classes),
            requested_bytes=sum(c.requested_bytes for c in classes),
            pool_bytes=arena.pages * PAGE_SIZE,
            pool_bytes_max=arena.pages_max * PAGE_SIZE,
            pages=arena.pages,
            pages_freed=arena.pages_freed,
            pages_compacted=compacted,
            metadata_bytes=meta,
            vpages_to_global=sum(h.given_away for c in self._classes for h in c.heaps),
            classes=classes,
        )

    def check(self) -> None:
        """Verify every invariant of the allocator (slow; for tests)."""
        held = 0
        for cls in self._classes:
            locks = [h.lock for h in cls.heaps[1:]] + [cls.heaps[0].lock, cls.grow_lock]
            for lock in locks:
                lock.acquire()
            try:
                _check_class(cls)
            finally:
                for lock in reversed(locks):
                    lock.release()
            held += sum(h.pages for h in cls.heaps)
        with self._arena.lock:
            assert held == self._arena.pages, (held, self._arena.pages)

    def page_address(self, handle: int) -> list[int]:
        """Virtual addresses of the 4K pages an object lies on (for residency tests)."""
        cls, index = self._split(handle)
        heap = self._lock_owner(cls, index)
        try:
            loc = cls.h_loc[index]
            p, off = cls.locate(loc >> LOC_DELTA_BITS)
            pages = [p] if off + cls.length_of(loc) <= PAGE_SIZE else [p, p + 1]
            return [self._arena.address(cls.pfn[q]) for q in pages]
        finally:
            heap.lock.release()

    def bind_heap(self, hid: int) -> None:
        """Make the calling thread allocate from heap ``hid`` (0 = global, 1..heaps = workers)."""
        if not 0 <= hid <= self._nheaps:
            raise ValueError(f"xcfmalloc: heap {hid} is not in 0..{self._nheaps}")
        self._local.heap = hid

    def heap_usage(self) -> list[tuple[int, int, int, int]]:
        """(heap, class size, objects, slot capacity) of every heap holding vpages of a class."""
        rows = []
        for cls in self._classes:
            for heap in cls.heaps:
                with heap.lock:
                    if heap.live_vpages:
                        rows.append((heap.hid, cls.size, heap.objects, heap.live_vpages * cls.opv))
        return rows

    # ---- internals ---------------------------------------------------------------------------

    def _heap_id(self) -> int:
        hid: int | None = getattr(self._local, "heap", None)
        if hid is None:
            hid = 1 + next(self._next_heap) % self._nheaps if self._nheaps else 0
            self._local.heap = hid
        return hid

    def _class_for(self, size: int) -> _SizeClass:
        if not 1 <= size <= MAX_OBJECT:
            raise ValueError(f"xcfmalloc: object size {size} is not in 1..{MAX_OBJECT}")
        return self._classes[class_of(size)]

    def _split(self, handle: int) -> tuple[_SizeClass, int]:
        return self._classes[handle & HANDLE_CLASS_MASK], handle >> HANDLE_CLASS_BITS

    def _lock_owner(self, cls: _SizeClass, index: int) -> _Heap:
        """Lock and return the heap that owns the object ``index`` (it may move between heaps
        until its owner's lock is held)."""
        while True:
            if not 0 < index < len(cls.h_loc) or cls.h_loc[index] == DEAD:
                raise ValueError(f"xcfmalloc: handle {(index << 8) | cls.cid:#x} is not live")
            vp = (cls.h_loc[index] >> LOC_DELTA_BITS) // cls.opv
            heap = cls.heaps[cls.vp_heap[vp]]
            heap.lock.acquire()
            loc = cls.h_loc[index]
            if loc != DEAD and cls.vp_heap[(loc >> LOC_DELTA_BITS) // cls.opv] == heap.hid:
                return heap
            heap.lock.release()
            if loc == DEAD:
                raise ValueError(f"xcfmalloc: handle {(index << 8) | cls.cid:#x} is not live")

    def _alloc_locked(self, heap: _Heap, size: int) -> int:
        vp = heap.fullest()
        if vp < 0 and heap.hid:
            vp = self._take_from_global(heap)
        fresh = vp < 0
        if fresh:
            vp = heap.new_vpage()
        try:
            gslot = heap.take_slot(vp, limited=True)
        except PoolFullError:
            if fresh:
                heap.release_vpage(vp)
            raise
        return heap.new_handle(gslot, size)

    def _take_from_global(self, heap: _Heap) -> int:
        """Adopt the global heap's fullest vpage with room (lock order: worker, then global)."""
        glob = heap.cls.heaps[0]
        with glob.lock:
            vp = glob.fullest()
            if vp >= 0:
                heap.adopt(glob, vp)
            return vp

    def _give_to_global(self, heap: _Heap) -> None:
        """Hoard's bound was passed: hand the heap's emptiest vpage to the global heap."""
        vp = heap.sparsest()
        if vp < 0:
            return
        glob = heap.cls.heaps[0]
        with glob.lock:
            glob.adopt(heap, vp)
        heap.given_away += 1


def _check_class(cls: _SizeClass) -> None:
    """Every invariant of one class (caller holds all its locks)."""
    owner_of: dict[int, int] = {}
    for heap in cls.heaps:
        for group in range(NGROUPS):
            prev = -1
            for vp in heap.iter_group(group):
                assert cls.vp_group[vp] == group and cls.vp_prev[vp] == prev
                assert cls.vp_inuse[vp] > 0 and heap.group_of(cls.vp_inuse[vp]) == group
                assert cls.vp_heap[vp] == heap.hid and vp not in owner_of
                owner_of[vp] = heap.hid
                prev = vp
    for heap in cls.heaps:
        objects = requested = pages = vpages = 0
        for vp in range(len(cls.vp_inuse)):
            if owner_of.get(vp, -1) != heap.hid:
                continue
            vpages += 1
            live, vp_requested, vp_pages = _check_vpage(cls, vp)
            objects += live
            requested += vp_requested
            pages += vp_pages
        assert vpages == heap.live_vpages
        assert (objects, requested, pages) == (heap.objects, heap.requested, heap.pages)
    for vp in range(len(cls.vp_inuse)):
        if vp not in owner_of:
            assert cls.vp_heap[vp] == -1 and vp in cls.free_vpids
            assert all(cls.pfn[vp * cls.ppv + p] == NO_PAGE for p in range(cls.ppv))


def _check_vpage(cls: _SizeClass, vp: int) -> tuple[int, int, int]:
    """Check one live vpage; returns (live objects, requested bytes, pages held)."""
    users = [0] * cls.ppv
    live = requested = 0
    for slot in range(cls.opv):
        owner = cls.slot_owner[vp * cls.opv + slot]
        if owner & FREE_SLOT:
            continue
        live += 1
        loc = cls.h_loc[owner]
        assert loc >> LOC_DELTA_BITS == vp * cls.opv + slot, "handle does not point back"
        requested += cls.length_of(loc)
        for p in cls.slot_pages(slot):
            users[p] += 1
    free = 0
    slot = cls.vp_free_head[vp]
    while slot != cls.opv:
        owner = cls.slot_owner[vp * cls.opv + slot]
        assert owner & FREE_SLOT
        free += 1
        slot = owner & ~FREE_SLOT
    assert live == cls.vp_inuse[vp] and live + free == cls.opv
    pages = 0
    for p in range(cls.ppv):
        assert cls.page_users[vp * cls.ppv + p] == users[p]
        assert (cls.pfn[vp * cls.ppv + p] != NO_PAGE) == (users[p] > 0)
        pages += users[p] > 0
    return live, requested, pages
