"""Shared fixtures for tests that run the real ``zcached`` daemon as a subprocess.

Owns: starting ``zcached run`` (the console script next to this interpreter) with a unique
mountpoint under ``tmp_path`` and a unique metrics port, waiting for its ``ready:`` line, reading
its /status and /metrics, and cleaning up after it whatever happened: the daemon's own pid is
terminated (never anything by name), then swapoff / ``losetup -d`` of any loop device backed by its
image, ``umount -l`` of its mountpoint. Must NOT: touch mounts, loop devices or swaps that do not
belong to a test's own mountpoint (other helpers share the machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ZCACHED = os.path.join(os.path.dirname(sys.executable), "zcached")
# Guards against a hung daemon, not speed assertions: a start or stop that takes this long is a
# hang, and the test fails with the daemon's log instead of blocking the suite.
HANG = 120.0
SHORT = 30.0  # the same for commands that should return at once


def zcached_argv(*args: str) -> list[str]:
    """argv for the installed console script (falls back to ``python -m zcached.cli``)."""
    if os.access(ZCACHED, os.X_OK):
        return [ZCACHED, *args]
    return [sys.executable, "-m", "zcached.cli", *args]


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loop_device(path: str) -> Iterator[str]:
    """A loop device (direct I/O) over ``path`` for the length of a ``with`` block."""
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "--show", "-f", path],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)


def _mountinfo_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4].replace("\\040", " ") for line in f]


def loops_backed_under(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under ``prefix``."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devs = []
    for line in out.splitlines():
        name, _, back = line.partition(" ")
        if back.startswith(prefix):
            devs.append(name)
    return devs


def active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [line.split()[0] for line in f.read().splitlines()[1:] if line.strip()]


def swap_used_kib(dev: str) -> int:
    with open("/proc/swaps") as f:
        for line in f.read().splitlines()[1:]:
            parts = line.split()
            if parts and parts[0] == dev:
                return int(parts[3])
    return 0


def traces(prefix: str) -> dict[str, list[str]]:
    """What the system holds that belongs under ``prefix``: mounts, loop devices, swaps.

    Only entries under a test's own directory are compared: other helpers mount, attach and
    swapon on this machine at the same time, so whole-table snapshots would be flaky."""
    loops = loops_backed_under(prefix)
    return {
        "mounts": [m for m in _mountinfo_points() if m.startswith(prefix)],
        "loops": loops,
        "swaps": [s for s in active_swaps() if s in loops or s.startswith(prefix)],
    }


def release_under(prefix: str) -> None:
    """Best-effort cleanup of everything under ``prefix``: swapoff, losetup -d, umount -l."""
    for dev in loops_backed_under(prefix):
        if dev in active_swaps():
            subprocess.run(["swapoff", dev], capture_output=True, timeout=HANG)
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=HANG)
    for mnt in sorted(m for m in _mountinfo_points() if m.startswith(prefix)):
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=HANG)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short-lived ``zcached`` command (a failing start, status, compact) to completion.

    If it does not exit (a ``run`` that should have been refused started serving), it gets
    SIGTERM by its pid, so it unwinds its own mount, and the test fails with its output."""
    argv = zcached_argv(*args)
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    ) as p:  # fmt: skip
        try:
            out, err = p.communicate(timeout=SHORT)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            try:
                out, err = p.communicate(timeout=HANG)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            pytest.fail(f"{' '.join(argv)} did not exit by itself:\n{err}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


class Daemon:
    """One ``zcached run`` subprocess with its own mountpoint, port and log file."""

    def __init__(self, root: Path, size: str, *extra: str, env: dict[str, str] | None = None):
        self.root = root
        self.mountpoint = root / "mnt"
        self.mountpoint.mkdir(exist_ok=True)
        self.port = free_port()
        self.listen = f"127.0.0.1:{self.port}"
        self.image = self.mountpoint / "swap.img"
        self.log_path = root / "daemon.log"
        self.argv = zcached_argv(
            "run",
            "--size", size,
            "--mountpoint", str(self.mountpoint),
            "--metrics-listen", self.listen,
            *extra,
        )  # fmt: skip
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, *, session: bool = False) -> Daemon:
        """Start it; ``session``: in its own process group (as a shell job), so a test can
        signal the group the way a terminal's Ctrl-C does."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
                start_new_session=session,
            )  # fmt: skip
        if wait:
            self.wait_for("ready:")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str) -> None:
        """Until ``text`` shows in the log; fails with the log if the daemon exits first."""
        deadline = time.monotonic() + HANG
        while text not in self.log():
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"daemon exited {self.proc.returncode} before {text!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"daemon hung waiting for {text!r}:\n{self.log()}")
            time.sleep(0.05)

    def status(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://{self.listen}/status", timeout=30) as r:
            doc: dict[str, object] = json.loads(r.read())
        return doc

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /metrics by name (``zcached_writes_total`` etc.)."""
        with urllib.request.urlopen(f"http://{self.listen}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {
            s.name: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if not s.labels
        }

    def terminate(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon by its pid and wait for its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon did not exit after signal {sig}:\n{self.log()}")

    def cleanup(self) -> None:
        """Stop the daemon if still alive (SIGTERM, then SIGKILL), then release leftovers."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=HANG)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        release_under(str(self.root))
        drop_stale_lock(str(self.mountpoint))


def drop_stale_lock(mountpoint: str) -> None:
    """Remove the instance lock file a killed daemon left (only if nobody holds it)."""
    from zcached.daemon import lock_path

    path = lock_path(mountpoint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass  # held: a live daemon's
    finally:
        os.close(fd)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Make daemons under ``tmp_path`` (each in its own subdirectory); all cleaned up after."""
    made: list[Daemon] = []

    def make(size: str, *extra: str, env: dict[str, str] | None = None) -> Daemon:
        root = tmp_path / f"d{len(made)}"
        root.mkdir()
        d = Daemon(root, size, *extra, env=env)
        made.append(d)
        return d

    try:
        yield make
    finally:
        for d in reversed(made):
            with contextlib.suppress(Exception):
                d.cleanup()
        release_under(str(tmp_path))
