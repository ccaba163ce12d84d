"""The C request loop over the C store: real mounts, loop devices, fio, blkdiscard and swapon.

zcached.core.CoreFuseServer (the daemon's data path) serves a CoreStore in this process: the
Python side only mounts; C worker threads answer every request.  The same scenarios as
tests/test_fuse.py (which runs the Python front, the model), checked through the store's own
counters instead of a recording backend.  Fixtures unmount and detach in ``finally`` blocks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import loop_device
from test_fuse import _aligned, _dio_read, _dio_write, _mounted

from zcached.core import CoreFuseServer, CoreStore
from zcached.fuse import MountError

MiB = 1 << 20
SIZE = 64 * MiB
BLKDISCARD = 0x1277

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2) and losetup")


@pytest.fixture
def mountdir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    mnt = os.path.join(str(tmp_path), "mnt")
    os.mkdir(mnt)
    try:
        yield mnt
    finally:
        while _mounted(mnt):  # only if a test or stop() failed
            subprocess.run(["umount", "-l", mnt], check=False)


def _serve(store: CoreStore, mnt: str, threads: int = 2) -> CoreFuseServer:
    srv = CoreFuseServer(store, mnt, store.size_bytes, threads=threads)
    srv.mount()
    try:
        srv.start()
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture
def store() -> Iterator[CoreStore]:
    st = CoreStore(SIZE, heaps=2)
    try:
        yield st
    finally:
        st.close()


@pytest.fixture
def server(store: CoreStore, mountdir: str) -> Iterator[CoreFuseServer]:
    srv = _serve(store, mountdir)
    try:
        yield srv
    finally:
        srv.stop()
    assert not _mounted(mountdir)


@pytest.fixture
def loopdev(server: CoreFuseServer) -> Iterator[str]:
    with loop_device(server.image_path) as dev:
        yield dev


def test_one_file_0600_fixed_size(server: CoreFuseServer, mountdir: str) -> None:
    assert os.listdir(mountdir) == ["swap.img"]
    st = os.stat(server.image_path)
    assert st.st_size == SIZE and st.st_mode & 0o777 == 0o600
    os.truncate(server.image_path, SIZE)
    with pytest.raises(PermissionError):
        os.truncate(server.image_path, SIZE // 2)
    with pytest.raises(PermissionError):
        os.chmod(server.image_path, 0o644)


def test_loop_roundtrip_with_1mib_requests(
    server: CoreFuseServer, store: CoreStore, loopdev: str
) -> None:
    data = (os.urandom(MiB) + b"zcached " * (MiB // 8) + bytes(MiB)) * 4
    _dio_write(loopdev, 0, data)
    assert _dio_read(loopdev, 0, len(data)) == data
    with open(server.image_path, "rb") as f:
        assert f.read(len(data)) == data
    st = server.stats()
    reqs = st["requests"]
    assert isinstance(reqs, dict) and reqs["WRITE"] > 0
    assert int(st["bytes_written"]) // reqs["WRITE"] > 128 * 1024  # type: ignore[call-overload]
    s = store.stats()
    assert s.pages_stored == len(data) // 4096 and s.same_pages >= 4 * 256
    assert s.huge_pages >= 4 * 256 and s.failed_reads == s.failed_writes == 0


KEPT = 2 * 2 * 64 * 1024  # two workers, two buffers each, 64 KiB of each kept when idle


def _trimmed(server: CoreFuseServer, timeout: float = 10.0) -> dict[str, object]:
    """The loop's stats once its workers' buffers are back to what idle workers keep."""
    end = time.monotonic() + timeout
    while True:
        st = server.stats()
        resident = int(st["buffer_resident_bytes"])  # type: ignore[call-overload]
        if resident <= KEPT or time.monotonic() > end:
            return st
        time.sleep(0.05)


def test_idle_workers_give_back_their_request_buffers(
    server: CoreFuseServer, store: CoreStore
) -> None:
    """1 MiB requests make a worker's buffers resident; a second idle gives all but 64 KiB
    of each back, and the next requests (which fault the pages in again) are served intact."""
    data = os.urandom(MiB)
    for rnd in range(1, 3):
        _dio_write(server.image_path, rnd * MiB, data)  # rbuf of one worker: 1 MiB
        assert _dio_read(server.image_path, rnd * MiB, MiB) == data  # obuf: 1 MiB
        busy = server.stats()
        assert int(busy["buffer_resident_bytes"]) >= 2 * MiB  # type: ignore[call-overload]
        st = _trimmed(server)
        assert int(st["buffer_resident_bytes"]) <= KEPT  # type: ignore[call-overload]
        assert int(st["buffer_trims"]) > int(busy["buffer_trims"])  # type: ignore[call-overload]
        assert st["internal_errors"] == 0
    assert _dio_read(server.image_path, MiB, 2 * MiB) == data * 2
    assert store.stats().failed_reads == 0


def test_spinning_workers_take_requests_and_stop_when_idle(store: CoreStore, mountdir: str) -> None:
    """io_spin_us: one-at-a-time reads are taken by a spinning worker (SPIN in fuse_loop.c),
    every byte intact; once no request comes, no worker spins any more."""
    srv = CoreFuseServer(store, mountdir, store.size_bytes, threads=2, spin_us=500)
    srv.mount()
    try:
        srv.start()
        data = os.urandom(256 * 4096)
        _dio_write(srv.image_path, 0, data)
        for p in range(256):
            assert _dio_read(srv.image_path, p * 4096, 4096) == data[p * 4096 : (p + 1) * 4096]
        st = srv.stats()
        assert int(st["spin_hits"]) > 0 and int(st["spin_ns"]) > 0  # type: ignore[call-overload]
        time.sleep(0.01)  # longer than a spin: the last one has run out
        before = srv.stats()
        time.sleep(0.3)
        after = srv.stats()
        assert after["spin_ns"] == before["spin_ns"] and after["internal_errors"] == 0
    finally:
        srv.stop()


@pytest.mark.parametrize("length", [1, 4095, 4096, 65536, 65537 // 512 * 512, MiB])
def test_reply_buffer_boundaries(server: CoreFuseServer, length: int) -> None:
    data = os.urandom(2 * MiB)
    _dio_write(server.image_path, 2 * MiB, data)
    length = max(512, length // 512 * 512)
    assert _dio_read(server.image_path, 2 * MiB, length) == data[:length]
    tail = SIZE - 4096
    _dio_write(server.image_path, tail, data[:4096])
    fd = os.open(server.image_path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = _aligned(8192)
        assert os.preadv(fd, [buf], tail) == 4096  # clamped at the end of the device
        assert bytes(buf[:4096]) == data[:4096]
    finally:
        os.close(fd)


def test_unaligned_buffered_writes(server: CoreFuseServer) -> None:
    fd = os.open(server.image_path, os.O_RDWR)
    try:
        os.pwrite(fd, b"A" * 10000, 3)
        os.pwrite(fd, b"hello", 4094)
        got = os.pread(fd, 10010, 0)
    finally:
        os.close(fd)
    want = bytearray(10010)
    want[3:10003] = b"A" * 10000
    want[4094:4099] = b"hello"
    assert got == bytes(want)


def test_blkdiscard_frees_pages(server: CoreFuseServer, store: CoreStore, loopdev: str) -> None:
    _dio_write(loopdev, 0, os.urandom(4 * MiB))
    before = store.stats()
    fd = os.open(loopdev, os.O_RDWR)
    try:
        fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", MiB, 2 * MiB))
    finally:
        os.close(fd)
    after = store.stats()
    assert before.pages_stored - after.pages_stored == 512
    assert after.discards - before.discards == 512
    assert before.mem_used_total - after.mem_used_total == 2 * MiB  # huge pages, one each
    assert _dio_read(loopdev, MiB, 2 * MiB) == bytes(2 * MiB)
    assert server.stats()["bytes_discarded"] == 2 * MiB


def test_fallocate_modes(server: CoreFuseServer, store: CoreStore) -> None:
    path = server.image_path
    _dio_write(path, 0, b"\x77" * 16384)
    subprocess.run(["fallocate", "-p", "-o", "4096", "-l", "8192", path], check=True)
    assert _dio_read(path, 0, 16384) == b"\x77" * 4096 + bytes(8192) + b"\x77" * 4096
    subprocess.run(["fallocate", "-z", "-o", "100", "-l", "50", path], check=True)
    assert _dio_read(path, 0, 4096) == b"\x77" * 100 + bytes(50) + b"\x77" * 3946
    r = subprocess.run(["fallocate", "-c", "-o", "0", "-l", "4096", path], capture_output=True)
    assert r.returncode != 0  # collapse range: EOPNOTSUPP
    assert os.stat(path).st_size == SIZE


def test_fio_verify_crc32c(loopdev: str, store: CoreStore) -> None:
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={loopdev}", "--rw=randwrite", "--bs=4k",
         "--bsrange=4k-1M", "--size=64M", "--iodepth=32", "--ioengine=libaio", "--direct=1",
         "--numjobs=2", "--offset_increment=32M", "--size=32M", "--verify=crc32c",
         "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--refill_buffers=1",
         "--buffer_compress_percentage=60", "--buffer_compress_chunk=4096", "--minimal"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = store.stats()
    assert s.checksum_errors == 0 and s.failed_reads == 0 and s.failed_writes == 0
    assert store.scrub() == []
    store.allocator.check()


def test_corrupt_page_is_eio_never_data(
    server: CoreFuseServer, store: CoreStore, loopdev: str
) -> None:
    page = b"compressible " * 315 + b"x"
    _dio_write(loopdev, 0, page[:4096] + page[:4096])
    store.corrupt(0)
    with pytest.raises(OSError) as e:
        _dio_read(server.image_path, 0, 4096)
    assert e.value.errno == errno.EIO
    with pytest.raises(OSError):
        _dio_read(loopdev, 0, 4096)  # through the loop device: an error, never data
    assert _dio_read(loopdev, 4096, 4096) == page[:4096]
    assert store.scrub() == [0]
    s = store.stats()
    assert s.checksum_errors >= 3 and s.failed_reads >= 2
    errors = server.stats()["errors"]
    assert isinstance(errors, dict) and errors["READ"] >= 2
    _dio_write(loopdev, 0, page[:4096])  # an overwrite heals it
    assert _dio_read(loopdev, 0, 4096) == page[:4096]


def test_memory_limit_is_enospc_and_keeps_old_data(mountdir: str) -> None:
    st = CoreStore(SIZE, heaps=2, mem_limit=MiB)
    srv = _serve(st, mountdir)
    try:
        first = os.urandom(512 * 1024)
        _dio_write(srv.image_path, 0, first)
        with pytest.raises(OSError) as e:
            _dio_write(srv.image_path, MiB, os.urandom(MiB))
        assert e.value.errno == errno.ENOSPC
        assert _dio_read(srv.image_path, 0, len(first)) == first
        assert _dio_read(srv.image_path, MiB, MiB) == bytes(MiB)  # nothing half written
        s = st.stats()
        assert s.mem_used_total <= MiB and s.failed_writes >= 1
    finally:
        srv.stop()
        st.close()


def test_stop_while_loop_device_attached(store: CoreStore, mountdir: str) -> None:
    srv = _serve(store, mountdir)
    try:
        with loop_device(srv.image_path) as dev:
            srv.stop()  # busy: lazy unmount + connection abort; must not hang
            assert not _mounted(mountdir)
            with pytest.raises(OSError):
                _dio_read(dev, 0, 4096)  # the daemon is gone: errors, not zeros
    finally:
        srv.stop()


def test_swapon_discards_the_device(loopdev: str, store: CoreStore) -> None:
    _dio_write(loopdev, 8 * MiB, os.urandom(8 * MiB))
    subprocess.run(["mkswap", loopdev], check=True, capture_output=True)
    before = store.stats()
    subprocess.run(["swapon", "--discard=once", "-p", "0", loopdev], check=True)
    try:
        with open("/proc/swaps") as f:
            assert any(line.split()[0] == loopdev for line in f)
    finally:
        subprocess.run(["swapoff", loopdev], check=True)
    after = store.stats()
    assert after.discards - before.discards >= SIZE // 4096 // 2
    assert after.pages_stored < before.pages_stored - 1024  # the 8 MiB of data went


def test_second_mount_refused_and_bad_threads(server: CoreFuseServer, mountdir: str) -> None:
    other = CoreStore(SIZE)
    try:
        with pytest.raises(MountError):
            CoreFuseServer(other, mountdir, SIZE).mount()
        with pytest.raises(MountError):
            _serve(other, os.path.join(mountdir, "..", "nope"))
    finally:
        other.close()
