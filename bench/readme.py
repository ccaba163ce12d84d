"""bench/readme: the README's comparison table, generated from bench/results/latest.json.

``python -m bench.readme [--json FILE] [--readme FILE] [--print]`` replaces the text between the
``<!-- bench:begin ... -->`` line and the ``<!-- bench:end -->`` line of README.md (both lines
kept) with a compact table: memory, throughput and swap wall time, each as zcached, zram (lz4)
and the ratio zcached / zram, with the goal of each row.
Owns: reading latest.json and rendering that block.  Must NOT run benchmarks, touch any other
part of README.md, or invent a figure: a figure missing from the JSON shows as "not measured".

Ratios are the medians of the per-run ratios (each run compares both from the same run); with
repeats the min..max of the ratio follows in brackets.  Absolute values are medians too.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench:begin"
END = "<!-- bench:end -->"
MISSING = "not measured"


class ReadmeError(ValueError):
    """README or JSON not usable; the message is one line."""


def _get(tree: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class Source:
    """One module's entry in latest.json: median result and [min, max] spread trees."""

    def __init__(self, doc: dict[str, Any], name: str) -> None:
        entry = doc.get("modules", {}).get(name) or {}
        self.ok = "result" in entry and "skipped" not in (entry.get("result") or {})
        self.result = entry.get("result") or {}
        self.spread = entry.get("spread") or {}
        self.repeat = int(entry.get("repeat") or 1)

    def value(self, path: str) -> float | None:
        return _num(_get(self.result, path)) if self.ok else None

    def ratio(self, path: str) -> str:
        v = self.value(path)
        if v is None:
            return MISSING
        s = _get(self.spread, path)
        if isinstance(s, list) and len(s) == 2 and s[0] != s[1]:
            return f"**{v:.2f}x** ({s[0]:.2f}..{s[1]:.2f})"
        return f"**{v:.2f}x**"


def _mib(v: float | None) -> str:
    return MISSING if v is None else f"{v / 2**20:,.1f} MiB"


def _mbs(v: float | None) -> str:
    return MISSING if v is None else f"{v:,.0f} MB/s"


def _iops(v: float | None) -> str:
    return MISSING if v is None else f"{v / 1000:,.1f}K IOPS"


def _secs(v: float | None) -> str:
    return MISSING if v is None else f"{v:,.1f} s"


def _row(label: str, ours: str, zram: str, ratio: str, goal: str) -> str:
    return f"| {label} | {ours} | {zram} | {ratio} | {goal} |"


def memory_rows(doc: dict[str, Any]) -> list[str]:
    rows = []
    sw = Source(doc, "swap")
    x1 = "scaling.x1"
    data = sw.value(f"{x1}.data_MiB")
    z, k = f"{x1}.zcached.at_fill", f"{x1}.zram_lz4.at_fill"
    what = f"a {data:.0f} MiB program" if data else "the swap workload"
    rows.append(_row(
        f"memory holding {what}'s swapped pages (pool; zram mem_used_total)",
        _mib(sw.value(f"{z}.mem_used_total")), _mib(sw.value(f"{k}.mem_used_total")),
        sw.ratio(f"{x1}.ratio_to_zram.mem_used_total"), "<= 1.0x",
    ))  # fmt: skip
    rows.append(_row(
        "same, daemon memory growth (Pss of keeper + server: all of zcached's memory)",
        _mib(sw.value(f"{z}.daemon_rss_growth_bytes")), _mib(sw.value(f"{k}.mem_used_total")),
        sw.ratio(f"{x1}.ratio_to_zram.daemon_rss_growth_vs_zram_mem_used_total"), "<= 1.0x",
    ))  # fmt: skip
    cp = Source(doc, "compact")
    if cp.ok:
        m = "memory.half_discarded_compacted"
        rows.append(_row(
            "memory after a random half is freed and both compact (pool + metadata)",
            _mib(cp.value(f"{m}.zcached.total_bytes")),
            _mib(cp.value(f"{m}.zram_mem_used_total")),
            cp.ratio(f"{m}.pool_plus_metadata_vs_zram"), "<= 1.0x",
        ))  # fmt: skip
    return rows + recompress_rows(doc)


def _us(v: float | None) -> str:
    return MISSING if v is None else f"{v:,.1f} us"


def recompress_rows(doc: dict[str, Any]) -> list[str]:
    """Idle pages recompressed by a real daemon (bench/recompress_bench.py): its memory for
    them next to zram's, reads of them next to reads of lz4 pages, the recompressor's CPU."""
    rc = Source(doc, "recompress")
    if not rc.ok:
        return []
    data = rc.value("bytes")
    what = f"{data / 2**20:.0f} MiB of heap pages" if data else "the heap pages"
    return [
        _row(
            f"memory for {what} once idle and recompressed (daemon Pss growth: pool, "
            "dictionary, metadata; zram mem_used_total)",
            _mib(rc.value("zcached.growth_recompressed")), _mib(rc.value("zram.mem_used_total")),
            rc.ratio("growth_recompressed_vs_zram"), "<= 0.6x",
        ),
        _row(
            "same, 4x the pages (four copies: the daemon's fixed costs weigh a quarter)",
            _mib(rc.value("x4.zcached.growth_recompressed")),
            _mib(rc.value("x4.zram.mem_used_total")),
            rc.ratio("x4.growth_recompressed_vs_zram"), "<= 0.6x",
        ),
        _row(
            "4K random read through FUSE of a recompressed page, mean (the ratio is to "
            f"zcached's lz4 pages: {_us(rc.value('zcached.latency_lz4.mean_us'))})",
            _us(rc.value("zcached.latency_recompressed.mean_us")),
            _us(rc.value("zram.latency.mean_us")),
            rc.ratio("read_mean_recompressed_vs_lz4"), "<= 1.5x",
        ),
        _row(
            "recompressor CPU per page (share of a CPU it used; its budget 0.1)",
            _us(rc.value("zcached.recompress_cpu_us_per_page"))
            + f" ({rc.value('zcached.recompress_cpu_over_wall') or 0:.2f})",
            "-", "-", "reported",
        ),
    ]  # fmt: skip


def latency_rows(doc: dict[str, Any]) -> list[str]:
    """4K reads one at a time (bench/latency_bench.py): zcached's loop device and FUSE file,
    with adaptive polling off (the default) and on, and disk swap's loop file, each next to
    zram's from the same run."""
    lt = Source(doc, "latency")
    if not lt.ok:
        return []
    zram = f"{_us(lt.value('zram_lz4.mean_us'))} (p99 {_us(lt.value('zram_lz4.p99_us'))})"
    rows = []
    for key, label in (
        ("zcached_spin0.loop", "4K random read QD1 through the loop device, mean (p99)"),
        ("zcached_spin0.file", "same, of the FUSE file itself (no loop device)"),
        ("zcached_spin50.loop", "4K read QD1, loop device, io_spin_us = 50 (not the default)"),
        ("zcached_spin50.file", "same, of the FUSE file, io_spin_us = 50"),
        ("zcached_uring.loop", "4K read QD1, loop device, io_transport = uring (not the default)"),
        ("zcached_uring.file", "same, of the FUSE file, io_transport = uring"),
    ):  # fmt: skip
        if lt.value(f"{key}.mean_us") is None:
            continue
        mean = lt.value(f"{key}.mean_us")
        ours = f"{_us(mean)} (p99 {_us(lt.value(f'{key}.p99_us'))})"
        zmean = lt.value("zram_lz4.mean_us")
        ratio = f"**{mean / zmean:.2f}x**" if mean and zmean else MISSING
        goal = "<= 25 us mean" if key.endswith("loop") else "reported"
        rows.append(_row(label, ours, zram, ratio, goal))
    zq = lt.value("zram_lz4.qd32_iops")
    for key, label in (
        ("zcached_spin0", "4K random read QD32 through the loop device (reads/s)"),
        ("zcached_uring", "same, io_transport = uring"),
        ("disk_loop", "same, disk swap's file through a loop device"),
    ):  # fmt: skip
        q = lt.value(f"{key}.loop.qd32_iops" if key != "disk_loop" else f"{key}.qd32_iops")
        if q is None:
            continue
        goal = ">= 0.7x zram" if key.startswith("zcached") else "reported"
        rows.append(_row(label, f"{q:,.0f}", f"{zq:,.0f}" if zq else MISSING,
                         f"**{q / zq:.2f}x**" if zq else MISSING, goal))  # fmt: skip
    dmean = lt.value("disk_loop.mean_us")
    zmean = lt.value("zram_lz4.mean_us")
    rows.append(_row(
        "4K read QD1 of disk swap's file through a loop device (the zcached column)",
        f"{_us(dmean)} (p99 {_us(lt.value('disk_loop.p99_us'))})", zram,
        f"**{dmean / zmean:.2f}x**" if dmean and zmean else MISSING, "reported",
    ))  # fmt: skip
    return rows


def writeback_rows(doc: dict[str, Any]) -> list[str]:
    """The writeback tier (bench/writeback_bench.py): the swap workload at a small mem_limit
    with a backing file, next to plain disk swap and zram from the same run; QD1 reads of
    written-back pages next to disk swap's file."""
    wb = Source(doc, "writeback")
    if not wb.ok:
        return []
    data, limit, pool = (wb.value(k) for k in ("data_MiB", "limit_MiB", "mem_limit_MiB"))
    zw, dw, kw = (wb.value(f"{b}.wall_s") for b in ("zcached", "disk", "zram"))
    zl, dl = "read_latency.zcached_backed", "read_latency.disk_loop"
    kmean = wb.value("read_latency.zram_lz4.mean_us")
    zmean, dmean = wb.value(f"{zl}.mean_us"), wb.value(f"{dl}.mean_us")
    return [
        _row(
            f"swap workload at the memory limit: {data:.0f} MiB in a {limit:.0f} MiB cgroup, "
            f"mem_limit {pool:.0f} MiB + backing file (1 run; disk swap: "
            f"{_secs(dw)}, {dw / kw if dw and kw else 0:.2f}x zram)",
            _secs(zw), _secs(kw), wb.ratio("ratio.zcached_to_zram_wall"),
            f"<= disk swap ({zw / dw if zw and dw else 0:.2f}x of it)",
        ),
        _row(
            f"4K read QD1 of written-back pages, loop device (disk swap's file: {_us(dmean)}, "
            f"p99 {_us(wb.value(f'{dl}.p99_us'))})",
            f"{_us(zmean)} (p99 {_us(wb.value(f'{zl}.p99_us'))})",
            f"{_us(kmean)} (p99 {_us(wb.value('read_latency.zram_lz4.p99_us'))})",
            f"**{zmean / kmean:.2f}x**" if zmean and kmean else MISSING,
            f"reported ({zmean / dmean if zmean and dmean else 0:.2f}x disk)",
        ),
    ]  # fmt: skip


def io_rows(doc: dict[str, Any]) -> list[str]:
    io = Source(doc, "io")
    rows = []
    for label, key, fmt, goal in (
        ("1 MiB sequential write (fio)", "seq_write_1M_MBps", _mbs, ">= 1.0x"),
        ("1 MiB writes of real heap pages, one at a time", "corpus_write_1M_qd1_MBps", _mbs,
         ">= 1.0x"),
        ("1 MiB sequential read (fio)", "seq_read_1M_MBps", _mbs, ">= 1.0x"),
        ("4K random read, depth 32 (fio)", "randread_4k_qd32_iops", _iops, ">= 0.5x"),
    ):  # fmt: skip
        rows.append(_row(
            label, fmt(io.value(f"zcached.{key}")), fmt(io.value(f"zram_lz4.{key}")),
            io.ratio(f"ratio_to_zram.{key}"), goal,
        ))  # fmt: skip
    return rows


SWAP_MODULES = ("swap", "swapscale")  # 1x (repeated) and 2x/4x (once): same result shape
TABLE_MODULES = (
    "compact",
    "core",
    "io",
    "latency",
    "recompress",
    "recovery",
    "writeback",
    *SWAP_MODULES,
)  # what the table quotes


def _scaled(doc: dict[str, Any]) -> list[tuple[Source, str]]:
    """(module, "xN") for every swap workload size in the JSON, smallest first."""
    out = []
    for name in SWAP_MODULES:
        src = Source(doc, name)
        scaling = _get(src.result, "scaling") if src.ok else None
        if isinstance(scaling, dict):
            out += [(src, n) for n in scaling if n[1:].isdigit()]
    return sorted(out, key=lambda p: int(p[1][1:]))


def swap_rows(doc: dict[str, Any]) -> list[str]:
    rows = []
    for sw, n in _scaled(doc) or [(Source(doc, "swap"), "x1")]:
        data, limit = sw.value(f"scaling.{n}.data_MiB"), sw.value(f"scaling.{n}.limit_MiB")
        label = (
            f"swap workload wall time, {data:.0f} MiB in a {limit:.0f} MiB cgroup"
            if data and limit
            else "swap workload wall time"
        )
        if sw.repeat == 1 and data and limit:
            label += " (1 run)"
        rows.append(_row(
            label, _secs(sw.value(f"scaling.{n}.zcached.wall_s")),
            _secs(sw.value(f"scaling.{n}.zram_lz4.wall_s")),
            sw.ratio(f"scaling.{n}.ratio_to_zram.wall_s"), "<= 2.5x",
        ))  # fmt: skip
        uw = sw.value(f"scaling.{n}.zcached_uring.wall_s")
        if uw is not None:
            rows.append(_row(
                "same, io_transport = uring (not the default)", _secs(uw),
                _secs(sw.value(f"scaling.{n}.zram_lz4.wall_s")),
                sw.ratio(f"scaling.{n}.uring_wall_s_ratio_to_zram"), "reported",
            ))  # fmt: skip
    return rows


def daemon_rows(doc: dict[str, Any]) -> list[str]:
    """The daemon's own costs, which zram has no counterpart for: CPU per page moved on the
    swap workload, its RSS when idle, and instructions per request (callgrind)."""
    rows = []
    for sw, n in _scaled(doc) or [(Source(doc, "swap"), "x1")]:
        after = f"scaling.{n}.zcached.after"
        cpu = sw.value(f"{after}.daemon_cpu_s")
        pages = [sw.value(f"{after}.daemon.pages_{k}") for k in ("read", "written")]
        data = sw.value(f"scaling.{n}.data_MiB")
        per = (
            f"{cpu / (pages[0] + pages[1]) * 1e6:.1f} us"
            if cpu is not None
            and pages[0] is not None
            and pages[1] is not None
            and pages[0] + pages[1] > 0
            else MISSING
        )
        what = f"{data:.0f} MiB swap workload" if data else "swap workload"
        rows.append(_row(f"daemon CPU per page read or written, {what}", per, "-", "-",
                         "<= 5 us"))  # fmt: skip
    sw = Source(doc, "swap")
    rows.append(_row(
        "idle daemon memory (Pss of keeper + server, before the workload)",
        _mib(sw.value("scaling.x1.zcached.at_fill.daemon_rss_idle_bytes")), "-", "-",
        "<= 64 MiB",
    ))  # fmt: skip
    core = Source(doc, "core")
    for label, key in (("4K WRITE", "write4k"), ("4K READ", "read4k"),
                       ("4K discard (FALLOCATE)", "discard4k")):  # fmt: skip
        v = core.value(f"instructions_per_request.lz4.{key}")
        rows.append(_row(
            f"instructions per {label} request in the daemon (callgrind, lz4)",
            MISSING if v is None else f"{v:,.0f}", "-", "-", "reported",
        ))  # fmt: skip
    return rows + recovery_rows(doc)


def recovery_rows(doc: dict[str, Any]) -> list[str]:
    """A new server taking over the live store: the C rebuild at each pool size plus the
    interpreter's start (bench/recovery_bench.py); zram has no counterpart (it cannot die)."""
    rec = Source(doc, "recovery")
    rebuild = _get(rec.result, "rebuild") if rec.ok else None
    start = rec.value("server_start_ms")
    rows = []
    sizes = list(rebuild) if isinstance(rebuild, dict) else []
    for size in sorted(sizes, key=lambda k: rec.value(f"rebuild.{k}.pool_mib") or 0):
        ms = rec.value(f"rebuild.{size}.rebuild_ms")
        pool = rec.value(f"rebuild.{size}.pool_mib")
        total = f"{ms + start:.0f} ms" if ms is not None and start is not None else MISSING
        label = (
            f"server recovery, {pool:.0f} MiB pool (rebuild {ms:.0f} ms + start)"
            if (pool is not None and ms is not None)
            else f"server recovery, {size} pool"
        )
        rows.append(_row(label, total, "-", "-", "<= 1 s"))
    return rows


def _header(doc: dict[str, Any]) -> list[str]:
    m = doc.get("machine") or {}
    mem = _num(m.get("memory_bytes"))
    memtxt = f"{mem / 2**30:.0f} GB RAM, " if mem else ""
    reps = sorted({Source(doc, n).repeat for n in ("io", "swap") if Source(doc, n).ok})
    rep = "/".join(str(r) for r in reps) or "1"
    mods = [doc.get("modules", {}).get(n) or {} for n in ("io", *SWAP_MODULES)]
    quick = " QUICK RUN (small sizes, `--quick`)." if any(m.get("quick") for m in mods) else ""
    text = (
        f"Measured {m.get('date', doc.get('date', '?'))} on {m.get('cpu') or 'an unknown CPU'} "
        f"({m.get('nproc', '?')} CPUs, {memtxt}kernel {m.get('kernel', '?')}, "
        f"Python {m.get('python', '?')}) by `make bench`.{quick} Each figure is the median of "
        f"{rep} run(s); both sides ran in the same run on the same real heap pages "
        "(bench/README.md). Ratios are zcached / zram (lz4), min..max over the runs in "
        "brackets. All figures: bench/results/REPORT.md and the plots next to it."
    )
    return textwrap.wrap(text + _provenance(doc), 100, break_on_hyphens=False)


def _provenance(doc: dict[str, Any]) -> str:
    """A sentence naming the table's modules that ran elsewhere or on another day than the
    machine and date in the header (``--only`` runs merge into one latest.json), or ''."""
    top = doc.get("machine") or {}
    day = str(top.get("date") or doc.get("date") or "")[:10]
    odd = []
    for name in TABLE_MODULES:
        mod = doc.get("modules", {}).get(name)
        if not isinstance(mod, dict):
            continue
        m = mod.get("machine")
        when = str(mod.get("date", "?"))[:10]
        if not isinstance(m, dict):
            odd.append(f"{name} ({when}, machine not recorded)")
        elif (m.get("cpu"), m.get("kernel")) != (top.get("cpu"), top.get("kernel")):
            odd.append(f"{name} ({when}, {m.get('cpu') or '?'}, kernel {m.get('kernel', '?')})")
        elif when != day:
            odd.append(f"{name} ({when})")
    if not odd:
        return ""
    return " Measured elsewhere or on another day: " + ", ".join(odd) + "."


def render(doc: dict[str, Any]) -> str:
    """The block's body (without the marker lines)."""
    lines = _header(doc)
    lines += [
        "",
        "| | zcached | zram (lz4) | zcached / zram | goal |",
        "|---|---:|---:|---:|---|",
    ]
    lines += memory_rows(doc) + io_rows(doc) + latency_rows(doc) + swap_rows(doc)
    lines += writeback_rows(doc)
    lines += daemon_rows(doc)
    sw = Source(doc, "swap")
    if not sw.ok and isinstance(sw.result.get("skipped"), str):
        lines += ["", f"Swap workload: {sw.result['skipped']}."]
    return "\n".join(lines) + "\n"


def replace_block(text: str, body: str) -> str:
    """``text`` with the lines between the BEGIN line and the END line replaced by ``body``."""
    start = text.find(BEGIN)
    if start < 0:
        raise ReadmeError(f"no '{BEGIN}' marker")
    nl = text.find("\n", start)
    end = text.find(END, nl if nl >= 0 else start)
    if nl < 0 or end < 0:
        raise ReadmeError(f"no '{END}' marker after '{BEGIN}'")
    return text[: nl + 1] + body + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--print", action="store_true", help="print the block, do not write")
    args = ap.parse_args(argv)
    try:
        doc = json.loads(args.json.read_text())
        if not isinstance(doc, dict):
            raise ReadmeError(f"{args.json}: not a JSON object")
        body = render(doc)
        if args.print:
            sys.stdout.write(body)
            return 0
        text = args.readme.read_text()
        new = replace_block(text, body)
    except (OSError, ValueError) as e:  # ReadmeError and json's errors are ValueErrors
        print(f"bench.readme: {e}", file=sys.stderr)
        return 1
    if new != text:
        args.readme.write_text(new)
    print(f"bench.readme: {args.readme} bench block {'updated' if new != text else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
