"""Prometheus exporter: a Collector that reads live stats at scrape time, served with /status.

Owns: the metric names and units (the dashboard in config/grafana-dashboard.json relies on them),
the HTTP listener (/metrics, /status) and its thread. Must NOT: update gauges on the I/O hot path,
touch the store/allocator other than through their ``stats()`` snapshots, or swallow a busy port
(``start_exporter`` raises OSError so the daemon can print one line).

Invariant: every value comes from one ``stats()`` call per source per scrape, so a scrape is a
consistent-per-source snapshot; nothing here holds a lock of the store.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from zcached import __version__ as _VERSION

DEFAULT_LISTEN = "127.0.0.1:9273"
BACKING_HIST = 10  # csrc/backing.h ZC_BK_HIST


class CompactorLike(Protocol):
    runs: int
    seconds: float


class RecompressorLike(Protocol):
    runs: int
    seconds: float
    cpu_seconds: float
    trainings: int
    totals: dict[str, int]


class StatsSource(Protocol):
    def stats(self) -> Any: ...


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6]:PORT') -> (host, port); ValueError on bad input."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad listen address {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class ZcachedCollector(Collector):
    """Reads ``store.stats()``, ``store.allocator.fragmentation()``, ``fuse.stats()`` and the
    compactor's counters at each collect()."""

    def __init__(
        self,
        store: StatsSource,
        fuse: StatsSource | None = None,
        compactor: CompactorLike | None = None,
        info: Callable[[], Mapping[str, object]] | None = None,
        recompressor: RecompressorLike | None = None,
    ) -> None:
        self.store = store
        self.fuse = fuse
        self.compactor = compactor
        self.info = info
        self.recompressor = recompressor
        self._proc = psutil.Process()

    def collect(self) -> Iterable[Metric]:
        s = self.store.stats()
        g = GaugeMetricFamily
        c = CounterMetricFamily
        yield g(
            "zcached_orig_data_bytes",
            "Bytes of pages stored (uncompressed).",
            value=s.orig_data_size,
        )
        yield g(
            "zcached_compr_data_bytes",
            "Bytes of compressed objects stored.",
            value=s.compr_data_size,
        )
        yield g("zcached_pool_bytes", "Pool memory taken from the OS.", value=s.mem_used_total)
        yield g("zcached_pool_bytes_max", "High-water mark of pool memory.", value=s.mem_used_max)
        yield g("zcached_mem_limit_bytes", "Pool memory limit (0 = none).", value=s.mem_limit)
        yield g("zcached_same_pages", "Pages stored as a fill word.", value=s.same_pages)
        yield g("zcached_huge_pages", "Pages stored uncompressed.", value=s.huge_pages)
        yield g("zcached_stored_pages", "Pages currently stored.", value=s.pages_stored)
        yield g("zcached_device_bytes", "Size of the device.", value=s.npages * 4096)
        yield c(
            "zcached_pages_compacted", "Pool pages freed by compaction.", value=s.pages_compacted
        )
        yield c("zcached_reads", "Pages read.", value=s.reads)
        yield c("zcached_writes", "Pages written.", value=s.writes)
        yield c("zcached_discards", "Pages discarded.", value=s.discards)
        yield c("zcached_failed_reads", "Failed read requests.", value=s.failed_reads)
        yield c("zcached_failed_writes", "Failed write requests.", value=s.failed_writes)
        yield c("zcached_checksum_errors", "Pages failing verification.", value=s.checksum_errors)

        raw_stats = getattr(self.store, "raw_stats", None)
        raw: Mapping[str, int] = raw_stats() if raw_stats is not None else {}
        yield from self._survival(raw)
        yield from self._backing(raw, getattr(self.store, "backing_read_hist", None))
        yield from self._codecs(s, raw, str(getattr(self.store, "compressor", "lz4")))

        alloc = getattr(self.store, "allocator", None)
        if alloc is not None:
            pool = g("zcached_class_pool_bytes", "Pool bytes per size class.", labels=["size"])
            req = g(
                "zcached_class_requested_bytes", "Requested bytes per size class.", labels=["size"]
            )
            for size, pbytes, rbytes in alloc.fragmentation():
                pool.add_metric([str(size)], pbytes)
                req.add_metric([str(size)], rbytes)
            yield pool
            yield req

        resent = trims = resident = internal = spin_ns = spin_hits = 0
        queues = adopted = ring_errors = ring_requests = 0
        if self.fuse is not None:
            fs = self.fuse.stats()
            resent = int(fs.get("resent_requests", 0))
            queues, adopted = int(fs.get("uring_queues", 0)), int(fs.get("uring_adopted", 0))
            ring_errors = int(fs.get("uring_errors", 0))
            ring_requests = int(fs.get("uring_requests", 0))
            spin_ns, spin_hits = int(fs.get("spin_ns", 0)), int(fs.get("spin_hits", 0))
            internal = int(fs.get("internal_errors", 0))
            trims = int(fs.get("buffer_trims", 0))
            resident = int(fs.get("buffer_resident_bytes", 0))
            yield from self._latency(fs)
        yield c(
            "zcached_fuse_spin_seconds",
            "CPU time FUSE workers spent spinning for the next request (io_spin_us).",
            value=spin_ns / 1e9,
        )
        yield c(
            "zcached_fuse_spin_hits",
            "Requests a spinning FUSE worker took without a wake-up (io_spin_us).",
            value=spin_hits,
        )
        yield c(
            "zcached_fuse_internal_errors",
            "Failures inside the FUSE loop itself (malformed requests, reply or trim errors).",
            value=internal,
        )
        yield g(
            "zcached_fuse_buffer_resident_bytes",
            "Resident bytes of the FUSE workers' request buffers (64 KiB each once idle).",
            value=resident,
        )
        yield c(
            "zcached_fuse_buffer_trims",
            "Idle FUSE workers giving back the pages of their request buffers past 64 KiB.",
            value=trims,
        )
        yield c(
            "zcached_fuse_resent_requests",
            "Requests a dead server had taken, sent again by the kernel to its successor.",
            value=resent,
        )
        yield g(
            "zcached_fuse_uring_queues",
            "FUSE over io_uring: ring queues served now (0: requests come over /dev/fuse).",
            value=queues,
        )
        yield c(
            "zcached_fuse_uring_requests",
            "FUSE over io_uring: requests answered over the rings.",
            value=ring_requests,
        )
        yield c(
            "zcached_fuse_uring_adopted",
            "FUSE over io_uring: requests a dead server left in ring entries, answered.",
            value=adopted,
        )
        yield c(
            "zcached_fuse_uring_errors",
            "FUSE over io_uring: ring failures (setup, submit, a command the kernel refused).",
            value=ring_errors,
        )

        if self.compactor is not None:
            yield c("zcached_compaction_runs", "Compaction runs.", value=self.compactor.runs)
            yield c(
                "zcached_compaction_seconds", "Time spent compacting.", value=self.compactor.seconds
            )

        yield from self._recompressor()

        with self._proc.oneshot():
            mem = self._proc.memory_info()
            cpu = self._proc.cpu_times()
        yield g("zcached_process_resident_memory_bytes", "Daemon RSS.", value=mem.rss)
        yield c(
            "zcached_process_cpu_seconds", "Daemon CPU (user+system).", value=cpu.user + cpu.system
        )
        build = InfoMetricFamily("zcached_build", "Build information.")
        build.add_metric([], {"version": _VERSION})
        yield build

    def _survival(self, raw: Mapping[str, int]) -> Iterable[Metric]:
        """Crash recovery: the store's recoveries and lost pages (the C store's counters; the
        model never recovers), the keeper's restarts, upgrades and last pause (from info)."""
        info = self.info() if self.info is not None else {}

        def num(key: str) -> float:
            v = info.get(key)
            return float(v) if isinstance(v, (int, float)) else 0.0

        c = CounterMetricFamily
        yield c(
            "zcached_store_recoveries",
            "Times a server attached the live store and rebuilt it.",
            value=raw.get("recoveries", 0),
        )
        yield c(
            "zcached_lost_pages",
            "Pages a recovery found naming no valid object (they read as EIO); should be 0.",
            value=raw.get("lost_pages", 0),
        )
        yield c("zcached_server_restarts", "Server deaths the keeper recovered from.",
                value=num("restarts"))  # fmt: skip
        yield c("zcached_server_upgrades", "Live upgrades.", value=num("upgrades"))
        yield GaugeMetricFamily(
            "zcached_last_recovery_seconds",
            "Pause of the last restart or upgrade: old server gone to new one serving.",
            value=num("last_recovery_ms") / 1000,
        )

    def _recompressor(self) -> Iterable[Metric]:
        """The recompressor's passes (zeros when it is disabled, or for the model)."""
        r = self.recompressor
        c = CounterMetricFamily
        yield c("zcached_recompress_runs", "Recompression passes over the page table.",
                value=r.runs if r else 0)  # fmt: skip
        yield c("zcached_recompress_seconds", "Wall time of recompression passes.",
                value=r.seconds if r else 0.0)  # fmt: skip
        yield c("zcached_recompress_cpu_seconds", "CPU of recompression passes.",
                value=r.cpu_seconds if r else 0.0)  # fmt: skip
        res = c(
            "zcached_recompress_tried_pages",
            "Idle pages the recompressor tried, by result (this server's).",
            labels=["result"],
        )
        for k in ("recompressed", "kept", "raced", "failed"):
            res.add_metric([k], r.totals.get(k, 0) if r else 0)
        yield res
        yield c("zcached_dictionary_trainings", "zstd dictionaries trained (this server's).",
                value=r.trainings if r else 0)  # fmt: skip

    @staticmethod
    def _codecs(s: Any, raw: Mapping[str, int], base: str) -> Iterable[Metric]:
        """Pages and object bytes per format: the store's codec, zstd (recompressed idle
        pages, the cold format) and raw (huge pages); recompression's totals."""
        cold, cold_bytes = raw.get("cold_pages", 0), raw.get("cold_bytes", 0)
        huge = s.huge_pages
        fast = s.pages_stored - s.same_pages - huge - cold - raw.get("backed_pages", 0)
        fast_bytes = s.compr_data_size - cold_bytes - huge * 4096
        pages = GaugeMetricFamily(
            "zcached_codec_pages", "Pages stored, per format.", labels=["codec"]
        )
        nbytes = GaugeMetricFamily(
            "zcached_codec_bytes", "Object bytes stored, per format.", labels=["codec"]
        )
        for name, n, b in (
            (base, fast, fast_bytes),
            ("zstd-recompressed", cold, cold_bytes),
            ("raw", huge, huge * 4096),
        ):
            pages.add_metric([name], n)
            nbytes.add_metric([name], b)
        yield pages
        yield nbytes
        yield CounterMetricFamily(
            "zcached_recompressed_pages",
            "Pages stored again in the cold format (zstd) since the store was made.",
            value=raw.get("recompressed", 0),
        )
        yield CounterMetricFamily(
            "zcached_recompress_saved_bytes",
            "Object bytes recompression saved, summed as it happened (rewrites not deducted).",
            value=raw.get("recompress_saved_bytes", 0),
        )
        g = GaugeMetricFamily
        yield g("zcached_dictionaries", "Live zstd dictionaries.", value=raw.get("dicts", 0))
        yield g(
            "zcached_dictionary_bytes",
            "Memory of the live dictionaries: their bytes in the arena and digested.",
            value=raw.get("dict_bytes", 0) + raw.get("dict_memory", 0),
        )
        yield g(
            "zcached_dictionary_sample_bytes",
            "Memory of the sample reservoir while a dictionary is being sampled for.",
            value=raw.get("sample_memory", 0),
        )

    # The writeback tier's gauges and counters: (counter?, name, help, raw_stats key).
    BACKING = (
        (False, "zcached_backing_pages", "Pages written back to the backing file.",
         "backed_pages"),
        (False, "zcached_backing_object_bytes", "Compressed bytes of the backing file's pages.",
         "backed_bytes"),
        (False, "zcached_backing_size_bytes", "Bytes of the backing file's segments (0: none).",
         "backing_bytes"),
        (False, "zcached_backing_used_bytes", "Bytes of the backing file's segments holding any"
         " live object (their unused part is its fragmentation).", "backing_used_bytes"),
        (True, "zcached_writeback_pages", "Pages written back.", "writeback_pages"),
        (True, "zcached_writeback_bytes", "Compressed bytes written back.", "writeback_bytes"),
        (True, "zcached_writeback_segment_writes", "Segment writes to the backing file.",
         "writeback_writes"),
        (True, "zcached_writeback_errors", "Segment writes that failed (the pages stayed in"
         " RAM).", "writeback_errors"),
        (True, "zcached_writeback_direct", "Writes that found the pool at its limit and wrote"
         " pages back themselves.", "writeback_direct"),
        (True, "zcached_writeback_full", "Writebacks that found the backing file full.",
         "writeback_full"),
        (True, "zcached_writeback_relocated_pages", "Pages moved within the backing file by its"
         " compaction (emptiest segments first).", "writeback_relocated"),
        (True, "zcached_backing_read_pages", "Pages read back from the backing file.",
         "backing_read_pages"),
        (True, "zcached_backing_read_errors", "Reads of the backing file that failed.",
         "backing_read_errors"),
    )  # fmt: skip

    @classmethod
    def _backing(
        cls, raw: Mapping[str, int], hist: Callable[[], list[int]] | None
    ) -> Iterable[Metric]:
        """The writeback tier (zeros without a backing file)."""
        for counter, name, doc, key in cls.BACKING:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(name, doc, value=raw.get(key, 0))
        counts = hist() if hist is not None else [0] * BACKING_HIST
        acc, cum = 0, []
        for i, n in enumerate(counts):
            acc += n
            le = repr(16e-6 * (1 << i)) if i + 1 < len(counts) else "+Inf"
            cum.append((le, float(acc)))
        yield HistogramMetricFamily(
            "zcached_backing_read_duration_seconds",
            "Latency of reads of the backing file (one per run of adjacent pages).",
            buckets=cum,
            sum_value=raw.get("backing_read_ns", 0) / 1e9,
        )

    @staticmethod
    def _latency(fs: Mapping[str, Any]) -> Iterable[Metric]:
        bounds = [b / 1e9 for b in fs.get("latency_bounds_ns", [])]
        buckets: Mapping[str, list[int]] = fs.get("latency_buckets", {})
        sums: Mapping[str, int] = fs.get("latency_sum_ns", {})
        for op, name in (("READ", "read"), ("WRITE", "write")):
            counts = buckets.get(op, [0] * (len(bounds) + 1))
            acc = 0
            cum: list[tuple[str, float]] = []
            for le, n in zip([*map(repr, bounds), "+Inf"], counts, strict=True):
                acc += n
                cum.append((le, acc))
            h = HistogramMetricFamily(
                f"zcached_{name}_request_duration_seconds",
                f"FUSE {op} request latency.",
                buckets=cum,
                sum_value=sums.get(op, 0) / 1e9,
            )
            yield h


@dataclass
class Exporter:
    server: ThreadingHTTPServer
    thread: threading.Thread
    registry: CollectorRegistry

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def start_exporter(
    listen: str,
    store: StatsSource,
    fuse: StatsSource | None = None,
    compactor: CompactorLike | None = None,
    info: Callable[[], Mapping[str, object]] | None = None,
    recompressor: RecompressorLike | None = None,
) -> Exporter:
    """Serve /metrics and /status on ``listen``; OSError if the address is busy."""
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ZcachedCollector(store, fuse, compactor, info, recompressor))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body = generate_latest(registry)
                ctype = CONTENT_TYPE_LATEST
            elif path == "/status":
                body = json.dumps(status_document(store, info)).encode()
                ctype = "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="zcached-metrics", daemon=True)
    thread.start()
    return Exporter(server, thread, registry)


def status_document(
    store: StatsSource, info: Callable[[], Mapping[str, object]] | None
) -> dict[str, object]:
    s = store.stats()
    doc: dict[str, object] = {
        "size": s.npages * 4096,
        "orig_data_size": s.orig_data_size,
        "compr_data_size": s.compr_data_size,
        "mem_used_total": s.mem_used_total,
        "mem_limit": s.mem_limit,
        "same_pages": s.same_pages,
        "huge_pages": s.huge_pages,
    }
    raw_stats = getattr(store, "raw_stats", None)
    if raw_stats is not None:
        raw = raw_stats()
        doc["recompressed_pages"] = raw.get("cold_pages", 0)
        doc["recompressed_bytes"] = raw.get("cold_bytes", 0)
        doc["dictionaries"] = raw.get("dicts", 0)
        doc["backed_pages"] = raw.get("backed_pages", 0)
        doc["backed_bytes"] = raw.get("backed_bytes", 0)
        doc["backing_bytes"] = raw.get("backing_bytes", 0)
    if info is not None:
        doc.update(info())
    return doc
