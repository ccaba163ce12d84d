/* fuse_uring.h - FUSE over io_uring: the second transport of the C core's FUSE loop.
 *
 * Serves the requests of one FUSE connection through the kernel's io_uring queues (Linux
 * 6.14+, fuse.enable_uring=Y when INIT negotiated it): one queue per CPU, each served by one
 * thread of fuse_loop.c with its own ring.  The request and reply buffers (the ring area)
 * live in a memfd the keeper holds, mapped by every server at the same address, so that a
 * new server can answer what a dead one had taken (fuse_uring.c, TAKING OVER).
 * Must not: decode requests (fuse_loop.c does, zc_fuse_call) or mount anything.
 */
#ifndef ZC_FUSE_URING_H
#define ZC_FUSE_URING_H

#include <stdint.h>

#define ZC_URING_DEPTH 4       /* ring entries per queue */
#define ZC_URING_THREADS 2     /* threads (rings) per queue, each with DEPTH / THREADS entries */
#define ZC_URING_MAX_QUEUES 64 /* the kernel makes one queue per possible CPU */

struct zc_uring;
struct zc_fuse_worker;

/* Bytes of the ring area for nqueues queues (0 if nqueues is out of range). */
uint64_t zc_uring_area_size(int nqueues);
/* Map the ring area in memfd area_fd (made by zc_uring_area_size bytes, zero or left by an
 * earlier server of the same connection) at its fixed address.  0 or -errno (EEXIST: the
 * address is taken in this process; EINVAL: the area is too small or another layout). */
int zc_uring_attach(int area_fd, int nqueues, struct zc_uring **out);
void zc_uring_detach(struct zc_uring *u);
int zc_uring_queues(const struct zc_uring *u);

/* Per-queue counters, read by zc_fuse_stats from any thread (relaxed; one writer). */
struct zc_uring_qstats {
	_Atomic uint64_t adopted;    /* requests a dead server had taken, answered by this one */
	_Atomic uint64_t registered; /* entries registered with the kernel */
	_Atomic uint64_t errors;     /* ring failures (setup, submit, a commit refused) */
	_Atomic int serving;         /* 1 once the queue's entries are registered */
};

/* Serve share k (0 <= k < ZC_URING_THREADS) of queue q's entries on the connection of
 * descriptor fd, decoding with worker w, until the connection goes away.  The caller's
 * thread runs it (signals blocked).  A queue gets the requests of the tasks on CPU q (all a
 * loop device's worker makes, say), so one thread per queue would serve them one at a time:
 * each share has its own ring and thread, and the kernel hands a request to whichever entry
 * is free. */
void zc_uring_serve(struct zc_uring *u, int q, int k, int fd, struct zc_fuse_worker *w,
		    struct zc_uring_qstats *st);

#endif
