/* stress_store.c - a multi-threaded stress program for the store API (store.h).
 *
 * Owns: running W worker threads against one store, each on its own disjoint range of device
 * pages with its own context and a private shadow copy of that range, doing random writes,
 * reads and discards of random sizes and offsets (aligned and byte-unaligned, 1 byte to
 * 1 MiB, of zero, same-filled, compressible and incompressible data); one more thread that
 * compacts in a loop (with stats, reclaimable bytes and scrubs in between); and, once they
 * are joined, zc_store_check, a full verify of the device against the shadows, a complete
 * compaction, a second check and verify, and the counters' consistency.  The ranges are
 * disjoint but the stripe locks, heaps, size classes and pool pages are shared, so every
 * cross-thread path of store.c and xcfmalloc.c is exercised under ASan/UBSan and TSan.
 * Exit status: 0 when every byte read matched and every check held, 1 on the first mismatch
 * or failed call (with a message on stderr), 2 on bad usage.
 * Must not: be linked into the extension, share a context between threads, or touch another
 * worker's pages (each shadow must stay exact).
 *
 * Usage: stress_store [-i iterations per worker] [-w workers] [-p pages per worker]
 *                     [-s seed] [-z] (zstd instead of lz4) [-m mem_limit pages]
 * With -m, writes may fail with ENOSPC; the shadow then keeps the old bytes (S2 of store.c).
 * Build: cc -std=c11 -D_GNU_SOURCE -pthread -fsanitize=... csrc/stress_store.c csrc/store.c
 *        csrc/xcfmalloc.c csrc/codec.c csrc/arena.c -llz4 -lzstd -lxxhash
 * (tests/test_core_sanitizers.py builds it with ASan+UBSan and with TSan).
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store.h"

#define MAX_WORKERS 16
#define MAX_REQ (ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE)

struct opts {
	unsigned iterations, workers, pages;
	uint64_t seed, mem_limit_pages;
	int zstd;
};

struct worker {
	pthread_t thread;
	unsigned id;
	uint64_t base;   /* first device byte of the range */
	uint64_t bytes;  /* length of the range */
	uint8_t *shadow; /* what the range must read back as */
	uint8_t *buf;    /* MAX_REQ bytes */
	uint64_t rng;
	uint64_t writes, reads, discards, enospc;
};

static struct zc_store *S;
static struct opts O = {.iterations = 20000, .workers = 3, .pages = 2048, .seed = 1};
static atomic_int stop_compactor;
static atomic_ullong compactions, moved_total;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("stress_store: FAIL: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	fflush(stderr);
	_exit(1); /* other threads are still running: no atexit handlers */
}

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

/* len bytes of one of five shapes: zeros, an 8-byte fill word (SAME pages), text-like,
 * compressible with a little noise, random (stored raw: HUGE pages). */
static void make_data(uint64_t *rng, uint8_t *b, uint32_t len)
{
	unsigned shape = (unsigned)below(rng, 5);
	uint64_t word = next(rng), x = next(rng) | 1;

	switch (shape) {
	case 0:
		memset(b, 0, len);
		break;
	case 1:
		for (uint32_t i = 0; i < len; i++)
			b[i] = (uint8_t)(word >> (8 * (i % 8)));
		break;
	case 2:
		for (uint32_t i = 0; i < len; i++)
			b[i] = (uint8_t)("the quick brown fox\n"[(next(&x) >> 40) % 20]);
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

/* A random request inside the worker's range: *off relative to the range, length in
 * [1, most].  Half of them page-aligned, as the loop device sends. */
static void pick_range(struct worker *w, uint64_t most, uint64_t *off, uint64_t *len)
{
	uint64_t pages = w->bytes / ZC_PAGE_SIZE;

	if (below(&w->rng, 2)) {
		uint64_t np = 1 + below(&w->rng, below(&w->rng, 4) ? 8 : most / ZC_PAGE_SIZE);

		*off = below(&w->rng, pages) * ZC_PAGE_SIZE;
		*len = np * ZC_PAGE_SIZE;
	} else {
		*off = below(&w->rng, w->bytes);
		*len = 1 + below(&w->rng, below(&w->rng, 4) ? 3 * ZC_PAGE_SIZE : most);
	}
	if (*len > w->bytes - *off)
		*len = w->bytes - *off;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct zc_ctx *c = zc_ctx_new(S, 1 + (int)(w->id % 2));

	if (!c)
		fail("worker %u: zc_ctx_new", w->id);
	for (unsigned it = 0; it < O.iterations; it++) {
		unsigned op = (unsigned)below(&w->rng, 10);
		uint64_t off, len;
		int rc;

		pick_range(w, op < 8 ? MAX_REQ : 4 * (uint64_t)MAX_REQ, &off, &len);
		if (op < 4) {
			make_data(&w->rng, w->buf, (uint32_t)len);
			rc = zc_store_write(c, w->base + off, (uint32_t)len, w->buf);
			if (rc == 0)
				memcpy(w->shadow + off, w->buf, len);
			else if (rc == -ENOSPC && O.mem_limit_pages)
				w->enospc++;
			else
				fail("worker %u: write %llu+%llu rc %d", w->id,
				     (unsigned long long)(w->base + off), (unsigned long long)len, rc);
			w->writes++;
		} else if (op < 8) {
			rc = zc_store_read(c, w->base + off, (uint32_t)len, w->buf);
			if (rc)
				fail("worker %u: read %llu+%llu rc %d", w->id,
				     (unsigned long long)(w->base + off), (unsigned long long)len, rc);
			if (memcmp(w->buf, w->shadow + off, len))
				fail("worker %u: read %llu+%llu differs from the shadow (iteration %u)",
				     w->id, (unsigned long long)(w->base + off),
				     (unsigned long long)len, it);
			w->reads++;
		} else {
			rc = zc_store_discard(c, w->base + off, len);
			if (rc == 0)
				memset(w->shadow + off, 0, len);
			else if (rc == -ENOSPC && O.mem_limit_pages)
				w->enospc++; /* an unaligned edge needed a new object */
			else
				fail("worker %u: discard %llu+%llu rc %d", w->id,
				     (unsigned long long)(w->base + off), (unsigned long long)len, rc);
			w->discards++;
		}
	}
	zc_ctx_free(c);
	return NULL;
}

static void *compactor_main(void *arg)
{
	struct zc_ctx *c = zc_ctx_new(S, 1);
	uint64_t round = 0;

	(void)arg;
	if (!c)
		fail("compactor: zc_ctx_new");
	while (!atomic_load(&stop_compactor)) {
		uint64_t n = zc_store_compact(S, 64);

		atomic_fetch_add(&moved_total, n);
		atomic_fetch_add(&compactions, 1);
		if (++round % 16 == 0) {
			struct zc_store_stats st;
			struct xcf_class_usage u[XCF_NCLASSES];

			zc_store_stats(S, &st);
			(void)zc_store_reclaimable_bytes(S);
			(void)zc_store_fragmentation(S, u, XCF_NCLASSES);
			if (st.checksum_errors)
				fail("compactor: checksum_errors %llu",
				     (unsigned long long)st.checksum_errors);
		}
		if (round % 64 == 0) {
			uint64_t bad = 0;

			zc_store_scrub(c, &bad, NULL, 0);
			if (bad)
				fail("compactor: scrub found %llu bad pages", (unsigned long long)bad);
		}
	}
	zc_ctx_free(c);
	return NULL;
}

/* Every byte of the device against the shadows, in 1 MiB reads. */
static void verify_all(struct worker *ws, const char *when)
{
	struct zc_ctx *c = zc_ctx_new(S, 2);
	uint8_t *buf = ws[0].buf;

	if (!c)
		fail("verify: zc_ctx_new");
	for (unsigned i = 0; i < O.workers; i++) {
		struct worker *w = &ws[i];

		for (uint64_t off = 0; off < w->bytes; off += MAX_REQ) {
			uint32_t len = (uint32_t)(w->bytes - off < MAX_REQ ? w->bytes - off : MAX_REQ);
			int rc = zc_store_read(c, w->base + off, len, buf);

			if (rc)
				fail("%s: read %llu+%u rc %d", when,
				     (unsigned long long)(w->base + off), len, rc);
			if (memcmp(buf, w->shadow + off, len))
				fail("%s: %llu+%u differs from worker %u's shadow", when,
				     (unsigned long long)(w->base + off), len, i);
		}
	}
	zc_ctx_free(c);
}

static void check(const char *when)
{
	int rc = zc_store_check(S);

	if (rc)
		fail("%s: zc_store_check %d", when, rc);
}

static void check_stats(struct worker *ws, const char *when)
{
	struct zc_store_stats st;
	uint64_t pages = 0;

	zc_store_stats(S, &st);
	for (unsigned i = 0; i < O.workers; i++)
		for (uint64_t p = 0; p < ws[i].bytes; p += ZC_PAGE_SIZE) {
			const uint8_t *q = ws[i].shadow + p;

			pages += q[0] != 0 || memcmp(q, q + 1, ZC_PAGE_SIZE - 1) != 0;
		}
	if (st.checksum_errors || st.failed_reads)
		fail("%s: checksum_errors %llu failed_reads %llu", when,
		     (unsigned long long)st.checksum_errors, (unsigned long long)st.failed_reads);
	/* A page of zeros may be stored (as SAME); a non-zero page must be. */
	if (st.pages_stored < pages || st.pages_stored > st.npages)
		fail("%s: pages_stored %llu, %llu non-zero pages in the shadows", when,
		     (unsigned long long)st.pages_stored, (unsigned long long)pages);
	if (O.mem_limit_pages && st.mem_used_total > O.mem_limit_pages * ZC_PAGE_SIZE)
		fail("%s: pool %llu bytes over the limit", when,
		     (unsigned long long)st.mem_used_total);
	if (st.mem_used_max < st.mem_used_total || st.compr_data_size > st.mem_used_total)
		fail("%s: mem_used_max %llu, mem_used_total %llu, compr_data_size %llu", when,
		     (unsigned long long)st.mem_used_max, (unsigned long long)st.mem_used_total,
		     (unsigned long long)st.compr_data_size);
}

static unsigned long parse(const char *s, const char *what)
{
	char *end;
	unsigned long v = strtoul(s, &end, 0);

	if (!*s || *end) {
		fprintf(stderr, "stress_store: bad %s: %s\n", what, s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	static struct worker ws[MAX_WORKERS];
	pthread_t comp;
	int opt, err;

	while ((opt = getopt(argc, argv, "i:w:p:s:m:z")) != -1) {
		switch (opt) {
		case 'i': O.iterations = (unsigned)parse(optarg, "iterations"); break;
		case 'w': O.workers = (unsigned)parse(optarg, "workers"); break;
		case 'p': O.pages = (unsigned)parse(optarg, "pages"); break;
		case 's': O.seed = parse(optarg, "seed"); break;
		case 'm': O.mem_limit_pages = parse(optarg, "mem_limit"); break;
		case 'z': O.zstd = 1; break;
		default:
			fprintf(stderr, "usage: %s [-i iterations] [-w workers] [-p pages] [-s seed]"
				" [-z] [-m mem_limit_pages]\n", argv[0]);
			return 2;
		}
	}
	if (O.workers < 1 || O.workers > MAX_WORKERS || O.pages < 1 || O.pages > (1u << 20)) {
		fprintf(stderr, "stress_store: 1..%d workers of 1..2^20 pages\n", MAX_WORKERS);
		return 2;
	}

	struct zc_store_config cfg = {
		.size = (uint64_t)O.workers * O.pages * ZC_PAGE_SIZE,
		.compressor = O.zstd ? ZC_ZSTD : ZC_LZ4,
		.level = O.zstd ? 3 : 1,
		.huge_threshold = 3584,
		.mem_limit = O.mem_limit_pages * ZC_PAGE_SIZE,
		.heaps = 2,
	};

	S = zc_store_open(&cfg, &err);
	if (!S)
		fail("zc_store_open: %d", err);
	for (unsigned i = 0; i < O.workers; i++) {
		struct worker *w = &ws[i];

		w->id = i;
		w->bytes = (uint64_t)O.pages * ZC_PAGE_SIZE;
		w->base = i * w->bytes;
		w->shadow = calloc(1, w->bytes);
		w->buf = malloc(MAX_REQ);
		w->rng = (O.seed + 1) * 0x9e3779b97f4a7c15ull + i * 0xbf58476d1ce4e5b9ull;
		if (!w->shadow || !w->buf)
			fail("out of memory");
	}
	if (pthread_create(&comp, NULL, compactor_main, NULL))
		fail("pthread_create");
	for (unsigned i = 0; i < O.workers; i++)
		if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]))
			fail("pthread_create");
	for (unsigned i = 0; i < O.workers; i++)
		pthread_join(ws[i].thread, NULL);
	atomic_store(&stop_compactor, 1);
	pthread_join(comp, NULL);

	check("after the run");
	verify_all(ws, "after the run");
	check_stats(ws, "after the run");
	(void)zc_store_compact(S, 0);
	check("after a full compaction");
	verify_all(ws, "after a full compaction");
	check_stats(ws, "after a full compaction");

	/* Discard everything: the pool must be empty again. */
	struct zc_ctx *c = zc_ctx_new(S, 1);
	struct zc_store_stats st;
	uint64_t w_total = 0, r_total = 0, d_total = 0, enospc = 0;

	if (!c || zc_store_discard(c, 0, cfg.size))
		fail("final discard");
	zc_ctx_free(c);
	zc_store_stats(S, &st);
	if (st.pages_stored || st.objects || st.mem_used_total || st.compr_data_size)
		fail("after discarding everything: %llu pages, %llu objects, %llu pool bytes",
		     (unsigned long long)st.pages_stored, (unsigned long long)st.objects,
		     (unsigned long long)st.mem_used_total);
	check("after discarding everything");
	for (unsigned i = 0; i < O.workers; i++) {
		w_total += ws[i].writes;
		r_total += ws[i].reads;
		d_total += ws[i].discards;
		enospc += ws[i].enospc;
		free(ws[i].shadow);
		free(ws[i].buf);
	}
	printf("stress_store: ok: %u workers x %u iterations: %llu writes (%llu ENOSPC), %llu reads,"
	       " %llu discards; %llu compactions moved %llu objects\n",
	       O.workers, O.iterations, (unsigned long long)w_total, (unsigned long long)enospc,
	       (unsigned long long)r_total, (unsigned long long)d_total,
	       (unsigned long long)atomic_load(&compactions),
	       (unsigned long long)atomic_load(&moved_total));
	zc_store_close(S);
	return 0;
}
