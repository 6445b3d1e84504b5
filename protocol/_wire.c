/* protocol._wire: the two frames the broker sends for every message, checked and encoded in C.
 *
 * `deliver(frame, max_body)` and `result(frame, max_body)` take a `Deliver` or `Result` frame
 * (the NamedTuples of protocol/frames.py) and return the bytes `Connection.send` makes for it
 * (4-byte length prefix, then the msgpack map, keys in the same order, ints in their smallest
 * form, strings as str, bytes as bin), or None. None means "not the plain case": a field that is
 * not of its exact type, an id not yet in the set of ids known to match their pattern, a body
 * over the limit, ... Then the caller goes the Python way, which accepts or raises as it always
 * did. So this only ever accepts what the Python checks accept; tests/protocol/test_wire.py
 * compares the two on random and odd frames.
 *
 * Direction, state and max_frame belong to the connection (`Connection.send` checks them).
 *
 * `count_values(body, limit)` counts the values of a msgpack body as protocol.codec's
 * `count_values` does (its reference): every map key, map value and array item, nested ones
 * included, each container counted at its header, stopping as soon as the count passes `limit`.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define WIRE_VERSION 3

static PyObject *known_users, *known_convs; /* protocol.fields' sets of ids that matched */
static Py_ssize_t max_cid_chars;

/* -- a growing output buffer ------------------------------------------------------------------ */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
    char small[512];
} out;

static int grow(out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap)
        return 0;
    Py_ssize_t cap = (o->len + more) * 2;
    char *p = PyMem_Malloc(cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(p, o->p, o->len);
    if (o->p != o->small)
        PyMem_Free(o->p);
    o->p = p;
    o->cap = cap;
    return 0;
}

static void put_be(out *o, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; i--)
        o->p[o->len++] = (char)(v >> (8 * i));
}

static int put_raw(out *o, const char *data, Py_ssize_t len) {
    if (grow(o, len) < 0)
        return -1;
    memcpy(o->p + o->len, data, len);
    o->len += len;
    return 0;
}

/* A uint as msgpack-python packs a non-negative int: fixint, uint 8/16/32/64. */
static int put_uint(out *o, uint64_t v) {
    if (grow(o, 9) < 0)
        return -1;
    if (v < 0x80) {
        o->p[o->len++] = (char)v;
    } else if (v <= 0xff) {
        o->p[o->len++] = (char)0xcc;
        put_be(o, v, 1);
    } else if (v <= 0xffff) {
        o->p[o->len++] = (char)0xcd;
        put_be(o, v, 2);
    } else if (v <= 0xffffffffULL) {
        o->p[o->len++] = (char)0xce;
        put_be(o, v, 4);
    } else {
        o->p[o->len++] = (char)0xcf;
        put_be(o, v, 8);
    }
    return 0;
}

static int put_str(out *o, const char *data, Py_ssize_t len) {
    if (grow(o, 5) < 0)
        return -1;
    if (len < 32) {
        o->p[o->len++] = (char)(0xa0 | len);
    } else if (len <= 0xff) {
        o->p[o->len++] = (char)0xd9;
        put_be(o, (uint64_t)len, 1);
    } else if (len <= 0xffff) {
        o->p[o->len++] = (char)0xda;
        put_be(o, (uint64_t)len, 2);
    } else {
        o->p[o->len++] = (char)0xdb;
        put_be(o, (uint64_t)len, 4);
    }
    return put_raw(o, data, len);
}

static int put_bin(out *o, const char *data, Py_ssize_t len) {
    if (grow(o, 5) < 0)
        return -1;
    if (len <= 0xff) {
        o->p[o->len++] = (char)0xc4;
        put_be(o, (uint64_t)len, 1);
    } else if (len <= 0xffff) {
        o->p[o->len++] = (char)0xc5;
        put_be(o, (uint64_t)len, 2);
    } else {
        o->p[o->len++] = (char)0xc6;
        put_be(o, (uint64_t)len, 4);
    }
    return put_raw(o, data, len);
}

static int put_key(out *o, const char *key) { return put_str(o, key, (Py_ssize_t)strlen(key)); }

static int put_byte(out *o, unsigned char b) {
    if (grow(o, 1) < 0)
        return -1;
    o->p[o->len++] = (char)b;
    return 0;
}

/* -- field checks: 1 plain and written, 0 not plain (go the Python way), -1 error ------------- */

/* A uint (an exact int, 0 .. 2**63 - 1; bool is not an int here). */
static int uint_field(out *o, PyObject *v) {
    if (!PyLong_CheckExact(v))
        return 0;
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (overflow || n < 0)
        return 0;
    return put_uint(o, (uint64_t)n) < 0 ? -1 : 1;
}

static int bool_field(out *o, PyObject *v) {
    if (v != Py_True && v != Py_False)
        return 0;
    return put_byte(o, v == Py_True ? 0xc3 : 0xc2) < 0 ? -1 : 1;
}

/* An exact str (its UTF-8 written), or 0. `utf8` fails only on lone surrogates: not plain. */
static int text(out *o, PyObject *v) {
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(v, &len);
    if (!utf8) {
        PyErr_Clear();
        return 0;
    }
    return put_str(o, utf8, len) < 0 ? -1 : 1;
}

/* An id already known to match its pattern (protocol.fields remembers those). */
static int known_id(out *o, PyObject *v, PyObject *known) {
    if (!PyUnicode_CheckExact(v))
        return 0;
    int found = PySet_Contains(known, v);
    if (found <= 0)
        return found; /* -1: error; 0: not (yet) known, the Python check decides */
    return text(o, v);
}

/* A client message id: 1..128 characters, no NUL. */
static int cid_field(out *o, PyObject *v) {
    if (!PyUnicode_CheckExact(v))
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(v);
    if (n < 1 || n > max_cid_chars)
        return 0;
    Py_ssize_t nul = PyUnicode_FindChar(v, 0, 0, n, 1);
    if (nul == -2)
        return -1;
    if (nul != -1)
        return 0;
    return text(o, v);
}

/* A body: text of at most max_body UTF-8 bytes, or bytes of at most max_body. */
static int body_field(out *o, PyObject *v, Py_ssize_t max_body) {
    if (PyBytes_CheckExact(v)) {
        if (PyBytes_GET_SIZE(v) > max_body)
            return 0;
        return put_bin(o, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v)) < 0 ? -1 : 1;
    }
    if (!PyUnicode_CheckExact(v))
        return 0;
    Py_ssize_t len;
    const char *utf8 = PyUnicode_AsUTF8AndSize(v, &len);
    if (!utf8) {
        PyErr_Clear();
        return 0;
    }
    if (len > max_body)
        return 0;
    return put_str(o, utf8, len) < 0 ? -1 : 1;
}

static int nil_or(out *o, PyObject *v, int (*field)(out *, PyObject *)) {
    if (v == Py_None)
        return put_byte(o, 0xc0) < 0 ? -1 : 1;
    return field(o, v);
}

/* -- the two frames ---------------------------------------------------------------------------- */

/* The frame's fields, or NULL (and not plain) unless it is a tuple of exactly `n`. */
static PyObject **fields_of(PyObject *frame, Py_ssize_t n) {
    if (!PyTuple_Check(frame) || PyTuple_GET_SIZE(frame) != n)
        return NULL;
    return &PyTuple_GET_ITEM(frame, 0);
}

static PyObject *finish(out *o, int ok) {
    PyObject *r = NULL;
    if (ok > 0) {
        uint32_t n = (uint32_t)(o->len - 4);
        o->p[0] = (char)(n >> 24);
        o->p[1] = (char)(n >> 16);
        o->p[2] = (char)(n >> 8);
        o->p[3] = (char)n;
        r = PyBytes_FromStringAndSize(o->p, o->len);
    } else if (ok == 0) {
        r = Py_NewRef(Py_None);
    }
    if (o->p != o->small)
        PyMem_Free(o->p);
    return r;
}

#define STEP(expr)                                                                                 \
    do {                                                                                           \
        ok = (expr);                                                                               \
        if (ok <= 0)                                                                               \
            return finish(&o, ok);                                                                 \
    } while (0)

static int kind_field(out *o, PyObject *v) {
    if (!PyUnicode_CheckExact(v))
        return 0;
    if (PyUnicode_CompareWithASCIIString(v, "msg") != 0 &&
        PyUnicode_CompareWithASCIIString(v, "added") != 0 &&
        PyUnicode_CompareWithASCIIString(v, "removed") != 0)
        return 0;
    return text(o, v);
}

static int user_field(out *o, PyObject *v) { return known_id(o, v, known_users); }
static int conv_field(out *o, PyObject *v) { return known_id(o, v, known_convs); }

/* The (frame, max_body) of `deliver` and `result`, called the fast way (METH_FASTCALL: no
 * argument tuple made for each of the two frames every message costs); -1 with TypeError as
 * PyArg_ParseTuple's "On" would raise it. */
static int frame_args(PyObject *const *args, Py_ssize_t nargs, const char *name,
                      PyObject **frame, Py_ssize_t *max_body) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    *frame = args[0];
    *max_body = PyNumber_AsSsize_t(args[1], PyExc_OverflowError);
    return *max_body == -1 && PyErr_Occurred() ? -1 : 0;
}

/* deliver(frame, max_body): inbox_seq, kind, conv, seq, from, body, cid, ts[, muted]. */
static PyObject *deliver(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *frame;
    Py_ssize_t max_body;
    if (frame_args(args, nargs, "deliver", &frame, &max_body) < 0)
        return NULL;
    PyObject **f = fields_of(frame, 9);
    if (!f)
        Py_RETURN_NONE;
    PyObject *muted = f[8];
    int with_muted;
    if (muted == Py_None || muted == Py_False)
        with_muted = 0; /* left out, as the default */
    else if (muted == Py_True)
        with_muted = 1;
    else
        Py_RETURN_NONE;
    out o = {.p = NULL, .len = 0, .cap = sizeof(o.small)};
    o.p = o.small;
    o.len = 4; /* the length prefix, filled in by finish */
    int ok;
    STEP(put_byte(&o, 0x80 | (with_muted ? 10 : 9)) < 0 ? -1 : 1);
    STEP(put_key(&o, "t") < 0 || put_key(&o, "deliver") < 0 ? -1 : 1);
    STEP(put_key(&o, "inbox_seq") < 0 ? -1 : uint_field(&o, f[0]));
    STEP(put_key(&o, "kind") < 0 ? -1 : kind_field(&o, f[1]));
    STEP(put_key(&o, "conv") < 0 ? -1 : conv_field(&o, f[2]));
    STEP(put_key(&o, "seq") < 0 ? -1 : uint_field(&o, f[3]));
    STEP(put_key(&o, "from") < 0 ? -1 : user_field(&o, f[4]));
    if (f[5] == Py_None)
        STEP(put_key(&o, "body") < 0 || put_byte(&o, 0xc0) < 0 ? -1 : 1);
    else
        STEP(put_key(&o, "body") < 0 ? -1 : body_field(&o, f[5], max_body));
    STEP(put_key(&o, "cid") < 0 ? -1 : nil_or(&o, f[6], cid_field));
    STEP(put_key(&o, "ts") < 0 ? -1 : uint_field(&o, f[7]));
    if (with_muted)
        STEP(put_key(&o, "muted") < 0 || put_byte(&o, 0xc3) < 0 ? -1 : 1);
    return finish(&o, 1);
}

/* result(frame, max_body): id, conv, seq, lsn, cid, dup (all required). */
static PyObject *result(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *frame;
    Py_ssize_t max_body;
    if (frame_args(args, nargs, "result", &frame, &max_body) < 0)
        return NULL;
    PyObject **f = fields_of(frame, 6);
    if (!f)
        Py_RETURN_NONE;
    out o = {.p = NULL, .len = 0, .cap = sizeof(o.small)};
    o.p = o.small;
    o.len = 4;
    int ok;
    STEP(put_byte(&o, 0x80 | 7) < 0 ? -1 : 1);
    STEP(put_key(&o, "t") < 0 || put_key(&o, "result") < 0 ? -1 : 1);
    STEP(put_key(&o, "id") < 0 ? -1 : uint_field(&o, f[0]));
    STEP(put_key(&o, "conv") < 0 ? -1 : conv_field(&o, f[1]));
    STEP(put_key(&o, "seq") < 0 ? -1 : uint_field(&o, f[2]));
    STEP(put_key(&o, "lsn") < 0 ? -1 : uint_field(&o, f[3]));
    STEP(put_key(&o, "cid") < 0 ? -1 : cid_field(&o, f[4]));
    STEP(put_key(&o, "dup") < 0 ? -1 : bool_field(&o, f[5]));
    return finish(&o, 1);
}

/* configure(known_users, known_convs, max_cid_chars): the sets and limit of protocol.fields. */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *users, *convs;
    Py_ssize_t cid_chars;
    if (!PyArg_ParseTuple(args, "O!O!n:configure", &PySet_Type, &users, &PySet_Type, &convs,
                          &cid_chars))
        return NULL;
    Py_XSETREF(known_users, Py_NewRef(users));
    Py_XSETREF(known_convs, Py_NewRef(convs));
    max_cid_chars = cid_chars;
    Py_RETURN_NONE;
}

/* -- counting a body's values ------------------------------------------------------------------ */

static inline uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* The values of the msgpack objects in buf[0:n] that a decode of its first object reads, counted
 * at each container's header: stops once past `limit` (returning the count so far, > limit), or
 * at the end of the input or a byte no object starts with (returning the count so far: the
 * decoder, which runs next, reports the malformed body). */
static uint64_t count(const unsigned char *buf, uint64_t n, uint64_t limit) {
    uint64_t p = 0, remaining = 1, counted = 0;
    while (remaining && p < n) {
        unsigned b = buf[p];
        uint64_t items = 0, skip = 0; /* a container's items; a scalar's bytes after its type */
        int header = 0;               /* bytes of a length after the type byte */
        remaining--;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            p += 1;
            continue;
        }
        if (b >= 0x80 && b <= 0x8f) {
            items = 2 * (uint64_t)(b & 0x0f);
        } else if (b >= 0x90 && b <= 0x9f) {
            items = b & 0x0f;
        } else if (b >= 0xa0 && b <= 0xbf) {
            skip = b & 0x1f;
        } else {
            switch (b) {
            case 0xc4: case 0xd9: header = 1; break;                  /* bin8, str8 */
            case 0xc5: case 0xda: header = 2; break;                  /* bin16, str16 */
            case 0xc6: case 0xdb: header = 4; break;                  /* bin32, str32 */
            case 0xc7: header = 1; skip = 1; break;                   /* ext8: + its type */
            case 0xc8: header = 2; skip = 1; break;
            case 0xc9: header = 4; skip = 1; break;
            case 0xca: skip = 4; break;                               /* float32 */
            case 0xcb: skip = 8; break;
            case 0xcc: case 0xd0: skip = 1; break;                    /* (u)int8 */
            case 0xcd: case 0xd1: skip = 2; break;
            case 0xce: case 0xd2: skip = 4; break;
            case 0xcf: case 0xd3: skip = 8; break;
            case 0xd4: skip = 2; break;                               /* fixext1: type + 1 */
            case 0xd5: skip = 3; break;
            case 0xd6: skip = 5; break;
            case 0xd7: skip = 9; break;
            case 0xd8: skip = 17; break;
            case 0xdc: case 0xdd: case 0xde: case 0xdf: {             /* array16/32, map16/32 */
                int w = (b == 0xdc || b == 0xde) ? 2 : 4;
                if (n - p - 1 < (uint64_t)w)
                    return counted;
                items = be(buf + p + 1, w) * (b >= 0xde ? 2 : 1);
                p += (uint64_t)w;
                break;
            }
            default: /* 0xc1: never used */
                return counted;
            }
        }
        if (header) {
            if (n - p - 1 < (uint64_t)header)
                return counted;
            skip += be(buf + p + 1, header);
            p += (uint64_t)header;
        }
        if (items) {
            counted += items;
            if (counted > limit)
                return counted;
            remaining += items;
        }
        if (skip > n - p - 1)
            return counted;
        p += 1 + skip;
    }
    return counted;
}

static PyObject *count_values(PyObject *self, PyObject *args) {
    Py_buffer body;
    unsigned long long limit;
    if (!PyArg_ParseTuple(args, "y*K", &body, &limit))
        return NULL;
    uint64_t got = count((const unsigned char *)body.buf, (uint64_t)body.len, limit);
    PyBuffer_Release(&body);
    return PyLong_FromUnsignedLongLong(got);
}

static PyObject *not_configured(void) {
    PyErr_SetString(PyExc_RuntimeError, "protocol._wire: call configure() first");
    return NULL;
}

static PyObject *checked_deliver(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return known_users ? deliver(self, args, nargs) : not_configured();
}

static PyObject *checked_result(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return known_users ? result(self, args, nargs) : not_configured();
}

static PyMethodDef methods[] = {
    {"deliver", (PyCFunction)(void (*)(void))checked_deliver, METH_FASTCALL,
     "deliver(frame, max_body) -> the bytes of a plain Deliver frame, or None"},
    {"result", (PyCFunction)(void (*)(void))checked_result, METH_FASTCALL,
     "result(frame, max_body) -> the bytes of a plain Result frame, or None"},
    {"count_values", count_values, METH_VARARGS,
     "count_values(body, limit) -> the body's values, counted until past limit"},
    {"configure", configure, METH_VARARGS,
     "configure(known_users, known_convs, max_cid_chars): protocol.fields' sets and limit"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "protocol._wire",
                                    "Deliver and Result frames checked and encoded in C.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__wire(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "VERSION", WIRE_VERSION) < 0)
        Py_CLEAR(m);
    return m;
}
