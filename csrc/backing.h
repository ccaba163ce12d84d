/* backing.h - the writeback tier's backing file: its header, its segments, its O_DIRECT I/O.
 *
 * A backing file (or block device) holds compressed objects that the store wrote back out of
 * its pool.  Block 0 is the header (magic, the id the arena records, the geometry); the rest
 * is cut into segments of ZC_SEG_BLOCKS 4K blocks, filled one whole segment per writeback
 * batch (objects packed densely, an object crossing at most one 4K boundary, never a
 * segment's end).  The page table (store.c, BACKED entries) is the only index of what is
 * where: this part knows no page, only segments and their live bytes.
 *
 * INVARIANTS
 *  B1 A segment is written only while it is the open one (taken by zc_backing_take, which
 *     only takes one with no live bytes and no holds), and only by the holder of the store's
 *     writeback lock.
 *  B2 live[k] counts the object bytes of the entries that name segment k: raised when an entry
 *     is published, lowered when it is replaced (both under the page's stripe lock).
 *  B3 holds[k] counts readers that copied an entry naming k under its stripe lock and have not
 *     yet read its bytes.  A hold is taken only while an entry names k (so live[k] > 0), hence
 *     a taker that sees live == 0 and then holds == 0 knows no reader can still come: the
 *     bytes a reader reads are those of the entry it copied, or it reads nothing.
 * Must not: know pages, codecs or the pool; allocate or sleep for a lock on the read path.
 */
#ifndef ZC_BACKING_H
#define ZC_BACKING_H

#include <stdint.h>

#define ZC_BK_BLOCK 4096u
#define ZC_SEG_BLOCKS 64u                          /* 256 KiB segments */
#define ZC_SEG_BYTES (ZC_SEG_BLOCKS * ZC_BK_BLOCK)
#define ZC_BK_MIN_BYTES (ZC_BK_BLOCK + 2u * ZC_SEG_BYTES) /* a header and two segments */
#define ZC_BK_MAX_BLOCKS 0xffffffffull             /* block numbers are 32 bits (16 TiB) */
#define ZC_BK_HIST 10u /* read latency buckets: <= 16 us << i, the last one unbounded */

struct zc_backing {
	int fd;          /* -1: none */
	uint64_t blocks; /* of the whole file, header block included */
	uint32_t nsegs;
	uint32_t *live;  /* B2, atomic */
	uint32_t *holds; /* B3, atomic */
	int64_t open;    /* the segment being written (B1), -1 */
	uint32_t cursor; /* where zc_backing_take looks first */
	uint8_t *wbuf;   /* one segment, 4K aligned (the writeback lock's) */
	uint8_t *rbuf;   /* the same, for a segment being compacted */
};

#define ZC_BK_MAX_VICTIMS 8u
#define ZC_BK_PAD_MAX 2048u /* bytes of padding in one batch at most (a byte per object) */

/* Use `fd` (the caller's; it is duplicated) of `bytes` bytes.  With *id == 0, a new file:
 * writes a new header (a fresh id into *id, the geometry into *blocks).  Else the file must
 * hold the header of id *id and at least *blocks blocks.  0, -EPROTO (another file, or an
 * unusable one), -EINVAL (too small) or -errno. */
int zc_backing_open(struct zc_backing *b, int fd, uint64_t bytes, uint64_t *id, uint64_t *blocks);
void zc_backing_close(struct zc_backing *b);

/* The first block of segment k. */
static inline uint64_t zc_seg_block(uint32_t k)
{
	return 1u + (uint64_t)k * ZC_SEG_BLOCKS;
}

/* The segment block b lies in (b >= 1). */
static inline uint32_t zc_block_seg(uint64_t b)
{
	return (uint32_t)((b - 1u) / ZC_SEG_BLOCKS);
}

/* B1: the open segment for a batch, or -1 if every one has live bytes or holds. */
int64_t zc_backing_take(struct zc_backing *b);
void zc_backing_put(struct zc_backing *b);
/* Free segments (no live bytes, no holds, not open). */
uint32_t zc_backing_free(const struct zc_backing *b);
/* The segments to compact into one: the emptiest, at least two, whose live bytes fit in one
 * segment (with room for padding); how many went to out[] (0: none worth it). */
unsigned zc_backing_victims(const struct zc_backing *b, uint32_t *out, unsigned max);
/* Write the open segment's first `bytes` (rounded up to blocks) from wbuf; 0 or -errno. */
int zc_backing_write(struct zc_backing *b, uint64_t bytes);
/* Read blocks [block, block + n) into buf (4K aligned); 0 or -errno (-EIO on a short read). */
int zc_backing_read(const struct zc_backing *b, uint64_t block, uint32_t n, uint8_t *buf);
void zc_backing_live(struct zc_backing *b, uint32_t seg, int64_t delta);
void zc_backing_hold(struct zc_backing *b, uint32_t seg);
void zc_backing_release(struct zc_backing *b, uint32_t seg);
/* Segments holding live bytes now. */
uint32_t zc_backing_used(const struct zc_backing *b);
/* Test hook: flip one byte at byte `off` of the file; 0 or -errno. */
int zc_backing_corrupt(const struct zc_backing *b, uint64_t off);

#endif
