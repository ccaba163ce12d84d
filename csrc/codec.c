/* codec.c - compression, checksums and same-filled pages for the C core (see codec.h).
 *
 * Owns: the calls into the system liblz4, libzstd (and its ZDICT trainer) and libxxhash.
 * Must not: allocate per page, lock, or know where a blob or a dictionary is stored.
 *
 * Formats match zcached/codec.py (the reference model): LZ4 block without a size prefix, and
 * zstd frames in ZSTD_f_zstd1_magicless with no content size, checksum or dict id, so the
 * same page compresses to the same number of bytes in the model and here (same library
 * versions).  The checksum covers the *uncompressed* page, so a read verifies the allocator's
 * memory, the decompressor and the length at once.
 */
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_c_format / ZSTD_d_format (magic-less frames) */
#include "codec.h"

#include <errno.h>
#include <lz4.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <xxhash.h>
#include <zdict.h>
#include <zstd.h>

#define WORDS_PER_PAGE (ZC_CODEC_PAGE / 8u)

uint32_t zc_checksum(const uint8_t *page)
{
	return (uint32_t)XXH3_64bits(page, ZC_CODEC_PAGE);
}

int zc_same_filled(const uint8_t *page, uint64_t *word)
{
	uint64_t w, last;

	memcpy(&w, page, 8);
	memcpy(&last, page + ZC_CODEC_PAGE - 8, 8);
	if (w != last)
		return 0;
	for (unsigned i = 1; i < WORDS_PER_PAGE - 1; i++) {
		uint64_t v;

		memcpy(&v, page + 8u * i, 8);
		if (v != w)
			return 0;
	}
	*word = w;
	return 1;
}

void zc_fill_page(uint8_t *page, uint64_t word)
{
	if (word == 0) {
		memset(page, 0, ZC_CODEC_PAGE);
		return;
	}
	for (unsigned i = 0; i < WORDS_PER_PAGE; i++)
		memcpy(page + 8u * i, &word, 8);
}

/* zstd's memory for the cold codec: every block its own mapping, so that what
 * zc_codec_cold_close frees goes back to the kernel at once, whatever malloc would keep. */
#define MAP_HDR 64u

static void *map_alloc(void *opaque, size_t n)
{
	(void)opaque;
	void *p = mmap(NULL, n + MAP_HDR, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1,
		       0);

	if (p == MAP_FAILED)
		return NULL;
	*(size_t *)p = n + MAP_HDR;
	return (uint8_t *)p + MAP_HDR;
}

static void map_free(void *opaque, void *addr)
{
	(void)opaque;
	if (!addr)
		return;
	uint8_t *p = (uint8_t *)addr - MAP_HDR;

	munmap(p, *(size_t *)p);
}

static const ZSTD_customMem map_mem = { map_alloc, map_free, NULL };

static int cctx_setup(ZSTD_CCtx *cc, int level)
{
	if (ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, level)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_format, ZSTD_f_zstd1_magicless)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 0)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_dictIDFlag, 0)) ||
	    ZSTD_isError(ZSTD_CCtx_setPledgedSrcSize(cc, ZC_CODEC_PAGE)))
		return -EINVAL;
	return 0;
}

static int dctx_setup(ZSTD_DCtx *dc)
{
	return ZSTD_isError(ZSTD_DCtx_setParameter(dc, ZSTD_d_format, ZSTD_f_zstd1_magicless))
		       ? -EINVAL
		       : 0;
}

static int zstd_setup(struct zc_codec *c)
{
	ZSTD_CCtx *cc = ZSTD_createCCtx();
	ZSTD_DCtx *dc = ZSTD_createDCtx();

	c->cctx = cc;
	c->dctx = dc;
	if (!cc || !dc)
		return -ENOMEM;
	return cctx_setup(cc, c->level) || dctx_setup(dc) ? -EINVAL : 0;
}

int zc_codec_level_ok(int compressor, int level)
{
	if (compressor == 0)
		return level >= 1 && level <= 65537;
	return compressor == 1 && level >= ZSTD_minCLevel() && level <= ZSTD_maxCLevel();
}

int zc_codec_init(struct zc_codec *c, int compressor, int level, uint32_t huge_threshold)
{
	memset(c, 0, sizeof(*c));
	c->compressor = compressor;
	c->level = level;
	c->huge_threshold = huge_threshold;
	if (huge_threshold < 1 || huge_threshold > ZC_CODEC_PAGE)
		return -EINVAL;
	if (!zc_codec_level_ok(compressor, level))
		return -EINVAL;
	if (compressor == 0)
		return 0;
	int rc = zstd_setup(c);

	if (rc)
		zc_codec_fini(c);
	return rc;
}

int zc_codec_init_cold(struct zc_codec *c)
{
	memset(c, 0, sizeof(*c));
	c->compressor = 1;
	c->level = 0; /* no encoder until zc_codec_cold_open */
	c->huge_threshold = ZC_CODEC_PAGE;
	c->dctx = ZSTD_createDCtx_advanced(map_mem);
	if (!c->dctx)
		return -ENOMEM;
	if (dctx_setup(c->dctx)) {
		zc_codec_fini(c);
		return -EINVAL;
	}
	return 0;
}

void zc_codec_fini(struct zc_codec *c)
{
	zc_codec_cold_close(c);
	ZSTD_freeCCtx(c->cctx);
	ZSTD_freeDCtx(c->dctx);
	c->cctx = c->dctx = NULL;
}

/* One page as a zstd frame with context cc: its length, or 0 when zstd gave up. */
static uint32_t zstd_compress(ZSTD_CCtx *cc, const uint8_t *page, uint8_t *out, uint32_t cap)
{
	/* The pledged size is reset after each frame: set it again (cheap). */
	ZSTD_CCtx_setPledgedSrcSize(cc, ZC_CODEC_PAGE);
	size_t n = ZSTD_compress2(cc, out, cap, page, ZC_CODEC_PAGE);

	if (ZSTD_isError(n)) {
		ZSTD_CCtx_reset(cc, ZSTD_reset_session_only);
		return 0;
	}
	return (uint32_t)n;
}

/* Compressed length, or 0 when the compressor gave up (the page is then huge). */
static uint32_t compress_page(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t cap)
{
	if (c->compressor == 0) {
		int n = LZ4_compress_fast((const char *)page, (char *)out, (int)ZC_CODEC_PAGE,
					  (int)cap, c->level);
		return n > 0 ? (uint32_t)n : 0;
	}
	return zstd_compress(c->cctx, page, out, cap);
}

int zc_codec_encode(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t *len,
		    uint64_t *word, uint32_t *csum)
{
	if (zc_same_filled(page, word))
		return ZC_SAME;
	uint32_t n = compress_page(c, page, out, ZC_CODEC_OUT_MAX);

	*csum = zc_checksum(page);
	if (n == 0 || n >= c->huge_threshold) {
		*len = ZC_CODEC_PAGE;
		return ZC_HUGE;
	}
	*len = n;
	return ZC_COMPRESSED;
}

int zc_codec_decode(struct zc_codec *c, const uint8_t *blob, uint32_t len, uint8_t *page)
{
	if (c->compressor == 0) {
		int n = LZ4_decompress_safe((const char *)blob, (char *)page, (int)len,
					    (int)ZC_CODEC_PAGE);
		return n == (int)ZC_CODEC_PAGE ? 0 : -EIO;
	}
	size_t n = ZSTD_decompressDCtx(c->dctx, page, ZC_CODEC_PAGE, blob, len);

	if (ZSTD_isError(n)) {
		ZSTD_DCtx_reset(c->dctx, ZSTD_reset_session_only);
		return -EIO;
	}
	return n == ZC_CODEC_PAGE ? 0 : -EIO;
}

/* ---- the cold format ----------------------------------------------------------------------- */

int zc_codec_cold_open(struct zc_codec *c, int level, unsigned id, const uint8_t *dict,
		       uint32_t len)
{
	if (c->compressor != 1 || c->cold || id >= ZC_MAX_DICTS || (id != 0) != (dict != NULL) ||
	    len > ZC_DICT_MAX || !zc_codec_level_ok(1, level))
		return -EINVAL;
	ZSTD_CCtx *cc = ZSTD_createCCtx_advanced(map_mem);

	if (!cc)
		return -ENOMEM;
	c->cold = cc;
	c->cold_id = id;
	c->level = level;
	if (cctx_setup(cc, level)) {
		zc_codec_cold_close(c);
		return -EINVAL;
	}
	if (!id)
		return 0;
	ZSTD_compressionParameters cp = ZSTD_getCParams(level, ZC_CODEC_PAGE, len);

	c->cdict = ZSTD_createCDict_advanced(dict, len, ZSTD_dlm_byRef, ZSTD_dct_fullDict, cp,
					     map_mem);
	if (!c->cdict || ZSTD_isError(ZSTD_CCtx_refCDict(cc, c->cdict))) {
		zc_codec_cold_close(c);
		return c->cdict ? -EINVAL : -ENOMEM;
	}
	return 0;
}

void zc_codec_cold_close(struct zc_codec *c)
{
	ZSTD_freeCCtx(c->cold); /* first: it references the CDict */
	ZSTD_freeCDict(c->cdict);
	c->cold = c->cdict = NULL;
	c->cold_id = 0;
}

int zc_codec_encode_cold(struct zc_codec *c, const uint8_t *page, uint8_t *out, uint32_t *len)
{
	if (!c->cold)
		return -EINVAL;
	uint32_t n = zstd_compress(c->cold, page, out + ZC_COLD_HDR, ZC_CODEC_OUT_MAX - ZC_COLD_HDR);

	if (n == 0 || n + ZC_COLD_HDR >= ZC_CODEC_PAGE)
		return -E2BIG;
	out[0] = (uint8_t)c->cold_id;
	*len = n + ZC_COLD_HDR;
	return 0;
}

int zc_codec_decode_cold(struct zc_codec *c, const uint8_t *blob, uint32_t len, uint8_t *page,
			 const struct zc_dict *d)
{
	if (c->compressor != 1 || len <= ZC_COLD_HDR || (blob[0] != 0) != (d != NULL))
		return -EIO;
	if (ZSTD_isError(ZSTD_DCtx_refDDict(c->dctx, d ? d->ddict : NULL)))
		return -EIO;
	return zc_codec_decode(c, blob + ZC_COLD_HDR, len - ZC_COLD_HDR, page);
}

/* ---- dictionaries -------------------------------------------------------------------------- */

int zc_dict_make(struct zc_dict *d, const uint8_t *bytes, uint32_t len)
{
	memset(d, 0, sizeof(*d));
	if (len == 0 || len > ZC_DICT_MAX)
		return -EINVAL;
	d->ddict = ZSTD_createDDict_advanced(bytes, len, ZSTD_dlm_byRef, ZSTD_dct_fullDict,
					     map_mem);
	return d->ddict ? 0 : -EINVAL;
}

void zc_dict_free(struct zc_dict *d)
{
	ZSTD_freeDDict(d->ddict);
	d->ddict = NULL;
}

uint64_t zc_dict_memory(const struct zc_dict *d)
{
	return d->ddict ? ZSTD_sizeof_DDict(d->ddict) : 0;
}

int zc_dict_train(const uint8_t *pages, unsigned n, uint8_t *out, uint32_t cap, uint32_t *len)
{
	size_t *sizes = malloc(n * sizeof(*sizes));

	if (!sizes)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++)
		sizes[i] = ZC_CODEC_PAGE;
	size_t r = ZDICT_trainFromBuffer(out, cap, pages, sizes, n);

	free(sizes);
	if (ZDICT_isError(r))
		return -EINVAL;
	*len = (uint32_t)r;
	return 0;
}
