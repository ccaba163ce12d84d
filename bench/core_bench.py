"""C core benchmark: memory next to kernel zram, in-process throughput, instructions per request.

``run(quick)`` (called by ``python -m bench``):

* ``memory``: 256 MiB (quick: 32 MiB) of real heap pages (bench.corpus) written in 4K requests
  into a zcached.core.CoreStore and into kernel zram (lz4); ``mem_used_total``, the core's
  metadata (page table, handle table, vpages, counters) and the arena's real RSS (the memfd
  mapping's Rss in /proc/self/smaps: every byte of store state lives there) over zram's
  ``mem_used_total``; the same after a random half is discarded and both compact.
* ``throughput``: MB/s of page data through ``CoreStore.write/read`` in 4K and 1 MiB requests,
  from one Python thread and from two (the binding releases the GIL, so two threads run in C at
  once), lz4 and zstd-3.
* ``instructions``: ``valgrind --tool=callgrind`` counts of csrc/bench_core.c, which hands the C
  FUSE request handler (zc_fuse_handle) one in-memory request at a time: instructions per 4K
  WRITE, 4K READ, 128 KiB WRITE/READ and 4K FALLOCATE punch-hole, each phase toggled on its own
  (user-space instructions of the daemon's request path, from decoding the request to the
  reply; the /dev/fuse syscalls and the kernel are not in it).  Counts are repeatable on a noisy
  machine: the same binary, corpus and inputs give the same totals.

Run alone: ``.venv/bin/python -m bench.core_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from zcached.core import CoreStore

MiB = 1 << 20
PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CORE_C = [
    "arena.c", "backing.c", "codec.c", "xcfmalloc.c", "store.c", "fuse_loop.c", "fuse_uring.c",
]  # fmt: skip
MEMORY_KEYS = ("pages_stored", "same_pages", "huge_pages", "compr_data_size", "mem_used_total",
               "objects", "metadata_bytes", "table_bytes")  # fmt: skip
PHASES = ["write4k", "read4k", "write128k", "read128k", "discard4k"]


def _heap(nbytes: int) -> bytes:
    from bench.corpus import heap_pages

    data: bytes = heap_pages(nbytes)
    return data[: len(data) - len(data) % PAGE]


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def arena_rss(store: CoreStore) -> int:
    """Resident bytes of the store's memfd mapping in this process (all of its state)."""
    target = os.readlink(f"/proc/self/fd/{store.memfd()}").split(" ")[0]
    rss, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = target in line
            elif inside and line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
    return rss


def _memory(store: CoreStore, zram: dict[str, int]) -> dict[str, Any]:
    s = store.raw_stats()
    used = max(1, zram["mem_used_total"])
    rss = arena_rss(store)
    return {
        "zram_mm_stat": zram,
        "zcached": {k: s[k] for k in MEMORY_KEYS},
        "arena_rss_bytes": rss,
        "compr_vs_zram": round(s["compr_data_size"] / max(1, zram["compr_data_size"]), 4),
        "pool_vs_zram": round(s["mem_used_total"] / used, 4),
        "pool_plus_metadata_vs_zram": round((s["mem_used_total"] + s["metadata_bytes"]) / used, 4),
        "arena_rss_vs_zram": round(rss / used, 4),
        "metadata_bytes_per_stored_page": round(s["metadata_bytes"] / max(1, s["pages_stored"]), 2),
    }


def memory_vs_zram(data: bytes, seed: int = 1) -> dict[str, Any]:
    from bench.zram import Zram

    n = len(data)
    npages = n // PAGE
    half = random.Random(seed).sample(range(npages), npages // 2)
    store = CoreStore(n)
    try:
        t = time.perf_counter()
        for off in range(0, n, PAGE):
            store.write(off, data[off : off + PAGE])
        out: dict[str, Any] = {"bytes": n, "write_4k_mbps": _mbps(n, time.perf_counter() - t)}
        with Zram(n, algorithm="lz4") as z:
            z.write_pages(data)
            out["full"] = _memory(store, z.mm_stat())
            for p in half:
                z.discard(p * PAGE, PAGE)
                store.discard(p * PAGE, PAGE)
            out["half_discarded"] = _memory(store, z.mm_stat())
            z.compact()
            t = time.perf_counter()
            moved = store.allocator.compact()
            out["half_discarded_compacted"] = _memory(store, z.mm_stat())
            out["half_discarded_compacted"]["objects_moved"] = moved
            out["half_discarded_compacted"]["compact_seconds"] = round(time.perf_counter() - t, 3)
        gone = set(half)
        for p in range(npages):
            want = bytes(PAGE) if p in gone else data[p * PAGE : (p + 1) * PAGE]
            if store.read(p * PAGE, PAGE) != want:
                raise AssertionError(f"page {p} read back wrong after compaction")
    finally:
        store.close()
    return out


def _pass(store: CoreStore, data: bytes, req: int, threads: int, write: bool) -> float:
    """Seconds for ``threads`` threads to write (or read) their share of ``data``."""
    n = len(data)
    share = n // threads // req * req

    def work(k: int) -> None:
        for off in range(k * share, (k + 1) * share, req):
            if write:
                store.write(off, data[off : off + req])
            else:
                store.read(off, req)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return time.perf_counter() - t


def throughput(data: bytes) -> dict[str, Any]:
    n = len(data)
    out: dict[str, Any] = {}
    for name, level in (("lz4", None), ("zstd", 3)):
        for req in (PAGE, MiB):
            for threads in (1, 2):
                store = CoreStore(n, compressor=name, level=level, heaps=threads)
                try:
                    share = n // threads // req * req * threads
                    w = _pass(store, data, req, threads, True)
                    r = _pass(store, data, req, threads, False)
                finally:
                    store.close()
                key = f"{name}{'' if level is None else '-' + str(level)}_{req // 1024}k_t{threads}"
                out[key] = {"write_mbps": _mbps(share, w), "read_mbps": _mbps(share, r)}
    return out


def _build_driver(tmp: str) -> str:
    exe = os.path.join(tmp, "bench_core")
    cc = shutil.which("gcc") or "cc"
    cmd = [cc, "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-O2", "-g",
           f"-I{CSRC}", str(CSRC / "bench_core.c"), *(str(CSRC / c) for c in CORE_C),
           "-llz4", "-lzstd", "-lxxhash", "-lpthread", "-o", exe]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def instructions(data: bytes, pages: int) -> dict[str, Any]:
    """Instructions per request of each phase of csrc/bench_core.c, lz4 and zstd-3."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind not found (Debian package valgrind, see make deps)")
    out: dict[str, Any] = {"pages": pages, "cc": sysconfig.get_config_var("CC")}
    with tempfile.TemporaryDirectory(prefix="zcached-cg-") as tmp:
        exe = _build_driver(tmp)
        corpus = os.path.join(tmp, "pages.bin")
        Path(corpus).write_bytes(data[: pages * PAGE])
        for comp in ("lz4", "zstd"):
            counts = json.loads(subprocess.run(
                [exe, corpus, str(pages), comp], check=True, capture_output=True, text=True
            ).stdout)["requests"]  # fmt: skip
            counts["write4k"] *= 2  # the phase runs twice: fresh pages, then overwrites
            row: dict[str, int] = {}
            for phase in PHASES:
                cg = os.path.join(tmp, f"cg.{comp}.{phase}")
                r = subprocess.run(
                    ["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}",
                     "--collect-atstart=no", f"--toggle-collect=phase_{phase}",
                     exe, corpus, str(pages), comp],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                m = re.search(r"Collected : (\d+)", r.stderr)
                if not m:
                    raise RuntimeError(f"callgrind gave no total: {r.stderr[-500:]}")
                row[phase] = round(int(m.group(1)) / counts[phase])
            out[comp] = row
    return out


def run(quick: bool) -> dict[str, Any]:
    nbytes = (32 if quick else 256) * MiB
    data = _heap(nbytes)
    sample = data[: min(len(data), (16 if quick else 64) * MiB)]
    result: dict[str, Any] = {"corpus_bytes": len(data)}
    result["memory"] = memory_vs_zram(data)
    result["throughput"] = throughput(sample)
    result["instructions_per_request"] = instructions(data, 2048 if quick else 8192)
    full = result["memory"]["full"]
    ins = result["instructions_per_request"]["lz4"]
    result["summary"] = {
        "pool_vs_zram": full["pool_vs_zram"],
        "arena_rss_vs_zram": full["arena_rss_vs_zram"],
        "after_half_discard_compacted_arena_rss_vs_zram": result["memory"][
            "half_discarded_compacted"
        ]["arena_rss_vs_zram"],
        "lz4_write_4k_instructions": ins["write4k"],
        "lz4_read_4k_instructions": ins["read4k"],
        "lz4_4k_t1_write_mbps": result["throughput"]["lz4_4k_t1"]["write_mbps"],
        "lz4_4k_t1_read_mbps": result["throughput"]["lz4_4k_t1"]["read_mbps"],
    }
    return result


def summary(result: dict[str, Any]) -> str:
    s = result["summary"]
    return (
        f"core: arena RSS {s['arena_rss_vs_zram']}x zram mem_used_total"
        f" (pool {s['pool_vs_zram']}x),"
        f" {s['after_half_discard_compacted_arena_rss_vs_zram']}x after half discarded + compact;"
        f" lz4 4K write {s['lz4_write_4k_instructions']} / read {s['lz4_read_4k_instructions']}"
        f" instructions per request"
    )


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2))
