"""Swap plumbing: losetup / mkswap / swapon / swapoff around a file, as unwinding steps.

Owns: the external commands and their error messages. Each step is a context manager that
undoes itself on exit (also on error), so ``with loop(...) as dev, swap_on(dev, ...):`` never
leaves a loop device attached or a swap active. Must NOT: know about FUSE, the page store,
signals or process setup (that is daemon.py), nor print or log; it raises ``SwapError`` (one
line) and reports retried failures through the caller's ``warn``.

Invariants: commands run in their own session, so a signal meant for the daemon (a terminal's
Ctrl-C goes to the whole foreground process group) never interrupts them half-way, with an
empty signal mask whatever the daemon blocks (``_spawn``); and
``swap_on`` does not return from its exit until the swap is really off: a failed swapoff is
retried (no time limit), because unwinding further (losetup -d, unmount) under an active swap
would lose every page still on it.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator


class SwapError(RuntimeError):
    """A swap step failed; the message is one human line."""


SWAPOFF_RETRY = 5.0  # seconds between swapoff attempts that failed
PROGRESS_EVERY = 3.0  # seconds between two progress reports of a running swapoff


def _spawn(argv: list[str], out: int, err: int) -> int:
    """Start ``argv`` in its own session; its pid. stdin is /dev/null, stdout/stderr ``out``
    and ``err``.

    posix_spawn, not subprocess: the daemon blocks the signals it takes synchronously in every
    thread, and a child inherits the mask of the thread that starts it; subprocess cannot reset
    it without running Python in the forked child (preexec_fn, unsafe with threads). Here the
    child gets an empty mask and SIGPIPE/SIGXFSZ back at their default (as subprocess's
    ``restore_signals``), with no Python code between fork and exec (vfork-like, cheap for a
    daemon with a large locked heap). The dispositions the daemon sets to SIG_IGN (the signals
    it takes synchronously, daemon.Signals) stay ignored in the child: one sent to the daemon's
    process group between the fork and the setsid cannot kill the command half-way.
    Descriptors: Python opens them all close-on-exec, so only 0-2 reach the child."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out, 1),
        (os.POSIX_SPAWN_DUP2, err, 2),
    ]
    return os.posix_spawnp(
        argv[0], argv, os.environ, file_actions=actions, setsid=True, setsigmask=(),
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )  # fmt: skip


def _wait(
    pid: int, fds: list[int], timeout: float | None, tick: Callable[[], None] | None,
    every: float,
) -> tuple[int, list[bytes]] | None:  # fmt: skip
    """Collect ``fds`` (the child's output pipes) until ``pid`` exits; its exit code (negative:
    killed by that signal) and what each pipe carried, or None after ``timeout`` seconds.
    ``tick`` is called every ``every`` seconds while the child runs."""
    chunks: dict[int, list[bytes]] = {fd: [] for fd in fds}
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        for fd in (pidfd, *fds):
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)
        start = time.monotonic()
        next_tick = start + every
        exited = False
        while not exited:
            now = time.monotonic()
            waits = [next_tick - now] if tick is not None else []
            if timeout is not None:
                if now - start >= timeout:
                    return None
                waits.append(start + timeout - now)
            ms = max(0, int(min(waits) * 1000) + 1) if waits else None
            for fd, _ev in poller.poll(ms):
                if fd == pidfd:
                    exited = True
                else:
                    _drain(fd, chunks[fd], poller)
            if tick is not None and not exited and time.monotonic() >= next_tick:
                tick()
                next_tick = time.monotonic() + every
        for fd in fds:  # what it wrote last (a grandchild holding a pipe is not waited for)
            _drain(fd, chunks[fd], poller)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), [b"".join(chunks[fd]) for fd in fds]


def _drain(fd: int, into: list[bytes], poller: select.poll) -> None:
    """Read what is in pipe ``fd`` now; at its end, stop polling it."""
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not data:
            with contextlib.suppress(KeyError):
                poller.unregister(fd)
            return
        into.append(data)


def _run(
    argv: list[str], what: str, timeout: float | None = 600, *,
    tick: Callable[[], None] | None = None, every: float = PROGRESS_EVERY,
) -> str:  # fmt: skip
    """Run ``argv`` in its own session (see ``_spawn``); its stdout, or SwapError naming
    ``what``. ``tick`` is called every ``every`` seconds while it runs."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        try:
            pid = _spawn(argv, out_w, err_w)
        except FileNotFoundError:
            raise SwapError(f"{what}: {argv[0]} not found") from None
        finally:
            os.close(out_w)
            os.close(err_w)
        done = _wait(pid, [out_r, err_r], timeout, tick, every)
        if done is None:
            os.kill(pid, signal.SIGKILL)  # our child, not yet reaped: the pid is still its
            os.waitpid(pid, 0)
            raise SwapError(f"{what}: {argv[0]} timed out")
    finally:
        os.close(out_r)
        os.close(err_r)
    returncode, (out_b, err_b) = done
    stdout = out_b.decode(errors="replace").strip()
    stderr = err_b.decode(errors="replace").strip()
    if returncode != 0:
        msg = (stderr or stdout).splitlines()
        if msg:
            why = msg[-1]
        elif returncode < 0:
            why = f"killed by signal {-returncode}"
        else:
            why = f"exit {returncode}"
        raise SwapError(f"{what}: {why}")
    return stdout


def attach_loop(path: str) -> str:
    return _run(["losetup", "--find", "--show", "--direct-io=on", path], f"losetup {path}")


def detach_loop(dev: str) -> None:
    _run(["losetup", "-d", dev], f"losetup -d {dev}")


def loops_backing(path: str) -> list[str]:
    """Loop devices whose backing file is ``path`` (``losetup -j``)."""
    out = _run(["losetup", "--associated", path, "--output", "NAME", "--noheadings"], "losetup")
    return out.split()


def active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:] if line.strip()]


def swap_used_kib(dev: str) -> int:
    """KiB used on ``dev`` according to /proc/swaps (0 if not active)."""
    with open("/proc/swaps") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == dev:
                return int(parts[3])
    return 0


Progress = Callable[[int], None]  # called with the KiB still out on the device


def swapoff(dev: str, progress: Progress | None = None, every: float = PROGRESS_EVERY) -> None:
    """swapoff ``dev`` if active (no time limit: it reads every page back into RAM); while it
    runs, ``progress`` gets the KiB still on ``dev`` every ``every`` seconds."""
    if dev in active_swaps():
        tick = None if progress is None else (lambda: progress(swap_used_kib(dev)))
        _run(["swapoff", dev], f"swapoff {dev}", timeout=None, tick=tick, every=every)


def swapoff_until_done(
    dev: str, warn: Callable[[str], None], retry: float = SWAPOFF_RETRY,
    progress: Progress | None = None,
) -> None:  # fmt: skip
    """swapoff ``dev``, retrying every ``retry`` s after a failure (each one goes to ``warn``)
    until ``dev`` is no longer an active swap. Never gives up: see the module invariant.
    ``progress``: see :func:`swapoff`."""
    while True:
        try:
            swapoff(dev, progress)
            return
        except SwapError as e:
            warn(f"{e}; pages are still on {dev}: still serving it, retrying in {retry:g}s")
        time.sleep(retry)


@contextlib.contextmanager
def loop(path: str) -> Iterator[str]:
    """Attach ``path`` to a free loop device with direct I/O; detach on exit."""
    dev = attach_loop(path)
    try:
        yield dev
    finally:
        detach_loop(dev)


@contextlib.contextmanager
def swap_on(
    dev: str, priority: int, warn: Callable[[str], None], *, discard: bool = True,
    progress: Progress | None = None,
) -> Iterator[str]:  # fmt: skip
    """mkswap + swapon ``dev``; on exit swapoff, retried until done (pages come back into
    RAM); failed attempts are reported through ``warn``, the KiB still out while swapoff
    runs through ``progress`` (every few seconds)."""
    _run(["mkswap", dev], f"mkswap {dev}")
    argv = ["swapon"]
    if discard:
        argv.append("--discard=pages")
    argv += ["--priority", str(priority), dev]
    _run(argv, f"swapon {dev}")
    try:
        yield dev
    finally:
        swapoff_until_done(dev, warn, progress=progress)
