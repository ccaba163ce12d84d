/* store.c - the page store of the C core (see store.h): the page table and the request paths.
 *
 * Owns: the arena header and layout, the page table (one 64-bit entry, two 32-bit fill words
 * and one age byte per device page), the writeback tier's mechanism (which pages go to the
 * backing file, their entries, reading them back; the file itself is backing.c's), the
 * read/write/discard paths with read-modify-write of
 * unaligned edges, checksum verification on every read, the memory limit as callers see it
 * (ENOSPC), the stripe locks, the per-context counters, the contexts themselves, and the
 * mechanism of recompression (which idle pages, stored again in the cold format; the policy,
 * when and how much, is zcached/recompressor.py's).
 * Must not: know compression formats (codec.c), object layout (xcfmalloc.c), FUSE
 * (fuse_loop.c) or Python; allocate on the request path (a context's buffers are allocated
 * once, when it is made).  The reference model is zcached/store.py.
 *
 * ARENA LAYOUT (offsets from the memfd's start, all 4K aligned)
 *   0           struct zc_hdr: magic, version, geometry, configuration, the offsets below
 *   off_pte     u64 pte[npages]
 *   off_fill    u32 fill_hi[npages][2]
 *   off_age     u8 age[npages]
 *   off_dict    u8 dict[ZC_MAX_DICTS][ZC_DICT_MAX]: zstd dictionaries, slot i holds id i
 *               (hdr->dict_len[i] bytes, trained at hdr->dict_level[i]); slot 0 is unused
 *   off_ctx     struct zc_ctx_stats[ZC_MAX_CTX]: slot 0 holds the counters of contexts that
 *               ended (and of servers that died); slots 1.. one per live context
 *   off_xcf     the allocator's region (xcfmalloc.c: its metadata, then the pool pages)
 *
 * PAGE TABLE ENTRY  pte[p] = state << 62 | payload
 *   EMPTY      0                                    never written or discarded: zeros
 *   SAME       1 << 62 | sel << 32 | fill low 32    fill_hi[p][sel] holds the high 32 bits
 *   COMPRESSED 2 << 62 | cold << 61 | handle << 32 | checksum
 *                                                   handle < 2^29; checksum of the page; the
 *                                                   object is in the store's codec, or in the
 *                                                   cold format (codec.h) when cold is set
 *   HUGE       3 << 62 | handle << 32 | checksum    the object is the raw page
 *   BACKED     3 << 62 | 1 << 61 | cls << 56 | (len - 1) << 44 | sel << 43 | off / 2 << 32
 *              | checksum                           written back (WRITEBACK): len bytes at
 *                                                   byte off (even) of backing block
 *                                                   fill[p][sel]; cls 0: the store's codec,
 *                                                   1: the raw page, 2 + d: cold, dictionary d
 *   A COMPRESSED entry with handle 0 is a lost page (POISON): recovery found it naming no valid
 *   object; it reads as -EIO until written again.
 *
 * PAGE AGE  age[p] = tried << 7 | epoch of the last read or write of p (7 bits)
 *   hdr->epoch is advanced by zc_store_tick (the recompressor's clock: no clock is read per
 *   request).  A page is idle after idle_ticks ticks untouched (now - epoch, mod 128, so a
 *   page untouched for 128 ticks and still not taken looks young again for idle_ticks ticks: a
 *   delay, nothing worse; the recompressor takes idle pages long before).
 *   tried: recompression found the cold format no smaller; the page is not tried again until
 *   it is read or written.  Ages are hints: a lost or torn update costs only a wrong guess.
 *
 * INVARIANTS
 *  S1 An entry is published by one atomic store, after its object is complete (and after its
 *     fill word for SAME, written to the half the entry it replaces does not use, so a SAME
 *     page is never torn); the object it replaces is freed after, by the thread that replaced
 *     it, outside the stripe locks.  A handle is in at most one entry, and freed exactly once.
 *     Hence at every instruction the page table names complete objects only: it is the truth,
 *     and a process that dies leaves at worst orphans (objects no entry names), which recovery
 *     frees.
 *  S2 A failed allocation (ENOSPC) leaves every page of the request as it was.
 *  S3 A write request is atomic with respect to other requests: its objects are all stored
 *     first, then committed under all its stripe locks at once.
 *  S4 Bytes returned by a read matched their checksum (or are EMPTY/SAME pages); else -EIO
 *     and checksum_errors++.
 *  S6 A dictionary's bytes are complete before its length is stored (which makes the slot
 *     live), and it is made current after that; a page is recompressed only with the current
 *     one.  A slot is freed (length 0, then its bytes punched) only when it is not current, no
 *     entry names an object made with it (dict_refs, recounted at attach) and no snapshot holds
 *     it for a decode (dict_holds: taken under the stripe lock of the entry read, before that
 *     entry can be replaced and its reference dropped).  So no decode ever meets a freed
 *     dictionary, and a server that dies leaves at worst a live slot nobody uses (freed by
 *     the next attach) or a dead one half written (length 0: it is nothing).
 *  S7 A BACKED entry is published only after its segment's write completed (WRITEBACK 2),
 *     with its block in the fill word the entry it replaces does not use; a page written back
 *     still holds what was copied (checked under its stripe lock, as S5), and its pool object
 *     is freed after, as every replacement's.  A segment is reused only when no entry names it
 *     and no reader holds it (backing.h B1-B3).  So a read of a BACKED page reads the bytes
 *     that were written for it, or fails its checksum (-EIO): never another page's bytes.
 *  S5 Recompression replaces an entry only if it is still the entry it decoded and verified,
 *     checked and published under the page's stripe lock (a write or discard in between wins;
 *     the new object is dropped), keeping the checksum; as every replacement, it frees the old
 *     object after (S1).  A cold page is never recompressed again; its next write stores it in
 *     the store's codec.
 *
 * LOCKING
 *  ZC_NSTRIPES stripe locks; page p belongs to stripe (p >> ZC_STRIPE_SHIFT) % ZC_NSTRIPES.
 *  A request takes the locks of the stripes it covers in ascending order and holds them for
 *  table lookups/updates and copying object bytes out; compression and decompression of whole
 *  pages happen outside them (edge pages of unaligned writes and discards are merged under
 *  them).  Allocator locks are taken inside stripe locks, never the other way round.
 *  ctx_lock guards the context slots (taken when a context is made or freed, and by stats).
 *  dict_lock guards the dictionary slots (made current, freed) and the sample reservoir; a
 *  writer offering a sample only tries it (never waits); stripe locks are never taken inside.
 *  wb_lock serialises writeback batches (the open segment, its buffer, the hand); it is taken
 *  with no stripe lock held, and stripe locks are taken inside it one at a time.  A writer
 *  that finds the pool at its limit takes it (direct reclaim) only from zc_store_write's top,
 *  holding nothing.
 *  The locks live in the process (struct zc_store), never in the arena: a server that dies
 *  holding one leaves nothing locked for the next.
 *
 * WRITEBACK (zc_store_writeback; the policy, when and how much, is zcached/writeback.py's)
 *  1. Gather: from the hand on, each object entry idle for idle_ticks (0: any) is copied, under
 *     its stripe lock, into the open segment's buffer (objects at even bytes, crossing at most
 *     one 4K boundary, never the segment's end), until the segment is full or the hand went
 *     round.
 *  2. One O_DIRECT write of the used blocks (the file was preallocated: no allocation under
 *     memory pressure).  On failure nothing was published: the pages stay in the pool.
 *  3. Publish (S7), free the pool objects, count the segment's live bytes (B2).
 *  4. When the open segment is the last free one, the batch compacts the file instead: the
 *     live objects of the emptiest segments (at least two, fitting in one) are copied into it
 *     and their entries moved (checked against entry and block), which frees those segments.
 *     That last segment is never filled with new pages: the file can always be compacted.
 *  A read of a BACKED page takes its segment's hold under the stripe lock (B3), reads the
 *  blocks after the locks (one pread for a run of pages within BIO_BLOCKS), decodes, verifies.
 *
 * RECOVERY (zc_store_attach; the arena's previous user may have died at any instruction)
 *  1. The header and layout are checked against what this version would lay out for the same
 *     configuration; any difference refuses the arena (-EPROTO) rather than guessing.
 *  2. Every object entry of the page table is offered to the allocator (xcf_recover_claim),
 *     which checks the handle, its entry, the vpage, the slot, the pages and the object's own
 *     back-reference; an entry that fails becomes POISON (counted in lost_pages: S1 means this
 *     never happens after a crash, only after memory corruption).
 *  3. xcf_recover_end rebuilds the allocator from the claimed objects alone; the rest of the
 *     pool (orphans, half-made vpages, pages taken but not yet used) is freed.
 *  4. The counters of every context that was live fold into slot 0, and the per-state page
 *     counts are recounted from the table.
 *  5. BACKED entries are kept if their place lies inside the backing file the header records
 *     (else POISON); the file's segments are recounted when the server gives it the file
 *     (zc_store_set_backing, which checks the file's header names this arena's file).
 */
#include "store.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "arena.h"
#include "backing.h"
#include "codec.h"
#include "crashpoint.h"
#include "xcfmalloc.h"

#define ZC_MAGIC "ZCACHED1"
#define ZC_NSTRIPES 64u
#define ZC_STRIPE_SHIFT 6
#define ZC_MAX_CTX 256u
#define ZC_CLEAR_RUN 512u
#define ZC_MAX_HANDLE ((1u << 29) - 1u)

#define ST_SHIFT 62
#define PTE_STATE(e) ((unsigned)((e) >> ST_SHIFT))
#define PTE_HANDLE(e) ((uint32_t)((e) >> 32) & ZC_MAX_HANDLE)
#define PTE_CSUM(e) ((uint32_t)(e))
#define PTE_SEL(e) ((unsigned)((e) >> 32) & 1u)
#define PTE_COLD (1ull << 61)
#define PTE_IS_COLD(e) (PTE_STATE(e) == ZC_COMPRESSED && ((e) & PTE_COLD))
#define PTE_BACKED (1ull << 61)
#define PTE_IS_BACKED(e) (PTE_STATE(e) == ZC_HUGE && ((e) & PTE_BACKED))
#define BK_CLS(e) ((unsigned)((e) >> 56) & 31u)
#define BK_LEN(e) ((((unsigned)((e) >> 44)) & 4095u) + 1u)
#define BK_OFF(e) (((unsigned)((e) >> 32) & 2047u) * 2u)
#define BK_SEL(e) ((unsigned)((e) >> 43) & 1u)
#define BK_RAW 1u  /* class of a written-back raw page; 0: the store's codec; 2 + d: cold, dict d */
#define BK_COLD 2u
#define SLOT_BACKED 4u /* by_state[] index of BACKED entries */
#define BIO_BLOCKS 16u /* blocks one fetch reads at most */
#define AGE_TRIED 0x80u
#define AGE_EPOCH 0x7fu
#define AGE_MAX_IDLE 64u
#define ZC_POISON ((uint64_t)ZC_COMPRESSED << ST_SHIFT)

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define RLOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)
#define BUMP(x, v) __atomic_store_n(&(x), RLOAD(x) + (uint64_t)(v), __ATOMIC_RELAXED)

struct zc_hdr {
	char magic[8];
	uint32_t version, hdr_bytes;
	uint64_t arena_bytes, size, npages;
	int32_t compressor, level;
	uint32_t huge_threshold;
	int32_t heaps;
	uint64_t mem_limit;
	uint64_t off_pte, off_fill, off_age, off_ctx, off_xcf;
	uint64_t pool_pages, max_handles, max_vpages;
	uint64_t recoveries, lost_pages;
	uint32_t epoch, dict_current;
	uint64_t off_dict;
	uint32_t dict_len[ZC_MAX_DICTS];
	int32_t dict_level[ZC_MAX_DICTS];
	uint32_t front[ZC_FRONT_WORDS];
	uint64_t bk_id, bk_blocks; /* the backing file's id and geometry (0: none yet) */
};

/* One context's counters; single writer (the context's thread), read by stats. */
struct zc_ctx_stats {
	uint64_t used;
	uint64_t reads, writes, discards, failed_reads, failed_writes, checksum_errors;
	uint64_t by_state[5]; /* changes in pages per state, BACKED last (two's complement) */
	uint64_t cold_pages, cold_bytes; /* changes in cold pages and their object bytes */
	uint64_t recompressed, saved_bytes; /* pages recompressed, object bytes that saved */
	uint64_t backed_bytes;              /* changes in the object bytes of BACKED pages */
	uint64_t wb_pages, wb_bytes, wb_writes, wb_errors, wb_direct, wb_full, wb_moved;
	uint64_t bk_reads, bk_read_pages, bk_read_ns, bk_read_errors, bk_hist[ZC_BK_HIST];
};

struct zc_store {
	struct zc_arena arena;
	struct zc_hdr *hdr;
	uint64_t *pte;
	uint32_t *fill;
	uint8_t *age;
	struct zc_ctx_stats *cstats;
	struct xcf_pool *pool;
	uint64_t npages;
	struct zc_store_config cfg;
	pthread_mutex_t stripes[ZC_NSTRIPES];
	pthread_mutex_t ctx_lock;
	uint8_t *dict_bytes;                  /* the arena's dictionary region */
	pthread_mutex_t dict_lock;            /* see LOCKING */
	struct zc_dict dicts[ZC_MAX_DICTS];   /* digested live slots (process memory) */
	uint64_t dict_refs[ZC_MAX_DICTS];     /* cold entries naming each (atomic) */
	uint64_t dict_holds[ZC_MAX_DICTS];    /* snapshots holding each for a decode (atomic) */
	uint64_t dict_trained;                /* dictionaries this process trained */
	uint8_t *samples;                     /* the reservoir: sample_cap pages, or NULL */
	uint32_t sample_cap, nsamples, sample_stride;
	uint32_t sampling;                    /* 1 while the reservoir fills (__atomic) */
	struct zc_backing bk;                 /* the writeback tier (fd -1: none) */
	pthread_mutex_t wb_lock;              /* guards bk's open segment, wbuf, wb_* (B1) */
	uint64_t wb_hand;                     /* where the next writeback batch looks first */
	uint64_t wb_page[ZC_WB_MAX_OBJECTS], wb_old[ZC_WB_MAX_OBJECTS];
	uint32_t wb_pos[ZC_WB_MAX_OBJECTS], wb_len[ZC_WB_MAX_OBJECTS];
	uint32_t wb_oldblock[ZC_WB_MAX_OBJECTS]; /* relocations: the block each came from */
};

/* An unaligned request of ZC_MAX_REQ_PAGES * 4096 bytes spans one page more. */
#define ZC_MAX_SPAN (ZC_MAX_REQ_PAGES + 1u)

struct zc_ctx {
	struct zc_store *s;
	int heap, slot;
	struct zc_codec codec;
	struct zc_codec cold; /* zstd: decodes cold pages; encodes them for zc_store_recompress */
	struct zc_ctx_stats *st;
	uint8_t *scratch;   /* copies of objects read under the locks: ZC_MAX_SPAN pages */
	uint32_t obj_off[ZC_MAX_SPAN], obj_len[ZC_MAX_SPAN];
	uint64_t snap[ZC_MAX_SPAN];
	uint32_t snap_fill[ZC_MAX_SPAN];
	uint8_t snap_dict[ZC_MAX_SPAN]; /* the dictionary snapshot i holds (0: none) */
	uint32_t snap_block[ZC_MAX_SPAN]; /* BACKED snapshot i: its block (0: not one to fetch) */
	uint8_t snap_seg[ZC_MAX_SPAN];    /* 1: snapshot i holds its segment (B3) */
	uint8_t *bio;                     /* BIO_BLOCKS blocks, 4K aligned, for fetches */
	uint32_t sample_tick;           /* pages this context offered the reservoir */
	uint64_t newe[ZC_MAX_SPAN];
	uint32_t newf[ZC_MAX_SPAN];
	uint64_t olde[ZC_CLEAR_RUN];
	uint8_t enc[ZC_CODEC_OUT_MAX];
	uint8_t page[ZC_PAGE_SIZE];
	uint8_t obj[ZC_PAGE_SIZE];
};

static uint64_t align4k(uint64_t n)
{
	return (n + ZC_PAGE_SIZE - 1) & ~(uint64_t)(ZC_PAGE_SIZE - 1);
}

/* ---- stripe locks -------------------------------------------------------------------------- */

/* The stripes of pages first..last as a bitmap (ascending order = acquisition order). */
static uint64_t stripes_of(uint64_t first, uint64_t last)
{
	uint64_t lo = first >> ZC_STRIPE_SHIFT, hi = last >> ZC_STRIPE_SHIFT, set = 0;

	if (hi - lo + 1 >= ZC_NSTRIPES)
		return UINT64_MAX;
	for (uint64_t r = lo; r <= hi; r++)
		set |= 1ull << (r % ZC_NSTRIPES);
	return set;
}

static void lock_stripes(struct zc_store *s, uint64_t set)
{
	for (unsigned i = 0; i < ZC_NSTRIPES; i++)
		if (set >> i & 1)
			pthread_mutex_lock(&s->stripes[i]);
}

static void unlock_stripes(struct zc_store *s, uint64_t set)
{
	for (int i = (int)ZC_NSTRIPES - 1; i >= 0; i--)
		if (set >> i & 1)
			pthread_mutex_unlock(&s->stripes[i]);
}

/* ---- dictionaries (S6) ---------------------------------------------------------------------- */

/* The dictionary a live cold object was made with (its first byte); 0 for none or a bad one. */
static unsigned cold_dict_of(struct zc_store *s, uint64_t e)
{
	uint8_t id = 0;

	if (xcf_peek(s->pool, PTE_HANDLE(e), &id, 1) != 1 || id >= ZC_MAX_DICTS)
		return 0;
	return id;
}

/* The dictionary entry e's object needs (0: none): a cold one's first byte, or a BACKED
 * one's class. */
static unsigned entry_dict(struct zc_store *s, uint64_t e)
{
	if (PTE_IS_COLD(e) && e != ZC_POISON)
		return cold_dict_of(s, e);
	if (PTE_IS_BACKED(e) && BK_CLS(e) >= BK_COLD && BK_CLS(e) - BK_COLD < ZC_MAX_DICTS)
		return BK_CLS(e) - BK_COLD;
	return 0;
}

static void dict_ref(struct zc_store *s, uint64_t e, uint64_t delta)
{
	unsigned id = entry_dict(s, e);

	if (id)
		__atomic_fetch_add(&s->dict_refs[id], delta, __ATOMIC_SEQ_CST);
}

static void dict_hold(struct zc_store *s, unsigned id)
{
	__atomic_fetch_add(&s->dict_holds[id], 1, __ATOMIC_SEQ_CST);
}

static void dict_release(struct zc_store *s, unsigned id)
{
	__atomic_fetch_sub(&s->dict_holds[id], 1, __ATOMIC_SEQ_CST);
}

/* The digested dictionary `id` names, if live (NULL for 0 or a slot that is not). */
static const struct zc_dict *dict_of(struct zc_store *s, unsigned id)
{
	if (id == 0 || id >= ZC_MAX_DICTS || !s->dicts[id].ddict)
		return NULL;
	return &s->dicts[id];
}

static uint8_t *dict_slot(struct zc_store *s, unsigned id)
{
	return s->dict_bytes + (uint64_t)id * ZC_DICT_MAX;
}

/* Free every slot S6 allows (caller holds dict_lock); returns how many are still live. */
static unsigned dict_gc(struct zc_store *s)
{
	unsigned live = 0;

	for (unsigned id = 1; id < ZC_MAX_DICTS; id++) {
		if (!RLOAD(s->hdr->dict_len[id]))
			continue;
		if (id == RLOAD(s->hdr->dict_current) ||
		    __atomic_load_n(&s->dict_refs[id], __ATOMIC_SEQ_CST) ||
		    __atomic_load_n(&s->dict_holds[id], __ATOMIC_SEQ_CST)) {
			live++;
			continue;
		}
		STORE(s->hdr->dict_len[id], 0);
		zc_dict_free(&s->dicts[id]);
		zc_arena_punch(&s->arena, (uint64_t)(dict_slot(s, id) - s->arena.base), ZC_DICT_MAX);
	}
	return live;
}

/* A page a writer stored: every sample_stride-th one goes to the reservoir while it fills. */
static void offer_sample(struct zc_ctx *c, const uint8_t *page)
{
	struct zc_store *s = c->s;

	if (!__atomic_load_n(&s->sampling, __ATOMIC_RELAXED) || ++c->sample_tick % 8u ||
	    pthread_mutex_trylock(&s->dict_lock))
		return;
	if (s->samples && s->nsamples < s->sample_cap &&
	    c->sample_tick / 8u % s->sample_stride == 0) {
		memcpy(s->samples + (uint64_t)s->nsamples * ZC_PAGE_SIZE, page, ZC_PAGE_SIZE);
		s->nsamples++;
	}
	if (!s->samples || s->nsamples == s->sample_cap)
		__atomic_store_n(&s->sampling, 0, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&s->dict_lock);
}

/* ---- counters ------------------------------------------------------------------------------ */

/* The by_state[] slot of entry e: its state, or SLOT_BACKED. */
static unsigned slot_of(uint64_t e)
{
	return PTE_IS_BACKED(e) ? SLOT_BACKED : PTE_STATE(e);
}

/* The backing block BACKED entry e of page p names (its fill word: see publish). */
static uint32_t backed_block(struct zc_store *s, uint64_t p, uint64_t e)
{
	return RLOAD(s->fill[2 * p + BK_SEL(e)]);
}

/* Entry old of page p replaced by new (both objects still live; B2 for BACKED ones). */
static void count_state(struct zc_ctx *c, uint64_t p, uint64_t old, uint64_t new)
{
	struct zc_store *s = c->s;

	BUMP(c->st->by_state[slot_of(old)], (uint64_t)-1);
	BUMP(c->st->by_state[slot_of(new)], 1);
	dict_ref(s, old, (uint64_t)-1);
	dict_ref(s, new, 1);
	if (PTE_IS_COLD(old)) {
		BUMP(c->st->cold_pages, (uint64_t)-1);
		BUMP(c->st->cold_bytes, -(uint64_t)xcf_size(s->pool, PTE_HANDLE(old)));
	}
	if (PTE_IS_COLD(new)) {
		BUMP(c->st->cold_pages, 1);
		BUMP(c->st->cold_bytes, xcf_size(s->pool, PTE_HANDLE(new)));
	}
	if (PTE_IS_BACKED(old)) {
		BUMP(c->st->backed_bytes, -(uint64_t)BK_LEN(old));
		zc_backing_live(&s->bk, zc_block_seg(backed_block(s, p, old)), -(int64_t)BK_LEN(old));
	}
	if (PTE_IS_BACKED(new)) {
		BUMP(c->st->backed_bytes, BK_LEN(new));
		zc_backing_live(&s->bk, zc_block_seg(backed_block(s, p, new)), BK_LEN(new));
	}
}

/* ---- page age ------------------------------------------------------------------------------ */

static unsigned epoch_now(const struct zc_store *s)
{
	return RLOAD(s->hdr->epoch) & AGE_EPOCH;
}

/* Page p was read or written (caller holds its stripe): young again, to be tried again. */
static void touch(struct zc_store *s, uint64_t p)
{
	uint8_t now = (uint8_t)epoch_now(s);

	if (RLOAD(s->age[p]) != now)
		__atomic_store_n(&s->age[p], now, __ATOMIC_RELAXED);
}

/* Ticks since a page with age byte a was last touched (mod 128). */
static unsigned idle_ticks_of(const struct zc_store *s, uint8_t a)
{
	return (epoch_now(s) - (a & AGE_EPOCH)) & AGE_EPOCH;
}

/* Mark page p tried, unless it was touched since its age a was read. */
static void mark_tried(struct zc_store *s, uint64_t p, uint8_t a)
{
	__atomic_compare_exchange_n(&s->age[p], &a, (uint8_t)(a | AGE_TRIED), 0, __ATOMIC_RELAXED,
				    __ATOMIC_RELAXED);
}

/* ---- entries ------------------------------------------------------------------------------- */

static uint64_t pte_same(uint64_t word, uint32_t *fill_hi)
{
	*fill_hi = (uint32_t)(word >> 32);
	return (uint64_t)ZC_SAME << ST_SHIFT | (uint32_t)word;
}

static uint64_t pte_object(unsigned state, uint32_t handle, uint32_t csum)
{
	return (uint64_t)state << ST_SHIFT | (uint64_t)handle << 32 | csum;
}

static uint32_t fill_of(struct zc_store *s, uint64_t p, uint64_t e)
{
	return RLOAD(s->fill[2 * p + PTE_SEL(e)]);
}

/* Publish entry e for page p (S1).  A SAME entry's fill word, or a BACKED entry's block (in
 * word 0), goes first, into a half the entry it replaces does not use; then the entry, in one
 * store. */
static uint64_t publish(struct zc_store *s, uint64_t p, uint64_t e, uint32_t fill_hi)
{
	uint64_t old = RLOAD(s->pte[p]);

	if (PTE_IS_BACKED(e)) { /* e's maker chose the half (BK_SEL) that old does not use */
		STORE(s->fill[2 * p + BK_SEL(e)], fill_hi);
	} else if (PTE_STATE(e) == ZC_SAME) {
		unsigned sel = PTE_STATE(old) == ZC_SAME ? PTE_SEL(old) ^ 1u
			       : PTE_IS_BACKED(old)	 ? BK_SEL(old) ^ 1u
							 : 0u;

		STORE(s->fill[2 * p + sel], fill_hi);
		e |= (uint64_t)sel << 32;
		CRASH_POINT("publish.fill_written");
	}
	STORE(s->pte[p], e);
	return old;
}

/* Does entry e name an object in the pool (COMPRESSED or HUGE, not BACKED)? */
static int pool_object(uint64_t e)
{
	unsigned st = PTE_STATE(e);

	return (st == ZC_COMPRESSED || st == ZC_HUGE) && !PTE_IS_BACKED(e);
}

static void free_entry(struct zc_ctx *c, uint64_t e)
{
	if (pool_object(e))
		xcf_free(c->s->pool, c->heap, PTE_HANDLE(e));
}

/* Encode one page and store its object; the new entry in *e (and *fill).  0 or -errno. */
static int encode_store(struct zc_ctx *c, const uint8_t *page, uint64_t *e, uint32_t *fill)
{
	uint32_t len = 0, csum = 0, h;
	uint64_t word = 0;
	int kind = zc_codec_encode(&c->codec, page, c->enc, &len, &word, &csum);

	*fill = 0;
	if (kind == ZC_SAME) {
		*e = pte_same(word, fill);
		return 0;
	}
	int rc = xcf_store(c->s->pool, c->heap, kind == ZC_HUGE ? page : c->enc, len, &h);

	if (rc)
		return rc;
	if (kind == ZC_COMPRESSED)
		offer_sample(c, page);
	if (h > ZC_MAX_HANDLE) {
		xcf_free(c->s->pool, c->heap, h);
		return -ENOSPC;
	}
	*e = pte_object((unsigned)kind, h, csum);
	return 0;
}

/* Snapshot i of BACKED page p (caller holds its stripe): room in c->scratch at *at for its
 * object, which fetch() reads after the locks; the segment and the dictionary held (B3, S6). */
static int snapshot_backed(struct zc_ctx *c, uint64_t p, unsigned i, uint32_t *at)
{
	struct zc_store *s = c->s;
	uint64_t e = c->snap[i];
	uint32_t block = backed_block(s, p, e);
	unsigned id = entry_dict(s, e);

	if (s->bk.fd < 0 || block == 0 || block >= s->bk.blocks)
		return -EIO;
	zc_backing_hold(&s->bk, zc_block_seg(block));
	c->snap_seg[i] = 1;
	c->snap_block[i] = block;
	if (id) {
		dict_hold(s, id);
		c->snap_dict[i] = (uint8_t)id;
	}
	c->obj_off[i] = *at;
	c->obj_len[i] = BK_LEN(e);
	*at += BK_LEN(e);
	return 0;
}

/* Copy page p's object out (caller holds its stripe): into c->scratch at *at. */
static int snapshot(struct zc_ctx *c, uint64_t p, unsigned i, uint32_t *at)
{
	struct zc_store *s = c->s;
	uint64_t e = RLOAD(s->pte[p]);

	c->snap[i] = e;
	c->snap_fill[i] = PTE_STATE(e) == ZC_SAME ? fill_of(s, p, e) : 0;
	c->snap_dict[i] = 0;
	c->snap_block[i] = 0;
	c->snap_seg[i] = 0;
	c->obj_len[i] = 0;
	if (PTE_STATE(e) < ZC_COMPRESSED)
		return 0;
	if (PTE_IS_BACKED(e))
		return snapshot_backed(c, p, i, at);
	int n = xcf_read(s->pool, PTE_HANDLE(e), c->scratch + *at);

	if (n < 0)
		return -EIO;
	if (PTE_IS_COLD(e) && n > 0) {
		unsigned id = zc_cold_dict_id(c->scratch + *at);

		if (id && id < ZC_MAX_DICTS) {
			dict_hold(s, id);
			c->snap_dict[i] = (uint8_t)id;
		}
	}
	c->obj_off[i] = *at;
	c->obj_len[i] = (uint32_t)n;
	*at += (uint32_t)n;
	return 0;
}

/* Give back the dictionaries and segments snapshots lo..hi-1 hold (after their decodes). */
static void release_snapshots(struct zc_ctx *c, unsigned lo, unsigned hi)
{
	for (unsigned i = lo; i < hi; i++) {
		if (c->snap_dict[i]) {
			dict_release(c->s, c->snap_dict[i]);
			c->snap_dict[i] = 0;
		}
		if (c->snap_seg[i]) {
			zc_backing_release(&c->s->bk, zc_block_seg(c->snap_block[i]));
			c->snap_seg[i] = 0;
		}
	}
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void count_backing_read(struct zc_ctx *c, uint64_t ns, unsigned pages)
{
	unsigned b = 0;

	for (uint64_t us = ns / 1000; b + 1 < ZC_BK_HIST && us > (16ull << b); b++)
		;
	BUMP(c->st->bk_reads, 1);
	BUMP(c->st->bk_read_pages, pages);
	BUMP(c->st->bk_read_ns, ns);
	BUMP(c->st->bk_hist[b], 1);
}

/* The last block BACKED snapshot i needs. */
static uint32_t last_block(const struct zc_ctx *c, unsigned i)
{
	return c->snap_block[i] + (BK_OFF(c->snap[i]) + BK_LEN(c->snap[i]) > ZC_BK_BLOCK);
}

/* Read the objects of the BACKED snapshots lo..hi-1 (taken under the locks, now held by B3)
 * into c->scratch: one pread for each run of them within BIO_BLOCKS blocks.  0 or -EIO. */
static int fetch(struct zc_ctx *c, unsigned lo, unsigned hi)
{
	uint32_t wlo = 0, whi = 0; /* blocks [wlo, whi) are in c->bio */

	for (unsigned i = lo; i < hi; i++) {
		uint32_t b = c->snap_block[i];

		if (!b)
			continue;
		if (b < wlo || last_block(c, i) >= whi) {
			uint32_t end = last_block(c, i) + 1;
			uint64_t t0 = now_ns();
			unsigned pages = 0;

			for (unsigned j = i; j < hi; j++) /* the run this read serves */
				if (c->snap_block[j] && c->snap_block[j] >= b &&
				    last_block(c, j) < b + BIO_BLOCKS) {
					end = last_block(c, j) + 1 > end ? last_block(c, j) + 1 : end;
					pages++;
				}
			if (zc_backing_read(&c->s->bk, b, end - b, c->bio)) {
				BUMP(c->st->bk_read_errors, 1);
				return -EIO;
			}
			count_backing_read(c, now_ns() - t0, pages);
			wlo = b;
			whi = end;
		}
		memcpy(c->scratch + c->obj_off[i],
		       c->bio + (uint64_t)(b - wlo) * ZC_BK_BLOCK + BK_OFF(c->snap[i]), c->obj_len[i]);
	}
	return 0;
}

/* The entry a BACKED entry was in the pool, for decoding (others as they are). */
static uint64_t stored_form(uint64_t e)
{
	if (!PTE_IS_BACKED(e))
		return e;
	if (BK_CLS(e) == BK_RAW)
		return pte_object(ZC_HUGE, 0, PTE_CSUM(e));
	return pte_object(ZC_COMPRESSED, 0, PTE_CSUM(e)) | (BK_CLS(e) >= BK_COLD ? PTE_COLD : 0);
}

/* The page that snapshot i holds, verified (S4), into out[4096]. */
static int materialise(struct zc_ctx *c, unsigned i, uint8_t *out)
{
	uint64_t e = stored_form(c->snap[i]);
	const uint8_t *obj = c->scratch + c->obj_off[i];

	switch (PTE_STATE(e)) {
	case ZC_EMPTY:
		memset(out, 0, ZC_PAGE_SIZE);
		return 0;
	case ZC_SAME:
		zc_fill_page(out, (uint64_t)c->snap_fill[i] << 32 | (uint32_t)e);
		return 0;
	case ZC_HUGE:
		if (c->obj_len[i] != ZC_PAGE_SIZE)
			return -EIO;
		memcpy(out, obj, ZC_PAGE_SIZE);
		break;
	default:
		if (e & PTE_COLD ? zc_codec_decode_cold(&c->cold, obj, c->obj_len[i], out,
							dict_of(c->s, c->snap_dict[i]))
				 : zc_codec_decode(&c->codec, obj, c->obj_len[i], out))
			return -EIO;
	}
	return zc_checksum(out) == PTE_CSUM(e) ? 0 : -EIO;
}

static int integrity_error(struct zc_ctx *c)
{
	BUMP(c->st->checksum_errors, 1);
	return -EIO;
}

/* ---- read ---------------------------------------------------------------------------------- */

int zc_store_read(struct zc_ctx *c, uint64_t off, uint32_t len, uint8_t *out)
{
	struct zc_store *s = c->s;

	if (len == 0)
		return 0;
	if (len > ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE || off >= s->cfg.size || len > s->cfg.size - off)
		return -EINVAL;
	uint64_t first = off >> ZC_PAGE_SHIFT, last = (off + len - 1) >> ZC_PAGE_SHIFT;
	unsigned n = (unsigned)(last - first + 1);
	uint64_t set = stripes_of(first, last);
	uint32_t at = 0;
	int rc = 0;

	lock_stripes(s, set);
	for (unsigned i = 0; i < n && !rc; i++) {
		rc = snapshot(c, first + i, i, &at);
		touch(s, first + i);
	}
	unlock_stripes(s, set);
	BUMP(c->st->reads, n);
	if (!rc)
		rc = fetch(c, 0, n);
	for (unsigned i = 0; i < n && !rc; i++) {
		uint64_t base = (first + i) << ZC_PAGE_SHIFT;
		uint64_t lo = off > base ? off - base : 0;
		uint64_t hi = off + len < base + ZC_PAGE_SIZE ? off + len - base : ZC_PAGE_SIZE;
		uint8_t *dst = out + (base + lo - off);

		if (lo == 0 && hi == ZC_PAGE_SIZE) {
			rc = materialise(c, i, dst);
		} else {
			rc = materialise(c, i, c->page);
			memcpy(dst, c->page + lo, hi - lo);
		}
	}
	release_snapshots(c, 0, n);
	if (rc) {
		BUMP(c->st->failed_reads, 1);
		return integrity_error(c);
	}
	return 0;
}

/* ---- write --------------------------------------------------------------------------------- */

static void drop_new(struct zc_ctx *c, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		free_entry(c, c->newe[i]);
}

/* Edge page p of a write/discard: merge bytes [lo, hi) (data, or zeros when NULL) into it
 * under its stripe lock and store it again; new entry in c->newe[i]. */
static int merge_edge(struct zc_ctx *c, uint64_t p, unsigned i, uint32_t lo, uint32_t hi,
		      const uint8_t *data)
{
	uint32_t at = 0;
	int rc = snapshot(c, p, i, &at);

	if (!rc)
		rc = fetch(c, i, i + 1);
	if (!rc)
		rc = materialise(c, i, c->page);
	release_snapshots(c, i, i + 1);
	if (rc) { /* as the model's _integrity_error: a failed read of the page */
		BUMP(c->st->failed_reads, 1);
		return integrity_error(c);
	}
	if (data)
		memcpy(c->page + lo, data, hi - lo);
	else
		memset(c->page + lo, 0, hi - lo);
	return encode_store(c, c->page, &c->newe[i], &c->newf[i]);
}

static void commit(struct zc_ctx *c, uint64_t first, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		uint64_t old = publish(c->s, first + i, c->newe[i], c->newf[i]);

		count_state(c, first + i, old, c->newe[i]);
		touch(c->s, first + i);
		c->snap[i] = old;
		CRASH_POINT("commit.page_published");
	}
}

/* One try of zc_store_write (its arguments checked): 0 or -errno, every page as it was. */
static int write_once(struct zc_ctx *c, uint64_t off, uint32_t len, const uint8_t *data)
{
	struct zc_store *s = c->s;
	uint64_t first = off >> ZC_PAGE_SHIFT, last = (off + len - 1) >> ZC_PAGE_SHIFT;
	unsigned n = (unsigned)(last - first + 1), i;
	uint32_t head = (uint32_t)(off & (ZC_PAGE_SIZE - 1));
	uint32_t tail = (uint32_t)((off + len) & (ZC_PAGE_SIZE - 1));
	int head_edge = head != 0 || (n == 1 && tail != 0), tail_edge = n > 1 && tail != 0;
	uint64_t set = stripes_of(first, last);
	int rc = 0;

	/* Whole pages: encoded and stored outside any lock. */
	for (i = 0; i < n && !rc; i++) {
		if ((i == 0 && head_edge) || (i == n - 1 && tail_edge)) {
			c->newe[i] = 0;
			c->newf[i] = 0;
			continue;
		}
		rc = encode_store(c, data + ((first + i) << ZC_PAGE_SHIFT) - off, &c->newe[i],
				  &c->newf[i]);
	}
	if (rc) {
		drop_new(c, i - 1);
		goto fail;
	}
	lock_stripes(s, set);
	if (head_edge) {
		uint32_t hi = n == 1 && tail ? tail : ZC_PAGE_SIZE;

		rc = merge_edge(c, first, 0, head, hi, data);
	}
	if (!rc && tail_edge)
		rc = merge_edge(c, last, n - 1, 0, tail, data + (last << ZC_PAGE_SHIFT) - off);
	if (rc) {
		unlock_stripes(s, set);
		drop_new(c, n);
		goto fail;
	}
	commit(c, first, n);
	unlock_stripes(s, set);
	CRASH_POINT("write.before_old_freed");
	for (i = 0; i < n; i++)
		free_entry(c, c->snap[i]);
	BUMP(c->st->writes, n);
	return 0;
fail:
	return rc;
}

static int make_room(struct zc_ctx *c);

int zc_store_write(struct zc_ctx *c, uint64_t off, uint32_t len, const uint8_t *data)
{
	struct zc_store *s = c->s;
	int rc;

	if (len == 0)
		return 0;
	if (len > ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE)
		return -EINVAL;
	if (off >= s->cfg.size || len > s->cfg.size - off)
		return -EFBIG;
	rc = write_once(c, off, len, data);
	/* WRITEBACK: at the limit, write cold pages back to make room (direct reclaim), no lock
	 * held; a request needs at most ZC_MAX_SPAN pool pages' worth of room. */
	for (unsigned tries = 0; rc == -ENOSPC && s->bk.fd >= 0 && tries < ZC_WB_DIRECT_TRIES;
	     tries++) {
		if (make_room(c))
			break;
		rc = write_once(c, off, len, data);
	}
	if (rc)
		BUMP(c->st->failed_writes, 1);
	return rc;
}

/* ---- discard ------------------------------------------------------------------------------- */

/* Empty whole pages lo..hi-1 (at most ZC_CLEAR_RUN) under their stripes, then free them. */
static void clear_run(struct zc_ctx *c, uint64_t lo, uint64_t hi)
{
	struct zc_store *s = c->s;
	uint64_t set = stripes_of(lo, hi - 1);
	unsigned n = 0;

	lock_stripes(s, set);
	for (uint64_t p = lo; p < hi; p++) {
		uint64_t e = RLOAD(s->pte[p]);

		if (!e)
			continue;
		publish(s, p, 0, 0);
		count_state(c, p, e, 0);
		c->olde[n++] = e;
	}
	unlock_stripes(s, set);
	CRASH_POINT("discard.before_old_freed");
	for (unsigned i = 0; i < n; i++)
		free_entry(c, c->olde[i]);
}

static int is_zero_entry(struct zc_store *s, uint64_t p)
{
	uint64_t e = RLOAD(s->pte[p]);

	return e == 0 || (PTE_STATE(e) == ZC_SAME && (uint32_t)e == 0 && fill_of(s, p, e) == 0);
}

/* Zero the partial edge pages of a discard of [off, end): both under their stripe locks at
 * once, so a failure (ENOSPC re-storing one) leaves both as they were (S2).  0 or -errno. */
static int zero_edges(struct zc_ctx *c, uint64_t off, uint64_t end, uint64_t full_lo,
		      uint64_t full_hi)
{
	struct zc_store *s = c->s;
	uint64_t first = off >> ZC_PAGE_SHIFT, last = (end - 1) >> ZC_PAGE_SHIFT;
	uint64_t edge[2];
	unsigned n = 0;
	int rc = 0;

	if (!(full_lo <= first && first < full_hi))
		edge[n++] = first;
	if (last != first && !(full_lo <= last && last < full_hi))
		edge[n++] = last;
	if (!n)
		return 0;
	uint64_t set = stripes_of(edge[0], edge[0]) | stripes_of(edge[n - 1], edge[n - 1]);

	lock_stripes(s, set);
	unsigned k = 0;
	uint64_t pages[2];

	for (unsigned i = 0; i < n && !rc; i++) {
		uint64_t base = edge[i] << ZC_PAGE_SHIFT;
		uint64_t lo = off > base ? off - base : 0;
		uint64_t hi = end < base + ZC_PAGE_SIZE ? end - base : ZC_PAGE_SIZE;

		if (is_zero_entry(s, edge[i]))
			continue;
		rc = merge_edge(c, edge[i], k, (uint32_t)lo, (uint32_t)hi, NULL);
		if (!rc)
			pages[k++] = edge[i];
	}
	if (rc) {
		unlock_stripes(s, set);
		drop_new(c, k);
		return rc;
	}
	for (unsigned i = 0; i < k; i++) {
		uint64_t old = publish(s, pages[i], c->newe[i], c->newf[i]);

		count_state(c, pages[i], old, c->newe[i]);
		touch(s, pages[i]);
		c->snap[i] = old;
	}
	unlock_stripes(s, set);
	for (unsigned i = 0; i < k; i++)
		free_entry(c, c->snap[i]);
	return 0;
}

int zc_store_discard(struct zc_ctx *c, uint64_t off, uint64_t len)
{
	struct zc_store *s = c->s;

	if (len == 0)
		return 0;
	if (off >= s->cfg.size || len > s->cfg.size - off)
		return -EINVAL;
	uint64_t end = off + len;
	uint64_t full_lo = (off + ZC_PAGE_SIZE - 1) >> ZC_PAGE_SHIFT, full_hi = end >> ZC_PAGE_SHIFT;
	int rc = zero_edges(c, off, end, full_lo, full_hi);

	if (rc) /* counted as the model does: a corrupt edge in checksum_errors/failed_reads */
		return rc;
	for (uint64_t p = full_lo; p < full_hi; p += ZC_CLEAR_RUN)
		clear_run(c, p, p + ZC_CLEAR_RUN < full_hi ? p + ZC_CLEAR_RUN : full_hi);
	if (full_hi > full_lo)
		BUMP(c->st->discards, full_hi - full_lo);
	return 0;
}

/* ---- writeback (WRITEBACK) ------------------------------------------------------------- */

/* Is entry e of page p one to write back now (an object in the pool, idle >= idle ticks)? */
static int wb_candidate(struct zc_store *s, uint64_t p, uint64_t e, unsigned idle)
{
	if (!pool_object(e) || e == ZC_POISON)
		return 0;
	return idle_ticks_of(s, RLOAD(s->age[p])) >= idle;
}

/* A BACKED entry: class cls, len bytes at byte pos (even) of their segment, the block in fill
 * word sel, the page's checksum csum. */
static uint64_t pte_backed(unsigned cls, uint32_t pos, uint32_t len, unsigned sel, uint32_t csum)
{
	return (uint64_t)ZC_HUGE << ST_SHIFT | PTE_BACKED | (uint64_t)cls << 56 |
	       (uint64_t)(len - 1u) << 44 | (uint64_t)sel << 43 |
	       (uint64_t)(pos % ZC_BK_BLOCK / 2u) << 32 | csum;
}

/* The BACKED entry for pool entry e once its len bytes are at byte pos of their segment. */
static uint64_t backed_entry(struct zc_store *s, uint64_t e, uint32_t pos, uint32_t len)
{
	unsigned cls = PTE_STATE(e) == ZC_HUGE ? BK_RAW : 0u;

	if (PTE_IS_COLD(e))
		cls = BK_COLD + cold_dict_of(s, e);
	return pte_backed(cls, pos, len, 0, PTE_CSUM(e));
}

/* WRITEBACK 1: copy candidates from the hand on into the open segment's buffer, each under
 * its stripe lock, until the segment, max_bytes or ZC_WB_MAX_OBJECTS is reached or the hand
 * went round once.  Returns how many; *bytes gets the bytes used. */
static unsigned wb_gather(struct zc_ctx *c, uint64_t max_bytes, unsigned idle, uint32_t *bytes,
			  struct zc_writeback_report *r)
{
	struct zc_store *s = c->s;
	uint64_t cap = max_bytes < ZC_SEG_BYTES ? max_bytes : ZC_SEG_BYTES;
	uint32_t pos = 0;
	unsigned n = 0;

	for (uint64_t k = 0; k < s->npages && n < ZC_WB_MAX_OBJECTS && pos < cap; k++) {
		uint64_t p = s->wb_hand, set = stripes_of(p, p), e;
		uint32_t len = 0;
		int got = 0;

		r->scanned++;
		if (!wb_candidate(s, p, RLOAD(s->pte[p]), idle)) {
			s->wb_hand = (p + 1) % s->npages;
			continue;
		}
		lock_stripes(s, set);
		e = RLOAD(s->pte[p]);
		if (wb_candidate(s, p, e, idle))
			len = xcf_size(s->pool, PTE_HANDLE(e));
		if (len && pos + len > ZC_SEG_BYTES) { /* full: this page starts the next batch */
			unlock_stripes(s, set);
			break;
		}
		if (len)
			got = xcf_read(s->pool, PTE_HANDLE(e), s->bk.wbuf + pos);
		unlock_stripes(s, set);
		s->wb_hand = (p + 1) % s->npages;
		if (got <= 0 || (uint32_t)got != len)
			continue;
		s->wb_page[n] = p;
		s->wb_old[n] = e;
		s->wb_pos[n] = pos;
		s->wb_len[n] = len;
		n++;
		pos += len + (len & 1u); /* objects start at even bytes (BK_OFF) */
	}
	*bytes = pos < ZC_SEG_BYTES ? pos : ZC_SEG_BYTES;
	return n;
}

/* WRITEBACK 4 (compaction of the file): with the open segment the last free one, copy the
 * live objects of the emptiest segments (at least two, that fit in one) into it.  Returns how
 * many objects; their pages, old entries and blocks are recorded as wb_gather's are. */
static unsigned wb_relocate(struct zc_ctx *c, uint32_t *bytes)
{
	struct zc_store *s = c->s;
	uint32_t victims[ZC_BK_MAX_VICTIMS];
	unsigned nv = zc_backing_victims(&s->bk, victims, ZC_BK_MAX_VICTIMS), n = 0;
	uint32_t pos = 0;

	for (unsigned v = 0; v < nv && n < ZC_WB_MAX_OBJECTS; v++) {
		uint64_t first = zc_seg_block(victims[v]);

		if (zc_backing_read(&s->bk, first, ZC_SEG_BLOCKS, s->bk.rbuf)) { /* B1: it is stable */
			BUMP(c->st->bk_read_errors, 1);
			continue;
		}
		for (uint64_t p = 0; p < s->npages && n < ZC_WB_MAX_OBJECTS; p++) {
			uint64_t set = stripes_of(p, p), e;
			uint32_t block = 0;

			if (!PTE_IS_BACKED(RLOAD(s->pte[p])))
				continue;
			lock_stripes(s, set);
			e = RLOAD(s->pte[p]);
			if (PTE_IS_BACKED(e))
				block = backed_block(s, p, e);
			unlock_stripes(s, set);
			if (!block || zc_block_seg(block) != victims[v] || pos + BK_LEN(e) > ZC_SEG_BYTES)
				continue;
			memcpy(s->bk.wbuf + pos,
			       s->bk.rbuf + (block - first) * ZC_BK_BLOCK + BK_OFF(e), BK_LEN(e));
			s->wb_page[n] = p;
			s->wb_old[n] = e;
			s->wb_oldblock[n] = block;
			s->wb_pos[n] = pos;
			s->wb_len[n] = BK_LEN(e);
			n++;
			pos += BK_LEN(e) + (BK_LEN(e) & 1u);
		}
	}
	*bytes = pos < ZC_SEG_BYTES ? pos : ZC_SEG_BYTES;
	return n;
}

/* WRITEBACK 3: point every gathered (or relocated) page still holding what was copied at its
 * place in segment seg (S5's rule: a write or discard in between wins), then free its pool
 * object (none for a relocated one: its old place is free once its segment's live is 0). */
static void wb_publish(struct zc_ctx *c, unsigned n, uint32_t seg, int moved,
		       struct zc_writeback_report *r)
{
	struct zc_store *s = c->s;

	for (unsigned i = 0; i < n; i++) {
		uint64_t p = s->wb_page[i], e = s->wb_old[i], set = stripes_of(p, p);
		uint32_t block = (uint32_t)(zc_seg_block(seg) + s->wb_pos[i] / ZC_BK_BLOCK);
		uint64_t ne = moved ? pte_backed(BK_CLS(e), s->wb_pos[i], s->wb_len[i],
						 BK_SEL(e) ^ 1u, PTE_CSUM(e))
				    : backed_entry(s, e, s->wb_pos[i], s->wb_len[i]);
		int done = 0;

		lock_stripes(s, set);
		if (RLOAD(s->pte[p]) == e && (!moved || backed_block(s, p, e) == s->wb_oldblock[i])) {
			publish(s, p, ne, block);
			count_state(c, p, e, ne);
			done = 1;
		}
		unlock_stripes(s, set);
		if (!done) {
			r->raced++;
		} else if (moved) {
			r->relocated++;
		} else {
			free_entry(c, e);
			r->pages++;
			r->bytes += s->wb_len[i];
		}
	}
}

int zc_store_writeback(struct zc_ctx *c, uint64_t max_bytes, unsigned idle_ticks,
		       struct zc_writeback_report *r)
{
	struct zc_store *s = c->s;
	uint32_t bytes = 0;
	int rc = 0;

	memset(r, 0, sizeof(*r));
	if (s->bk.fd < 0)
		return -ENODEV;
	if (idle_ticks > AGE_MAX_IDLE || max_bytes == 0)
		return -EINVAL;
	pthread_mutex_lock(&s->wb_lock);
	int64_t seg = zc_backing_take(&s->bk);

	if (seg < 0) {
		BUMP(c->st->wb_full, 1);
		pthread_mutex_unlock(&s->wb_lock);
		return -ENOSPC;
	}
	/* The last free segment is kept to compact the file into (WRITEBACK 4): the file holds
	 * new pages in all its segments but one. */
	int moved = zc_backing_free(&s->bk) == 0;
	unsigned n = moved ? wb_relocate(c, &bytes) : wb_gather(c, max_bytes, idle_ticks, &bytes, r);

	if (moved && !n) {
		BUMP(c->st->wb_full, 1);
		rc = -ENOSPC;
	} else if (n) {
		memset(s->bk.wbuf + bytes, 0, (ZC_BK_BLOCK - bytes % ZC_BK_BLOCK) % ZC_BK_BLOCK);
		rc = zc_backing_write(&s->bk, bytes); /* WRITEBACK 2 */
		if (rc) {
			BUMP(c->st->wb_errors, 1);
			rc = -EIO; /* the pages stay in the pool: nothing was published */
		} else {
			BUMP(c->st->wb_writes, 1);
			wb_publish(c, n, (uint32_t)seg, moved, r);
			r->segments = 1;
		}
	}
	zc_backing_put(&s->bk);
	pthread_mutex_unlock(&s->wb_lock);
	BUMP(c->st->wb_pages, r->pages);
	BUMP(c->st->wb_bytes, r->bytes);
	BUMP(c->st->wb_moved, r->relocated);
	return rc;
}

/* Direct reclaim (a write at the limit): one batch of idle pages, else of any, then a bounded
 * compaction to turn the freed object bytes into free pool pages.  0, or -errno. */
static int make_room(struct zc_ctx *c)
{
	struct zc_writeback_report r;
	int rc;

	BUMP(c->st->wb_direct, 1);
	do /* a batch that compacted the file made room in it for the next */
		rc = zc_store_writeback(c, ZC_SEG_BYTES, 1, &r);
	while (!rc && r.relocated && !r.pages);
	if (!rc && !r.pages)
		rc = zc_store_writeback(c, ZC_SEG_BYTES, 0, &r);
	if (rc || !r.pages)
		return rc ? rc : -ENOSPC;
	xcf_compact(c->s->pool, ZC_WB_COMPACT_MOVES);
	return 0;
}

/* Pages whose entry is BACKED now (a scan). */
static uint64_t count_backed(struct zc_store *s)
{
	uint64_t n = 0;

	for (uint64_t p = 0; p < s->npages; p++)
		n += PTE_IS_BACKED(RLOAD(s->pte[p]));
	return n;
}

int zc_store_set_backing(struct zc_store *s, int fd, uint64_t bytes)
{
	uint64_t id = s->hdr->bk_id, blocks = s->hdr->bk_blocks;

	if (s->bk.fd >= 0)
		return -EBUSY;
	if (!count_backed(s))
		id = 0; /* nothing in the old file is needed: this one starts anew */
	int rc = zc_backing_open(&s->bk, fd, bytes, &id, &blocks);

	if (rc)
		return rc;
	for (uint64_t p = 0; p < s->npages; p++) { /* B2, from the page table */
		uint64_t e = RLOAD(s->pte[p]);

		if (PTE_IS_BACKED(e))
			zc_backing_live(&s->bk, zc_block_seg(backed_block(s, p, e)), BK_LEN(e));
	}
	s->hdr->bk_blocks = blocks;
	STORE(s->hdr->bk_id, id);
	return 0;
}

/* ---- recompression ------------------------------------------------------------------------ */

void zc_store_tick(struct zc_store *s)
{
	__atomic_fetch_add(&s->hdr->epoch, 1u, __ATOMIC_RELAXED);
	pthread_mutex_lock(&s->dict_lock);
	dict_gc(s); /* the dictionaries no page uses any more (S6) */
	pthread_mutex_unlock(&s->dict_lock);
}

/* Is entry e, with age byte a, one to recompress now? */
static int recompress_candidate(struct zc_store *s, uint64_t p, uint64_t e, unsigned idle)
{
	uint8_t a = RLOAD(s->age[p]);

	if (!pool_object(e) || PTE_IS_COLD(e) || e == ZC_POISON)
		return 0;
	return idle_ticks_of(s, a) >= idle && !(a & AGE_TRIED);
}

/* Publish the cold entry ne for page p if p still holds e (S5); 1 if it did. */
static int replace_if_unchanged(struct zc_ctx *c, uint64_t p, uint64_t e, uint64_t ne)
{
	struct zc_store *s = c->s;
	uint64_t set = stripes_of(p, p);
	int done = 0;

	lock_stripes(s, set);
	if (RLOAD(s->pte[p]) == e) {
		publish(s, p, ne, 0);
		count_state(c, p, e, ne);
		done = 1;
	}
	unlock_stripes(s, set);
	return done;
}

/* Recompress page p, which held entry e: 0 (done), or why not (counted in *r). */
static void recompress_page(struct zc_ctx *c, uint64_t p, uint64_t e,
			    struct zc_recompress_report *r)
{
	struct zc_store *s = c->s;
	uint64_t set = stripes_of(p, p);
	uint8_t a = RLOAD(s->age[p]);
	uint32_t at = 0, len = 0, h;
	int rc;

	lock_stripes(s, set);
	rc = snapshot(c, p, 0, &at);
	unlock_stripes(s, set);
	if (!rc && c->snap[0] != e) {
		r->raced++;
		return;
	}
	if (!rc)
		rc = materialise(c, 0, c->page);
	release_snapshots(c, 0, 1);
	if (rc) {
		integrity_error(c);
		r->failed++;
		return;
	}
	uint32_t old_len = c->obj_len[0];

	if (zc_codec_encode_cold(&c->cold, c->page, c->enc, &len) || len >= old_len) {
		mark_tried(s, p, a);
		r->kept++;
		return;
	}
	if (xcf_store(s->pool, c->heap, c->enc, len, &h)) {
		r->failed++;
		return;
	}
	uint64_t ne = pte_object(ZC_COMPRESSED, h, PTE_CSUM(e)) | PTE_COLD;

	if (h > ZC_MAX_HANDLE || !replace_if_unchanged(c, p, e, ne)) {
		xcf_free(s->pool, c->heap, h);
		if (h > ZC_MAX_HANDLE)
			r->failed++;
		else
			r->raced++;
		return;
	}
	CRASH_POINT("recompress.before_old_freed");
	free_entry(c, e);
	BUMP(c->st->recompressed, 1);
	BUMP(c->st->saved_bytes, old_len - len);
	r->recompressed++;
	r->bytes_before += old_len;
	r->bytes_after += len;
}

/* The cold encoder for one zc_store_recompress call, with dictionary id (held) or none. */
static int open_encoder(struct zc_ctx *c, int level, unsigned id)
{
	struct zc_store *s = c->s;

	return zc_codec_cold_open(&c->cold, level, id, id ? dict_slot(s, id) : NULL,
				  id ? RLOAD(s->hdr->dict_len[id]) : 0);
}

uint64_t zc_store_recompress(struct zc_ctx *c, uint64_t start, uint64_t max_scan,
			     unsigned idle_ticks, int level, struct zc_recompress_report *r)
{
	struct zc_store *s = c->s;
	uint64_t end = start + max_scan < s->npages && max_scan ? start + max_scan : s->npages;

	memset(r, 0, sizeof(*r));
	if (idle_ticks < 1 || idle_ticks > AGE_MAX_IDLE || !zc_codec_level_ok(ZC_ZSTD, level))
		return UINT64_MAX;
	pthread_mutex_lock(&s->dict_lock);
	unsigned id = dict_of(s, RLOAD(s->hdr->dict_current)) ? RLOAD(s->hdr->dict_current) : 0;

	if (id)
		dict_hold(s, id); /* the current one for this call: it cannot be freed meanwhile */
	pthread_mutex_unlock(&s->dict_lock);
	for (uint64_t p = start; p < end; p++) {
		uint64_t e = RLOAD(s->pte[p]);

		r->scanned++;
		if (!recompress_candidate(s, p, e, idle_ticks))
			continue;
		r->candidates++;
		if (!c->cold.cold && open_encoder(c, level, id)) {
			r->failed++; /* ENOMEM: the pages stay candidates for the next pass */
			break;
		}
		recompress_page(c, p, e, r);
	}
	zc_codec_cold_close(&c->cold); /* an idle store holds no encoder */
	if (id)
		dict_release(s, id);
	r->dict = id;
	return end;
}

int zc_store_sample(struct zc_store *s, uint32_t pages, uint32_t stride)
{
	uint8_t *buf = NULL;

	if (pages > ZC_MAX_SAMPLES || stride < 1)
		return -EINVAL;
	if (pages && !(buf = malloc((size_t)pages * ZC_PAGE_SIZE)))
		return -ENOMEM;
	pthread_mutex_lock(&s->dict_lock);
	free(s->samples);
	s->samples = buf;
	s->sample_cap = pages;
	s->nsamples = 0;
	s->sample_stride = stride;
	__atomic_store_n(&s->sampling, pages ? 1u : 0u, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&s->dict_lock);
	return 0;
}

/* A free slot for a new dictionary (caller holds dict_lock), after freeing what S6 allows. */
static unsigned dict_free_slot(struct zc_store *s)
{
	dict_gc(s);
	for (unsigned id = 1; id < ZC_MAX_DICTS; id++)
		if (!RLOAD(s->hdr->dict_len[id]) && !s->dicts[id].ddict &&
		    !__atomic_load_n(&s->dict_holds[id], __ATOMIC_SEQ_CST))
			return id;
	return 0;
}

/* Make slot id live with bytes[0..len) and current (caller holds dict_lock); S6's order. */
static int dict_publish(struct zc_store *s, unsigned id, const uint8_t *bytes, uint32_t len,
			int level)
{
	uint8_t *slot = dict_slot(s, id);

	memcpy(slot, bytes, len);
	int rc = zc_dict_make(&s->dicts[id], slot, len);

	if (rc)
		return rc;
	s->hdr->dict_level[id] = level;
	STORE(s->hdr->dict_len[id], len);
	STORE(s->hdr->dict_current, id);
	return 0;
}

int zc_store_train_dict(struct zc_store *s, uint32_t dict_bytes, int level, unsigned *id)
{
	*id = 0;
	if (dict_bytes < 1024 || dict_bytes > ZC_DICT_MAX)
		return -EINVAL;
	pthread_mutex_lock(&s->dict_lock);
	uint8_t *samples = s->samples;
	uint32_t n = s->nsamples;

	if (n < ZC_MIN_SAMPLES) { /* the reservoir (if any) fills on */
		pthread_mutex_unlock(&s->dict_lock);
		return -EAGAIN;
	}
	s->samples = NULL; /* the reservoir is this call's now; writers see it gone */
	s->sample_cap = s->nsamples = 0;
	__atomic_store_n(&s->sampling, 0, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&s->dict_lock);
	uint8_t *dict = malloc(dict_bytes);
	uint32_t len = 0;
	int rc = dict ? zc_dict_train(samples, n, dict, dict_bytes, &len) : -ENOMEM;

	free(samples);
	if (!rc) {
		pthread_mutex_lock(&s->dict_lock);
		unsigned slot = dict_free_slot(s);

		rc = slot ? dict_publish(s, slot, dict, len, level) : -ENOSPC;
		if (!rc) {
			*id = slot;
			s->dict_trained++;
		}
		pthread_mutex_unlock(&s->dict_lock);
	}
	free(dict);
	return rc;
}

int zc_store_set_dict(struct zc_store *s, const uint8_t *bytes, uint32_t len, int level,
		      unsigned *id)
{
	*id = 0;
	if (len == 0 || len > ZC_DICT_MAX)
		return -EINVAL;
	pthread_mutex_lock(&s->dict_lock);
	unsigned slot = dict_free_slot(s);
	int rc = slot ? dict_publish(s, slot, bytes, len, level) : -ENOSPC;

	if (!rc)
		*id = slot;
	pthread_mutex_unlock(&s->dict_lock);
	return rc;
}

/* ---- scrub and test hooks ------------------------------------------------------------------ */

uint64_t zc_store_scrub(struct zc_ctx *c, uint64_t *bad, uint64_t *pages, uint64_t max_pages)
{
	struct zc_store *s = c->s;
	uint64_t checked = 0;

	*bad = 0;
	for (uint64_t p = 0; p < s->npages; p++) {
		uint64_t set = stripes_of(p, p);
		uint32_t at = 0;
		int rc;

		if (PTE_STATE(RLOAD(s->pte[p])) < ZC_COMPRESSED)
			continue;
		lock_stripes(s, set);
		rc = snapshot(c, p, 0, &at);
		unlock_stripes(s, set);
		if (!rc && PTE_STATE(c->snap[0]) < ZC_COMPRESSED)
			continue;
		if (!rc)
			rc = fetch(c, 0, 1);
		if (!rc)
			rc = materialise(c, 0, c->page);
		release_snapshots(c, 0, 1);
		checked++;
		if (rc) {
			if (*bad < max_pages)
				pages[*bad] = p;
			(*bad)++;
			integrity_error(c);
		}
	}
	return checked;
}

int zc_store_corrupt(struct zc_store *s, uint64_t page)
{
	if (page >= s->npages)
		return -ENOENT;
	uint64_t set = stripes_of(page, page);
	int rc = -ENOENT;

	lock_stripes(s, set);
	uint64_t e = RLOAD(s->pte[page]);

	if (PTE_IS_BACKED(e))
		rc = zc_backing_corrupt(&s->bk, (uint64_t)backed_block(s, page, e) * ZC_BK_BLOCK +
						    BK_OFF(e));
	else if (PTE_STATE(e) >= ZC_COMPRESSED)
		rc = xcf_corrupt(s->pool, PTE_HANDLE(e));
	unlock_stripes(s, set);
	return rc;
}

/* ---- statistics ---------------------------------------------------------------------------- */

static void add_counters(struct zc_ctx_stats *sum, const struct zc_ctx_stats *x)
{
	sum->reads += RLOAD(x->reads);
	sum->writes += RLOAD(x->writes);
	sum->discards += RLOAD(x->discards);
	sum->failed_reads += RLOAD(x->failed_reads);
	sum->failed_writes += RLOAD(x->failed_writes);
	sum->checksum_errors += RLOAD(x->checksum_errors);
	for (unsigned k = 0; k < 5; k++)
		sum->by_state[k] += RLOAD(x->by_state[k]);
	sum->backed_bytes += RLOAD(x->backed_bytes);
	sum->wb_pages += RLOAD(x->wb_pages);
	sum->wb_bytes += RLOAD(x->wb_bytes);
	sum->wb_writes += RLOAD(x->wb_writes);
	sum->wb_errors += RLOAD(x->wb_errors);
	sum->wb_direct += RLOAD(x->wb_direct);
	sum->wb_full += RLOAD(x->wb_full);
	sum->wb_moved += RLOAD(x->wb_moved);
	sum->bk_reads += RLOAD(x->bk_reads);
	sum->bk_read_pages += RLOAD(x->bk_read_pages);
	sum->bk_read_ns += RLOAD(x->bk_read_ns);
	sum->bk_read_errors += RLOAD(x->bk_read_errors);
	for (unsigned k = 0; k < ZC_BK_HIST; k++)
		sum->bk_hist[k] += RLOAD(x->bk_hist[k]);
	sum->cold_pages += RLOAD(x->cold_pages);
	sum->cold_bytes += RLOAD(x->cold_bytes);
	sum->recompressed += RLOAD(x->recompressed);
	sum->saved_bytes += RLOAD(x->saved_bytes);
}

void zc_store_stats(struct zc_store *s, struct zc_store_stats *out)
{
	struct zc_ctx_stats sum;
	struct xcf_stats x;

	memset(&sum, 0, sizeof(sum));
	pthread_mutex_lock(&s->ctx_lock);
	for (unsigned i = 0; i < ZC_MAX_CTX; i++)
		if (i == 0 || RLOAD(s->cstats[i].used))
			add_counters(&sum, &s->cstats[i]);
	pthread_mutex_unlock(&s->ctx_lock);
	xcf_stats(s->pool, &x);
	memset(out, 0, sizeof(*out));
	out->pages_stored = sum.by_state[ZC_SAME] + sum.by_state[ZC_COMPRESSED] +
			    sum.by_state[ZC_HUGE] + sum.by_state[SLOT_BACKED];
	out->orig_data_size = out->pages_stored * ZC_PAGE_SIZE;
	out->compr_data_size = x.requested_bytes;
	out->mem_used_total = x.pool_pages * ZC_PAGE_SIZE;
	out->mem_limit = s->cfg.mem_limit;
	out->mem_used_max = x.pool_pages_max * ZC_PAGE_SIZE;
	out->same_pages = sum.by_state[ZC_SAME];
	out->pages_compacted = x.pages_compacted;
	out->huge_pages = sum.by_state[ZC_HUGE];
	out->failed_reads = sum.failed_reads;
	out->failed_writes = sum.failed_writes;
	out->checksum_errors = sum.checksum_errors;
	out->reads = sum.reads;
	out->writes = sum.writes;
	out->discards = sum.discards;
	out->npages = s->npages;
	out->table_bytes = s->npages * 17;
	out->objects = x.objects;
	out->metadata_bytes = x.metadata_bytes + out->table_bytes + ZC_PAGE_SIZE +
			      ZC_MAX_CTX * sizeof(struct zc_ctx_stats);
	out->arena_bytes = s->arena.size;
	out->vpages_to_global = x.vpages_to_global;
	out->recoveries = RLOAD(s->hdr->recoveries);
	out->lost_pages = RLOAD(s->hdr->lost_pages);
	out->cold_pages = sum.cold_pages;
	out->cold_bytes = sum.cold_bytes;
	out->recompressed = sum.recompressed;
	out->recompress_saved_bytes = sum.saved_bytes;
	out->epoch = RLOAD(s->hdr->epoch);
	out->backed_pages = sum.by_state[SLOT_BACKED];
	out->backed_bytes = sum.backed_bytes;
	if (s->bk.fd >= 0) {
		out->backing_bytes = (uint64_t)s->bk.nsegs * ZC_SEG_BYTES;
		out->backing_used_bytes = (uint64_t)zc_backing_used(&s->bk) * ZC_SEG_BYTES;
	}
	out->writeback_pages = sum.wb_pages;
	out->writeback_bytes = sum.wb_bytes;
	out->writeback_writes = sum.wb_writes;
	out->writeback_errors = sum.wb_errors;
	out->writeback_direct = sum.wb_direct;
	out->writeback_full = sum.wb_full;
	out->writeback_relocated = sum.wb_moved;
	out->backing_reads = sum.bk_reads;
	out->backing_read_pages = sum.bk_read_pages;
	out->backing_read_ns = sum.bk_read_ns;
	out->backing_read_errors = sum.bk_read_errors;
	for (unsigned k = 0; k < ZC_BK_HIST; k++)
		out->backing_read_hist[k] = sum.bk_hist[k];
	pthread_mutex_lock(&s->dict_lock);
	for (unsigned id = 1; id < ZC_MAX_DICTS; id++) {
		uint32_t len = RLOAD(s->hdr->dict_len[id]);

		if (!len)
			continue;
		out->dicts++;
		out->dict_bytes += len;
		out->dict_memory += zc_dict_memory(&s->dicts[id]);
	}
	out->dict_current = RLOAD(s->hdr->dict_current);
	out->dicts_trained = s->dict_trained;
	out->samples = s->nsamples;
	out->sample_cap = s->sample_cap;
	out->sample_memory = s->samples ? (uint64_t)s->sample_cap * ZC_PAGE_SIZE : 0;
	pthread_mutex_unlock(&s->dict_lock);
	out->metadata_bytes += align4k(out->dict_bytes) + out->dict_memory + out->sample_memory;
}

unsigned zc_store_fragmentation(struct zc_store *s, struct xcf_class_usage *out, unsigned n)
{
	return xcf_fragmentation(s->pool, out, n);
}

int zc_store_check(struct zc_store *s)
{
	return xcf_check(s->pool);
}

uint64_t zc_store_compact(struct zc_store *s, uint64_t max_moves)
{
	return xcf_compact(s->pool, max_moves);
}

uint64_t zc_store_reclaimable_bytes(struct zc_store *s)
{
	return xcf_reclaimable_bytes(s->pool);
}

/* ---- contexts ------------------------------------------------------------------------------ */

struct zc_ctx *zc_ctx_new(struct zc_store *s, int heap)
{
	struct zc_ctx *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->s = s;
	c->heap = heap < 1 ? 1 : 1 + (heap - 1) % s->cfg.heaps;
	c->scratch = malloc((size_t)ZC_MAX_SPAN * ZC_PAGE_SIZE);
	if (posix_memalign((void **)&c->bio, ZC_BK_BLOCK, (size_t)BIO_BLOCKS * ZC_BK_BLOCK))
		c->bio = NULL;
	if (!c->scratch || !c->bio ||
	    zc_codec_init(&c->codec, s->cfg.compressor, s->cfg.level, s->cfg.huge_threshold) ||
	    zc_codec_init_cold(&c->cold)) {
		zc_codec_fini(&c->codec);
		free(c->scratch);
		free(c->bio);
		free(c);
		return NULL;
	}
	c->slot = -1;
	pthread_mutex_lock(&s->ctx_lock);
	for (unsigned i = 1; i < ZC_MAX_CTX; i++)
		if (!s->cstats[i].used) {
			c->slot = (int)i;
			memset(&s->cstats[i], 0, sizeof(s->cstats[i]));
			STORE(s->cstats[i].used, 1);
			break;
		}
	pthread_mutex_unlock(&s->ctx_lock);
	if (c->slot < 0) {
		zc_ctx_free(c);
		return NULL;
	}
	c->st = &s->cstats[c->slot];
	return c;
}

void zc_ctx_free(struct zc_ctx *c)
{
	if (!c)
		return;
	struct zc_store *s = c->s;

	if (c->slot >= 0) {
		pthread_mutex_lock(&s->ctx_lock);
		add_counters(&s->cstats[0], c->st);
		STORE(c->st->used, 0);
		pthread_mutex_unlock(&s->ctx_lock);
	}
	zc_codec_fini(&c->codec);
	zc_codec_fini(&c->cold);
	free(c->scratch);
	free(c->bio);
	free(c);
}

/* ---- opening ------------------------------------------------------------------------------- */

static int check_config(const struct zc_store_config *cfg)
{
	struct zc_codec probe;

	if (cfg->size == 0 || cfg->size % ZC_PAGE_SIZE || cfg->heaps < 1 ||
	    cfg->heaps > XCF_MAX_HEAPS || (cfg->size >> ZC_PAGE_SHIFT) > ZC_MAX_DEVICE_PAGES)
		return -EINVAL;
	int rc = zc_codec_init(&probe, cfg->compressor, cfg->level, cfg->huge_threshold);

	zc_codec_fini(&probe);
	return rc;
}

static void geometry(const struct zc_store_config *cfg, struct xcf_geometry *g)
{
	uint64_t npages = cfg->size >> ZC_PAGE_SHIFT;
	uint64_t pool = npages + npages / 4 + 256; /* room for fragmentation before compaction */
	uint64_t limit = cfg->mem_limit / ZC_PAGE_SIZE;

	if (limit && limit < pool)
		pool = limit;
	g->pool_pages = pool ? pool : 1;
	g->heaps = cfg->heaps;
	g->max_handles = npages + (uint64_t)(cfg->heaps + 1) * (2 * ZC_MAX_REQ_PAGES + 128) + 4096;
	g->max_vpages = (g->pool_pages < g->max_handles ? g->pool_pages : g->max_handles) + 2;
}

static void write_header(struct zc_store *s, const struct xcf_geometry *g)
{
	struct zc_hdr *h = s->hdr;

	memcpy(h->magic, ZC_MAGIC, 8);
	h->version = ZC_ARENA_VERSION;
	h->hdr_bytes = sizeof(*h);
	h->arena_bytes = s->arena.size;
	h->size = s->cfg.size;
	h->npages = s->npages;
	h->compressor = s->cfg.compressor;
	h->level = s->cfg.level;
	h->huge_threshold = s->cfg.huge_threshold;
	h->heaps = s->cfg.heaps;
	h->mem_limit = s->cfg.mem_limit;
	h->pool_pages = g->pool_pages;
	h->max_handles = g->max_handles;
	h->max_vpages = g->max_vpages;
}

struct layout {
	uint64_t pte, fill, age, dict, ctx, xcf, end;
};

static void layout_of(uint64_t npages, const struct xcf_geometry *g, struct layout *l)
{
	l->pte = ZC_PAGE_SIZE;
	l->fill = l->pte + align4k(npages * 8);
	l->age = l->fill + align4k(npages * 8);
	l->dict = l->age + align4k(npages);
	l->ctx = l->dict + (uint64_t)ZC_MAX_DICTS * ZC_DICT_MAX;
	l->xcf = l->ctx + align4k(ZC_MAX_CTX * sizeof(struct zc_ctx_stats));
	l->end = l->xcf + xcf_arena_bytes(g);
}

/* The process-side parts of a store over s->arena: pointers, locks. */
static void store_bind(struct zc_store *s, const struct layout *l)
{
	s->hdr = ZC_ARENA_AT(&s->arena, 0, struct zc_hdr);
	s->pte = ZC_ARENA_AT(&s->arena, l->pte, uint64_t);
	s->fill = ZC_ARENA_AT(&s->arena, l->fill, uint32_t);
	s->age = ZC_ARENA_AT(&s->arena, l->age, uint8_t);
	s->dict_bytes = ZC_ARENA_AT(&s->arena, l->dict, uint8_t);
	s->cstats = ZC_ARENA_AT(&s->arena, l->ctx, struct zc_ctx_stats);
	for (unsigned i = 0; i < ZC_NSTRIPES; i++)
		pthread_mutex_init(&s->stripes[i], NULL);
	pthread_mutex_init(&s->ctx_lock, NULL);
	pthread_mutex_init(&s->dict_lock, NULL);
	pthread_mutex_init(&s->wb_lock, NULL);
	s->bk.fd = -1;
	s->bk.open = -1;
}

static void store_free(struct zc_store *s)
{
	xcf_destroy(s->pool);
	zc_arena_destroy(&s->arena);
	for (unsigned i = 0; i < ZC_NSTRIPES; i++)
		pthread_mutex_destroy(&s->stripes[i]);
	pthread_mutex_destroy(&s->ctx_lock);
	pthread_mutex_destroy(&s->dict_lock);
	pthread_mutex_destroy(&s->wb_lock);
	zc_backing_close(&s->bk);
	for (unsigned id = 0; id < ZC_MAX_DICTS; id++)
		zc_dict_free(&s->dicts[id]);
	free(s->samples);
	free(s);
}

struct zc_store *zc_store_open(const struct zc_store_config *cfg, int *err)
{
	struct xcf_geometry g;
	struct layout l;
	int rc = check_config(cfg);

	*err = rc;
	if (rc)
		return NULL;
	struct zc_store *s = calloc(1, sizeof(*s));

	*err = -ENOMEM;
	if (!s)
		return NULL;
	s->cfg = *cfg;
	s->npages = cfg->size >> ZC_PAGE_SHIFT;
	s->arena.fd = -1;
	geometry(cfg, &g);
	layout_of(s->npages, &g, &l);
	rc = zc_arena_create(&s->arena, l.end, "zcached-arena");
	if (rc) {
		*err = rc;
		free(s);
		return NULL;
	}
	store_bind(s, &l);
	s->pool = xcf_create(&s->arena, l.xcf, &g,
			     cfg->mem_limit ? cfg->mem_limit / ZC_PAGE_SIZE : XCF_NO_LIMIT, err);
	if (!s->pool) {
		store_free(s);
		return NULL;
	}
	s->hdr->off_pte = l.pte;
	s->hdr->off_fill = l.fill;
	s->hdr->off_age = l.age;
	s->hdr->off_dict = l.dict;
	s->hdr->off_ctx = l.ctx;
	s->hdr->off_xcf = l.xcf;
	write_header(s, &g);
	*err = 0;
	return s;
}

/* ---- attaching (RECOVERY) ---------------------------------------------------------------- */

/* The configuration in the header, if this version would lay out exactly this arena for it. */
static int read_header(const struct zc_arena *a, struct zc_store_config *cfg, struct layout *l,
		       struct xcf_geometry *g)
{
	const struct zc_hdr *h = ZC_ARENA_AT(a, 0, const struct zc_hdr);

	if (a->size < ZC_PAGE_SIZE || memcmp(h->magic, ZC_MAGIC, 8) || h->version != ZC_ARENA_VERSION ||
	    h->hdr_bytes != sizeof(*h) || h->arena_bytes != a->size)
		return -EPROTO;
	memset(cfg, 0, sizeof(*cfg));
	cfg->size = h->size;
	cfg->compressor = h->compressor;
	cfg->level = h->level;
	cfg->huge_threshold = h->huge_threshold;
	cfg->heaps = h->heaps;
	cfg->mem_limit = h->mem_limit;
	if (check_config(cfg) || h->npages != cfg->size >> ZC_PAGE_SHIFT)
		return -EPROTO;
	geometry(cfg, g);
	layout_of(h->npages, g, l);
	if (l->end != a->size || h->off_pte != l->pte || h->off_fill != l->fill ||
	    h->off_age != l->age || h->off_dict != l->dict ||
	    h->off_ctx != l->ctx || h->off_xcf != l->xcf || h->pool_pages != g->pool_pages ||
	    h->max_handles != g->max_handles || h->max_vpages != g->max_vpages)
		return -EPROTO;
	return 0;
}

/* RECOVERY 2: offer every object entry to the allocator; poison those it refuses. */
static void claim_objects(struct zc_store *s, struct zc_recovery *rep)
{
	for (uint64_t p = 0; p < s->npages; p++) {
		uint64_t e = s->pte[p];
		unsigned st = PTE_STATE(e);

		if (e == 0)
			continue;
		rep->pages++;
		if (st < ZC_COMPRESSED || e == ZC_POISON)
			continue;
		if (PTE_IS_BACKED(e)) { /* in the backing file: its place must lie inside it */
			uint64_t b = s->fill[2 * p + BK_SEL(e)];

			if (b == 0 || b + (BK_OFF(e) + BK_LEN(e) > ZC_BK_BLOCK) >= s->hdr->bk_blocks) {
				STORE(s->pte[p], ZC_POISON);
				rep->lost_pages++;
			}
			continue;
		}
		if (xcf_recover_claim(s->pool, PTE_HANDLE(e)) == 0) {
			rep->objects++;
		} else {
			STORE(s->pte[p], ZC_POISON);
			rep->lost_pages++;
		}
	}
}

/* RECOVERY 4: slot 0 takes every dead context's counters; page counts come from the table. */
static void fold_counters(struct zc_store *s)
{
	struct zc_ctx_stats *sum = &s->cstats[0];

	for (unsigned i = 1; i < ZC_MAX_CTX; i++) {
		if (s->cstats[i].used)
			add_counters(sum, &s->cstats[i]);
		memset(&s->cstats[i], 0, sizeof(s->cstats[i]));
	}
	memset(sum->by_state, 0, sizeof(sum->by_state));
	sum->cold_pages = sum->cold_bytes = sum->backed_bytes = 0;
	for (uint64_t p = 0; p < s->npages; p++) {
		uint64_t e = s->pte[p];

		sum->by_state[slot_of(e)]++;
		dict_ref(s, e, 1);
		if (PTE_IS_COLD(e) && e != ZC_POISON) {
			sum->cold_pages++;
			sum->cold_bytes += xcf_size(s->pool, PTE_HANDLE(e));
		}
		if (PTE_IS_BACKED(e))
			sum->backed_bytes += BK_LEN(e);
	}
}

/* RECOVERY 5: digest every live dictionary slot; free those no entry names (S6).  A slot that
 * zstd refuses stays unusable: the pages made with it read as -EIO, never as other bytes. */
static void recover_dicts(struct zc_store *s)
{
	for (unsigned id = 1; id < ZC_MAX_DICTS; id++) {
		uint32_t len = s->hdr->dict_len[id];

		if (len > ZC_DICT_MAX)
			s->hdr->dict_len[id] = len = 0;
		if (len)
			zc_dict_make(&s->dicts[id], dict_slot(s, id), len);
	}
	if (s->hdr->dict_current >= ZC_MAX_DICTS || !s->hdr->dict_len[s->hdr->dict_current])
		s->hdr->dict_current = 0;
	pthread_mutex_lock(&s->dict_lock);
	dict_gc(s);
	pthread_mutex_unlock(&s->dict_lock);
}

struct zc_store *zc_store_attach(int fd, struct zc_recovery *rep, int *err)
{
	struct zc_recovery local;
	struct xcf_geometry g;
	struct layout l;
	uint64_t t0 = now_ns();
	uint64_t freed = 0;
	struct zc_store *s = calloc(1, sizeof(*s));

	if (!rep)
		rep = &local;
	memset(rep, 0, sizeof(*rep));
	*err = -ENOMEM;
	if (!s)
		return NULL;
	*err = zc_arena_attach(&s->arena, fd);
	if (*err) {
		free(s);
		return NULL;
	}
	*err = read_header(&s->arena, &s->cfg, &l, &g);
	if (*err) {
		zc_arena_destroy(&s->arena);
		free(s);
		return NULL;
	}
	s->npages = s->cfg.size >> ZC_PAGE_SHIFT;
	store_bind(s, &l);
	s->pool = xcf_attach(&s->arena, l.xcf, &g, err);
	if (!s->pool || (*err = xcf_recover_begin(s->pool)) != 0) {
		store_free(s);
		return NULL;
	}
	claim_objects(s, rep);
	xcf_recover_end(s->pool, &rep->orphans, &freed);
	rep->pages_freed = freed;
	fold_counters(s);
	recover_dicts(s);
	s->hdr->recoveries++;
	s->hdr->lost_pages += rep->lost_pages;
	rep->ns = now_ns() - t0;
	*err = 0;
	return s;
}

int zc_store_probe(int fd, uint32_t *version)
{
	static const size_t hdr_page = ZC_PAGE_SIZE;
	uint8_t *buf = calloc(1, hdr_page);
	struct zc_store_config cfg;
	struct xcf_geometry g;
	struct layout l;
	struct stat st;
	int rc = 0;

	*version = 0;
	if (!buf)
		return -ENOMEM;
	if (fstat(fd, &st) || pread(fd, buf, hdr_page, 0) != (ssize_t)hdr_page) {
		rc = errno ? -errno : -EPROTO;
	} else {
		const struct zc_hdr *h = (const struct zc_hdr *)(void *)buf;
		struct zc_arena a = {.fd = -1, .base = buf, .size = (uint64_t)st.st_size};

		if (!memcmp(h->magic, ZC_MAGIC, 8))
			*version = h->version;
		rc = read_header(&a, &cfg, &l, &g);
	}
	free(buf);
	return rc;
}

void zc_store_close(struct zc_store *s)
{
	if (s)
		store_free(s);
}

uint32_t *zc_store_front(struct zc_store *s)
{
	return s->hdr->front;
}

void zc_store_get_config(const struct zc_store *s, struct zc_store_config *out)
{
	*out = s->cfg;
}

int zc_store_memfd(const struct zc_store *s)
{
	return s->arena.fd;
}

uint64_t zc_store_size(const struct zc_store *s)
{
	return s->cfg.size;
}
