/* xcfmalloc.h - the compressed-object allocator of the C core.
 *
 * The design and invariants of zcached/xcfmalloc.py (the reference model), in a memfd arena:
 * 16-byte size classes, vpages of up to 32 non-contiguous 0-order pages, an object crosses at
 * most one 4K boundary, opaque 32-bit handles stable across compaction, each 4K page given
 * back as soon as no object overlaps it, fullness groups, Hoard heaps (one global heap 0 plus
 * `heaps` worker heaps), compaction in bounded batches.  See xcfmalloc.c for the invariants.
 */
#ifndef ZC_XCFMALLOC_H
#define ZC_XCFMALLOC_H

#include <stdint.h>

#include "arena.h"

#define XCF_PAGE 4096u
#define XCF_CLASS_STEP 16u
#define XCF_NCLASSES 257u /* 256 classes of 16-byte steps, and the raw class */
#define XCF_RAW_CLASS 256u
#define XCF_HDR 4u /* in-object header of every non-raw object: its handle */
#define XCF_MAX_OBJECT XCF_PAGE
#define XCF_MAX_PPV 32u
#define XCF_NGROUPS 11u
#define XCF_MAX_HEAPS 64
#define XCF_COMPACT_BATCH 32u
#define XCF_NO_LIMIT UINT64_MAX /* limit_pages of a pool without a memory limit */

struct xcf_pool;

struct xcf_geometry {
	uint64_t pool_pages;  /* capacity of the pool region, in 4K pages */
	uint64_t max_handles; /* live objects at most */
	uint64_t max_vpages;
	int heaps;            /* worker heaps (1..XCF_MAX_HEAPS); heap 0 is global */
};

struct xcf_stats {
	uint64_t pool_pages, pool_pages_max, limit_pages, pages_compacted;
	uint64_t objects, requested_bytes, metadata_bytes, moves;
	uint64_t vpages_to_global; /* Hoard hand-overs of a worker heap's sparsest vpage */
};

struct xcf_class_usage {
	uint32_t size;            /* class size in bytes (4096 for the raw class) */
	uint64_t pool_bytes;      /* pages held by the class's vpages x 4096 */
	uint64_t requested_bytes; /* bytes asked for by its live objects */
	uint64_t objects;
};

/* Arena bytes the allocator needs for this geometry (metadata + pool); a multiple of 4096. */
uint64_t xcf_arena_bytes(const struct xcf_geometry *g);
/* Lay the allocator out at arena offset `off` (4K aligned).  NULL and *err on failure. */
struct xcf_pool *xcf_create(struct zc_arena *a, uint64_t off, const struct xcf_geometry *g,
			    uint64_t limit_pages, int *err);
/* Use the allocator already laid out at `off` (another process made it, maybe died since):
 * checks its header against g.  Its derived state is not trusted until a recovery (below)
 * rebuilt it.  NULL and *err (-EPROTO: not this layout) on failure. */
struct xcf_pool *xcf_attach(struct zc_arena *a, uint64_t off, const struct xcf_geometry *g,
			    int *err);
void xcf_destroy(struct xcf_pool *p);

/* Recovery, single-threaded, before any other call: begin, claim every handle that the
 * caller's truth (the page table) names, end.  A claim checks the handle's entry, vpage, slot,
 * pages and the object's back-reference, and that no other claim holds them; 0, or -EINVAL
 * (the caller must forget the handle), -ENOMEM from begin.  end rebuilds every list, group,
 * counter, the free handles, vpages and pages from the claimed objects alone, frees (and
 * punches) everything else, and fills *orphans (objects found but not claimed) and *freed
 * (pool pages given back). */
int xcf_recover_begin(struct xcf_pool *p);
int xcf_recover_claim(struct xcf_pool *p, uint32_t handle);
void xcf_recover_end(struct xcf_pool *p, uint64_t *orphans, uint64_t *freed);
void xcf_set_limit(struct xcf_pool *p, uint64_t limit_pages);

/* Store len (1..4096) bytes as a new object from heap `heap`; 0 and *handle, or -ENOSPC. */
int xcf_store(struct xcf_pool *p, int heap, const uint8_t *data, uint32_t len, uint32_t *handle);
/* Copy the object out (out holds >= 4096 bytes); its length, or -EINVAL for a bad handle. */
int xcf_read(struct xcf_pool *p, uint32_t handle, uint8_t *out);
/* Free an object; `heap` is the caller's (its handle goes back to that heap's cache). */
void xcf_free(struct xcf_pool *p, int heap, uint32_t handle);
/* Copy the first min(n, length) bytes of the object out; that count, or -EINVAL. */
int xcf_peek(struct xcf_pool *p, uint32_t handle, uint8_t *out, uint32_t n);
/* Length of a live object, or 0. */
uint32_t xcf_size(struct xcf_pool *p, uint32_t handle);

/* Move up to max_moves objects (0 = no bound) to give pages back; returns objects moved. */
uint64_t xcf_compact(struct xcf_pool *p, uint64_t max_moves);
uint64_t xcf_reclaimable_bytes(struct xcf_pool *p);
void xcf_stats(struct xcf_pool *p, struct xcf_stats *out);
/* Fills up to n entries (classes in use, ascending size); returns how many. */
unsigned xcf_fragmentation(struct xcf_pool *p, struct xcf_class_usage *out, unsigned n);
/* Flip one payload byte of the object (test hook for checksum errors). */
int xcf_corrupt(struct xcf_pool *p, uint32_t handle);
/* Check every invariant (tests); 0 or a negative number naming the first broken one. */
int xcf_check(struct xcf_pool *p);

#endif
