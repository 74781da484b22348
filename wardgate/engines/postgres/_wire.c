/* The loops of the relay that run once per protocol message or statement: framing a read, masking
 * DataRows, and the key statements are cached under. Everything else stays in Python; framing.py,
 * masking/plan.py and sql/classify.py hold the reference implementations, and the tests check that
 * the two agree on random and hostile input.
 *
 * Every length read from the wire is checked against the bytes actually present before it is used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

static inline int16_t be16(const unsigned char *p) { return (int16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]); }

static inline void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

#define ROWS_FLAG 0x100

enum { SCAN_DONE = 0, SCAN_HOLD = 1, SCAN_SKIP = 2, SCAN_BAD = 3 };

static int append_msg(PyObject *msgs, long mtype, PyObject *body, Py_ssize_t offset)
{
    PyObject *t = Py_BuildValue("(lOn)", mtype, body, offset);
    if (t == NULL)
        return -1;
    int rc = PyList_Append(msgs, t);
    Py_DECREF(t);
    return rc;
}

static int append_run(PyObject *msgs, int rows, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *e = PyLong_FromSsize_t(end);
    if (e == NULL)
        return -1;
    int rc = append_msg(msgs, (long)(rows | ROWS_FLAG), e, start);
    Py_DECREF(e);
    return rc;
}

/* scan(data, pos, limits, inspect, rows) -> (pos, state, extra, msgs)
 *
 * limits: 256 native uint32 (largest valid length per type; 0: type not allowed).
 * inspect: 256 bytes, non-zero for types returned whole as (type, body, offset).
 * rows: a type (or 0) whose consecutive complete messages are returned as one run,
 *       (type | 0x100, end, start), instead of one entry each.
 * state: SCAN_DONE (all consumed), SCAN_HOLD (data[pos:] is an incomplete inspected message or
 *        header), SCAN_SKIP (a streamed message goes on for `extra` more bytes), SCAN_BAD (the
 *        message at pos has an invalid length `extra` for its type).
 */
static PyObject *scan(PyObject *self, PyObject *args)
{
    Py_buffer data, limits, inspect;
    Py_ssize_t pos;
    int rows;
    if (!PyArg_ParseTuple(args, "y*ny*y*i", &data, &pos, &limits, &inspect, &rows))
        return NULL;
    PyObject *result = NULL, *msgs = NULL;
    if (limits.len != 256 * (Py_ssize_t)sizeof(uint32_t) || inspect.len != 256 || pos < 0 || pos > data.len) {
        PyErr_SetString(PyExc_ValueError, "scan: bad arguments");
        goto done;
    }
    msgs = PyList_New(0);
    if (msgs == NULL)
        goto done;
    const unsigned char *buf = (const unsigned char *)data.buf;
    const unsigned char *insp = (const unsigned char *)inspect.buf;
    const unsigned char *lim = (const unsigned char *)limits.buf;
    Py_ssize_t n = data.len;
    Py_ssize_t run_start = -1, run_end = -1;
    int state = SCAN_DONE;
    long long extra = 0;
    while (pos < n) {
        if (n - pos < 5) {
            state = SCAN_HOLD;
            break;
        }
        unsigned int mtype = buf[pos];
        uint32_t length = be32(buf + pos + 1);
        uint32_t cap;
        memcpy(&cap, lim + 4 * mtype, sizeof cap);
        if (length < 4 || length > cap) {
            state = SCAN_BAD;
            extra = length;
            break;
        }
        Py_ssize_t end = pos + 1 + (Py_ssize_t)length;
        if (insp[mtype]) {
            if (end > n) {
                state = SCAN_HOLD;
                break;
            }
            if ((int)mtype == rows) {
                if (run_start >= 0 && run_end == pos) {
                    run_end = end;
                } else {
                    if (run_start >= 0 && append_run(msgs, rows, run_start, run_end) < 0)
                        goto done;
                    run_start = pos;
                    run_end = end;
                }
            } else {
                if (run_start >= 0) {
                    if (append_run(msgs, rows, run_start, run_end) < 0)
                        goto done;
                    run_start = -1;
                }
                PyObject *body = PyBytes_FromStringAndSize((const char *)buf + pos + 5, (Py_ssize_t)length - 4);
                if (body == NULL)
                    goto done;
                int rc = append_msg(msgs, (long)mtype, body, pos);
                Py_DECREF(body);
                if (rc < 0)
                    goto done;
            }
        } else if (end > n) {
            state = SCAN_SKIP;
            extra = end - n;
            pos = n;
            break;
        }
        pos = end;
    }
    if (run_start >= 0 && append_run(msgs, rows, run_start, run_end) < 0)
        goto done;
    result = Py_BuildValue("(niLO)", pos, state, extra, msgs);
done:
    Py_XDECREF(msgs);
    PyBuffer_Release(&data);
    PyBuffer_Release(&limits);
    PyBuffer_Release(&inspect);
    return result;
}

/* -- masking DataRows */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} outbuf;

static int out_reserve(outbuf *o, Py_ssize_t more)
{
    if (more > PY_SSIZE_T_MAX - o->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t need = o->len + more;
    if (need <= o->cap)
        return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < need)
        cap = cap > PY_SSIZE_T_MAX / 2 ? need : cap * 2;
    char *p = PyMem_Realloc(o->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->p = p;
    o->cap = cap;
    return 0;
}

static int out_put(outbuf *o, const void *src, Py_ssize_t n)
{
    if (out_reserve(o, n) < 0)
        return -1;
    memcpy(o->p + o->len, src, (size_t)n);
    o->len += n;
    return 0;
}

/* Could any detector of this column match the value? A conservative test: when it says no, none can. */
static int worth_a_look(const unsigned char *v, Py_ssize_t n, int at, int min_digits, int ip)
{
    int digits = 0, dots = 0, colons = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = v[i];
        if (c >= '0' && c <= '9')
            digits++;
        else if (c == '@') {
            if (at)
                return 1;
        } else if (c == '.')
            dots++;
        else if (c == ':')
            colons++;
    }
    if (min_digits > 0 && digits >= min_digits)
        return 1;
    if (ip && (dots >= 3 || colons >= 2))
        return 1;
    return 0;
}

typedef struct {
    Py_ssize_t from, to; /* the length-prefixed value replaced, as offsets into the input */
    PyObject *with;      /* the length-prefixed replacement */
    int owned;
} edit;

static int valid_value(PyObject *v)
{
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) < 4)
        return 0;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(v);
    int32_t len = (int32_t)be32(p);
    return (len == -1 && PyBytes_GET_SIZE(v) == 4) || (len >= 0 && (Py_ssize_t)len == PyBytes_GET_SIZE(v) - 4);
}

/* mask_rows(data, start, end, actions, counts) -> bytes | None
 *
 * data[start:end] is a run of whole DataRow messages. actions[i] says what becomes of column i:
 * None (kept), bytes (the length-prefixed replacement for every non-NULL value), or a tuple
 * (callable, at, min_digits, ip, always): the callable gets the value's bytes and returns None
 * (kept) or the length-prefixed replacement; it is called only when `always` is set or the cheap
 * test on (at, min_digits, ip) says a detector could match. counts[i] grows by the number of
 * values replaced by a bytes action. Returns the rewritten run, or None when nothing changed.
 */
static PyObject *mask_rows(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t start, end;
    PyObject *actions, *counts;
    if (!PyArg_ParseTuple(args, "y*nnO!O!", &data, &start, &end, &PyTuple_Type, &actions, &PyList_Type, &counts))
        return NULL;
    PyObject *result = NULL;
    outbuf out = {NULL, 0, 0};
    Py_ssize_t nactions = PyTuple_GET_SIZE(actions);
    edit *edits = NULL;
    Py_ssize_t nedits = 0;
    Py_ssize_t *hits = NULL;
    int changed = 0;
    if (start < 0 || end > data.len || start > end || PyList_GET_SIZE(counts) < nactions) {
        PyErr_SetString(PyExc_ValueError, "mask_rows: bad arguments");
        goto done;
    }
    edits = PyMem_Calloc((size_t)(nactions ? nactions : 1), sizeof(edit));
    hits = PyMem_Calloc((size_t)(nactions ? nactions : 1), sizeof(Py_ssize_t));
    if (edits == NULL || hits == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *buf = (const unsigned char *)data.buf;
    Py_ssize_t pos = start;
    while (pos < end) {
        if (end - pos < 7 || buf[pos] != 'D') {
            PyErr_SetString(PyExc_ValueError, "malformed DataRow");
            goto done;
        }
        uint32_t length = be32(buf + pos + 1);
        if (length < 6 || (Py_ssize_t)length > end - pos - 1) {
            PyErr_SetString(PyExc_ValueError, "malformed DataRow");
            goto done;
        }
        Py_ssize_t row_end = pos + 1 + (Py_ssize_t)length;
        int ncols = be16(buf + pos + 5);
        if (ncols < 0) {
            PyErr_SetString(PyExc_ValueError, "malformed DataRow");
            goto done;
        }
        Py_ssize_t q = pos + 7;
        Py_ssize_t delta = 0;
        nedits = 0;
        for (int i = 0; i < ncols; i++) {
            if (row_end - q < 4) {
                PyErr_SetString(PyExc_ValueError, "malformed DataRow");
                goto done;
            }
            int32_t vlen = (int32_t)be32(buf + q);
            if (vlen < -1 || (vlen > 0 && (Py_ssize_t)vlen > row_end - q - 4)) {
                PyErr_SetString(PyExc_ValueError, "malformed DataRow");
                goto done;
            }
            Py_ssize_t vend = q + 4 + (vlen > 0 ? vlen : 0);
            PyObject *action = i < nactions ? PyTuple_GET_ITEM(actions, i) : Py_None;
            if (action != Py_None && vlen >= 0) {
                PyObject *with = NULL;
                int owned = 0;
                if (PyBytes_Check(action)) {
                    with = action;
                    hits[i]++;
                } else if (PyTuple_Check(action) && PyTuple_GET_SIZE(action) == 5) {
                    int at = PyObject_IsTrue(PyTuple_GET_ITEM(action, 1));
                    long min_digits = PyLong_AsLong(PyTuple_GET_ITEM(action, 2));
                    int ip = PyObject_IsTrue(PyTuple_GET_ITEM(action, 3));
                    int always = PyObject_IsTrue(PyTuple_GET_ITEM(action, 4));
                    if (at < 0 || ip < 0 || always < 0 || (min_digits == -1 && PyErr_Occurred()))
                        goto done;
                    if (always || worth_a_look(buf + q + 4, vend - q - 4, at, (int)min_digits, ip)) {
                        PyObject *raw = PyBytes_FromStringAndSize((const char *)buf + q + 4, vend - q - 4);
                        if (raw == NULL)
                            goto done;
                        PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(action, 0), raw);
                        Py_DECREF(raw);
                        if (r == NULL)
                            goto done;
                        if (r == Py_None) {
                            Py_DECREF(r);
                        } else if (!valid_value(r)) {
                            Py_DECREF(r);
                            PyErr_SetString(PyExc_ValueError, "a masking replacement is not a length-prefixed value");
                            goto done;
                        } else {
                            with = r;
                            owned = 1;
                        }
                    }
                } else {
                    PyErr_SetString(PyExc_TypeError, "mask_rows: an action is None, bytes or a 5-tuple");
                    goto done;
                }
                if (with != NULL) {
                    if (!valid_value(with)) {
                        PyErr_SetString(PyExc_ValueError, "a masking replacement is not a length-prefixed value");
                        goto done;
                    }
                    edits[nedits].from = q;
                    edits[nedits].to = vend;
                    edits[nedits].with = with;
                    edits[nedits].owned = owned;
                    nedits++;
                    delta += PyBytes_GET_SIZE(with) - (vend - q);
                }
            }
            q = vend;
        }
        if (q != row_end) {
            PyErr_SetString(PyExc_ValueError, "malformed DataRow");
            goto done;
        }
        if (nedits > 0 && !changed) {
            changed = 1;
            if (out_put(&out, buf + start, pos - start) < 0)
                goto done;
        }
        if (nedits > 0) {
            Py_ssize_t new_length = (Py_ssize_t)length + delta;
            if (new_length > 0x7fffffff) {
                PyErr_SetString(PyExc_ValueError, "masked row too large");
                goto done;
            }
            unsigned char head[5];
            head[0] = 'D';
            put_be32(head + 1, (uint32_t)new_length);
            if (out_put(&out, head, 5) < 0)
                goto done;
            Py_ssize_t last = pos + 5;
            for (Py_ssize_t k = 0; k < nedits; k++) {
                if (out_put(&out, buf + last, edits[k].from - last) < 0 ||
                    out_put(&out, PyBytes_AS_STRING(edits[k].with), PyBytes_GET_SIZE(edits[k].with)) < 0)
                    goto done;
                last = edits[k].to;
                if (edits[k].owned) {
                    Py_DECREF(edits[k].with);
                    edits[k].owned = 0;
                }
                edits[k].with = NULL;
            }
            nedits = 0;
            if (out_put(&out, buf + last, row_end - last) < 0)
                goto done;
        } else if (changed) {
            if (out_put(&out, buf + pos, row_end - pos) < 0)
                goto done;
        }
        pos = row_end;
    }
    for (Py_ssize_t i = 0; i < nactions; i++) {
        if (hits[i] == 0)
            continue;
        PyObject *old = PyList_GET_ITEM(counts, i);
        PyObject *add = PyLong_FromSsize_t(hits[i]);
        if (add == NULL)
            goto done;
        PyObject *sum = PyNumber_Add(old, add);
        Py_DECREF(add);
        if (sum == NULL)
            goto done;
        PyList_SetItem(counts, i, sum); /* steals sum, releases old */
    }
    if (changed) {
        result = PyBytes_FromStringAndSize(out.p, out.len);
    } else {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    if (edits != NULL) {
        for (Py_ssize_t k = 0; k < nedits; k++)
            if (edits[k].owned)
                Py_DECREF(edits[k].with);
        PyMem_Free(edits);
    }
    PyMem_Free(hits);
    PyMem_Free(out.p);
    PyBuffer_Release(&data);
    return result;
}

/* blank(n) -> a bytes object of n bytes, not yet written: a long message is copied into it read by read
 * (fill) as it arrives, so that no one read's callback copies all of it (framing.py). Only the framer
 * holds it until it is whole, and nobody hashes it before. */
static PyObject *blank(PyObject *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    return PyBytes_FromStringAndSize(NULL, n);
}

/* fill(dst, at, src): copy the buffer src into the bytes object dst (from blank) at offset at. */
static PyObject *fill(PyObject *self, PyObject *args)
{
    PyObject *dst;
    Py_ssize_t at;
    Py_buffer src;
    if (!PyArg_ParseTuple(args, "O!ny*", &PyBytes_Type, &dst, &at, &src))
        return NULL;
    if (at < 0 || src.len > PyBytes_GET_SIZE(dst) - at) {
        PyBuffer_Release(&src);
        PyErr_SetString(PyExc_ValueError, "fill past the end");
        return NULL;
    }
    memcpy(PyBytes_AS_STRING(dst) + at, src.buf, (size_t)src.len);
    PyBuffer_Release(&src);
    Py_RETURN_NONE;
}

/* blank_text(n, maxchar) -> a str of n characters, not yet written, in the form CPython gives a str whose
 * largest character is maxchar (the largest of its parts' forms: each part is in its own, so the whole is
 * in the one CPython would give it). A long statement's text is copied into it a slice at a time
 * (fill_text), between which other sessions run, where "".join would copy it all in one callback. */
static PyObject *blank_text(PyObject *self, PyObject *args)
{
    Py_ssize_t n;
    unsigned int maxchar;
    if (!PyArg_ParseTuple(args, "nI", &n, &maxchar))
        return NULL;
    if (n < 0 || maxchar > 0x10ffff) {
        PyErr_SetString(PyExc_ValueError, "invalid size or character");
        return NULL;
    }
    return PyUnicode_New(n, (Py_UCS4)maxchar);
}

/* fill_text(dst, at, src): copy src into dst (from blank_text) from character at. src is a str whose form
 * is no wider than dst's, or a bytes-like object of ASCII (checked) when dst holds one byte a character. */
static PyObject *fill_text(PyObject *self, PyObject *args)
{
    PyObject *dst, *src;
    Py_ssize_t at;
    if (!PyArg_ParseTuple(args, "UnO", &dst, &at, &src))
        return NULL;
    int dkind = PyUnicode_KIND(dst);
    void *ddata = PyUnicode_DATA(dst);
    Py_ssize_t room = PyUnicode_GET_LENGTH(dst) - at;
    if (PyUnicode_Check(src)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(src);
        int skind = PyUnicode_KIND(src);
        if (at < 0 || n > room || skind > dkind || (PyUnicode_IS_ASCII(dst) && !PyUnicode_IS_ASCII(src))) {
            PyErr_SetString(PyExc_ValueError, "fill past the end, or with wider characters");
            return NULL;
        }
        const void *sdata = PyUnicode_DATA(src);
        if (skind == dkind) {
            memcpy((char *)ddata + at * dkind, sdata, (size_t)(n * dkind));
        } else {
            for (Py_ssize_t i = 0; i < n; i++)
                PyUnicode_WRITE(dkind, ddata, at + i, PyUnicode_READ(skind, sdata, i));
        }
        Py_RETURN_NONE;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(src, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = b.buf;
    int ok = dkind == PyUnicode_1BYTE_KIND && at >= 0 && b.len <= room;
    for (Py_ssize_t i = 0; ok && i < b.len; i++)
        ok = p[i] < 0x80;
    if (!ok) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "fill past the end, or with bytes that are not ASCII");
        return NULL;
    }
    memcpy((char *)ddata + at, p, (size_t)b.len);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

/* text_form(s) -> the largest character of the form s is stored in: 127 (ASCII), 255, 0xffff or 0x10ffff. */
static PyObject *text_form(PyObject *self, PyObject *s)
{
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "a str is needed");
        return NULL;
    }
    if (PyUnicode_IS_ASCII(s))
        return PyLong_FromLong(127);
    switch (PyUnicode_KIND(s)) {
    case PyUnicode_1BYTE_KIND: return PyLong_FromLong(0xff);
    case PyUnicode_2BYTE_KIND: return PyLong_FromLong(0xffff);
    default: return PyLong_FromLong(0x10ffff);
    }
}

static PyMethodDef methods[] = {
    {"text_form", text_form, METH_O, "The largest character of a str's form. See slices.py."},
    {"blank_text", blank_text, METH_VARARGS, "A str of n characters to fill. See slices.py."},
    {"fill_text", fill_text, METH_VARARGS, "Copy a str, or ASCII bytes, into a blank str. See slices.py."},
    {"scan", scan, METH_VARARGS, "Frame a read: (pos, state, extra, msgs). See framing.py."},
    {"blank", blank, METH_O, "A bytes object of n bytes to fill. See framing.py."},
    {"fill", fill, METH_VARARGS, "Copy a buffer into a blank bytes object at an offset. See framing.py."},
    {"mask_rows", mask_rows, METH_VARARGS, "Mask a run of DataRows. See masking/plan.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wire", "Hot loops of the PostgreSQL relay.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&module); }
