/* norm_act.cu -- embedding, layernorm, GELU and residual adds on the GPU.
 * Element math in f32 as csrc/cpu/norm_act.c; row statistics by block reductions. */
#include "cuda.cuh"

template <typename T> __global__ void embed_kernel(T *out, const int32_t *ids, const T *table, int D)
{
    const int n = blockIdx.x;
    const T *src = table + (size_t)ids[n] * D;
    T *dst = out + (size_t)n * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dst[i] = src[i];
}

extern "C" ft_status cuda_embed(ft_backend *base, void *out, const int32_t *ids, const void *table, int N, int D,
                                ft_error *err)
{
    if (N <= 0) return FT_OK;
    ACT_DISPATCH(base, T,
                 embed_kernel<T><<<N, 256, 0, CB(base)->stream>>>((T *)out, ids, (const T *)table, D));
    LAUNCH_CHECK("embedding");
    return FT_OK;
}

/* one block per row: mean, then the centred sum of squares (two passes, like the CPU) */
template <typename T>
__global__ void layernorm_fwd_kernel(T *y, float *mean, float *rstd, const T *x, const T *g, const T *b, int D,
                                     float eps)
{
    __shared__ float sh[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * D;
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += ld<T>(xr[i]);
    const float mu = block_sum(s, sh) / D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float d = ld<T>(xr[i]) - mu;
        ss += d * d;
    }
    ss = block_sum(ss, sh);
    const float rs = (float)(1.0 / sqrt((double)ss / D + (double)eps));
    T *yr = y + row * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        yr[i] = cv<T>((ld<T>(xr[i]) - mu) * rs * ld<T>(g[i]) + ld<T>(b[i]));
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

extern "C" ft_status cuda_layernorm_fwd(ft_backend *base, void *y, float *mean, float *rstd, const void *x,
                                        const void *g, const void *b, int N, int D, float eps, ft_error *err)
{
    if (N <= 0) return FT_OK;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T,
                 layernorm_fwd_kernel<T><<<N, 256, 0, CB(base)->stream>>>((T *)y, mean, rstd, (const T *)x,
                                                                          (const T *)g, (const T *)b, D, eps));
    LAUNCH_CHECK("layernorm");
    PROF_MARK(CB(base), PR_LN);
    return FT_OK;
}

/* dx += rstd * (dy g - mean(dy g) - xh mean(dy g xh)) */
template <typename T>
__global__ void layernorm_bwd_kernel(T *dx, const T *dy, const T *x, const float *mean, const float *rstd,
                                     const T *g, int D)
{
    __shared__ float sh[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * D, *dyr = dy + row * D;
    const float m = mean[row], rs = rstd[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float dxh = ld<T>(dyr[i]) * ld<T>(g[i]);
        s1 += dxh;
        s2 += dxh * ((ld<T>(xr[i]) - m) * rs);
    }
    const float c1 = block_sum(s1, sh) / D;
    const float c2 = block_sum(s2, sh) / D;
    T *dxr = dx + row * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const float xh = (ld<T>(xr[i]) - m) * rs;
        dxr[i] = cv<T>(ld<T>(dxr[i]) + rs * (ld<T>(dyr[i]) * ld<T>(g[i]) - c1 - xh * c2));
    }
}

extern "C" ft_status cuda_layernorm_bwd(ft_backend *base, void *dx, const void *dy, const void *x,
                                        const float *mean, const float *rstd, const void *g, int N, int D,
                                        ft_error *err)
{
    if (N <= 0) return FT_OK;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T,
                 layernorm_bwd_kernel<T><<<N, 256, 0, CB(base)->stream>>>((T *)dx, (const T *)dy, (const T *)x, mean,
                                                                          rstd, (const T *)g, D));
    LAUNCH_CHECK("layernorm backward");
    PROF_MARK(CB(base), PR_LN);
    return FT_OK;
}

template <typename T> __global__ void gelu_fwd_kernel(T *y, const T *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = ld<T>(x[i]);
        y[i] = cv<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

template <typename T> __global__ void gelu_bwd_kernel(T *dx, const T *dy, const T *x, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = ld<T>(x[i]);
        const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        const float pdf = 0.3989422804014327f * expf(-0.5f * v * v);
        dx[i] = cv<T>(ld<T>(dy[i]) * (cdf + v * pdf));
    }
}

extern "C" ft_status cuda_gelu_fwd(ft_backend *base, void *y, const void *x, size_t n, ft_error *err)
{
    if (!n) return FT_OK;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T, gelu_fwd_kernel<T><<<grid_for(n, 256), 256, 0, CB(base)->stream>>>((T *)y, (const T *)x, n));
    LAUNCH_CHECK("gelu");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}

extern "C" ft_status cuda_gelu_bwd(ft_backend *base, void *dx, const void *dy, const void *x, size_t n,
                                   ft_error *err)
{
    if (!n) return FT_OK;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T,
                 gelu_bwd_kernel<T><<<grid_for(n, 256), 256, 0, CB(base)->stream>>>((T *)dx, (const T *)dy,
                                                                                    (const T *)x, n));
    LAUNCH_CHECK("gelu backward");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}

template <typename T> __global__ void add_kernel(T *y, const T *a, const T *b, const T *c, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float s = ld<T>(a[i]) + ld<T>(b[i]);
        if (c) s += ld<T>(c[i]);
        y[i] = cv<T>(s);
    }
}

extern "C" ft_status cuda_add(ft_backend *base, void *y, const void *a, const void *b, const void *c, size_t n,
                              ft_error *err)
{
    if (!n) return FT_OK;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T,
                 add_kernel<T><<<grid_for(n, 256), 256, 0, CB(base)->stream>>>((T *)y, (const T *)a, (const T *)b,
                                                                               (const T *)c, n));
    LAUNCH_CHECK("residual add");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}
