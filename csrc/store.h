/* store.h - the page store of the C core: page table, read/write/discard, counters.
 *
 * A store is one block device of `size` bytes kept as compressed 4K pages in an xcfmalloc pool,
 * all of it inside one memfd arena (arena.h).  Callers reach it through a per-thread context
 * (struct zc_ctx): its codec state, its scratch buffers, its Hoard heap and its counters.  A
 * context is used by one thread at a time; the store itself is shared by all of them.
 *
 * Every function returns 0 or a negative errno (never aborts): -EIO for a page that fails its
 * checksum or does not decode, -ENOSPC when the pool is at its limit, -EINVAL/-EFBIG for a
 * request outside the device.
 */
#ifndef ZC_STORE_H
#define ZC_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "xcfmalloc.h"

#define ZC_PAGE_SIZE 4096u
#define ZC_PAGE_SHIFT 12
#define ZC_MAX_REQ_PAGES 256u /* 1 MiB: the largest FUSE request (max_pages) */

struct zc_store;
struct zc_ctx;

enum zc_compressor { ZC_LZ4 = 0, ZC_ZSTD = 1 };

struct zc_store_config {
	uint64_t size;           /* device bytes, a positive multiple of 4096 */
	int compressor;          /* enum zc_compressor */
	int level;               /* lz4 acceleration (>= 1) or zstd level */
	uint32_t huge_threshold; /* store raw when compressed >= this (1..4096) */
	uint64_t mem_limit;      /* pool bytes, 0 = none */
	int heaps;               /* Hoard worker heaps (>= 1); heap 0 is the global heap */
};

/* Page-store counters, summed over every context (the names of zram's mm_stat/io_stat). */
struct zc_store_stats {
	uint64_t orig_data_size, compr_data_size, mem_used_total, mem_limit, mem_used_max;
	uint64_t same_pages, pages_compacted, huge_pages;
	uint64_t failed_reads, failed_writes, checksum_errors;
	uint64_t reads, writes, discards;
	uint64_t pages_stored, npages, table_bytes;
	uint64_t objects, metadata_bytes, arena_bytes, vpages_to_global;
};

/* Create a store in a new memfd arena.  On failure returns NULL and sets *err (-errno). */
struct zc_store *zc_store_open(const struct zc_store_config *cfg, int *err);
void zc_store_close(struct zc_store *s);
int zc_store_memfd(const struct zc_store *s);
uint64_t zc_store_size(const struct zc_store *s);

/* A context bound to Hoard heap `heap` (1..heaps); NULL on allocation failure. */
struct zc_ctx *zc_ctx_new(struct zc_store *s, int heap);
void zc_ctx_free(struct zc_ctx *c);

/* Byte-granular I/O; the store does read-modify-write of unaligned edge pages.
 * len <= ZC_MAX_REQ_PAGES * 4096 for read and write; off + len <= size. */
int zc_store_read(struct zc_ctx *c, uint64_t off, uint32_t len, uint8_t *out);
int zc_store_write(struct zc_ctx *c, uint64_t off, uint32_t len, const uint8_t *data);
int zc_store_discard(struct zc_ctx *c, uint64_t off, uint64_t len);

void zc_store_stats(struct zc_store *s, struct zc_store_stats *out);

/* Compaction: move up to max_moves objects (0 = until nothing is worth moving); returns the
 * number moved.  Runs in bounded batches, one heap lock at a time. */
uint64_t zc_store_compact(struct zc_store *s, uint64_t max_moves);
/* Per size class in use: pool and requested bytes (see xcf_fragmentation). */
unsigned zc_store_fragmentation(struct zc_store *s, struct xcf_class_usage *out, unsigned n);
/* Pool bytes a complete compaction would give back. */
uint64_t zc_store_reclaimable_bytes(struct zc_store *s);

/* Verify every stored page's checksum; returns pages checked, *bad gets the failures (each
 * also counted in checksum_errors) and the first max_pages of them go to pages[]. */
uint64_t zc_store_scrub(struct zc_ctx *c, uint64_t *bad, uint64_t *pages, uint64_t max_pages);

/* Check the allocator's invariants (tests); 0 or a negative code naming the broken one. */
int zc_store_check(struct zc_store *s);

/* Test hook: flip one byte of the object that holds page `page`; 0 or -ENOENT. */
int zc_store_corrupt(struct zc_store *s, uint64_t page);

#endif
