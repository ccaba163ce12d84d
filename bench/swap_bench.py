"""bench/swap_bench: the real swap workload, zcached (the daemon) against kernel zram (lz4).

Owns: ``run(quick) -> dict`` for the bench runner: a swap-heavy Python child in a memory-limited
cgroup v1 (``/sys/fs/cgroup/memory/zcached-bench-<pid>``, swappiness 100) that fills N MiB with
real heap pages (bench.corpus), then reads, verifies and rewrites every page in a fresh random
order for a few passes; run once with the zcached daemon (``zcached run --swap``, started as a
subprocess OUTSIDE the cgroup) as the only swap and once with /dev/zram0 (lz4, mkswap + swapon,
same priority and discard flag as the daemon) as the only swap; same data, same limit.  This
module runs 1x (512 MiB in 128 MiB); bench/swapscale_bench.py runs 2x and 4x through
``run_factors`` (the limit scales with the data so the workload keeps its shape).
Must NOT: assert on speed, run when other swap is active (the result says "skipped" and why),
or leave anything behind: swapoff, zram reset (bench.zram.Zram), cgroup rmdir and SIGTERM of
the daemon pid it started happen in ``finally`` blocks.

Data: page i of the child's buffer is corpus page ``perm[i % C]`` (C corpus pages, seeded
permutation) with its first 8 bytes replaced by a stamp (i, pass), so every page is distinct
and a page coming back from the wrong slot or a stale write is caught.  Each pass checks the
stamp and the other 4088 bytes against the corpus, then writes the next stamp (so every pass
dirties every page and swap sees writes as well as reads).

Figures per backend: wall time of the fill and of the passes (measured in the child; the parent
pauses the child between them only to read memory), the child's major faults (/proc/self/stat)
and the cgroup's (memory.stat total_pgmajfault), swap used (/proc/swaps) and memory after the
fill: zcached's status ``mem_used_total`` and its daemon's memory growth, zram's mm_stat
``mem_used_total`` -- and the ratios zcached / zram.  The daemon is two processes, the keeper
(``zcached run``) and its server, sharing the arena: its memory is the sum of their Pss (each
shared page counted once in all), its CPU the sum of theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PAGE = 4096
REPO = Path(__file__).resolve().parent.parent
CG_ROOT = Path("/sys/fs/cgroup/memory")
CORPUS_BYTES = 256 << 20  # the cached full corpus; larger data reuse its pages with new stamps
PRIORITY = 100  # the daemon's default --swap-priority
CHILD_TIMEOUT = 3600.0

# The swap-heavy program.  argv: corpus path, bytes, passes, seed.  Prints "filled" after the
# fill and waits for a line on stdin; prints one JSON line at the end; exit 3 on a bad page.
CHILD = r"""
import array, json, mmap, random, sys, time
path, nbytes, passes, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
P = 4096
n = nbytes // P
f = open(path, "rb")
src = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
C = len(src) // P
rng = random.Random(seed)
perm = array.array("I", range(C))
rng.shuffle(perm)

def majflt():
    with open("/proc/self/stat") as s:
        return int(s.read().rsplit(")", 1)[1].split()[9])

def stamp(i, p):
    return (i * 256 + p).to_bytes(8, "little")

buf = bytearray(nbytes)
m0, t0 = majflt(), time.perf_counter()
for i in range(n):
    o = i * P
    s = perm[i % C] * P
    buf[o : o + P] = src[s : s + P]
    buf[o : o + 8] = stamp(i, 0)
fill_s, fill_mf = time.perf_counter() - t0, majflt() - m0
print("filled", flush=True)
sys.stdin.readline()
bad = 0
first_bad = []
pass_s = []
order = array.array("I", range(n))
m1 = majflt()
for p in range(1, passes + 1):
    rng.shuffle(order)
    t = time.perf_counter()
    for i in order:
        o = i * P
        s = perm[i % C] * P
        if buf[o : o + 8] != stamp(i, p - 1) or buf[o + 8 : o + P] != src[s + 8 : s + P]:
            bad += 1
            if len(first_bad) < 5:
                first_bad.append(i)
        buf[o : o + 8] = stamp(i, p)
    pass_s.append(time.perf_counter() - t)
print(json.dumps({"fill_s": fill_s, "fill_majflt": fill_mf, "pass_s": pass_s,
                  "passes_majflt": majflt() - m1, "pages": n, "bad_pages": bad,
                  "first_bad": first_bad}), flush=True)
sys.exit(3 if bad else 0)
"""


class OomKilledError(RuntimeError):
    """The memory cgroup's OOM killer ended the child (memcg reclaim gave up)."""


class SkipError(RuntimeError):
    """The benchmark cannot run here (other swap active, no cgroup v1 memory controller)."""


# ---- small readers ----------------------------------------------------------------------------


def active_swaps() -> list[str]:
    with open("/proc/swaps") as f:
        return [ln.split()[0] for ln in f.readlines()[1:] if ln.strip()]


def swap_used(dev: str) -> int:
    """Bytes used on swap device ``dev`` (by its /proc/swaps name or realpath)."""
    real = os.path.realpath(dev)
    with open("/proc/swaps") as f:
        for ln in f.readlines()[1:]:
            parts = ln.split()
            if parts and os.path.realpath(parts[0]) == real:
                return int(parts[3]) * 1024
    return 0


def pss(pids: list[int]) -> int:
    """Bytes of memory of these processes, each page shared between them counted once
    (the sum of their Pss, /proc/PID/smaps_rollup)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for ln in f:
                if ln.startswith("Pss:"):
                    total += int(ln.split()[1]) * 1024
    return total


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def memory_stat(cg: Path) -> dict[str, int]:
    out = {}
    for ln in (cg / "memory.stat").read_text().splitlines():
        k, v = ln.split()
        out[k] = int(v)
    return out


def oom_kills(cg: Path) -> int:
    for ln in (cg / "memory.oom_control").read_text().splitlines():
        if ln.startswith("oom_kill "):
            return int(ln.split()[1])
    return 0


def _wait_swaps_clear(timeout: float) -> None:
    """Wait (other helpers' tests may hold swap briefly) until no swap is active, or skip."""
    end = time.monotonic() + timeout
    while active_swaps():
        if time.monotonic() > end:
            raise SkipError(
                f"swap bench skipped: other swap is active ({', '.join(active_swaps())}); "
                "it needs zcached or zram to be the only swap"
            )
        time.sleep(2)


# ---- the cgroup and the child -----------------------------------------------------------------


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    if not (CG_ROOT / "memory.limit_in_bytes").exists():
        raise SkipError(f"swap bench skipped: no cgroup v1 memory controller at {CG_ROOT}")
    cg = CG_ROOT / f"zcached-bench-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        (cg / "memory.swappiness").write_text("100")
        yield cg
    finally:
        for _ in range(100):  # the child is gone; its css may take a moment to go offline
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_child(
    cg: Path, corpus: Path, nbytes: int, passes: int, on_filled: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """Run the swap-heavy child in ``cg``; ``on_filled()`` snapshots memory while it waits."""
    procs = cg / "cgroup.procs"

    def enter_cgroup() -> None:  # runs in the child between fork and exec
        procs.write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(corpus), str(nbytes), str(passes), "7"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=enter_cgroup,
    )
    timer = threading.Timer(CHILD_TIMEOUT, proc.kill)  # our own child, by pid
    timer.start()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "filled":
            _raise_died(cg, proc.wait(), "during the fill")
        snap = on_filled()
        snap["cgroup_swap_bytes"] = memory_stat(cg).get("swap", 0)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        out = proc.stdout.readline()
        rc = proc.wait()
        wall = time.perf_counter() - t0
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if not out.strip():
        _raise_died(cg, rc, "before its result")
    res: dict[str, Any] = json.loads(out)
    if rc != 0 or res["bad_pages"]:
        raise RuntimeError(
            f"swap child found {res['bad_pages']} bad pages (first {res['first_bad']}), rc={rc}"
        )
    st = memory_stat(cg)
    return {
        "wall_s": round(res["fill_s"] + sum(res["pass_s"]), 3),
        "fill_s": round(res["fill_s"], 3),
        "passes_s": round(sum(res["pass_s"]), 3),
        "process_s": round(wall, 3),
        "majflt_fill": res["fill_majflt"],
        "majflt_passes": res["passes_majflt"],
        "cgroup_pgmajfault": st.get("total_pgmajfault", st.get("pgmajfault", 0)),
        "cgroup_max_usage_bytes": int((cg / "memory.max_usage_in_bytes").read_text()),
        "pages_verified": res["pages"] * passes,
        "at_fill": snap,
    }


def _raise_died(cg: Path, rc: int, when: str) -> None:
    kills = oom_kills(cg)
    if rc == -signal.SIGKILL and kills:
        raise OomKilledError(f"swap child OOM-killed in its cgroup {when} (oom_kill {kills})")
    raise RuntimeError(f"swap child died {when} (rc={rc})")


# ---- the two swap backends --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _zcached_bin() -> str:
    exe = Path(sys.executable).parent / "zcached"
    if exe.exists():
        return str(exe)
    found = shutil.which("zcached")
    if not found:
        raise SkipError("swap bench skipped: no zcached executable next to python or on PATH")
    return found


class Daemon:
    """``zcached run --swap`` as a subprocess (this process's child, outside the cgroup)."""

    def __init__(
        self, size: int, workdir: str, *, swap: bool = True, extra: list[str] | None = None
    ) -> None:
        self.size = size
        self.swap = swap
        self.extra = list(extra or [])
        self.mnt = os.path.join(workdir, "mnt")
        os.mkdir(self.mnt)
        self.log = os.path.join(workdir, "zcached.log")
        self.addr = f"127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.device = ""

    def start(self) -> None:
        argv = [_zcached_bin(), "run", "--size", str(self.size), "--mountpoint", self.mnt,
                "--metrics-listen", self.addr]  # fmt: skip
        argv += ["--swap", "--swap-priority", str(PRIORITY)] if self.swap else ["--no-swap"]
        argv += self.extra
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            text = Path(self.log).read_text(errors="replace")
            if "zcached: ready:" in text:
                st = self.status()
                self.device = str(st["loop_device"] if self.swap else st["device"])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"zcached exited at start: {text.strip()[-300:]}")
            time.sleep(0.2)
        raise RuntimeError("zcached did not log 'zcached: ready:' within 60 s")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.addr}/status", timeout=10) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc

    def counters(self, names: dict[str, str] | None = None) -> dict[str, float]:
        """The daemon's work so far, from /metrics: pages read/written/discarded, FUSE READ and
        WRITE requests (so pages per request), compaction seconds; or the samples ``names``
        maps to the keys it gives them."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        want = names or {
            "zcached_reads_total": "pages_read",
            "zcached_writes_total": "pages_written",
            "zcached_discards_total": "pages_discarded",
            "zcached_read_request_duration_seconds_count": "read_requests",
            "zcached_write_request_duration_seconds_count": "write_requests",
            "zcached_compaction_seconds_total": "compaction_s",
        }
        return {
            want[s.name]: s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name in want
        }

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)  # our own child, by pid: swapoff, losetup -d, unmount
        try:
            p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            # Never SIGKILL a daemon that may still be swap (pages would be lost): report it.
            raise RuntimeError(f"zcached pid {p.pid} did not stop within 600 s") from None


@contextlib.contextmanager
def zcached_swap(
    size: int, extra: list[str] | None = None, counters: dict[str, str] | None = None
) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    """The daemon as the swap device (``extra``: more ``zcached run`` flags); ``mem()`` also
    reads the /metrics samples ``counters`` names (Daemon.counters)."""
    with tempfile.TemporaryDirectory(prefix="zcached-swapbench-") as tmp:
        d = Daemon(size, tmp, extra=extra)
        try:
            d.start()
            assert d.proc is not None
            pids = [d.proc.pid, int(d.status()["server_pid"])]  # the keeper and its server
            rss0, cpu0 = pss(pids), cpu_seconds(pids)

            def mem() -> dict[str, Any]:
                st = d.status()
                return {
                    "swap_used_bytes": swap_used(d.device),
                    "orig_data_size": st.get("orig_data_size"),
                    "compr_data_size": st.get("compr_data_size"),
                    "mem_used_total": st.get("mem_used_total"),
                    "daemon_rss_growth_bytes": pss(pids) - rss0,
                    "daemon_rss_idle_bytes": rss0,
                    "daemon_cpu_s": round(cpu_seconds(pids) - cpu0, 2),
                    "daemon": d.counters() | (d.counters(counters) if counters else {}),
                }

            yield d.device, mem
        finally:
            d.stop()
            with open("/proc/mounts") as f:
                if any(ln.split()[1] == d.mnt for ln in f if ln.strip()):
                    subprocess.run(["umount", "-l", d.mnt], check=False)


@contextlib.contextmanager
def zram_swap(size: int) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    from bench.zram import Zram

    with Zram(size, algorithm="lz4") as z:  # resets (and swapoffs) zram0 on exit
        subprocess.run(["mkswap", z.path], check=True, capture_output=True)
        subprocess.run(
            ["swapon", "--discard=pages", "--priority", str(PRIORITY), z.path], check=True
        )

        def mem() -> dict[str, Any]:
            mm = z.mm_stat()
            return {
                "swap_used_bytes": swap_used(z.path),
                "orig_data_size": mm["orig_data_size"],
                "compr_data_size": mm["compr_data_size"],
                "mem_used_total": mm["mem_used_total"],
                "mem_used_max": mm["mem_used_max"],
            }

        yield z.path, mem


# ---- one comparison ---------------------------------------------------------------------------


ATTEMPTS = 3


def _one(backend: str, nbytes: int, limit: int, passes: int, corpus: Path) -> dict[str, Any]:
    """One backend, up to ATTEMPTS tries: an attempt during which other swap became active
    (other users of this machine) or whose child the memcg OOM killer ended is run again; the
    counts are kept (``retries_other_swap``, ``retries_oom``).  The last attempt's figures are
    kept even if contaminated (``other_swap_seen`` says so)."""
    retries = {"retries_other_swap": 0, "retries_oom": 0}
    for attempt in range(ATTEMPTS):
        last = attempt == ATTEMPTS - 1
        try:
            res = _attempt(backend, nbytes, limit, passes, corpus)
        except OomKilledError as e:
            print(f"swap {backend} {nbytes >> 20} MiB: {e}", file=sys.stderr)
            if last:
                raise
            retries["retries_oom"] += 1
            continue
        if res["other_swap_seen"] and not last:
            print(f"swap {backend} {nbytes >> 20} MiB: other swap became active "
                  f"({', '.join(res['other_swap_seen'])}); again", file=sys.stderr)  # fmt: skip
            retries["retries_other_swap"] += 1
            continue
        res.update(retries)
        return res
    raise AssertionError("unreachable")


def _attempt(backend: str, nbytes: int, limit: int, passes: int, corpus: Path) -> dict[str, Any]:
    _wait_swaps_clear(300)
    size = nbytes + (64 << 20)
    if backend == "zram":
        ctx = zram_swap(size)
    else:  # "zcached", or "zcached_uring": the daemon with io_transport = uring
        ctx = zcached_swap(size, ["--io-transport", "uring"] if backend.endswith("uring") else None)
    with ctx as (dev, mem), memory_cgroup(limit) as cg:
        others = [s for s in active_swaps() if os.path.realpath(s) != os.path.realpath(dev)]
        if others:
            raise SkipError(f"swap bench skipped: other swap became active: {', '.join(others)}")
        with foreign_swap_watch(dev) as seen:
            res = run_child(cg, corpus, nbytes, passes, mem)
        res["after"], res["release_s"] = _settle(mem)
        res["other_swap_seen"] = sorted(seen)  # non-empty: the figures are contaminated
    return res


@contextlib.contextmanager
def foreign_swap_watch(dev: str) -> Iterator[set[str]]:
    """Collect, every 0.5 s while the block runs, any active swap other than ``dev``."""
    seen: set[str] = set()
    done = threading.Event()
    mine = os.path.realpath(dev)

    def watch() -> None:
        while not done.wait(0.5):
            seen.update(s for s in active_swaps() if os.path.realpath(s) != mine)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        done.set()
        t.join()


def _settle(mem: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float | None]:
    """Memory once the child is gone: wait up to 15 s for the backend to drop freed pages
    (zram hears of them at once; zcached through swap discards); (snapshot, seconds or None)."""
    t0 = time.monotonic()
    while True:
        m = mem()
        if (m["orig_data_size"] or 0) <= m["swap_used_bytes"] + (1 << 20):
            return m, round(time.monotonic() - t0, 1)
        if time.monotonic() - t0 > 15:
            return m, None
        time.sleep(0.5)


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 3)
    return None


def compare(
    nbytes: int, limit: int, passes: int, corpus: Path, uring: bool = False
) -> dict[str, Any]:
    """zram and zcached (and, with ``uring``, zcached over FUSE's io_uring) on one workload."""
    k = _one("zram", nbytes, limit, passes, corpus)
    z = _one("zcached", nbytes, limit, passes, corpus)
    zf, kf = z["at_fill"], k["at_fill"]
    extra: dict[str, Any] = {}
    if uring:
        from zcached.transport import unavailable

        if unavailable() is None:
            u = _one("zcached_uring", nbytes, limit, passes, corpus)
            extra = {
                "zcached_uring": u,
                "uring_wall_s_ratio_to_zram": _ratio(u["wall_s"], k["wall_s"]),
            }
    return extra | {
        "data_MiB": nbytes >> 20,
        "limit_MiB": limit >> 20,
        "passes": passes,
        "zram_lz4": k,
        "zcached": z,
        "ratio_to_zram": {
            "wall_s": _ratio(z["wall_s"], k["wall_s"]),
            "passes_s": _ratio(z["passes_s"], k["passes_s"]),
            "fill_s": _ratio(z["fill_s"], k["fill_s"]),
            "mem_used_total": _ratio(zf["mem_used_total"], kf["mem_used_total"]),
            "daemon_rss_growth_vs_zram_mem_used_total": _ratio(
                zf["daemon_rss_growth_bytes"], kf["mem_used_total"]
            ),
            "mem_per_swapped_byte": _ratio(
                _ratio(zf["mem_used_total"], zf["orig_data_size"]),
                _ratio(kf["mem_used_total"], kf["orig_data_size"]),
            ),
            "majflt_passes": _ratio(z["majflt_passes"], k["majflt_passes"]),
        },
    }


def run(quick: bool) -> dict[str, Any]:
    """The 1x size (repeated by ``--repeat``); 2x and 4x are bench/swapscale_bench.py."""
    return run_factors(quick, (1,))


def run_factors(quick: bool, factors: tuple[int, ...]) -> dict[str, Any]:
    from bench.corpus import RESULTS, heap_pages

    base, limit, passes = (128 << 20, 48 << 20, 2) if quick else (512 << 20, 128 << 20, 3)
    nbytes = (32 << 20) if quick else CORPUS_BYTES
    heap_pages(nbytes)  # builds the cached corpus file if needed (page cache outside the cgroup)
    corpus = RESULTS / f"corpus-{nbytes}.bin"
    try:
        _wait_swaps_clear(300)
    except SkipError as e:
        print(str(e), file=sys.stderr)
        return {"skipped": str(e)}
    out: dict[str, Any] = {
        "corpus_MiB": nbytes >> 20,
        "vm_page_cluster": int(Path("/proc/sys/vm/page-cluster").read_text()),
        "scaling": {},
    }
    for f in factors:
        try:
            out["scaling"][f"x{f}"] = compare(base * f, limit * f, passes, corpus, uring=f == 1)
        except SkipError as e:
            print(str(e), file=sys.stderr)
            out["scaling"][f"x{f}"] = {"skipped": str(e)}
        print(summary_line(f"x{f}", out["scaling"][f"x{f}"]), file=sys.stderr)
    return out


def summary_line(name: str, r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"swap {name}: {r['skipped']}"
    q = r["ratio_to_zram"]
    other = r["zcached"]["other_swap_seen"] + r["zram_lz4"]["other_swap_seen"]
    warn = f" (CONTAMINATED: other swap {', '.join(other)} was active)" if other else ""
    return (
        f"swap {name} ({r['data_MiB']} MiB, limit {r['limit_MiB']} MiB): wall zcached "
        f"{r['zcached']['wall_s']:.1f} s, zram {r['zram_lz4']['wall_s']:.1f} s "
        f"({q['wall_s']}x); memory {q['mem_used_total']}x zram{warn}"
    )


def summary(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"swap: {res['skipped']}"
    walls = ", ".join(
        f"{k} {v['ratio_to_zram']['wall_s']}x" for k, v in res["scaling"].items() if "data_MiB" in v
    )
    return f"swap: wall time zcached / zram: {walls}"


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv[1:]), indent=1))
