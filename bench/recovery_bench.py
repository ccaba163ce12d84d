"""Recovery benchmark: how long a new server takes to take over a live store, by pool size.

``run(quick)`` (called by ``python -m bench``):

* ``rebuild``: for pools of 256 MiB, 1 GiB and 4 GiB (quick: 64 MiB) of compressed pages, the
  time ``zc_store_attach`` takes to check the arena and rebuild the allocator from the page
  table (csrc/store.c RECOVERY: every object's handle, entry and back-reference is checked, so
  it reads one header per object and touches every pool page), and the wall time of
  ``_core.Store(attach=fd)`` around it.  The arena is made in this process, filled through
  the C store, handed over as a duplicated memfd and the first store closed, as a keeper hands
  it to a new server.
* ``server_start``: the wall time of ``python -m zcached.server --help``-free start-up: the
  interpreter and the imports a server does before it attaches (the other part of a recovery:
  the keeper measures death to ready, ~0.2-0.35 s in tests/test_keeper.py).

Run alone: ``.venv/bin/python -m bench.recovery_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from typing import Any

from zcached import _core

MiB = 1 << 20
PAGE = 4096
CHUNK = 256  # pages per write: 1 MiB requests


def _pages(n: int, seed: int) -> list[bytes]:
    """n distinct pages that lz4 stores in about half a page (random half, zero half)."""
    rng = random.Random(seed)
    return [rng.randbytes(PAGE // 2) + bytes(PAGE // 2) for _ in range(n)]


def _fill(store: _core.Store, pool_bytes: int, pages: list[bytes]) -> int:
    """Write pages until the pool holds pool_bytes; returns pages written."""
    off = 0
    chunk = b"".join(pages[:CHUNK])
    i = 0
    while store.stats()["mem_used_total"] < pool_bytes:
        if i % 64 == 0:
            k = (i // 64 * CHUNK) % (len(pages) - CHUNK)
            chunk = b"".join(pages[k : k + CHUNK])
        store.write(off, chunk)
        off += len(chunk)
        i += 1
    return off // PAGE


def rebuild(pool_bytes: int) -> dict[str, Any]:
    pages = _pages(4096, 1)
    size = pool_bytes * 5 // 2 // MiB * MiB  # room for ~2:1 pages
    store = _core.Store(size, heaps=2)
    written = _fill(store, pool_bytes, pages)
    pool = store.stats()["mem_used_total"]
    fd = os.dup(store.memfd())
    store.close()
    t0 = time.perf_counter()
    again = _core.Store(attach=fd)
    wall = time.perf_counter() - t0
    rec = again.recovery() or {}
    ok = again.check() == 0 and again.stats()["mem_used_total"] == pool
    again.close()
    os.close(fd)
    return {
        "pool_mib": round(pool / MiB, 1),
        "pages": written,
        "objects": rec.get("objects", 0),
        "rebuild_ms": round(rec.get("ns", 0) / 1e6, 2),
        "attach_wall_ms": round(wall * 1000, 2),
        "rebuild_ns_per_object": round(rec.get("ns", 0) / max(1, rec.get("objects", 1)), 1),
        "consistent": ok,
    }


def server_start() -> float:
    """Seconds for an interpreter to start and import what a server imports."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import zcached.server"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool) -> dict[str, Any]:
    sizes = [64] if quick else [256, 1024, 4096]
    return {
        "rebuild": {f"{mib}MiB": rebuild(mib * MiB) for mib in sizes},
        "server_start_ms": round(server_start() * 1000, 1),
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
