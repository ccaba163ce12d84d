"""Crash consistency of the C page store: SIGKILL under load, then zc_store_attach recovers.

Owns: building csrc/crash_store.c (with gcc -O2, and with clang under ASan+UBSan) and running
it: each round a forked child attaches the store's memfd arena, writes, discards, reads and
compacts from several threads and is killed with SIGKILL at a random point (every 20th round
it finishes and exits instead); the parent attaches the arena again, checks the allocator and
compares every page byte for byte with a model of what each page may hold (its last
acknowledged content, or the content of a request cut short).  Any lost or wrong page, failed
check or inconsistent counter fails the program, hence the test.
Must not: build into the source tree (everything goes to tmp_path), skip (a missing compiler
or sanitizer runtime is a failure, as in tests/test_core_sanitizers.py), or run for more than
about a minute.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from test_core_sanitizers import (
    CORE,
    CSRC,
    DBG,
    LIBS,
    SAN,
    WARN,
    assert_clean,
    build,
    run,
    san_env,
    tail,
    tool,
)

SOURCES = [str(CSRC / "crash_store.c"), *(str(CSRC / c) for c in CORE)]
SUMMARY = re.compile(
    r"crash_store: ok: (?P<rounds>\d+) rounds .*?: (?P<kills>\d+) kills .*?"
    r"(?P<clean>\d+) clean exits; .*in-flight pages found old (?P<old>\d+), new (?P<new>\d+)"
)


def check_summary(p: subprocess.CompletedProcess[str], rounds: int) -> None:
    """The run was real: every round done, nearly all of them kills, and kills that landed
    inside requests (some in-flight pages found as they were before, some as after)."""
    m = SUMMARY.search(p.stdout)
    assert m, f"no summary line\n{tail(p)}"
    n = {k: int(v) for k, v in m.groupdict().items()}
    assert n["rounds"] == rounds, n
    assert n["kills"] + n["clean"] == rounds and n["clean"] == rounds // 20, n
    assert n["old"] > 0 and n["new"] > 0, f"no kill landed inside a request: {n}\n{tail(p)}"


def test_crash_recovery(tmp_path: Path) -> None:
    """150 rounds with the optimised build (gcc -O2): timing close to the real server's."""
    exe = tmp_path / "crash_store"
    build([tool("gcc"), *WARN, "-O2", "-pthread", *SOURCES, *LIBS, "-o", str(exe)], exe.name)
    p = run([str(exe), "150", "1"], timeout=300, env=san_env(), cwd=tmp_path)
    assert p.returncode == 0, f"crash_store 150 1: recovery failed\n{tail(p)}"
    check_summary(p, 150)


def test_crash_recovery_asan_ubsan(tmp_path: Path) -> None:
    """60 rounds under ASan+UBSan (clang): the killed children may report nothing before the
    kill, the recoveries and the parent's checks nothing at all, leaks included."""
    exe = tmp_path / "crash_store_asan"
    build([tool("clang"), *WARN, *DBG, *SAN, *SOURCES, *LIBS, "-o", str(exe)], exe.name)
    env = san_env(ASAN_OPTIONS="detect_leaks=1:halt_on_error=1")
    p = run([str(exe), "60", "2"], timeout=300, env=env, cwd=tmp_path)
    assert_clean(p, "crash_store 60 2 under ASan+UBSan")
    check_summary(p, 60)
