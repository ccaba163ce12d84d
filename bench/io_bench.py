"""bench/io_bench: zcached's block I/O through FUSE + loop device against kernel zram (lz4).

Owns: the end-to-end I/O benchmark (``run(quick) -> dict``, called by the bench orchestrator)
and the FUSE-layer comparison behind the decision in zcached/fuse.py (raw /dev/fuse protocol vs
pyfuse3, same trivial backend, same fio job).
Must not: assert on speed (it reports), or leave anything behind: every loop device, mount,
server process and zram device it sets up is torn down in ``finally`` blocks.

Method: one fio job per figure (libaio, direct=1, through ``losetup --direct-io=on`` for
zcached; on /dev/zramN directly for zram).  Per device, in this order: 1 MiB sequential write
(fio data, 65% compressible per 4K), then the whole device is filled with the same corpus
bytes (bench.corpus.heap_pages when available), then 1 MiB sequential read and 4K random read
at iodepth 32 of that data.  The zcached server runs in its own process
(bench/fuse_fronts.py) so the benchmark itself never holds its GIL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- corpus and zram (bench/corpus.py, bench/zram.py when they exist) ------------------------


def _corpus(nbytes: int) -> tuple[bytes, str]:
    try:
        from bench.corpus import heap_pages

        return heap_pages(nbytes), "bench.corpus.heap_pages"
    except ImportError:
        # Stand-in until bench/corpus.py lands: pages of word-like text, small integers and
        # zero runs (compresses ~3x with lz4, like typical anonymous memory).
        import random

        rnd = random.Random(1234)
        words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rnd.randint(3, 12)))
                 for _ in range(512)]  # fmt: skip
        out = bytearray()
        while len(out) < nbytes:
            kind = rnd.random()
            if kind < 0.15:
                out += bytes(4096)
            elif kind < 0.6:
                page = bytearray()
                while len(page) < 4096:
                    page += rnd.choice(words) + b" "
                out += page[:4096]
            else:
                ints = [rnd.randint(0, 1 << rnd.choice((8, 16, 32))) for _ in range(512)]
                out += b"".join(i.to_bytes(8, "little") for i in ints)
        return bytes(out[:nbytes]), "fallback (bench.corpus missing)"


@contextlib.contextmanager
def _zram(size: int) -> Iterator[str]:
    try:
        from bench.zram import Zram
    except ImportError:
        Zram = None
    if Zram is not None:
        with Zram(size, algorithm="lz4") as z:
            yield z.path
        return
    dev = subprocess.run(
        ["zramctl", "--find", "--size", str(size), "--algorithm", "lz4"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["zramctl", "--reset", dev], check=False)


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
            loop = subprocess.run(
                ["losetup", "--direct-io=on", "--show", "-f", image],
                check=True, capture_output=True, text=True,
            ).stdout.strip()  # fmt: skip
            yield loop
        finally:
            if loop:
                subprocess.run(["losetup", "-d", loop], check=False)
                for _ in range(50):  # detach is asynchronous: wait until the file is closed
                    if not os.path.exists(f"/sys/block/{os.path.basename(loop)}/loop"):
                        break
                    time.sleep(0.1)
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


def _fill(dev: str, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        view = memoryview(data)
        for off in range(0, len(data), 1 << 20):
            os.pwrite(fd, view[off : off + (1 << 20)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _measure(dev: str, size: int, corpus: bytes, runtime: float) -> dict[str, float]:
    w = fio(dev, "write", "1M", 4, 0, size, buffer_compress_percentage=65,
            buffer_compress_chunk=4096, refill_buffers=1)  # fmt: skip
    _fill(dev, corpus)
    r = fio(dev, "read", "1M", 4, runtime, size)
    rr = fio(dev, "randread", "4k", 32, runtime, size)
    return {
        "seq_write_1M_MBps": w["MBps"],
        "seq_read_1M_MBps": r["MBps"],
        "randread_4k_qd32_iops": rr["iops"],
        "randread_4k_qd32_clat_us": rr["clat_mean_us"],
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
    size_mib = 128 if quick else 512
    size = size_mib << 20
    runtime = 3 if quick else 10
    corpus, corpus_src = _corpus(size)
    with _zram(size) as zdev:
        k = _measure(zdev, size, corpus, runtime)
    res: dict[str, Any] = {"device_MiB": size_mib, "corpus": corpus_src, "zram_lz4": k}
    # 1 worker thread is best for 4K requests on 2 cores (no GIL hand-offs), 2 for 1 MiB ones.
    for threads in (1, 2):
        with served_loop("raw", "store", size_mib, threads) as dev:
            z = _measure(dev, size, corpus, runtime)
        res[f"zcached_t{threads}"] = z
        res[f"ratio_zcached_t{threads}_to_zram"] = {
            key: round(z[key] / k[key], 3) for key in z if not key.endswith("_us") and k[key]
        }
    res["fuse_front_compare_dict_backend"] = compare_fronts(quick)
    return res


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    print(json.dumps(run(quick), indent=2))
