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
  ``slot_owner``, plus 6 B per 4K page (PFN and user count) and 13 B per vpage.

* Fullness groups.  Each class keeps its vpages in NGROUPS doubly linked lists (threaded
  through arrays) by how full they are: group ``inuse * 10 // opv`` for a partly used vpage,
  FULL_GROUP for a full one.  An empty vpage is released at once.  alloc takes the fullest
  non-full vpage (dense packing); compaction moves objects from the sparsest vpage into the
  fullest, and runs only while the class has at least one vpage's worth of free slots, which
  guarantees the source empties completely.

* Locking.  Each class has its own lock, taken by every operation on that class; it guards all
  of the class's arrays, groups and counters.  The arena has one lock that guards the PFN free
  list, the chunk list and the pool counters; it is taken inside a class lock, never the other
  way around, and held only for a few list operations.  Reading or freeing a handle while
  another thread frees it is a caller bug: the page store serialises each page.

* Memory from the OS.  The arena maps anonymous chunks of CHUNK_PAGES pages and hands out single
  4K pages from them.  A page given back is dropped with MADV_DONTNEED_LOCKED (the daemon runs
  under mlockall, where plain MADV_DONTNEED fails), falling back to MADV_DONTNEED on older
  kernels; its RSS falls at once.  ``pool_bytes`` = pages handed out x 4096: the same meaning as
  zram's mem_used_total.
"""

from __future__ import annotations

import mmap
import sys
import threading
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
# A size class: its vpages, fullness groups and handle table, all in flat arrays.
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
    def __init__(self, cid: int, arena: _Arena) -> None:
        self.cid = cid
        self.size = (cid + 1) * CLASS_STEP
        self.ppv = pages_per_vpage(self.size)
        self.opv = self.ppv * PAGE_SIZE // self.size
        self.arena = arena
        self.lock = threading.Lock()
        # per vpage
        self.vp_inuse = array("H")
        self.vp_free_head = array("H")  # first free slot in the vpage; opv = none
        self.vp_next = array("i")
        self.vp_prev = array("i")
        self.vp_group = array("b")  # -1 = released (its id is on free_vpids)
        self.free_vpids = array("i")
        self.group_head = [-1] * NGROUPS
        # per page of every vpage (vpage * ppv + page)
        self.pfn = array("i")
        self.page_users = array("H")
        # per slot of every vpage (vpage * opv + slot)
        self.slot_owner = array("I")
        # per handle index
        self.h_loc = array("I", [DEAD])
        self.h_free = array("I")
        # counters
        self.objects = 0
        self.requested = 0
        self.pages = 0
        self.live_vpages = 0
        self.pages_compacted = 0

    # ---- fullness groups ---------------------------------------------------------------

    def _group_of(self, inuse: int) -> int:
        return FULL_GROUP if inuse == self.opv else inuse * FULL_GROUP // self.opv

    def _unlink(self, vp: int) -> None:
        prev, nxt = self.vp_prev[vp], self.vp_next[vp]
        if prev >= 0:
            self.vp_next[prev] = nxt
        else:
            self.group_head[self.vp_group[vp]] = nxt
        if nxt >= 0:
            self.vp_prev[nxt] = prev

    def _link(self, vp: int, group: int) -> None:
        head = self.group_head[group]
        self.vp_prev[vp] = -1
        self.vp_next[vp] = head
        if head >= 0:
            self.vp_prev[head] = vp
        self.group_head[group] = vp
        self.vp_group[vp] = group

    def _regroup(self, vp: int) -> None:
        group = self._group_of(self.vp_inuse[vp])
        if group != self.vp_group[vp]:
            self._unlink(vp)
            self._link(vp, group)

    def _fullest(self, exclude: int = -1) -> int:
        """The fullest vpage with a free slot (not ``exclude``), or -1."""
        for group in range(FULL_GROUP - 1, -1, -1):
            vp = self.group_head[group]
            if vp >= 0 and vp == exclude:
                vp = self.vp_next[vp]
            if vp >= 0:
                return vp
        return -1

    def _sparsest(self) -> int:
        for group in range(FULL_GROUP):
            if self.group_head[group] >= 0:
                return self.group_head[group]
        return -1

    # ---- vpages and slots ----------------------------------------------------------------

    def _new_vpage(self) -> int:
        opv, ppv = self.opv, self.ppv
        if self.free_vpids:
            vp = self.free_vpids.pop()
            first = vp * opv
            for s in range(opv - 1):
                self.slot_owner[first + s] = FREE_SLOT | (s + 1)
            self.slot_owner[first + opv - 1] = FREE_SLOT | opv
        else:
            vp = len(self.vp_inuse)
            if (vp + 1) * opv > MAX_SLOTS_PER_CLASS:
                raise PoolFullError(f"xcfmalloc: class {self.size} is out of slots")
            for arr, val in (
                (self.vp_inuse, 0),
                (self.vp_free_head, 0),
                (self.vp_next, -1),
                (self.vp_prev, -1),
                (self.vp_group, -1),
            ):
                arr.append(val)
            self.pfn.extend([NO_PAGE] * ppv)
            self.page_users.extend([0] * ppv)
            self.slot_owner.extend(FREE_SLOT | (s + 1) for s in range(opv))
        self.vp_inuse[vp] = 0
        self.vp_free_head[vp] = 0
        self._link(vp, 0)
        self.live_vpages += 1
        return vp

    def _release_vpage(self, vp: int) -> None:
        """An empty vpage: all its pages are already gone (no slot overlaps them)."""
        self._unlink(vp)
        self.vp_group[vp] = -1
        self.free_vpids.append(vp)
        self.live_vpages -= 1

    def _slot_pages(self, slot: int) -> range:
        """Indexes into pfn/page_users of the pages that vpage-local ``slot`` overlaps."""
        off = slot * self.size
        return range(off >> PAGE_SHIFT, ((off + self.size - 1) >> PAGE_SHIFT) + 1)

    def _hold_pages(self, vp: int, slot: int, limited: bool) -> None:
        """Count a new user of the pages under a slot, taking the ones not present."""
        base = vp * self.ppv
        pages = [base + p for p in self._slot_pages(slot)]
        missing = [p for p in pages if self.pfn[p] == NO_PAGE]
        if missing:
            for p, pfn in zip(missing, self.arena.take(len(missing), limited), strict=True):
                self.pfn[p] = pfn
            self.pages += len(missing)
        for p in pages:
            self.page_users[p] += 1

    def _unhold_pages(self, vp: int, slot: int) -> int:
        """Drop a user of the pages under a slot; give back those left unused.  Returns how many."""
        base, freed = vp * self.ppv, 0
        for p in self._slot_pages(slot):
            users = self.page_users[base + p] - 1
            self.page_users[base + p] = users
            if users == 0:
                self.arena.give_back(self.pfn[base + p])
                self.pfn[base + p] = NO_PAGE
                freed += 1
        self.pages -= freed
        return freed

    def _take_slot(self, vp: int, limited: bool) -> int:
        """Pop the vpage's first free slot, taking the pages it needs; returns the class slot."""
        slot = self.vp_free_head[vp]
        self._hold_pages(vp, slot, limited)
        gslot = vp * self.opv + slot
        self.vp_free_head[vp] = self.slot_owner[gslot] & ~FREE_SLOT
        self.vp_inuse[vp] += 1
        self._regroup(vp)
        return gslot

    def _put_slot(self, gslot: int) -> int:
        """Free a slot; give back pages nobody overlaps any more.  Returns pages given back."""
        vp, slot = divmod(gslot, self.opv)
        self.slot_owner[gslot] = FREE_SLOT | self.vp_free_head[vp]
        self.vp_free_head[vp] = slot
        freed = self._unhold_pages(vp, slot)
        self.vp_inuse[vp] -= 1
        if self.vp_inuse[vp] == 0:
            self._release_vpage(vp)
        else:
            self._regroup(vp)
        return freed

    # ---- object bytes --------------------------------------------------------------------

    def _locate(self, gslot: int) -> tuple[int, int]:
        """(index into pfn of the first page, offset in it) of a class slot."""
        vp, slot = divmod(gslot, self.opv)
        off = slot * self.size
        return vp * self.ppv + (off >> PAGE_SHIFT), off & (PAGE_SIZE - 1)

    def read_slot(self, gslot: int, length: int) -> bytes:
        p, off = self._locate(gslot)
        if off + length <= PAGE_SIZE:
            return self.arena.read(self.pfn[p], off, length)
        head = PAGE_SIZE - off
        return self.arena.read(self.pfn[p], off, head) + self.arena.read(
            self.pfn[p + 1], 0, length - head
        )

    def write_slot(self, gslot: int, data: memoryview) -> None:
        p, off = self._locate(gslot)
        if off + len(data) <= PAGE_SIZE:
            self.arena.write(self.pfn[p], off, data)
            return
        head = PAGE_SIZE - off
        self.arena.write(self.pfn[p], off, data[:head])
        self.arena.write(self.pfn[p + 1], 0, data[head:])

    # ---- handles ---------------------------------------------------------------------------

    def new_handle_index(self, gslot: int, length: int) -> int:
        loc = (gslot << LOC_DELTA_BITS) | (self.size - length)
        if self.h_free:
            index = self.h_free.pop()
            self.h_loc[index] = loc
        else:
            index = len(self.h_loc)
            if index > MAX_HANDLE_INDEX:
                raise PoolFullError(f"xcfmalloc: class {self.size} is out of handles")
            self.h_loc.append(loc)
        self.slot_owner[gslot] = index
        return index

    def loc(self, index: int) -> int:
        if not 0 < index < len(self.h_loc) or self.h_loc[index] == DEAD:
            raise ValueError(f"xcfmalloc: handle {(index << 8) | self.cid:#x} is not live")
        return self.h_loc[index]

    def length_of(self, loc: int) -> int:
        return self.size - (loc & LOC_DELTA_MASK)

    # ---- compaction ----------------------------------------------------------------------

    def worth_compacting(self) -> bool:
        """The class holds at least a page more than its objects need, in two or more vpages.

        Moves go from the sparsest vpage into the fullest other one, so compaction ends, at the
        latest, when a single vpage is left with free slots.
        """
        need = -(-self.objects * self.size // PAGE_SIZE)
        return self.pages > need

    def compact_step(self, budget: int) -> int:
        """Move up to ``budget`` objects from the sparsest vpage into the fullest others."""
        moved = 0
        while moved < budget and self.worth_compacting():
            src = self._sparsest()
            if src < 0:
                break
            dst = self._fullest(exclude=src)
            if dst < 0:  # one vpage with free slots is left: pack it towards its start
                moved += self._pack(src, budget - moved)
                break
            gsrc = self._first_live_slot(src)
            self._move(gsrc, dst)
            moved += 1
        return moved

    def _pack(self, vp: int, budget: int) -> int:
        """Move the vpage's last objects into its first free slots, so its tail pages empty."""
        first, owner = vp * self.opv, self.slot_owner
        low, high, moved = first, first + self.opv - 1, 0
        while moved < budget:
            while low <= high and not owner[low] & FREE_SLOT:
                low += 1
            while high >= low and owner[high] & FREE_SLOT:
                high -= 1
            if low >= high:
                break
            self._relocate(high, low)
            moved += 1
        if moved:
            self._rebuild_free_list(vp)
        return moved

    def _relocate(self, gsrc: int, gdst: int) -> None:
        """Move a live slot to a free slot of the same vpage (the free list is rebuilt after)."""
        index = self.slot_owner[gsrc]
        loc = self.h_loc[index]
        data = self.read_slot(gsrc, self.length_of(loc))
        vp, slot = divmod(gdst, self.opv)
        self._hold_pages(vp, slot, limited=False)
        self.write_slot(gdst, memoryview(data))
        self._verify_copy(gdst, data)
        self.h_loc[index] = (gdst << LOC_DELTA_BITS) | (loc & LOC_DELTA_MASK)
        self.slot_owner[gdst] = index
        self.slot_owner[gsrc] = FREE_SLOT
        self.pages_compacted += self._unhold_pages(vp, gsrc - vp * self.opv)

    def _rebuild_free_list(self, vp: int) -> None:
        """Thread the vpage's free slots in ascending order (lowest slot is taken first)."""
        first, owner = vp * self.opv, self.slot_owner
        nxt = self.opv
        for slot in range(self.opv - 1, -1, -1):
            if owner[first + slot] & FREE_SLOT:
                owner[first + slot] = FREE_SLOT | nxt
                nxt = slot
        self.vp_free_head[vp] = nxt

    def _verify_copy(self, gslot: int, data: bytes) -> None:
        if self.read_slot(gslot, len(data)) != data:
            raise AssertionError("xcfmalloc: an object changed while it moved")

    def _first_live_slot(self, vp: int) -> int:
        first = vp * self.opv
        for gslot in range(first, first + self.opv):
            if not self.slot_owner[gslot] & FREE_SLOT:
                return gslot
        raise AssertionError("xcfmalloc: a vpage in a group has no live slot")

    def _move(self, gsrc: int, dst: int) -> None:
        index = self.slot_owner[gsrc]
        loc = self.h_loc[index]
        length = self.length_of(loc)
        data = self.read_slot(gsrc, length)
        gdst = self._take_slot(dst, limited=False)
        self.write_slot(gdst, memoryview(data))
        self._verify_copy(gdst, data)
        self.h_loc[index] = (gdst << LOC_DELTA_BITS) | (loc & LOC_DELTA_MASK)
        self.slot_owner[gdst] = index
        self.pages_compacted += self._put_slot(gsrc)

    # ---- checks and stats ------------------------------------------------------------------

    def stats(self) -> ClassStats:
        return ClassStats(
            size=self.size,
            pages_per_vpage=self.ppv,
            objs_per_vpage=self.opv,
            objects=self.objects,
            vpages=self.live_vpages,
            pages=self.pages,
            requested_bytes=self.requested,
            free_slots=self.live_vpages * self.opv - self.objects,
        )

    def metadata_bytes(self) -> int:
        arrays = (
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
            self.h_free,
        )
        return sum(sys.getsizeof(a) for a in arrays)

    def iter_group(self, group: int) -> Iterator[int]:
        vp = self.group_head[group]
        while vp >= 0:
            yield vp
            vp = self.vp_next[vp]


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
    classes: list[ClassStats] = field(repr=False)


Buffer = bytes | bytearray | memoryview


class XcfMalloc:
    """The allocator: alloc/free/read/write of objects of 1..4096 bytes by opaque handle."""

    def __init__(self, *, max_pool_bytes: int | None = None) -> None:
        self._arena = _Arena(max_pool_bytes)
        self._classes = [_SizeClass(cid, self._arena) for cid in range(NCLASSES)]

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
        return sum(c.requested for c in self._classes)

    @property
    def objects(self) -> int:
        return sum(c.objects for c in self._classes)

    # ---- objects -----------------------------------------------------------------------------

    def alloc(self, size: int) -> int:
        """A handle to a new object of ``size`` bytes (contents undefined until written)."""
        cls = self._class_for(size)
        with cls.lock:
            return self._alloc_locked(cls, size)

    def store(self, data: Buffer) -> int:
        """alloc(len(data)) and write(data) under one hold of the class lock."""
        view = memoryview(data).cast("B")
        cls = self._class_for(len(view))
        with cls.lock:
            handle = self._alloc_locked(cls, len(view))
            cls.write_slot(cls.h_loc[handle >> HANDLE_CLASS_BITS] >> LOC_DELTA_BITS, view)
            return handle

    def free(self, handle: int) -> None:
        cls, index = self._split(handle)
        with cls.lock:
            loc = cls.loc(index)
            cls.h_loc[index] = DEAD
            cls.h_free.append(index)
            cls.objects -= 1
            cls.requested -= cls.length_of(loc)
            cls._put_slot(loc >> LOC_DELTA_BITS)

    def write(self, handle: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        cls, index = self._split(handle)
        with cls.lock:
            loc = cls.loc(index)
            if len(view) != cls.length_of(loc):
                raise ValueError(
                    f"xcfmalloc: write of {len(view)} bytes to an object of {cls.length_of(loc)}"
                )
            cls.write_slot(loc >> LOC_DELTA_BITS, view)

    def read(self, handle: int) -> bytes:
        cls, index = self._split(handle)
        with cls.lock:
            loc = cls.loc(index)
            return cls.read_slot(loc >> LOC_DELTA_BITS, cls.length_of(loc))

    def size(self, handle: int) -> int:
        cls, index = self._split(handle)
        with cls.lock:
            return cls.length_of(cls.loc(index))

    # ---- compaction --------------------------------------------------------------------------

    def compact(self, max_moves: int | None = None) -> int:
        """Migrate objects out of sparse vpages; returns how many moved.

        Works class by class in batches of COMPACT_BATCH moves, dropping the class lock between
        batches so that reads and writes are never held up for long.
        """
        moved = 0
        for cls in self._classes:
            while max_moves is None or moved < max_moves:
                budget = (
                    COMPACT_BATCH if max_moves is None else min(COMPACT_BATCH, max_moves - moved)
                )
                with cls.lock:
                    step = cls.compact_step(budget)
                moved += step
                if step < budget:
                    break
        return moved

    def fragmentation(self) -> list[tuple[int, int, int]]:
        """(class size, pool bytes, requested bytes) of every class that holds pages."""
        out = []
        for cls in self._classes:
            with cls.lock:
                if cls.pages:
                    out.append((cls.size, cls.pages * PAGE_SIZE, cls.requested))
        return out

    # ---- stats ------------------------------------------------------------------------------

    def stats(self) -> PoolStats:
        classes = []
        meta = self._arena.metadata_bytes()
        compacted = 0
        for cls in self._classes:
            with cls.lock:
                classes.append(cls.stats())
                meta += cls.metadata_bytes()
                compacted += cls.pages_compacted
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
            classes=classes,
        )

    def check(self) -> None:
        """Verify every invariant of the allocator (slow; for tests)."""
        for cls in self._classes:
            with cls.lock:
                _check_class(cls)
        with self._arena.lock:
            held = sum(c.pages for c in self._classes)
            assert held == self._arena.pages, (held, self._arena.pages)

    # ---- internals ---------------------------------------------------------------------------

    def _class_for(self, size: int) -> _SizeClass:
        if not 1 <= size <= MAX_OBJECT:
            raise ValueError(f"xcfmalloc: object size {size} is not in 1..{MAX_OBJECT}")
        return self._classes[class_of(size)]

    def _split(self, handle: int) -> tuple[_SizeClass, int]:
        return self._classes[handle & HANDLE_CLASS_MASK], handle >> HANDLE_CLASS_BITS

    def _alloc_locked(self, cls: _SizeClass, size: int) -> int:
        vp = cls._fullest()
        fresh = vp < 0
        if fresh:
            vp = cls._new_vpage()
        try:
            gslot = cls._take_slot(vp, limited=True)
        except PoolFullError:
            if fresh:
                cls._release_vpage(vp)
            raise
        index = cls.new_handle_index(gslot, size)
        cls.objects += 1
        cls.requested += size
        return (index << HANDLE_CLASS_BITS) | cls.cid

    def page_address(self, handle: int) -> list[int]:
        """Virtual addresses of the 4K pages an object lies on (for residency tests)."""
        cls, index = self._split(handle)
        with cls.lock:
            loc = cls.loc(index)
            p, off = cls._locate(loc >> LOC_DELTA_BITS)
            pages = [p] if off + cls.length_of(loc) <= PAGE_SIZE else [p, p + 1]
            return [self._arena.address(cls.pfn[q]) for q in pages]


def _check_class(cls: _SizeClass) -> None:
    """Every invariant of one class (caller holds its lock)."""
    in_groups: set[int] = set()
    for group in range(NGROUPS):
        prev = -1
        for vp in cls.iter_group(group):
            assert cls.vp_group[vp] == group and cls.vp_prev[vp] == prev
            assert cls.vp_inuse[vp] > 0 and cls._group_of(cls.vp_inuse[vp]) == group
            in_groups.add(vp)
            prev = vp
    assert len(in_groups) == cls.live_vpages
    objects = requested = pages = 0
    for vp in range(len(cls.vp_inuse)):
        if vp not in in_groups:
            assert cls.vp_group[vp] == -1
            assert all(cls.pfn[vp * cls.ppv + p] == NO_PAGE for p in range(cls.ppv))
            continue
        users = [0] * cls.ppv
        live = 0
        for slot in range(cls.opv):
            owner = cls.slot_owner[vp * cls.opv + slot]
            if owner & FREE_SLOT:
                continue
            live += 1
            loc = cls.h_loc[owner]
            assert loc >> LOC_DELTA_BITS == vp * cls.opv + slot, "handle does not point back"
            requested += cls.length_of(loc)
            for p in cls._slot_pages(slot):
                users[p] += 1
        free = 0
        slot = cls.vp_free_head[vp]
        while slot != cls.opv:
            owner = cls.slot_owner[vp * cls.opv + slot]
            assert owner & FREE_SLOT
            free += 1
            slot = owner & ~FREE_SLOT
        assert live == cls.vp_inuse[vp] and live + free == cls.opv
        for p in range(cls.ppv):
            assert cls.page_users[vp * cls.ppv + p] == users[p]
            assert (cls.pfn[vp * cls.ppv + p] != NO_PAGE) == (users[p] > 0)
            pages += users[p] > 0
        objects += live
    assert objects == cls.objects and requested == cls.requested and pages == cls.pages
