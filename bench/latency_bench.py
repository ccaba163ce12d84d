"""Latency benchmark: 4K reads one at a time (QD1), as a faulting process sees its swap device.

Owns: ``run(quick) -> dict`` for the bench runner: fio ``randread`` 4K at iodepth 1 (psync,
O_DIRECT) over written real heap pages (bench.corpus), mean and p99 completion latency, on
kernel zram (lz4, under bench/zram.py's lock), on zcached's loop device and its FUSE file with
each variant in VARIANTS (``io_spin_us``, the daemon's adaptive polling, 0 = off, the default;
``io_transport``: /dev/fuse, the default, or FUSE over io_uring where the kernel has it), and
on a file of the root disk through a loop device (what disk swap reads through), plus the
daemon's CPU per read (spinning included); and 4K random reads at depth 32 (libaio) through
each loop device, in reads per second.
Must not: assert on speed, or leave anything behind (loop devices, mounts, daemons, the disk
file are torn down in ``finally`` blocks).

Run alone: ``.venv/bin/python -m bench.latency_bench [--quick]`` prints the dict as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.io_bench import _detach, _losetup, fill_direct

MiB = 1 << 20
# name -> (io_spin_us, io_transport); "uring" only where the kernel offers it
VARIANTS = {"spin0": (0, "dev"), "spin50": (50, "dev"), "uring": (0, "uring")}


def fio_qd1(dev: str, size: int, runtime: float) -> dict[str, float]:
    """4K random reads at depth 1 (psync, O_DIRECT) for ``runtime`` s: mean and p99 in us."""
    args = ["fio", "--name=qd1", f"--filename={dev}", "--rw=randread", "--bs=4k",
            "--ioengine=psync", "--direct=1", f"--size={size}", "--output-format=json",
            "--randrepeat=0", "--norandommap=1", f"--runtime={runtime}", "--time_based=1",
            "--percentile_list=50:99"]  # fmt: skip
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio on {dev}: error {job['error']}")
    clat = job["read"]["clat_ns"]
    pct = clat["percentile"]
    return {
        "reads": job["read"]["total_ios"],
        "mean_us": round(clat["mean"] / 1000, 1),
        "p50_us": round(pct["50.000000"] / 1000, 1),
        "p99_us": round(pct["99.000000"] / 1000, 1),
    }


def fio_qd32(dev: str, size: int, runtime: float) -> float:
    """4K random reads at depth 32 (libaio, O_DIRECT) for ``runtime`` s: reads per second."""
    args = ["fio", "--name=qd32", f"--filename={dev}", "--rw=randread", "--bs=4k",
            "--ioengine=libaio", "--iodepth=32", "--direct=1", f"--size={size}",
            "--output-format=json", "--randrepeat=0", "--norandommap=1",
            f"--runtime={runtime}", "--time_based=1"]  # fmt: skip
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio on {dev}: error {job['error']}")
    return round(float(job["read"]["iops"]))


def _both(dev: str, size: int, runtime: float) -> dict[str, Any]:
    r: dict[str, Any] = fio_qd1(dev, size, runtime)
    r["qd32_iops"] = fio_qd32(dev, size, runtime)
    return r


def _zram(corpus: bytes, runtime: float) -> dict[str, Any]:
    from bench.zram import Zram

    with Zram(len(corpus), algorithm="lz4") as z:
        z.write_pages(corpus)
        return _both(z.path, len(corpus), runtime)


def _disk(corpus: bytes, runtime: float) -> dict[str, Any]:
    """A file of the root file system on a loop device (direct I/O), as disk swap reads."""
    with tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="zcached-latency-") as f:
        f.truncate(len(corpus))
        loop = _losetup(f.name)
        try:
            fill_direct(loop, corpus)
            return _both(loop, len(corpus), runtime)
        finally:
            _detach(loop)


@contextlib.contextmanager
def _daemon(size: int, variant: str, work: str) -> Iterator[Any]:
    from bench.swap_bench import Daemon

    spin_us, transport = VARIANTS[variant]
    conf = Path(work) / f"{variant}.toml"
    conf.write_text(f'io_spin_us = {spin_us}\nio_transport = "{transport}"\n'
                    "[recompress]\nenabled = false\n")  # fmt: skip
    os.mkdir(Path(work) / variant)
    d = Daemon(size, str(Path(work) / variant), swap=False,
               extra=["--config", str(conf)])  # fmt: skip
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _zcached(corpus: bytes, runtime: float, variant: str) -> dict[str, Any]:
    from bench.recompress_bench import _pids
    from bench.swap_bench import cpu_seconds

    with tempfile.TemporaryDirectory(prefix="zcached-latency-") as work, \
            _daemon(len(corpus), variant, work) as d:  # fmt: skip
        fill_direct(d.device, corpus)
        pids = _pids(d)
        out: dict[str, Any] = {}
        for name, path in (("file", d.device), ("loop", "")):
            loop = _losetup(d.device) if name == "loop" else ""
            try:
                c0, s0 = cpu_seconds(pids), d.counters()
                r = fio_qd1(loop or path, len(corpus), runtime)
                reads = d.counters()["read_requests"] - s0["read_requests"]
                r["daemon_cpu_us_per_read"] = round(
                    (cpu_seconds(pids) - c0) / max(1, reads) * 1e6, 1
                )
                if loop:
                    r["qd32_iops"] = fio_qd32(loop, len(corpus), runtime)
                out[name] = r
            finally:
                if loop:
                    _detach(loop)
        return out


def run(quick: bool) -> dict[str, Any]:
    from bench.corpus import heap_pages

    size = (64 if quick else 256) * MiB
    runtime = 3 if quick else 10
    corpus = heap_pages(size)
    zram = _zram(corpus, runtime)
    res: dict[str, Any] = {"device_MiB": size // MiB, "zram_lz4": zram}
    from zcached.transport import unavailable

    names = [v for v in VARIANTS if v != "uring" or unavailable() is None]
    for v in names:
        res[f"zcached_{v}"] = _zcached(corpus, runtime, v)
    res["disk_loop"] = _disk(corpus, runtime)
    res["ratio_to_zram"] = {
        f"{v}_{where}_mean": round(res[f"zcached_{v}"][where]["mean_us"] / zram["mean_us"], 2)
        for v in names for where in ("file", "loop")
    } | {
        f"{v}_loop_qd32_iops": round(res[f"zcached_{v}"]["loop"]["qd32_iops"]
                                     / zram["qd32_iops"], 2)
        for v in names
    }  # fmt: skip
    return res


def summary(res: dict[str, Any]) -> str:
    z = res["zram_lz4"]
    parts = [f"zram {z['mean_us']} us (p99 {z['p99_us']})"]
    for v in VARIANTS:
        if f"zcached_{v}" not in res:
            continue
        r = res[f"zcached_{v}"]
        parts.append(f"zcached {v}: loop {r['loop']['mean_us']} us (p99 "
                     f"{r['loop']['p99_us']}, QD32 {r['loop']['qd32_iops']}/s),"
                     f" file {r['file']['mean_us']} us")  # fmt: skip
    d = res["disk_loop"]
    parts.append(f"disk {d['mean_us']} us (p99 {d['p99_us']})")
    return "latency 4K QD1: " + "; ".join(parts)


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=1))
