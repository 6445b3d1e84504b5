/* storage._rowio: a write transaction's rows put and read through py-lmdb's own LMDB, the GIL
 * handed over once per table of rows rather than at each row (optional; storage/rowio.py
 * decides whether it may be used).
 *
 * py-lmdb gives the GIL up around every row it writes (`Cursor.putmulti` around each
 * `mdb_cursor_put`) and around the page it touches after a `get`. The commit thread of
 * `homing serve` writes thousands of rows a batch while the trio thread wants the GIL, so each
 * row hands the GIL over, or wakes the trio thread for nothing (docs/BENCHMARKS-JOURNAL.md).
 * These functions make the same LMDB calls on the transaction's own `MDB_txn`, through the
 * engine table py-lmdb keeps with it. A call's rows are first gathered as LMDB values with the
 * GIL held; then, from RELEASE_FROM rows on, the puts run with the GIL released once around
 * them all, so that the trio thread runs Python meanwhile (fewer rows keep it: the hand-over
 * would cost more than the puts). Each get releases the GIL around the lookup alone, as py-lmdb
 * does, since a read may have to fault a page in from disk.
 *
 * They read py-lmdb's objects by the layout of py-lmdb 3.0.0's lmdb/cpython.c (below), which
 * is not a public interface: storage/rowio.py uses this module only with that version, and
 * only once `check` has matched the layout against a live transaction (the objects' own
 * fields, the engine's version, the transaction's id, the database's flags). Anything else
 * goes through py-lmdb's public API, as before.
 *
 * - `check(env, txn, db, txn_id, version)`: whether the layout matches these live objects.
 * - `put_rows(txn, db, keys, changes)`: for each key of `keys` in order, `changes[key]` put
 *   (overwriting) or, when None, the row deleted (absent rows are no error).
 * - `append_rows(txn, db, rows)`: `(key, value)` pairs put with MDB_APPEND (keys ascending,
 *   above every stored key).
 * - `append_packed(txn, db, data, order)`: the same, for rows packed in two buffers, as
 *   storage._fold's `SortedRows.packed()` gives them (a rebuild's 800,000 rows of 200,000
 *   events, without an object a row): `data` records of u32 klen, u32 vlen (native byte
 *   order), key, value; `order` native int64 offsets of records in `data`, in key order. Each
 *   record is checked to lie inside `data` before its put (ValueError, the rows before it
 *   written, as for an LMDB error). The GIL is released once around them all from
 *   RELEASE_FROM rows; the buffers are held, and must not change, meanwhile.
 * - `get(txn, db, key)`: the value as bytes, or None (the GIL released for the lookup).
 * Each takes a live write transaction and a database of its environment, of py-lmdb's own types
 * (`configure(raise_error, Transaction, _Database)` names them, once, first). The keys and
 * values are bytes the caller holds and nothing else writes while the puts run (the commit
 * thread's own batch). An LMDB error calls `raise_error(what, rc)`, which raises py-lmdb's
 * class for that code (MapFullError above all: storage grows the map on it); the rows before
 * the failing one are written, as with py-lmdb, and the caller aborts the transaction.
 */

#define ROWIO_VERSION 5 /* bump with any change of behaviour or signature; see storage/rowio.py */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- LMDB's types, as in lmdb.h (opaque handles, MDB_val) */

typedef struct MDB_env MDB_env;
typedef struct MDB_txn MDB_txn;
typedef struct MDB_cursor MDB_cursor;
typedef unsigned int MDB_dbi;
typedef struct {
    size_t mv_size;
    void *mv_data;
} MDB_val;

#define MDB_APPEND 0x20000
#define MDB_NOTFOUND (-30798)
#define MDB_BAD_TXN (-30782)
#define MDB_SET 15 /* MDB_cursor_op */
#define MDB_NODUPDATA 0x20

/* ---- py-lmdb 3.0.0: lmdb/mdb_api.h's engine table, up to the last entry used here */

typedef struct {
    int major, minor, patch;
    unsigned int data_version;
    void *env_create, *env_open, *env_close, *env_copy2, *env_copyfd2, *env_copy3,
        *env_copyfd3, *env_sync, *env_stat, *env_info, *env_get_flags, *env_set_flags,
        *env_get_maxkeysize, *env_get_maxreaders, *env_get_path, *env_set_mapsize,
        *env_set_maxdbs, *env_set_maxreaders, *reader_check, *reader_list;
    void *txn_begin, *txn_commit, *txn_abort, *txn_reset, *txn_renew;
    size_t (*txn_id)(MDB_txn *txn);
    void *dbi_open;
    int (*dbi_flags)(MDB_txn *txn, MDB_dbi dbi, unsigned int *flags);
    void *dbi_close, *drop;
    int (*get)(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data);
    int (*put)(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, unsigned int flags);
    int (*del)(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data);
    void *stat;
    int (*cursor_open)(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor);
    void (*cursor_close)(MDB_cursor *cursor);
    int (*cursor_get)(MDB_cursor *cursor, MDB_val *key, MDB_val *data, int op);
    int (*cursor_put)(MDB_cursor *cursor, MDB_val *key, MDB_val *data, unsigned int flags);
    int (*cursor_del)(MDB_cursor *cursor, unsigned int flags);
} MdbApi;

/* ---- py-lmdb 3.0.0: lmdb/cpython.c's objects (built without HAVE_MEMSINK, as its wheels are) */

struct list_head {
    struct list_head *prev, *next;
};

#define LMDB_OBJECT_HEAD                                                                       \
    PyObject_HEAD struct list_head siblings;                                                   \
    struct list_head children;                                                                 \
    int valid;

typedef struct {
    LMDB_OBJECT_HEAD
    PyObject *env;
    MDB_dbi dbi;
    unsigned int flags;
} DbObject;

typedef struct {
    LMDB_OBJECT_HEAD
    PyObject *weaklist;
    PyObject *env;
    PyObject *parent;
    const MdbApi *libv;
    MDB_txn *txn;
    int flags;
    DbObject *db;
    int mutations;
} TransObject;

#define TRANS_RDONLY 2

static PyObject *raise_error = NULL;      /* storage.rowio._raise(what, rc) */
static PyTypeObject *trans_type = NULL;   /* lmdb.Transaction */
static PyTypeObject *db_type = NULL;      /* lmdb's _Database */

static PyObject *fail(const char *what, int rc) {
    PyObject *r = PyObject_CallFunction(raise_error, "si", what, rc);
    Py_XDECREF(r); /* it raises; a return would be a bug there */
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_SystemError, "%s failed (%d)", what, rc);
    return NULL;
}

/* The transaction and database of a call (args[0], args[1]): a live write transaction and a
 * database of the same environment, in py-lmdb's own types; NULL with an exception set when the
 * call is not that (wrong count of arguments: `usage` is the message). */
static TransObject *target(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                           const char *usage, MDB_dbi *dbi) {
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (trans_type == NULL || Py_TYPE(args[0]) != trans_type || Py_TYPE(args[1]) != db_type) {
        PyErr_Format(PyExc_TypeError, "%s: a py-lmdb Transaction and _Database", usage);
        return NULL;
    }
    TransObject *t = (TransObject *)args[0];
    DbObject *d = (DbObject *)args[1];
    if (!t->valid || t->txn == NULL || (t->flags & TRANS_RDONLY) || !d->valid ||
        d->env != t->env) {
        fail("rowio", MDB_BAD_TXN);
        return NULL;
    }
    *dbi = d->dbi;
    return t;
}

static int as_val(PyObject *b, MDB_val *out) {
    if (!PyBytes_Check(b)) {
        PyErr_Format(PyExc_TypeError, "rows are bytes, not %.80s", Py_TYPE(b)->tp_name);
        return -1;
    }
    out->mv_size = (size_t)PyBytes_GET_SIZE(b);
    out->mv_data = PyBytes_AS_STRING(b);
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *fn, *tt, *dt;
    if (!PyArg_ParseTuple(args, "OO!O!", &fn, &PyType_Type, &tt, &PyType_Type, &dt))
        return NULL;
    Py_XSETREF(raise_error, Py_NewRef(fn));
    Py_XSETREF(trans_type, (PyTypeObject *)Py_NewRef(tt));
    Py_XSETREF(db_type, (PyTypeObject *)Py_NewRef(dt));
    Py_RETURN_NONE;
}

static PyObject *check(PyObject *self, PyObject *args) {
    PyObject *env, *txn, *db;
    unsigned long long txn_id;
    int major, minor, patch;
    if (!PyArg_ParseTuple(args, "OOOK(iii)", &env, &txn, &db, &txn_id, &major, &minor, &patch))
        return NULL;
    if (trans_type == NULL || Py_TYPE(txn) != trans_type || Py_TYPE(db) != db_type)
        Py_RETURN_FALSE;
    TransObject *t = (TransObject *)txn;
    DbObject *d = (DbObject *)db;
    const MdbApi *v = t->libv;
    unsigned int flags = 0;
    int ok = t->env == env && t->parent == NULL && t->valid && !(t->flags & TRANS_RDONLY) &&
             v != NULL && v->major == major && v->minor == minor && v->patch == patch &&
             t->txn != NULL && d->env == env && d->valid;
    ok = ok && v->txn_id(t->txn) == txn_id;
    ok = ok && v->dbi_flags(t->txn, d->dbi, &flags) == 0 && flags == d->flags;
    return PyBool_FromLong(ok);
}

/* A batch's rows as LMDB values, gathered with the GIL held (the bytes objects stay alive and
 * unchanged: the caller holds them and nothing else writes them), so that the puts can run
 * with the GIL released when there are enough of them to be worth the hand-over. */
typedef struct {
    MDB_val k, v;
    int del;
} Row;

#define RELEASE_FROM 32 /* rows in one call; below this the hand-over costs more than it frees */

/* Put (or delete) `n` rows, through one cursor: 0, or the first failure's code with its index
 * in *at. The rows come in key order, so a put or delete usually lands on the leaf the cursor
 * is on, which LMDB checks before searching from the root (`mdb_put` searched from the root
 * for every row). A delete is what `mdb_del(txn, dbi, key, NULL)` does on its own cursor:
 * find the key (MDB_SET), delete it with all its values (MDB_NODUPDATA, which matters only in
 * an MDB_DUPSORT table; homing has none). No Python here: it may run with the GIL released. */
static int write_rows(const MdbApi *api, MDB_txn *txn, MDB_dbi dbi, const Row *rows,
                      Py_ssize_t n, unsigned int flags, Py_ssize_t *at) {
    MDB_cursor *cur;
    Py_ssize_t i = 0;
    int rc = n ? api->cursor_open(txn, dbi, &cur) : 0;
    if (rc || n == 0) {
        *at = 0;
        return rc;
    }
    for (; i < n; i++) {
        if (rows[i].del) {
            MDB_val key = rows[i].k, found;
            rc = api->cursor_get(cur, &key, &found, MDB_SET);
            rc = rc == 0 ? api->cursor_del(cur, MDB_NODUPDATA) : rc == MDB_NOTFOUND ? 0 : rc;
        } else {
            rc = api->cursor_put(cur, (MDB_val *)&rows[i].k, (MDB_val *)&rows[i].v, flags);
        }
        if (rc)
            break;
    }
    api->cursor_close(cur);
    *at = i;
    return rc;
}

static PyObject *run_rows(TransObject *t, MDB_dbi dbi, Row *rows, Py_ssize_t n,
                          unsigned int flags) {
    Py_ssize_t at;
    int rc;
    t->mutations += (int)n; /* py-lmdb's cursors re-read their position after a change */
    if (n >= RELEASE_FROM) {
        Py_BEGIN_ALLOW_THREADS
        rc = write_rows(t->libv, t->txn, dbi, rows, n, flags, &at);
        Py_END_ALLOW_THREADS
    } else {
        rc = write_rows(t->libv, t->txn, dbi, rows, n, flags, &at);
    }
    if (rc)
        return fail(rows[at].del ? "mdb_del" : "mdb_put", rc);
    Py_RETURN_NONE;
}

static PyObject *put_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    MDB_dbi dbi;
    TransObject *t = target(args, nargs, 4, "put_rows(txn, db, keys, changes)", &dbi);
    if (t == NULL)
        return NULL;
    if (!PyList_Check(args[2]) || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "put_rows: keys is a list, changes a dict");
        return NULL;
    }
    PyObject *keys = args[2], *changes = args[3];
    Py_ssize_t n = PyList_GET_SIZE(keys);
    Row *rows = PyMem_Malloc(sizeof(Row) * (size_t)(n ? n : 1));
    if (rows == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *value = PyDict_GetItemWithError(changes, key); /* borrowed */
        if (value == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetObject(PyExc_KeyError, key);
            goto done;
        }
        if (as_val(key, &rows[i].k) < 0)
            goto done;
        rows[i].del = value == Py_None;
        if (!rows[i].del && as_val(value, &rows[i].v) < 0)
            goto done;
    }
    result = run_rows(t, dbi, rows, n, 0);
done:
    PyMem_Free(rows);
    return result;
}

static PyObject *append_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    MDB_dbi dbi;
    TransObject *t = target(args, nargs, 3, "append_rows(txn, db, rows)", &dbi);
    if (t == NULL)
        return NULL;
    if (!PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "append_rows: rows is a list");
        return NULL;
    }
    PyObject *list = args[2];
    Py_ssize_t n = PyList_GET_SIZE(list);
    Row *rows = PyMem_Malloc(sizeof(Row) * (size_t)(n ? n : 1));
    if (rows == NULL)
        return PyErr_NoMemory();
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(list, i);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != 2) {
            PyErr_SetString(PyExc_TypeError, "rows are (key, value) tuples");
            goto done;
        }
        if (as_val(PyTuple_GET_ITEM(row, 0), &rows[i].k) < 0 ||
            as_val(PyTuple_GET_ITEM(row, 1), &rows[i].v) < 0)
            goto done;
        rows[i].del = 0;
    }
    result = run_rows(t, dbi, rows, n, MDB_APPEND);
done:
    PyMem_Free(rows);
    return result;
}

#define BAD_RECORD 1 /* write_packed: a record not inside `data` (no LMDB code is positive) */

/* Put the packed rows with MDB_APPEND: 0, BAD_RECORD, or LMDB's code, with the row's index in
 * *at. No Python here: it may run with the GIL released. */
static int write_packed(const MdbApi *api, MDB_txn *txn, MDB_dbi dbi, const char *data,
                        Py_ssize_t len, const int64_t *order, Py_ssize_t n, Py_ssize_t *at) {
    MDB_cursor *cur;
    Py_ssize_t i = 0;
    int rc = api->cursor_open(txn, dbi, &cur);
    if (rc) {
        *at = 0;
        return rc;
    }
    for (; i < n; i++) {
        int64_t off = order[i];
        uint32_t lens[2];
        if (off < 0 || off > (int64_t)len - 8) {
            rc = BAD_RECORD;
            break;
        }
        memcpy(lens, data + off, 8);
        if ((uint64_t)lens[0] + lens[1] > (uint64_t)(len - 8 - off)) {
            rc = BAD_RECORD;
            break;
        }
        MDB_val k = {lens[0], (void *)(data + off + 8)};
        MDB_val v = {lens[1], (void *)(data + off + 8 + lens[0])};
        rc = api->cursor_put(cur, &k, &v, MDB_APPEND);
        if (rc)
            break;
    }
    api->cursor_close(cur);
    *at = i;
    return rc;
}

static PyObject *append_packed(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    MDB_dbi dbi;
    TransObject *t = target(args, nargs, 4, "append_packed(txn, db, data, order)", &dbi);
    if (t == NULL)
        return NULL;
    Py_buffer data, order;
    if (PyObject_GetBuffer(args[2], &data, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &order, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    if (order.len % (Py_ssize_t)sizeof(int64_t) || ((uintptr_t)order.buf % _Alignof(int64_t))) {
        PyErr_SetString(PyExc_ValueError,
                        "append_packed: order is aligned native int64 offsets");
        goto done;
    }
    Py_ssize_t n = order.len / (Py_ssize_t)sizeof(int64_t), at;
    int rc;
    t->mutations += (int)n; /* py-lmdb's cursors re-read their position after a change */
    if (n >= RELEASE_FROM) {
        Py_BEGIN_ALLOW_THREADS
        rc = write_packed(t->libv, t->txn, dbi, data.buf, data.len, order.buf, n, &at);
        Py_END_ALLOW_THREADS
    } else {
        rc = write_packed(t->libv, t->txn, dbi, data.buf, data.len, order.buf, n, &at);
    }
    if (rc == BAD_RECORD)
        PyErr_Format(PyExc_ValueError, "append_packed: row %zd is not inside data", at);
    else if (rc)
        fail("mdb_put", rc);
    else
        result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&order);
    PyBuffer_Release(&data);
    return result;
}

static PyObject *get(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    MDB_dbi dbi;
    MDB_val k, v;
    TransObject *t = target(args, nargs, 3, "get(txn, db, key)", &dbi);
    if (t == NULL || as_val(args[2], &k) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS /* a read may fault in a page from disk: not with the GIL held */
    rc = t->libv->get(t->txn, dbi, &k, &v);
    Py_END_ALLOW_THREADS
    if (rc == MDB_NOTFOUND)
        Py_RETURN_NONE;
    if (rc)
        return fail("mdb_get", rc);
    return PyBytes_FromStringAndSize(v.mv_data, (Py_ssize_t)v.mv_size);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(raise_error, Transaction, _Database): the error callback and py-lmdb's types."},
    {"check", check, METH_VARARGS,
     "check(env, txn, db, txn_id, version): whether these objects have the known layout."},
    {"put_rows", (PyCFunction)(void (*)(void))put_rows, METH_FASTCALL,
     "put_rows(txn, db, keys, changes): put or delete (None) each key's change, in order."},
    {"append_rows", (PyCFunction)(void (*)(void))append_rows, METH_FASTCALL,
     "append_rows(txn, db, rows): put (key, value) rows with MDB_APPEND."},
    {"append_packed", (PyCFunction)(void (*)(void))append_packed, METH_FASTCALL,
     "append_packed(txn, db, data, order): put packed rows (SortedRows.packed()) with "
     "MDB_APPEND."},
    {"get", (PyCFunction)(void (*)(void))get, METH_FASTCALL,
     "get(txn, db, key): the stored value as bytes, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "storage._rowio",
    "A write transaction's rows through py-lmdb's LMDB, the puts keeping the GIL "
    "(storage/rowio.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__rowio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "VERSION", ROWIO_VERSION) < 0)
        Py_CLEAR(m);
    return m;
}
