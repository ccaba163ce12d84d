"""Page store benchmark: memory next to kernel zram for the same heap pages, and throughput.

``run(quick)`` (called by ``python -m bench``) writes 256 MiB (quick: 32 MiB) of real heap pages
(bench.corpus.heap_pages: zero pages dropped) into a PageStore with LZ4 in 4K requests, the way
swap sends them, and the same bytes into kernel zram with lz4 (bench.zram.Zram), then compares:

* ``pool_bytes`` (xcfmalloc's 4K pages) with zram's ``mem_used_total`` (zsmalloc's pages), and
  ``(pool_bytes + page-table bytes + allocator metadata) / zram mem_used_total`` (goal <= 1.05).
  zram's own table (~16 B per page in the kernel) is not in its mem_used_total, so the second
  ratio charges zcached for metadata that zram is not charged for.
* the same after discarding a random half of the pages and compacting both (swap frees pages in
  random order; this is where allocators differ).
* metadata bytes per stored page: the page table's and the allocator's.
* store write and read throughput (MB/s of page data) for 4K and 1 MiB requests, LZ4 and zstd.

Run alone: ``.venv/bin/python -m bench.store_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any

from zcached.store import PAGE_SIZE, TABLE_BYTES_PER_PAGE, PageStore
from zcached.xcfmalloc import XcfMalloc

MiB = 1 << 20


def _heap(nbytes: int) -> bytes:
    from bench.corpus import heap_pages

    data: bytes = heap_pages(nbytes)
    return data[: len(data) - len(data) % PAGE_SIZE]


def _write(store: PageStore, data: bytes, req: int) -> float:
    """Seconds to write ``data`` from offset 0 in requests of ``req`` bytes."""
    write = store.write
    t = time.perf_counter()
    for off in range(0, len(data), req):
        write(off, data[off : off + req])
    return time.perf_counter() - t


def _read(store: PageStore, nbytes: int, req: int) -> float:
    read = store.read
    t = time.perf_counter()
    for off in range(0, nbytes, req):
        read(off, req)
    return time.perf_counter() - t


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def _memory(store: PageStore) -> dict[str, Any]:
    s = store.stats()
    pool = store.allocator.stats()
    table = TABLE_BYTES_PER_PAGE * store.npages
    pages = max(1, s.pages_stored)
    fixed = XcfMalloc().stats().metadata_bytes  # the empty allocator's arrays and headers
    return {
        "pages_stored": s.pages_stored,
        "same_pages": s.same_pages,
        "huge_pages": s.huge_pages,
        "orig_data_size": s.orig_data_size,
        "compr_data_size": s.compr_data_size,
        "pool_bytes": s.mem_used_total,
        "table_bytes": table,
        "allocator_metadata_bytes": pool.metadata_bytes,
        "table_bytes_per_stored_page": round(table / pages, 2),
        "allocator_metadata_bytes_fixed": fixed,
        "allocator_metadata_bytes_per_object": round(
            (pool.metadata_bytes - fixed) / max(1, pool.objects), 2
        ),
        "total_bytes": s.mem_used_total + table + pool.metadata_bytes,
    }


def _versus_zram(ours: dict[str, Any], zram: dict[str, int]) -> dict[str, Any]:
    used = max(1, zram["mem_used_total"])
    return {
        "zram_mm_stat": zram,
        "zcached": ours,
        "compr_vs_zram": round(ours["compr_data_size"] / max(1, zram["compr_data_size"]), 4),
        "pool_vs_zram": round(ours["pool_bytes"] / used, 4),
        "pool_plus_metadata_vs_zram": round(ours["total_bytes"] / used, 4),
    }


def memory_vs_zram(data: bytes, seed: int = 1) -> dict[str, Any]:
    """Both stores filled with ``data``; then a random half discarded and both compacted."""
    from bench.zram import Zram

    n = len(data)
    npages = n // PAGE_SIZE
    half = random.Random(seed).sample(range(npages), npages // 2)
    store = PageStore(n)
    write_s = _write(store, data, PAGE_SIZE)
    out: dict[str, Any] = {"bytes": n, "write_4k_mbps": _mbps(n, write_s)}
    with Zram(n, algorithm="lz4") as z:
        z.write_pages(data)
        out["full"] = _versus_zram(_memory(store), z.mm_stat())
        for p in half:
            z.discard(p * PAGE_SIZE, PAGE_SIZE)
            store.discard(p * PAGE_SIZE, PAGE_SIZE)
        out["half_discarded"] = _versus_zram(_memory(store), z.mm_stat())
        z.compact()
        t = time.perf_counter()
        moved = store.allocator.compact()
        compact_s = time.perf_counter() - t
        out["half_discarded_compacted"] = _versus_zram(_memory(store), z.mm_stat())
        out["half_discarded_compacted"]["objects_moved"] = moved
        out["half_discarded_compacted"]["compact_seconds"] = round(compact_s, 3)
    # the surviving half must still read back exactly
    gone = set(half)
    for p in range(npages):
        want = bytes(PAGE_SIZE) if p in gone else data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]
        if store.read(p * PAGE_SIZE, PAGE_SIZE) != want:
            raise AssertionError(f"page {p} read back wrong after compaction")
    return out


def throughput(data: bytes) -> dict[str, Any]:
    """MB/s of page data through write and read, per compressor and request size."""
    n = len(data)
    out: dict[str, Any] = {}
    for name, level in (("lz4", None), ("zstd", 3)):
        for req in (PAGE_SIZE, MiB):
            store = PageStore(n, compressor=name, level=level)
            w = _write(store, data, req)
            r = _read(store, n, req)
            s = store.stats()
            key = f"{name}{'' if level is None else '-' + str(level)}_{req // 1024}k"
            out[key] = {
                "write_mbps": _mbps(n, w),
                "read_mbps": _mbps(n, r),
                "compr_ratio": round(s.compr_data_size / max(1, s.orig_data_size), 4),
            }
            store.close()
    return out


def codec_micro(data: bytes, pages: int = 2000) -> dict[str, Any]:
    """Microseconds per 4K page of the checksum and same-filled candidates (codec's choices)."""
    import timeit
    import zlib

    import xxhash

    sample = [
        data[i : i + PAGE_SIZE] for i in range(0, min(len(data), pages * PAGE_SIZE), PAGE_SIZE)
    ]
    zero = bytes(PAGE_SIZE)

    def per_page(fn: Any, pages: list[bytes]) -> float:
        t = min(timeit.repeat(lambda: [fn(p) for p in pages], number=3, repeat=3))
        return round(t / 3 / len(pages) * 1e6, 3)

    return {
        "checksum_xxh3_64_low32_us": per_page(
            lambda p: xxhash.xxh3_64_intdigest(p) & 0xFFFFFFFF, sample
        ),
        "checksum_crc32_us": per_page(zlib.crc32, sample),
        "checksum_xxh32_us": per_page(xxhash.xxh32_intdigest, sample),
        "same_mul_compare_us": per_page(lambda p: p == p[:8] * 512, sample),
        "same_guarded_us_used": per_page(lambda p: p[:8] == p[-8:] and p == p[:8] * 512, sample),
        "same_count_us": per_page(lambda p: p.count(p[:8]) == 512, sample),
        "same_memoryview_us": per_page(lambda p: memoryview(p) == memoryview(p[:8] * 512), sample),
        "same_on_zero_page_guarded_us": per_page(
            lambda p: p[:8] == p[-8:] and p == p[:8] * 512, [zero] * len(sample)
        ),
    }


def run(quick: bool) -> dict[str, Any]:
    nbytes = (32 if quick else 256) * MiB
    data = _heap(nbytes)
    sample = data[: min(len(data), (16 if quick else 64) * MiB)]
    result: dict[str, Any] = {"corpus_bytes": len(data)}
    result["memory"] = memory_vs_zram(data)
    result["throughput"] = throughput(sample)
    result["codec_micro"] = codec_micro(sample)
    full = result["memory"]["full"]
    result["summary"] = {
        "pool_plus_metadata_vs_zram": full["pool_plus_metadata_vs_zram"],
        "pool_vs_zram": full["pool_vs_zram"],
        "after_half_discard_compacted_vs_zram": result["memory"]["half_discarded_compacted"][
            "pool_plus_metadata_vs_zram"
        ],
        "table_bytes_per_stored_page": full["zcached"]["table_bytes_per_stored_page"],
        "allocator_metadata_bytes_per_object": full["zcached"][
            "allocator_metadata_bytes_per_object"
        ],
        "lz4_write_4k_mbps": result["throughput"]["lz4_4k"]["write_mbps"],
        "lz4_read_4k_mbps": result["throughput"]["lz4_4k"]["read_mbps"],
    }
    return result


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=2))
