"""bench/io_bench: zcached's block I/O through FUSE + loop device against kernel zram (lz4).

Owns: the end-to-end I/O benchmark (``run(quick) -> dict``, called by the bench orchestrator)
and the FUSE-layer comparison behind the decision in zcached/fuse.py (raw /dev/fuse protocol vs
pyfuse3, same trivial backend, same fio job).
Must not: assert on speed (it reports), or leave anything behind: every loop device, mount,
server process and zram device it sets up is torn down in ``finally`` blocks.

Method: one fio job per figure (libaio, direct=1).  zcached is the real daemon
(``zcached run --no-swap`` in its own process, so the benchmark never holds its GIL) with
``losetup --direct-io=on`` on its swap.img; zram is /dev/zram0 (lz4) used directly.  Per device,
in this order: 1 MiB sequential write (fio's data, 65% compressible per 4K); then the whole
device is overwritten with real heap pages (bench.corpus.heap_pages, 1 MiB O_DIRECT writes one
at a time, timed) and memory is read (zcached status + daemon RSS growth, zram mm_stat); then
1 MiB sequential read and 4K random read at iodepth 32 of those pages.
The FUSE-layer comparison (``compare_fronts``) serves a trivial backend through
bench/fuse_fronts.py (raw protocol vs pyfuse3).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the two devices under test -------------------------------------------------------------

Mem = Callable[[], dict[str, Any]]


@contextlib.contextmanager
def zram_dev(size: int) -> Iterator[tuple[str, Mem]]:
    """/dev/zram0 (lz4) via bench.zram.Zram (machine-wide lock, always reset)."""
    from bench.zram import Zram

    with Zram(size, algorithm="lz4") as z:

        def mem() -> dict[str, Any]:
            mm = z.mm_stat()
            return {k: mm[k] for k in ("orig_data_size", "compr_data_size", "mem_used_total")}

        yield z.path, mem


@contextlib.contextmanager
def daemon_loop(size: int) -> Iterator[tuple[str, Mem]]:
    """The real daemon (``zcached run --no-swap``) and a loop device (direct I/O) on its file."""
    from bench.swap_bench import Daemon, cpu_seconds, pss

    with tempfile.TemporaryDirectory(prefix="zcached-iobench-") as tmp:
        d = Daemon(size, tmp, swap=False)
        loop = None
        try:
            d.start()
            assert d.proc is not None
            pids = [d.proc.pid, int(d.status()["server_pid"])]  # the keeper and its server
            rss0, cpu0 = pss(pids), cpu_seconds(pids)
            loop = _losetup(d.device)

            def mem() -> dict[str, Any]:
                st = d.status()
                out = {k: st.get(k) for k in ("orig_data_size", "compr_data_size")}
                out["mem_used_total"] = st.get("mem_used_total")
                out["daemon_rss_growth_bytes"] = pss(pids) - rss0
                out["daemon_cpu_s"] = round(cpu_seconds(pids) - cpu0, 2)
                return out

            yield loop, mem
        finally:
            if loop:
                _detach(loop)
            d.stop()
            with open("/proc/mounts") as f:
                if any(ln.split()[1] == d.mnt for ln in f if ln.strip()):
                    subprocess.run(["umount", "-l", d.mnt], check=False)


def _losetup(image: str) -> str:
    return subprocess.run(
        ["losetup", "--direct-io=on", "--show", "-f", image],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def _detach(loop: str) -> None:
    subprocess.run(["losetup", "-d", loop], check=False)
    for _ in range(50):  # detach is asynchronous: wait until the file is closed
        if not os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop"):
            break
        time.sleep(0.1)


# ---- zcached front in its own process + loop device ------------------------------------------


@contextlib.contextmanager
def served_loop(front: str, backend: str, size_mib: int, threads: int) -> Iterator[str]:
    """A loop device (``--direct-io=on``) over swap.img served by bench/fuse_fronts.py."""
    with tempfile.TemporaryDirectory(prefix="zcached-iobench-") as tmp:
        mnt = os.path.join(tmp, "mnt")
        os.mkdir(mnt)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fuse_fronts", front, backend, mnt, str(size_mib),
             str(threads)],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        loop = None
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{front} front did not start: {line!r}")
            image = os.path.join(mnt, "swap.img")
            for _ in range(50):  # pyfuse3 prints ready before its loop runs
                if os.path.exists(image):
                    break
                time.sleep(0.1)
            loop = _losetup(image)
            yield loop
        finally:
            if loop:
                _detach(loop)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with open("/proc/mounts") as f:
                if any(ln.split()[1] == mnt for ln in f):
                    subprocess.run(["umount", "-l", mnt], check=False)


# ---- fio --------------------------------------------------------------------------------------


def fio(dev: str, rw: str, bs: str, iodepth: int, runtime: float, size: int, **extra: Any
        ) -> dict[str, float]:  # fmt: skip
    """One fio job on ``dev``; returns iops, MB/s (10^6 bytes/s) and mean completion latency."""
    args = ["fio", "--name=job", f"--filename={dev}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={iodepth}", "--ioengine=libaio", "--direct=1", f"--size={size}",
            "--output-format=json", "--randrepeat=0", "--norandommap=1"]  # fmt: skip
    if runtime:
        args += [f"--runtime={runtime}", "--time_based=1"]
    args += [f"--{k}={v}" for k, v in extra.items()]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    part = job["read"] if "read" in rw or rw == "randread" else job["write"]
    if job.get("error"):
        raise RuntimeError(f"fio {rw} on {dev}: error {job['error']}")
    return {
        "iops": round(part["iops"], 1),
        "MBps": round(part["bw_bytes"] / 1e6, 1),
        "clat_mean_us": round(part["clat_ns"]["mean"] / 1000, 1),
    }


def fill_direct(dev: str, data: bytes) -> float:
    """Write ``data`` from offset 0 in 1 MiB O_DIRECT writes (one at a time), fsync; MB/s."""
    buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT needs
    view = memoryview(data)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        t0 = time.perf_counter()
        for off in range(0, len(data), 1 << 20):
            chunk = view[off : off + (1 << 20)]
            buf[: len(chunk)] = chunk
            os.pwrite(fd, memoryview(buf)[: len(chunk)], off)
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
        buf.close()
    return round(len(data) / dt / 1e6, 1)


def _measure(dev: str, size: int, corpus: bytes, runtime: float, mem: Mem) -> dict[str, Any]:
    """fio write (fio's data), then the device filled with the corpus, then the read tests."""
    w = fio(dev, "write", "1M", 4, 0, size, buffer_compress_percentage=65,
            buffer_compress_chunk=4096, refill_buffers=1)  # fmt: skip
    fill = fill_direct(dev, corpus)
    filled = mem()
    r = fio(dev, "read", "1M", 4, runtime, size)
    rr = fio(dev, "randread", "4k", 32, runtime, size)
    return {
        "seq_write_1M_MBps": w["MBps"],
        "corpus_write_1M_qd1_MBps": fill,
        "seq_read_1M_MBps": r["MBps"],
        "randread_4k_qd32_iops": rr["iops"],
        "randread_4k_qd32_clat_us": rr["clat_mean_us"],
        "memory_after_fill": filled,
    }


def compare_fronts(quick: bool) -> dict[str, Any]:
    """The FUSE-layer decision: raw protocol vs pyfuse3, trivial backend, same fio jobs."""
    size_mib = 256
    runtime = 3 if quick else 8
    res: dict[str, Any] = {}
    configs = [("pyfuse3", 1), ("raw", 1), ("raw", 2), ("raw", 4)]
    for front, threads in configs:
        key = f"{front}_t{threads}" if front == "raw" else front
        with served_loop(front, "dict", size_mib, threads) as dev:
            rr = fio(dev, "randread", "4k", 32, runtime, size_mib << 20)
            sr = fio(dev, "read", "1M", 4, runtime, size_mib << 20)
            sw = fio(dev, "write", "1M", 4, runtime, size_mib << 20)
        res[key] = {
            "randread_4k_qd32_iops": rr["iops"],
            "randread_4k_qd32_clat_us": rr["clat_mean_us"],
            "seq_read_1M_MBps": sr["MBps"],
            "seq_write_1M_MBps": sw["MBps"],
        }
    return res


def run(quick: bool) -> dict[str, Any]:
    from bench.corpus import heap_pages

    size_mib = 128 if quick else 512
    size = size_mib << 20
    runtime = 3 if quick else 10
    corpus = heap_pages(size)
    with zram_dev(size) as (zdev, zmem):
        k = _measure(zdev, size, corpus, runtime, zmem)
    with daemon_loop(size) as (dev, dmem):
        z = _measure(dev, size, corpus, runtime, dmem)
    ratio = {key: round(z[key] / k[key], 3) for key in z
             if key.endswith(("MBps", "iops")) and k[key]}  # fmt: skip
    zm, km = z["memory_after_fill"], k["memory_after_fill"]
    ratio["mem_used_total"] = round(zm["mem_used_total"] / km["mem_used_total"], 3)
    ratio["daemon_rss_growth_vs_zram_mem_used_total"] = round(
        zm["daemon_rss_growth_bytes"] / km["mem_used_total"], 3
    )
    res: dict[str, Any] = {
        "device_MiB": size_mib,
        "corpus": f"bench.corpus.heap_pages({size})",
        "zram_lz4": k,
        "zcached": z,
        "ratio_to_zram": ratio,
    }
    res["fuse_front_compare_dict_backend"] = compare_fronts(quick)
    return res


def summary(res: dict[str, Any]) -> str:
    q = res["ratio_to_zram"]
    return "io (zcached/zram): " + ", ".join(f"{k} {v}x" for k, v in q.items())


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    print(json.dumps(run(quick), indent=2))
