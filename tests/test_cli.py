"""CLI tests: bad input of every kind is refused with one line, and leaves nothing behind.

Every case runs the real ``zcached`` console script as a subprocess (no mocks) with a mountpoint
under ``tmp_path`` and its own port, then checks: exit code != 0, exactly one
``zcached: error:`` line on stderr, no traceback, and no mount, loop device or swap under the
test's directory afterwards. Failures after the FUSE mount are provoked for real too (mkswap on a
too small device, swapon failing), and ``zcached status`` / ``compact`` without a daemon.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HANG, Daemon, free_port, release_under, run_cli, traces

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount(2), losetup, swapon")

Case = Callable[[Path], list[str]]


@pytest.fixture(autouse=True)
def _release(tmp_path: Path) -> Iterator[None]:
    """A case that wrongly started a daemon leaves nothing behind (it ran under tmp_path)."""
    try:
        yield
    finally:
        release_under(str(tmp_path))


def base(
    tmp: Path,
    *,
    size: str | None = "1M",
    mountpoint: str | None = None,
    swap: str | None = "--no-swap",
) -> list[str]:
    """``run`` flags that are all valid; a case replaces or appends the one it breaks (a
    flag set to None is left out so that a config file's value counts)."""
    mnt = tmp / "mnt"
    mnt.mkdir(exist_ok=True)
    args = ["run", "--metrics-listen", f"127.0.0.1:{free_port()}"]
    args += ["--mountpoint", mountpoint if mountpoint is not None else str(mnt)]
    args += [swap] if swap is not None else []
    return args + (["--size", size] if size is not None else [])


def with_config(text: str, **kw: str | None) -> Case:
    def case(tmp: Path) -> list[str]:
        cfg = tmp / "zcached.toml"
        cfg.write_text(text)
        return [*base(tmp, **kw), "--config", str(cfg)]

    return case


def mountpoint_file(tmp: Path) -> list[str]:
    f = tmp / "plainfile"
    f.write_text("not a directory\n")
    return base(tmp, mountpoint=str(f))


CASES: dict[str, Case] = {
    "size-not-page-multiple": lambda t: base(t, size="5000"),
    "size-zero": lambda t: base(t, size="0"),
    "size-negative": lambda t: base(t, size="-4096"),
    "size-word": lambda t: base(t, size="abc"),
    "size-fraction": lambda t: base(t, size="1.5G"),
    "size-percent-over-100": lambda t: base(t, size="200%"),
    "unknown-compressor": lambda t: [*base(t), "--compressor", "gzip"],
    "level-out-of-range": lambda t: [*base(t), "--level", "99"],
    "level-not-int": lambda t: [*base(t), "--level", "x"],
    "zstd-level-out-of-range": lambda t: [*base(t), "--compressor", "zstd", "--level", "23"],
    "config-missing": lambda t: [*base(t), "--config", str(t / "nope.toml")],
    "config-invalid-toml": with_config("size = \n"),
    "config-unknown-key": with_config('sise = "1M"\n'),
    "config-unknown-compaction-key": with_config("[compaction]\nfrag = 0.5\n"),
    "config-wrong-type-size": with_config("size = true\n", size=None),
    "config-wrong-type-swap": with_config('swap = "yes"\n', swap=None),
    "mountpoint-missing": lambda t: base(t, mountpoint=str(t / "missing")),
    "mountpoint-regular-file": mountpoint_file,
    "mountpoint-relative": lambda t: base(t, mountpoint="relative/dir"),
    "listen-no-port": lambda t: [*base(t), "--metrics-listen", "127.0.0.1"],
    "listen-port-out-of-range": lambda t: [*base(t), "--metrics-listen", "127.0.0.1:70000"],
    "listen-bad-host": lambda t: [*base(t), "--metrics-listen", "256.0.0.1:9"],
    "listen-ipv6": lambda t: [*base(t), "--metrics-listen", "[::1]:9"],
    "listen-unresolvable": lambda t: [*base(t), "--metrics-listen", "no-such-host.invalid:9"],
    "no-subcommand": lambda t: [],
    "unknown-flag": lambda t: [*base(t), "--frobnicate"],
    "swap-and-no-swap": lambda t: [*base(t), "--swap"],
}


def assert_refused(p: subprocess.CompletedProcess[str], *, only_line: bool = True) -> str:
    """Non-zero exit, one ``zcached: error:`` line, no traceback; returns that line.

    ``only_line``: stderr holds nothing else. Failures after process setup may follow the
    daemon's start-up warnings (no CAP_SYS_RESOURCE here), so those cases check only the
    error lines."""
    assert p.returncode != 0, p.stderr
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("zcached: error:")]
    assert len(errors) == 1, p.stderr
    if only_line:
        assert p.stderr.splitlines() == errors, p.stderr
    return errors[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(name: str, tmp_path: Path) -> None:
    args = CASES[name](tmp_path)
    before = traces(str(tmp_path))
    p = run_cli(*args)
    assert_refused(p)
    assert traces(str(tmp_path)) == before


def test_busy_metrics_port_is_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        args = [*base(tmp_path), "--metrics-listen", f"127.0.0.1:{port}"]
        line = assert_refused(run_cli(*args))
    assert f"127.0.0.1:{port}" in line
    assert traces(str(tmp_path)) == {"mounts": [], "loops": [], "swaps": []}


def test_second_instance_is_refused_and_first_keeps_serving(
    daemon_factory: Callable[..., Daemon],
) -> None:
    first = daemon_factory("16M", "--no-swap").start()
    mnt = str(first.mountpoint)
    before = traces(str(first.root))
    # Same mountpoint, own port; then the same port too: both name the running instance.
    for listen in (f"127.0.0.1:{free_port()}", first.listen):
        p = run_cli(
            "run", "--no-swap", "--size", "16M", "--mountpoint", mnt, "--metrics-listen", listen
        )
        line = assert_refused(p)
        assert "another zcached is running" in line, line
    assert traces(str(first.root)) == before
    assert first.proc is not None and first.proc.poll() is None
    assert first.status()["pid"] == first.pid
    payload = os.urandom(4096)
    fd = os.open(first.image, os.O_RDWR)
    try:
        os.pwrite(fd, payload, 8192)
        assert os.pread(fd, 4096, 8192) == payload
    finally:
        os.close(fd)
    assert first.terminate() == 0


def wait_gone(pid: int) -> None:
    """Until ``pid`` (not our child: the keeper's orphan, reaped by init) is gone."""
    deadline = time.monotonic() + HANG
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)


def test_dead_mount_of_a_killed_daemon_is_named(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    dead = daemon_factory("16M", "--no-swap").start()
    server = dead.status()["server_pid"]
    assert isinstance(server, int)
    dead.terminate(signal.SIGKILL)  # the keeper, by its pid: its server serves on alone,
    os.kill(server, signal.SIGKILL)  # until it dies too: the FUSE mount stays behind, dead
    wait_gone(server)
    before = traces(str(dead.root))
    assert before["mounts"] == [str(dead.mountpoint)]
    p = run_cli(*base(tmp_path, mountpoint=str(dead.mountpoint)))
    line = assert_refused(p)
    assert "dead FUSE mount" in line, line
    assert traces(str(dead.root)) == before  # the fixture's cleanup unmounts it (umount -l)


def test_mkswap_failure_after_mount_unwinds(tmp_path: Path) -> None:
    # 16 KiB is a valid device size for zcached but too small for a swap area (mkswap needs
    # 10 pages): the daemon has mounted and attached a loop device when mkswap fails for real.
    args = base(tmp_path, size="16K", swap="--swap")
    line = assert_refused(run_cli(*args), only_line=False)
    assert "mkswap" in line, line
    assert traces(str(tmp_path)) == {"mounts": [], "loops": [], "swaps": []}


def test_swapon_failure_after_loop_attach_unwinds(tmp_path: Path) -> None:
    # A real swapon cannot be made to fail on demand without disturbing the machine's swap, so
    # PATH puts a failing `swapon` first (the only stand-in here); mount, losetup and mkswap
    # are real, and the daemon must undo them.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "swapon").write_text("#!/bin/sh\necho 'swapon: injected failure' >&2\nexit 32\n")
    (fake / "swapon").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")
    args = base(tmp_path, size="1M", swap="--swap")
    line = assert_refused(run_cli(*args, env=env), only_line=False)
    assert "injected failure" in line, line
    assert traces(str(tmp_path)) == {"mounts": [], "loops": [], "swaps": []}


def test_status_without_daemon_is_one_line_exit_1() -> None:
    p = run_cli("status", "--metrics-listen", f"127.0.0.1:{free_port()}")
    assert p.returncode == 1
    assert len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith("zcached: error: no zcached daemon answering"), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""


def test_compact_without_daemon_is_one_line(tmp_path: Path) -> None:
    p = run_cli("compact", "--mountpoint", str(tmp_path))
    assert p.returncode != 0
    assert p.stderr.startswith("zcached: error:") and len(p.stderr.splitlines()) == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
