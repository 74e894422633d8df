/* moeplan quantization kernels: block layouts and the per-format function table.
 *
 * Every block layout here is byte-compatible with the GGUF/ggml type of the same name.
 * The Python registry (kernels/formats.py) is the one table of block sizes and bytes per block;
 * the module exports sizeof(block_x) for every format and kernels/formats.py checks the two agree.
 *
 * Each format is a pair with one signature:
 *   void quantize_row_<fmt>(const float *x, void *blocks, int64_t n, const float *importance);
 *   void dequantize_row_<fmt>(const void *blocks, float *y, int64_t n);
 * n is a multiple of the format's block size; importance is NULL or n non-negative weights
 * (llama.cpp's imatrix: the mean of x^2 of the input column over calibration tokens).
 * Row functions are single-threaded and reentrant; module.c parallelizes over rows.
 */
#ifndef MOEPLAN_H
#define MOEPLAN_H

#include <assert.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define QK_K 256
#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK4_NL 32

typedef uint16_t mp_half; /* IEEE binary16 bits */

/* ggml type ids (the GGUF on-disk enum) */
enum mp_type {
    MP_F32 = 0, MP_F16 = 1, MP_Q4_0 = 2, MP_Q4_1 = 3, MP_Q5_0 = 6, MP_Q5_1 = 7, MP_Q8_0 = 8,
    MP_Q2_K = 10, MP_Q3_K = 11, MP_Q4_K = 12, MP_Q5_K = 13, MP_Q6_K = 14,
    MP_IQ2_XXS = 16, MP_IQ2_XS = 17, MP_IQ3_XXS = 18, MP_IQ1_S = 19, MP_IQ4_NL = 20,
    MP_IQ3_S = 21, MP_IQ2_S = 22, MP_IQ4_XS = 23, MP_IQ1_M = 29, MP_BF16 = 30,
    MP_TQ1_0 = 34, MP_TQ2_0 = 35,
};

/* ---- legacy 32-element blocks ---- */
typedef struct { mp_half d; uint8_t qs[QK4_0 / 2]; } block_q4_0;
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
typedef struct { mp_half d; mp_half m; uint8_t qs[QK4_1 / 2]; } block_q4_1;
static_assert(sizeof(block_q4_1) == 20, "block_q4_1 size");
typedef struct { mp_half d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; } block_q5_0;
static_assert(sizeof(block_q5_0) == 22, "block_q5_0 size");
typedef struct { mp_half d; mp_half m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2]; } block_q5_1;
static_assert(sizeof(block_q5_1) == 24, "block_q5_1 size");
typedef struct { mp_half d; int8_t qs[QK8_0]; } block_q8_0;
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");

/* ---- k-quants, 256-element super-blocks ---- */
typedef struct { uint8_t scales[QK_K / 16]; uint8_t qs[QK_K / 4]; mp_half d; mp_half dmin; } block_q2_K;
static_assert(sizeof(block_q2_K) == 84, "block_q2_K size");
typedef struct { uint8_t hmask[QK_K / 8]; uint8_t qs[QK_K / 4]; uint8_t scales[12]; mp_half d; } block_q3_K;
static_assert(sizeof(block_q3_K) == 110, "block_q3_K size");
typedef struct { mp_half d; mp_half dmin; uint8_t scales[12]; uint8_t qs[QK_K / 2]; } block_q4_K;
static_assert(sizeof(block_q4_K) == 144, "block_q4_K size");
typedef struct { mp_half d; mp_half dmin; uint8_t scales[12]; uint8_t qh[QK_K / 8]; uint8_t qs[QK_K / 2]; } block_q5_K;
static_assert(sizeof(block_q5_K) == 176, "block_q5_K size");
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; mp_half d; } block_q6_K;
static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");

/* ---- non-linear 4-bit ---- */
typedef struct { mp_half d; uint8_t qs[QK4_NL / 2]; } block_iq4_nl;
static_assert(sizeof(block_iq4_nl) == 18, "block_iq4_nl size");
typedef struct { mp_half d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2]; } block_iq4_xs;
static_assert(sizeof(block_iq4_xs) == 136, "block_iq4_xs size");

/* ---- ternary ---- */
typedef struct { uint8_t qs[(QK_K - 4 * QK_K / 64) / 5]; uint8_t qh[QK_K / 64]; mp_half d; } block_tq1_0;
static_assert(sizeof(block_tq1_0) == 54, "block_tq1_0 size");
typedef struct { uint8_t qs[QK_K / 4]; mp_half d; } block_tq2_0;
static_assert(sizeof(block_tq2_0) == 66, "block_tq2_0 size");

/* ---- codebook (IQ) formats ---- */
typedef struct { mp_half d; uint16_t qs[QK_K / 8]; } block_iq2_xxs;
static_assert(sizeof(block_iq2_xxs) == 66, "block_iq2_xxs size");
typedef struct { mp_half d; uint16_t qs[QK_K / 8]; uint8_t scales[QK_K / 32]; } block_iq2_xs;
static_assert(sizeof(block_iq2_xs) == 74, "block_iq2_xs size");
typedef struct { mp_half d; uint8_t qs[QK_K / 4]; uint8_t qh[QK_K / 32]; uint8_t scales[QK_K / 32]; } block_iq2_s;
static_assert(sizeof(block_iq2_s) == 82, "block_iq2_s size");
typedef struct { mp_half d; uint8_t qs[3 * QK_K / 8]; } block_iq3_xxs;
static_assert(sizeof(block_iq3_xxs) == 98, "block_iq3_xxs size");
typedef struct { mp_half d; uint8_t qs[QK_K / 4]; uint8_t qh[QK_K / 32]; uint8_t signs[QK_K / 8]; uint8_t scales[4]; } block_iq3_s;
static_assert(sizeof(block_iq3_s) == 110, "block_iq3_s size");
typedef struct { mp_half d; uint8_t qs[QK_K / 8]; uint16_t qh[QK_K / 32]; } block_iq1_s;
static_assert(sizeof(block_iq1_s) == 50, "block_iq1_s size");
typedef struct { uint8_t qs[QK_K / 8]; uint8_t qh[QK_K / 16]; uint8_t scales[QK_K / 32]; } block_iq1_m;
static_assert(sizeof(block_iq1_m) == 56, "block_iq1_m size");

/* ---- half / bfloat16 conversion (exact, round-to-nearest-even, no hardware dependency) ---- */
static inline uint32_t mp_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float mp_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float mp_fp16_to_fp32(mp_half h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return mp_bits_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) {
        if (mant == 0) return mp_bits_f32(sign);
        /* subnormal: mant * 2^-24 */
        float v = (float)mant * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return mp_bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline mp_half mp_fp32_to_fp16(float f) {
    const uint32_t u = mp_f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (mp_half)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (mp_half)(sign | 0x7c00u); /* rounds to >= 65520: inf */
    if (a < 0x38800000u) {
        /* result is subnormal (or zero) in fp16: value / 2^-24, rounded to nearest even */
        if (a < 0x33000000u) return (mp_half)sign; /* < 2^-25: rounds to 0 */
        const uint32_t e = a >> 23;
        const uint32_t m = (a & 0x7fffffu) | 0x800000u;
        const uint32_t shift = 126u - e; /* 14 + (113 - e) - 1 ... exact: m * 2^(e-150) / 2^-24 */
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (mp_half)(sign | q);
    }
    /* normal: rebias exponent, round mantissa from 23 to 10 bits (RNE) */
    uint32_t r = a - 0x38000000u; /* exponent bias 127 -> 15 */
    r += 0xfffu + ((r >> 13) & 1u);
    return (mp_half)(sign | (r >> 13));
}

static inline float mp_bf16_to_fp32(uint16_t b) { return mp_bits_f32((uint32_t)b << 16); }

static inline uint16_t mp_fp32_to_bf16(float f) {
    uint32_t u = mp_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64u); /* quiet NaN */
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

#define MP_FP16_TO_FP32(x) mp_fp16_to_fp32(x)
#define MP_FP32_TO_FP16(x) mp_fp32_to_fp16(x)

/* nearest integer, ties to even, for |fval| < 2^22 (adds 1.5*2^23 and reads the mantissa) */
static inline int mp_nearest_int(float fval) {
    float val = fval + 12582912.f;
    int32_t i;
    memcpy(&i, &val, sizeof(i));
    return (i & 0x007fffff) - 0x00400000;
}

/* ---- the per-format function table ---- */
typedef void (*mp_quantize_row_fn)(const float *x, void *blocks, int64_t n, const float *importance);
typedef void (*mp_dequantize_row_fn)(const void *blocks, float *y, int64_t n);

typedef struct {
    int type;                 /* enum mp_type */
    const char *name;         /* GGUF name, e.g. "Q4_K" */
    int block_size;           /* weights per block */
    int type_size;            /* sizeof(block_x) */
    int needs_importance;     /* 1: quantize refuses importance == NULL */
    mp_quantize_row_fn quantize_row;
    mp_dequantize_row_fn dequantize_row;
    /* the largest |x| the format encodes (module.c refuses rows beyond it): the largest fp16 scale
     * 65504 times the largest level magnitude, or the float format's largest finite value after
     * rounding; 0 for the codebook formats, whose range comes from their grid (mp_iq_max_abs) */
    float max_abs;
} mp_format;

#define MP_FP16_SCALE_MAX 65504.f

/* debias.c: multiply the stored scale(s) of one block by c (the block then decodes times c) */
typedef void (*mp_rescale_block_fn)(void *block, float c);
mp_half mp_half_scaled(mp_half h, float c);
/* after a row of super-blocks is quantized: rescale each so that its importance-weighted gain
 * <x, x_hat>_w / <x, x>_w is ~1 */
void mp_debias_row(const float *x, void *blocks, int type_size, int64_t n, const float *imp,
                   mp_dequantize_row_fn deq, mp_rescale_block_fn rescale);

/* Each family file defines one table terminated by an entry with name == NULL.
 * module.c walks all of them; a format with no entry has no kernel in this build. */
extern const mp_format mp_formats_float[];   /* q_float.c:  F32, F16, BF16 */
extern const mp_format mp_formats_legacy[];  /* q_legacy.c: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 */
extern const mp_format mp_formats_k[];       /* q_k.c:      Q2_K, Q3_K, Q4_K, Q5_K, Q6_K */
extern const mp_format mp_formats_iq4[];     /* q_iq4.c:    IQ4_NL, IQ4_XS */
extern const mp_format mp_formats_tq[];      /* q_tq.c:     TQ1_0, TQ2_0 */
extern const mp_format mp_formats_iq[];      /* q_iq.c:     IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M */

#define MP_FORMAT_END { 0, NULL, 0, 0, 0, NULL, NULL, 0.f }

#endif
