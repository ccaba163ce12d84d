"""swap.py's command runner, without root: the child's signal mask, session and dispositions,
its output and exit status, timeouts, and the progress ticks of a long command.

The daemon blocks SIGTERM/SIGINT/SIGUSR1 in every thread (it takes them with sigtimedwait), so
these tests block them too while a command runs: a child must still start with an empty mask.
The swapoff progress logging is checked here with a slow fake command (``sleep``) standing in
for a long swapoff, and for real (a slowed-down swapoff) in test_signals.py.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator

import pytest

from zcached import swap

BLOCKED = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


@pytest.fixture
def blocked() -> Iterator[None]:
    """The daemon's mask on this (the main) thread; restored afterwards."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def status_fields(text: str) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_child_has_empty_mask_default_sigpipe_and_own_session(blocked: None) -> None:
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) >= BLOCKED
    # exec: cat reads its own status as the spawned process (a shell that reads its own while
    # it waits for a forked cat shows the mask the shell keeps around its fork, not ours).
    out = swap._run(["sh", "-c", "echo $$; exec cat /proc/self/stat /proc/self/status"], "probe")
    pid_line, stat, status = out.split("\n", 2)
    pid = int(pid_line)
    fields = status_fields(status)
    assert int(fields["SigBlk"], 16) == 0, fields["SigBlk"]
    ign = int(fields["SigIgn"], 16)
    assert not ign & (1 << (signal.SIGPIPE - 1)) and not ign & (1 << (signal.SIGXFSZ - 1))
    session = int(stat.rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp sid
    assert session == pid  # setsid: a Ctrl-C to the daemon's group does not reach it
    assert os.getsid(0) != pid


def test_spawned_sleep_has_sigblk_0(blocked: None, tmp_path: os.PathLike[str]) -> None:
    # The check the issue asks for, on a running `sleep`: read its status while it runs.
    seen: list[str] = []

    def look() -> None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read() != b"sleep\x000.6\x00":
                            continue
                    with open(f"/proc/{pid}/status") as f:
                        fields = status_fields(f.read())
                except OSError:
                    continue
                if int(fields["PPid"]) == os.getpid():
                    seen.append(fields["SigBlk"])

    swap._run(["sleep", "0.6"], "sleep", tick=look, every=0.2)
    assert seen and all(int(m, 16) == 0 for m in seen), seen


def test_output_and_errors() -> None:
    assert swap._run(["sh", "-c", "echo out; echo err >&2"], "x") == "out"
    with pytest.raises(swap.SwapError, match=r"^what: last line$"):
        swap._run(["sh", "-c", "echo first >&2; echo last line >&2; exit 3"], "what")
    with pytest.raises(swap.SwapError, match=r"^what: exit 4$"):
        swap._run(["sh", "-c", "exit 4"], "what")
    with pytest.raises(swap.SwapError, match=r"^what: killed by signal 9$"):
        swap._run(["sh", "-c", "kill -KILL $$"], "what")
    with pytest.raises(swap.SwapError, match=r"^what: no-such-command-zc not found$"):
        swap._run(["no-such-command-zc"], "what")
    big = swap._run(["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x"], "big")
    assert big == "x" * 300000  # more than a pipe holds: read while it runs


def test_timeout_kills_the_child() -> None:
    t0 = time.monotonic()
    with pytest.raises(swap.SwapError, match=r"^slow: sleep timed out$"):
        swap._run(["sleep", "30"], "slow", timeout=0.3)
    assert time.monotonic() - t0 < 10


def test_progress_ticks_while_a_slow_command_runs() -> None:
    # A fake slow "swapoff": the ticks come every `every` seconds while it runs, none after.
    ticks: list[float] = []
    swap._run(["sleep", "1"], "slow", timeout=None, tick=lambda: ticks.append(time.monotonic()))
    assert ticks == []  # the default interval is longer than the command
    t0 = time.monotonic()
    swap._run(
        ["sleep", "1"], "slow", timeout=None, tick=lambda: ticks.append(time.monotonic()), every=0.2
    )
    end = time.monotonic()
    assert 3 <= len(ticks) <= 6, ticks
    assert all(b - a >= 0.15 for a, b in itertools.pairwise(ticks)), ticks
    assert ticks[0] - t0 >= 0.15 and ticks[-1] <= end


def test_swapoff_reports_kib_still_out(monkeypatch: pytest.MonkeyPatch) -> None:
    # swapoff with a fake device and a fake slow command: `progress` gets swap_used_kib(dev)
    # on every tick.
    left = iter([300, 200, 100, 0, 0, 0, 0, 0])
    monkeypatch.setattr(swap, "active_swaps", lambda: ["/dev/fake"])
    monkeypatch.setattr(swap, "swap_used_kib", lambda dev: next(left))
    real_run = swap._run

    def slow_swapoff(argv: list[str], what: str, **kw: object) -> str:
        assert argv == ["swapoff", "/dev/fake"] and kw["timeout"] is None
        return real_run(["sleep", "0.7"], what, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(swap, "_run", slow_swapoff)
    got: list[int] = []
    swap.swapoff("/dev/fake", got.append, every=0.2)
    assert got[:3] == [300, 200, 100], got
