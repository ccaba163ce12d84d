"""bench/report: machine facts, REPORT.md tables and PNG plots from bench/results/latest.json.

Owns: describing the machine (cpu, nproc, memory, kernel, python, package and fio versions) and
rendering results.  Must NOT run benchmarks.  Plots use matplotlib's Agg backend (no display):
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
        pts = _pick(doc, kind)[:60]
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
