/* norm_act.c -- embedding, layernorm, GELU and residual adds (CPU). */
#include <math.h>
#include <string.h>

#include "cpu.h"

ft_status cpu_embed(ft_backend *be, void *out_, const int32_t *ids, const void *table_, int N, int D,
                    ft_error *err)
{
    (void)be; (void)err;
    float *out = out_;
    const float *table = table_;
    /* ids were range-checked by the engine (forward.c, check_ids) */
    for (int n = 0; n < N; n++) memcpy(out + (size_t)n * D, table + (size_t)ids[n] * D, D * sizeof(float));
    return FT_OK;
}

/* y = (x - mean) * rstd * g + b, per row of D */
ft_status cpu_layernorm_fwd(ft_backend *be, void *y_, float *mean, float *rstd, const void *x_,
                            const void *g_, const void *b_, int N, int D, float eps, ft_error *err)
{
    (void)be; (void)err;
    float *y = y_;
    const float *x = x_, *g = g_, *b = b_;
#pragma omp parallel for schedule(static) if ((long)N * D > 65536)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D;
        double s = 0.0, ss = 0.0;
        for (int i = 0; i < D; i++) s += xr[i];
        double mu = s / D;
        for (int i = 0; i < D; i++) {
            double d = xr[i] - mu;
            ss += d * d;
        }
        float rs = (float)(1.0 / sqrt(ss / D + eps));
        float m = (float)mu;
        float *yr = y + (size_t)n * D;
        for (int i = 0; i < D; i++) yr[i] = (xr[i] - m) * rs * g[i] + b[i];
        mean[n] = m;
        rstd[n] = rs;
    }
    return FT_OK;
}

/* dx += rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)), dxh = dy * g, xh = (x - mean) * rstd */
ft_status cpu_layernorm_bwd(ft_backend *be, void *dx_, const void *dy_, const void *x_, const float *mean,
                            const float *rstd, const void *g_, int N, int D, ft_error *err)
{
    (void)be; (void)err;
    float *dx = dx_;
    const float *dy = dy_, *x = x_, *g = g_;
#pragma omp parallel for schedule(static) if ((long)N * D > 65536)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * D, *dyr = dy + (size_t)n * D;
        const float m = mean[n], rs = rstd[n];
        double s1 = 0.0, s2 = 0.0;
        for (int i = 0; i < D; i++) {
            double dxh = (double)dyr[i] * g[i];
            s1 += dxh;
            s2 += dxh * ((xr[i] - m) * rs);
        }
        const float c1 = (float)(s1 / D), c2 = (float)(s2 / D);
        float *dxr = dx + (size_t)n * D;
        for (int i = 0; i < D; i++) {
            float xh = (xr[i] - m) * rs;
            dxr[i] += rs * (dyr[i] * g[i] - c1 - xh * c2);
        }
    }
    return FT_OK;
}

ft_status cpu_gelu_fwd(ft_backend *be, void *y_, const void *x_, size_t n, ft_error *err)
{
    (void)be; (void)err;
    float *y = y_;
    const float *x = x_;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
    return FT_OK;
}

ft_status cpu_gelu_bwd(ft_backend *be, void *dx_, const void *dy_, const void *x_, size_t n, ft_error *err)
{
    (void)be; (void)err;
    float *dx = dx_;
    const float *dy = dy_, *x = x_;
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + erff(x[i] * 0.70710678118654752f));
        float pdf = inv_sqrt_2pi * expf(-0.5f * x[i] * x[i]);
        dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
    return FT_OK;
}

ft_status cpu_add(ft_backend *be, void *y_, const void *a_, const void *b_, const void *c_, size_t n,
                  ft_error *err)
{
    (void)be; (void)err;
    float *y = y_;
    const float *a = a_, *b = b_, *c = c_;
    if (c) {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i] + c[i];
    } else {
#pragma omp parallel for schedule(static) if (n > 65536)
        for (size_t i = 0; i < n; i++) y[i] = a[i] + b[i];
    }
    return FT_OK;
}
