/* IQ4_NL, IQ4_XS: 4-bit indices into a fixed non-linear grid of 16 values.
 *
 * IQ4_NL: 32-weight blocks, value d * grid[q], d fp16.
 * IQ4_XS: 256-weight super-blocks of eight 32-weight sub-blocks, value d * (l_b - 32) * grid[q] with a
 *   6-bit sub-block scale l_b (low 4 bits in scales_l, 2 high bits in scales_h) under an fp16 d.
 *   qs of sub-block b: byte 16 b + j holds weight j (low nibble) and weight j + 16 (high nibble).
 *
 * Quantization minimizes sum_j w_j (x_j - deq_j)^2: w_j = importance_j with importance, w_j = 1
 * without. (Plain squared error: on 4096 x 4096 gaussian data it gives RMSE/std 0.0738 where ggml's
 * x^2 weighting gives 0.0761, and 0.0979 vs 0.101 on Student-t data.) A block (IQ4_XS: super-block)
 * whose importance is all zero uses w_j = 1.
 * IQ4_NL: a scale search per block (iq4_search); the searched scale and the simple rule's max/-127 are
 *   rounded to fp16, every weight takes the grid value nearest to x/d, and the smaller error wins.
 * IQ4_XS: the same search per sub-block gives a real scale s_b; candidate super-scales d (the simple
 *   rule's among them) quantize them to l_b = round(s_b/d), or l_b +- 1 where that decodes better, plus
 *   one least-squares refit of d; the candidate with the smallest super-block error wins.
 * Then the scale is made unbiased (gain_correction: importance-weighted gain 1, as debias.c does for
 *   the other formats) and every weight takes again the grid value nearest to it at the rescaled
 *   fp16 scale; a rescale that would make the block's error exceed the simple rule's is not kept.
 * So neither format is ever worse than its simple rule, block by block, and every weight sits on the
 * grid value nearest to it at the stored scale.
 */

#pragma STDC FP_CONTRACT OFF
#include "moeplan.h"

static const int8_t iq4_grid[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
static const float iq4_gridf[16] = {-127.f, -104.f, -83.f, -65.f, -49.f, -35.f, -22.f, -10.f,
                                    1.f,    13.f,   25.f,  38.f,  53.f,  69.f,  89.f,  113.f};

/* Index of the grid value nearest to v, for v in [-128, 128): entry t + 256 answers for
 * v in [t/2, (t+1)/2). Every midpoint between neighbouring grid values is a multiple of 1/2, so no
 * midpoint lies inside a cell; the entry is the nearest index to the cell's centre t/2 + 1/4. */
static const uint8_t iq4_nearest_lut[512] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
    3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
    4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5,
    5, 5, 5, 5, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6,
    7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8,
    8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
    9, 9, 9, 9, 9, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 11,
    11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 11, 12, 12, 12, 12, 12,
    12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13,
    13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 14, 14,
    14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14,
    14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
    15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
};

static inline int iq4_nearest(float v) {
    float t = 2.0f * v + 256.0f;
    t = t > 0.0f ? t : 0.0f;
    t = t < 511.0f ? t : 511.0f;
    return iq4_nearest_lut[(int)t];
}

/* search sizes: candidates per block put the largest |x| on -127 + t, |t| <= IQ4_NTRY, or on 113 + t,
 * |t| <= IQ4_MIRROR; IQ4_REFINE least-squares passes; IQ4_XS_CAND super-scale candidates. Measured on
 * 4096 x 4096 gaussian data: fewer tries cost about 0.0004 RMSE/std and gain 1.5x in speed. */
#define IQ4_NTRY 7
#define IQ4_MIRROR 3
#define IQ4_REFINE 2
#define IQ4_XS_CAND 4

/* sum w x g and sum w g^2 over the nearest grid values g of x * iscale (n a multiple of 4; four
 * partial sums keep the adds independent) */
static inline float grid_value(float s2, float x) {
    float t = s2 * x + 256.0f;
    t = t > 0.0f ? t : 0.0f;
    t = t < 511.0f ? t : 511.0f;
    return iq4_gridf[iq4_nearest_lut[(int)t]];
}

static inline void grid_sums(const float *x, const float *w, int n, float iscale, float *sqx, float *sq2) {
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const float s2 = 2.0f * iscale;
    for (int j = 0; j < n; j += 4) {
        for (int u = 0; u < 4; u++) {
            const float g = grid_value(s2, x[j + u]);
            const float wg = w[j + u] * g;
            a[u] += wg * x[j + u];
            b[u] += wg * g;
        }
    }
    *sqx = (a[0] + a[1]) + (a[2] + a[3]);
    *sq2 = (b[0] + b[1]) + (b[2] + b[3]);
}

/* signed value of largest magnitude (the first one on ties) */
static inline float signed_max(const float *x, int n) {
    float amax = -1.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        const float a = fabsf(x[j]);
        if (a > amax) { amax = a; max = x[j]; }
    }
    return max;
}

/* Scale search for one 32-weight block: candidate scales put the value of largest magnitude on
 * -127 + t (t = -IQ4_NTRY..IQ4_NTRY) or on 113 + t (t = -IQ4_MIRROR..IQ4_MIRROR); the nearest grid
 * values of each candidate give the least-squares scale sum(w x g)/sum(w g^2) and the error reduction
 * sum(w x g)^2/sum(w g^2); the largest reduction wins. Nearest-value passes with the fitted scale then
 * refine it. Returns the scale, 0 for an all-zero block. */
static float iq4_search(const float *x, const float *w, int n) {
    const float max = signed_max(x, n);
    if (fabsf(max) < 1e-30f) return 0.0f; /* below, 1/max overflows; every fp16 scale would be 0 */
    float best_d = 0.0f, best = 0.0f;
    for (int c = -IQ4_NTRY; c <= IQ4_NTRY + 2 * IQ4_MIRROR + 1; c++) {
        const float target = c <= IQ4_NTRY ? -127.0f + (float)c : 113.0f + (float)(c - IQ4_NTRY - 1 - IQ4_MIRROR);
        float sqx, sq2;
        grid_sums(x, w, n, target / max, &sqx, &sq2);
        if (sq2 > 0.0f && sqx * sqx > best * sq2) { best = sqx * sqx / sq2; best_d = sqx / sq2; }
    }
    for (int it = 0; it < IQ4_REFINE && best_d != 0.0f; it++) {
        float sqx, sq2;
        grid_sums(x, w, n, 1.0f / best_d, &sqx, &sq2);
        if (sq2 > 0.0f && sqx * sqx > best * sq2) { best = sqx * sqx / sq2; best_d = sqx / sq2; }
        else break;
    }
    return best_d;
}

/* the weights of one block of n: the importance, or 1 without importance or when it is all zero there */
static void block_weights(const float *imp, int n, float *w) {
    if (imp) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += imp[j];
        if (s > 0.0f) {
            memcpy(w, imp, (size_t)n * sizeof(float));
            return;
        }
    }
    for (int j = 0; j < n; j++) w[j] = 1.0f;
}

static inline mp_half scale_to_fp16(float d) {
    /* keep the stored scale finite: beyond the fp16 range the block saturates instead of turning inf */
    if (d > 65504.0f) d = 65504.0f;
    if (d < -65504.0f) d = -65504.0f;
    return MP_FP32_TO_FP16(d);
}

/* Unbiased scales (kernels/csrc/debias.c explains why): after the search, the scale is multiplied by
 * c = sum w x^2 / sum w x x_hat (clamped to [0.5, 2]) and every weight takes again the grid value
 * nearest to it at the new fp16 scale, so the stored scale and the points agree (each weight on the
 * grid value nearest to it at the stored scale, as without the rescale). Re-choosing the points moves
 * the gain a little, so this is done IQ4_DEBIAS_PASSES times. A rescaled block is kept only when its
 * error stays at or below the simple rule's, so neither format is ever worse than the simple rule.
 * This returns c for one run of n weights decoded by dec (or 1 when it is undefined). */
#define IQ4_DEBIAS_PASSES 2

static float gain_correction(const float *x, const float *w, const float *dec, int n) {
    double num = 0.0, den = 0.0;
    for (int j = 0; j < n; j++) {
        num += (double)w[j] * (double)x[j] * (double)x[j];
        den += (double)w[j] * (double)x[j] * (double)dec[j];
    }
    if (!(num > 0.0) || !(den > 0.0) || !isfinite(num) || !isfinite(den)) return 1.0f;
    double c = num / den;
    c = c < 0.5 ? 0.5 : c > 2.0 ? 2.0 : c;
    return (float)c;
}

/* ---- IQ4_NL ---- */

/* nearest grid indices of x for the fp16 scale dh, and their weighted squared error (decoded as the
 * dequantizer does) */
static float nl_assign(const float *x, const float *w, int n, mp_half dh, uint8_t *idx) {
    const float d = MP_FP16_TO_FP32(dh);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    float e = 0.0f;
    for (int j = 0; j < n; j++) {
        idx[j] = (uint8_t)iq4_nearest(id * x[j]);
        const float r = x[j] - d * iq4_gridf[idx[j]];
        e += w[j] * r * r;
    }
    return e;
}

static void quantize_row_iq4_nl(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq4_nl *y = (block_iq4_nl *)vy;
    float w[QK4_NL];
    uint8_t idx[QK4_NL], idx_simple[QK4_NL], idx_try[QK4_NL];
    for (int64_t b = 0; b < n / QK4_NL; b++, x += QK4_NL) {
        block_weights(imp ? imp + b * QK4_NL : NULL, QK4_NL, w);
        const mp_half ds = scale_to_fp16(iq4_search(x, w, QK4_NL));
        /* the searched scale, rounded, against the simple rule max/-127: the smaller error wins, so no
         * block is worse than the simple rule */
        const mp_half dr = scale_to_fp16(signed_max(x, QK4_NL) / -127.0f);
        const float es = nl_assign(x, w, QK4_NL, ds, idx);
        const float er = nl_assign(x, w, QK4_NL, dr, idx_simple);
        mp_half d = es <= er ? ds : dr;
        uint8_t *q = es <= er ? idx : idx_simple;
        /* unbiased scale, points chosen again at it (gain_correction) */
        for (int pass = 0; pass < IQ4_DEBIAS_PASSES; pass++) {
            const float df = MP_FP16_TO_FP32(d);
            float dec[QK4_NL];
            for (int j = 0; j < QK4_NL; j++) dec[j] = df * iq4_gridf[q[j]];
            const float c = gain_correction(x, w, dec, QK4_NL);
            if (c == 1.0f) break;
            const mp_half d2 = mp_half_scaled(d, c);
            if (d2 == d) break;
            const float e2 = nl_assign(x, w, QK4_NL, d2, idx_try);
            if (!(e2 <= er)) break;
            memcpy(idx, idx_try, sizeof(idx));
            q = idx;
            d = d2;
        }
        y[b].d = d;
        for (int j = 0; j < QK4_NL / 2; j++) y[b].qs[j] = (uint8_t)(q[j] | (q[j + QK4_NL / 2] << 4));
    }
}

static void dequantize_row_iq4_nl(const void *vx, float *y, int64_t n) {
    const block_iq4_nl *x = (const block_iq4_nl *)vx;
    for (int64_t b = 0; b < n / QK4_NL; b++, y += QK4_NL) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int j = 0; j < QK4_NL / 2; j++) {
            y[j] = d * (float)iq4_grid[x[b].qs[j] & 0x0f];
            y[j + QK4_NL / 2] = d * (float)iq4_grid[x[b].qs[j] >> 4];
        }
    }
}

/* ---- IQ4_XS ---- */

/* weighted squared error of sub-block x (32) decoded at scale dl with the nearest grid values,
 * summed from the residuals (not from expanded sums, which would cancel) */
static inline float sub_error(const float *x, const float *w, float swx2, float dl) {
    if (dl == 0.0f) return swx2;
    const float s2 = 2.0f / dl;
    float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < 32; j += 4) {
        for (int u = 0; u < 4; u++) {
            const float g = grid_value(s2, x[j + u]);
            const float r = x[j + u] - dl * g;
            e[u] += w[j + u] * r * r;
        }
    }
    return (e[0] + e[1]) + (e[2] + e[3]);
}

static void quantize_row_iq4_xs(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq4_xs *y = (block_iq4_xs *)vy;
    /* ws: weights of the sub-block searches (1 where a sub-block's importance is all zero, so that it
     * still gets a sensible scale); wt: the weights of the objective (the importance itself, or 1 without
     * importance or when the whole super-block's importance is zero) */
    float ws[QK_K], ones[QK_K], s[QK_K / 32], s_simple[QK_K / 32], swx2[QK_K / 32];
    int l_best[QK_K / 32], l_try[QK_K / 32];
    for (int j = 0; j < QK_K; j++) ones[j] = 1.0f;
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        const float *ib = imp ? imp + b * QK_K : NULL;
        float isum = 0.0f;
        for (int j = 0; ib && j < QK_K; j++) isum += ib[j];
        const float *wt = ib && isum > 0.0f ? ib : ones;
        float smax = 0.0f, samax = 0.0f, rmax = 0.0f, ramax = 0.0f;
        for (int k = 0; k < QK_K / 32; k++) {
            const float *xb = x + 32 * k;
            block_weights(wt == ones ? NULL : wt + 32 * k, 32, ws + 32 * k);
            s[k] = iq4_search(xb, ws + 32 * k, 32);
            s_simple[k] = signed_max(xb, 32) / -127.0f;
            if (fabsf(s[k]) > samax) { samax = fabsf(s[k]); smax = s[k]; }
            if (fabsf(s_simple[k]) > ramax) { ramax = fabsf(s_simple[k]); rmax = s_simple[k]; }
            float e = 0.0f;
            for (int j = 0; j < 32; j++) e += wt[32 * k + j] * xb[j] * xb[j];
            swx2[k] = e;
        }
        float best_total = INFINITY, best_d = 0.0f, simple_total = 0.0f;
        for (int k = 0; k < QK_K / 32; k++) simple_total += swx2[k]; /* the simple rule at d = 0 */
        for (int k = 0; k < QK_K / 32; k++) l_best[k] = 0;
        /* candidate super-scales: c = -1 the simple rule (sub-block scales max/-127, the largest of them
         * on -32), so no super-block is worse than it; c = 0..C-1 put the largest searched sub-block scale
         * on -32 + c/2; c = C one refit, the least-squares d for the best candidate's integer scales and
         * grid values. Each sub-block takes l = round(s_b/d) or l +- 1, whichever decodes better. */
        for (int c = -1; c <= IQ4_XS_CAND && (samax > 0.0f || ramax > 0.0f); c++) {
            float d;
            const float *src = c < 0 ? s_simple : s;
            if (c < 0) d = rmax / -32.0f;
            else if (c < IQ4_XS_CAND) d = smax / (-32.0f + 0.5f * (float)c);
            else {
                if (best_d == 0.0f) break;
                float num = 0.0f, den = 0.0f;
                for (int k = 0; k < QK_K / 32; k++) {
                    if (l_best[k] == 0) continue;
                    float sqx, sq2;
                    grid_sums(x + 32 * k, wt + 32 * k, 32, 1.0f / (best_d * (float)l_best[k]), &sqx, &sq2);
                    num += (float)l_best[k] * sqx;
                    den += (float)(l_best[k] * l_best[k]) * sq2;
                }
                if (!(den > 0.0f)) break;
                d = num / den;
            }
            const float dh = MP_FP16_TO_FP32(scale_to_fp16(d));
            if (dh == 0.0f) continue;
            float total = 0.0f;
            for (int k = 0; k < QK_K / 32; k++) {
                float r = src[k] / dh;
                r = r > -33.0f ? r : -33.0f;
                r = r < 32.0f ? r : 32.0f;
                int l0 = mp_nearest_int(r);
                l0 = l0 < -32 ? -32 : (l0 > 31 ? 31 : l0);
                float eb = sub_error(x + 32 * k, wt + 32 * k, swx2[k], dh * (float)l0);
                int lb = l0;
                for (int step = -1; step <= 1; step += 2) {
                    const int l = l0 + step;
                    if (l < -32 || l > 31) continue;
                    const float e = sub_error(x + 32 * k, wt + 32 * k, swx2[k], dh * (float)l);
                    if (e < eb) { eb = e; lb = l; }
                }
                l_try[k] = lb;
                total += eb;
            }
            if (c < 0) simple_total = total;
            if (total < best_total) {
                best_total = total;
                best_d = dh;
                for (int k = 0; k < QK_K / 32; k++) l_best[k] = l_try[k];
            }
        }
        mp_half dstore = MP_FP32_TO_FP16(best_d); /* best_d is already an fp16 value */
        /* unbiased super-scale, points chosen again at it (gain_correction) */
        for (int pass = 0; pass < IQ4_DEBIAS_PASSES && best_d != 0.0f; pass++) {
            float dec[QK_K];
            for (int k = 0; k < QK_K / 32; k++) {
                const float dl = best_d * (float)l_best[k];
                const float s2 = dl != 0.0f ? 2.0f / dl : 0.0f;
                for (int j = 0; j < 32; j++) dec[32 * k + j] = dl != 0.0f ? dl * grid_value(s2, x[32 * k + j]) : 0.0f;
            }
            const float c = gain_correction(x, wt, dec, QK_K);
            if (c == 1.0f) break;
            const mp_half d2 = mp_half_scaled(dstore, c);
            if (d2 == dstore) break;
            const float d2f = MP_FP16_TO_FP32(d2);
            float total = 0.0f;
            for (int k = 0; k < QK_K / 32; k++) total += sub_error(x + 32 * k, wt + 32 * k, swx2[k], d2f * (float)l_best[k]);
            if (!(total <= simple_total)) break;
            dstore = d2;
            best_d = d2f;
        }
        y[b].d = dstore;
        uint16_t sh = 0;
        memset(y[b].scales_l, 0, sizeof(y[b].scales_l));
        for (int k = 0; k < QK_K / 32; k++) {
            const int ls = l_best[k] + 32;
            y[b].scales_l[k / 2] |= (uint8_t)((ls & 0x0f) << (4 * (k % 2)));
            sh |= (uint16_t)((ls >> 4) << (2 * k));
            const float dl = best_d * (float)l_best[k];
            const float id = dl != 0.0f ? 1.0f / dl : 0.0f;
            const float *xb = x + 32 * k;
            for (int j = 0; j < 16; j++) {
                const int q0 = iq4_nearest(id * xb[j]), q1 = iq4_nearest(id * xb[j + 16]);
                y[b].qs[16 * k + j] = (uint8_t)(q0 | (q1 << 4));
            }
        }
        y[b].scales_h = sh;
    }
}

static void dequantize_row_iq4_xs(const void *vx, float *y, int64_t n) {
    const block_iq4_xs *x = (const block_iq4_xs *)vx;
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int k = 0; k < QK_K / 32; k++, y += 32) {
            const int ls = ((x[b].scales_l[k / 2] >> (4 * (k % 2))) & 0x0f) | (((x[b].scales_h >> (2 * k)) & 3) << 4);
            const float dl = d * (float)(ls - 32);
            const uint8_t *qs = x[b].qs + 16 * k;
            for (int j = 0; j < 16; j++) {
                y[j] = dl * (float)iq4_grid[qs[j] & 0x0f];
                y[j + 16] = dl * (float)iq4_grid[qs[j] >> 4];
            }
        }
    }
}

const mp_format mp_formats_iq4[] = {
    {MP_IQ4_NL, "IQ4_NL", QK4_NL, sizeof(block_iq4_nl), 0, quantize_row_iq4_nl, dequantize_row_iq4_nl, 127.f * MP_FP16_SCALE_MAX},
    {MP_IQ4_XS, "IQ4_XS", QK_K, sizeof(block_iq4_xs), 0, quantize_row_iq4_xs, dequantize_row_iq4_xs, 4064.f * MP_FP16_SCALE_MAX /* d * -32 * -127 */},
    MP_FORMAT_END,
};
