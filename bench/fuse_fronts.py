"""bench/fuse_fronts: run one FUSE front in its own process, for bench/io_bench.py.

``python -m bench.fuse_fronts FRONT BACKEND MOUNTPOINT SIZE_MIB THREADS`` mounts
``MOUNTPOINT/swap.img`` and prints ``ready`` once it is served; SIGTERM/SIGINT unmount it.

FRONT:   ``raw``      zcached.fuse.FuseServer (the FUSE protocol over /dev/fuse)
         ``pyfuse3``  the same file through pyfuse3 (libfuse3 + trio), for the layer decision
BACKEND: ``dict``     a bytearray (the trivial backend: measures the front alone)
         ``store``    zcached.store.PageStore (lz4)
Must not: be imported by zcached; it is a benchmark helper only.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import threading
from typing import Any


class ArrayBackend:
    """The trivial backend: one bytearray the size of the device (lock-free; tests and benches)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.buf[offset : offset + len(data)] = data

    def discard(self, offset: int, length: int) -> None:
        self.buf[offset : offset + length] = bytes(length)


def make_backend(kind: str, size: int) -> Any:
    if kind == "dict":
        return ArrayBackend(size)
    if kind == "store":
        from zcached.store import PageStore

        return PageStore(size)
    raise SystemExit(f"unknown backend {kind!r}")


def serve_raw(backend: Any, mnt: str, size: int, threads: int) -> None:
    from zcached.fuse import FuseServer

    srv = FuseServer(backend, mnt, size, threads=threads)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    srv.mount()
    try:
        srv.start()
        print("ready", flush=True)
        done.wait()
    finally:
        srv.stop()


def serve_pyfuse3(backend: Any, mnt: str, size: int, threads: int) -> None:
    import pyfuse3
    import trio

    class Ops(pyfuse3.Operations):  # type: ignore[misc]
        def _attr(self, ino: int) -> Any:
            a = pyfuse3.EntryAttributes()
            a.st_ino = ino
            a.attr_timeout = a.entry_timeout = 86400
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
            else:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o600, 1, size
            a.st_blksize = 4096
            return a

        async def getattr(self, inode: int, ctx: Any = None) -> Any:
            return self._attr(inode)

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            if parent != pyfuse3.ROOT_INODE or name != b"swap.img":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(2)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh: int, off: int, size_: int) -> bytes:
            return backend.read(off, min(size_, max(0, size - off)))  # type: ignore[no-any-return]

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            backend.write(off, buf)
            return len(buf)

        async def opendir(self, inode: int, ctx: Any) -> int:
            return inode

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            if start_id == 0:
                pyfuse3.readdir_reply(token, b"swap.img", self._attr(2), 1)

    opts = set(pyfuse3.default_options)
    opts.add("fsname=zcached-pyfuse3")
    pyfuse3.init(Ops(), mnt, opts)
    print("ready", flush=True)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    front, bk, mnt, size_mib, threads = argv
    size = int(size_mib) << 20
    backend = make_backend(bk, size)
    if front == "raw":
        serve_raw(backend, mnt, size, int(threads))
    elif front == "pyfuse3":
        serve_pyfuse3(backend, mnt, size, int(threads))
    else:
        print(f"unknown front {front!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
