/* fuzz_fuse.c - libFuzzer target for the FUSE request decoder (zc_fuse_handle, fuse_loop.h).
 *
 * Owns: turning arbitrary bytes into a sequence of FUSE requests, each handed to
 * zc_fuse_handle of one of two test workers (zc_fuse_worker_new) of a zc_fuse made by
 * zc_fuse_new over a small real store (store.c; a dummy descriptor, never read or written),
 * and checking everything the loop promises about each one:
 *  - a reply is written exactly once for every request of >= 40 bytes but FORGET,
 *    BATCH_FORGET and INTERRUPT (those and shorter requests get none), as one well-formed
 *    message: out header len == the sum of the iov lengths, unique echoed, error 0 or in
 *    (-512, 0), an error reply exactly 16 bytes, a success reply of the size its opcode
 *    defines (READ: the request clamped to the device), and zc_fuse_handle returns the error
 *    it put in the header;
 *  - the device behaves as a flat file: a flat shadow, updated by every successful WRITE and
 *    punch/zero-range FALLOCATE, is what every successful READ returns; a failed WRITE or
 *    discard changes nothing; a READ or WRITE inside the device that touches no corrupted
 *    page never fails (WRITE: but for ENOSPC, the store has a small memory limit); a READ
 *    covering a page corrupted with zc_store_corrupt never succeeds;
 *  - the per-worker counters (zc_fuse_stats) count each request and error once, and the
 *    bytes read and written.
 * Any violation aborts (a finding); ASan/UBSan catch the rest.  Each request is copied into a
 * buffer of exactly its length, so a read past it is an ASan report.  The store is emptied at
 * the start of every input, so an input reproduces on its own.
 * Must not: be linked into the extension, open /dev/fuse or mount anything, or start worker
 * threads (zc_fuse_start must refuse the dummy descriptor; that is checked once).
 *
 * INPUT  a sequence of records: ctl (u16 LE), len (u16 LE), aux (u8), then len bytes of
 * request (fewer when the input ends).  ctl bits:
 *   0 FIXLEN  header len := the request's length      1 OPMAP  opcode := one the loop knows
 *   2 NODEMAP nodeid := 1 or 2                        3 CLAMP  offsets/sizes near the device
 *   4 GROW    a >= 80-byte request becomes 80 + (write_in.size % (1 MiB + 2)) bytes, the
 *             payload its own bytes repeated (big WRITEs from small inputs)
 *   5-6       what write_fn returns: 0, -ENOENT (interrupted), -EIO, -ENODEV
 *   7         the request goes to worker 1 (else 0)
 *   8 CORRUPT before the request, zc_store_corrupt(page aux * 3 % npages)
 *   9 COMPACT before the request, zc_store_compact(aux)
 *
 * ZC_TRACE=1 in the environment prints one line per request (opcode, length, result).
 * Build: clang -fsanitize=fuzzer,address,undefined csrc/fuzz_fuse.c csrc/fuse_loop.c
 * csrc/store.c csrc/xcfmalloc.c csrc/codec.c csrc/arena.c -llz4 -lzstd -lxxhash -lpthread
 * (tests/test_core_sanitizers.py does), or with -DZC_STANDALONE as a plain program that runs
 * the files named on its command line (reproducers) or pseudo-random inputs.
 */
#include <errno.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuse_loop.h"

#define DEV_PAGES 320u /* more than one 1 MiB request, not a multiple of it */
#define DEV_BYTES ((uint64_t)DEV_PAGES * ZC_PAGE_SIZE)
#define MEM_LIMIT_PAGES 160u
#define MAX_IO ((uint64_t)ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE)
#define IN_HDR sizeof(struct fuse_in_header)
#define WRITE_DATA (IN_HDR + sizeof(struct fuse_write_in))

enum {
	CTL_FIXLEN = 1 << 0,
	CTL_OPMAP = 1 << 1,
	CTL_NODEMAP = 1 << 2,
	CTL_CLAMP = 1 << 3,
	CTL_GROW = 1 << 4,
	CTL_WRES_SHIFT = 5,
	CTL_WORKER1 = 1 << 7,
	CTL_CORRUPT = 1 << 8,
	CTL_COMPACT = 1 << 9,
};

static const uint32_t known_ops[] = {
	FUSE_INIT,	  FUSE_LOOKUP,	   FUSE_FORGET,	     FUSE_GETATTR,     FUSE_SETATTR,
	FUSE_OPEN,	  FUSE_READ,	   FUSE_WRITE,	     FUSE_STATFS,      FUSE_RELEASE,
	FUSE_FSYNC,	  FUSE_GETXATTR,   FUSE_LISTXATTR,   FUSE_FLUSH,       FUSE_OPENDIR,
	FUSE_READDIR,	  FUSE_RELEASEDIR, FUSE_FSYNCDIR,    FUSE_ACCESS,      FUSE_INTERRUPT,
	FUSE_DESTROY,	  FUSE_BATCH_FORGET, FUSE_FALLOCATE, FUSE_READDIRPLUS, FUSE_LSEEK,
	FUSE_SYNCFS,	  FUSE_READ,	   FUSE_WRITE,	     FUSE_FALLOCATE,   FUSE_READ,
	FUSE_WRITE,	  FUSE_MKNOD,
};
#define NKNOWN (sizeof(known_ops) / sizeof(known_ops[0]))

static struct zc_store *S;
static struct zc_fuse *F;
static struct zc_fuse_worker *W[2];
static struct zc_ctx *C; /* the harness's own: emptying the device between inputs */
static uint8_t shadow[DEV_BYTES];
static uint8_t corrupt[DEV_PAGES]; /* zc_store_corrupt flipped a byte of the page's object */
static uint8_t unknown[DEV_PAGES]; /* content not tracked (was corrupt, partly rewritten) */
static int trace; /* ZC_TRACE set: one line per request on stderr */

/* What write_fn saw of the current request's reply. */
struct reply {
	uint64_t unique;
	uint32_t opcode;
	int calls, result;
	int error;
	size_t total;
};

static uint8_t body[MAX_IO]; /* the last reply's bytes after the header */

static void fail(const char *what, const struct reply *r, long a, long b)
{
	fprintf(stderr, "fuzz_fuse: %s (opcode %u unique %llu: %ld %ld)\n", what,
		r ? r->opcode : 0u, r ? (unsigned long long)r->unique : 0ull, a, b);
	abort();
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

/* ---- write_fn ------------------------------------------------------------------------------ */

static int check_reply(void *arg, const struct iovec *iov, int iovcnt)
{
	struct reply *r = arg;
	struct fuse_out_header h;
	uint8_t hdr[sizeof(h)];
	size_t total = 0, at = 0;

	if (r->calls++)
		fail("second reply to one request", r, r->calls, 0);
	if (!iov || iovcnt < 1 || iovcnt > 8)
		fail("iovcnt", r, iovcnt, 0);
	for (int i = 0; i < iovcnt; i++) {
		if (iov[i].iov_len && !iov[i].iov_base)
			fail("NULL iov_base", r, i, (long)iov[i].iov_len);
		total += iov[i].iov_len;
	}
	if (total < sizeof(h) || total > sizeof(h) + MAX_IO)
		fail("reply length", r, (long)total, 0);
	/* Header and body, wherever the iovecs split them (ASan checks every byte is there). */
	for (int i = 0; i < iovcnt; i++) {
		const uint8_t *p = iov[i].iov_base;
		size_t k = 0;

		for (; k < iov[i].iov_len && at < sizeof(h); k++, at++)
			hdr[at] = p[k];
		if (k < iov[i].iov_len) {
			memcpy(body + (at - sizeof(h)), p + k, iov[i].iov_len - k);
			at += iov[i].iov_len - k;
		}
	}
	memcpy(&h, hdr, sizeof(h));
	if (h.len != total)
		fail("out header len != sum of iov lengths", r, (long)h.len, (long)total);
	if (h.unique != r->unique)
		fail("unique not echoed", r, (long)h.unique, (long)r->unique);
	if (h.error > 0 || h.error <= -512)
		fail("reply error out of range", r, h.error, 0);
	if (h.error && total != sizeof(h))
		fail("error reply not 16 bytes", r, h.error, (long)total);
	r->error = h.error;
	r->total = total;
	return r->result;
}

/* ---- the model ----------------------------------------------------------------------------- */

static int range_flagged(const uint8_t *flags, uint64_t off, uint64_t len)
{
	for (uint64_t p = off / ZC_PAGE_SIZE; len && p <= (off + len - 1) / ZC_PAGE_SIZE; p++)
		if (flags[p])
			return 1;
	return 0;
}

/* A successful write or discard of [off, off+len): whole pages are known again; a partly
 * covered page that was corrupt is no longer tracked. */
static void touch_range(uint64_t off, uint64_t len)
{
	for (uint64_t p = off / ZC_PAGE_SIZE; len && p <= (off + len - 1) / ZC_PAGE_SIZE; p++) {
		uint64_t start = p * ZC_PAGE_SIZE;

		if (off <= start && off + len >= start + ZC_PAGE_SIZE) {
			corrupt[p] = 0;
			unknown[p] = 0;
		} else if (corrupt[p]) {
			corrupt[p] = 0;
			unknown[p] = 1;
		}
	}
}

/* Partly covered edge pages of [off, off+len) that are corrupt or untracked. */
static int edges_flagged(uint64_t off, uint64_t len)
{
	uint64_t first = off / ZC_PAGE_SIZE, last = (off + len - 1) / ZC_PAGE_SIZE;

	if (!len)
		return 0;
	if (off % ZC_PAGE_SIZE && (corrupt[first] || unknown[first]))
		return 1;
	return (off + len) % ZC_PAGE_SIZE && (corrupt[last] || unknown[last]);
}

static size_t expect_body(uint32_t op, int *exact)
{
	*exact = 1;
	switch (op) {
	case FUSE_INIT: return sizeof(struct fuse_init_out);
	case FUSE_LOOKUP: return sizeof(struct fuse_entry_out);
	case FUSE_GETATTR: case FUSE_SETATTR: return sizeof(struct fuse_attr_out);
	case FUSE_OPEN: case FUSE_OPENDIR: return sizeof(struct fuse_open_out);
	case FUSE_STATFS: return sizeof(struct fuse_statfs_out);
	case FUSE_WRITE: return sizeof(struct fuse_write_out);
	case FUSE_ACCESS: case FUSE_FLUSH: case FUSE_RELEASE: case FUSE_RELEASEDIR:
	case FUSE_FSYNC: case FUSE_FSYNCDIR: case FUSE_SYNCFS: case FUSE_DESTROY:
	case FUSE_FALLOCATE:
		return 0;
	default:
		*exact = 0;
		return SIZE_MAX; /* READ, READDIR(PLUS), LISTXATTR: checked by the caller */
	}
}

static uint64_t rd64(const uint8_t *req, size_t n, size_t at)
{
	uint64_t v = 0;

	if (at + 8 <= n)
		memcpy(&v, req + at, 8);
	return v;
}

static uint32_t rd32(const uint8_t *req, size_t n, size_t at)
{
	uint32_t v = 0;

	if (at + 4 <= n)
		memcpy(&v, req + at, 4);
	return v;
}

static void wr64(uint8_t *req, size_t n, size_t at, uint64_t v)
{
	if (at + 8 <= n)
		memcpy(req + at, &v, 8);
}

static void wr32(uint8_t *req, size_t n, size_t at, uint32_t v)
{
	if (at + 4 <= n)
		memcpy(req + at, &v, 4);
}

/* Offsets of the in-structs' fields (after the 40-byte header). */
#define RW_OFFSET (IN_HDR + 8)  /* fuse_read_in / fuse_write_in .offset */
#define RW_SIZE (IN_HDR + 16)   /* .size */
#define FA_OFFSET (IN_HDR + 8)  /* fuse_fallocate_in .offset */
#define FA_LENGTH (IN_HDR + 16) /* .length */
#define FA_MODE (IN_HDR + 24)   /* .mode */

static void one_request(uint16_t ctl, uint8_t aux, const uint8_t *src, size_t srclen,
			struct zc_fuse_stats *expect)
{
	struct fuse_in_header h;
	struct reply r;
	size_t n = srclen;
	uint8_t *req;
	int rc;

	memset(&h, 0, sizeof(h));
	memset(&r, 0, sizeof(r));
	if ((ctl & CTL_GROW) && srclen >= WRITE_DATA) {
		uint32_t sz = rd32(src, srclen, RW_SIZE);

		n = WRITE_DATA + sz % (uint32_t)(MAX_IO + 2);
	}
	req = malloc(n ? n : 1);
	if (!req)
		fail("malloc", NULL, (long)n, 0);
	if (n <= srclen) {
		memcpy(req, src, n);
	} else {
		size_t at = srclen; /* n > srclen >= WRITE_DATA */

		memcpy(req, src, srclen);
		if (at == WRITE_DATA)
			req[at++] = aux;
		while (at < n) { /* the payload repeated, by doubling copies */
			size_t chunk = at - WRITE_DATA < n - at ? at - WRITE_DATA : n - at;

			memcpy(req + at, req + WRITE_DATA, chunk);
			at += chunk;
		}
	}
	if (n >= IN_HDR) {
		memcpy(&h, req, sizeof(h));
		if (ctl & CTL_FIXLEN)
			h.len = (uint32_t)n;
		if (ctl & CTL_OPMAP)
			h.opcode = known_ops[h.opcode % NKNOWN];
		if (ctl & CTL_NODEMAP)
			h.nodeid = 1 + (h.nodeid & 1);
		memcpy(req, &h, sizeof(h));
		if (ctl & CTL_CLAMP) {
			const uint64_t near = DEV_BYTES + 2 * ZC_PAGE_SIZE;

			if (h.opcode == FUSE_READ || h.opcode == FUSE_WRITE)
				wr64(req, n, RW_OFFSET, rd64(req, n, RW_OFFSET) % near);
			if (h.opcode == FUSE_READ)
				wr32(req, n, RW_SIZE,
				     (uint32_t)(rd32(req, n, RW_SIZE) % (MAX_IO + 2 * ZC_PAGE_SIZE)));
			if (h.opcode == FUSE_FALLOCATE) {
				wr64(req, n, FA_OFFSET, rd64(req, n, FA_OFFSET) % near);
				wr64(req, n, FA_LENGTH, rd64(req, n, FA_LENGTH) % near);
			}
		}
		r.unique = h.unique;
		r.opcode = h.opcode;
	}
	if (ctl & CTL_CORRUPT) {
		uint64_t page = (uint64_t)aux * 3 % DEV_PAGES;

		if (!corrupt[page] && !unknown[page] && zc_store_corrupt(S, page) == 0)
			corrupt[page] = 1;
	}
	if (ctl & CTL_COMPACT)
		zc_store_compact(S, aux);

	static const int results[4] = {0, -ENOENT, -EIO, -ENODEV};
	uint8_t *keep = NULL; /* a WRITE's payload, to update the shadow with */

	if (n >= WRITE_DATA && r.opcode == FUSE_WRITE) {
		keep = malloc(n - WRITE_DATA + 1);
		if (!keep)
			fail("malloc", NULL, (long)n, 0);
		memcpy(keep, req + WRITE_DATA, n - WRITE_DATA);
	}
	r.result = results[ctl >> CTL_WRES_SHIFT & 3];
	rc = zc_fuse_handle(W[ctl & CTL_WORKER1 ? 1 : 0], req, n, check_reply, &r);
	if (trace)
		fprintf(stderr, "fuzz_fuse: opcode %u n %zu ctl %#x aux %u -> %d, %zu reply bytes\n",
			r.opcode, n, ctl, aux, rc, r.calls ? r.total : 0);

	if (n < IN_HDR) {
		if (rc != -EINVAL || r.calls)
			fail("short request answered", &r, rc, r.calls);
		expect->internal_errors++;
		goto out;
	}
	unsigned op = h.opcode < ZC_FUSE_MAX_OPCODE ? h.opcode : ZC_FUSE_MAX_OPCODE - 1;

	expect->requests[op]++;
	if (h.opcode == FUSE_FORGET || h.opcode == FUSE_BATCH_FORGET || h.opcode == FUSE_INTERRUPT) {
		if (rc != 0 || r.calls)
			fail("no-reply request answered", &r, rc, r.calls);
		goto out;
	}
	if (r.calls != 1)
		fail("request not answered exactly once", &r, r.calls, rc);
	if (rc != r.error)
		fail("return value != reply error", &r, rc, r.error);
	if (r.error) {
		expect->errors[op]++;
	} else {
		int exact;
		size_t body = expect_body(h.opcode, &exact);

		if (exact && r.total - 16 != body)
			fail("success reply of the wrong size", &r, (long)(r.total - 16), (long)body);
		if (!exact && h.opcode != FUSE_READ && h.opcode != FUSE_READDIR &&
		    h.opcode != FUSE_READDIRPLUS && h.opcode != FUSE_LISTXATTR)
			fail("unknown opcode answered with success", &r, (long)r.total, 0);
		if (h.opcode == FUSE_LISTXATTR && r.total != 16 && r.total != 16 + 8)
			fail("LISTXATTR reply size", &r, (long)r.total, 0);
		if ((h.opcode == FUSE_READDIR || h.opcode == FUSE_READDIRPLUS) &&
		    r.total - 16 > rd32(req, n, RW_SIZE))
			fail("READDIR reply larger than asked", &r, (long)r.total, 0);
	}

	/* The device model. */
	if (h.opcode == FUSE_READ && h.len == n && n >= IN_HDR + sizeof(struct fuse_read_in)) {
		uint64_t off = rd64(req, n, RW_OFFSET), len = rd32(req, n, RW_SIZE);

		if (off >= DEV_BYTES)
			len = 0;
		else if (len > DEV_BYTES - off)
			len = DEV_BYTES - off;
		if (len <= MAX_IO && r.error == 0) {
			if (r.total - 16 != len)
				fail("READ reply length", &r, (long)(r.total - 16), (long)len);
			if (range_flagged(corrupt, off, len))
				fail("READ of a corrupted page succeeded", &r, (long)off, (long)len);
			for (uint64_t p = off / ZC_PAGE_SIZE; len && p <= (off + len - 1) / ZC_PAGE_SIZE;
			     p++) {
				uint64_t a = p * ZC_PAGE_SIZE > off ? p * ZC_PAGE_SIZE : off;
				uint64_t b = (p + 1) * ZC_PAGE_SIZE < off + len ? (p + 1) * ZC_PAGE_SIZE
										: off + len;

				if (!unknown[p] && memcmp(body + (a - off), shadow + a, b - a))
					fail("READ returned other bytes than written", &r, (long)a,
					     (long)(b - a));
			}
			expect->bytes_read += len;
		} else if (len <= MAX_IO && !range_flagged(corrupt, off, len) &&
			   !range_flagged(unknown, off, len)) {
			fail("READ inside the device failed", &r, (long)off, r.error);
		}
	}
	if (h.opcode == FUSE_WRITE && keep) {
		uint64_t off = rd64(req, n, RW_OFFSET), len = rd32(req, n, RW_SIZE);
		int valid = h.len == n && n == WRITE_DATA + len && len <= MAX_IO &&
			    off <= DEV_BYTES && len <= DEV_BYTES - off;

		if (r.error == 0) {
			if (!valid)
				fail("invalid WRITE succeeded", &r, (long)off, (long)len);
			struct fuse_write_out wo;

			memcpy(&wo, body, sizeof(wo));
			if (wo.size != len)
				fail("WRITE reply size field", &r, (long)wo.size, (long)len);
			memcpy(shadow + off, keep, len);
			touch_range(off, len);
			expect->bytes_written += len;
		} else if (valid && r.error != -ENOSPC && !edges_flagged(off, len)) {
			fail("WRITE inside the device failed", &r, (long)off, r.error);
		}
	}
	if (h.opcode == FUSE_FALLOCATE && r.error == 0 && n >= IN_HDR + 28) {
		uint64_t off = rd64(req, n, FA_OFFSET), len = rd64(req, n, FA_LENGTH);
		uint32_t mode = rd32(req, n, FA_MODE);

		if ((mode == 3 || mode == 0x10 || mode == 0x11) && off < DEV_BYTES) {
			if (len > DEV_BYTES - off)
				len = DEV_BYTES - off;
			memset(shadow + off, 0, len);
			touch_range(off, len);
			expect->bytes_discarded += len;
		}
	}
	/* ENODEV/EIO from write_fn: counted as an internal error or the worker marked gone;
	 * internal_errors is not modelled beyond short requests (malformed ones count too). */
out:
	free(keep);
	free(req);
}

static void setup(void)
{
	struct zc_store_config cfg = {
		.size = DEV_BYTES,
		.compressor = ZC_LZ4,
		.level = 1,
		.huge_threshold = 3584,
		.mem_limit = (uint64_t)MEM_LIMIT_PAGES * ZC_PAGE_SIZE,
		.heaps = 2,
	};
	int err;

	S = zc_store_open(&cfg, &err);
	if (!S)
		fail("zc_store_open", NULL, err, 0);
	if (zc_fuse_new(S, 1000, "swap.img", 0, &err) || err != -EINVAL)
		fail("zc_fuse_new accepted 0 threads", NULL, err, 0);
	if (zc_fuse_new(S, 1000, "a/b", 1, &err) || err != -EINVAL)
		fail("zc_fuse_new accepted a name with a slash", NULL, err, 0);
	F = zc_fuse_new(S, -1, "swap.img", 2, &err);
	if (!F)
		fail("zc_fuse_new", NULL, err, 0);
	W[0] = zc_fuse_worker_new(F, 0);
	W[1] = zc_fuse_worker_new(F, 1);
	if (!W[0] || !W[1])
		fail("zc_fuse_worker_new", NULL, errno, 0);
	errno = 0;
	if (zc_fuse_worker_new(F, 0) || errno != EBUSY)
		fail("a worker slot taken twice", NULL, errno, 0);
	if (zc_fuse_worker_new(F, 2) || errno != EINVAL)
		fail("a worker index out of range", NULL, errno, 0);
	if (zc_fuse_start(F) != -EBADF)
		fail("zc_fuse_start on the dummy descriptor", NULL, 0, 0);
	C = zc_ctx_new(S, 1);
	if (!C)
		fail("zc_ctx_new", NULL, 0, 0);
}

static void check_stats(const struct zc_fuse_stats *before, const struct zc_fuse_stats *model)
{
	struct zc_fuse_stats now;

	zc_fuse_stats(F, &now);
	for (int op = 0; op < ZC_FUSE_MAX_OPCODE; op++) {
		uint64_t lat = 0;

		for (int b = 0; b < ZC_FUSE_NBUCKETS; b++)
			lat += now.lat[op][b] - before->lat[op][b];
		if (now.requests[op] - before->requests[op] != model->requests[op])
			fail("requests counter", NULL, op, (long)model->requests[op]);
		if (now.errors[op] - before->errors[op] != model->errors[op])
			fail("errors counter", NULL, op, (long)model->errors[op]);
		/* every request but the no-reply ones gets one latency sample */
		if (lat > model->requests[op])
			fail("latency samples", NULL, op, (long)lat);
	}
	if (now.bytes_read - before->bytes_read != model->bytes_read ||
	    now.bytes_written - before->bytes_written != model->bytes_written ||
	    now.bytes_discarded - before->bytes_discarded != model->bytes_discarded)
		fail("byte counters", NULL, (long)(now.bytes_written - before->bytes_written),
		     (long)model->bytes_written);
	if (now.internal_errors - before->internal_errors < model->internal_errors)
		fail("internal_errors counter", NULL, (long)now.internal_errors,
		     (long)model->internal_errors);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct zc_fuse_stats before, model;
	int rc;

	if (!S) {
		const char *t = getenv("ZC_TRACE");

		trace = t && *t;
		setup();
	}
	rc = zc_store_discard(C, 0, DEV_BYTES);
	if (rc)
		fail("emptying the device", NULL, rc, 0);
	memset(shadow, 0, sizeof(shadow));
	memset(corrupt, 0, sizeof(corrupt));
	memset(unknown, 0, sizeof(unknown));
	memset(&model, 0, sizeof(model));
	zc_fuse_stats(F, &before);
	while (size >= 5) {
		uint16_t ctl = get16(data), len = get16(data + 2);
		uint8_t aux = data[4];
		size_t take;

		data += 5;
		size -= 5;
		take = len < size ? len : size;
		one_request(ctl, aux, data, take, &model);
		data += take;
		size -= take;
	}
	check_stats(&before, &model);
	rc = zc_store_check(S);
	if (rc)
		fail("zc_store_check", NULL, rc, 0);
	return 0;
}

#ifdef ZC_STANDALONE
int main(int argc, char **argv)
{
	static uint8_t in[1 << 16];

	if (argc > 1 && strcmp(argv[1], "-r") != 0) {
		for (int i = 1; i < argc; i++) { /* reproducers */
			FILE *fp = fopen(argv[i], "rb");
			size_t n;

			if (!fp) {
				perror(argv[i]);
				return 2;
			}
			n = fread(in, 1, sizeof(in), fp);
			fclose(fp);
			LLVMFuzzerTestOneInput(in, n);
		}
		printf("fuzz_fuse: %d inputs ok\n", argc - 1);
		return 0;
	}
	unsigned rounds = argc > 2 ? (unsigned)atoi(argv[2]) : 2000;
	uint32_t seed = 1;

	for (unsigned r = 0; r < rounds; r++) {
		size_t n = 5 + seed % 4000;

		for (size_t i = 0; i < n; i++) {
			seed = seed * 1664525u + 1013904223u;
			in[i] = (uint8_t)(seed >> 24);
		}
		LLVMFuzzerTestOneInput(in, n);
	}
	printf("fuzz_fuse: %u random inputs ok\n", rounds);
	return 0;
}
#endif
