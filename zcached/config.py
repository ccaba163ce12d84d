"""Configuration: TOML file + flag overrides -> one validated, frozen ``Config``.

Owns: the key names, their types and defaults, size parsing ("512M", "4096", "50%"), and
one-line error messages naming the key and the problem. Must NOT: touch the system (mount,
attach, bind, lock memory) or print/exit; it raises ``ConfigError`` and the CLI prints it.

Invariant: a ``Config`` that exists is valid (size a positive multiple of 4096, known
compressor, level in range, listen address parsed); everything downstream trusts it.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

PAGE = 4096
DEFAULT_CONFIG = "/etc/zcached/zcached.toml"
DEFAULT_MOUNTPOINT = "/run/zcached"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9273"
DEFAULT_SWAP_PRIORITY = 100  # above disk swap (swapon's default priorities are negative)
DEFAULT_SIZE_PERCENT = 50  # of RAM ...
DEFAULT_SIZE_CAP = 64 << 30  # ... capped at 64 GiB
MAX_SIZE_RAM_FACTOR = 4  # a swap device larger than 4x RAM is a typo (12 B of table per page)
TABLE_BYTES_PER_PAGE = 17  # the C core's page table entry, two fill words and the age byte
MAX_SIZE = (1 << 40) - PAGE  # the C core's handles have 29 bits: 2^28 - 1 pages at most
MAX_IO_THREADS = 64  # the C core's Hoard heaps (one per FUSE worker)
MAX_IO_SPIN_US = 1000  # csrc/fuse_loop.h ZC_FUSE_MAX_SPIN_NS
COMPRESSORS = ("lz4", "zstd")
TRANSPORTS = ("auto", "dev", "uring")  # io_transport (zcached/transport.py)
LEVELS = {"lz4": (1, 12), "zstd": (-7, 22)}


class ConfigError(ValueError):
    """Invalid configuration; the message is one human line naming the key."""


@dataclass(frozen=True)
class Compaction:
    # Compact when wasted / pool bytes exceeds this.  0.1 keeps the pool within ~1.11x of the
    # bytes in use between runs; a run brings it to ~1.02x (bench/compact_bench.py).
    fragmentation: float = 0.1
    cpu_budget: float = 0.25  # fraction of one CPU the compactor may use while it runs
    interval: float = 5.0  # seconds between fragmentation checks


@dataclass(frozen=True)
class Recompress:
    # Pages untouched (not read, not written) for `idle` seconds are stored again with zstd at
    # `level` when that is smaller; the recompressor uses at most `cpu_budget` of one CPU.
    enabled: bool = True
    idle: float = 600.0
    level: int = 3
    dictionary: bool = True  # train a zstd dictionary on samples of the pages written
    cpu_budget: float = 0.1


@dataclass(frozen=True)
class Writeback:
    # With `path` set, at `high_watermark` x mem_limit cold compressed pages go to the backing
    # file (or block device) `path` of `size` bytes, at most `rate` bytes per second in the
    # background; a write at the limit never fails while the file has room.
    path: str | None = None
    size: int = 0  # bytes; 0 = a block device's whole size (a file needs one)
    high_watermark: float = 0.9
    rate: int = 64 << 20

    @property
    def enabled(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class Config:
    size: int
    compressor: str = "lz4"
    level: int | None = None
    mem_limit: int = 0
    mountpoint: str = DEFAULT_MOUNTPOINT
    swap: bool = True
    swap_priority: int = DEFAULT_SWAP_PRIORITY
    metrics_listen: str = DEFAULT_METRICS_LISTEN
    compaction: Compaction = field(default_factory=Compaction)
    io_threads: int = 0  # FUSE worker threads; 0 = one per CPU
    io_spin_us: int = 0  # how long a FUSE worker spins for the next request; 0 = never
    io_transport: str = "auto"  # "auto", "dev" (/dev/fuse) or "uring" (FUSE over io_uring)
    recompress: Recompress = field(default_factory=Recompress)
    writeback: Writeback = field(default_factory=Writeback)

    @property
    def worker_threads(self) -> int:
        """FUSE worker threads to start: ``io_threads``, or one per CPU (at most 64)."""
        return self.io_threads or min(os.cpu_count() or 1, MAX_IO_THREADS)

    @property
    def metrics_addr(self) -> tuple[str, int]:
        return parse_listen(self.metrics_listen, "metrics_listen")


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_size() -> int:
    size = min(ram_bytes() * DEFAULT_SIZE_PERCENT // 100, DEFAULT_SIZE_CAP)
    return max(PAGE, size // PAGE * PAGE)


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(
    value: object,
    key: str,
    *,
    allow_percent: bool = True,
    allow_zero: bool = False,
    page_multiple: bool = True,
) -> int:
    """Bytes from an int, "N", "N[KMGT]" or (if allowed) "P%" of RAM."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got a boolean")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        s = value.strip()
        if allow_percent and s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ConfigError(f"{key}: bad percentage {value!r}") from None
            if not 0 < pct <= 100:
                raise ConfigError(f"{key}: percentage must be in (0, 100], got {value!r}")
            n = int(ram_bytes() * pct / 100) // PAGE * PAGE
        else:
            m = _SIZE_RE.match(s)
            if not m:
                raise ConfigError(f"{key}: bad size {value!r} (bytes or K/M/G/T suffix)")
            n = int(m.group(1)) << _SHIFT[m.group(2).upper()]
    else:
        raise ConfigError(f"{key}: expected a size, got {type(value).__name__}")
    if n < 0 or (n == 0 and not allow_zero):
        raise ConfigError(f"{key}: size must be positive, got {value!r}")
    if page_multiple and n % PAGE:
        raise ConfigError(f"{key}: size must be a multiple of {PAGE}, got {value!r} ({n} bytes)")
    return n


def parse_listen(value: str, key: str) -> tuple[str, int]:
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port_s)


def _typed(key: str, value: object, kind: type | tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{key}: expected {what}, got a boolean")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {what}, got {type(value).__name__} {value!r}")
    return value


_TOP_KEYS = {
    "size",
    "compressor",
    "level",
    "mem_limit",
    "mountpoint",
    "swap",
    "swap_priority",
    "metrics_listen",
    "compaction",
    "io_threads",
    "io_spin_us",
    "io_transport",
    "recompress",
    "writeback",
}
_COMPACTION_KEYS = {"fragmentation", "cpu_budget", "interval"}
_WRITEBACK_KEYS = {"path", "size", "high_watermark", "rate"}
_RECOMPRESS_KEYS = {"enabled", "idle", "level", "dictionary", "cpu_budget"}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MIN_IDLE = 1.0  # seconds: the recompressor's clock ticks every idle / 4
MAX_IDLE = 30 * 86400.0


def load_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    return data


def _table(raw: object, name: str, keys: set[str]) -> dict[str, Any]:
    """The [name] table, if it is one and holds only ``keys``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table [{name}]")
    for k in raw:
        if k not in keys:
            raise ConfigError(f"unknown key '{name}.{k}'")
    return raw


def _compaction(table: object) -> Compaction:
    """The [compaction] table; missing keys take Compaction's defaults."""
    craw = _table(table, "compaction", _COMPACTION_KEYS)
    d = Compaction()
    num = "a number"
    frag = _typed(
        "compaction.fragmentation", craw.get("fragmentation", d.fragmentation), float, num
    )
    if not 0.0 < frag < 1.0:
        raise ConfigError(f"compaction.fragmentation: must be in (0, 1), got {frag}")
    cpu = _typed("compaction.cpu_budget", craw.get("cpu_budget", d.cpu_budget), float, num)
    if not 0.0 < cpu <= 1.0:
        raise ConfigError(f"compaction.cpu_budget: must be in (0, 1], got {cpu}")
    interval = _typed("compaction.interval", craw.get("interval", d.interval), float, num)
    if interval <= 0:
        raise ConfigError(f"compaction.interval: must be positive, got {interval}")
    return Compaction(frag, cpu, interval)


def parse_duration(value: object, key: str) -> float:
    """Seconds from a number or "N[ms|s|m|h|d]" ("10m", "5s", "1.5h")."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration, got a boolean")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a duration, got {type(value).__name__}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ConfigError(f"{key}: bad duration {value!r} (a number with ms, s, m, h or d)")
    return float(m.group(1)) * _DURATION_UNIT[m.group(2)]


def _recompress(table: object) -> Recompress:
    """The [recompress] table; missing keys take Recompress's defaults."""
    rraw = _table(table, "recompress", _RECOMPRESS_KEYS)
    d = Recompress()
    enabled = _typed("recompress.enabled", rraw.get("enabled", d.enabled), bool, "true or false")
    idle = parse_duration(rraw.get("idle", d.idle), "recompress.idle")
    if not MIN_IDLE <= idle <= MAX_IDLE:
        raise ConfigError(f"recompress.idle: must be between 1s and 30d, got {idle:g} s")
    level = _typed("recompress.level", rraw.get("level", d.level), int, "an integer")
    lo, hi = 1, LEVELS["zstd"][1]
    if not lo <= level <= hi:
        raise ConfigError(f"recompress.level: zstd level must be in [{lo}, {hi}], got {level}")
    dictionary = _typed(
        "recompress.dictionary", rraw.get("dictionary", d.dictionary), bool, "true or false"
    )
    cpu = _typed("recompress.cpu_budget", rraw.get("cpu_budget", d.cpu_budget), float, "a number")
    if not 0.0 < cpu <= 1.0:
        raise ConfigError(f"recompress.cpu_budget: must be in (0, 1], got {cpu}")
    return Recompress(enabled, idle, level, dictionary, cpu)


def _writeback(table: object, mem_limit: int) -> Writeback:
    """The [writeback] table; missing keys take Writeback's defaults (no path: none)."""
    w = _table(table, "writeback", _WRITEBACK_KEYS)
    d = Writeback()
    if "path" not in w:
        if w:
            raise ConfigError("writeback: needs path (the backing file or block device)")
        return d
    path = _typed("writeback.path", w["path"], str, "a path")
    if not os.path.isabs(path):
        raise ConfigError(f"writeback.path: must be an absolute path, got {path!r}")
    if not mem_limit:
        raise ConfigError("writeback: needs mem_limit (spilling starts at a fraction of it)")
    size = parse_size(w.get("size", 0), "writeback.size", allow_percent=False, allow_zero=True)
    high = _typed(
        "writeback.high_watermark", w.get("high_watermark", d.high_watermark), float, "a number"
    )
    if not 0.1 <= high <= 1.0:
        raise ConfigError(f"writeback.high_watermark: must be in [0.1, 1], got {high}")
    rate = parse_size(w.get("rate", d.rate), "writeback.rate", allow_percent=False,
                      page_multiple=False)  # fmt: skip
    if rate < 256 << 10:
        raise ConfigError(f"writeback.rate: must be at least 256K (per second), got {rate}")
    return Writeback(path, size, high, rate)


def build(raw: dict[str, Any]) -> Config:
    """Validate a dict of keys (file values already overridden by flags) into a Config."""
    for k in raw:
        if k not in _TOP_KEYS:
            raise ConfigError(f"unknown key {k!r}")
    comp = raw.get("compressor", "lz4")
    comp = _typed("compressor", comp, str, "a string")
    if comp not in COMPRESSORS:
        raise ConfigError(f"compressor: must be one of {', '.join(COMPRESSORS)}, got {comp!r}")
    level = raw.get("level")
    if level is not None:
        level = _typed("level", level, int, "an integer")
        lo, hi = LEVELS[comp]
        if not lo <= level <= hi:
            raise ConfigError(f"level: {comp} level must be in [{lo}, {hi}], got {level}")
    size = parse_size(raw["size"], "size") if "size" in raw else default_size()
    if size > MAX_SIZE:
        raise ConfigError(f"size: {size} bytes is more than the 1 TiB a device can be (less 4 KiB)")
    if size > MAX_SIZE_RAM_FACTOR * ram_bytes():
        raise ConfigError(
            f"size: {size} bytes is more than {MAX_SIZE_RAM_FACTOR}x RAM "
            f"(the page table alone would take {size // PAGE * TABLE_BYTES_PER_PAGE >> 20} MiB)"
        )
    mem_limit = parse_size(
        raw.get("mem_limit", 0), "mem_limit", allow_zero=True, page_multiple=False
    )
    mountpoint = _typed("mountpoint", raw.get("mountpoint", DEFAULT_MOUNTPOINT), str, "a path")
    if not os.path.isabs(mountpoint):
        raise ConfigError(f"mountpoint: must be an absolute path, got {mountpoint!r}")
    swap = _typed("swap", raw.get("swap", True), bool, "true or false")
    prio = _typed(
        "swap_priority", raw.get("swap_priority", DEFAULT_SWAP_PRIORITY), int, "an integer"
    )
    if not -1 <= prio <= 32767:
        raise ConfigError(f"swap_priority: must be in [-1, 32767], got {prio}")
    listen = _typed(
        "metrics_listen", raw.get("metrics_listen", DEFAULT_METRICS_LISTEN), str, "HOST:PORT"
    )
    parse_listen(listen, "metrics_listen")
    compaction = _compaction(raw.get("compaction", {}))
    recompress = _recompress(raw.get("recompress", {}))
    writeback = _writeback(raw.get("writeback", {}), mem_limit)
    threads = raw.get("io_threads", "auto")
    if threads == "auto":
        threads = 0
    else:
        threads = _typed("io_threads", threads, int, '"auto" or an integer')
        if not 1 <= threads <= MAX_IO_THREADS:
            raise ConfigError(
                f'io_threads: must be in [1, {MAX_IO_THREADS}] or "auto", got {threads}'
            )
    spin = _typed("io_spin_us", raw.get("io_spin_us", Config.io_spin_us), int, "an integer")
    if not 0 <= spin <= MAX_IO_SPIN_US:
        raise ConfigError(f"io_spin_us: must be in [0, {MAX_IO_SPIN_US}], got {spin}")
    transport = _typed("io_transport", raw.get("io_transport", Config.io_transport), str,
                       '"auto", "dev" or "uring"')  # fmt: skip
    if transport not in TRANSPORTS:
        raise ConfigError(f'io_transport: must be "auto", "dev" or "uring", got {transport!r}')
    return Config(
        size=size,
        compressor=comp,
        level=level,
        mem_limit=mem_limit,
        mountpoint=mountpoint,
        swap=swap,
        swap_priority=prio,
        metrics_listen=listen,
        compaction=compaction,
        io_threads=threads,
        io_spin_us=spin,
        io_transport=transport,
        recompress=recompress,
        writeback=writeback,
    )


def load(path: str | None, overrides: dict[str, Any]) -> Config:
    """File at ``path`` (or the default file if it exists) overridden by non-None flags."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = load_file(path)
    elif os.path.exists(DEFAULT_CONFIG):
        raw = load_file(DEFAULT_CONFIG)
    raw = dict(raw)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return build(raw)


__all__ = [
    "Compaction",
    "Config",
    "ConfigError",
    "Recompress",
    "Writeback",
    "build",
    "load",
    "parse_duration",
    "parse_size",
    "replace",
]
