"""Compaction under real block I/O: fio verify through FUSE + a loop device while objects move.

Run twice: on the C core (zcached.core.CoreStore served by its C request loop, the daemon's data
path) and on the reference model (a PageStore over an XcfMalloc with two Hoard worker heaps
served by zcached.fuse.FuseServer, two workers, worker k bound to heap k), in this process; a
loop device with direct I/O sits on the image. While an aggressive Compactor (no thresholds, no
pacing) compacts back to back, fio writes, re-writes and verifies (crc32c) the first half of the
device with compressible data in three compressibility bands (so objects land in many size
classes), and a churn thread writes, reads back and BLKDISCARDs 4K..64K pieces of the second
half (fio does not verify that half) to keep vpages sparse. The fixtures unmount, detach the
loop device and stop the threads in ``finally`` blocks, also when a test fails.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import struct
import subprocess
import threading
from collections.abc import Iterator

import pytest
from conftest import loop_device

from zcached.compactor import CompactionPolicy, Compactor
from zcached.core import CoreFuseServer, CoreStore
from zcached.fuse import FuseServer
from zcached.store import PageStore
from zcached.xcfmalloc import XcfMalloc

Store = PageStore | CoreStore

MiB = 1 << 20
SIZE = 64 * MiB
FIO_BYTES = 32 * MiB  # fio verifies [0, 32 MiB); the churn thread owns [32 MiB, 64 MiB)
BLKDISCARD = 0x1277
HEAPS = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2) and losetup")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture(params=["core", "model"])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    st: Store
    if request.param == "core":
        st = CoreStore(SIZE, compressor="lz4", heaps=HEAPS)
    else:
        st = PageStore(SIZE, compressor="lz4", allocator=XcfMalloc(heaps=HEAPS))
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def loopdev(store: Store, tmp_path: os.PathLike[str]) -> Iterator[str]:
    mnt = os.path.join(str(tmp_path), "mnt")
    os.mkdir(mnt)
    srv: FuseServer
    if isinstance(store, CoreStore):
        srv = CoreFuseServer(store, mnt, SIZE, threads=HEAPS)
    else:
        heap_ids = iter(range(1, HEAPS + 1))
        pool = store.allocator
        srv = FuseServer(
            store, mnt, SIZE, threads=HEAPS, thread_init=lambda: pool.bind_heap(next(heap_ids))
        )
    try:
        srv.mount()
        srv.start()
        with loop_device(srv.image_path) as dev:
            yield dev
    finally:
        srv.stop()
        while _mounted(mnt):  # only if stop() failed
            subprocess.run(["umount", "-l", mnt], check=False)


@pytest.fixture
def compactor(store: Store) -> Iterator[Compactor]:
    """Compacts continuously: always due, checked every 5 ms, no CPU budget."""
    policy = CompactionPolicy(interval=0.005, min_ratio=1.0, min_wasted_bytes=0, cpu_budget=1.0)
    comp = Compactor(store.allocator, policy)
    comp.start()
    try:
        yield comp
    finally:
        comp.stop()


def _page_of(rnd: random.Random, compressible: float) -> bytes:
    """4K of which roughly ``compressible`` is a repeated pattern and the rest random."""
    keep = int(4096 * (1 - compressible)) // 16 * 16
    return rnd.randbytes(keep) + bytes([rnd.randrange(256)]) * (4096 - keep)


class Churn(threading.Thread):
    """Writes, reads back and discards pieces of [FIO_BYTES, SIZE) until stopped; keeps a model."""

    def __init__(self, dev: str) -> None:
        super().__init__(name="churn")
        self.dev = dev
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.ops = {"write": 0, "read": 0, "discard": 0}
        self.model: dict[int, bytes] = {}  # page -> contents (absent: zeros)

    def run(self) -> None:
        rnd = random.Random(5)
        buf = mmap.mmap(-1, 16 * 4096)
        fd = os.open(self.dev, os.O_RDWR | os.O_DIRECT)
        try:
            while not self.stop.is_set():
                first = rnd.randrange(FIO_BYTES // 4096, SIZE // 4096 - 16)
                n = rnd.randint(1, 16)
                op = rnd.random()
                if op < 0.45:
                    self._write(fd, buf, rnd, first, n)
                elif op < 0.75:
                    self._discard(fd, first, n)
                else:
                    self._read(fd, buf, first, n)
        except Exception as e:  # reported by the test, not lost in the thread
            self.errors.append(f"churn: {e!r}")
        finally:
            os.close(fd)
            buf.close()

    def _write(self, fd: int, buf: mmap.mmap, rnd: random.Random, first: int, n: int) -> None:
        pages = [_page_of(rnd, rnd.choice((0.3, 0.6, 0.8, 0.95))) for _ in range(n)]
        buf[: n * 4096] = b"".join(pages)
        os.pwritev(fd, [memoryview(buf)[: n * 4096]], first * 4096)
        for i, page in enumerate(pages):
            self.model[first + i] = page
        self.ops["write"] += 1

    def _discard(self, fd: int, first: int, n: int) -> None:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", first * 4096, n * 4096))
        for p in range(first, first + n):
            self.model.pop(p, None)
        self.ops["discard"] += 1

    def _read(self, fd: int, buf: mmap.mmap, first: int, n: int) -> None:
        os.preadv(fd, [memoryview(buf)[: n * 4096]], first * 4096)
        for i in range(n):
            want = self.model.get(first + i, bytes(4096))
            if buf[i * 4096 : (i + 1) * 4096] != want:
                self.errors.append(f"churn: page {first + i} read back wrong")
        self.ops["read"] += 1


def _fio_verify(dev: str, cwd: str) -> subprocess.CompletedProcess[str]:
    """Three jobs over [0, FIO_BYTES), each writing 4 rounds and verifying after each."""
    third = FIO_BYTES // 3 // MiB * MiB
    args = ["fio", f"--filename={dev}", "--ioengine=libaio", "--direct=1", "--iodepth=16",
            "--rw=randwrite", "--bsrange=4k-64k", "--loops=4", "--verify=crc32c",
            "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--refill_buffers=1",
            "--buffer_compress_chunk=4096", "--minimal"]  # fmt: skip
    for i, pct in enumerate((30, 60, 85)):
        size = third if i < 2 else FIO_BYTES - 2 * third
        args += [f"--name=band{pct}", f"--offset={i * third}", f"--size={size}",
                 f"--buffer_compress_percentage={pct}"]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd)


def test_fio_verify_while_compacting_with_discards(
    store: Store, loopdev: str, compactor: Compactor, tmp_path: os.PathLike[str]
) -> None:
    churn = Churn(loopdev)
    churn.start()
    try:
        r = _fio_verify(loopdev, str(tmp_path))
    finally:
        churn.stop.set()
        churn.join()
    runs_during_fio = compactor.runs
    moved_during_fio = compactor.objects_moved
    compactor.stop()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "verify" not in r.stderr.lower(), r.stderr[-2000:]
    assert not churn.errors, churn.errors[:5]
    assert min(churn.ops.values()) > 0, churn.ops
    # compaction really ran and moved objects while the I/O went on
    assert runs_during_fio > 0 and moved_during_fio > 0
    stats = store.stats()
    assert stats.pages_compacted > 0
    # fio's data compressed into many classes (not raw pages the compactor cannot pack)
    assert stats.huge_pages < stats.pages_stored // 2, stats
    assert len(store.allocator.fragmentation()) > 10
    store.allocator.check()
    assert store.scrub() == []
    assert stats.checksum_errors == 0 and stats.failed_reads == 0 and stats.failed_writes == 0
