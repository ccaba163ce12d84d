"""The writeback tier (csrc/store.c WRITEBACK, csrc/backing.c, zcached/writeback.py).

In-process: a C store with a small mem_limit and a real backing file on this machine's disk
(tmp_path is ext4 here; O_DIRECT for real): writes past the limit never fail, every page reads
back, rewrites and discards free the file's segments for reuse, a full file fails writes as
before, a corrupted written-back page is an I/O error, an attach finds the pages in the file
again (and refuses another file), and a Hypothesis run interleaves writes, discards,
writeback, compaction and recompression against a dict of what each page must read.
End to end: the real daemon with a backing file, swapping a memory-limited workload through
a pool limited far below what it swaps, with the server killed while pages are in the file;
and start-up errors for a backing file that cannot be (missing directory, read-only mount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from conftest import HANG, Daemon, active_swaps, run_cli, traces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import assert_refused
from test_daemon import (
    NOTHING,
    assert_unlimited_memcg,
    expect_line,
    memory_cgroup,
    verify_all,
    workload,
)
from test_keeper import server_pid, wait_new_server

from zcached.core import CoreStore, StoreError
from zcached.writeback import MIN_SIZE, SEGMENT, BackingError, Writeback, WritebackPolicy
from zcached.writeback import open_backing as open_backing_file

MiB = 1 << 20
PAGE = 4096


def page_of(i: int, salt: int = 0) -> bytes:
    """About half random: ~2.1 KiB of lz4 object, so a few MiB of pool hold ~1000 pages."""
    rnd = random.Random(i * 7919 + salt).randbytes(2048)
    return rnd + (b"%08d" % i) * 256


@contextlib.contextmanager
def backing(tmp_path: Path, size: int = 32 * MiB) -> Iterator[int]:
    fd, _ = open_backing_file(str(tmp_path / "backing.img"), size)
    try:
        yield fd
    finally:
        os.close(fd)


def limited_store(tmp_path: Path, fd: int, size: int = 32 * MiB, limit: int = 2 * MiB) -> CoreStore:
    s = CoreStore(64 * MiB, mem_limit=limit)
    s.set_backing(fd, size)
    return s


def fill(s: CoreStore, pages: dict[int, bytes]) -> None:
    for p, data in pages.items():
        s.write(p * PAGE, data)


def assert_reads(s: CoreStore, pages: dict[int, bytes]) -> None:
    bad = [p for p, data in pages.items() if s.read(p * PAGE, PAGE) != data]
    assert not bad, f"{len(bad)} pages differ, first {bad[:5]}"


def test_writes_past_the_limit_go_to_the_file_and_read_back(tmp_path: Path) -> None:
    with backing(tmp_path) as fd, closing(limited_store(tmp_path, fd)) as s:
        pages = {p: page_of(p) for p in range(3000)}  # ~6 MiB of objects, 3x the limit
        fill(s, pages)
        st = s.raw_stats()
        assert st["failed_writes"] == 0
        assert st["mem_used_max"] <= 2 * MiB
        assert st["backed_pages"] > 1500 and st["writeback_direct"] > 0
        assert st["pages_stored"] == 3000
        assert_reads(s, pages)
        st = s.raw_stats()
        assert st["backing_read_pages"] >= st["backed_pages"]
        assert sum(s.backing_read_hist()) == st["backing_reads"] > 0
        assert s.core.check() == 0 and s.scrub() == []
        # A multi-page read of pages written back together is one read of the file.
        first = next(p for p in range(3000) if _is_backed_run(s, p))
        r0 = s.raw_stats()["backing_reads"]
        assert s.read(first * PAGE, 8 * PAGE) == b"".join(pages[first + i] for i in range(8))
        assert s.raw_stats()["backing_reads"] - r0 <= 2


def _is_backed_run(s: CoreStore, p: int) -> bool:
    """Whether pages p..p+7 were written back (read one: the counters say where it came from)."""
    for i in range(8):
        r0 = s.raw_stats()["backing_read_pages"]
        s.read((p + i) * PAGE, PAGE)
        if s.raw_stats()["backing_read_pages"] == r0:
            return False
    return True


def test_rewrites_and_discards_free_the_file_for_reuse(tmp_path: Path) -> None:
    size = MIN_SIZE + 6 * SEGMENT
    with backing(tmp_path, size) as fd, closing(limited_store(tmp_path, fd, size)) as s:
        pages = {p: page_of(p) for p in range(1400)}
        for rnd in range(6):  # 6 x 2.9 MiB of objects, a 2 MiB pool, 2 MiB of file
            pages = {p: page_of(p, rnd) for p in pages}
            fill(s, pages)
            assert s.raw_stats()["failed_writes"] == 0, rnd
        assert_reads(s, pages)
        s.discard(0, 1400 * PAGE)
        st = s.raw_stats()
        assert st["backed_pages"] == st["backed_bytes"] == st["backing_used_bytes"] == 0
        assert st["writeback_bytes"] > 2 * st["backing_bytes"]  # segments reused


def test_a_full_backing_file_fails_writes_as_before_and_keeps_what_it_has(tmp_path: Path) -> None:
    with backing(tmp_path, MIN_SIZE) as fd, closing(limited_store(tmp_path, fd, MIN_SIZE)) as s:
        pages: dict[int, bytes] = {}
        failed = None
        for p in range(4000):
            try:
                s.write(p * PAGE, page_of(p))
            except StoreError as e:
                failed = e
                break
            pages[p] = page_of(p)
        assert failed is not None and failed.errno == errno.ENOSPC
        st = s.raw_stats()
        assert st["writeback_full"] > 0 and st["failed_writes"] == 1
        # One segment is kept to compact the file into (csrc/store.c WRITEBACK 4).
        assert st["backing_used_bytes"] == st["backing_bytes"] - SEGMENT == SEGMENT
        assert_reads(s, pages)
        s.discard(0, 500 * PAGE)  # room again: writes succeed
        for p in range(500):
            pages[p] = page_of(p, 1)
            s.write(p * PAGE, pages[p])
        assert_reads(s, pages)


def test_a_fragmented_file_is_compacted_instead_of_failing_writes(tmp_path: Path) -> None:
    size = MIN_SIZE + 4 * SEGMENT  # 6 segments: 5 for pages, 1 kept to compact into
    with backing(tmp_path, size) as fd, closing(limited_store(tmp_path, fd, size)) as s:
        pages: dict[int, bytes] = {}
        p = 0
        while s.raw_stats()["backing_used_bytes"] < 5 * SEGMENT:  # the file is full
            pages[p] = page_of(p)
            s.write(p * PAGE, pages[p])
            p += 1
        for i, q in enumerate(list(pages)):  # every segment a third full, none free
            if i % 3 == 0:
                continue
            s.discard(q * PAGE, PAGE)
            del pages[q]
        assert s.raw_stats()["backing_used_bytes"] == 5 * SEGMENT
        for q in range(p, p + p // 2):  # more than the discards left room for in the pool
            pages[q] = page_of(q)
            s.write(q * PAGE, pages[q])
        st = s.raw_stats()
        assert st["failed_writes"] == 0 and st["writeback_relocated"] > 0
        assert_reads(s, pages)
        assert s.core.check() == 0 and s.scrub() == []


def test_a_corrupted_page_in_the_file_is_an_io_error(tmp_path: Path) -> None:
    with backing(tmp_path) as fd, closing(limited_store(tmp_path, fd)) as s:
        pages = {p: page_of(p) for p in range(2000)}
        fill(s, pages)
        victim = next(p for p in pages if _is_backed_run(s, p))
        s.corrupt(victim)
        with pytest.raises(StoreError) as e:
            s.read(victim * PAGE, PAGE)
        assert e.value.errno == errno.EIO
        assert s.raw_stats()["checksum_errors"] == 1
        assert s.scrub() == [victim]
        assert_reads(s, {p: d for p, d in pages.items() if p != victim})


def test_an_attach_finds_the_pages_in_the_file_and_refuses_another(tmp_path: Path) -> None:
    with backing(tmp_path) as fd:
        s = limited_store(tmp_path, fd)
        pages = {p: page_of(p) for p in range(2500)}
        fill(s, pages)
        want = {k: s.raw_stats()[k] for k in ("backed_pages", "backed_bytes", "pages_stored")}
        used = s.raw_stats()["backing_used_bytes"]
        memfd = os.dup(s.memfd())
        s.close()
        try:
            with closing(CoreStore.attach(memfd)) as t:
                assert {k: t.raw_stats()[k] for k in want} == want
                other, _ = open_backing_file(str(tmp_path / "other.img"), 32 * MiB)
                try:
                    with pytest.raises(StoreError) as e:
                        t.set_backing(other, 32 * MiB)
                    assert e.value.errno == errno.EPROTO
                finally:
                    os.close(other)
                errs = []  # before it has its file, a page in it is an error, never zeros
                for p in range(2500):
                    try:
                        t.read(p * PAGE, PAGE)
                    except StoreError as err:
                        errs.append(err.errno)
                assert len(errs) == want["backed_pages"] and set(errs) == {errno.EIO}
                t.set_backing(fd, 32 * MiB)
                assert t.raw_stats()["backing_used_bytes"] == used  # B2, recounted
                assert_reads(t, pages)
                more = {p: page_of(p, 2) for p in range(2500, 4000)}
                fill(t, more)
                assert_reads(t, pages | more)
                assert t.core.check() == 0
        finally:
            os.close(memfd)


def test_the_background_thread_keeps_the_pool_under_the_watermark(tmp_path: Path) -> None:
    with backing(tmp_path) as fd, closing(limited_store(tmp_path, fd, limit=4 * MiB)) as s:
        pages = {p: page_of(p) for p in range(1800)}  # ~3.7 MiB: over 0.5 x the limit
        fill(s, pages)
        assert s.raw_stats()["writeback_direct"] == 0
        policy = WritebackPolicy(4 * MiB, high_watermark=0.5, rate=256 << 20)
        wb = Writeback(s, policy, compact=s.allocator.compact)
        assert wb.run_round() > 0
        st = s.raw_stats()
        assert st["mem_used_total"] <= policy.low_bytes and wb.pages == st["backed_pages"]
        assert wb.run_round() == 0  # below the watermark: nothing to do
        assert_reads(s, pages)


def test_open_backing_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    with pytest.raises(BackingError, match="No such file"):
        open_backing_file(str(tmp_path / "missing" / "bk.img"), 8 * MiB)
    with pytest.raises(BackingError, match=r"needs writeback\.size"):
        open_backing_file(str(tmp_path / "bk.img"), 0)
    with pytest.raises(BackingError, match="less than"):
        open_backing_file(str(tmp_path / "small.img"), 64 << 10)
    with pytest.raises(BackingError, match="not a regular file"):
        open_backing_file(str(tmp_path), 8 * MiB)
    fd, size = open_backing_file(str(tmp_path / "ok.img"), 8 * MiB)
    os.close(fd)
    assert size == 8 * MiB and os.stat(tmp_path / "ok.img").st_mode & 0o777 == 0o600


# ---- writeback is invisible: a run of operations against what each page must read ----------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 1499), st.integers(1, 16), st.integers(0, 3)),
        st.tuples(st.just("discard"), st.integers(0, 1499), st.integers(1, 64), st.just(0)),
        st.tuples(st.just("writeback"), st.integers(0, 2), st.just(0), st.just(0)),
        st.tuples(st.just("compact"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("recompress"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("read"), st.integers(0, 1499), st.integers(1, 32), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS)
def test_writeback_is_invisible_to_reads(
    tmp_path: Path, ops: list[tuple[str, int, int, int]]
) -> None:
    with backing(tmp_path, 16 * MiB) as fd, closing(limited_store(tmp_path, fd, 16 * MiB)) as s:
        want: dict[int, bytes] = {}
        for op, a, n, salt in ops:
            n = min(n, 1500 - a) if op != "writeback" else n
            if op == "write":
                data = b"".join(page_of(a + i, salt) for i in range(n))
                s.write(a * PAGE, data)
                want.update({a + i: data[i * PAGE : (i + 1) * PAGE] for i in range(n)})
            elif op == "discard":
                s.discard(a * PAGE, n * PAGE)
                for i in range(n):
                    want.pop(a + i, None)
            elif op == "writeback":
                with contextlib.suppress(StoreError, OSError):
                    s.writeback(SEGMENT, a)
            elif op == "compact":
                s.allocator.compact()
            elif op == "recompress":
                s.tick()
                s.recompress(0, 0, 1, 1)
            else:
                got = s.read(a * PAGE, n * PAGE)
                exp = b"".join(want.get(a + i, bytes(PAGE)) for i in range(n))
                assert got == exp
        assert_reads(s, {p: want.get(p, bytes(PAGE)) for p in range(1500)})
        st_ = s.raw_stats()
        assert st_["failed_writes"] == 0 and st_["checksum_errors"] == 0
        assert s.core.check() == 0


# ---- the daemon ------------------------------------------------------------------------------

WB_LIMIT = 4 * MiB  # the pool's mem_limit: far below what the workload swaps out


def wb_config(tmp: Path, path: Path, size: str = "256M") -> Path:
    cfg = tmp / "wb.toml"
    cfg.write_text(
        f'mem_limit = "{WB_LIMIT >> 20}M"\n'
        f'[writeback]\npath = "{path}"\nsize = "{size}"\nhigh_watermark = 0.8\n'
        '[recompress]\nidle = "2s"\n'
    )
    return cfg


def test_real_swap_at_the_memory_limit_spills_and_survives_a_server_kill(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    if active_swaps():
        pytest.skip(f"another swap is active ({', '.join(active_swaps())}); pages would go there")
    bk = tmp_path / "backing.img"
    d = daemon_factory("512M", "--swap", "--config", str(wb_config(tmp_path, bk))).start()
    assert_unlimited_memcg(d.pid)
    dev = d.status()["loop_device"]
    with memory_cgroup("zcached-wb", 64 * MiB) as cg, workload(cg) as w:
        expect_line(w, "allocated")
        m = d.metrics()
        assert m["zcached_backing_pages"] > 0, m
        old = server_pid(d)
        os.kill(old, 9)  # pages in the file now; the next server finds them
        wait_new_server(d, old)
        verify_all(w)
    m = d.metrics()
    assert m["zcached_failed_writes_total"] == 0 and m["zcached_failed_reads_total"] == 0
    assert m["zcached_pool_bytes_max"] <= WB_LIMIT
    assert m["zcached_backing_read_pages_total"] > 0
    assert m["zcached_writeback_pages_total"] >= m["zcached_backing_pages"]
    assert m["zcached_checksum_errors_total"] == 0
    assert d.terminate() == 0
    assert traces(str(d.root)) == NOTHING and dev not in active_swaps()


def test_a_backing_file_in_a_missing_directory_is_a_start_up_error(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = wb_config(tmp_path, tmp_path / "no" / "such" / "dir" / "bk.img")
    p = run_cli("run", "--no-swap", "--size", "16M", "--mountpoint", str(mnt), "--config", str(cfg))
    assert "writeback.path" in assert_refused(p, only_line=False), p.stderr
    assert traces(str(tmp_path)) == NOTHING


def test_a_backing_file_on_a_read_only_mount_is_a_start_up_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        cfg = wb_config(tmp_path, ro / "bk.img")
        p = run_cli(
            "run", "--no-swap", "--size", "16M", "--mountpoint", str(mnt), "--config", str(cfg)
        )
        assert "Read-only" in assert_refused(p, only_line=False), p.stderr
        assert [m for m in traces(str(tmp_path))["mounts"] if m != str(ro)] == []
    finally:
        deadline = time.monotonic() + HANG
        while subprocess.run(["umount", str(ro)]).returncode and time.monotonic() < deadline:
            time.sleep(0.1)
