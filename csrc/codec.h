/* codec.h - one 4K page to what the store keeps, and back.
 *
 * Owns: LZ4 (block format) and zstd (magic-less frames without content size, checksum or dict
 * id) with levels, same-filled page detection, the page checksum (low 32 bits of xxh3_64),
 * the "huge" decision (keep the page raw when it does not compress below the threshold), and
 * the cold format of recompressed pages: one byte naming the dictionary (0: none, the only
 * value this version writes or accepts), then a zstd frame as above.
 * Must not: know handles, the page table, locks or FUSE.  A zc_codec holds per-thread state
 * (the zstd contexts): one thread uses it at a time.  No function allocates per page.
 */
#ifndef ZC_CODEC_H
#define ZC_CODEC_H

#include <stdint.h>

#define ZC_CODEC_PAGE 4096u

enum zc_kind { ZC_EMPTY = 0, ZC_SAME = 1, ZC_COMPRESSED = 2, ZC_HUGE = 3 };

struct zc_codec {
	int compressor;          /* 0 = lz4, 1 = zstd */
	int level;               /* lz4 acceleration or zstd level */
	uint32_t huge_threshold; /* compressed >= this: stored raw */
	void *cctx, *dctx;       /* zstd contexts (NULL for lz4) */
};

/* 0, or -EINVAL for a bad level, -ENOMEM. */
int zc_codec_init(struct zc_codec *c, int compressor, int level, uint32_t huge_threshold);
void zc_codec_fini(struct zc_codec *c);

/* Encode one page.  Returns ZC_SAME (*word = the fill word), ZC_COMPRESSED (out[0..*len) is
 * the blob, *len < huge_threshold) or ZC_HUGE (the caller stores the page itself).  out must
 * hold ZC_CODEC_OUT_MAX bytes.  *csum is the page's checksum (not set for ZC_SAME). */
#define ZC_CODEC_OUT_MAX (ZC_CODEC_PAGE + 1024u)
int zc_codec_encode(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t *len,
		    uint64_t *word, uint32_t *csum);

/* Decode a ZC_COMPRESSED blob into page[4096]; 0, or -EIO unless it is exactly one page. */
int zc_codec_decode(struct zc_codec *c, const uint8_t *blob, uint32_t len, uint8_t *page);

/* The cold format (recompressed idle pages).  c must be a zstd codec.  encode_cold: 0 and the
 * blob in out[0..*len) with *len < 4096, or -E2BIG when the page does not get that small.
 * decode_cold: 0, or -EIO unless the blob is exactly one page in the cold format. */
#define ZC_COLD_HDR 1u
int zc_codec_encode_cold(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t *len);
int zc_codec_decode_cold(struct zc_codec *c, const uint8_t *blob, uint32_t len, uint8_t *page);
/* Change a zstd codec's level; 0 or -EINVAL. */
int zc_codec_set_level(struct zc_codec *c, int level);

uint32_t zc_checksum(const uint8_t *page);
int zc_same_filled(const uint8_t *page, uint64_t *word);
void zc_fill_page(uint8_t *page, uint64_t word);

#endif
