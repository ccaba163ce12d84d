/* arena.h - the memfd arena that holds a store's whole state.
 *
 * Owns: one memfd (sealed against shrinking), its size, its one shared mapping, and giving
 * 4K ranges back to the kernel (fallocate PUNCH_HOLE: the RSS falls at once, also under
 * mlockall).  Everything inside is addressed by offsets from the base, never by pointers, so
 * another process that maps the same memfd sees the same store (crash recovery, live upgrade).
 * Must not: know what the regions hold.
 */
#ifndef ZC_ARENA_H
#define ZC_ARENA_H

#include <stdint.h>

struct zc_arena {
	int fd;
	uint8_t *base;
	uint64_t size;
};

/* 0 or -errno.  The memfd is sparse: only touched pages cost memory. */
int zc_arena_create(struct zc_arena *a, uint64_t size, const char *name);
/* Map the arena held in memfd `fd` (another process made it); fd is duplicated (O_CLOEXEC),
 * the caller keeps its own.  0 or -errno. */
int zc_arena_attach(struct zc_arena *a, int fd);
void zc_arena_destroy(struct zc_arena *a);
/* Drop [off, off + len) from memory; it reads as zeros afterwards.  0 or -errno. */
int zc_arena_punch(struct zc_arena *a, uint64_t off, uint64_t len);

#define ZC_ARENA_AT(a, off, type) ((type *)(void *)((a)->base + (off)))

#endif
