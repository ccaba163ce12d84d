"""Recompression of idle pages in the C core (csrc/store.c: PAGE AGE, S5) and its policy thread.

Every test reads back every page it wrote, byte for byte, after pages went to the cold format
(zstd with a dictionary byte) and back.  The race tests run writers, discards, the compactor
and the recompressor on the same pages at once, with the recompressor's clock ticking so
fast that every page is idle after one tick: whatever the interleaving, a page reads as its
last version written, and the allocator's invariants and the per-format counters hold.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest
from conftest import Daemon
from test_core_model import CORPUS, parse_version, payload, run_threads, version_page

from zcached.core import CoreStore
from zcached.recompressor import IDLE_TICKS, Recompressor, RecompressPolicy

PS = 4096
MiB = 1 << 20


def text_page(i: int) -> bytes:
    """A compressible page (a slice of the test corpus), different for every i."""
    start = random.Random(i).randrange(len(CORPUS) - PS)
    return CORPUS[start : start + PS]


def fill(store: CoreStore, pages: dict[int, bytes]) -> None:
    for p, data in pages.items():
        store.write(p * PS, data)


def assert_all_read_back(store: CoreStore, pages: dict[int, bytes]) -> None:
    bad = [p for p, data in pages.items() if store.read(p * PS, PS) != data]
    assert bad == [], f"{len(bad)} pages differ, first {bad[:5]}"


def full_pass(store: CoreStore, idle: int = 1, level: int = 3) -> dict[str, int]:
    nxt, report = store.recompress(0, 0, idle, level)
    assert nxt == store.npages
    return report


def raw(store: CoreStore) -> dict[str, int]:
    return store.raw_stats()


def age(store: CoreStore, ticks: int) -> None:
    for _ in range(ticks):
        store.tick()


def test_idle_pages_go_cold_and_read_back_exactly() -> None:
    with closing(CoreStore(16 * MiB)) as s:
        pages = {p: text_page(p) for p in range(1000)}
        fill(s, pages)
        before = raw(s)
        assert full_pass(s)["candidates"] == 0  # just written: not idle
        age(s, 1)
        r = full_pass(s)
        assert r["candidates"] == 1000 and r["recompressed"] == 1000, r
        assert r["bytes_after"] < 0.9 * r["bytes_before"], r  # this corpus: ~0.84x
        after = raw(s)
        assert after["cold_pages"] == 1000 and after["cold_bytes"] == r["bytes_after"]
        assert after["recompressed"] == 1000
        assert after["recompress_saved_bytes"] == r["bytes_before"] - r["bytes_after"]
        assert after["compr_data_size"] == before["compr_data_size"] - (
            r["bytes_before"] - r["bytes_after"]
        )
        assert after["mem_used_total"] < before["mem_used_total"]
        assert_all_read_back(s, pages)
        assert s.core.check() == 0 and s.scrub() == []
        assert full_pass(s)["candidates"] == 0  # cold pages are never recompressed again


def test_only_pages_untouched_for_idle_ticks_are_taken() -> None:
    with closing(CoreStore(4 * MiB)) as s:
        pages = {p: text_page(p) for p in range(64)}
        fill(s, pages)
        age(s, 3)
        s.read(0, 8 * PS)  # pages 0..7 read: young again
        assert full_pass(s, idle=4)["candidates"] == 0
        age(s, 1)
        r = full_pass(s, idle=4)
        assert r["recompressed"] == 56, r  # 8..63: four ticks untouched
        age(s, 3)
        assert full_pass(s, idle=4)["recompressed"] == 8
        assert_all_read_back(s, pages)


def test_ages_count_ticks_modulo_128() -> None:
    """Ages are 7 bits: a page 130 ticks untouched looks 2 ticks old (taken a little later,
    never wrongly); one 64 ticks untouched is idle for the longest idle_ticks."""
    with closing(CoreStore(1 * MiB)) as s:
        s.write(0, text_page(0))
        s.write(PS, text_page(1))
        age(s, 64)
        assert s.recompress(1, 1, 64, 1)[1]["recompressed"] == 1  # page 1 only
        age(s, 66)  # page 0: 130 ticks
        assert s.recompress(0, 1, 4, 1)[1]["candidates"] == 0
        age(s, 2)
        assert s.recompress(0, 1, 4, 1)[1]["recompressed"] == 1
        assert s.read(0, 2 * PS) == text_page(0) + text_page(1)


def test_rewrite_and_discard_of_cold_pages() -> None:
    with closing(CoreStore(4 * MiB)) as s:
        pages = {p: text_page(p) for p in range(32)}
        fill(s, pages)
        age(s, 1)
        full_pass(s)
        cold = raw(s)
        sizes = cold["cold_bytes"]
        pages[3] = text_page(1003)
        s.write(3 * PS, pages[3])  # back to lz4
        s.write(5 * PS + 100, b"x" * 50)  # an unaligned write: read-modify-write of a cold page
        pages[5] = pages[5][:100] + b"x" * 50 + pages[5][150:]
        s.discard(7 * PS, PS)
        pages[7] = bytes(PS)
        now = raw(s)
        assert now["cold_pages"] == 29 and now["cold_bytes"] < sizes
        assert_all_read_back(s, pages)
        age(s, 1)
        assert full_pass(s)["recompressed"] == 2  # pages 3 and 5, idle again; 7 is empty
        assert raw(s)["cold_pages"] == 31
        assert_all_read_back(s, pages)
        s.discard(0, 32 * PS)
        assert raw(s)["cold_pages"] == 0 and raw(s)["cold_bytes"] == 0
        assert raw(s)["compr_data_size"] == 0


def test_incompressible_pages_are_kept_and_not_tried_again_until_touched() -> None:
    with closing(CoreStore(1 * MiB)) as s:
        pages = {p: os.urandom(PS) for p in range(16)}
        fill(s, pages)
        age(s, 1)
        r = full_pass(s)
        assert r["candidates"] == 16 and r["kept"] == 16 and r["recompressed"] == 0, r
        age(s, 1)
        assert full_pass(s)["candidates"] == 0  # tried: left alone
        s.read(0, PS)
        age(s, 1)
        assert full_pass(s)["candidates"] == 1  # touched: tried again
        assert raw(s)["huge_pages"] == 16 and raw(s)["cold_pages"] == 0
        assert_all_read_back(s, pages)


def test_huge_page_that_zstd_can_shrink_goes_cold() -> None:
    """Half random, half a repeated text: lz4 at the store's threshold keeps it raw only with
    a low threshold; zstd gets it under a page."""
    with closing(CoreStore(1 * MiB, huge_threshold=1024)) as s:
        page = os.urandom(1536) + text_page(1)[: PS - 1536]
        s.write(0, page)
        assert raw(s)["huge_pages"] == 1
        age(s, 1)
        assert full_pass(s)["recompressed"] == 1
        assert raw(s)["huge_pages"] == 0 and raw(s)["cold_pages"] == 1
        assert s.read(0, PS) == page


def test_cold_pages_survive_an_attach_and_their_counts_are_rebuilt() -> None:
    s = CoreStore(8 * MiB)
    pages = {p: text_page(p) for p in range(300)}
    fill(s, pages)
    age(s, 1)
    full_pass(s)
    want = {k: raw(s)[k] for k in ("cold_pages", "cold_bytes", "recompressed")}
    fd = os.dup(s.memfd())
    s.close()
    try:
        t = CoreStore.attach(fd)
        try:
            got = raw(t)
            assert {k: got[k] for k in want} == want
            assert_all_read_back(t, pages)
            assert t.core.check() == 0
        finally:
            t.close()
    finally:
        os.close(fd)


def test_bad_arguments_are_value_errors() -> None:
    with closing(CoreStore(1 * MiB)) as s:
        for idle, level in ((0, 3), (65, 3), (1, 99), (1, -(1 << 20))):
            with pytest.raises(ValueError):
                s.recompress(0, 0, idle, level)


def test_corrupt_page_is_not_recompressed_and_stays_an_error() -> None:
    with closing(CoreStore(1 * MiB)) as s:
        fill(s, {0: text_page(0), 1: text_page(1)})
        s.corrupt(0)
        age(s, 1)
        r = full_pass(s)
        assert r["failed"] == 1 and r["recompressed"] == 1, r
        with pytest.raises(OSError):
            s.read(0, PS)
        assert s.read(PS, PS) == text_page(1)


# ---- dictionaries ---------------------------------------------------------------------------


def sampled_store(pages: dict[int, bytes], size: int = 16 * MiB) -> CoreStore:
    s = CoreStore(size)
    s.sample(len(pages), 1)
    fill(s, pages)
    return s


def test_a_trained_dictionary_makes_cold_pages_smaller_and_they_read_back() -> None:
    pages = {p: text_page(p) for p in range(2048)}
    plain, s = CoreStore(16 * MiB), sampled_store(pages)
    try:
        fill(plain, pages)
        n = raw(s)["samples"]  # one in 8 of the pages stored compressed (a few are huge)
        assert 2048 // 10 < n <= 2048 // 8, n
        did = s.train_dictionary(16 << 10, 3)
        assert did is not None and did > 0
        st = raw(s)
        assert st["dicts"] == 1 and st["dict_current"] == did and 0 < st["dict_bytes"] <= 16 << 10
        assert st["samples"] == 0 and st["sample_memory"] == 0  # the reservoir is gone
        age(s, 1)
        age(plain, 1)
        with_dict, without = full_pass(s), full_pass(plain)
        assert with_dict["dict"] == did and without["dict"] == 0
        print(f"cold bytes: {with_dict['bytes_after']} with a dictionary, "
              f"{without['bytes_after']} without, {with_dict['bytes_before']} lz4")  # fmt: skip
        assert with_dict["bytes_after"] < 0.97 * without["bytes_after"]
        assert_all_read_back(s, pages)
        assert s.scrub() == [] and s.core.check() == 0
    finally:
        s.close()
        plain.close()


def test_too_few_samples_is_none_and_the_reservoir_fills_on() -> None:
    with closing(CoreStore(4 * MiB)) as s:
        assert s.train_dictionary(4096, 3) is None  # no reservoir
        s.sample(512, 1)
        fill(s, {p: text_page(p) for p in range(80)})  # 10 samples
        assert s.train_dictionary(4096, 3) is None
        assert 0 < raw(s)["samples"] <= 10
        fill(s, {p: text_page(p) for p in range(80, 800)})
        assert s.train_dictionary(4096, 3) == 1


def test_an_old_dictionary_is_freed_when_no_page_uses_it() -> None:
    pages = {p: text_page(p) for p in range(1024)}
    with closing(sampled_store(pages)) as s:
        first = s.train_dictionary(8 << 10, 3)
        age(s, 1)
        full_pass(s)
        s.sample(1024, 1)
        fill(s, {p: text_page(p + 5000) for p in range(1024, 2048)})
        second = s.train_dictionary(8 << 10, 3)
        assert first != second and raw(s)["dicts"] == 2  # the first is still used
        new = {p: text_page(p + 9000) for p in range(1024)}
        fill(s, new)  # every page the first dictionary made is rewritten
        assert raw(s)["dicts"] == 2  # freed by the recompressor's clock, not by a stats read
        s.tick()
        assert raw(s)["dicts"] == 1 and raw(s)["dict_current"] == second
        assert_all_read_back(s, new)


def test_fifteen_dictionaries_in_use_leave_no_slot() -> None:
    with closing(CoreStore(64 * MiB)) as s:
        for i in range(15):
            s.sample(64, 1)
            fill(s, {i * 600 + p: text_page(i * 600 + p) for p in range(600)})
            assert s.train_dictionary(2048, 1) == i + 1
            age(s, 1)
            full_pass(s, level=1)  # its pages use it
        s.sample(64, 1)
        fill(s, {9500 + p: text_page(p) for p in range(600)})
        with pytest.raises(OSError) as e:
            s.train_dictionary(2048, 1)
        assert e.value.errno == errno.ENOSPC
        assert raw(s)["dicts"] == 15


def test_a_dictionary_trained_by_python_zstandard_works_in_the_core() -> None:
    """Dictionaries are plain zstd dictionaries: one trained elsewhere can be given."""
    zstandard = pytest.importorskip("zstandard")
    pages = {p: text_page(p) for p in range(512)}
    with closing(CoreStore(4 * MiB)) as s:
        fill(s, pages)
        d = zstandard.train_dictionary(8192, list(pages.values()))
        did = s.set_dictionary(d.as_bytes(), 3)
        age(s, 1)
        assert full_pass(s)["dict"] == did
        assert_all_read_back(s, pages)


def test_cold_pages_and_dictionaries_survive_an_attach() -> None:
    pages = {p: text_page(p) for p in range(1024)}
    s = sampled_store(pages)
    did = s.train_dictionary(8 << 10, 3)
    age(s, 1)
    full_pass(s)
    fd = os.dup(s.memfd())
    s.close()
    try:
        t = CoreStore.attach(fd)
        try:
            st = raw(t)
            assert st["dicts"] == 1 and st["dict_current"] == did and st["cold_pages"] == 1024
            assert_all_read_back(t, pages)
            s2 = {p: text_page(p + 3000) for p in range(1024, 1100)}
            fill(t, s2)
            age(t, 1)
            assert full_pass(t)["dict"] == did  # recompression goes on with it
            assert_all_read_back(t, s2)
        finally:
            t.close()
    finally:
        os.close(fd)


# ---- races ----------------------------------------------------------------------------------


def test_writers_discards_compaction_and_recompression_race() -> None:
    """Two writers (each its own pages, versions of three shapes), one discarding, the
    compactor and the recompressor (a tick before every pass, idle after one tick) at once.
    A writer reads its page back after each write; the end checks every page."""
    s = CoreStore(32 * MiB, heaps=2)
    npages, writers, rounds = 2048, 2, 12000
    last: list[dict[int, int]] = [{} for _ in range(writers)]
    reports: dict[str, int] = dict.fromkeys(("recompressed", "raced", "kept", "failed"), 0)
    trained: list[int] = []
    passes = 0

    def writer(w: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(w)
            mine = list(range(w, npages, writers))
            for _ in range(rounds):
                p = rng.choice(mine)
                if rng.random() < 0.05:
                    s.discard(p * PS, PS)
                    last[w].pop(p, None)
                    continue
                v = last[w].get(p, 0) + 1
                s.write(p * PS, version_page(w, v, p))
                last[w][p] = v
                q = rng.choice(mine)
                got = s.read(q * PS, PS)
                if q in last[w]:
                    assert parse_version(got) == (w, last[w][q], q), f"page {q}"
                else:
                    assert got == bytes(PS), f"page {q}: discarded but not zeros"

        return run

    def recompress_pass() -> None:
        nonlocal passes
        s.tick()
        cursor = 0
        while cursor < npages:
            cursor, r = s.recompress(cursor, 256, 1, 1)
            for k in reports:
                reports[k] += r[k]
        passes += 1
        if passes % 4 == 0:  # dictionaries come and go under the readers' feet
            if s.train_dictionary(4096, 1) is not None:
                trained.append(passes)
            elif not raw(s)["sample_cap"]:
                s.sample(64, 1)

    def compact_step() -> None:
        s.core.compact(64)
        time.sleep(0.001)

    try:
        # first versions of every page, all idle after the first tick
        for w in range(writers):
            for p in range(w, npages, writers):
                s.write(p * PS, version_page(w, 1, p))
                last[w][p] = 1
        run_threads([writer(w) for w in range(writers)], [recompress_pass, compact_step])
        for w in range(writers):
            for p in range(w, npages, writers):
                got = s.read(p * PS, PS)
                if p in last[w]:
                    assert parse_version(got) == (w, last[w][p], p)
                else:
                    assert got == bytes(PS)
        st = raw(s)
        print(
            f"recompression under the race: {reports}; cold now {st['cold_pages']}; "
            f"{len(trained)} dictionaries trained, {st['dicts']} live"
        )
        assert reports["recompressed"] > 1000 and reports["failed"] == 0, reports
        assert len(trained) >= 2, trained
        assert s.core.check() == 0 and s.scrub() == []
        # the per-format counters, against a full recount through a fresh attach
        fd = os.dup(s.memfd())
        want = {k: st[k] for k in ("cold_pages", "cold_bytes", "pages_stored", "huge_pages")}
        live_dicts = st["dicts"]
        s.close()
        with closing(CoreStore.attach(fd)) as t:
            got = raw(t)
            assert {k: got[k] for k in want} == want
            assert got["dicts"] <= live_dicts  # the attach frees the ones no page uses
            for w in range(writers):
                for p in last[w]:
                    assert parse_version(t.read(p * PS, PS)) == (w, last[w][p], p)
        os.close(fd)
    finally:
        s.close()  # again if closed above: a no-op


def test_a_page_rewritten_while_recompressed_keeps_the_new_data() -> None:
    """One page, rewritten in a tight loop with a new version each time while the recompressor
    works on it in another thread: the recompressor must lose every race it meets (S5)."""
    raced = 0
    last = 0

    with closing(CoreStore(1 * MiB)) as s:

        def rewrite() -> None:
            nonlocal last
            for v in range(1, 20001):
                data = v.to_bytes(4, "little") + payload("graded", 0, PS - 4, v, 0)[: PS - 4]
                s.write(0, data)
                last = v
                if v % 4 == 0:
                    assert s.read(0, PS) == data, v

        def recompress_step() -> None:
            nonlocal raced
            s.tick()
            _n, r = s.recompress(0, 1, 1, 1)
            raced += r["raced"]

        run_threads([rewrite], [recompress_step])
        assert s.read(0, PS)[:4] == last.to_bytes(4, "little")
        print(f"{raced} races lost by the recompressor")
        assert raw(s)["recompressed"] > 0


# ---- the policy thread ----------------------------------------------------------------------


def test_recompressor_thread_recompresses_idle_pages_within_its_budget() -> None:
    with closing(CoreStore(16 * MiB)) as s:
        pages = {p: text_page(p) for p in range(2000)}
        policy = RecompressPolicy(
            idle=1.0, level=3, cpu_budget=0.5, step_pages=512, samples=128, sample_stride=1
        )
        r = Recompressor(s, policy)
        r.start()  # it starts the reservoir: the pages written now are sampled
        time.sleep(0.1)
        fill(s, pages)
        deadline = time.monotonic() + 30
        while raw(s)["cold_pages"] < 2000 and time.monotonic() < deadline:
            time.sleep(0.1)
        r.stop()
        assert raw(s)["cold_pages"] == 2000, (raw(s)["cold_pages"], r.totals)
        assert r.runs >= IDLE_TICKS - 1 and r.totals["recompressed"] == 2000
        assert r.trainings == 1 and raw(s)["dicts"] == 1, (r.trainings, raw(s))
        # paced: CPU of the passes at most the budget of their wall time (plus a step's slack)
        assert r.cpu_seconds <= policy.cpu_budget * r.seconds + 0.2, (r.cpu_seconds, r.seconds)
        assert_all_read_back(s, pages)


# ---- the daemon -----------------------------------------------------------------------------


def test_daemon_recompresses_idle_pages_of_its_device(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """`zcached run` with [recompress] idle = "2s": pages written through FUSE go cold, read
    back exactly through FUSE, and the metrics and the status document say so."""
    conf = tmp_path / "zcached.toml"
    conf.write_text('[recompress]\nidle = "2s"\ncpu_budget = 1.0\nlevel = 3\n')
    d = daemon_factory("64M", "--no-swap", "--config", str(conf)).start()
    n = 2048
    pages = {p: text_page(p) for p in range(n)}
    buf = mmap.mmap(-1, PS)
    fd = os.open(d.image, os.O_RDWR | os.O_DIRECT)
    try:
        for p, data in pages.items():
            buf[:] = data
            os.pwrite(fd, buf, p * PS)
        deadline = time.monotonic() + 60
        while d.metrics().get("zcached_recompressed_pages_total", 0) < n:
            assert time.monotonic() < deadline, d.metrics()
            time.sleep(0.25)
        m = d.metrics()
        doc = d.status()
        assert doc["recompressed_pages"] == n, doc
        assert m["zcached_recompress_runs_total"] >= 1
        assert m["zcached_recompress_saved_bytes_total"] > 0
        bad = []
        for p, data in pages.items():
            os.preadv(fd, [buf], p * PS)
            if bytes(buf) != data:
                bad.append(p)
        assert bad == []
        assert d.metrics()["zcached_failed_reads_total"] == 0
    finally:
        os.close(fd)
    assert d.terminate() == 0, d.log()
