/*
 * _wirescan: one pass over an OTLP ExportTraceServiceRequest's protobuf bytes that returns
 * its spans as columns, with only the attributes whose key the alias table knows.
 *
 * Why C: reading every KeyValue of every span through the Python protobuf API costs ~7-10 us
 * per span (a wrapper object per attribute), which caps ingest near 25k spans/s. Here the
 * bulky attributes (prompts, completions) are skipped by length without creating objects,
 * and the output is columnar (lists per field; sparse lists per alias key), so the Python
 * side never builds a per-span dict.
 *
 * Every read is bounds-checked; malformed input raises ValueError (-> INVALID_ARGUMENT).
 * The pure-Python scanner in scan.py is the reference; tests hold the two equal.
 *
 * scan_traces(payload, keys, nslots, prefixes, event_names) -> dict:
 *   n:         the number of spans
 *   spans:     bytes, one 64-byte record per span (the fixed columns, read as a numpy structured array;
 *              normalize.SPAN_RECORD is its dtype): trace_id[16] span_id[8] parent_span_id[8] (raw ids; an id
 *              of the wrong length, or absent, is zeros), start u64, end u64, rs_idx i32, ss_idx i32,
 *              sp_idx i32, kind u8, status_code u8 (both capped at 255), 2 bytes of padding; little-endian
 *   invalid:   as validate_traces returns it
 *   name: str    status_message: str | None    scope: str | None   (lists, one per span)
 *   slots:     list of nslots [span_indexes, values] pairs, one per alias key (keys: bytes -> slot)
 *   prefixed:  [(span_index, key, value)] for keys starting with one of `prefixes`
 *   events:    [(span_index, raw Event bytes)] for events whose name is in `event_names`
 *   resources: per ResourceSpans, [(slot, value)] of its resource attributes
 *   value: str | int | float | bool | None, a list for an array of scalars, or the raw AnyValue
 *          bytes for kvlists, bytes and nested arrays
 *   Fixed-width records instead of a Python object per field: the normalizer turns them into
 *   Arrow columns with a few numpy operations (measured: ~4 us a span less than lists).
 *
 * validate_traces(payload, keys, prefixes, event_names) -> (spans, invalid):
 *   the same walk with the same errors (every value scan_traces would read is read), building no
 *   columns: what the receiver needs before it acknowledges. invalid: [(index, trace_id, span_id,
 *   parent_span_id, start, end, name)] for spans with wrong-length or all-zero ids, a time past
 *   MAX_TIME_NS, or end < start (scan.invalid_reason names the reason from these fields).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Buf;

#define KEY_TABLE 1024 /* open addressing, power of two; the alias table has well under 200 keys */

typedef struct {
    const char *key;       /* borrowed from the keys dict (alive for the call) */
    Py_ssize_t len;
    PyObject *slot;        /* borrowed int */
} KeyEntry;

typedef struct {
    uint8_t *p;
    size_t len, cap;
} Grow;

#define RECORD_SIZE 64
/* The latest span time the store holds (scan.MAX_TIME_NS: DuckDB's TIMESTAMP_NS refuses 2^63 - 1 and up). */
#define MAX_TIME_NS 9223372036854775806ull

/* The last value read for one alias key: its AnyValue bytes and the object made of them. Spans
 * of a request repeat most values (model, route, kind, span names), so the next span's equal
 * bytes reuse the object instead of decoding and allocating again. Lists are never memoized
 * (mutable); everything else any_value returns is immutable. */
typedef struct {
    const uint8_t *p;
    Py_ssize_t n;
    PyObject *v;
} Memo;

typedef struct {
    PyObject *keys;        /* dict: bytes -> int */
    KeyEntry table[KEY_TABLE];
    PyObject *prefixes;    /* tuple of bytes */
    PyObject *event_names; /* set/frozenset of bytes */
    const uint8_t *base;
    Py_ssize_t nslots;
    PyObject *slots;       /* list of [idx list, value list] */
    PyObject *prefixed;
    PyObject *events;
    PyObject *cols[3];     /* per-span lists, in COLUMN_NAMES order */
    Grow records;          /* RECORD_SIZE bytes per span: the fixed columns */
    int dry;               /* validate_traces: read everything, keep nothing but invalid spans */
    Py_ssize_t nspans;
    PyObject *invalid;
    Memo *memo;            /* one per key slot (nmemo of them) */
    Py_ssize_t nmemo;
    Memo name_memo;
} Ctx;

static const char *COLUMN_NAMES[3] = {"name", "status_message", "scope"};

static uint8_t *grow(Grow *g, size_t n) {
    if (g->len + n > g->cap) {
        size_t cap = g->cap ? g->cap * 2 : (size_t)RECORD_SIZE * 512;
        while (cap < g->len + n) cap *= 2;
        uint8_t *p = PyMem_Realloc(g->p, cap);
        if (!p) {
            PyErr_NoMemory();
            return NULL;
        }
        g->p = p;
        g->cap = cap;
    }
    uint8_t *out = g->p + g->len;
    g->len += n;
    return out;
}

/* Hash of an attribute key: its length and its first and last 8 bytes (two loads, not a loop over
 * every byte: every attribute of every span is looked up, in the receiver's check and in the scan).
 * Keys that share them only probe further; lookup compares whole keys. */
static uint32_t key_hash(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = (uint64_t)n * 0x9E3779B97F4A7C15ull;
    if (n >= 8) {
        uint64_t a, b;
        memcpy(&a, p, 8);
        memcpy(&b, p + n - 8, 8);
        h ^= a * 0xC2B2AE3D27D4EB4Full;
        h = (h ^ (h >> 29)) + b * 0x165667B19E3779F9ull;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ull;
    }
    h ^= h >> 32;
    return (uint32_t)h;
}

/* Builds the lookup table from the keys dict: no allocation per attribute afterwards. */
static int build_table(PyObject *keys, KeyEntry *table) {
    memset(table, 0, sizeof(KeyEntry) * KEY_TABLE);
    if (PyDict_Size(keys) > KEY_TABLE / 2) {
        PyErr_SetString(PyExc_ValueError, "too many alias keys");
        return -1;
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(keys, &pos, &k, &v)) {
        if (!PyBytes_Check(k) || !PyLong_Check(v)) {
            PyErr_SetString(PyExc_TypeError, "keys must map bytes to int");
            return -1;
        }
        Py_ssize_t n = PyBytes_GET_SIZE(k);
        uint32_t i = key_hash((const uint8_t *)PyBytes_AS_STRING(k), n) & (KEY_TABLE - 1);
        while (table[i].key) i = (i + 1) & (KEY_TABLE - 1);
        table[i].key = PyBytes_AS_STRING(k);
        table[i].len = n;
        table[i].slot = v;
    }
    return 0;
}

static PyObject *lookup(const KeyEntry *table, const uint8_t *p, Py_ssize_t n) {
    uint32_t i = key_hash(p, n) & (KEY_TABLE - 1);
    while (table[i].key) {
        if (table[i].len == n && memcmp(table[i].key, p, n) == 0) return table[i].slot;
        i = (i + 1) & (KEY_TABLE - 1);
    }
    return NULL;
}

static int fail(Ctx *c, const uint8_t *at, const char *what) {
    PyErr_Format(PyExc_ValueError, "malformed protobuf at byte %zd: %s", (Py_ssize_t)(at - c->base), what);
    return -1;
}

static int read_varint_slow(Ctx *c, Buf *b, uint64_t *out) {
    uint64_t v = 0;
    int shift = 0;
    while (b->p < b->end) {
        uint8_t byte = *b->p++;
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (!(byte & 0x80)) {
            *out = v;
            return 0;
        }
        shift += 7;
        if (shift >= 70) return fail(c, b->p, "varint too long");
    }
    return fail(c, b->p, "truncated varint");
}

/* Tags and most lengths here fit in one or two bytes: those are read inline. */
static inline __attribute__((always_inline)) int read_varint(Ctx *c, Buf *b, uint64_t *out) {
    const uint8_t *p = b->p;
    if (b->end - p >= 2) {
        if (!(p[0] & 0x80)) {
            *out = p[0];
            b->p = p + 1;
            return 0;
        }
        if (!(p[1] & 0x80)) {
            *out = (uint64_t)(p[0] & 0x7f) | ((uint64_t)p[1] << 7);
            b->p = p + 2;
            return 0;
        }
    }
    return read_varint_slow(c, b, out);
}

/* Reads one field header; for length-delimited fields also returns the payload slice. */
static inline __attribute__((always_inline)) int read_field(Ctx *c, Buf *b, uint32_t *field, int *wt, Buf *sub, uint64_t *scalar) {
    uint64_t tag;
    if (read_varint(c, b, &tag) < 0) return -1;
    *field = (uint32_t)(tag >> 3);
    *wt = (int)(tag & 7);
    if (*field == 0) return fail(c, b->p, "field number 0");
    switch (*wt) {
    case 0:
        return read_varint(c, b, scalar);
    case 1:
        if (b->end - b->p < 8) return fail(c, b->p, "truncated fixed64");
        memcpy(scalar, b->p, 8); /* little-endian hosts only (x86_64, aarch64) */
        b->p += 8;
        return 0;
    case 5: {
        uint32_t v32;
        if (b->end - b->p < 4) return fail(c, b->p, "truncated fixed32");
        memcpy(&v32, b->p, 4);
        *scalar = v32;
        b->p += 4;
        return 0;
    }
    case 2: {
        uint64_t len;
        if (read_varint(c, b, &len) < 0) return -1;
        if (len > (uint64_t)(b->end - b->p)) return fail(c, b->p, "length past end of message");
        sub->p = b->p;
        sub->end = b->p + len;
        b->p += len;
        return 0;
    }
    default:
        return fail(c, b->p, "unsupported wire type (groups are not valid in OTLP)");
    }
}

static int append_steal(PyObject *list, PyObject *item) {
    if (!item) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* Text of a string field; invalid UTF-8 is replaced, not an error (as the protobuf reference reads it). */
static PyObject *make_str(Ctx *c, Buf b) {
    (void)c;
    return PyUnicode_DecodeUTF8((const char *)b.p, b.p ? b.end - b.p : 0, "replace");
}

static PyObject *str_or_none(const Buf *s) {
    if (s->p == NULL) Py_RETURN_NONE;
    return make_str(NULL, *s);
}

static PyObject *bytes_of(const Buf *s) {
    if (s->p == NULL) return PyBytes_FromStringAndSize("", 0);
    return PyBytes_FromStringAndSize((const char *)s->p, s->end - s->p);
}

/* An AnyValue's value field (fields 1-7; the last one wins, as in protobuf's oneof): its number (0: none) and
 * its payload slice or scalar. */
static int any_kind(Ctx *c, Buf v, int *kind, Buf *last_sub, uint64_t *last_scalar) {
    Buf sub = {NULL, NULL};
    uint64_t scalar = 0;
    *kind = 0;
    while (v.p < v.end) {
        uint32_t f;
        int wt;
        if (read_field(c, &v, &f, &wt, &sub, &scalar) < 0) return -1;
        /* a value field of the wrong wire type is an unknown field to protobuf (and to scan.py) */
        if (((f == 1 || (f >= 5 && f <= 7)) && wt == 2) || ((f == 2 || f == 3) && wt == 0) || (f == 4 && wt == 1)) {
            *kind = (int)f;
            *last_sub = sub;
            *last_scalar = scalar;
        }
    }
    return 0;
}

static PyObject *scalar_value(Ctx *c, int kind, Buf sub, uint64_t scalar) {
    switch (kind) {
    case 1:
        return make_str(c, sub);
    case 2:
        return PyBool_FromLong(scalar != 0);
    case 3:
        return PyLong_FromLongLong((long long)(int64_t)scalar);
    case 4: {
        double d;
        memcpy(&d, &scalar, 8);
        return PyFloat_FromDouble(d);
    }
    default:
        Py_RETURN_NONE;
    }
}

/* AnyValue -> Python scalar, a list for an array of scalars, or the raw AnyValue bytes for anything
 * else (kvlists, bytes, arrays holding composites). Never recursive: an array nested a million deep
 * (a few MB) once overflowed the C stack here, in the receiver's check. */
static PyObject *any_value(Ctx *c, Buf v) {
    Buf whole = v;
    int kind;
    Buf sub = {NULL, NULL};
    uint64_t scalar = 0;
    if (any_kind(c, v, &kind, &sub, &scalar) < 0) return NULL;
    if (kind == 5) {
        PyObject *list = PyList_New(0);
        if (!list) return NULL;
        Buf arr = sub;
        while (arr.p && arr.p < arr.end) {
            uint32_t f;
            int wt, ikind;
            Buf item = {NULL, NULL}, isub = {NULL, NULL};
            uint64_t sc, iscalar = 0;
            if (read_field(c, &arr, &f, &wt, &item, &sc) < 0) { Py_DECREF(list); return NULL; }
            if (f != 1 || wt != 2) continue;
            if (any_kind(c, item, &ikind, &isub, &iscalar) < 0) { Py_DECREF(list); return NULL; }
            if (ikind >= 5) { /* nested composite: keep the whole value raw */
                Py_DECREF(list);
                return bytes_of(&whole);
            }
            if (append_steal(list, scalar_value(c, ikind, isub, iscalar)) < 0) { Py_DECREF(list); return NULL; }
        }
        return list;
    }
    if (kind >= 6) return bytes_of(&whole);
    return scalar_value(c, kind, sub, scalar);
}

/* ``make(c, b)`` for the bytes ``b``, or the object the memo holds for equal bytes (a new reference). */
static PyObject *memoized(Ctx *c, Memo *m, Buf b, PyObject *(*make)(Ctx *, Buf)) {
    Py_ssize_t n = b.end - b.p;
    if (m->v != NULL && m->n == n && memcmp(m->p, b.p, (size_t)n) == 0) {
        Py_INCREF(m->v);
        return m->v;
    }
    PyObject *v = make(c, b);
    if (v != NULL && !PyList_Check(v)) {
        Py_INCREF(v);
        Py_XSETREF(m->v, v);
        m->p = b.p;
        m->n = n;
    }
    return v;
}

static int alloc_memo(Ctx *c) {
    c->nmemo = PyDict_Size(c->keys);
    c->memo = PyMem_Calloc((size_t)(c->nmemo > 0 ? c->nmemo : 1), sizeof(Memo));
    if (!c->memo) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void free_memo(Ctx *c) {
    if (c->memo) {
        for (Py_ssize_t i = 0; i < c->nmemo; i++) Py_XDECREF(c->memo[i].v);
        PyMem_Free(c->memo);
        c->memo = NULL;
    }
    Py_CLEAR(c->name_memo.v);
}

/* One KeyValue. span_idx >= 0: append to the slot's columns (or `prefixed`);
 * span_idx < 0: append (slot, value) to `out` (resource attributes). */
static int key_value(Ctx *c, Buf kv, Py_ssize_t span_idx, PyObject *out) {
    Buf key = {NULL, NULL}, val = {NULL, NULL};
    int has_val = 0;
    while (kv.p < kv.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &kv, &f, &wt, &sub, &scalar) < 0) return -1;
        if (f == 1 && wt == 2) key = sub;
        else if (f == 2 && wt == 2) { val = sub; has_val = 1; }
    }
    if (key.p == NULL) return 0;
    PyObject *slot = lookup(c->table, key.p, key.end - key.p); /* borrowed */
    if (slot != NULL) {
        Py_ssize_t si = PyLong_AsSsize_t(slot);
        if (si < 0 || (si >= c->nslots && !c->dry)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "slot out of range");
            return -1;
        }
        PyObject *value;
        if (!has_val) {
            Py_INCREF(Py_None);
            value = Py_None;
        } else if (si < c->nmemo) {
            value = memoized(c, &c->memo[si], val, any_value);
        } else {
            value = any_value(c, val);
        }
        if (!value) return -1;
        int rc;
        if (c->dry) {
            rc = 0;
        } else if (span_idx < 0) {
            PyObject *entry = PyTuple_Pack(2, slot, value);
            rc = entry ? PyList_Append(out, entry) : -1;
            Py_XDECREF(entry);
        } else {
            PyObject *pair = PyList_GET_ITEM(c->slots, si);
            PyObject *idx = PyLong_FromSsize_t(span_idx);
            rc = idx ? PyList_Append(PyList_GET_ITEM(pair, 0), idx) : -1;
            Py_XDECREF(idx);
            if (rc == 0) rc = PyList_Append(PyList_GET_ITEM(pair, 1), value);
        }
        Py_DECREF(value);
        return rc;
    }
    if (span_idx < 0) return 0;
    Py_ssize_t n = PyTuple_GET_SIZE(c->prefixes);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pre = PyTuple_GET_ITEM(c->prefixes, i);
        Py_ssize_t pl = PyBytes_GET_SIZE(pre);
        if (key.end - key.p >= pl && memcmp(key.p, PyBytes_AS_STRING(pre), pl) == 0) {
            PyObject *value = has_val ? any_value(c, val) : (Py_INCREF(Py_None), Py_None);
            if (!value) return -1;
            if (c->dry) { Py_DECREF(value); return 0; }
            PyObject *ks = str_or_none(&key);
            if (!ks) { Py_DECREF(value); return -1; }
            PyObject *entry = Py_BuildValue("(nNN)", span_idx, ks, value);
            if (!entry) return -1;
            int rc = PyList_Append(c->prefixed, entry);
            Py_DECREF(entry);
            return rc;
        }
    }
    return 0;
}

/* Resource or InstrumentationScope attributes (field 1 of Resource; name is field 1 of scope). */
static PyObject *resource_matches(Ctx *c, Buf r) {
    PyObject *matches = PyList_New(0);
    if (!matches) return NULL;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &r, &f, &wt, &sub, &scalar) < 0) goto err;
        if (f == 1 && wt == 2 && key_value(c, sub, -1, matches) < 0) goto err;
    }
    return matches;
err:
    Py_DECREF(matches);
    return NULL;
}

static int event_wanted(Ctx *c, Buf ev) {
    while (ev.p < ev.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &ev, &f, &wt, &sub, &scalar) < 0) return -1;
        if (f == 2 && wt == 2) {
            PyObject *name = PyBytes_FromStringAndSize((const char *)sub.p, sub.end - sub.p);
            if (!name) return -1;
            int hit = PySequence_Contains(c->event_names, name);
            Py_DECREF(name);
            return hit;
        }
    }
    return 0;
}

static int span(Ctx *c, Buf s, PyObject *scope, Py_ssize_t rs_idx, Py_ssize_t ss_idx, Py_ssize_t sp_idx) {
    Buf tid = {NULL, NULL}, sid = {NULL, NULL}, pid = {NULL, NULL}, name = {NULL, NULL}, smsg = {NULL, NULL};
    uint64_t kind = 0, start = 0, end = 0, scode = 0;
    Py_ssize_t idx = c->nspans;
    while (s.p < s.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar = 0;
        if (read_field(c, &s, &f, &wt, &sub, &scalar) < 0) return -1;
        switch (f) {
        case 1: if (wt == 2) tid = sub; break;
        case 2: if (wt == 2) sid = sub; break;
        case 4: if (wt == 2) pid = sub; break;
        case 5: if (wt == 2) name = sub; break;
        case 6: if (wt == 0) kind = scalar; break;
        case 7: if (wt == 1) start = scalar; break;
        case 8: if (wt == 1) end = scalar; break;
        case 9:
            if (wt == 2 && key_value(c, sub, idx, NULL) < 0) return -1;
            break;
        case 11:
            if (wt == 2) {
                int hit = event_wanted(c, sub);
                if (hit < 0) return -1;
                if (hit && !c->dry && append_steal(c->events, Py_BuildValue("(nN)", idx, bytes_of(&sub))) < 0) return -1;
            }
            break;
        case 15:
            if (wt == 2) {
                Buf st = sub;
                while (st.p < st.end) {
                    uint32_t sf;
                    int swt;
                    Buf ssub = {NULL, NULL};
                    uint64_t sscalar = 0;
                    if (read_field(c, &st, &sf, &swt, &ssub, &sscalar) < 0) return -1;
                    if (sf == 2 && swt == 2) smsg = ssub;
                    else if (sf == 3 && swt == 0) scode = sscalar;
                }
            }
            break;
        default:
            break;
        }
    }
    static const uint8_t zero[16] = {0};
    Py_ssize_t tl = tid.p ? tid.end - tid.p : 0, sl = sid.p ? sid.end - sid.p : 0, pl = pid.p ? pid.end - pid.p : 0;
    int bad = tl != 16 || sl != 8 || memcmp(tid.p, zero, 16) == 0 || memcmp(sid.p, zero, 8) == 0 ||
              (pl && (pl != 8 || memcmp(pid.p, zero, 8) == 0)) || start > MAX_TIME_NS || end > MAX_TIME_NS ||
              end < start;
    c->nspans++;
    if (bad && append_steal(c->invalid, Py_BuildValue("(nNNNKKN)", idx, bytes_of(&tid), bytes_of(&sid),
                                                      bytes_of(&pid), (unsigned long long)start,
                                                      (unsigned long long)end,
                                                      name.p ? str_or_none(&name) : PyUnicode_FromString(""))) < 0)
        return -1;
    if (c->dry) return 0;
    uint8_t *r = grow(&c->records, RECORD_SIZE);
    if (!r) return -1;
    memset(r, 0, RECORD_SIZE);
    if (tl == 16) memcpy(r, tid.p, 16);
    if (sl == 8) memcpy(r + 16, sid.p, 8);
    if (pl == 8) memcpy(r + 24, pid.p, 8);
    memcpy(r + 32, &start, 8); /* little-endian hosts only, as above */
    memcpy(r + 40, &end, 8);
    int32_t ix[3] = {(int32_t)rs_idx, (int32_t)ss_idx, (int32_t)sp_idx};
    memcpy(r + 48, ix, 12);
    r[60] = kind > 255 ? 255 : (uint8_t)kind;
    r[61] = scode > 255 ? 255 : (uint8_t)scode;
    if (append_steal(c->cols[0], name.p ? memoized(c, &c->name_memo, name, make_str) : PyUnicode_FromString("")) < 0 ||
        append_steal(c->cols[1], str_or_none(&smsg)) < 0 || append_steal(c->cols[2], (Py_INCREF(scope), scope)) < 0)
        return -1;
    return 0;
}

static int dict_steal(PyObject *d, const char *key, PyObject *v) {
    if (!v) return -1;
    int rc = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return rc;
}

static int scope_spans(Ctx *c, Buf ss, Py_ssize_t rs_idx, Py_ssize_t ss_idx) {
    PyObject *scope_name = NULL;
    Buf scan = ss;
    /* the scope comes first in practice, but the wire format allows any order: find it first */
    while (scan.p < scan.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &scan, &f, &wt, &sub, &scalar) < 0) goto err;
        if (f == 1 && wt == 2) {
            Buf sc = sub;
            while (sc.p < sc.end) {
                uint32_t sf;
                int swt;
                Buf ssub = {NULL, NULL};
                uint64_t sscalar;
                if (read_field(c, &sc, &sf, &swt, &ssub, &sscalar) < 0) goto err;
                if (sf == 1 && swt == 2) {
                    Py_XDECREF(scope_name);
                    if (!(scope_name = str_or_none(&ssub))) goto err;
                }
            }
        }
    }
    if (!scope_name) { scope_name = Py_None; Py_INCREF(scope_name); }
    Py_ssize_t sp_idx = 0;
    while (ss.p < ss.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &ss, &f, &wt, &sub, &scalar) < 0) goto err;
        if (f == 2 && wt == 2 && span(c, sub, scope_name, rs_idx, ss_idx, sp_idx++) < 0) goto err;
    }
    Py_DECREF(scope_name);
    return 0;
err:
    Py_XDECREF(scope_name);
    return -1;
}

static int check_prefixes(PyObject *prefixes) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(prefixes); i++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "prefixes must be a tuple of bytes");
            return -1;
        }
    }
    return 0;
}

/* The request: every ResourceSpans' resource attributes and scope spans. ``resources`` receives one
 * list of (slot, value) per ResourceSpans; NULL (the dry run) reads them and keeps nothing. */
static int walk_request(Ctx *c, const uint8_t *end, PyObject *resources) {
    Buf req = {c->base, end};
    Py_ssize_t rs_idx = 0;
    while (req.p < req.end) {
        uint32_t f;
        int wt;
        Buf sub = {NULL, NULL};
        uint64_t scalar;
        if (read_field(c, &req, &f, &wt, &sub, &scalar) < 0) return -1;
        if (f != 1 || wt != 2) continue;
        PyObject *res = NULL;
        Buf rs = sub;
        Py_ssize_t ss_idx = 0;
        while (rs.p < rs.end) {
            uint32_t rf;
            int rwt;
            Buf rsub = {NULL, NULL};
            uint64_t rscalar;
            if (read_field(c, &rs, &rf, &rwt, &rsub, &rscalar) < 0) { Py_XDECREF(res); return -1; }
            if (rf == 1 && rwt == 2) {
                Py_XDECREF(res);
                if (!(res = resource_matches(c, rsub))) return -1;
            } else if (rf == 2 && rwt == 2) {
                if (scope_spans(c, rsub, rs_idx, ss_idx++) < 0) { Py_XDECREF(res); return -1; }
            }
        }
        if (resources == NULL) {
            Py_XDECREF(res);
        } else {
            if (!res && !(res = PyList_New(0))) return -1;
            if (append_steal(resources, res) < 0) return -1;
        }
        rs_idx++;
    }
    return 0;
}

static PyObject *scan_traces(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Ctx c;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "y*O!nO!O", &view, &PyDict_Type, &c.keys, &c.nslots, &PyTuple_Type, &c.prefixes,
                          &c.event_names))
        return NULL;
    PyObject *out = NULL, *resources = NULL;
    if (check_prefixes(c.prefixes) < 0) goto err;
    if (c.nslots < 0 || !(c.slots = PyList_New(c.nslots)) || !(c.prefixed = PyList_New(0)) ||
        !(c.events = PyList_New(0)) || !(resources = PyList_New(0)) || !(c.invalid = PyList_New(0)))
        goto err;
    for (Py_ssize_t i = 0; i < c.nslots; i++) {
        PyObject *pair = Py_BuildValue("[NN]", PyList_New(0), PyList_New(0));
        if (!pair) goto err;
        PyList_SET_ITEM(c.slots, i, pair);
    }
    for (int i = 0; i < 3; i++)
        if (!(c.cols[i] = PyList_New(0))) goto err;
    if (build_table(c.keys, c.table) < 0 || alloc_memo(&c) < 0) goto err;
    c.base = (const uint8_t *)view.buf;
    if (walk_request(&c, c.base + view.len, resources) < 0) goto err;
    if (!(out = PyDict_New())) goto err;
    for (int i = 0; i < 3; i++)
        if (PyDict_SetItemString(out, COLUMN_NAMES[i], c.cols[i]) < 0) goto err;
    if (dict_steal(out, "n", PyLong_FromSsize_t(c.nspans)) < 0 ||
        dict_steal(out, "spans", PyBytes_FromStringAndSize((const char *)c.records.p, (Py_ssize_t)c.records.len)) < 0 ||
        PyDict_SetItemString(out, "invalid", c.invalid) < 0 ||
        PyDict_SetItemString(out, "slots", c.slots) < 0 || PyDict_SetItemString(out, "prefixed", c.prefixed) < 0 ||
        PyDict_SetItemString(out, "events", c.events) < 0 || PyDict_SetItemString(out, "resources", resources) < 0)
        goto err;
    goto done;
err:
    Py_CLEAR(out);
done:
    for (int i = 0; i < 3; i++) Py_XDECREF(c.cols[i]);
    free_memo(&c);
    Py_XDECREF(c.invalid);
    PyMem_Free(c.records.p);
    Py_XDECREF(c.slots);
    Py_XDECREF(c.prefixed);
    Py_XDECREF(c.events);
    Py_XDECREF(resources);
    PyBuffer_Release(&view);
    return out;
}

static PyObject *validate_traces(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    Ctx c;
    memset(&c, 0, sizeof c);
    c.dry = 1;
    if (!PyArg_ParseTuple(args, "y*O!O!O", &view, &PyDict_Type, &c.keys, &PyTuple_Type, &c.prefixes, &c.event_names))
        return NULL;
    PyObject *out = NULL;
    if (check_prefixes(c.prefixes) < 0 || !(c.invalid = PyList_New(0)) || build_table(c.keys, c.table) < 0 ||
        alloc_memo(&c) < 0)
        goto done;
    c.base = (const uint8_t *)view.buf;
    if (walk_request(&c, c.base + view.len, NULL) < 0) goto done;
    out = Py_BuildValue("(nO)", c.nspans, c.invalid);
done:
    free_memo(&c);
    Py_XDECREF(c.invalid);
    PyBuffer_Release(&view);
    return out;
}

/* merge_column(n, pairs, exact, convert, known) -> list of n values, or None when no pair has one.
 *
 * One concept's column from the scanner's per-key [span_indexes, values] pairs, best key first
 * (scan.python_merge_column is the reference). A span takes the first value, best key first
 * and within a key the last occurrence first, that is of type ``exact`` or that ``convert``
 * turns into something other than None. ``known`` (a dict or None) holds answers of ``convert``
 * for str values, looked up before calling it. */
static PyObject *merge_column(PyObject *self, PyObject *args) {
    (void)self;
    Py_ssize_t n;
    PyObject *pairs, *exact, *convert, *known = Py_None;
    if (!PyArg_ParseTuple(args, "nO!OO|O", &n, &PyList_Type, &pairs, &exact, &convert, &known)) return NULL;
    if (known != Py_None && !PyDict_Check(known)) {
        PyErr_SetString(PyExc_TypeError, "known must be a dict or None");
        return NULL;
    }
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "n must be >= 0");
        return NULL;
    }
    PyObject *col = NULL;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(pairs); k++) {
        PyObject *pair = PyList_GET_ITEM(pairs, k);
        if (!PyList_Check(pair) || PyList_GET_SIZE(pair) != 2 || !PyList_Check(PyList_GET_ITEM(pair, 0)) ||
            !PyList_Check(PyList_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "pairs must be [span_indexes, values] lists");
            goto err;
        }
        PyObject *idxs = PyList_GET_ITEM(pair, 0), *vals = PyList_GET_ITEM(pair, 1);
        Py_ssize_t m = PyList_GET_SIZE(idxs);
        if (PyList_GET_SIZE(vals) != m) {
            PyErr_SetString(PyExc_ValueError, "span_indexes and values differ in length");
            goto err;
        }
        if (m == 0) continue;
        if (col == NULL) {
            if (!(col = PyList_New(n))) return NULL;
            for (Py_ssize_t i = 0; i < n; i++) {
                Py_INCREF(Py_None);
                PyList_SET_ITEM(col, i, Py_None);
            }
        }
        for (Py_ssize_t j = m - 1; j >= 0; j--) {
            Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(idxs, j));
            if (i < 0 || i >= n) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "span index out of range");
                goto err;
            }
            if (PyList_GET_ITEM(col, i) != Py_None) continue;      /* decided by a better key */
            PyObject *v = PyList_GET_ITEM(vals, j);
            PyObject *hit = NULL;
            if (exact != Py_None && (PyObject *)Py_TYPE(v) == exact) {
                Py_INCREF(v);
            } else if (known != Py_None && PyUnicode_CheckExact(v) && (hit = PyDict_GetItemWithError(known, v)) != NULL &&
                       hit != Py_None) {
                Py_INCREF(hit);
                v = hit;
            } else {
                if (PyErr_Occurred()) goto err;
                v = PyObject_CallOneArg(convert, v);
                if (!v) goto err;
                if (v == Py_None) {
                    Py_DECREF(v);
                    continue;
                }
            }
            Py_DECREF(PyList_GET_ITEM(col, i));
            PyList_SET_ITEM(col, i, v);
        }
    }
    if (col == NULL) Py_RETURN_NONE;
    return col;
err:
    Py_XDECREF(col);
    return NULL;
}

static PyMethodDef methods[] = {
    {"merge_column", merge_column, METH_VARARGS, "One concept's column from per-key pairs (see merge_column above)."},
    {"scan_traces", scan_traces, METH_VARARGS, "Scan an OTLP ExportTraceServiceRequest (see module docs)."},
    {"validate_traces", validate_traces, METH_VARARGS, "Count and check spans without building columns."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wirescan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__wirescan(void) { return PyModule_Create(&module); }
