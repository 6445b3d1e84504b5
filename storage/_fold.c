/* storage._fold: the hot loops of storage, compiled (optional).
 *
 * - `add_message`: a line-for-line translation of `storage.projections.add_message`, which
 *   stays the reference and the fallback where this module is not built.
 * - `send_message`: the common case of a send in `Store.execute` (the checks of
 *   `storage.rules`, the sealing of `storage.log.seal`, then `add_message`); whatever it does
 *   not take goes through the Python rules (tests/storage/test_send_compiled.py).
 * - `fold_messages`: the message records of a replay, taken apart and applied without building
 *   Python objects for what the projections do not keep (storage/fold.py hands every other
 *   record to `projections.apply`).
 * - `rows_digest`: the keyed multiset digest the audits compare big tables by.
 * - `Rows`: a rebuild's rows of the append-only tables, packed, and sorted just before the put.
 *
 * Table access goes through the views' own mapping protocol (PyObject_GetItem/SetItem), so
 * their `__missing__` and `__setitem__` (MemoryTables, BufferedTables, Parts) behave as for the
 * Python version; a write to a `BufTable` (the live path's) does what its `__setitem__` does
 * (the row into the dict and into `dirty`) without calling it. Two shortcuts, in
 * `fold_messages` only: rows bound for a keyed `DigestTable`
 * go straight into its digest, and rows bound for a `ListedTable` (a rebuild's) are copied into
 * its `rows` (a `Rows`: one buffer, sorted just before the rebuild writes them) instead of
 * going through the dict. tests/storage/test_fold_compiled.py
 * checks that both versions write the same rows on random logs.
 *
 * `configure(kind_msg, digest_table_type, listed_table_type, buf_table_type)` must be called
 * once first (storage.projections).
 */

#define FOLD_VERSION 18 /* bump with any change of behaviour or signature; see storage/native.py */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *kind_msg = NULL;        /* "msg", the inbox entry kind of a message */
static PyTypeObject *digest_type = NULL; /* storage.memory_tables.DigestTable */
static PyTypeObject *listed_type = NULL; /* storage.memory_tables.ListedTable */
static PyTypeObject *buf_type = NULL;    /* storage.buffered_tables.BufTable */
static PyObject *struct_error = NULL;    /* struct.error, raised like the Python version */

static PyObject *s_conv_seq, *s_msg, *s_inbox_head, *s_inbox, *s_member, *s_parts, *s_read,
    *s_recv, *s_idem, *s_key, *s_rows, *s_dirty;

static void put_u64(char *out, uint64_t v) {
    for (int i = 7; i >= 0; i--) {
        out[i] = (char)(v & 0xff);
        v >>= 8;
    }
}

static PyObject *pack_u64(uint64_t v) {
    char buf[8];
    put_u64(buf, v);
    return PyBytes_FromStringAndSize(buf, 8);
}

/* `1 if old is None else unpack(">Q", old)[0] + 1`; -1 with an exception set on bad input. */
static int next_counter(PyObject *old, uint64_t *out) {
    if (old == Py_None) {
        *out = 1;
        return 0;
    }
    if (!PyBytes_Check(old) || PyBytes_GET_SIZE(old) != 8) {
        PyErr_SetString(struct_error, "unpack requires a buffer of 8 bytes");
        return -1;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(old);
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    if (v == UINT64_MAX) { /* no next value: Python's `pack_u64(2**64)` fails, so must we */
        PyErr_SetString(struct_error, "int too large to convert");
        return -1;
    }
    *out = v + 1;
    return 0;
}

/* a + b for bytes (a + sep + b when sep is not NULL; b may be NULL); new reference or NULL. */
static PyObject *concat(PyObject *a, const char *sep, PyObject *b) {
    Py_ssize_t la = PyBytes_GET_SIZE(a), lb = b ? PyBytes_GET_SIZE(b) : 0, ls = sep ? 1 : 0;
    PyObject *out = PyBytes_FromStringAndSize(NULL, la + ls + lb);
    if (out == NULL)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    memcpy(dst, PyBytes_AS_STRING(a), la);
    if (sep)
        dst[la] = *sep;
    if (b)
        memcpy(dst + la + ls, PyBytes_AS_STRING(b), lb);
    return out;
}

/* ---------------------------------------------------------------- row digests
 *
 * The audits compare big tables by row count and a multiset digest: the sum, modulo 2**64, of
 * SipHash-2-4 (keyed by 16 random bytes drawn per audit) over each row, encoded as
 * `len(key) as 4 bytes big-endian || key || value`. A sum is order-free, so rows may come in
 * any order; without the key nobody can make two different row sets sum alike.
 */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                              \
    do {                                                                                      \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                             \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                             \
    } while (0)

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

typedef struct {
    uint64_t k0, k1;
} sipkey;

/* SipHash-2-4 of the concatenation of `parts` (n of them). */
static uint64_t siphash(const sipkey *key, const unsigned char **parts, const Py_ssize_t *lens,
                        int n) {
    uint64_t v0 = 0x736f6d6570736575ULL ^ key->k0, v1 = 0x646f72616e646f6dULL ^ key->k1,
             v2 = 0x6c7967656e657261ULL ^ key->k0, v3 = 0x7465646279746573ULL ^ key->k1;
    unsigned char buf[8];
    int fill = 0;
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        const unsigned char *p = parts[i];
        Py_ssize_t len = lens[i];
        total += (uint64_t)len;
        while (len > 0) {
            if (fill == 0 && len >= 8) {
                uint64_t m = le64(p);
                v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
                p += 8;
                len -= 8;
                continue;
            }
            buf[fill++] = *p++;
            len--;
            if (fill == 8) {
                uint64_t m = le64(buf);
                v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
                fill = 0;
            }
        }
    }
    uint64_t b = total << 56;
    for (int i = 0; i < fill; i++)
        b |= (uint64_t)buf[i] << (8 * i);
    v3 ^= b; SIPROUND; SIPROUND; v0 ^= b;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint64_t row_hash(const sipkey *key, const char *k, Py_ssize_t klen, const char *v,
                         Py_ssize_t vlen) {
    unsigned char len4[4] = {(unsigned char)(klen >> 24), (unsigned char)(klen >> 16),
                             (unsigned char)(klen >> 8), (unsigned char)klen};
    const unsigned char *parts[3] = {len4, (const unsigned char *)k, (const unsigned char *)v};
    Py_ssize_t lens[3] = {4, klen, vlen};
    return siphash(key, parts, lens, 3);
}

static int parse_key(PyObject *key_o, sipkey *key) {
    if (!PyBytes_Check(key_o) || PyBytes_GET_SIZE(key_o) != 16) {
        PyErr_SetString(PyExc_ValueError, "a digest key is 16 bytes");
        return -1;
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(key_o);
    key->k0 = le64(p);
    key->k1 = le64(p + 8);
    return 0;
}

/* rows_digest(rows, key) -> (count, digest): rows is an iterable of (bytes, bytes). */
static PyObject *rows_digest(PyObject *self, PyObject *args) {
    PyObject *rows, *key_o;
    sipkey key;
    if (!PyArg_ParseTuple(args, "OO:rows_digest", &rows, &key_o) || parse_key(key_o, &key) < 0)
        return NULL;
    PyObject *it = PyObject_GetIter(rows), *row;
    if (it == NULL)
        return NULL;
    uint64_t count = 0, digest = 0;
    while ((row = PyIter_Next(it)) != NULL) {
        PyObject *k, *v;
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 2 ||
            !PyBytes_Check(k = PyTuple_GET_ITEM(row, 0)) ||
            !PyBytes_Check(v = PyTuple_GET_ITEM(row, 1))) {
            Py_DECREF(row);
            Py_DECREF(it);
            PyErr_SetString(PyExc_TypeError, "rows must be (bytes, bytes) pairs");
            return NULL;
        }
        digest += row_hash(&key, PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k),
                           PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
        count++;
        Py_DECREF(row);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    return Py_BuildValue("KK", (unsigned long long)count, (unsigned long long)digest);
}

/* ---------------------------------------------------------------- Rows */

/* Rows(): rows `(key, value)` of bytes packed into one buffer in write order, for a rebuild's
 * append-only tables (storage.memory_tables.ListedTable). A rebuild writes its rows to LMDB in
 * key order; as Python objects made in write order, the sorted walk over them (the put, then the
 * frees) missed the CPU cache on nearly every row. Kept here, they are sorted in place and
 * handed to storage._rowio as they lie (SortedRows.packed), or turned into objects in key
 * order, one at a time, as a put asks for them (SortedRows). Each row: u32 klen, u32 vlen,
 * key, value. */
typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t len, cap, count;
} RowsObject;

static PyTypeObject RowsType;

/* A row's key or value given as the pieces it is made of, so that nothing is allocated to join
 * them where they are only to be copied (a rebuild's rows into a Rows buffer). */
typedef struct {
    const char *p;
    Py_ssize_t n;
} part;

static Py_ssize_t parts_len(const part *ps, int n) {
    Py_ssize_t len = 0;
    for (int i = 0; i < n; i++)
        len += ps[i].n;
    return len;
}

static char *put_parts_at(char *dst, const part *ps, int n) {
    for (int i = 0; i < n; i++) {
        memcpy(dst, ps[i].p, (size_t)ps[i].n);
        dst += ps[i].n;
    }
    return dst;
}

/* The pieces joined as a new bytes object, or NULL with an exception set. */
static PyObject *bytes_of(const part *ps, int n) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, parts_len(ps, n));
    if (out != NULL)
        put_parts_at(PyBytes_AS_STRING(out), ps, n);
    return out;
}

static int rows_add_parts(RowsObject *self, const part *kp, int nk, const part *vp, int nv) {
    Py_ssize_t klen = parts_len(kp, nk), vlen = parts_len(vp, nv);
    if (klen > UINT32_MAX || vlen > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "Rows: a key or value of 4 GiB or more");
        return -1;
    }
    Py_ssize_t need = 8 + klen + vlen;
    if (self->cap - self->len < need) {
        Py_ssize_t cap = self->cap ? self->cap : 1 << 16;
        while (cap - self->len < need) {
            if (cap > PY_SSIZE_T_MAX / 2) {
                PyErr_NoMemory();
                return -1;
            }
            cap *= 2;
        }
        char *data = PyMem_Realloc(self->data, (size_t)cap);
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->data = data;
        self->cap = cap;
    }
    uint32_t lens[2] = {(uint32_t)klen, (uint32_t)vlen};
    char *p = self->data + self->len;
    memcpy(p, lens, 8);
    put_parts_at(put_parts_at(p + 8, kp, nk), vp, nv);
    self->len += need;
    self->count++;
    return 0;
}

static int rows_add(RowsObject *self, const char *k, Py_ssize_t klen, const char *v,
                    Py_ssize_t vlen) {
    part kp = {k, klen}, vp = {v, vlen};
    return rows_add_parts(self, &kp, 1, &vp, 1);
}

static void rows_clear_impl(RowsObject *self) {
    PyMem_Free(self->data);
    self->data = NULL;
    self->len = self->cap = self->count = 0;
}

static PyObject *rows_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if ((args != NULL && PyTuple_GET_SIZE(args)) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Rows() takes no arguments");
        return NULL;
    }
    return type->tp_alloc(type, 0); /* zeroed: empty */
}

static void rows_dealloc(RowsObject *self) {
    PyMem_Free(self->data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t rows_length(RowsObject *self) { return self->count; }

static PyObject *rows_append(RowsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "Rows.append(key, value) takes two bytes");
        return NULL;
    }
    if (rows_add(self, PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]),
                 PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1])) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *rows_clear(RowsObject *self, PyObject *unused) {
    rows_clear_impl(self);
    Py_RETURN_NONE;
}

/* The row at `rec` as a new `(key, value)` tuple. */
static PyObject *row_tuple(const char *rec) {
    uint32_t lens[2];
    memcpy(lens, rec, 8);
    PyObject *k = PyBytes_FromStringAndSize(rec + 8, lens[0]);
    PyObject *v = k == NULL ? NULL : PyBytes_FromStringAndSize(rec + 8 + lens[0], lens[1]);
    PyObject *t = v == NULL ? NULL : PyTuple_New(2);
    if (t == NULL) {
        Py_XDECREF(k);
        Py_XDECREF(v);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, k);
    PyTuple_SET_ITEM(t, 1, v);
    return t;
}

/* Rows.items() -> [(key, value), ...] in write order. */
static PyObject *rows_items(RowsObject *self, PyObject *unused) {
    PyObject *out = PyList_New(self->count);
    const char *p = self->data;
    for (Py_ssize_t i = 0; out != NULL && i < self->count; i++) {
        uint32_t lens[2];
        memcpy(lens, p, 8);
        PyObject *t = row_tuple(p);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, t);
        p += 8 + (Py_ssize_t)lens[0] + lens[1];
    }
    return out;
}

/* Sort entries: the key's first 24 bytes as three big-endian numbers (zero-padded), so most
 * comparisons never leave the entries (a conversation's `msg` keys share their first 16
 * bytes); then the rest of the key, its length, and the write order. The order is total (no
 * two entries compare equal), so any sort gives the one result. */
typedef struct {
    uint64_t p0, p1, p2;
    const char *rec;
} sort_ref;

#define SORT_PREFIX 24

static uint64_t be_prefix(const unsigned char *k, uint32_t len, uint32_t from) {
    uint64_t v = 0;
    for (uint32_t i = from; i < from + 8; i++)
        v = (v << 8) | (i < len ? k[i] : 0);
    return v;
}

/* Past equal prefixes: the rest of the keys, their lengths, then the write order. */
static int cmp_rest(const sort_ref *x, const sort_ref *y) {
    uint32_t xl[2], yl[2];
    memcpy(xl, x->rec, 8);
    memcpy(yl, y->rec, 8);
    uint32_t n = xl[0] < yl[0] ? xl[0] : yl[0];
    int c = n > SORT_PREFIX
                ? memcmp(x->rec + 8 + SORT_PREFIX, y->rec + 8 + SORT_PREFIX, n - SORT_PREFIX)
                : 0;
    if (c)
        return c;
    if (xl[0] != yl[0])
        return xl[0] < yl[0] ? -1 : 1;
    return x->rec < y->rec ? -1 : x->rec > y->rec; /* equal keys: write order */
}

static inline int ref_lt(const sort_ref *x, const sort_ref *y) {
    if (x->p0 != y->p0)
        return x->p0 < y->p0;
    if (x->p1 != y->p1)
        return x->p1 < y->p1;
    if (x->p2 != y->p2)
        return x->p2 < y->p2;
    return cmp_rest(x, y) < 0;
}

/* Merge sort of `a` (n entries), `tmp` holding at least n / 2 + 1: O(n log n) whatever the
 * keys (they come from the log, so from clients), the comparisons inline, and a run already
 * in order (a conversation's rows, written in seq order) merged at the cost of one comparison. */
static void sort_refs(sort_ref *a, sort_ref *tmp, Py_ssize_t n) {
    if (n <= 16) {
        for (Py_ssize_t i = 1; i < n; i++) {
            sort_ref v = a[i];
            Py_ssize_t j = i;
            for (; j > 0 && ref_lt(&v, &a[j - 1]); j--)
                a[j] = a[j - 1];
            a[j] = v;
        }
        return;
    }
    Py_ssize_t h = n / 2;
    sort_refs(a, tmp, h);
    sort_refs(a + h, tmp, n - h);
    if (!ref_lt(&a[h], &a[h - 1]))
        return; /* the halves are in order already */
    memcpy(tmp, a, sizeof(sort_ref) * (size_t)h);
    Py_ssize_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        a[k++] = ref_lt(&a[j], &tmp[i]) ? a[j++] : tmp[i++];
    while (i < h)
        a[k++] = tmp[i++];
}

/* SortedRows: a Rows buffer taken over, with its rows' order by key. Iterating it makes each
 * `(key, value)` as it is asked for, so a `putmulti` over it allocates a row, writes it and
 * frees it while it is still in the CPU cache, and no list of all the rows is ever built. It
 * can be iterated more than once; `len()` is the number of rows. */
typedef struct {
    PyObject_HEAD
    char *data;
    Py_ssize_t len;   /* bytes of data */
    int64_t *order;   /* each row's offset in data, in key order */
    Py_ssize_t count;
} SortedRowsObject;

typedef struct {
    PyObject_HEAD
    SortedRowsObject *rows;
    Py_ssize_t pos;
} SortedRowsIterObject;

static PyTypeObject SortedRowsType, SortedRowsIterType;

static void sorted_rows_dealloc(SortedRowsObject *self) {
    PyMem_Free(self->data);
    PyMem_Free(self->order);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t sorted_rows_length(SortedRowsObject *self) { return self->count; }

static PyObject *sorted_rows_iter(SortedRowsObject *self) {
    SortedRowsIterObject *it = PyObject_GC_New(SortedRowsIterObject, &SortedRowsIterType);
    if (it == NULL)
        return NULL;
    it->rows = (SortedRowsObject *)Py_NewRef(self);
    it->pos = 0;
    PyObject_GC_Track(it);
    return (PyObject *)it;
}

static void sorted_rows_iter_dealloc(SortedRowsIterObject *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->rows);
    PyObject_GC_Del(self);
}

static int sorted_rows_iter_traverse(SortedRowsIterObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->rows);
    return 0;
}

static PyObject *sorted_rows_iter_next(SortedRowsIterObject *self) {
    if (self->rows == NULL || self->pos >= self->rows->count)
        return NULL; /* StopIteration */
    return row_tuple(self->rows->data + self->rows->order[self->pos++]);
}

/* RowView: bytes inside a SortedRows (a key or a value, or all of its records), read through
 * the buffer protocol (what a `putmulti` takes), without a copy. It keeps its SortedRows, and
 * so the bytes, alive. */
typedef struct {
    PyObject_HEAD
    PyObject *owner;
    const char *buf;
    Py_ssize_t len;
} RowViewObject;

static PyTypeObject RowViewType;

static RowViewObject *row_view_new(PyObject *owner, const char *buf, Py_ssize_t len) {
    RowViewObject *view = PyObject_New(RowViewObject, &RowViewType);
    if (view != NULL) {
        view->owner = Py_NewRef(owner);
        view->buf = buf;
        view->len = len;
    }
    return view;
}

static void row_view_dealloc(RowViewObject *self) {
    Py_XDECREF(self->owner);
    PyObject_Free(self);
}

static int row_view_getbuffer(RowViewObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->buf, self->len, 1, flags);
}

static PyBufferProcs row_view_as_buffer = {.bf_getbuffer = (getbufferproc)row_view_getbuffer};

static PyTypeObject RowViewType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "storage._fold.RowView",
    .tp_basicsize = sizeof(RowViewObject),
    .tp_dealloc = (destructor)row_view_dealloc,
    .tp_as_buffer = &row_view_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bytes inside a SortedRows, as a read-only buffer (SortedRows.transient, "
              "SortedRows.packed).",
};

/* SortedRows.transient(): an iterator of `(key, value)` pairs of RowViews over the rows, for a
 * consumer that lets go of each pair before asking for the next, as `putmulti` does: then the
 * same pair is handed out again, pointed at the next row, and a row costs no allocation. A
 * pair (or a view of it) still held elsewhere is left alone and a new one made, so holding on
 * to them is safe, only slower. */
typedef struct {
    PyObject_HEAD
    SortedRowsObject *rows;
    Py_ssize_t pos;
    PyObject *pair; /* the last pair handed out, or NULL */
} TransientIterObject;

static PyTypeObject TransientIterType;

static PyObject *sorted_rows_transient(SortedRowsObject *self, PyObject *unused) {
    TransientIterObject *it = PyObject_New(TransientIterObject, &TransientIterType);
    if (it == NULL)
        return NULL;
    it->rows = (SortedRowsObject *)Py_NewRef(self);
    it->pos = 0;
    it->pair = NULL;
    return (PyObject *)it;
}

static void transient_iter_dealloc(TransientIterObject *self) {
    Py_XDECREF(self->pair);
    Py_XDECREF(self->rows);
    PyObject_Free(self);
}

static PyObject *transient_iter_next(TransientIterObject *self) {
    if (self->pos >= self->rows->count)
        return NULL; /* StopIteration */
    const char *rec = self->rows->data + self->rows->order[self->pos++];
    uint32_t lens[2];
    memcpy(lens, rec, 8);
    const char *k = rec + 8, *v = rec + 8 + lens[0];
    PyObject *pair = self->pair;
    if (pair != NULL && Py_REFCNT(pair) == 1) {
        RowViewObject *kv = (RowViewObject *)PyTuple_GET_ITEM(pair, 0),
                      *vv = (RowViewObject *)PyTuple_GET_ITEM(pair, 1);
        if (Py_REFCNT(kv) == 1 && Py_REFCNT(vv) == 1) { /* nobody else sees them: repoint */
            kv->buf = k;
            kv->len = lens[0];
            vv->buf = v;
            vv->len = lens[1];
            return Py_NewRef(pair);
        }
    }
    PyObject *owner = (PyObject *)self->rows;
    RowViewObject *kv = row_view_new(owner, k, lens[0]);
    RowViewObject *vv = kv == NULL ? NULL : row_view_new(owner, v, lens[1]);
    pair = vv == NULL ? NULL : PyTuple_New(2);
    if (pair == NULL) {
        Py_XDECREF(kv);
        Py_XDECREF(vv);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, (PyObject *)kv);
    PyTuple_SET_ITEM(pair, 1, (PyObject *)vv);
    Py_XSETREF(self->pair, pair);
    return Py_NewRef(pair);
}

static PyTypeObject TransientIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "storage._fold.TransientRowsIterator",
    .tp_basicsize = sizeof(TransientIterObject),
    .tp_dealloc = (destructor)transient_iter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)transient_iter_next,
};

/* Rows.take_sorted() -> SortedRows: the rows, in key order (equal keys in write order); the
 * Rows is left empty. */
static PyObject *rows_take_sorted(RowsObject *self, PyObject *unused) {
    Py_ssize_t n = self->count;
    SortedRowsObject *out = PyObject_New(SortedRowsObject, &SortedRowsType);
    if (out == NULL)
        return NULL;
    out->data = NULL;
    out->len = out->count = 0;
    out->order = PyMem_Malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    sort_ref *refs = PyMem_Malloc(sizeof(sort_ref) * (size_t)(n ? n : 1));
    sort_ref *tmp = PyMem_Malloc(sizeof(sort_ref) * (size_t)(n / 2 + 1));
    if (refs == NULL || tmp == NULL || out->order == NULL) {
        PyMem_Free(refs);
        PyMem_Free(tmp);
        Py_DECREF(out); /* frees order */
        return PyErr_NoMemory();
    }
    int64_t *order = out->order;
    const char *p = self->data;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t lens[2];
        memcpy(lens, p, 8);
        const unsigned char *k = (const unsigned char *)p + 8;
        refs[i] = (sort_ref){be_prefix(k, lens[0], 0), be_prefix(k, lens[0], 8),
                             be_prefix(k, lens[0], 16), p};
        p += 8 + (Py_ssize_t)lens[0] + lens[1];
    }
    sort_refs(refs, tmp, n);
    for (Py_ssize_t i = 0; i < n; i++)
        order[i] = refs[i].rec - self->data;
    PyMem_Free(tmp);
    PyMem_Free(refs);
    out->data = self->data; /* taken over */
    out->len = self->len;
    out->count = n;
    self->data = NULL;
    self->len = self->cap = self->count = 0;
    return (PyObject *)out;
}

/* SortedRows.packed() -> (data, order): the rows as two read-only buffers, for a consumer in C
 * that writes them without an object a row (storage._rowio.append_packed). `data` holds the
 * records in write order, each u32 klen, u32 vlen (native byte order), key, value; `order` is
 * one native int64 a row, in key order, each the offset of its record in `data`. Both keep the
 * SortedRows, and so its memory, alive. */
static PyObject *sorted_rows_packed(SortedRowsObject *self, PyObject *unused) {
    static const char empty[1];
    PyObject *owner = (PyObject *)self;
    RowViewObject *data = row_view_new(owner, self->data ? self->data : empty, self->len);
    Py_ssize_t order_len = self->count * (Py_ssize_t)sizeof(int64_t);
    RowViewObject *order =
        data == NULL ? NULL : row_view_new(owner, (const char *)self->order, order_len);
    if (order == NULL) {
        Py_XDECREF(data);
        return NULL;
    }
    return Py_BuildValue("(NN)", data, order);
}

static PySequenceMethods sorted_rows_as_sequence = {.sq_length = (lenfunc)sorted_rows_length};

static PyMethodDef sorted_rows_methods[] = {
    {"transient", (PyCFunction)sorted_rows_transient, METH_NOARGS,
     "transient() -> iterator of (key, value) read-only buffers, the same pair reused for each "
     "row while nobody else holds it: for putmulti, which lets go of each row before the next."},
    {"packed", (PyCFunction)sorted_rows_packed, METH_NOARGS,
     "packed() -> (data, order): the records (u32 klen, u32 vlen, key, value, in write order) "
     "and their offsets in key order (native int64), as read-only buffers."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SortedRowsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "storage._fold.SortedRows",
    .tp_basicsize = sizeof(SortedRowsObject),
    .tp_dealloc = (destructor)sorted_rows_dealloc,
    .tp_as_sequence = &sorted_rows_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The rows of a Rows in key order (Rows.take_sorted); iterable, sized.",
    .tp_iter = (getiterfunc)sorted_rows_iter,
    .tp_methods = sorted_rows_methods,
};

static PyTypeObject SortedRowsIterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "storage._fold.SortedRowsIterator",
    .tp_basicsize = sizeof(SortedRowsIterObject),
    .tp_dealloc = (destructor)sorted_rows_iter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)sorted_rows_iter_traverse,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)sorted_rows_iter_next,
};

static PyMethodDef rows_methods[] = {
    {"append", (PyCFunction)(void (*)(void))rows_append, METH_FASTCALL,
     "append(key, value): add a row (both bytes)."},
    {"items", (PyCFunction)rows_items, METH_NOARGS,
     "items() -> [(key, value), ...] in write order."},
    {"take_sorted", (PyCFunction)rows_take_sorted, METH_NOARGS,
     "take_sorted() -> SortedRows: the rows in key order (bytes order), equal keys in write "
     "order, made as they are iterated; this Rows is left empty."},
    {"clear", (PyCFunction)rows_clear, METH_NOARGS, "clear(): drop every row."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods rows_as_sequence = {.sq_length = (lenfunc)rows_length};

static PyTypeObject RowsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "storage._fold.Rows",
    .tp_basicsize = sizeof(RowsObject),
    .tp_dealloc = (destructor)rows_dealloc,
    .tp_as_sequence = &rows_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Rows(): (key, value) rows of bytes packed in one buffer (see storage/_fold.c).",
    .tp_methods = rows_methods,
    .tp_new = rows_new,
};

/* ---------------------------------------------------------------- add_message */

/* `view[key] = value`. A BufTable's `__setitem__` is `dict.__setitem__` plus `dirty[key] =
 * value`: done here directly, it costs two dict stores instead of a Python call. */
static int set_row(PyObject *view, PyObject *key, PyObject *value) {
    if (buf_type == NULL || Py_TYPE(view) != buf_type)
        return PyObject_SetItem(view, key, value);
    PyObject *dirty = PyObject_GetAttr(view, s_dirty);
    if (dirty == NULL)
        return -1;
    int rc;
    if (!PyDict_CheckExact(dirty)) {
        PyErr_SetString(PyExc_TypeError, "BufTable.dirty must be a dict");
        rc = -1;
    } else {
        rc = PyDict_SetItem(view, key, value);
        if (rc == 0)
            rc = PyDict_SetItem(dirty, key, value);
    }
    Py_DECREF(dirty);
    return rc;
}

/* Where the rows of one append-only table go: `view[key] = value`; for a keyed DigestTable
 * in a replay (`direct`), straight into a running count and digest; for a ListedTable
 * (`listed`: its `rows`, a Rows), copied into its buffer. */
typedef struct {
    PyObject *view; /* borrowed from the caller, or NULL: look the table up by name */
    int direct;
    PyObject *listed;
    sipkey key;
    uint64_t rows, digest;
} sink;

/* A row kept as objects (a `listed` sink's rows go in by put_parts). */
static int put_row(PyObject *tables, PyObject *name, sink *s, PyObject *key, PyObject *value) {
    if (s != NULL && s->direct) {
        s->rows++;
        s->digest += row_hash(&s->key, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                              PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
        return 0;
    }
    if (s != NULL && s->view != NULL)
        return set_row(s->view, key, value);
    PyObject *view = PyObject_GetAttr(tables, name);
    if (view == NULL)
        return -1;
    int rc = set_row(view, key, value);
    Py_DECREF(view);
    return rc;
}

/* put_row of a key and value given in pieces: copied straight into a Rows buffer (`listed`),
 * else joined into bytes first. */
static int put_parts(PyObject *tables, PyObject *name, sink *s, const part *kp, int nk,
                     const part *vp, int nv) {
    if (s != NULL && s->listed != NULL)
        return rows_add_parts((RowsObject *)s->listed, kp, nk, vp, nv);
    PyObject *key = bytes_of(kp, nk), *value = key == NULL ? NULL : bytes_of(vp, nv);
    int rc = value == NULL ? -1 : put_row(tables, name, s, key, value);
    Py_XDECREF(key);
    Py_XDECREF(value);
    return rc;
}

/* The views add_message reads, each looked up on `tables` when first needed and kept: for one
 * message (the live path), or for a whole run of them (fold_messages, whose tables keep their
 * views while it runs: only add_message writes them meanwhile, and it never replaces one). */
typedef struct {
    PyObject *conv_seq, *inbox_head, *member, *parts, *read, *recv;
} views;

static PyObject *view_of(PyObject *owner, PyObject **slot, PyObject *name) {
    if (*slot == NULL)
        *slot = PyObject_GetAttr(owner, name);
    return *slot; /* borrowed from the views */
}

static void views_clear(views *v) {
    Py_CLEAR(v->conv_seq);
    Py_CLEAR(v->inbox_head);
    Py_CLEAR(v->member);
    Py_CLEAR(v->parts);
    Py_CLEAR(v->read);
    Py_CLEAR(v->recv);
}

/* The inbox entry of a message, msgpack `[kind_msg, conv, seq, lsn]` exactly as
 * msgpack.Packer() writes it (str as fixstr/str8/str16/str32, ints in their smallest form). */
static void put_str(char **p, const char *data, Py_ssize_t len) {
    unsigned char *q = (unsigned char *)*p;
    if (len < 32) {
        *q++ = (unsigned char)(0xa0 | len);
    } else if (len < 256) {
        *q++ = 0xd9;
        *q++ = (unsigned char)len;
    } else if (len < 65536) {
        *q++ = 0xda;
        *q++ = (unsigned char)(len >> 8);
        *q++ = (unsigned char)len;
    } else {
        *q++ = 0xdb;
        for (int i = 3; i >= 0; i--)
            *q++ = (unsigned char)(len >> (8 * i));
    }
    memcpy(q, data, len);
    *p = (char *)q + len;
}

static void put_uint(char **p, uint64_t v) {
    unsigned char *q = (unsigned char *)*p;
    int n;
    if (v < 128) {
        *q++ = (unsigned char)v;
        *p = (char *)q;
        return;
    }
    if (v < 256) {
        *q++ = 0xcc;
        n = 1;
    } else if (v < 65536) {
        *q++ = 0xcd;
        n = 2;
    } else if (v < 4294967296ULL) {
        *q++ = 0xce;
        n = 4;
    } else {
        *q++ = 0xcf;
        n = 8;
    }
    for (int i = n - 1; i >= 0; i--)
        *q++ = (unsigned char)(v >> (8 * i));
    *p = (char *)q;
}

/* Writes the entry at `mem`, which holds entry_cap(conv_len, kind_len) bytes; its length. */
static Py_ssize_t entry_cap(Py_ssize_t conv_len, Py_ssize_t kind_len) {
    return 1 + 5 + kind_len + 5 + conv_len + 9 + 9;
}

static Py_ssize_t pack_entry(char *mem, const char *kind, Py_ssize_t kind_len, const char *conv,
                             Py_ssize_t conv_len, uint64_t seq, uint64_t lsn) {
    char *p = mem;
    *p++ = (char)0x94;
    put_str(&p, kind, kind_len);
    put_str(&p, conv, conv_len);
    put_uint(&p, seq);
    put_uint(&p, lsn);
    return p - mem;
}

/* The sender's marks `read` and `recv`: raise each to seq_b (bytes order is int order). A
 * mark that is no 8 bytes is damaged: struct.error, as the Python version (`message_fault`
 * names it). */
static int raise_marks(PyObject *tables, views *vs, PyObject *mark, PyObject *seq_b) {
    PyObject *names[2] = {s_read, s_recv}, **slots[2] = {&vs->read, &vs->recv};
    for (int i = 0; i < 2; i++) {
        PyObject *view = view_of(tables, slots[i], names[i]);
        if (view == NULL)
            return -1;
        PyObject *old = PyObject_GetItem(view, mark);
        if (old == NULL)
            return -1;
        int lower = 1;
        if (old != Py_None && (!PyBytes_Check(old) || PyBytes_GET_SIZE(old) != 8)) {
            PyErr_SetString(struct_error, "unpack requires a buffer of 8 bytes");
            lower = -1;
        } else if (old != Py_None)
            lower = PyObject_RichCompareBool(old, seq_b, Py_LT);
        Py_DECREF(old);
        if ((lower < 0 ? -1 : (lower ? set_row(view, mark, seq_b) : 0)) < 0)
            return -1;
    }
    return 0;
}

/* For each member of the conversation, its next inbox entry. Returns 1 if the sender is a
 * member, 0 if not, -1 on error. `heads` may be NULL (a replay does not need them). */
static int fill_inboxes(PyObject *tables, views *vs, PyObject *prefix, PyObject *sender,
                        const part *entry, PyObject *heads, sink *inbox_sink) {
    int sender_member = 0, rc = -1;
    PyObject *inbox_head, *member, *parts, *rows = NULL, *it = NULL, *row = NULL,
             *entry_o = NULL;
    if (!(inbox_head = view_of(tables, &vs->inbox_head, s_inbox_head)) ||
        !(member = view_of(tables, &vs->member, s_member)) ||
        !(parts = view_of(member, &vs->parts, s_parts)) ||
        !(rows = PyObject_GetItem(parts, prefix)) || !(it = PyObject_GetIter(rows)))
        goto done;
    while ((row = PyIter_Next(it)) != NULL) {
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 3 ||
            !PyBytes_Check(PyTuple_GET_ITEM(row, 1))) {
            PyErr_SetString(PyExc_TypeError, "member parts rows must be (bytes, bytes, str)");
            goto done;
        }
        PyObject *ukey = PyTuple_GET_ITEM(row, 0), *ukey0 = PyTuple_GET_ITEM(row, 1),
                 *user = PyTuple_GET_ITEM(row, 2);
        PyObject *old = PyObject_GetItem(inbox_head, ukey);
        if (old == NULL)
            goto done;
        uint64_t head;
        int bad = next_counter(old, &head);
        Py_DECREF(old);
        if (bad)
            goto done;
        PyObject *head_b = pack_u64(head);
        if (head_b == NULL)
            goto done;
        part key[2] = {{PyBytes_AS_STRING(ukey0), PyBytes_GET_SIZE(ukey0)},
                       {PyBytes_AS_STRING(head_b), 8}};
        int set = set_row(inbox_head, ukey, head_b);
        if (set == 0 && inbox_sink != NULL && inbox_sink->listed != NULL) {
            set = put_parts(tables, s_inbox, inbox_sink, key, 2, entry, 1);
        } else if (set == 0) { /* kept as objects: every member's row holds the one entry */
            PyObject *key_o = bytes_of(key, 2);
            if (entry_o == NULL && key_o != NULL)
                entry_o = bytes_of(entry, 1);
            set = entry_o == NULL ? -1 : put_row(tables, s_inbox, inbox_sink, key_o, entry_o);
            Py_XDECREF(key_o);
        }
        Py_DECREF(head_b);
        if (set < 0)
            goto done;
        if (heads != NULL) {
            PyObject *head_i = PyLong_FromUnsignedLongLong(head);
            if (head_i == NULL)
                goto done;
            set = PyObject_SetItem(heads, user, head_i);
            Py_DECREF(head_i);
            if (set < 0)
                goto done;
        }
        int same = PyObject_RichCompareBool(ukey, sender, Py_EQ);
        if (same < 0)
            goto done;
        if (same)
            sender_member = 1;
        Py_CLEAR(row);
    }
    if (!PyErr_Occurred())
        rc = sender_member;
done:
    Py_XDECREF(row);
    Py_XDECREF(it);
    Py_XDECREF(rows);
    Py_XDECREF(entry_o);
    return rc;
}

/* add_message proper (ckey, sender, cid are bytes; conv is ckey's text as UTF-8). Sets *seq_out;
 * returns 0, or -1 with an exception set. `sinks` (msg, inbox, idem) may be NULL. */
static int add_message_impl(PyObject *tables, views *vs, PyObject *ckey, const char *conv,
                            Py_ssize_t conv_len, PyObject *sender, PyObject *cid, uint64_t lsn,
                            PyObject *heads, sink *sinks, uint64_t *seq_out) {
    int rc = -1;
    views own = {0};
    if (vs == NULL)
        vs = &own; /* one message's: let go at the end */
    PyObject *conv_seq, *old = NULL, *seq_b = NULL, *prefix = NULL, *key = NULL;
    char lsn_b[8], idem_b[16], entry_buf[128], *entry_mem = entry_buf;
    uint64_t seq;
    Py_ssize_t kind_len;
    const char *kind = PyUnicode_AsUTF8AndSize(kind_msg, &kind_len);
    if (kind == NULL || !(conv_seq = view_of(tables, &vs->conv_seq, s_conv_seq)) ||
        !(old = PyObject_GetItem(conv_seq, ckey)) || next_counter(old, &seq) < 0 ||
        !(seq_b = pack_u64(seq)) || set_row(conv_seq, ckey, seq_b) < 0 ||
        !(prefix = concat(ckey, "\0", NULL)))
        goto done;
    /* msg[prefix + seq_b] = pack_u64(lsn) */
    put_u64(lsn_b, lsn);
    part msg_key[2] = {{PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)},
                       {PyBytes_AS_STRING(seq_b), 8}};
    part msg_value = {lsn_b, 8};
    if (put_parts(tables, s_msg, sinks ? &sinks[0] : NULL, msg_key, 2, &msg_value, 1) < 0)
        goto done;
    Py_ssize_t cap = entry_cap(conv_len, kind_len);
    if (cap > (Py_ssize_t)sizeof(entry_buf) && !(entry_mem = PyMem_Malloc((size_t)cap))) {
        PyErr_NoMemory();
        goto done;
    }
    part entry = {entry_mem, pack_entry(entry_mem, kind, kind_len, conv, conv_len, seq, lsn)};
    int sender_member = fill_inboxes(tables, vs, prefix, sender, &entry, heads,
                                     sinks ? &sinks[1] : NULL);
    if (sender_member < 0)
        goto done;
    if (sender_member) {
        if (!(key = concat(prefix, NULL, sender)) || raise_marks(tables, vs, key, seq_b) < 0)
            goto done;
    }
    /* idem[cid + b"\0" + sender] = pack_u64x2(seq, lsn) + ckey */
    put_u64(idem_b, seq);
    put_u64(idem_b + 8, lsn);
    part idem_key[3] = {{PyBytes_AS_STRING(cid), PyBytes_GET_SIZE(cid)}, {"\0", 1},
                        {PyBytes_AS_STRING(sender), PyBytes_GET_SIZE(sender)}};
    part idem_value[2] = {{idem_b, 16}, {PyBytes_AS_STRING(ckey), PyBytes_GET_SIZE(ckey)}};
    if (put_parts(tables, s_idem, sinks ? &sinks[2] : NULL, idem_key, 3, idem_value, 2) < 0)
        goto done;
    *seq_out = seq;
    rc = 0;
done:
    if (entry_mem != entry_buf)
        PyMem_Free(entry_mem);
    Py_XDECREF(old);
    Py_XDECREF(seq_b);
    Py_XDECREF(prefix);
    Py_XDECREF(key);
    views_clear(&own);
    return rc;
}

static int configured(void) {
    if (kind_msg == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "storage._fold.configure was not called");
        return 0;
    }
    return 1;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *kind, *type, *listed, *buf;
    if (!PyArg_ParseTuple(args, "UO!O!O!:configure", &kind, &PyType_Type, &type, &PyType_Type,
                          &listed, &PyType_Type, &buf))
        return NULL;
    Py_INCREF(kind);
    Py_XSETREF(kind_msg, kind);
    Py_INCREF(type);
    Py_XSETREF(digest_type, (PyTypeObject *)type);
    Py_INCREF(listed);
    Py_XSETREF(listed_type, (PyTypeObject *)listed);
    Py_INCREF(buf);
    Py_XSETREF(buf_type, (PyTypeObject *)buf);
    Py_RETURN_NONE;
}

static PyObject *add_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "add_message(tables, ckey, conv, sender, cid, lsn, heads)");
        return NULL;
    }
    if (!configured())
        return NULL;
    if (!PyBytes_Check(args[1]) || !PyUnicode_Check(args[2]) || !PyBytes_Check(args[3]) ||
        !PyBytes_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "ckey, sender and cid must be bytes, conv a str");
        return NULL;
    }
    Py_ssize_t conv_len;
    const char *conv = PyUnicode_AsUTF8AndSize(args[2], &conv_len);
    if (conv == NULL)
        return NULL;
    /* As `pack_u64(lsn)` would fail in the Python version (with struct.error). */
    if (!PyLong_Check(args[5])) {
        PyErr_SetString(struct_error, "required argument is not an integer");
        return NULL;
    }
    uint64_t lsn = PyLong_AsUnsignedLongLong(args[5]), seq;
    if (lsn == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_SetString(struct_error, "argument out of range");
        return NULL;
    }
    PyObject *heads = args[6] == Py_None ? NULL : args[6];
    if (add_message_impl(args[0], NULL, args[1], conv, conv_len, args[3], args[4], lsn, heads,
                         NULL, &seq) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(seq);
}

/* ---------------------------------------------------------------- the replay loop
 *
 * A reader of just enough msgpack to take a `message.accepted` record apart:
 * `digest(32) || [lsn, ts_us, type, user, device, {..., "conv": c, "cid": i, ...}]`.
 * Anything else (another event type, an unusual encoding, a damaged record) is handed back
 * to the Python fold untouched, which then does exactly what it always did with it.
 */

typedef struct {
    const unsigned char *p, *end;
} reader;

static int need(reader *r, Py_ssize_t n) { return r->end - r->p >= n; }

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* An unsigned integer (as msgpack-python writes non-negative ints). 0 on success. */
static int read_uint(reader *r, uint64_t *out) {
    if (!need(r, 1))
        return -1;
    unsigned char t = *r->p++;
    int n;
    if (t <= 0x7f) {
        *out = t;
        return 0;
    }
    switch (t) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    default: return -1;
    }
    if (!need(r, n))
        return -1;
    *out = be(r->p, n);
    r->p += n;
    return 0;
}

/* Whether `len` bytes at `p` are UTF-8 as Python's strict decoder takes it (what `audit
 * verify`, which reads text as text, requires of every str in a record): ASCII by a plain scan,
 * anything else by the decoder itself (a text object made and dropped, only then). */
static int utf8_ok(const unsigned char *p, Py_ssize_t len) {
    Py_ssize_t i = 0;
    for (uint64_t word; i + 8 <= len; i += 8) { /* eight bytes a step, as memcpy allows */
        memcpy(&word, p + i, 8);
        if (word & 0x8080808080808080ULL)
            break;
    }
    while (i < len && p[i] < 0x80)
        i++;
    if (i == len)
        return 1;
    PyObject *text = PyUnicode_DecodeUTF8((const char *)p + i, len - i, NULL);
    if (text == NULL) {
        PyErr_Clear();
        return 0;
    }
    Py_DECREF(text);
    return 1;
}

static int is_str(unsigned char t) { return (t >= 0xa0 && t <= 0xbf) || (t >= 0xd9 && t <= 0xdb); }

/* A str or bin (both come out as bytes with raw=True): its bytes; a str's must be UTF-8.
 * 0 on success. */
static int read_raw(reader *r, const unsigned char **data, Py_ssize_t *len) {
    if (!need(r, 1))
        return -1;
    unsigned char t = *r->p++;
    int n;
    if (t >= 0xa0 && t <= 0xbf) {
        *len = t & 0x1f;
    } else {
        switch (t) {
        case 0xd9: case 0xc4: n = 1; break;
        case 0xda: case 0xc5: n = 2; break;
        case 0xdb: case 0xc6: n = 4; break;
        default: return -1;
        }
        if (!need(r, n))
            return -1;
        *len = (Py_ssize_t)be(r->p, n);
        r->p += n;
    }
    if (!need(r, *len) || (is_str(t) && !utf8_ok(r->p, *len)))
        return -1;
    *data = r->p;
    r->p += *len;
    return 0;
}

/* A str (what homing writes of a type, an actor, a conversation or a cid; verify fails a bin
 * there, `a field of the wrong kind` or `data.conv of the wrong kind`). 0 on success. */
static int read_str(reader *r, const unsigned char **data, Py_ssize_t *len) {
    return need(r, 1) && is_str(*r->p) ? read_raw(r, data, len) : -1;
}

/* A container header: array (is_map 0) or map (1); its length. 0 on success. */
static int read_header(reader *r, int is_map, uint64_t *count) {
    if (!need(r, 1))
        return -1;
    unsigned char t = *r->p++;
    unsigned char fix = is_map ? 0x80 : 0x90;
    if (t >= fix && t <= fix + 0x0f) {
        *count = t & 0x0f;
        return 0;
    }
    int n = t == (is_map ? 0xde : 0xdc) ? 2 : t == (is_map ? 0xdf : 0xdd) ? 4 : 0;
    if (!n || !need(r, n))
        return -1;
    *count = be(r->p, n);
    r->p += n;
    return 0;
}

/* Skip one value of any type. 0 on success. */
static int skip(reader *r, int depth) {
    if (depth > 64 || !need(r, 1))
        return -1;
    unsigned char t = *r->p;
    Py_ssize_t n = -1;
    uint64_t count;
    const unsigned char *data;
    Py_ssize_t len;
    if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) {
        r->p++;
        return 0;
    }
    if ((t >= 0xa0 && t <= 0xbf) || t == 0xd9 || t == 0xda || t == 0xdb || t == 0xc4 ||
        t == 0xc5 || t == 0xc6)
        return read_raw(r, &data, &len);
    if ((t >= 0x80 && t <= 0x8f) || t == 0xde || t == 0xdf) {
        if (read_header(r, 1, &count))
            return -1;
        /* msgpack.unpackb's strict_map_key (its default): keys are str or bin, or it fails */
        for (uint64_t i = 0; i < count; i++)
            if (read_raw(r, &data, &len) || skip(r, depth + 1))
                return -1;
        return 0;
    }
    if ((t >= 0x90 && t <= 0x9f) || t == 0xdc || t == 0xdd) {
        if (read_header(r, 0, &count))
            return -1;
        for (uint64_t i = 0; i < count; i++)
            if (skip(r, depth + 1))
                return -1;
        return 0;
    }
    switch (t) {
    case 0xcc: case 0xd0: n = 1; break;
    case 0xcd: case 0xd1: n = 2; break;
    case 0xce: case 0xd2: case 0xca: n = 4; break;
    case 0xcf: case 0xd3: case 0xcb: n = 8; break;
    /* ext types (0xc7-0xc9, 0xd4-0xd8) are never written by homing, and unpackb may reject
     * one (a timestamp of the wrong size): left to Python, like anything unknown */
    default: return -1;
    }
    if (!need(r, 1 + n))
        return -1;
    r->p += 1 + n;
    return 0;
}

static int is(const unsigned char *data, Py_ssize_t len, const char *word) {
    Py_ssize_t n = (Py_ssize_t)strlen(word);
    return len == n && memcmp(data, word, n) == 0;
}

#define KEYS_FIT_BYTES 400 /* storage.records.KEYS_FIT_BYTES */
#define MAX_TS_US 253402300799999999ULL /* storage.records.MAX_TS_US */

typedef struct {
    uint64_t lsn, ts;
    const unsigned char *user, *conv, *cid;
    Py_ssize_t user_len, conv_len, cid_len;
} message;

/* Take a record value apart if it is a well-formed message.accepted event: 1 if so, 0 if
 * it is anything else (left to Python). Never raises. */
static int parse_message(PyObject *value, message *m) {
    if (!PyBytes_Check(value) || PyBytes_GET_SIZE(value) < 32)
        return 0;
    reader r = {(const unsigned char *)PyBytes_AS_STRING(value) + 32,
                (const unsigned char *)PyBytes_AS_STRING(value) + PyBytes_GET_SIZE(value)};
    uint64_t count;
    const unsigned char *type, *device, *body = NULL;
    Py_ssize_t type_len, device_len, body_len;
    /* as verify requires (storage/log.py): a time a date holds (check_time), text for the
     * type and actor (fields_fault), text for conv and cid and text or bytes for the body
     * (data_fault), every text UTF-8; anything else is handed back, for Python to refuse */
    if (read_header(&r, 0, &count) || count != 6 || read_uint(&r, &m->lsn) ||
        read_uint(&r, &m->ts) || m->ts > MAX_TS_US || read_str(&r, &type, &type_len) ||
        !is(type, type_len, "message.accepted") || read_str(&r, &m->user, &m->user_len) ||
        read_str(&r, &device, &device_len) || read_header(&r, 1, &count))
        return 0;
    m->conv = m->cid = NULL;
    for (uint64_t i = 0; i < count; i++) {
        const unsigned char *key;
        Py_ssize_t key_len;
        int text_key = need(&r, 1) && is_str(*r.p); /* a bin key is another key to verify */
        if (read_raw(&r, &key, &key_len))
            return 0;
        if (!text_key) {
            if (skip(&r, 0))
                return 0;
        } else if (is(key, key_len, "conv")) {
            if (read_str(&r, &m->conv, &m->conv_len))
                return 0;
        } else if (is(key, key_len, "cid")) {
            if (read_str(&r, &m->cid, &m->cid_len))
                return 0;
        } else if (is(key, key_len, "body")) {
            if (read_raw(&r, &body, &body_len))
                return 0;
        } else if (skip(&r, 0)) {
            return 0;
        }
    }
    /* the last occurrence of a key wins, as in the dict unpackb builds; ids longer in all
     * than storage.records.KEYS_FIT_BYTES are left to Python, which checks that their keys
     * fit LMDB's (key_fault) */
    return m->conv != NULL && m->cid != NULL && body != NULL && r.p == r.end &&
           m->conv_len + m->cid_len + m->user_len + device_len <= KEYS_FIT_BYTES;
}

/* Apply one parsed message (its conv UTF-8, parse_message saw to it): 1 done, -1 error. */
static int apply_message(PyObject *tables, views *vs, PyObject *heads, sink *sinks,
                         const message *m) {
    PyObject *ckey = PyBytes_FromStringAndSize((const char *)m->conv, m->conv_len);
    PyObject *sender = PyBytes_FromStringAndSize((const char *)m->user, m->user_len);
    PyObject *cid = PyBytes_FromStringAndSize((const char *)m->cid, m->cid_len);
    uint64_t seq;
    int rc = -1;
    if (ckey && sender && cid)
        rc = add_message_impl(tables, vs, ckey, (const char *)m->conv, m->conv_len, sender,
                              cid, m->lsn, heads, sinks, &seq);
    Py_XDECREF(ckey);
    Py_XDECREF(sender);
    Py_XDECREF(cid);
    return rc < 0 ? -1 : 1;
}

/* The sinks of a fold: a table is `direct` when it is a DigestTable with a key, `listed`
 * (its `rows`) when it is a ListedTable. */
static int open_sinks(PyObject *tables, sink *sinks) {
    PyObject *names[3] = {s_msg, s_inbox, s_idem};
    for (int i = 0; i < 3; i++) {
        sink *s = &sinks[i];
        s->direct = 0;
        s->listed = NULL;
        s->rows = s->digest = 0;
        if (!(s->view = PyObject_GetAttr(tables, names[i])))
            return -1;
        if (listed_type != NULL && Py_TYPE(s->view) == listed_type) {
            if (!(s->listed = PyObject_GetAttr(s->view, s_rows)))
                return -1;
            if (Py_TYPE(s->listed) != &RowsType) {
                PyErr_SetString(PyExc_TypeError, "ListedTable.rows must be a Rows");
                return -1;
            }
            continue;
        }
        if (digest_type == NULL || Py_TYPE(s->view) != digest_type)
            continue;
        PyObject *key = PyObject_GetAttr(s->view, s_key);
        if (key == NULL)
            return -1;
        if (key != Py_None) {
            if (parse_key(key, &s->key) < 0) {
                Py_DECREF(key);
                return -1;
            }
            s->direct = 1;
        }
        Py_DECREF(key);
    }
    return 0;
}

/* fold_messages(records, tables, heads, last_lsn, until_us, limit[, next_lsn])
 *     -> (applied, lsn, ts_us, record, exhausted)
 *
 * Applies message records from the iterator `records` of `(key, digest || body)` while each
 * is a well-formed message.accepted event with lsn <= last_lsn and ts_us <= until_us (None:
 * no bound), and the lsn next_lsn, one more each record (None: unchecked; a record whose
 * body names another lsn, or any after lsn 2**64 - 1, is handed back, for Python to refuse),
 * at most `limit` of them. Returns how many it applied, the lsn and ts_us of the
 * last one, the first record it did not apply (None if none), and whether `records` ran out.
 */
static PyObject *fold_messages(PyObject *self, PyObject *args) {
    PyObject *records, *tables, *heads, *last_o, *until_o, *next_o = Py_None;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOOOOn|O:fold_messages", &records, &tables, &heads, &last_o,
                          &until_o, &limit, &next_o))
        return NULL;
    if (!configured())
        return NULL;
    if (!PyIter_Check(records)) { /* PyIter_Next would call a missing tp_iternext */
        PyErr_SetString(PyExc_TypeError, "fold_messages: records must be an iterator");
        return NULL;
    }
    uint64_t last = UINT64_MAX, until = UINT64_MAX;
    if (last_o != Py_None && (last = PyLong_AsUnsignedLongLong(last_o)) == (uint64_t)-1 &&
        PyErr_Occurred())
        return NULL;
    if (until_o != Py_None && (until = PyLong_AsUnsignedLongLong(until_o)) == (uint64_t)-1 &&
        PyErr_Occurred())
        return NULL;
    uint64_t next = 0;
    int checked = next_o != Py_None, past_end = 0; /* past_end: after lsn 2**64 - 1, none */
    if (checked && (next = PyLong_AsUnsignedLongLong(next_o)) == (uint64_t)-1 && PyErr_Occurred())
        return NULL;
    if (heads == Py_None)
        heads = NULL;
    sink sinks[3] = {{0}};
    if (open_sinks(tables, sinks) < 0) {
        for (int i = 0; i < 3; i++) {
            Py_CLEAR(sinks[i].view);
            Py_CLEAR(sinks[i].listed);
        }
        return NULL;
    }
    views vs = {0}; /* the tables' views, looked up once for the whole run */
    Py_ssize_t applied = 0;
    uint64_t lsn = 0, ts = 0;
    PyObject *record = NULL;
    int exhausted = 0, failed = 0;
    while (applied < limit) {
        record = PyIter_Next(records);
        if (record == NULL) {
            failed = PyErr_Occurred() != NULL;
            exhausted = 1;
            break;
        }
        message m;
        int rc = 0;
        if (PyTuple_Check(record) && PyTuple_GET_SIZE(record) == 2 &&
            parse_message(PyTuple_GET_ITEM(record, 1), &m) && m.lsn <= last && m.ts <= until &&
            (!checked || (m.lsn == next && !past_end)))
            rc = apply_message(tables, &vs, heads, sinks, &m);
        if (rc < 0) {
            Py_CLEAR(record);
            failed = 1;
            break;
        }
        if (rc == 0)
            break; /* handed back to Python */
        Py_CLEAR(record);
        applied++;
        lsn = m.lsn;
        ts = m.ts;
        past_end = lsn == UINT64_MAX;
        next = lsn + 1;
    }
    /* absorb: each DigestTable learns the rows counted for it (`absorb(rows, digest)`) */
    for (int i = 0; i < 3 && !failed; i++) {
        sink *s = &sinks[i];
        if (!s->direct || !s->rows)
            continue;
        PyObject *r = PyObject_CallMethod(s->view, "absorb", "KK", (unsigned long long)s->rows,
                                          (unsigned long long)s->digest);
        if (r == NULL)
            failed = 1;
        Py_XDECREF(r);
    }
    views_clear(&vs);
    for (int i = 0; i < 3; i++) {
        Py_CLEAR(sinks[i].view);
        Py_CLEAR(sinks[i].listed);
    }
    if (failed) {
        Py_XDECREF(record);
        return NULL;
    }
    return Py_BuildValue("nKKNi", applied, (unsigned long long)lsn, (unsigned long long)ts,
                         record ? record : Py_NewRef(Py_None), exhausted);
}


/* ---------------------------------------------------------------- send_message
 *
 * The common case of `Store.execute` for a `SendMessage`, compiled: the checks of
 * `storage.rules.decide` for a send that succeeds into a conversation that exists, the sealing of
 * its one `message.accepted` event (`storage.log.seal`), and `add_message`. Any other case (a
 * check that fails, a retried cid, a direct conversation still to create, a value of an odd
 * type) returns None before anything was written, and `decide` runs as ever: the Python rules
 * stay the reference, and the error they raise is the error.
 */

static PyObject *blake2b_type = NULL;   /* hashlib.blake2b */
static PyObject *digest_kwnames = NULL; /* ("digest_size",) */
static PyObject *digest_size = NULL;    /* storage.records.DIGEST_BYTES */
static PyObject *s_user, *s_device, *s_role, *s_cid, *s_body, *s_conv, *s_to, *s_digest;

#define DIGEST_BYTES 32
/* The id limits of storage.rules, given by configure_send: MAX_CID_CHARS, MAX_CID_BYTES, and
 * MAX_CONV_ID_CHARS, which _conv_key applies to the conv id's UTF-8 bytes. */
static Py_ssize_t max_cid_chars, max_cid_bytes, max_conv_id_bytes;

/* storage.rules.valid_id for an exact str: [A-Za-z0-9][A-Za-z0-9_.@+-]{0,63} */
static int valid_id(PyObject *s) {
    if (!PyUnicode_CheckExact(s) || !PyUnicode_IS_ASCII(s))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (n < 1 || n > 64)
        return 0;
    const unsigned char *p = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = p[i];
        if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
            continue;
        if (i > 0 && (c == '_' || c == '.' || c == '@' || c == '+' || c == '-'))
            continue;
        return 0;
    }
    return 1;
}

static int is_ascii_word(PyObject *s, const char *word) {
    return PyUnicode_CheckExact(s) && PyUnicode_CompareWithASCIIString(s, word) == 0;
}

static int bytes_is(PyObject *b, const char *word) {
    return PyBytes_CheckExact(b) && is((const unsigned char *)PyBytes_AS_STRING(b),
                                       PyBytes_GET_SIZE(b), word);
}

/* `tables.<name>[key]`: a new reference (maybe None), or NULL with an exception set. */
static PyObject *lookup(PyObject *tables, PyObject *name, PyObject *key) {
    PyObject *view = PyObject_GetAttr(tables, name);
    if (view == NULL)
        return NULL;
    PyObject *row = PyObject_GetItem(view, key);
    Py_DECREF(view);
    return row;
}

static PyObject *key2(const char *a, Py_ssize_t la, const char *b, Py_ssize_t lb) {
    PyObject *out = PyBytes_FromStringAndSize(NULL, la + 1 + lb);
    if (out != NULL) {
        char *p = PyBytes_AS_STRING(out);
        memcpy(p, a, la);
        p[la] = '\0';
        memcpy(p + la + 1, b, lb);
    }
    return out;
}

static void put_bin(char **p, const char *data, Py_ssize_t len) {
    unsigned char *q = (unsigned char *)*p;
    if (len < 256) {
        *q++ = 0xc4;
        *q++ = (unsigned char)len;
    } else if (len < 65536) {
        *q++ = 0xc5;
        *q++ = (unsigned char)(len >> 8);
        *q++ = (unsigned char)len;
    } else {
        *q++ = 0xc6;
        for (int i = 3; i >= 0; i--)
            *q++ = (unsigned char)(len >> (8 * i));
    }
    memcpy(q, data, len);
    *p = (char *)q + len;
}

/* A SendMessage's fields (new references), read once. */
typedef struct {
    PyObject *user, *device, *role, *cid, *body, *conv, *to;
} send_fields;

static int read_fields(PyObject *cmd, send_fields *f) {
    memset(f, 0, sizeof(*f));
    if (PyTuple_Check(cmd) && PyTuple_GET_SIZE(cmd) == 7) {
        /* A SendMessage, a NamedTuple of these fields in this order (storage/store.py asserts
         * it): its items, without an attribute lookup each (7 of them, 1.2 % of the broker's
         * CPU in `homing bench throughput`). */
        PyObject **items = &PyTuple_GET_ITEM(cmd, 0);
        f->user = Py_NewRef(items[0]);
        f->device = Py_NewRef(items[1]);
        f->role = Py_NewRef(items[2]);
        f->cid = Py_NewRef(items[3]);
        f->body = Py_NewRef(items[4]);
        f->conv = Py_NewRef(items[5]);
        f->to = Py_NewRef(items[6]);
        return 0;
    }
    return (f->user = PyObject_GetAttr(cmd, s_user)) &&
                   (f->device = PyObject_GetAttr(cmd, s_device)) &&
                   (f->role = PyObject_GetAttr(cmd, s_role)) &&
                   (f->cid = PyObject_GetAttr(cmd, s_cid)) &&
                   (f->body = PyObject_GetAttr(cmd, s_body)) &&
                   (f->conv = PyObject_GetAttr(cmd, s_conv)) && (f->to = PyObject_GetAttr(cmd, s_to))
               ? 0
               : -1;
}

static void clear_fields(send_fields *f) {
    Py_XDECREF(f->user);
    Py_XDECREF(f->device);
    Py_XDECREF(f->role);
    Py_XDECREF(f->cid);
    Py_XDECREF(f->body);
    Py_XDECREF(f->conv);
    Py_XDECREF(f->to);
}

/* Clear the error a send left to Python's way met (a row that does not read, an odd field:
 * the rules meet it again and raise it where it belongs) and return 0; or keep it and return -1
 * when it is not an Exception. A KeyboardInterrupt is raised once, by Python's SIGINT handler,
 * in whatever Python code runs when Ctrl-C lands, a row read in `lookup` (BufTable's
 * __missing__) among them: cleared, it was lost, and `homing bench replay` building its log
 * went on for minutes after Ctrl-C. */
static int clear_for_python(void) {
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Clear();
    return 0;
}

/* Returns 1 when the send may go this way (and fills the out-parameters), 0 when it must go
 * Python's way, -1 with the error set when a row read raised what is not an Exception
 * (`clear_for_python`). `*ckey` is a new reference (the conv's key), `*conv` too. */
static int send_checks(PyObject *tables, const send_fields *f, Py_ssize_t max_body,
                       PyObject **conv, PyObject **ckey) {
    int ok = 0;
    PyObject *user = f->user, *device = f->device, *role = f->role, *cid = f->cid,
             *body = f->body, *conv_in = f->conv, *to = f->to, *key = NULL, *row = NULL;
    *conv = *ckey = NULL;
    /* decide: the actor */
    if (!valid_id(user) || !valid_id(device) ||
        !(is_ascii_word(role, "user") || is_ascii_word(role, "service") ||
          is_ascii_word(role, "admin")))
        goto done;
    /* _send: cid, body, exactly one of conv and to */
    Py_ssize_t cid_len, body_len, user_len = PyUnicode_GET_LENGTH(user);
    const char *cid_s, *user_s = (const char *)PyUnicode_1BYTE_DATA(user);
    if (!PyUnicode_CheckExact(cid) || PyUnicode_GET_LENGTH(cid) < 1 ||
        PyUnicode_GET_LENGTH(cid) > max_cid_chars ||
        !(cid_s = PyUnicode_AsUTF8AndSize(cid, &cid_len)) || cid_len > max_cid_bytes ||
        memchr(cid_s, 0, cid_len))
        goto done;
    if (PyUnicode_CheckExact(body)) {
        if (!PyUnicode_AsUTF8AndSize(body, &body_len))
            goto done;
    } else if (PyBytes_CheckExact(body)) {
        body_len = PyBytes_GET_SIZE(body);
    } else {
        goto done;
    }
    if (body_len > max_body || (conv_in == Py_None) == (to == Py_None))
        goto done;
    if (!(key = key2(cid_s, cid_len, user_s, user_len)) || !(row = lookup(tables, s_idem, key)) ||
        row != Py_None)
        goto done; /* a retried cid: Python answers with the first result */
    Py_CLEAR(key);
    Py_CLEAR(row);
    if (to != Py_None) {
        /* _direct_target, for a direct conversation that exists */
        if (!valid_id(to))
            goto done;
        Py_ssize_t to_len = PyUnicode_GET_LENGTH(to);
        const char *to_s = (const char *)PyUnicode_1BYTE_DATA(to);
        Py_ssize_t common = user_len < to_len ? user_len : to_len;
        int cmp = memcmp(user_s, to_s, common);
        if (cmp == 0)
            cmp = user_len < to_len ? -1 : user_len > to_len ? 1 : 0;
        if (cmp == 0)
            goto done; /* to yourself */
        const char *lo = cmp < 0 ? user_s : to_s, *hi = cmp < 0 ? to_s : user_s;
        Py_ssize_t lo_len = cmp < 0 ? user_len : to_len, hi_len = cmp < 0 ? to_len : user_len;
        if (!(*ckey = PyBytes_FromStringAndSize(NULL, 3 + lo_len + 1 + hi_len)))
            goto done;
        char *p = PyBytes_AS_STRING(*ckey);
        memcpy(p, "dm:", 3);
        memcpy(p + 3, lo, lo_len);
        p[3 + lo_len] = ':';
        memcpy(p + 4 + lo_len, hi, hi_len);
        if (!(*conv = PyUnicode_FromStringAndSize(PyBytes_AS_STRING(*ckey),
                                                   PyBytes_GET_SIZE(*ckey))))
            goto done;
        if (!(row = lookup(tables, s_conv, *ckey)) || row == Py_None)
            goto done; /* to be created: Python appends its events */
        Py_CLEAR(row);
    } else {
        /* _check_post */
        Py_ssize_t conv_len;
        const char *conv_s;
        if (!PyUnicode_CheckExact(conv_in) ||
            !(conv_s = PyUnicode_AsUTF8AndSize(conv_in, &conv_len)) || conv_len < 1 ||
            conv_len > max_conv_id_bytes || memchr(conv_s, 0, conv_len) ||
            !(*ckey = PyBytes_FromStringAndSize(conv_s, conv_len)))
            goto done;
        Py_INCREF(conv_in);
        *conv = conv_in;
        if (!(row = lookup(tables, s_conv, *ckey)) || row == Py_None)
            goto done;
        Py_CLEAR(row);
        if (is_ascii_word(role, "admin")) {
            ok = 1;
            goto done;
        }
    }
    /* the actor's role in the conversation (both ways) */
    {
        Py_ssize_t conv_len = PyBytes_GET_SIZE(*ckey);
        if (!(key = key2(PyBytes_AS_STRING(*ckey), conv_len, user_s, user_len)) ||
            !(row = lookup(tables, s_member, key)) || row == Py_None || !PyBytes_CheckExact(row))
            goto done;
        if (to == Py_None && conv_len >= 4 && memcmp(PyBytes_AS_STRING(*ckey), "chn:", 4) == 0 &&
            !bytes_is(row, "owner") && !bytes_is(row, "admin") && !is_ascii_word(role, "service"))
            goto done;
    }
    ok = 1;
done:
    if (!ok) {
        ok = clear_for_python();
        Py_CLEAR(*conv);
        Py_CLEAR(*ckey);
    }
    Py_XDECREF(key);
    Py_XDECREF(row);
    return ok;
}

/* The record value `digest || body` of the send's event, body as `storage.log.seal` packs it:
 * [lsn, ts_us, "message.accepted", user, device, {"conv", "cid", "body"}]. */
static PyObject *seal_send(const send_fields *f, PyObject *conv, uint64_t lsn, uint64_t ts,
                           PyObject *prev) {
    PyObject *user = f->user, *device = f->device, *cid = f->cid, *body = f->body, *value = NULL,
             *view = NULL, *h = NULL, *digest = NULL, *out = NULL;
    Py_ssize_t ul, dl, cl, vl, bl;
    const char *u = PyUnicode_AsUTF8AndSize(user, &ul), *d = PyUnicode_AsUTF8AndSize(device, &dl),
               *c = PyUnicode_AsUTF8AndSize(cid, &cl), *v = PyUnicode_AsUTF8AndSize(conv, &vl), *b;
    int text = PyUnicode_CheckExact(body);
    b = text ? PyUnicode_AsUTF8AndSize(body, &bl) : PyBytes_AS_STRING(body);
    if (!u || !d || !c || !v || !b)
        goto done;
    if (!text)
        bl = PyBytes_GET_SIZE(body);
    Py_ssize_t most = DIGEST_BYTES + 1 + 9 + 9 + (5 + 16) + (5 + ul) + (5 + dl) + 1 + (1 + 4) +
                      (5 + vl) + (1 + 3) + (5 + cl) + (1 + 4) + (5 + bl);
    if (!(value = PyBytes_FromStringAndSize(NULL, most)))
        goto done;
    char *start = PyBytes_AS_STRING(value), *p = start + DIGEST_BYTES;
    memcpy(start, PyBytes_AS_STRING(prev), DIGEST_BYTES);
    *p++ = (char)0x96;
    put_uint(&p, lsn);
    put_uint(&p, ts);
    put_str(&p, "message.accepted", 16);
    put_str(&p, u, ul);
    put_str(&p, d, dl);
    *p++ = (char)0x83;
    put_str(&p, "conv", 4);
    put_str(&p, v, vl);
    put_str(&p, "cid", 3);
    put_str(&p, c, cl);
    put_str(&p, "body", 4);
    if (text)
        put_str(&p, b, bl);
    else
        put_bin(&p, b, bl);
    Py_ssize_t size = p - start;
    /* digest = blake2b(prev || body): hashed in place, then written over prev */
    PyObject *args[2];
    if (!(view = PyMemoryView_FromMemory(start, size, PyBUF_READ)))
        goto done;
    args[0] = view;
    args[1] = digest_size;
    if (!(h = PyObject_Vectorcall(blake2b_type, args, 1, digest_kwnames)) ||
        !(digest = PyObject_CallMethodNoArgs(h, s_digest)))
        goto done;
    Py_CLEAR(view);
    if (!PyBytes_Check(digest) || PyBytes_GET_SIZE(digest) != DIGEST_BYTES) {
        PyErr_SetString(PyExc_RuntimeError, "blake2b gave a digest of the wrong size");
        goto done;
    }
    memcpy(start, PyBytes_AS_STRING(digest), DIGEST_BYTES);
    if (_PyBytes_Resize(&value, size) < 0)
        goto done; /* value is NULL now */
    out = value;
    value = NULL;
done:
    Py_XDECREF(value);
    Py_XDECREF(view);
    Py_XDECREF(h);
    Py_XDECREF(digest);
    return out;
}

static PyObject *send_message(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "send_message(tables, cmd, now_us, max_body_bytes, "
                                         "lsn, prev_digest, heads)");
        return NULL;
    }
    if (!configured())
        return NULL;
    if (blake2b_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "storage._fold.configure_send was not called");
        return NULL;
    }
    PyObject *tables = args[0], *cmd = args[1], *heads = args[6];
    if (!PyLong_Check(args[4]) || !PyBytes_Check(args[5]) ||
        PyBytes_GET_SIZE(args[5]) != DIGEST_BYTES || !PyDict_Check(heads)) {
        PyErr_SetString(PyExc_TypeError, "send_message: lsn is an int, prev_digest 32 bytes, "
                                         "heads a dict");
        return NULL;
    }
    if (!PyLong_CheckExact(args[2]) || !PyLong_CheckExact(args[3]))
        Py_RETURN_NONE; /* a time or a limit that is not an int: Python's way */
    uint64_t ts = PyLong_AsUnsignedLongLong(args[2]);
    Py_ssize_t max_body = PyLong_AsSsize_t(args[3]);
    uint64_t lsn = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred() || lsn == 0 || max_body < 0) {
        PyErr_Clear(); /* a negative time or an odd limit: Python's way */
        Py_RETURN_NONE;
    }
    send_fields f;
    PyObject *conv, *ckey;
    if (read_fields(cmd, &f) < 0 || send_checks(tables, &f, max_body, &conv, &ckey) <= 0) {
        clear_fields(&f);
        if (clear_for_python() < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *out = NULL, *value = NULL, *sender = NULL, *cidb = NULL;
    uint64_t seq;
    if (!(value = seal_send(&f, conv, lsn, ts, args[5])))
        goto done;
    Py_ssize_t ul, cl;
    const char *u = PyUnicode_AsUTF8AndSize(f.user, &ul), *c = PyUnicode_AsUTF8AndSize(f.cid, &cl);
    if (!u || !c || !(sender = PyBytes_FromStringAndSize(u, ul)) ||
        !(cidb = PyBytes_FromStringAndSize(c, cl)))
        goto done;
    /* the point of no return: from here an error fails the batch (it rolls the rows back) */
    if (add_message_impl(tables, NULL, ckey, PyBytes_AS_STRING(ckey), PyBytes_GET_SIZE(ckey),
                         sender, cidb, lsn, heads, NULL, &seq) < 0)
        goto done;
    out = Py_BuildValue("(OOK)", conv, value, (unsigned long long)seq);
done:
    clear_fields(&f);
    Py_DECREF(conv);
    Py_DECREF(ckey);
    Py_XDECREF(value);
    Py_XDECREF(sender);
    Py_XDECREF(cidb);
    return out;
}

static PyObject *configure_send(PyObject *self, PyObject *args) {
    PyObject *blake2b;
    if (!PyArg_ParseTuple(args, "Onnn:configure_send", &blake2b, &max_cid_chars, &max_cid_bytes,
                          &max_conv_id_bytes))
        return NULL;
    if (digest_kwnames == NULL) {
        if (!(digest_kwnames = Py_BuildValue("(s)", "digest_size")) ||
            !(digest_size = PyLong_FromLong(DIGEST_BYTES)))
            return NULL;
    }
    Py_INCREF(blake2b);
    Py_XSETREF(blake2b_type, blake2b);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(kind_msg, digest_table_type, listed_table_type, buf_table_type): the inbox "
     "entry kind of a message, the table type whose rows fold_messages may digest directly, "
     "the one whose rows it packs into the table's `rows`, and the live path's buffered table "
     "(written as its __setitem__ does)."},
    {"add_message", (PyCFunction)(void (*)(void))add_message, METH_FASTCALL,
     "add_message(tables, ckey, conv, sender, cid, lsn, heads) -> seq: as "
     "storage.projections.add_message (heads may be None)."},
    {"send_message", (PyCFunction)(void (*)(void))send_message, METH_FASTCALL,
     "send_message(tables, cmd, now_us, max_body_bytes, lsn, prev_digest, heads) -> (conv, "
     "value, seq) or None: a SendMessage decided, sealed as event `lsn` and applied, when it "
     "succeeds into a conversation that exists; None (nothing written) for Python's way, "
     "which meets again any Exception met on the way; what is not an Exception (the "
     "KeyboardInterrupt of a Ctrl-C that lands while a row is read) is raised."},
    {"configure_send", configure_send, METH_VARARGS,
     "configure_send(blake2b, max_cid_chars, max_cid_bytes, max_conv_id_bytes): the hash of "
     "the log's digest chain (hashlib.blake2b) and the id limits of storage.rules."},
    {"rows_digest", rows_digest, METH_VARARGS,
     "rows_digest(rows, key) -> (count, digest): the keyed multiset digest of (key, value) "
     "rows (SipHash-2-4 of len(key) || key || value, summed modulo 2**64)."},
    {"fold_messages", fold_messages, METH_VARARGS,
     "fold_messages(records, tables, heads, last_lsn, until_us, limit[, next_lsn]) -> (applied, lsn, "
     "ts_us, record, exhausted): the message records of a replay (see storage.fold)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "storage._fold",
    "The hot loops of storage, compiled (optional; see storage/native.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

/* A module constant of 64 bits (past a C long where a long is 32). */
static int add_u64(PyObject *m, const char *name, uint64_t v) {
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(m, name, o);
    Py_DECREF(o);
    return rc;
}

PyMODINIT_FUNC PyInit__fold(void) {
    PyObject *struct_mod = PyImport_ImportModule("struct");
    if (struct_mod == NULL)
        return NULL;
    struct_error = PyObject_GetAttrString(struct_mod, "error");
    Py_DECREF(struct_mod);
    if (struct_error == NULL)
        return NULL;
#define INTERN(var, name)                                                                     \
    if (!(var = PyUnicode_InternFromString(name)))                                            \
        return NULL;
    INTERN(s_conv_seq, "conv_seq")
    INTERN(s_msg, "msg")
    INTERN(s_inbox_head, "inbox_head")
    INTERN(s_inbox, "inbox")
    INTERN(s_member, "member")
    INTERN(s_parts, "parts")
    INTERN(s_read, "read")
    INTERN(s_recv, "recv")
    INTERN(s_idem, "idem")
    INTERN(s_key, "key")
    INTERN(s_rows, "rows")
    INTERN(s_dirty, "dirty")
    INTERN(s_user, "user")
    INTERN(s_device, "device")
    INTERN(s_role, "role")
    INTERN(s_cid, "cid")
    INTERN(s_body, "body")
    INTERN(s_conv, "conv")
    INTERN(s_to, "to")
    INTERN(s_digest, "digest")
#undef INTERN
    if (PyType_Ready(&RowsType) < 0 || PyType_Ready(&SortedRowsType) < 0 ||
        PyType_Ready(&SortedRowsIterType) < 0 || PyType_Ready(&RowViewType) < 0 ||
        PyType_Ready(&TransientIterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "Rows", (PyObject *)&RowsType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* storage/native.py refuses a module whose VERSION is not the one it was written for (a
     * stale build left in place by an editable install of newer sources). */
    if (m != NULL && (PyModule_AddIntConstant(m, "VERSION", FOLD_VERSION) < 0 ||
                      PyModule_AddIntConstant(m, "KEYS_FIT_BYTES", KEYS_FIT_BYTES) < 0 ||
                      add_u64(m, "MAX_TS_US", MAX_TS_US) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
