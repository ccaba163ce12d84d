"""`zcached status [--json] [--metrics-listen HOST:PORT]`: a zramctl-like table from a live daemon.

Owns: fetching /status from the daemon's exporter and printing it. Must NOT: open the store or
FUSE itself. No daemon -> one line on stderr and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

from zcached.metrics import DEFAULT_LISTEN, parse_listen

COLUMNS = (
    ("NAME", "device"),
    ("DISKSIZE", "size"),
    ("ALGORITHM", "algorithm"),
    ("DATA", "orig_data_size"),
    ("COMPR", "compr_data_size"),
    ("TOTAL", "mem_used_total"),
    ("RATIO", "ratio"),
    ("SAME", "same_pages"),
    ("HUGE", "huge_pages"),
    ("BACKED", "backed_bytes"),
    ("MOUNTPOINT", "mountpoint"),
    ("LOOP", "loop_device"),
    ("PRIO", "swap_priority"),
)


def human(n: object) -> str:
    if not isinstance(n, int):
        return "-" if n is None else str(n)
    v = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if v < 1024 or unit == "T":
            return f"{v:.0f}{unit}" if unit == "B" else f"{v:.1f}{unit}"
        v /= 1024
    return str(n)


def fetch(listen: str, timeout: float = 5.0) -> dict[str, object]:
    host, port = parse_listen(listen)
    with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as r:
        doc: dict[str, object] = json.loads(r.read())
    o, c = doc.get("orig_data_size"), doc.get("compr_data_size")
    doc["ratio"] = round(o / c, 2) if isinstance(o, int) and isinstance(c, int) and c else None
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zcached status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--metrics-listen", default=DEFAULT_LISTEN)
    a = p.parse_args(argv)
    try:
        doc = fetch(a.metrics_listen)
    except json.JSONDecodeError:
        print(f"zcached: error: {a.metrics_listen} does not answer like zcached", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"zcached: error: {e}", file=sys.stderr)
        return 2
    except (OSError, urllib.error.URLError) as e:
        why = getattr(e, "reason", e)
        why = getattr(why, "strerror", None) or why
        print(
            f"zcached: error: no zcached daemon answering on {a.metrics_listen}: {why}",
            file=sys.stderr,
        )
        return 1
    if a.json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    bytes_keys = {"size", "orig_data_size", "compr_data_size", "mem_used_total", "backed_bytes"}
    row = [
        human(doc.get(k)) if k in bytes_keys else ("-" if doc.get(k) is None else str(doc[k]))
        for _, k in COLUMNS
    ]
    widths = [max(len(h), len(v)) for (h, _), v in zip(COLUMNS, row, strict=True)]
    print(" ".join(h.ljust(w) for (h, _), w in zip(COLUMNS, widths, strict=True)).rstrip())
    print(" ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
