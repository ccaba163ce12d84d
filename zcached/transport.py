"""transport: which way the kernel's FUSE requests reach the server (``io_transport``).

Owns: the decision between /dev/fuse (read/write of the device, fuse_loop.c) and FUSE over
io_uring (ring queues, csrc/fuse_uring.c), the fuse module parameter ``enable_uring`` that a
connection needs at the time of its INIT (set before the mount, put back once INIT is
answered: a connection keeps what it negotiated), and the ring area: a memfd the keeper makes,
holds and locks, as it does the arena, so that the rings' buffers outlive a server.
Must not: mount, serve requests, or leave ``enable_uring`` changed after the daemon started.

Why the default is what it is: docs/fuse-layer.md (FUSE over io_uring) has the figures.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from zcached import _core

log = logging.getLogger("zcached")

PARAM = Path("/sys/module/fuse/parameters/enable_uring")


class TransportError(Exception):
    """``io_transport = "uring"`` asked for what this machine cannot give."""


@dataclass
class Choice:
    """The transport a daemon starts with, and what it changed to get it."""

    name: str  # "dev" or "uring"
    why: str  # one line for the log
    param_before: str | None = None  # enable_uring's value before we set it (None: untouched)

    def restore(self) -> None:
        """Put ``enable_uring`` back (idempotent): once INIT is answered it is not needed."""
        if self.param_before is None:
            return
        before, self.param_before = self.param_before, None
        try:
            PARAM.write_text(before)
        except OSError as e:
            log.warning("cannot put fuse.enable_uring back to %s: %s", before, e.strerror)


def unavailable() -> str | None:
    """Why FUSE over io_uring cannot be had here, or None."""
    if not PARAM.exists():
        return "this kernel has no FUSE over io_uring (no fuse.enable_uring: Linux 6.14+)"
    if _core.uring_area_size() == 0:
        return "the kernel's queue count (possible CPUs) cannot be told"
    return None


# Why "auto" is /dev/fuse even where io_uring is there (docs/fuse-layer.md has the figures):
# on this kernel (6.18) the requests it had handed to a ring entry of a server that is exiting
# fail with ECANCELED, so a server's crash or upgrade can fail swap I/O, which /dev/fuse's
# FUSE_NOTIFY_RESEND never does; and the swap workload measured slower over the rings.
AUTO_WHY = (
    "/dev/fuse (io_transport = auto: on this kernel a server's crash or upgrade over io_uring"
    " can fail requests in flight; io_transport = uring takes that risk for depth)"
)


def choose(setting: str) -> Choice:
    """The transport for ``io_transport`` = ``setting``; TransportError if "uring" cannot be
    had.  For io_uring, ``enable_uring`` is Y when this returns (``Choice.restore`` later)."""
    if setting == "dev":
        return Choice("dev", "/dev/fuse (io_transport = dev)")
    why = unavailable()
    if setting == "auto":
        return Choice("dev", f"/dev/fuse: {why}" if why else AUTO_WHY)
    if why is None:
        try:
            before = PARAM.read_text().strip()
            if before != "Y":
                PARAM.write_text("Y")
        except OSError as e:
            why = f"fuse.enable_uring cannot be set: {e.strerror}"
        else:
            return Choice(
                "uring", "FUSE over io_uring (io_transport = uring)",
                param_before=None if before == "Y" else before,
            )  # fmt: skip
    raise TransportError(f"io_transport = uring: {why}")


def make_ring_area() -> int:
    """A new ring area: a memfd of the size this machine's queues need (zero-filled)."""
    size = _core.uring_area_size()
    fd = os.memfd_create("zcached-rings", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd
