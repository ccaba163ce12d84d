"""codec: turns one 4K page into what the page store keeps, and back.

Owns: the compressors (LZ4 block format, zstd), same-filled page detection, the page checksum,
the decision to keep a page raw ("huge") when it does not compress well enough, and the cold
format of recompressed pages (:func:`encode_cold`: one byte naming the dictionary, 0 for none,
the only one the model knows; then a zstd frame as above).
Must not: know about handles, the page table, the allocator, locks or FUSE.  Everything here is
a pure function of its input (plus per-thread compressor state), so the page store calls it
outside any lock and from several threads at once.

Encodings (what :meth:`Codec.encode` returns for a page of exactly PAGE_SIZE bytes):

* ``(SAME, word, 0)``      every 8-byte word of the page equals ``word`` (a native-endian u64);
                           nothing is stored, :func:`fill_page` rebuilds the page (zram's
                           same_pages; zero pages above all).
* ``(COMPRESSED, blob, c)`` ``blob`` is the compressed page (LZ4 block without size prefix, or a
                           magic-less zstd frame without content size, checksum or dict id),
                           shorter than ``huge_threshold``.
* ``(HUGE, page, c)``      the page itself: it did not compress below ``huge_threshold``
                           (zram's huge pages); reads of it need no decompression.

``c`` is :func:`checksum` of the *uncompressed* page, so a read verifies the whole path: the
allocator's memory, the decompressor, and the length check.  A blob that fails to decompress
or decompresses to anything but PAGE_SIZE bytes raises :class:`CodecError`; the page store
turns that (and a checksum mismatch) into EIO and never hands the bytes out.

Measured choices (bench of 4K pages on this 2-core VM, python 3.11, see bench/store_bench.py):
xxh3_64 of a page costs ~0.3 us, zlib.crc32 ~1.9 us, xxh32 ~0.8 us, so the checksum is the low
32 bits of xxh3_64.  The same-filled test is ``page == page[:8] * 512`` (~0.5 us on bytes; a
memoryview comparison costs ~19 us, ``bytes.count`` ~2-3 us), guarded by a first-word/last-word
comparison that rejects almost every ordinary page for ~0.3 us.
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Final

import lz4.block
import xxhash
import zstandard
from lz4.block import LZ4BlockError as _LZ4Error
from lz4.block import compress as _lz4_compress
from lz4.block import decompress as _lz4_decompress
from xxhash import xxh3_64_intdigest as _xxh3

PAGE_SIZE: Final = 4096
WORD: Final = 8
WORDS_PER_PAGE: Final = PAGE_SIZE // WORD

SAME: Final = 1
COMPRESSED: Final = 2
HUGE: Final = 3

COMPRESSORS: Final = ("lz4", "zstd")
DEFAULT_HUGE_THRESHOLD: Final = PAGE_SIZE - PAGE_SIZE // 8  # 3584: store raw at >= 7/8 of a page
ZSTD_LEVELS: Final = range(-7, 23)  # zstd's negative "fast" levels .. max level

_BYTEORDER: Final = sys.byteorder
_ZERO_PAGE: Final = bytes(PAGE_SIZE)

Encoded = tuple[int, int | bytes, int]


class CodecError(ValueError):
    """A stored blob did not decode to exactly one page."""


def checksum(page: bytes) -> int:
    """32-bit checksum of a page: the low half of xxh3_64."""
    return xxhash.xxh3_64_intdigest(page) & 0xFFFFFFFF


def same_filled(page: bytes) -> int | None:
    """The repeated 8-byte word if every word of the page is the same, else None."""
    first = page[:WORD]
    if first != page[PAGE_SIZE - WORD :] or page != first * WORDS_PER_PAGE:
        return None
    return int.from_bytes(first, _BYTEORDER)


COLD_HDR: Final = 1


@functools.cache
def _cold_codec(level: int) -> Codec:
    return Codec("zstd", level, huge_threshold=PAGE_SIZE)


def encode_cold(page: bytes, level: int) -> bytes | None:
    """The page in the cold format at zstd ``level``, or None if that is not under a page."""
    blob = b"\0" + _cold_codec(level).compress(page)
    return blob if len(blob) < PAGE_SIZE else None


def decode_cold(blob: bytes) -> bytes:
    """The page a cold blob holds; CodecError unless it is exactly one page."""
    if len(blob) <= COLD_HDR or blob[0] != 0:
        raise CodecError("cold: not a blob of the cold format without a dictionary")
    return _cold_codec(3).decompress(blob[COLD_HDR:])


def fill_page(word: int) -> bytes:
    """The page whose every 8-byte word is ``word`` (inverse of :func:`same_filled`)."""
    if word == 0:
        return _ZERO_PAGE
    return word.to_bytes(WORD, _BYTEORDER) * WORDS_PER_PAGE


class Codec:
    """One compressor configuration; thread-safe (zstd contexts are kept per thread)."""

    def __init__(
        self,
        name: str = "lz4",
        level: int | None = None,
        *,
        huge_threshold: int = DEFAULT_HUGE_THRESHOLD,
    ) -> None:
        if name not in COMPRESSORS:
            raise ValueError(f"unknown compressor {name!r} (choose from {', '.join(COMPRESSORS)})")
        if not 1 <= huge_threshold <= PAGE_SIZE:
            raise ValueError(f"huge_threshold must be in 1..{PAGE_SIZE}")
        self.name = name
        self.huge_threshold = huge_threshold
        self._local = threading.local()
        if name == "lz4":
            # lz4 block "acceleration" (>= 1; higher is faster and compresses less).
            if level is not None and not 1 <= level <= 65537:
                raise ValueError("lz4 level (acceleration) must be in 1..65537")
            self.level = 1 if level is None else level
            self._zparams = None
        else:
            lvl = 3 if level is None else level
            if lvl not in ZSTD_LEVELS:
                raise ValueError(
                    f"zstd level must be in {ZSTD_LEVELS.start}..{ZSTD_LEVELS.stop - 1}"
                )
            self.level = lvl
            self._zparams = zstandard.ZstdCompressionParameters.from_level(
                lvl,
                source_size=PAGE_SIZE,
                format=zstandard.FORMAT_ZSTD1_MAGICLESS,
                write_content_size=False,
                write_checksum=False,
                write_dict_id=False,
            )

    def __repr__(self) -> str:
        return f"Codec({self.name!r}, level={self.level})"

    # ---- compression -------------------------------------------------------------------------

    def compress(self, page: bytes) -> bytes:
        """The compressed form of a page (may be longer than the page for random data)."""
        if self._zparams is None:
            return bytes(lz4.block.compress(page, store_size=False, acceleration=self.level))
        return bytes(self._zstd()[0].compress(page))

    def decompress(self, blob: bytes) -> bytes:
        """The page a blob from :meth:`compress` encodes; CodecError unless exactly one page."""
        try:
            if self._zparams is None:
                page = lz4.block.decompress(blob, uncompressed_size=PAGE_SIZE)
            else:
                page = self._zstd()[1].decompress(blob, max_output_size=PAGE_SIZE)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
            raise CodecError(f"{self.name}: {e}") from None
        if len(page) != PAGE_SIZE:
            raise CodecError(f"{self.name}: blob decoded to {len(page)} bytes, not {PAGE_SIZE}")
        return bytes(page)

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        ctx: tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor] | None
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = (
                zstandard.ZstdCompressor(compression_params=self._zparams),
                zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS),
            )
            self._local.ctx = ctx
        return ctx

    # ---- pages -------------------------------------------------------------------------------

    def encode(self, page: bytes) -> Encoded:
        """(SAME, word, 0), (COMPRESSED, blob, checksum) or (HUGE, page, checksum)."""
        first = page[:WORD]
        if first == page[PAGE_SIZE - WORD :] and page == first * WORDS_PER_PAGE:
            return SAME, int.from_bytes(first, _BYTEORDER), 0
        if self._zparams is None:  # LZ4 inline: this runs for every page written
            blob = _lz4_compress(page, store_size=False, acceleration=self.level)
        else:
            blob = self.compress(page)
        csum = _xxh3(page) & 0xFFFFFFFF
        if len(blob) >= self.huge_threshold:
            return HUGE, page, csum
        return COMPRESSED, blob, csum

    def decode(self, kind: int, stored: bytes) -> bytes:
        """The page from what the allocator held (COMPRESSED or HUGE); CodecError if bad.

        The caller still verifies :func:`checksum` of the result (or uses
        :meth:`decode_checked`).
        """
        if kind == HUGE:
            if len(stored) != PAGE_SIZE:
                raise CodecError(f"huge page of {len(stored)} bytes, not {PAGE_SIZE}")
            return stored
        return self.decompress(stored)

    def decode_checked(self, kind: int, stored: bytes, csum: int) -> bytes:
        """:meth:`decode`, then the page must match ``csum`` (:func:`checksum`): CodecError
        otherwise.  The page store's read hot path, so the LZ4 case is inlined (one C call for
        the decompression, one for the checksum)."""
        if kind == COMPRESSED and self._zparams is None:
            try:
                page: bytes = _lz4_decompress(stored, PAGE_SIZE)
            except _LZ4Error as e:
                raise CodecError(f"lz4: {e}") from None
            if len(page) != PAGE_SIZE:
                raise CodecError(f"lz4: blob decoded to {len(page)} bytes, not {PAGE_SIZE}")
        else:
            page = self.decode(kind, stored)
        if _xxh3(page) & 0xFFFFFFFF != csum:
            raise CodecError("checksum mismatch")
        return page
