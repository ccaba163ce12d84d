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

#include "backing.h"
#include "codec.h"
#include "xcfmalloc.h"

#define ZC_PAGE_SIZE 4096u
#define ZC_PAGE_SHIFT 12
#define ZC_MAX_REQ_PAGES 256u /* 1 MiB: the largest FUSE request (max_pages) */

struct zc_store;
struct zc_ctx;

enum zc_compressor { ZC_LZ4 = 0, ZC_ZSTD = 1 };

/* Device pages at most (1 TiB): handles have 29 bits. */
#define ZC_MAX_DEVICE_PAGES ((1ull << 28) - 1u)
#define ZC_ARENA_VERSION 4u /* the arena's format: another one is refused by attach */

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
	uint64_t recoveries; /* times a server attached this arena (zc_store_attach) */
	uint64_t lost_pages; /* entries recoveries found naming no valid object (read as -EIO) */
	uint64_t cold_pages, cold_bytes; /* pages in the cold format now, and their object bytes */
	uint64_t recompressed;           /* pages ever recompressed (cold ones rewritten included) */
	uint64_t recompress_saved_bytes; /* object bytes recompression saved, summed when done */
	uint64_t epoch;                  /* zc_store_tick calls */
	uint64_t dicts, dict_bytes;      /* live dictionaries, their bytes in the arena */
	uint64_t dict_memory;            /* process memory of their digested forms */
	uint64_t dict_current;           /* the id new recompressions use (0: none) */
	uint64_t dicts_trained;          /* by this process */
	uint64_t samples, sample_cap;    /* pages in the sample reservoir, and its capacity */
	uint64_t sample_memory;          /* bytes the reservoir takes while it exists */
	uint64_t backed_pages, backed_bytes; /* pages in the backing file, their object bytes */
	uint64_t backing_bytes;              /* the backing file's segments (0: none) */
	uint64_t backing_used_bytes;         /* segments holding any live object */
	uint64_t writeback_pages, writeback_bytes; /* written back, ever */
	uint64_t writeback_writes, writeback_errors; /* segment writes, and those that failed */
	uint64_t writeback_direct;  /* direct reclaims: a write at the limit wrote back first */
	uint64_t writeback_full;    /* writebacks that found no free segment */
	uint64_t writeback_relocated; /* pages moved within the file by its compaction */
	uint64_t backing_reads, backing_read_pages, backing_read_ns, backing_read_errors;
	uint64_t backing_read_hist[ZC_BK_HIST]; /* reads by latency: <= 16 us << i; last: more */
};

/* What one zc_store_writeback call did. */
struct zc_writeback_report {
	uint64_t scanned;  /* page table entries looked at */
	uint64_t pages;    /* written back: their entries name the backing file now */
	uint64_t bytes;    /* their object bytes */
	uint64_t raced;    /* written or discarded meanwhile: left to the newer entry */
	uint64_t segments; /* segments written (0 or 1) */
	uint64_t relocated; /* pages moved within the file (its compaction), instead */
};

/* What one zc_store_recompress call did. */
struct zc_recompress_report {
	uint64_t scanned;      /* page table entries looked at */
	uint64_t candidates;   /* idle pages not in the cold format, not tried since touched */
	uint64_t recompressed; /* stored again in the cold format */
	uint64_t kept;         /* the cold format was no smaller: kept, marked tried */
	uint64_t raced;        /* written or discarded meanwhile: left to the newer entry */
	uint64_t failed;       /* no room in the pool (ENOSPC), or the page failed its checksum */
	uint64_t bytes_before, bytes_after; /* object bytes of the pages recompressed */
	uint64_t dict;                      /* the dictionary used (0: none) */
};

/* What one zc_store_attach found and did. */
struct zc_recovery {
	uint64_t pages;       /* page table entries in use (SAME, COMPRESSED or HUGE) */
	uint64_t objects;     /* live objects kept: those an entry names */
	uint64_t orphans;     /* objects no entry named (unfinished requests, moves): freed */
	uint64_t lost_pages;  /* entries naming no valid object: poisoned, they read as -EIO */
	uint64_t pages_freed; /* pool pages no kept object overlapped: given back */
	uint64_t ns;          /* time the rebuild took */
};

#define ZC_FRONT_WORDS 16u

/* Create a store in a new memfd arena.  On failure returns NULL and sets *err (-errno). */
struct zc_store *zc_store_open(const struct zc_store_config *cfg, int *err);
/* Open the store held in the arena memfd `fd`, made by zc_store_open in this or another
 * process that may have died at any instruction.  Checks the header and layout, then rebuilds
 * everything derived from the page table (the allocator's lists, groups, free pages and
 * handles, and the page counters; see store.c, RECOVERY).  `fd` is duplicated: the caller
 * keeps its own.  Only one store may have an arena open at a time (the caller's duty: the
 * keeper starts a server only after the last one is gone).  NULL and *err on failure; *rep
 * (may be NULL) gets the report. */
struct zc_store *zc_store_attach(int fd, struct zc_recovery *rep, int *err);
/* Whether this version could attach the arena in memfd `fd`, without mapping it or changing
 * anything (a live upgrade asks before the old server goes): 0, or -EPROTO (another version's
 * layout; *version gets the arena's format version, 0 if it is no arena at all) or -errno. */
int zc_store_probe(int fd, uint32_t *version);
void zc_store_close(struct zc_store *s);
/* ZC_FRONT_WORDS words in the arena header that the front end keeps across servers (FUSE:
 * whether INIT was answered, and the kernel's minor version).  Zero in a new arena. */
uint32_t *zc_store_front(struct zc_store *s);
/* The configuration the store was made with (from its header, for an attached one). */
void zc_store_get_config(const struct zc_store *s, struct zc_store_config *out);
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

/* Recompression (store.c, PAGE AGE and S5).  tick advances the store's clock by one tick and
 * frees the dictionaries S6 allows (a stats read frees none).
 * recompress looks at pages start..start+max_scan-1 (0: to the end), and stores every idle one
 * (untouched for >= idle_ticks ticks, 1..64) again in the cold format at zstd `level`, when
 * that is smaller.  Returns where to go on from (npages at the end of a pass), or UINT64_MAX
 * for bad arguments.  Runs in the caller's thread, taking one stripe lock at a time. */
void zc_store_tick(struct zc_store *s);
uint64_t zc_store_recompress(struct zc_ctx *c, uint64_t start, uint64_t max_scan,
			     unsigned idle_ticks, int level, struct zc_recompress_report *r);

/* Dictionaries (store.c, S6).  sample: start filling a reservoir of `pages` pages (at most
 * ZC_MAX_SAMPLES; 0 stops and frees it) with one in 8 * stride of the pages writers store.
 * train_dict: train a dictionary of at most dict_bytes (1024..ZC_DICT_MAX) on the reservoir
 * (which it takes and frees), for zstd `level`, and make it current: 0 and *id, -EAGAIN
 * (fewer than ZC_MIN_SAMPLES samples), -EINVAL (zstd found no dictionary in them) or -ENOSPC
 * (every slot is still used by some page).  set_dict: make `bytes` the current dictionary
 * (tests and benchmarks: a dictionary trained elsewhere). */
#define ZC_MAX_SAMPLES 8192u
#define ZC_MIN_SAMPLES 64u
int zc_store_sample(struct zc_store *s, uint32_t pages, uint32_t stride);
int zc_store_train_dict(struct zc_store *s, uint32_t dict_bytes, int level, unsigned *id);
int zc_store_set_dict(struct zc_store *s, const uint8_t *bytes, uint32_t len, int level,
		      unsigned *id);

/* The writeback tier (store.c, WRITEBACK).  set_backing: use backing file or device `fd` of
 * `bytes` bytes (the caller keeps its fd; opened O_DIRECT, preallocated).  A store whose arena
 * has pages in a backing file takes only that file (its header names the arena's id), else
 * -EPROTO; one without starts the file anew.  Call it before any request (it recounts the
 * segments from the page table).  -EBUSY if the store has one already.
 * writeback: write back one segment's worth (at most max_bytes of objects) of pages idle for
 * >= idle_ticks ticks (0: any), from where the last call stopped.  0 and *r (r->pages 0:
 * none found; a batch taking the last free segment instead compacts the file: it moves the
 * live pages of its emptiest segments into it, r->relocated), -ENODEV (no backing file), -ENOSPC (no free segment), -EIO (the write failed;
 * the pages stay in the pool).  A write that finds the pool at its limit does the same itself
 * (direct reclaim) before it fails. */
#define ZC_WB_MAX_OBJECTS 2048u
#define ZC_WB_DIRECT_TRIES 8u
#define ZC_WB_COMPACT_MOVES 2048u
int zc_store_set_backing(struct zc_store *s, int fd, uint64_t bytes);
int zc_store_writeback(struct zc_ctx *c, uint64_t max_bytes, unsigned idle_ticks,
		       struct zc_writeback_report *r);

/* Verify every stored page's checksum; returns pages checked, *bad gets the failures (each
 * also counted in checksum_errors) and the first max_pages of them go to pages[]. */
uint64_t zc_store_scrub(struct zc_ctx *c, uint64_t *bad, uint64_t *pages, uint64_t max_pages);

/* Check the allocator's invariants (tests); 0 or a negative code naming the broken one. */
int zc_store_check(struct zc_store *s);

/* Test hook: flip one byte of the object that holds page `page`; 0 or -ENOENT. */
int zc_store_corrupt(struct zc_store *s, uint64_t page);

#endif
