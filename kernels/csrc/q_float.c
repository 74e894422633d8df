/* F32, F16, BF16: one weight per "block". */
#include <float.h>

#include "moeplan.h"

static void quantize_row_f32(const float *x, void *y, int64_t n, const float *imp) {
    (void)imp;
    memcpy(y, x, (size_t)n * sizeof(float));
}
static void dequantize_row_f32(const void *x, float *y, int64_t n) { memcpy(y, x, (size_t)n * sizeof(float)); }

static void quantize_row_f16(const float *x, void *y, int64_t n, const float *imp) {
    (void)imp;
    mp_half *h = (mp_half *)y;
    for (int64_t i = 0; i < n; i++) h[i] = mp_fp32_to_fp16(x[i]);
}
static void dequantize_row_f16(const void *x, float *y, int64_t n) {
    const mp_half *h = (const mp_half *)x;
    for (int64_t i = 0; i < n; i++) y[i] = mp_fp16_to_fp32(h[i]);
}

static void quantize_row_bf16(const float *x, void *y, int64_t n, const float *imp) {
    (void)imp;
    uint16_t *h = (uint16_t *)y;
    for (int64_t i = 0; i < n; i++) h[i] = mp_fp32_to_bf16(x[i]);
}
static void dequantize_row_bf16(const void *x, float *y, int64_t n) {
    const uint16_t *h = (const uint16_t *)x;
    for (int64_t i = 0; i < n; i++) y[i] = mp_bf16_to_fp32(h[i]);
}

const mp_format mp_formats_float[] = {
    {MP_F32, "F32", 1, 4, 0, quantize_row_f32, dequantize_row_f32, FLT_MAX},
    {MP_F16, "F16", 1, 2, 0, quantize_row_f16, dequantize_row_f16, 0x1.ffdffep15f /* < 65520 rounds to <= 65504 */},
    {MP_BF16, "BF16", 1, 2, 0, quantize_row_bf16, dequantize_row_bf16, 0x1.fefffep127f /* rounds to <= 0x1.fep127 */},
    MP_FORMAT_END,
};
