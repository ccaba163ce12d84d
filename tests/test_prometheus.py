"""A real Prometheus server scrapes a live exporter; PromQL sees the true compression ratio.

Needs Debian's `prometheus` package (installed by `make deps`); skipped only when the binary is
absent. Prometheus runs on a free loopback port with its own TSDB dir in tmp_path; the test stops
it by pid (the process it started) and the dir goes with tmp_path.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import lz4.block
import pytest

from zcached.core import CoreStore
from zcached.metrics import Exporter, start_exporter
from zcached.store import PageStore

PAGE = 4096
PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def page(i: int) -> bytes:
    return (f"prom {i} ".encode() * 20 + bytes(range(64)) * 8 + b"\0" * PAGE)[:PAGE]


@pytest.fixture(params=["core", "model"])
def exporter(request: pytest.FixtureRequest) -> Iterator[tuple[Exporter, float]]:
    st: PageStore | CoreStore = (
        CoreStore(256 * PAGE) if request.param == "core" else PageStore(256 * PAGE)
    )
    compr = 0
    for i in range(100):
        st.write(i * PAGE, page(i))
        compr += len(lz4.block.compress(page(i), store_size=False))
    ex = start_exporter("127.0.0.1:0", st)
    try:
        yield ex, 100 * PAGE / compr
    finally:
        ex.close()


@pytest.fixture
def prometheus(exporter: tuple[Exporter, float], tmp_path: Path) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not found (Debian package `prometheus`, see make deps)")
    host, port = exporter[0].address
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: zcached\n    static_configs:\n"
        f"      - targets: ['{host}:{port}']\n"
    )
    web = f"127.0.0.1:{free_port()}"
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://{web}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


def query(base: str, promql: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success"
    result: list[dict[str, object]] = doc["data"]["result"]
    return result


def test_prometheus_sees_compression_ratio(
    exporter: tuple[Exporter, float], prometheus: str
) -> None:
    ratio = exporter[1]
    # Waiting for Prometheus to start and scrape (a bounded wait, not a timed assertion).
    result: list[dict[str, object]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            result = query(prometheus, "zcached_orig_data_bytes / zcached_compr_data_bytes")
        except OSError:
            result = []
        if result:
            break
        time.sleep(0.5)
    assert result, "Prometheus never scraped the exporter"
    value = result[0]["value"]
    assert isinstance(value, list)
    assert float(value[1]) == pytest.approx(ratio, rel=1e-9)
    assert ratio > 1.5  # the pages really compress
    writes = query(prometheus, "zcached_writes_total")
    assert float(writes[0]["value"][1]) == 100  # type: ignore[index]
