/* qmatmul.c -- quantized linears and LoRA on the CPU.
 *
 * A GPTQ linear is dequantized into a reused scratch W[in, out] (f32) and
 * multiplied with a plain GEMM; the packed weights are a copy owned by the
 * linear (no dense copy of the model is kept).
 */
#include <stdlib.h>
#include <string.h>

#include "../rng.h"
#include "cpu.h"

static size_t host_bytes(const ft_host_tensor *t)
{
    size_t n = ft_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) n *= (size_t)t->shape[i];
    return n;
}

ft_status cpu_qlinear_create(ft_backend *be, const ft_qlinear_desc *d, ft_qlinear **out, ft_error *err)
{
    ft_qlinear *q = calloc(1, sizeof *q);
    if (!q) return ft_fail(err, FT_ENOMEM, "out of host memory");
    const ft_host_qlinear *h = d->host;
    /* qweight, qzeros, g_idx (int32) then scales (half): each part stays 4-byte aligned */
    const ft_host_tensor *parts[4] = {&h->qweight, &h->qzeros, &h->g_idx, &h->scales};
    size_t total = 0;
    for (int i = 0; i < 4; i++) total += (host_bytes(parts[i]) + 63) & ~(size_t)63;
    ft_status st = be->ops->alloc(be, total, &q->packed, err);
    if (st) {
        free(q);
        return st;
    }
    const void *at[4];
    char *p = q->packed;
    for (int i = 0; i < 4; i++) {
        memcpy(p, parts[i]->data, host_bytes(parts[i]));
        at[i] = p;
        p += (host_bytes(parts[i]) + 63) & ~(size_t)63;
    }
    q->qweight = at[0];
    q->qzeros = at[1];
    q->g_idx = at[2];
    q->scales = at[3];
    q->in = d->in;
    q->out = d->out;
    q->bits = d->bits;
    q->groups = d->groups;
    q->zero_offset = d->zero_offset;
    if (h->bias.data) {
        st = be->ops->dense_create(be, &h->bias, (void **)&q->bias, err);
        if (st) {
            cpu_qlinear_destroy(be, q);
            return st;
        }
    }
    *out = q;
    return FT_OK;
}

void cpu_qlinear_destroy(ft_backend *be, ft_qlinear *q)
{
    if (!q) return;
    be->ops->free(be, q->packed);
    be->ops->free(be, q->bias);
    free(q);
}

/* W[in, out] = scales[g, o] * (q[i, o] - zero[g, o]) with g = g_idx[i]. */
static ft_status dequantize(cpu_backend *be, const ft_qlinear *q, float **W_out, ft_error *err)
{
    const int in = q->in, out = q->out, bits = q->bits, G = q->groups;
    float *W = cpu_scratch(be, (size_t)in * out + 2 * (size_t)G * out, err);
    if (!W) return FT_ENOMEM;
    float *scale = W + (size_t)in * out; /* [G, out] */
    float *zero = scale + (size_t)G * out; /* [G, out] */
    const int zstride_words = out * bits / 32;
#pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++)
        for (int o = 0; o < out; o++) {
            scale[(size_t)g * out + o] = ft_half_to_float(q->scales[(size_t)g * out + o]);
            zero[(size_t)g * out + o] =
                (float)(ft_unpack(q->qzeros + (size_t)g * zstride_words, 1, o, bits) + q->zero_offset);
        }
    const uint32_t mask = (1u << bits) - 1u;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < in; i++) {
        const int g = q->g_idx[i];
        const float *s = scale + (size_t)g * out, *z = zero + (size_t)g * out;
        float *restrict w = W + (size_t)i * out;
        if (32 % bits == 0) { /* values never straddle words: one shift per row */
            const int per = 32 / bits;
            const int32_t *row = q->qweight + (size_t)(i / per) * out;
            const int sh = (i % per) * bits;
            for (int o = 0; o < out; o++)
                w[o] = ((float)(((uint32_t)row[o] >> sh) & mask) - z[o]) * s[o];
        } else {
            for (int o = 0; o < out; o++)
                w[o] = ((float)ft_unpack(q->qweight + o, out, i, bits) - z[o]) * s[o];
        }
    }
    *W_out = W;
    return FT_OK;
}

ft_status cpu_qlinear_fwd(ft_backend *base, void *y_, const void *x_, const ft_qlinear *q, int N, ft_error *err)
{
    float *y = y_, *W;
    const float *x = x_;
    ft_status st = dequantize((cpu_backend *)base, q, &W, err);
    if (st) return st;
    cpu_gemm_nn(N, q->out, q->in, 1.0f, x, q->in, W, q->out, 0.0f, y, q->out);
    if (q->bias) {
#pragma omp parallel for schedule(static) if ((long)N * q->out > 65536)
        for (int n = 0; n < N; n++)
            for (int o = 0; o < q->out; o++) y[(size_t)n * q->out + o] += q->bias[o];
    }
    return FT_OK;
}

/* The product, then the epilogue through the LoRA and elementwise ops (nothing to fuse here) */
ft_status cpu_qlinear_fwd_epi(ft_backend *base, void *y, const void *x, const ft_qlinear *q, int N,
                              const ft_epilogue *epi, ft_error *err)
{
    ft_status st = cpu_qlinear_fwd(base, y, x, q, N, err);
    return st ? st : ft_epilogue_by_ops(base, y, x, N, q->in, q->out, epi, err);
}

ft_status cpu_qlinear_bwd(ft_backend *base, void *dx, const void *dy, const ft_qlinear *q, int N,
                          int accumulate, ft_error *err)
{
    float *W;
    ft_status st = dequantize((cpu_backend *)base, q, &W, err);
    if (st) return st;
    /* dx[N,in] = dy[N,out] W[in,out]^T: W's rows are the "B" rows of an NT product */
    cpu_gemm_nt(N, q->in, q->out, 1.0f, dy, q->out, W, q->out, accumulate ? 1.0f : 0.0f, dx, q->in);
    return FT_OK;
}

/* xd[N,in] = dropout(x) with the counter-based mask (rng.h) */
static void apply_dropout(float *xd, const float *x, size_t n, float p, uint64_t seed)
{
    const float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) xd[i] = ft_dropout_keep(seed, i, p) ? x[i] * keep_scale : 0.0f;
}

static uint64_t dropout_key(const ft_backend *be, uint64_t seed)
{
    return seed ^ ((const cpu_backend *)be)->dropout_base;
}

ft_status cpu_lora_fwd(ft_backend *be, void *y, float *xa, const void *x_, const float *A, const float *B,
                       int N, int in, int out, int r, float scale, float p, uint64_t seed, ft_error *err)
{
    const float *x = x_;
    float *xd = NULL;
    seed = dropout_key(be, seed);
    if (p > 0.0f) {
        xd = malloc((size_t)N * in * sizeof(float));
        if (!xd) return ft_fail(err, FT_ENOMEM, "out of host memory (LoRA dropout)");
        apply_dropout(xd, x, (size_t)N * in, p, seed);
        x = xd;
    }
    cpu_gemm_nt(N, r, in, 1.0f, x, in, A, in, 0.0f, xa, r);       /* xa = xd A^T      */
    cpu_gemm_nt(N, out, r, scale, xa, r, B, r, 1.0f, y, out);      /* y += s xa B^T    */
    free(xd);
    return FT_OK;
}

ft_status cpu_lora_bwd(ft_backend *be, void *dx_, float *dA, float *dB, const void *dy_, const void *x_,
                       const float *xa, const float *A, const float *B, int N, int in, int out, int r,
                       float scale, float p, uint64_t seed, ft_error *err)
{
    seed = dropout_key(be, seed);
    const float *dy = dy_, *x = x_;
    float *dx = dx_;
    const size_t nx = (size_t)N * in;
    float *dxa = malloc((size_t)N * r * sizeof(float));
    float *xd = p > 0.0f ? malloc(nx * sizeof(float)) : NULL;
    float *t = (p > 0.0f && dx) ? malloc(nx * sizeof(float)) : NULL;
    if (!dxa || (p > 0.0f && !xd) || (p > 0.0f && dx && !t)) {
        free(dxa); free(xd); free(t);
        return ft_fail(err, FT_ENOMEM, "out of host memory (LoRA backward)");
    }
    if (xd) {
        apply_dropout(xd, x, nx, p, seed);
        x = xd;
    }
    cpu_gemm_tn(out, r, N, scale, dy, out, xa, r, 1.0f, dB, r);   /* dB += s dy^T xa  */
    cpu_gemm_nn(N, r, out, scale, dy, out, B, r, 0.0f, dxa, r);   /* dxa = s dy B     */
    cpu_gemm_tn(r, in, N, 1.0f, dxa, r, x, in, 1.0f, dA, in);     /* dA += dxa^T xd   */
    if (dx) {
        if (!t) {
            cpu_gemm_nn(N, in, r, 1.0f, dxa, r, A, in, 1.0f, dx, in); /* dx += dxa A */
        } else {
            cpu_gemm_nn(N, in, r, 1.0f, dxa, r, A, in, 0.0f, t, in);
            const float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static) if (nx > 65536)
            for (size_t i = 0; i < nx; i++)
                if (ft_dropout_keep(seed, i, p)) dx[i] += t[i] * keep_scale;
        }
    }
    free(dxa); free(xd); free(t);
    return FT_OK;
}
