"""FUSE front tests: real mounts, real loop devices (--direct-io=on), real fio and blkdiscard.

Each test mounts zcached.fuse.FuseServer in a tmp dir with its workers in this process; the
fixtures unmount, detach loop devices and join the workers in ``finally`` blocks, also when a
test fails.  Backends: a bytearray (the trivial backend) and the real zcached.store.PageStore,
both wrapped in a recorder that remembers discards and can be told to fail.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import subprocess
import threading
from collections.abc import Iterator

import pytest
from conftest import loop_device

from zcached.fuse import FuseServer, MountError

SIZE = 64 << 20
MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2) and losetup")


class ArrayBackend:
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.buf[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)


class Recorder:
    """Delegates to a backend; records discards and write sizes; can be told to fail."""

    def __init__(self, inner: ArrayBackend | object) -> None:
        self.inner = inner
        self.discards: list[tuple[int, int]] = []
        self.write_sizes: list[int] = []
        self.fail: BaseException | None = None
        self.lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        return self.inner.read(offset, length)  # type: ignore[attr-defined,no-any-return]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.write_sizes.append(len(data))
        self.inner.write(offset, data)  # type: ignore[attr-defined]

    def discard(self, offset: int, length: int) -> None:
        if self.fail is not None:
            raise self.fail
        with self.lock:
            self.discards.append((offset, length))
        self.inner.discard(offset, length)  # type: ignore[attr-defined]


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture(params=["array", "store"])
def backend(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    if request.param == "array":
        yield Recorder(ArrayBackend(SIZE))
        return
    from zcached.store import PageStore

    store = PageStore(SIZE)
    try:
        yield Recorder(store)
    finally:
        store.close()


@pytest.fixture
def mountdir(tmp_path: os.PathLike[str]) -> Iterator[str]:
    mnt = os.path.join(str(tmp_path), "mnt")
    os.mkdir(mnt)
    try:
        yield mnt
    finally:
        while _mounted(mnt):  # only if a test or stop() failed
            subprocess.run(["umount", "-l", mnt], check=False)


@pytest.fixture
def server(backend: Recorder, mountdir: str) -> Iterator[FuseServer]:
    srv = FuseServer(backend, mountdir, SIZE, threads=2)
    try:
        srv.mount()
        srv.start()
        yield srv
    finally:
        srv.stop()
    assert not _mounted(mountdir)


@pytest.fixture
def loopdev(server: FuseServer) -> Iterator[str]:
    with loop_device(server.image_path) as dev:
        yield dev


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page aligned, as O_DIRECT needs


def _dio_write(path: str, offset: int, data: bytes) -> None:
    buf = _aligned(len(data))
    buf[:] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def _dio_read(path: str, offset: int, length: int) -> bytes:
    buf = _aligned(length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def test_one_file_0600_right_size(server: FuseServer, mountdir: str) -> None:
    assert os.listdir(mountdir) == ["swap.img"]
    st = os.stat(server.image_path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == SIZE and st.st_uid == 0 and st.st_nlink == 1
    assert stat.S_ISDIR(os.stat(mountdir).st_mode)
    assert os.statvfs(mountdir).f_bsize == 4096
    with pytest.raises(FileNotFoundError):
        os.stat(os.path.join(mountdir, "other"))
    with pytest.raises(OSError):
        os.open(os.path.join(mountdir, "new"), os.O_CREAT | os.O_WRONLY, 0o600)


def test_size_is_fixed(server: FuseServer) -> None:
    os.truncate(server.image_path, SIZE)  # same size: fine
    with pytest.raises(PermissionError):
        os.truncate(server.image_path, SIZE // 2)
    with pytest.raises(PermissionError):
        os.chmod(server.image_path, 0o644)
    assert os.stat(server.image_path).st_size == SIZE


def test_loop_device_uses_direct_io(loopdev: str) -> None:
    out = subprocess.run(
        ["losetup", "-n", "-O", "DIO", loopdev], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "1"


def test_direct_io_roundtrip_through_loop(server: FuseServer, loopdev: str) -> None:
    page = os.urandom(4096)
    big = os.urandom(MiB) + b""
    _dio_write(loopdev, 8192, page)
    _dio_write(loopdev, 3 * MiB, big)
    assert _dio_read(loopdev, 8192, 4096) == page
    assert _dio_read(loopdev, 3 * MiB, MiB) == big
    assert _dio_read(loopdev, 0, 8192) == bytes(8192)  # never written: zeros
    # the file sees what the loop device wrote (no stale page cache: FOPEN_DIRECT_IO)
    with open(server.image_path, "rb") as f:
        f.seek(3 * MiB + 5)
        assert f.read(100) == big[5:105]
    # large requests: max_pages negotiated, so a 1 MiB write is not cut into 128 KiB pieces
    assert max(server.backend.write_sizes) > 128 * 1024  # type: ignore[attr-defined]
    st = server.stats()
    assert st["bytes_written"] >= MiB + 4096
    assert st["requests"]["WRITE"] >= 2  # type: ignore[index]


@pytest.mark.parametrize("length", [4096, 61440, 65536, 69632, MiB])
def test_reply_buffer_boundaries(server: FuseServer, length: int) -> None:
    """Replies up to 64 KiB go out as one buffer (write), bigger ones as header + payload
    (writev); WRITE replies are one packed buffer.  Every size on both sides of that line
    round-trips, a read over the end of the device is cut short, and the counters show a
    request as soon as its caller has the answer."""
    data = os.urandom(length)
    before = server.stats()
    _dio_write(server.image_path, 2 * MiB, data)
    assert _dio_read(server.image_path, 2 * MiB, length) == data
    st = server.stats()
    reqs, old = st["requests"], before["requests"]
    assert reqs["READ"] > old.get("READ", 0) and reqs["WRITE"] > old.get("WRITE", 0)  # type: ignore[attr-defined,index]
    assert st["bytes_read"] - before["bytes_read"] == length  # type: ignore[operator]
    assert st["bytes_written"] - before["bytes_written"] == length  # type: ignore[operator]
    tail = SIZE - 4096
    _dio_write(server.image_path, tail, data[:4096])
    buf = _aligned(length)
    fd = os.open(server.image_path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], tail) == 4096  # short read at the end of the device
    finally:
        os.close(fd)
    assert buf[:4096] == data[:4096]


def test_unaligned_buffered_writes_to_file(server: FuseServer) -> None:
    model = bytearray(64 * 1024)
    fd = os.open(server.image_path, os.O_RDWR)
    try:
        for off, data in [(5000, b"x" * 100), (4095, os.urandom(10000)), (1, b"ab"),
                          (60000, os.urandom(5536))]:  # fmt: skip
            assert os.pwrite(fd, data, off) == len(data)
            model[off : off + len(data)] = data
        assert os.pread(fd, len(model), 0) == bytes(model)
        assert os.pread(fd, 7, 4093) == bytes(model[4093:4100])
        assert os.pread(fd, 100, SIZE - 10) == bytes(10)  # short read at the end
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"zz", SIZE - 1)  # the file cannot grow
        assert e.value.errno == errno.EFBIG
    finally:
        os.close(fd)


def test_blkdiscard_reaches_backend(server: FuseServer, loopdev: str) -> None:
    data = os.urandom(4 * MiB)
    _dio_write(loopdev, 0, data)
    subprocess.run(["blkdiscard", "-o", str(MiB), "-l", str(2 * MiB), loopdev], check=True)
    rec = server.backend
    covered = sum(n for off, n in rec.discards if MiB <= off < 3 * MiB)  # type: ignore[attr-defined]
    assert covered == 2 * MiB
    assert _dio_read(loopdev, MiB, 2 * MiB) == bytes(2 * MiB)
    assert _dio_read(loopdev, 0, MiB) == data[:MiB]
    assert _dio_read(loopdev, 3 * MiB, MiB) == data[3 * MiB :]
    assert server.stats()["bytes_discarded"] == 2 * MiB


def test_fallocate_modes_on_file(server: FuseServer) -> None:
    path = server.image_path
    with open(path, "r+b") as f:
        f.write(b"\xaa" * 16384)
    subprocess.run(["fallocate", "-p", "-o", "4096", "-l", "8192", path], check=True)
    with open(path, "rb") as f:
        got = f.read(16384)
    assert got == b"\xaa" * 4096 + bytes(8192) + b"\xaa" * 4096
    assert (4096, 8192) in server.backend.discards  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, SIZE)  # mode 0: a no-op within the size
    finally:
        os.close(fd)
    r = subprocess.run(["fallocate", "-c", "-o", "0", "-l", "4096", path], capture_output=True)
    assert r.returncode != 0  # collapse range: EOPNOTSUPP
    assert os.stat(path).st_size == SIZE


def test_fio_verify_crc32c(loopdev: str) -> None:
    r = subprocess.run(
        ["fio", "--name=verify", f"--filename={loopdev}", "--rw=randwrite", "--bs=4k",
         "--bsrange=4k-256k", "--size=64M", "--iodepth=16", "--ioengine=libaio", "--direct=1",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
         "--minimal"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize(
    "exc,expect",
    [(OSError(errno.EIO, "boom"), errno.EIO), (RuntimeError("bug"), errno.EIO),
     (OSError(errno.ENOSPC, "full"), errno.ENOSPC)],
)  # fmt: skip
def test_backend_errors_reach_the_caller(
    server: FuseServer, loopdev: str, exc: BaseException, expect: int
) -> None:
    _dio_write(loopdev, 0, b"\x55" * 4096)
    server.backend.fail = exc  # type: ignore[attr-defined]
    try:
        with pytest.raises(OSError) as e:
            _dio_read(server.image_path, 0, 4096)
        assert e.value.errno == expect
        with pytest.raises(OSError) as e:
            _dio_write(server.image_path, 0, b"\x66" * 4096)
        assert e.value.errno == expect
        with pytest.raises(OSError) as e:
            _dio_read(loopdev, 0, 4096)  # through the loop device: an error, never data
        assert e.value.errno in (errno.EIO, expect)
    finally:
        server.backend.fail = None  # type: ignore[attr-defined]
    assert _dio_read(loopdev, 0, 4096) == b"\x55" * 4096
    assert server.stats()["errors"]["READ"] >= 2  # type: ignore[index]


def test_second_mount_refused(server: FuseServer, mountdir: str) -> None:
    other = FuseServer(ArrayBackend(SIZE), mountdir, SIZE)
    with pytest.raises(MountError, match="already mounted"):
        other.mount()
    other.stop()  # safe after a refused mount
    assert os.listdir(mountdir) == ["swap.img"]  # the first one still serves


def test_bad_mountpoints(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    with pytest.raises(MountError, match="does not exist"):
        FuseServer(ArrayBackend(4096), os.path.join(base, "nope"), 4096).mount()
    f = os.path.join(base, "file")
    open(f, "w").close()
    with pytest.raises(MountError, match="not a directory"):
        FuseServer(ArrayBackend(4096), f, 4096).mount()
    assert not _mounted(f)


def test_lifecycle_thread_init_and_stats(mountdir: str) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def init() -> None:
        with lock:
            seen.append(threading.current_thread().name)

    srv = FuseServer(ArrayBackend(SIZE), mountdir, SIZE, threads=3, thread_init=init)
    srv.stop()  # before mount: nothing to do
    try:
        srv.mount()
        assert _mounted(mountdir)
        srv.start()
        assert len(set(seen)) == 3
        with open(srv.image_path, "rb") as f:
            assert f.read(4096) == bytes(4096)
        st = srv.stats()
        reqs = st["requests"]
        assert reqs["INIT"] == 1 and reqs["READ"] >= 1  # type: ignore[index]
        buckets = st["latency_buckets"]["READ"]  # type: ignore[index]
        assert sum(buckets) == reqs["READ"]  # type: ignore[index]
        assert len(buckets) == len(st["latency_bounds_ns"]) + 1  # type: ignore[arg-type]
        assert st["bytes_read"] >= 4096
    finally:
        srv.stop()
    assert not _mounted(mountdir)
    srv.stop()  # idempotent
    assert not any(t.is_alive() for t in threading.enumerate() if t.name in seen)


def test_thread_init_failure_is_a_mount_error(mountdir: str) -> None:
    def boom() -> None:
        raise OSError(errno.EPERM, "prctl refused")

    srv = FuseServer(ArrayBackend(SIZE), mountdir, SIZE, threads=2, thread_init=boom)
    try:
        srv.mount()
        with pytest.raises(MountError, match="prctl refused"):
            srv.start()
    finally:
        srv.stop()
    assert not _mounted(mountdir)


@pytest.fixture
def fusectl_restored() -> Iterator[None]:
    """stop() may mount fusectl to abort a busy connection; unmount it again if it was not."""
    ctl = "/sys/fs/fuse/connections"
    was = _mounted(ctl)
    try:
        yield
    finally:
        if not was and _mounted(ctl):
            subprocess.run(["umount", ctl], check=False)


def test_stop_while_loop_device_attached(
    fusectl_restored: None, server: FuseServer, mountdir: str
) -> None:
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "--show", "-f", server.image_path],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        server.stop()  # busy: lazy unmount + connection abort; must not hang
        assert not _mounted(mountdir)
        with pytest.raises(OSError):
            _dio_read(dev, 0, 4096)  # the daemon is gone: errors, not zeros
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def test_swapon_discard_reaches_backend(server: FuseServer, loopdev: str) -> None:
    """Real swap on the loop device: swapon --discard discards the device (FALLOCATE)."""
    subprocess.run(["mkswap", loopdev], check=True, capture_output=True)
    before = len(server.backend.discards)  # type: ignore[attr-defined]
    subprocess.run(["swapon", "--discard=once", "-p", "0", loopdev], check=True)
    try:
        with open("/proc/swaps") as f:
            assert any(line.split()[0] == loopdev for line in f)
    finally:
        subprocess.run(["swapoff", loopdev], check=True)
    new = server.backend.discards[before:]  # type: ignore[attr-defined]
    assert sum(n for _, n in new) >= SIZE // 2  # swapon discarded the swap area
