"""The C core under both compilers' warnings, the sanitizers and libFuzzer.

Owns: the project rule for C on the swap path, as tests: every csrc/*.c compiles warning-free
(-Wall -Wextra -Werror) with gcc and with clang; the libFuzzer targets csrc/fuzz_store.c (the
store API) and csrc/fuzz_fuse.c (the FUSE request decoder over a real store) run for a bounded
time under ASan+UBSan without a finding; csrc/stress_store.c (threads on the store API, a
compactor beside them) passes under ASan+UBSan and under TSan; and the extension itself, built
with ASan+UBSan by setup.py, survives a threaded workload through zcached.core.CoreStore and bad
arguments (and tests/test_core_model.py, run against that build).
Must not: build into the source tree (everything goes to tmp_path), skip (a missing compiler or
sanitizer runtime is a failure: `make deps` installs them), or run longer than CI allows (about
3 minutes for the whole file on 2 CPUs).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CORE = ["arena.c", "backing.c", "codec.c", "xcfmalloc.c", "store.c"]  # + the FUSE loop where needed
LIBS = ["-llz4", "-lzstd", "-lxxhash", "-lpthread"]
WARN = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror"]
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
DBG = ["-O1", "-g", "-fno-omit-frame-pointer", "-pthread"]
FUZZ_SECONDS = 25
FINDINGS = ("runtime error", "ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "ThreadSanitizer")
HINT = "`make deps` installs gcc, clang and libclang-rt-14-dev (these tests never skip)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {HINT}")
    return path


def run(
    argv: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{argv[0]} ran over {timeout} s (a hang?): {e.stderr!r:.4000}")


def build(argv: list[str], what: str) -> None:
    """Compile or link; a failure names the runtime that may be missing."""
    p = run(argv, timeout=180)
    if p.returncode:
        pytest.fail(
            f"building {what} failed (rc {p.returncode}); if the error is about a missing "
            f"sanitizer or libFuzzer runtime: {HINT}\n$ {' '.join(argv)}\n{p.stderr[-6000:]}"
        )


def tail(p: subprocess.CompletedProcess[str]) -> str:
    return f"rc {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-8000:]}"


def assert_clean(p: subprocess.CompletedProcess[str], what: str) -> None:
    found = [f for f in FINDINGS if f in p.stderr]
    assert p.returncode == 0 and not found, f"{what}: {found or 'failed'}\n{tail(p)}"


def san_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("SAN_OPTIONS")}
    env.pop("LD_PRELOAD", None)
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.update(extra)
    return env


# ---- (a) warnings are errors, with both compilers ------------------------------------------


@pytest.mark.parametrize("cc", ["gcc", "clang"])
def test_every_c_file_compiles_warning_free(cc: str, tmp_path: Path) -> None:
    """csrc/*.c: the core, pymod.c (Python's headers), the fuzz targets and the stress
    program, each also as the -DZC_STANDALONE program where it has one."""
    compiler = tool(cc)
    include = sysconfig.get_paths()["include"]
    sources = sorted(CSRC.glob("*.c"))
    assert {"pymod.c", "store.c", "fuse_loop.c", "fuzz_fuse.c", "stress_store.c"} <= {
        s.name for s in sources
    }
    for src in sources:
        variants: list[list[str]] = [[]]
        if "ZC_STANDALONE" in src.read_text():
            variants.append(["-DZC_STANDALONE"])
        for extra in variants:
            obj = tmp_path / f"{src.stem}{len(extra)}.o"
            argv = [compiler, *WARN, "-O2", *extra, f"-I{include}", "-c", str(src), "-o", str(obj)]
            build(argv, f"{src.name} with {cc} {' '.join(extra)}")


# ---- (b), (c) the libFuzzer targets --------------------------------------------------------


def _fuse_req(op: int, body: bytes, nodeid: int, unique: int) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(body), op, unique, nodeid, 0, 0, 0, 0, 0) + body


def _record(req: bytes, ctl: int = 1, aux: int = 0) -> bytes:
    """One record of fuzz_fuse.c's input: ctl, len, aux, request (ctl 1: FIXLEN)."""
    return struct.pack("<HHB", ctl, len(req), aux) + req


FUSE_DEV = 320 * 4096  # csrc/fuzz_fuse.c's device (DEV_BYTES)


def _fuse_seeds() -> dict[str, bytes]:
    """A few valid request sequences, so 25 s reach every opcode's decoder and the store."""
    init = _fuse_req(26, struct.pack("<IIII", 7, 31, 1 << 17, 0xFFFFFFFF) + bytes(48), 0, 1)
    text = b"the quick brown fox jumps over the lazy dog\n" * 100
    rnd = bytes((i * 2654435761 >> 13) & 0xFF for i in range(4096))

    def rw(off: int, size: int, data: bytes = b"") -> bytes:  # fuse_read_in / fuse_write_in
        return struct.pack("<QQIIQII", 0, off, size, 0, 0, 0, 0) + data

    def read(off: int, size: int, u: int) -> bytes:
        return _fuse_req(15, rw(off, size), 2, u)

    def write(off: int, data: bytes, u: int) -> bytes:
        return _fuse_req(16, rw(off, len(data), data), 2, u)

    def falloc(off: int, length: int, mode: int, u: int) -> bytes:
        return _fuse_req(43, struct.pack("<QQQII", 0, off, length, mode, 0), 2, u)

    getattr_in = struct.pack("<IIQ", 0, 0, 0)
    setattr_in = struct.pack("<IIQQQQQQIIIIIIII", 1 | 8, 0, 0, FUSE_DEV, 0, 0, 0, 0, 0, 0, 0,
                             0o100600, 0, 0, 0, 0)  # fmt: skip
    meta = [
        init,
        _fuse_req(1, b"swap.img\0", 1, 2),
        _fuse_req(1, b"nope\0", 1, 3),
        _fuse_req(3, getattr_in, 1, 4),
        _fuse_req(3, getattr_in, 2, 5),
        _fuse_req(4, setattr_in, 2, 6),
        _fuse_req(14, struct.pack("<II", 2, 0), 2, 7),
        _fuse_req(27, struct.pack("<II", 0, 0), 1, 8),
        _fuse_req(28, rw(0, 4096), 1, 9),
        _fuse_req(44, rw(1, 300), 1, 10),
        _fuse_req(17, b"", 1, 11),
        _fuse_req(22, struct.pack("<II", 100, 0) + b"user.x\0", 2, 12),
        _fuse_req(23, struct.pack("<II", 0, 0), 2, 13),
        _fuse_req(2, struct.pack("<Q", 1), 2, 14),
        _fuse_req(42, struct.pack("<II", 1, 0) + struct.pack("<QQ", 2, 1), 0, 15),
        _fuse_req(36, struct.pack("<Q", 5), 0, 16),
        _fuse_req(46, struct.pack("<QQII", 0, 0, 3, 0), 2, 17),
        _fuse_req(25, bytes(24), 2, 18),
        _fuse_req(99, b"", 1, 19),
    ]
    io = [
        write(0, text, 20),
        read(0, 8192, 21),
        read(100, 5000, 22),
        write(12345, b"hello, world", 23),
        read(12000, 1000, 24),
        falloc(4096, 8192, 3, 25),
        read(0, 16384, 26),
        falloc(FUSE_DEV - 4096, 1 << 20, 0x10, 27),
        write(FUSE_DEV - 10, b"past the end", 28),
    ]
    page2 = (text * 2)[:8192]
    edges = [  # the end of the device, unaligned discards over data
        write(FUSE_DEV - 8192, page2, 50),
        read(FUSE_DEV - 100, 4096, 51),  # clamped to 100 bytes
        read(FUSE_DEV, 10, 52),
        falloc(FUSE_DEV - 8000, 5000, 3, 53),
        read(FUSE_DEV - 8192, 8192, 54),
        falloc(FUSE_DEV - 3000, 1 << 20, 0x11, 55),  # clamped to the end
        read(FUSE_DEV - 8192, 8192, 56),
        write(0, page2, 57),
        falloc(100, 6000, 3, 58),
        read(0, 8192, 59),
        falloc(50, 8000, 0x10, 60),
        read(0, 12288, 61),
    ]
    corrupt = [
        _record(write(0, rnd, 30)),
        _record(read(0, 4096, 31), ctl=1 | 1 << 8, aux=0),  # CORRUPT page 0, then READ
        _record(write(100, b"edge", 32)),
        _record(write(0, rnd[::-1], 33), ctl=1 | 1 << 9, aux=8),  # COMPACT first
        _record(read(0, 4096, 34)),
    ]
    # GROW: a WRITE of 1 MiB from 256 bytes of input (its payload repeated).
    grow = bytearray(write(0, text[:256], 40))
    struct.pack_into("<I", grow, 56, 1 << 20)  # fuse_write_in.size: 1 MiB
    big = _record(bytes(grow), ctl=1 | 1 << 4)

    def seq(reqs: list[bytes]) -> bytes:
        return b"".join(_record(r) for r in reqs)

    return {
        "meta": seq(meta),
        "io": seq([init, *io]),
        "edges": seq(edges),
        "corrupt": b"".join(corrupt),
        "big": big + seq([read(100, 1 << 20, 41), falloc(0, 1 << 30, 3, 42), read(0, 8192, 43)]),
        "replies": b"".join(_record(r, ctl=1 | k << 5) for k, r in enumerate(io[:4])),
    }


def _fuzz(target: str, tmp_path: Path, seeds: dict[str, bytes]) -> None:
    clang = tool("clang")
    sources = [str(CSRC / target), *(str(CSRC / c) for c in CORE)]
    if target == "fuzz_fuse.c":
        sources += [str(CSRC / "fuse_loop.c"), str(CSRC / "fuse_uring.c")]
    exe = tmp_path / Path(target).stem
    build(
        [clang, *WARN, *DBG, "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
         *sources, *LIBS, "-o", str(exe)],
        f"{target} with libFuzzer",
    )  # fmt: skip
    corpus, seed_dir, artifacts = tmp_path / "corpus", tmp_path / "seeds", tmp_path / "artifacts"
    for d in (corpus, seed_dir, artifacts):
        d.mkdir()
    for name, data in seeds.items():
        (seed_dir / name).write_bytes(data)
    p = run(
        [str(exe), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=2048", "-timeout=30",
         "-print_final_stats=1", f"-artifact_prefix={artifacts}/", str(corpus), str(seed_dir)],
        timeout=FUZZ_SECONDS + 90, env=san_env(), cwd=tmp_path,
    )  # fmt: skip
    crashes = sorted(a.name for a in artifacts.iterdir())
    assert p.returncode == 0 and not crashes, (
        f"{target}: a finding (reproduce: {exe.name} {artifacts}/<file>) {crashes}\n{tail(p)}"
    )
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stderr)
    assert m and int(m.group(1)) >= 1000, f"{target} barely ran\n{tail(p)}"


def test_fuzz_store(tmp_path: Path) -> None:
    """The store API from arbitrary bytes, against a shadow (csrc/fuzz_store.c)."""
    _fuzz("fuzz_store.c", tmp_path, {})


def test_fuzz_fuse(tmp_path: Path) -> None:
    """The FUSE decoder over a real store: every reply well-formed, the device a flat file
    (csrc/fuzz_fuse.c), seeded with valid requests of every opcode it serves."""
    _fuzz("fuzz_fuse.c", tmp_path, _fuse_seeds())


# ---- (d) the threaded stress program -------------------------------------------------------

# (sanitizer flags, env, [argv tails]): each run well under 30 s on 2 loaded CPUs.
STRESS = {
    "asan_ubsan": (
        SAN,
        {"ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1"},
        [["-i", "4000", "-s", "1"], ["-i", "2000", "-z", "-m", "600", "-s", "2"]],
    ),
    "tsan": (
        ["-fsanitize=thread"],
        {"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"},
        [["-i", "1500", "-s", "3"]],
    ),
}


@pytest.mark.parametrize("sanitizer", sorted(STRESS))
def test_stress_store(sanitizer: str, tmp_path: Path) -> None:
    """Writers/readers/discarders on disjoint ranges with a compactor beside them; then
    zc_store_check and a full verify (csrc/stress_store.c).  TSan must report nothing."""
    flags, env, runs = STRESS[sanitizer]
    exe = tmp_path / f"stress_{sanitizer}"
    sources = [str(CSRC / "stress_store.c"), *(str(CSRC / c) for c in CORE)]
    build([tool("clang"), *WARN, *DBG, *flags, *sources, *LIBS, "-o", str(exe)], exe.name)
    for args in runs:
        p = run([str(exe), *args], timeout=120, env=san_env(**env), cwd=tmp_path)
        assert_clean(p, f"{exe.name} {' '.join(args)}")
        assert "stress_store: ok" in p.stdout, tail(p)


# ---- (e) the extension built with ASan + UBSan ---------------------------------------------

WORKLOAD = textwrap.dedent(
    '''
    """Run by test_sanitized_extension: CoreStore from 2 threads, then bad arguments."""
    import errno
    import os
    import random
    import sys
    import threading
    import time

    import zcached
    from zcached import _core
    from zcached.core import CoreStore
    from zcached.store import StoreError

    LIB, ITERS = sys.argv[1], int(sys.argv[2])
    for mod in (zcached, _core):
        assert mod.__file__.startswith(LIB), f"{mod.__name__} from {mod.__file__}, not {LIB}"
    with open(_core.__file__, "rb") as f:
        so = f.read()
    assert b"__asan_report" in so and b"__ubsan_handle" in so, "_core is not instrumented"
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert "libasan" in maps and "libubsan" in maps, "the sanitizer runtimes are not loaded"
    PAGE, MAX = _core.PAGE_SIZE, _core.MAX_REQUEST
    TEXT = b"the quick brown fox jumps over the lazy dog 0123456789\\n" * 20000

    def data(rng, n):
        shape = rng.randrange(5)
        if shape == 0:
            return bytes(n)
        if shape == 1:
            return (rng.randbytes(8) * (n // 8 + 1))[:n]
        if shape == 2:
            at = rng.randrange(len(TEXT) - n)
            return TEXT[at : at + n]
        if shape == 3:  # mostly zeros, a random byte every `step`
            b, step = bytearray(n), rng.randrange(64, 512)
            b[::step] = rng.randbytes(len(range(0, n, step)))
            return bytes(b)
        return rng.randbytes(n)

    class Worker(threading.Thread):
        def __init__(self, store, base, nbytes, seed, limited, ever, lock):
            super().__init__()
            self.s, self.base, self.n, self.limited = store, base, nbytes, limited
            self.rng = random.Random(seed)
            self.shadow = bytearray(nbytes)
            self.ever, self.lock = ever, lock  # pages any worker ever corrupted
            self.error = None
            self.detected = 0

        def pick(self, most):
            rng = self.rng
            if rng.random() < 0.5:
                off = rng.randrange(self.n // PAGE) * PAGE
                ln = PAGE * (1 + rng.randrange(8 if rng.random() < 0.8 else most // PAGE))
            else:
                off = rng.randrange(self.n)
                ln = 1 + rng.randrange(3 * PAGE if rng.random() < 0.8 else most)
            return off, min(ln, self.n - off)

        def run(self):
            try:
                for _ in range(ITERS):
                    self.step()
            except BaseException as e:  # reported by the main thread
                import traceback

                self.error = traceback.format_exc()

        def step(self):
            rng, s, sh = self.rng, self.s, self.shadow
            op = rng.randrange(20)
            if op < 7:
                off, ln = self.pick(MAX)
                d = data(rng, ln)
                try:
                    s.write(self.base + off, d)
                except StoreError as e:
                    assert self.limited and e.errno == errno.ENOSPC, e
                    return
                sh[off : off + ln] = d
            elif op < 13:
                off, ln = self.pick(MAX)
                got = s.read(self.base + off, ln)
                assert got == sh[off : off + ln], f"read {self.base + off}+{ln} differs"
            elif op < 16:
                off, ln = self.pick(4 * MAX)
                try:
                    s.discard(self.base + off, ln)
                except StoreError as e:
                    assert self.limited and e.errno == errno.ENOSPC, e
                    return
                sh[off : off + ln] = bytes(ln)
            elif op == 16:
                s.allocator.compact(rng.choice([None, 1, 16, 256]))
            elif op == 17:
                st = s.raw_stats()
                assert st["mem_used_max"] >= st["mem_used_total"], st
                s.allocator.fragmentation()
                s.allocator.reclaimable_bytes()
                s.allocator.stats()
            elif op == 18:
                bad = s.scrub()
                with self.lock:
                    assert set(bad) <= self.ever, (bad, self.ever)
            else:
                self.corrupt_one()

        def corrupt_one(self):
            """Corrupt a page of ours that holds an object: its read must fail with EIO and
            scrub must name it, until it is written again."""
            rng, s = self.rng, self.s
            off = rng.randrange(self.n // PAGE) * PAGE
            page = (self.base + off) // PAGE
            d = rng.randbytes(PAGE) if rng.random() < 0.5 else TEXT[off % 4000 : off % 4000 + PAGE]
            try:
                s.write(self.base + off, d)
            except StoreError as e:
                assert self.limited and e.errno == errno.ENOSPC, e
                return
            self.shadow[off : off + PAGE] = d
            with self.lock:
                self.ever.add(page)  # never removed: another thread may scrub any time
            s.corrupt(page)
            try:
                s.read(self.base + off, PAGE)
            except StoreError as e:
                assert e.errno == errno.EIO, e
                self.detected += 1
            else:
                raise AssertionError(f"corrupted page {page} read back without an error")
            assert page in s.scrub(), page
            d = data(rng, PAGE)
            while True:
                try:
                    s.write(self.base + off, d)
                    break
                except StoreError as e:
                    assert self.limited and e.errno == errno.ENOSPC, e
                    d = bytes(PAGE)  # a zero page always fits
            self.shadow[off : off + PAGE] = d

    def verify(s, workers):
        for w in workers:
            for off in range(0, w.n, MAX):
                ln = min(MAX, w.n - off)
                assert s.read(w.base + off, ln) == w.shadow[off : off + ln], (w.base, off)

    def workload(**cfg):
        size = 8 << 20
        s = CoreStore(size, heaps=2, **cfg)
        lock, ever = threading.Lock(), set()
        half = size // 2
        ws = [Worker(s, i * half, half, 7 * i + len(cfg), "mem_limit" in cfg, ever, lock)
              for i in range(2)]
        for w in ws:
            w.start()
        for w in ws:
            w.join()
        errors = [w.error for w in ws if w.error]
        assert not errors, "\\n".join(errors)
        s.allocator.check()
        verify(s, ws)
        assert s.scrub() == []
        st = s.raw_stats()
        assert st["checksum_errors"] >= sum(w.detected for w in ws), st
        s.allocator.compact(None)
        s.allocator.check()
        verify(s, ws)
        s.discard(0, size)
        st = s.raw_stats()
        assert st["pages_stored"] == st["objects"] == st["mem_used_total"] == 0, st
        s.close()
        print("workload", cfg, "ok:", sum(w.detected for w in ws), "corruptions detected")

    def raises(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except SystemError:  # a C function returned NULL without an exception, or vice versa
            raise
        except (ValueError, OverflowError, TypeError, OSError, RuntimeError, BufferError):
            return
        raise AssertionError(f"{fn.__name__}{args}{kw} did not raise")

    def bad_arguments():
        S = _core.Store
        for args, kw in [
            ((0,), {}), ((4095,), {}), ((-4096,), {}), ((2**64,), {}), ((2**63,), {}),
            ((1 << 40 << 12,), {}), ((1 << 20,), {"compressor": "lzma"}),
            ((1 << 20,), {"compressor": None}), ((1 << 20,), {"heaps": 0}),
            ((1 << 20,), {"heaps": -1}), ((1 << 20,), {"heaps": 2**31}),
            ((1 << 20,), {"heaps": 100000}), ((1 << 20,), {"huge_threshold": 0}),
            ((1 << 20,), {"huge_threshold": 4097}), ((1 << 20,), {"huge_threshold": -1}),
            ((1 << 20,), {"level": 2**70}), ((1 << 20,), {"level": "x"}),
            ((1 << 20,), {"compressor": "zstd", "level": 10**6}), (("x",), {}), ((), {}),
        ]:
            raises(S, *args, **kw)
        for args in [(0,), (4097,), (4096,)]:
            kw = {"mem_limit": -1} if args == (4096,) else {}
            raises(CoreStore, *args, **kw)
        raw = S(1 << 20, heaps=2)
        end = 1 << 20
        for fn, args in [
            (raw.read, (-1, 1)), (raw.read, (0, -1)), (raw.read, (0, MAX + 1)),
            (raw.read, (end, 1)), (raw.read, (2**64 - 4096, 8192)), (raw.read, (2**64, 1)),
            (raw.read, (0,)), (raw.read, (0, 2**32)), (raw.read, (end - 1, 2)),
            (raw.write, (-1, b"x")), (raw.write, (end, b"x")), (raw.write, (2**64 - 1, b"xy")),
            (raw.write, (0, bytes(MAX + 1))), (raw.write, (0, "str")), (raw.write, (0, None)),
            (raw.write, (0, memoryview(bytes(8192))[::2])), (raw.write, (end - 1, b"xy")),
            (raw.discard, (-1, 1)), (raw.discard, (0, 2**64 - 1)), (raw.discard, (end, 1)),
            (raw.discard, (2**64 - 4096, 8192)), (raw.discard, (0, -1)),
            (raw.corrupt, (-1,)), (raw.corrupt, (2**64 - 1,)), (raw.corrupt, (0,)),
            (raw.corrupt, (end // PAGE,)), (raw.compact, ("x",)), (raw.compact, (1, 2)),
        ]:
            raises(fn, *args)
        raw.compact(-1)  # "K" wraps a negative: 2**64 - 1 moves, i.e. all there are
        raw.read(end, 0)  # empty requests at the end are fine
        raw.write(end, b"")
        raw.discard(end, 0)
        raw.write(end - 4096, bytes(4096))
        for args, kw in [
            ((raw, -1, "swap.img"), {"threads": 3}), ((raw, -1, "swap.img"), {"threads": 0}),
            ((raw, -1, "a/b"), {}), ((raw, -1, ""), {}), ((raw, -1, "."), {}),
            ((raw, -1, "x" * 300), {}), ((object(), -1, "x"), {}), ((raw, 2**40, "x"), {}),
            ((raw, -1, None), {}),
        ]:
            raises(_core.Fuse, *args, **kw)
        f = _core.Fuse(raw, -1, "swap.img")
        raises(f.start)  # EBADF: no connection
        raises(f.start)
        assert f.join(0) == 0
        raises(raw.close)  # still served
        assert f.stats()["internal_errors"] == 0
        f.close()
        raises(f.stats)
        f.close()
        # Real worker threads on a descriptor that is not open: they end at once, counted.
        fd = os.open("/dev/null", os.O_RDONLY)
        os.close(fd)
        f = _core.Fuse(raw, fd, "swap.img", threads=1)
        f.start()
        assert f.join(10000) == 0
        assert f.stats()["internal_errors"] >= 1
        f.close()
        raises(raw.__init__, 4096)
        u = S.__new__(S)
        for fn in (u.stats, u.scrub, u.check, u.memfd, u.compact, u.reclaimable_bytes):
            raises(fn)
        raises(u.read, 0, 1)
        u.close()
        g = _core.Fuse.__new__(_core.Fuse)
        raises(g.stats)
        raises(g.start)
        g.join(0)
        g.close()
        raw.close()
        for fn, args in [(raw.read, (0, 1)), (raw.write, (0, b"x")), (raw.discard, (0, 1)),
                         (raw.scrub, ()), (raw.check, ()), (raw.memfd, ()), (raw.stats, ()),
                         (raw.compact, ()), (raw.corrupt, (0,)), (raw.fragmentation, ())]:
            raises(fn, *args)
        raw.close()
        raises(_core.Fuse, raw, -1, "x")
        print("bad arguments ok")

    def close_while_busy():
        """close() from one thread while others are inside calls without the GIL: it waits
        for them, and the calls after it are refused (ValueError), never a use after free."""
        for _ in range(20):
            s = _core.Store(4 << 20, heaps=2)
            s.write(0, bytes(range(256)) * 4096)
            refused = []

            def hammer():  # until close() refuses it
                while True:
                    try:
                        s.read(0, 1 << 20)
                        s.stats()
                        s.compact(0)
                    except ValueError:
                        refused.append(1)
                        return

            ts = [threading.Thread(target=hammer) for _ in range(2)]
            for t in ts:
                t.start()
            time.sleep(0.01)
            s.close()
            for t in ts:
                t.join()
            assert len(refused) == 2
        print("close while busy ok")

    workload(compressor="lz4")
    workload(compressor="zstd", mem_limit=3 << 20)
    bad_arguments()
    close_while_busy()
    '''
)


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """setup.py build_ext with ASan+UBSan into a temporary directory, the package's .py files
    beside it; the environment that imports it (the runtimes preloaded into python)."""
    gcc = tool("gcc")
    runtimes = []
    for name in ("libasan.so", "libubsan.so"):
        path = run([gcc, f"-print-file-name={name}"], timeout=30).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            pytest.fail(f"gcc has no {name} ({path!r}): {HINT}")
        runtimes.append(os.path.realpath(path))
    tmp = tmp_path_factory.mktemp("asan_ext")
    lib, temp = tmp / "lib", tmp / "build"
    env = san_env(
        ZCACHED_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer "
        "-fno-sanitize-recover=all",
        ZCACHED_LDFLAGS="-fsanitize=address,undefined",
    )
    argv = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib),
            "--build-temp", str(temp), "--parallel", "2"]  # fmt: skip
    p = run(argv, timeout=300, env=env, cwd=ROOT)
    if p.returncode:
        pytest.fail(f"sanitized build_ext failed ({HINT})\n{tail(p)}")
    sos = list((lib / "zcached").glob("_core*.so"))
    assert len(sos) == 1, sos
    for py in (ROOT / "zcached").glob("*.py"):
        shutil.copy(py, lib / "zcached" / py.name)
    run_env = san_env(
        PYTHONPATH=str(lib),
        LD_PRELOAD=" ".join(runtimes),
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",  # CPython leaks on purpose
        PYTHONDONTWRITEBYTECODE="1",
    )
    return lib, run_env


def test_sanitized_extension_workload(
    sanitized_build: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """zcached.core.CoreStore from 2 threads (writes, reads, discards, compactions, scrubs,
    corruptions, every byte verified) and bad arguments, in the ASan+UBSan build."""
    lib, env = sanitized_build
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    p = run([sys.executable, str(script), str(lib), "3000"], timeout=240, env=env, cwd=tmp_path)
    assert_clean(p, "the workload under ASan+UBSan")
    assert "bad arguments ok" in p.stdout, tail(p)


MODEL_TESTS = ROOT / "tests" / "test_core_model.py"
# Not the Hypothesis state machines (TestCoreModel*: 80+ s under ASan, mostly in the Python
# model) nor the compressed-size replay (ctypes on the codec libraries, little of the core):
# the threads, atomicity, ENOSPC, corruption and bad-request tests, about 25 s.
MODEL_SELECTION = "not TestCoreModel and not compressed_sizes"


def test_sanitized_extension_model(
    sanitized_build: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """tests/test_core_model.py (the core against its Python model) on the ASan+UBSan build."""
    lib, env = sanitized_build
    assert MODEL_TESTS.exists(), f"{MODEL_TESTS} is gone: drop this test with it"
    probe = "import sys, zcached._core as c; assert c.__file__.startswith(sys.argv[1]), c.__file__"
    p = run([sys.executable, "-c", probe, str(lib)], timeout=60, env=env, cwd=tmp_path)
    assert p.returncode == 0, tail(p)
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
            f"--rootdir={ROOT}", "-k", MODEL_SELECTION, str(MODEL_TESTS)]  # fmt: skip
    p = run(argv, timeout=240, env=env, cwd=tmp_path)
    assert_clean(p, "tests/test_core_model.py under ASan+UBSan")
    m = re.search(r"(\d+) passed", p.stdout)
    assert m and int(m.group(1)) >= 10, f"too few model tests ran\n{tail(p)}"
