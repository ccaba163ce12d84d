/* fuse_loop.h - the FUSE request loop of the C core.
 *
 * Serves one regular file (the swap image) over an already mounted /dev/fuse connection:
 * worker pthreads, each on its own FUSE_DEV_IOC_CLONE descriptor, all signals blocked, never
 * touching Python.  Mounting and unmounting stay in Python (zcached/fuse.py).
 */
#ifndef ZC_FUSE_LOOP_H
#define ZC_FUSE_LOOP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include <linux/fuse.h>

#include "store.h"

#define ZC_FUSE_MAX_OPCODE 64
#define ZC_FUSE_NBUCKETS 20 /* latency buckets: 19 bounds (1 us .. 1 s) + overflow */

struct zc_fuse;

/* Per-opcode counters summed over the workers (each worker writes only its own). */
struct zc_fuse_stats {
	uint64_t requests[ZC_FUSE_MAX_OPCODE];
	uint64_t errors[ZC_FUSE_MAX_OPCODE];
	uint64_t lat_sum_ns[ZC_FUSE_MAX_OPCODE];
	uint64_t lat[ZC_FUSE_MAX_OPCODE][ZC_FUSE_NBUCKETS];
	uint64_t bytes_read, bytes_written, bytes_discarded;
	uint64_t internal_errors; /* failures inside the loop itself (bad requests, reply errors) */
	uint64_t buffer_trims;    /* idle workers giving back their request buffers' pages */
	uint64_t buffer_resident; /* bytes of the workers' request buffers resident now */
	uint64_t spin_ns;         /* SPIN: time workers spent spinning for a request */
	uint64_t spin_hits;       /* SPIN: requests taken while spinning */
	int initialized;          /* FUSE_INIT answered (by this server or an earlier one) */
	uint32_t kernel_minor;
	int io_flusher_failed;    /* prctl(PR_SET_IO_FLUSHER) failed in some worker */
	int resumed;              /* took over a connection an earlier server had initialised */
	int resend_error;         /* errno of the FUSE_NOTIFY_RESEND write (0 = sent or none) */
	uint64_t resent_requests; /* requests the kernel sent again (unique has bit 63), counted
				   * in the arena: over every server of the store */
	int uring;                /* the connection's requests come over io_uring (INIT said so) */
	int uring_queues;         /* ring queues registered and served now */
	uint64_t uring_adopted;   /* requests a dead server left in ring entries, answered */
	uint64_t uring_requests;  /* requests answered over the rings (all kinds) */
	uint64_t uring_registered, uring_errors;
};

extern const uint64_t zc_fuse_latency_bounds_ns[ZC_FUSE_NBUCKETS - 1];

/* fd: the mounted /dev/fuse descriptor (not owned).  file_name: the one file in the root.
 * If the store's front words say an earlier server answered FUSE_INIT on this connection,
 * the new loop resumes it: zc_fuse_start first writes FUSE_NOTIFY_RESEND (Linux 6.9+), so the
 * kernel queues again every request the dead server had read and not answered. */
struct zc_fuse *zc_fuse_new(struct zc_store *s, int fd, const char *file_name, int nthreads,
			    int *err);
/* Serve on these descriptors (n == nthreads, not owned; a keeper process holds them across
 * servers) instead of fd and clones of it.  Before zc_fuse_start.  0 or -EINVAL. */
int zc_fuse_set_fds(struct zc_fuse *f, const int *fds, int n);
/* Start the workers (worker i uses Hoard heap 1 + i % heaps, heaps = nthreads: the store must
 * have been opened with heaps >= nthreads).  0 (also when already started) or -errno. */
int zc_fuse_start(struct zc_fuse *f);
/* FUSE over io_uring (fuse_uring.c): offer it in INIT and, once negotiated, serve each kernel
 * ring queue (one per possible CPU) with ZC_URING_THREADS threads beside the /dev/fuse workers (which keep INIT, FORGET, INTERRUPT and
 * what FUSE_NOTIFY_RESEND sends again).  area_fd: the ring area's memfd (the keeper holds it,
 * zc_uring_area_size bytes for zc_fuse_uring_queues()); kick_path: the served file's path,
 * read once per queue by a server that takes over.  Before zc_fuse_start.  A connection whose
 * INIT negotiated io_uring (an earlier server's) needs this call: without it, -ENOTSUP at
 * start.  0 or -errno. */
int zc_fuse_set_uring(struct zc_fuse *f, int area_fd, const char *kick_path);
/* The kernel's number of ring queues (possible CPUs); 0 if it cannot tell. */
int zc_fuse_uring_queues(void);
/* Whether this connection's INIT negotiated io_uring (an earlier server's INIT counts). */
int zc_fuse_uring_negotiated(struct zc_fuse *f);

/* Adaptive polling (fuse_loop.c, SPIN): after a request a worker spins up to spin_ns for the
 * next one (0 = never, the default).  Any time, from any thread.  0 or -EINVAL. */
#define ZC_FUSE_MAX_SPIN_NS 1000000ull
int zc_fuse_set_spin(struct zc_fuse *f, uint64_t spin_ns);
/* Wait up to timeout_ms (< 0: no limit) for every worker to end (they end when the connection
 * goes away).  Returns the number of workers still running. */
int zc_fuse_join(struct zc_fuse *f, int timeout_ms);
/* Free (only after zc_fuse_join returned 0); closes the clone descriptors it opened. */
void zc_fuse_free(struct zc_fuse *f);
void zc_fuse_stats(struct zc_fuse *f, struct zc_fuse_stats *out);

/* Decode and answer one request held in buf[0..n) as a worker would, writing the reply with
 * write_fn (tests and the fuzzer pass their own); returns the reply's errno as it is in the
 * reply header (0 = ok or no reply, else -errno; -EINVAL without a reply for n < 40).
 * write_fn returns 0 or -errno (-ENOENT: request interrupted, -ENODEV: connection gone).
 * A worker from zc_fuse_worker_new (index in [0, nthreads), slot not yet taken) is counted by
 * zc_fuse_stats until freed; it has no descriptor of its own.  Not for use while started. */
typedef int (*zc_fuse_write_fn)(void *arg, const struct iovec *iov, int iovcnt);
struct zc_fuse_worker;
struct zc_fuse_worker *zc_fuse_worker_new(struct zc_fuse *f, int index);
void zc_fuse_worker_free(struct zc_fuse_worker *w);
int zc_fuse_handle(struct zc_fuse_worker *w, uint8_t *buf, size_t n, zc_fuse_write_fn write_fn,
		   void *arg);

/* For the io_uring transport (fuse_uring.c): one request given in parts.  arg: what follows
 * the in header, flat (a WRITE's: its fuse_write_in only, the data in wdata); rdata: where a
 * READ's data goes (ZC_MAX_REQ_PAGES pages).  On return body/body_len: the reply's body (a
 * READ's in rdata, any other's in the worker's own buffer, valid until its next request).
 * Counts the request as a worker does; returns 0 or the reply's -errno. */
struct zc_fuse_call {
	struct fuse_in_header h;
	const uint8_t *arg;
	size_t arg_len;
	const uint8_t *wdata;
	size_t wdata_len;
	uint8_t *rdata;
	int malformed; /* the parts did not add up: answered EINVAL, counted */
	const uint8_t *body;
	uint32_t body_len;
};
int zc_fuse_call(struct zc_fuse_worker *w, struct zc_fuse_call *c);
int zc_fuse_connected(struct zc_fuse_worker *w); /* no /dev/fuse worker saw it go */
int zc_fuse_resumed(struct zc_fuse_worker *w);   /* the loop took over the connection */
const char *zc_fuse_kick_path(struct zc_fuse_worker *w);

#endif
