"""Recompression benchmark: a real daemon's memory for idle pages, next to kernel zram (lz4).

``run(quick)`` (called by ``python -m bench``): 256 MiB (quick: 32 MiB) of real heap pages
(bench.corpus) are written with O_DIRECT through the FUSE file of a ``zcached run --no-swap``
whose config sets ``[recompress] idle = "4s"`` (the other keys at their defaults: level 3, a
dictionary, cpu_budget 0.1), and into /dev/zram0 (lz4, under bench/zram.py's lock).

* ``memory``: the daemon's memory growth (the Pss of keeper and server, /proc/PID/smaps_rollup:
  pool, page table, dictionaries, zstd contexts, the sample reservoir while it exists, all of
  it) once the pages are written (lz4) and once they have been idle and recompressed and the
  compactor has settled, over zram's ``mem_used_total`` for the same pages.
* ``latency``: 4K O_DIRECT reads of random pages through the FUSE file from this process
  (one at a time): mean, p50 and p99 in microseconds, of lz4 pages (just written) and of the
  same pages recompressed; zram's for the same pages, for scale.
* ``recompression``: pages recompressed, the recompressor's CPU per page, its wall time and
  CPU over wall (the budget it was given: 0.1), dictionaries trained.
* ``x4`` (full run only): all of the above for four copies of the same pages (1 GiB), where
  the daemon's fixed costs (FUSE worker buffers, contexts) weigh a quarter as much.

Every page is read back and compared at the end.  Run alone:
``.venv/bin/python -m bench.recompress_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.swap_bench import Daemon, pss

MiB = 1 << 20
PAGE = 4096
SAMPLES = 2000  # random reads per latency figure
IDLE = "4s"


def _heap(nbytes: int) -> bytes:
    from bench.corpus import heap_pages

    data: bytes = heap_pages(nbytes)
    return data[: len(data) - len(data) % PAGE]


def _metrics(d: Daemon) -> dict[str, float]:
    """Samples of /metrics by name, labels folded in as name{value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{d.addr}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(s.labels.values()) + "}" if s.labels else "")
            out[key] = s.value
    return out


def _pids(d: Daemon) -> list[int]:
    st = d.status()
    return [int(st["keeper_pid"]), int(st["server_pid"])]


def _read_latency_us(path: str, npages: int, seed: int) -> dict[str, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, PAGE)
    rng = random.Random(seed)
    lat = []
    try:
        for _ in range(SAMPLES):
            p = rng.randrange(npages)
            t = time.perf_counter_ns()
            os.preadv(fd, [buf], p * PAGE)
            lat.append((time.perf_counter_ns() - t) / 1000)
    finally:
        os.close(fd)
    lat.sort()
    return {
        "mean_us": round(statistics.fmean(lat), 2),
        "p50_us": round(lat[len(lat) // 2], 2),
        "p99_us": round(lat[len(lat) * 99 // 100], 2),
    }


def _write_direct(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    try:
        for off in range(0, len(data), MiB):
            chunk = data[off : off + MiB]
            buf[: len(chunk)] = chunk
            os.pwrite(fd, memoryview(buf)[: len(chunk)], off)
    finally:
        os.close(fd)


def _wait_recompressed(d: Daemon, timeout: float) -> dict[str, float]:
    """Until two passes in a row recompressed nothing new and the pool stopped shrinking."""
    end = time.monotonic() + timeout
    last: tuple[float, float, float] | None = None
    quiet = 0
    while time.monotonic() < end:
        m = _metrics(d)
        now = (
            m.get("zcached_recompressed_pages_total", 0),
            m.get("zcached_recompress_runs_total", 0),
            m.get("zcached_pool_bytes", 0),
        )
        if last is not None and now[1] >= last[1] + 1:
            quiet = quiet + 1 if now[0] == last[0] and now[2] >= last[2] else 0
            if quiet >= 2 and now[0] > 0:
                return m
            last = now
        elif last is None:
            last = now
        time.sleep(0.5)
    raise RuntimeError(f"recompression did not settle within {timeout:.0f} s")


def _wait_trained(d: Daemon) -> None:
    """Until the recompressor has trained its dictionary and finished that pass."""
    end = time.monotonic() + 120
    while time.monotonic() < end:
        m = _metrics(d)
        if (
            m.get("zcached_dictionary_trainings_total", 0) >= 1
            and m.get("zcached_recompress_runs_total", 0) >= 1
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("no dictionary trained within 120 s")


def _zram(data: bytes) -> dict[str, Any]:
    from bench.zram import Zram

    npages = len(data) // PAGE
    with Zram(len(data), algorithm="lz4") as z:
        z.write_pages(data)
        mm = z.mm_stat()
        lat = _read_latency_us(z.path, npages, 2)
    return {"mem_used_total": mm["mem_used_total"], "compr_data_size": mm["compr_data_size"],
            "latency": lat}  # fmt: skip


def _zcached(data: bytes, work: str) -> dict[str, Any]:
    npages = len(data) // PAGE
    conf = Path(work) / "zcached.toml"
    conf.write_text(f'[recompress]\nidle = "{IDLE}"\n')
    d = Daemon(2 * len(data), work, swap=False, extra=["--config", str(conf)])
    d.start()
    try:
        pids = _pids(d)
        idle = pss(pids)
        t0 = time.monotonic()
        _write_direct(d.device, data)
        lz4_growth = pss(pids) - idle
        m0 = _metrics(d)
        _wait_trained(d)  # so the lz4 reads do not share the CPUs with the training
        lat_lz4 = _read_latency_us(d.device, npages, 1)
        m = _wait_recompressed(d, 600 + npages / 200)
        cold_growth = pss(pids) - idle
        lat_cold = _read_latency_us(d.device, npages, 1)
        wall = time.monotonic() - t0
        bad = _verify(d.device, data)
        rec = m["zcached_recompressed_pages_total"]
        cpu = m["zcached_recompress_cpu_seconds_total"]
        return {
            "pages": npages,
            "idle_daemon_pss": idle,
            "growth_lz4": lz4_growth,
            "growth_recompressed": cold_growth,
            "pool_lz4": m0["zcached_pool_bytes"],
            "pool_recompressed": m["zcached_pool_bytes"],
            "compr_lz4": m0["zcached_compr_data_bytes"],
            "compr_recompressed": m["zcached_compr_data_bytes"],
            "dictionary_bytes": m.get("zcached_dictionary_bytes", 0),
            "dictionaries_trained": m.get("zcached_dictionary_trainings_total", 0),
            "latency_lz4": lat_lz4,
            "latency_recompressed": lat_cold,
            "recompressed_pages": rec,
            "kept_pages": m.get("zcached_recompress_tried_pages_total{kept}", 0),
            "recompress_cpu_s": round(cpu, 3),
            "recompress_wall_s": round(m["zcached_recompress_seconds_total"], 2),
            "recompress_cpu_us_per_page": round(cpu / max(1, rec) * 1e6, 2),
            "recompress_cpu_over_wall": round(
                cpu / max(1e-9, m["zcached_recompress_seconds_total"]), 3
            ),
            "seconds_to_settle": round(wall, 1),
            "pages_read_back_wrong": bad,
        }
    finally:
        d.stop()


def _verify(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    bad = 0
    try:
        for off in range(0, len(data), MiB):
            n = min(MiB, len(data) - off)
            os.preadv(fd, [memoryview(buf)[:n]], off)
            for p in range(0, n, PAGE):
                if buf[p : p + PAGE] != data[off + p : off + p + PAGE]:
                    bad += 1
    finally:
        os.close(fd)
    return bad


def run(quick: bool) -> dict[str, Any]:
    data = _heap((32 if quick else 256) * MiB)
    out = compare(data)
    if not quick:  # the fixed costs (worker buffers, contexts) against 4x the pages
        out["x4"] = compare(data * 4)
    return out


def compare(data: bytes) -> dict[str, Any]:
    zram = _zram(data)
    with tempfile.TemporaryDirectory(prefix="zcached-recompress-") as work:
        z = _zcached(data, work)
    used = max(1, zram["mem_used_total"])
    return {
        "bytes": len(data),
        "zram": zram,
        "zcached": z,
        "growth_lz4_vs_zram": round(z["growth_lz4"] / used, 4),
        "growth_recompressed_vs_zram": round(z["growth_recompressed"] / used, 4),
        "pool_recompressed_vs_zram": round(z["pool_recompressed"] / used, 4),
        "read_mean_recompressed_vs_lz4": round(
            z["latency_recompressed"]["mean_us"] / z["latency_lz4"]["mean_us"], 3
        ),
        "read_p99_recompressed_vs_lz4": round(
            z["latency_recompressed"]["p99_us"] / z["latency_lz4"]["p99_us"], 3
        ),
        "goal_met": {
            "memory": z["growth_recompressed"] / used <= 0.6,
            "latency": z["latency_recompressed"]["mean_us"] <= 1.5 * z["latency_lz4"]["mean_us"],
            "budget": z["recompress_cpu_over_wall"] <= 0.1 * 1.1,
            "data": z["pages_read_back_wrong"] == 0,
        },
    }


def summary(res: dict[str, Any]) -> str:
    z = res["zcached"]
    x4 = res.get("x4")
    more = f"; x4 pages: {x4['growth_recompressed_vs_zram']}x" if isinstance(x4, dict) else ""
    return (
        f"recompress: daemon memory {res['growth_lz4_vs_zram']}x zram with lz4, "
        f"{res['growth_recompressed_vs_zram']}x once idle and recompressed; reads "
        f"{res['read_mean_recompressed_vs_lz4']}x lz4's latency (mean); "
        f"{z['recompress_cpu_us_per_page']} us CPU per page at {z['recompress_cpu_over_wall']} "
        f"of a CPU; {z['pages_read_back_wrong']} pages wrong{more}"
    )


if __name__ == "__main__":
    r = run("--quick" in sys.argv)
    print(summary(r), file=sys.stderr)
    print(json.dumps(r, indent=2))
