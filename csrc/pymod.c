/* pymod.c - zcached._core: the CPython binding of the C core.
 *
 * Owns: the Python types Store and Fuse, argument checking, turning a negative errno into
 * OSError, and releasing the GIL around every call into the core.
 * Must not: do per-request work of its own (the FUSE workers never enter Python), or keep
 * state a second Store would share (no globals but the type objects).
 *
 * Contexts: Python callers (tests, the compactor, scrub) borrow a struct zc_ctx from the
 * Store's own free list (guarded by ctx_lock, a pthread mutex taken without the GIL held);
 * a new one is made when the list is empty, bound to the next Hoard heap in turn.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "fuse_loop.h"
#include "fuse_uring.h"
#include "store.h"

#define MAX_PY_CTX 32

static PyObject *u64_dict(const char *const *names, const uint64_t *vals, size_t n);

typedef struct {
	PyObject_HEAD
	struct zc_store *s;
	uint64_t size;
	int heaps, next_heap, nfree, fuse_users;
	int busy, closing; /* calls running without the GIL; close() waits for them (GIL held) */
	struct zc_ctx *free_ctx[MAX_PY_CTX];
	pthread_mutex_t ctx_lock;
	int attached;            /* made by zc_store_attach: rec holds its report */
	struct zc_recovery rec;
} StoreObject;

typedef struct {
	PyObject_HEAD
	uint8_t *base;
	size_t size;
} HoldObject;

typedef struct {
	PyObject_HEAD
	StoreObject *store;
	struct zc_fuse *f;
	int started, running;
	int busy; /* calls running without the GIL; close() refuses while any is */
} FuseObject;

static PyObject *raise_errno(int neg)
{
	errno = -neg;
	return PyErr_SetFromErrno(PyExc_OSError);
}

/* "O&" converter for offsets, lengths and sizes: an int in 0..2^64-1, else OverflowError
 * ("K" and "I" would silently keep the low bits: write(2**64, ...) wrote at offset 0). */
static int to_u64(PyObject *o, void *out)
{
	unsigned long long v = PyLong_AsUnsignedLongLong(o);

	if (v == (unsigned long long)-1 && PyErr_Occurred())
		return 0;
	*(unsigned long long *)out = v;
	return 1;
}

/* ---- contexts ------------------------------------------------------------------------------ */

static struct zc_ctx *ctx_get(StoreObject *so)
{
	struct zc_ctx *c = NULL;

	pthread_mutex_lock(&so->ctx_lock);
	if (so->nfree)
		c = so->free_ctx[--so->nfree];
	int heap = 1 + so->next_heap++ % so->heaps;

	pthread_mutex_unlock(&so->ctx_lock);
	if (!c)
		c = zc_ctx_new(so->s, heap);
	return c;
}

static void ctx_put(StoreObject *so, struct zc_ctx *c)
{
	pthread_mutex_lock(&so->ctx_lock);
	if (so->nfree < MAX_PY_CTX) {
		so->free_ctx[so->nfree++] = c;
		c = NULL;
	}
	pthread_mutex_unlock(&so->ctx_lock);
	zc_ctx_free(c);
}

static int store_ready(StoreObject *so)
{
	if (!so->s || so->closing) {
		PyErr_SetString(PyExc_ValueError, "store is closed");
		return 0;
	}
	return 1;
}

static PyObject *u64_list(const uint64_t *v, unsigned n)
{
	PyObject *l = PyList_New(n);

	for (unsigned i = 0; l && i < n; i++) {
		PyObject *o = PyLong_FromUnsignedLongLong(v[i]);

		if (!o) {
			Py_DECREF(l);
			return NULL;
		}
		PyList_SET_ITEM(l, i, o);
	}
	return l;
}

/* ---- Store --------------------------------------------------------------------------------- */

/* Store(attach=fd): the store in an existing arena, recovered (zc_store_attach). */
static int store_attach(StoreObject *so, int fd)
{
	struct zc_store_config cfg;
	struct zc_store *s;
	int err = 0;

	if (so->s) {
		PyErr_SetString(PyExc_RuntimeError, "Store already initialised");
		return -1;
	}
	Py_BEGIN_ALLOW_THREADS
	s = zc_store_attach(fd, &so->rec, &err);
	Py_END_ALLOW_THREADS
	if (!s) {
		if (err == -EPROTO) {
			PyErr_SetString(PyExc_ValueError,
					"not a zcached arena of this version (header or layout differs)");
			return -1;
		}
		raise_errno(err);
		return -1;
	}
	zc_store_get_config(s, &cfg);
	so->s = s;
	so->size = cfg.size;
	so->heaps = cfg.heaps;
	so->attached = 1;
	pthread_mutex_init(&so->ctx_lock, NULL);
	return 0;
}

static int Store_init(StoreObject *so, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = {"size",  "compressor", "level",  "mem_limit", "huge_threshold",
				 "heaps", "attach",     NULL};
	unsigned long long size = 0, mem_limit = 0, huge = 3584;
	const char *comp = "lz4";
	PyObject *level_obj = Py_None;
	int heaps = 1, attach = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "|O&sOO&O&ii", kwlist, to_u64, &size, &comp,
					 &level_obj, to_u64, &mem_limit, to_u64, &huge, &heaps,
					 &attach))
		return -1;
	if (attach >= 0)
		return store_attach(so, attach);
	struct zc_store_config cfg = {.size = size, .mem_limit = mem_limit,
				      .huge_threshold = huge > ZC_PAGE_SIZE ? 0 : (uint32_t)huge,
				      .heaps = heaps};

	if (!strcmp(comp, "lz4")) {
		cfg.compressor = ZC_LZ4;
		cfg.level = 1;
	} else if (!strcmp(comp, "zstd")) {
		cfg.compressor = ZC_ZSTD;
		cfg.level = 3;
	} else {
		PyErr_Format(PyExc_ValueError, "unknown compressor %s", comp);
		return -1;
	}
	if (level_obj != Py_None) {
		long level = PyLong_AsLong(level_obj);

		if (level == -1 && PyErr_Occurred())
			return -1;
		/* Past int: an invalid level (not its low 32 bits, which may be a valid one). */
		cfg.level = level < INT_MIN || level > INT_MAX ? INT_MIN : (int)level;
	}
	if (so->s) {
		PyErr_SetString(PyExc_RuntimeError, "Store already initialised");
		return -1;
	}
	int err = 0;
	struct zc_store *s;

	Py_BEGIN_ALLOW_THREADS
	s = zc_store_open(&cfg, &err);
	Py_END_ALLOW_THREADS
	if (!s) {
		if (err == -EINVAL) {
			PyErr_SetString(PyExc_ValueError,
					"bad store configuration (size, level, heaps or threshold)");
			return -1;
		}
		raise_errno(err);
		return -1;
	}
	so->s = s;
	so->size = size;
	so->heaps = heaps;
	pthread_mutex_init(&so->ctx_lock, NULL);
	return 0;
}

/* Called with the GIL: new calls are refused, and those still running without the GIL (each
 * counted in busy while it is) are waited for before the store is freed under them. */
static void store_close(StoreObject *so)
{
	if (!so->s || so->closing)
		return;
	so->closing = 1;
	while (so->busy) {
		Py_BEGIN_ALLOW_THREADS
		usleep(1000);
		Py_END_ALLOW_THREADS
	}
	for (int i = 0; i < so->nfree; i++)
		zc_ctx_free(so->free_ctx[i]);
	so->nfree = 0;
	zc_store_close(so->s);
	so->s = NULL;
	so->closing = 0;
	pthread_mutex_destroy(&so->ctx_lock);
}

static void Store_dealloc(StoreObject *so)
{
	store_close(so);
	Py_TYPE(so)->tp_free((PyObject *)so);
}

static PyObject *Store_close(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	if (so->fuse_users) {
		PyErr_SetString(PyExc_RuntimeError, "store still served by a Fuse loop");
		return NULL;
	}
	store_close(so);
	Py_RETURN_NONE;
}

static PyObject *Store_read(StoreObject *so, PyObject *args)
{
	unsigned long long off, len;

	if (!PyArg_ParseTuple(args, "O&O&", to_u64, &off, to_u64, &len) || !store_ready(so))
		return NULL;
	if (len > ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE) {
		PyErr_SetString(PyExc_ValueError, "read larger than 1 MiB");
		return NULL;
	}
	PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);

	if (!out)
		return NULL;
	int rc = -ENOMEM;
	uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);

	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		rc = zc_store_read(c, off, (uint32_t)len, dst);
		ctx_put(so, c);
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc) {
		Py_DECREF(out);
		return raise_errno(rc);
	}
	return out;
}

static PyObject *Store_write(StoreObject *so, PyObject *args)
{
	unsigned long long off;
	Py_buffer data;

	if (!PyArg_ParseTuple(args, "O&y*", to_u64, &off, &data))
		return NULL;
	if (!store_ready(so) || data.len > (Py_ssize_t)(ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE)) {
		if (so->s)
			PyErr_SetString(PyExc_ValueError, "write larger than 1 MiB");
		PyBuffer_Release(&data);
		return NULL;
	}
	int rc = -ENOMEM;

	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		rc = zc_store_write(c, off, (uint32_t)data.len, data.buf);
		ctx_put(so, c);
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	PyBuffer_Release(&data);
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *Store_discard(StoreObject *so, PyObject *args)
{
	unsigned long long off, len;

	if (!PyArg_ParseTuple(args, "O&O&", to_u64, &off, to_u64, &len) || !store_ready(so))
		return NULL;
	int rc = -ENOMEM;

	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		rc = zc_store_discard(c, off, len);
		ctx_put(so, c);
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

#define STAT(name) {#name, offsetof(struct zc_store_stats, name)}
static const struct {
	const char *name;
	size_t off;
} store_fields[] = {
	STAT(orig_data_size), STAT(compr_data_size), STAT(mem_used_total), STAT(mem_limit),
	STAT(mem_used_max),   STAT(same_pages),      STAT(pages_compacted), STAT(huge_pages),
	STAT(failed_reads),   STAT(failed_writes),   STAT(checksum_errors), STAT(reads),
	STAT(writes),         STAT(discards),        STAT(pages_stored),    STAT(npages),
	STAT(table_bytes),    STAT(objects),         STAT(metadata_bytes),  STAT(arena_bytes),
	STAT(vpages_to_global), STAT(recoveries),    STAT(lost_pages),      STAT(cold_pages),
	STAT(cold_bytes),     STAT(recompressed),    STAT(recompress_saved_bytes), STAT(epoch),
	STAT(dicts),          STAT(dict_bytes),      STAT(dict_memory),     STAT(dict_current),
	STAT(dicts_trained),  STAT(samples),         STAT(sample_cap),      STAT(sample_memory),
	STAT(backed_pages),   STAT(backed_bytes),    STAT(backing_bytes),   STAT(backing_used_bytes),
	STAT(writeback_pages), STAT(writeback_bytes), STAT(writeback_writes),
	STAT(writeback_errors), STAT(writeback_direct), STAT(writeback_full), STAT(writeback_relocated),
	STAT(backing_reads),
	STAT(backing_read_pages), STAT(backing_read_ns), STAT(backing_read_errors),
};

static PyObject *Store_stats(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	struct zc_store_stats st;

	if (!store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	zc_store_stats(so->s, &st);
	Py_END_ALLOW_THREADS
	so->busy--;
	PyObject *d = PyDict_New();

	for (size_t i = 0; d && i < sizeof(store_fields) / sizeof(store_fields[0]); i++) {
		uint64_t v;

		memcpy(&v, (const char *)&st + store_fields[i].off, sizeof(v));
		PyObject *o = PyLong_FromUnsignedLongLong(v);

		if (!o || PyDict_SetItemString(d, store_fields[i].name, o)) {
			Py_XDECREF(o);
			Py_DECREF(d);
			return NULL;
		}
		Py_DECREF(o);
	}
	PyObject *hist = d ? PyTuple_New(ZC_BK_HIST) : NULL;

	for (unsigned k = 0; hist && k < ZC_BK_HIST; k++)
		PyTuple_SET_ITEM(hist, k, PyLong_FromUnsignedLongLong(st.backing_read_hist[k]));
	if (!hist || PyDict_SetItemString(d, "backing_read_hist", hist)) {
		Py_XDECREF(hist);
		Py_XDECREF(d);
		return NULL;
	}
	Py_DECREF(hist);
	return d;
}

static PyObject *Store_set_backing(StoreObject *so, PyObject *args)
{
	int fd, rc;
	unsigned long long bytes;

	if (!PyArg_ParseTuple(args, "iO&", &fd, to_u64, &bytes) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_set_backing(so->s, fd, bytes);
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *Store_writeback(StoreObject *so, PyObject *args)
{
	static const char *const names[] = {"scanned", "pages",	   "bytes",
					    "raced",   "segments", "relocated"};
	unsigned long long max_bytes;
	unsigned idle;
	struct zc_writeback_report r;
	int rc = -ENOMEM;

	if (!PyArg_ParseTuple(args, "O&I", to_u64, &max_bytes, &idle) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		rc = zc_store_writeback(c, max_bytes, idle, &r);
		ctx_put(so, c);
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc)
		return raise_errno(rc);
	const uint64_t vals[] = {r.scanned, r.pages, r.bytes, r.raced, r.segments, r.relocated};

	return u64_dict(names, vals, sizeof(vals) / sizeof(vals[0]));
}

static PyObject *Store_compact(StoreObject *so, PyObject *args)
{
	unsigned long long max_moves = 0;
	uint64_t moved;

	if (!PyArg_ParseTuple(args, "|K", &max_moves) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	moved = zc_store_compact(so->s, max_moves);
	Py_END_ALLOW_THREADS
	so->busy--;
	return PyLong_FromUnsignedLongLong(moved);
}

static PyObject *Store_tick(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	if (!store_ready(so))
		return NULL;
	zc_store_tick(so->s);
	Py_RETURN_NONE;
}

static PyObject *Store_recompress(StoreObject *so, PyObject *args)
{
	static const char *const names[] = {"scanned", "candidates",   "recompressed",
					    "kept",    "raced",	       "failed",
					    "bytes_before", "bytes_after", "dict"};
	unsigned long long start, max_scan;
	unsigned idle;
	int level;
	struct zc_recompress_report r;
	uint64_t next = UINT64_MAX;
	int ok = 0;

	if (!PyArg_ParseTuple(args, "KKIi", &start, &max_scan, &idle, &level) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		next = zc_store_recompress(c, start, max_scan, idle, level, &r);
		ctx_put(so, c);
		ok = 1;
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	if (!ok)
		return PyErr_NoMemory();
	if (next == UINT64_MAX) {
		PyErr_SetString(PyExc_ValueError,
				"recompress: idle_ticks must be in 1..64 and level a zstd level");
		return NULL;
	}
	const uint64_t vals[] = {r.scanned, r.candidates,   r.recompressed, r.kept,  r.raced,
				 r.failed,  r.bytes_before, r.bytes_after,  r.dict};
	PyObject *d = u64_dict(names, vals, sizeof(vals) / sizeof(vals[0]));

	return d ? Py_BuildValue("(KN)", (unsigned long long)next, d) : NULL;
}

static PyObject *Store_sample(StoreObject *so, PyObject *args)
{
	unsigned pages, stride = 1;
	int rc;

	if (!PyArg_ParseTuple(args, "I|I", &pages, &stride) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_sample(so->s, pages, stride);
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *Store_train_dictionary(StoreObject *so, PyObject *args)
{
	unsigned dict_bytes, id = 0;
	int level, rc;

	if (!PyArg_ParseTuple(args, "Ii", &dict_bytes, &level) || !store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_train_dict(so->s, dict_bytes, level, &id);
	Py_END_ALLOW_THREADS
	so->busy--;
	if (rc)
		return raise_errno(rc);
	return PyLong_FromUnsignedLong(id);
}

static PyObject *Store_set_dictionary(StoreObject *so, PyObject *args)
{
	Py_buffer b;
	int level, rc;
	unsigned id = 0;

	if (!PyArg_ParseTuple(args, "y*i", &b, &level))
		return NULL;
	if (!store_ready(so) || b.len > (Py_ssize_t)ZC_DICT_MAX) {
		if (!PyErr_Occurred())
			PyErr_SetString(PyExc_ValueError, "dictionary larger than 64 KiB");
		PyBuffer_Release(&b);
		return NULL;
	}
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_set_dict(so->s, b.buf, (uint32_t)b.len, level, &id);
	Py_END_ALLOW_THREADS
	so->busy--;
	PyBuffer_Release(&b);
	if (rc)
		return raise_errno(rc);
	return PyLong_FromUnsignedLong(id);
}

static PyObject *Store_reclaimable_bytes(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	uint64_t n;

	if (!store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	n = zc_store_reclaimable_bytes(so->s);
	Py_END_ALLOW_THREADS
	so->busy--;
	return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Store_fragmentation(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	struct xcf_class_usage u[XCF_NCLASSES];
	unsigned n;

	if (!store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	n = zc_store_fragmentation(so->s, u, XCF_NCLASSES);
	Py_END_ALLOW_THREADS
	so->busy--;
	PyObject *list = PyList_New(n);

	for (unsigned i = 0; list && i < n; i++) {
		PyObject *t = Py_BuildValue("(IKKK)", u[i].size, (unsigned long long)u[i].pool_bytes,
					    (unsigned long long)u[i].requested_bytes,
					    (unsigned long long)u[i].objects);

		if (!t) {
			Py_DECREF(list);
			return NULL;
		}
		PyList_SET_ITEM(list, i, t);
	}
	return list;
}

#define SCRUB_MAX_REPORT 4096

static PyObject *Store_scrub(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	uint64_t checked = 0, bad = 0;
	uint64_t *pages;
	int ok = 0;

	if (!store_ready(so))
		return NULL;
	pages = PyMem_Malloc(SCRUB_MAX_REPORT * sizeof(*pages));
	if (!pages)
		return PyErr_NoMemory();
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	struct zc_ctx *c = ctx_get(so);

	if (c) {
		checked = zc_store_scrub(c, &bad, pages, SCRUB_MAX_REPORT);
		ctx_put(so, c);
		ok = 1;
	}
	Py_END_ALLOW_THREADS
	so->busy--;
	PyObject *list = ok ? u64_list(pages, (unsigned)(bad < SCRUB_MAX_REPORT ? bad : SCRUB_MAX_REPORT)) : NULL;

	PyMem_Free(pages);
	if (!ok)
		return PyErr_NoMemory();
	if (!list)
		return NULL;
	PyObject *r = Py_BuildValue("(KKN)", (unsigned long long)checked, (unsigned long long)bad, list);

	return r;
}

static PyObject *Store_corrupt(StoreObject *so, PyObject *args)
{
	unsigned long long page;

	if (!PyArg_ParseTuple(args, "O&", to_u64, &page) || !store_ready(so))
		return NULL;
	int rc = zc_store_corrupt(so->s, page);

	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *Store_check(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	int rc;

	if (!store_ready(so))
		return NULL;
	so->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_check(so->s);
	Py_END_ALLOW_THREADS
	so->busy--;
	return PyLong_FromLong(rc);
}

static PyObject *Store_memfd(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	if (!store_ready(so))
		return NULL;
	return PyLong_FromLong(zc_store_memfd(so->s));
}

static PyObject *u64_dict(const char *const *names, const uint64_t *vals, size_t n)
{
	PyObject *d = PyDict_New();

	for (size_t i = 0; d && i < n; i++) {
		PyObject *o = PyLong_FromUnsignedLongLong(vals[i]);

		if (!o || PyDict_SetItemString(d, names[i], o)) {
			Py_XDECREF(o);
			Py_CLEAR(d);
		}
		Py_XDECREF(o);
	}
	return d;
}

static PyObject *Store_recovery(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	static const char *const names[] = {"pages", "objects", "orphans", "lost_pages",
					    "pages_freed", "ns"};
	const struct zc_recovery *r = &so->rec;
	const uint64_t vals[] = {r->pages, r->objects, r->orphans, r->lost_pages, r->pages_freed,
				 r->ns};

	if (!store_ready(so))
		return NULL;
	if (!so->attached)
		Py_RETURN_NONE;
	return u64_dict(names, vals, sizeof(vals) / sizeof(vals[0]));
}

static PyObject *Store_config(StoreObject *so, PyObject *Py_UNUSED(ignored))
{
	struct zc_store_config c;

	if (!store_ready(so))
		return NULL;
	zc_store_get_config(so->s, &c);
	return Py_BuildValue("{s:K,s:s,s:i,s:K,s:I,s:i}", "size", (unsigned long long)c.size,
			     "compressor", c.compressor == ZC_ZSTD ? "zstd" : "lz4", "level",
			     c.level, "mem_limit", (unsigned long long)c.mem_limit,
			     "huge_threshold", c.huge_threshold, "heaps", c.heaps);
}

static PyMethodDef Store_methods[] = {
	{"recovery", (PyCFunction)Store_recovery, METH_NOARGS,
	 "what attaching found and did (None for a new store)"},
	{"config", (PyCFunction)Store_config, METH_NOARGS, "the configuration in the arena"},
	{"read", (PyCFunction)Store_read, METH_VARARGS, "read(offset, length) -> bytes"},
	{"write", (PyCFunction)Store_write, METH_VARARGS, "write(offset, data)"},
	{"discard", (PyCFunction)Store_discard, METH_VARARGS, "discard(offset, length)"},
	{"stats", (PyCFunction)Store_stats, METH_NOARGS, "counters as a dict"},
	{"compact", (PyCFunction)Store_compact, METH_VARARGS, "compact(max_moves=0) -> moved"},
	{"tick", (PyCFunction)Store_tick, METH_NOARGS, "advance the page-age clock by one tick"},
	{"sample", (PyCFunction)Store_sample, METH_VARARGS,
	 "sample(pages, stride=1): fill a reservoir with pages writers store (0: stop)"},
	{"train_dictionary", (PyCFunction)Store_train_dictionary, METH_VARARGS,
	 "train_dictionary(dict_bytes, level) -> id: train on the reservoir, make it current"},
	{"set_dictionary", (PyCFunction)Store_set_dictionary, METH_VARARGS,
	 "set_dictionary(bytes, level) -> id: make a given dictionary current"},
	{"set_backing", (PyCFunction)Store_set_backing, METH_VARARGS,
	 "set_backing(fd, bytes): the writeback tier's backing file"},
	{"writeback", (PyCFunction)Store_writeback, METH_VARARGS,
	 "writeback(max_bytes, idle_ticks) -> report (one segment at most)"},
	{"recompress", (PyCFunction)Store_recompress, METH_VARARGS,
	 "recompress(start, max_scan, idle_ticks, level) -> (next, report)"},
	{"reclaimable_bytes", (PyCFunction)Store_reclaimable_bytes, METH_NOARGS, ""},
	{"fragmentation", (PyCFunction)Store_fragmentation, METH_NOARGS,
	 "[(class size, pool bytes, requested bytes, objects)]"},
	{"scrub", (PyCFunction)Store_scrub, METH_NOARGS,
	 "scrub() -> (checked, bad, [first bad pages])"},
	{"corrupt", (PyCFunction)Store_corrupt, METH_VARARGS, "test hook: corrupt(page)"},
	{"check", (PyCFunction)Store_check, METH_NOARGS, "allocator invariants: 0 = ok"},
	{"memfd", (PyCFunction)Store_memfd, METH_NOARGS, "the arena's memfd"},
	{"close", (PyCFunction)Store_close, METH_NOARGS, "free the store"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject StoreType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zcached._core.Store",
	.tp_basicsize = sizeof(StoreObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Store(size, compressor='lz4', level=None, mem_limit=0, huge_threshold=3584,"
		  " heaps=1): the C page store in a memfd arena",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Store_init,
	.tp_dealloc = (destructor)Store_dealloc,
	.tp_methods = Store_methods,
};

/* ---- Fuse ---------------------------------------------------------------------------------- */

static int Fuse_init(FuseObject *fo, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = {"store", "fd", "file_name", "threads", "fds", NULL};
	PyObject *store, *fds_obj = Py_None;
	int fd, threads = 1, err = 0, fds[256], nfds = 0;
	const char *name;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "O!is|iO", kwlist, &StoreType, &store, &fd,
					 &name, &threads, &fds_obj))
		return -1;
	if (fds_obj != Py_None) {
		PyObject *seq = PySequence_Fast(fds_obj, "fds must be a sequence of descriptors");

		if (!seq)
			return -1;
		Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);

		for (Py_ssize_t i = 0; i < n && i < 256; i++) {
			long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));

			if (v == -1 && PyErr_Occurred())
				break;
			fds[nfds++] = v < 0 || v > INT_MAX ? -1 : (int)v;
		}
		Py_DECREF(seq);
		if (PyErr_Occurred())
			return -1;
		if (n < 1 || n > 256) {
			PyErr_SetString(PyExc_ValueError, "fds: 1..256 descriptors");
			return -1;
		}
		threads = nfds;
	}
	if (fo->f) {
		PyErr_SetString(PyExc_RuntimeError, "Fuse already initialised");
		return -1;
	}
	StoreObject *so = (StoreObject *)store;

	if (!store_ready(so))
		return -1;
	if (threads < 1 || threads > so->heaps) {
		PyErr_SetString(PyExc_ValueError, "threads must be 1..the store's heaps");
		return -1;
	}
	fo->f = zc_fuse_new(so->s, fd, name, threads, &err);
	if (!fo->f) {
		raise_errno(err ? err : -ENOMEM);
		return -1;
	}
	if (nfds && (err = zc_fuse_set_fds(fo->f, fds, nfds)) != 0) {
		zc_fuse_free(fo->f);
		fo->f = NULL;
		if (err == -EINVAL)
			PyErr_SetString(PyExc_ValueError, "fds: bad descriptor");
		else
			raise_errno(err);
		return -1;
	}
	Py_INCREF(store);
	fo->store = so;
	so->fuse_users++;
	return 0;
}

static PyObject *Fuse_set_spin(FuseObject *fo, PyObject *args)
{
	unsigned int us;

	if (!PyArg_ParseTuple(args, "I", &us))
		return NULL;
	if (!fo->f || zc_fuse_set_spin(fo->f, (uint64_t)us * 1000u)) {
		PyErr_SetString(PyExc_ValueError, "spin: 0..1000 us, on an initialised Fuse");
		return NULL;
	}
	Py_RETURN_NONE;
}

static PyObject *Fuse_set_uring(FuseObject *fo, PyObject *args)
{
	const char *path;
	int fd, rc;

	if (!PyArg_ParseTuple(args, "is", &fd, &path))
		return NULL;
	if (!fo->f || fo->started) {
		PyErr_SetString(PyExc_RuntimeError, "Fuse not initialised or already started");
		return NULL;
	}
	rc = zc_fuse_set_uring(fo->f, fd, path);
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *Fuse_start(FuseObject *fo, PyObject *Py_UNUSED(ignored))
{
	int rc;

	if (!fo->f || fo->started) {
		PyErr_SetString(PyExc_RuntimeError, "Fuse not initialised or already started");
		return NULL;
	}
	fo->busy++;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_fuse_start(fo->f);
	Py_END_ALLOW_THREADS
	fo->busy--;
	fo->started = 1;
	if (rc)
		return raise_errno(rc);
	fo->running = 1;
	Py_RETURN_NONE;
}

static PyObject *Fuse_join(FuseObject *fo, PyObject *args)
{
	int timeout_ms, left = 0;

	if (!PyArg_ParseTuple(args, "i", &timeout_ms))
		return NULL;
	if (fo->f && fo->started) {
		fo->busy++;
		Py_BEGIN_ALLOW_THREADS
		left = zc_fuse_join(fo->f, timeout_ms);
		Py_END_ALLOW_THREADS
		fo->busy--;
	}
	if (!left)
		fo->running = 0;
	return PyLong_FromLong(left);
}

static void fuse_release(FuseObject *fo)
{
	if (!fo->f || fo->running || fo->busy)
		return; /* never free what a live worker, or a call without the GIL, may still use */
	zc_fuse_free(fo->f);
	fo->f = NULL;
	if (fo->store) {
		fo->store->fuse_users--;
		Py_CLEAR(fo->store);
	}
}

static PyObject *Fuse_close(FuseObject *fo, PyObject *Py_UNUSED(ignored))
{
	if (fo->running || fo->busy) {
		PyErr_SetString(PyExc_RuntimeError,
				fo->running ? "workers still running: join() first"
					    : "a call on this Fuse is still running");
		return NULL;
	}
	fuse_release(fo);
	Py_RETURN_NONE;
}

static void Fuse_dealloc(FuseObject *fo)
{
	fuse_release(fo);
	Py_TYPE(fo)->tp_free((PyObject *)fo);
}

static int set_item(PyObject *d, const char *key, PyObject *v)
{
	int rc = v ? PyDict_SetItemString(d, key, v) : -1;

	Py_XDECREF(v);
	return rc;
}

static PyObject *Fuse_stats(FuseObject *fo, PyObject *Py_UNUSED(ignored))
{
	struct zc_fuse_stats *st;

	if (!fo->f) {
		PyErr_SetString(PyExc_ValueError, "Fuse is closed");
		return NULL;
	}
	st = PyMem_Malloc(sizeof(*st));
	if (!st)
		return PyErr_NoMemory();
	fo->busy++;
	Py_BEGIN_ALLOW_THREADS
	zc_fuse_stats(fo->f, st);
	Py_END_ALLOW_THREADS
	fo->busy--;
	PyObject *d = PyDict_New(), *lat = PyList_New(ZC_FUSE_MAX_OPCODE);
	int bad = !d || !lat;

	for (unsigned op = 0; !bad && op < ZC_FUSE_MAX_OPCODE; op++) {
		PyObject *row = u64_list(st->lat[op], ZC_FUSE_NBUCKETS);

		if (!row)
			bad = 1;
		else
			PyList_SET_ITEM(lat, op, row);
	}
	if (!bad)
		bad = set_item(d, "requests", u64_list(st->requests, ZC_FUSE_MAX_OPCODE)) ||
		      set_item(d, "errors", u64_list(st->errors, ZC_FUSE_MAX_OPCODE)) ||
		      set_item(d, "lat_sum_ns", u64_list(st->lat_sum_ns, ZC_FUSE_MAX_OPCODE)) ||
		      PyDict_SetItemString(d, "lat", lat) ||
		      set_item(d, "latency_bounds_ns",
			       u64_list(zc_fuse_latency_bounds_ns, ZC_FUSE_NBUCKETS - 1)) ||
		      set_item(d, "bytes_read", PyLong_FromUnsignedLongLong(st->bytes_read)) ||
		      set_item(d, "bytes_written", PyLong_FromUnsignedLongLong(st->bytes_written)) ||
		      set_item(d, "bytes_discarded",
			       PyLong_FromUnsignedLongLong(st->bytes_discarded)) ||
		      set_item(d, "internal_errors",
			       PyLong_FromUnsignedLongLong(st->internal_errors)) ||
		      set_item(d, "buffer_trims", PyLong_FromUnsignedLongLong(st->buffer_trims)) ||
		      set_item(d, "buffer_resident",
			       PyLong_FromUnsignedLongLong(st->buffer_resident)) ||
		      set_item(d, "spin_ns", PyLong_FromUnsignedLongLong(st->spin_ns)) ||
		      set_item(d, "spin_hits", PyLong_FromUnsignedLongLong(st->spin_hits)) ||
		      set_item(d, "initialized", PyBool_FromLong(st->initialized)) ||
		      set_item(d, "kernel_minor", PyLong_FromUnsignedLong(st->kernel_minor)) ||
		      set_item(d, "io_flusher_failed", PyBool_FromLong(st->io_flusher_failed)) ||
		      set_item(d, "resumed", PyBool_FromLong(st->resumed)) ||
		      set_item(d, "resend_error", PyLong_FromLong(st->resend_error)) ||
		      set_item(d, "resent_requests",
			       PyLong_FromUnsignedLongLong(st->resent_requests)) ||
		      set_item(d, "uring", PyBool_FromLong(st->uring)) ||
		      set_item(d, "uring_queues", PyLong_FromLong(st->uring_queues)) ||
		      set_item(d, "uring_adopted", PyLong_FromUnsignedLongLong(st->uring_adopted)) ||
		      set_item(d, "uring_requests",
			       PyLong_FromUnsignedLongLong(st->uring_requests)) ||
		      set_item(d, "uring_registered",
			       PyLong_FromUnsignedLongLong(st->uring_registered)) ||
		      set_item(d, "uring_errors", PyLong_FromUnsignedLongLong(st->uring_errors));
	PyMem_Free(st);
	Py_XDECREF(lat);
	if (bad) {
		Py_XDECREF(d);
		return NULL;
	}
	return d;
}

static PyMethodDef Fuse_methods[] = {
	{"start", (PyCFunction)Fuse_start, METH_NOARGS, "start the worker threads"},
	{"set_uring", (PyCFunction)Fuse_set_uring, METH_VARARGS,
	 "set_uring(area_fd, file_path): serve over FUSE's io_uring once INIT negotiates it"},
	{"set_spin", (PyCFunction)Fuse_set_spin, METH_VARARGS,
	 "set_spin(us): how long a worker spins for the next request (0 = never)"},
	{"join", (PyCFunction)Fuse_join, METH_VARARGS, "join(timeout_ms) -> workers still running"},
	{"stats", (PyCFunction)Fuse_stats, METH_NOARGS, "per-opcode counters and latencies"},
	{"close", (PyCFunction)Fuse_close, METH_NOARGS, "free (after join() returned 0)"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject FuseType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zcached._core.Fuse",
	.tp_basicsize = sizeof(FuseObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Fuse(store, fd, file_name, threads=1): the C request loop on a mounted fd",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Fuse_init,
	.tp_dealloc = (destructor)Fuse_dealloc,
	.tp_methods = Fuse_methods,
};

/* ---- Hold: the keeper's mapping of an arena ------------------------------------------------ */

/* Hold(fd): the whole memfd mapped shared and locked on fault (mlock2 MLOCK_ONFAULT).  pin()
 * faults in, read-only and without copying anything, the pages the arena has in memory
 * (mincore), so they stay locked while no server maps them. */
static int Hold_init(HoldObject *ho, PyObject *args, PyObject *kw)
{
	static char *kwlist[] = {"fd", NULL};
	struct stat st;
	int fd;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "i", kwlist, &fd))
		return -1;
	if (ho->base) {
		PyErr_SetString(PyExc_RuntimeError, "Hold already initialised");
		return -1;
	}
	if (fstat(fd, &st) != 0 || st.st_size <= 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);

	if (p == MAP_FAILED) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	(void)mlock2(p, (size_t)st.st_size, MLOCK_ONFAULT); /* without CAP_IPC_LOCK: unlocked */
	ho->base = p;
	ho->size = (size_t)st.st_size;
	return 0;
}

static uint64_t pin_resident(uint8_t *base, size_t size)
{
	const size_t chunk = (size_t)64 << 20;
	unsigned char *vec = malloc(chunk / ZC_PAGE_SIZE);
	uint64_t pinned = 0;

	if (!vec)
		return 0;
	for (size_t off = 0; off < size; off += chunk) {
		size_t len = size - off < chunk ? size - off : chunk, n = len / ZC_PAGE_SIZE, run = 0;

		if (mincore(base + off, len, vec) != 0)
			break;
		for (size_t i = 0; i <= n; i++) {
			if (i < n && (vec[i] & 1)) {
				run++;
				continue;
			}
			if (run && !madvise(base + off + (i - run) * ZC_PAGE_SIZE,
					    run * ZC_PAGE_SIZE, MADV_POPULATE_READ))
				pinned += run;
			run = 0;
		}
	}
	free(vec);
	return pinned;
}

static PyObject *Hold_pin(HoldObject *ho, PyObject *Py_UNUSED(ignored))
{
	uint64_t n;

	if (!ho->base) {
		PyErr_SetString(PyExc_ValueError, "Hold is closed");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	n = pin_resident(ho->base, ho->size);
	Py_END_ALLOW_THREADS
	return PyLong_FromUnsignedLongLong(n);
}

static PyObject *Hold_close(HoldObject *ho, PyObject *Py_UNUSED(ignored))
{
	if (ho->base)
		munmap(ho->base, ho->size);
	ho->base = NULL;
	Py_RETURN_NONE;
}

static void Hold_dealloc(HoldObject *ho)
{
	if (ho->base)
		munmap(ho->base, ho->size);
	Py_TYPE(ho)->tp_free((PyObject *)ho);
}

static PyMethodDef Hold_methods[] = {
	{"pin", (PyCFunction)Hold_pin, METH_NOARGS,
	 "fault in (locked) the arena pages now in memory; returns how many"},
	{"close", (PyCFunction)Hold_close, METH_NOARGS, "unmap"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject HoldType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "zcached._core.Hold",
	.tp_basicsize = sizeof(HoldObject),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Hold(fd): an arena memfd mapped and locked by the keeper",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Hold_init,
	.tp_dealloc = (destructor)Hold_dealloc,
	.tp_methods = Hold_methods,
};

/* ---- module -------------------------------------------------------------------------------- */

static PyObject *probe_arena(PyObject *Py_UNUSED(mod), PyObject *args)
{
	int fd, rc;
	uint32_t version = 0;

	if (!PyArg_ParseTuple(args, "i", &fd))
		return NULL;
	Py_BEGIN_ALLOW_THREADS
	rc = zc_store_probe(fd, &version);
	Py_END_ALLOW_THREADS
	if (rc == -EPROTO && version && version != ZC_ARENA_VERSION)
		return PyErr_Format(PyExc_ValueError,
				    "the store's arena has format %u, this version reads format %u",
				    version, ZC_ARENA_VERSION);
	if (rc == -EPROTO)
		return PyErr_Format(PyExc_ValueError,
				    "the arena is not one this version lays out (format %u)",
				    ZC_ARENA_VERSION);
	if (rc)
		return raise_errno(rc);
	Py_RETURN_NONE;
}

static PyObject *uring_area_size(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
	return PyLong_FromUnsignedLongLong(zc_uring_area_size(zc_fuse_uring_queues()));
}

static PyMethodDef module_methods[] = {
	{"uring_area_size", uring_area_size, METH_NOARGS,
	 "uring_area_size() -> bytes of the io_uring ring area for this machine (0: cannot tell)"},
	{"probe_arena", probe_arena, METH_VARARGS,
	 "probe_arena(fd): None if this version can attach the arena in memfd fd, else ValueError"},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
	PyModuleDef_HEAD_INIT, .m_name = "zcached._core",
	.m_doc = "The C data path of zcached: page store, xcfmalloc, codecs and the FUSE loop.",
	.m_size = -1,
	.m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__core(void)
{
	if (PyType_Ready(&StoreType) < 0 || PyType_Ready(&FuseType) < 0 ||
	    PyType_Ready(&HoldType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&core_module);

	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "Store", (PyObject *)&StoreType) ||
	    PyModule_AddObjectRef(m, "Fuse", (PyObject *)&FuseType) ||
	    PyModule_AddObjectRef(m, "Hold", (PyObject *)&HoldType) ||
	    PyModule_AddIntConstant(m, "PAGE_SIZE", ZC_PAGE_SIZE) ||
	    PyModule_AddIntConstant(m, "ARENA_VERSION", ZC_ARENA_VERSION) ||
	    PyModule_AddIntConstant(m, "MAX_REQUEST", ZC_MAX_REQ_PAGES * ZC_PAGE_SIZE)) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
