/* fuse_uring.c - FUSE over io_uring (see fuse_uring.h).
 *
 * Owns: the ring area (a memfd the keeper holds: its layout, its fixed address), the
 * io_urings (ZC_URING_THREADS per kernel queue, each with its share of the queue's entries and
 * its own thread; SQE128, raw syscalls: no liburing here), registering ring entries with
 * FUSE_IO_URING_CMD_REGISTER, answering requests with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, and
 * taking over the entries of a dead server.  Decoding a request is zc_fuse_call's
 * (fuse_loop.c); the INIT negotiation and the /dev/fuse workers are fuse_loop.c's too.
 * Must not: allocate or log on the request path, keep global state, or ever stop serving a
 * queue while the connection lives (its requests would wait for ever: no other queue and no
 * /dev/fuse reader takes them once the ring is up).
 *
 * THE KERNEL'S SIDE (fs/fuse/dev_uring.c, Linux 6.14..6.18)
 *  Once every queue has an entry, the connection sends all requests (but FORGET and
 *  INTERRUPT, which stay on /dev/fuse) to the queue of the CPU the requesting task runs on.
 *  An entry is a header buffer (the in header, the op's struct, ring_ent_in_out) and a
 *  payload buffer (the rest of the request; the reply's body), given by address at REGISTER.
 *  The kernel copies a request into them in the task context of the ring's submitter, posts a
 *  CQE (res 0), and waits for COMMIT_AND_FETCH naming the request's unique: it then copies the
 *  reply out of the same buffers and puts the next queued request into the entry.  When the
 *  submitter dies, its available entries are cancelled: they stay in the kernel, dead.  A
 *  request the dead server had taken stays on its queue's processing list until some commit
 *  names it; FUSE_NOTIFY_RESEND does not reach ring queues (it walks /dev/fuse's lists only).
 *
 * RING AREA (the keeper's memfd, mapped MAP_SHARED at ZC_URING_BASE by every server)
 *  page 0: struct area_hdr.  Then one slot per entry, queue q's entry i at slot q*DEPTH + i:
 *  its first 4K hold the kernel's header (offset 0) and our record of it (ZC_REC_OFF), then
 *  ZC_PAYLOAD bytes of payload.  The kernel keeps the addresses given at REGISTER and uses
 *  them in whichever process commits: hence one fixed address for all servers, and hence the
 *  area must outlive them (the keeper holds and locks it, as it does the arena).
 *
 * RECORD STATES (one writer: the thread serving the slot's queue; a later server reads them)
 *  U1 KERNEL   the kernel may fill the entry; rec.in is the last request answered from it.
 *  U2 TAKEN    rec.in / rec.arg hold a copy of the request in the entry, nothing acted on
 *              yet; the entry's input is intact.
 *  U3 DONE     the request was acted on (a WRITE's data is in the store) and rec.err is its
 *              outcome; the entry's buffers may be half overwritten by the reply.
 *  U4 ANSWERED the reply is complete in the entry; the commit may or may not have been
 *              submitted.  KERNEL again once io_uring_enter has taken the commit.
 *  Each state is stored (release) only after what it promises is written.
 *
 * TAKING OVER (a new server, before it registers anything: adopt_slot)
 *  For each slot of its queue: if the unique in the entry's header differs from rec.in's, the
 *  kernel delivered a request the dead server never took: take it (TAKEN).  Otherwise TAKEN:
 *  run it; DONE: rebuild the reply (a WRITE or FALLOCATE is not run again: its effect is
 *  applied and its input may be gone; every other request has no effect and is run again);
 *  ANSWERED: commit again.  A commit the kernel refuses (the request was already answered)
 *  leaves the slot dead, as KERNEL slots are: they are registered afresh, their memory being
 *  no longer the kernel's (a dead entry is never written to again).  Then a one-shot kick (a
 *  4K read of the file from a thread on the queue's CPU) makes a commit on every queue, which
 *  pulls the requests that queued while no entry was live.
 *  Not covered (the kernel offers no way): a request the kernel hands to an entry of the
 *  server while it is exiting.  Its copy into the entry runs as task work of a dead task
 *  (IO_URING_F_TASK_DEAD) and the kernel fails it with ECANCELED: the process that asked gets
 *  an I/O error.  Measured (tests/test_transport.py): a kill under four busy readers failed
 *  all four readers' next reads.  /dev/fuse has no such window (FUSE_NOTIFY_RESEND), hence
 *  io_transport "auto" is /dev/fuse (docs/fuse-layer.md).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fuse_uring.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fuse_loop.h"
#include "store.h"

#define ZC_URING_BASE ((uintptr_t)0x3e0000000000ull) /* far from mmap's and the heap's */
#define ZC_AREA_MAGIC 0x3130474e52435a5aull          /* "ZZCRNG01" */
#define ZC_SLOT_HDR 4096u
#define ZC_REC_OFF 512u
#define ZC_REC_ARG 1024u
#define ZC_PAYLOAD ((size_t)ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE) /* >= max_write, max_pages */
#define ZC_SLOT_SIZE ((size_t)ZC_SLOT_HDR + ZC_PAYLOAD)
#define ZC_IN_HDR_LEN sizeof(struct fuse_in_header)
#define ZC_RETRY_NS 100000000l /* 100 ms between tries of a ring setup that failed */

/* The io_uring uapi of FUSE (Linux 6.14 include/uapi/linux/fuse.h), absent from older
 * system headers: the layouts are fixed by the kernel. */
#define ZC_URING_HDR_SZ 128
struct kern_ent_in_out {
	uint64_t flags, commit_id;
	uint32_t payload_sz, padding;
	uint64_t reserved;
};
struct kern_req_header {
	uint8_t in_out[ZC_URING_HDR_SZ];
	uint8_t op_in[ZC_URING_HDR_SZ];
	struct kern_ent_in_out ent;
};
struct kern_cmd_req {
	uint64_t flags, commit_id;
	uint16_t qid;
	uint8_t padding[6];
};
enum { CMD_REGISTER = 1, CMD_COMMIT_AND_FETCH = 2 };

enum { RS_KERNEL = 0, RS_TAKEN = 1, RS_DONE = 2, RS_ANSWERED = 3 };

struct zc_ring_rec {
	_Atomic uint32_t state;
	int32_t err;                /* DONE..: the reply's errno */
	struct fuse_in_header in;   /* TAKEN..: the request's header */
	uint32_t arg_len, data_len; /* bytes in arg; payload bytes of the request */
	uint8_t arg[ZC_REC_ARG];    /* the request after its header (READ, WRITE: the struct) */
};

struct area_hdr {
	uint64_t magic;
	uint32_t nqueues, depth;
	uint64_t slot_size;
};

_Static_assert(sizeof(struct kern_req_header) <= ZC_REC_OFF, "header before the record");
_Static_assert(ZC_REC_OFF + sizeof(struct zc_ring_rec) <= ZC_SLOT_HDR, "record in 4K");

struct zc_uring {
	int nqueues;
	uint8_t *base;
	uint64_t size;
};

/* One queue's ring, on its thread's stack. */
enum { SL_LIVE, SL_GONE };
struct qring {
	struct zc_uring *u;
	struct zc_fuse_worker *w;
	struct zc_uring_qstats *st;
	int q, devfd, ringfd;
	int first, n; /* this ring's slots of the queue: first .. first + n - 1 */
	unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes; /* 128-byte entries */
	struct io_uring_cqe *cqes;
	void *sq_map, *sqe_map;
	size_t sq_len, sqe_len;
	unsigned queued;                     /* SQEs written, not yet taken by the kernel */
	int fifo[2 * ZC_URING_DEPTH];        /* their slots (-1: a REGISTER), oldest first */
	int slot_state[ZC_URING_DEPTH];
	struct iovec iov[ZC_URING_DEPTH][2]; /* what REGISTER names (read when it is issued) */
};

/* ---- the area ----------------------------------------------------------------------------- */

uint64_t zc_uring_area_size(int nqueues)
{
	if (nqueues < 1 || nqueues > ZC_URING_MAX_QUEUES)
		return 0;
	return ZC_SLOT_HDR + (uint64_t)nqueues * ZC_URING_DEPTH * ZC_SLOT_SIZE;
}

int zc_uring_attach(int area_fd, int nqueues, struct zc_uring **out)
{
	uint64_t size = zc_uring_area_size(nqueues);
	struct zc_uring *u;
	struct area_hdr *h;
	struct stat sb;
	void *p;

	*out = NULL;
	if (!size || fstat(area_fd, &sb) || (uint64_t)sb.st_size < size)
		return -EINVAL;
	p = mmap((void *)ZC_URING_BASE, size, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED_NOREPLACE, area_fd, 0);
	if (p == MAP_FAILED)
		return -errno;
	if (p != (void *)ZC_URING_BASE) { /* a kernel before 4.17 took it as a hint */
		munmap(p, size);
		return -EEXIST;
	}
	h = p;
	if (h->magic == 0) {
		h->nqueues = (uint32_t)nqueues;
		h->depth = ZC_URING_DEPTH;
		h->slot_size = ZC_SLOT_SIZE;
		__atomic_store_n(&h->magic, ZC_AREA_MAGIC, __ATOMIC_RELEASE);
	} else if (h->magic != ZC_AREA_MAGIC || h->nqueues != (uint32_t)nqueues ||
		   h->depth != ZC_URING_DEPTH || h->slot_size != ZC_SLOT_SIZE) {
		munmap(p, size);
		return -EINVAL;
	}
	u = calloc(1, sizeof(*u));
	if (!u) {
		munmap(p, size);
		return -ENOMEM;
	}
	u->nqueues = nqueues;
	u->base = p;
	u->size = size;
	*out = u;
	return 0;
}

void zc_uring_detach(struct zc_uring *u)
{
	if (!u)
		return;
	munmap(u->base, u->size);
	free(u);
}

int zc_uring_queues(const struct zc_uring *u)
{
	return u ? u->nqueues : 0;
}

static uint8_t *slot_base(const struct qring *r, int i)
{
	return r->u->base + ZC_SLOT_HDR + (size_t)(r->q * ZC_URING_DEPTH + i) * ZC_SLOT_SIZE;
}

static struct kern_req_header *slot_hdr(const struct qring *r, int i)
{
	return (struct kern_req_header *)(void *)slot_base(r, i);
}

static struct zc_ring_rec *slot_rec(const struct qring *r, int i)
{
	return (struct zc_ring_rec *)(void *)(slot_base(r, i) + ZC_REC_OFF);
}

static uint8_t *slot_payload(const struct qring *r, int i)
{
	return slot_base(r, i) + ZC_SLOT_HDR;
}

static void set_state(struct zc_ring_rec *rec, uint32_t state)
{
	atomic_store_explicit(&rec->state, state, memory_order_release);
}

static void bump(_Atomic uint64_t *c)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + 1,
			      memory_order_relaxed);
}

/* ---- the ring ----------------------------------------------------------------------------- */

static void ring_close(struct qring *r)
{
	if (r->sqe_map)
		munmap(r->sqe_map, r->sqe_len);
	if (r->sq_map)
		munmap(r->sq_map, r->sq_len);
	if (r->ringfd >= 0)
		close(r->ringfd);
	r->sqe_map = r->sq_map = NULL;
	r->ringfd = -1;
}

/* A shared mapping of the ring's region at `off`, or NULL. */
static void *map_ring(int fd, size_t len, off_t off)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off);

	return p == MAP_FAILED ? NULL : p;
}

static int ring_setup(struct qring *r)
{
	struct io_uring_params p;
	size_t sqsz, cqsz;
	uint8_t *sq;

	memset(&p, 0, sizeof(p));
	p.flags = IORING_SETUP_SQE128;
	r->ringfd = (int)syscall(__NR_io_uring_setup, 2 * ZC_URING_DEPTH, &p);
	if (r->ringfd < 0)
		return -errno;
	if (!(p.features & IORING_FEAT_SINGLE_MMAP)) { /* Linux 5.4+ has it; we need 6.14 */
		ring_close(r);
		return -EOPNOTSUPP;
	}
	sqsz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	cqsz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	r->sq_len = sqsz > cqsz ? sqsz : cqsz;
	r->sqe_len = p.sq_entries * 128u;
	r->sq_map = map_ring(r->ringfd, r->sq_len, IORING_OFF_SQ_RING);
	r->sqe_map = map_ring(r->ringfd, r->sqe_len, IORING_OFF_SQES);
	if (!r->sq_map || !r->sqe_map) {
		ring_close(r);
		return -ENOMEM;
	}
	sq = r->sq_map;
	r->sqes = r->sqe_map;
	r->sq_head = (void *)(sq + p.sq_off.head);
	r->sq_tail = (void *)(sq + p.sq_off.tail);
	r->sq_mask = (void *)(sq + p.sq_off.ring_mask);
	r->sq_array = (void *)(sq + p.sq_off.array);
	r->cq_head = (void *)(sq + p.cq_off.head);
	r->cq_tail = (void *)(sq + p.cq_off.tail);
	r->cq_mask = (void *)(sq + p.cq_off.ring_mask);
	r->cqes = (void *)(sq + p.cq_off.cqes);
	return 0;
}

/* Queue one FUSE command for slot i (its record says which request a commit names). */
static void queue_cmd(struct qring *r, int op, int i)
{
	unsigned tail = *r->sq_tail, idx = tail & *r->sq_mask;
	struct io_uring_sqe *s = (void *)((uint8_t *)r->sqes + 128u * idx);
	struct kern_cmd_req *c = (void *)s->cmd;

	memset(s, 0, 128);
	s->opcode = IORING_OP_URING_CMD;
	s->fd = r->devfd;
	s->cmd_op = (uint32_t)op;
	s->user_data = (uint64_t)i;
	c->qid = (uint16_t)r->q;
	if (op == CMD_REGISTER) {
		r->iov[i][0] = (struct iovec){ slot_hdr(r, i), sizeof(struct kern_req_header) };
		r->iov[i][1] = (struct iovec){ slot_payload(r, i), ZC_PAYLOAD };
		s->addr = (uint64_t)(uintptr_t)r->iov[i];
		s->len = 2;
	} else {
		c->commit_id = slot_rec(r, i)->in.unique;
	}
	r->sq_array[idx] = idx;
	__atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
	r->fifo[r->queued++] = op == CMD_REGISTER ? -1 : i;
}

static void register_slot(struct qring *r, int i)
{
	queue_cmd(r, CMD_REGISTER, i);
	bump(&r->st->registered);
}

/* Hand the queued commands to the kernel and wait for at least `wait` completions: 0 or
 * -errno.  A commit the kernel took leaves its slot KERNEL (U4). */
static int enter(struct qring *r, unsigned wait)
{
	long n = syscall(__NR_io_uring_enter, r->ringfd, r->queued, wait,
			 wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);

	unsigned took;

	if (n < 0)
		return -errno;
	took = n < (long)r->queued ? (unsigned)n : r->queued;
	for (unsigned k = 0; k < took; k++)
		if (r->fifo[k] >= 0)
			set_state(slot_rec(r, r->fifo[k]), RS_KERNEL);
	r->queued -= took;
	memmove(r->fifo, r->fifo + took, r->queued * sizeof(int));
	return 0;
}

/* ---- one request -------------------------------------------------------------------------- */

static int has_effect(uint32_t opcode)
{
	return opcode == FUSE_WRITE || opcode == FUSE_FALLOCATE;
}

/* Copy the request the kernel put in slot i into its record (U2).  0, or -EINVAL for one
 * that does not add up (answered with that error). */
static int take(struct qring *r, int i)
{
	struct kern_req_header *h = slot_hdr(r, i);
	struct zc_ring_rec *rec = slot_rec(r, i);
	uint32_t psz = h->ent.payload_sz;
	size_t arg0;
	int bad = 0;

	memcpy(&rec->in, h->in_out, sizeof(rec->in));
	rec->arg_len = rec->data_len = 0;
	if (rec->in.len < ZC_IN_HDR_LEN + (size_t)psz || psz > ZC_PAYLOAD ||
	    rec->in.len - ZC_IN_HDR_LEN - psz > ZC_URING_HDR_SZ) {
		bad = 1;
	} else {
		arg0 = rec->in.len - ZC_IN_HDR_LEN - psz; /* the op's struct, in op_in */
		memcpy(rec->arg, h->op_in, arg0);
		rec->arg_len = (uint32_t)arg0;
		rec->data_len = psz;
		if (rec->in.opcode != FUSE_WRITE) { /* the rest is small: one flat copy */
			if (arg0 + psz > ZC_REC_ARG)
				bad = 1;
			else
				memcpy(rec->arg + arg0, slot_payload(r, i), psz);
			rec->arg_len = (uint32_t)(arg0 + (bad ? 0 : psz));
		}
	}
	set_state(rec, RS_TAKEN);
	return bad ? -EINVAL : 0;
}

/* Answer the request recorded in slot i (TAKEN: run it; DONE: rebuild its reply), write the
 * reply into the entry and queue its commit. */
static void answer_slot(struct qring *r, int i, int bad)
{
	struct zc_ring_rec *rec = slot_rec(r, i);
	struct kern_req_header *h = slot_hdr(r, i);
	uint8_t *payload = slot_payload(r, i);
	struct fuse_out_header oh;
	struct fuse_write_out wo;
	const uint8_t *body = NULL;
	uint32_t blen = 0;
	int err;

	if (atomic_load_explicit(&rec->state, memory_order_acquire) == RS_DONE &&
	    has_effect(rec->in.opcode)) {
		err = rec->err; /* U3: applied; its input may be overwritten */
		if (!err && rec->in.opcode == FUSE_WRITE) {
			struct fuse_write_in in;

			memset(&in, 0, sizeof(in));
			memcpy(&in, rec->arg, rec->arg_len < sizeof(in) ? rec->arg_len : sizeof(in));
			memset(&wo, 0, sizeof(wo));
			wo.size = in.size;
			body = (const uint8_t *)&wo;
			blen = sizeof(wo);
		}
	} else {
		struct zc_fuse_call c = {
			.h = rec->in, .arg = rec->arg, .arg_len = rec->arg_len, .malformed = bad,
		};

		if (rec->in.opcode == FUSE_WRITE) {
			c.wdata = payload;
			c.wdata_len = rec->data_len;
		}
		c.rdata = payload;
		err = zc_fuse_call(r->w, &c);
		body = c.body;
		blen = err ? 0 : c.body_len;
		rec->err = err;
		set_state(rec, RS_DONE);
	}
	if (blen && body != payload)
		memcpy(payload, body, blen);
	oh.len = (uint32_t)sizeof(oh) + blen;
	oh.error = err;
	oh.unique = rec->in.unique;
	memcpy(h->in_out, &oh, sizeof(oh));
	h->ent.payload_sz = blen;
	set_state(rec, RS_ANSWERED);
	queue_cmd(r, CMD_COMMIT_AND_FETCH, i);
}

/* Slot i at the start of this server (TAKING OVER). */
static void adopt_slot(struct qring *r, int i)
{
	struct kern_req_header *h = slot_hdr(r, i);
	struct zc_ring_rec *rec = slot_rec(r, i);
	uint32_t state = atomic_load_explicit(&rec->state, memory_order_acquire);
	uint64_t unique;

	memcpy(&unique, h->in_out + offsetof(struct fuse_in_header, unique), sizeof(unique));
	if (unique != rec->in.unique) { /* delivered, never taken */
		answer_slot(r, i, take(r, i) != 0);
		bump(&r->st->adopted);
	} else if (state == RS_TAKEN || state == RS_DONE) {
		answer_slot(r, i, 0);
		bump(&r->st->adopted);
	} else if (state == RS_ANSWERED) { /* maybe committed already: not counted */
		queue_cmd(r, CMD_COMMIT_AND_FETCH, i);
	} else {
		register_slot(r, i); /* dead or never used */
	}
}

/* ---- the queue's thread ------------------------------------------------------------------- */

static void pin_to(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	(void)sched_setaffinity(0, sizeof(set), &set); /* failing costs locality only */
}

static void nap(long ns)
{
	struct timespec ts = { .tv_sec = 0, .tv_nsec = ns };

	nanosleep(&ts, NULL);
}

struct kick {
	int cpu;
	char path[4096];
};

/* A 4K read of the file from CPU k->cpu: a request on queue cpu, whose commit pulls what
 * queued there while no entry was live.  Detached; ends when the read does. */
static void *kick_main(void *arg)
{
	struct kick *k = arg;
	void *buf = NULL;
	int fd;

	pin_to(k->cpu);
	fd = open(k->path, O_RDONLY | O_DIRECT | O_CLOEXEC);
	if (fd >= 0 && !posix_memalign(&buf, ZC_PAGE_SIZE, ZC_PAGE_SIZE))
		(void)!pread(fd, buf, ZC_PAGE_SIZE, 0);
	if (fd >= 0)
		close(fd);
	free(buf);
	free(k);
	return NULL;
}

static void kick_queue(int cpu, const char *path)
{
	struct kick *k = calloc(1, sizeof(*k));
	pthread_attr_t a;
	pthread_t t;

	if (!k || strlen(path) >= sizeof(k->path)) {
		free(k);
		return;
	}
	k->cpu = cpu;
	strcpy(k->path, path);
	pthread_attr_init(&a);
	pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &a, kick_main, k))
		free(k);
	pthread_attr_destroy(&a);
}

static int gone_error(int res)
{
	return res == -ENOTCONN || res == -ECONNABORTED || res == -ENODEV || res == -ECANCELED;
}

/* One completion: a request in the slot (res 0) or a command that failed. */
static void complete(struct qring *r, const struct io_uring_cqe *c)
{
	int i = (int)c->user_data;

	if (i < r->first || i >= r->first + r->n || r->slot_state[i] == SL_GONE)
		return;
	if (c->res == 0) {
		answer_slot(r, i, take(r, i) != 0);
	} else if (gone_error(c->res)) {
		r->slot_state[i] = SL_GONE;
	} else { /* refused (ENOENT: the request had gone; EAGAIN: before INIT): afresh */
		bump(&r->st->errors);
		if (c->res != -ENOENT) /* a refusal that may last: at most 1000 tries a second */
			nap(ZC_RETRY_NS / 100);
		register_slot(r, i);
	}
}

static int all_gone(const struct qring *r)
{
	for (int i = r->first; i < r->first + r->n; i++)
		if (r->slot_state[i] != SL_GONE)
			return 0;
	return 1;
}

static void reap(struct qring *r)
{
	unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);

	for (; head != tail; head++) {
		struct io_uring_cqe c = r->cqes[head & *r->cq_mask];

		__atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
		complete(r, &c);
	}
}

void zc_uring_serve(struct zc_uring *u, int q, int k, int fd, struct zc_fuse_worker *w,
		    struct zc_uring_qstats *st)
{
	struct qring r;

	memset(&r, 0, sizeof(r));
	r.u = u;
	r.w = w;
	r.st = st;
	r.q = q;
	r.devfd = fd;
	r.ringfd = -1;
	r.n = ZC_URING_DEPTH / ZC_URING_THREADS;
	r.first = k * r.n;
	while (ring_setup(&r)) { /* never give the queue up while the connection lives */
		bump(&st->errors);
		if (!zc_fuse_connected(w))
			return;
		nap(ZC_RETRY_NS);
	}
	for (int i = r.first; i < r.first + r.n; i++)
		adopt_slot(&r, i);
	while (enter(&r, 0)) {
		bump(&st->errors);
		nap(ZC_RETRY_NS);
	}
	atomic_store(&st->serving, 1);
	if (k == 0 && zc_fuse_resumed(w) && zc_fuse_kick_path(w))
		kick_queue(q, zc_fuse_kick_path(w));
	while (!all_gone(&r)) {
		int rc = enter(&r, 1);

		if (rc && rc != -EINTR) {
			bump(&st->errors);
			nap(ZC_RETRY_NS / 100);
			continue;
		}
		reap(&r);
	}
	atomic_store(&st->serving, 0);
	ring_close(&r);
}
