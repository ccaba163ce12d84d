"""Crash consistency of the C page store: SIGKILL under load, then zc_store_attach recovers.

Owns: building csrc/crash_store.c (with gcc -O2, and with clang under ASan+UBSan) and running
it: each round a forked child attaches the store's memfd arena, writes, discards, reads and
compacts from several threads and is killed with SIGKILL at a random point (every 20th round
it finishes and exits instead); the parent attaches the arena again, checks the allocator and
compares every page byte for byte with a model of what each page may hold (its last
acknowledged content, or the content of a request cut short).  Any lost or wrong page, failed
check or inconsistent counter fails the program, hence the test.  And the same built with
-DZC_CRASH_POINTS and run as `crash_store --points`: each child dies (_exit) at the n-th hit of
one of the library's marked crash points (csrc/crashpoint.h; every CRASH_POINT("...") in
csrc/ in turn, n random), the places a random kill almost never lands; every point must have
crashed children, and every recovery must hold.
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
MARK = re.compile(r'CRASH_POINT\("([^"]+)"\)')
POINTS_SUMMARY = re.compile(
    r"crash_store: ok: --points (?P<rounds>\d+) rounds .*?: (?P<crashed>\d+) crashes at a point"
    r".*?(?P<clean>\d+) clean exits .*?(?P<hung>\d+) killed after .*"
    r"in-flight pages found old (?P<old>\d+), new (?P<new>\d+)"
)
PER_POINT = re.compile(
    r" (?P<name>[a-z_]+\.[a-z_]+) (?P<crashed>\d+)/(?P<rounds>\d+) \((?P<hits>\d+)\)"
)
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


def marked_points() -> set[str]:
    """Every crash point the C sources mark (crash_store.c must list each one: a child that
    meets a name it does not know fails)."""
    names = {n for src in sorted(CSRC.glob("*.[ch]")) for n in MARK.findall(src.read_text())}
    assert len(names) >= 12, names
    return names


def check_points_summary(p: subprocess.CompletedProcess[str], per_point: int) -> None:
    """Every round done, none hung (a child runs for well under a second; killed after 5 s),
    requests cut at their points found both undone and done, and every marked point crashed
    some children (no point that the workload never reaches, or that crash_store does not
    know)."""
    names = marked_points()
    m = POINTS_SUMMARY.search(p.stdout)
    assert m, f"no --points summary line\n{tail(p)}"
    n = {k: int(v) for k, v in m.groupdict().items()}
    assert n["rounds"] == per_point * len(names), n
    assert n["crashed"] + n["clean"] + n["hung"] == n["rounds"], n
    assert n["hung"] == 0, f"children still running after 5 s (a deadlock?): {n}\n{tail(p)}"
    assert n["old"] > 0 and n["new"] > 0, f"no crash landed inside a request: {n}\n{tail(p)}"
    line = next((x for x in p.stdout.splitlines() if "crashes per point" in x), "")
    counts = {g["name"]: (int(g["crashed"]), int(g["rounds"])) for g in PER_POINT.finditer(line)}
    assert set(counts) == names, f"points in the summary != points marked in csrc/\n{line}"
    never = sorted(k for k, (crashed, _) in counts.items() if crashed == 0)
    assert not never, f"no child crashed at {never}\n{tail(p)}"
    assert all(r == per_point for _, r in counts.values()), line


def points_run(
    exe: Path, per_point: int, seed: int, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    rounds = per_point * len(marked_points())
    return run([str(exe), "--points", str(rounds), str(seed)], timeout=300, env=env, cwd=cwd)


def test_crash_at_every_marked_point(tmp_path: Path) -> None:
    """12 rounds per crash point with the optimised build (gcc -O2 -DZC_CRASH_POINTS)."""
    exe = tmp_path / "crash_store_points"
    argv = [tool("gcc"), *WARN, "-O2", "-DZC_CRASH_POINTS", "-pthread", *SOURCES, *LIBS]
    build([*argv, "-o", str(exe)], exe.name)
    p = points_run(exe, 12, 1, san_env(), tmp_path)
    assert p.returncode == 0, f"crash_store --points: recovery failed\n{tail(p)}"
    check_points_summary(p, 12)


def test_crash_at_every_marked_point_asan_ubsan(tmp_path: Path) -> None:
    """8 rounds per crash point under ASan+UBSan (clang -DZC_CRASH_POINTS): the children that
    die at a point may report nothing before, those that run out of work no leak, the
    recoveries and checks nothing at all."""
    exe = tmp_path / "crash_store_points_asan"
    argv = [tool("clang"), *WARN, *DBG, *SAN, "-DZC_CRASH_POINTS", *SOURCES, *LIBS]
    build([*argv, "-o", str(exe)], exe.name)
    env = san_env(ASAN_OPTIONS="detect_leaks=1:halt_on_error=1")
    p = points_run(exe, 8, 3, env, tmp_path)
    assert_clean(p, "crash_store --points under ASan+UBSan")
    check_points_summary(p, 8)
