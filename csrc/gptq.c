/* gptq.c -- checks of GPTQ-packed linears (AutoGPTQ layout) before any backend sees them.
 *
 * qweight int32 [in*bits/32, out]   values packed along `in`, lowest bits first
 * qzeros  int32 [groups, out*bits/32] packed along `out`
 * scales  f16   [groups, out]
 * g_idx   int32 [in], each in [0, groups)
 * 3-bit values form one continuous bit stream across words (see ft_unpack).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"

static ft_status expect(const ft_host_tensor *t, ft_dtype dt, int64_t d0, int64_t d1, int ndim, ft_error *err)
{
    const char *name = t->name ? t->name : "tensor";
    if (!t->data) return ft_fail(err, FT_EINVAL, "missing tensor %s", name);
    if (t->dtype != dt)
        return ft_fail(err, FT_EINVAL, "%s: expected dtype %s, got %s", name, ft_dtype_name(dt),
                       ft_dtype_name(t->dtype));
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1)) {
        if (ndim == 2)
            return ft_fail(err, FT_EINVAL, "%s: expected shape [%lld, %lld], got %s[%lld, %lld]", name,
                           (long long)d0, (long long)d1, t->ndim == 2 ? "" : "a different rank ",
                           (long long)t->shape[0], (long long)(t->ndim == 2 ? t->shape[1] : 0));
        return ft_fail(err, FT_EINVAL, "%s: expected shape [%lld], got rank %d shape[0]=%lld", name,
                       (long long)d0, t->ndim, (long long)t->shape[0]);
    }
    return FT_OK;
}

int64_t ft_first_nonfinite(const void *data, ft_dtype dt, int64_t n)
{
    /* all-ones exponent = NaN or inf; an OR-reduction first (vectorizes), the index only on a hit */
    if (dt == FT_F32) {
        const uint32_t *u = data;
        uint32_t bad = 0;
        for (int64_t i = 0; i < n; i++) bad |= (u[i] & 0x7F800000u) == 0x7F800000u;
        if (bad)
            for (int64_t i = 0; i < n; i++)
                if ((u[i] & 0x7F800000u) == 0x7F800000u) return i;
        return -1;
    }
    if (dt != FT_F16 && dt != FT_BF16) return -1;
    const uint16_t *h = data;
    const uint16_t e = dt == FT_F16 ? 0x7C00u : 0x7F80u;
    unsigned bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (h[i] & e) == e;
    if (bad)
        for (int64_t i = 0; i < n; i++)
            if ((h[i] & e) == e) return i;
    return -1;
}

ft_status ft_gptq_check(const ft_host_qlinear *q, int in, int out, int bits, int *groups, ft_error *err)
{
    ft_status st;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return ft_fail(err, FT_EUNSUPPORTED, "%s: unsupported bits %d (expected 2, 3, 4 or 8)",
                       q->qweight.name ? q->qweight.name : "qweight", bits);
    if (((int64_t)in * bits) % 32 || ((int64_t)out * bits) % 32)
        return ft_fail(err, FT_EINVAL, "%s: in=%d and out=%d must make whole 32-bit words at %d bits",
                       q->qweight.name, in, out, bits);
    if ((st = expect(&q->qweight, FT_I32, (int64_t)in * bits / 32, out, 2, err))) return st;
    if (!q->scales.data || q->scales.ndim != 2 || q->scales.shape[0] < 1)
        return ft_fail(err, FT_EINVAL, "%s: expected a 2-d float16 tensor [groups, %d]",
                       q->scales.name ? q->scales.name : "scales", out);
    const int64_t G = q->scales.shape[0];
    if (G > in)
        return ft_fail(err, FT_EINVAL, "%s: %lld groups for %d input features", q->scales.name,
                       (long long)G, in);
    if ((st = expect(&q->scales, FT_F16, G, out, 2, err))) return st;
    const int64_t bad_scale = ft_first_nonfinite(q->scales.data, FT_F16, G * out);
    if (bad_scale >= 0)
        return ft_fail(err, FT_EINVAL, "%s: NaN or infinite value at [%lld, %lld]", q->scales.name,
                       (long long)(bad_scale / out), (long long)(bad_scale % out));
    if ((st = expect(&q->qzeros, FT_I32, G, (int64_t)out * bits / 32, 2, err))) return st;
    if ((st = expect(&q->g_idx, FT_I32, in, 0, 1, err))) return st;
    const int32_t *g = q->g_idx.data;
    for (int i = 0; i < in; i++)
        if (g[i] < 0 || g[i] >= G)
            return ft_fail(err, FT_EINVAL, "%s: g_idx[%d] = %d is outside [0, %lld)", q->g_idx.name, i,
                           (int)g[i], (long long)G);
    if (q->bias.data) {
        if (q->bias.dtype == FT_I32 || q->bias.ndim != 1 || q->bias.shape[0] != out)
            return ft_fail(err, FT_EINVAL, "%s: expected a float tensor of shape [%d]", q->bias.name, out);
        const int64_t bad = ft_first_nonfinite(q->bias.data, q->bias.dtype, out);
        if (bad >= 0)
            return ft_fail(err, FT_EINVAL, "%s: NaN or infinite value at [%lld]", q->bias.name, (long long)bad);
    }
    *groups = (int)G;
    return FT_OK;
}

static float load_weight(const void *w, ft_dtype dt, size_t i)
{
    switch (dt) {
    case FT_F16: return ft_half_to_float(((const uint16_t *)w)[i]);
    case FT_BF16: return ft_bf16_to_float(((const uint16_t *)w)[i]);
    default: return ((const float *)w)[i];
    }
}

/* Set value i of a little-endian bit stream in words spaced `stride` apart (inverse of ft_unpack). */
static void pack_value(int32_t *words, int64_t stride, int64_t i, int bits, uint32_t v)
{
    int64_t bit = i * bits;
    int64_t w = bit >> 5;
    int sh = (int)(bit & 31);
    uint32_t *lo = (uint32_t *)&words[w * stride];
    *lo |= v << sh;
    if (sh + bits > 32) *(uint32_t *)&words[(w + 1) * stride] |= v >> (32 - sh);
}

ft_status ft_gptq_quantize_rtn(const void *w, ft_dtype dtype, int out, int in, int bits, int group_size,
                               int32_t *qweight, int32_t *qzeros, uint16_t *scales, int32_t *g_idx, ft_error *err)
{
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return ft_fail(err, FT_EUNSUPPORTED, "quantization to %d bits is not supported (2, 3, 4 or 8)", bits);
    if (dtype != FT_F16 && dtype != FT_BF16 && dtype != FT_F32)
        return ft_fail(err, FT_EINVAL, "quantize: weights must be float16, bfloat16 or float32");
    if (out <= 0 || in <= 0 || ((int64_t)in * bits) % 32 || ((int64_t)out * bits) % 32)
        return ft_fail(err, FT_EINVAL, "quantize: a %dx%d weight does not pack into 32-bit words at %d bits", out,
                       in, bits);
    const int gs = group_size <= 0 ? in : group_size;
    const int G = (in + gs - 1) / gs;
    const uint32_t maxq = (1u << bits) - 1u;
    uint8_t *zeros = malloc((size_t)G * out);
    if (!zeros) return ft_fail(err, FT_ENOMEM, "out of host memory");
    memset(qweight, 0, (size_t)in * bits / 32 * out * sizeof(int32_t));
    memset(qzeros, 0, (size_t)G * out * bits / 32 * sizeof(int32_t));
    int bad = 0;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        for (int g = 0; g < G; g++) {
            const int i0 = g * gs, i1 = i0 + gs < in ? i0 + gs : in;
            float lo = 0.0f, hi = 0.0f; /* the range always holds 0, so 0 is exact */
            for (int i = i0; i < i1; i++) {
                float v = load_weight(w, dtype, (size_t)o * in + i);
                if (!isfinite(v)) {
#pragma omp atomic write
                    bad = 1;
                }
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
            float scale = (hi - lo) / (float)maxq;
            if (scale <= 0.0f) scale = 1.0f;
            uint16_t sh = ft_float_to_half(scale);
            if (ft_half_to_float(sh) < scale && sh < 0x7bffu) sh++; /* round up: the range stays covered */
            scale = ft_half_to_float(sh); /* quantize against the stored scale */
            if (!(scale > 0.0f) || !isfinite(scale)) { /* underflow/overflow in half */
                sh = ft_float_to_half(scale > 0.0f ? 65504.0f : 6.1e-5f);
                scale = ft_half_to_float(sh);
            }
            float zf = nearbyintf(-lo / scale);
            uint32_t z = zf < 0.0f ? 0u : zf > (float)maxq ? maxq : (uint32_t)zf;
            scales[(size_t)g * out + o] = sh;
            zeros[(size_t)g * out + o] = (uint8_t)z;
            for (int i = i0; i < i1; i++) {
                float qf = nearbyintf(load_weight(w, dtype, (size_t)o * in + i) / scale) + (float)z;
                uint32_t q = qf < 0.0f ? 0u : qf > (float)maxq ? maxq : (uint32_t)qf;
                pack_value(qweight + o, out, i, bits, q);
            }
        }
    }
    for (int g = 0; g < G; g++)
        for (int o = 0; o < out; o++) pack_value(qzeros + (size_t)g * out * bits / 32, 1, o, bits, zeros[(size_t)g * out + o]);
    for (int i = 0; i < in; i++) g_idx[i] = i / gs;
    free(zeros);
    if (bad) return ft_fail(err, FT_EINVAL, "quantize: the weight holds NaN or infinite values");
    return FT_OK;
}
