/* loss.cu -- lm_head logits, cross-entropy and its backward on the GPU.
 * The engine (forward.c, train.c) hands row chunks (about 64 MiB of f32 logits), so no full [N, V]
 * f32 copy exists. dlogits are converted to the act dtype in scratch for the
 * backward product. */
#include "cuda.cuh"

extern "C" ft_status cuda_lm_logits(ft_backend *base, float *logits, const void *h, const void *W, int n, int V,
                                    int D, ft_error *err)
{
    const cudaDataType_t t = act_cuda_type(base);
    PROF_T0(CB(base));
    /* logits[n,V] = h[n,D] W[V,D]^T */
    FT_TRY(gemm_rm(CB(base), 0, 1, n, V, D, 1.0f, h, t, D, W, t, D, 0.0f, logits, CUDA_R_32F, V, err));
    PROF_MARK(CB(base), PR_LM);
    return FT_OK;
}

/* one block per row: loss = lse - z[y]; z <- gs * (softmax - onehot) when gs != 0. Each thread
 * keeps a running max and a sum of exponentials rescaled when the max grows, so the row is read
 * twice (here and for the gradient) instead of three times. */
__global__ void cross_entropy_kernel(float *logits, float *row_loss, const int32_t *target, int V, float gs)
{
    __shared__ float sh[32];
    const size_t row = blockIdx.x;
    float *z = logits + row * V;
    const int y = target[row];
    if (y < 0) {
        if (threadIdx.x == 0) row_loss[row] = 0.0f;
        if (gs != 0.0f)
            for (int c = threadIdx.x; c < V; c += blockDim.x) z[c] = 0.0f;
        return;
    }
    float mx = -INFINITY, s = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float v = z[c];
        if (v > mx) { /* the sum so far was relative to the old max (0 while mx is -inf) */
            s *= expf(mx - v);
            mx = v;
        }
        s += expf(v - mx);
    }
    const float row_max = block_max(mx, sh);
    s = block_sum(mx == -INFINITY ? 0.0f : s * expf(mx - row_max), sh);
    const float lse = row_max + logf(s);
    const float zy = z[y];
    __syncthreads(); /* everyone read z[y] before it is overwritten */
    if (threadIdx.x == 0) row_loss[row] = lse - zy;
    if (gs != 0.0f) {
        for (int c = threadIdx.x; c < V; c += blockDim.x) {
            float g = gs * expf(z[c] - lse);
            if (c == y) g -= gs;
            z[c] = g;
        }
    }
}

extern "C" ft_status cuda_cross_entropy(ft_backend *base, float *logits, float *row_loss, const int32_t *target,
                                        int n, int V, float grad_scale, ft_error *err)
{
    if (n <= 0) return FT_OK;
    PROF_T0(CB(base));
    cross_entropy_kernel<<<n, 1024, 0, CB(base)->stream>>>(logits, row_loss, target, V, grad_scale);
    LAUNCH_CHECK("cross-entropy");
    PROF_MARK(CB(base), PR_CE);
    return FT_OK;
}

/* (v, i) pairs: does (bv, bi) beat (av, ai)? NaN first (as numpy.argmax), then larger, then lower index */
__device__ __forceinline__ bool argmax_beats(float bv, int bi, float av, int ai)
{
    const bool bn = isnan(bv), an = isnan(av);
    if (bn != an) return bn;
    if (!bn && bv != av) return bv > av;
    return bi < ai;
}

/* one block per row; every thread scans a strided slice, then a shuffle + shared tree */
__global__ void argmax_rows_kernel(const float *logits, int V, int32_t *out)
{
    __shared__ float sv[32];
    __shared__ int si[32];
    const float *z = logits + (size_t)blockIdx.x * V;
    float bv = -INFINITY;
    int bi = V; /* beaten by any real element */
    /* eight loads in flight per thread: a one-load-at-a-time scan of 65k logits took ~19 us */
    for (int c0 = threadIdx.x; c0 < V; c0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int c = c0 + k * blockDim.x;
            v[k] = c < V ? z[c] : -INFINITY;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int c = c0 + k * blockDim.x;
            if (c < V && argmax_beats(v[k], c, bv, bi)) {
                bv = v[k];
                bi = c;
            }
        }
    }
    for (int o = 16; o; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (argmax_beats(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        sv[w] = bv;
        si[w] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int k = 1; k < nw; k++)
            if (argmax_beats(sv[k], si[k], bv, bi)) {
                bv = sv[k];
                bi = si[k];
            }
        out[blockIdx.x] = bi < V ? bi : 0;
    }
}

extern "C" ft_status cuda_argmax_rows(ft_backend *base, const float *logits, int n, int V, int32_t *out, ft_error *err)
{
    if (n <= 0) return FT_OK;
    argmax_rows_kernel<<<n, 1024, 0, CB(base)->stream>>>(logits, V, out);
    LAUNCH_CHECK("argmax");
    return FT_OK;
}

extern "C" ft_status cuda_lm_bwd(ft_backend *base, void *dh, const float *dlogits, const void *W, int n, int V,
                                 int D, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (n <= 0) return FT_OK;
    void *g;
    PROF_T0(be);
    FT_TRY(cuda_scratch(be, SCR_MISC, (size_t)n * V * 2, &g, err));
    FT_TRY(cuda_f32_to_act(be, g, dlogits, (size_t)n * V, err));
    const cudaDataType_t t = act_cuda_type(base);
    /* dh[n,D] = g[n,V] W[V,D] */
    FT_TRY(gemm_rm(be, 0, 0, n, D, V, 1.0f, g, t, V, W, t, D, 0.0f, dh, t, D, err));
    PROF_MARK(be, PR_LM);
    return FT_OK;
}
