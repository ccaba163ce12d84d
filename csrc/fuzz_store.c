/* fuzz_store.c - libFuzzer target for the store API (and a standalone random driver).
 *
 * Owns: turning arbitrary bytes into a sequence of writes, reads, discards, compactions and
 * scrubs against a small store, checked against a flat shadow copy of the device: every byte
 * read must be the byte last written (or zero), every call must return 0 or a documented
 * errno, and xcf_check must hold after every step.  Any mismatch aborts (a finding).
 * Must not: be linked into the extension.
 *
 * Build: clang -fsanitize=fuzzer,address,undefined (tests/test_core_sanitizers.py does), or
 * with -DZC_STANDALONE as a plain program that feeds it pseudo-random inputs.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store.h"

#define DEV_PAGES 320u /* more than one 1 MiB request, unaligned */
#define DEV_BYTES (DEV_PAGES * ZC_PAGE_SIZE)

struct cursor {
	const uint8_t *p;
	size_t n;
};

static uint64_t take(struct cursor *c, unsigned bytes)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < bytes; i++) {
		v = v << 8 | (c->n ? *c->p : 0);
		if (c->n) {
			c->p++;
			c->n--;
		}
	}
	return v;
}

/* Page content of one of a few shapes: zeros, a fill word, text-like, random. */
static void make_data(uint8_t *buf, uint32_t len, unsigned shape, uint32_t seed)
{
	for (uint32_t i = 0; i < len; i++) {
		seed = seed * 1103515245u + 12345u;
		switch (shape & 3) {
		case 0: buf[i] = 0; break;
		case 1: buf[i] = (uint8_t)(0x11 * (i % 8)); break;
		case 2: buf[i] = (uint8_t)("abcdefgh "[(seed >> 16) % 9]); break;
		default: buf[i] = (uint8_t)(seed >> 16); break;
		}
	}
}

static void fail(const char *what, uint64_t off, uint64_t len, int rc)
{
	fprintf(stderr, "fuzz_store: %s at %llu+%llu rc=%d\n", what, (unsigned long long)off,
		(unsigned long long)len, rc);
	abort();
}

static void run_ops(const uint8_t *data, size_t size)
{
	static uint8_t shadow[DEV_BYTES], buf[ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE + ZC_PAGE_SIZE];
	struct cursor cur = {data, size};
	unsigned mode = (unsigned)take(&cur, 1);
	struct zc_store_config cfg = {
		.size = DEV_BYTES,
		.compressor = mode & 1 ? ZC_ZSTD : ZC_LZ4,
		.level = mode & 1 ? 3 : 1,
		.huge_threshold = 3584,
		.mem_limit = mode & 2 ? 16 * ZC_PAGE_SIZE : 0,
		.heaps = 2,
	};
	int err;
	struct zc_store *s = zc_store_open(&cfg, &err);

	if (!s)
		fail("open", 0, 0, err);
	struct zc_ctx *ctx[2] = {zc_ctx_new(s, 1), zc_ctx_new(s, 2)};

	if (!ctx[0] || !ctx[1])
		fail("ctx", 0, 0, 0);
	memset(shadow, 0, sizeof(shadow));
	while (cur.n) {
		unsigned op = (unsigned)take(&cur, 1);
		struct zc_ctx *c = ctx[op >> 7];
		uint64_t off = take(&cur, 3) % DEV_BYTES;
		uint64_t len = op & 16 ? take(&cur, 3) % (ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE) + 1
				    : take(&cur, 2) % (16 * ZC_PAGE_SIZE) + 1;
		int rc = 0;

		if (op & 8) { /* page-aligned, as the loop device sends */
			off &= ~(uint64_t)(ZC_PAGE_SIZE - 1);
			len = (len + ZC_PAGE_SIZE - 1) & ~(uint64_t)(ZC_PAGE_SIZE - 1);
		}
		if (off + len > DEV_BYTES)
			len = DEV_BYTES - off;
		switch (op & 7) {
		case 0: case 1: case 2:
			make_data(buf, (uint32_t)len, (unsigned)take(&cur, 1), (uint32_t)take(&cur, 2));
			rc = zc_store_write(c, off, (uint32_t)len, buf);
			if (rc == 0)
				memcpy(shadow + off, buf, len);
			else if (rc != -ENOSPC || !cfg.mem_limit)
				fail("write", off, len, rc);
			break;
		case 3: case 4:
			rc = zc_store_read(c, off, (uint32_t)len, buf);
			if (rc)
				fail("read", off, len, rc);
			if (memcmp(buf, shadow + off, len))
				fail("read mismatch", off, len, 0);
			break;
		case 5:
			rc = zc_store_discard(c, off, len);
			if (rc == 0)
				memset(shadow + off, 0, len);
			else if (rc != -ENOSPC || !cfg.mem_limit)
				fail("discard", off, len, rc);
			break;
		case 6:
			zc_store_compact(s, take(&cur, 1));
			break;
		default: {
			uint64_t bad;

			zc_store_scrub(c, &bad, NULL, 0);
			if (bad)
				fail("scrub", 0, 0, (int)bad);
		}
		}
		if (getenv("ZC_TRACE"))
			fprintf(stderr, "op %u off %llu len %llu\n", op & 7, (unsigned long long)off,
				(unsigned long long)len);
		rc = zc_store_check(s);
		if (rc)
			fail("xcf_check", op, 0, rc);
		if (getenv("ZC_TRACE"))
			for (uint64_t o = 0; o < DEV_BYTES; o += ZC_PAGE_SIZE)
				if (zc_store_read(c, o, ZC_PAGE_SIZE, buf) ||
				    memcmp(buf, shadow + o, ZC_PAGE_SIZE))
					fail("trace verify", o, op & 7, 0);
	}
	struct zc_store_stats st;

	zc_store_stats(s, &st);
	if (st.checksum_errors || (cfg.mem_limit && st.mem_used_total > cfg.mem_limit))
		fail("stats", st.checksum_errors, st.mem_used_total, 0);
	for (uint64_t off = 0; off < DEV_BYTES; off += 64 * ZC_PAGE_SIZE) {
		if (zc_store_read(ctx[0], off, 64 * ZC_PAGE_SIZE, buf) ||
		    memcmp(buf, shadow + off, 64 * ZC_PAGE_SIZE))
			fail("final read", off, 64 * ZC_PAGE_SIZE, 0);
	}
	/* The largest request, unaligned: 1 MiB across 257 pages. */
	if (zc_store_read(ctx[1], 100, ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE, buf) ||
	    memcmp(buf, shadow + 100, ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE))
		fail("unaligned 1 MiB read", 100, ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE, 0);
	zc_store_discard(ctx[0], 0, DEV_BYTES);
	zc_store_stats(s, &st);
	if (st.mem_used_total || st.pages_stored || st.objects)
		fail("empty after discard", st.mem_used_total, st.objects, (int)st.pages_stored);
	zc_ctx_free(ctx[0]);
	zc_ctx_free(ctx[1]);
	zc_store_close(s);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	run_ops(data, size);
	return 0;
}

#ifdef ZC_STANDALONE
int main(int argc, char **argv)
{
	unsigned rounds = argc > 1 ? (unsigned)atoi(argv[1]) : 200;
	static uint8_t in[8192];
	uint32_t seed = 1;

	for (unsigned r = 0; r < rounds; r++) {
		size_t n = 64 + (seed % 8000);

		for (size_t i = 0; i < n; i++) {
			seed = seed * 1664525u + 1013904223u;
			in[i] = (uint8_t)(seed >> 24);
		}
		run_ops(in, n);
	}
	printf("fuzz_store: %u rounds ok\n", rounds);
	return 0;
}
#endif
