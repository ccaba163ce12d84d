"""Signals, end to end (issue 13): the daemon takes SIGTERM/SIGINT/SIGUSR1 in one place, and
no burst, repeat or storm of them, at any moment from start-up to the end of the teardown,
leaves anything behind or changes the exit code.

Each test runs the real ``zcached run`` (real FUSE mount, loop device, swapon) through the
``daemon_factory`` fixture, which stops it by its pid and releases whatever is left under
``tmp_path`` even when the test fails. Signals go to the daemon's own pid, or to the process
group of a daemon started in its own session (``session=True``: the group holds only it and its
children). A storm that runs until the daemon exits watches the exit with ``WNOWAIT``: the
daemon stays an unreaped zombie, so its pid cannot be reused by another process meanwhile.
The devices without a memory cgroup are 16M at priority 0, so other swap users' pages stay off
them; the swapoff-with-pages-out test needs the machine's swap to itself and skips otherwise.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import test_daemon
from conftest import HANG, Daemon, active_swaps, traces
from test_daemon import (
    NOTHING,
    PAGE,
    children_named,
    expect_line,
    page_pattern,
    start_swap_daemon,
    swapped_out,
    workload,
)

from zcached.daemon import lock_path
from zcached.swap import PROGRESS_EVERY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount(2), losetup, swapon")

memcg = test_daemon.memcg  # the memory cgroup fixture of the swap tests
SMALL_SWAP = ("16M", "--swap", "--swap-priority", "0")
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def sigbits(mask_hex: str) -> set[int]:
    mask = int(mask_hex, 16)
    return {s for s in range(1, 65) if mask & (1 << (s - 1))}


def proc_status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def exited(d: Daemon) -> bool:
    """The daemon has exited; it is not reaped (WNOWAIT), so its pid stays its own."""
    res = os.waitid(os.P_PID, d.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return res is not None and res.si_pid == d.pid


def storm(d: Daemon, sigs: Iterable[int], *, group: bool = False, gap: float = 0.0) -> int:
    """Send ``sigs`` in turn, as fast as possible (or every ``gap`` s), to the daemon's pid or
    process group, until it exits; how many were sent. Fails after HANG s."""
    deadline = time.monotonic() + HANG
    for sent, sig in enumerate(itertools.cycle(sigs)):
        if exited(d):
            return sent
        if time.monotonic() > deadline:
            pytest.fail(f"daemon did not exit during a storm of signals:\n{d.log()}")
        (os.killpg if group else os.kill)(d.pid, sig)
        if gap:
            time.sleep(gap)
    raise AssertionError("unreachable")


def reap(d: Daemon) -> int:
    assert d.proc is not None
    try:
        return d.proc.wait(timeout=HANG)
    except Exception:
        pytest.fail(f"daemon did not exit:\n{d.log()}")


def assert_clean_stop(d: Daemon, rc: int) -> str:
    """Exit 0, "stopped" logged, no error; nothing of it mounted, attached, swapped on or
    locked (the mount/loop/swap checks only look under the test's own directory)."""
    log = d.log()
    assert rc == 0, f"exit {rc}:\n{log}"
    assert "zcached: stopped" in log, log
    for bad in ("Traceback", "internal error", "RecursionError", "error:"):
        assert bad not in log, log
    assert traces(str(d.root)) == NOTHING
    with open("/proc/mounts") as f:
        assert not [ln for ln in f if "fuse" in ln and str(d.root) in ln]
    assert not os.path.exists(lock_path(str(d.mountpoint)))
    return log


def fake_command(bin_dir: Path, name: str, delay: float) -> dict[str, str]:
    """An env whose PATH runs ``name`` as: sleep ``delay``, then the real ``name``."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\nsleep {delay}\nPATH="${{PATH#*:}}" exec {name} "$@"\n')
    script.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")


def wait_until(cond: Callable[[], bool], d: Daemon, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not cond():
        assert d.proc is not None and d.proc.poll() is None, f"exited before {what}:\n{d.log()}"
        assert time.monotonic() < deadline, f"no {what}:\n{d.log()}"
        time.sleep(0.005)


# ---- after ready -----------------------------------------------------------------------------


def test_two_sigterms_at_once_as_make_run_sends_them(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # The case: SIGTERM to make's process group, and make forwards it to its child,
    # so the daemon gets two at once.  It used to deadlock in its own handler.
    d = daemon_factory(*SMALL_SWAP).start(session=True)
    os.killpg(d.pid, signal.SIGTERM)
    os.kill(d.pid, signal.SIGTERM)
    log = assert_clean_stop(d, reap(d))
    assert "zcached: SIGTERM from pid" in log and "stopping: swapoff" in log


def test_sigterm_burst_and_storm_through_the_teardown(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # 50 SIGTERMs as fast as possible, then more without pause until the daemon has exited:
    # the teardown (swapoff, losetup -d, unmount) cannot be interrupted by any of them.
    d = daemon_factory(*SMALL_SWAP).start()
    for _ in range(50):
        os.kill(d.pid, signal.SIGTERM)
    sent = storm(d, [signal.SIGTERM])
    log = assert_clean_stop(d, reap(d))
    assert log.count("stopping: swapoff") == 1
    assert sent > 0, "the daemon had exited before the storm (teardown under 50 kills?)"


def test_sigint_twice(daemon_factory: Callable[..., Daemon]) -> None:
    # Ctrl-C, then the impatient second one while the daemon is stopping, both to the group
    # as a terminal sends them; and one more after it is done logging "stopped" is harmless.
    d = daemon_factory(*SMALL_SWAP).start(session=True)
    os.killpg(d.pid, signal.SIGINT)
    d.wait_for("stopping: swapoff")
    os.killpg(d.pid, signal.SIGINT)
    log = assert_clean_stop(d, reap(d))
    assert "KeyboardInterrupt" not in log


def test_sigint_just_after_stopped_is_harmless(daemon_factory: Callable[..., Daemon]) -> None:
    # Signals stay blocked until the process exits: a Ctrl-C right after the teardown must not
    # turn the clean stop into KeyboardInterrupt (exit 1), nor a SIGTERM into exit 143.
    d = daemon_factory("16M", "--no-swap").start()
    os.kill(d.pid, signal.SIGTERM)
    wait_until(lambda: "zcached: stopped" in d.log() or exited(d), d, "stopped")
    storm(d, [signal.SIGINT, signal.SIGTERM], gap=0.001)
    assert_clean_stop(d, reap(d))


def test_sigusr1_storm_while_serving_then_sigterm(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(*SMALL_SWAP).start()
    # No thread but the main one may take the handled signals: all block them.  The main thread
    # blocks them too but shows them unblocked while it waits in sigwaitinfo (the kernel lifts
    # the waited-for set from the mask for the wait), so it is not checked here.
    tids = [int(t) for t in os.listdir(f"/proc/{d.pid}/task") if int(t) != d.pid]
    assert tids, "no threads?"
    for tid in tids:
        st = proc_status(d.pid, tid)
        assert set(HANDLED) <= sigbits(st["SigBlk"]), (st["Name"], st["SigBlk"])
    fd = os.open(d.image, os.O_RDWR)
    try:
        for i in range(500):  # hundreds of SIGUSR1 while it serves I/O
            os.kill(d.pid, signal.SIGUSR1)
            if i % 10 == 0:
                n = i // 10
                os.pwrite(fd, page_pattern(n), n * PAGE)
        for n in range(50):
            assert os.pread(fd, PAGE, n * PAGE) == page_pattern(n)
    finally:
        os.close(fd)
    assert d.status()["pid"] == d.pid  # the exporter still answers
    d.wait_for("compaction:")  # the compactor ran on request
    sent = storm(d, [signal.SIGUSR1, signal.SIGUSR1, signal.SIGTERM])  # and during the stop
    log = assert_clean_stop(d, reap(d))
    assert sent > 0
    assert log.count("compaction:") < 500  # requests coalesce; a storm is not 500 runs


# ---- during start-up -------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["lock", "mount", "swapon"])
def test_stop_signal_during_start_up(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, step: str
) -> None:
    # A stop signal at each step on the way up: as soon as the instance lock exists (signals
    # are blocked just before it), when the FUSE mount shows, and while swapon runs (slowed
    # down by a PATH wrapper).  The start-up ends at the next step and unwinds: exit 0.
    env = fake_command(tmp_path / "bin", "swapon", 1.5) if step == "swapon" else None
    d = daemon_factory(*SMALL_SWAP, env=env).start(wait=False, session=True)
    if step == "lock":
        wait_until(lambda: os.path.exists(lock_path(str(d.mountpoint))), d, "instance lock")
    elif step == "mount":
        wait_until(lambda: bool(traces(str(d.root))["mounts"]), d, "FUSE mount")
    else:
        wait_until(lambda: bool(children_named(d.pid, "swapon")), d, "swapon")
        # The command (the wrapper, asleep) has not inherited the daemon's blocked signals nor
        # its ignored SIGPIPE, and runs in its own session.
        child = children_named(d.pid, "swapon")[0]
        # The wrapper is a shell script: the shell blocks every signal for an instant while it
        # forks its `sleep`, so look again until it is waiting (its own mask, empty).
        deadline = time.monotonic() + 1.0
        st = proc_status(child)
        while sigbits(st["SigBlk"]) and time.monotonic() < deadline:
            time.sleep(0.01)
            st = proc_status(child)
        assert sigbits(st["SigBlk"]) == set(), st["SigBlk"]
        assert signal.SIGPIPE not in sigbits(st["SigIgn"]), st["SigIgn"]
        assert os.getsid(child) == child
    os.killpg(d.pid, signal.SIGTERM)
    os.kill(d.pid, signal.SIGINT)
    log = assert_clean_stop(d, reap(d))
    assert "stopping: swapoff" in log


def test_signal_storm_during_start_up(daemon_factory: Callable[..., Daemon]) -> None:
    # All three signals without pause from the moment the lock exists until the daemon exits.
    d = daemon_factory(*SMALL_SWAP).start(wait=False)
    wait_until(lambda: os.path.exists(lock_path(str(d.mountpoint))), d, "instance lock")
    storm(d, [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
    assert_clean_stop(d, reap(d))


# ---- during swapoff --------------------------------------------------------------------------


def test_signal_storm_during_swapoff_with_pages_out(
    daemon_factory: Callable[..., Daemon], memcg: Path
) -> None:
    d, dev = start_swap_daemon(daemon_factory, session=True)
    with workload(memcg) as w:
        swapped_out(w, dev, memcg)
        os.kill(d.pid, signal.SIGTERM)
        d.wait_for("stopping: swapoff")
        t0 = time.monotonic()
        found: list[int] = []

        def swapoff_running() -> bool:
            found[:] = children_named(d.pid, "swapoff")
            return bool(found) or dev not in active_swaps()

        wait_until(swapoff_running, d, "swapoff")
        if found:  # the command the daemon runs does not inherit its blocked signals
            try:
                st, sid = proc_status(found[0]), os.getsid(found[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # swapoff was already done
            else:
                assert sigbits(st["SigBlk"]) == set(), st["SigBlk"]
                assert sid == found[0]  # its own session: a Ctrl-C to the group misses it
        # How long the swapoff itself ran (not the storm, which lasts until the daemon exits):
        # only a swapoff longer than a progress interval must have reported progress.
        off_at: list[float] = []

        def watch_swapoff() -> None:
            while dev in active_swaps() and time.monotonic() - t0 < HANG:
                time.sleep(0.05)
            off_at.append(time.monotonic())

        watcher = threading.Thread(target=watch_swapoff)
        watcher.start()
        storm(d, [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], group=True, gap=0.001)
        watcher.join()
        took = off_at[0] - t0
        log = assert_clean_stop(d, reap(d))
        assert dev not in active_swaps()
        assert "already stopping, ignored" in log, log
        if took > PROGRESS_EVERY + 1:
            assert f"swapoff {dev}: " in log and "still out on it" in log, log
        expect_line(w, "ok")
        assert w.wait(timeout=HANG) == 0
    assert traces(str(d.root)) == NOTHING


def test_swapoff_progress_is_logged(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    # A real swapoff of a small device is too quick to report progress, so a PATH wrapper makes
    # it take ~2.5 progress intervals (sleep, then the real swapoff): the daemon logs what is
    # still out on the device every PROGRESS_EVERY s while it waits.
    env = fake_command(tmp_path / "bin", "swapoff", PROGRESS_EVERY * 2.5)
    d = daemon_factory(*SMALL_SWAP, env=env).start()
    dev = d.status()["loop_device"]
    assert isinstance(dev, str)
    os.kill(d.pid, signal.SIGTERM)
    log = assert_clean_stop(d, reap(d))
    lines = re.findall(rf"swapoff {re.escape(dev)}: \d+ KiB \(\d+ pages\) still out on it", log)
    assert len(lines) == 2, log
