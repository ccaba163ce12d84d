"""Real tests of the benchmark infrastructure: bench.corpus (heap pages of live processes),
bench.zram (kernel /dev/zram0, always reset) and the aggregation of bench.__main__."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

# bench/ is not an installed package: import it from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import corpus
from bench.__main__ import aggregate
from bench.zram import SYS, Zram, ZramBusyError

PAGE = 4096


def _disksize() -> int:
    return int((SYS / "disksize").read_text())


def test_capture_reads_live_process_memory() -> None:
    token = secrets.token_hex(16)
    prog = (
        "import sys; t = sys.argv[1]; keep = [t * 64 + str(i) for i in range(4000)]; "
        "print('ready', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", prog, token],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().startswith("ready")
        pages = corpus.capture_pages(p.pid)
    finally:
        p.kill()
        p.wait()
    assert pages and all(len(x) == PAGE and x != bytes(PAGE) for x in pages)
    assert sum(x.count(token.encode()) for x in pages) >= 4000  # the child's strings are there


def test_heap_pages_real_nonzero_and_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "RESULTS", tmp_path)
    n = 2 << 20
    data = corpus.heap_pages(n, verbose=False)
    assert len(data) == n
    pages = [data[i : i + PAGE] for i in range(0, n, PAGE)]
    assert bytes(PAGE) not in pages
    assert len(set(pages)) > len(pages) // 2  # mostly unique pages, not one repeated buffer
    assert any(b"ast" in x or b"Module" in x for x in pages)  # CPython heap of the AST program
    cached = tmp_path / f"corpus-{n}.bin"
    assert cached.read_bytes() == data
    assert corpus.heap_pages(n, verbose=False) == data  # served from the cache


def test_zram_roundtrip_stats_discard_and_reset() -> None:
    text = (b"zcached " * (PAGE * 16 // 8 + 1))[: PAGE * 16]
    data = os.urandom(64 * 1024) + text
    with Zram(8 << 20, algorithm="lz4") as z:
        assert "[lz4]" in (SYS / "comp_algorithm").read_text()
        assert _disksize() == 8 << 20
        before = z.mm_stat()
        z.write_pages(data, offset=PAGE * 4)
        assert z.read(PAGE * 4, len(data)) == data
        after = z.mm_stat()
        assert after["orig_data_size"] - before["orig_data_size"] == len(data)
        assert after["compr_data_size"] > before["compr_data_size"]
        z.discard(PAGE * 4, 16 * PAGE)
        z.compact()
        assert z.mm_stat()["orig_data_size"] == after["orig_data_size"] - 16 * PAGE
        assert z.read(PAGE * 4, 16 * PAGE) == bytes(16 * PAGE)  # discarded pages read zero
        assert set(z.io_stat()) >= {"failed_reads", "failed_writes"}
    assert _disksize() == 0


def test_zram_resets_on_error_and_after_swapon() -> None:
    with pytest.raises(RuntimeError, match="boom"), Zram(4 << 20) as z:
        z.write_pages(b"x" * PAGE)
        raise RuntimeError("boom")
    assert _disksize() == 0
    with Zram(16 << 20) as z:
        subprocess.run(["mkswap", z.path], check=True, capture_output=True)
        subprocess.run(["swapon", z.path], check=True)
        with pytest.raises(ZramBusyError):  # a second user is refused while it is swap
            Zram(4 << 20).__enter__()
        held = os.open(z.path, os.O_RDONLY)  # reset retries while a descriptor is open
        os.close(held)
    assert "/dev/zram0" not in Path("/proc/swaps").read_text()
    assert _disksize() == 0


def test_aggregate_medians_and_spread() -> None:
    runs = [
        {"a": 1, "b": {"c": 3.0, "s": "x"}, "ok": True},
        {"a": 5, "b": {"c": 1.0, "s": "y"}, "ok": False},
        {"a": 2, "b": {"c": 2.0, "s": "z"}, "ok": True},
    ]
    med, spread = aggregate(runs)
    assert med == {"a": 2, "b": {"c": 2.0, "s": "x"}, "ok": True}
    assert spread == {"a": [1, 5], "b": {"c": [1.0, 3.0]}}


def _sample_doc() -> dict[str, object]:
    """A latest.json as the runner writes it (medians + spread), swap and io modules only."""
    zram = {"wall_s": 40.0, "at_fill": {"mem_used_total": 100 << 20}}
    ours = {
        "wall_s": 50.0,
        "at_fill": {"mem_used_total": 97 << 20, "daemon_rss_growth_bytes": 110 << 20},
    }
    return {
        "machine": {"cpu": "Test CPU", "nproc": 2, "kernel": "6.18", "python": "3.11.7"},
        "modules": {
            "swap": {
                "repeat": 3,
                "result": {
                    "scaling": {
                        "x1": {"data_MiB": 512, "limit_MiB": 128,
                               "zcached": ours, "zram_lz4": zram,
                               "ratio_to_zram": {"wall_s": 1.25, "mem_used_total": 0.97}},
                    }
                },
                "spread": {"scaling": {"x1": {"ratio_to_zram": {"wall_s": [1.1, 1.4]}}}},
            },
            "swapscale": {
                "repeat": 1,
                "result": {
                    "scaling": {
                        "x4": {"data_MiB": 2048, "limit_MiB": 512,
                               "zcached": {"wall_s": 200.0}, "zram_lz4": {"wall_s": 100.0},
                               "ratio_to_zram": {"wall_s": 2.0}},
                        "x2": {"data_MiB": 1024, "limit_MiB": 256,
                               "zcached": {"wall_s": 90.0}, "zram_lz4": {"wall_s": 60.0},
                               "ratio_to_zram": {"wall_s": 1.5}},
                    }
                },
            },
            "io": {"repeat": 3, "error": "RuntimeError: fio failed"},
        },
    }  # fmt: skip


def test_readme_block_from_sample_json(tmp_path: Path) -> None:
    from bench import readme

    doc = _sample_doc()
    body = readme.render(doc)
    rows = {ln.split("|")[1].strip(): ln for ln in body.splitlines() if ln.startswith("| ")}
    x1 = rows["swap workload wall time, 512 MiB in a 128 MiB cgroup"]
    assert "| 50.0 s | 40.0 s | **1.25x** (1.10..1.40) | <= 2.5x |" in x1
    x2 = rows["swap workload wall time, 1024 MiB in a 256 MiB cgroup (1 run)"]
    assert "| 90.0 s | 60.0 s | **1.50x** |" in x2
    assert "| 200.0 s | 100.0 s | **2.00x** |" in body
    assert body.index("512 MiB in") < body.index("1024 MiB in") < body.index("2048 MiB in")
    mem = next(v for k, v in rows.items() if k.startswith("memory holding a 512 MiB"))
    assert "| 97.0 MiB | 100.0 MiB | **0.97x** |" in mem
    rss = rows["same, daemon memory growth (Pss of keeper + server: all of zcached's memory)"]
    assert "| 110.0 MiB | 100.0 MiB | not measured |" in rss  # no ratio in the JSON: none made up
    io = rows["4K random read, depth 32 (fio)"]
    assert io.count("not measured") == 3  # the io module failed
    assert "Test CPU" in body and "median of 3 run(s)" in body

    readme_md = tmp_path / "README.md"
    before, after = "# title\n\nkept text\n", "\n## next\nkept too\n"
    readme_md.write_text(
        before + "<!-- bench:begin (generated) -->\nold table\n<!-- bench:end -->" + after
    )
    sample = tmp_path / "latest.json"
    sample.write_text(json.dumps(doc))
    assert readme.main(["--json", str(sample), "--readme", str(readme_md)]) == 0
    text = readme_md.read_text()
    block = "<!-- bench:begin (generated) -->\n" + body + "<!-- bench:end -->"
    assert text == before + block + after
    assert readme.main(["--json", str(sample), "--readme", str(readme_md)]) == 0
    assert readme_md.read_text() == text  # idempotent

    readme_md.write_text("no markers here\n")
    assert readme.main(["--json", str(sample), "--readme", str(readme_md)]) == 1
    assert readme_md.read_text() == "no markers here\n"


def test_readme_names_modules_measured_elsewhere() -> None:
    """latest.json merges --only runs: the header must say which rows came from another machine
    or day, and say nothing when all came from the header's machine and day."""
    from bench import readme

    doc = _sample_doc()
    here = {"cpu": "Test CPU", "kernel": "6.18", "date": "2026-11-26T10:00:00Z"}
    doc["machine"] = {**here, "nproc": 2, "python": "3.11.7"}
    mods = doc["modules"]
    assert isinstance(mods, dict)
    for m in mods.values():
        m.update(machine=here, date="2026-11-26T11:00:00Z")
    assert "elsewhere" not in readme.render(doc)
    mods["io"]["machine"] = {"cpu": "Other CPU", "kernel": "6.1"}
    mods["swapscale"]["date"] = "2026-11-20T09:00:00Z"
    del mods["swap"]["machine"]
    header = " ".join(readme.render(doc).split("|")[0].split())
    assert "io (2026-11-26, Other CPU, kernel 6.1)" in header
    assert "swapscale (2026-11-20)" in header
    assert "swap (2026-11-26, machine not recorded)" in header


def test_save_module_merges_entries(tmp_path: Path) -> None:
    from bench.__main__ import save_module

    latest = tmp_path / "latest.json"
    latest.write_text(json.dumps({"modules": {"old": {"result": {"a": 1}}}, "date": "then"}))
    save_module(latest, "io", {"result": {"b": 2}}, {"argv": ["--only", "io"]})
    doc = save_module(latest, "swap", {"error": "boom"}, {"argv": ["--only", "swap"]})
    assert json.loads(latest.read_text()) == doc
    assert doc["modules"] == {
        "old": {"result": {"a": 1}},
        "io": {"result": {"b": 2}},
        "swap": {"error": "boom"},
    }
    assert doc["argv"] == ["--only", "swap"] and doc["date"] != "then"
    latest.write_text("[1, 2]")  # a file that is not an object is replaced, not fatal
    assert save_module(latest, "io", {"result": {}}, {})["modules"] == {"io": {"result": {}}}
    assert list(tmp_path.iterdir()) == [latest]  # no temporary file left


def test_comparison_plots_from_sample_json(tmp_path: Path) -> None:
    from bench import report

    made = report.write_comparison_plots(_sample_doc(), tmp_path)
    assert sorted(p.name for p in made) == ["compare.png", "scaling.png"]  # 3 sizes: a scaling
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
