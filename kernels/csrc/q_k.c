/* Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: GGUF k-quants (256-weight super-blocks).
 *
 * Decoding (byte layouts of ggml; the `gguf` package decodes our bytes to the same float32):
 *   Q2_K  16 sub-blocks of 16: y = (d*sc)*q - (dmin*m),  q in 0..3,   sc, m 4-bit
 *   Q3_K  16 sub-blocks of 16: y = (d*(sc-32))*q,        q in -4..3,  sc 6-bit
 *   Q4_K   8 sub-blocks of 32: y = (d*sc)*q - (dmin*m),  q in 0..15,  sc, m 6-bit
 *   Q5_K   8 sub-blocks of 32: y = (d*sc)*q - (dmin*m),  q in 0..31,  sc, m 6-bit
 *   Q6_K  16 sub-blocks of 16: y = (d*sc)*q,             q in -32..31, sc int8
 *
 * Quantization minimizes sum_i w_i (x_i - y_i)^2 per super-block, w_i = the importance of the
 * column when one is given, else 1 (plain squared error). Then d (and dmin, so that the block
 * scales uniformly) is multiplied by sum w x^2 / sum w x x_hat: the reconstruction's weighted gain
 * is 1, not the shrunk 1 - (relative squared error) of a least-squares fit (kernels/csrc/debias.c).
 *
 * Symmetric formats (Q3_K, Q6_K): the fp16 super-block scale d is set from the largest sub-block
 * extreme; each sub-block then tries K integer scales s around the one that maps its extreme to the
 * extra negative level -N, and keeps the s whose exact error (every weight rounded to its nearest
 * level of the decoded d*s) is smallest. Searching the integers directly means no second rounding
 * of a continuous scale; steps somewhat larger than extreme/N are often better for 16 weights, so
 * the candidates reach up to about +10% (Q6_K) / +30% (Q3_K).
 *
 * Affine formats (Q2_K, Q4_K, Q5_K): per sub-block a grid search over K candidate steps; each
 * candidate rounds the sub-block and a weighted least-squares refit of (scale, min) on those
 * integers gives its error in closed form; the best is polished by round / refit passes. The
 * sub-block scales and mins are quantized against fp16 d, dmin (weighted least squares for d),
 * then each sub-block picks its integer (scale, min) among neighbours of the rounded ones by exact
 * error. Values are normalized by the super-block's max |x| for this search (no under/overflow in
 * the sums); the final rounding uses the original values and the decoded fp16 scales.
 *
 * Speed: the hot loops (sym_err, aff_cand, aff_err, round_levels) run over candidates (or weights)
 * in the innermost loop: independent lanes that the compiler vectorizes without reassociating any
 * float sum. With no multiply-add contraction either (below), the bytes written do not depend on
 * the instruction set. The kernels are small out-of-line functions: inlined into callers with
 * constant trip counts, GCC unrolls them first and then leaves them scalar.
 */
#include <float.h>

#include "moeplan.h"

/* (d*sc)*q - dmin*m must be two roundings, as in ggml and numpy, never one fused multiply-add
 * (clang contracts by default where FMA exists; GCC does not in ISO C mode) */
#pragma STDC FP_CONTRACT OFF

#if defined(__GNUC__) || defined(__clang__)
#define MP_ALWAYS_INLINE static inline __attribute__((always_inline))
#if defined(__clang__)
#define MP_NOINLINE __attribute__((noinline))
#else
/* noipa: no constant propagation into the kernels either; with the clamp bounds as compile-time
 * constants GCC 12 turns the clamps into branches and the loops stay scalar */
#define MP_NOINLINE __attribute__((noipa))
#endif
#else
#define MP_ALWAYS_INLINE static inline
#define MP_NOINLINE
#endif

/* round to nearest (ties to even) for |v| < 2^22, in float arithmetic so that it vectorizes;
 * larger |v| come out large and are clamped by the callers. Needs float evaluation in float
 * precision (SSE, NEON); with x87 excess precision the magic-number trick does not round. */
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define MP_RND_MAGIC 12582912.f
MP_ALWAYS_INLINE float rnd(float v) { return (v + MP_RND_MAGIC) - MP_RND_MAGIC; }
#else
MP_ALWAYS_INLINE float rnd(float v) { return nearbyintf(v); }
#endif
MP_ALWAYS_INLINE float clampf(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* below this max |x| a super-block is stored as zeros, which is then its best encoding: every
 * k-quant level is an integer multiple of 2^-24 (fp16 scales are), so a nonzero level is farther
 * from any |x| < 2^-25 than 0 is */
#define MP_TINY 0x1p-25f
#define MP_FP16_MAX 65504.f

/* fp16 of a positive super-block scale v, raised to at least `need` (the scale at which the
 * largest integer sub-block scale still reaches the block's extreme: fp16 subnormals are coarse
 * and rounding to nearest could lose up to half of it) and to at least the smallest subnormal
 * 2^-24 (a scale that underflows to 0 would lose the whole block; the integer sub-block scales
 * absorb the excess, so e.g. Q6_K keeps weights of 1e-6 to about 1-5%); at most 65504. */
static mp_half fp16_scale(float v, float need) {
    v = v > MP_FP16_MAX ? MP_FP16_MAX : v;
    mp_half h = MP_FP32_TO_FP16(v);
    if (h == 0) h = 1;
    while (h < 0x7bff && MP_FP16_TO_FP32(h) < need) h++; /* positive fp16 bits order like values */
    return h;
}

/* Final rounding of a super-block: L[i] = clamp(round((x[i] + mb[j]) * ib[j]), lo, hi) - lo, with
 * j = i / sub the sub-block (ib = 1 / step, mb = the sub-block's min; 0 for symmetric formats) */
static MP_NOINLINE void round_levels(const float *restrict x, const float *restrict ib, const float *restrict mb,
                                     int sub, float lo, float hi, uint8_t *restrict L) {
    for (int j = 0; j < QK_K / sub; j++) {
        const float s = ib[j], m = mb[j];
        for (int i = 0; i < sub; i++) L[sub * j + i] = (uint8_t)(int)(clampf(rnd((x[sub * j + i] + m) * s), lo, hi) - lo);
    }
}

/* Normalized importance of one super-block: w = imp / max(imp) + 1e-6, so that a column with zero
 * importance still breaks ties and no sum of weights is zero. Returns 0 (use unit weights) when
 * there is no importance or it is zero on the whole super-block. */
static int block_weights(const float *imp, float *w) {
    if (!imp) return 0;
    float m[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}; /* 8 lanes: no serial dependency */
    for (int i = 0; i < QK_K; i += 8)
        for (int q = 0; q < 8; q++) m[q] = imp[i + q] > m[q] ? imp[i + q] : m[q];
    for (int q = 1; q < 8; q++) m[0] = m[q] > m[0] ? m[q] : m[0];
    const float wmax = m[0];
    if (!(wmax > 0.f)) return 0;
    if (wmax >= 1e-30f) {
        const float iw = 1.f / wmax;
        for (int i = 0; i < QK_K; i++) w[i] = imp[i] * iw + 1e-6f;
    } else { /* 1 / wmax could overflow */
        for (int i = 0; i < QK_K; i++) w[i] = imp[i] / wmax + 1e-6f;
    }
    return 1;
}

static float block_amax(const float *x) {
    float m[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < QK_K; i += 8)
        for (int q = 0; q < 8; q++) {
            const float a = fabsf(x[i + q]);
            m[q] = a > m[q] ? a : m[q];
        }
    for (int q = 1; q < 8; q++) m[0] = m[q] > m[0] ? m[q] : m[0];
    return m[0];
}

/* ------------------------------------------------------------------------------------------ */
/* Symmetric formats: Q3_K (N = 4, S = 32), Q6_K (N = 32, S = 128)                             */
/* ------------------------------------------------------------------------------------------ */

/* For nsub sub-blocks of 16 (sub-block j: weights x[16j..], K inverse steps ia[16j..]):
 * E[16j+k] = sum_i w_i (u_ik - L_ik)^2, u_ik = x_i / a_k, L_ik = u_ik rounded and clamped to
 * -N..N-1: the squared error of step a_k in units of a_k^2 (times a_k^2 to compare candidates). */
MP_ALWAYS_INLINE void sym_err_impl(const float *restrict x, const float *restrict w, const float *restrict ia,
                                   float *restrict E, const int nsub, const int K, const float N) {
    for (int j = 0; j < nsub; j++) {
        const float *xj = x + 16 * j, *wj = w ? w + 16 * j : NULL, *iaj = ia + 16 * j;
        float acc[16];
        for (int k = 0; k < K; k++) acc[k] = 0.f;
        for (int i = 0; i < 16; i++) {
            const float xi = xj[i], wi = wj ? wj[i] : 1.f;
            for (int k = 0; k < K; k++) {
                const float u = xi * iaj[k];
                const float e = u - clampf(rnd(u), -N, N - 1.f);
                acc[k] += wi * (e * e);
            }
        }
        for (int k = 0; k < K; k++) E[16 * j + k] = acc[k];
    }
}

static MP_NOINLINE void sym_err(const float *restrict x, const float *restrict ia, float *restrict E, int nsub, int K,
                                float N) {
    sym_err_impl(x, NULL, ia, E, nsub, K, N);
}
static MP_NOINLINE void sym_err_w(const float *restrict x, const float *restrict w, const float *restrict ia,
                                  float *restrict E, int nsub, int K, float N) {
    sym_err_impl(x, w, ia, E, nsub, K, N);
}

/* Search settings of a symmetric format: d = dfac * max|x| / (N*S); the candidate |s| of a
 * sub-block are s_nom * r for K values of r evenly spaced from rlo to rhi (then forced increasing
 * by at least 1), where s_nom maps the sub-block's extreme to level N: r > 1 means a step larger
 * than extreme / N (the extreme is then rounded inwards, which often lowers the total error).
 * dfac > 1 leaves the largest sub-block room for such steps within |s| <= S. The settings trade
 * rmse against speed on gaussian data (results/kernels.md); more candidates gain < 0.1% rmse. */
typedef struct {
    float dfac, rlo, rhi;
    int K; /* 2..16 */
} sym_search;
static const sym_search Q3_PLAIN = {1.15f, 0.90f, 1.20f, 4}, Q3_IMP = {1.15f, 0.85f, 1.30f, 12};
static const sym_search Q6_PLAIN = {1.05f, 0.99f, 1.055f, 8}, Q6_IMP = {1.05f, 0.99f, 1.075f, 12};

/* Extremes of 16-weight sub-blocks: M[j] = max |x|, sg[j] = +1 when that extreme is negative
 * (a positive integer scale then maps it to level -N), else -1. */
static MP_NOINLINE void sym_extremes(const float *restrict x, int nsub, float *restrict M, float *restrict sg) {
    float hi[16], lo[16];
    for (int j = 0; j < nsub; j++) {
        const float *xj = x + 16 * j;
        float mx[4], mn[4];
        for (int q = 0; q < 4; q++) mx[q] = mn[q] = xj[q];
        for (int i = 4; i < 16; i += 4)
            for (int q = 0; q < 4; q++) {
                mx[q] = xj[i + q] > mx[q] ? xj[i + q] : mx[q];
                mn[q] = xj[i + q] < mn[q] ? xj[i + q] : mn[q];
            }
        mx[0] = mx[0] > mx[2] ? mx[0] : mx[2];
        mx[1] = mx[1] > mx[3] ? mx[1] : mx[3];
        mn[0] = mn[0] < mn[2] ? mn[0] : mn[2];
        mn[1] = mn[1] < mn[3] ? mn[1] : mn[3];
        hi[j] = mx[0] > mx[1] ? mx[0] : mx[1];
        lo[j] = -(mn[0] < mn[1] ? mn[0] : mn[1]);
    }
    for (int j = 0; j < nsub; j++) {
        M[j] = lo[j] > hi[j] ? lo[j] : hi[j];
        sg[j] = lo[j] > hi[j] ? 1.f : -1.f;
    }
}

/* Candidate integer scales of every sub-block (K per sub-block, row j at stride 16):
 * |s| = round(s_nom * r_k) with s_nom = M / (N d), r_k = rlo + k * rstep, at least 1 (a step of 0
 * is never better than 1) and at least the first + k (distinct where the spacing allows), at most
 * S (S - 1 for s > 0). Out: s, the decoded steps a = d * s and 1 / a. */
static MP_NOINLINE void sym_candidates(const float *restrict M, const float *restrict sg, int nsub, int K, float d,
                                       float N, float S, float rlo, float rstep, float *restrict s,
                                       float *restrict a, float *restrict ia) {
    const float inv = 1.f / (N * d);
    for (int j = 0; j < nsub; j++) {
        const float snom = M[j] * inv, smax = sg[j] < 0.f ? S : S - 1.f;
        const float r0 = snom * rlo, rs = snom * rstep;
        const float f = rnd(r0), m0 = f > 1.f ? f : 1.f;
        for (int k = 0; k < K; k++) {
            float m = rnd(r0 + rs * (float)k);
            m = m > m0 + (float)k ? m : m0 + (float)k;
            m = m < smax ? m : smax;
            s[16 * j + k] = sg[j] * m;
        }
        for (int k = 0; k < K; k++) {
            a[16 * j + k] = d * s[16 * j + k];
            ia[16 * j + k] = 1.f / a[16 * j + k];
        }
    }
}

/* One super-block of a symmetric format. x: 256 values; w: weights or NULL.
 * Out: sc[16] in -S..S-1, L[256] = level + N, *pd. Returns 0 for an all-zero block. */
MP_ALWAYS_INLINE int sym_superblock(const float *x, const float *w, const float N, const float S,
                                    const sym_search p, int *sc, uint8_t *L, mp_half *pd) {
    float M[16], sg[16], Mmax = 0.f;
    sym_extremes(x, 16, M, sg);
    for (int j = 0; j < 16; j++) Mmax = M[j] > Mmax ? M[j] : Mmax;
    if (!(Mmax >= MP_TINY)) return 0;
    *pd = fp16_scale(p.dfac * Mmax / (N * S), Mmax / (N * S));
    const float d = MP_FP16_TO_FP32(*pd);
    float s[16][16], a[16][16], ia[16][16], E[16][16]; /* [sub-block][candidate < K] */
    sym_candidates(M, sg, 16, p.K, d, N, S, p.rlo, (p.rhi - p.rlo) / (float)(p.K - 1), s[0], a[0], ia[0]);
    if (w)
        sym_err_w(x, w, ia[0], E[0], 16, p.K, N);
    else
        sym_err(x, ia[0], E[0], 16, p.K, N);
    float ib[16];
    for (int j = 0; j < 16; j++) {
        int b = 0;
        float be = E[j][0] * (a[j][0] * a[j][0]);
        for (int k = 1; k < p.K; k++) {
            const float e = E[j][k] * (a[j][k] * a[j][k]);
            b = e < be ? k : b;
            be = e < be ? e : be;
        }
        sc[j] = (int)s[j][b];
        ib[j] = ia[j][b];
    }
    static const float zeros[16] = {0.f};
    round_levels(x, ib, zeros, 16, -N, N - 1.f, L);
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Affine formats: Q2_K (16 x 16, levels 0..3, 4-bit scales), Q4_K / Q5_K (8 x 32, 0..15 / 0..31, */
/* 6-bit scales)                                                                              */
/* ------------------------------------------------------------------------------------------ */

#define AFF_NCAND 20 /* most (scale, min) neighbours tried by exact error */

/* Per candidate k: L = min(round((x - xmin) * isc[k]), nmax) and the sums Sl = sum w L,
 * Sll = sum w L^2, Sxl = sum w x L. */
MP_ALWAYS_INLINE void aff_cand_impl(const float *restrict x, const float *restrict w, const float xmin,
                                    const float *restrict isc, float *restrict Sl, float *restrict Sll,
                                    float *restrict Sxl, const int n, const int K, const float nmax) {
    float a1[32], a2[32], a3[32];
    for (int k = 0; k < K; k++) a1[k] = a2[k] = a3[k] = 0.f;
    for (int i = 0; i < n; i++) {
        const float xi = x[i] - xmin, wi = w ? w[i] : 1.f, wxi = wi * x[i];
        for (int k = 0; k < K; k++) {
            float l = rnd(xi * isc[k]);
            l = l > nmax ? nmax : l;
            a1[k] += wi * l;
            a2[k] += (wi * l) * l;
            a3[k] += wxi * l;
        }
    }
    for (int k = 0; k < K; k++) {
        Sl[k] = a1[k];
        Sll[k] = a2[k];
        Sxl[k] = a3[k];
    }
}

/* E[k] = sum_i w_i (u_ik - L_ik)^2, u_ik = (x_i + mb_k) / a_k, L_ik = round(u_ik) clamped to 0..nmax */
MP_ALWAYS_INLINE void aff_err_impl(const float *restrict x, const float *restrict w, const float *restrict ia,
                                   const float *restrict mb, float *restrict E, const int n, const int K,
                                   const float nmax) {
    float acc[AFF_NCAND];
    for (int k = 0; k < K; k++) acc[k] = 0.f;
    for (int i = 0; i < n; i++) {
        const float xi = x[i], wi = w ? w[i] : 1.f;
        for (int k = 0; k < K; k++) {
            const float u = (xi + mb[k]) * ia[k];
            const float e = u - clampf(rnd(u), 0.f, nmax);
            acc[k] += wi * (e * e);
        }
    }
    for (int k = 0; k < K; k++) E[k] = acc[k];
}

static MP_NOINLINE void aff_cand(const float *restrict x, const float *restrict w, float xmin,
                                 const float *restrict isc, float *restrict Sl, float *restrict Sll,
                                 float *restrict Sxl, int n, int K, float nmax) {
    if (w)
        aff_cand_impl(x, w, xmin, isc, Sl, Sll, Sxl, n, K, nmax);
    else
        aff_cand_impl(x, NULL, xmin, isc, Sl, Sll, Sxl, n, K, nmax);
}
static MP_NOINLINE void aff_err(const float *restrict x, const float *restrict w, const float *restrict ia,
                                const float *restrict mb, float *restrict E, int n, int K, float nmax) {
    /* the weighted search (all 20) runs faster unrolled, the plain one (12) as a loop (GCC 12) */
    if (w && K == AFF_NCAND)
        aff_err_impl(x, w, ia, mb, E, n, AFF_NCAND, nmax);
    else if (w)
        aff_err_impl(x, w, ia, mb, E, n, K, nmax);
    else
        aff_err_impl(x, NULL, ia, mb, E, n, K, nmax);
}

/* Sums of a sub-block rounded at step 1/ia above b: sl = sum w L, sll = sum w L^2, sxl = sum w x L
 * (4 lanes; n is a multiple of 4) */
static MP_NOINLINE void aff_sums(const float *restrict x, const float *restrict w, float b, float ia, int n,
                                 float nmax, float *sl, float *sll, float *sxl) {
    float p1[4] = {0.f, 0.f, 0.f, 0.f}, p2[4] = {0.f, 0.f, 0.f, 0.f}, p3[4] = {0.f, 0.f, 0.f, 0.f};
    for (int i = 0; i < n; i += 4)
        for (int q = 0; q < 4; q++) {
            const float l = clampf(rnd((x[i + q] - b) * ia), 0.f, nmax);
            const float wl = w ? w[i + q] * l : l;
            p1[q] += wl;
            p2[q] += wl * l;
            p3[q] += wl * x[i + q];
        }
    *sl = (p1[0] + p1[1]) + (p1[2] + p1[3]);
    *sll = (p2[0] + p2[1]) + (p2[2] + p2[3]);
    *sxl = (p3[0] + p3[1]) + (p3[2] + p3[3]);
}

/* candidate steps (xmax - xmin) / (nmax + t[k]): 8 for the plain path, 16 with importance */
static const float grid_aff_8[8] = {-1.0f, -0.75f, -0.5f, -0.25f, 0.f, 0.25f, 0.5f, 0.75f};
static const float grid_q2_16[16] = {-0.6f, -0.5f, -0.4f, -0.3f, -0.2f, -0.1f, 0.f,  0.1f,
                                     0.2f,  0.3f,  0.4f,  0.5f,  0.6f,  0.7f,  0.8f, 0.9f};
static const float grid_q45_16[16] = {-3.0f, -2.6f, -2.2f, -1.8f, -1.5f, -1.2f, -0.9f, -0.6f,
                                      -0.4f, -0.2f, 0.f,   0.2f,  0.4f,  0.6f,  0.8f,  1.0f};

/* Affine fit x ~ a*L + b of one sub-block (normalized values), L in 0..nmax, a > 0, b <= 0. */
MP_ALWAYS_INLINE void fit_affine(const float *x, const float *w, const int n, const float nmax, const float *t,
                                 const int K, const int iters, float *pa, float *pb) {
    /* extremes and weighted sums in 4 lanes (n is a multiple of 4) */
    float lo[4], hi[4], sw[4], sx[4];
    for (int q = 0; q < 4; q++) {
        lo[q] = hi[q] = x[q];
        sw[q] = sx[q] = 0.f;
    }
    for (int i = 0; i < n; i += 4)
        for (int q = 0; q < 4; q++) {
            const float v = x[i + q], wv = w ? w[i + q] : 1.f;
            lo[q] = v < lo[q] ? v : lo[q];
            hi[q] = v > hi[q] ? v : hi[q];
            sw[q] += wv;
            sx[q] += wv * v;
        }
    float xmin = lo[0] < lo[1] ? lo[0] : lo[1], xmax = hi[0] > hi[1] ? hi[0] : hi[1];
    xmin = lo[2] < xmin ? lo[2] : xmin;
    xmin = lo[3] < xmin ? lo[3] : xmin;
    xmax = hi[2] > xmax ? hi[2] : xmax;
    xmax = hi[3] > xmax ? hi[3] : xmax;
    const float Sw = (sw[0] + sw[1]) + (sw[2] + sw[3]), Sx = (sx[0] + sx[1]) + (sx[2] + sx[3]);
    if (xmin > 0.f) xmin = 0.f;
    if (!(xmax > xmin)) { /* constant non-positive sub-block */
        *pa = 0.f;
        *pb = xmin;
        return;
    }
    float isc[32], Sl[32], Sll[32], Sxl[32], A[32], B[32], G[32];
    const float range_inv = 1.f / (xmax - xmin);
    for (int k = 0; k < K; k++) isc[k] = (nmax + t[k]) * range_inv;
    aff_cand(x, w, xmin, isc, Sl, Sll, Sxl, n, K, nmax);
    /* closed-form refit per candidate; gain G = a*Sxl + b*Sx = sum w x^2 - error */
    for (int k = 0; k < K; k++) {
        const float D = Sw * Sll[k] - Sl[k] * Sl[k];
        const int ok = D > 1e-6f * Sw * Sll[k];
        float a = ok ? (Sw * Sxl[k] - Sx * Sl[k]) / D : 0.f;
        float b = ok ? (Sll[k] * Sx - Sl[k] * Sxl[k]) / D : 0.f;
        const int clip = b > 0.f;
        a = clip ? Sxl[k] / Sll[k] : a;
        b = clip ? 0.f : b;
        A[k] = a;
        B[k] = b;
        G[k] = (ok && a > 0.f) ? a * Sxl[k] + b * Sx : -1.f;
    }
    int best = 0;
    for (int k = 1; k < K; k++) best = G[k] > G[best] ? k : best;
    float best_g = G[best], best_a = A[best], best_b = B[best];
    if (!(best_g >= 0.f)) {
        best_a = (xmax - xmin) / nmax;
        best_b = xmin;
    }
    for (int it = 0; it < iters; it++) {
        float sl, sll, sxl;
        aff_sums(x, w, best_b, 1.f / best_a, n, nmax, &sl, &sll, &sxl);
        const float D = Sw * sll - sl * sl;
        if (!(D > 1e-6f * Sw * sll)) break;
        float a = (Sw * sxl - Sx * sl) / D, b = (sll * Sx - sl * sxl) / D;
        if (b > 0.f) {
            b = 0.f;
            a = sxl / sll;
        }
        const float g = a * sxl + b * Sx;
        if (!(a > 0.f) || !(g > best_g)) break;
        best_g = g;
        best_a = a;
        best_b = b;
    }
    *pa = best_a;
    *pb = best_b;
}

/* neighbours (scale, min) of the rounded ones tried by exact error: the first 12 cover scale
 * -1..+2 x min -1..+1 (a larger scale pairs with a larger min when a sub-block is re-centred),
 * all 20 scale -2..+2 x min -2..+1 */
static const float ds_[AFF_NCAND] = {0.f, 0.f,  0.f,  -1.f, -1.f, -1.f, 1.f, 1.f, 1.f, 2.f,
                                     2.f, 2.f,  -2.f, -2.f, -2.f, -2.f, -1.f, 0.f, 1.f, 2.f};
static const float dm_[AFF_NCAND] = {0.f, -1.f, 1.f, 0.f, -1.f, 1.f, 0.f, -1.f, 1.f, 0.f,
                                     -1.f, 1.f, -2.f, -1.f, 0.f, 1.f, -2.f, -2.f, -2.f, -2.f};

/* candidate integers (cs, cm) around (s0, m0), their decoded step ca = d*cs and min cmb = dmin*cm,
 * and 1/ca; cs >= 1 (a scale of 0 is never better than 1) */
static MP_NOINLINE void aff_neighbours(float s0, float m0, float d, float dmin, float smax, int K,
                                       float *restrict cs, float *restrict cm, float *restrict ca,
                                       float *restrict cmb, float *restrict ia) {
    const float mmax = dmin > 0.f ? smax : 0.f;
    for (int k = 0; k < K; k++) {
        cs[k] = clampf(s0 + ds_[k], 1.f, smax);
        cm[k] = clampf(m0 + dm_[k], 0.f, mmax);
        ca[k] = d * cs[k];
        cmb[k] = dmin * cm[k];
        ia[k] = 1.f / ca[k];
    }
}

/* One super-block of an affine format (nsub sub-blocks of `sub`). x: 256 values, w: weights or
 * NULL. Out: sc[], mn[] in 0..smax, L[256] in 0..nmax, *pd, *pdmin. Returns 0 for a zero block. */
MP_ALWAYS_INLINE int aff_superblock(const float *x, const float *w, const int nsub, const int sub, const float nmax,
                                    const float smax, const float *t, const int K, const int iters, const int nb, uint8_t *sc, uint8_t *mn, uint8_t *L,
                                    mp_half *pd, mp_half *pdmin) {
    const float amax = block_amax(x);
    if (!(amax >= MP_TINY)) return 0;
    float xn[QK_K];
    const float inv = 1.f / amax;
    for (int i = 0; i < QK_K; i++) xn[i] = x[i] * inv;
    float a[16], mb[16], wsum[16], max_a = 0.f, max_m = 0.f;
    for (int j = 0; j < nsub; j++) {
        float aj, bj;
        fit_affine(xn + sub * j, w ? w + sub * j : NULL, sub, nmax, t, K, iters, &aj, &bj);
        a[j] = aj; /* normalized units until the fp16 scales: no overflow in the sums below */
        mb[j] = -bj;
        float s = (float)sub;
        if (w) {
            s = 0.f;
            for (int i = 0; i < sub; i++) s += w[sub * j + i];
        }
        wsum[j] = s;
        max_a = a[j] > max_a ? a[j] : max_a;
        max_m = mb[j] > max_m ? mb[j] : max_m;
    }
    /* super-block scales: weighted least squares on the rounded integers, started at max / smax */
    float d = max_a / smax, dm = max_m / smax;
    for (int it = 0; it < 2; it++) {
        float num = 0.f, den = 0.f, numm = 0.f, denm = 0.f;
        const float id = d > 0.f ? 1.f / d : 0.f, idm = dm > 0.f ? 1.f / dm : 0.f;
        for (int j = 0; j < nsub; j++) {
            const float s = clampf(rnd(a[j] * id), 0.f, smax), m = clampf(rnd(mb[j] * idm), 0.f, smax);
            num += wsum[j] * a[j] * s;
            den += wsum[j] * s * s;
            numm += wsum[j] * mb[j] * m;
            denm += wsum[j] * m * m;
        }
        if (den > 0.f) d = num / den;
        if (denm > 0.f) dm = numm / denm;
    }
    *pd = fp16_scale(d > 0.f ? d * amax : 0.f, max_a * amax / smax);
    *pdmin = max_m > 0.f ? fp16_scale(dm * amax, max_m * amax / smax) : 0;
    const float dd = MP_FP16_TO_FP32(*pd), ddm = MP_FP16_TO_FP32(*pdmin);
    const float idd = 1.f / dd, iddm = ddm > 0.f ? 1.f / ddm : 0.f;
    for (int j = 0; j < nsub; j++) {
        const float *xj = x + sub * j;
        const float s0 = rnd((a[j] * amax) * idd), m0 = rnd((mb[j] * amax) * iddm);
        float cs[AFF_NCAND], cm[AFF_NCAND], ca[AFF_NCAND], ia[AFF_NCAND], cmb[AFF_NCAND], E[AFF_NCAND];
        aff_neighbours(s0, m0, dd, ddm, smax, nb, cs, cm, ca, cmb, ia);
        aff_err(xj, w ? w + sub * j : NULL, ia, cmb, E, sub, nb, nmax);
        int b = 0; /* (s0, m0) */
        float be = E[0] * (ca[0] * ca[0]);
        for (int k = 1; k < nb; k++) {
            const float e = E[k] * (ca[k] * ca[k]);
            b = e < be ? k : b;
            be = e < be ? e : be;
        }
        sc[j] = (uint8_t)(int)cs[b];
        mn[j] = (uint8_t)(int)cm[b];
    }
    float ib[16], mbb[16];
    for (int j = 0; j < nsub; j++) {
        ib[j] = 1.f / (dd * (float)sc[j]);
        mbb[j] = ddm * (float)mn[j];
    }
    round_levels(x, ib, mbb, sub, 0.f, nmax, L);
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Bit packing shared by the formats                                                          */
/* ------------------------------------------------------------------------------------------ */

/* 2-bit fields: element k lives in qs[32*(k/128) + k%32] at bit 2*((k%128)/32) (Q2_K, Q3_K) */
static void pack_2bit(const uint8_t *L, uint8_t *qs) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t *q = L + 128 * h + l;
            qs[32 * h + l] = (uint8_t)((q[0] & 3) | ((q[32] & 3) << 2) | ((q[64] & 3) << 4) | ((q[96] & 3) << 6));
        }
}

/* one bit per element: element k is bit k/32 of byte k%32 (Q3_K hmask, Q5_K qh); `bit` selects
 * which bit of L is stored */
static void pack_highbit(const uint8_t *L, int bit, uint8_t *h) {
    for (int l = 0; l < 32; l++) {
        unsigned v = 0;
        for (int g = 0; g < 8; g++) v |= (unsigned)((L[32 * g + l] >> bit) & 1) << g;
        h[l] = (uint8_t)v;
    }
}

/* 4-bit fields: element 64c+l (l < 32) in the low nibble of qs[32c+l], 64c+32+l in the high (Q4_K, Q5_K) */
static void pack_4bit(const uint8_t *L, uint8_t *qs) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) qs[32 * c + l] = (uint8_t)((L[64 * c + l] & 15) | ((L[64 * c + 32 + l] & 15) << 4));
}

/* Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes */
static void pack_scales_k4(const uint8_t *sc, const uint8_t *mn, uint8_t *q) {
    for (int j = 0; j < 4; j++) {
        q[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        q[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
        q[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
    }
}

static void unpack_scales_k4(const uint8_t *q, float d, float dmin, float *dl, float *ml) {
    for (int j = 0; j < 8; j++) {
        int s, m;
        if (j < 4) {
            s = q[j] & 63;
            m = q[j + 4] & 63;
        } else {
            s = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
            m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
        dl[j] = d * (float)s;
        ml[j] = dmin * (float)m;
    }
}


/* ---- unbiased scales (debias.c) ---- */
static void dequantize_row_q2_K(const void *vx, float *y, int64_t n);
static void dequantize_row_q3_K(const void *vx, float *y, int64_t n);
/* Q2_K: d and dmin together, so that the whole block (d sc q - dmin m) scales by c */
static void rescale_q2_K(void *block, float c) {
    block_q2_K *b = (block_q2_K *)block;
    b->d = mp_half_scaled(b->d, c);
    b->dmin = mp_half_scaled(b->dmin, c);
}
static void dequantize_row_q4_K(const void *vx, float *y, int64_t n);
static void dequantize_row_q5_K(const void *vx, float *y, int64_t n);
static void dequantize_row_q6_K(const void *vx, float *y, int64_t n);
/* Q4_K / Q5_K: d and dmin lead the block */
static void rescale_dd(void *block, float c) {
    mp_half h[2];
    memcpy(h, block, 4);
    h[0] = mp_half_scaled(h[0], c);
    h[1] = mp_half_scaled(h[1], c);
    memcpy(block, h, 4);
}
static void rescale_q6_K(void *block, float c) {
    block_q6_K *b = (block_q6_K *)block;
    b->d = mp_half_scaled(b->d, c);
}
static void rescale_q3_K(void *block, float c) {
    block_q3_K *b = (block_q3_K *)block;
    b->d = mp_half_scaled(b->d, c);
}

/* ------------------------------------------------------------------------------------------ */
/* Q2_K                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void quantize_row_q2_K(const float *x, void *vy, int64_t n, const float *imp) {
    block_q2_K *y = (block_q2_K *)vy;
    float wbuf[QK_K];
    uint8_t L[QK_K], sc[16], mn[16];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        const float *xb = x + ib * QK_K;
        const float *w = block_weights(imp ? imp + ib * QK_K : NULL, wbuf) ? wbuf : NULL;
        block_q2_K *b = y + ib;
        int ok = w ? aff_superblock(xb, w, 16, 16, 3.f, 15.f, grid_q2_16, 16, 2, 20, sc,
                                    mn, L, &b->d, &b->dmin)
                   : aff_superblock(xb, NULL, 16, 16, 3.f, 15.f, grid_aff_8, 8, 1, 12, sc, mn,
                                    L, &b->d, &b->dmin);
        if (!ok) {
            memset(b, 0, sizeof(*b));
            continue;
        }
        for (int j = 0; j < 16; j++) b->scales[j] = (uint8_t)(sc[j] | (mn[j] << 4));
        pack_2bit(L, b->qs);
    }
    mp_debias_row(x, vy, (int)sizeof(block_q2_K), n, imp, dequantize_row_q2_K, rescale_q2_K);
}

static void dequantize_row_q2_K(const void *vx, float *y, int64_t n) {
    const block_q2_K *x = (const block_q2_K *)vx;
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d), dmin = MP_FP16_TO_FP32(x[ib].dmin);
        float dl[16], ml[16];
        for (int j = 0; j < 16; j++) {
            dl[j] = d * (float)(x[ib].scales[j] & 15);
            ml[j] = dmin * (float)(x[ib].scales[j] >> 4);
        }
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 4; g++)
                for (int l = 0; l < 32; l++) {
                    const int k = 128 * h + 32 * g + l;
                    const int q = (x[ib].qs[32 * h + l] >> (2 * g)) & 3;
                    y[k] = dl[k / 16] * (float)q - ml[k / 16];
                }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Q3_K                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void quantize_row_q3_K(const float *x, void *vy, int64_t n, const float *imp) {
    block_q3_K *y = (block_q3_K *)vy;
    float wbuf[QK_K];
    uint8_t L[QK_K];
    int sc[16];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        const float *xb = x + ib * QK_K;
        const float *w = block_weights(imp ? imp + ib * QK_K : NULL, wbuf) ? wbuf : NULL;
        block_q3_K *b = y + ib;
        int ok = w ? sym_superblock(xb, w, 4.f, 32.f, Q3_IMP, sc, L, &b->d)
                   : sym_superblock(xb, NULL, 4.f, 32.f, Q3_PLAIN, sc, L, &b->d);
        if (!ok) {
            /* d = 0, every sub-block scale 0 (stored 32) and every level 0 (stored 4) */
            memset(b, 0, sizeof(*b));
            memset(b->hmask, 0xff, sizeof(b->hmask));
            memset(b->scales + 8, 0xaa, 4);
            continue;
        }
        uint8_t *s = b->scales;
        memset(s, 0, 12);
        for (int j = 0; j < 16; j++) {
            const int l = sc[j] + 32; /* 0..63 */
            s[j % 8] |= (uint8_t)((l & 15) << (4 * (j / 8)));
            s[8 + j % 4] |= (uint8_t)((l >> 4) << (2 * (j / 4)));
        }
        pack_highbit(L, 2, b->hmask);
        pack_2bit(L, b->qs);
    }
    mp_debias_row(x, vy, (int)sizeof(block_q3_K), n, imp, dequantize_row_q3_K, rescale_q3_K);
}

static void dequantize_row_q3_K(const void *vx, float *y, int64_t n) {
    const block_q3_K *x = (const block_q3_K *)vx;
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        const uint8_t *s = x[ib].scales;
        float dl[16];
        for (int j = 0; j < 16; j++) {
            const int lo = (s[j % 8] >> (4 * (j / 8))) & 15;
            const int hi = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
            dl[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 4; g++)
                for (int l = 0; l < 32; l++) {
                    const int k = 128 * h + 32 * g + l;
                    const int q = ((x[ib].qs[32 * h + l] >> (2 * g)) & 3) + (((x[ib].hmask[l] >> (4 * h + g)) & 1) << 2) - 4;
                    y[k] = dl[k / 16] * (float)q;
                }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Q4_K, Q5_K                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static void quantize_row_q4_K(const float *x, void *vy, int64_t n, const float *imp) {
    block_q4_K *y = (block_q4_K *)vy;
    float wbuf[QK_K];
    uint8_t L[QK_K], sc[8], mn[8];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        const float *xb = x + ib * QK_K;
        const float *w = block_weights(imp ? imp + ib * QK_K : NULL, wbuf) ? wbuf : NULL;
        block_q4_K *b = y + ib;
        int ok = w ? aff_superblock(xb, w, 8, 32, 15.f, 63.f, grid_q45_16, 16, 2, 20, sc, mn,
                                    L, &b->d, &b->dmin)
                   : aff_superblock(xb, NULL, 8, 32, 15.f, 63.f, grid_aff_8, 8, 1, 12, sc, mn, L,
                                    &b->d, &b->dmin);
        if (!ok) {
            memset(b, 0, sizeof(*b));
            continue;
        }
        pack_scales_k4(sc, mn, b->scales);
        pack_4bit(L, b->qs);
    }
    mp_debias_row(x, vy, (int)sizeof(block_q4_K), n, imp, dequantize_row_q4_K, rescale_dd);
}

static void dequantize_row_q4_K(const void *vx, float *y, int64_t n) {
    const block_q4_K *x = (const block_q4_K *)vx;
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        float dl[8], ml[8];
        unpack_scales_k4(x[ib].scales, MP_FP16_TO_FP32(x[ib].d), MP_FP16_TO_FP32(x[ib].dmin), dl, ml);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const uint8_t q = x[ib].qs[32 * c + l];
                y[64 * c + l] = dl[2 * c] * (float)(q & 15) - ml[2 * c];
                y[64 * c + 32 + l] = dl[2 * c + 1] * (float)(q >> 4) - ml[2 * c + 1];
            }
    }
}

static void quantize_row_q5_K(const float *x, void *vy, int64_t n, const float *imp) {
    block_q5_K *y = (block_q5_K *)vy;
    float wbuf[QK_K];
    uint8_t L[QK_K], sc[8], mn[8];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        const float *xb = x + ib * QK_K;
        const float *w = block_weights(imp ? imp + ib * QK_K : NULL, wbuf) ? wbuf : NULL;
        block_q5_K *b = y + ib;
        int ok = w ? aff_superblock(xb, w, 8, 32, 31.f, 63.f, grid_q45_16, 16, 2, 20, sc, mn,
                                    L, &b->d, &b->dmin)
                   : aff_superblock(xb, NULL, 8, 32, 31.f, 63.f, grid_aff_8, 8, 1, 12, sc, mn, L,
                                    &b->d, &b->dmin);
        if (!ok) {
            memset(b, 0, sizeof(*b));
            continue;
        }
        pack_scales_k4(sc, mn, b->scales);
        pack_highbit(L, 4, b->qh);
        pack_4bit(L, b->qs);
    }
    mp_debias_row(x, vy, (int)sizeof(block_q5_K), n, imp, dequantize_row_q5_K, rescale_dd);
}

static void dequantize_row_q5_K(const void *vx, float *y, int64_t n) {
    const block_q5_K *x = (const block_q5_K *)vx;
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        float dl[8], ml[8];
        unpack_scales_k4(x[ib].scales, MP_FP16_TO_FP32(x[ib].d), MP_FP16_TO_FP32(x[ib].dmin), dl, ml);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++) {
                const uint8_t q = x[ib].qs[32 * c + l], h = x[ib].qh[l];
                const int q0 = (q & 15) | (((h >> (2 * c)) & 1) << 4);
                const int q1 = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
                y[64 * c + l] = dl[2 * c] * (float)q0 - ml[2 * c];
                y[64 * c + 32 + l] = dl[2 * c + 1] * (float)q1 - ml[2 * c + 1];
            }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Q6_K                                                                                       */
/* ------------------------------------------------------------------------------------------ */

static void quantize_row_q6_K(const float *x, void *vy, int64_t n, const float *imp) {
    block_q6_K *y = (block_q6_K *)vy;
    float wbuf[QK_K];
    uint8_t L[QK_K];
    int sc[16];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        const float *xb = x + ib * QK_K;
        const float *w = block_weights(imp ? imp + ib * QK_K : NULL, wbuf) ? wbuf : NULL;
        block_q6_K *b = y + ib;
        int ok = w ? sym_superblock(xb, w, 32.f, 128.f, Q6_IMP, sc, L, &b->d)
                   : sym_superblock(xb, NULL, 32.f, 128.f, Q6_PLAIN, sc, L, &b->d);
        if (!ok) {
            memset(b, 0, sizeof(*b));
            continue;
        }
        for (int j = 0; j < 16; j++) b->scales[j] = (int8_t)sc[j];
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *q = L + 128 * h + l;
                b->ql[64 * h + l] = (uint8_t)((q[0] & 15) | ((q[64] & 15) << 4));
                b->ql[64 * h + 32 + l] = (uint8_t)((q[32] & 15) | ((q[96] & 15) << 4));
                b->qh[32 * h + l] = (uint8_t)((q[0] >> 4) | ((q[32] >> 4) << 2) | ((q[64] >> 4) << 4) | ((q[96] >> 4) << 6));
            }
    }
    mp_debias_row(x, vy, (int)sizeof(block_q6_K), n, imp, dequantize_row_q6_K, rescale_q6_K);
}

static void dequantize_row_q6_K(const void *vx, float *y, int64_t n) {
    const block_q6_K *x = (const block_q6_K *)vx;
    for (int64_t ib = 0; ib < n / QK_K; ib++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[ib].d);
        float dl[16];
        for (int j = 0; j < 16; j++) dl[j] = d * (float)x[ib].scales[j];
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *ql = x[ib].ql + 64 * h, qh = x[ib].qh[32 * h + l];
                float *yy = y + 128 * h;
                const float *s = dl + 8 * h + l / 16;
                yy[l] = s[0] * (float)(((ql[l] & 15) | ((qh & 3) << 4)) - 32);
                yy[l + 32] = s[2] * (float)(((ql[l + 32] & 15) | (((qh >> 2) & 3) << 4)) - 32);
                yy[l + 64] = s[4] * (float)(((ql[l] >> 4) | (((qh >> 4) & 3) << 4)) - 32);
                yy[l + 96] = s[6] * (float)(((ql[l + 32] >> 4) | (((qh >> 6) & 3) << 4)) - 32);
            }
    }
}

const mp_format mp_formats_k[] = {
    {MP_Q2_K, "Q2_K", QK_K, sizeof(block_q2_K), 0, quantize_row_q2_K, dequantize_row_q2_K, 15.f * MP_FP16_SCALE_MAX /* dmin * 15 */},
    {MP_Q3_K, "Q3_K", QK_K, sizeof(block_q3_K), 0, quantize_row_q3_K, dequantize_row_q3_K, 124.f * MP_FP16_SCALE_MAX /* d * 31 * -4 */},
    {MP_Q4_K, "Q4_K", QK_K, sizeof(block_q4_K), 0, quantize_row_q4_K, dequantize_row_q4_K, 63.f * MP_FP16_SCALE_MAX /* dmin * 63 */},
    {MP_Q5_K, "Q5_K", QK_K, sizeof(block_q5_K), 0, quantize_row_q5_K, dequantize_row_q5_K, 63.f * MP_FP16_SCALE_MAX /* dmin * 63 */},
    {MP_Q6_K, "Q6_K", QK_K, sizeof(block_q6_K), 0, quantize_row_q6_K, dequantize_row_q6_K, 4064.f * MP_FP16_SCALE_MAX /* d * 127 * -32 */},
    MP_FORMAT_END,
};
