"""bench/corpus: real heap pages for the benchmarks (``heap_pages(nbytes)``).

Owns: starting two kinds of real Python programs, reading their anonymous writable mappings out
of /proc/PID/maps + /proc/PID/mem while they wait on stdin, ending them by pid, and caching the
mixed pages in bench/results/corpus-<nbytes>.bin (gitignored).  Must NOT synthesise data: every
byte returned comes from a live process's memory.

The two programs (each stops growing at a cap so the capture stays fast):

* ``ast``  -- parses the standard library's modules (sorted order) with ``ast.parse`` and keeps
  every tree alive: object-heavy CPython heap (dicts, small objects, pointers, refcounts).
* ``json`` -- reads the same source files, tokenises them and keeps the tokens as a dict of
  lists, a Counter, and a ``json.loads`` round trip of per-file records: string-heavy heap.

Invariants: all-zero pages are dropped (since kernel 6.12 a zero page never reaches a swap
device); no other page is dropped or altered.  The unique pages of both programs are mixed in a
seeded shuffle; if fewer than ``nbytes`` unique bytes were captured, further seeded shuffles of
the same pages are appended (the summary line says how many pages are unique).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

PAGE = 4096
SEED = 20261125
RESULTS = Path(__file__).resolve().parent / "results"
ZERO = bytes(PAGE)

# The programs print "ready <pid>" once their heap is built and then block on stdin.
_AST_PROG = r"""
import ast, os, sys, sysconfig, resource
cap = int(sys.argv[1])
root = sysconfig.get_paths()["stdlib"]
keep = []
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
for d, subs, files in os.walk(root):
    subs[:] = sorted(s for s in subs if s not in ("site-packages", "test", "__pycache__"))
    for fn in sorted(files):
        if not fn.endswith(".py"):
            continue
        try:
            with open(os.path.join(d, fn), "rb") as f:
                keep.append(ast.parse(f.read()))
        except (SyntaxError, ValueError, OSError):
            continue
        if rss() > cap:
            break
    else:
        continue
    break
print("ready", os.getpid(), len(keep), flush=True)
sys.stdin.read()
"""

_JSON_PROG = r"""
import io, json, os, sys, sysconfig, tokenize, collections
cap = int(sys.argv[1])
root = sysconfig.get_paths()["stdlib"]
tokens = {}
counts = collections.Counter()
records = []
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
done = False
for d, subs, files in os.walk(root):
    subs[:] = sorted(s for s in subs if s not in ("site-packages", "__pycache__"))
    for fn in sorted(files):
        if not fn.endswith(".py"):
            continue
        path = os.path.join(d, fn)
        try:
            with open(path, "rb") as f:
                toks = [t.string for t in tokenize.tokenize(io.BytesIO(f.read()).readline)]
        except (SyntaxError, tokenize.TokenError, OSError, UnicodeDecodeError):
            continue
        tokens[path] = toks
        counts.update(toks)
        rec = {"path": path, "n": len(toks), "names": [t for t in toks if t.isidentifier()][:2000]}
        records.append(json.loads(json.dumps(rec)))
        if rss() > cap:
            done = True
            break
    if done:
        break
print("ready", os.getpid(), len(tokens), flush=True)
sys.stdin.read()
"""


def _anon_ranges(pid: int) -> list[tuple[int, int]]:
    """Writable private anonymous mappings ([heap] and unnamed) of ``pid``."""
    out: list[tuple[int, int]] = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            perms = parts[1]
            name = parts[5].strip() if len(parts) > 5 else ""
            if perms.startswith("rw") and perms[3] == "p" and name in ("", "[heap]"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


def capture_pages(pid: int) -> list[bytes]:
    """Non-zero 4K pages of the anonymous writable mappings of the live process ``pid``."""
    pages: list[bytes] = []
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for lo, hi in _anon_ranges(pid):
            addr = lo
            while addr < hi:
                n = min(hi - addr, 1 << 20)
                try:
                    buf = os.pread(fd, n, addr)
                except OSError:  # unreadable hole (guard page etc.): skip one page
                    addr += PAGE
                    continue
                if not buf:
                    break
                for i in range(0, len(buf) - PAGE + 1, PAGE):
                    p = buf[i : i + PAGE]
                    if p != ZERO:
                        pages.append(p)
                addr += len(buf)
    finally:
        os.close(fd)
    return pages


def _run_and_capture(prog: str, cap: int) -> list[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", prog, str(cap)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"corpus program exited early (rc={proc.poll()})")
        return capture_pages(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()  # our own child, by pid
        proc.wait()


def build(nbytes: int) -> tuple[bytes, dict[str, int]]:
    """Capture both programs and mix their pages to exactly ``nbytes`` (multiple of 4K)."""
    npages = max(1, nbytes // PAGE)
    # Each program grows to about half the corpus (plus interpreter base), capped at 160 MiB
    # so that a 256 MiB corpus is captured in well under a minute.
    cap = min(160 << 20, max(24 << 20, nbytes // 2 + (16 << 20)))
    a = _run_and_capture(_AST_PROG, cap)
    b = _run_and_capture(_JSON_PROG, cap)
    unique = a + b
    rng = random.Random(SEED)
    out: list[bytes] = []
    while len(out) < npages:
        order = list(range(len(unique)))
        rng.shuffle(order)
        out.extend(unique[i] for i in order[: npages - len(out)])
    info = {"pages": npages, "unique_pages": len(unique), "ast_pages": len(a), "json_pages": len(b)}
    return b"".join(out), info


def heap_pages(nbytes: int, *, cache: bool = True, verbose: bool = True) -> bytes:
    """``nbytes`` (rounded down to 4K, at least one page) of real, non-zero heap pages."""
    path = RESULTS / f"corpus-{nbytes}.bin"
    if cache and path.exists() and path.stat().st_size == max(1, nbytes // PAGE) * PAGE:
        return path.read_bytes()
    data, info = build(nbytes)
    if cache:
        RESULTS.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        (RESULTS / f"corpus-{nbytes}.json").write_text(
            "{" + ", ".join(f'"{k}": {v}' for k, v in info.items()) + "}\n"
        )
    if verbose:
        import lz4.block

        sample = data[: 64 << 20]
        comp = sum(
            len(lz4.block.compress(sample[i : i + PAGE], store_size=False))
            for i in range(0, len(sample), PAGE)
        )
        print(
            f"corpus: {info['pages']} pages, {info['unique_pages']} unique "
            f"(ast {info['ast_pages']}, json {info['json_pages']}), "
            f"lz4 ratio {len(sample) / max(1, comp):.2f}",
            file=sys.stderr,
        )
    return data


if __name__ == "__main__":
    heap_pages(int(sys.argv[1]) if len(sys.argv) > 1 else 32 << 20, cache=False)
