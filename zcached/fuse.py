"""fuse: the FUSE front, one regular file ``swap.img`` served straight off /dev/fuse.

Owns: mounting and unmounting the FUSE file system (mount(2)/umount2(2) through ctypes), the
FUSE kernel protocol (INIT negotiation, request decoding, replies), the two inodes (the root
directory and the one file, mode 0600, size fixed at the device size), the worker threads that
read requests from /dev/fuse, the translation of backend errors to ``-errno``, and the
per-opcode request counters and latency buckets.
Must not: know how pages are stored or compressed (the :class:`BlockBackend` does), configure
loop devices or swap (the daemon does), or log per request.

DECISION: speak the kernel protocol directly (no libfuse, no pyfuse3)
----------------------------------------------------------------------
Measured on the 2-core VM, kernel 6.18 (bench/io_bench.py ``compare_fronts``): same fio jobs
(libaio, direct=1) through ``losetup --direct-io=on``, same trivial bytearray backend, server in
its own process.  zram (lz4) on the same box: 151K 4K random-read IOPS.

===========================  ===================  ================  =================
front                        4K randread qd32      1 MiB seq read    1 MiB seq write
===========================  ===================  ================  =================
pyfuse3 3.5 (libfuse3+trio)   16.9K IOPS (1.9 ms)   888 MB/s          719 MB/s
this module, 1 thread         80.8K IOPS (0.39 ms)  4519 MB/s         3894 MB/s
this module, 2 threads        69.3K IOPS            6556 MB/s         4494 MB/s
this module, 4 threads        48.1K IOPS            6320 MB/s         4435 MB/s
===========================  ===================  ================  =================

So the raw protocol is ~4.8x pyfuse3 per 4K request and ~5x for 1 MiB requests; with the real
PageStore behind it (lz4, 1 thread) it reaches 39.5K IOPS = 0.26x zram, and the remaining time
is in the store's read path (see docs/fuse-layer.md for the profile).  Why:

* per-request overhead: one ``os.readv`` into a preallocated buffer, one precompiled
  ``struct`` unpack, a backend call, one ``os.writev`` of (16-byte header, payload).  pyfuse3
  wraps every request in a trio task, builds Python objects for the request and the reply
  and copies the payload once more.
* large requests: we negotiate FUSE_MAX_PAGES (max_pages = 256, max_write = 1 MiB) and
  FUSE_BIG_WRITES; pyfuse3 gives no control over ``max_pages`` and libfuse's defaults cap
  requests at 128 KiB or 32 pages depending on the version.
* discards: the kernel forwards loop-device discards as FUSE_FALLOCATE(PUNCH_HOLE|KEEP_SIZE);
  pyfuse3 has no fallocate handler at all, so the loop device sees EOPNOTSUPP and turns
  discard off for good.  Here FALLOCATE goes to :meth:`BlockBackend.discard`.
* threads: several plain threads block in ``read(/dev/fuse)`` (the GIL is released there), each
  on its own FUSE_DEV_IOC_CLONE'd descriptor, so replies do not contend on one queue.
* maintenance: ~600 lines against a protocol that the kernel keeps backwards compatible (we
  announce minor 31 and the kernel speaks that dialect to us), no C extension to build, and
  nothing between the kernel and the page store that we cannot read.

Protocol facts this module relies on (include/uapi/linux/fuse.h)
-----------------------------------------------------------------
* Every request starts with fuse_in_header (40 bytes: len, opcode, unique, nodeid, uid, gid,
  pid, total_extlen, padding); every reply with fuse_out_header (16 bytes: len, -errno,
  unique) and must be written with a single write(2).
* A read(2) on /dev/fuse returns exactly one request; the buffer must hold max_write plus the
  WRITE headers or the kernel refuses the read with EINVAL.
* FORGET, BATCH_FORGET and INTERRUPT get no reply.  ENOENT from write(2) means the request was
  interrupted/aborted meanwhile (harmless); ENODEV from read(2) means the connection is gone
  (unmounted or aborted), which ends the worker threads.
* Every open gets FOPEN_DIRECT_IO, so the file never has page-cache pages of its own: the loop
  device (which opens with O_DIRECT under ``--direct-io=on``) and buffered users of the file
  all see the backend, and there is no double caching.  FOPEN_PARALLEL_DIRECT_WRITES lets
  concurrent direct writes run without the inode lock; FUSE_ASYNC_DIO lets the kernel keep
  many asynchronous direct requests of the loop device in flight at once (max_background).

THREADS AND STATE
* The FUSE descriptor(s) and the static attributes are written only by mount()/start()/stop()
  (the controlling thread); workers only read them.
* Each worker owns one :class:`_ThreadStats` and is its only writer; :meth:`FuseServer.stats`
  sums them without a lock (a read may be one request stale, never torn: list slots are
  Python ints replaced atomically under the GIL).
* The buffer a WRITE's payload lives in is the worker's own read buffer: the backend gets a
  memoryview into it and must have consumed/copied the data when ``write()`` returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger(__name__)

__all__ = [
    "LATENCY_BOUNDS_NS",
    "OPCODE_NAMES",
    "BlockBackend",
    "FuseMount",
    "FuseServer",
    "MountError",
]


class MountError(Exception):
    """The file system cannot be mounted (or served); the message is one human line."""


class BlockBackend(Protocol):
    """What the FUSE front serves.  Each method may raise OSError with ``errno`` set (replied
    to the kernel as ``-errno``); any other exception is replied as EIO.  ``write`` gets a
    memoryview into a reused buffer and must be done with it when it returns."""

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...


# ---- protocol constants ---------------------------------------------------------------------

KERNEL_MAJOR: Final = 7
OUR_MINOR: Final = 31

LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
FSYNC, GETXATTR, LISTXATTR, FLUSH, INIT = 20, 22, 23, 25, 26
OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS = 27, 28, 29, 30, 34
INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS = 36, 38, 42, 43, 44
LSEEK, SYNCFS = 46, 50
MAX_OPCODE: Final = 64

OPCODE_NAMES: Final[dict[int, str]] = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN",
    15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
    22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT",
    27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 31: "GETLK", 32: "SETLK",
    33: "SETLKW", 34: "ACCESS", 35: "CREATE", 36: "INTERRUPT", 37: "BMAP", 38: "DESTROY",
    39: "IOCTL", 40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET", 43: "FALLOCATE",
    44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE", 48: "SETUPMAPPING",
    49: "REMOVEMAPPING", 50: "SYNCFS", 51: "TMPFILE", 52: "STATX",
}  # fmt: skip

# INIT flags
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_ASYNC_DIO = 1 << 15
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
# OPEN reply flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
# SETATTR valid bits
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
# fallocate modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

PAGE: Final = 4096
MAX_PAGES: Final = 256
MAX_WRITE: Final = MAX_PAGES * PAGE  # 1 MiB
BUF_SIZE: Final = MAX_WRITE + PAGE  # room for in_header + write_in in front of 1 MiB
MAX_BACKGROUND: Final = 64  # async direct requests in flight (loop queue depth is 128)
ATTR_VALID_S: Final = 86400  # nothing about our two inodes ever changes behind the kernel

ROOT_INO: Final = 1
FILE_INO: Final = 2

_IN_HDR = struct.Struct("<IIQQ")  # len, opcode, unique, nodeid (uid/gid/pid unused)
_IN_HDR_SIZE: Final = 40
_OUT_HDR = struct.Struct("<IiQ")
_RW_IN = struct.Struct("<QQI")  # fh, offset, size (head of fuse_read_in / fuse_write_in)
_WRITE_DATA: Final = _IN_HDR_SIZE + 40  # payload offset of a WRITE
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64 bytes
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr, 88 bytes
_ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid, generation, entry_valid, attr_valid, nsecs
_ATTR_OUT = struct.Struct("<QII")  # attr_valid, attr_valid_nsec, dummy
_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIII")  # valid, pad, fh, size, ..., mode, _, uid, gid
_OPEN_OUT = struct.Struct("<QIi")
_WRITE_REPLY = struct.Struct("<IiQII")  # fuse_out_header + fuse_write_out in one buffer
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_FALLOC_IN = struct.Struct("<QQQI")  # fh, offset, length, mode
_DIRENT = struct.Struct("<QQII")  # ino, off, namelen, type
_GETXATTR_IN = struct.Struct("<II")
_LSEEK_IN = struct.Struct("<QQI")
_LSEEK_OUT = struct.Struct("<Q")

FUSE_DEV_IOC_CLONE: Final = 0x8004E500  # _IOR(229, 0, uint32_t)

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

# Latency buckets (upper bounds, ns) for every opcode: 1 us .. 1 s, roughly x2 apart.  Bucket
# i counts requests with latency < LATENCY_BOUNDS_NS[i] (and >= the previous bound); the last
# bucket (index len(bounds)) counts everything slower.
LATENCY_BOUNDS_NS: Final[tuple[int, ...]] = tuple(
    int(b * 1000)
    for b in (
        1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
        100_000, 200_000, 500_000, 1_000_000,
    )
)  # fmt: skip
_NBUCKETS: Final = len(LATENCY_BOUNDS_NS) + 1


class _ThreadStats:
    """Counters of one worker thread (its only writer)."""

    __slots__ = ("bytes", "errors", "lat", "lat_sum", "requests")

    def __init__(self) -> None:
        self.requests = [0] * MAX_OPCODE
        self.errors = [0] * MAX_OPCODE
        self.lat_sum = [0] * MAX_OPCODE
        self.lat = [[0] * _NBUCKETS for _ in range(MAX_OPCODE)]
        self.bytes = [0, 0, 0]  # read, written, discarded


class _Reply(Exception):
    """Raised by a handler to answer with -errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mounts_at(path: str) -> list[tuple[str, str]]:
    """(fstype, major:minor) of every mount whose mount point is ``path``."""
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) >= 5 and _unescape_mountinfo(fields[4]) == path:
                    found.append((right.split()[0], fields[2]))
    except OSError:
        pass
    return found


def mounted_zcached(path: str) -> bool:
    """Whether a zcached FUSE file system is mounted on ``path`` (per mountinfo)."""
    return any(t == "fuse.zcached" for t, _ in _mounts_at(os.path.abspath(path)))


class FuseMount:
    """A zcached FUSE mount: the /dev/fuse descriptor it is served on, its clones, unmounting
    and aborting it.  It serves nothing: :class:`FuseServer` (or the C loop, through a keeper
    process that holds these descriptors across servers) does."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.fd = -1
        self.clones: list[int] = []
        self.mounted = False
        self.conn: str | None = None  # "major:minor" of the mount = fusectl connection

    def mount(self) -> None:
        """Open /dev/fuse and mount it on the mount point; MountError with one line if not."""
        mp = self.mountpoint
        if os.geteuid() != 0:
            raise MountError("mounting the FUSE file system needs root")
        if any(t == "fuse.zcached" for t, _ in _mounts_at(mp)):
            try:
                os.statvfs(mp)  # always asks the server (a stat may be answered from cache)
            except OSError as e:
                if e.errno == errno.ENOTCONN:
                    raise MountError(
                        f"{mp}: a dead zcached mount is still there (its daemon died);"
                        f" swapoff/losetup -d its users and umount it first"
                    ) from None
            raise MountError(f"{mp}: a zcached file system is already mounted there")
        try:
            st = os.stat(mp)
        except FileNotFoundError:
            raise MountError(f"{mp}: mount point does not exist") from None
        except OSError as e:
            raise MountError(f"{mp}: cannot use as mount point: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise MountError(f"{mp}: mount point is not a directory")
        try:
            fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"cannot open /dev/fuse: {e.strerror}") from None
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions"
        libc = _libc()
        rc = libc.mount(
            b"zcached", os.fsencode(mp), b"fuse.zcached", MS_NOSUID | MS_NODEV, opts.encode()
        )
        if rc != 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise MountError(f"{mp}: mount failed: {os.strerror(err)}")
        self.fd = fd
        self.mounted = True
        conns = [c for t, c in _mounts_at(mp) if t == "fuse.zcached"]
        self.conn = conns[-1] if conns else None

    def clone(self) -> int:
        """A FUSE_DEV_IOC_CLONE'd descriptor of the session (its own processing queue); kept
        in ``clones`` and closed by :meth:`close`.  OSError if the kernel refuses."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, FUSE_DEV_IOC_CLONE, struct.pack("I", self.fd))
        except OSError:
            os.close(fd)
            raise
        self.clones.append(fd)
        return fd

    def unmount(self) -> None:
        """umount, lazily if busy; a mount already gone is fine."""
        libc = _libc()
        mp = os.fsencode(self.mountpoint)
        if libc.umount2(mp, 0) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL and libc.umount2(mp, MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err != errno.EINVAL:
                    log.warning("umount %s: %s", self.mountpoint, os.strerror(err))
        self.mounted = False

    def abort(self) -> None:
        """Abort the connection through fusectl (wakes workers blocked in read with ENODEV)."""
        if self.conn is None:
            return
        major, minor = (int(x) for x in self.conn.split(":"))
        ctl = "/sys/fs/fuse/connections"
        path = f"{ctl}/{os.makedev(major, minor)}/abort"
        if not os.path.exists(path) and os.path.isdir(ctl):
            # fusectl not mounted (systemd usually does it): mount it, as fusermount -u would
            # need it too.  Harmless if it races with another mounter.
            _libc().mount(b"fusectl", ctl.encode(), b"fusectl", 0, None)
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as e:
            log.warning("cannot abort FUSE connection %s: %s", self.conn, e)

    def close(self) -> None:
        """Close the descriptors (after :meth:`unmount`: the connection then goes away)."""
        for fd in [self.fd, *self.clones]:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = -1
        self.clones = []


class FuseServer:
    """Serve ``backend`` as ``mountpoint/file_name`` (``size`` bytes) until :meth:`stop`."""

    def __init__(
        self,
        backend: BlockBackend,
        mountpoint: str,
        size: int,
        *,
        file_name: str = "swap.img",
        threads: int = 4,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"size must be a positive multiple of {PAGE}")
        if threads < 1:
            raise ValueError("threads must be >= 1")
        if not file_name or "/" in file_name or file_name in (".", ".."):
            raise ValueError(f"bad file name {file_name!r}")
        self.backend = backend
        self.mountpoint = os.path.abspath(mountpoint)
        self.size = size
        self.file_name = file_name
        self._name_b = os.fsencode(file_name)
        self.image_path = os.path.join(self.mountpoint, file_name)
        self.threads = threads
        self.thread_init = thread_init
        self._fd = -1
        self._fds: list[int] = []
        self._workers: list[threading.Thread] = []
        self._tstats: list[_ThreadStats] = []
        self._mounted = False
        self._conn: str | None = None  # "major:minor" of the mount = fusectl connection
        self._lock = threading.Lock()  # serialises mount/start/stop
        self._mnt = FuseMount(self.mountpoint)
        self._init_errors: list[BaseException] = []
        self.initialized = threading.Event()  # set once FUSE_INIT has been answered
        now = int(time.time())
        self._now = now
        self._root_attr = _ATTR.pack(
            ROOT_INO, 0, 0, now, now, now, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 0, PAGE, 0
        )
        self._file_attr = _ATTR.pack(
            FILE_INO, size, size // 512, now, now, now, 0, 0, 0, stat.S_IFREG | 0o600, 1, 0, 0,
            0, PAGE, 0,
        )  # fmt: skip
        self._handlers: dict[int, Callable[[int, memoryview, int], list[bytes]]] = {
            LOOKUP: self._lookup,
            GETATTR: self._getattr,
            SETATTR: self._setattr,
            OPEN: self._open,
            OPENDIR: self._opendir,
            READDIR: self._readdir,
            READDIRPLUS: self._readdirplus,
            STATFS: self._statfs,
            ACCESS: self._ok,
            FLUSH: self._ok,
            RELEASE: self._ok,
            RELEASEDIR: self._ok,
            FSYNC: self._ok,
            FSYNCDIR: self._ok,
            SYNCFS: self._ok,
            DESTROY: self._ok,
            GETXATTR: self._nodata,
            LISTXATTR: self._listxattr,
            LSEEK: self._lseek,
        }

    # ---- lifecycle ---------------------------------------------------------------------------

    def mount(self) -> None:
        """Open /dev/fuse and mount it on the mount point; MountError with one line if not."""
        with self._lock:
            if self._mnt.mounted:
                raise MountError(f"{self.mountpoint}: already mounted by this server")
            self._mnt.mount()
            self._fd = self._mnt.fd
            self._fds = [self._mnt.fd]
            self._mounted = True
            self._conn = self._mnt.conn

    def start(self) -> None:
        """Start the worker threads; each runs ``thread_init`` first.  Raises MountError if a
        thread_init fails (the threads already started are left to :meth:`stop`)."""
        with self._lock:
            if self._fd < 0:
                raise MountError(f"{self.mountpoint}: not mounted")
            if self._workers:
                return
            ready = threading.Barrier(self.threads + 1)
            for i in range(self.threads):
                fd = self._fd
                if i > 0:
                    fd = self._clone_fd()
                ts = _ThreadStats()
                self._tstats.append(ts)
                t = threading.Thread(
                    target=self._worker, args=(fd, ts, ready), name=f"zcached-fuse-{i}",
                    daemon=True,
                )  # fmt: skip
                self._workers.append(t)
                t.start()
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.wait(timeout=30)
            if self._init_errors:
                e = self._init_errors[0]
                raise MountError(f"worker thread setup failed: {e}")

    def _clone_fd(self) -> int:
        """A FUSE_DEV_IOC_CLONE'd descriptor of the session (own reply queue), or the main one
        if the kernel refuses."""
        try:
            fd = self._mnt.clone()
        except OSError:
            return self._fd
        self._fds.append(fd)
        return fd

    def stop(self) -> None:
        """Unmount (lazily if busy), end the workers, close the descriptors.  Idempotent."""
        with self._lock:
            if self._mounted:
                self._mnt.unmount()
                self._mounted = False
            if self._workers_alive(2.0):
                # Still in use (lazily detached): the kernel keeps the connection until the
                # last user closes the file.  Abort it, or the workers would serve on.
                self._abort_connection()
            if self._workers_alive(5.0):
                # Never close a descriptor a live worker may still read: the number could be
                # reused by another FUSE session, whose requests the old worker would answer.
                log.warning("FUSE worker threads did not end; leaving their descriptors open")
                return
            self._release_workers()
            self._mnt.close()
            self._fds = []
            self._fd = -1

    def _workers_alive(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the workers to end; whether any still runs."""
        for t in self._workers:
            t.join(timeout=timeout)
        self._workers = [t for t in self._workers if t.is_alive()]
        return bool(self._workers)

    def _release_workers(self) -> None:
        """Forget the ended workers (their descriptors are closed by :meth:`stop`)."""
        self._workers = []

    def _abort_connection(self) -> None:
        """Abort the connection through fusectl (wakes workers blocked in read with ENODEV)."""
        self._mnt.abort()

    # ---- statistics --------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, object]:
        return self.stats()

    def stats(self) -> dict[str, object]:
        """Totals over all workers: requests/errors per opcode name, bytes read/written/
        discarded, and per opcode the latency bucket counts (bounds: ``latency_bounds_ns``)
        with their sum in ns."""
        req = [0] * MAX_OPCODE
        errs = [0] * MAX_OPCODE
        lsum = [0] * MAX_OPCODE
        lat = [[0] * _NBUCKETS for _ in range(MAX_OPCODE)]
        nbytes = [0, 0, 0]
        for ts in list(self._tstats):
            for op in range(MAX_OPCODE):
                if ts.requests[op]:
                    req[op] += ts.requests[op]
                    errs[op] += ts.errors[op]
                    lsum[op] += ts.lat_sum[op]
                    row = lat[op]
                    for i, v in enumerate(ts.lat[op]):
                        row[i] += v
            for i in range(3):
                nbytes[i] += ts.bytes[i]

        def name(op: int) -> str:
            return OPCODE_NAMES.get(op, f"OP{op}")

        used = [op for op in range(MAX_OPCODE) if req[op]]
        return {
            "requests": {name(op): req[op] for op in used},
            "errors": {name(op): errs[op] for op in used if errs[op]},
            "bytes_read": nbytes[0],
            "bytes_written": nbytes[1],
            "bytes_discarded": nbytes[2],
            "latency_bounds_ns": list(LATENCY_BOUNDS_NS),
            "latency_buckets": {name(op): lat[op] for op in used},
            "latency_sum_ns": {name(op): lsum[op] for op in used},
        }

    # ---- the worker loop ---------------------------------------------------------------------

    def _worker(self, fd: int, ts: _ThreadStats, ready: threading.Barrier) -> None:
        try:
            if self.thread_init is not None:
                self.thread_init()
        except BaseException as e:
            self._init_errors.append(e)
            ready.abort()
            return
        try:
            ready.wait(timeout=30)
        except threading.BrokenBarrierError:
            return
        try:
            self._serve(fd, ts)
        except BaseException:
            log.exception("FUSE worker %s died", threading.current_thread().name)
            raise

    def _serve(self, fd: int, ts: _ThreadStats) -> None:
        # Hot path: READ and WRITE are decoded inline; everything else goes through a handler.
        buf = bytearray(BUF_SIZE)
        mv = memoryview(buf)
        bufs = [buf]
        readv, writev = os.readv, os.writev
        perf = time.perf_counter_ns
        hdr_unpack = _IN_HDR.unpack_from
        rw_unpack = _RW_IN.unpack_from
        out_pack = _OUT_HDR.pack
        write_reply_pack = _WRITE_REPLY.pack
        write = os.write
        backend = self.backend
        bread, bwrite = backend.read, backend.write
        size = self.size
        bounds = LATENCY_BOUNDS_NS
        requests, errors, lat_sum, lat, nbytes = (
            ts.requests, ts.errors, ts.lat_sum, ts.lat, ts.bytes
        )  # fmt: skip
        handlers = self._handlers
        no_reply = (FORGET, BATCH_FORGET, INTERRUPT)
        ENOENT, ENODEV, EINTR, EAGAIN = errno.ENOENT, errno.ENODEV, errno.EINTR, errno.EAGAIN
        EPERM = errno.EPERM
        while True:
            try:
                n = readv(fd, bufs)
            except OSError as e:
                if e.errno in (ENOENT, EINTR, EAGAIN):
                    continue
                if e.errno in (ENODEV, EPERM):  # connection gone (EPERM: device detached)
                    return
                log.error("FUSE read failed, worker ends: %s", e)
                return
            t0 = perf()
            _len, opcode, unique, nodeid = hdr_unpack(buf)
            err = 0
            reply: bytes | list[bytes | memoryview]
            if opcode == READ:
                _fh, off, length = rw_unpack(buf, _IN_HDR_SIZE)
                if off >= size:
                    length = 0
                elif off + length > size:
                    length = size - off
                try:
                    data = bread(off, length) if length else b""
                    if len(data) != length:
                        raise OSError(errno.EIO, "backend returned a short read")
                    if length <= 65536:  # one buffer: cheaper than writev's iovec for 4K
                        reply = out_pack(16 + length, 0, unique) + data
                    else:  # no copy of big payloads
                        reply = [out_pack(16 + length, 0, unique), data]
                    nbytes[0] += length
                except OSError as e:
                    err = e.errno or errno.EIO
                except Exception:
                    log.exception("backend read %d+%d failed", off, length)
                    err = errno.EIO
            elif opcode == WRITE:
                _fh, off, length = rw_unpack(buf, _IN_HDR_SIZE)
                try:
                    if n != _WRITE_DATA + length:
                        raise OSError(errno.EINVAL, "malformed WRITE")
                    if off + length > size:
                        raise OSError(errno.EFBIG, "write past the end of the device")
                    bwrite(off, mv[_WRITE_DATA : _WRITE_DATA + length])
                    reply = write_reply_pack(24, 0, unique, length, 0)
                    nbytes[1] += length
                except OSError as e:
                    err = e.errno or errno.EIO
                except Exception:
                    log.exception("backend write %d+%d failed", off, length)
                    err = errno.EIO
            elif opcode in no_reply:
                requests[opcode] += 1
                continue
            else:
                handler = handlers.get(opcode)
                try:
                    if opcode == INIT:
                        payload = self._init(mv, n, fd)
                    elif opcode == FALLOCATE:
                        payload = self._fallocate(nodeid, mv, ts)
                    elif handler is None:
                        raise _Reply(errno.ENOSYS)
                    else:
                        payload = handler(nodeid, mv, n)
                    total = 16 + sum(len(p) for p in payload)
                    reply = [out_pack(total, 0, unique), *payload]
                except _Reply as r:
                    err = r.err
                except OSError as e:
                    err = e.errno or errno.EIO
                except Exception:
                    log.exception("FUSE %s failed", OPCODE_NAMES.get(opcode, opcode))
                    err = errno.EIO
            if err:
                reply = out_pack(16, -err, unique)
                errors[opcode] += 1
            # Counted before the reply: once the caller has its answer, stats() shows it.
            requests[opcode] += 1
            try:
                if isinstance(reply, bytes):  # one buffer: write(2), no iovec to build
                    write(fd, reply)
                else:
                    writev(fd, reply)
            except OSError as e:
                if e.errno == ENODEV:
                    return
                if e.errno != ENOENT:  # ENOENT: the request was interrupted meanwhile
                    log.warning("FUSE reply to %s failed: %s", opcode, e)
            dt = perf() - t0
            lat_sum[opcode] += dt
            lat[opcode][bisect_right(bounds, dt)] += 1

    # ---- handlers (the slow path) ------------------------------------------------------------

    def _init(self, mv: memoryview, n: int, fd: int) -> list[bytes]:
        major, minor, max_readahead, flags = _INIT_IN.unpack_from(mv, _IN_HDR_SIZE)
        if major != KERNEL_MAJOR:
            log.error("kernel FUSE protocol %d.%d is not supported", major, minor)
            raise _Reply(errno.EPROTO)
        want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES
        want |= FUSE_PARALLEL_DIROPS
        out = _INIT_OUT.pack(
            KERNEL_MAJOR,
            min(minor, OUR_MINOR),
            max_readahead,
            flags & want,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            MAX_WRITE,
            1,  # time_gran
            MAX_PAGES,
            0,  # map_alignment
            0,  # flags2
            0,  # max_stack_depth
        )
        self.kernel_minor = minor
        self.initialized.set()
        return [out]

    def _attr(self, ino: int) -> bytes:
        if ino == ROOT_INO:
            return self._root_attr
        if ino == FILE_INO:
            return self._file_attr
        raise _Reply(errno.ENOENT)

    def _lookup(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        name = bytes(mv[_IN_HDR_SIZE:n]).rstrip(b"\0")
        if nodeid != ROOT_INO or name != self._name_b:
            raise _Reply(errno.ENOENT)
        entry = _ENTRY_OUT.pack(FILE_INO, 1, ATTR_VALID_S, ATTR_VALID_S, 0, 0)
        return [entry, self._file_attr]

    def _getattr(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        return [_ATTR_OUT.pack(ATTR_VALID_S, 0, 0), self._attr(nodeid)]

    def _setattr(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        attr = self._attr(nodeid)
        f = _SETATTR_IN.unpack_from(mv, _IN_HDR_SIZE)
        valid, new_size, new_mode, new_uid, new_gid = f[0], f[3], f[11], f[13], f[14]
        cur = _ATTR.unpack(attr)
        if valid & FATTR_SIZE and (nodeid != FILE_INO or new_size != self.size):
            raise _Reply(errno.EPERM)  # the device size is fixed
        if valid & FATTR_MODE and (new_mode & 0o7777) != (cur[9] & 0o7777):
            raise _Reply(errno.EPERM)
        if (valid & FATTR_UID and new_uid != 0) or (valid & FATTR_GID and new_gid != 0):
            raise _Reply(errno.EPERM)
        return [_ATTR_OUT.pack(ATTR_VALID_S, 0, 0), attr]  # times: accepted and ignored

    def _open(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        if nodeid == ROOT_INO:
            raise _Reply(errno.EISDIR)
        if nodeid != FILE_INO:
            raise _Reply(errno.ENOENT)
        return [_OPEN_OUT.pack(0, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0)]

    def _opendir(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        if nodeid != ROOT_INO:
            raise _Reply(errno.ENOTDIR)
        return [_OPEN_OUT.pack(0, 0, 0)]

    def _dir_entries(self) -> list[tuple[int, bytes, int]]:
        return [
            (ROOT_INO, b".", stat.S_IFDIR),
            (ROOT_INO, b"..", stat.S_IFDIR),
            (FILE_INO, self._name_b, stat.S_IFREG),
        ]

    def _readdir_common(self, nodeid: int, mv: memoryview, plus: bool) -> list[bytes]:
        if nodeid != ROOT_INO:
            raise _Reply(errno.ENOTDIR)
        _fh, offset, size = _RW_IN.unpack_from(mv, _IN_HDR_SIZE)
        out: list[bytes] = []
        used = 0
        for i, (ino, name, typ) in enumerate(self._dir_entries()):
            if i < offset:
                continue
            rec = _DIRENT.pack(ino, i + 1, len(name), typ >> 12) + name
            rec += b"\0" * (-len(rec) % 8)
            if plus:
                if name in (b".", b".."):
                    rec = _ENTRY_OUT.pack(0, 0, 0, 0, 0, 0) + bytes(_ATTR.size) + rec
                else:
                    entry = _ENTRY_OUT.pack(FILE_INO, 1, ATTR_VALID_S, ATTR_VALID_S, 0, 0)
                    rec = entry + self._file_attr + rec
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return out

    def _readdir(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        return self._readdir_common(nodeid, mv, False)

    def _readdirplus(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        return self._readdir_common(nodeid, mv, True)

    def _statfs(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        blocks = self.size // PAGE
        return [_STATFS_OUT.pack(blocks, 0, 0, 2, 0, PAGE, 255, PAGE, 0)]

    def _ok(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        return []

    def _nodata(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        (_size, _pad) = _GETXATTR_IN.unpack_from(mv, _IN_HDR_SIZE)
        raise _Reply(errno.ENODATA)

    def _listxattr(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        (size, _pad) = _GETXATTR_IN.unpack_from(mv, _IN_HDR_SIZE)
        return [_GETXATTR_IN.pack(0, 0)] if size == 0 else []

    def _lseek(self, nodeid: int, mv: memoryview, n: int) -> list[bytes]:
        raise _Reply(errno.ENOSYS)  # the kernel then does SEEK_DATA/HOLE generically

    def _fallocate(self, nodeid: int, mv: memoryview, ts: _ThreadStats) -> list[bytes]:
        if nodeid != FILE_INO:
            raise _Reply(errno.EISDIR if nodeid == ROOT_INO else errno.ENOENT)
        _fh, off, length, mode = _FALLOC_IN.unpack_from(mv, _IN_HDR_SIZE)
        size = self.size
        if mode in (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE,
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE):  # fmt: skip
            # Discarded pages read back as zeros, which is what both modes promise.
            if mode == FALLOC_FL_ZERO_RANGE and off + length > size:
                raise _Reply(errno.EFBIG)
            end = min(off + length, size)
            if off < end:
                self.backend.discard(off, end - off)
                ts.bytes[2] += end - off
            return []
        if mode in (0, FALLOC_FL_KEEP_SIZE):
            if mode == 0 and off + length > size:
                raise _Reply(errno.EFBIG)  # the file cannot grow
            return []  # every byte of the device is already "allocated"
        raise _Reply(errno.EOPNOTSUPP)
