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

/* one block per row: mean, then the centred sum of squares (two passes, like the CPU).
 * Generic form: any D; three strided passes over the row. */
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

/* D % 8 == 0, D <= 8 * VPT * blockDim.x: the row is read once, 16 bytes per load, all loads in
 * flight together, and kept in registers for both statistics and the output. The strided form
 * above issues its loads one dependent iteration at a time: ~13 us for one 4544-wide row (decode)
 * against ~2 us here. Same formulas, f32. */
template <typename T, int VPT>
__global__ void layernorm_fwd_vec_kernel(T *y, float *mean, float *rstd, const T *x, const T *g, const T *b, int D,
                                         float eps)
{
    __shared__ float sh[32];
    const size_t row = blockIdx.x;
    const int nv = D / 8; /* 16-byte vectors in the row */
    const uint4 *xr = (const uint4 *)(x + row * D);
    float v[VPT][8];
    float s = 0.0f;
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (i < nv) w = xr[i];
        const T *e = (const T *)&w;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            v[u][k] = ld<T>(e[k]);
            s += v[u][k];
        }
    }
    const float mu = block_sum(s, sh) / D;
    float ss = 0.0f;
#pragma unroll
    for (int u = 0; u < VPT; u++)
        if (threadIdx.x + u * blockDim.x < nv)
#pragma unroll
            for (int k = 0; k < 8; k++) {
                const float d = v[u][k] - mu;
                ss += d * d;
            }
    ss = block_sum(ss, sh);
    const float rs = (float)(1.0 / sqrt((double)ss / D + (double)eps));
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i >= nv) continue;
        const uint4 gw = ((const uint4 *)g)[i], bw = ((const uint4 *)b)[i];
        const T *ge = (const T *)&gw, *be = (const T *)&bw;
        uint4 o;
        T *oe = (T *)&o;
#pragma unroll
        for (int k = 0; k < 8; k++) oe[k] = cv<T>((v[u][k] - mu) * rs * ld<T>(ge[k]) + ld<T>(be[k]));
        ((uint4 *)(y + row * D))[i] = o;
    }
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

/* Launch shape of the register-row layernorm kernels: vectors (16 bytes) per thread, 0 when the
 * row does not qualify (D % 8, unaligned pointers, rows over 4096 vectors: the strided kernel) */
static int ln_row_plan(int D, bool aligned, int *threads)
{
    const int nv = D / 8;
    if (!aligned || D % 8 != 0 || nv > 4 * 1024) return 0;
    const int vpt = nv <= 1024 ? 1 : nv <= 2048 ? 2 : 4;
    *threads = ((nv + vpt - 1) / vpt + 31) / 32 * 32;
    return vpt;
}

extern "C" ft_status cuda_layernorm_fwd(ft_backend *base, void *y, float *mean, float *rstd, const void *x,
                                        const void *g, const void *b, int N, int D, float eps, ft_error *err)
{
    if (N <= 0) return FT_OK;
    PROF_T0(CB(base));
    cudaStream_t st = CB(base)->stream;
    int threads = 0;
    const int vpt = ln_row_plan(D, ((uintptr_t)x | (uintptr_t)y | (uintptr_t)g | (uintptr_t)b) % 16 == 0, &threads);
    if (vpt) {
        ACT_DISPATCH(base, T, {
            if (vpt == 1)
                layernorm_fwd_vec_kernel<T, 1><<<N, threads, 0, st>>>((T *)y, mean, rstd, (const T *)x, (const T *)g,
                                                                      (const T *)b, D, eps);
            else if (vpt == 2)
                layernorm_fwd_vec_kernel<T, 2><<<N, threads, 0, st>>>((T *)y, mean, rstd, (const T *)x, (const T *)g,
                                                                      (const T *)b, D, eps);
            else
                layernorm_fwd_vec_kernel<T, 4><<<N, threads, 0, st>>>((T *)y, mean, rstd, (const T *)x, (const T *)g,
                                                                      (const T *)b, D, eps);
        });
    } else {
        ACT_DISPATCH(base, T,
                     layernorm_fwd_kernel<T><<<N, 256, 0, st>>>((T *)y, mean, rstd, (const T *)x, (const T *)g,
                                                                (const T *)b, D, eps));
    }
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

/* The backward with the row in registers (as layernorm_fwd_vec_kernel): dy, x and g read once,
 * 16 bytes per load; the strided form reads them twice, 2 bytes at a time (~96 us per [4096, 4544]
 * on an H200, ~3x its bandwidth time). Same formulas, f32. */
template <typename T, int VPT>
__global__ void layernorm_bwd_vec_kernel(T *dx, const T *dy, const T *x, const float *mean, const float *rstd,
                                         const T *g, int D)
{
    __shared__ float sh[32];
    const size_t row = blockIdx.x;
    const int nv = D / 8;
    const float m = mean[row], rs = rstd[row];
    float dyg[VPT][8], xh[VPT][8];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i >= nv) continue;
        float fd[8], fx[8], fg[8];
        unpack8<T>(__ldg((const uint4 *)(dy + row * D) + i), fd);
        unpack8<T>(__ldg((const uint4 *)(x + row * D) + i), fx);
        unpack8<T>(__ldg((const uint4 *)g + i), fg);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            dyg[u][k] = fd[k] * fg[k];
            xh[u][k] = (fx[k] - m) * rs;
            s1 += dyg[u][k];
            s2 += dyg[u][k] * xh[u][k];
        }
    }
    const float c1 = block_sum(s1, sh) / D;
    const float c2 = block_sum(s2, sh) / D;
#pragma unroll
    for (int u = 0; u < VPT; u++) {
        const int i = threadIdx.x + u * blockDim.x;
        if (i >= nv) continue;
        uint4 *dxr = (uint4 *)(dx + row * D) + i;
        float o[8];
        unpack8<T>(*dxr, o);
#pragma unroll
        for (int k = 0; k < 8; k++) o[k] += rs * (dyg[u][k] - c1 - xh[u][k] * c2);
        *dxr = pack8<T>(o);
    }
}

extern "C" ft_status cuda_layernorm_bwd(ft_backend *base, void *dx, const void *dy, const void *x,
                                        const float *mean, const float *rstd, const void *g, int N, int D,
                                        ft_error *err)
{
    if (N <= 0) return FT_OK;
    PROF_T0(CB(base));
    cudaStream_t st = CB(base)->stream;
    int threads = 0;
    const int vpt = ln_row_plan(D, ((uintptr_t)dx | (uintptr_t)dy | (uintptr_t)x | (uintptr_t)g) % 16 == 0, &threads);
    if (vpt) {
#define LN_BWD(VPT)                                                                                             \
    layernorm_bwd_vec_kernel<T, VPT><<<N, threads, 0, st>>>((T *)dx, (const T *)dy, (const T *)x, mean, rstd, \
                                                            (const T *)g, D)
        ACT_DISPATCH(base, T, {
            if (vpt == 1) LN_BWD(1);
            else if (vpt == 2) LN_BWD(2);
            else LN_BWD(4);
        });
#undef LN_BWD
    } else {
        ACT_DISPATCH(base, T,
                     layernorm_bwd_kernel<T><<<N, 256, 0, st>>>((T *)dx, (const T *)dy, (const T *)x, mean, rstd,
                                                                (const T *)g, D));
    }
    LAUNCH_CHECK("layernorm backward");
    PROF_MARK(CB(base), PR_LN);
    return FT_OK;
}

/* exact GELU (erf), as Falcon's nn.GELU(); the derivative for the backward */
__device__ __forceinline__ float gelu_of(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }
__device__ __forceinline__ float gelu_grad_of(float v)
{
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    const float pdf = 0.3989422804014327f * expf(-0.5f * v * v);
    return cdf + v * pdf;
}

/* VEC: 8 elements per 16-byte access (pointers 16-byte aligned), the n % 8 tail one by one. The
 * one-element form moved ~1.1 TB/s on an H200 (261 us for one [4096, 18176] activation). */
template <typename T, bool VEC> __global__ void gelu_fwd_kernel(T *y, const T *x, size_t n)
{
    const size_t t0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (VEC) {
        done = n / 8 * 8;
        for (size_t i = t0; i < n / 8; i += stride) {
            float f[8];
            unpack8<T>(((const uint4 *)x)[i], f); /* a plain load: y may be x (qlinear_fwd_epi) */
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = gelu_of(f[k]);
            ((uint4 *)y)[i] = pack8<T>(f);
        }
    }
    for (size_t i = done + t0; i < n; i += stride) y[i] = cv<T>(gelu_of(ld<T>(x[i])));
}

template <typename T, bool VEC> __global__ void gelu_bwd_kernel(T *dx, const T *dy, const T *x, size_t n)
{
    const size_t t0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (VEC) {
        done = n / 8 * 8;
        for (size_t i = t0; i < n / 8; i += stride) {
            float f[8], d[8];
            unpack8<T>(__ldg((const uint4 *)x + i), f);
            unpack8<T>(__ldg((const uint4 *)dy + i), d);
#pragma unroll
            for (int k = 0; k < 8; k++) f[k] = d[k] * gelu_grad_of(f[k]);
            ((uint4 *)dx)[i] = pack8<T>(f);
        }
    }
    for (size_t i = done + t0; i < n; i += stride) dx[i] = cv<T>(ld<T>(dy[i]) * gelu_grad_of(ld<T>(x[i])));
}

extern "C" ft_status cuda_gelu_fwd(ft_backend *base, void *y, const void *x, size_t n, ft_error *err)
{
    if (!n) return FT_OK;
    PROF_T0(CB(base));
    const bool vec = aligned16(y) && aligned16(x);
    const unsigned grid = grid_for(vec ? (n + 7) / 8 : n, 256);
    ACT_DISPATCH(base, T, {
        if (vec) gelu_fwd_kernel<T, true><<<grid, 256, 0, CB(base)->stream>>>((T *)y, (const T *)x, n);
        else gelu_fwd_kernel<T, false><<<grid, 256, 0, CB(base)->stream>>>((T *)y, (const T *)x, n);
    });
    LAUNCH_CHECK("gelu");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}

extern "C" ft_status cuda_gelu_bwd(ft_backend *base, void *dx, const void *dy, const void *x, size_t n,
                                   ft_error *err)
{
    if (!n) return FT_OK;
    PROF_T0(CB(base));
    const bool vec = aligned16(dx) && aligned16(dy) && aligned16(x);
    const unsigned grid = grid_for(vec ? (n + 7) / 8 : n, 256);
    ACT_DISPATCH(base, T, {
        if (vec) gelu_bwd_kernel<T, true><<<grid, 256, 0, CB(base)->stream>>>((T *)dx, (const T *)dy, (const T *)x, n);
        else gelu_bwd_kernel<T, false><<<grid, 256, 0, CB(base)->stream>>>((T *)dx, (const T *)dy, (const T *)x, n);
    });
    LAUNCH_CHECK("gelu backward");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}

/* y = a + b (+ c); VEC: 8 elements per 16-byte access, as the GELU kernels (the one-element form
 * moved ~2 TB/s on an H200) */
template <typename T, bool VEC> __global__ void add_kernel(T *y, const T *a, const T *b, const T *c, size_t n)
{
    const size_t t0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t done = 0;
    if (VEC) {
        done = n / 8 * 8;
        for (size_t i = t0; i < n / 8; i += stride) {
            float fa[8], fb[8], fc[8];
            unpack8<T>(((const uint4 *)a)[i], fa); /* plain loads: y may be a */
            unpack8<T>(((const uint4 *)b)[i], fb);
            if (c) unpack8<T>(((const uint4 *)c)[i], fc);
#pragma unroll
            for (int e = 0; e < 8; e++) fa[e] = c ? fa[e] + fb[e] + fc[e] : fa[e] + fb[e];
            ((uint4 *)y)[i] = pack8<T>(fa);
        }
    }
    for (size_t i = done + t0; i < n; i += stride) {
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
    const bool vec = aligned16(y) && aligned16(a) && aligned16(b) && (!c || aligned16(c));
    const unsigned grid = grid_for(vec ? (n + 7) / 8 : n, 256);
#define ADD(V) add_kernel<T, V><<<grid, 256, 0, CB(base)->stream>>>((T *)y, (const T *)a, (const T *)b, (const T *)c, n)
    ACT_DISPATCH(base, T, {
        if (vec) ADD(true);
        else ADD(false);
    });
#undef ADD
    LAUNCH_CHECK("residual add");
    PROF_MARK(CB(base), PR_ELEM);
    return FT_OK;
}
