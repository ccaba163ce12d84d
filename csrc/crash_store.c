/* crash_store.c - crash consistency of the page store: SIGKILL under load, then recovery.
 *
 * Owns: a parent that keeps one store's memfd arena and a model of every page in a shared
 * log, and, each round, a forked child that attaches the arena as a new server would
 * (zc_store_attach), runs W writer threads (each on its own disjoint pages, so every page has
 * one writer) and a compactor that also recompresses (a tick, then every page idle for one
 * tick stored again in the cold format; now and then a zstd dictionary trained on samples
 * of the pages written and made current), and is killed with SIGKILL a random 0..30 ms
 * after its workers started (one kill in 8: after the fork, which also cuts attaches short;
 * every CLEAN_EVERY-th round it instead finishes a fixed number of operations and exits 0).  The
 * parent then attaches the arena itself (the recovery under test), checks the allocator
 * (zc_store_check), reads every page back and compares it byte for byte with what the model
 * allows, checks the counters against the recovery report, settles the model, and closes the
 * store again before the next child.
 *
 * THE MODEL (the shared log, MAP_SHARED anonymous, written by the child, read by the parent)
 *  Pages [0, NV) are "version pages": page p at version v holds content(p, v), a function of
 *  (p, v) alone (v = 0: zeros); the shapes are zeros, same-filled 8-byte words (the store's
 *  SAME path, also with different high and low 32 bits), compressible, and random (HUGE).
 *  Their writes and discards are page-aligned, 1..64 pages.  Per page: acked (the version
 *  whose request returned 0), inflight (the version of the request under way, DISCARDING for
 *  a discard, 0 for none) and top (the highest version ever used).  A writer sets inflight
 *  before the call, acked after it returned 0, then clears inflight.
 *  Pages [NV, NPAGES) are "byte pages", the target of unaligned writes and discards (any
 *  offset, 1 byte to 64 pages): per page the exact 4 KiB it must hold (expect) and, while a
 *  request covering it is under way, the 4 KiB it holds if that request took effect (alt,
 *  with bflag set before the call and cleared after expect = alt).
 *  Sound and exact: after a crash every page must equal, byte for byte, its acked/expected
 *  content or (only if a request covering it was in flight) that request's content.  A page
 *  is published by one atomic store, so a request cut by the kill may have taken effect on
 *  some of its pages and not on others; each page must still be one or the other.
 *
 * THE CRASH POINTS (--points, only in a build with -DZC_CRASH_POINTS; see csrc/crashpoint.h)
 *  A random SIGKILL almost never lands in the few instructions between two stores that
 *  matter, so in this mode the child dies at the library's marked instructions instead: round
 *  r targets point POINTS[r % NPOINTS] (round-robin over all of them, or one named point) and
 *  a countdown n (log-uniform in 1..2048 or more, see pick_countdown; or a given n).
 *  zc_crash_point() counts every point's hits across the child's threads (in the shared log,
 *  so the parent sees them) and, on the n-th hit of the target, calls _exit(77) there and
 *  then: the whole process ends mid-operation, as in a crash, with the other threads
 *  wherever they are.  The parent does not kill (only after POINT_TIMEOUT_MS, a hang, counted
 *  apart); a child that finishes its POINT_OPS operations per writer first exits 0 (the point
 *  was not reached n times: a clean round).  Either way the parent recovers and checks
 *  exactly as above.  The run fails (exit 1) if any point never crashed a child in the whole
 *  run: the workload must reach them all (SAME over SAME on the version pages p % 8 == 0,
 *  multi-page writes, discards, the compactor's moves, frees that empty pool pages; new
 *  vpages and handle refills, which every attach makes likely again: it gives the handle
 *  caches back).
 *
 * Exit status: 0 when every round held; 1 on the first mismatch, lost page, failed check or
 * child failure (with the round, seed, page, allowed and found contents, and the recovery
 * report on stderr), or (--points) when a point never crashed a child; 2 on bad usage.  A
 * child exits 3 when a read under load disagrees with the model, 4 when its attach or a
 * context fails, 5 when a request fails, 6 when its check fails, 8 when the library names a
 * crash point POINTS does not list; the parent reports those as failures.  77: the child
 * died at its crash point (--points), as intended.
 * Must not: be linked into the extension, have the arena open in two processes at once (the
 * parent closes its store before each fork), touch another writer's pages, or let the crash
 * point hook act in the parent (only a --points child arms it).
 *
 * Usage: crash_store [rounds (200)] [seed (1)]
 *        crash_store --points [rounds (12 per point)] [seed (1)] [point [n]]
 * Build: cc -std=c11 -D_GNU_SOURCE -pthread csrc/crash_store.c csrc/store.c csrc/xcfmalloc.c
 *        csrc/codec.c csrc/arena.c -llz4 -lzstd -lxxhash  (tests/test_core_crash.py); add
 *        -DZC_CRASH_POINTS for --points.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "store.h"
#ifdef ZC_CRASH_POINTS
#include "crashpoint.h"
#endif

#define PAGE ZC_PAGE_SIZE
#define NPAGES 4096u            /* a 16 MiB device */
#define NV 3072u                /* version pages [0, NV); byte pages [NV, NPAGES) */
#define NB (NPAGES - NV)
#define WORKERS 3u
#define MAX_OP_PAGES 64u        /* the largest write in pages (an unaligned one spans 65) */
#define DISCARDING 0xffffffffu  /* inflight: a discard */
#define CLEAN_EVERY 20u         /* every 20th round the child is not killed */
#define CLEAN_OPS 1500u         /* operations per writer in such a round */
#define COMPACT_EVERY 10u       /* the parent compacts completely every 10th round */
#define NPOINTS 13u             /* the crash points (--points) */
#define POINT_OPS 1500u         /* operations per writer in a --points child */
#define POINT_TIMEOUT_MS 5000u  /* a --points child still running then is killed (a hang) */
#define EXIT_AT_POINT 77        /* a --points child's exit status at its crash point */

struct vpage {
	uint32_t acked, inflight, top, pad;
};

/* The shared log.  Stages tell the parent how far the killed child got. */
enum { ST_FORKED = 0, ST_ATTACHING = 1, ST_ATTACHED = 2, ST_RUNNING = 3 };

struct shlog {
	uint32_t stage;
	uint32_t pad;
	uint64_t ops; /* requests the child completed (all writers) */
	uint64_t hits[NPOINTS]; /* --points: the child's hits of each crash point */
	struct vpage v[NV];
	uint32_t bflag[NB];
	uint8_t expect[NB][PAGE];
	uint8_t alt[NB][PAGE];
};

struct worker {
	pthread_t thread;
	unsigned id;
	uint32_t vlo, vhi; /* its version pages [vlo, vhi) */
	uint32_t blo, bhi; /* its byte pages [blo, bhi), absolute page numbers */
	uint64_t rng;
	uint64_t ops_left; /* UINT64_MAX: until killed */
	struct zc_ctx *ctx;
	uint8_t *buf;  /* (MAX_OP_PAGES + 1) pages */
	uint8_t *rbuf; /* (MAX_OP_PAGES + 1) pages */
};

static struct shlog *L;
static struct zc_store *S;
static uint64_t Seed = 1, Salt;
static unsigned Round;
static int stop_compactor; /* __atomic */

#ifdef ZC_CRASH_POINTS
/* The crash points, as csrc/store.c and csrc/xcfmalloc.c name them (grep CRASH_POINT). */
static const char *const POINTS[NPOINTS] = {
	"publish.fill_written", "commit.page_published", "write.before_old_freed",
	"discard.before_old_freed", "pages_put.punched", "handle_refill.one",
	"vpage_new.counted", "store.pages_held", "store.before_entry", "free.slot_cleared",
	"move.copied", "move.entry_moved", "recompress.before_old_freed",
};
static int Target = -1; /* the point a --points child dies at; -1: none (the parent) */
static uint64_t Countdown; /* ... on its Countdown-th hit */
#endif

#define AST(x, v) __atomic_store_n(&(x), (v), __ATOMIC_SEQ_CST)
#define ALD(x) __atomic_load_n(&(x), __ATOMIC_SEQ_CST)

/* ---- helpers ------------------------------------------------------------------------------- */

static uint64_t next(uint64_t *x) /* xorshift64* */
{
	*x ^= *x >> 12;
	*x ^= *x << 25;
	*x ^= *x >> 27;
	return *x * 2685821657736338717ull;
}

static uint64_t below(uint64_t *x, uint64_t n)
{
	return n ? next(x) % n : 0;
}

static uint64_t mix64(uint64_t z) /* splitmix64's finaliser */
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fill_words(uint8_t *b, uint32_t len, uint64_t word)
{
	for (uint32_t i = 0; i < len; i++)
		b[i] = (uint8_t)(word >> (8 * (i % 8)));
}

static const char TEXT[] = "the quick brown fox jumps over the lazy dog\n";

/* The content of version page p at version v (v = 0: zeros).  Non-SAME shapes start with
 * the 8 bytes p << 32 | v, so a wrong page read back names the version it holds. */
static void content(uint32_t p, uint32_t v, uint8_t *out)
{
	if (v == 0) {
		memset(out, 0, PAGE);
		return;
	}
	uint64_t h = mix64(((uint64_t)p << 32 | v) ^ Salt), x = mix64(h) | 1, w;
	unsigned shape = (unsigned)(h % 16);

	if (p % 8 == 0 && shape >= 6 && shape < 14) /* SAME-heavy pages: SAME after SAME */
		shape = 2 + shape % 4;
	switch (shape) {
	case 0:
	case 1:
		memset(out, 0, PAGE);
		return;
	case 2: /* high and low halves differ */
		w = next(&x);
		if ((uint32_t)w == (uint32_t)(w >> 32))
			w ^= 1;
		fill_words(out, PAGE, w);
		return;
	case 3: /* high half zero */
		fill_words(out, PAGE, (uint32_t)next(&x) | 1u);
		return;
	case 4: /* low half zero */
		fill_words(out, PAGE, (uint64_t)((uint32_t)next(&x) | 1u) << 32);
		return;
	case 5: /* both halves the same */
		w = (uint32_t)next(&x) | 1u;
		fill_words(out, PAGE, w | w << 32);
		return;
	case 6:
	case 7:
	case 8:
	case 9:
		for (uint32_t i = 0; i < PAGE; i++)
			out[i] = (uint8_t)TEXT[(next(&x) >> 40) % (sizeof(TEXT) - 1)];
		break;
	case 10:
	case 11: {
		uint32_t step = 64 + (uint32_t)below(&x, 448);

		memset(out, 0, PAGE);
		for (uint32_t i = 0; i < PAGE; i += step)
			out[i] = (uint8_t)(next(&x) >> 56 | 1);
		break;
	}
	default:
		for (uint32_t i = 0; i < PAGE; i += 8) {
			w = next(&x);
			memcpy(out + i, &w, 8);
		}
	}
	w = (uint64_t)p << 32 | v;
	memcpy(out, &w, 8);
}

/* len bytes for a byte-page write: zeros, a fill word, text, sparse, random. */
static void make_data(uint64_t *rng, uint8_t *b, uint32_t len)
{
	unsigned shape = (unsigned)below(rng, 5);
	uint64_t word = next(rng), x = next(rng) | 1;

	switch (shape) {
	case 0:
		memset(b, 0, len);
		break;
	case 1:
		fill_words(b, len, word);
		break;
	case 2:
		for (uint32_t i = 0; i < len; i++)
			b[i] = (uint8_t)TEXT[(next(&x) >> 40) % (sizeof(TEXT) - 1)];
		break;
	case 3:
		for (uint32_t i = 0; i < len; i++)
			b[i] = (uint8_t)(i % 97 == 0 ? next(&x) >> 56 : (i / 64) & 0xff);
		break;
	default:
		for (uint32_t i = 0; i < len; i += 8) {
			uint64_t v = next(&x);

			memcpy(b + i, &v, len - i < 8 ? len - i : 8);
		}
	}
}

static int is_zero(const uint8_t *b, size_t n)
{
	return b[0] == 0 && memcmp(b, b + 1, n - 1) == 0;
}

/* ---- the child ----------------------------------------------------------------------------- */

static void child_fail(int code, const char *fmt, ...)
	__attribute__((format(printf, 2, 3), noreturn));

static void child_fail(int code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fprintf(stderr, "crash_store: child of round %u (seed %llu): FAIL: ", Round,
		(unsigned long long)Seed);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	fflush(stderr);
	_exit(code);
}

/* A run of pages in [lo, hi): 1 page mostly, up to 8 often, up to `most` sometimes. */
static uint32_t pick_pages(uint64_t *rng, uint32_t lo, uint32_t hi, uint32_t most, uint32_t *n)
{
	uint32_t p = lo + (uint32_t)below(rng, hi - lo);
	unsigned k = (unsigned)below(rng, 10);

	*n = k < 6 ? 1 : k < 9 ? 1 + (uint32_t)below(rng, 8) : 1 + (uint32_t)below(rng, most);
	if (*n > hi - p)
		*n = hi - p;
	return p;
}

static void op_vwrite(struct worker *w)
{
	uint32_t n, p0 = pick_pages(&w->rng, w->vlo, w->vhi, MAX_OP_PAGES, &n);
	uint32_t ver[MAX_OP_PAGES];

	for (uint32_t i = 0; i < n; i++) {
		struct vpage *vp = &L->v[p0 + i];

		ver[i] = ALD(vp->top) + 1;
		AST(vp->top, ver[i]);
		content(p0 + i, ver[i], w->buf + (size_t)i * PAGE);
		AST(vp->inflight, ver[i]);
	}
	int rc = zc_store_write(w->ctx, (uint64_t)p0 * PAGE, n * PAGE, w->buf);

	if (rc)
		child_fail(5, "write of pages %u+%u: %d", p0, n, rc);
	for (uint32_t i = 0; i < n; i++) {
		AST(L->v[p0 + i].acked, ver[i]);
		AST(L->v[p0 + i].inflight, 0u);
	}
}

static void op_vdiscard(struct worker *w)
{
	uint32_t n, p0 = pick_pages(&w->rng, w->vlo, w->vhi, below(&w->rng, 4) ? 64 : 600, &n);

	for (uint32_t i = 0; i < n; i++)
		AST(L->v[p0 + i].inflight, DISCARDING);
	int rc = zc_store_discard(w->ctx, (uint64_t)p0 * PAGE, (uint64_t)n * PAGE);

	if (rc)
		child_fail(5, "discard of pages %u+%u: %d", p0, n, rc);
	for (uint32_t i = 0; i < n; i++) {
		AST(L->v[p0 + i].acked, 0u);
		AST(L->v[p0 + i].inflight, 0u);
	}
}

/* A byte range in the worker's byte pages: a quarter of them page-aligned. */
static void pick_bytes(struct worker *w, uint64_t most, uint64_t *off, uint64_t *len)
{
	uint64_t lo = (uint64_t)w->blo * PAGE, bytes = (uint64_t)(w->bhi - w->blo) * PAGE;

	if (below(&w->rng, 4) == 0) {
		uint32_t n, p = pick_pages(&w->rng, w->blo, w->bhi, MAX_OP_PAGES, &n);

		*off = (uint64_t)p * PAGE;
		*len = (uint64_t)n * PAGE;
		return;
	}
	*off = lo + below(&w->rng, bytes);
	*len = 1 + below(&w->rng, below(&w->rng, 5) ? 3 * PAGE : most);
	if (*len > lo + bytes - *off)
		*len = lo + bytes - *off;
}

/* A write (data) or discard (NULL) of [off, off + len) in the byte pages. */
static void op_bytes(struct worker *w, int write)
{
	uint64_t off, len;

	pick_bytes(w, (uint64_t)MAX_OP_PAGES * PAGE, &off, &len);
	uint32_t first = (uint32_t)(off / PAGE), last = (uint32_t)((off + len - 1) / PAGE);

	if (write)
		make_data(&w->rng, w->buf, (uint32_t)len);
	for (uint32_t p = first; p <= last; p++) {
		uint32_t b = p - NV;
		uint64_t base = (uint64_t)p * PAGE;
		uint64_t lo = off > base ? off - base : 0;
		uint64_t hi = off + len < base + PAGE ? off + len - base : PAGE;

		memcpy(L->alt[b], L->expect[b], PAGE);
		if (write)
			memcpy(L->alt[b] + lo, w->buf + (base + lo - off), hi - lo);
		else
			memset(L->alt[b] + lo, 0, hi - lo);
		AST(L->bflag[b], 1u);
	}
	int rc = write ? zc_store_write(w->ctx, off, (uint32_t)len, w->buf)
		       : zc_store_discard(w->ctx, off, len);

	if (rc)
		child_fail(5, "%s of bytes %llu+%llu: %d", write ? "write" : "discard",
			   (unsigned long long)off, (unsigned long long)len, rc);
	for (uint32_t p = first; p <= last; p++) {
		memcpy(L->expect[p - NV], L->alt[p - NV], PAGE);
		AST(L->bflag[p - NV], 0u);
	}
}

/* A read of the worker's own pages (none in flight: it is their only writer). */
static void op_read(struct worker *w)
{
	uint32_t n, p0;
	int vpages = (int)below(&w->rng, 2);

	if (vpages)
		p0 = pick_pages(&w->rng, w->vlo, w->vhi, MAX_OP_PAGES, &n);
	else
		p0 = pick_pages(&w->rng, w->blo, w->bhi, MAX_OP_PAGES, &n);
	int rc = zc_store_read(w->ctx, (uint64_t)p0 * PAGE, n * PAGE, w->rbuf);

	if (rc)
		child_fail(3, "read of pages %u+%u: %d", p0, n, rc);
	for (uint32_t i = 0; i < n; i++) {
		uint32_t p = p0 + i;
		const uint8_t *got = w->rbuf + (size_t)i * PAGE;

		if (vpages) {
			content(p, L->v[p].acked, w->buf);
			if (memcmp(got, w->buf, PAGE))
				child_fail(3, "page %u read under load is not version %u", p,
					   L->v[p].acked);
		} else if (memcmp(got, L->expect[p - NV], PAGE)) {
			child_fail(3, "byte page %u read under load differs from the model", p);
		}
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	while (w->ops_left == UINT64_MAX || w->ops_left-- > 0) {
		unsigned op = (unsigned)below(&w->rng, 20);

		if (op < 7)
			op_vwrite(w);
		else if (op < 9)
			op_vdiscard(w);
		else if (op < 13)
			op_bytes(w, 1);
		else if (op < 15)
			op_bytes(w, 0);
		else
			op_read(w);
		__atomic_fetch_add(&L->ops, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void *compactor_main(void *arg)
{
	struct zc_ctx *c = zc_ctx_new(S, 2);
	struct zc_recompress_report rr;
	uint64_t round = 0, cursor = 0;

	(void)arg;
	if (!c)
		child_fail(4, "compactor: zc_ctx_new");
	while (!ALD(stop_compactor)) {
		(void)zc_store_compact(S, 64);
		zc_store_tick(S);
		cursor = zc_store_recompress(c, cursor, 64, 1, 1, &rr);
		if (cursor >= NPAGES)
			cursor = 0;
		if (round % 8 == 0) { /* dictionaries: trained, made current, the last retired */
			unsigned id;

			if (zc_store_train_dict(S, 4096, 1, &id) == 0)
				(void)zc_store_sample(S, ZC_MIN_SAMPLES, 1);
		}
		if (++round % 256 == 0) {
			uint64_t bad = 0;

			zc_store_scrub(c, &bad, NULL, 0);
			if (bad)
				child_fail(3, "scrub under load found %llu bad pages",
					   (unsigned long long)bad);
		}
	}
	zc_ctx_free(c);
	return NULL;
}

/* ops: requests per writer, UINT64_MAX: until killed. */
static void child(int fd, uint64_t ops)
{
	static struct worker ws[WORKERS];
	struct zc_recovery rep;
	pthread_t comp;
	int err;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	AST(L->stage, (uint32_t)ST_ATTACHING);
	S = zc_store_attach(fd, &rep, &err);
	if (!S)
		child_fail(4, "zc_store_attach: %d", err);
	AST(L->stage, (uint32_t)ST_ATTACHED);
	for (unsigned i = 0; i < WORKERS; i++) {
		struct worker *w = &ws[i];

		w->id = i;
		w->vlo = i * NV / WORKERS;
		w->vhi = (i + 1) * NV / WORKERS;
		w->blo = NV + i * NB / WORKERS;
		w->bhi = NV + (i + 1) * NB / WORKERS;
		w->rng = mix64(Seed * 1000003u + Round * 7919u + i) | 1;
		w->ops_left = ops;
		w->ctx = zc_ctx_new(S, 1 + (int)(i % 2));
		w->buf = malloc((size_t)(MAX_OP_PAGES + 1) * PAGE);
		w->rbuf = malloc((size_t)(MAX_OP_PAGES + 1) * PAGE);
		if (!w->ctx || !w->buf || !w->rbuf)
			child_fail(4, "worker %u: zc_ctx_new or malloc", i);
	}
	if (zc_store_sample(S, ZC_MIN_SAMPLES, 1))
		child_fail(4, "zc_store_sample");
	if (pthread_create(&comp, NULL, compactor_main, NULL))
		child_fail(4, "pthread_create");
	for (unsigned i = 0; i < WORKERS; i++)
		if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]))
			child_fail(4, "pthread_create");
	AST(L->stage, (uint32_t)ST_RUNNING);
	for (unsigned i = 0; i < WORKERS; i++)
		pthread_join(ws[i].thread, NULL);
	AST(stop_compactor, 1);
	pthread_join(comp, NULL);
	int rc = zc_store_check(S);

	if (rc)
		child_fail(6, "zc_store_check after the clean run: %d", rc);
	for (unsigned i = 0; i < WORKERS; i++) {
		zc_ctx_free(ws[i].ctx);
		free(ws[i].buf);
		free(ws[i].rbuf);
	}
	zc_store_close(S);
	exit(0); /* (LeakSanitizer runs here in an ASan build) */
}

#ifdef ZC_CRASH_POINTS
/* The library's crash point hook (csrc/crashpoint.h).  Unarmed (the parent, and the children
 * of the random-kill mode): nothing.  Armed (a --points child): count the hit and, on the
 * Countdown-th hit of the Target, end the process right here. */
void zc_crash_point(const char *name)
{
	unsigned i = 0;

	if (Target < 0)
		return;
	while (i < NPOINTS && strcmp(name, POINTS[i]))
		i++;
	if (i == NPOINTS)
		child_fail(8, "the library names crash point \"%s\", which POINTS does not list",
			   name);
	if (__atomic_add_fetch(&L->hits[i], 1, __ATOMIC_RELAXED) == Countdown &&
	    (int)i == Target)
		_exit(EXIT_AT_POINT);
}
#endif

/* ---- the parent ---------------------------------------------------------------------------- */

static struct zc_recovery Rep; /* the parent's last recovery */
static unsigned Kills, Clean, KilledEarly, Attaches;
static uint64_t Forks, Orphans, PagesFreed, MaxNs, ToNew, ToOld, TornReqs;

#ifdef ZC_CRASH_POINTS
static int PointsMode, OnePoint = -1; /* --points; its one named point (-1: all in turn) */
static uint64_t OneN;                 /* its given countdown (0: random) */
static int RoundPoint;                /* this round's target and countdown */
static uint64_t RoundN;
static const char *ChildEnd = "";     /* how this round's child ended */
#endif

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	if (Forks)
		fprintf(stderr, "crash_store: FAIL in round %u (seed %llu): ", Round,
			(unsigned long long)Seed);
	else
		fprintf(stderr, "crash_store: FAIL before the first round (seed %llu): ",
			(unsigned long long)Seed);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	if (Forks)
		fprintf(stderr, "crash_store: that round's child reached stage %u (0 forked,"
			" 1 attaching, 2 attached, 3 running) after %llu requests\n", L->stage,
			(unsigned long long)L->ops);
	fprintf(stderr, "crash_store: recovery report: pages %llu objects %llu orphans %llu"
		" lost_pages %llu pages_freed %llu ns %llu\n", (unsigned long long)Rep.pages,
		(unsigned long long)Rep.objects, (unsigned long long)Rep.orphans,
		(unsigned long long)Rep.lost_pages, (unsigned long long)Rep.pages_freed,
		(unsigned long long)Rep.ns);
#ifdef ZC_CRASH_POINTS
	if (PointsMode) {
		if (Forks)
			fprintf(stderr, "crash_store: that round's child was to die at hit %llu of"
				" %s, counted %llu hits of it and %s\n",
				(unsigned long long)RoundN, POINTS[RoundPoint],
				(unsigned long long)L->hits[RoundPoint], ChildEnd);
		fprintf(stderr, "crash_store: reproduce (thread timing varies): crash_store"
			" --points %u %llu", Round + 1, (unsigned long long)Seed);
		if (OnePoint >= 0)
			fprintf(stderr, " %s", POINTS[OnePoint]);
		if (OneN)
			fprintf(stderr, " %llu", (unsigned long long)OneN);
		if (Forks)
			fprintf(stderr, "; this point and countdown alone: crash_store --points"
				" 50 %llu %s %llu", (unsigned long long)Seed, POINTS[RoundPoint],
				(unsigned long long)RoundN);
		fputc('\n', stderr);
		fflush(stderr);
		_exit(1);
	}
#endif
	fprintf(stderr, "crash_store: reproduce (timing varies): crash_store %u %llu\n", Round + 1,
		(unsigned long long)Seed);
	fflush(stderr);
	_exit(1); /* not exit(): what is open stays open, no leak report on top */
}

static void hex(char *out, const uint8_t *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", b[i]);
}

/* What a page found holds, for the failure message. */
static void describe(char *out, size_t size, const uint8_t *got)
{
	char h[33];
	uint64_t w;

	hex(h, got, 16);
	memcpy(&w, got, 8);
	int same = 1;

	for (uint32_t i = 8; i < PAGE && same; i += 8)
		same = memcmp(got, got + i, 8) == 0;
	if (same)
		snprintf(out, size, "same-filled with word %016llx", (unsigned long long)w);
	else
		snprintf(out, size, "starts %s (as a version page's header: page %u version %u)", h,
			 (unsigned)(w >> 32), (unsigned)w);
}

static void mismatch_v(uint32_t p, const uint8_t *got, const uint8_t *want)
{
	const struct vpage *vp = &L->v[p];
	char d[160], e[160];
	uint32_t at = 0, holds = UINT32_MAX;

	while (at < PAGE && got[at] == want[at])
		at++;
	describe(d, sizeof(d), got);
	describe(e, sizeof(e), want);
	for (uint32_t v = 0; v <= vp->top && holds == UINT32_MAX; v++) {
		uint8_t b[PAGE];

		content(p, v, b);
		if (!memcmp(b, got, PAGE))
			holds = v;
	}
	fail("page %u (version page): acked version %u, in flight %s%u (top %u); the page is %s;"
	     " version %u is %s; first difference at byte %u; %s", p, vp->acked,
	     vp->inflight == DISCARDING ? "DISCARD " : "",
	     vp->inflight == DISCARDING ? 0 : vp->inflight, vp->top, d, vp->acked, e, at,
	     holds == UINT32_MAX ? "it is no version of this page"
				 : "it is an older/other version of this page");
}

static void mismatch_b(uint32_t p, const uint8_t *got)
{
	uint32_t b = p - NV, at = 0, at2 = 0;
	char d[160], e[160], a[160];

	while (at < PAGE && got[at] == L->expect[b][at])
		at++;
	while (at2 < PAGE && got[at2] == L->alt[b][at2])
		at2++;
	describe(d, sizeof(d), got);
	describe(e, sizeof(e), L->expect[b]);
	describe(a, sizeof(a), L->alt[b]);
	fail("page %u (byte page): a request in flight: %s; the page is %s; expected %s%s%s;"
	     " first difference from the expected bytes at %u, from the in-flight ones at %u", p,
	     L->bflag[b] ? "yes" : "no", d, e, L->bflag[b] ? " or, in flight, " : "",
	     L->bflag[b] ? a : "", at, L->bflag[b] ? at2 : 0);
}

/* Read back and check every page; with settle, resolve every in-flight request in the model
 * to what the page holds.  Returns the number of non-zero pages. */
static uint64_t verify_all(struct zc_ctx *c, uint8_t *buf, int settle)
{
	uint8_t want[PAGE];
	uint64_t nonzero = 0;

	for (uint32_t p0 = 0; p0 < NPAGES; p0 += MAX_OP_PAGES) {
		int rc = zc_store_read(c, (uint64_t)p0 * PAGE, MAX_OP_PAGES * PAGE, buf);

		if (rc) {
			for (uint32_t p = p0; p < p0 + MAX_OP_PAGES; p++) {
				rc = zc_store_read(c, (uint64_t)p * PAGE, PAGE, buf);
				if (rc)
					fail("page %u reads as %d after recovery (a lost page;"
					     " %s)", p, rc, p < NV ? "version page" : "byte page");
			}
			fail("pages %u+%u read as %d, each alone reads", p0, MAX_OP_PAGES, rc);
		}
		int torn_new = 0, torn_old = 0;

		for (uint32_t i = 0; i < MAX_OP_PAGES; i++) {
			uint32_t p = p0 + i;
			const uint8_t *got = buf + (size_t)i * PAGE;

			nonzero += !is_zero(got, PAGE);
			if (p < NV) {
				struct vpage *vp = &L->v[p];

				content(p, vp->acked, want);
				if (!memcmp(got, want, PAGE)) {
					if (settle && vp->inflight) {
						vp->inflight = 0;
						ToOld++;
						torn_old = 1;
					}
					continue;
				}
				if (vp->inflight == DISCARDING) {
					memset(want, 0, PAGE);
				} else if (vp->inflight) {
					content(p, vp->inflight, want);
				} else {
					content(p, vp->acked, want);
					mismatch_v(p, got, want);
				}
				if (memcmp(got, want, PAGE)) {
					content(p, vp->acked, want);
					mismatch_v(p, got, want);
				}
				if (settle) {
					vp->acked = vp->inflight == DISCARDING ? 0 : vp->inflight;
					vp->inflight = 0;
					ToNew++;
					torn_new = 1;
				}
			} else {
				uint32_t b = p - NV;

				if (!memcmp(got, L->expect[b], PAGE)) {
					if (settle && L->bflag[b]) {
						L->bflag[b] = 0;
						ToOld++;
					}
					continue;
				}
				if (!L->bflag[b] || memcmp(got, L->alt[b], PAGE))
					mismatch_b(p, got);
				if (settle) {
					memcpy(L->expect[b], got, PAGE);
					L->bflag[b] = 0;
					ToNew++;
				}
			}
		}
		TornReqs += torn_new && torn_old; /* (a hint only: the pages of one 64-page block) */
	}
	return nonzero;
}

static void check_counters(struct zc_store *s, uint64_t nonzero, const char *when)
{
	struct zc_store_stats st;

	zc_store_stats(s, &st);
	if (st.lost_pages || Rep.lost_pages)
		fail("%s: lost_pages %llu (report %llu): a crash lost pages", when,
		     (unsigned long long)st.lost_pages, (unsigned long long)Rep.lost_pages);
	if (st.checksum_errors || st.failed_reads)
		fail("%s: checksum_errors %llu failed_reads %llu", when,
		     (unsigned long long)st.checksum_errors, (unsigned long long)st.failed_reads);
	if (st.npages != NPAGES || st.pages_stored > st.npages || st.pages_stored < nonzero)
		fail("%s: pages_stored %llu of %llu, %llu pages read non-zero", when,
		     (unsigned long long)st.pages_stored, (unsigned long long)st.npages,
		     (unsigned long long)nonzero);
	if (st.mem_used_max < st.mem_used_total || st.compr_data_size > st.mem_used_total)
		fail("%s: mem_used_max %llu mem_used_total %llu compr_data_size %llu", when,
		     (unsigned long long)st.mem_used_max, (unsigned long long)st.mem_used_total,
		     (unsigned long long)st.compr_data_size);
	if (st.recoveries < Attaches || st.recoveries > Attaches + Forks)
		fail("%s: recoveries %llu, the parent attached %u times, %llu children", when,
		     (unsigned long long)st.recoveries, Attaches, (unsigned long long)Forks);
}

/* The parent's recovery and checks after a round. */
static void recover_and_check(int fd, int compact)
{
	struct zc_store_stats st;
	int err, rc;

	memset(&Rep, 0, sizeof(Rep));
	struct zc_store *s = zc_store_attach(fd, &Rep, &err);

	if (!s)
		fail("zc_store_attach: %d", err);
	Attaches++;
	Orphans += Rep.orphans;
	PagesFreed += Rep.pages_freed;
	if (Rep.ns > MaxNs)
		MaxNs = Rep.ns;
	rc = zc_store_check(s);
	if (rc)
		fail("zc_store_check after recovery: %d", rc);
	zc_store_stats(s, &st);
	if (st.objects != Rep.objects || st.pages_stored != Rep.pages)
		fail("after recovery: stats objects %llu pages_stored %llu, report objects %llu"
		     " pages %llu", (unsigned long long)st.objects,
		     (unsigned long long)st.pages_stored, (unsigned long long)Rep.objects,
		     (unsigned long long)Rep.pages);
	if (Rep.objects > Rep.pages)
		fail("after recovery: %llu objects for %llu pages", (unsigned long long)Rep.objects,
		     (unsigned long long)Rep.pages);

	struct zc_ctx *c = zc_ctx_new(s, 1);
	uint8_t *buf = malloc((size_t)MAX_OP_PAGES * PAGE);

	if (!c || !buf)
		fail("zc_ctx_new or malloc");
	uint64_t nonzero = verify_all(c, buf, 1);

	check_counters(s, nonzero, "after recovery");
	if (compact) {
		(void)zc_store_compact(s, 0);
		rc = zc_store_check(s);
		if (rc)
			fail("zc_store_check after recovery and a full compaction: %d", rc);
		nonzero = verify_all(c, buf, 0);
		check_counters(s, nonzero, "after recovery and a full compaction");
	}
	free(buf);
	zc_ctx_free(c);
	zc_store_close(s);
}

/* The first content of every page, written by the parent into the new store. */
static void populate(struct zc_store *s, uint64_t *rng)
{
	struct zc_ctx *c = zc_ctx_new(s, 1);
	uint8_t *buf = malloc((size_t)MAX_OP_PAGES * PAGE);

	if (!c || !buf)
		fail("zc_ctx_new or malloc");
	for (uint32_t p0 = 0; p0 < NPAGES; p0 += MAX_OP_PAGES) {
		for (uint32_t i = 0; i < MAX_OP_PAGES; i++) {
			uint32_t p = p0 + i;
			uint8_t *b = buf + (size_t)i * PAGE;

			if (p < NV) {
				L->v[p].acked = L->v[p].top = 1;
				content(p, 1, b);
			} else {
				make_data(rng, b, PAGE);
				memcpy(L->expect[p - NV], b, PAGE);
			}
		}
		int rc = zc_store_write(c, (uint64_t)p0 * PAGE, MAX_OP_PAGES * PAGE, buf);

		if (rc)
			fail("populate: write of pages %u+%u: %d", p0, MAX_OP_PAGES, rc);
	}
	free(buf);
	zc_ctx_free(c);
}

/* Wait until the child's workers run; 1 (and its status) if it ended before. */
static int wait_running(pid_t pid, int *status)
{
	while (ALD(L->stage) < ST_RUNNING) {
		struct timespec t = {0, 20000};
		pid_t r = waitpid(pid, status, WNOHANG);

		if (r == pid)
			return 1;
		if (r < 0)
			fail("waitpid: %s", strerror(errno));
		nanosleep(&t, NULL);
	}
	return 0;
}

/* How long the parent lets the child run: 0 to 30 ms, most of the mass short. */
static uint64_t pick_sleep_us(uint64_t *rng)
{
	switch (below(rng, 10)) {
	case 0: return 0;
	case 1: return below(rng, 50);
	case 2:
	case 3: return below(rng, 1000);
	case 4:
	case 5:
	case 6: return below(rng, 5000);
	default: return below(rng, 30001);
	}
}

static unsigned long parse(const char *s, const char *what)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);

	if (!*s || *end) {
		fprintf(stderr, "crash_store: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

#ifdef ZC_CRASH_POINTS
/* ---- the parent, --points ------------------------------------------------------------------ */

static unsigned PtRounds[NPOINTS], PtCrashed[NPOINTS], InAttach;
static uint64_t PtMaxHits[NPOINTS]; /* the most hits of each point in one child */

static uint64_t now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

/* Wait for the child; kill it once POINT_TIMEOUT_MS have passed.  1 if it was killed. */
static int wait_or_kill(pid_t pid, int *status)
{
	uint64_t deadline = now_ms() + POINT_TIMEOUT_MS;

	for (;;) {
		struct timespec t = {0, 1000000};
		pid_t r = waitpid(pid, status, WNOHANG);

		if (r == pid)
			return 0;
		if (r < 0)
			fail("waitpid: %s", strerror(errno));
		if (now_ms() >= deadline) {
			kill(pid, SIGKILL);
			if (waitpid(pid, status, 0) != pid)
				fail("waitpid: %s", strerror(errno));
			return 1;
		}
		nanosleep(&t, NULL);
	}
}

/* The countdown for point pt: log-uniform in 1..top, so that the first hits of a child (its
 * attach, its first requests) are targeted as often as its last ones; top is 2048 or, for a
 * point hit more often in one child so far, that many hits rounded up to a power of two, so
 * that the whole of a child's run is in reach. */
static uint64_t pick_countdown(uint64_t *rng, unsigned pt)
{
	unsigned bits = 11;

	while (bits < 40 && 1ull << bits < PtMaxHits[pt])
		bits++;
	return 1 + below(rng, 1ull << below(rng, bits + 1));
}

static int point_of(const char *s)
{
	for (unsigned i = 0; i < NPOINTS; i++)
		if (!strcmp(s, POINTS[i]))
			return (int)i;
	fprintf(stderr, "crash_store: no crash point %s; the points are:", s);
	for (unsigned i = 0; i < NPOINTS; i++)
		fprintf(stderr, " %s", POINTS[i]);
	fputc('\n', stderr);
	exit(2);
}

static int run_points(int fd, uint64_t *rng, unsigned rounds)
{
	unsigned crashed = 0, clean = 0, hung = 0, missing = 0;

	for (Round = 0; Round < rounds; Round++) {
		int status;

		RoundPoint = OnePoint >= 0 ? OnePoint : (int)(Round % NPOINTS);
		RoundN = OneN ? OneN : pick_countdown(rng, (unsigned)RoundPoint);
		L->stage = ST_FORKED;
		L->ops = 0;
		memset(L->hits, 0, sizeof(L->hits));
		ChildEnd = "was still running";
		fflush(stdout);
		fflush(stderr);
		pid_t pid = fork();

		if (pid < 0)
			fail("fork: %s", strerror(errno));
		if (pid == 0) {
			Target = RoundPoint; /* armed in the child only */
			Countdown = RoundN;
			child(fd, POINT_OPS);
		}
		Forks++;
		int killed = wait_or_kill(pid, &status);
		unsigned pt = (unsigned)RoundPoint;
		uint64_t hits = L->hits[pt];

		PtRounds[pt]++;
		for (unsigned i = 0; i < NPOINTS; i++)
			if (L->hits[i] > PtMaxHits[i])
				PtMaxHits[i] = L->hits[i];
		if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_AT_POINT) {
			ChildEnd = "died there (exit 77)";
			if (hits < RoundN)
				fail("the child exited %d with only %llu hits of its crash point",
				     EXIT_AT_POINT, (unsigned long long)hits);
			PtCrashed[pt]++;
			crashed++;
			InAttach += L->stage < ST_ATTACHED;
		} else if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
			ChildEnd = "finished its work first (exit 0)";
			if (hits >= RoundN)
				fail("the child passed its crash point and exited 0");
			clean++;
		} else if (killed && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) {
			ChildEnd = "was killed after the timeout";
			fprintf(stderr, "crash_store: round %u (seed %llu): the child (to die at hit"
				" %llu of %s, at %llu hits, stage %u, %llu requests) was still running"
				" after %u ms: killed (a hang?)\n", Round, (unsigned long long)Seed,
				(unsigned long long)RoundN, POINTS[pt], (unsigned long long)hits,
				L->stage, (unsigned long long)L->ops, POINT_TIMEOUT_MS);
			hung++;
		} else {
			ChildEnd = "failed";
			fail("the child ended with status %#x (exit %d, signal %d)", status,
			     WIFEXITED(status) ? WEXITSTATUS(status) : -1,
			     WIFSIGNALED(status) ? WTERMSIG(status) : 0);
		}
		recover_and_check(fd, Round % COMPACT_EVERY == COMPACT_EVERY - 1);
	}
	for (unsigned i = 0; i < NPOINTS; i++)
		missing += !PtCrashed[i] && (OnePoint < 0 || (int)i == OnePoint);
	printf("crash_store: %s: --points %u rounds (seed %llu): %u crashes at a point (%u in the"
	       " child's attach), %u clean exits (the point not reached), %u killed after %u ms"
	       " (hung); recoveries freed %llu orphans and %llu pool pages, max %llu ns;"
	       " in-flight pages found old %llu, new %llu (%llu blocks with both)\n",
	       missing ? "FAIL" : "ok", rounds, (unsigned long long)Seed, crashed, InAttach, clean,
	       hung, POINT_TIMEOUT_MS, (unsigned long long)Orphans,
	       (unsigned long long)PagesFreed, (unsigned long long)MaxNs,
	       (unsigned long long)ToOld, (unsigned long long)ToNew,
	       (unsigned long long)TornReqs);
	printf("crash_store: crashes per point (crashed/rounds, most hits in one child):");
	for (unsigned i = 0; i < NPOINTS; i++)
		printf(" %s %u/%u (%llu)", POINTS[i], PtCrashed[i], PtRounds[i],
		       (unsigned long long)PtMaxHits[i]);
	printf("\n");
	fflush(stdout);
	if (missing) {
		fprintf(stderr, "crash_store: FAIL (seed %llu): no child crashed at:",
			(unsigned long long)Seed);
		for (unsigned i = 0; i < NPOINTS; i++)
			if (!PtCrashed[i] && (OnePoint < 0 || (int)i == OnePoint))
				fprintf(stderr, " %s", POINTS[i]);
		fprintf(stderr, " (too few rounds, or the workload does not reach it)\n");
		return 1;
	}
	return 0;
}
#endif

int main(int argc, char **argv)
{
	unsigned rounds = 200;
	int err, points = argc > 1 && !strcmp(argv[1], "--points");
	char **arg = argv + 1 + points;
	int nargs = argc - 1 - points;

	if (nargs > (points ? 4 : 2)) {
		fprintf(stderr, "usage: %s [rounds] [seed]\n"
			"       %s --points [rounds] [seed] [point [n]]\n", argv[0], argv[0]);
		return 2;
	}
#ifdef ZC_CRASH_POINTS
	PointsMode = points;
	if (points)
		rounds = 12 * NPOINTS;
	if (nargs > 2)
		OnePoint = point_of(arg[2]);
	if (nargs > 3 && !(OneN = parse(arg[3], "n")))
		OneN = 1;
#else
	if (points) {
		fprintf(stderr, "crash_store: --points needs a build with -DZC_CRASH_POINTS\n");
		return 2;
	}
#endif
	if (nargs > 0)
		rounds = (unsigned)parse(arg[0], "rounds");
	if (nargs > 1)
		Seed = parse(arg[1], "seed");
	Salt = mix64(Seed ^ 0x5a17c0ffee);

	void *m = mmap(NULL, sizeof(struct shlog), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (m == MAP_FAILED) {
		perror("crash_store: mmap");
		return 1;
	}
	L = m;

	struct zc_store_config cfg = {
		.size = (uint64_t)NPAGES * PAGE,
		.compressor = ZC_LZ4,
		.level = 1,
		.huge_threshold = 3584,
		.mem_limit = 0,
		.heaps = 2,
	};
	uint64_t rng = mix64(Seed) | 1;
	struct zc_store *s = zc_store_open(&cfg, &err);

	if (!s)
		fail("zc_store_open: %d", err);
	int fd = dup(zc_store_memfd(s)); /* ours, kept across the stores that come and go */

	if (fd < 0)
		fail("dup: %s", strerror(errno));
	populate(s, &rng);
	zc_store_close(s);
	recover_and_check(fd, 0); /* a clean close, then an attach: nothing in flight */
#ifdef ZC_CRASH_POINTS
	if (points) {
		int rc = run_points(fd, &rng, rounds);

		close(fd);
		munmap(m, sizeof(struct shlog));
		return rc;
	}
#endif

	for (Round = 0; Round < rounds; Round++) {
		int clean = Round % CLEAN_EVERY == CLEAN_EVERY - 1;
		uint64_t us = pick_sleep_us(&rng);
		int status;

		L->stage = ST_FORKED;
		L->ops = 0;
		fflush(stdout);
		fflush(stderr);
		pid_t pid = fork();

		if (pid < 0)
			fail("fork: %s", strerror(errno));
		if (pid == 0)
			child(fd, clean ? CLEAN_OPS : UINT64_MAX);
		Forks++;
		int ended = 0;

		if (!clean) {
			/* Mostly under load: the sleep starts when the workers run; one round
			 * in 8 from the fork, to kill attaches too. */
			if (below(&rng, 8))
				ended = wait_running(pid, &status);
			if (us && !ended) {
				struct timespec t = {(time_t)(us / 1000000),
						     (long)(us % 1000000) * 1000};

				nanosleep(&t, NULL);
			}
			if (!ended)
				kill(pid, SIGKILL);
		}
		if (!ended && waitpid(pid, &status, 0) != pid)
			fail("waitpid: %s", strerror(errno));
		if (clean) {
			if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
				fail("the clean child ended with status %#x (exit %d, signal %d)",
				     status, WIFEXITED(status) ? WEXITSTATUS(status) : -1,
				     WIFSIGNALED(status) ? WTERMSIG(status) : 0);
			Clean++;
		} else {
			if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGKILL)
				fail("the child ended with status %#x (exit %d, signal %d) before"
				     " its kill", status, WIFEXITED(status) ? WEXITSTATUS(status) : -1,
				     WIFSIGNALED(status) ? WTERMSIG(status) : 0);
			Kills++;
			KilledEarly += L->stage < ST_RUNNING;
		}
		recover_and_check(fd, Round % COMPACT_EVERY == COMPACT_EVERY - 1);
	}
	close(fd);
	munmap(m, sizeof(struct shlog));
	printf("crash_store: ok: %u rounds (seed %llu): %u kills (%u before the workers ran),"
	       " %u clean exits; recoveries freed %llu orphans and %llu pool pages, max %llu ns;"
	       " in-flight pages found old %llu, new %llu (%llu blocks with both)\n",
	       rounds, (unsigned long long)Seed, Kills, KilledEarly, Clean,
	       (unsigned long long)Orphans, (unsigned long long)PagesFreed,
	       (unsigned long long)MaxNs, (unsigned long long)ToOld, (unsigned long long)ToNew,
	       (unsigned long long)TornReqs);
	return 0;
}
