"""bench/zram: kernel zram device /dev/zram0 as a context manager for the benchmarks.

Owns: configuring /dev/zram0 (reset, comp_algorithm, disksize), writing pages to it, BLKDISCARD,
compaction, reading mm_stat/io_stat, and ALWAYS resetting it on exit.  Must NOT touch a zram0
that is in use (listed in /proc/swaps or mounted): it refuses with ZramBusyError instead.

Invariants: between __enter__ and __exit__ the device belongs to this object; __exit__ swapoffs
it if it became swap meanwhile (code inside the block did swapon) and then writes 1 to
/sys/block/zram0/reset, retrying a few times because reset fails with EBUSY while any file
descriptor on the device is still open.  After __exit__ disksize reads 0.
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import time
from pathlib import Path
from types import TracebackType

DEV = "/dev/zram0"
SYS = Path("/sys/block/zram0")
LOCK = "/run/lock/zcached-bench-zram.lock"
BLKDISCARD = 0x1277  # _IO(0x12, 119)
MM_STAT_FIELDS = (
    "orig_data_size",
    "compr_data_size",
    "mem_used_total",
    "mem_limit",
    "mem_used_max",
    "same_pages",
    "pages_compacted",
    "huge_pages",
    "huge_pages_since",
)
IO_STAT_FIELDS = ("failed_reads", "failed_writes", "invalid_io", "notify_free")


class ZramBusyError(RuntimeError):
    """/dev/zram0 is in use by someone else (swap or mounted)."""


def _in_use() -> str | None:
    with open("/proc/swaps") as f:
        if any(line.split()[0] == DEV for line in f.readlines()[1:] if line.strip()):
            return "it is active swap (/proc/swaps)"
    with open("/proc/mounts") as f:
        if any(line.split()[0] == DEV for line in f if line.strip()):
            return "it is mounted (/proc/mounts)"
    return None


class Zram:
    """``with Zram(disksize, "lz4") as z: z.write_pages(data); z.mm_stat()`` on /dev/zram0."""

    path = DEV
    _held = False  # this process holds LOCK

    def __init__(self, disksize_bytes: int, algorithm: str = "lz4") -> None:
        self._lock_fd = -1
        self.disksize = disksize_bytes
        self.algorithm = algorithm

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Zram:
        # One process using zram0 at a time on this machine: concurrent benchmark runs queue
        # here.  Inside one process a nested Zram skips the lock and meets _in_use() instead.
        if not Zram._held:
            self._lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            Zram._held = True
        try:
            return self._enter()
        except BaseException:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
            Zram._held = False

    def _enter(self) -> Zram:
        if not SYS.exists():
            ctl = Path("/sys/class/zram-control/hot_add")
            if not ctl.exists():
                raise ZramBusyError(
                    "zram: no /sys/block/zram0 and no zram-control (zram module not loaded)"
                )
            ctl.read_text()  # creates the lowest free zramN; zram0 if none exists
            if not SYS.exists():
                raise ZramBusyError("zram: hot_add did not create zram0")
        why = _in_use()
        if why:
            raise ZramBusyError(f"zram: refusing to use {DEV}: {why}")
        try:
            self._reset()
            algs = (SYS / "comp_algorithm").read_text().replace("[", "").replace("]", "").split()
            if self.algorithm not in algs:
                raise ValueError(f"zram: algorithm {self.algorithm!r} not in {algs}")
            (SYS / "comp_algorithm").write_text(self.algorithm)
            (SYS / "disksize").write_text(str(self.disksize))
        except BaseException:
            self._reset()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            if _in_use() == "it is active swap (/proc/swaps)":
                subprocess.run(["swapoff", DEV], check=False)
        finally:
            try:
                self._reset()
            finally:
                self._unlock()

    @staticmethod
    def _reset() -> None:
        last: OSError | None = None
        for _ in range(50):
            try:
                (SYS / "reset").write_text("1")
                return
            except OSError as e:  # EBUSY while a descriptor is still open
                last = e
                time.sleep(0.1)
        raise RuntimeError(f"zram: reset of {DEV} failed: {last}")

    # -- I/O -------------------------------------------------------------------------------
    def write_pages(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Write ``data`` (4K multiple) at ``offset``, fsync, and check a sample reads back."""
        mv = memoryview(data)
        if len(mv) % 4096 or offset % 4096:
            raise ValueError("zram: writes must be 4K aligned")
        if offset + len(mv) > self.disksize:
            raise ValueError("zram: write past disksize")
        fd = os.open(DEV, os.O_WRONLY)
        try:
            done = 0
            while done < len(mv):
                done += os.pwrite(fd, mv[done : done + (1 << 20)], offset + done)
            os.fsync(fd)
        finally:
            os.close(fd)
        if len(mv):
            last = len(mv) - 4096
            for at in {0, last // 2 // 4096 * 4096, last}:
                if self.read(offset + at, 4096) != bytes(mv[at : at + 4096]):
                    raise OSError(f"zram: page at {offset + at} did not land")

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(DEV, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def discard(self, offset: int, length: int) -> None:
        fd = os.open(DEV, os.O_WRONLY)
        try:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))
        finally:
            os.close(fd)

    def discard_pages(self, indexes: list[int]) -> None:
        """BLKDISCARD each 4K page index in ``indexes`` (one ioctl per page, one open)."""
        fd = os.open(DEV, os.O_WRONLY)
        try:
            for i in indexes:
                fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", i * 4096, 4096))
        finally:
            os.close(fd)

    def compact(self) -> None:
        (SYS / "compact").write_text("1")

    def mm_stat(self) -> dict[str, int]:
        vals = (SYS / "mm_stat").read_text().split()
        return {k: int(v) for k, v in zip(MM_STAT_FIELDS, vals, strict=False)}

    def io_stat(self) -> dict[str, int]:
        vals = (SYS / "io_stat").read_text().split()
        return {k: int(v) for k, v in zip(IO_STAT_FIELDS, vals, strict=False)}
