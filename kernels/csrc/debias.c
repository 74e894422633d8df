/* Unbiased scales. A weighted least-squares fit of a block's scale leaves the reconstruction shrunk:
 * <x, x_hat>_w = <x_hat, x_hat>_w, so the gain <x, x_hat>_w / <x, x>_w is 1 - (relative squared
 * error), about 0.8 for the 1-bit formats and 0.9 for IQ2_XXS. That shrinkage is a bias that adds up
 * coherently over the experts and layers of a model (results/vs-llama-quantize.md: it doubled the
 * KLD of the 15%-of-BF16 plans against llama-quantize's at identical types). So after a row is
 * quantized, each super-block's stored scale(s) are multiplied by c = sum w x^2 / sum w x x_hat
 * (w = the importance, or ones where it is absent or zero on the block; c clamped to [0.5, 2]): the
 * integer levels and grid points are kept, the block decodes times c, and its importance-weighted
 * gain is 1 up to the fp16 rounding of the new scale. This costs squared error (e^2 -> e^2 / (1 - e^2)
 * for a least-squares fit of relative error e), and lowers the KLD of the quantized model. */
#include <math.h>

#include "moeplan.h"

/* fp16 bits of h times c (c > 0), kept finite, sign kept (0 stays 0) */
mp_half mp_half_scaled(mp_half h, float c) {
    const float d = MP_FP16_TO_FP32(h);
    if (!(d != 0.f) || !isfinite(d) || !(c > 0.f)) return h;
    float v = d * c;
    v = v > MP_FP16_SCALE_MAX ? MP_FP16_SCALE_MAX : v < -MP_FP16_SCALE_MAX ? -MP_FP16_SCALE_MAX : v;
    const mp_half r = MP_FP32_TO_FP16(v);
    return (r & 0x7fff) == 0 ? h : r;
}

void mp_debias_row(const float *x, void *blocks, int type_size, int64_t n, const float *imp,
                   mp_dequantize_row_fn deq, mp_rescale_block_fn rescale) {
    float xh[QK_K];
    for (int64_t ib = 0; ib < n / QK_K; ib++) {
        uint8_t *b = (uint8_t *)blocks + ib * type_size;
        const float *xb = x + ib * QK_K;
        const float *wb = imp ? imp + ib * QK_K : NULL;
        double wsum = 0.0;
        if (wb)
            for (int i = 0; i < QK_K; i++) wsum += wb[i];
        if (!(wsum > 0.0)) wb = NULL;
        deq(b, xh, QK_K);
        double num = 0.0, den = 0.0;
        for (int i = 0; i < QK_K; i++) {
            const double w = wb ? (double)wb[i] : 1.0, xd = (double)xb[i];
            num += w * xd * xd;
            den += w * xd * (double)xh[i];
        }
        if (!(num > 0.0) || !(den > 0.0) || !isfinite(num) || !isfinite(den)) continue;
        double c = num / den;
        c = c < 0.5 ? 0.5 : c > 2.0 ? 2.0 : c;
        if ((float)c != 1.f) rescale(b, (float)c);
    }
}
