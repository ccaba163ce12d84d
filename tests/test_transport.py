"""The two FUSE transports of the real daemon: /dev/fuse and FUSE over io_uring.

Real parts: the daemon on a real FUSE mount, a real loop device over its file, fio's verify
jobs, and SIGKILLs of the server (by the pid the status document names).  The io_uring tests
need a kernel with FUSE over io_uring (fuse.enable_uring, Linux 6.14+) and skip elsewhere; the
real-swap test over both transports is test_daemon.py's test_real_swap_pages_go_out_and_come_back.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from conftest import HANG, Daemon, loop_device, traces
from test_daemon import NOTHING, TRANSPORTS
from test_keeper import Readers, server_pid, wait_new_server, write_first_versions

from zcached import transport
from zcached.transport import unavailable

needs_uring = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


def param() -> str | None:
    return transport.PARAM.read_text().strip() if transport.PARAM.exists() else None


@pytest.mark.parametrize("how", TRANSPORTS)
def test_fio_verify_through_a_loop_device(daemon_factory: Callable[..., Daemon], how: str) -> None:
    """fio's crc32c verify at depth 32 (4K..1M) through a loop device over the daemon's file:
    every block reads back; over io_uring the requests come over the rings (one queue per
    CPU) and fuse.enable_uring is as it was before the start; "auto" is /dev/fuse, logged."""
    before = param()
    d = daemon_factory("256M", "--no-swap", "--io-transport", how).start()
    assert param() == before  # put back once INIT was answered
    with loop_device(str(d.image)) as dev:
        r = subprocess.run(
            ["fio", "--name=verify", f"--filename={dev}", "--rw=randwrite", "--bs=4k",
             "--bsrange=4k-1M", "--iodepth=32", "--ioengine=libaio", "--direct=1",
             "--numjobs=2", "--offset_increment=64M", "--size=48M", "--verify=crc32c",
             "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--refill_buffers=1",
             "--buffer_compress_percentage=60", "--buffer_compress_chunk=4096", "--minimal"],
            capture_output=True, text=True, timeout=HANG,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = d.metrics()
    assert m["zcached_failed_reads_total"] == 0 and m["zcached_failed_writes_total"] == 0
    assert m["zcached_checksum_errors_total"] == 0
    rw = m["zcached_reads_total"] + m["zcached_writes_total"]
    if how == "uring":
        assert "transport: FUSE over io_uring" in d.log()
        assert m["zcached_fuse_uring_queues"] == os.cpu_count(), m  # one per (possible) CPU
        assert m["zcached_fuse_uring_requests_total"] >= rw / 256, m  # pages, not requests
        assert m["zcached_fuse_uring_errors_total"] == 0
    else:
        assert "transport: /dev/fuse" in d.log()
        assert m["zcached_fuse_uring_queues"] == 0 and m["zcached_fuse_uring_requests_total"] == 0
    assert d.terminate() == 0, d.log()
    assert traces(str(d.root)) == NOTHING


@needs_uring
def test_uring_takeover_answers_what_the_dead_server_held(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """Over io_uring, a SIGKILLed server's ring entries stay with the kernel; the next server
    finds the requests it held in the keeper's ring area and answers them (adopted), kills
    until one was.  Every read that returns has the right data.  What this kernel (6.14..
    6.18) does not let us keep: a request it hands to the dying server's entry fails with
    ECANCELED (IO_URING_F_TASK_DEAD); those are counted here, and they are why "auto" is
    /dev/fuse (docs/fuse-layer.md)."""
    d = daemon_factory("64M", "--no-swap", "--io-transport", "uring").start()
    pages = 1024
    write_first_versions(d.image, pages)
    kills = cancelled = 0
    while kills < 30 and d.metrics()["zcached_fuse_uring_adopted_total"] == 0:
        with Readers(d.image, pages) as r:
            pid = server_pid(d)
            deadline = time.monotonic() + HANG
            while r.reads < 200 and not r.errors:  # the readers are going
                assert time.monotonic() < deadline, "the readers made no progress"
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            kills += 1
            wait_new_server(d, pid)
            time.sleep(0.3)
        wrong = [e for e in r.errors if f"[Errno {errno.ECANCELED}]" not in e]
        assert not wrong, wrong  # never wrong data, never another error
        cancelled += len(r.errors)
    m = d.metrics()
    print(f"{kills} kills, {m['zcached_fuse_uring_adopted_total']:.0f} requests adopted,"
          f" {cancelled} reader(s) saw ECANCELED")  # fmt: skip
    assert m["zcached_fuse_uring_adopted_total"] > 0, (kills, d.log())
    assert m["zcached_fuse_uring_queues"] >= 1
    assert m["zcached_failed_reads_total"] == 0  # the store itself never failed a read
    assert d.terminate() == 0, d.log()
    assert traces(str(d.root)) == NOTHING
