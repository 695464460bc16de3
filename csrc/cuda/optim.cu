/* optim.cu -- squared norm, AdamW and row gathers on the GPU (f32 buffers).
 * sumsq is deterministic: fixed grid, per-block double partials, summed on the host. */
#include <string.h>

#include "cuda.cuh"

__global__ void sumsq_kernel(double *part, const float *x, size_t n)
{
    __shared__ double sh[32];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (double)x[i] * x[i];
    for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) sh[w] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++) t += sh[i];
        part[blockIdx.x] = t;
    }
}

extern "C" ft_status cuda_sumsq(ft_backend *base, const float *x, size_t n, double *out, ft_error *err)
{
    cuda_backend *be = CB(base);
    *out = 0.0;
    if (!n) return FT_OK;
    sumsq_kernel<<<RED_BLOCKS, 256, 0, be->stream>>>(be->red, x, n);
    LAUNCH_CHECK("sum of squares");
    CUDA_TRY(cudaMemcpyAsync(be->red_host, be->red, RED_BLOCKS * sizeof(double), cudaMemcpyDeviceToHost, be->stream),
             "sum of squares");
    CUDA_TRY(cudaStreamSynchronize(be->stream), "sum of squares");
    double s = 0.0;
    for (int i = 0; i < RED_BLOCKS; i++) s += be->red_host[i];
    *out = s;
    return FT_OK;
}

__global__ void adamw_kernel(float *p, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2,
                             float eps, float gmul, float step_size, float bc2_sqrt, float decay)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float gi = g[i] * gmul;
        float pi = p[i] * decay;
        const float mi = m[i] + (1.0f - b1) * (gi - m[i]);
        const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        pi -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
    (void)lr;
}

extern "C" ft_status cuda_adamw(ft_backend *base, float *p, const float *g, float *m, float *v, size_t n, float lr,
                                float beta1, float beta2, float eps, float wd, float gmul, float bc1, float bc2,
                                ft_error *err)
{
    if (!n) return FT_OK;
    const float step_size = lr / bc1, bc2_sqrt = sqrtf(bc2), decay = 1.0f - lr * wd;
    adamw_kernel<<<grid_for(n, 256), 256, 0, CB(base)->stream>>>(p, g, m, v, n, lr, beta1, beta2, eps, gmul,
                                                                 step_size, bc2_sqrt, decay);
    LAUNCH_CHECK("AdamW");
    return FT_OK;
}

/* dst row i = src row idx[i]; words of 4 bytes when row_bytes allows, else bytes */
__global__ void gather_words(uint32_t *dst, const uint32_t *src, const int32_t *idx, size_t row_words)
{
    const int i = blockIdx.y;
    const uint32_t *s = src + (size_t)idx[i] * row_words;
    uint32_t *d = dst + (size_t)i * row_words;
    for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < row_words; w += (size_t)gridDim.x * blockDim.x)
        d[w] = s[w];
}

__global__ void gather_bytes(uint8_t *dst, const uint8_t *src, const int32_t *idx, size_t row_bytes)
{
    const int i = blockIdx.y;
    const uint8_t *s = src + (size_t)idx[i] * row_bytes;
    uint8_t *d = dst + (size_t)i * row_bytes;
    for (size_t w = blockIdx.x * (size_t)blockDim.x + threadIdx.x; w < row_bytes; w += (size_t)gridDim.x * blockDim.x)
        d[w] = s[w];
}

extern "C" ft_status cuda_gather_rows(ft_backend *base, void *dst, const void *src, const int32_t *idx, int n,
                                      size_t row_bytes, ft_error *err)
{
    if (n <= 0 || !row_bytes) return FT_OK;
    cudaStream_t s = CB(base)->stream;
    if (row_bytes % 4 == 0 && (uintptr_t)dst % 4 == 0 && (uintptr_t)src % 4 == 0) {
        const size_t w = row_bytes / 4;
        dim3 grid((unsigned)((w + 255) / 256 > 1024 ? 1024 : (w + 255) / 256), (unsigned)n);
        gather_words<<<grid, 256, 0, s>>>((uint32_t *)dst, (const uint32_t *)src, idx, w);
    } else {
        dim3 grid((unsigned)((row_bytes + 255) / 256 > 1024 ? 1024 : (row_bytes + 255) / 256), (unsigned)n);
        gather_bytes<<<grid, 256, 0, s>>>((uint8_t *)dst, (const uint8_t *)src, idx, row_bytes);
    }
    LAUNCH_CHECK("row gather");
    return FT_OK;
}
