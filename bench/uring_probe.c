/* uring_probe.c - a measuring probe, not part of zcached: the FUSE transport alone.
 *
 * Owns: a minimal FUSE server (one file of SIZE bytes in RAM, memcpy for READ/WRITE, no
 * compression) that answers either over /dev/fuse (read/writev, one thread) or over FUSE's
 * io_uring (Linux 6.14+, fuse.enable_uring=Y): INIT over /dev/fuse with FUSE_OVER_IO_URING,
 * then one ring queue per CPU (a thread pinned to it) with DEPTH entries registered by
 * FUSE_IO_URING_CMD_REGISTER and answered by COMMIT_AND_FETCH.  bench/uring_probe.py mounts
 * it, runs fio on its file and compares the two.  Nothing here is on zcached's data path.
 * Must not: be used for data (the RAM file is lost at exit).
 *
 * usage: uring_probe MOUNTPOINT dev|uring   (prints "ready" once it serves; SIGTERM ends it)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

/* The io_uring uapi of FUSE (Linux 6.14, include/uapi/linux/fuse.h), missing from older
 * system headers. */
#define PROBE_OVER_IO_URING (1ULL << 41)
#define URING_HDR_SZ 128
struct uring_ent_in_out {
	uint64_t flags, commit_id;
	uint32_t payload_sz, padding;
	uint64_t reserved;
};
struct uring_req_header {
	char in_out[URING_HDR_SZ];
	char op_in[URING_HDR_SZ];
	struct uring_ent_in_out ent;
};
struct uring_cmd_req {
	uint64_t flags, commit_id;
	uint16_t qid;
	uint8_t padding[6];
};
enum { CMD_REGISTER = 1, CMD_COMMIT_AND_FETCH = 2 };

#define SIZE (256ull << 20)
#define MAX_WRITE (128u << 10)
#define DEPTH 4
#define MAXCPU 64

static uint8_t *ram;
static int devfd;
static int use_uring; /* offer FUSE_OVER_IO_URING in INIT (else the kernel waits for a ring) */
static _Atomic unsigned long served_dev, served_uring; /* requests answered by each transport */

/* ---- one request, whatever the transport -------------------------------------------------- */

static void attr(struct fuse_attr *a, uint64_t ino)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->mode = ino == 1 ? S_IFDIR | 0755 : S_IFREG | 0600;
	a->nlink = ino == 1 ? 2 : 1;
	a->size = ino == 1 ? 0 : SIZE;
	a->blocks = a->size / 512;
	a->blksize = 4096;
}

/* in: the in header; op: the op struct; data: what follows it (name, WRITE payload).
 * out: the reply body; returns its length, or -errno. */
static int handle(const struct fuse_in_header *in, const uint8_t *op, const uint8_t *data,
		  uint8_t *out)
{
	switch (in->opcode) {
	case FUSE_INIT: {
		const struct fuse_init_in *i = (const void *)op;
		struct fuse_init_out o;
		uint64_t want = use_uring ? PROBE_OVER_IO_URING : 0;

		memset(&o, 0, sizeof(o));
		o.major = FUSE_KERNEL_VERSION;
		o.minor = i->minor;
		o.max_readahead = i->max_readahead;
		o.flags = FUSE_ASYNC_DIO | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT;
		o.flags2 = (uint32_t)(want >> 32);
		o.max_write = MAX_WRITE;
		o.max_pages = MAX_WRITE / 4096;
		o.max_background = 64;
		o.congestion_threshold = 48;
		memcpy(out, &o, sizeof(o));
		return sizeof(o);
	}
	case FUSE_LOOKUP: {
		struct fuse_entry_out e;

		if (in->nodeid != 1 || strcmp((const char *)data, "swap.img"))
			return -ENOENT;
		memset(&e, 0, sizeof(e));
		e.nodeid = 2;
		e.attr_valid = e.entry_valid = 86400;
		attr(&e.attr, 2);
		memcpy(out, &e, sizeof(e));
		return sizeof(e);
	}
	case FUSE_GETATTR: {
		struct fuse_attr_out a;

		memset(&a, 0, sizeof(a));
		a.attr_valid = 86400;
		attr(&a.attr, in->nodeid);
		memcpy(out, &a, sizeof(a));
		return sizeof(a);
	}
	case FUSE_OPEN:
	case FUSE_OPENDIR: {
		struct fuse_open_out o;

		memset(&o, 0, sizeof(o));
		o.open_flags = in->opcode == FUSE_OPEN ? FOPEN_DIRECT_IO | (1u << 6) : 0;
		memcpy(out, &o, sizeof(o));
		return sizeof(o);
	}
	case FUSE_READ: {
		const struct fuse_read_in *r = (const void *)op;
		uint64_t n = r->size;

		if (r->offset >= SIZE)
			return 0;
		if (n > SIZE - r->offset)
			n = SIZE - r->offset;
		memcpy(out, ram + r->offset, n);
		return (int)n;
	}
	case FUSE_WRITE: {
		const struct fuse_write_in *w = (const void *)op;
		struct fuse_write_out o = { .size = w->size };

		if (w->offset + w->size > SIZE)
			return -EFBIG;
		memcpy(ram + w->offset, data, w->size);
		memcpy(out, &o, sizeof(o));
		return sizeof(o);
	}
	case FUSE_READDIR:
		return 0;
	case FUSE_RELEASE:
	case FUSE_RELEASEDIR:
	case FUSE_FLUSH:
	case FUSE_FSYNC:
	case FUSE_ACCESS:
		return 0;
	default:
		return -ENOSYS;
	}
}

static size_t op_size(uint32_t opcode)
{
	switch (opcode) {
	case FUSE_INIT:
		return sizeof(struct fuse_init_in);
	case FUSE_READ:
		return sizeof(struct fuse_read_in);
	case FUSE_WRITE:
		return sizeof(struct fuse_write_in);
	default:
		return 0; /* LOOKUP's name and the rest: data at once */
	}
}

/* ---- /dev/fuse ------------------------------------------------------------------------------ */

static void *dev_loop(void *arg)
{
	uint8_t *in = aligned_alloc(4096, MAX_WRITE + 8192), *out = aligned_alloc(4096, MAX_WRITE + 4096);

	(void)arg;
	for (;;) {
		ssize_t n = read(devfd, in, MAX_WRITE + 8192);

		if (n < 0) {
			if (errno == EINTR || errno == ENOENT || errno == EAGAIN)
				continue;
			return NULL;
		}
		const struct fuse_in_header *h = (const void *)in;

		if (h->opcode == FUSE_FORGET || h->opcode == FUSE_BATCH_FORGET ||
		    h->opcode == FUSE_INTERRUPT)
			continue;
		size_t os = op_size(h->opcode);
		int len = handle(h, in + sizeof(*h), in + sizeof(*h) + os, out + 16);

		served_dev++;
		struct fuse_out_header *o = (void *)out;

		o->unique = h->unique;
		o->error = len < 0 ? len : 0;
		o->len = 16 + (len < 0 ? 0 : (uint32_t)len);
		if (write(devfd, out, o->len) < 0 && errno == ENODEV)
			return NULL;
	}
}

/* ---- io_uring ------------------------------------------------------------------------------- */

struct ring {
	int fd;
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes; /* 128-byte entries: index * 2 */
	struct io_uring_cqe *cqes;
	unsigned pending;
};

static int ring_setup(struct ring *r, unsigned entries)
{
	struct io_uring_params p;

	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SQE128;
	r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
	if (r->fd < 0)
		return -errno;
	size_t sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	size_t cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	uint8_t *sq = mmap(NULL, sqsz > cqsz ? sqsz : cqsz, PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
	uint8_t *cq = sq;

	if (sq == MAP_FAILED)
		return -errno;
	if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
		cq = mmap(NULL, cqsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
			  IORING_OFF_CQ_RING);
		if (cq == MAP_FAILED)
			return -errno;
	}
	r->sqes = mmap(NULL, p.sq_entries * 128, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
		       r->fd, IORING_OFF_SQES);
	if (r->sqes == MAP_FAILED)
		return -errno;
	r->sq_head = (void *)(sq + p.sq_off.head);
	r->sq_tail = (void *)(sq + p.sq_off.tail);
	r->sq_mask = (void *)(sq + p.sq_off.ring_mask);
	r->sq_array = (void *)(sq + p.sq_off.array);
	r->cq_head = (void *)(cq + p.cq_off.head);
	r->cq_tail = (void *)(cq + p.cq_off.tail);
	r->cq_mask = (void *)(cq + p.cq_off.ring_mask);
	r->cqes = (void *)(cq + p.cq_off.cqes);
	return 0;
}

static struct io_uring_sqe *sqe_get(struct ring *r)
{
	unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
	struct io_uring_sqe *s = (struct io_uring_sqe *)((uint8_t *)r->sqes + 128u * idx);

	memset(s, 0, 128);
	r->sq_array[idx] = idx;
	__atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
	r->pending++;
	return s;
}

struct ent {
	struct uring_req_header hdr;
	uint8_t *payload;
	struct iovec iov[2];
};

static void fuse_cmd(struct ring *r, int op, unsigned qid, unsigned i, struct ent *e)
{
	struct io_uring_sqe *s = sqe_get(r);
	struct uring_cmd_req *c = (void *)s->cmd;

	s->opcode = IORING_OP_URING_CMD;
	s->fd = devfd;
	s->cmd_op = (uint32_t)op;
	s->user_data = i;
	c->qid = (uint16_t)qid;
	if (op == CMD_REGISTER) {
		s->addr = (uint64_t)(uintptr_t)e->iov;
		s->len = 2;
	} else {
		c->commit_id = e->hdr.ent.commit_id;
	}
}

static void *queue_loop(void *arg)
{
	unsigned qid = (unsigned)(uintptr_t)arg;
	struct ring r;
	struct ent *ents = calloc(DEPTH, sizeof(*ents));
	cpu_set_t set;
	int rc;

	CPU_ZERO(&set);
	CPU_SET(qid, &set);
	sched_setaffinity(0, sizeof(set), &set);
	if ((rc = ring_setup(&r, 2 * DEPTH))) {
		fprintf(stderr, "uring_probe: io_uring_setup: %s\n", strerror(-rc));
		exit(3);
	}
	for (unsigned i = 0; i < DEPTH; i++) {
		ents[i].payload = aligned_alloc(4096, MAX_WRITE);
		ents[i].iov[0] = (struct iovec){ &ents[i].hdr, sizeof(ents[i].hdr) };
		ents[i].iov[1] = (struct iovec){ ents[i].payload, MAX_WRITE };
		fuse_cmd(&r, CMD_REGISTER, qid, i, &ents[i]);
	}
	for (;;) {
		unsigned n = r.pending;

		r.pending = 0;
		if (syscall(__NR_io_uring_enter, r.fd, n, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0 &&
		    errno != EINTR) {
			fprintf(stderr, "uring_probe: io_uring_enter: %s\n", strerror(errno));
			exit(3);
		}
		unsigned head = *r.cq_head, tail = __atomic_load_n(r.cq_tail, __ATOMIC_ACQUIRE);

		for (; head != tail; head++) {
			struct io_uring_cqe *c = &r.cqes[head & *r.cq_mask];
			struct ent *e = &ents[c->user_data];

			if (c->res < 0) {
				if (c->res == -ENOTCONN || c->res == -ECANCELED)
					return NULL; /* unmounted */
				fprintf(stderr, "uring_probe: queue %u: %s\n", qid, strerror(-c->res));
				exit(3);
			}
			const struct fuse_in_header *h = (const void *)e->hdr.in_out;
			struct fuse_in_header hin = *h;
			static __thread uint8_t out[MAX_WRITE];
			int len = handle(&hin, (const uint8_t *)e->hdr.op_in, e->payload, out);

			served_uring++;
			struct fuse_out_header *o = (void *)e->hdr.in_out;

			if (len > 0)
				memcpy(e->payload, out, (size_t)len);
			o->unique = hin.unique;
			o->error = len < 0 ? len : 0;
			o->len = 16 + (len < 0 ? 0 : (uint32_t)len);
			e->hdr.ent.payload_sz = len < 0 ? 0 : (uint32_t)len;
			fuse_cmd(&r, CMD_COMMIT_AND_FETCH, qid, (unsigned)c->user_data, e);
		}
		__atomic_store_n(r.cq_head, head, __ATOMIC_RELEASE);
	}
}

int main(int argc, char **argv)
{
	char opts[128];
	pthread_t t;

	if (argc < 3)
		return 2;
	use_uring = !strcmp(argv[2], "uring");
	ram = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	devfd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
	snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other",
		 devfd);
	if (devfd < 0 || mount("zcprobe", argv[1], "fuse.zcprobe", MS_NOSUID | MS_NODEV, opts)) {
		perror("uring_probe: mount");
		return 3;
	}
	pthread_create(&t, NULL, dev_loop, NULL); /* INIT, and anything before the ring is up */
	if (use_uring) {
		long ncpu = sysconf(_SC_NPROCESSORS_CONF);

		sleep(1); /* INIT answered by then (the mount sends it at once) */
		for (long q = 0; q < ncpu && q < MAXCPU; q++) {
			pthread_t qt;

			pthread_create(&qt, NULL, queue_loop, (void *)(uintptr_t)q);
		}
		sleep(1);
	}
	printf("ready\n");
	fflush(stdout);
	pthread_join(t, NULL);
	fprintf(stderr, "served: dev %lu uring %lu\n", (unsigned long)served_dev,
		(unsigned long)served_uring);
	return 0;
}
