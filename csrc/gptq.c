/* gptq.c -- checks of GPTQ-packed linears (AutoGPTQ layout) before any backend sees them.
 *
 * qweight int32 [in*bits/32, out]   values packed along `in`, lowest bits first
 * qzeros  int32 [groups, out*bits/32] packed along `out`
 * scales  f16   [groups, out]
 * g_idx   int32 [in], each in [0, groups)
 * 3-bit values form one continuous bit stream across words (see ft_unpack).
 */
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
    }
    *groups = (int)G;
    return FT_OK;
}
