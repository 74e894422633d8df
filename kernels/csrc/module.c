/* moeplan.kernels._C: the Python binding of the quantization kernels.
 *
 * The Python layer (kernels/api.py) validates shapes, dtypes and contiguity and hands over
 * C-contiguous buffers; this file parallelizes over rows, converts F16/BF16 rows to float32
 * one row at a time (never a full float32 copy of the tensor), and releases the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
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
 * Returns 0 when a value is NaN, Inf or beyond max_abs (the format's range, mp_max_abs): one
 * comparison per value, !(|x| <= max_abs), catches all three. */
static int load_row(const void *src, int src_dtype, int64_t ncols, float *out, const float **row, float max_abs) {
    int ok = 1;
    if (src_dtype == SRC_F32) {
        const float *s = (const float *)src;
        /* 8 independent lanes: the compiler keeps the comparisons in vector registers */
        int lane[8] = {1, 1, 1, 1, 1, 1, 1, 1};
        int64_t j = 0;
        for (; j + 8 <= ncols; j += 8)
            for (int q = 0; q < 8; q++) lane[q] &= fabsf(s[j + q]) <= max_abs;
        for (; j < ncols; j++) ok &= fabsf(s[j]) <= max_abs;
        for (int q = 0; q < 8; q++) ok &= lane[q];
        *row = s;
    } else if (src_dtype == SRC_F16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < ncols; j++) {
            out[j] = mp_fp16_to_fp32(s[j]);
            ok &= fabsf(out[j]) <= max_abs;
        }
        *row = out;
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t j = 0; j < ncols; j++) {
            out[j] = mp_bf16_to_fp32(s[j]);
            ok &= fabsf(out[j]) <= max_abs;
        }
        *row = out;
    }
    return ok;
}

/* The largest |x| a format encodes: its fp16 scale(s) at most 65504 times its largest level, or
 * the float format's largest finite value (after rounding). Codebook formats read their grid. */
float mp_iq_max_abs(int type);

static float format_max_abs(const mp_format *fmt) {
    return fmt->max_abs > 0.f ? fmt->max_abs : mp_iq_max_abs(fmt->type);
}

/* The importance as the kernels see it: each block of `block` columns multiplied by the power of two
 * that brings its largest weight into [1, 2) (a block of zeros stays zero). Scaling by a power of two
 * is exact and every quantizer's choice is invariant to a common factor of its block's weights, so the
 * bytes do not change; but sums of w x^2 can no longer overflow (importance up to FLT_MAX) and
 * subnormal importance is no longer lost to underflow. Returns NULL when out of memory. */
static float *normalized_importance(const float *w, int64_t n, int block) {
    float *out = (float *)malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    if (!out) return NULL;
    for (int64_t b = 0; b < n; b += block) {
        float m = 0.f;
        for (int j = 0; j < block; j++) m = w[b + j] > m ? w[b + j] : m;
        const int e = m > 0.f ? ilogbf(m) : 0;
        for (int j = 0; j < block; j++) out[b + j] = ldexpf(w[b + j], -e);
    }
    return out;
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
    float *wn = NULL; /* normalized importance */
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
    if (have_imp && fmt->block_size > 1) {
        wn = normalized_importance((const float *)imp.buf, ngroups * ncols, fmt->block_size);
        if (!wn) { PyErr_NoMemory(); goto done; }
    }
    const float *w = wn ? wn : (have_imp ? (const float *)imp.buf : NULL);
    const float max_abs = format_max_abs(fmt);
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
            if (!load_row(s + r * ncols * es, src_dtype, ncols, tmp, &row, max_abs)) {
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
    free(wn);
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
    const float *wq[64] = {NULL}; /* per format: the importance its quantizer sees (normalized per block) */
    float *wn[3] = {NULL, NULL, NULL};
    int wn_block[3] = {0, 0, 0};
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
    float max_abs = FLT_MAX;
    for (Py_ssize_t i = 0; i < ntypes; i++) {
        const float m = format_max_abs(fmts[i]);
        max_abs = m < max_abs ? m : max_abs;
        wq[i] = w_all;
        if (!w_all || fmts[i]->block_size == 1) continue;
        int k = 0; /* one normalized copy per block size (1, 32 and 256 are all there are) */
        while (k < 3 && wn_block[k] != 0 && wn_block[k] != fmts[i]->block_size) k++;
        if (k == 3) continue; /* not reached */
        if (wn_block[k] == 0) {
            wn[k] = normalized_importance(w_all, ngroups * ncols, fmts[i]->block_size);
            if (!wn[k]) { PyErr_NoMemory(); goto done; }
            wn_block[k] = fmts[i]->block_size;
        }
        wq[i] = wn[k];
    }
    /* each row's sums (norm, then one per format), added up in row order after the parallel loop:
     * the result does not depend on the thread count or on which thread took which row */
    const int64_t stride = (int64_t)ntypes + 1;
    double *rowsum = (double *)calloc((size_t)nrows * (size_t)stride, sizeof(double));
    if (!rowsum) { PyErr_NoMemory(); goto done; }
    Py_BEGIN_ALLOW_THREADS
#ifdef MOEPLAN_OPENMP
#pragma omp parallel num_threads(nt)
#endif
    {
        float *tmp = (float *)malloc(sizeof(float) * (size_t)ncols);
        float *deq = (float *)malloc(sizeof(float) * (size_t)ncols);
        void *q = malloc((size_t)max_row_bytes);
        int ok = tmp && deq && q;
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
            if (!load_row(s + r * ncols * es, src_dtype, ncols, tmp, &row, max_abs)) {
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
            double *sums = rowsum + r * stride;
            sums[0] = nsum;
            for (Py_ssize_t i = 0; i < ntypes; i++) {
                fmts[i]->quantize_row(row, q, ncols, wq[i] ? wq[i] + g * ncols : NULL);
                fmts[i]->dequantize_row(q, deq, ncols);
                /* in double: w (up to FLT_MAX) times a squared difference neither overflows nor
                 * underflows (float32 would for |dlt| > 1.8e19 or < 1e-23) */
                double esum = 0.0;
                if (w) {
                    for (int64_t j = 0; j < ncols; j++) {
                        const double dlt = (double)row[j] - (double)deq[j];
                        esum += (double)w[j] * (dlt * dlt);
                    }
                } else {
                    for (int64_t j = 0; j < ncols; j++) {
                        const double dlt = (double)row[j] - (double)deq[j];
                        esum += dlt * dlt;
                    }
                }
                sums[1 + i] = esum;
            }
        }
        free(tmp); free(deq); free(q);
    }
    (void)nt;
    for (int64_t r = 0; r < nrows; r++) { /* in row order (a bad row's sums are zeros; it is reported) */
        const int64_t g = r / rows_per_group;
        const double *sums = rowsum + r * stride;
        norm_d[g] += sums[0];
        for (Py_ssize_t i = 0; i < ntypes; i++) err_d[i * ngroups + g] += sums[1 + i];
    }
    Py_END_ALLOW_THREADS
    free(rowsum);
    if (oom) { PyErr_NoMemory(); goto done; }
    result = PyLong_FromLongLong(bad_row);
done:
    for (int k = 0; k < 3; k++) free(wn[k]);
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

/* format_range(type): the largest |x| the format encodes (values beyond it are refused) */
static PyObject *py_format_range(PyObject *self, PyObject *args) {
    int type;
    if (!PyArg_ParseTuple(args, "i", &type)) return NULL;
    const mp_format *fmt = get_format_or_raise(type);
    if (!fmt) return NULL;
    return PyFloat_FromDouble((double)format_max_abs(fmt));
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
    {"format_range", py_format_range, METH_VARARGS, "Largest |x| a format encodes (internal; use kernels.api.format_range)."},
    {"openmp", py_openmp, METH_NOARGS, "(built with OpenMP, max threads)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_C", "moeplan C quantization kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&moduledef); }
