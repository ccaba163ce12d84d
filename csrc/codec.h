/* codec.h - one 4K page to what the store keeps, and back.
 *
 * Owns: LZ4 (block format) and zstd (magic-less frames without content size, checksum or dict
 * id) with levels, same-filled page detection, the page checksum (low 32 bits of xxh3_64),
 * the "huge" decision (keep the page raw when it does not compress below the threshold), and
 * the cold format of recompressed pages (one byte naming the dictionary, 0 for none, then a
 * zstd frame as above, made with that dictionary), and zstd dictionaries: training them
 * (libzstd's ZDICT) and digesting them for use.
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
	void *cold, *cdict;      /* the cold encoder while open: its context and dictionary */
	unsigned cold_id;        /* the dictionary id it writes */
};

/* Whether level is one for compressor (lz4: acceleration 1..65537; zstd: its own range). */
int zc_codec_level_ok(int compressor, int level);
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

/* A zstd dictionary digested for decompression: read-only once made, used by any number of
 * threads at once; it references the dictionary's bytes, which must outlive it.  (The
 * encoder's digest is made per recompression call: zc_codec_cold_open.) */
#define ZC_MAX_DICTS 16u          /* dictionary ids 1..15 (0: none) */
#define ZC_DICT_MAX (64u * 1024u) /* bytes of one dictionary at most */
struct zc_dict {
	void *ddict;
};
/* 0, or -EINVAL (not a dictionary zstd can use) / -ENOMEM. */
int zc_dict_make(struct zc_dict *d, const uint8_t *bytes, uint32_t len);
void zc_dict_free(struct zc_dict *d);
/* Process memory the digested dictionary takes. */
uint64_t zc_dict_memory(const struct zc_dict *d);
/* Train a dictionary of at most cap bytes on n pages (4096 bytes each, contiguous): 0 and
 * *len, or -EINVAL when zstd finds nothing worth a dictionary in them. */
int zc_dict_train(const uint8_t *pages, unsigned n, uint8_t *out, uint32_t cap, uint32_t *len);

/* The cold format (recompressed idle pages).  A store context's cold codec is a zstd decoder
 * (zc_codec_init_cold) that encodes only between zc_codec_cold_open and zc_codec_cold_close,
 * one recompression call: the encoder's context and digested dictionary (~0.5 MB with a
 * 64 KiB dictionary) live apart from the heap and go back to the kernel when it closes, so
 * an idle store holds none of it.  cold_open: level, and dictionary id 1..15 with its bytes
 * (which must outlive the encoder) or id 0 and NULL; 0, -EINVAL or -ENOMEM.
 * encode_cold: 0 and the blob in out[0..*len) with *len < 4096, or -E2BIG when the page does
 * not get that small (-EINVAL when not open).  decode_cold: 0, or -EIO unless the blob is
 * exactly one page in the cold format; d is the dictionary its first byte names
 * (zc_cold_dict_id), NULL for 0. */
#define ZC_COLD_HDR 1u
int zc_codec_init_cold(struct zc_codec *c);
int zc_codec_cold_open(struct zc_codec *c, int level, unsigned id, const uint8_t *dict,
		       uint32_t len);
void zc_codec_cold_close(struct zc_codec *c);
int zc_codec_encode_cold(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t *len);
int zc_codec_decode_cold(struct zc_codec *c, const uint8_t *blob, uint32_t len, uint8_t *page,
			 const struct zc_dict *d);
static inline unsigned zc_cold_dict_id(const uint8_t *blob)
{
	return blob[0];
}

uint32_t zc_checksum(const uint8_t *page);
int zc_same_filled(const uint8_t *page, uint64_t *word);
void zc_fill_page(uint8_t *page, uint64_t word);

#endif
