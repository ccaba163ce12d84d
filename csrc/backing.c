/* backing.c - the writeback tier's backing file (see backing.h for its layout and B1-B3).
 *
 * Owns: the header block, the segment table (live bytes and holds per segment, in process
 * memory: store.c recounts it from the page table when a store takes a backing file), the
 * choice of the segment a batch fills, and the O_DIRECT reads and writes.
 * Must not: know pages, codecs or the pool; keep any state in the file that the arena does not
 * also say (the arena's page table is the index; the file's header only tells one file from
 * another).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "backing.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#define BK_MAGIC "ZCBACK01"

struct bk_header {
	char magic[8];
	uint64_t id, blocks;
	uint32_t seg_blocks, block;
};

static uint8_t *aligned_block(size_t n)
{
	void *p = NULL;

	return posix_memalign(&p, ZC_BK_BLOCK, n) ? NULL : p;
}

static int write_full(int fd, const uint8_t *buf, uint64_t n, uint64_t off)
{
	while (n) {
		ssize_t w = pwrite(fd, buf, n, (off_t)off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		buf += w;
		n -= (uint64_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

static int new_header(int fd, uint64_t blocks, uint64_t *id)
{
	uint8_t *blk = aligned_block(ZC_BK_BLOCK);
	struct bk_header h = {.blocks = blocks, .seg_blocks = ZC_SEG_BLOCKS, .block = ZC_BK_BLOCK};
	int rc;

	if (!blk)
		return -ENOMEM;
	memcpy(h.magic, BK_MAGIC, 8);
	do {
		if (getrandom(&h.id, sizeof(h.id), 0) != (ssize_t)sizeof(h.id)) {
			free(blk);
			return -errno;
		}
	} while (h.id == 0);
	memset(blk, 0, ZC_BK_BLOCK);
	memcpy(blk, &h, sizeof(h));
	rc = write_full(fd, blk, ZC_BK_BLOCK, 0);
	if (!rc && fdatasync(fd))
		rc = -errno;
	free(blk);
	if (!rc)
		*id = h.id;
	return rc;
}

static int check_header(int fd, uint64_t id, uint64_t blocks)
{
	uint8_t *blk = aligned_block(ZC_BK_BLOCK);
	struct bk_header h;
	int rc;

	if (!blk)
		return -ENOMEM;
	ssize_t n = pread(fd, blk, ZC_BK_BLOCK, 0);

	rc = n == (ssize_t)ZC_BK_BLOCK ? 0 : n < 0 ? -errno : -EPROTO;
	if (!rc)
		memcpy(&h, blk, sizeof(h));
	if (!rc && (memcmp(h.magic, BK_MAGIC, 8) || h.id != id || h.blocks != blocks ||
		    h.seg_blocks != ZC_SEG_BLOCKS || h.block != ZC_BK_BLOCK))
		rc = -EPROTO;
	free(blk);
	return rc;
}

int zc_backing_open(struct zc_backing *b, int fd, uint64_t bytes, uint64_t *id, uint64_t *blocks)
{
	uint64_t have = bytes / ZC_BK_BLOCK;
	int rc;

	memset(b, 0, sizeof(*b));
	b->fd = -1;
	b->open = -1;
	if (have > ZC_BK_MAX_BLOCKS)
		have = ZC_BK_MAX_BLOCKS;
	if (*id == 0) {
		if (bytes < ZC_BK_MIN_BYTES)
			return -EINVAL;
		*blocks = 1u + (have - 1u) / ZC_SEG_BLOCKS * ZC_SEG_BLOCKS;
	} else if (have < *blocks) {
		return -EPROTO;
	}
	b->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (b->fd < 0)
		return -errno;
	rc = *id ? check_header(b->fd, *id, *blocks) : new_header(b->fd, *blocks, id);
	b->blocks = *blocks;
	b->nsegs = (uint32_t)((b->blocks - 1u) / ZC_SEG_BLOCKS);
	b->live = calloc(b->nsegs, sizeof(*b->live));
	b->holds = calloc(b->nsegs, sizeof(*b->holds));
	b->wbuf = aligned_block(ZC_SEG_BYTES);
	b->rbuf = aligned_block(ZC_SEG_BYTES);
	if (!rc && (!b->live || !b->holds || !b->wbuf || !b->rbuf))
		rc = -ENOMEM;
	if (rc)
		zc_backing_close(b);
	return rc;
}

void zc_backing_close(struct zc_backing *b)
{
	if (b->fd >= 0)
		close(b->fd);
	free(b->live);
	free(b->holds);
	free(b->wbuf);
	free(b->rbuf);
	memset(b, 0, sizeof(*b));
	b->fd = -1;
	b->open = -1;
}

int64_t zc_backing_take(struct zc_backing *b)
{
	for (uint32_t i = 0; i < b->nsegs; i++) {
		uint32_t k = (b->cursor + i) % b->nsegs;

		if (__atomic_load_n(&b->live[k], __ATOMIC_SEQ_CST) == 0 &&
		    __atomic_load_n(&b->holds[k], __ATOMIC_SEQ_CST) == 0) {
			b->open = k;
			b->cursor = (k + 1) % b->nsegs;
			return k;
		}
	}
	return -1;
}

void zc_backing_put(struct zc_backing *b)
{
	b->open = -1;
}

int zc_backing_write(struct zc_backing *b, uint64_t bytes)
{
	uint64_t n = (bytes + ZC_BK_BLOCK - 1) / ZC_BK_BLOCK * ZC_BK_BLOCK;

	if (b->open < 0 || n > ZC_SEG_BYTES)
		return -EINVAL;
	return write_full(b->fd, b->wbuf, n, zc_seg_block((uint32_t)b->open) * ZC_BK_BLOCK);
}

int zc_backing_read(const struct zc_backing *b, uint64_t block, uint32_t n, uint8_t *buf)
{
	uint64_t off = block * ZC_BK_BLOCK, len = (uint64_t)n * ZC_BK_BLOCK;

	if (b->fd < 0 || block == 0 || block + n > b->blocks)
		return -EIO;
	while (len) {
		ssize_t r = pread(b->fd, buf, len, (off_t)off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -EIO;
		buf += r;
		len -= (uint64_t)r;
		off += (uint64_t)r;
	}
	return 0;
}

void zc_backing_live(struct zc_backing *b, uint32_t seg, int64_t delta)
{
	if (b->live && seg < b->nsegs)
		__atomic_fetch_add(&b->live[seg], (uint32_t)delta, __ATOMIC_SEQ_CST);
}

void zc_backing_hold(struct zc_backing *b, uint32_t seg)
{
	if (b->holds && seg < b->nsegs)
		__atomic_fetch_add(&b->holds[seg], 1u, __ATOMIC_SEQ_CST);
}

void zc_backing_release(struct zc_backing *b, uint32_t seg)
{
	if (b->holds && seg < b->nsegs)
		__atomic_fetch_sub(&b->holds[seg], 1u, __ATOMIC_SEQ_CST);
}

uint32_t zc_backing_free(const struct zc_backing *b)
{
	uint32_t n = 0;

	for (uint32_t k = 0; k < b->nsegs; k++)
		n += (int64_t)k != b->open && !__atomic_load_n(&b->live[k], __ATOMIC_SEQ_CST) &&
		     !__atomic_load_n(&b->holds[k], __ATOMIC_SEQ_CST);
	return n;
}

unsigned zc_backing_victims(const struct zc_backing *b, uint32_t *out, unsigned max)
{
	uint64_t sum = 0;
	unsigned n = 0;

	while (n < max) { /* the next emptiest segment with live bytes, not yet chosen */
		uint32_t best = UINT32_MAX, best_live = UINT32_MAX;

		for (uint32_t k = 0; k < b->nsegs; k++) {
			uint32_t live = __atomic_load_n(&b->live[k], __ATOMIC_SEQ_CST);
			int taken = (int64_t)k == b->open;

			for (unsigned i = 0; i < n && !taken; i++)
				taken = out[i] == k;
			if (live && !taken && live < best_live) {
				best = k;
				best_live = live;
			}
		}
		if (best == UINT32_MAX || sum + best_live > ZC_SEG_BYTES - ZC_BK_PAD_MAX)
			break;
		out[n++] = best;
		sum += best_live;
	}
	return n >= 2 ? n : 0;
}

uint32_t zc_backing_used(const struct zc_backing *b)
{
	uint32_t n = 0;

	for (uint32_t k = 0; k < b->nsegs; k++)
		n += __atomic_load_n(&b->live[k], __ATOMIC_RELAXED) != 0;
	return n;
}

int zc_backing_corrupt(const struct zc_backing *b, uint64_t off)
{
	uint64_t block = off / ZC_BK_BLOCK;
	uint8_t *blk = aligned_block(ZC_BK_BLOCK);
	int rc;

	if (!blk)
		return -ENOMEM;
	rc = zc_backing_read(b, block, 1, blk);
	if (!rc) {
		blk[off % ZC_BK_BLOCK] ^= 0x5a;
		rc = write_full(b->fd, blk, ZC_BK_BLOCK, block * ZC_BK_BLOCK);
	}
	free(blk);
	return rc;
}
