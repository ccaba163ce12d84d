"""Swap plumbing: losetup / mkswap / swapon / swapoff around a file, as unwinding steps.

Owns: the external commands and their error messages. Each step is a context manager that
undoes itself on exit (also on error), so ``with loop(...) as dev, swap_on(dev, ...):`` never
leaves a loop device attached or a swap active. Must NOT: know about FUSE, the page store,
signals or process setup (that is daemon.py), nor print or log; it raises ``SwapError`` (one
line) and reports retried failures through the caller's ``warn``.

Invariants: commands run in their own session, so a signal meant for the daemon (a terminal's
Ctrl-C goes to the whole foreground process group) never interrupts them half-way; and
``swap_on`` does not return from its exit until the swap is really off: a failed swapoff is
retried (no time limit), because unwinding further (losetup -d, unmount) under an active swap
would lose every page still on it.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator


class SwapError(RuntimeError):
    """A swap step failed; the message is one human line."""


SWAPOFF_RETRY = 5.0  # seconds between swapoff attempts that failed


def _run(argv: list[str], what: str, timeout: float | None = 600) -> str:
    """Run ``argv`` in its own session; its stdout, or SwapError naming ``what``."""
    try:
        p = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, start_new_session=True
        )
    except FileNotFoundError:
        raise SwapError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise SwapError(f"{what}: {argv[0]} timed out") from None
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        if msg:
            why = msg[-1]
        elif p.returncode < 0:
            why = f"killed by signal {-p.returncode}"
        else:
            why = f"exit {p.returncode}"
        raise SwapError(f"{what}: {why}")
    return p.stdout.strip()


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


def swapoff(dev: str) -> None:
    """swapoff ``dev`` if active (no time limit: it reads every page back into RAM)."""
    if dev in active_swaps():
        _run(["swapoff", dev], f"swapoff {dev}", timeout=None)


def swapoff_until_done(dev: str, warn: Callable[[str], None], retry: float = SWAPOFF_RETRY) -> None:
    """swapoff ``dev``, retrying every ``retry`` s after a failure (each one goes to ``warn``)
    until ``dev`` is no longer an active swap. Never gives up: see the module invariant."""
    while True:
        try:
            swapoff(dev)
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
    dev: str, priority: int, warn: Callable[[str], None], *, discard: bool = True
) -> Iterator[str]:
    """mkswap + swapon ``dev``; on exit swapoff, retried until done (pages come back into
    RAM); failed attempts are reported through ``warn``."""
    _run(["mkswap", dev], f"mkswap {dev}")
    argv = ["swapon"]
    if discard:
        argv.append("--discard=pages")
    argv += ["--priority", str(priority), dev]
    _run(argv, f"swapon {dev}")
    try:
        yield dev
    finally:
        swapoff_until_done(dev, warn)
