"""Collector, exporter and `zcached status` against a real PageStore and real HTTP on loopback."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lz4.block
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zcached import status
from zcached.compactor import Compactor
from zcached.core import CoreFuseServer, CoreStore
from zcached.fuse import FuseServer
from zcached.metrics import Exporter, ZcachedCollector, start_exporter
from zcached.store import PageStore

PAGE = 4096
ROOT = Path(__file__).resolve().parent.parent


def page(i: int) -> bytes:
    """A compressible, non-same-filled page distinct per i."""
    head = f"page {i} ".encode() * 8
    return (head + bytes(range(256)) * 2 + b"\0" * PAGE)[:PAGE]


def values(metrics_text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


Store = PageStore | CoreStore


def new_store(kind: str, size: int) -> Store:
    """The daemon's C store, or the reference model."""
    return CoreStore(size, heaps=2) if kind == "core" else PageStore(size)


@pytest.fixture(params=["core", "model"])
def written(request: pytest.FixtureRequest) -> tuple[Store, int, int, int]:
    st = new_store(request.param, 64 * PAGE)
    n = 10
    compr = 0
    for i in range(n):
        p = page(i)
        st.write(i * PAGE, p)
        compr += len(lz4.block.compress(p, store_size=False))
    same = 3
    for i in range(n, n + same):
        st.write(i * PAGE, b"\x07" * PAGE)
    return st, n, same, compr


def collect(st: Store) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in ZcachedCollector(st).collect():
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def test_collector_tells_the_truth(written: tuple[Store, int, int, int]) -> None:
    st, n, same, compr = written
    v = collect(st)
    assert v["zcached_writes_total"] == n + same
    assert v["zcached_orig_data_bytes"] == (n + same) * PAGE
    assert v["zcached_compr_data_bytes"] == compr
    assert v["zcached_same_pages"] == same
    assert v["zcached_huge_pages"] == 0
    assert v["zcached_reads_total"] == 0
    assert st.read(0, PAGE) == page(0)
    st.discard(PAGE, PAGE)
    v = collect(st)
    assert v["zcached_reads_total"] == 1
    assert v["zcached_discards_total"] == 1
    assert v["zcached_compr_data_bytes"] == compr - len(
        lz4.block.compress(page(1), store_size=False)
    )
    assert v["zcached_pool_bytes"] >= v["zcached_compr_data_bytes"]
    assert v["zcached_process_resident_memory_bytes"] > 0


def test_huge_page_counted() -> None:
    st = PageStore(4 * PAGE)
    st.write(0, os.urandom(PAGE))
    v = collect(st)
    assert v["zcached_huge_pages"] == 1
    assert v["zcached_compr_data_bytes"] == PAGE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def exporter(written: tuple[Store, int, int, int]) -> Iterator[Exporter]:
    st = written[0]
    ex = start_exporter(
        "127.0.0.1:0",
        st,
        info=lambda: {
            "device": "zcached0",
            "algorithm": "lz4",
            "mountpoint": "/run/x",
            "loop_device": "/dev/loop9",
            "swap_priority": 100,
        },
    )
    try:
        yield ex
    finally:
        ex.close()


def get(ex: Exporter, path: str) -> bytes:
    host, port = ex.address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as r:
        return bytes(r.read())


def test_exporter_http(exporter: Exporter, written: tuple[Store, int, int, int]) -> None:
    _, n, same, compr = written
    v = values(get(exporter, "/metrics").decode())
    assert v["zcached_writes_total"] == n + same
    assert v["zcached_compr_data_bytes"] == compr
    doc = json.loads(get(exporter, "/status"))
    assert doc["orig_data_size"] == (n + same) * PAGE
    assert doc["mountpoint"] == "/run/x"


def test_busy_port_is_oserror(exporter: Exporter) -> None:
    host, port = exporter.address
    with pytest.raises(OSError):
        start_exporter(f"{host}:{port}", PageStore(PAGE)).close()


def test_status_cli(
    exporter: Exporter, written: tuple[Store, int, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    _, n, same, compr = written
    host, port = exporter.address
    assert status.main(["--json", "--metrics-listen", f"{host}:{port}"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ratio"] == round((n + same) * PAGE / compr, 2)
    assert status.main(["--metrics-listen", f"{host}:{port}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["NAME", "DISKSIZE", "ALGORITHM"]
    assert out[1].split()[0] == "zcached0" and "/dev/loop9" in out[1]


def test_status_without_daemon() -> None:
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "zcached.status", "--metrics-listen", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no zcached daemon" in r.stderr


@pytest.fixture(params=["core", "model"])
def live(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Exporter]:
    """A real FUSE mount over a real store (the C data path, or the Python model with its
    Python front), with a real (unstarted) Compactor, exported."""
    size = 64 * PAGE
    st = new_store(request.param, size)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    srv = (
        CoreFuseServer(st, str(mnt), size, threads=2)
        if isinstance(st, CoreStore)
        else FuseServer(st, str(mnt), size, threads=2)
    )
    ex = None
    try:
        srv.mount()
        srv.start()
        fd = os.open(mnt / "swap.img", os.O_RDWR)
        try:
            for i in range(8):
                os.pwrite(fd, page(i), i * PAGE)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, PAGE, 0) == page(0)
        finally:
            os.close(fd)
        ex = start_exporter("127.0.0.1:0", st, fuse=srv, compactor=Compactor(st.allocator))
        yield ex
    finally:
        if ex is not None:
            ex.close()
        srv.stop()


def test_latency_histograms_from_fuse(live: Exporter) -> None:
    text = get(live, "/metrics").decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    v = values(text)
    for op in ("read", "write"):
        fam = fams[f"zcached_{op}_request_duration_seconds"]
        assert fam.type == "histogram"
        inf = [s.value for s in fam.samples if s.labels.get("le") == "+Inf"]
        assert inf == [v[f"zcached_{op}_request_duration_seconds_count"]]
        les = [s.value for s in fam.samples if s.name.endswith("_bucket")]
        assert les == sorted(les)  # cumulative
    assert v["zcached_write_request_duration_seconds_count"] >= 1
    assert v["zcached_read_request_duration_seconds_count"] >= 1
    assert v["zcached_write_request_duration_seconds_sum"] > 0
    assert v["zcached_writes_total"] == 8  # the kernel wrote each page once, through FUSE
    assert v["zcached_compaction_runs_total"] == 0


def test_dashboard_names_only_exported_metrics(live: Exporter) -> None:
    exporter = live
    dash = json.loads((ROOT / "config" / "grafana-dashboard.json").read_text())
    exprs: list[str] = []

    def walk(o: object) -> None:
        if isinstance(o, dict):
            for k, x in o.items():
                if k in ("expr", "query") and isinstance(x, str):
                    exprs.append(x)
                walk(x)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    walk(dash)
    assert exprs
    exported = {
        s.name
        for fam in text_string_to_metric_families(get(exporter, "/metrics").decode())
        for s in fam.samples
    }
    used = {m for e in exprs for m in re.findall(r"\bzcached_[a-zA-Z0-9_]+", e)}
    assert used
    assert used <= exported, used - exported
    assert {v["name"] for v in dash["templating"]["list"]} >= {"instance", "datasource"}
