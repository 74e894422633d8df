/* IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M: the lattice-codebook formats.
 *
 * Each group of 8 (IQ2, IQ1) or 4 (IQ3) weights is one point of a fixed codebook ("grid") times a
 * per-sub-block scale; IQ2/IQ3 points are magnitudes with separate signs, IQ1 points are ternary
 * vectors shifted by +-1/8. The grids are not compiled in: kernels/iq_grids.py reads them from the
 * `gguf` package and hands them over with mp_iq_set_grid(); a format whose grid was never set is
 * refused by module.c (mp_iq_ready).
 *
 * Quantization (per 256-weight super-block), following the method published with llama.cpp's IQ
 * formats, minimises sum_i w_i (x_i - y_i)^2 with w_i = importance_i * sqrt(2 mean(x^2) + x_i^2)
 * (superblock_weights): for each sub-block a scan
 * over candidate scales, where each group goes to the nearest codebook point at that scale (the
 * point of per-coordinate nearest levels when it is on the grid, else the best of a precomputed
 * list of grid neighbours) and the scale is refitted by weighted least squares. Then the fp16
 * super-scale d and the 3/4-bit sub-block scale indices are chosen together to minimise the
 * weighted error of the fitted points, and every group is projected again at its final quantized
 * scale (trying the neighbouring scale index too). IQ1's sub-block scale and shift come from an
 * exact ternary least-squares fit before the grid is consulted. Last, the super-scale d is
 * multiplied by sum imp x^2 / sum imp x x_hat so that the super-block's reconstruction is not
 * shrunk (gain 1; kernels/csrc/debias.c explains why).
 */
#include <float.h>
#include <stdlib.h>

#include "moeplan.h"


/* ------------------------------------------------------------------------------------------ */
/* grids                                                                                        */

typedef struct {
    int ready;
    int n;             /* grid points */
    int dim;           /* coordinates per point: 8 or 4 */
    int nlev;          /* distinct coordinate values */
    int bits;          /* bits per coordinate in a key */
    float lev[8];      /* coordinate values, ascending */
    float mid[8];      /* midpoints between consecutive levels */
    float *val;        /* n * dim coordinate values */
    float *val2;       /* n * dim squared values */
    uint8_t *idx;      /* n * dim level indices */
    uint8_t *half;     /* dim 8, 2-bit levels: per point the keys of coordinates 0-3 and 4-7 */
    int32_t *map;      /* key -> grid index, or -(1 + offset of the neighbour list in nbr) */
    uint16_t *nbr;     /* neighbour lists: count, then grid indices */
    uint8_t *nbr_half; /* with half: the two half keys of each nbr entry, at twice its offset */
} iq_grid;

enum { G_IQ2_XXS, G_IQ2_XS, G_IQ2_S, G_IQ3_XXS, G_IQ3_S, G_IQ1_S, G_IQ1_M, G_COUNT };

static iq_grid grids[G_COUNT];

static int grid_slot(int type) {
    switch (type) {
    case MP_IQ2_XXS: return G_IQ2_XXS;
    case MP_IQ2_XS: return G_IQ2_XS;
    case MP_IQ2_S: return G_IQ2_S;
    case MP_IQ3_XXS: return G_IQ3_XXS;
    case MP_IQ3_S: return G_IQ3_S;
    case MP_IQ1_S: return G_IQ1_S;
    case MP_IQ1_M: return G_IQ1_M;
    default: return -1;
    }
}

/* expected (points, dim) per type: the layouts below depend on them */
static void grid_shape(int type, int *n, int *dim) {
    switch (type) {
    case MP_IQ2_XXS: *n = 256; *dim = 8; break;
    case MP_IQ2_XS: *n = 512; *dim = 8; break;
    case MP_IQ2_S: *n = 1024; *dim = 8; break;
    case MP_IQ3_XXS: *n = 256; *dim = 4; break;
    case MP_IQ3_S: *n = 512; *dim = 4; break;
    case MP_IQ1_S: case MP_IQ1_M: *n = 2048; *dim = 8; break;
    default: *n = 0; *dim = 0;
    }
}

/* Neighbour lists reach the nearest `nwant` distinct (level-index) distances from an off-grid key. */
static int grid_nwant(int type) {
    switch (type) {
    case MP_IQ2_S: return 1;
    case MP_IQ1_S: case MP_IQ1_M: return 2;
    default: return 2;
    }
}

/* The largest |x| a codebook format encodes: the fp16 super-scale at most 65504, times the largest
 * sub-block factor a * (2 lmax + 1), times the grid's largest |level| (IQ1: the +-1/8 shift is left
 * out, so the range is one every group reaches whatever its shift). 0 before the grid is loaded. */
int mp_iq_ready(int type) {
    const int s = grid_slot(type);
    return s < 0 ? 1 : grids[s].ready;
}

static void grid_free(iq_grid *g) {
    free(g->val); free(g->val2); free(g->idx); free(g->half); free(g->map); free(g->nbr); free(g->nbr_half);
    memset(g, 0, sizeof(*g));
}

/* Install the codebook of `type` from n*dim float32 coordinates (in the units the format decodes
 * with). Returns 0 on success, 1 when the shape is wrong, 2 when the values are not a small level
 * set, 3 when out of memory, 4 when a different grid is already installed (a grid never changes
 * once set, so quantizing threads never see it change). Not thread-safe against itself: callers
 * serialize (kernels/iq_grids.py holds a lock and the GIL). */
int mp_iq_set_grid(int type, const float *values, int64_t count) {
    const int s = grid_slot(type);
    int n, dim;
    grid_shape(type, &n, &dim);
    if (s < 0 || count != (int64_t)n * dim) return 1;
    iq_grid *g = &grids[s];
    if (g->ready) {
        for (int64_t i = 0; i < count; i++)
            if (g->val[i] != values[i]) return 4;
        return 0;
    }
    iq_grid t;
    memset(&t, 0, sizeof(t));
    t.n = n; t.dim = dim;
    /* distinct levels, ascending */
    for (int64_t i = 0; i < count; i++) {
        const float v = values[i];
        if (!isfinite(v)) return 2;
        int k = 0;
        while (k < t.nlev && t.lev[k] < v) k++;
        if (k < t.nlev && t.lev[k] == v) continue;
        if (t.nlev == 8) return 2;
        memmove(t.lev + k + 1, t.lev + k, sizeof(float) * (size_t)(t.nlev - k));
        t.lev[k] = v;
        t.nlev++;
    }
    if (t.nlev < 2) return 2;
    t.bits = t.nlev <= 2 ? 1 : t.nlev <= 4 ? 2 : 3;
    for (int k = 0; k + 1 < t.nlev; k++) t.mid[k] = 0.5f * (t.lev[k] + t.lev[k + 1]);
    const int nkeys = 1 << (t.bits * dim);
    t.val = malloc(sizeof(float) * (size_t)count);
    t.val2 = malloc(sizeof(float) * (size_t)count);
    t.idx = malloc((size_t)count);
    t.map = malloc(sizeof(int32_t) * (size_t)nkeys);
    int *dist = malloc(sizeof(int) * (size_t)n);
    if (!t.val || !t.val2 || !t.idx || !t.map || !dist) { free(dist); grid_free(&t); return 3; }
    for (int k = 0; k < nkeys; k++) t.map[k] = INT32_MIN;
    for (int p = 0; p < n; p++) {
        int key = 0;
        for (int i = 0; i < dim; i++) {
            const float v = values[p * dim + i];
            int l = 0;
            while (t.lev[l] != v) l++;
            t.val[p * dim + i] = v;
            t.val2[p * dim + i] = v * v;
            t.idx[p * dim + i] = (uint8_t)l;
            key |= l << (t.bits * i);
        }
        if (t.map[key] != INT32_MIN) { free(dist); grid_free(&t); return 2; } /* duplicate point */
        t.map[key] = p;
    }
    if (dim == 8 && t.bits == 2) {
        t.half = malloc(2 * (size_t)n);
        if (!t.half) { free(dist); grid_free(&t); return 3; }
        for (int p = 0; p < n; p++) {
            int lo = 0, hi = 0;
            for (int i = 0; i < 4; i++) {
                lo |= t.idx[p * 8 + i] << (2 * i);
                hi |= t.idx[p * 8 + 4 + i] << (2 * i);
            }
            t.half[2 * p] = (uint8_t)lo;
            t.half[2 * p + 1] = (uint8_t)hi;
        }
    }
    /* neighbour lists of every off-grid key whose coordinates are valid level indices */
    const int nwant = grid_nwant(type);
    const int maxd = dim * (t.nlev - 1) * (t.nlev - 1);
    int *hist = calloc((size_t)maxd + 1, sizeof(int));
    size_t cap = 1 << 16, used = 0;
    t.nbr = malloc(sizeof(uint16_t) * cap);
    if (!hist || !t.nbr) { free(dist); free(hist); grid_free(&t); return 3; }
    for (int key = 0; key < nkeys; key++) {
        if (t.map[key] != INT32_MIN) continue;
        int lv[8], valid = 1;
        for (int i = 0; i < dim; i++) {
            lv[i] = (key >> (t.bits * i)) & ((1 << t.bits) - 1);
            if (lv[i] >= t.nlev) valid = 0;
        }
        if (!valid) continue;
        memset(hist, 0, sizeof(int) * (size_t)(maxd + 1));
        for (int p = 0; p < n; p++) {
            int d2 = 0;
            for (int i = 0; i < dim; i++) {
                const int dl = (int)t.idx[p * dim + i] - lv[i];
                d2 += dl * dl;
            }
            dist[p] = d2;
            hist[d2]++;
        }
        int limit = 0, seen = 0, count_in = 0;
        for (int d2 = 0; d2 <= maxd && seen < nwant; d2++) {
            if (hist[d2]) { seen++; limit = d2; count_in += hist[d2]; }
        }
        if (used + (size_t)count_in + 1 > cap) {
            while (used + (size_t)count_in + 1 > cap) cap *= 2;
            uint16_t *nb = realloc(t.nbr, sizeof(uint16_t) * cap);
            if (!nb) { free(dist); free(hist); grid_free(&t); return 3; }
            t.nbr = nb;
        }
        t.map[key] = -(int32_t)(used + 1);
        t.nbr[used++] = (uint16_t)count_in;
        for (int p = 0; p < n; p++)
            if (dist[p] <= limit) t.nbr[used++] = (uint16_t)p;
    }
    free(dist);
    free(hist);
    if (t.half) {
        t.nbr_half = malloc(2 * used);
        if (!t.nbr_half) { grid_free(&t); return 3; }
        for (size_t o = 0; o < used;) {
            const int cnt = t.nbr[o];
            t.nbr_half[2 * o] = t.nbr_half[2 * o + 1] = 0;
            for (int j = 1; j <= cnt; j++) {
                t.nbr_half[2 * (o + j)] = t.half[2 * t.nbr[o + j]];
                t.nbr_half[2 * (o + j) + 1] = t.half[2 * t.nbr[o + j] + 1];
            }
            o += (size_t)cnt + 1;
        }
    }
    t.ready = 1;
    *g = t;
    return 0;
}

/* The grid point minimising sum_i w_i (x_i - s v_i)^2 (s > 0): the point of per-coordinate nearest
 * levels when it is on the grid, else the best of that key's neighbour list. */
static inline int grid_project(const iq_grid *g, const float *x, const float *w, float s) {
    const int dim = g->dim, nl1 = g->nlev - 1, bits = g->bits;
    float th[8];
    for (int k = 0; k < nl1; k++) th[k] = s * g->mid[k];
    int key = 0;
    for (int i = 0; i < dim; i++) {
        int l = 0;
        for (int k = 0; k < nl1; k++) l += x[i] > th[k];
        key |= l << (bits * i);
    }
    const int32_t m = g->map[key];
    if (m >= 0) return m;
    const uint16_t *list = g->nbr + (-m - 1);
    const int cnt = list[0];
    int best = list[1];
    float best_err = FLT_MAX;
    if (g->half && cnt > 12) {
        /* long list: error of each half of the point from tables over the 81 level combinations
         * of 4 coordinates, so that each candidate costs two loads and one add */
        float e[8][3], pair[4][16], tab[2][256];
        for (int i = 0; i < 8; i++)
            for (int l = 0; l < 3; l++) {
                const float dlt = x[i] - s * g->lev[l];
                e[i][l] = w[i] * dlt * dlt;
            }
        for (int h = 0; h < 4; h++)
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) pair[h][a | b << 2] = e[2 * h][a] + e[2 * h + 1][b];
        for (int h = 0; h < 2; h++)
            for (int a = 0; a < 11; a++) {
                if ((a & 3) == 3) continue;
                for (int b = 0; b < 11; b++) {
                    if ((b & 3) == 3) continue;
                    tab[h][a | b << 4] = pair[2 * h][a] + pair[2 * h + 1][b];
                }
            }
        const uint8_t *hk = g->nbr_half + 2 * (size_t)(-m - 1);
        int bj = 1;
        for (int j = 1; j <= cnt; j++) {
            const float err = tab[0][hk[2 * j]] + tab[1][hk[2 * j + 1]];
            if (err < best_err) { best_err = err; bj = j; }
        }
        return list[bj];
    }
    for (int j = 1; j <= cnt; j++) {
        const float *v = g->val + (size_t)list[j] * dim;
        float e = 0.f;
        for (int i = 0; i < dim; i++) {
            const float dlt = x[i] - s * v[i];
            e += w[i] * dlt * dlt;
        }
        if (e < best_err) { best_err = e; best = list[j]; }
    }
    return best;
}

/* sum w x v and sum w v^2 of one group at grid point p */
static inline void group_sums(const iq_grid *g, int p, const float *x, const float *w, float *sqx, float *sq2) {
    const float *v = g->val + (size_t)p * g->dim;
    const float *v2 = g->val2 + (size_t)p * g->dim;
    float a = 0.f, b = 0.f;
    for (int i = 0; i < g->dim; i++) { a += w[i] * x[i] * v[i]; b += w[i] * v2[i]; }
    *sqx += a;
    *sq2 += b;
}

static inline float group_err(const iq_grid *g, int p, const float *x, const float *w, float s) {
    const float *v = g->val + (size_t)p * g->dim;
    float e = 0.f;
    for (int i = 0; i < g->dim; i++) {
        const float dlt = x[i] - s * v[i];
        e += w[i] * dlt * dlt;
    }
    return e;
}


/* ---- unbiased scales (debias.c): forward declarations of the decoders and the scale patchers ---- */
static void dequantize_row_iq2_xxs(const void *vx, float *y, int64_t n);
static void dequantize_row_iq2_xs(const void *vx, float *y, int64_t n);
static void dequantize_row_iq2_s(const void *vx, float *y, int64_t n);
static void dequantize_row_iq3_xxs(const void *vx, float *y, int64_t n);
static void dequantize_row_iq3_s(const void *vx, float *y, int64_t n);
static void dequantize_row_iq1_s(const void *vx, float *y, int64_t n);
static void dequantize_row_iq1_m(const void *vx, float *y, int64_t n);

/* the fp16 super-scale d that leads the block (every codebook format but IQ1_M) */
static void rescale_d0(void *block, float c) {
    mp_half h;
    memcpy(&h, block, 2);
    h = mp_half_scaled(h, c);
    memcpy(block, &h, 2);
}

/* IQ1_M: d's four nibbles sit on top of the four 16-bit scale words */
static void rescale_iq1_m(void *block, float c) {
    block_iq1_m *b = (block_iq1_m *)block;
    uint16_t sc[4];
    memcpy(sc, b->scales, 8);
    mp_half h = (mp_half)((sc[0] >> 12) | (sc[1] >> 12) << 4 | (sc[2] >> 12) << 8 | (sc[3] >> 12) << 12);
    h = mp_half_scaled(h, c);
    for (int i = 0; i < 4; i++) sc[i] = (uint16_t)((sc[i] & 0x0fff) | ((h >> (4 * i)) & 15) << 12);
    memcpy(b->scales, sc, 8);
}

/* ------------------------------------------------------------------------------------------ */
/* shared pieces                                                                                */

/* Error weights of one 256 super-block: importance_i * sqrt(sigma2 + x_i^2), sigma2 = 2 mean(x^2)
 * over the super-block (the weighting of llama.cpp's IQ quantizers). The extra factor puts more
 * weight on the large weights than the importance alone: it raises the importance-weighted RMSE a
 * little (IQ1_S +4%, IQ2_XXS +3%, IQ3_XXS +1% on a Student-t matrix; tests/test_iq_codebook.py
 * test_search_weights_favour_the_large_weights) but lowers the KLD of the quantized model
 * (results/vs-llama-quantize.md: tiny-qwen3-moe 15% of BF16 -11%, 25% -7%; tiny-deepseek-v3 15% -2%).
 * The unbiased rescale (debias.c) still uses the importance alone. A super-block whose importance
 * is all zero is quantized with unit importance. */
static void superblock_weights(const float *imp, const float *x, float *w) {
    float wsum = 0.f, sx2 = 0.f;
    for (int i = 0; i < QK_K; i++) {
        w[i] = imp[i];
        wsum += imp[i];
        sx2 += x[i] * x[i];
    }
    if (!(wsum > 0.f))
        for (int i = 0; i < QK_K; i++) w[i] = 1.f;
    /* as sqrt(1 + x^2 / sigma2), the same up to the super-block's constant sqrt(sigma2): a factor in
     * [1, sqrt(129)] whatever the magnitude of x, so it neither underflows nor overflows */
    const float sigma2 = 2.f * sx2 / (float)QK_K;
    if (isfinite(sigma2) && sigma2 > 0.f)
        for (int i = 0; i < QK_K; i++) {
            const float f = sqrtf(1.f + x[i] * x[i] / sigma2);
            if (isfinite(f)) w[i] *= f;
        }
}

/* Choose the fp16 super-scale d and per-sub-block indices l (scale_b = d * a * (2 l_b + 1), 0 <= l_b <=
 * lmax) minimising sum_b (-2 scale_b sqx_b + scale_b^2 sq2_b): the weighted error of the fitted points.
 * fit[b] is sub-block b's own least-squares scale (0 when it holds nothing). Returns the decoded d. */
static float choose_superscale(int nsub, const float *fit, const float *sqx, const float *sq2, float a, int lmax,
                               mp_half *d16, uint8_t *l) {
    float fmax = 0.f;
    for (int b = 0; b < nsub; b++) fmax = fit[b] > fmax ? fit[b] : fmax;
    if (!(fmax > 0.f)) {
        *d16 = MP_FP32_TO_FP16(0.f);
        memset(l, 0, (size_t)nsub);
        return 0.f;
    }
    const float d0 = fmax / (a * (2 * lmax + 1));
    float best = FLT_MAX, best_d = 0.f;
    mp_half best_h = 0;
    for (int k = -4; k <= 24; k++) {
        const float cand = d0 * (1.0f - 0.0125f * k);
        const mp_half h = MP_FP32_TO_FP16(fminf(cand, 65504.f)); /* saturate rather than overflow */
        const float d = MP_FP16_TO_FP32(h);
        if (!(d > 0.f) || !isfinite(d)) continue;
        const float step = d * a;
        float e = 0.f;
        for (int b = 0; b < nsub; b++) {
            if (!(sq2[b] > 0.f)) continue;
            int lb = mp_nearest_int(0.5f * (fit[b] / step - 1.f));
            lb = lb < 0 ? 0 : lb > lmax ? lmax : lb;
            const float sc = step * (2 * lb + 1);
            e += sc * (sc * sq2[b] - 2.f * sqx[b]);
        }
        if (e < best) { best = e; best_d = d; best_h = h; }
    }
    if (!(best_d > 0.f)) {
        *d16 = MP_FP32_TO_FP16(0.f);
        memset(l, 0, (size_t)nsub);
        return 0.f;
    }
    *d16 = best_h;
    const float step = best_d * a;
    for (int b = 0; b < nsub; b++) {
        int lb = mp_nearest_int(0.5f * (fit[b] / step - 1.f));
        l[b] = (uint8_t)(lb < 0 ? 0 : lb > lmax ? lmax : lb);
    }
    return best_d;
}

/* ------------------------------------------------------------------------------------------ */
/* IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: codebook magnitudes with signs                     */

typedef struct {
    int type;
    int sub;       /* weights per sub-block scale */
    int parity;    /* 1: the signs of each 8 weights have even parity (7 stored bits) */
    float a;       /* scale_b = d * a * (2 l + 1) */
    int ncand;     /* candidate scales per sub-block */
    float lo, hi;  /* candidate max/scale ratios, as fractions of the top level */
} signed_spec;

/* Sub-block state of one super-block, shared by the search and the packers. */
typedef struct {
    float ax[QK_K];        /* |x| */
    float w[QK_K];
    uint8_t neg[QK_K];     /* sign bits as stored (1 = negative) */
    uint16_t pt[QK_K / 4]; /* grid point per group */
    uint8_t l[QK_K / 16];
    mp_half d;
} signed_state;

/* Project the groups of `n` weights (targets t) at scale s; returns the weighted error, fills pts. */
static inline float project_run(const iq_grid *g, const float *t, const float *w, int n, float s, uint16_t *pts) {
    float e = 0.f;
    for (int k = 0; k < n; k += g->dim) {
        const int p = grid_project(g, t + k, w + k, s);
        pts[k / g->dim] = (uint16_t)p;
        e += group_err(g, p, t + k, w + k, s);
    }
    return e;
}

static void quantize_signed_superblock(const signed_spec *sp, const iq_grid *g, const float *x, const float *imp,
                                       signed_state *st) {
    const int dim = g->dim, sub = sp->sub, nsub = QK_K / sub;
    float t[QK_K];
    int flip[QK_K / 8];
    superblock_weights(imp, x, st->w);
    for (int i = 0; i < QK_K; i++) {
        st->ax[i] = fabsf(x[i]);
        st->neg[i] = x[i] < 0.f;
        t[i] = st->ax[i];
    }
    /* formats with even sign parity: in a group of 8 with an odd number of negative weights, the
     * weight of least w |x| is quantized with the wrong sign (as target -|x|) */
    for (int k = 0; k < QK_K / 8; k++) {
        flip[k] = -1;
        if (!sp->parity) continue;
        int odd = 0;
        for (int i = 0; i < 8; i++) odd ^= st->neg[8 * k + i];
        if (!odd) continue;
        int m = 0;
        float mv = st->w[8 * k] * st->ax[8 * k];
        for (int i = 1; i < 8; i++) {
            const float v = st->w[8 * k + i] * st->ax[8 * k + i];
            if (v < mv) { mv = v; m = i; }
        }
        flip[k] = m;
        t[8 * k + m] = -st->ax[8 * k + m];
    }
    const float top = g->lev[g->nlev - 1];
    float fit[QK_K / 16], sqx[QK_K / 16], sq2[QK_K / 16];
    uint16_t pts[32];
    for (int b = 0; b < nsub; b++) {
        const float *tb = t + b * sub, *wb = st->w + b * sub;
        float mx = 0.f, wsum = 0.f;
        for (int i = 0; i < sub; i++) { mx = tb[i] > mx ? tb[i] : mx; wsum += wb[i]; }
        fit[b] = sqx[b] = sq2[b] = 0.f;
        if (!(mx > 0.f) || !(wsum > 0.f)) continue;
        float best = 0.f;
        int have = 0;
        for (int c = 0; c < sp->ncand; c++) {
            const float r = sp->lo + (sp->hi - sp->lo) * (float)c / (float)(sp->ncand - 1);
            const float s = mx / (r * top);
            float a = 0.f, q = 0.f;
            for (int k = 0; k < sub; k += dim)
                group_sums(g, grid_project(g, tb + k, wb + k, s), tb + k, wb + k, &a, &q);
            if (q > 0.f && a > 0.f && (!have || a * a > best * q)) {
                have = 1;
                best = a * a / q;
                fit[b] = a / q; sqx[b] = a; sq2[b] = q;
            }
        }
        if (!have) continue;
        /* one more projection at the fitted scale, kept when it fits better */
        {
            float a = 0.f, q = 0.f;
            for (int k = 0; k < sub; k += dim) {
                const int p = grid_project(g, tb + k, wb + k, fit[b]);
                group_sums(g, p, tb + k, wb + k, &a, &q);
            }
            if (q > 0.f && a > 0.f && a * a > best * q) { fit[b] = a / q; sqx[b] = a; sq2[b] = q; }
        }
    }
    const float d = choose_superscale(nsub, fit, sqx, sq2, sp->a, 15, &st->d, st->l);
    if (!(d > 0.f)) {
        memset(st->pt, 0, sizeof(st->pt));
        memset(st->l, 0, sizeof(st->l));
        memset(st->neg, 0, sizeof(st->neg));
        st->d = MP_FP32_TO_FP16(0.f);
        return;
    }
    /* final: each sub-block at its quantized scale index, or the neighbouring index on the side of
     * its own fitted scale when the points found there fit better */
    float wone[32];
    for (int i = 0; i < 32; i++) wone[i] = 1.f;
    for (int b = 0; b < nsub; b++) {
        const float *tb = t + b * sub, *wb = st->w + b * sub;
        float wsum = 0.f;
        for (int i = 0; i < sub; i++) wsum += wb[i];
        if (!(wsum > 0.f)) wb = wone;
        const float lfit = 0.5f * (fit[b] / (d * sp->a) - 1.f);
        int l0 = st->l[b], l1 = st->l[b];
        if (lfit > (float)st->l[b]) l1 = l1 < 15 ? l1 + 1 : 15;
        else l0 = l0 > 0 ? l0 - 1 : 0;
        float best_e = FLT_MAX;
        for (int lb = l0; lb <= l1; lb++) {
            const float e = project_run(g, tb, wb, sub, d * sp->a * (2 * lb + 1), pts);
            /* the first candidate is always taken: an error that is not below FLT_MAX (inf, NaN)
             * must not leave the sub-block's points unwritten */
            if (lb == l0 || e < best_e) {
                best_e = e;
                st->l[b] = (uint8_t)lb;
                memcpy(st->pt + b * sub / dim, pts, sizeof(uint16_t) * (size_t)(sub / dim));
            }
        }
    }
    /* the wrong-signed weight of each odd parity group is stored with the sign it was quantized with */
    for (int k = 0; k < QK_K / 8; k++)
        if (flip[k] >= 0) st->neg[8 * k + flip[k]] ^= 1;
}

/* sign bits of 8 weights as a byte (bit i = weight i negative) */
static inline uint8_t sign_byte(const uint8_t *neg) {
    uint8_t s = 0;
    for (int i = 0; i < 8; i++) s |= (uint8_t)(neg[i] << i);
    return s;
}

static const signed_spec spec_iq2_xxs = {MP_IQ2_XXS, 32, 1, 1.f / 8.f, 9, 0.78f, 1.12f};
static const signed_spec spec_iq2_xs = {MP_IQ2_XS, 16, 1, 1.f / 8.f, 11, 0.78f, 1.12f};
static const signed_spec spec_iq2_s = {MP_IQ2_S, 16, 0, 1.f / 8.f, 9, 0.78f, 1.12f};
static const signed_spec spec_iq3_xxs = {MP_IQ3_XXS, 32, 1, 1.f / 4.f, 9, 0.75f, 1.15f};
static const signed_spec spec_iq3_s = {MP_IQ3_S, 32, 0, 1.f, 9, 0.8f, 1.12f};

static void quantize_row_iq2_xxs(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq2_xxs *y = (block_iq2_xxs *)vy;
    const iq_grid *g = &grids[G_IQ2_XXS];
    signed_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_signed_superblock(&spec_iq2_xxs, g, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        for (int b = 0; b < QK_K / 32; b++) {
            uint32_t a0 = 0, a1 = 0;
            for (int k = 0; k < 4; k++) {
                a0 |= (uint32_t)st.pt[4 * b + k] << (8 * k);
                a1 |= (uint32_t)(sign_byte(st.neg + 32 * b + 8 * k) & 127) << (7 * k);
            }
            a1 |= (uint32_t)st.l[b] << 28;
            memcpy(y[ib].qs + 4 * b, &a0, 4);
            memcpy(y[ib].qs + 4 * b + 2, &a1, 4);
        }
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq2_xxs), n, imp, dequantize_row_iq2_xxs, rescale_d0);
}

static void quantize_row_iq2_xs(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq2_xs *y = (block_iq2_xs *)vy;
    const iq_grid *g = &grids[G_IQ2_XS];
    signed_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_signed_superblock(&spec_iq2_xs, g, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        for (int k = 0; k < QK_K / 8; k++)
            y[ib].qs[k] = (uint16_t)(st.pt[k] | (uint16_t)(sign_byte(st.neg + 8 * k) & 127) << 9);
        for (int b = 0; b < QK_K / 32; b++) y[ib].scales[b] = (uint8_t)(st.l[2 * b] | st.l[2 * b + 1] << 4);
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq2_xs), n, imp, dequantize_row_iq2_xs, rescale_d0);
}

static void quantize_row_iq2_s(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq2_s *y = (block_iq2_s *)vy;
    const iq_grid *g = &grids[G_IQ2_S];
    signed_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_signed_superblock(&spec_iq2_s, g, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        memset(y[ib].qh, 0, sizeof(y[ib].qh));
        for (int k = 0; k < QK_K / 8; k++) {
            y[ib].qs[k] = (uint8_t)(st.pt[k] & 255);
            y[ib].qs[QK_K / 8 + k] = sign_byte(st.neg + 8 * k);
            y[ib].qh[k / 4] |= (uint8_t)((st.pt[k] >> 8) << (2 * (k % 4)));
        }
        for (int b = 0; b < QK_K / 32; b++) y[ib].scales[b] = (uint8_t)(st.l[2 * b] | st.l[2 * b + 1] << 4);
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq2_s), n, imp, dequantize_row_iq2_s, rescale_d0);
}

static void quantize_row_iq3_xxs(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq3_xxs *y = (block_iq3_xxs *)vy;
    const iq_grid *g = &grids[G_IQ3_XXS];
    signed_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_signed_superblock(&spec_iq3_xxs, g, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        for (int k = 0; k < QK_K / 4; k++) y[ib].qs[k] = (uint8_t)st.pt[k];
        for (int b = 0; b < QK_K / 32; b++) {
            uint32_t a1 = 0;
            for (int k = 0; k < 4; k++) a1 |= (uint32_t)(sign_byte(st.neg + 32 * b + 8 * k) & 127) << (7 * k);
            a1 |= (uint32_t)st.l[b] << 28;
            memcpy(y[ib].qs + QK_K / 4 + 4 * b, &a1, 4);
        }
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq3_xxs), n, imp, dequantize_row_iq3_xxs, rescale_d0);
}

static void quantize_row_iq3_s(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq3_s *y = (block_iq3_s *)vy;
    const iq_grid *g = &grids[G_IQ3_S];
    signed_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_signed_superblock(&spec_iq3_s, g, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        memset(y[ib].qh, 0, sizeof(y[ib].qh));
        for (int k = 0; k < QK_K / 4; k++) {
            y[ib].qs[k] = (uint8_t)(st.pt[k] & 255);
            y[ib].qh[k / 8] |= (uint8_t)((st.pt[k] >> 8) << (k % 8));
        }
        for (int k = 0; k < QK_K / 8; k++) y[ib].signs[k] = sign_byte(st.neg + 8 * k);
        for (int b = 0; b < 4; b++) y[ib].scales[b] = (uint8_t)(st.l[2 * b] | st.l[2 * b + 1] << 4);
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq3_s), n, imp, dequantize_row_iq3_s, rescale_d0);
}

/* ---- decoding of the signed formats ---- */

static inline void decode_group(const iq_grid *g, int p, float db, uint8_t signs, float *y) {
    const float *v = g->val + (size_t)p * g->dim;
    for (int i = 0; i < g->dim; i++) {
        const float q = db * v[i];
        y[i] = (signs >> i) & 1 ? -q : q;
    }
}

/* the 8 sign bits of a 7-bit index with even parity */
static inline uint8_t parity_signs(uint32_t s7) {
    uint32_t p = s7 ^ (s7 >> 4);
    p ^= p >> 2;
    p ^= p >> 1;
    return (uint8_t)(s7 | (p & 1) << 7);
}

static void dequantize_row_iq2_xxs(const void *vx, float *y, int64_t n) {
    const block_iq2_xxs *x = (const block_iq2_xxs *)vx;
    const iq_grid *g = &grids[G_IQ2_XXS];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int b = 0; b < QK_K / 32; b++) {
            uint32_t a0, a1;
            memcpy(&a0, x[ib].qs + 4 * b, 4);
            memcpy(&a1, x[ib].qs + 4 * b + 2, 4);
            const float db = d * (0.5f + (float)(a1 >> 28)) * 0.25f;
            for (int k = 0; k < 4; k++)
                decode_group(g, (a0 >> (8 * k)) & 255, db, parity_signs((a1 >> (7 * k)) & 127), y + 32 * b + 8 * k);
        }
    }
}

static void dequantize_row_iq2_xs(const void *vx, float *y, int64_t n) {
    const block_iq2_xs *x = (const block_iq2_xs *)vx;
    const iq_grid *g = &grids[G_IQ2_XS];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int k = 0; k < QK_K / 8; k++) {
            const int l = (x[ib].scales[k / 4] >> (4 * ((k / 2) & 1))) & 15;
            const float db = d * (0.5f + (float)l) * 0.25f;
            decode_group(g, x[ib].qs[k] & 511, db, parity_signs(x[ib].qs[k] >> 9), y + 8 * k);
        }
    }
}

static void dequantize_row_iq2_s(const void *vx, float *y, int64_t n) {
    const block_iq2_s *x = (const block_iq2_s *)vx;
    const iq_grid *g = &grids[G_IQ2_S];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int k = 0; k < QK_K / 8; k++) {
            const int l = (x[ib].scales[k / 4] >> (4 * ((k / 2) & 1))) & 15;
            const float db = d * (0.5f + (float)l) * 0.25f;
            const int p = x[ib].qs[k] | ((x[ib].qh[k / 4] >> (2 * (k % 4))) & 3) << 8;
            decode_group(g, p, db, x[ib].qs[QK_K / 8 + k], y + 8 * k);
        }
    }
}

static void dequantize_row_iq3_xxs(const void *vx, float *y, int64_t n) {
    const block_iq3_xxs *x = (const block_iq3_xxs *)vx;
    const iq_grid *g = &grids[G_IQ3_XXS];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int b = 0; b < QK_K / 32; b++) {
            uint32_t a1;
            memcpy(&a1, x[ib].qs + QK_K / 4 + 4 * b, 4);
            const float db = d * (0.5f + (float)(a1 >> 28)) * 0.5f;
            for (int k = 0; k < 4; k++) {
                const uint8_t s8 = parity_signs((a1 >> (7 * k)) & 127);
                decode_group(g, x[ib].qs[8 * b + 2 * k], db, s8, y + 32 * b + 8 * k);
                decode_group(g, x[ib].qs[8 * b + 2 * k + 1], db, (uint8_t)(s8 >> 4), y + 32 * b + 8 * k + 4);
            }
        }
    }
}

static void dequantize_row_iq3_s(const void *vx, float *y, int64_t n) {
    const block_iq3_s *x = (const block_iq3_s *)vx;
    const iq_grid *g = &grids[G_IQ3_S];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int b = 0; b < QK_K / 32; b++) {
            const int l = (x[ib].scales[b / 2] >> (4 * (b & 1))) & 15;
            const float db = d * (float)(1 + 2 * l);
            for (int k = 0; k < 8; k++) {
                const int gi = 8 * b + k;
                const int p = x[ib].qs[gi] | ((x[ib].qh[b] >> k) & 1) << 8;
                decode_group(g, p, db, (uint8_t)(x[ib].signs[gi / 2] >> (4 * (gi & 1))), y + 4 * gi);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* IQ1_S, IQ1_M: ternary codebook points shifted by +-1/8                                       */

#define IQ1_DELTA 0.125f
/* the neighbouring scale index is tried only when the fitted index is this far from the chosen one
 * (measured: +0.0003 RMSE/std, 15% faster) */
#define IQ1_WINDOW_SKIP 0.3f

/* The exact best scale for the levels {-1, 0, 1} + dlt (dlt = +-1/8) when the grid is ignored.
 * At the optimum every weight sits at its nearest level for the scale s, and as s grows from 0 the
 * nearest-level assignment changes one weight at a time (weight i leaves +-1 for 0 once
 * s > |x_i| / (1/2 + dlt sign(x_i))); so walking those n events visits the optimum. by_abs: the
 * weights in order of |x|, which splits into two runs already in event order (one per divisor).
 * Returns the scale (0 when none is positive) and its score sumqx^2 / sumq2. */
static float ternary_fit(const float *x, const float *w, float dlt, int n, const int *by_abs, float *score) {
    int run_a[32], run_b[32], na = 0, nb = 0;
    float key_a[32], key_b[32];
    const float ca = 1.f / (0.5f + IQ1_DELTA), cb = 1.f / (0.5f - IQ1_DELTA);
    float qx = 0.f, q2 = 0.f;
    for (int k = 0; k < n; k++) {
        const int i = by_abs[k];
        const float sg = x[i] < 0.f ? -1.f : 1.f;
        if (sg * dlt > 0.f) { run_a[na] = i; key_a[na++] = fabsf(x[i]) * ca; }
        else { run_b[nb] = i; key_b[nb++] = fabsf(x[i]) * cb; }
        const float q = sg + dlt;
        qx += w[i] * x[i] * q;
        q2 += w[i] * q * q;
    }
    /* the merge of the two runs is bounded by their lengths, never by a sentinel key: a key can be
     * inf (|x| / (1/2 - 1/8) overflows for |x| > 1.3e38) and so compare equal to any sentinel */
    float best = 0.f, scale = 0.f;
    if (qx > 0.f && q2 > 0.f) { best = qx * qx / q2; scale = qx / q2; }
    int ia = 0, ib = 0;
    for (int k = 0; k < n; k++) {
        int i;
        float kc;
        if (ib >= nb || (ia < na && key_a[ia] <= key_b[ib])) { kc = key_a[ia]; i = run_a[ia++]; }
        else { kc = key_b[ib]; i = run_b[ib++]; }
        qx -= w[i] * fabsf(x[i]);
        q2 -= w[i] * (1.f + 2.f * (x[i] < 0.f ? -dlt : dlt));
        if ((ia < na && key_a[ia] == kc) || (ib < nb && key_b[ib] == kc)) continue; /* ties move together */
        if (qx > 0.f && q2 > 0.f && qx * qx > best * q2) { best = qx * qx / q2; scale = qx / q2; }
    }
    *score = best;
    return scale;
}

typedef struct {
    uint16_t pt[QK_K / 8];  /* grid point per group of 8 */
    uint8_t dneg[QK_K / 8]; /* 1: the group's shift is -1/8 */
    uint8_t l[QK_K / 16];
    mp_half d;
} ternary_state;

/* project one group of 8 at scale s with shift dlt: returns the point and adds its error */
static inline int ternary_group(const iq_grid *g, const float *x, const float *w, float s, float dlt, float *err) {
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = x[i] - s * dlt;
    const int p = grid_project(g, t, w, s);
    *err += group_err(g, p, t, w, s);
    return p;
}

/* sub: weights per scale (32 for IQ1_S, 16 for IQ1_M); group_shift: 1 when each group of 8 has its
 * own shift sign (IQ1_M), 0 when the sub-block shares one (IQ1_S). */
static void quantize_ternary_superblock(const iq_grid *g, int sub, int group_shift, const float *x, const float *imp,
                                        ternary_state *st) {
    const int nsub = QK_K / sub, ng = sub / 8;
    float w[QK_K];
    superblock_weights(imp, x, w);
    float fit[QK_K / 16], sqx[QK_K / 16], sq2[QK_K / 16];
    int combo[QK_K / 16];
    for (int b = 0; b < nsub; b++) {
        const float *xb = x + b * sub, *wb = w + b * sub;
        float mx = 0.f, wsum = 0.f;
        for (int i = 0; i < sub; i++) { mx = fabsf(xb[i]) > mx ? fabsf(xb[i]) : mx; wsum += wb[i]; }
        fit[b] = sqx[b] = sq2[b] = 0.f;
        combo[b] = 0;
        if (!(mx > 0.f) || !(wsum > 0.f)) continue;
        /* the sub-block's scale and shift sign without the grid */
        int by_abs[32];
        for (int i = 0; i < sub; i++) {
            int j = i;
            while (j > 0 && fabsf(xb[by_abs[j - 1]]) > fabsf(xb[i])) { by_abs[j] = by_abs[j - 1]; j--; }
            by_abs[j] = i;
        }
        float sc_p, sc_m;
        const float s_p = ternary_fit(xb, wb, IQ1_DELTA, sub, by_abs, &sc_p);
        const float s_m = ternary_fit(xb, wb, -IQ1_DELTA, sub, by_abs, &sc_m);
        const float bscale = sc_m > sc_p ? s_m : s_p;
        int bcombo = sc_m > sc_p;
        if (!(bscale > 0.f)) continue;
        if (group_shift) bcombo = bcombo ? (1 << ng) - 1 : 0; /* IQ1_M: bit k = group k's shift is negative */
        /* on the grid at that scale, then the least-squares scale of the chosen points */
        float a = 0.f, q = 0.f;
        for (int k = 0; k < ng; k++) {
            int neg = group_shift ? (bcombo >> k) & 1 : bcombo;
            float e = 0.f;
            int p = ternary_group(g, xb + 8 * k, wb + 8 * k, bscale, neg ? -IQ1_DELTA : IQ1_DELTA, &e);
            if (group_shift) {
                /* IQ1_M: each group takes its better shift; searched again only when the other
                 * shift already fits the same point better */
                const float *v = g->val + (size_t)p * 8;
                const float alt = neg ? IQ1_DELTA : -IQ1_DELTA;
                float ea = 0.f;
                for (int i = 0; i < 8; i++) {
                    const float r = xb[8 * k + i] - bscale * (v[i] + alt);
                    ea += wb[8 * k + i] * r * r;
                }
                if (ea < e) {
                    float e2 = 0.f;
                    const int p2 = ternary_group(g, xb + 8 * k, wb + 8 * k, bscale, alt, &e2);
                    if (e2 < e) { p = p2; neg = !neg; bcombo ^= 1 << k; }
                }
            }
            const float dlt = neg ? -IQ1_DELTA : IQ1_DELTA;
            const float *v = g->val + (size_t)p * 8;
            for (int i = 0; i < 8; i++) {
                const float qv = v[i] + dlt;
                a += wb[8 * k + i] * xb[8 * k + i] * qv;
                q += wb[8 * k + i] * qv * qv;
            }
        }
        combo[b] = bcombo;
        if (a > 0.f && q > 0.f) { fit[b] = a / q; sqx[b] = a; sq2[b] = q; }
    }
    const float d = choose_superscale(nsub, fit, sqx, sq2, 1.f, 7, &st->d, st->l);
    if (!(d > 0.f)) {
        memset(st, 0, sizeof(*st));
        st->d = MP_FP32_TO_FP16(0.f);
        return;
    }
    /* final: each sub-block at its quantized scale and, unless its own fit is close to that, the
     * neighbouring index on the side of the fit; the shift found by the search, or the other one where that fits the same points
     * better (then the points are searched again for it) */
    float wone[32];
    for (int i = 0; i < 32; i++) wone[i] = 1.f;
    for (int b = 0; b < nsub; b++) {
        const float *xb = x + b * sub, *wb = w + b * sub;
        float wsum = 0.f;
        for (int i = 0; i < sub; i++) wsum += wb[i];
        if (!(wsum > 0.f)) wb = wone;
        const float lfit = 0.5f * (fit[b] / d - 1.f);
        int l0 = st->l[b], l1 = st->l[b];
        if (lfit > (float)st->l[b] + IQ1_WINDOW_SKIP) l1 = l1 < 7 ? l1 + 1 : 7;
        else if (lfit < (float)st->l[b] - IQ1_WINDOW_SKIP) l0 = l0 > 0 ? l0 - 1 : 0;
        float best_e = FLT_MAX;
        for (int lb = l0; lb <= l1; lb++) {
            const float s = d * (float)(2 * lb + 1);
            uint16_t pt[4];
            uint8_t neg[4];
            float e_run[4], e_alt[4];
            for (int k = 0; k < ng; k++) {
                neg[k] = group_shift ? (combo[b] >> k) & 1 : combo[b] & 1;
                e_run[k] = 0.f;
                pt[k] = (uint16_t)ternary_group(g, xb + 8 * k, wb + 8 * k, s, neg[k] ? -IQ1_DELTA : IQ1_DELTA, &e_run[k]);
                /* the same point with the other shift */
                const float *v = g->val + (size_t)pt[k] * 8;
                const float alt = neg[k] ? IQ1_DELTA : -IQ1_DELTA;
                e_alt[k] = 0.f;
                for (int i = 0; i < 8; i++) {
                    const float dlt = xb[8 * k + i] - s * (v[i] + alt);
                    e_alt[k] += wb[8 * k + i] * dlt * dlt;
                }
            }
            /* IQ1_M decides per group, IQ1_S per sub-block */
            for (int k = 0; k < (group_shift ? ng : 1); k++) {
                const int k0 = group_shift ? k : 0, k1 = group_shift ? k + 1 : ng;
                float cur = 0.f, alt = 0.f;
                for (int j = k0; j < k1; j++) { cur += e_run[j]; alt += e_alt[j]; }
                if (!(alt < cur)) continue;
                float e_new[4];
                uint16_t p_new[4];
                float tot = 0.f;
                for (int j = k0; j < k1; j++) {
                    e_new[j] = 0.f;
                    p_new[j] = (uint16_t)ternary_group(g, xb + 8 * j, wb + 8 * j, s, neg[j] ? IQ1_DELTA : -IQ1_DELTA, &e_new[j]);
                    tot += e_new[j];
                }
                if (tot < cur)
                    for (int j = k0; j < k1; j++) { pt[j] = p_new[j]; neg[j] ^= 1; e_run[j] = e_new[j]; }
            }
            float e_tot = 0.f;
            for (int k = 0; k < ng; k++) e_tot += e_run[k];
            if (lb == l0 || e_tot < best_e) { /* the first always: no sub-block is left unwritten */
                best_e = e_tot;
                st->l[b] = (uint8_t)lb;
                memcpy(st->pt + b * ng, pt, sizeof(uint16_t) * (size_t)ng);
                memcpy(st->dneg + b * ng, neg, (size_t)ng);
            }
        }
    }
}

static void quantize_row_iq1_s(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq1_s *y = (block_iq1_s *)vy;
    const iq_grid *g = &grids[G_IQ1_S];
    ternary_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_ternary_superblock(g, 32, 0, x + ib * QK_K, imp + ib * QK_K, &st);
        y[ib].d = st.d;
        for (int b = 0; b < QK_K / 32; b++) {
            uint16_t h = (uint16_t)(st.l[b] << 12 | st.dneg[4 * b] << 15);
            for (int k = 0; k < 4; k++) {
                y[ib].qs[4 * b + k] = (uint8_t)(st.pt[4 * b + k] & 255);
                h |= (uint16_t)((st.pt[4 * b + k] >> 8) << (3 * k));
            }
            y[ib].qh[b] = h;
        }
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq1_s), n, imp, dequantize_row_iq1_s, rescale_d0);
}

static void quantize_row_iq1_m(const float *x, void *vy, int64_t n, const float *imp) {
    block_iq1_m *y = (block_iq1_m *)vy;
    const iq_grid *g = &grids[G_IQ1_M];
    ternary_state st;
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        quantize_ternary_superblock(g, 16, 1, x + ib * QK_K, imp + ib * QK_K, &st);
        for (int k = 0; k < QK_K / 8; k++) y[ib].qs[k] = (uint8_t)(st.pt[k] & 255);
        for (int j = 0; j < QK_K / 16; j++) {
            const int lo = (st.pt[2 * j] >> 8) | st.dneg[2 * j] << 3;
            const int hi = (st.pt[2 * j + 1] >> 8) | st.dneg[2 * j + 1] << 3;
            y[ib].qh[j] = (uint8_t)(lo | hi << 4);
        }
        /* four 16-bit words: 3-bit indices of sub-blocks 4i..4i+3, the fp16 d's nibble i on top */
        for (int i = 0; i < 4; i++) {
            uint16_t sc = (uint16_t)(((st.d >> (4 * i)) & 15) << 12);
            for (int k = 0; k < 4; k++) sc |= (uint16_t)(st.l[4 * i + k] << (3 * k));
            memcpy(y[ib].scales + 2 * i, &sc, 2);
        }
    }
    mp_debias_row(x, vy, (int)sizeof(block_iq1_m), n, imp, dequantize_row_iq1_m, rescale_iq1_m);
}

static inline void decode_ternary(const iq_grid *g, int p, float dl, float dlt, float *y) {
    const float *v = g->val + (size_t)p * 8;
    for (int i = 0; i < 8; i++) y[i] = dl * (v[i] + dlt);
}

static void dequantize_row_iq1_s(const void *vx, float *y, int64_t n) {
    const block_iq1_s *x = (const block_iq1_s *)vx;
    const iq_grid *g = &grids[G_IQ1_S];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        for (int b = 0; b < QK_K / 32; b++) {
            const uint16_t h = x[ib].qh[b];
            const float dl = d * (float)(2 * ((h >> 12) & 7) + 1);
            const float dlt = h & 0x8000 ? -IQ1_DELTA : IQ1_DELTA;
            for (int k = 0; k < 4; k++)
                decode_ternary(g, x[ib].qs[4 * b + k] | ((h >> (3 * k)) & 7) << 8, dl, dlt, y + 32 * b + 8 * k);
        }
    }
}

static void dequantize_row_iq1_m(const void *vx, float *y, int64_t n) {
    const block_iq1_m *x = (const block_iq1_m *)vx;
    const iq_grid *g = &grids[G_IQ1_M];
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        uint16_t sc[4];
        memcpy(sc, x[ib].scales, 8);
        const mp_half dh = (mp_half)((sc[0] >> 12) | (sc[1] >> 12) << 4 | (sc[2] >> 12) << 8 | (sc[3] >> 12) << 12);
        const float d = MP_FP16_TO_FP32(dh);
        for (int j = 0; j < QK_K / 16; j++) {
            const float dl = d * (float)(2 * ((sc[j / 4] >> (3 * (j % 4))) & 7) + 1);
            for (int h = 0; h < 2; h++) {
                const int nib = (x[ib].qh[j] >> (4 * h)) & 15;
                const int k = 2 * j + h;
                decode_ternary(g, x[ib].qs[k] | (nib & 7) << 8, dl, nib & 8 ? -IQ1_DELTA : IQ1_DELTA, y + 8 * k);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */

/* The largest |x| a codebook format encodes: the fp16 super-scale at most 65504, times the largest
 * sub-block factor a * (2 lmax + 1), times the grid's largest |level| (IQ1: the +-1/8 shift is left
 * out, so that every group reaches the range whatever its shift). 0 before the grid is loaded. */
float mp_iq_max_abs(int type) {
    const int s = grid_slot(type);
    if (s < 0 || !grids[s].ready) return 0.f;
    const iq_grid *g = &grids[s];
    const float top = fabsf(g->lev[0]) > fabsf(g->lev[g->nlev - 1]) ? fabsf(g->lev[0]) : fabsf(g->lev[g->nlev - 1]);
    float factor;
    switch (type) {
    case MP_IQ2_XXS: factor = spec_iq2_xxs.a * 31.f; break;
    case MP_IQ2_XS: factor = spec_iq2_xs.a * 31.f; break;
    case MP_IQ2_S: factor = spec_iq2_s.a * 31.f; break;
    case MP_IQ3_XXS: factor = spec_iq3_xxs.a * 31.f; break;
    case MP_IQ3_S: factor = spec_iq3_s.a * 31.f; break;
    default: factor = 15.f; /* IQ1_S, IQ1_M: a = 1, lmax = 7 */
    }
    return MP_FP16_SCALE_MAX * factor * top;
}

const mp_format mp_formats_iq[] = {
    {MP_IQ2_XXS, "IQ2_XXS", QK_K, sizeof(block_iq2_xxs), 1, quantize_row_iq2_xxs, dequantize_row_iq2_xxs, 0.f},
    {MP_IQ2_XS, "IQ2_XS", QK_K, sizeof(block_iq2_xs), 1, quantize_row_iq2_xs, dequantize_row_iq2_xs, 0.f},
    {MP_IQ2_S, "IQ2_S", QK_K, sizeof(block_iq2_s), 1, quantize_row_iq2_s, dequantize_row_iq2_s, 0.f},
    {MP_IQ3_XXS, "IQ3_XXS", QK_K, sizeof(block_iq3_xxs), 1, quantize_row_iq3_xxs, dequantize_row_iq3_xxs, 0.f},
    {MP_IQ3_S, "IQ3_S", QK_K, sizeof(block_iq3_s), 1, quantize_row_iq3_s, dequantize_row_iq3_s, 0.f},
    {MP_IQ1_S, "IQ1_S", QK_K, sizeof(block_iq1_s), 1, quantize_row_iq1_s, dequantize_row_iq1_s, 0.f},
    {MP_IQ1_M, "IQ1_M", QK_K, sizeof(block_iq1_m), 1, quantize_row_iq1_m, dequantize_row_iq1_m, 0.f},
    MP_FORMAT_END,
};
