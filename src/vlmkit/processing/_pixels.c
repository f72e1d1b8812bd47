/* uint8 image views -> normalised float32, in one pass.
 *
 * Preprocessing ends with the same three steps in every family: take a window of the resized
 * uint8 image (often a strided view of RGBX memory, where every fourth byte is padding), convert
 * it to float and normalise it per channel. Done with tensor ops that is a strided copy plus two
 * passes over the float data; here it is one read of the bytes and one write of the floats.
 *
 * The arithmetic is the one vlmkit's torch path does, step by step in float32 and without fused
 * multiply-adds (built with -ffp-contract=off), so both paths give identical bits:
 *   fast:  x * scale[c] - shift[c]        (scale = 1 / (255 std), shift = mean / std)
 *   exact: (x / 255 - mean[c]) / std[c]   (the Hugging Face numpy order)
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One build serves every x86-64 machine: the loader picks the widest vector unit at start-up. */
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define BATCH_DIMS 4

typedef struct {
    const uint8_t *src;
    Py_ssize_t n[BATCH_DIMS];  /* batch shape; the full shape is (*n, 3, h, w) */
    Py_ssize_t sn[BATCH_DIMS], sc, sh, sw; /* source strides, in bytes */
    Py_ssize_t h, w;
    float *dst;
    Py_ssize_t dn[BATCH_DIMS], dc, dh, dw; /* destination strides, in floats */
    float p0[3], p1[3];        /* fast: scale, shift; exact: mean, std */
    int exact;
    float lut[3][256];         /* every byte's normalised value, per channel */
} Job;

/* Rows shorter than this (Qwen2-VL's 14-pixel patch rows) are too short for the vector loop,
 * which would spend them in its scalar remainder; a table lookup per byte is faster there. */
#define SHORT_ROW 32

static float normalised(const Job *j, int c, float v) {
    return j->exact ? (v / 255.0f - j->p0[c]) / j->p1[c] : v * j->p0[c] - j->p1[c];
}

/* The pixel stride is a compile-time constant in the common cases (planar, RGB, RGBX) so the
 * compiler can vectorise the strided byte loads. */
#define FAST_ROW(STRIDE)                                              \
    for (Py_ssize_t x = 0; x < w; x++) d[x] = (float)s[x * (STRIDE)] * a - b;

static inline void fast_row(const uint8_t *s, Py_ssize_t sw, float *d, Py_ssize_t w, float a, float b) {
    switch (sw) {
    case 1: FAST_ROW(1) break;
    case 3: FAST_ROW(3) break;
    case 4: FAST_ROW(4) break;
    default: FAST_ROW(sw) break;
    }
}

static inline void exact_row(const uint8_t *s, Py_ssize_t sw, float *d, Py_ssize_t w, float mean, float std) {
    for (Py_ssize_t x = 0; x < w; x++) {
        float v = (float)s[x * sw] / 255.0f;
        d[x] = (v - mean) / std;
    }
}

static inline void row(const Job *j, int c, const uint8_t *s, float *d) {
    if (j->dw != 1 || j->w < SHORT_ROW) {
        const float *lut = j->lut[c];
        for (Py_ssize_t x = 0; x < j->w; x++) d[x * j->dw] = lut[s[x * j->sw]];
    } else if (j->exact) {
        exact_row(s, j->sw, d, j->w, j->p0[c], j->p1[c]);
    } else {
        fast_row(s, j->sw, d, j->w, j->p0[c], j->p1[c]);
    }
}

/* Interleaved pixels (RGBX or RGB): all three channels from one pass over the row, which the
 * compiler vectorises as one load and a byte shuffle per group of pixels. */
#define PIXEL_ROW(STRIDE)                                                                   \
    for (Py_ssize_t x = 0; x < w; x++) {                                                    \
        const uint8_t *px = s + x * (STRIDE);                                               \
        d0[x] = (float)px[0] * a0 - b0;                                                     \
        d1[x] = (float)px[1] * a1 - b1;                                                     \
        d2[x] = (float)px[2] * a2 - b2;                                                     \
    }

static inline void pixel_row(const Job *j, const uint8_t *s, float *d) {
    float *d0 = d, *d1 = d + j->dc, *d2 = d + 2 * j->dc;
    const float a0 = j->p0[0], a1 = j->p0[1], a2 = j->p0[2], b0 = j->p1[0], b1 = j->p1[1], b2 = j->p1[2];
    const Py_ssize_t w = j->w;
    if (j->sw == 4) {
        PIXEL_ROW(4)
    } else {
        PIXEL_ROW(3)
    }
}

/* Loop order: the last batch dimension runs inside the row loop, channels innermost. For a
 * grid of tiles cut from one image, shape (rows, cols, 3, t, t), that reads the source in memory
 * order, a whole image row at a time, so the prefetcher streams it; tile by tile it would jump
 * between short row segments (half the speed on InternVL's 10 MB 12-tile images). */
VECTOR_CLONES
static void run(const Job *j) {
    const int interleaved = j->sc == 1 && (j->sw == 3 || j->sw == 4) && j->dw == 1 && !j->exact && j->w >= SHORT_ROW;
    for (Py_ssize_t a = 0; a < j->n[0]; a++)
        for (Py_ssize_t b = 0; b < j->n[1]; b++)
            for (Py_ssize_t c = 0; c < j->n[2]; c++) {
                const uint8_t *src = j->src + a * j->sn[0] + b * j->sn[1] + c * j->sn[2];
                float *dst = j->dst + a * j->dn[0] + b * j->dn[1] + c * j->dn[2];
                for (Py_ssize_t y = 0; y < j->h; y++)
                    for (Py_ssize_t d = 0; d < j->n[3]; d++) {
                        const uint8_t *s = src + d * j->sn[3] + y * j->sh;
                        float *o = dst + d * j->dn[3] + y * j->dh;
                        if (interleaved) {
                            pixel_row(j, s, o);
                            continue;
                        }
                        for (int ch = 0; ch < 3; ch++) row(j, ch, s + ch * j->sc, o + ch * j->dc);
                    }
            }
}

PyDoc_STRVAR(normalize_doc,
"normalize(src, src_strides, dst, dst_strides, shape, p0, p1, exact)\n\n"
"Internal: called by vlmkit.processing.images with the data pointers of a uint8 view and a\n"
"float32 view of the same 7-d shape (4 batch dims, 3, h, w), their strides in elements, and\n"
"the per-channel constants; the caller has already checked the views.");

static PyObject *normalize(PyObject *self, PyObject *args) {
    Job j;
    Py_ssize_t src, dst, ss[7], ds[7], shape[7];
    int exact;
    if (!PyArg_ParseTuple(args, "n(nnnnnnn)n(nnnnnnn)(nnnnnnn)(fff)(fff)p", &src, &ss[0], &ss[1], &ss[2], &ss[3],
                          &ss[4], &ss[5], &ss[6], &dst, &ds[0], &ds[1], &ds[2], &ds[3], &ds[4], &ds[5], &ds[6],
                          &shape[0], &shape[1], &shape[2], &shape[3], &shape[4], &shape[5], &shape[6], &j.p0[0],
                          &j.p0[1], &j.p0[2], &j.p1[0], &j.p1[1], &j.p1[2], &exact))
        return NULL;
    for (int i = 0; i < 7; i++)
        if (shape[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative size");
            return NULL;
        }
    if (shape[4] != 3) {
        PyErr_SetString(PyExc_ValueError, "the channel dimension must have size 3");
        return NULL;
    }
    for (int i = 0; i < BATCH_DIMS; i++) {
        j.n[i] = shape[i];
        j.sn[i] = ss[i];
        j.dn[i] = ds[i];
    }
    j.sc = ss[4], j.sh = ss[5], j.sw = ss[6];
    j.dc = ds[4], j.dh = ds[5], j.dw = ds[6];
    j.h = shape[5], j.w = shape[6];
    j.src = (const uint8_t *)src;
    j.dst = (float *)dst;
    j.exact = exact;
    for (int c = 0; c < 3; c++)
        for (int v = 0; v < 256; v++) j.lut[c][v] = normalised(&j, c, (float)v);
    Py_BEGIN_ALLOW_THREADS
    run(&j);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- float32 strided copy with a contiguous innermost run -------------------------------- */
/* Qwen2-VL lays pixels out patch by patch (runs of 14 floats, each written to both temporal
 * slots); torch's generic strided copy spends ~20 ns per such run. Runs of 8 or more move as
 * 8-float blocks, the last block overlapping the previous one instead of a scalar tail. */

#define COPY_DIMS 8

static inline void copy_run(const float *s, float *d, Py_ssize_t n) {
    if (n < 8) {
        for (Py_ssize_t i = 0; i < n; i++) d[i] = s[i];
        return;
    }
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) memcpy(d + i, s + i, 8 * sizeof(float));
    if (i < n) memcpy(d + n - 8, s + n - 8, 8 * sizeof(float));
}

VECTOR_CLONES
static void copy_all(const float *src, float *dst, const Py_ssize_t *ss, const Py_ssize_t *ds, const Py_ssize_t *n) {
    for (Py_ssize_t i0 = 0; i0 < n[0]; i0++)
    for (Py_ssize_t i1 = 0; i1 < n[1]; i1++)
    for (Py_ssize_t i2 = 0; i2 < n[2]; i2++)
    for (Py_ssize_t i3 = 0; i3 < n[3]; i3++)
    for (Py_ssize_t i4 = 0; i4 < n[4]; i4++)
    for (Py_ssize_t i5 = 0; i5 < n[5]; i5++) {
        const float *s = src + i0 * ss[0] + i1 * ss[1] + i2 * ss[2] + i3 * ss[3] + i4 * ss[4] + i5 * ss[5];
        float *d = dst + i0 * ds[0] + i1 * ds[1] + i2 * ds[2] + i3 * ds[3] + i4 * ds[4] + i5 * ds[5];
        for (Py_ssize_t i6 = 0; i6 < n[6]; i6++) copy_run(s + i6 * ss[6], d + i6 * ds[6], n[7]);
    }
}

PyDoc_STRVAR(copy_doc,
"copy(src, src_strides, dst, dst_strides, shape)\n\n"
"Internal: float32 8-d strided copy, innermost stride 1 on both sides (strides in elements),\n"
"for views vlmkit.processing.images has already checked. Destinations must not overlap.");

static PyObject *copy(PyObject *self, PyObject *args) {
    Py_ssize_t src, dst, ss[COPY_DIMS], ds[COPY_DIMS], shape[COPY_DIMS];
    if (!PyArg_ParseTuple(args, "n(nnnnnnnn)n(nnnnnnnn)(nnnnnnnn)", &src, &ss[0], &ss[1], &ss[2], &ss[3], &ss[4],
                          &ss[5], &ss[6], &ss[7], &dst, &ds[0], &ds[1], &ds[2], &ds[3], &ds[4], &ds[5], &ds[6],
                          &ds[7], &shape[0], &shape[1], &shape[2], &shape[3], &shape[4], &shape[5], &shape[6],
                          &shape[7]))
        return NULL;
    for (int k = 0; k < COPY_DIMS; k++) {
        if (shape[k] < 0) {
            PyErr_SetString(PyExc_ValueError, "negative size");
            return NULL;
        }
        if (shape[k] == 0) Py_RETURN_NONE;
    }
    if (ss[COPY_DIMS - 1] != 1 || ds[COPY_DIMS - 1] != 1) {
        PyErr_SetString(PyExc_ValueError, "the innermost dimension must be contiguous on both sides");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    copy_all((const float *)src, (float *)dst, ss, ds, shape);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize", normalize, METH_VARARGS, normalize_doc},
    {"copy", copy, METH_VARARGS, copy_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixels", "uint8 views to normalised float32, and patch-layout copies", -1, methods};

PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
