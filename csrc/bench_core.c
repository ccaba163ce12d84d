/* bench_core.c - drives the C core with FUSE requests built in memory, for instruction counts.
 *
 * Owns: a store over a file of real pages (argv[1]: a corpus of 4K pages), and a loop that
 * hands zc_fuse_handle one FUSE request at a time as a worker would get it from /dev/fuse:
 * WRITE of every page (4K), READ of every page in a shuffled order (4K), WRITE and READ in
 * 128 KiB requests, FALLOCATE punch-hole of every page, and then writes that overwrite.  Each
 * phase runs in a function of its own (phase_*), so `valgrind --tool=callgrind
 * --toggle-collect=phase_X` counts the instructions of exactly that phase, without the setup.
 * Must not: be linked into the extension; do I/O of its own in a phase (replies go to a sink).
 *
 * Usage: bench_core CORPUS NPAGES COMPRESSOR(lz4|zstd)    (prints the phases' request counts)
 */
#include <errno.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuse_loop.h"
#include "store.h"

#define REQ_MAX (ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE + 4096u)

static int sink(void *arg, const struct iovec *iov, int iovcnt)
{
	(void)arg;
	(void)iov;
	(void)iovcnt;
	return 0;
}

static uint8_t *req;
static uint8_t *pages;
static uint32_t *order;
static unsigned long long unique = 1;

static size_t build_rw(uint32_t opcode, uint64_t off, uint32_t len, const uint8_t *data)
{
	struct fuse_in_header *h = (void *)req;
	size_t body = opcode == FUSE_WRITE ? sizeof(struct fuse_write_in) : sizeof(struct fuse_read_in);
	size_t n = sizeof(*h) + body + (opcode == FUSE_WRITE ? len : 0);

	memset(req, 0, sizeof(*h) + body);
	h->len = (uint32_t)n;
	h->opcode = opcode;
	h->unique = unique++;
	h->nodeid = 2;
	if (opcode == FUSE_WRITE) {
		struct fuse_write_in *w = (void *)(req + sizeof(*h));

		w->offset = off;
		w->size = len;
		memcpy(req + sizeof(*h) + body, data, len);
	} else {
		struct fuse_read_in *r = (void *)(req + sizeof(*h));

		r->offset = off;
		r->size = len;
	}
	return n;
}

static size_t build_punch(uint64_t off, uint64_t len)
{
	struct fuse_in_header *h = (void *)req;
	struct fuse_fallocate_in *f = (void *)(req + sizeof(*h));
	size_t n = sizeof(*h) + sizeof(*f);

	memset(req, 0, n);
	h->len = (uint32_t)n;
	h->opcode = FUSE_FALLOCATE;
	h->unique = unique++;
	h->nodeid = 2;
	f->offset = off;
	f->length = len;
	f->mode = 0x01 | 0x02; /* KEEP_SIZE | PUNCH_HOLE */
	return n;
}

static void must(int rc, const char *what)
{
	if (rc) {
		fprintf(stderr, "bench_core: %s failed: %d\n", what, rc);
		exit(1);
	}
}

/* The phases: one request per call of zc_fuse_handle; noinline so callgrind can toggle. */
__attribute__((noinline)) void phase_write4k(struct zc_fuse_worker *w, uint32_t n);
__attribute__((noinline)) void phase_read4k(struct zc_fuse_worker *w, uint32_t n);
__attribute__((noinline)) void phase_write128k(struct zc_fuse_worker *w, uint32_t n);
__attribute__((noinline)) void phase_read128k(struct zc_fuse_worker *w, uint32_t n);
__attribute__((noinline)) void phase_discard4k(struct zc_fuse_worker *w, uint32_t n);

static void one(struct zc_fuse_worker *w, size_t n, const char *what)
{
	must(zc_fuse_handle(w, req, n, sink, NULL), what);
}

void phase_write4k(struct zc_fuse_worker *w, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		one(w, build_rw(FUSE_WRITE, (uint64_t)i * 4096, 4096, pages + (uint64_t)i * 4096),
		    "write4k");
}

void phase_read4k(struct zc_fuse_worker *w, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		one(w, build_rw(FUSE_READ, (uint64_t)order[i] * 4096, 4096, NULL), "read4k");
}

void phase_write128k(struct zc_fuse_worker *w, uint32_t n)
{
	for (uint32_t i = 0; i + 32 <= n; i += 32)
		one(w, build_rw(FUSE_WRITE, (uint64_t)i * 4096, 32 * 4096, pages + (uint64_t)i * 4096),
		    "write128k");
}

void phase_read128k(struct zc_fuse_worker *w, uint32_t n)
{
	for (uint32_t i = 0; i + 32 <= n; i += 32)
		one(w, build_rw(FUSE_READ, (uint64_t)i * 4096, 32 * 4096, NULL), "read128k");
}

void phase_discard4k(struct zc_fuse_worker *w, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		one(w, build_punch((uint64_t)order[i] * 4096, 4096), "discard4k");
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: bench_core CORPUS NPAGES lz4|zstd\n");
		return 2;
	}
	uint32_t n = (uint32_t)strtoul(argv[2], NULL, 10);
	FILE *f = fopen(argv[1], "rb");

	pages = malloc((size_t)n * 4096);
	req = malloc(REQ_MAX);
	order = malloc((size_t)n * sizeof(*order));
	if (!f || !pages || !req || !order || fread(pages, 4096, n, f) != n) {
		fprintf(stderr, "bench_core: cannot read %u pages of %s\n", n, argv[1]);
		return 1;
	}
	fclose(f);
	for (uint32_t i = 0; i < n; i++)
		order[i] = i;
	srand(7);
	for (uint32_t i = n - 1; i > 0; i--) {
		uint32_t j = (uint32_t)rand() % (i + 1), t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	int zstd = !strcmp(argv[3], "zstd"), err;
	struct zc_store_config cfg = {
		.size = (uint64_t)n * 4096,
		.compressor = zstd ? ZC_ZSTD : ZC_LZ4,
		.level = zstd ? 3 : 1,
		.huge_threshold = 3584,
		.heaps = 1,
	};
	struct zc_store *s = zc_store_open(&cfg, &err);

	if (!s)
		must(err ? err : -1, "open");
	struct zc_fuse *fu = zc_fuse_new(s, -1, "swap.img", 1, &err);

	if (!fu)
		must(err ? err : -1, "fuse");
	struct zc_fuse_worker *w = zc_fuse_worker_new(fu, 0);

	if (!w)
		must(-ENOMEM, "worker");
	phase_write4k(w, n);
	phase_read4k(w, n);
	phase_write128k(w, n);
	phase_read128k(w, n);
	phase_discard4k(w, n);
	phase_write4k(w, n);
	struct zc_store_stats st;

	zc_store_stats(s, &st);
	printf("{\"pages\": %u, \"requests\": {\"write4k\": %u, \"read4k\": %u, \"write128k\": %u, "
	       "\"read128k\": %u, \"discard4k\": %u}, \"checksum_errors\": %llu}\n",
	       n, n, n, n / 32, n / 32, n, (unsigned long long)st.checksum_errors);
	zc_fuse_worker_free(w);
	zc_fuse_free(fu);
	zc_store_close(s);
	free(pages);
	free(req);
	free(order);
	return 0;
}
