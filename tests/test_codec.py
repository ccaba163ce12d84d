"""codec: round trips, same-filled detection, huge pages, corrupt blobs, checksums, threads."""

from __future__ import annotations

import os
import random
import sys
import threading

import pytest

from zcached import codec
from zcached.codec import COMPRESSED, HUGE, PAGE_SIZE, SAME, Codec, CodecError


def text_page(seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"\x00\x00\x00\x01", b"ptr\x7f\x55"]
    out = b"".join(rnd.choice(words) for _ in range(1200))
    return out[:PAGE_SIZE]


CODECS = [("lz4", None), ("lz4", 8), ("zstd", None), ("zstd", 1), ("zstd", 19), ("zstd", -3)]


@pytest.mark.parametrize(("name", "level"), CODECS)
def test_round_trip(name: str, level: int | None) -> None:
    c = Codec(name, level)
    for seed in range(20):
        page = text_page(seed)
        kind, blob, csum = c.encode(page)
        assert kind == COMPRESSED
        assert isinstance(blob, bytes) and len(blob) < c.huge_threshold
        assert csum == codec.checksum(page)
        assert c.decode(kind, blob) == page


@pytest.mark.parametrize(("name", "level"), CODECS)
def test_random_page_is_huge_and_raw(name: str, level: int | None) -> None:
    c = Codec(name, level)
    page = os.urandom(PAGE_SIZE)
    kind, payload, csum = c.encode(page)
    assert kind == HUGE and payload == page and csum == codec.checksum(page)
    assert c.decode(HUGE, page) == page


def test_huge_threshold_is_respected() -> None:
    page = text_page(1)
    size = len(Codec("lz4").compress(page))
    assert Codec("lz4", huge_threshold=size + 1).encode(page)[0] == COMPRESSED
    assert Codec("lz4", huge_threshold=size).encode(page)[0] == HUGE


def test_same_filled() -> None:
    c = Codec()
    assert c.encode(bytes(PAGE_SIZE)) == (SAME, 0, 0)
    assert codec.same_filled(bytes(PAGE_SIZE)) == 0
    word = bytes(range(1, 9))
    page = word * 512
    kind, value, _ = c.encode(page)
    assert kind == SAME and value == int.from_bytes(word, sys.byteorder)
    assert isinstance(value, int) and codec.fill_page(value) == page
    assert codec.same_filled(page) == value
    all_ones = b"\xff" * PAGE_SIZE
    assert codec.fill_page(codec.same_filled(all_ones) or 0) == all_ones


@pytest.mark.parametrize("where", [0, 8, 1000, 2048, PAGE_SIZE - 8, PAGE_SIZE - 1])
def test_one_different_byte_is_not_same_filled(where: int) -> None:
    page = bytearray(PAGE_SIZE)
    page[where] = 1
    assert codec.same_filled(bytes(page)) is None
    assert Codec().encode(bytes(page))[0] == COMPRESSED


def test_a_word_repeating_with_another_period_is_not_same_filled() -> None:
    page = (b"\x01" * 8 + b"\x02" * 8) * 256  # first and last word differ
    assert codec.same_filled(page) is None
    page = b"\x01" * 8 + b"\x02" * 8 * 510 + b"\x01" * 8  # first == last, middle differs
    assert codec.same_filled(page) is None


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_corrupt_blobs_raise(name: str) -> None:
    c = Codec(name)
    page = text_page(7)
    blob = c.compress(page)
    with pytest.raises(CodecError):
        c.decompress(blob[: len(blob) // 2])
    with pytest.raises(CodecError):
        c.decompress(b"\xff" * 64)
    short = c.compress(page[:2048])  # a valid blob of the wrong length
    with pytest.raises(CodecError, match="2048"):
        c.decompress(short)
    with pytest.raises(CodecError):
        c.decode(HUGE, page[:-1])


def test_checksum_sees_a_flipped_bit() -> None:
    page = bytearray(text_page(3))
    before = codec.checksum(bytes(page))
    assert 0 <= before < 1 << 32
    page[1234] ^= 0x10
    assert codec.checksum(bytes(page)) != before


def test_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unknown compressor"):
        Codec("gzip")
    with pytest.raises(ValueError, match="zstd level"):
        Codec("zstd", 99)
    with pytest.raises(ValueError, match="lz4 level"):
        Codec("lz4", 0)
    with pytest.raises(ValueError, match="huge_threshold"):
        Codec("lz4", huge_threshold=0)


@pytest.mark.parametrize("name", ["lz4", "zstd"])
def test_threads_share_one_codec(name: str) -> None:
    c = Codec(name, 3 if name == "zstd" else None)
    pages = [text_page(s) for s in range(64)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(300):
                page = rnd.choice(pages)
                kind, blob, _ = c.encode(page)
                assert isinstance(blob, bytes)
                assert c.decode(kind, blob) == page
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize(("name", "level"), CODECS)
def test_decode_checked_returns_the_page_or_raises(name: str, level: int | None) -> None:
    """The read hot path: decode and checksum in one call; every failure is a CodecError."""
    c = Codec(name, level)
    page = text_page(3)
    kind, blob, csum = c.encode(page)
    assert kind == COMPRESSED and isinstance(blob, bytes)
    assert c.decode_checked(kind, blob, csum) == page
    with pytest.raises(CodecError, match="checksum"):
        c.decode_checked(kind, blob, csum ^ 1)
    with pytest.raises(CodecError):
        c.decode_checked(kind, blob[: len(blob) // 2], csum)  # truncated blob
    short = c.compress(page[:2048])  # a valid blob of half a page
    with pytest.raises(CodecError):
        c.decode_checked(COMPRESSED, short, codec.checksum(page[:2048]))
    raw = os.urandom(PAGE_SIZE)
    hkind, hblob, hcsum = c.encode(raw)
    assert hkind == HUGE and isinstance(hblob, bytes)
    assert c.decode_checked(hkind, hblob, hcsum) == raw
    with pytest.raises(CodecError):
        c.decode_checked(HUGE, raw[:-1], hcsum)
    with pytest.raises(CodecError, match="checksum"):
        c.decode_checked(HUGE, raw[:-1] + bytes([raw[-1] ^ 1]), hcsum)
