"""The systemd unit and `make install`/`make uninstall`, exercised for real.

`make install` runs into a temporary prefix (its own virtualenv, the unit, the config);
`systemd-analyze verify` checks the installed unit, whose ExecStart then exists, and
`systemd-analyze security --offline` scores its hardening. systemd is not PID 1 on these
machines, so the unit is not started here: its ExecStart command line is parsed by the real CLI
instead, and the daemon's sd_notify protocol is tested in tests/test_daemon.py.
"""

from __future__ import annotations

import configparser
import contextlib
import mmap
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HANG, Daemon, active_swaps, run_cli

from zcached import cli, daemon
from zcached import config as cfgmod

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "zcached.service"
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def _unit(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file (repeated keys kept in order)."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "[")):
            continue
        k, _, v = line.partition("=")
        out.setdefault(k, []).append(v)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    base = tmp_path_factory.mktemp("install")
    dirs = {
        "PREFIX": base / "usr",
        "OPT": base / "opt",
        "UNITDIR": base / "unit",
        "ETCDIR": base / "etc",
    }
    argv = ["make", "-C", str(ROOT), "-s", "install"] + [f"{k}={v}" for k, v in dirs.items()]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600)
        yield dirs
    finally:
        argv[4] = "uninstall"
        subprocess.run(argv, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_make_install_puts_everything_in_place(installed: dict[str, Path]) -> None:
    exe = installed["PREFIX"] / "bin" / "zcached"
    assert exe.is_symlink() and Path(exe.resolve()).is_relative_to(installed["OPT"])
    conf = installed["ETCDIR"] / "zcached.toml"
    assert conf.read_text() == (ROOT / "config" / "zcached.toml").read_text()
    unit = _unit(installed["UNITDIR"] / "zcached.service")
    assert unit["ExecStart"] == [f"{exe} run --config {conf}"]
    assert unit["ExecReload"] == [f"{exe} upgrade --config {conf}"]
    # the installed console script really runs (no daemon: one line, exit 1)
    p = subprocess.run(
        [str(exe), "status", "--metrics-listen", "127.0.0.1:1"], capture_output=True, text=True
    )
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@needs_analyze
def test_installed_unit_verifies(installed: dict[str, Path]) -> None:
    unit = installed["UNITDIR"] / "zcached.service"
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "zcached.service" not in p.stderr, p.stderr  # no warnings about our unit


@needs_analyze
def test_security_exposure_stays_ok(installed: dict[str, Path]) -> None:
    unit = installed["UNITDIR"] / "zcached.service"
    p = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", p.stdout)
    assert m, p.stdout[-500:] + p.stderr
    assert float(m.group(1)) <= 4.0, m.group(0)  # README quotes it; >4 is "MEDIUM" or worse


def test_make_uninstall_keeps_the_config(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "zcached.toml").write_text("size = '1G'\n")
    (tmp_path / "unit").mkdir()
    (tmp_path / "unit" / "zcached.service").write_text("[Unit]\n")
    argv = ["make", "-C", str(ROOT), "-s", "uninstall", f"PREFIX={tmp_path / 'usr'}"]
    argv += [f"OPT={tmp_path / 'opt'}", f"UNITDIR={tmp_path / 'unit'}", f"ETCDIR={etc}"]
    subprocess.run(argv, check=True, capture_output=True)
    assert not (tmp_path / "unit" / "zcached.service").exists()
    assert (etc / "zcached.toml").read_text() == "size = '1G'\n"


def test_unit_settings_the_daemon_relies_on() -> None:
    u = _unit(UNIT)
    assert u["Type"] == ["notify"]
    assert "swap.target" in u["Before"][0]
    assert u["KillSignal"] == ["SIGTERM"]
    assert u["OOMScoreAdjust"] == ["-1000"]
    assert u["LimitMEMLOCK"] == ["infinity"]
    assert u["IPAddressDeny"] == ["any"] and u["IPAddressAllow"] == ["localhost"]
    assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
    assert "/dev/fuse rw" in u["DeviceAllow"]
    stop = u["TimeoutStopSec"][0]
    assert stop.endswith("min") and int(stop[:-3]) >= 10  # swapoff of a full device takes long
    writable = " ".join(u["ReadWritePaths"])
    assert cfgmod.DEFAULT_MOUNTPOINT in writable and daemon.LOCK_DIR in writable


def test_execstart_is_accepted_by_the_cli() -> None:
    argv = shlex.split(_unit(UNIT)["ExecStart"][0])
    assert argv[0].endswith("/zcached")
    args = cli.build_parser().parse_args(argv[1:])
    assert args.cmd == "run" and args.config == cfgmod.DEFAULT_CONFIG


def test_unit_parses_as_ini() -> None:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.read_string(UNIT.read_text())
    assert set(cp.sections()) == {"Unit", "Service", "Install"}
    assert cp["Install"]["WantedBy"] == "swap.target"


def _filter_set(token: str, seen: set[str] | None = None) -> set[str]:
    """System calls a SystemCallFilter token names (a @group, expanded recursively)."""
    if not token.startswith("@"):
        return {token}
    seen = set() if seen is None else seen
    if token in seen:
        return set()
    seen.add(token)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", token], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            names |= _filter_set(word, seen)
    return names


def unit_allowed_syscalls() -> set[str]:
    """What the unit's SystemCallFilter lines let through (allow lines, then ~deny lines)."""
    allowed: set[str] = set()
    for value in _unit(UNIT)["SystemCallFilter"]:
        deny = value.startswith("~")
        names = set().union(*(_filter_set(t) for t in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def under_strace(d: Daemon) -> Path:
    """Run the daemon under strace -f, counting its system calls by name; the log's path."""
    log = d.root / "strace.txt"
    d.argv = ["strace", "-f", "-qq", "-c", "-U", "name", "-o", str(log), *d.argv]
    return log


def stop_traced(d: Daemon, keeper: int) -> None:
    """strace run with -o FILE blocks fatal signals for itself (its -I default), so the
    keeper is stopped by its own pid; strace then exits with the keeper's exit code."""
    assert d.proc is not None
    if d.proc.poll() is None:
        os.kill(keeper, signal.SIGTERM)


def syscalls_used(log: Path) -> set[str]:
    return {
        ln.split()[0]
        for ln in log.read_text().splitlines()
        if ln.strip() and not ln.startswith(("syscall", "-", "total"))
    }


def test_every_syscall_the_service_makes_is_allowed_by_the_unit(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """systemd is not PID 1 here, so the unit's seccomp filter cannot be applied for real: the
    keeper, its servers and the commands they run (losetup, mkswap, swapon, swapoff) run under
    strace instead, through start, I/O, a server's death, a live upgrade and the stop, and every
    system call they made must be one the filter allows (a call it does not allow would kill
    the service with SIGSYS on the machine it is installed on)."""
    if active_swaps():
        pytest.skip("another swap is active")
    d = daemon_factory("16M", "--swap")
    log = under_strace(d)
    d.start()
    assert d.proc is not None
    doc = d.status()
    keeper = int(str(doc["keeper_pid"]))  # strace's child
    try:
        fd = os.open(d.image, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"z" * 4096
        os.pwrite(fd, buf, 0)
        os.preadv(fd, [buf], 4096)
        os.close(fd)
        os.kill(int(str(doc["server_pid"])), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                if d.status().get("server_pid") not in (None, doc["server_pid"]):
                    break
        assert run_cli("upgrade", "--mountpoint", str(d.mountpoint)).returncode == 0
    finally:
        stop_traced(d, keeper)
    assert d.proc.wait(timeout=HANG) == 0, d.log()
    used = syscalls_used(log)
    assert {"mincore", "memfd_create", "mount", "swapon"} <= used, sorted(used)
    assert used - unit_allowed_syscalls() == set(), sorted(used - unit_allowed_syscalls())


def test_recompression_and_dictionary_syscalls_are_allowed_by_the_unit(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """As above, for what the test above does not reach: a dictionary trained, pages
    recompressed and read back, and a live upgrade's probe of the arena (no swap here: the
    test writes the device itself)."""
    conf = tmp_path / "zcached.toml"
    conf.write_text('[recompress]\nidle = "1s"\ncpu_budget = 1.0\n')
    d = daemon_factory("16M", "--no-swap", "--config", str(conf))
    log = under_strace(d)
    d.start()
    assert d.proc is not None
    keeper = int(str(d.status()["keeper_pid"]))
    try:
        fd = os.open(d.image, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        page = [(b"page %d of the syscall test; " % p * 150)[:4096] for p in range(2048)]
        for p in range(2048):  # compressible: 128 samples, a dictionary, cold pages
            buf[:] = page[p]
            os.pwrite(fd, buf, p * 4096)
        deadline = time.monotonic() + 60
        while d.metrics().get("zcached_recompressed_pages_total", 0) < 1000:
            assert time.monotonic() < deadline, d.metrics()
            time.sleep(0.2)
        assert d.metrics()["zcached_dictionaries"] >= 1
        for p in range(0, 2048, 7):
            os.preadv(fd, [buf], p * 4096)
            assert bytes(buf) == page[p], p
        os.close(fd)
        assert run_cli("upgrade", "--mountpoint", str(d.mountpoint)).returncode == 0
    finally:
        stop_traced(d, keeper)
    assert d.proc.wait(timeout=HANG) == 0, d.log()
    used = syscalls_used(log)
    assert used - unit_allowed_syscalls() == set(), sorted(used - unit_allowed_syscalls())
