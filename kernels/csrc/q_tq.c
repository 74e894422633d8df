/* TQ1_0, TQ2_0: ternary 256-weight blocks, value d * t with t in {-1, 0, 1} and d = amax (fp16).
 *
 * Both quantizers reproduce the `gguf` package's arithmetic, so the bytes are identical:
 *   d = amax, id = 1/d, t = round-half-away(x*id) (so |x| >= amax/2 becomes +-1), stored as t + 1.
 * Importance is ignored: these formats exist for ternary-trained weights, whose values already sit
 * on {-d, 0, d}; for them the amax scale is exact and no search can lower the error.
 *
 * TQ2_0 layout: qs[64] then d. Weight 128 g + 32 k + j (g in 0..1, k in 0..3, j in 0..31) is the
 *   2-bit field k of qs[32 g + j].
 * TQ1_0 layout: qs[48], qh[4], then d. Five trits per byte in base 3, most significant first, the byte
 *   holding ceil(v * 256 / 243) for the base-3 number v (so that the k-th trit is recovered as
 *   ((byte * 3^k mod 256) * 3) >> 8). qs[0..32): weights 32 k + j (k = 0..4); qs[32..48): weights
 *   160 + 16 k + j (k = 0..4); qh[0..4): weights 240 + 4 k + j (k = 0..3, the fifth trit is 0).
 */
#pragma STDC FP_CONTRACT OFF
#include "moeplan.h"

/* ternary digits t + 1 in {0, 1, 2} of one block, and its fp16 scale */
static mp_half ternary_block(const float *x, uint8_t *t) {
    float amax = 0.0f;
    for (int j = 0; j < QK_K; j++) {
        const float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
    }
    float id = amax != 0.0f ? 1.0f / amax : 0.0f;
    if (isinf(id)) id = 0.0f; /* float32-subnormal amax: the fp16 scale is 0 anyway */
    for (int j = 0; j < QK_K; j++) {
        const float v = x[j] * id; /* |v| <= 1 (up to one rounding) */
        const float a = fabsf(v);
        const int r = a >= 0.5f; /* round half away from zero, for |v| < 1.5 */
        t[j] = (uint8_t)(v < 0.0f ? 1 - r : 1 + r);
    }
    return MP_FP32_TO_FP16(amax);
}

static inline uint8_t pack_trits(const uint8_t *t, int count, int stride) {
    unsigned v = 0;
    for (int k = 0; k < count; k++) v = v * 3u + t[k * stride];
    for (int k = count; k < 5; k++) v *= 3u;
    return (uint8_t)((v * 256u + 242u) / 243u);
}

/* importance is ignored (see the file comment) */
static void quantize_row_tq1_0(const float *x, void *vy, int64_t n, const float *imp) {
    (void)imp;
    block_tq1_0 *y = (block_tq1_0 *)vy;
    uint8_t t[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        y[b].d = ternary_block(x, t);
        for (int j = 0; j < 32; j++) y[b].qs[j] = pack_trits(t + j, 5, 32);
        for (int j = 0; j < 16; j++) y[b].qs[32 + j] = pack_trits(t + 160 + j, 5, 16);
        for (int j = 0; j < 4; j++) y[b].qh[j] = pack_trits(t + 240 + j, 4, 4);
    }
}

static inline float trit(uint8_t byte, int k) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    const uint8_t q = (uint8_t)(byte * pow3[k]); /* mod 256 */
    return (float)((int)(((unsigned)q * 3u) >> 8) - 1);
}

static void dequantize_row_tq1_0(const void *vx, float *y, int64_t n) {
    const block_tq1_0 *x = (const block_tq1_0 *)vx;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int k = 0; k < 5; k++)
            for (int j = 0; j < 32; j++) y[32 * k + j] = trit(x[b].qs[j], k) * d;
        for (int k = 0; k < 5; k++)
            for (int j = 0; j < 16; j++) y[160 + 16 * k + j] = trit(x[b].qs[32 + j], k) * d;
        for (int k = 0; k < 4; k++)
            for (int j = 0; j < 4; j++) y[240 + 4 * k + j] = trit(x[b].qh[j], k) * d;
    }
}

/* importance is ignored (see the file comment) */
static void quantize_row_tq2_0(const float *x, void *vy, int64_t n, const float *imp) {
    (void)imp;
    block_tq2_0 *y = (block_tq2_0 *)vy;
    uint8_t t[QK_K];
    for (int64_t b = 0; b < n / QK_K; b++, x += QK_K) {
        y[b].d = ternary_block(x, t);
        for (int g = 0; g < 2; g++)
            for (int j = 0; j < 32; j++) {
                const uint8_t *s = t + 128 * g + j;
                y[b].qs[32 * g + j] = (uint8_t)(s[0] | s[32] << 2 | s[64] << 4 | s[96] << 6);
            }
    }
}

static void dequantize_row_tq2_0(const void *vx, float *y, int64_t n) {
    const block_tq2_0 *x = (const block_tq2_0 *)vx;
    for (int64_t b = 0; b < n / QK_K; b++, y += QK_K) {
        const float d = MP_FP16_TO_FP32(x[b].d);
        for (int g = 0; g < 2; g++)
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < 32; j++)
                    y[128 * g + 32 * k + j] = (float)((int)((x[b].qs[32 * g + j] >> (2 * k)) & 3) - 1) * d;
    }
}

const mp_format mp_formats_tq[] = {
    {MP_TQ1_0, "TQ1_0", QK_K, sizeof(block_tq1_0), 0, quantize_row_tq1_0, dequantize_row_tq1_0, MP_FP16_SCALE_MAX},
    {MP_TQ2_0, "TQ2_0", QK_K, sizeof(block_tq2_0), 0, quantize_row_tq2_0, dequantize_row_tq2_0, MP_FP16_SCALE_MAX},
    MP_FORMAT_END,
};
