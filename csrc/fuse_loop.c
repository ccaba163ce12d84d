/* fuse_loop.c - the FUSE request loop of the C core (see fuse_loop.h).
 *
 * Owns: the FUSE kernel protocol on an already mounted /dev/fuse connection (INIT
 * negotiation, request decoding, replies), the two inodes (root directory 1, the one regular
 * file 2 of the device's size), the worker pthreads and their FUSE_DEV_IOC_CLONE descriptors,
 * the translation of store errors into reply errnos, and the per-worker request counters and
 * latency buckets.  The reference model is zcached/fuse.py (FuseServer); the semantics of every
 * opcode are the same, plus the bounds checks a C decoder needs.
 * Must not: store pages (store.c does), mount or unmount (zcached/fuse.py does), touch Python,
 * allocate or log on the request path (every buffer is allocated when a worker is made), or
 * keep global state (two instances share only the const latency bounds).
 *
 * REQUEST BUFFERS (per worker, allocated once)
 *   rbuf  4K-aligned; read(2) fills it from offset ZC_IN_OFF, so the payload of a WRITE (at
 *         request offset 80) starts 4K-aligned.  It holds max_write + 4K: what the kernel
 *         demands of a read buffer.  The store gets a pointer into it and must be done with
 *         the data when zc_store_write returns.
 *   obuf  READ replies: the payload 4K-aligned at obuf + 4096, the out header just before it,
 *         so one iovec carries the reply.
 *   small every other reply (header + body, at most a few hundred bytes).
 *  rbuf and obuf are the worker's own mappings, locked on fault like the rest of the server
 *  (mlockall MCL_ONFAULT): a page is resident once a request or reply has touched it.  Big
 *  requests touch all of it (2 MiB a worker), so an idle worker gives back what lies past the
 *  first ZC_KEEP bytes (TRIM below).
 *
 * TRIM (a worker's own buffers, by its own thread alone: T3)
 *  A worker whose buffers were touched past ZC_KEEP is dirty.  A dirty worker reads with
 *  O_NONBLOCK set on its descriptor and waits in poll(2) for at most ZC_TRIM_IDLE_MS; when
 *  that passes with no request, it drops the pages past ZC_KEEP (munlock, MADV_DONTNEED,
 *  mlock2 MLOCK_ONFAULT when they were locked), clears O_NONBLOCK and blocks in read(2)
 *  again.  So a busy worker pays one poll(2) per request and an idle one holds ZC_KEEP a
 *  buffer; a clean worker's loop is the plain blocking read.  The descriptor's flags are
 *  shared with the keeper's copy: a worker clears O_NONBLOCK when it starts, whatever a dead
 *  server left there.  The kernel fills a buffer only inside our own read(2), so nothing but
 *  the worker's thread ever writes it.
 *
 * SPIN (adaptive polling, zc_fuse_set_spin; off by default)
 *  After answering a request, a worker may spin for the next one for at most spin_ns:
 *  non-blocking read(2)s of its descriptor until one returns a request or the time is up, so
 *  a request that comes soon is taken without waking anybody.  At most one worker spins at a
 *  time (f->spinning, a CAS token): the others block as usual, and an idle loop uses no CPU
 *  once the last spin has run out.  A spin that ends without a request is not tried again
 *  until the worker has taken a request the usual way.
 *
 * THREADS AND STATE
 *  T1 struct zc_fuse's static fields (store, fd, size, name, the two attributes) are written
 *     by zc_fuse_new only; workers only read them.
 *  T2 f->lock guards the worker slots, f->running and each worker's started/done/joined
 *     flags: taken by the controlling thread (start, join, free, stats, worker_new/free) and by
 *     a worker once, as it ends.  Never taken on the request path.
 *  T3 A worker's buffers, context, descriptor and `gone` flag belong to its thread alone.
 *  T4 A worker's counters have one writer (its thread) and are C11 atomics updated with
 *     relaxed load + store (no read-modify-write needed with one writer); zc_fuse_stats reads
 *     them with relaxed loads from any thread: each value is exact, the sum may be one request
 *     stale.  Requests and errors are counted before the reply is written (once the caller
 *     has its answer, the stats show it); latency after, as in fuse.py.
 *  T5 initialized, kernel_minor and io_flusher_failed are atomics any worker may set
 *     (relaxed, but initialized: stored with release after INIT's front words, so a ring
 *     worker that loads it with acquire also sees whether io_uring was negotiated, T7).
 *  T6 Workers run with every signal blocked; they end when the connection goes away (ENODEV
 *     or EPERM from read(2), ENODEV from write(2)) or on an unexpected read error.
 *  T7 With zc_fuse_set_uring, ZC_URING_THREADS more workers per ring queue (slots
 *     nthreads..nslots-1) run zc_uring_serve (fuse_uring.c) once INIT was answered and
 *     negotiated io_uring; they decode with zc_fuse_call, the same handlers over the io_uring
 *     layout (arg / wdata / rdata in struct zc_req instead of one buffer).  The /dev/fuse workers stay: INIT, FORGET,
 *     INTERRUPT and resent requests still come that way.
 *
 * TAKING OVER A CONNECTION (crash recovery, live upgrade)
 *  The descriptors may belong to a keeper process that outlives servers (zc_fuse_set_fds).
 *  A request a dead server had read stays on the processing list of the descriptor it was
 *  read from while any process holds that descriptor open; FUSE_NOTIFY_RESEND puts every such
 *  request back on the pending queue, its unique with bit 63 set (the reply echoes it).  So a
 *  new server on the same descriptors answers them all: the kernel sees a pause, not an error.
 *  Replaying is safe because every request we serve is idempotent (a write or discard applied
 *  twice leaves what applying it once does; S1 in store.c says a half-applied one leaves
 *  nothing torn).  Whether INIT was answered is kept in the store's front words (the arena
 *  outlives the server): a new server must neither expect INIT again nor forget its outcome.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "fuse_loop.h"
#include "fuse_uring.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#ifndef FUSE_DEV_IOC_CLONE
#define FUSE_DEV_IOC_CLONE _IOR(229, 0, uint32_t)
#endif
#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES (1 << 6)
#endif
#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif

#define ZC_KERNEL_MAJOR 7u
#define ZC_OUR_MINOR 31u
#define ZC_ROOT_INO 1u
#define ZC_FILE_INO 2u
#define ZC_ATTR_VALID_S 86400u
#define ZC_MAX_BACKGROUND 64u
#define ZC_MAX_PAGES ZC_MAX_REQ_PAGES
#define ZC_MAX_WRITE ((size_t)ZC_MAX_PAGES * ZC_PAGE_SIZE) /* 1 MiB */
#define ZC_MAX_THREADS 256

#define ZC_IN_HDR sizeof(struct fuse_in_header)                          /* 40 */
#define ZC_OUT_HDR sizeof(struct fuse_out_header)                        /* 16 */
#define ZC_WRITE_DATA (ZC_IN_HDR + sizeof(struct fuse_write_in))         /* 80 */
#define ZC_IN_SPACE (ZC_MAX_WRITE + ZC_PAGE_SIZE)                        /* given to read(2) */
#define ZC_IN_OFF (ZC_PAGE_SIZE - ZC_WRITE_DATA)                         /* request start */
#define ZC_RBUF_SIZE (ZC_PAGE_SIZE + ZC_IN_SPACE)                        /* >= IN_OFF + SPACE */
#define ZC_OBUF_SIZE (ZC_PAGE_SIZE + ZC_MAX_WRITE)
#define ZC_SMALL 4096u
#define ZC_KEEP ((size_t)64 << 10) /* bytes of each buffer an idle worker keeps (TRIM) */
#define ZC_TRIM_IDLE_MS 1000       /* a dirty worker trims after this long without a request */
#define ZC_NO_ERRNO 512 /* the kernel refuses reply errors <= -512 (ERESTARTSYS) */

#define ZC_OP_LAST (ZC_FUSE_MAX_OPCODE - 1)
#define ZC_NOTIFY_RESEND 7               /* enum fuse_notify_code, Linux 6.9 (7.40) */
#define ZC_UNIQUE_RESEND (1ull << 63)    /* set by the kernel on a request sent again */
#define ZC_FRONT_INIT 0                  /* front word: 1 once INIT was answered */
#define ZC_FRONT_MINOR 1                 /* front word: the kernel's minor version */
#define ZC_FRONT_RESENT 2                /* front word: requests received again, all servers */
#define ZC_FRONT_URING 3                 /* front word: 1 once INIT negotiated io_uring */
#define ZC_OVER_IO_URING (1u << 9)       /* FUSE_OVER_IO_URING (bit 41) in flags2, Linux 6.14 */
#define ZC_INIT_EXT (1u << 30)           /* FUSE_INIT_EXT: flags2 is there */
#define ZC_INIT_WAIT_NS 1000000l         /* a ring worker's look at whether INIT came */

_Static_assert(ZC_WRITE_DATA == 80, "fuse_in_header + fuse_write_in must be 80 bytes");
_Static_assert(ZC_OUT_HDR == 16, "fuse_out_header must be 16 bytes");
_Static_assert(sizeof(struct fuse_init_out) == 64, "fuse_init_out must be 64 bytes");
_Static_assert(ZC_OUT_HDR + 3 * (sizeof(struct fuse_entry_out) +
				 FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + NAME_MAX)) <= ZC_SMALL,
	       "the READDIRPLUS reply must fit the small reply buffer");

/* Bucket i counts latencies < bound[i] (and >= bound[i - 1]); the last bucket the rest. */
const uint64_t zc_fuse_latency_bounds_ns[ZC_FUSE_NBUCKETS - 1] = {
	1000ull,	2000ull,	5000ull,	10000ull,      20000ull,
	50000ull,	100000ull,	200000ull,	500000ull,     1000000ull,
	2000000ull,	5000000ull,	10000000ull,	20000000ull,   50000000ull,
	100000000ull,	200000000ull,	500000000ull,	1000000000ull,
};

typedef _Atomic uint64_t zc_counter;

struct zc_wstats {
	zc_counter requests[ZC_FUSE_MAX_OPCODE];
	zc_counter errors[ZC_FUSE_MAX_OPCODE];
	zc_counter lat_sum_ns[ZC_FUSE_MAX_OPCODE];
	zc_counter lat[ZC_FUSE_MAX_OPCODE][ZC_FUSE_NBUCKETS];
	zc_counter bytes_read, bytes_written, bytes_discarded, internal_errors;
	zc_counter buffer_trims;
	zc_counter spin_ns, spin_hits; /* time spent spinning, requests a spin caught */
};

struct zc_fuse_worker {
	struct zc_fuse *f;
	int index;
	int fd;     /* the descriptor the loop serves; -1 for a worker made by a test */
	int own_fd; /* fd is a clone opened by zc_fuse_start, closed by zc_fuse_worker_free */
	int gone;   /* the connection went away (T3) */
	struct zc_ctx *ctx;
	uint8_t *rbuf, *req, *obuf;
	size_t rtouched, otouched; /* bytes of rbuf / obuf touched since the last trim (T3) */
	int nonblock;              /* O_NONBLOCK is set on fd (TRIM, SPIN) */
	int may_spin;              /* a request was answered since the last spin (SPIN) */
	pthread_t thread;
	int started, done, joined; /* T2 */
	struct zc_wstats st;
	_Alignas(8) uint8_t small[ZC_SMALL];
};

struct zc_fuse {
	struct zc_store *s;
	int fd;
	int nthreads, heaps;
	uint64_t size;
	size_t name_len;
	char name[NAME_MAX + 1];
	struct fuse_attr root_attr, file_attr;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int running, started;
	struct zc_fuse_worker **workers; /* nslots used: the /dev/fuse workers, then the rings' */
	int *given;                      /* zc_fuse_set_fds: nthreads descriptors, not owned */
	int resumed, resend_error;       /* set by zc_fuse_new / zc_fuse_start only */
	_Atomic int initialized, io_flusher_failed;
	_Atomic uint64_t spin_ns; /* SPIN: zc_fuse_set_spin, read by workers (relaxed) */
	_Atomic int spinning; /* SPIN: 1 while some worker spins */
	_Atomic uint32_t kernel_minor;
	/* io_uring (fuse_uring.c): set by zc_fuse_set_uring only (T1); ring worker j (share
	 * j % ZC_URING_THREADS of queue j / ZC_URING_THREADS) is slot nthreads + j of workers[]
	 * and counts in qst[j]. */
	struct zc_uring *uring;
	int nrings, nslots;
	char *kick_path;
	_Atomic int conn_gone; /* a /dev/fuse worker saw the connection go */
	struct zc_uring_qstats qst[ZC_URING_MAX_QUEUES * ZC_URING_THREADS];
};

/* One request being decoded, in parts (the two transports lay a request out differently). */
struct zc_req {
	struct zc_fuse_worker *w;
	struct fuse_in_header h;
	const uint8_t *arg;   /* what follows the in header: the op's struct, then names */
	size_t arg_len;
	const uint8_t *wdata; /* WRITE: the data (after its fuse_write_in) */
	size_t wdata_len;
	uint8_t *rdata;       /* READ: where the data goes (ZC_MAX_WRITE bytes) */
	size_t blen;          /* reply body bytes in w->small after the header */
	int malformed;        /* counts internal_errors */
};

/* ---- counters (T4) ------------------------------------------------------------------------ */

static inline void count(zc_counter *c, uint64_t v)
{
	atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + v,
			      memory_order_relaxed);
}

static inline uint64_t peek(zc_counter *c)
{
	return atomic_load_explicit(c, memory_order_relaxed);
}

static unsigned lat_bucket(uint64_t ns)
{
	unsigned i = 0;

	while (i < ZC_FUSE_NBUCKETS - 1 && ns >= zc_fuse_latency_bounds_ns[i])
		i++;
	return i;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- decoding helpers --------------------------------------------------------------------- */

static int malformed(struct zc_req *r)
{
	r->malformed = 1;
	return -EINVAL;
}

/* Copy the request's in-struct into dst (size bytes, zero-filled past what was sent); the
 * request must carry at least `need` bytes of it. */
static int get_in(struct zc_req *r, void *dst, size_t size, size_t need)
{
	size_t avail = r->arg_len;

	if (avail < need)
		return malformed(r);
	memset(dst, 0, size);
	memcpy(dst, r->arg, avail < size ? avail : size);
	return 0;
}

static void put(struct zc_req *r, const void *p, size_t len)
{
	memcpy(r->w->small + ZC_OUT_HDR + r->blen, p, len);
	r->blen += len;
}

static void put_zeros(struct zc_req *r, size_t len)
{
	memset(r->w->small + ZC_OUT_HDR + r->blen, 0, len);
	r->blen += len;
}

/* A store result as a reply errno the kernel accepts. */
static int reply_err(int rc)
{
	if (rc >= 0)
		return rc == 0 ? 0 : -EIO;
	return rc <= -ZC_NO_ERRNO ? -EIO : rc;
}

/* off + len > size, without overflow. */
static int past_end(uint64_t off, uint64_t len, uint64_t size)
{
	return off > size || len > size - off;
}

static const struct fuse_attr *attr_of(const struct zc_fuse *f, uint64_t ino)
{
	if (ino == ZC_ROOT_INO)
		return &f->root_attr;
	if (ino == ZC_FILE_INO)
		return &f->file_attr;
	return NULL;
}

static void put_file_entry(struct zc_req *r)
{
	struct fuse_entry_out e;

	memset(&e, 0, sizeof(e));
	e.nodeid = ZC_FILE_INO;
	e.generation = 1;
	e.entry_valid = ZC_ATTR_VALID_S;
	e.attr_valid = ZC_ATTR_VALID_S;
	e.attr = r->w->f->file_attr;
	put(r, &e, sizeof(e));
}

static void put_attr_out(struct zc_req *r, const struct fuse_attr *a)
{
	struct fuse_attr_out o;

	memset(&o, 0, sizeof(o));
	o.attr_valid = ZC_ATTR_VALID_S;
	o.attr = *a;
	put(r, &o, sizeof(o));
}

/* ---- handlers: 0 (body in w->small) or -errno --------------------------------------------- */

static int do_init(struct zc_req *r)
{
	struct zc_fuse *f = r->w->f;
	struct fuse_init_in in;
	struct fuse_init_out out;
	uint32_t want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_ASYNC_DIO | FUSE_MAX_PAGES |
			FUSE_PARALLEL_DIROPS;

	/* Kernels before 7.36 send only major, minor, max_readahead and flags. */
	if (get_in(r, &in, sizeof(in), 4 * sizeof(uint32_t)))
		return -EINVAL;
	if (in.major != ZC_KERNEL_MAJOR)
		return -EPROTO;
	memset(&out, 0, sizeof(out));
	out.major = ZC_KERNEL_MAJOR;
	out.minor = in.minor < ZC_OUR_MINOR ? in.minor : ZC_OUR_MINOR;
	out.max_readahead = in.max_readahead;
	out.flags = in.flags & want;
	if (f->uring && (in.flags & ZC_INIT_EXT) && (in.flags2 & ZC_OVER_IO_URING)) {
		out.flags |= ZC_INIT_EXT;
		out.flags2 = ZC_OVER_IO_URING;
	}
	out.max_background = ZC_MAX_BACKGROUND;
	out.congestion_threshold = ZC_MAX_BACKGROUND * 3 / 4;
	out.max_write = (uint32_t)ZC_MAX_WRITE;
	out.time_gran = 1;
	out.max_pages = ZC_MAX_PAGES;
	put(r, &out, sizeof(out));
	atomic_store_explicit(&f->kernel_minor, in.minor, memory_order_relaxed);
	{
		uint32_t *front = zc_store_front(f->s);

		__atomic_store_n(&front[ZC_FRONT_MINOR], in.minor, __ATOMIC_RELAXED);
		__atomic_store_n(&front[ZC_FRONT_URING], out.flags2 ? 1u : 0u, __ATOMIC_RELAXED);
		__atomic_store_n(&front[ZC_FRONT_INIT], 1u, __ATOMIC_RELEASE);
	}
	/* Last, release: a ring worker that sees it sees whether io_uring was negotiated. */
	atomic_store_explicit(&f->initialized, 1, memory_order_release);
	return 0;
}

static int do_lookup(struct zc_req *r)
{
	const struct zc_fuse *f = r->w->f;
	const uint8_t *name = r->arg;
	size_t len = r->arg_len;

	if (!memchr(name, 0, len))
		return malformed(r);
	while (len > 0 && name[len - 1] == 0) /* as fuse.py: the name with trailing NULs cut */
		len--;
	if (r->h.nodeid != ZC_ROOT_INO || len != f->name_len || memcmp(name, f->name, len))
		return -ENOENT;
	put_file_entry(r);
	return 0;
}

static int do_getattr(struct zc_req *r)
{
	const struct fuse_attr *a = attr_of(r->w->f, r->h.nodeid);

	if (!a)
		return -ENOENT;
	put_attr_out(r, a);
	return 0;
}

static int do_setattr(struct zc_req *r)
{
	const struct zc_fuse *f = r->w->f;
	const struct fuse_attr *a = attr_of(f, r->h.nodeid);
	struct fuse_setattr_in in;

	if (!a)
		return -ENOENT;
	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	if ((in.valid & FATTR_SIZE) && (r->h.nodeid != ZC_FILE_INO || in.size != f->size))
		return -EPERM; /* the device size is fixed */
	if ((in.valid & FATTR_MODE) && (in.mode & 07777) != (a->mode & 07777))
		return -EPERM;
	if (((in.valid & FATTR_UID) && in.uid != 0) || ((in.valid & FATTR_GID) && in.gid != 0))
		return -EPERM;
	put_attr_out(r, a); /* times: accepted and ignored */
	return 0;
}

static int do_open(struct zc_req *r)
{
	struct fuse_open_out o;

	if (r->h.nodeid == ZC_ROOT_INO)
		return -EISDIR;
	if (r->h.nodeid != ZC_FILE_INO)
		return -ENOENT;
	memset(&o, 0, sizeof(o));
	o.open_flags = FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES;
	put(r, &o, sizeof(o));
	return 0;
}

static int do_opendir(struct zc_req *r)
{
	if (r->h.nodeid != ZC_ROOT_INO)
		return -ENOTDIR;
	put_zeros(r, sizeof(struct fuse_open_out));
	return 0;
}

/* The length of one dirent (or direntplus) record. */
static size_t dirent_len(size_t namelen, int plus)
{
	return (plus ? sizeof(struct fuse_entry_out) : 0) +
	       FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + namelen);
}

static void put_dirent(struct zc_req *r, uint64_t ino, uint64_t next, const char *name,
		       size_t namelen, uint32_t type, int plus)
{
	struct fuse_dirent d;
	size_t rec = FUSE_DIRENT_ALIGN(FUSE_NAME_OFFSET + namelen);

	if (plus) {
		if (ino == ZC_FILE_INO)
			put_file_entry(r);
		else /* . and ..: no entry, the kernel does not look them up */
			put_zeros(r, sizeof(struct fuse_entry_out));
	}
	memset(&d, 0, sizeof(d));
	d.ino = ino;
	d.off = next;
	d.namelen = (uint32_t)namelen;
	d.type = type;
	put(r, &d, FUSE_NAME_OFFSET);
	put(r, name, namelen);
	put_zeros(r, rec - FUSE_NAME_OFFSET - namelen);
}

static int do_readdir(struct zc_req *r, int plus)
{
	const struct zc_fuse *f = r->w->f;
	struct fuse_read_in in;
	size_t used = 0;

	if (r->h.nodeid != ZC_ROOT_INO)
		return -ENOTDIR;
	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	for (uint64_t i = 0; i < 3; i++) {
		const char *name = i == 0 ? "." : i == 1 ? ".." : f->name;
		size_t namelen = i == 0 ? 1 : i == 1 ? 2 : f->name_len;
		uint64_t ino = i < 2 ? ZC_ROOT_INO : ZC_FILE_INO;
		uint32_t type = (i < 2 ? S_IFDIR : S_IFREG) >> 12;
		size_t len = dirent_len(namelen, plus);

		if (i < in.offset)
			continue;
		if (used + len > in.size)
			break;
		put_dirent(r, ino, i + 1, name, namelen, type, plus);
		used += len;
	}
	return 0;
}

static int do_statfs(struct zc_req *r)
{
	struct fuse_statfs_out o;

	memset(&o, 0, sizeof(o));
	o.st.blocks = r->w->f->size / ZC_PAGE_SIZE;
	o.st.files = 2;
	o.st.bsize = ZC_PAGE_SIZE;
	o.st.namelen = NAME_MAX;
	o.st.frsize = ZC_PAGE_SIZE;
	put(r, &o, sizeof(o));
	return 0;
}

static int do_getxattr(struct zc_req *r)
{
	struct fuse_getxattr_in in;

	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	return -ENODATA;
}

static int do_listxattr(struct zc_req *r)
{
	struct fuse_getxattr_in in;

	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	if (in.size == 0) /* the size of the (empty) list */
		put_zeros(r, sizeof(struct fuse_getxattr_out));
	return 0;
}

static int do_fallocate(struct zc_req *r)
{
	struct zc_fuse_worker *w = r->w;
	uint64_t size = w->f->size;
	struct fuse_fallocate_in in;
	uint32_t mode;

	if (r->h.nodeid != ZC_FILE_INO)
		return r->h.nodeid == ZC_ROOT_INO ? -EISDIR : -ENOENT;
	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	mode = in.mode;
	if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) ||
	    mode == FALLOC_FL_ZERO_RANGE || mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)) {
		/* Discarded pages read back as zeros, which is what both modes promise. */
		uint64_t len;
		int rc;

		if (mode == FALLOC_FL_ZERO_RANGE && past_end(in.offset, in.length, size))
			return -EFBIG;
		if (in.offset >= size)
			return 0;
		len = in.length > size - in.offset ? size - in.offset : in.length;
		if (len == 0)
			return 0;
		rc = reply_err(zc_store_discard(w->ctx, in.offset, len));
		if (rc)
			return rc;
		count(&w->st.bytes_discarded, len);
		return 0;
	}
	if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE) {
		if (mode == 0 && past_end(in.offset, in.length, size))
			return -EFBIG; /* the file cannot grow */
		return 0;          /* every byte of the device is already "allocated" */
	}
	return -EOPNOTSUPP;
}

/* READ: the payload goes to w->obuf + 4096; *len gets its length. */
static int do_read(struct zc_req *r, uint32_t *len)
{
	struct zc_fuse_worker *w = r->w;
	uint64_t size = w->f->size;
	struct fuse_read_in in;
	uint32_t n;
	int rc;

	*len = 0;
	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	n = in.size;
	if (in.offset >= size)
		n = 0;
	else if (n > size - in.offset)
		n = (uint32_t)(size - in.offset);
	if (n > ZC_MAX_WRITE) /* more than we negotiated (max_pages) */
		return malformed(r);
	if (n == 0)
		return 0;
	rc = reply_err(zc_store_read(w->ctx, in.offset, n, r->rdata));
	if (rc)
		return rc;
	count(&w->st.bytes_read, n);
	*len = n;
	return 0;
}

static int do_write(struct zc_req *r)
{
	struct zc_fuse_worker *w = r->w;
	struct fuse_write_in in;
	struct fuse_write_out o;
	int rc;

	if (get_in(r, &in, sizeof(in), sizeof(in)))
		return -EINVAL;
	if (r->wdata_len != (size_t)in.size || in.size > ZC_MAX_WRITE)
		return malformed(r);
	if (past_end(in.offset, in.size, w->f->size))
		return -EFBIG; /* write past the end of the device */
	if (in.size) {
		rc = reply_err(zc_store_write(w->ctx, in.offset, in.size, r->wdata));
		if (rc)
			return rc;
	}
	count(&w->st.bytes_written, in.size);
	memset(&o, 0, sizeof(o));
	o.size = in.size;
	put(r, &o, sizeof(o));
	return 0;
}

static int dispatch(struct zc_req *r)
{
	switch (r->h.opcode) {
	case FUSE_INIT:
		return do_init(r);
	case FUSE_LOOKUP:
		return do_lookup(r);
	case FUSE_GETATTR:
		return do_getattr(r);
	case FUSE_SETATTR:
		return do_setattr(r);
	case FUSE_OPEN:
		return do_open(r);
	case FUSE_OPENDIR:
		return do_opendir(r);
	case FUSE_READDIR:
		return do_readdir(r, 0);
	case FUSE_READDIRPLUS:
		return do_readdir(r, 1);
	case FUSE_STATFS:
		return do_statfs(r);
	case FUSE_ACCESS:
	case FUSE_FLUSH:
	case FUSE_RELEASE:
	case FUSE_RELEASEDIR:
	case FUSE_FSYNC:
	case FUSE_FSYNCDIR:
	case FUSE_SYNCFS:
	case FUSE_DESTROY:
		return 0;
	case FUSE_GETXATTR:
		return do_getxattr(r);
	case FUSE_LISTXATTR:
		return do_listxattr(r);
	case FUSE_LSEEK: /* the kernel then does SEEK_DATA/SEEK_HOLE generically */
		return -ENOSYS;
	case FUSE_FALLOCATE:
		return do_fallocate(r);
	case FUSE_WRITE:
		return do_write(r);
	default:
		return -ENOSYS;
	}
}

static int no_reply(uint32_t opcode)
{
	return opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET || opcode == FUSE_INTERRUPT;
}

static void set_out_header(uint8_t *dst, uint32_t len, int err, uint64_t unique)
{
	struct fuse_out_header o = { .len = len, .error = err, .unique = unique };

	memcpy(dst, &o, sizeof(o));
}

static void send_reply(struct zc_fuse_worker *w, const struct iovec *iov,
		       zc_fuse_write_fn write_fn, void *arg)
{
	int rc = write_fn(arg, iov, 1);

	if (rc == -ENODEV)
		w->gone = 1;
	else if (rc < 0 && rc != -ENOENT) /* ENOENT: the request was interrupted meanwhile */
		count(&w->st.internal_errors, 1);
}

/* A request the kernel sent again (unique bit 63): rare, only after a server died. */
static void count_resent(struct zc_fuse_worker *w, uint64_t unique)
{
	if (unique & ZC_UNIQUE_RESEND)
		__atomic_fetch_add(&zc_store_front(w->f->s)[ZC_FRONT_RESENT], 1u, __ATOMIC_RELAXED);
}

/* Count a request once it has its answer (T4: before the reply is sent). */
static void count_request(struct zc_fuse_worker *w, unsigned op, int err, int bad)
{
	if (err)
		count(&w->st.errors[op], 1);
	if (bad)
		count(&w->st.internal_errors, 1);
	count(&w->st.requests[op], 1);
}

static void count_latency(struct zc_fuse_worker *w, unsigned op, uint64_t t0)
{
	uint64_t dt = now_ns() - t0;

	count(&w->st.lat_sum_ns[op], dt);
	count(&w->st.lat[op][lat_bucket(dt)], 1);
}

static unsigned op_slot(uint32_t opcode)
{
	return opcode < ZC_FUSE_MAX_OPCODE ? opcode : ZC_OP_LAST;
}

/* Run r (a request that gets a reply, its parts set): 0 with the reply body at *body (*blen
 * bytes: a READ's in r->rdata, any other's in w->small + ZC_OUT_HDR), or the reply's -errno. */
static int answer(struct zc_req *r, const uint8_t **body, uint32_t *blen)
{
	int err;

	if (r->h.opcode == FUSE_READ) {
		err = do_read(r, blen);
		*body = r->rdata;
		return err;
	}
	err = dispatch(r);
	*body = r->w->small + ZC_OUT_HDR;
	*blen = err ? 0 : (uint32_t)r->blen;
	return err;
}

int zc_fuse_handle(struct zc_fuse_worker *w, uint8_t *buf, size_t n, zc_fuse_write_fn write_fn,
		   void *arg)
{
	uint64_t t0 = now_ns();
	struct zc_req r = { .w = w };
	const uint8_t *body;
	uint32_t blen = 0;
	struct iovec iov;
	unsigned op;
	int err;

	if (!buf || n < ZC_IN_HDR) { /* nothing to answer to */
		count(&w->st.internal_errors, 1);
		return -EINVAL;
	}
	memcpy(&r.h, buf, sizeof(r.h));
	r.arg = buf + ZC_IN_HDR;
	r.arg_len = n - ZC_IN_HDR;
	r.wdata = n >= ZC_WRITE_DATA ? buf + ZC_WRITE_DATA : NULL;
	r.wdata_len = n >= ZC_WRITE_DATA ? n - ZC_WRITE_DATA : 0;
	r.rdata = w->obuf + ZC_PAGE_SIZE; /* the out header just before it: one iovec */
	op = op_slot(r.h.opcode);
	count_resent(w, r.h.unique);
	if (no_reply(r.h.opcode)) {
		count_request(w, op, 0, r.h.len != n);
		return 0;
	}
	err = r.h.len != n ? malformed(&r) : answer(&r, &body, &blen);
	if (!err && r.h.opcode == FUSE_READ) {
		uint8_t *hdr = w->obuf + ZC_PAGE_SIZE - ZC_OUT_HDR;

		if (ZC_PAGE_SIZE + (size_t)blen > w->otouched)
			w->otouched = ZC_PAGE_SIZE + (size_t)blen;
		set_out_header(hdr, (uint32_t)ZC_OUT_HDR + blen, 0, r.h.unique);
		iov.iov_base = hdr;
	} else {
		set_out_header(w->small, (uint32_t)ZC_OUT_HDR + blen, err, r.h.unique);
		iov.iov_base = w->small;
	}
	iov.iov_len = ZC_OUT_HDR + blen;
	count_request(w, op, err, r.malformed);
	send_reply(w, &iov, write_fn, arg);
	count_latency(w, op, t0);
	return err;
}

int zc_fuse_call(struct zc_fuse_worker *w, struct zc_fuse_call *c)
{
	uint64_t t0 = now_ns();
	struct zc_req r = { .w = w };
	unsigned op = op_slot(c->h.opcode);
	int err;

	r.h = c->h;
	r.arg = c->arg;
	r.arg_len = c->arg_len;
	r.wdata = c->wdata;
	r.wdata_len = c->wdata_len;
	r.rdata = c->rdata;
	c->body = NULL;
	c->body_len = 0;
	count_resent(w, c->h.unique);
	err = c->malformed ? malformed(&r) : answer(&r, &c->body, &c->body_len);
	count_request(w, op, err, r.malformed);
	count_latency(w, op, t0);
	return err;
}

/* ---- workers ------------------------------------------------------------------------------ */

static int write_fd(void *arg, const struct iovec *iov, int iovcnt)
{
	struct zc_fuse_worker *w = arg;

	return writev(w->fd, iov, iovcnt) < 0 ? -errno : 0;
}

/* Set or clear O_NONBLOCK on the worker's descriptor; 0 or -1 (then it is left as it was). */
static int set_nonblock(struct zc_fuse_worker *w, int on)
{
	int fl = fcntl(w->fd, F_GETFL);

	if (fl < 0 || fcntl(w->fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK) < 0)
		return -1;
	w->nonblock = on;
	return 0;
}

static int buffers_dirty(const struct zc_fuse_worker *w)
{
	return w->rtouched > ZC_KEEP || w->otouched > ZC_KEEP;
}

/* Give back the pages of [p + ZC_KEEP, p + len): they read as zeros and lock again on fault. */
static int drop_tail(uint8_t *p, size_t len)
{
	uint8_t *tail = p + ZC_KEEP;
	size_t n = len - ZC_KEEP;

	if (madvise(tail, n, MADV_DONTNEED) == 0)
		return 0;
	if (errno != EINVAL) /* EINVAL: the pages are locked (mlockall) */
		return -1;
	if (munlock(tail, n) || madvise(tail, n, MADV_DONTNEED))
		return -1;
	return mlock2(tail, n, MLOCK_ONFAULT) ? -1 : 0;
}

static void trim_buffers(struct zc_fuse_worker *w)
{
	int rc = 0;

	if (w->rtouched > ZC_KEEP)
		rc |= drop_tail(w->rbuf, ZC_RBUF_SIZE);
	if (w->otouched > ZC_KEEP)
		rc |= drop_tail(w->obuf, ZC_OBUF_SIZE);
	w->rtouched = w->otouched = 0;
	count(rc ? &w->st.internal_errors : &w->st.buffer_trims, 1);
}

/* A dirty worker's wait for its next request (TRIM): 1 when it trimmed instead. */
static int wait_or_trim(struct zc_fuse_worker *w)
{
	struct pollfd p = { .fd = w->fd, .events = POLLIN };

	if (!w->nonblock && set_nonblock(w, 1)) {
		count(&w->st.internal_errors, 1); /* blocking reads, buffers kept */
		w->rtouched = w->otouched = 0;
		return 0;
	}
	if (poll(&p, 1, ZC_TRIM_IDLE_MS) != 0)
		return 0; /* a request (or an error read(2) will report) */
	trim_buffers(w);
	if (set_nonblock(w, 0))
		count(&w->st.internal_errors, 1);
	return 1;
}

/* One read(2) of a request: n > 0 bytes in w->req, 0 for none yet (EAGAIN, EINTR, or ENOENT:
 * the request was interrupted), or -errno. */
static ssize_t read_request(struct zc_fuse_worker *w)
{
	ssize_t n = read(w->fd, w->req, ZC_IN_SPACE);

	if (n >= 0)
		return n;
	return errno == ENOENT || errno == EINTR || errno == EAGAIN ? 0 : -errno;
}

/* SPIN: the next request if one comes within spin_ns (n > 0), else 0; or -errno of read(2). */
static ssize_t spin_read(struct zc_fuse_worker *w)
{
	struct zc_fuse *f = w->f;
	int idle = 0;
	ssize_t n = 0;

	w->may_spin = 0;
	if (!atomic_compare_exchange_strong(&f->spinning, &idle, 1))
		return 0;
	if (w->nonblock || !set_nonblock(w, 1)) {
		uint64_t t0 = now_ns(), t = t0;

		do {
			n = read_request(w);
			if (n)
				break;
			t = now_ns();
		} while (t - t0 < atomic_load_explicit(&f->spin_ns, memory_order_relaxed));
		count(&w->st.spin_ns, t - t0);
		if (n > 0)
			count(&w->st.spin_hits, 1);
		if (!buffers_dirty(w) && set_nonblock(w, 0)) /* a dirty worker reads non-blocking */
			count(&w->st.internal_errors, 1);
	}
	atomic_store(&f->spinning, 0);
	return n;
}

/* The next request: n > 0 bytes in w->req, 0 to look again, or -errno of read(2). */
static ssize_t next_request(struct zc_fuse_worker *w)
{
	if (w->may_spin && atomic_load_explicit(&w->f->spin_ns, memory_order_relaxed)) {
		ssize_t n = spin_read(w);

		if (n)
			return n;
	}
	if (buffers_dirty(w) && wait_or_trim(w))
		return 0;
	return read_request(w);
}

static void serve(struct zc_fuse_worker *w)
{
	if (set_nonblock(w, 0)) /* whatever a dead server left on the shared description */
		count(&w->st.internal_errors, 1);
	while (!w->gone) {
		ssize_t n = next_request(w);

		if (n == 0)
			continue;
		if (n < 0) {
			if (n != -ENODEV && n != -EPERM) /* ENODEV/EPERM: the connection is gone */
				count(&w->st.internal_errors, 1);
			else
				atomic_store(&w->f->conn_gone, 1);
			return;
		}
		if (ZC_IN_OFF + (size_t)n > w->rtouched)
			w->rtouched = ZC_IN_OFF + (size_t)n;
		zc_fuse_handle(w, w->req, (size_t)n, write_fd, w);
		w->may_spin = 1;
	}
}

static void worker_ended(struct zc_fuse_worker *w)
{
	struct zc_fuse *f = w->f;

	pthread_mutex_lock(&f->lock);
	w->done = 1;
	f->running--;
	pthread_cond_broadcast(&f->cond);
	pthread_mutex_unlock(&f->lock);
}

static void *worker_main(void *arg)
{
	struct zc_fuse_worker *w = arg;

	/* Reclaim must not wait on us: we are the swap device's I/O path. */
	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
		atomic_store_explicit(&w->f->io_flusher_failed, 1, memory_order_relaxed);
	serve(w);
	worker_ended(w);
	return NULL;
}

/* Until INIT was answered (by this server or an earlier one): 1, or 0 if the connection went
 * first. */
static int wait_init(struct zc_fuse *f)
{
	struct timespec ts = { .tv_sec = 0, .tv_nsec = ZC_INIT_WAIT_NS };

	while (!atomic_load_explicit(&f->initialized, memory_order_acquire)) {
		if (atomic_load(&f->conn_gone))
			return 0;
		nanosleep(&ts, NULL);
	}
	return 1;
}

static void *ring_main(void *arg)
{
	struct zc_fuse_worker *w = arg;
	struct zc_fuse *f = w->f;
	int j = w->index - f->nthreads; /* share j % THREADS of queue j / THREADS */

	if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0)
		atomic_store_explicit(&f->io_flusher_failed, 1, memory_order_relaxed);
	if (wait_init(f) && zc_fuse_uring_negotiated(f))
		zc_uring_serve(f->uring, j / ZC_URING_THREADS, j % ZC_URING_THREADS, f->fd, w,
			       &f->qst[j]);
	worker_ended(w);
	return NULL;
}

/* A request buffer: its own mapping, so that TRIM can give pages of it back. */
static uint8_t *map_buffer(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void unmap_buffer(uint8_t *p, size_t len)
{
	if (p)
		munmap(p, len);
}

static void worker_destroy(struct zc_fuse_worker *w)
{
	if (w->own_fd && w->fd >= 0)
		close(w->fd);
	if (w->ctx)
		zc_ctx_free(w->ctx);
	unmap_buffer(w->rbuf, ZC_RBUF_SIZE);
	unmap_buffer(w->obuf, ZC_OBUF_SIZE);
	free(w);
}

static struct zc_fuse_worker *worker_alloc(struct zc_fuse *f, int index)
{
	struct zc_fuse_worker *w;
	void *p;

	if (posix_memalign(&p, 64, sizeof(*w)))
		return NULL;
	w = p;
	memset(w, 0, sizeof(*w));
	w->f = f;
	w->index = index;
	w->fd = -1;
	w->rbuf = map_buffer(ZC_RBUF_SIZE);
	w->obuf = map_buffer(ZC_OBUF_SIZE);
	if (!w->rbuf || !w->obuf)
		goto fail;
	w->req = w->rbuf + ZC_IN_OFF;
	w->ctx = zc_ctx_new(f->s, 1 + index % f->heaps);
	if (!w->ctx)
		goto fail;
	return w;
fail:
	worker_destroy(w);
	return NULL;
}

struct zc_fuse_worker *zc_fuse_worker_new(struct zc_fuse *f, int index)
{
	struct zc_fuse_worker *w;

	if (!f || index < 0 || index >= f->nthreads) {
		errno = EINVAL;
		return NULL;
	}
	w = worker_alloc(f, index);
	if (!w) {
		errno = ENOMEM;
		return NULL;
	}
	pthread_mutex_lock(&f->lock);
	if (f->workers[index]) {
		pthread_mutex_unlock(&f->lock);
		worker_destroy(w);
		errno = EBUSY;
		return NULL;
	}
	f->workers[index] = w;
	pthread_mutex_unlock(&f->lock);
	return w;
}

static void worker_unregister_locked(struct zc_fuse_worker *w)
{
	struct zc_fuse *f = w->f;

	if (w->index >= 0 && w->index < f->nthreads && f->workers[w->index] == w)
		f->workers[w->index] = NULL;
}

void zc_fuse_worker_free(struct zc_fuse_worker *w)
{
	struct zc_fuse *f;

	if (!w)
		return;
	f = w->f;
	pthread_mutex_lock(&f->lock);
	if (w->started && !w->joined) { /* a live thread owns it: leave it to zc_fuse_free */
		pthread_mutex_unlock(&f->lock);
		return;
	}
	worker_unregister_locked(w);
	pthread_mutex_unlock(&f->lock);
	worker_destroy(w);
}

/* A FUSE_DEV_IOC_CLONE'd descriptor of the session (its own reply queue), or -1. */
static int clone_fd(int fd)
{
	uint32_t session = (uint32_t)fd;
	int c = open("/dev/fuse", O_RDWR | O_CLOEXEC);

	if (c < 0)
		return -1;
	if (ioctl(c, FUSE_DEV_IOC_CLONE, &session) != 0) {
		close(c);
		return -1;
	}
	return c;
}

/* Create the thread of w with every signal blocked (the caller's mask is restored). */
static int spawn(struct zc_fuse_worker *w, void *(*routine)(void *))
{
	sigset_t all, old;
	int rc;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	rc = pthread_create(&w->thread, NULL, routine, w);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return -rc;
}

/* FUSE_NOTIFY_RESEND: the requests read by a dead server go back on the pending queue.
 * 0 or the errno (EINVAL: a kernel before 6.9; those requests then wait for ever). */
static int send_resend(int fd)
{
	struct fuse_out_header o = { .len = ZC_OUT_HDR, .error = ZC_NOTIFY_RESEND, .unique = 0 };

	return write(fd, &o, sizeof(o)) == (ssize_t)sizeof(o) ? 0 : errno;
}

int zc_fuse_set_spin(struct zc_fuse *f, uint64_t spin_ns)
{
	if (!f || spin_ns > ZC_FUSE_MAX_SPIN_NS)
		return -EINVAL;
	atomic_store_explicit(&f->spin_ns, spin_ns, memory_order_relaxed);
	return 0;
}

int zc_fuse_set_fds(struct zc_fuse *f, const int *fds, int n)
{
	if (!f || !fds || n != f->nthreads || f->started || f->given)
		return -EINVAL;
	for (int i = 0; i < n; i++)
		if (fds[i] < 0)
			return -EINVAL;
	f->given = malloc((size_t)n * sizeof(int));
	if (!f->given)
		return -ENOMEM;
	memcpy(f->given, fds, (size_t)n * sizeof(int));
	f->fd = fds[0];
	return 0;
}

int zc_fuse_start(struct zc_fuse *f)
{
	int rc = 0;

	if (!f)
		return -EINVAL;
	if (f->fd < 0)
		return -EBADF;
	pthread_mutex_lock(&f->lock);
	if (f->started)
		goto out;
	for (int i = 0; i < f->nslots; i++)
		if (f->workers[i]) {
			rc = -EBUSY;
			goto out;
		}
	if (!f->uring && zc_fuse_uring_negotiated(f)) {
		rc = -ENOTSUP; /* its requests come over rings only: /dev/fuse alone would hang */
		goto out;
	}
	for (int i = 0; i < f->nslots; i++) {
		struct zc_fuse_worker *w = worker_alloc(f, i);

		if (!w) {
			rc = -ENOMEM;
			break;
		}
		w->fd = f->given ? f->given[i < f->nthreads ? i : 0] : f->fd;
		if (i > 0 && i < f->nthreads && !f->given) {
			int c = clone_fd(f->fd);

			if (c >= 0) {
				w->fd = c;
				w->own_fd = 1;
			}
		}
		f->workers[i] = w;
	}
	if (rc) {
		for (int i = 0; i < f->nslots; i++)
			if (f->workers[i]) {
				worker_destroy(f->workers[i]);
				f->workers[i] = NULL;
			}
		goto out;
	}
	f->started = 1;
	if (f->resumed)
		f->resend_error = send_resend(f->workers[0]->fd);
	for (int i = 0; i < f->nslots; i++) {
		struct zc_fuse_worker *w = f->workers[i];

		rc = spawn(w, i < f->nthreads ? worker_main : ring_main);
		if (rc)
			break; /* the threads already running end with the connection */
		w->started = 1;
		f->running++;
	}
out:
	pthread_mutex_unlock(&f->lock);
	return rc;
}

static void deadline_after(struct timespec *ts, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

int zc_fuse_join(struct zc_fuse *f, int timeout_ms)
{
	struct timespec deadline;
	int left;

	if (!f)
		return 0;
	if (timeout_ms >= 0)
		deadline_after(&deadline, timeout_ms);
	pthread_mutex_lock(&f->lock);
	while (f->running > 0) {
		if (timeout_ms < 0)
			pthread_cond_wait(&f->cond, &f->lock);
		else if (pthread_cond_timedwait(&f->cond, &f->lock, &deadline) == ETIMEDOUT)
			break;
	}
	for (int i = 0; i < f->nslots; i++) {
		struct zc_fuse_worker *w = f->workers[i];

		/* done is set just before the thread returns: this join does not block long. */
		if (w && w->started && w->done && !w->joined) {
			pthread_join(w->thread, NULL);
			w->joined = 1;
		}
	}
	left = f->running;
	pthread_mutex_unlock(&f->lock);
	return left;
}

/* ---- the instance ------------------------------------------------------------------------- */

static int valid_name(const char *name)
{
	size_t len;

	if (!name)
		return 0;
	len = strlen(name);
	if (len == 0 || len > NAME_MAX || strchr(name, '/'))
		return 0;
	return strcmp(name, ".") && strcmp(name, "..");
}

static void make_attr(struct fuse_attr *a, uint64_t ino, uint64_t size, uint32_t mode,
		      uint32_t nlink, uint64_t now)
{
	memset(a, 0, sizeof(*a));
	a->ino = ino;
	a->size = size;
	a->blocks = size / 512;
	a->atime = a->mtime = a->ctime = now;
	a->mode = mode;
	a->nlink = nlink;
	a->blksize = ZC_PAGE_SIZE;
}

struct zc_fuse *zc_fuse_new(struct zc_store *s, int fd, const char *file_name, int nthreads,
			    int *err)
{
	struct zc_fuse *f;
	pthread_condattr_t ca;
	uint64_t now = (uint64_t)time(NULL);
	int e = 0;

	if (!s || !valid_name(file_name) || nthreads < 1 || nthreads > ZC_MAX_THREADS) {
		e = -EINVAL;
		goto fail;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		e = -ENOMEM;
		goto fail;
	}
	f->workers = calloc((size_t)nthreads + ZC_URING_MAX_QUEUES * ZC_URING_THREADS,
			    sizeof(*f->workers));
	if (!f->workers) {
		free(f);
		e = -ENOMEM;
		goto fail;
	}
	f->s = s;
	f->fd = fd;
	f->nthreads = nthreads;
	f->nslots = nthreads;
	f->heaps = nthreads;
	f->size = zc_store_size(s);
	f->name_len = strlen(file_name);
	memcpy(f->name, file_name, f->name_len + 1);
	make_attr(&f->root_attr, ZC_ROOT_INO, 0, S_IFDIR | 0755, 2, now);
	make_attr(&f->file_attr, ZC_FILE_INO, f->size, S_IFREG | 0600, 1, now);
	pthread_mutex_init(&f->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&f->cond, &ca);
	pthread_condattr_destroy(&ca);
	{
		uint32_t *front = zc_store_front(s);
		int inited = __atomic_load_n(&front[ZC_FRONT_INIT], __ATOMIC_ACQUIRE) == 1;

		f->resumed = inited;
		atomic_init(&f->initialized, inited);
		atomic_init(&f->kernel_minor, inited ? front[ZC_FRONT_MINOR] : 0);
	}
	atomic_init(&f->io_flusher_failed, 0);
	if (err)
		*err = 0;
	return f;
fail:
	if (err)
		*err = e;
	return NULL;
}

void zc_fuse_free(struct zc_fuse *f)
{
	if (!f)
		return;
	pthread_mutex_lock(&f->lock);
	if (f->running > 0) { /* a live worker still uses it: leak rather than pull it away */
		pthread_mutex_unlock(&f->lock);
		return;
	}
	pthread_mutex_unlock(&f->lock);
	zc_fuse_join(f, 0); /* reap threads that ended but were not joined */
	for (int i = 0; i < f->nslots; i++)
		if (f->workers[i])
			worker_destroy(f->workers[i]);
	zc_uring_detach(f->uring);
	free(f->kick_path);
	pthread_cond_destroy(&f->cond);
	pthread_mutex_destroy(&f->lock);
	free(f->workers);
	free(f->given);
	free(f);
}

/* Bytes of [p, p + len) resident now (mincore: a read of the mapping, safe from any thread). */
static uint64_t resident_bytes(const uint8_t *p, size_t len)
{
	unsigned char vec[ZC_RBUF_SIZE / ZC_PAGE_SIZE];
	uint64_t n = 0;

	if (!p || len > ZC_RBUF_SIZE || mincore((void *)p, len, vec))
		return 0;
	for (size_t i = 0; i < len / ZC_PAGE_SIZE; i++)
		n += vec[i] & 1u;
	return n * ZC_PAGE_SIZE;
}

static void add_worker_stats(struct zc_fuse_worker *w, struct zc_fuse_stats *out)
{
	struct zc_wstats *st = &w->st;

	for (int op = 0; op < ZC_FUSE_MAX_OPCODE; op++) {
		out->requests[op] += peek(&st->requests[op]);
		out->errors[op] += peek(&st->errors[op]);
		out->lat_sum_ns[op] += peek(&st->lat_sum_ns[op]);
		for (int b = 0; b < ZC_FUSE_NBUCKETS; b++)
			out->lat[op][b] += peek(&st->lat[op][b]);
	}
	out->bytes_read += peek(&st->bytes_read);
	out->bytes_written += peek(&st->bytes_written);
	out->bytes_discarded += peek(&st->bytes_discarded);
	out->internal_errors += peek(&st->internal_errors);
	out->buffer_trims += peek(&st->buffer_trims);
	out->spin_ns += peek(&st->spin_ns);
	out->spin_hits += peek(&st->spin_hits);
	out->buffer_resident += resident_bytes(w->rbuf, ZC_RBUF_SIZE) +
				resident_bytes(w->obuf, ZC_OBUF_SIZE);
}

void zc_fuse_stats(struct zc_fuse *f, struct zc_fuse_stats *out)
{
	memset(out, 0, sizeof(*out));
	if (!f)
		return;
	pthread_mutex_lock(&f->lock);
	for (int i = 0; i < f->nslots; i++) {
		struct zc_fuse_worker *w = f->workers[i];

		if (!w)
			continue;
		add_worker_stats(w, out);
		for (int op = 0; i >= f->nthreads && op < ZC_FUSE_MAX_OPCODE; op++)
			out->uring_requests += peek(&w->st.requests[op]);
	}
	pthread_mutex_unlock(&f->lock);
	out->uring = zc_fuse_uring_negotiated(f) && f->uring;
	for (int j = 0; j < f->nrings; j++) {
		struct zc_uring_qstats *st = &f->qst[j];

		if (j % ZC_URING_THREADS == 0) /* a queue counts once its first share serves */
			out->uring_queues += atomic_load_explicit(&st->serving, memory_order_relaxed);
		out->uring_adopted += atomic_load_explicit(&st->adopted, memory_order_relaxed);
		out->uring_registered += atomic_load_explicit(&st->registered, memory_order_relaxed);
		out->uring_errors += atomic_load_explicit(&st->errors, memory_order_relaxed);
	}
	out->initialized = atomic_load_explicit(&f->initialized, memory_order_relaxed);
	out->kernel_minor = atomic_load_explicit(&f->kernel_minor, memory_order_relaxed);
	out->io_flusher_failed = atomic_load_explicit(&f->io_flusher_failed, memory_order_relaxed);
	out->resumed = f->resumed;
	out->resent_requests =
		__atomic_load_n(&zc_store_front(f->s)[ZC_FRONT_RESENT], __ATOMIC_RELAXED);
	out->resend_error = f->resend_error;
}

/* ---- io_uring (fuse_uring.c) -------------------------------------------------------------- */

int zc_fuse_uring_queues(void)
{
	/* The kernel makes a queue per possible CPU and uses the ring only once each has an
	 * entry: "0-N" (or a list) in /sys; the count of configured CPUs if that cannot be read. */
	char buf[256];
	int fd = open("/sys/devices/system/cpu/possible", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;
	long last = -1;

	if (fd >= 0)
		close(fd);
	if (n > 0) {
		buf[n] = 0;
		for (char *p = buf; *p;) {
			char *end;
			long v = strtol(p, &end, 10);

			if (end == p)
				break;
			if (v > last)
				last = v;
			p = *end ? end + 1 : end;
		}
	}
	if (last < 0)
		last = sysconf(_SC_NPROCESSORS_CONF) - 1;
	return last < 0 || last >= ZC_URING_MAX_QUEUES ? 0 : (int)last + 1;
}

int zc_fuse_set_uring(struct zc_fuse *f, int area_fd, const char *kick_path)
{
	int nq = zc_fuse_uring_queues(), rc;

	if (!f || f->started || f->uring || !kick_path)
		return -EINVAL;
	if (nq < 1)
		return -ENOTSUP;
	f->kick_path = strdup(kick_path);
	if (!f->kick_path)
		return -ENOMEM;
	rc = zc_uring_attach(area_fd, nq, &f->uring);
	if (rc) {
		free(f->kick_path);
		f->kick_path = NULL;
		return rc;
	}
	f->nrings = nq * ZC_URING_THREADS;
	f->nslots = f->nthreads + f->nrings;
	return 0;
}

int zc_fuse_uring_negotiated(struct zc_fuse *f)
{
	return __atomic_load_n(&zc_store_front(f->s)[ZC_FRONT_URING], __ATOMIC_ACQUIRE) == 1;
}

int zc_fuse_connected(struct zc_fuse_worker *w)
{
	return !atomic_load(&w->f->conn_gone);
}

int zc_fuse_resumed(struct zc_fuse_worker *w)
{
	return w->f->resumed;
}

const char *zc_fuse_kick_path(struct zc_fuse_worker *w)
{
	return w->f->kick_path;
}
