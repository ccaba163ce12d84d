"""bench/compact_bench: the background compactor on real heap pages, next to kernel zram.

Owns: the compaction benchmark (``run(quick) -> dict``, called by ``python -m bench``) and the
server process it drives (``python -m bench.compact_bench serve MNT SIZE THREADS``).
Must not: assert on speed (it reports), change the daemon's policy, or leave anything behind:
the loop device, the mount and the server process are torn down in ``finally`` blocks, and
/dev/zram0 is only used inside bench.zram.Zram (which resets it).

The zcached side runs as the daemon does, minus swap and mlockall: a server process holds the
C store (zcached.core.CoreStore, lz4, one Hoard heap per FUSE worker: ``Config.worker_threads``,
one per CPU), its C request loop (zcached.core.CoreFuseServer), and a Compactor started at
once with the daemon's default policy (``zcached.daemon.compaction_policy(Config(size))``: the
[compaction] defaults of zcached/config.py).  The benchmark talks to the device only through a
loop device (``--direct-io=on``) and asks the server for counters over a pipe.

Memory (``memory``): 256 MiB (quick: 32 MiB) of real heap pages (bench.corpus.heap_pages) are
written to zram (lz4) and to the loop device, then the same random half is discarded from both
in 4K pieces (one BLKDISCARD per page, as swap frees slots).  zram then gets ``compact``; the
zcached compactor is *not* asked: the benchmark waits until its thread has run on its own
(threshold checks every ``interval``, then the idle tidy-up once the discards have stopped) and
wants nothing more (Compactor.pending).  Reported: pool bytes and pool + metadata
(page table + allocator arrays) against zram's mem_used_total after its compact (goal <= 1.05;
zram's own per-page table is not in mem_used_total), the compactor's wall and CPU seconds,
objects moved, pages given back by moves (allocator ``pages_compacted``) and pool pages before
and after.  The whole device is then read back and compared (survivors intact, discarded pages
zero).

I/O drop (``io``): per mode (4K randread, 4K randwrite at iodepth 32 with fio, libaio, direct),
``cycles`` times: the compactor thread is stopped, the device rewritten with the corpus and a new
random half discarded; fio starts (an IOPS log averaged over 50 ms, Unix-epoch stamps); 1.5 s
later the compactor thread is started again with the same policy and triggered (what
``zcached compact`` does: under 60 MB/s of random writes the holes fill up before the policy's
next check, so without the trigger the write cycles would often measure no run at all).  Its
runs' wall-clock times (Compactor.recent_runs) split fio's samples into "compactor running" and
"idle" (samples within 100 ms of a run's edges and fio's first 0.5 s are left out).  Reported:
mean IOPS in each, and running / idle.  The reads cover the whole device, so half of them hit
discarded pages (no pool object), in both windows alike.

Run alone: ``.venv/bin/python -m bench.compact_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = 4096
MiB = 1 << 20
BLKDISCARD = 0x1277
SEED = 1
LOG_MSEC = 50
EDGE_S = 0.1  # fio samples this close to a run's start or end are in neither window
RAMP_S = 0.5  # fio's first samples are left out
LEAD_S = 1.5  # fio runs this long before the compactor is started and triggered
SETTLE_TIMEOUT_S = 600.0


# ---- the server process -------------------------------------------------------------------------


def serve(mnt: str, size: int, threads: int) -> None:
    """Serve MNT/swap.img like the daemon (no swap, no mlock); answer commands on stdin."""
    from zcached.compactor import Compactor
    from zcached.config import Config
    from zcached.core import CoreFuseServer, CoreStore
    from zcached.daemon import compaction_policy

    store = CoreStore(size, compressor="lz4", heaps=threads)
    srv = CoreFuseServer(store, mnt, size, threads=threads)
    policy = compaction_policy(Config(size=size))
    comp = Compactor(store.allocator, policy)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    srv.mount()
    try:
        srv.start()
        comp.start()
        _reply({"ready": True, "policy": vars(policy)})
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "hold":
                comp.stop()
            elif cmd == "go":
                comp.start()
                comp.trigger()
            elif cmd == "quit":
                break
            _reply(_server_stats(store, comp))
    finally:
        comp.stop()
        srv.stop()
        store.close()


def _reply(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _server_stats(store: Any, comp: Any) -> dict[str, Any]:
    ps = store.allocator.stats()
    s = store.stats()
    return {
        "pool_bytes": ps.pool_bytes,
        "requested_bytes": ps.requested_bytes,
        "objects": ps.objects,
        "allocator_metadata_bytes": ps.metadata_bytes,
        "table_bytes": store.metadata_bytes(),
        "compr_data_size": s.compr_data_size,
        "pages_stored": s.pages_stored,
        "huge_pages": s.huge_pages,
        "pages_compacted": ps.pages_compacted,
        "vpages_to_global": ps.vpages_to_global,
        "due": comp.policy.due(ps.pool_bytes, ps.requested_bytes),
        "pending": comp.pending(),
        "reclaimable_bytes": store.allocator.reclaimable_bytes(),
        "running": comp.running,
        "runs": comp.runs,
        "idle_runs": comp.idle_runs,
        "seconds": comp.seconds,
        "cpu_seconds": comp.cpu_seconds,
        "objects_moved": comp.objects_moved,
        "recent_runs": [vars(r) for r in comp.recent_runs],
    }


class Server:
    """The server process, its mount and a loop device over it (``with Server(...) as s``)."""

    def __init__(self, size: int, threads: int) -> None:
        self.size = size
        self.threads = threads
        self.loop = ""
        self.policy: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Server:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="zcached-compactbench-")
        mnt = os.path.join(self._tmp.name, "mnt")
        os.mkdir(mnt)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.compact_bench", "serve", mnt, str(self.size),
             str(self.threads)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        hello = self._read()
        if not hello.get("ready"):
            raise RuntimeError(f"compact bench server did not start: {hello}")
        self.policy = hello["policy"]
        self.loop = subprocess.run(
            ["losetup", "--direct-io=on", "--show", "-f", os.path.join(mnt, "swap.img")],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("compact bench server exited")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def ask(self, cmd: str = "stats") -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(cmd + "\n")
        self._proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
            for _ in range(100):  # detach is asynchronous: wait until the file is closed
                if not os.path.exists(f"/sys/block/{os.path.basename(self.loop)}/loop"):
                    break
                time.sleep(0.1)
            self.loop = ""
        if self._proc is not None:
            with contextlib.suppress(OSError, ValueError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            mnt = os.path.join(self._tmp.name, "mnt")
            with open("/proc/mounts") as f:
                if any(ln.split()[1] == mnt for ln in f):
                    subprocess.run(["umount", "-l", mnt], check=False)
            self._tmp.cleanup()
            self._tmp = None


# ---- block device helpers -----------------------------------------------------------------------


def _write_dio(dev: str, data: bytes) -> None:
    buf = mmap.mmap(-1, MiB)  # page aligned, as O_DIRECT needs
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        for off in range(0, len(data), MiB):
            chunk = data[off : off + MiB]
            buf[: len(chunk)] = chunk
            os.pwritev(fd, [memoryview(buf)[: len(chunk)]], off)
    finally:
        os.close(fd)
        buf.close()


def _discard_pages(dev: str, pages: list[int]) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        for p in pages:
            fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", p * PAGE, PAGE))
    finally:
        os.close(fd)


def _verify(dev: str, data: bytes, gone: set[int]) -> int:
    """Pages that read back wrong (survivors must match, discarded pages read as zeros)."""
    buf = mmap.mmap(-1, MiB)
    bad = 0
    zero = bytes(PAGE)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        for off in range(0, len(data), MiB):
            n = min(MiB, len(data) - off)
            os.preadv(fd, [memoryview(buf)[:n]], off)
            for i in range(0, n, PAGE):
                p = (off + i) // PAGE
                want = zero if p in gone else data[off + i : off + i + PAGE]
                bad += buf[i : i + PAGE] != want
    finally:
        os.close(fd)
        buf.close()
    return bad


# ---- memory against zram ------------------------------------------------------------------------


def _settle(server: Server, interval: float) -> tuple[dict[str, Any], float]:
    """Wait until the compactor has run on its own and wants no more runs (thresholds and idle
    tidy-up); (stats, seconds waited)."""
    t0 = time.monotonic()
    while True:
        st = server.ask()
        waited = time.monotonic() - t0
        quiet = not st["running"] and not st["pending"]
        if quiet and (st["runs"] > 0 or waited > 3 * interval):
            return st, waited
        if waited > SETTLE_TIMEOUT_S:
            raise RuntimeError(f"compactor did not settle in {SETTLE_TIMEOUT_S:.0f} s: {st}")
        time.sleep(0.1)


def _ours(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("pool_bytes", "requested_bytes", "compr_data_size", "table_bytes",
            "allocator_metadata_bytes", "pages_stored", "huge_pages", "objects")  # fmt: skip
    out = {k: st[k] for k in keys}
    out["total_bytes"] = st["pool_bytes"] + st["table_bytes"] + st["allocator_metadata_bytes"]
    return out


def _vs(ours: dict[str, Any], zram: dict[str, int]) -> dict[str, Any]:
    used = max(1, zram["mem_used_total"])
    return {
        "zram_mem_used_total": zram["mem_used_total"],
        "zram_compr_data_size": zram["compr_data_size"],
        "zcached": ours,
        "pool_vs_zram": round(ours["pool_bytes"] / used, 4),
        "pool_plus_metadata_vs_zram": round(ours["total_bytes"] / used, 4),
    }


def _zram_side(data: bytes, half: list[int]) -> tuple[dict[str, dict[str, int]], float]:
    """zram's mm_stat full, half discarded, and after compact; and compact's seconds."""
    from bench.zram import Zram

    out: dict[str, dict[str, int]] = {}
    with Zram(len(data), algorithm="lz4") as z:
        z.write_pages(data)
        out["full"] = z.mm_stat()
        z.discard_pages(half)
        out["half_discarded"] = z.mm_stat()
        t = time.perf_counter()
        z.compact()
        seconds = time.perf_counter() - t
        out["half_discarded_compacted"] = z.mm_stat()
    return out, seconds


def memory(server: Server, data: bytes) -> dict[str, Any]:
    npages = len(data) // PAGE
    half = random.Random(SEED).sample(range(npages), npages // 2)
    zram, zram_compact_s = _zram_side(data, half)
    _write_dio(server.loop, data)
    full = server.ask()
    t = time.time()
    _discard_pages(server.loop, half)
    discards_end = time.time()
    discarded = server.ask()
    settled, waited = _settle(server, float(server.policy["interval"]))
    bad = _verify(server.loop, data, set(half))
    runs = settled["recent_runs"]
    zram_used = max(1, zram["half_discarded_compacted"]["mem_used_total"])
    before_tidy = runs[-1]["pool_bytes_before"] if settled["idle_runs"] else settled["pool_bytes"]
    return {
        "pages": npages,
        "discarded_pages": len(half),
        "discard_seconds": round(discards_end - t, 2),
        "full": _vs(_ours(full), zram["full"]),
        "half_discarded_before_compaction": _vs(_ours(discarded), zram["half_discarded"]),
        "pool_vs_zram_before_idle_tidy_up": round(before_tidy / zram_used, 4),
        "half_discarded_compacted": _vs(_ours(settled), zram["half_discarded_compacted"]),
        "zram_compact_seconds": round(zram_compact_s, 3),
        "compactor": {
            "policy": server.policy,
            "runs": settled["runs"],
            "idle_tidy_runs": settled["idle_runs"],
            "runs_started_during_discards": sum(1 for r in runs if r["started"] < discards_end),
            "wall_seconds": round(settled["seconds"], 3),
            "cpu_seconds": round(settled["cpu_seconds"], 3),
            "objects_moved": settled["objects_moved"],
            "pages_given_back_by_moves": settled["pages_compacted"] - full["pages_compacted"],
            "pool_pages_before": discarded["pool_bytes"] // PAGE,
            "pool_pages_after": settled["pool_bytes"] // PAGE,
            "seconds_from_last_discard_to_settled": round(waited, 2),
        },
        "pages_read_back_wrong": bad,
    }


# ---- I/O throughput while the compactor runs ----------------------------------------------------


def _fio(dev: str, rw: str, runtime: float, logdir: str) -> subprocess.Popen[str]:
    args = ["fio", "--name=io", f"--filename={dev}", f"--rw={rw}", "--bs=4k", "--iodepth=32",
            "--ioengine=libaio", "--direct=1", "--time_based=1", f"--runtime={runtime}",
            "--randrepeat=0", "--norandommap=1", "--output-format=json",
            f"--write_iops_log={os.path.join(logdir, 'io')}", f"--log_avg_msec={LOG_MSEC}",
            "--log_unix_epoch=1"]  # fmt: skip
    if rw == "randwrite":
        args += ["--buffer_compress_percentage=65", "--buffer_compress_chunk=4096",
                 "--refill_buffers=1"]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _iops_samples(logdir: str) -> list[tuple[float, float]]:
    """(epoch seconds, IOPS) from fio's averaged IOPS log."""
    out = []
    for name in sorted(os.listdir(logdir)):
        if name.startswith("io_iops") and name.endswith(".log"):
            with open(os.path.join(logdir, name)) as f:
                for line in f:
                    parts = line.split(",")
                    if len(parts) >= 2:
                        out.append((int(parts[0]) / 1000, float(parts[1])))
    return sorted(out)


def split_samples(
    samples: list[tuple[float, float]], runs: list[tuple[float, float]]
) -> tuple[list[float], list[float]]:
    """(IOPS while a run was under way, IOPS while none was) from (time, IOPS) samples whose
    window of LOG_MSEC ends at ``time``; samples near a run's edges or in the ramp are dropped."""
    busy: list[float] = []
    idle: list[float] = []
    if not samples:
        return busy, idle
    first = samples[0][0]
    for t, v in samples:
        if t < first + RAMP_S:
            continue
        lo = t - LOG_MSEC / 1000
        if any(a <= lo and t <= b for a, b in runs):
            busy.append(v)
        elif all(t < a - EDGE_S or lo > b + EDGE_S for a, b in runs):
            idle.append(v)
    return busy, idle


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _io_cycle(
    server: Server, data: bytes, rw: str, runtime: float, seed: int
) -> tuple[list[float], list[float], list[dict[str, Any]]]:
    """One fragment-then-compact cycle under fio: (busy IOPS, idle IOPS, the runs)."""
    npages = len(data) // PAGE
    server.ask("hold")
    _write_dio(server.loop, data)
    _discard_pages(server.loop, random.Random(seed).sample(range(npages), npages // 2))
    with tempfile.TemporaryDirectory(prefix="zcached-compactbench-fio-") as logdir:
        start = time.time()
        proc = _fio(server.loop, rw, runtime, logdir)
        time.sleep(LEAD_S)
        server.ask("go")
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"fio {rw} failed: {err[-500:]}")
        after = server.ask()
        samples = _iops_samples(logdir)
    runs = [r for r in after["recent_runs"] if r["started"] >= start]
    busy, idle = split_samples(samples, [(r["started"], r["finished"]) for r in runs])
    return busy, idle, runs


def io_drop(server: Server, data: bytes, rw: str, runtime: float, cycles: int) -> dict[str, Any]:
    """4K ``rw`` IOPS while the compactor runs against while it does not, over ``cycles``."""
    busy: list[float] = []
    idle: list[float] = []
    runs: list[dict[str, Any]] = []
    for i in range(cycles):
        b, d, r = _io_cycle(server, data, rw, runtime, seed=SEED + 100 * (rw == "randwrite") + i)
        busy += b
        idle += d
        runs += r
    idle_mean, busy_mean = _mean(idle), _mean(busy)
    return {
        "cycles": cycles,
        "iops_idle": round(idle_mean, 1),
        "iops_compactor_running": round(busy_mean, 1),
        "running_vs_idle": round(busy_mean / idle_mean, 3) if idle_mean and busy else None,
        "samples_idle": len(idle),
        "samples_running": len(busy),
        "compactor_runs": len(runs),
        "compactor_wall_seconds": round(sum(r["finished"] - r["started"] for r in runs), 3),
        "compactor_cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 3),
        "objects_moved": sum(r["objects_moved"] for r in runs),
    }


# ---- the module interface -----------------------------------------------------------------------


def _heap(nbytes: int) -> bytes:
    from bench.corpus import heap_pages

    data: bytes = heap_pages(nbytes)
    return data[: len(data) - len(data) % PAGE]


@contextlib.contextmanager
def _load_note() -> Iterator[dict[str, Any]]:
    """Load averages and this process tree's CPU around the run (was the machine busy?)."""
    note: dict[str, Any] = {"loadavg_before": list(os.getloadavg()), "cpus": os.cpu_count()}
    yield note
    note["loadavg_after"] = list(os.getloadavg())


def run(quick: bool) -> dict[str, Any]:
    from zcached.config import Config

    data = _heap((32 if quick else 256) * MiB)
    runtime, cycles = (8, 1) if quick else (15, 3)
    threads = Config(size=PAGE).worker_threads
    result: dict[str, Any] = {"corpus_bytes": len(data), "fuse_threads": threads}
    with _load_note() as note, Server(len(data), threads) as server:
        result["memory"] = memory(server, data)
        result["io"] = {
            rw: io_drop(server, data, rw, runtime, cycles) for rw in ("randread", "randwrite")
        }
    result["machine_load"] = note
    mem = result["memory"]
    result["summary"] = {
        "pool_vs_zram_compacted": mem["half_discarded_compacted"]["pool_vs_zram"],
        "pool_plus_metadata_vs_zram_compacted": mem["half_discarded_compacted"][
            "pool_plus_metadata_vs_zram"
        ],
        "compactor_wall_seconds": mem["compactor"]["wall_seconds"],
        "compactor_cpu_seconds": mem["compactor"]["cpu_seconds"],
        "objects_moved": mem["compactor"]["objects_moved"],
        "randread_running_vs_idle": result["io"]["randread"]["running_vs_idle"],
        "randwrite_running_vs_idle": result["io"]["randwrite"]["running_vs_idle"],
    }
    return result


def summary(result: dict[str, Any]) -> str:
    s = result["summary"]
    return (
        f"compact: pool {s['pool_vs_zram_compacted']}x zram after compaction "
        f"(+metadata {s['pool_plus_metadata_vs_zram_compacted']}x), compactor "
        f"{s['compactor_wall_seconds']} s wall / {s['compactor_cpu_seconds']} s CPU, "
        f"{s['objects_moved']} moved; 4K IOPS while compacting / idle: read "
        f"{s['randread_running_vs_idle']}, write {s['randwrite_running_vs_idle']}"
    )


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        if len(argv) != 4 or not argv[2].isdigit() or not argv[3].isdigit():
            print("usage: python -m bench.compact_bench serve MNT SIZE THREADS", file=sys.stderr)
            return 2
        serve(argv[1], int(argv[2]), int(argv[3]))
        return 0
    print(json.dumps(run("--quick" in argv), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
