"""core: the daemon's data path, the C core (zcached._core) behind the Python interfaces.

Owns: :class:`CoreStore` (the C page store in its memfd arena, with the ``PageStore``
interface that the metrics, status and compactor use) and :class:`CoreFuseServer` (the C FUSE
request loop on the descriptor that :class:`zcached.fuse.FuseServer` mounts).
Must not: do per-request work in Python.  Every call into ``_core`` releases the GIL; the FUSE
workers are C threads that never take it.

The reference model of what the core does is zcached/store.py + zcached/xcfmalloc.py
(tests/test_core_model.py runs both on the same operations and compares every byte and
counter); zcached/fuse.py is the model of the request loop.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from zcached import _core
from zcached.codec import DEFAULT_HUGE_THRESHOLD
from zcached.fuse import LATENCY_BOUNDS_NS, OPCODE_NAMES, FuseServer, MountError
from zcached.store import StoreError, StoreStats

log = logging.getLogger(__name__)

__all__ = ["CoreFuseLoop", "CoreFuseServer", "CorePool", "CoreStore", "PoolStats"]


@dataclass(frozen=True)
class PoolStats:
    """The allocator counters the compactor and benchmarks read (as xcfmalloc.PoolStats)."""

    pool_bytes: int
    pool_bytes_max: int
    requested_bytes: int
    objects: int
    pages_compacted: int
    metadata_bytes: int  # handle table, vpages, counters, headers (not the page table)
    vpages_to_global: int  # Hoard hand-overs from worker heaps to the global heap


def _store_error(e: OSError, what: str) -> StoreError:
    err = e.errno or errno.EIO
    return StoreError(err, f"{what}: {e.strerror or errno.errorcode.get(err, err)}")


class CorePool:
    """The allocator side of a :class:`CoreStore`: what the compactor and metrics ask of it."""

    def __init__(self, core: _core.Store) -> None:
        self._core = core

    @property
    def pool_bytes(self) -> int:
        return int(self._core.stats()["mem_used_total"])

    @property
    def requested_bytes(self) -> int:
        return int(self._core.stats()["compr_data_size"])

    def compact(self, max_moves: int | None = None) -> int:
        """Move up to ``max_moves`` objects (None: until nothing is worth moving), GIL free."""
        return int(self._core.compact(max_moves or 0))

    def reclaimable_bytes(self) -> int:
        return int(self._core.reclaimable_bytes())

    def fragmentation(self) -> list[tuple[int, int, int]]:
        """(class size, pool bytes, requested bytes) of each class in use."""
        return [(size, pool, req) for size, pool, req, _n in self._core.fragmentation()]

    def stats(self) -> PoolStats:
        s = self._core.stats()
        return PoolStats(
            pool_bytes=s["mem_used_total"],
            pool_bytes_max=s["mem_used_max"],
            requested_bytes=s["compr_data_size"],
            objects=s["objects"],
            pages_compacted=s["pages_compacted"],
            metadata_bytes=s["metadata_bytes"] - s["table_bytes"],
            vpages_to_global=s["vpages_to_global"],
        )

    def check(self) -> None:
        """Raise AssertionError if an allocator invariant is broken (tests)."""
        rc = self._core.check()
        if rc:
            raise AssertionError(f"xcfmalloc invariant {-rc} broken")


class CoreStore:
    """A block device of ``size_bytes`` in the C core; the ``PageStore`` interface."""

    def __init__(
        self,
        size_bytes: int,
        *,
        compressor: str = "lz4",
        level: int | None = None,
        mem_limit: int = 0,
        heaps: int = 1,
        huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
    ) -> None:
        if size_bytes <= 0 or size_bytes % _core.PAGE_SIZE:
            raise ValueError(f"device size must be a positive multiple of {_core.PAGE_SIZE}")
        if mem_limit < 0:
            raise ValueError("mem_limit must be >= 0 (0 = no limit)")
        self._bind(
            _core.Store(
                size_bytes,
                compressor=compressor,
                level=level,
                mem_limit=mem_limit,
                huge_threshold=huge_threshold,
                heaps=heaps,
            )
        )

    @classmethod
    def wrap(cls, core: _core.Store) -> CoreStore:
        """The interface over a store the caller already opened (or attached)."""
        store = cls.__new__(cls)
        store._bind(core)
        return store

    @classmethod
    def attach(cls, memfd: int) -> CoreStore:
        """The store held in the arena ``memfd`` (made by another process, which may have died
        at any instruction), recovered: see :meth:`recovery`.  ValueError for an arena that is
        not one of this version's; the descriptor stays the caller's."""
        return cls.wrap(_core.Store(attach=memfd))

    def _bind(self, core: _core.Store) -> None:
        cfg = core.config()
        self.core = core
        self.size_bytes = int(cfg["size"])
        self.npages = self.size_bytes // _core.PAGE_SIZE
        self.compressor = str(cfg["compressor"])
        self.heaps = int(cfg["heaps"])
        self.allocator = CorePool(core)

    def recovery(self) -> dict[str, int] | None:
        """What :meth:`attach` found and did (pages, objects, orphans, lost_pages,
        pages_freed, ns); None for a store made new."""
        rec = self.core.recovery()
        return None if rec is None else {k: int(v) for k, v in rec.items()}

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length, _core.MAX_REQUEST)
        try:
            return bytes(self.core.read(offset, length))
        except OSError as e:
            raise _store_error(e, f"read {offset}+{length}") from None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data), _core.MAX_REQUEST)
        try:
            self.core.write(offset, data)
        except OSError as e:
            raise _store_error(e, f"write {offset}+{len(data)}") from None

    def discard(self, offset: int, length: int) -> None:
        self._check_range(offset, length, self.size_bytes)
        try:
            self.core.discard(offset, length)
        except OSError as e:
            raise _store_error(e, f"discard {offset}+{length}") from None

    def _check_range(self, offset: int, length: int, most: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise StoreError(errno.EINVAL, f"range {offset}+{length} outside the device")
        if length > most:
            raise StoreError(errno.EINVAL, f"request of {length} bytes (at most {most})")

    def tick(self) -> None:
        """Advance the clock of page ages by one tick (the recompressor's)."""
        self.core.tick()

    def recompress(
        self, start: int, max_scan: int, idle_ticks: int, level: int
    ) -> tuple[int, dict[str, int]]:
        """Store pages start..start+max_scan-1 that are idle (untouched for ``idle_ticks``
        ticks) again with zstd at ``level`` when smaller; where to go on, and the report
        (csrc/store.h, struct zc_recompress_report)."""
        nxt, report = self.core.recompress(start, max_scan, idle_ticks, level)
        return int(nxt), {k: int(v) for k, v in report.items()}

    def sample(self, pages: int, stride: int = 1) -> None:
        """Fill a reservoir of ``pages`` pages with one in 8 x ``stride`` of the pages written
        (for :meth:`train_dictionary`); 0 stops and frees it."""
        self.core.sample(pages, stride)

    def train_dictionary(self, dict_bytes: int, level: int) -> int | None:
        """Train a zstd dictionary on the reservoir and make it the one recompression uses:
        its id, or None while the reservoir holds too few pages (it fills on).  OSError for
        the rest (ENOSPC: all 15 slots still used by pages; EINVAL: nothing to learn)."""
        try:
            return int(self.core.train_dictionary(dict_bytes, level))
        except BlockingIOError:
            return None

    def set_dictionary(self, data: bytes, level: int) -> int:
        """Make ``data`` (a zstd dictionary trained elsewhere) the current one; its id."""
        return int(self.core.set_dictionary(data, level))

    def scrub(self) -> list[int]:
        """Verify every stored page; the pages failing their checksum (as PageStore.scrub;
        the first 4096 of them), each counted in checksum_errors."""
        _checked, _bad, pages = self.core.scrub()
        return [int(p) for p in pages]

    def corrupt(self, page: int) -> None:
        """Test hook: flip a byte of the object that holds ``page``."""
        self.core.corrupt(page)

    def stats(self) -> StoreStats:
        s = self.core.stats()
        return StoreStats(**{k: s[k] for k in StoreStats.__dataclass_fields__})

    def metadata_bytes(self) -> int:
        """Bytes of the page table (the allocator's metadata is in allocator.stats())."""
        return int(self.core.stats()["table_bytes"])

    def raw_stats(self) -> dict[str, int]:
        """Every counter of the core, including objects, metadata and arena bytes."""
        return {k: int(v) for k, v in self.core.stats().items() if not isinstance(v, tuple)}

    def backing_read_hist(self) -> list[int]:
        """Reads of the backing file by latency: bucket i counts those <= 16 us << i, the
        last one the rest (csrc/store.h, backing_read_hist)."""
        return [int(v) for v in self.core.stats()["backing_read_hist"]]

    def set_backing(self, fd: int, size: int) -> None:
        """Give the store its writeback tier's backing file (csrc/store.h, set_backing)."""
        try:
            self.core.set_backing(fd, size)
        except OSError as e:
            raise _store_error(e, "backing file") from e

    def writeback(self, max_bytes: int, idle_ticks: int) -> dict[str, int]:
        """Write back at most one segment of pages idle for ``idle_ticks`` ticks (0: any);
        the report (struct zc_writeback_report).  OSError: ENODEV (no backing file), ENOSPC
        (the file is full), EIO (the write failed; the pages stayed in the pool)."""
        return {k: int(v) for k, v in self.core.writeback(max_bytes, idle_ticks).items()}

    def memfd(self) -> int:
        return int(self.core.memfd())

    def close(self) -> None:
        self.core.close()


def _loop_stats(loop: _core.Fuse) -> dict[str, object]:
    """:meth:`FuseServer.stats` of the C workers' counters."""
    st = loop.stats()
    if list(st["latency_bounds_ns"]) != list(LATENCY_BOUNDS_NS):
        raise RuntimeError("latency bounds of the C loop and zcached.fuse differ")
    used = [op for op, n in enumerate(st["requests"]) if n]

    def name(op: int) -> str:
        return OPCODE_NAMES.get(op, f"OP{op}")

    return {
        "requests": {name(op): st["requests"][op] for op in used},
        "errors": {name(op): st["errors"][op] for op in used if st["errors"][op]},
        "bytes_read": st["bytes_read"],
        "bytes_written": st["bytes_written"],
        "bytes_discarded": st["bytes_discarded"],
        "internal_errors": st["internal_errors"],
        "buffer_trims": st["buffer_trims"],
        "buffer_resident_bytes": st["buffer_resident"],
        "spin_ns": st["spin_ns"],
        "spin_hits": st["spin_hits"],
        "resent_requests": st["resent_requests"],
        "uring": st["uring"],
        "uring_queues": st["uring_queues"],
        "uring_adopted": st["uring_adopted"],
        "uring_requests": st["uring_requests"],
        "uring_errors": st["uring_errors"],
        "latency_bounds_ns": list(LATENCY_BOUNDS_NS),
        "latency_buckets": {name(op): list(st["lat"][op]) for op in used},
        "latency_sum_ns": {name(op): st["lat_sum_ns"][op] for op in used},
    }


class CoreFuseLoop:
    """The C request loop on descriptors a keeper process holds (one worker each): the server
    side of crash recovery and live upgrade.  It never mounts, unmounts or closes them.  On a
    connection an earlier server initialised it resumes: FUSE_NOTIFY_RESEND first, so the
    requests that server had taken are answered now (see csrc/fuse_loop.c)."""

    def __init__(self, store: CoreStore, fds: list[int], *, file_name: str = "swap.img") -> None:
        if not fds:
            raise ValueError("no FUSE descriptors")
        self._loop = _core.Fuse(store.core, fds[0], file_name, fds=fds)

    @classmethod
    def wrap(cls, loop: _core.Fuse) -> CoreFuseLoop:
        """The interface over a loop the caller already made (and maybe started)."""
        self = cls.__new__(cls)
        self._loop = loop
        return self

    def start(self) -> None:
        try:
            self._loop.start()
        except OSError as e:
            raise MountError(f"FUSE workers: {e.strerror or e}") from None

    def set_spin(self, us: int) -> None:
        """How long (microseconds, 0..1000) a worker spins for the next request (SPIN in
        csrc/fuse_loop.c); 0 = never."""
        self._loop.set_spin(us)

    def alive(self) -> bool:
        """Whether any worker still serves (they end when the connection goes away)."""
        return int(self._loop.join(0)) > 0

    @property
    def resumed(self) -> bool:
        return bool(self._loop.stats()["resumed"])

    @property
    def resend_error(self) -> int:
        return int(self._loop.stats()["resend_error"])

    @property
    def io_flusher_failed(self) -> bool:
        return bool(self._loop.stats()["io_flusher_failed"])

    def stats(self) -> dict[str, object]:
        return _loop_stats(self._loop)


class CoreFuseServer(FuseServer):
    """:class:`FuseServer`'s mount and unmount, with the C request loop serving the file."""

    def __init__(
        self, store: CoreStore, mountpoint: str, size: int, *, threads: int = 1,
        file_name: str = "swap.img", spin_us: int = 0,
    ) -> None:  # fmt: skip
        super().__init__(store, mountpoint, size, file_name=file_name, threads=threads)
        self.core_store = store
        self.spin_us = spin_us
        self._loop: _core.Fuse | None = None

    def start(self) -> None:
        with self._lock:
            if self._fd < 0:
                raise MountError(f"{self.mountpoint}: not mounted")
            if self._loop is not None:
                return
            try:
                loop = _core.Fuse(
                    self.core_store.core, self._fd, self.file_name, threads=self.threads
                )
                loop.set_spin(self.spin_us)
                loop.start()
            except (OSError, ValueError) as e:
                raise MountError(f"FUSE workers: {e}") from None
            self._loop = loop

    def _workers_alive(self, timeout: float) -> bool:
        if self._loop is None:
            return False
        return int(self._loop.join(int(timeout * 1000))) > 0

    def _release_workers(self) -> None:
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    @property
    def io_flusher_failed(self) -> bool:
        return self._loop is not None and bool(self._loop.stats()["io_flusher_failed"])

    def stats(self) -> dict[str, object]:
        """As :meth:`FuseServer.stats`, from the C workers' counters."""
        if self._loop is None:
            return super().stats()
        return _loop_stats(self._loop)
