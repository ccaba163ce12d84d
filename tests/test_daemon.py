"""Daemon tests, end to end: ``zcached run`` as a real subprocess, real FUSE, loop, swap, cgroup.

Each test starts its own daemon (unique mountpoint under ``tmp_path``, unique metrics port) via
the ``daemon_factory`` fixture in conftest.py, which stops it by its pid and releases whatever is
left under ``tmp_path`` (swapoff, losetup -d, umount -l), also when the test fails. Loop devices
a test attaches itself and the memory cgroup of the swap tests are released by their own
fixtures/context managers the same way. The swap tests need the machine's swap to themselves
(pages would otherwise go elsewhere) and skip, naming the active swaps, when another is active.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HANG, Daemon, active_swaps, run_cli, swap_used_kib, traces

from zcached.daemon import lock_path
from zcached.transport import unavailable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mount(2), losetup, swapon")

PAGE = 4096
MiB = 1 << 20
NOTHING: dict[str, list[str]] = {"mounts": [], "loops": [], "swaps": []}


# ---- helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    """A loop device with direct I/O over ``path``, attached by the test; always detached."""
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=HANG)


def page_pattern(i: int) -> bytes:
    """Page ``i``: derived from its index, compressible, and never a single repeated word."""
    head = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64).digest()
    body = (f"zcached test page {i:010d} " * 160).encode()
    return (head + body)[:PAGE]


def aligned(n: int) -> mmap.mmap:
    """A page-aligned buffer for O_DIRECT I/O on the loop device."""
    return mmap.mmap(-1, n)


def read_direct(dev: str, offset: int, length: int) -> bytes:
    """Read ``dev`` with O_DIRECT (no page cache: the bytes come from the daemon)."""
    buf = aligned(length)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
    finally:
        os.close(fd)
    return bytes(buf)


def write_direct(dev: str, offset: int, data: bytes) -> None:
    buf = aligned(len(data))
    buf[:] = data
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)


def fio_verify(dev: str, tmp: Path, name: str, bs_args: list[str], size: str) -> None:
    p = subprocess.run(
        ["fio", f"--name={name}", f"--filename={dev}", "--rw=randwrite", *bs_args,
         f"--size={size}", "--direct=1", "--ioengine=libaio", "--iodepth=16",
         "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--verify_state_save=0",
         "--output-format=json"],
        capture_output=True, text=True, timeout=HANG * 3, cwd=tmp,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    job = json.loads(p.stdout[p.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0  # verify read it back


def vm_locked_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    raise AssertionError("no VmLck line")


# ---- --no-swap lifecycle -------------------------------------------------------------------


def test_no_swap_lifecycle(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory("64M", "--no-swap").start()
    assert sum(line.startswith("zcached: ready:") for line in d.log().splitlines()) == 1
    st = os.stat(d.image)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 64 * MiB
    assert os.listdir(d.mountpoint) == ["swap.img"]
    assert vm_locked_kib(d.pid) > 0  # mlockall took: the daemon cannot be swapped to itself

    check_counters(d)
    with loop_device(d.image) as dev:
        check_write_read_discard(d, dev)
        fio_verify(dev, tmp_path, "bs4k", ["--bs=4k"], "8M")
        fio_verify(dev, tmp_path, "mix", ["--bssplit=4k/50:64k/25:1m/25"], "32M")
    check_idle_buffers(d)

    p = run_cli("compact", "--mountpoint", str(d.mountpoint))
    assert p.returncode == 0, p.stderr
    assert str(d.pid) in p.stdout
    d.wait_for("compaction:")

    assert d.terminate() == 0
    assert "zcached: stopped" in d.log()
    assert "Traceback" not in d.log()
    assert traces(str(d.root)) == NOTHING
    assert not os.path.exists(lock_path(str(d.mountpoint)))  # the instance lock is gone too


def test_io_spin_us_from_the_config_reaches_the_workers(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """io_spin_us = 500: reads one at a time are taken by a spinning worker (the metrics say
    so), every page reads back; once quiet, the spin time stops growing."""
    conf = tmp_path / "spin.toml"
    conf.write_text("io_spin_us = 500\n")
    d = daemon_factory("64M", "--no-swap", "--config", str(conf)).start()
    data = b"".join(page_pattern(i) for i in range(64))
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(d.image, os.O_RDWR | os.O_DIRECT)
    try:
        for i in range(64):
            buf[:] = data[i * PAGE : (i + 1) * PAGE]
            os.pwrite(fd, buf, i * PAGE)
        for i in range(64):
            os.preadv(fd, [buf], i * PAGE)
            assert bytes(buf) == data[i * PAGE : (i + 1) * PAGE]
    finally:
        os.close(fd)
    m = d.metrics()
    assert m["zcached_fuse_spin_hits_total"] > 0 and m["zcached_fuse_spin_seconds_total"] > 0
    time.sleep(0.05)
    before = d.metrics()["zcached_fuse_spin_seconds_total"]
    time.sleep(0.3)  # the scrapes are requests to the exporter, not to the FUSE workers
    assert d.metrics()["zcached_fuse_spin_seconds_total"] == before
    assert d.terminate() == 0


def check_idle_buffers(d: Daemon) -> None:
    """After 1 MiB requests, idle FUSE workers give their buffers back to 64 KiB each (under
    the server's mlockall: munlock, MADV_DONTNEED, mlock2 again) without an error."""
    kept = 2 * 64 * 1024 * (os.cpu_count() or 1)  # io_threads "auto": one worker per CPU
    deadline = time.monotonic() + 30
    m = d.metrics()
    while m["zcached_fuse_buffer_resident_bytes"] > kept:
        assert time.monotonic() < deadline, m["zcached_fuse_buffer_resident_bytes"]
        time.sleep(0.1)
        m = d.metrics()
    assert m["zcached_fuse_buffer_trims_total"] >= 1
    assert m["zcached_fuse_internal_errors_total"] == 0
    assert vm_locked_kib(int(d.status()["server_pid"])) > 0  # still locked after the trims


def check_counters(d: Daemon) -> None:
    """Fresh daemon: a known set of writes, reads and discards shows exactly in /metrics and
    in ``zcached status --json``."""
    m0 = d.metrics()
    assert m0["zcached_writes_total"] == 0 and m0["zcached_stored_pages"] == 0
    data = b"".join(page_pattern(i) for i in range(8))
    same = bytes([0xAB]) * PAGE
    fd = os.open(d.image, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)  # 8 pages in one request
        assert os.pwrite(fd, same, 16 * PAGE) == PAGE
        assert os.pread(fd, len(data), 0) == data
        assert os.pread(fd, PAGE, 16 * PAGE) == same
    finally:
        os.close(fd)
    subprocess.run(
        ["fallocate", "--punch-hole", "--offset", str(2 * PAGE), "--length", str(2 * PAGE),
         str(d.image)],
        check=True,
    )  # fmt: skip
    m = d.metrics()
    assert m["zcached_writes_total"] == 9
    assert m["zcached_reads_total"] >= 9
    assert m["zcached_discards_total"] == 2
    assert m["zcached_stored_pages"] == 7
    assert m["zcached_same_pages"] == 1
    assert m["zcached_orig_data_bytes"] == 7 * PAGE
    assert m["zcached_failed_writes_total"] == 0 and m["zcached_failed_reads_total"] == 0
    p = run_cli("status", "--json", "--metrics-listen", d.listen)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["orig_data_size"] == 7 * PAGE
    assert doc["same_pages"] == 1
    assert doc["size"] == 64 * MiB
    assert doc["device"] == str(d.image)
    assert doc["loop_device"] is None and doc["pid"] == d.pid
    assert 0 < doc["compr_data_size"] < 6 * PAGE  # 6 compressible pages, compressed


def check_write_read_discard(d: Daemon, dev: str) -> None:
    """Unaligned and multi-page writes, reads and discards through the loop device and the
    file; discarded ranges read back as zeros, the bytes around them unchanged."""
    size = 64 * MiB
    base = 8 * MiB
    block = b"".join(page_pattern(1000 + i) for i in range(64))  # 256 KiB, multi-page
    write_direct(dev, base, block)
    fd = os.open(d.image, os.O_RDWR)
    try:
        assert os.pread(fd, len(block), base) == block  # via the file: what the loop wrote
        # Unaligned write through the file, across three pages; read back via the loop device.
        odd = os.urandom(2 * PAGE + 1000)
        assert os.pwrite(fd, odd, base + PAGE + 123) == len(odd)
        expect = bytearray(block)
        expect[PAGE + 123 : PAGE + 123 + len(odd)] = odd
        assert read_direct(dev, base, len(block)) == expect
        # Aligned multi-page discard through the loop device.
        subprocess.run(
            ["blkdiscard", "-o", str(base + 16 * PAGE), "-l", str(8 * PAGE), dev], check=True
        )
        expect[16 * PAGE : 24 * PAGE] = bytes(8 * PAGE)
        # Discard through the loop device at sector (not page) granularity: whole pages inside
        # are freed, partial edge pages are zeroed in part.
        subprocess.run(
            ["blkdiscard", "-o", str(base + 30 * PAGE + 512), "-l", str(3 * PAGE), dev],
            check=True,
        )
        expect[30 * PAGE + 512 : 33 * PAGE + 512] = bytes(3 * PAGE)
        # Unaligned punch-hole through the file, inside one page and across pages.
        for off, length in ((40 * PAGE + 7, 100), (44 * PAGE + 3000, 2 * PAGE + 5)):
            subprocess.run(
                ["fallocate", "--punch-hole", "--offset", str(base + off), "--length",
                 str(length), str(d.image)],
                check=True,
            )  # fmt: skip
            expect[off : off + length] = bytes(length)
        assert os.pread(fd, len(block), base) == expect
        assert read_direct(dev, base, len(block)) == expect
        # Past the end: nothing read, a write is refused; the last page works.
        assert os.pread(fd, PAGE, size) == b""
        assert os.pwrite(fd, page_pattern(7), size - PAGE) == PAGE
        assert read_direct(dev, size - PAGE, PAGE) == page_pattern(7)
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", size)
        assert e.value.errno in (errno.EFBIG, errno.ENOSPC, errno.EINVAL)
    finally:
        os.close(fd)
    assert d.metrics()["zcached_discards_total"] >= 2 + 8 + 2


# ---- sd_notify -----------------------------------------------------------------------------


def recv_state(sock: socket.socket) -> str:
    try:
        return sock.recv(4096).decode()
    except TimeoutError:
        pytest.fail("no sd_notify message (hang guard)")


@pytest.mark.parametrize("mode", ["--no-swap", "--swap"])
def test_sd_notify_ready_and_stopping(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, mode: str
) -> None:
    if mode == "--swap" and active_swaps():
        pytest.skip(f"another swap is active ({', '.join(active_swaps())})")
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(HANG)
        d = daemon_factory("16M", mode, env=dict(os.environ, NOTIFY_SOCKET=str(path)))
        d.start(wait=False)
        assert recv_state(sock) == "READY=1"
        # Usable at the moment READY=1 arrives: the file serves I/O, the swap is active.
        assert os.stat(d.image).st_size == 16 * MiB
        fd = os.open(d.image, os.O_RDWR)
        try:
            os.pwrite(fd, page_pattern(3), PAGE)
            assert os.pread(fd, PAGE, PAGE) == page_pattern(3)
        finally:
            os.close(fd)
        if mode == "--swap":
            dev = d.status()["loop_device"]
            assert isinstance(dev, str) and dev in active_swaps()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        assert recv_state(sock) == "STOPPING=1"
        assert d.proc.wait(timeout=HANG) == 0
    assert traces(str(d.root)) == NOTHING


# ---- real swap -----------------------------------------------------------------------------

# The workload: joins the memory cgroup before allocating, fills ALLOC bytes of pages derived
# from their index (part random per index, so not same-filled, but compressible), says
# "allocated", waits for a line on stdin, then reads every page back and checks it.
WORKLOAD = textwrap.dedent(
    """
    import hashlib, mmap, os, sys
    cg, npages = sys.argv[1], int(sys.argv[2])
    with open(os.path.join(cg, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    P = 4096
    def page(i):
        h = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64).digest()
        return (h + (b"page %10d " % i) * 256)[:P]
    mm = mmap.mmap(-1, npages * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # heap-like
    mm.madvise(mmap.MADV_NOHUGEPAGE)  # 4K pages, each swapped on its own
    for i in range(npages):
        mm[i * P : (i + 1) * P] = page(i)
    print("allocated", flush=True)
    sys.stdin.readline()
    bad = [i for i in range(npages) if mm[i * P : (i + 1) * P] != page(i)]
    print("ok" if not bad else f"bad {len(bad)} first {bad[:5]}", flush=True)
    sys.exit(1 if bad else 0)
    """
)
LIMIT = 64 * MiB
ALLOC = 256 * MiB


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    """A cgroup v1 memory group limited to ``limit`` bytes with swappiness 100; removed
    afterwards (its workload has been reaped by then; a failure here is reported)."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    cg = root / f"{name}-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        (cg / "memory.swappiness").write_text("100")
        yield cg
    finally:
        cg.rmdir()


@pytest.fixture
def memcg() -> Iterator[Path]:
    """A memory group limited to 64 MiB (LIMIT)."""
    with memory_cgroup("zcached-test", LIMIT) as cg:
        yield cg


@contextlib.contextmanager
def workload(cg: Path) -> Iterator[subprocess.Popen[str]]:
    """The workload child; killed by its pid if still alive when the test ends."""
    p = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(cg), str(ALLOC // PAGE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def expect_line(p: subprocess.Popen[str], want: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    assert line == want, f"workload said {line!r} (exit {p.poll()})"


def verify_all(w: subprocess.Popen[str]) -> None:
    """Let the workload read back and check every page; it must say "ok" and exit 0."""
    assert w.stdin is not None
    w.stdin.write("verify\n")
    w.stdin.flush()
    expect_line(w, "ok")
    assert w.wait(timeout=HANG) == 0


# The real-swap and fio-verify tests run on both transports (where the kernel offers io_uring).
TRANSPORTS = [
    "auto",
    pytest.param("uring", marks=pytest.mark.skipif(
        unavailable() is not None, reason=str(unavailable()))),
]  # fmt: skip


def start_swap_daemon(
    daemon_factory: Callable[..., Daemon], *extra: str, env: dict[str, str] | None = None,
    session: bool = False,
) -> tuple[Daemon, str]:  # fmt: skip
    """A --swap daemon (512M) outside any memory-limited cgroup; returns it and its device."""
    if active_swaps():
        pytest.skip(f"another swap is active ({', '.join(active_swaps())}); pages would go there")
    d = daemon_factory("512M", "--swap", *extra, env=env).start(session=session)
    dev = d.status()["loop_device"]
    assert isinstance(dev, str) and dev in active_swaps()
    assert_unlimited_memcg(d.pid)
    return d, dev


def assert_unlimited_memcg(pid: int) -> None:
    with open(f"/proc/{pid}/cgroup") as f:
        rel = next(ln.split(":", 2)[2].strip() for ln in f if ln.split(":")[1] == "memory")
    limit = int(Path("/sys/fs/cgroup/memory", rel.lstrip("/"), "memory.limit_in_bytes").read_text())
    assert limit >= 1 << 62, f"daemon is in memory cgroup {rel} limited to {limit}"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_real_swap_pages_go_out_and_come_back(
    daemon_factory: Callable[..., Daemon], memcg: Path, transport: str
) -> None:
    d, dev = start_swap_daemon(daemon_factory, "--io-transport", transport)
    p = run_cli("status", "--metrics-listen", d.listen)
    assert p.returncode == 0 and dev in p.stdout, p.stdout + p.stderr
    assert p.stdout.splitlines()[1].split()[-2:] == [dev, "100"]
    m0 = d.metrics()
    with workload(memcg) as w:
        expect_line(w, "allocated")
        used_kib = swap_used_kib(dev)
        assert used_kib * 1024 >= (ALLOC - LIMIT) // 2, f"{used_kib} KiB on {dev}"
        verify_all(w)
    m = d.metrics()
    overflow_pages = (ALLOC - LIMIT) // PAGE
    written = m["zcached_writes_total"] - m0["zcached_writes_total"]
    read = m["zcached_reads_total"] - m0["zcached_reads_total"]
    assert written >= overflow_pages * 0.9, (written, overflow_pages)
    assert read >= used_kib // 4 // 2, (read, used_kib)
    assert m["zcached_failed_reads_total"] == 0 and m["zcached_failed_writes_total"] == 0
    if transport == "uring":  # the swap's I/O came over the rings, not /dev/fuse
        assert m["zcached_fuse_uring_requests_total"] >= written // 256, m
    # The workload has exited: swapon --discard=pages hands its freed slots back as discards
    # (FUSE fallocate PUNCH_HOLE), and the pages they held leave the store.  Some of those
    # discards may have arrived before ``m`` was read (the C path answers them quickly), so
    # count from before the workload: the swapon's own discard of the whole device is in m0.
    wait_metric(d, "zcached_discards_total", m0["zcached_discards_total"] + overflow_pages // 2)
    wait_metric(d, "zcached_stored_pages", written // 2, below=True)
    assert d.terminate() == 0
    assert traces(str(d.root)) == NOTHING and dev not in active_swaps()


def wait_metric(d: Daemon, name: str, bound: float, below: bool = False) -> float:
    """Poll /metrics until ``name`` reaches ``bound`` (>=, or <= with ``below``); fail after
    HANG seconds."""
    deadline = time.monotonic() + HANG
    while True:
        v = d.metrics()[name]
        if (v <= bound) if below else (v >= bound):
            return v
        assert time.monotonic() < deadline, f"{name} stuck at {v}, waiting for {bound}"
        time.sleep(0.1)


def test_sigterm_under_swap_load_brings_pages_back(
    daemon_factory: Callable[..., Daemon], memcg: Path
) -> None:
    d, dev = start_swap_daemon(daemon_factory)
    with workload(memcg) as w:
        expect_line(w, "allocated")
        assert swap_used_kib(dev) * 1024 >= (ALLOC - LIMIT) // 2
        # swapoff charges every page it brings back to the owner's cgroup; at 64 MiB that would
        # OOM-kill the workload, so raise the limit first, as an admin stopping swap would.
        (memcg / "memory.limit_in_bytes").write_text(str(2 * ALLOC))
        assert w.stdin is not None
        w.stdin.write("verify\n")  # the workload reads its pages while the daemon shuts down
        w.stdin.flush()
        assert d.terminate() == 0
        log = d.log()
        assert "stopping: swapoff" in log and "zcached: stopped" in log, log
        assert dev not in active_swaps()
        expect_line(w, "ok")
        assert w.wait(timeout=HANG) == 0
    assert traces(str(d.root)) == NOTHING


def swapped_out(w: subprocess.Popen[str], dev: str, memcg: Path) -> None:
    """Wait until the workload has allocated (pages out on ``dev``), raise its limit so that
    swapoff can bring them back, and let it start reading them."""
    expect_line(w, "allocated")
    assert swap_used_kib(dev) * 1024 >= (ALLOC - LIMIT) // 2
    (memcg / "memory.limit_in_bytes").write_text(str(2 * ALLOC))
    assert w.stdin is not None
    w.stdin.write("verify\n")
    w.stdin.flush()


def children_named(pid: int, name: str) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == name:
                        found.append(int(child))
    return found


def test_ctrl_c_twice_during_swapoff_loses_nothing(
    daemon_factory: Callable[..., Daemon], memcg: Path
) -> None:
    # A terminal's Ctrl-C signals the whole foreground process group: the daemon and whatever
    # command it runs.  The group here holds only the daemon this test started and its children.
    d, dev = start_swap_daemon(daemon_factory, session=True)
    with workload(memcg) as w:
        swapped_out(w, dev, memcg)
        os.killpg(d.pid, signal.SIGINT)
        d.wait_for("stopping: swapoff")
        while not children_named(d.pid, "swapoff") and dev in active_swaps():
            assert d.proc is not None and d.proc.poll() is None, d.log()
        os.killpg(d.pid, signal.SIGINT)  # the impatient second Ctrl-C, while swapoff runs
        assert d.proc is not None and d.proc.wait(timeout=HANG) == 0, d.log()
        assert dev not in active_swaps()
        expect_line(w, "ok")
        assert w.wait(timeout=HANG) == 0
    assert traces(str(d.root)) == NOTHING


def test_failed_swapoff_is_retried_not_torn_down(
    daemon_factory: Callable[..., Daemon], memcg: Path, tmp_path: Path
) -> None:
    # swapoff cannot be made to fail on demand for real here (with pages charged to a limited
    # cgroup the kernel OOM-kills the owner instead of failing), so PATH puts a `swapoff` first
    # that fails once and then runs the real one.  The daemon must keep serving and retry:
    # detaching and unmounting under an active swap would lose every page still on it.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "swapoff").write_text(
        "#!/bin/sh\n"
        f"if [ ! -e {fake}/failed ]; then touch {fake}/failed; "
        "echo 'swapoff: injected failure' >&2; exit 255; fi\n"
        'PATH="${PATH#*:}" exec swapoff "$@"\n'
    )
    (fake / "swapoff").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}")
    d, dev = start_swap_daemon(daemon_factory, env=env)
    with workload(memcg) as w:
        swapped_out(w, dev, memcg)
        assert d.terminate() == 0
        log = d.log()
        assert "injected failure" in log and "zcached: stopped" in log, log
        assert (fake / "failed").exists() and dev not in active_swaps()
        expect_line(w, "ok")
        assert w.wait(timeout=HANG) == 0
    assert traces(str(d.root)) == NOTHING


def test_sigterm_during_start_up_unwinds(daemon_factory: Callable[..., Daemon]) -> None:
    # The signal handlers are in place before the mount, so a SIGTERM as soon as the mount
    # shows (losetup / mkswap / swapon still to come) must unwind cleanly and exit 0.  Priority
    # 0 keeps other swap users' pages off this device for the moment it may be active.
    d = daemon_factory("16M", "--swap", "--swap-priority", "0").start(wait=False)
    assert d.proc is not None
    while not traces(str(d.root))["mounts"]:
        assert d.proc.poll() is None, d.log()
    assert d.terminate() == 0, d.log()
    assert "zcached: stopped" in d.log() and "Traceback" not in d.log()
    assert traces(str(d.root)) == NOTHING


def test_swap_someone_else_put_on_the_file_is_swapped_off_before_unmount(
    daemon_factory: Callable[..., Daemon],
) -> None:
    # With --no-swap the file is the user's to use; if they swapon a loop device over it and
    # then stop zcached, unmounting under that swap would lose its pages, so the daemon
    # swapoffs it first and names the loop device that will see I/O errors.  Priority 0 keeps
    # other swap users' pages off this device.
    d = daemon_factory("16M", "--no-swap").start()
    with loop_device(d.image) as dev:
        subprocess.run(["mkswap", dev], check=True, capture_output=True)
        subprocess.run(["swapon", "--priority", "0", dev], check=True)
        try:
            assert d.terminate() == 0
            assert dev not in active_swaps()
            log = d.log()
            assert f"{dev} (over {d.image}) is a swap zcached did not set up" in log, log
            assert f"{dev} is still attached to {d.image}" in log, log
        finally:
            if dev in active_swaps():
                subprocess.run(["swapoff", dev], capture_output=True, timeout=HANG)
    assert traces(str(d.root)) == NOTHING
