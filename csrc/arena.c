/* arena.c - memfd creation, mapping and hole punching (see arena.h).
 *
 * Must not: allocate objects, lock, or interpret the bytes it maps.
 */
#include "arena.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int zc_arena_create(struct zc_arena *a, uint64_t size, const char *name)
{
	a->fd = -1;
	a->base = NULL;
	a->size = size;
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);

	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)size) != 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
		int e = -errno;

		close(fd);
		return e;
	}
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);

	if (p == MAP_FAILED) {
		int e = -errno;

		close(fd);
		return e;
	}
	a->fd = fd;
	a->base = p;
	return 0;
}

int zc_arena_attach(struct zc_arena *a, int fd)
{
	struct stat st = {0};

	a->fd = -1;
	a->base = NULL;
	a->size = 0;
	int dup = fcntl(fd, F_DUPFD_CLOEXEC, 3);

	if (dup < 0)
		return -errno;
	if (fstat(dup, &st) != 0 || st.st_size <= 0) {
		int e = st.st_size <= 0 ? -EINVAL : -errno;

		close(dup);
		return e;
	}
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
		       dup, 0);

	if (p == MAP_FAILED) {
		int e = -errno;

		close(dup);
		return e;
	}
	a->fd = dup;
	a->base = p;
	a->size = (uint64_t)st.st_size;
	return 0;
}

void zc_arena_destroy(struct zc_arena *a)
{
	if (a->base)
		munmap(a->base, a->size);
	if (a->fd >= 0)
		close(a->fd);
	a->base = NULL;
	a->fd = -1;
}

int zc_arena_punch(struct zc_arena *a, uint64_t off, uint64_t len)
{
	if (fallocate(a->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len))
		return -errno;
	return 0;
}
