/* optim.c -- AdamW, squared norms and row gathers on f32 buffers (CPU). */
#include <math.h>
#include <string.h>

#include "cpu.h"

ft_status cpu_sumsq(ft_backend *be, const float *x, size_t n, double *out, ft_error *err)
{
    (void)be; (void)err;
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    *out = s;
    return FT_OK;
}

/* torch.optim.AdamW (amsgrad off), step by step:
 *   p *= 1 - lr wd;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps) */
ft_status cpu_adamw(ft_backend *be, float *p, const float *g, float *m, float *v, size_t n, float lr,
                    float beta1, float beta2, float eps, float wd, float gmul, float bc1, float bc2,
                    ft_error *err)
{
    (void)be; (void)err;
    const float step_size = lr / bc1, bc2_sqrt = sqrtf(bc2), decay = 1.0f - lr * wd;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        const float gi = g[i] * gmul;
        p[i] *= decay;
        m[i] += (1.0f - beta1) * (gi - m[i]);
        v[i] = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        p[i] -= step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
    return FT_OK;
}

ft_status cpu_gather_rows(ft_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                          size_t row_bytes, ft_error *err)
{
    (void)be; (void)err;
    for (int i = 0; i < n; i++)
        memcpy((char *)dst + (size_t)i * row_bytes, (const char *)src + (size_t)idx[i] * row_bytes, row_bytes);
    return FT_OK;
}
