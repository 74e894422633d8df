/* moeplan.kernels._C: the Python binding of the quantization kernels.
 *
 * The Python layer (kernels/api.py) validates shapes, dtypes and contiguity and hands over
 * C-contiguous buffers; this file parallelizes over rows, converts F16/BF16 rows to float32
 * one row at a time (never a full float32 copy of the tensor), and releases the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "moeplan.h"

#ifdef MOEPLAN_OPENMP
#include <omp.h>
#endif

enum { SRC_F32 = 0, SRC_F16 = 1, SRC_BF16 = 2 };

static const mp_format *const mp_families[] = {
    mp_formats_float, mp_formats_legacy, mp_formats_k, mp_formats_iq4, mp_formats_tq, mp_formats_iq,
};

static const mp_format *find_format(int type) {
    for (size_t f = 0; f < sizeof(mp_families) / sizeof(mp_families[0]); f++)
        for (const mp_format *p = mp_families[f]; p->name != NULL; p++)
            if (p->type == type) return p;
    return NULL;
}

/* q_iq.c: the codebook formats take their grids at run time (kernels/iq_grids.py) */
int mp_iq_ready(int type);
int mp_iq_set_grid(int type, const float *values, int64_t count);

static const mp_format *get_format_or_raise(int type) {
    const mp_format *fmt = find_format(type);
    if (fmt == NULL) PyErr_Format(PyExc_NotImplementedError, "ggml type %d has no C kernel in this build", type);
    else if (!mp_iq_ready(type)) {
        PyErr_Format(PyExc_RuntimeError, "%s: codebook grid not loaded; call kernels.iq_grids.load() first "
                     "(kernels.quantize / dequantize / quant_error do so)", fmt->name);
        return NULL;
    }
    return fmt;
}

static int src_elem_size(int src_dtype) { return src_dtype == SRC_F32 ? 4 : 2; }

/* Convert one row to float32 in `out` (or point at the source when it already is float32).
 * Returns 0 when a value is NaN or Inf. */
static int load_row(const void *src, int src_dtype, int64_t ncols, float *out, const float **row) {
    int finite = 1;
    if (src_dtype == SRC_F32) {
        const float *s = (const float *)src;
        for (int64_t j = 0; j < ncols; j++) finite &= isfinite(s[j]) ? 1 : 0;
        *row = s;
    } else if (src_dtype == SRC_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < ncols; j++) {
            finite &= ((s[j] & 0x7c00u) != 0x7c00u);
            out[j] = mp_fp16_to_fp32(s[j]);
        }
        *row = out;
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < ncols; j++) {
            finite &= ((s[j] & 0x7f80u) != 0x7f80u);
            out[j] = mp_bf16_to_fp32(s[j]);
        }
        *row = out;
    }
    return finite;
}

static int resolve_threads(int nthreads) {
#ifdef MOEPLAN_OPENMP
    if (nthreads <= 0) nthreads = omp_get_max_threads();
    return nthreads < 1 ? 1 : nthreads;
#else
    (void)nthreads;
    return 1;
#endif
}

static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *what) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be a C-contiguous%s buffer", what, writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* quantize(type, src, src_dtype, nrows, ncols, dst, importance|None, rows_per_group, nthreads)
 * importance (float32) has one row of ncols weights per group of rows_per_group rows
 * (one group for a 2-D tensor, one per expert for stacked experts).
 * Returns -1 on success or the index of the first row holding NaN/Inf. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int type, src_dtype, nthreads;
    long long nrows, ncols, rows_per_group;
    PyObject *src_o, *dst_o, *imp_o;
    if (!PyArg_ParseTuple(args, "iOiLLOOLi", &type, &src_o, &src_dtype, &nrows, &ncols, &dst_o, &imp_o,
                          &rows_per_group, &nthreads))
        return NULL;
    const mp_format *fmt = get_format_or_raise(type);
    if (!fmt) return NULL;
    if (ncols % fmt->block_size != 0 || nrows < 0 || ncols <= 0 || rows_per_group <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad shape (%lld, %lld)", fmt->name, nrows, ncols);
        return NULL;
    }
    Py_buffer src, dst, imp = {0};
    if (get_buffer(src_o, &src, 0, "src") < 0) return NULL;
    if (get_buffer(dst_o, &dst, 1, "dst") < 0) { PyBuffer_Release(&src); return NULL; }
    int have_imp = imp_o != Py_None;
    if (have_imp && get_buffer(imp_o, &imp, 0, "importance") < 0) {
        PyBuffer_Release(&src); PyBuffer_Release(&dst); return NULL;
    }
    const int64_t row_bytes = ncols / fmt->block_size * fmt->type_size;
    const int64_t ngroups = (nrows + rows_per_group - 1) / rows_per_group;
    PyObject *result = NULL;
    if (src.len != (Py_ssize_t)(nrows * ncols * src_elem_size(src_dtype)) || dst.len != (Py_ssize_t)(nrows * row_bytes) ||
        (have_imp && imp.len != (Py_ssize_t)(ngroups * ncols * 4))) {
        PyErr_Format(PyExc_ValueError, "%s: buffer sizes do not match shape (%lld, %lld)", fmt->name, nrows, ncols);
        goto done;
    }
    if (fmt->needs_importance && !have_imp) {
        PyErr_Format(PyExc_ValueError, "%s needs importance weights", fmt->name);
        goto done;
    }
    int64_t bad_row = -1;
    const int nt = resolve_threads(nthreads);
    const char *s = (const char *)src.buf;
    char *d = (char *)dst.buf;
    const float *w = have_imp ? (const float *)imp.buf : NULL;
    const int es = src_elem_size(src_dtype);
    int oom = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef MOEPLAN_OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        float *tmp = (float *)malloc(sizeof(float) * (size_t)ncols);
        if (!tmp) {
#ifdef MOEPLAN_OPENMP
#pragma omp atomic write
#endif
            oom = 1;
        }
#ifdef MOEPLAN_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
        for (int64_t r = 0; r < nrows; r++) {
            if (!tmp) continue;
            const float *row;
            if (!load_row(s + r * ncols * es, src_dtype, ncols, tmp, &row)) {
#ifdef MOEPLAN_OPENMP
#pragma omp critical(mp_bad_row)
#endif
                { if (bad_row < 0 || r < bad_row) bad_row = r; }
                continue;
            }
            fmt->quantize_row(row, d + r * row_bytes, ncols, w ? w + (r / rows_per_group) * ncols : NULL);
        }
        free(tmp);
    }
    (void)nt;
    Py_END_ALLOW_THREADS
    if (oom) { PyErr_NoMemory(); goto done; }
    result = PyLong_FromLongLong(bad_row);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (have_imp) PyBuffer_Release(&imp);
    return result;
}

/* dequantize(type, src, nrows, ncols, dst_float32, nthreads) */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    int type, nthreads;
    long long nrows, ncols;
    PyObject *src_o, *dst_o;
    if (!PyArg_ParseTuple(args, "iOLLOi", &type, &src_o, &nrows, &ncols, &dst_o, &nthreads)) return NULL;
    const mp_format *fmt = get_format_or_raise(type);
    if (!fmt) return NULL;
    if (ncols % fmt->block_size != 0 || nrows < 0 || ncols <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad shape (%lld, %lld)", fmt->name, nrows, ncols);
        return NULL;
    }
    Py_buffer src, dst;
    if (get_buffer(src_o, &src, 0, "data") < 0) return NULL;
    if (get_buffer(dst_o, &dst, 1, "out") < 0) { PyBuffer_Release(&src); return NULL; }
    const int64_t row_bytes = ncols / fmt->block_size * fmt->type_size;
    PyObject *result = NULL;
    if (src.len != (Py_ssize_t)(nrows * row_bytes) || dst.len != (Py_ssize_t)(nrows * ncols * 4)) {
        PyErr_Format(PyExc_ValueError, "%s: buffer sizes do not match shape (%lld, %lld)", fmt->name, nrows, ncols);
        goto done;
    }
    const int nt = resolve_threads(nthreads);
    const char *s = (const char *)src.buf;
    float *d = (float *)dst.buf;
    Py_BEGIN_ALLOW_THREADS
#ifdef MOEPLAN_OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
    for (int64_t r = 0; r < nrows; r++) fmt->dequantize_row(s + r * row_bytes, d + r * ncols, ncols);
    (void)nt;
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* quant_error(types, src, src_dtype, nrows, ncols, importance|None, rows_per_group, err_out, norm_out, nthreads)
 * err_out: float64 (ntypes, ngroups) <- sum over the group's elements of w_j (x - deq(q(x)))^2
 * norm_out: float64 (ngroups,)       <- sum over the group's elements of w_j x^2
 * w_j = importance of column j (1 when importance is None). The dequantized tensor is never
 * materialized: each row is quantized and decoded into per-thread scratch.
 * Returns -1 on success or the index of the first row holding NaN/Inf. */
static PyObject *py_quant_error(PyObject *self, PyObject *args) {
    int src_dtype, nthreads;
    long long nrows, ncols, rows_per_group;
    PyObject *types_o, *src_o, *imp_o, *err_o, *norm_o;
    if (!PyArg_ParseTuple(args, "OOiLLOLOOi", &types_o, &src_o, &src_dtype, &nrows, &ncols, &imp_o,
                          &rows_per_group, &err_o, &norm_o, &nthreads))
        return NULL;
    PyObject *seq = PySequence_Fast(types_o, "types must be a sequence of ggml type ids");
    if (!seq) return NULL;
    const Py_ssize_t ntypes = PySequence_Fast_GET_SIZE(seq);
    if (ntypes < 1 || ntypes > 64) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "quant_error takes 1 to 64 formats");
        return NULL;
    }
    const mp_format *fmts[64];
    int64_t max_row_bytes = 0;
    for (Py_ssize_t i = 0; i < ntypes; i++) {
        long t = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (t == -1 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        fmts[i] = get_format_or_raise((int)t);
        if (!fmts[i]) { Py_DECREF(seq); return NULL; }
        if (ncols % fmts[i]->block_size != 0) {
            PyErr_Format(PyExc_ValueError, "%s: row length %lld is not a multiple of %d", fmts[i]->name, ncols,
                         fmts[i]->block_size);
            Py_DECREF(seq);
            return NULL;
        }
        int64_t rb = ncols / fmts[i]->block_size * fmts[i]->type_size;
        if (rb > max_row_bytes) max_row_bytes = rb;
    }
    Py_DECREF(seq);
    if (nrows < 0 || ncols <= 0 || rows_per_group <= 0) {
        PyErr_Format(PyExc_ValueError, "bad shape (%lld, %lld)", nrows, ncols);
        return NULL;
    }
    Py_buffer src, imp = {0}, err, norm;
    if (get_buffer(src_o, &src, 0, "src") < 0) return NULL;
    int have_imp = imp_o != Py_None;
    if (have_imp && get_buffer(imp_o, &imp, 0, "importance") < 0) { PyBuffer_Release(&src); return NULL; }
    if (get_buffer(err_o, &err, 1, "err_out") < 0) {
        PyBuffer_Release(&src); if (have_imp) PyBuffer_Release(&imp); return NULL;
    }
    if (get_buffer(norm_o, &norm, 1, "norm_out") < 0) {
        PyBuffer_Release(&src); if (have_imp) PyBuffer_Release(&imp); PyBuffer_Release(&err); return NULL;
    }
    const int64_t ngroups = (nrows + rows_per_group - 1) / rows_per_group;
    PyObject *result = NULL;
    if (src.len != (Py_ssize_t)(nrows * ncols * src_elem_size(src_dtype)) ||
        (have_imp && imp.len != (Py_ssize_t)(ngroups * ncols * 4)) ||
        err.len != (Py_ssize_t)(ntypes * ngroups * 8) || norm.len != (Py_ssize_t)(ngroups * 8)) {
        PyErr_Format(PyExc_ValueError, "quant_error: buffer sizes do not match shape (%lld, %lld)", nrows, ncols);
        goto done;
    }
    for (Py_ssize_t i = 0; i < ntypes; i++) {
        if (fmts[i]->needs_importance && !have_imp) {
            PyErr_Format(PyExc_ValueError, "%s needs importance weights", fmts[i]->name);
            goto done;
        }
    }
    double *err_d = (double *)err.buf;
    double *norm_d = (double *)norm.buf;
    memset(err_d, 0, (size_t)(ntypes * ngroups) * sizeof(double));
    memset(norm_d, 0, (size_t)ngroups * sizeof(double));
    int64_t bad_row = -1;
    int oom = 0;
    const int nt = resolve_threads(nthreads);
    const char *s = (const char *)src.buf;
    const float *w_all = have_imp ? (const float *)imp.buf : NULL;
    const int es = src_elem_size(src_dtype);
    Py_BEGIN_ALLOW_THREADS
#ifdef MOEPLAN_OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        float *tmp = (float *)malloc(sizeof(float) * (size_t)ncols);
        float *deq = (float *)malloc(sizeof(float) * (size_t)ncols);
        void *q = malloc((size_t)max_row_bytes);
        double *acc = (double *)calloc((size_t)(ntypes + 1) * (size_t)ngroups, sizeof(double)); /* [ngroups] norm, then err */
        int ok = tmp && deq && q && acc;
        if (!ok) {
#ifdef MOEPLAN_OPENMP
#pragma omp atomic write
#endif
            oom = 1;
        }
#ifdef MOEPLAN_OPENMP
#pragma omp for schedule(dynamic, 4)
#endif
        for (int64_t r = 0; r < nrows; r++) {
            if (!ok) continue;
            const float *row;
            if (!load_row(s + r * ncols * es, src_dtype, ncols, tmp, &row)) {
#ifdef MOEPLAN_OPENMP
#pragma omp critical(mp_bad_row)
#endif
                { if (bad_row < 0 || r < bad_row) bad_row = r; }
                continue;
            }
            const int64_t g = r / rows_per_group;
            const float *w = w_all ? w_all + g * ncols : NULL;
            double nsum = 0.0;
            for (int64_t j = 0; j < ncols; j++) nsum += (double)(w ? w[j] : 1.0f) * (double)row[j] * (double)row[j];
            acc[g] += nsum;
            for (Py_ssize_t i = 0; i < ntypes; i++) {
                fmts[i]->quantize_row(row, q, ncols, w);
                fmts[i]->dequantize_row(q, deq, ncols);
                double esum = 0.0;
                if (w) {
                    for (int64_t j = 0; j < ncols; j++) { const float dlt = row[j] - deq[j]; esum += (double)(w[j] * dlt * dlt); }
                } else {
                    for (int64_t j = 0; j < ncols; j++) { const float dlt = row[j] - deq[j]; esum += (double)(dlt * dlt); }
                }
                acc[(1 + i) * ngroups + g] += esum;
            }
        }
        if (ok) {
#ifdef MOEPLAN_OPENMP
#pragma omp critical(mp_reduce)
#endif
            {
                for (int64_t g = 0; g < ngroups; g++) norm_d[g] += acc[g];
                for (Py_ssize_t i = 0; i < ntypes; i++)
                    for (int64_t g = 0; g < ngroups; g++) err_d[i * ngroups + g] += acc[(1 + i) * ngroups + g];
            }
        }
        free(tmp); free(deq); free(q); free(acc);
    }
    (void)nt;
    Py_END_ALLOW_THREADS
    if (oom) { PyErr_NoMemory(); goto done; }
    result = PyLong_FromLongLong(bad_row);
done:
    PyBuffer_Release(&src);
    if (have_imp) PyBuffer_Release(&imp);
    PyBuffer_Release(&err);
    PyBuffer_Release(&norm);
    return result;
}

/* set_grid(type, grid_float32): install the codebook of an IQ1/IQ2/IQ3 format (points x coordinates) */
static PyObject *py_set_grid(PyObject *self, PyObject *args) {
    int type;
    PyObject *grid_o;
    if (!PyArg_ParseTuple(args, "iO", &type, &grid_o)) return NULL;
    Py_buffer grid;
    if (get_buffer(grid_o, &grid, 0, "grid") < 0) return NULL;
    const Py_ssize_t count = grid.len / 4;
    int rc = grid.len % 4 ? 1 : mp_iq_set_grid(type, (const float *)grid.buf, (int64_t)count);
    PyBuffer_Release(&grid);
    if (rc == 1) return PyErr_Format(PyExc_ValueError, "ggml type %d has no codebook of %zd float32 values", type, count);
    if (rc == 2) return PyErr_Format(PyExc_ValueError, "ggml type %d: grid values are not a set of at most 8 levels", type);
    if (rc == 3) return PyErr_NoMemory();
    if (rc == 4) return PyErr_Format(PyExc_ValueError, "ggml type %d already has a different grid", type);
    Py_RETURN_NONE;
}

static PyObject *py_format_table(PyObject *self, PyObject *noargs) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (size_t f = 0; f < sizeof(mp_families) / sizeof(mp_families[0]); f++) {
        for (const mp_format *p = mp_families[f]; p->name != NULL; p++) {
            PyObject *t = Py_BuildValue("(isiii)", p->type, p->name, p->block_size, p->type_size, p->needs_importance);
            if (!t || PyList_Append(list, t) != 0) { Py_XDECREF(t); Py_DECREF(list); return NULL; }
            Py_DECREF(t);
        }
    }
    return list;
}

static PyObject *py_openmp(PyObject *self, PyObject *noargs) {
#ifdef MOEPLAN_OPENMP
    return Py_BuildValue("(Oi)", Py_True, omp_get_max_threads());
#else
    return Py_BuildValue("(Oi)", Py_False, 1);
#endif
}

static PyMethodDef methods[] = {
    {"quantize", py_quantize, METH_VARARGS, "Quantize rows into GGUF blocks (internal; use kernels.quantize)."},
    {"dequantize", py_dequantize, METH_VARARGS, "Decode GGUF blocks to float32 (internal; use kernels.dequantize)."},
    {"quant_error", py_quant_error, METH_VARARGS, "Weighted squared error of many formats in one pass (internal)."},
    {"set_grid", py_set_grid, METH_VARARGS, "Install a codebook grid (internal; kernels.iq_grids.load does it)."},
    {"format_table", py_format_table, METH_NOARGS, "(type, name, block_size, sizeof(block), needs_importance) per format."},
    {"openmp", py_openmp, METH_NOARGS, "(built with OpenMP, max threads)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_C", "moeplan C quantization kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moduledef); }
