"""Transport benchmark: FUSE over /dev/fuse against FUSE over io_uring, nothing else.

Owns: ``run(quick) -> dict`` for the bench runner.  bench/uring_probe.c (built here with the
system compiler) serves one RAM file (memcpy, no compression, no checksums) over either
transport; fio reads 4K at depth 1 (psync) and at depth 32 (libaio) from its file and from a
loop device (direct I/O) on it, with O_DIRECT; the probe's CPU per read is taken from
/proc.  io_uring needs the fuse module parameter ``enable_uring``: it is set to Y for the run
and put back as it was in a ``finally`` block (it only changes what new connections may
negotiate).  Skipped, with the reason, where the kernel has no FUSE io_uring.
Must not: leave a mount, a loop device or a probe process behind.

Run alone: ``.venv/bin/python -m bench.transport_bench [--quick]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.io_bench import _detach, _losetup, fio
from bench.latency_bench import fio_qd1

HERE = Path(__file__).resolve().parent
PARAM = Path("/sys/module/fuse/parameters/enable_uring")
SIZE = 256 << 20  # the probe's file


def _build(out: str) -> str:
    exe = os.path.join(out, "uring_probe")
    subprocess.run(["gcc", "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", exe,
                    str(HERE / "uring_probe.c"), "-lpthread"], check=True)  # fmt: skip
    return exe


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _probe(exe: str, mode: str, work: str, served: dict[str, int]) -> Iterator[tuple[str, int]]:
    mnt = os.path.join(work, f"mnt-{mode}")
    os.mkdir(mnt)
    proc = subprocess.Popen([exe, mnt, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"uring_probe {mode}: {line!r} {err.strip()}")
        yield os.path.join(mnt, "swap.img"), proc.pid
    finally:
        subprocess.run(["umount", mnt], check=False, capture_output=True)
        try:
            _, err = proc.communicate(timeout=10)
            for ln in err.splitlines():  # "served: dev N uring M": which transport answered
                if ln.startswith("served:"):
                    f = ln.split()
                    served.update({f[1]: int(f[2]), f[3]: int(f[4])})
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with open("/proc/mounts") as f:
            if any(ln.split()[1] == mnt for ln in f if ln.strip()):
                subprocess.run(["umount", "-l", mnt], check=False)


def _measure(path: str, pid: int, runtime: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fill = subprocess.run(["dd", "if=/dev/urandom", f"of={path}", "bs=1M",
                           f"count={SIZE >> 20}", "oflag=direct", "conv=notrunc"],
                          capture_output=True)  # fmt: skip
    if fill.returncode:
        raise RuntimeError(f"fill {path}: {fill.stderr.decode().strip()[-200:]}")
    for where in ("file", "loop"):
        dev = _losetup(path) if where == "loop" else path
        try:
            c0 = _cpu_s(pid)
            qd1 = fio_qd1(dev, SIZE, runtime)
            qd1["probe_cpu_us_per_read"] = round((_cpu_s(pid) - c0) / qd1["reads"] * 1e6, 2)
            qd32 = fio(dev, "randread", "4k", 32, runtime, SIZE)
            out[where] = {"qd1": qd1, "qd32_iops": qd32["iops"]}
        finally:
            if where == "loop":
                _detach(dev)
    return out


def run(quick: bool) -> dict[str, Any]:
    if not PARAM.exists():
        return {"skipped": "this kernel has no FUSE over io_uring (no fuse.enable_uring)"}
    runtime = 3 if quick else 10
    before = PARAM.read_text().strip()
    res: dict[str, Any] = {"enable_uring_before": before}
    with tempfile.TemporaryDirectory(prefix="zcached-transport-") as work:
        exe = _build(work)
        try:
            PARAM.write_text("Y")
        except OSError as e:
            return {"skipped": f"fuse.enable_uring cannot be set: {e.strerror}"}
        try:
            for mode in ("dev", "uring"):
                served: dict[str, int] = {}
                with _probe(exe, mode, work, served) as (path, pid):
                    res[mode] = _measure(path, pid, runtime)
                res[mode]["requests_served"] = served
                time.sleep(0.5)
        finally:
            PARAM.write_text(before)
    res["uring_vs_dev"] = {
        f"{where}_qd1_mean": round(res["uring"][where]["qd1"]["mean_us"]
                                   / res["dev"][where]["qd1"]["mean_us"], 3)
        for where in ("file", "loop")
    } | {
        f"{where}_qd32_iops": round(res["uring"][where]["qd32_iops"]
                                    / res["dev"][where]["qd32_iops"], 3)
        for where in ("file", "loop")
    }  # fmt: skip
    return res


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"transport: skipped ({res['skipped']})"
    parts = []
    for mode in ("dev", "uring"):
        for where in ("file", "loop"):
            q = res[mode][where]
            parts.append(f"{mode} {where}: QD1 {q['qd1']['mean_us']} us, "
                         f"QD32 {q['qd32_iops'] / 1000:.1f}K IOPS")  # fmt: skip
    return "transport (probe, RAM file): " + "; ".join(parts)


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=1))
