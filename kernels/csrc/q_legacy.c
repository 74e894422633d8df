/* Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: 32-weight blocks with one fp16 scale (and an fp16 min for the _1 types).
 *
 * Without importance the quantizers reproduce the `gguf` package's (and ggml's reference) arithmetic
 * operation for operation, so the bytes are identical:
 *   Q8_0  d = amax/127,        id = 1/d, q = round-half-away(x*id)                  in [-127, 127]
 *   Q4_0  d = max/-8,          id = 1/d, q = min(15, trunc(x*id + 8.5))             stored q, value q-8
 *   Q5_0  d = max/-16,         id = 1/d, q = min(31, trunc(x*id + 16.5))            stored q, value q-16
 *   Q4_1  d = (max-min)/15,    id = 1/d, q = min(15, trunc((x-min)*id + 0.5)),      value d*q + min
 *   Q5_1  d = (max-min)/31,    id = 1/d, q = min(31, trunc((x-min)*id + 0.5)),      value d*q + min
 * where max in Q4_0/Q5_0 is the signed value of largest magnitude (the first one on ties), every
 * operation is one float32 operation in this order, and d (and min) are rounded to fp16 only when
 * stored. Every product/sum is its own statement and contraction is switched off, so no compiler
 * fuses x*id + 8.5 into an FMA (which would change ties).
 *
 * With importance, Q4_0/Q4_1/Q5_0/Q5_1 search the scale (and min) that minimizes
 * sum_j w_j (x_j - deq_j)^2 over the block (w = importance), and keep the plain rule's block wherever
 * the search does not beat its weighted error (so no block gets worse; a block whose importance is all
 * zero takes the plain rule). Q8_0 ignores importance: at 8 bits the amax scale is within a few percent
 * of the weighted optimum, and its bytes stay gguf's.
 */
#pragma STDC FP_CONTRACT OFF
#include "moeplan.h"

/* round half away from zero, exactly (|v| < 2^31): the fraction a - trunc(a) is exact in float32 */
static inline int round_away(float v) {
    const float a = fabsf(v);
    int i = (int)a;
    const float frac = a - (float)i;
    i += frac >= 0.5f;
    return v < 0.0f ? -i : i;
}

/* 1/d as the gguf package computes it, 0 for d == 0. When d is so small (float32-subnormal input)
 * that 1/d overflows, the stored fp16 scale is 0 anyway; 0 keeps every later step finite. */
static inline float inv_scale(float d) {
    if (d == 0.0f) return 0.0f;
    const float id = 1.0f / d;
    return isinf(id) ? 0.0f : id;
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* ------------------------------------------------------------------------------------------------ */
/* weighted scale searches (importance path)                                                         */

/* Symmetric levels q in [-nmax, nmax-1] (Q4_0: nmax 8, Q5_0: 16), value d*q.
 * Tries scales that map the largest-magnitude value to -nmax (and, mirrored, to nmax-1) with small
 * offsets; each candidate's levels give the least-squares scale sum(w x q)/sum(w q^2), and the best
 * (largest sum(w x q)^2 / sum(w q^2), i.e. smallest weighted error) wins. Two nearest-level passes
 * with the fitted scale refine it. The scale is then rounded to fp16 and the levels re-chosen for the
 * rounded scale (nearest level per weight is optimal for a fixed scale). Returns the fp16 scale;
 * L receives q + nmax. */
static mp_half search_symmetric(const float *x, const float *w, int n, int nmax, uint8_t *L) {
    float amax = -1.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) { amax = a; max = x[j]; }
    }
    const float lo = (float)-nmax, hi = (float)(nmax - 1);
    float best_d = 0.0f, best_score = 0.0f;
    if (amax > 1e-30f) { /* below, 1/max overflows and any fp16 scale is 0 */
        /* candidates: max -> -(nmax + 0.1 k), k = -10..10, and max -> (nmax - 1 + 0.1 k), k = -5..5 */
        for (int c = 0; c < 32; c++) {
            float iscale;
            if (c < 21) iscale = -((float)nmax + 0.1f * (float)(c - 10)) / max;
            else iscale = ((float)(nmax - 1) + 0.1f * (float)(c - 26)) / max;
            float sumlx = 0.0f, suml2 = 0.0f;
            for (int j = 0; j < n; j++) {
                const float l = clampf((float)mp_nearest_int(clampf(iscale * x[j], lo - 1.0f, hi + 1.0f)), lo, hi);
                sumlx += w[j] * x[j] * l;
                suml2 += w[j] * l * l;
            }
            if (suml2 > 0.0f && sumlx * sumlx > best_score * suml2) {
                best_score = sumlx * sumlx / suml2;
                best_d = sumlx / suml2;
            }
        }
        for (int it = 0; it < 2 && best_d != 0.0f; it++) {
            const float iscale = 1.0f / best_d;
            float sumlx = 0.0f, suml2 = 0.0f;
            for (int j = 0; j < n; j++) {
                const float l = clampf((float)mp_nearest_int(clampf(iscale * x[j], lo - 1.0f, hi + 1.0f)), lo, hi);
                sumlx += w[j] * x[j] * l;
                suml2 += w[j] * l * l;
            }
            if (suml2 > 0.0f && sumlx * sumlx > best_score * suml2) {
                best_score = sumlx * sumlx / suml2;
                best_d = sumlx / suml2;
            } else {
                break;
            }
        }
    }
    /* a least-squares scale can land just beyond the fp16 range: keep it finite */
    best_d = clampf(best_d, -MP_FP16_SCALE_MAX, MP_FP16_SCALE_MAX);
    const mp_half dh = MP_FP32_TO_FP16(best_d);
    const float d = MP_FP16_TO_FP32(dh);
    const float id = (d != 0.0f && isfinite(d)) ? inv_scale(d) : 0.0f;
    for (int j = 0; j < n; j++) {
        const float l = clampf((float)mp_nearest_int(clampf(id * x[j], lo - 1.0f, hi + 1.0f)), lo, hi);
        L[j] = (uint8_t)((int)l + nmax);
    }
    return dh;
}

/* weighted least squares of x on levels q: x ~ d*q + m; returns 0 when degenerate */
static int fit_affine(float sw, float sq, float sq2, float sx, float sqx, float *d, float *m) {
    const double D = (double)sw * sq2 - (double)sq * sq;
    if (!(D > 0.0)) return 0;
    *d = (float)(((double)sw * sqx - (double)sq * sx) / D);
    *m = (float)(((double)sq2 * sx - (double)sq * sqx) / D);
    return *d > 0.0f;
}

/* Affine levels q in [0, nmax] (Q4_1: 15, Q5_1: 31), value d*q + m, d >= 0.
 * Starts from the plain rule (d = (max-min)/nmax, m = min); candidates spread [min, max] over
 * nmax + 0.25 k steps (k = -6..6); each candidate's levels give the weighted least-squares (d, m), and
 * the smallest weighted error wins; two nearest-level passes with the fitted (d, m) refine it. d and m
 * are rounded to fp16 and the levels re-chosen for the rounded pair. */
static void search_affine(const float *x, const float *w, int n, int nmax, mp_half *dh, mp_half *mh, uint8_t *L) {
    float min = x[0], max = x[0];
    double sw = 0.0, sx = 0.0, sx2 = 0.0;
    for (int j = 0; j < n; j++) {
        if (x[j] < min) min = x[j];
        if (x[j] > max) max = x[j];
        sw += w[j];
        sx += (double)w[j] * x[j];
        sx2 += (double)w[j] * x[j] * x[j];
    }
    float best_d = 0.0f, best_m = min;
    const float range = max - min;
    if (range > 1e-30f && isfinite(range)) { /* below, 1/range overflows and d rounds to 0 */
        best_d = range / (float)nmax;
        double best_err = INFINITY;
        for (int c = 0; c < 13 + 2; c++) {
            float iscale, off;
            if (c < 13) { iscale = ((float)nmax + 0.25f * (float)(c - 6)) / range; off = min; }
            else { iscale = 1.0f / best_d; off = best_m; } /* refinement passes */
            float sq = 0.0f, sq2 = 0.0f, sqx = 0.0f;
            for (int j = 0; j < n; j++) {
                const float l = clampf((float)mp_nearest_int(clampf(iscale * (x[j] - off), -1.0f, (float)nmax + 1.0f)),
                                       0.0f, (float)nmax);
                sq += w[j] * l;
                sq2 += w[j] * l * l;
                sqx += w[j] * l * x[j];
            }
            float d, m;
            if (!fit_affine((float)sw, sq, sq2, (float)sx, sqx, &d, &m)) continue;
            const double err = sx2 - 2.0 * d * sqx - 2.0 * m * sx + (double)d * d * sq2 + 2.0 * d * m * sq +
                               (double)m * m * sw;
            if (err < best_err) { best_err = err; best_d = d; best_m = m; }
        }
    }
    /* a least-squares fit can land just beyond the fp16 range: keep both finite */
    *dh = MP_FP32_TO_FP16(clampf(best_d, 0.0f, MP_FP16_SCALE_MAX));
    *mh = MP_FP32_TO_FP16(clampf(best_m, -MP_FP16_SCALE_MAX, MP_FP16_SCALE_MAX));
    const float d = MP_FP16_TO_FP32(*dh), m = MP_FP16_TO_FP32(*mh);
    const float id = (d > 0.0f && isfinite(d) && isfinite(m)) ? inv_scale(d) : 0.0f;
    for (int j = 0; j < n; j++) {
        const float t = x[j] - m;
        const float l = clampf((float)mp_nearest_int(clampf(t * id, -1.0f, (float)nmax + 1.0f)), 0.0f, (float)nmax);
        L[j] = (uint8_t)l;
    }
}

/* the importance of one block, or NULL when it carries no weight at all (then the block is quantized
 * by the plain rule: its weighted error is zero whatever it stores) */
static const float *block_weights(const float *imp, int n) {
    if (!imp) return NULL;
    float s = 0.0f;
    for (int j = 0; j < n; j++) s += imp[j];
    return s > 0.0f ? imp : NULL;
}

/* ------------------------------------------------------------------------------------------------ */
/* Q8_0                                                                                              */

/* importance is ignored (see the file comment) */
static void quantize_row_q8_0(const float *x, void *vy, int64_t n, const float *imp) {
    (void)imp;
    block_q8_0 *y = (block_q8_0 *)vy;
    for (int64_t b = 0; b < n / QK8_0; b++, x += QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) {
            const float a = fabsf(x[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = inv_scale(d);
        y[b].d = MP_FP32_TO_FP16(d);
        for (int j = 0; j < QK8_0; j++) {
            const float v = x[j] * id;
            y[b].qs[j] = (int8_t)round_away(v);
        }
    }
}

static void dequantize_row_q8_0(const void *vx, float *y, int64_t n) {
    const block_q8_0 *x = (const block_q8_0 *)vx;
    for (int64_t b = 0; b < n / QK8_0; b++, y += QK8_0) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int j = 0; j < QK8_0; j++) y[j] = (float)x[b].qs[j] * d;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Q4_0 / Q5_0: symmetric                                                                            */

/* the gguf rule: d = max / -nmax; stored level = min(2 nmax - 1, trunc(x/d + nmax + 0.5)) */
static mp_half plain_symmetric(const float *x, int n, int nmax, uint8_t *L) {
    float amax = -1.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) { amax = a; max = x[j]; }
    }
    const float d = max / (float)-nmax;
    const float id = inv_scale(d);
    const float off = (float)nmax + 0.5f;
    const int top = 2 * nmax - 1;
    for (int j = 0; j < n; j++) {
        const float t = x[j] * id;
        const float u = t + off;
        L[j] = (uint8_t)(u < (float)top ? (int)u : top); /* = min(top, trunc(u)); u >= 0 */
    }
    return MP_FP32_TO_FP16(d);
}

/* weighted squared error of the decoded block, in the dequantizer's arithmetic */
static float sse_symmetric(const float *x, const float *w, int n, int nmax, mp_half dh, const uint8_t *L) {
    const float d = MP_FP16_TO_FP32(dh);
    float e = 0.0f;
    for (int j = 0; j < n; j++) {
        const float y = (float)((int)L[j] - nmax) * d;
        const float r = x[j] - y;
        e += w[j] * r * r;
    }
    return e;
}

/* the plain rule without importance; with importance, the weighted search unless the plain rule's
 * weighted error is lower (so a weighted block is never worse than the plain one) */
static mp_half quantize_symmetric(const float *x, const float *w, int n, int nmax, uint8_t *L) {
    const mp_half dp = plain_symmetric(x, n, nmax, L);
    if (!w) return dp;
    uint8_t Ls[32];
    const mp_half ds = search_symmetric(x, w, n, nmax, Ls);
    if (sse_symmetric(x, w, n, nmax, ds, Ls) < sse_symmetric(x, w, n, nmax, dp, L)) {
        memcpy(L, Ls, (size_t)n);
        return ds;
    }
    return dp;
}

static void quantize_row_q4_0(const float *x, void *vy, int64_t n, const float *imp) {
    block_q4_0 *y = (block_q4_0 *)vy;
    uint8_t L[QK4_0];
    for (int64_t b = 0; b < n / QK4_0; b++, x += QK4_0) {
        const float *w = block_weights(imp ? imp + b * QK4_0 : NULL, QK4_0);
        y[b].d = quantize_symmetric(x, w, QK4_0, 8, L);
        for (int j = 0; j < QK4_0 / 2; j++) y[b].qs[j] = (uint8_t)(L[j] | (L[j + QK4_0 / 2] << 4));
    }
}

static void dequantize_row_q4_0(const void *vx, float *y, int64_t n) {
    const block_q4_0 *x = (const block_q4_0 *)vx;
    for (int64_t b = 0; b < n / QK4_0; b++, y += QK4_0) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = (float)((x[b].qs[j] & 0x0f) - 8) * d;
            y[j + QK4_0 / 2] = (float)((x[b].qs[j] >> 4) - 8) * d;
        }
    }
}

static void pack_q5(const uint8_t *L, uint8_t *qs, uint8_t *qh) {
    uint32_t h = 0;
    for (int j = 0; j < 32; j++) h |= (uint32_t)(L[j] >> 4) << j;
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((L[j] & 0x0f) | ((L[j + 16] & 0x0f) << 4));
    for (int k = 0; k < 4; k++) qh[k] = (uint8_t)(h >> (8 * k)); /* little-endian uint32 */
}

static inline uint32_t load_qh(const uint8_t *qh) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

static void quantize_row_q5_0(const float *x, void *vy, int64_t n, const float *imp) {
    block_q5_0 *y = (block_q5_0 *)vy;
    uint8_t L[QK5_0];
    for (int64_t b = 0; b < n / QK5_0; b++, x += QK5_0) {
        const float *w = block_weights(imp ? imp + b * QK5_0 : NULL, QK5_0);
        y[b].d = quantize_symmetric(x, w, QK5_0, 16, L);
        pack_q5(L, y[b].qs, y[b].qh);
    }
}

static void dequantize_row_q5_0(const void *vx, float *y, int64_t n) {
    const block_q5_0 *x = (const block_q5_0 *)vx;
    for (int64_t b = 0; b < n / QK5_0; b++, y += QK5_0) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        const uint32_t h = load_qh(x[b].qh);
        for (int j = 0; j < 16; j++) {
            const int q0 = (x[b].qs[j] & 0x0f) | (int)(((h >> j) & 1u) << 4);
            const int q1 = (x[b].qs[j] >> 4) | (int)(((h >> (j + 16)) & 1u) << 4);
            y[j] = (float)(q0 - 16) * d;
            y[j + 16] = (float)(q1 - 16) * d;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Q4_1 / Q5_1: affine                                                                               */

/* the gguf rule: d = (max - min)/nmax; level = min(nmax, trunc((x - min)/d + 0.5)).
 * min/max keep the later element on equal values, as numpy's minimum/maximum reductions do (this
 * only decides the sign of a zero min). */
static void plain_affine(const float *x, int n, int nmax, mp_half *dh, mp_half *mh, uint8_t *L) {
    float min = x[0], max = x[0];
    for (int j = 1; j < n; j++) {
        min = min < x[j] ? min : x[j];
        max = max > x[j] ? max : x[j];
    }
    const float range = max - min;
    const float d = range / (float)nmax;
    const float id = inv_scale(d);
    for (int j = 0; j < n; j++) {
        const float t = x[j] - min;
        const float s = t * id;
        const float u = s + 0.5f;
        L[j] = (uint8_t)(u < (float)nmax ? (int)u : nmax); /* = min(nmax, trunc(u)); also for NaN from inf*0 */
    }
    *dh = MP_FP32_TO_FP16(d);
    *mh = MP_FP32_TO_FP16(min);
}

static float sse_affine(const float *x, const float *w, int n, mp_half dh, mp_half mh, const uint8_t *L) {
    const float d = MP_FP16_TO_FP32(dh), m = MP_FP16_TO_FP32(mh);
    float e = 0.0f;
    for (int j = 0; j < n; j++) {
        const float t = (float)L[j] * d;
        const float y = t + m;
        const float r = x[j] - y;
        e += w[j] * r * r;
    }
    return e;
}

/* as quantize_symmetric: plain rule, or with importance the better of search and plain rule */
static void quantize_affine(const float *x, const float *w, int n, int nmax, mp_half *dh, mp_half *mh, uint8_t *L) {
    plain_affine(x, n, nmax, dh, mh, L);
    if (!w) return;
    uint8_t Ls[32];
    mp_half ds, ms;
    search_affine(x, w, n, nmax, &ds, &ms, Ls);
    if (sse_affine(x, w, n, ds, ms, Ls) < sse_affine(x, w, n, *dh, *mh, L)) {
        memcpy(L, Ls, (size_t)n);
        *dh = ds;
        *mh = ms;
    }
}

static void quantize_row_q4_1(const float *x, void *vy, int64_t n, const float *imp) {
    block_q4_1 *y = (block_q4_1 *)vy;
    uint8_t L[QK4_1];
    for (int64_t b = 0; b < n / QK4_1; b++, x += QK4_1) {
        const float *w = block_weights(imp ? imp + b * QK4_1 : NULL, QK4_1);
        quantize_affine(x, w, QK4_1, 15, &y[b].d, &y[b].m, L);
        for (int j = 0; j < QK4_1 / 2; j++) y[b].qs[j] = (uint8_t)(L[j] | (L[j + QK4_1 / 2] << 4));
    }
}

static void dequantize_row_q4_1(const void *vx, float *y, int64_t n) {
    const block_q4_1 *x = (const block_q4_1 *)vx;
    for (int64_t b = 0; b < n / QK4_1; b++, y += QK4_1) {
        const float d = MP_FP16_TO_FP32(x[b].d), m = MP_FP16_TO_FP32(x[b].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            const float t0 = (float)(x[b].qs[j] & 0x0f) * d;
            const float t1 = (float)(x[b].qs[j] >> 4) * d;
            y[j] = t0 + m;
            y[j + QK4_1 / 2] = t1 + m;
        }
    }
}

static void quantize_row_q5_1(const float *x, void *vy, int64_t n, const float *imp) {
    block_q5_1 *y = (block_q5_1 *)vy;
    uint8_t L[QK5_1];
    for (int64_t b = 0; b < n / QK5_1; b++, x += QK5_1) {
        const float *w = block_weights(imp ? imp + b * QK5_1 : NULL, QK5_1);
        quantize_affine(x, w, QK5_1, 31, &y[b].d, &y[b].m, L);
        pack_q5(L, y[b].qs, y[b].qh);
    }
}

static void dequantize_row_q5_1(const void *vx, float *y, int64_t n) {
    const block_q5_1 *x = (const block_q5_1 *)vx;
    for (int64_t b = 0; b < n / QK5_1; b++, y += QK5_1) {
        const float d = MP_FP16_TO_FP32(x[b].d), m = MP_FP16_TO_FP32(x[b].m);
        const uint32_t h = load_qh(x[b].qh);
        for (int j = 0; j < 16; j++) {
            const int q0 = (x[b].qs[j] & 0x0f) | (int)(((h >> j) & 1u) << 4);
            const int q1 = (x[b].qs[j] >> 4) | (int)(((h >> (j + 16)) & 1u) << 4);
            const float t0 = (float)q0 * d;
            const float t1 = (float)q1 * d;
            y[j] = t0 + m;
            y[j + 16] = t1 + m;
        }
    }
}

const mp_format mp_formats_legacy[] = {
    {MP_Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0), 0, quantize_row_q4_0, dequantize_row_q4_0, 8.f * MP_FP16_SCALE_MAX},
    {MP_Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1), 0, quantize_row_q4_1, dequantize_row_q4_1, MP_FP16_SCALE_MAX /* the fp16 min */},
    {MP_Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0), 0, quantize_row_q5_0, dequantize_row_q5_0, 16.f * MP_FP16_SCALE_MAX},
    {MP_Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1), 0, quantize_row_q5_1, dequantize_row_q5_1, MP_FP16_SCALE_MAX /* the fp16 min */},
    {MP_Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0), 0, quantize_row_q8_0, dequantize_row_q8_0, 127.f * MP_FP16_SCALE_MAX},
    MP_FORMAT_END,
};
