"""Config: the shipped example, every key's validation, size parsing, flag overrides.

Pure unit tests of zcached/config.py (no system changes); the CLI's one-line error handling is
tested end to end in tests/test_cli.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from zcached import config as cfgmod
from zcached.config import (
    Compaction,
    Config,
    ConfigError,
    Recompress,
    Writeback,
    build,
    load,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "zcached.toml"


def test_shipped_example_loads_and_matches_the_defaults() -> None:
    cfg = load(str(EXAMPLE), {})
    default = build({})
    assert cfg == default  # the example documents the defaults, it does not change them
    assert cfg.compaction == Compaction()
    assert cfg.recompress == Recompress()


def test_every_key_is_documented_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for key in sorted(cfgmod._TOP_KEYS - {"compaction", "recompress", "writeback"}):
        assert re.search(rf"^#?\s*{key} = ", text, re.M), f"{key} missing from {EXAMPLE}"
    assert "[compaction]" in text
    for key in sorted(cfgmod._COMPACTION_KEYS):
        assert re.search(rf"^{key} = ", text, re.M), f"compaction.{key} missing"
    recompress = text[text.index("[recompress]") :]
    for key in sorted(cfgmod._RECOMPRESS_KEYS):
        assert re.search(rf"^{key} = ", recompress, re.M), f"recompress.{key} missing"
    writeback = text[text.index("[writeback]") :]
    for key in sorted(cfgmod._WRITEBACK_KEYS):  # commented out: it needs a path and mem_limit
        assert re.search(rf"^# {key} = ", writeback, re.M), f"writeback.{key} missing"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("8K", 8192),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1GiB", 1 << 30),
        (" 64m ", 64 << 20),
        (1 << 20, 1 << 20),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text, "size") == expected


def test_parse_size_percent_of_ram() -> None:
    n = parse_size("50%", "size")
    assert n % 4096 == 0
    assert abs(n - cfgmod.ram_bytes() // 2) < 4096


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5000", "multiple of 4096"),
        ("0", "positive"),
        ("-4096", "bad size"),
        ("abc", "bad size"),
        ("1.5G", "bad size"),
        ("200%", "percentage"),
        ("0%", "percentage"),
        (True, "boolean"),
        (1.5, "expected a size"),
    ],
)
def test_bad_sizes_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^size: .*{re.escape(message)}"):
        build({"size": value})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("5s", 5.0), ("1.5h", 5400.0), ("2d", 172800.0), ("250ms", 0.25),
     (30, 30.0), (7.5, 7.5), (" 90 ", 90.0)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text, "recompress.idle") == seconds


def test_recompress_table() -> None:
    raw = {"enabled": False, "idle": "5s", "level": 9, "dictionary": False, "cpu_budget": 0.5}
    cfg = build({"recompress": raw})
    assert cfg.recompress == Recompress(
        enabled=False, idle=5.0, level=9, dictionary=False, cpu_budget=0.5
    )


def test_writeback_table() -> None:
    raw = {"path": "/var/b.img", "size": "1G", "high_watermark": 0.8, "rate": "16M"}
    cfg = build({"mem_limit": "64M", "writeback": raw})
    assert cfg.writeback == Writeback("/var/b.img", 1 << 30, 0.8, 16 << 20)
    assert cfg.writeback.enabled and not build({}).writeback.enabled


def test_size_beyond_the_cores_one_tib_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^size: .*1 TiB"):
        build({"size": "2T"})


def test_size_beyond_four_times_ram_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^size: .*4x RAM"):
        build({"size": (cfgmod.ram_bytes() * 5) // 4096 * 4096})


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        ({"sise": "1G"}, r"^unknown key 'sise'"),
        ({"compressor": "gzip"}, r"^compressor: must be one of lz4, zstd"),
        ({"compressor": 4}, r"^compressor: expected a string"),
        ({"level": 30}, r"^level: lz4 level must be in \[1, 12\]"),
        ({"compressor": "zstd", "level": 23}, r"^level: zstd level"),
        ({"level": "3"}, r"^level: expected an integer"),
        ({"mem_limit": "lots"}, r"^mem_limit: bad size"),
        ({"mountpoint": "run/zcached"}, r"^mountpoint: must be an absolute path"),
        ({"mountpoint": 3}, r"^mountpoint: expected a path"),
        ({"swap": "yes"}, r"^swap: expected true or false"),
        ({"swap_priority": 40000}, r"^swap_priority: must be in"),
        ({"swap_priority": True}, r"^swap_priority: expected an integer, got a boolean"),
        ({"metrics_listen": "localhost"}, r"^metrics_listen: expected HOST:PORT"),
        ({"metrics_listen": "127.0.0.1:99999"}, r"^metrics_listen: expected HOST:PORT"),
        ({"io_spin_us": 1001}, r"^io_spin_us: must be in \[0, 1000\], got 1001"),
        ({"io_spin_us": -1}, r"^io_spin_us: must be in \[0, 1000\]"),
        ({"io_spin_us": "50us"}, r"^io_spin_us: expected an integer"),
        ({"io_spin_us": True}, r"^io_spin_us: expected an integer, got a boolean"),
        ({"io_transport": "io_uring"}, r'^io_transport: must be "auto", "dev" or "uring"'),
        ({"io_transport": 1}, r"^io_transport: expected"),
        ({"compaction": 1}, r"^compaction: expected a table"),
        ({"compaction": {"every": 1}}, r"^unknown key 'compaction.every'"),
        ({"compaction": {"fragmentation": 1.5}}, r"^compaction.fragmentation: must be in"),
        ({"compaction": {"cpu_budget": 0}}, r"^compaction.cpu_budget: must be in"),
        ({"compaction": {"interval": -1}}, r"^compaction.interval: must be positive"),
        ({"compaction": {"interval": "5s"}}, r"^compaction.interval: expected a number"),
        ({"recompress": "yes"}, r"^recompress: expected a table"),
        ({"recompress": {"after": "5m"}}, r"^unknown key 'recompress.after'"),
        ({"recompress": {"enabled": 1}}, r"^recompress.enabled: expected true or false"),
        ({"recompress": {"idle": "soon"}}, r"^recompress.idle: bad duration"),
        ({"recompress": {"idle": "10 minutes"}}, r"^recompress.idle: bad duration"),
        ({"recompress": {"idle": "0.5s"}}, r"^recompress.idle: must be between 1s and 30d"),
        ({"recompress": {"idle": "31d"}}, r"^recompress.idle: must be between 1s and 30d"),
        ({"recompress": {"idle": True}}, r"^recompress.idle: expected a duration"),
        ({"recompress": {"level": 0}}, r"^recompress.level: zstd level must be in \[1, 22\]"),
        ({"recompress": {"level": 23}}, r"^recompress.level: zstd level must be in"),
        ({"recompress": {"level": "3"}}, r"^recompress.level: expected an integer"),
        ({"recompress": {"dictionary": "yes"}}, r"^recompress.dictionary: expected true or false"),
        ({"recompress": {"cpu_budget": 0}}, r"^recompress.cpu_budget: must be in \(0, 1\]"),
        ({"recompress": {"cpu_budget": 2}}, r"^recompress.cpu_budget: must be in"),
        ({"writeback": {"path": "/b"}}, r"^writeback: needs mem_limit"),
        ({"mem_limit": "64M", "writeback": {"size": "1G"}}, r"^writeback: needs path"),
        ({"mem_limit": "64M", "writeback": {"path": "b.img"}}, r"^writeback.path: must be an abs"),
        ({"mem_limit": "64M", "writeback": {"path": "/b", "size": "x"}}, r"^writeback.size: bad"),
        (
            {"mem_limit": "64M", "writeback": {"path": "/b", "high_watermark": 2}},
            r"^writeback.high",
        ),
        ({"mem_limit": "64M", "writeback": {"path": "/b", "rate": "1K"}}, r"^writeback.rate: must"),
        (
            {"mem_limit": "64M", "writeback": {"path": "/b", "when": 1}},
            r"^unknown key 'writeback.w",
        ),
    ],
)
def test_bad_values_name_the_key(raw: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as e:
        build(raw)
    assert "\n" not in str(e.value)


def test_flags_override_the_file(tmp_path: Path) -> None:
    f = tmp_path / "z.toml"
    f.write_text('size = "64M"\ncompressor = "zstd"\nlevel = 3\n[compaction]\ninterval = 2\n')
    cfg = load(str(f), {"size": "128M", "compressor": None, "swap": False})
    assert cfg.size == 128 << 20  # flag wins
    assert cfg.compressor == "zstd" and cfg.level == 3  # None = flag not given: file wins
    assert cfg.swap is False
    assert cfg.compaction.interval == 2.0


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (None, r"does not exist"),
        ("size = ", r"invalid TOML"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: str | None, pattern: str) -> None:
    f = tmp_path / "z.toml"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=rf"^config file {re.escape(str(f))}: {pattern}"):
        load(str(f), {})


def test_config_is_frozen_and_metrics_addr_parsed() -> None:
    cfg = build({"metrics_listen": "[::1]:9300"})
    assert isinstance(cfg, Config)
    assert cfg.metrics_addr == ("::1", 9300)
    with pytest.raises(AttributeError):
        cfg.size = 1  # type: ignore[misc]
