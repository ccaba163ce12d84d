"""bench/__main__: ``python -m bench [--quick] [--only NAME ...] [--repeat N]`` (``make bench``).

Owns: finding every ``bench/*_bench.py``, running each module's ``run(quick) -> dict`` N times
(at most the module's ``MAX_REPEAT`` if it sets one), keeping one module's failure from losing
the others, and writing bench/results/latest.json, REPORT.md and the PNG plots (through
bench.report).  Must NOT measure anything itself.

Result shape (latest.json): {"machine": {...}, "date": ..., "argv": ..., "modules": {NAME:
{"result": tree, "spread": tree | absent, "repeat": N, "quick": bool, "seconds": s, "date": ...,
"machine": {...}}
or {"error": "...", "traceback": "..."}}}.  ``result`` is the module's dict with every numeric
leaf replaced by its median over the repeats; ``spread`` has the same shape with [min, max] at
the numeric leaves (only when N > 1).  With --only, modules not run keep their previous entry.
Each module's entry is merged into latest.json as soon as it is done, under a lock
(/run/lock/zcached-bench-results.lock), so concurrent runs of other modules keep theirs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RESULTS_LOCK = "/run/lock/zcached-bench-results.lock"


def discover() -> list[str]:
    return sorted(p.stem[: -len("_bench")] for p in HERE.glob("*_bench.py"))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def aggregate(runs: list[Any]) -> tuple[Any, Any]:
    """(median tree, [min, max] tree) of same-shaped results; non-numeric leaves from run 0."""
    first = runs[0]
    if isinstance(first, dict):
        med: dict[str, Any] = {}
        spr: dict[str, Any] = {}
        for k in first:
            same = [r[k] for r in runs if isinstance(r, dict) and k in r]
            med[k], s = aggregate(same)
            if s is not None:
                spr[k] = s
        return med, (spr or None)
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in runs):
        pairs = [aggregate([r[i] for r in runs]) for i in range(len(first))]
        spread = [p[1] for p in pairs]
        return [p[0] for p in pairs], (spread if any(s is not None for s in spread) else None)
    if _is_num(first) and all(_is_num(r) for r in runs):
        med_v = _median([float(r) for r in runs])
        if all(isinstance(r, int) for r in runs) and med_v == int(med_v):
            med_v = int(med_v)
        return med_v, ([min(runs), max(runs)] if len(runs) > 1 else None)
    return first, None


def run_module(name: str, quick: bool, repeat: int) -> dict[str, Any]:
    t0 = time.time()
    try:
        mod = importlib.import_module(f"bench.{name}_bench")
        cap = getattr(mod, "MAX_REPEAT", None)  # a module may cap its runs (very long ones)
        if isinstance(cap, int) and cap >= 1:
            repeat = min(repeat, cap)
        runs = []
        for i in range(repeat):
            r = mod.run(quick)
            json.dumps(r)  # must be JSON-able
            runs.append(r)
            summ = getattr(mod, "summary", None)
            if callable(summ):
                print(summ(r), file=sys.stderr)
            if repeat > 1:
                print(f"bench: {name} run {i + 1}/{repeat} done", file=sys.stderr)
        med, spr = aggregate(runs)
        out: dict[str, Any] = {"result": med, "repeat": repeat, "quick": quick}
        if spr is not None:
            out["spread"] = spr
    except (Exception, KeyboardInterrupt) as e:  # one module's failure must not lose the rest
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exc()
        print(f"bench: {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        out = {"error": f"{type(e).__name__}: {e}", "traceback": tb[-4000:], "quick": quick}
    out["seconds"] = round(time.time() - t0, 2)
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def save_module(latest: Path, name: str, res: dict[str, Any], meta: dict[str, Any]) -> Any:
    """Merge one module's entry into ``latest`` (read-modify-write under a lock, so concurrent
    runs of other modules keep each other's entries); return the merged document."""
    with open(RESULTS_LOCK, "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        doc: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(latest.read_text())
        if not isinstance(doc, dict):
            doc = {}
        if not isinstance(doc.get("modules"), dict):
            doc["modules"] = {}
        doc["modules"][name] = res
        doc.update(meta)
        doc["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = latest.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        tmp.replace(latest)
    return doc


def main(argv: list[str] | None = None) -> int:
    names = discover()
    ap = argparse.ArgumentParser(prog="python -m bench", description="zcached benchmarks")
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds, not minutes)")
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"run only these of: {' '.join(names)}"
    )
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per module (medians)")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        print("bench: --repeat must be >= 1", file=sys.stderr)
        return 2
    chosen = names
    if args.only:
        wanted = [n.removesuffix("_bench") for n in args.only]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(
                f"bench: unknown module(s) {' '.join(unknown)}; have: {' '.join(names)}",
                file=sys.stderr,
            )
            return 2
        chosen = wanted
    RESULTS.mkdir(parents=True, exist_ok=True)
    latest = RESULTS / "latest.json"
    machine = report.machine()
    failed = 0
    doc: dict[str, Any] = {}
    for name in chosen:
        print(
            f"bench: running {name} ({'quick' if args.quick else 'full'}, x{args.repeat})",
            file=sys.stderr,
        )
        res = run_module(name, args.quick, args.repeat)
        res["machine"] = machine  # per module too: --only runs may come from other machines
        failed += "error" in res
        meta = {"machine": machine, "argv": sys.argv[1:] if argv is None else argv}
        doc = save_module(latest, name, res, meta)  # after each module: nothing lost on a crash
    report.write_report(doc, RESULTS)
    print(f"bench: wrote {latest}, {RESULTS / 'REPORT.md'} and plots", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
