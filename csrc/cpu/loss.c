/* loss.c -- lm_head logits, cross-entropy and its backward (CPU). */
#include <math.h>

#include "cpu.h"

ft_status cpu_lm_logits(ft_backend *be, float *logits, const void *h, const void *W, int n, int V, int D,
                        ft_error *err)
{
    (void)be; (void)err;
    cpu_gemm_nt(n, V, D, 1.0f, h, D, W, D, 0.0f, logits, V);
    return FT_OK;
}

/* loss_i = logsumexp(z_i) - z_i[target_i];  dz_i = softmax(z_i) - onehot(target_i) */
ft_status cpu_cross_entropy(ft_backend *be, float *logits, float *row_loss, const int32_t *target, int n,
                            int V, float grad_scale, ft_error *err)
{
    (void)be; (void)err;
#pragma omp parallel for schedule(static) if ((long)n * V > 65536)
    for (int i = 0; i < n; i++) {
        float *z = logits + (size_t)i * V;
        const int y = target[i];
        if (y < 0) {
            row_loss[i] = 0.0f;
            if (grad_scale != 0.0f)
                for (int c = 0; c < V; c++) z[c] = 0.0f;
            continue;
        }
        float mx = z[0];
        for (int c = 1; c < V; c++) mx = z[c] > mx ? z[c] : mx;
        double sum = 0.0;
        for (int c = 0; c < V; c++) sum += exp((double)(z[c] - mx));
        const double lse = mx + log(sum);
        row_loss[i] = (float)(lse - z[y]);
        if (grad_scale != 0.0f) {
            for (int c = 0; c < V; c++) z[c] = grad_scale * (float)exp(z[c] - lse);
            z[y] -= grad_scale;
        }
    }
    return FT_OK;
}

ft_status cpu_argmax_rows(ft_backend *be, const float *logits, int n, int V, int32_t *out, ft_error *err)
{
    (void)be; (void)err;
    for (int i = 0; i < n; i++) {
        const float *z = logits + (size_t)i * V;
        int best = 0;
        for (int c = 1; c < V && !isnan(z[best]); c++)
            if (isnan(z[c]) || z[c] > z[best]) best = c;
        out[i] = best;
    }
    return FT_OK;
}

ft_status cpu_lm_bwd(ft_backend *be, void *dh, const float *dlogits, const void *W, int n, int V, int D,
                     ft_error *err)
{
    (void)be; (void)err;
    cpu_gemm_nn(n, D, V, 1.0f, dlogits, V, W, D, 0.0f, dh, D);
    return FT_OK;
}
