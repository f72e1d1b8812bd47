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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One build serves every x86-64 machine: the loader picks the widest vector unit at start-up. */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

typedef struct {
    const uint8_t *src;
    Py_ssize_t sn, sc, sh, sw; /* source strides, in bytes */
    Py_ssize_t n, h, w;        /* shape is (n, 3, h, w) */
    float *dst;
    Py_ssize_t dn, dc, dh, dw; /* destination strides, in floats */
    float p0[3], p1[3];        /* fast: scale, shift; exact: mean, std */
    int exact;
} Job;

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

VECTOR_CLONES
static void run(const Job *j) {
    for (Py_ssize_t i = 0; i < j->n; i++)
        for (int c = 0; c < 3; c++)
            for (Py_ssize_t y = 0; y < j->h; y++) {
                const uint8_t *s = j->src + i * j->sn + c * j->sc + y * j->sh;
                float *d = j->dst + i * j->dn + c * j->dc + y * j->dh;
                if (j->dw != 1) { /* not used by vlmkit's callers, kept correct for any view */
                    for (Py_ssize_t x = 0; x < j->w; x++) {
                        float v = (float)s[x * j->sw];
                        d[x * j->dw] = j->exact ? (v / 255.0f - j->p0[c]) / j->p1[c] : v * j->p0[c] - j->p1[c];
                    }
                } else if (j->exact) {
                    exact_row(s, j->sw, d, j->w, j->p0[c], j->p1[c]);
                } else {
                    fast_row(s, j->sw, d, j->w, j->p0[c], j->p1[c]);
                }
            }
}

PyDoc_STRVAR(normalize_doc,
"normalize(src, sn, sc, sh, sw, n, h, w, dst, dn, dc, dh, dw, p0, p1, exact)\n\n"
"Internal: called by vlmkit.processing.images with the data pointers and strides of a uint8\n"
"(n, 3, h, w) view and a float32 view of the same shape, which it has already checked.");

static PyObject *normalize(PyObject *self, PyObject *args) {
    Job j;
    Py_ssize_t src, dst;
    int exact;
    if (!PyArg_ParseTuple(args, "nnnnnnnnnnnnn(fff)(fff)p", &src, &j.sn, &j.sc, &j.sh, &j.sw, &j.n, &j.h, &j.w,
                          &dst, &j.dn, &j.dc, &j.dh, &j.dw, &j.p0[0], &j.p0[1], &j.p0[2], &j.p1[0], &j.p1[1],
                          &j.p1[2], &exact))
        return NULL;
    if (j.n < 0 || j.h < 0 || j.w < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    j.src = (const uint8_t *)src;
    j.dst = (float *)dst;
    j.exact = exact;
    Py_BEGIN_ALLOW_THREADS
    run(&j);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"normalize", normalize, METH_VARARGS, normalize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pixels", "uint8 views to normalised float32", -1, methods};

PyMODINIT_FUNC PyInit__pixels(void) { return PyModule_Create(&module); }
