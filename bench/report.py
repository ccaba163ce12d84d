"""bench/report: machine facts, REPORT.md tables and PNG plots from bench/results/latest.json.

Owns: describing the machine (cpu, nproc, memory, kernel, python, package and fio versions) and
rendering results.  Must NOT run benchmarks.  Plots use matplotlib's Agg backend (no display):
compare.png (zcached next to zram: throughput, memory, swap wall time) and scaling.png (the
swap workload at 1x/2x/4x data) from known paths of the io and swap modules;
ratios.png (leaves on a path with "_over_" or named "*ratio*", "*vs_zram*", "*to_zram*"),
throughput.png (leaves under "ops_per_s" or named "*MB_s*", "*MiB_s*", "*iops*") and memory.png
(leaves named "*_bytes" or "mem_used_total", in MiB).  Leaves are found by walking each module's
median result tree, so new bench modules appear without changes here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

Leaf = tuple[str, str, float]  # (module, dotted path, value)


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    pkgs: dict[str, str | None] = {}
    for p in ("lz4", "zstandard", "pyfuse3", "matplotlib"):
        try:
            pkgs[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pkgs[p] = None
    try:
        fio = subprocess.run(
            ["fio", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        fio = None
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": pkgs,
        "fio": fio,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        out: list[tuple[str, Any]] = []
        for k, v in tree.items():
            out += leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(tree, list) and tree and any(isinstance(x, (dict, list)) for x in tree):
        out = []
        for i, v in enumerate(tree):
            out += leaves(v, f"{prefix}[{i}]")
        return out
    return [(prefix, tree)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def _spread_of(spread: Any, path: str) -> Any:
    d = dict(leaves(spread)) if spread else {}
    return d.get(path)


def write_markdown(doc: dict[str, Any], out: Path) -> None:
    m = doc.get("machine", {})
    argv = " ".join(doc.get("argv", []))
    lines = [
        "# zcached benchmark report",
        "",
        f"Generated {doc.get('date')} by `python -m bench {argv}`.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    for k, v in leaves(m):
        lines.append(f"| {k} | {_fmt(v)} |")
    for name, res in sorted(doc.get("modules", {}).items()):
        lines += [
            "",
            f"## {name}",
            "",
            f"{'quick' if res.get('quick') else 'full'} run, "
            f"{res.get('repeat', 1)} repeat(s), "
            f"{res.get('seconds')} s, {res.get('date')}",
            "",
        ]
        if "error" in res:
            lines += [f"**FAILED**: `{res['error']}`"]
            continue
        lines += ["| figure | median | min .. max |", "|---|---:|---|"]
        for path, v in leaves(res.get("result")):
            s = _spread_of(res.get("spread"), path)
            rng = f"{_fmt(s[0])} .. {_fmt(s[1])}" if isinstance(s, list) and len(s) == 2 else ""
            lines.append(f"| {path} | {_fmt(v)} | {rng} |")
    out.write_text("\n".join(lines) + "\n")


def _pick(doc: dict[str, Any], kind: str) -> list[Leaf]:
    out: list[Leaf] = []
    for name, res in sorted(doc.get("modules", {}).items()):
        for path, v in leaves(res.get("result", {})):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
                continue
            key = path.rsplit(".", 1)[-1].lower()
            p = path.lower()
            if kind == "ratios":
                ok = (
                    "_over_" in p or "ratio" in key or "vs_zram" in p or "to_zram" in p
                ) and 0 < v < 100
            elif kind == "throughput":
                ok = "ops_per_s" in p or "mb_s" in key or "mib_s" in key or "iops" in key
            else:
                ok = (key.endswith("_bytes") or key == "mem_used_total") and v > 0
                v = v / 2**20
            if ok:
                out.append((name, path, float(v)))
    return out


def _per_module(pts: list[Leaf], cap: int) -> list[Leaf]:
    """At most ``cap`` leaves of each module (so a big module cannot crowd the others out)."""
    seen: dict[str, int] = {}
    out = []
    for p in pts:
        seen[p[0]] = seen.get(p[0], 0) + 1
        if seen[p[0]] <= cap:
            out.append(p)
    return out


def write_plots(doc: dict[str, Any], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    titles = {
        "ratios": ("ratios (1.0 = parity; pool/requested, ours/zram)", "ratio"),
        "throughput": ("throughput", "ops/s or MB/s (log)"),
        "memory": ("memory", "MiB"),
    }
    for kind, (title, xlabel) in titles.items():
        pts = _per_module(_pick(doc, kind), 25)
        path = outdir / f"{kind}.png"
        if not pts:
            path.unlink(missing_ok=True)
            continue
        fig, ax = plt.subplots(figsize=(10, 0.25 * len(pts) + 1.2), dpi=80)
        labels = [f"{n}: {p}" for n, p, _ in pts]
        ax.barh(range(len(pts)), [v for _, _, v in pts], color="tab:blue")
        ax.set_yticks(range(len(pts)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if kind == "ratios":
            ax.axvline(1.0, color="k", lw=0.8)
        if kind == "throughput":
            ax.set_xscale("log")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    return made


def write_report(doc: dict[str, Any], outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    write_markdown(doc, outdir / "REPORT.md")
    write_plots(doc, outdir)
    write_comparison_plots(doc, outdir)


def _node(doc: dict[str, Any], module: str, path: str) -> tuple[Any, Any]:
    """(median, [min, max] or None) at dotted ``path`` of ``module``'s result."""
    res = doc.get("modules", {}).get(module) or {}
    med, spr = res.get("result"), res.get("spread")
    for part in path.split("."):
        med = med.get(part) if isinstance(med, dict) else None
        spr = spr.get(part) if isinstance(spr, dict) else None
    ok = isinstance(med, (int, float)) and not isinstance(med, bool)
    return (med if ok else None), (spr if isinstance(spr, list) and len(spr) == 2 else None)


def _pairs(doc: dict[str, Any], rows: list[tuple[str, str, str, str, float]]) -> list[Any]:
    """[(label, (zcached, err), (zram, err))] for rows (label, module, ours, zram, scale)."""
    out = []
    for label, mod, ours, zram, scale in rows:
        vals = []
        for path in (ours, zram):
            v, s = _node(doc, mod, path)
            err = (0.0, 0.0) if s is None or v is None else (v - s[0], s[1] - v)
            vals.append((None if v is None else v / scale, (err[0] / scale, err[1] / scale)))
        if vals[0][0] is not None and vals[1][0] is not None:
            out.append((label, vals[0], vals[1]))
    return out


def _bars(ax: Any, pairs: list[Any], title: str, unit: str) -> None:
    import numpy as np

    x = np.arange(len(pairs))
    for i, (name, color) in enumerate((("zcached", "tab:blue"), ("zram lz4", "tab:orange"))):
        vals = [p[1 + i][0] for p in pairs]
        err = np.array([p[1 + i][1] for p in pairs]).T
        ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, yerr=err, label=name, color=color, capsize=3)
        for xi, v in zip(x, vals, strict=True):
            ax.annotate(f"{v:,.4g}", (xi + (i - 0.5) * 0.4, v), ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
    ax.set_xticks(x, [p[0] for p in pairs], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)


def write_comparison_plots(doc: dict[str, Any], outdir: Path) -> list[Path]:
    """compare.png (zcached next to zram: throughput, memory, swap wall time, with min..max
    error bars) and scaling.png (swap workload: wall time and memory against data size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mib = float(2**20)
    panels = [
        ("throughput (io bench)", "MB/s", _pairs(doc, [
            ("1M seq write", "io", "zcached.seq_write_1M_MBps", "zram_lz4.seq_write_1M_MBps", 1),
            ("1M heap-page write", "io", "zcached.corpus_write_1M_qd1_MBps",
             "zram_lz4.corpus_write_1M_qd1_MBps", 1),
            ("1M seq read", "io", "zcached.seq_read_1M_MBps", "zram_lz4.seq_read_1M_MBps", 1),
        ])),
        ("4K random read, depth 32", "kIOPS", _pairs(doc, [
            ("4K randread", "io", "zcached.randread_4k_qd32_iops",
             "zram_lz4.randread_4k_qd32_iops", 1000),
        ])),
    ]  # fmt: skip
    names = []  # (module, "xN"): the swap workload sizes, 1x in "swap", 2x/4x in "swapscale"
    for module in ("swap", "swapscale"):
        res = (doc.get("modules", {}).get(module) or {}).get("result") or {}
        scaled = res.get("scaling") if isinstance(res, dict) else None
        if isinstance(scaled, dict):
            names += [(module, n) for n in scaled if n[1:].isdigit()]
    names.sort(key=lambda mn: int(mn[1][1:]))
    mem_rows, wall_rows = [], []
    for module, n in names:
        at = f"scaling.{n}"
        data, _ = _node(doc, module, f"{at}.data_MiB")
        lab = f"{data:.0f} MiB" if data else n
        wall_rows.append((lab, module, f"{at}.zcached.wall_s", f"{at}.zram_lz4.wall_s", 1.0))
        mem_rows.append((lab, module, f"{at}.zcached.at_fill.mem_used_total",
                         f"{at}.zram_lz4.at_fill.mem_used_total", mib))  # fmt: skip
    panels.append(("memory holding the swapped pages (swap bench)", "MiB", _pairs(doc, mem_rows)))
    panels.append(("swap workload wall time", "s", _pairs(doc, wall_rows)))
    panels = [p for p in panels if p[2]]
    made = []
    path = outdir / "compare.png"
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), dpi=80)
        for ax, (title, unit, pairs) in zip(np.atleast_1d(axes), panels, strict=True):
            _bars(ax, pairs, title, unit)
        fig.suptitle("zcached vs kernel zram (lz4), same run, same data; bars min..max")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    else:
        path.unlink(missing_ok=True)
    path = outdir / "scaling.png"
    walls, mems = _pairs(doc, wall_rows), _pairs(doc, mem_rows)
    if len(walls) >= 2:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=80)
        xlabel = "program data (MiB); the cgroup limit scales with it"
        for ax, pairs, title, unit in ((axes[0], walls, "swap workload wall time", "s"),
                                       (axes[1], mems, "memory after fill", "MiB")):  # fmt: skip
            xs = [float(p[0].split()[0]) for p in pairs]
            for i, name in enumerate(("zcached", "zram lz4")):
                ax.errorbar(xs, [p[1 + i][0] for p in pairs],
                            yerr=np.array([p[1 + i][1] for p in pairs]).T,
                            marker="o", capsize=3, label=name)  # fmt: skip
            ax.set_xlabel(xlabel)
            ax.set_ylabel(unit)
            ax.set_title(title)
            ax.legend()
        ax = axes[2]
        for key, label, goal in (("wall_s", "wall time", 1.5), ("mem_used_total", "memory", 1.05)):
            pts = [(p[0], _node(doc, m, f"scaling.{n}.ratio_to_zram.{key}")[0])
                   for (m, n), p in zip(names, wall_rows, strict=True)]  # fmt: skip
            xs = [float(lab.split()[0]) for lab, v in pts if v is not None]
            ax.plot(xs, [v for _, v in pts if v is not None], marker="o", label=label)
            ax.axhline(goal, ls="--", lw=0.8, color="k")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("zcached / zram")
        ax.set_title("ratios (dashed: goals 1.5x wall, 1.05x memory)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        made.append(path)
    else:
        path.unlink(missing_ok=True)
    return made
