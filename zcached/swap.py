"""Swap plumbing: losetup / mkswap / swapon / swapoff around a file, as unwinding steps.

Owns: the external commands and their error messages. Each step is a context manager that
undoes itself on exit (also on error), so ``with loop(...) as dev, swap_on(dev, ...):`` never
leaves a loop device attached or a swap active. Must NOT: know about FUSE, the page store,
signals or process setup (that is daemon.py), nor print; it raises ``SwapError`` (one line).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator


class SwapError(RuntimeError):
    """A swap step failed; the message is one human line."""


def _run(argv: list[str], what: str) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise SwapError(f"{what}: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise SwapError(f"{what}: {argv[0]} timed out") from None
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise SwapError(f"{what}: {' '.join(argv)}: {msg[-1] if msg else f'exit {p.returncode}'}")
    return p.stdout.strip()


def attach_loop(path: str) -> str:
    return _run(["losetup", "--find", "--show", "--direct-io=on", path], "attach loop device")


def detach_loop(dev: str) -> None:
    _run(["losetup", "-d", dev], f"detach {dev}")


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
    if dev in active_swaps():
        _run(["swapoff", dev], f"swapoff {dev}")


@contextlib.contextmanager
def loop(path: str) -> Iterator[str]:
    """Attach ``path`` to a free loop device with direct I/O; detach on exit."""
    dev = attach_loop(path)
    try:
        yield dev
    finally:
        detach_loop(dev)


@contextlib.contextmanager
def swap_on(dev: str, priority: int, *, discard: bool = True) -> Iterator[str]:
    """mkswap + swapon ``dev``; swapoff on exit (pages come back into RAM)."""
    _run(["mkswap", dev], f"mkswap {dev}")
    argv = ["swapon"]
    if discard:
        argv.append("--discard=pages")
    argv += ["--priority", str(priority), dev]
    _run(argv, f"swapon {dev}")
    try:
        yield dev
    finally:
        swapoff(dev)
