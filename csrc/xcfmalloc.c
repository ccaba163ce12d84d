/* xcfmalloc.c - zcached's compressed-object allocator, in a memfd arena (see xcfmalloc.h).
 *
 * Owns: the pool pages of the arena, the size classes, the vpages, the handle table, the
 * Hoard heaps and compaction.
 * Must not: know what an object holds (compression, checksums, page numbers belong to the
 * store), call malloc on the request path, or hold a lock across a system call other than
 * the page allocator's (a hole is punched only after the page left every list).
 *
 * The reference model is zcached/xcfmalloc.py; this file follows its design.  Differences, all
 * forced by living in a fixed arena addressed by offsets: one handle table for all classes
 * (not one per class), a bitmap of live slots per vpage (not a free list threaded through a
 * per-class array), and the back-reference from a slot to its handle kept in the object's
 * first XCF_HDR bytes (as mm/zsmalloc.c keeps the handle in the object header), except for the
 * raw class (objects of 4093..4096 bytes, one per single-page vpage), whose vpage holds it.
 *
 * SIZE CLASSES AND VPAGES
 *  A non-raw object of len bytes takes a slot of class (len + XCF_HDR - 1) / 16, whose slots
 *  are (class + 1) * 16 bytes.  A vpage of class c is ppv[c] 0-order pages (pfn[] holds their
 *  numbers; they need not be contiguous) with opv[c] slots laid end to end, so a slot of at
 *  most 4096 bytes crosses at most one 4K boundary.  ppv is the model's pages_per_vpage().
 *
 * HANDLES
 *  handle = index into the handle table, 1..max_handles-1 (0 is never a handle).  A live entry
 *  is the 64-bit word  vpage | slot << 32 | len << 48,  stored and loaded atomically; vpage is
 *  never 0 for a live entry.  A free entry holds  next_free << 32  (vpage 0).  Compaction moves
 *  an object by rewriting its entry: the handle never changes.
 *
 * INVARIANTS (xcf_check tests each)
 *  I1 a vpage's pfn[p] != NO_PFN iff some live slot overlaps page p: a page is taken when the
 *     first object overlapping it is stored and given back (punched) when the last one goes.
 *  I2 popcount(live) == inuse; a vpage with inuse == 0 does not exist (released at once).
 *  I3 a vpage is on exactly one group list: that of its heap and class, group
 *     inuse * 10 / opv, or XCF_NGROUPS - 1 when full.
 *  I4 every live slot's header names a handle whose entry names that slot.
 *  I5 the counters of each (class, heap) are the sums over its vpages.
 *
 * CRASH CONSISTENCY (the process may die at any instruction; xcf_recover_* rebuild)
 *  A handle entry is stored (release) only after its object's bytes and header are complete;
 *  a move stores the new entry after the copy, and clears the old slot after.  So every entry
 *  the caller's truth names is a complete object, and everything else recovery finds (a slot
 *  whose entry names another place, a vpage or page taken and not yet used, handles in the
 *  per-heap caches) is derived state, rebuilt from the claimed objects: live bitmaps, counts,
 *  pfn arrays, fullness groups (every vpage goes to the global heap), free handles, vpages and
 *  pages.  The locks are the process's own (calloc'd), never in the arena.
 *
 * LOCKING
 *  lock[c][h] guards hc[c][h], every field of the vpages it owns and the handle entries of
 *  their objects.  To reach an object by handle: load its entry's vpage, load that vpage's
 *  heap and class, lock, and check all three again (compaction or a Hoard hand-over may have
 *  moved it meanwhile).  Order: lock[c][worker] -> lock[c][0] -> hlock[h] -> glob_hlock and
 *  page_lock (both leaves).  Compaction holds one class lock at a time, for at most
 *  XCF_COMPACT_BATCH moves.  The store serialises each object: no two threads free or read
 *  a handle while another frees it.
 */
#include "xcfmalloc.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "crashpoint.h"

#define NO_PFN UINT32_MAX
#define FULL_GROUP (XCF_NGROUPS - 1u)
#define HOARD_F_NUM 1u /* f = 1/4 */
#define HOARD_F_DEN 4u
#define HOARD_K 2u
#define HANDLE_BATCH 64u
#define HANDLE_CACHE_MAX (2u * HANDLE_BATCH)
#define XCF_MAGIC "XCFPOOL1"

struct xcf_vpage {
	uint32_t pfn[XCF_MAX_PPV];
	uint64_t live[4]; /* bit s: slot s holds an object */
	uint32_t prev, next;
	uint32_t owner;   /* raw class: the handle of its object */
	uint32_t bytes;   /* requested bytes of its live objects */
	uint16_t inuse;
	uint16_t cls;     /* read unlocked (atomically) to find the lock */
	uint8_t heap;     /* read unlocked (atomically) to find the lock */
	uint8_t group;
	uint8_t pad[2];
};

struct xcf_hc { /* one class in one heap; guarded by lock[c][h] */
	uint32_t head[XCF_NGROUPS];
	uint32_t pad;
	uint64_t inuse, cap, requested, pages, vpages;
};

struct xcf_hh { /* a worker heap's handle cache; guarded by hlock[h] */
	uint32_t head, n;
};

struct xcf_shared {
	char magic[8];
	uint32_t version, heaps;
	uint64_t pool_pages, max_handles, max_vpages;
	uint64_t off_hc, off_hh, off_handles, off_vpages, off_freepfn, off_pool;
	/* page allocator and vpage ids: page_lock */
	uint64_t fresh_pfn, nfree_pfn, used_pages, used_max, limit_pages;
	uint32_t fresh_vp, free_vp;
	/* global handle pool: glob_hlock */
	uint32_t fresh_handle, free_handle;
	/* atomics */
	uint64_t objects, compacted, moves, to_global;
};

struct xcf_pool {
	struct zc_arena *a;
	struct xcf_shared *sh;
	struct xcf_hc *hc; /* [XCF_NCLASSES][nheaps] */
	struct xcf_hh *hh; /* [nheaps] */
	uint64_t *handles;
	struct xcf_vpage *vps;
	uint32_t *freepfn;
	uint64_t pool_off;
	int nheaps; /* heaps + 1 */
	pthread_mutex_t *locks;
	pthread_mutex_t *hlocks;
	pthread_mutex_t glob_hlock, page_lock;
	uint16_t size[XCF_NCLASSES], opv[XCF_NCLASSES];
	uint8_t ppv[XCF_NCLASSES];
	/* recovery only (xcf_recover_*): claimed handles, and the vpage owning each pool page */
	uint64_t *claimed;
	uint32_t *owner;
	uint64_t nclaimed;
};

/* ---- small helpers ------------------------------------------------------------------------ */

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define ADD(x, v) __atomic_fetch_add(&(x), (v), __ATOMIC_RELAXED)
#define SUB(x, v) __atomic_fetch_sub(&(x), (v), __ATOMIC_RELAXED)
#define RLOAD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

static uint64_t align4k(uint64_t n)
{
	return (n + XCF_PAGE - 1) & ~(uint64_t)(XCF_PAGE - 1);
}

static uint64_t entry_make(uint32_t vp, uint32_t slot, uint32_t len)
{
	return (uint64_t)vp | (uint64_t)slot << 32 | (uint64_t)len << 48;
}

static uint32_t entry_vp(uint64_t e)
{
	return (uint32_t)e;
}

static uint32_t entry_slot(uint64_t e)
{
	return (uint32_t)(e >> 32) & 0xFFFFu;
}

static uint32_t entry_len(uint64_t e)
{
	return (uint32_t)(e >> 48);
}

static struct xcf_hc *hc_of(struct xcf_pool *p, unsigned c, int h)
{
	return &p->hc[c * (unsigned)p->nheaps + (unsigned)h];
}

static pthread_mutex_t *lock_of(struct xcf_pool *p, unsigned c, int h)
{
	return &p->locks[c * (unsigned)p->nheaps + (unsigned)h];
}

static uint8_t *page_addr(struct xcf_pool *p, uint32_t pfn)
{
	return p->a->base + p->pool_off + (uint64_t)pfn * XCF_PAGE;
}

static unsigned class_of(uint32_t len)
{
	return len + XCF_HDR > XCF_PAGE ? XCF_RAW_CLASS : (len + XCF_HDR - 1) / XCF_CLASS_STEP;
}

static uint32_t hdr_of(unsigned c)
{
	return c == XCF_RAW_CLASS ? 0 : XCF_HDR;
}

/* The model's pages_per_vpage(): the vpage length wasting the least tail; ties to fewer. */
static unsigned pages_per_vpage(unsigned size)
{
	unsigned best = 1;
	double best_waste = 1.0;

	for (unsigned n = 1; n <= XCF_MAX_PPV; n++) {
		double waste = (double)((n * XCF_PAGE) % size) / (double)(n * XCF_PAGE);

		if (waste < best_waste - 1e-12) {
			best = n;
			best_waste = waste;
		}
	}
	return best;
}

static void class_table(struct xcf_pool *p)
{
	for (unsigned c = 0; c < XCF_RAW_CLASS; c++) {
		unsigned size = (c + 1) * XCF_CLASS_STEP;

		p->size[c] = (uint16_t)size;
		p->ppv[c] = (uint8_t)pages_per_vpage(size);
		p->opv[c] = (uint16_t)(p->ppv[c] * XCF_PAGE / size);
	}
	p->size[XCF_RAW_CLASS] = XCF_PAGE;
	p->ppv[XCF_RAW_CLASS] = 1;
	p->opv[XCF_RAW_CLASS] = 1;
}

/* ---- bitmaps ------------------------------------------------------------------------------ */

static int bit_test(const struct xcf_vpage *v, unsigned s)
{
	return (int)(v->live[s >> 6] >> (s & 63) & 1);
}

static void bit_set(struct xcf_vpage *v, unsigned s)
{
	v->live[s >> 6] |= 1ull << (s & 63);
}

static void bit_clear(struct xcf_vpage *v, unsigned s)
{
	v->live[s >> 6] &= ~(1ull << (s & 63));
}

static unsigned first_free(const struct xcf_vpage *v, unsigned opv)
{
	for (unsigned w = 0; w < 4; w++) {
		if (~v->live[w]) {
			unsigned s = w * 64 + (unsigned)__builtin_ctzll(~v->live[w]);

			return s < opv ? s : opv;
		}
	}
	return opv;
}

static unsigned first_live(const struct xcf_vpage *v)
{
	for (unsigned w = 0; w < 4; w++)
		if (v->live[w])
			return w * 64 + (unsigned)__builtin_ctzll(v->live[w]);
	return 256;
}

static unsigned popcount_live(const struct xcf_vpage *v)
{
	unsigned n = 0;

	for (unsigned w = 0; w < 4; w++)
		n += (unsigned)__builtin_popcountll(v->live[w]);
	return n;
}

/* Whether a live slot overlaps page pg of a vpage of class c. */
static int page_has_users(struct xcf_pool *p, const struct xcf_vpage *v, unsigned c, unsigned pg)
{
	unsigned size = p->size[c];
	unsigned lo = pg * XCF_PAGE / size;
	unsigned hi = (pg * XCF_PAGE + XCF_PAGE - 1) / size;

	if (hi >= p->opv[c])
		hi = p->opv[c] - 1u;
	for (unsigned s = lo; s <= hi; s++)
		if (bit_test(v, s))
			return 1;
	return 0;
}

/* ---- the page allocator (page_lock) ---------------------------------------------------------- */

static int page_take(struct xcf_pool *p, uint32_t *pfn)
{
	struct xcf_shared *sh = p->sh;
	int rc = 0;

	pthread_mutex_lock(&p->page_lock);
	if (sh->used_pages >= sh->limit_pages) /* XCF_NO_LIMIT: never */
		rc = -ENOSPC;
	else if (sh->nfree_pfn)
		*pfn = p->freepfn[--sh->nfree_pfn];
	else if (sh->fresh_pfn < sh->pool_pages) {
		*pfn = (uint32_t)sh->fresh_pfn;
		STORE(sh->fresh_pfn, sh->fresh_pfn + 1); /* read unlocked by metadata_bytes */
	} else {
		rc = -ENOSPC;
	}
	if (!rc) {
		uint64_t used = sh->used_pages + 1;

		STORE(sh->used_pages, used);
		if (used > sh->used_max)
			STORE(sh->used_max, used);
	}
	pthread_mutex_unlock(&p->page_lock);
	return rc;
}

/* Give pages back: punched first (no lock held, no list holds them), then reusable. */
static void pages_put(struct xcf_pool *p, const uint32_t *pfns, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		zc_arena_punch(p->a, p->pool_off + (uint64_t)pfns[i] * XCF_PAGE, XCF_PAGE);
	CRASH_POINT("pages_put.punched");
	pthread_mutex_lock(&p->page_lock);
	for (unsigned i = 0; i < n; i++)
		p->freepfn[p->sh->nfree_pfn++] = pfns[i];
	STORE(p->sh->used_pages, p->sh->used_pages - n);
	pthread_mutex_unlock(&p->page_lock);
}

static uint32_t vpage_id_take(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;
	uint32_t id = 0;

	pthread_mutex_lock(&p->page_lock);
	if (sh->free_vp) {
		id = sh->free_vp;
		sh->free_vp = p->vps[id].next;
	} else if (sh->fresh_vp < sh->max_vpages) {
		id = sh->fresh_vp;
		STORE(sh->fresh_vp, id + 1); /* read unlocked by metadata_bytes */
	}
	pthread_mutex_unlock(&p->page_lock);
	return id;
}

static void vpage_id_put(struct xcf_pool *p, uint32_t id)
{
	pthread_mutex_lock(&p->page_lock);
	p->vps[id].next = p->sh->free_vp;
	p->sh->free_vp = id;
	pthread_mutex_unlock(&p->page_lock);
}

/* ---- handles (hlock[h], glob_hlock) --------------------------------------------------------- */

static void handle_refill(struct xcf_pool *p, struct xcf_hh *hh)
{
	struct xcf_shared *sh = p->sh;

	pthread_mutex_lock(&p->glob_hlock);
	while (hh->n < HANDLE_BATCH) {
		uint32_t h;

		if (sh->free_handle) {
			h = sh->free_handle;
			sh->free_handle = (uint32_t)(p->handles[h] >> 32);
		} else if (sh->fresh_handle < sh->max_handles) {
			h = sh->fresh_handle;
			STORE(sh->fresh_handle, h + 1);
		} else {
			break;
		}
		STORE(p->handles[h], (uint64_t)hh->head << 32);
		hh->head = h;
		hh->n++;
		CRASH_POINT("handle_refill.one");
	}
	pthread_mutex_unlock(&p->glob_hlock);
}

static uint32_t handle_take(struct xcf_pool *p, int heap)
{
	struct xcf_hh *hh = &p->hh[heap];
	uint32_t h = 0;

	pthread_mutex_lock(&p->hlocks[heap]);
	if (!hh->n)
		handle_refill(p, hh);
	if (hh->n) {
		h = hh->head;
		hh->head = (uint32_t)(p->handles[h] >> 32);
		hh->n--;
	}
	pthread_mutex_unlock(&p->hlocks[heap]);
	return h;
}

static void handle_put(struct xcf_pool *p, int heap, uint32_t h)
{
	struct xcf_hh *hh = &p->hh[heap];

	pthread_mutex_lock(&p->hlocks[heap]);
	STORE(p->handles[h], (uint64_t)hh->head << 32);
	hh->head = h;
	if (++hh->n > HANDLE_CACHE_MAX) {
		pthread_mutex_lock(&p->glob_hlock);
		while (hh->n > HANDLE_BATCH) {
			uint32_t x = hh->head;

			hh->head = (uint32_t)(p->handles[x] >> 32);
			hh->n--;
			STORE(p->handles[x], (uint64_t)p->sh->free_handle << 32);
			p->sh->free_handle = x;
		}
		pthread_mutex_unlock(&p->glob_hlock);
	}
	pthread_mutex_unlock(&p->hlocks[heap]);
}

/* ---- fullness groups (lock[c][h]) ----------------------------------------------------------- */

static unsigned group_of(unsigned inuse, unsigned opv)
{
	return inuse >= opv ? FULL_GROUP : inuse * (XCF_NGROUPS - 1u) / opv;
}

static void vp_unlink(struct xcf_pool *p, struct xcf_hc *hc, uint32_t id)
{
	struct xcf_vpage *v = &p->vps[id];

	if (v->prev)
		p->vps[v->prev].next = v->next;
	else
		hc->head[v->group] = v->next;
	if (v->next)
		p->vps[v->next].prev = v->prev;
	v->prev = v->next = 0;
}

static void vp_link(struct xcf_pool *p, struct xcf_hc *hc, uint32_t id)
{
	struct xcf_vpage *v = &p->vps[id];
	unsigned g = group_of(v->inuse, p->opv[v->cls]);

	v->group = (uint8_t)g;
	v->prev = 0;
	v->next = hc->head[g];
	if (v->next)
		p->vps[v->next].prev = id;
	hc->head[g] = id;
}

static void vp_regroup(struct xcf_pool *p, struct xcf_hc *hc, uint32_t id)
{
	struct xcf_vpage *v = &p->vps[id];

	if (group_of(v->inuse, p->opv[v->cls]) != v->group) {
		vp_unlink(p, hc, id);
		vp_link(p, hc, id);
	}
}

static uint32_t fullest_nonfull(struct xcf_hc *hc, uint32_t exclude, struct xcf_pool *p)
{
	for (int g = (int)FULL_GROUP - 1; g >= 0; g--)
		for (uint32_t id = hc->head[g]; id; id = p->vps[id].next)
			if (id != exclude)
				return id;
	return 0;
}

static uint32_t sparsest(struct xcf_hc *hc)
{
	for (unsigned g = 0; g < FULL_GROUP; g++)
		if (hc->head[g])
			return hc->head[g];
	return 0;
}

static unsigned vp_pages(const struct xcf_vpage *v, unsigned ppv)
{
	unsigned n = 0;

	for (unsigned i = 0; i < ppv; i++)
		n += v->pfn[i] != NO_PFN;
	return n;
}

/* Move vpage id (and its counters) from heap `from` to heap `to` of class c; both locked. */
static void vp_move_heap(struct xcf_pool *p, unsigned c, uint32_t id, int from, int to)
{
	struct xcf_vpage *v = &p->vps[id];
	struct xcf_hc *a = hc_of(p, c, from), *b = hc_of(p, c, to);
	uint64_t pages = vp_pages(v, p->ppv[c]);

	vp_unlink(p, a, id);
	a->inuse -= v->inuse;
	a->cap -= p->opv[c];
	a->pages -= pages;
	a->vpages--;
	SUB(a->requested, v->bytes);
	b->inuse += v->inuse;
	b->cap += p->opv[c];
	b->pages += pages;
	b->vpages++;
	ADD(b->requested, v->bytes);
	STORE(v->heap, (uint8_t)to);
	vp_link(p, b, id);
}

/* ---- vpages -------------------------------------------------------------------------------- */

static uint32_t vpage_new(struct xcf_pool *p, unsigned c, int h)
{
	uint32_t id = vpage_id_take(p);

	if (!id)
		return 0;
	struct xcf_vpage *v = &p->vps[id];

	/* Field by field: a thread holding a stale entry may load cls/heap meanwhile (it then
	 * finds the entry changed under the lock and looks again), so those two are atomic. */
	for (unsigned i = 0; i < XCF_MAX_PPV; i++)
		v->pfn[i] = NO_PFN;
	memset(v->live, 0, sizeof(v->live));
	v->prev = v->next = v->owner = v->bytes = 0;
	v->inuse = 0;
	v->group = 0;
	STORE(v->cls, (uint16_t)c);
	STORE(v->heap, (uint8_t)h);
	struct xcf_hc *hc = hc_of(p, c, h);

	hc->cap += p->opv[c];
	hc->vpages++;
	CRASH_POINT("vpage_new.counted");
	vp_link(p, hc, id);
	return id;
}

/* An empty vpage leaves its lists; its id is reusable (its pages are already gone). */
static void vpage_release(struct xcf_pool *p, unsigned c, int h, uint32_t id)
{
	struct xcf_hc *hc = hc_of(p, c, h);

	vp_unlink(p, hc, id);
	hc->cap -= p->opv[c];
	hc->vpages--;
	STORE(p->vps[id].cls, (uint16_t)UINT16_MAX);
	vpage_id_put(p, id);
}

static void slot_pages(struct xcf_pool *p, unsigned c, unsigned s, unsigned *p0, unsigned *p1)
{
	uint32_t start = s * p->size[c];

	*p0 = start / XCF_PAGE;
	*p1 = (start + p->size[c] - 1) / XCF_PAGE;
}

/* Take the pages slot s needs; on failure none of those it took is kept. */
static int hold_pages(struct xcf_pool *p, unsigned c, int h, struct xcf_vpage *v, unsigned s)
{
	unsigned p0, p1, took[2], n = 0;

	slot_pages(p, c, s, &p0, &p1);
	for (unsigned pg = p0; pg <= p1; pg++) {
		if (v->pfn[pg] != NO_PFN)
			continue;
		uint32_t pfn;

		if (page_take(p, &pfn)) {
			uint32_t back[2];

			for (unsigned i = 0; i < n; i++) {
				back[i] = v->pfn[took[i]];
				v->pfn[took[i]] = NO_PFN;
			}
			hc_of(p, c, h)->pages -= n;
			pages_put(p, back, n);
			return -ENOSPC;
		}
		v->pfn[pg] = pfn;
		took[n++] = pg;
		hc_of(p, c, h)->pages++;
	}
	return 0;
}

/* After slot s was cleared: drop the pages no live slot overlaps into out[]; returns count. */
static unsigned unhold_pages(struct xcf_pool *p, unsigned c, int h, struct xcf_vpage *v,
			     unsigned s, uint32_t *out)
{
	unsigned p0, p1, n = 0;

	slot_pages(p, c, s, &p0, &p1);
	for (unsigned pg = p0; pg <= p1; pg++) {
		if (v->pfn[pg] == NO_PFN || page_has_users(p, v, c, pg))
			continue;
		out[n++] = v->pfn[pg];
		v->pfn[pg] = NO_PFN;
	}
	hc_of(p, c, h)->pages -= n;
	return n;
}

static void copy_in(struct xcf_pool *p, const struct xcf_vpage *v, unsigned c, unsigned s,
		    uint32_t at, const uint8_t *src, uint32_t n)
{
	uint32_t start = s * p->size[c] + at;

	while (n) {
		uint32_t off = start % XCF_PAGE, chunk = XCF_PAGE - off;

		if (chunk > n)
			chunk = n;
		memcpy(page_addr(p, v->pfn[start / XCF_PAGE]) + off, src, chunk);
		src += chunk;
		start += chunk;
		n -= chunk;
	}
}

static void copy_out(struct xcf_pool *p, const struct xcf_vpage *v, unsigned c, unsigned s,
		     uint32_t at, uint8_t *dst, uint32_t n)
{
	uint32_t start = s * p->size[c] + at;

	while (n) {
		uint32_t off = start % XCF_PAGE, chunk = XCF_PAGE - off;

		if (chunk > n)
			chunk = n;
		memcpy(dst, page_addr(p, v->pfn[start / XCF_PAGE]) + off, chunk);
		dst += chunk;
		start += chunk;
		n -= chunk;
	}
}

static uint32_t slot_handle(struct xcf_pool *p, const struct xcf_vpage *v, unsigned c, unsigned s)
{
	uint32_t h;

	if (c == XCF_RAW_CLASS)
		return v->owner;
	copy_out(p, v, c, s, 0, (uint8_t *)&h, XCF_HDR);
	return h;
}

/* ---- Hoard --------------------------------------------------------------------------------- */

/* u < (1 - f) a  and  u < a - K S: the worker heap holds too much empty space. */
static int too_empty(struct xcf_pool *p, unsigned c, const struct xcf_hc *hc)
{
	uint64_t u = hc->inuse, a = hc->cap, s = p->opv[c];

	return u * HOARD_F_DEN < (HOARD_F_DEN - HOARD_F_NUM) * a && u + HOARD_K * s < a;
}

static void give_to_global(struct xcf_pool *p, unsigned c, int h)
{
	uint32_t id = sparsest(hc_of(p, c, h));

	if (!id)
		return;
	pthread_mutex_lock(lock_of(p, c, 0));
	vp_move_heap(p, c, id, h, 0);
	pthread_mutex_unlock(lock_of(p, c, 0));
	ADD(p->sh->to_global, 1);
}

static uint32_t take_from_global(struct xcf_pool *p, unsigned c, int h)
{
	pthread_mutex_lock(lock_of(p, c, 0));
	uint32_t id = fullest_nonfull(hc_of(p, c, 0), 0, p);

	if (id)
		vp_move_heap(p, c, id, 0, h);
	pthread_mutex_unlock(lock_of(p, c, 0));
	return id;
}

/* ---- the API ------------------------------------------------------------------------------- */

int xcf_store(struct xcf_pool *p, int heap, const uint8_t *data, uint32_t len, uint32_t *handle)
{
	if (len == 0 || len > XCF_MAX_OBJECT || heap < 1 || heap >= p->nheaps)
		return -EINVAL;
	unsigned c = class_of(len);
	uint32_t h = handle_take(p, heap);

	if (!h)
		return -ENOSPC;
	pthread_mutex_lock(lock_of(p, c, heap));
	struct xcf_hc *hc = hc_of(p, c, heap);
	uint32_t id = fullest_nonfull(hc, 0, p);

	if (!id)
		id = take_from_global(p, c, heap);
	if (!id)
		id = vpage_new(p, c, heap);
	if (!id)
		goto full;
	struct xcf_vpage *v = &p->vps[id];
	unsigned s = first_free(v, p->opv[c]);

	if (hold_pages(p, c, heap, v, s)) {
		if (!v->inuse)
			vpage_release(p, c, heap, id);
		goto full;
	}
	CRASH_POINT("store.pages_held");
	bit_set(v, s);
	v->inuse++;
	v->bytes += len;
	hc->inuse++;
	ADD(hc->requested, len);
	vp_regroup(p, hc, id);
	if (c == XCF_RAW_CLASS) {
		v->owner = h;
	} else {
		copy_in(p, v, c, s, 0, (const uint8_t *)&h, XCF_HDR);
	}
	copy_in(p, v, c, s, hdr_of(c), data, len);
	CRASH_POINT("store.before_entry");
	STORE(p->handles[h], entry_make(id, s, len));
	pthread_mutex_unlock(lock_of(p, c, heap));
	ADD(p->sh->objects, 1);
	*handle = h;
	return 0;
full:
	pthread_mutex_unlock(lock_of(p, c, heap));
	handle_put(p, heap, h);
	return -ENOSPC;
}

/* Lock the heap that owns handle h's vpage; returns the entry (0 if h is not live). */
static uint64_t lock_owner(struct xcf_pool *p, uint32_t h, unsigned *cls, int *heap)
{
	if (h == 0 || h >= LOAD(p->sh->fresh_handle))
		return 0;
	for (;;) {
		uint64_t e = LOAD(p->handles[h]);
		uint32_t id = entry_vp(e);

		if (!id || id >= p->sh->max_vpages)
			return 0;
		struct xcf_vpage *v = &p->vps[id];
		unsigned c = LOAD(v->cls);
		int hp = LOAD(v->heap);

		if (c >= XCF_NCLASSES || hp >= p->nheaps)
			continue; /* the vpage is changing hands: look again */
		pthread_mutex_lock(lock_of(p, c, hp));
		if (LOAD(p->handles[h]) == e && LOAD(v->cls) == c && LOAD(v->heap) == hp) {
			*cls = c;
			*heap = hp;
			return e;
		}
		pthread_mutex_unlock(lock_of(p, c, hp));
	}
}

int xcf_read(struct xcf_pool *p, uint32_t handle, uint8_t *out)
{
	unsigned c;
	int h;
	uint64_t e = lock_owner(p, handle, &c, &h);

	if (!e)
		return -EINVAL;
	uint32_t len = entry_len(e);

	copy_out(p, &p->vps[entry_vp(e)], c, entry_slot(e), hdr_of(c), out, len);
	pthread_mutex_unlock(lock_of(p, c, h));
	return (int)len;
}

int xcf_peek(struct xcf_pool *p, uint32_t handle, uint8_t *out, uint32_t n)
{
	unsigned c;
	int h;
	uint64_t e = lock_owner(p, handle, &c, &h);

	if (!e)
		return -EINVAL;
	uint32_t len = entry_len(e) < n ? entry_len(e) : n;

	copy_out(p, &p->vps[entry_vp(e)], c, entry_slot(e), hdr_of(c), out, len);
	pthread_mutex_unlock(lock_of(p, c, h));
	return (int)len;
}

uint32_t xcf_size(struct xcf_pool *p, uint32_t handle)
{
	if (handle == 0 || handle >= LOAD(p->sh->fresh_handle))
		return 0;
	uint64_t e = LOAD(p->handles[handle]);

	return entry_vp(e) ? entry_len(e) : 0;
}

int xcf_corrupt(struct xcf_pool *p, uint32_t handle)
{
	unsigned c;
	int h;
	uint64_t e = lock_owner(p, handle, &c, &h);
	uint8_t b;

	if (!e)
		return -EINVAL;
	struct xcf_vpage *v = &p->vps[entry_vp(e)];

	copy_out(p, v, c, entry_slot(e), hdr_of(c), &b, 1);
	b ^= 0x5A;
	copy_in(p, v, c, entry_slot(e), hdr_of(c), &b, 1);
	pthread_mutex_unlock(lock_of(p, c, h));
	return 0;
}

void xcf_free(struct xcf_pool *p, int heap, uint32_t handle)
{
	unsigned c;
	int h;
	uint32_t freed[2];
	uint64_t e = lock_owner(p, handle, &c, &h);

	if (!e)
		return;
	uint32_t id = entry_vp(e), s = entry_slot(e), len = entry_len(e);
	struct xcf_vpage *v = &p->vps[id];
	struct xcf_hc *hc = hc_of(p, c, h);

	bit_clear(v, s);
	v->inuse--;
	v->bytes -= len;
	hc->inuse--;
	SUB(hc->requested, len);
	CRASH_POINT("free.slot_cleared");
	unsigned n = unhold_pages(p, c, h, v, s, freed);

	if (!v->inuse)
		vpage_release(p, c, h, id);
	else
		vp_regroup(p, hc, id);
	if (h != 0 && too_empty(p, c, hc))
		give_to_global(p, c, h);
	STORE(p->handles[handle], 0);
	pthread_mutex_unlock(lock_of(p, c, h));
	if (n)
		pages_put(p, freed, n);
	if (heap < 1 || heap >= p->nheaps)
		heap = 1;
	handle_put(p, heap, handle);
	SUB(p->sh->objects, 1);
}

/* ---- compaction ---------------------------------------------------------------------------- */

/* Pages the (class, heap) holds beyond its objects packed into full vpages plus one partial
 * vpage packed from its start (the model's reclaimable_pages). */
static uint64_t hc_reclaimable(struct xcf_pool *p, unsigned c, const struct xcf_hc *hc)
{
	uint64_t opv = p->opv[c], rem = hc->inuse % opv;
	uint64_t need = hc->inuse / opv * p->ppv[c] + (rem * p->size[c] + XCF_PAGE - 1) / XCF_PAGE;

	return hc->pages > need ? hc->pages - need : 0;
}

/* Move the object in slot s of src to slot d of dst (src may be dst: a pack); all under
 * lock[c][h].  The copy is compared with its source before the handle moves.  Pages it empties
 * go to freed[]. */
static int move_object(struct xcf_pool *p, unsigned c, int h, uint32_t src, unsigned s,
		       uint32_t dst, unsigned d, uint32_t *freed, unsigned *nfreed)
{
	struct xcf_vpage *vs = &p->vps[src], *vd = &p->vps[dst];
	uint8_t buf[XCF_PAGE], check[XCF_PAGE];
	uint32_t handle = slot_handle(p, vs, c, s);
	uint64_t e = p->handles[handle];
	uint32_t len = entry_len(e), n = len + XCF_HDR;

	if (handle == 0 || entry_vp(e) != src || entry_slot(e) != s)
		return -EIO; /* I4 broken: never move what we cannot name */
	if (hold_pages(p, c, h, vd, d))
		return -ENOSPC;
	copy_out(p, vs, c, s, 0, buf, n);
	copy_in(p, vd, c, d, 0, buf, n);
	copy_out(p, vd, c, d, 0, check, n);
	if (memcmp(buf, check, n)) {
		*nfreed += unhold_pages(p, c, h, vd, d, freed + *nfreed);
		return -EIO;
	}
	bit_set(vd, d);
	vd->inuse++;
	vd->bytes += len;
	CRASH_POINT("move.copied");
	STORE(p->handles[handle], entry_make(dst, d, len));
	CRASH_POINT("move.entry_moved");
	bit_clear(vs, s);
	vs->inuse--;
	vs->bytes -= len;
	*nfreed += unhold_pages(p, c, h, vs, s, freed + *nfreed);
	return 0;
}

static unsigned last_live(const struct xcf_vpage *v)
{
	for (int w = 3; w >= 0; w--)
		if (v->live[w])
			return (unsigned)w * 64 + 63u - (unsigned)__builtin_clzll(v->live[w]);
	return 0;
}

/* One vpage with free slots is left: move its last objects into its first free slots, so its
 * tail pages empty.  Returns moves made. */
static unsigned pack(struct xcf_pool *p, unsigned c, int h, uint32_t id, unsigned budget,
		     uint32_t *freed, unsigned *nfreed)
{
	struct xcf_vpage *v = &p->vps[id];
	unsigned moved = 0;

	while (moved < budget) {
		unsigned lo = first_free(v, p->opv[c]), hi = last_live(v);

		if (lo >= hi || move_object(p, c, h, id, hi, id, lo, freed, nfreed))
			break;
		moved++;
	}
	return moved;
}

/* One batch in (c, h), as the model's compact_step: from the sparsest vpage into the fullest
 * other one while the heap holds more pages than a packed layout; a lone partial vpage is
 * packed.  Returns moves made; *done when nothing more is worth moving. */
static unsigned compact_batch(struct xcf_pool *p, unsigned c, int h, uint64_t budget, int *done)
{
	uint32_t freed[2 * XCF_COMPACT_BATCH + 2];
	unsigned nfreed = 0, moved = 0, batch = budget < XCF_COMPACT_BATCH ? (unsigned)budget
									 : XCF_COMPACT_BATCH;
	struct xcf_hc *hc = hc_of(p, c, h);

	pthread_mutex_lock(lock_of(p, c, h));
	*done = 1;
	while (moved < batch && hc_reclaimable(p, c, hc) > 0) {
		uint32_t src = sparsest(hc), dst = src ? fullest_nonfull(hc, src, p) : 0;

		if (!src)
			break;
		if (!dst) {
			moved += pack(p, c, h, src, batch - moved, freed, &nfreed);
			break;
		}
		struct xcf_vpage *vd = &p->vps[dst];

		if (move_object(p, c, h, src, first_live(&p->vps[src]), dst,
				first_free(vd, p->opv[c]), freed, &nfreed))
			break;
		if (!p->vps[src].inuse)
			vpage_release(p, c, h, src);
		else
			vp_regroup(p, hc, src);
		vp_regroup(p, hc, dst);
		moved++;
	}
	if (moved == batch && moved < budget)
		*done = 0;
	pthread_mutex_unlock(lock_of(p, c, h));
	if (nfreed) {
		pages_put(p, freed, nfreed);
		ADD(p->sh->compacted, nfreed);
	}
	ADD(p->sh->moves, moved);
	return moved;
}

uint64_t xcf_compact(struct xcf_pool *p, uint64_t max_moves)
{
	uint64_t budget = max_moves ? max_moves : UINT64_MAX, total = 0;

	for (unsigned c = 0; c < XCF_RAW_CLASS && total < budget; c++)
		for (int h = 0; h < p->nheaps && total < budget; h++) {
			int done = 0;

			while (!done && total < budget)
				total += compact_batch(p, c, h, budget - total, &done);
		}
	return total;
}

uint64_t xcf_reclaimable_bytes(struct xcf_pool *p)
{
	uint64_t pages = 0;

	for (unsigned c = 0; c < XCF_RAW_CLASS; c++)
		for (int h = 0; h < p->nheaps; h++) {
			pthread_mutex_lock(lock_of(p, c, h));
			pages += hc_reclaimable(p, c, hc_of(p, c, h));
			pthread_mutex_unlock(lock_of(p, c, h));
		}
	return pages * XCF_PAGE;
}

/* ---- statistics and checks ----------------------------------------------------------------- */

static uint64_t metadata_bytes(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;

	return align4k(sizeof(*sh)) + (uint64_t)XCF_NCLASSES * (uint64_t)p->nheaps * sizeof(struct xcf_hc) +
	       (uint64_t)p->nheaps * sizeof(struct xcf_hh) + RLOAD(sh->fresh_handle) * 8ull +
	       RLOAD(sh->fresh_vp) * (uint64_t)sizeof(struct xcf_vpage) +
	       RLOAD(sh->fresh_pfn) * 4ull;
}

void xcf_stats(struct xcf_pool *p, struct xcf_stats *out)
{
	struct xcf_shared *sh = p->sh;
	uint64_t req = 0;

	for (unsigned i = 0; i < XCF_NCLASSES * (unsigned)p->nheaps; i++)
		req += RLOAD(p->hc[i].requested);
	out->pool_pages = RLOAD(sh->used_pages);
	out->pool_pages_max = RLOAD(sh->used_max);
	out->limit_pages = RLOAD(sh->limit_pages);
	out->pages_compacted = RLOAD(sh->compacted);
	out->objects = RLOAD(sh->objects);
	out->requested_bytes = req;
	out->metadata_bytes = metadata_bytes(p);
	out->moves = RLOAD(sh->moves);
	out->vpages_to_global = RLOAD(sh->to_global);
}

unsigned xcf_fragmentation(struct xcf_pool *p, struct xcf_class_usage *out, unsigned n)
{
	unsigned k = 0;

	for (unsigned c = 0; c < XCF_NCLASSES && k < n; c++) {
		struct xcf_class_usage u = {.size = p->size[c]};

		for (int h = 0; h < p->nheaps; h++) {
			pthread_mutex_lock(lock_of(p, c, h));
			struct xcf_hc *hc = hc_of(p, c, h);

			u.pool_bytes += hc->pages * XCF_PAGE;
			u.requested_bytes += hc->requested;
			u.objects += hc->inuse;
			pthread_mutex_unlock(lock_of(p, c, h));
		}
		if (u.pool_bytes || u.objects)
			out[k++] = u;
	}
	return k;
}

static int check_vpage(struct xcf_pool *p, unsigned c, int h, uint32_t id, unsigned g,
		       struct xcf_hc *sum)
{
	struct xcf_vpage *v = &p->vps[id];
	uint64_t bytes = 0;

	if (v->cls != c || v->heap != h || v->group != g)
		return -3;
	if (popcount_live(v) != v->inuse || !v->inuse || group_of(v->inuse, p->opv[c]) != g)
		return -2;
	for (unsigned pg = 0; pg < p->ppv[c]; pg++)
		if ((v->pfn[pg] != NO_PFN) != page_has_users(p, v, c, pg))
			return -1;
	for (unsigned s = 0; s < p->opv[c]; s++) {
		if (!bit_test(v, s))
			continue;
		uint32_t hd = slot_handle(p, v, c, s);

		if (hd == 0 || hd >= p->sh->fresh_handle)
			return -4;
		uint64_t e = p->handles[hd];

		if (entry_vp(e) != id || entry_slot(e) != s)
			return -4;
		bytes += entry_len(e);
	}
	if (bytes != v->bytes)
		return -5;
	sum->inuse += v->inuse;
	sum->cap += p->opv[c];
	sum->pages += vp_pages(v, p->ppv[c]);
	sum->vpages++;
	sum->requested += bytes;
	return 0;
}

int xcf_check(struct xcf_pool *p)
{
	int rc = 0;

	for (unsigned c = 0; c < XCF_NCLASSES && !rc; c++)
		for (int h = 0; h < p->nheaps && !rc; h++) {
			struct xcf_hc sum;

			memset(&sum, 0, sizeof(sum));
			pthread_mutex_lock(lock_of(p, c, h));
			struct xcf_hc *hc = hc_of(p, c, h);

			for (unsigned g = 0; g < XCF_NGROUPS && !rc; g++)
				for (uint32_t id = hc->head[g]; id && !rc; id = p->vps[id].next)
					rc = check_vpage(p, c, h, id, g, &sum);
			if (!rc && (sum.inuse != hc->inuse || sum.cap != hc->cap ||
				    sum.pages != hc->pages || sum.vpages != hc->vpages ||
				    sum.requested != hc->requested))
				rc = -5;
			pthread_mutex_unlock(lock_of(p, c, h));
		}
	return rc;
}

/* ---- recovery ------------------------------------------------------------------------------ */

static int test_bit64(const uint64_t *m, uint64_t i)
{
	return (int)(m[i >> 6] >> (i & 63) & 1);
}

int xcf_recover_begin(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;

	free(p->claimed);
	free(p->owner);
	p->claimed = calloc(sh->max_handles / 64 + 1, sizeof(uint64_t));
	p->owner = calloc(sh->pool_pages + 1, sizeof(uint32_t));
	p->nclaimed = 0;
	if (!p->claimed || !p->owner) {
		free(p->claimed);
		free(p->owner);
		p->claimed = NULL;
		p->owner = NULL;
		return -ENOMEM;
	}
	for (uint32_t id = 1; id < sh->fresh_vp; id++) {
		struct xcf_vpage *v = &p->vps[id];

		memset(v->live, 0, sizeof(v->live));
		v->inuse = 0;
		v->bytes = 0;
	}
	return 0;
}

/* Whether slot s of vpage id (class c) has its pages, none of them claimed by another vpage. */
static int slot_pages_ok(struct xcf_pool *p, uint32_t id, unsigned c, unsigned s)
{
	const struct xcf_vpage *v = &p->vps[id];
	unsigned p0, p1;

	slot_pages(p, c, s, &p0, &p1);
	for (unsigned pg = p0; pg <= p1; pg++) {
		uint32_t pfn = v->pfn[pg];

		if (pfn == NO_PFN || pfn >= p->sh->fresh_pfn || (p->owner[pfn] && p->owner[pfn] != id))
			return 0;
	}
	return 1;
}

int xcf_recover_claim(struct xcf_pool *p, uint32_t h)
{
	struct xcf_shared *sh = p->sh;

	if (!p->claimed || h == 0 || h >= sh->fresh_handle || h >= sh->max_handles ||
	    test_bit64(p->claimed, h))
		return -EINVAL;
	uint64_t e = p->handles[h];
	uint32_t id = entry_vp(e), s = entry_slot(e), len = entry_len(e);

	if (id == 0 || id >= sh->fresh_vp)
		return -EINVAL;
	struct xcf_vpage *v = &p->vps[id];
	unsigned c = v->cls, p0, p1;

	if (c >= XCF_NCLASSES || len == 0 || len > XCF_MAX_OBJECT || class_of(len) != c ||
	    s >= p->opv[c] || bit_test(v, s) || !slot_pages_ok(p, id, c, s) ||
	    slot_handle(p, v, c, s) != h)
		return -EINVAL;
	slot_pages(p, c, s, &p0, &p1);
	for (unsigned pg = p0; pg <= p1; pg++)
		p->owner[v->pfn[pg]] = id;
	bit_set(v, s);
	v->inuse++;
	v->bytes += len;
	p->claimed[h >> 6] |= 1ull << (h & 63);
	p->nclaimed++;
	return 0;
}

/* Unclaimed handles go to the global free list (ascending: low ones are taken first). */
static uint64_t rebuild_handles(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;
	uint64_t orphans = 0;

	sh->free_handle = 0;
	for (uint32_t h = (uint32_t)sh->fresh_handle; h-- > 1;) {
		if (test_bit64(p->claimed, h))
			continue;
		if (entry_vp(p->handles[h]))
			orphans++;
		p->handles[h] = (uint64_t)sh->free_handle << 32;
		sh->free_handle = h;
	}
	memset(p->hh, 0, (size_t)p->nheaps * sizeof(*p->hh));
	return orphans;
}

/* A vpage with claimed objects keeps the pages they overlap and joins the global heap; one
 * without is freed. */
static void rebuild_vpages(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;

	memset(p->hc, 0, (size_t)XCF_NCLASSES * (size_t)p->nheaps * sizeof(*p->hc));
	sh->free_vp = 0;
	for (uint32_t id = sh->fresh_vp; id-- > 1;) {
		struct xcf_vpage *v = &p->vps[id];

		v->prev = v->next = 0;
		if (!v->inuse) {
			v->cls = (uint16_t)UINT16_MAX;
			v->next = sh->free_vp;
			sh->free_vp = id;
			continue;
		}
		unsigned c = v->cls;
		struct xcf_hc *hc = hc_of(p, c, 0);

		for (unsigned pg = 0; pg < XCF_MAX_PPV; pg++)
			if (pg >= p->ppv[c] || !page_has_users(p, v, c, pg))
				v->pfn[pg] = NO_PFN;
		v->heap = 0;
		hc->inuse += v->inuse;
		hc->cap += p->opv[c];
		hc->pages += vp_pages(v, p->ppv[c]);
		hc->vpages++;
		hc->requested += v->bytes;
		vp_link(p, hc, id);
	}
}

/* Pool pages no claimed object overlaps: punched (in runs) and listed free.  Returns the
 * number in use. */
static uint64_t rebuild_pages(struct xcf_pool *p)
{
	struct xcf_shared *sh = p->sh;
	uint64_t used = 0, run = 0;

	sh->nfree_pfn = 0;
	for (uint64_t pfn = sh->fresh_pfn; pfn-- > 0;) {
		if (p->owner[pfn]) {
			used++;
			continue;
		}
		p->freepfn[sh->nfree_pfn++] = (uint32_t)pfn;
	}
	for (uint64_t pfn = 0; pfn <= sh->fresh_pfn; pfn++) {
		if (pfn < sh->fresh_pfn && !p->owner[pfn]) {
			run++;
			continue;
		}
		if (run)
			zc_arena_punch(p->a, p->pool_off + (pfn - run) * XCF_PAGE, run * XCF_PAGE);
		run = 0;
	}
	return used;
}

void xcf_recover_end(struct xcf_pool *p, uint64_t *orphans, uint64_t *freed)
{
	struct xcf_shared *sh = p->sh;
	uint64_t before = sh->used_pages;

	*orphans = rebuild_handles(p);
	rebuild_vpages(p);
	uint64_t used = rebuild_pages(p);

	*freed = before > used ? before - used : 0;
	sh->used_pages = used;
	if (sh->used_max < used)
		sh->used_max = used;
	sh->objects = p->nclaimed;
	free(p->claimed);
	free(p->owner);
	p->claimed = NULL;
	p->owner = NULL;
}

/* ---- creation ------------------------------------------------------------------------------ */

struct layout {
	uint64_t hc, hh, handles, vpages, freepfn, pool, end;
};

static void layout_of(const struct xcf_geometry *g, uint64_t off, struct layout *l)
{
	uint64_t nh = (uint64_t)g->heaps + 1;

	l->hc = off + align4k(sizeof(struct xcf_shared));
	l->hh = l->hc + align4k(XCF_NCLASSES * nh * sizeof(struct xcf_hc));
	l->handles = l->hh + align4k(nh * sizeof(struct xcf_hh));
	l->vpages = l->handles + align4k(g->max_handles * 8);
	l->freepfn = l->vpages + align4k(g->max_vpages * sizeof(struct xcf_vpage));
	l->pool = l->freepfn + align4k(g->pool_pages * 4);
	l->end = l->pool + g->pool_pages * XCF_PAGE;
}

uint64_t xcf_arena_bytes(const struct xcf_geometry *g)
{
	struct layout l;

	layout_of(g, 0, &l);
	return l.end;
}

static int init_locks(struct xcf_pool *p)
{
	unsigned n = XCF_NCLASSES * (unsigned)p->nheaps;

	p->locks = calloc(n, sizeof(*p->locks));
	p->hlocks = calloc((size_t)p->nheaps, sizeof(*p->hlocks));
	if (!p->locks || !p->hlocks)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++)
		pthread_mutex_init(&p->locks[i], NULL);
	for (int i = 0; i < p->nheaps; i++)
		pthread_mutex_init(&p->hlocks[i], NULL);
	pthread_mutex_init(&p->glob_hlock, NULL);
	pthread_mutex_init(&p->page_lock, NULL);
	return 0;
}

/* A pool object for geometry g at off (checked), its locks and class table; the arena's
 * contents are not looked at.  NULL and *err. */
static struct xcf_pool *pool_new(struct zc_arena *a, uint64_t off, const struct xcf_geometry *g,
				 struct layout *l, int *err)
{
	*err = -EINVAL;
	if (g->heaps < 1 || g->heaps > XCF_MAX_HEAPS || g->max_handles < 2 ||
	    g->max_handles > UINT32_MAX || g->max_vpages < 2 || g->max_vpages > UINT32_MAX ||
	    g->pool_pages < 1 || g->pool_pages > UINT32_MAX || off % XCF_PAGE)
		return NULL;
	layout_of(g, off, l);
	if (l->end > a->size)
		return NULL;
	struct xcf_pool *p = calloc(1, sizeof(*p));

	*err = -ENOMEM;
	if (!p)
		return NULL;
	p->a = a;
	p->nheaps = g->heaps + 1;
	if (init_locks(p)) {
		xcf_destroy(p);
		return NULL;
	}
	class_table(p);
	p->sh = ZC_ARENA_AT(a, off, struct xcf_shared);
	p->hc = ZC_ARENA_AT(a, l->hc, struct xcf_hc);
	p->hh = ZC_ARENA_AT(a, l->hh, struct xcf_hh);
	p->handles = ZC_ARENA_AT(a, l->handles, uint64_t);
	p->vps = ZC_ARENA_AT(a, l->vpages, struct xcf_vpage);
	p->freepfn = ZC_ARENA_AT(a, l->freepfn, uint32_t);
	p->pool_off = l->pool;
	*err = 0;
	return p;
}

struct xcf_pool *xcf_create(struct zc_arena *a, uint64_t off, const struct xcf_geometry *g,
			    uint64_t limit_pages, int *err)
{
	struct layout l;
	struct xcf_pool *p = pool_new(a, off, g, &l, err);

	if (!p)
		return NULL;
	struct xcf_shared *sh = p->sh;

	memcpy(sh->magic, XCF_MAGIC, 8);
	sh->version = 1;
	sh->heaps = (uint32_t)g->heaps;
	sh->pool_pages = g->pool_pages;
	sh->max_handles = g->max_handles;
	sh->max_vpages = g->max_vpages;
	sh->off_hc = l.hc;
	sh->off_hh = l.hh;
	sh->off_handles = l.handles;
	sh->off_vpages = l.vpages;
	sh->off_freepfn = l.freepfn;
	sh->off_pool = l.pool;
	sh->limit_pages = limit_pages;
	sh->fresh_vp = 1;
	sh->fresh_handle = 1;
	return p;
}

struct xcf_pool *xcf_attach(struct zc_arena *a, uint64_t off, const struct xcf_geometry *g,
			    int *err)
{
	struct layout l;
	struct xcf_pool *p = pool_new(a, off, g, &l, err);

	if (!p)
		return NULL;
	const struct xcf_shared *sh = p->sh;

	if (memcmp(sh->magic, XCF_MAGIC, 8) || sh->version != 1 || sh->heaps != (uint32_t)g->heaps ||
	    sh->pool_pages != g->pool_pages || sh->max_handles != g->max_handles ||
	    sh->max_vpages != g->max_vpages || sh->off_hc != l.hc || sh->off_hh != l.hh ||
	    sh->off_handles != l.handles || sh->off_vpages != l.vpages ||
	    sh->off_freepfn != l.freepfn || sh->off_pool != l.pool ||
	    sh->fresh_pfn > sh->pool_pages || sh->fresh_vp > sh->max_vpages || sh->fresh_vp < 1 ||
	    sh->fresh_handle > sh->max_handles || sh->fresh_handle < 1) {
		xcf_destroy(p);
		*err = -EPROTO;
		return NULL;
	}
	return p;
}

void xcf_set_limit(struct xcf_pool *p, uint64_t limit_pages)
{
	pthread_mutex_lock(&p->page_lock);
	STORE(p->sh->limit_pages, limit_pages); /* read unlocked by xcf_stats */
	pthread_mutex_unlock(&p->page_lock);
}

void xcf_destroy(struct xcf_pool *p)
{
	if (!p)
		return;
	if (p->locks)
		for (unsigned i = 0; i < XCF_NCLASSES * (unsigned)p->nheaps; i++)
			pthread_mutex_destroy(&p->locks[i]);
	if (p->hlocks)
		for (int i = 0; i < p->nheaps; i++)
			pthread_mutex_destroy(&p->hlocks[i]);
	free(p->locks);
	free(p->hlocks);
	free(p->claimed);
	free(p->owner);
	free(p);
}
