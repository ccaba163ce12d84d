"""bench/writeback_bench: the writeback tier, at the memory limit, against disk swap and zram.

Owns: ``run(quick) -> dict`` for the bench runner, two measurements:

* At the limit: bench/swap_bench's swap-heavy child (real heap pages, every page verified on
  every pass) with DATA in a LIMIT memory cgroup, swapping through (a) zcached with
  ``mem_limit`` POOL and a backing file on the root disk (/var/tmp), (b) plain disk swap: a swap
  file on the same file system, swapon'd directly, and (c) kernel zram (lz4, no limit: the
  reference every figure here is also quoted against).  Wall time, major faults, and for
  zcached the pool's peak, pages in the backing file, failed writes and direct reclaims.
* Reads of written-back pages: the daemon (no swap) with a small ``mem_limit`` and a backing
  file is filled with corpus pages through its FUSE file, so that most of them are written
  back (the hand writes them back in page order: the first pages go first); fio 4K random
  reads at QD1 through a loop device over the region the file holds, mean and p99, next to the
  same reads of a root-disk file through a loop device (what disk swap reads through).
Must not: assert on speed, run when other swap is active, or leave anything behind (swapoff,
daemon SIGTERM by pid, cgroup rmdir, the swap and backing files removed, in ``finally``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MiB = 1 << 20
DISK_DIR = "/var/tmp"  # on the root disk (tmpfs would be RAM)


def _config(work: str, pool: int, backing: Path, backing_size: int) -> Path:
    conf = Path(work) / "wb.toml"
    conf.write_text(f'mem_limit = {pool}\n[writeback]\npath = "{backing}"\nsize = {backing_size}\n')
    return conf


WB_COUNTERS = {
    "zcached_pool_bytes_max": "pool_bytes_max",
    "zcached_backing_pages": "backed_pages",
    "zcached_writeback_pages_total": "writeback_pages",
    "zcached_writeback_direct_total": "direct_reclaims",
    "zcached_failed_writes_total": "failed_writes",
    "zcached_failed_reads_total": "failed_reads",
    "zcached_backing_read_pages_total": "backing_read_pages",
    "zcached_backing_read_duration_seconds_sum": "backing_read_s",
    "zcached_backing_read_duration_seconds_count": "backing_reads",
}


@contextlib.contextmanager
def zcached_limited(size: int, pool: int) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """bench/swap_bench's daemon as the swap device, with ``mem_limit`` pool and a backing
    file of ``size`` bytes on the root disk."""
    from bench.swap_bench import zcached_swap

    with tempfile.TemporaryDirectory(prefix="zcached-wb-", dir=DISK_DIR) as work:
        conf = _config(work, pool, Path(work) / "backing.img", size)
        with zcached_swap(size, ["--config", str(conf)], WB_COUNTERS) as swap:
            yield swap


@contextlib.contextmanager
def disk_swap(size: int) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    from bench.swap_bench import PRIORITY, swap_used

    with tempfile.TemporaryDirectory(prefix="zcached-wb-disk-", dir=DISK_DIR) as work:
        path = str(Path(work) / "swapfile")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        subprocess.run(["mkswap", path], check=True, capture_output=True)
        subprocess.run(["swapon", "--discard=pages", "--priority", str(PRIORITY), path], check=True)
        try:

            def mem() -> dict[str, Any]:
                used = swap_used(path)
                return {"swap_used_bytes": used, "orig_data_size": used, "mem_used_total": 0}

            yield path, mem
        finally:
            subprocess.run(["swapoff", path], check=False)


def _at_limit(backend: str, nbytes: int, limit: int, pool: int, corpus: Path) -> dict[str, Any]:
    from bench.swap_bench import (
        _settle,
        _wait_swaps_clear,
        active_swaps,
        foreign_swap_watch,
        memory_cgroup,
        run_child,
        zram_swap,
    )

    _wait_swaps_clear(300)
    size = nbytes + (64 << 20)
    ctx = {
        "zcached": lambda: zcached_limited(size, pool),
        "disk": lambda: disk_swap(size),
        "zram": lambda: zram_swap(size),
    }[backend]()
    with ctx as (dev, mem), memory_cgroup(limit) as cg:
        others = [s for s in active_swaps() if os.path.realpath(s) != os.path.realpath(dev)]
        if others:
            return {"skipped": f"other swap active: {', '.join(others)}"}
        with foreign_swap_watch(dev) as seen:
            res = run_child(cg, corpus, nbytes, 1, mem)
        res["after"], _ = _settle(mem)
        res["other_swap_seen"] = sorted(seen)
    return res


def _read_latency(corpus: bytes, pool: int, runtime: float) -> dict[str, Any]:
    """QD1 4K reads of pages in the backing file, through a loop device over the FUSE file."""
    from bench.io_bench import _detach, _losetup, fill_direct
    from bench.latency_bench import fio_qd1
    from bench.swap_bench import Daemon

    with tempfile.TemporaryDirectory(prefix="zcached-wb-lat-", dir=DISK_DIR) as work:
        conf = _config(work, pool, Path(work) / "backing.img", len(corpus))
        os.mkdir(Path(work) / "d")
        d = Daemon(len(corpus), str(Path(work) / "d"), swap=False, extra=["--config", str(conf)])
        d.start()
        try:
            fill_direct(d.device, corpus)
            time.sleep(1.0)  # the background writeback brings the pool under its watermark
            backed = int(d.status().get("backed_bytes") or 0)
            pages = int(d.counters(WB_COUNTERS)["backed_pages"])
            region = max(1, int(pages * 0.8)) * 4096  # the first pages: written back first
            loop = _losetup(d.device)
            try:
                m0 = d.counters(WB_COUNTERS)
                r = fio_qd1(loop, region, runtime)
                m1 = d.counters(WB_COUNTERS)
            finally:
                _detach(loop)
            served = m1["backing_read_pages"] - m0["backing_read_pages"]
            r["share_from_backing_file"] = round(served / max(1, r["reads"]), 3)
            r["backed_pages"] = pages
            r["backed_bytes"] = backed
            return r
        finally:
            d.stop()


def run(quick: bool) -> dict[str, Any]:
    from bench.corpus import RESULTS, heap_pages
    from bench.latency_bench import _disk, _zram

    nbytes, limit, pool = (128 * MiB, 48 * MiB, 12 * MiB) if quick else (600 * MiB, 200 * MiB,
                                                                          60 * MiB)  # fmt: skip
    cbytes = (32 << 20) if quick else (256 << 20)
    heap_pages(cbytes)
    corpus = RESULTS / f"corpus-{cbytes}.bin"
    out: dict[str, Any] = {"data_MiB": nbytes >> 20, "limit_MiB": limit >> 20,
                           "mem_limit_MiB": pool >> 20}  # fmt: skip
    for backend in ("zram", "zcached", "disk"):
        out[backend] = _at_limit(backend, nbytes, limit, pool, corpus)
        print(f"writeback at the limit: {backend}: {out[backend].get('wall_s')} s",
              file=sys.stderr)  # fmt: skip
    z, dk, k = out["zcached"], out["disk"], out["zram"]
    if all("wall_s" in x for x in (z, dk, k)):
        out["ratio"] = {
            "zcached_to_disk_wall": round(z["wall_s"] / dk["wall_s"], 3),
            "zcached_to_zram_wall": round(z["wall_s"] / k["wall_s"], 3),
            "disk_to_zram_wall": round(dk["wall_s"] / k["wall_s"], 3),
        }
    lat_bytes = (32 if quick else 128) * MiB
    lat_corpus = heap_pages(lat_bytes)
    runtime = 3 if quick else 10
    out["read_latency"] = {
        "zcached_backed": _read_latency(lat_corpus, (4 if quick else 8) * MiB, runtime),
        "disk_loop": _disk(lat_corpus, runtime),
        "zram_lz4": _zram(lat_corpus, runtime),
    }
    return out


def summary(res: dict[str, Any]) -> str:
    parts = []
    for b in ("zcached", "disk", "zram"):
        r = res.get(b, {})
        parts.append(f"{b} {r.get('wall_s', r.get('skipped'))} s")
    lat = res.get("read_latency", {})
    zb, dl = lat.get("zcached_backed", {}), lat.get("disk_loop", {})
    return (
        f"writeback at the limit ({res['data_MiB']} MiB in {res['limit_MiB']} MiB, mem_limit "
        f"{res['mem_limit_MiB']} MiB): {', '.join(parts)}; QD1 reads of written-back pages "
        f"{zb.get('mean_us')} us (p99 {zb.get('p99_us')}), disk {dl.get('mean_us')} us "
        f"(p99 {dl.get('p99_us')})"
    )


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=1))
