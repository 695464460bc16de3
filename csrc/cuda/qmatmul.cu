/* qmatmul.cu -- GPTQ linears and LoRA on the GPU.
 *
 * A quantized linear keeps only its packed tensors on the device. Forward and
 * backward dequantize W[in, out] (act dtype) into ONE scratch buffer shared by
 * every linear (sized for the largest) and call cublasGemmEx with fp32
 * accumulation. The math is csrc/cpu/qmatmul.c's:
 *   W[i, o] = (q[i, o] - (zstored[g, o] + zero_offset)) * scale[g, o],  g = g_idx[i].
 *
 * LoRA: A, B and their gradients are f32. Products that involve activations
 * run in the act dtype (fp32 accumulation); the rank-r products run in fp32.
 * Dropout masks come from rng.h, element index i of the [N, in] input.
 */
#include <stdlib.h>

#include "../rng.h"
#include "cuda.cuh"

/* value i of a little-endian stream of `bits`-wide fields in words spaced `stride` apart
 * (backend.h's ft_unpack, on the device) */
__device__ __forceinline__ uint32_t unpack_dev(const int32_t *words, int64_t stride, int64_t i, int bits)
{
    const int64_t bit = i * bits;
    const int64_t w = bit >> 5;
    const int sh = (int)(bit & 31);
    uint64_t lo = (uint32_t)words[w * stride];
    if (sh + bits > 32) lo |= (uint64_t)(uint32_t)words[(w + 1) * stride] << 32;
    return (uint32_t)(lo >> sh) & ((1u << bits) - 1u);
}

/* 2/4/8 bits: one thread per (packed word row, column): per = 32/bits rows of W */
template <typename T>
__global__ void dequant_aligned(T *__restrict__ W, const int32_t *__restrict__ qw, const int32_t *__restrict__ qz,
                                const f16 *__restrict__ sc, const int32_t *__restrict__ gidx, int in, int out,
                                int bits, int zoff)
{
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    const int wr = blockIdx.y;
    if (o >= out) return;
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const uint32_t word = (uint32_t)qw[(size_t)wr * out + o];
    const int zwords = out * bits / 32;
    int gprev = -1;
    float s = 0.0f, z = 0.0f;
    for (int k = 0; k < per; k++) {
        const int i = wr * per + k;
        if (i >= in) break;
        const int g = gidx[i];
        if (g != gprev) {
            s = __half2float(sc[(size_t)g * out + o]);
            z = (float)(unpack_dev(qz + (size_t)g * zwords, 1, o, bits) + (uint32_t)zoff);
            gprev = g;
        }
        const float q = (float)((word >> (k * bits)) & mask);
        W[(size_t)i * out + o] = cv<T>((q - z) * s);
    }
}

/* any bits (3): one thread per (row, column) */
template <typename T>
__global__ void dequant_generic(T *__restrict__ W, const int32_t *__restrict__ qw, const int32_t *__restrict__ qz,
                                const f16 *__restrict__ sc, const int32_t *__restrict__ gidx, int in, int out,
                                int bits, int zoff)
{
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    const int i = blockIdx.y;
    if (o >= out || i >= in) return;
    const int g = gidx[i];
    const int zwords = out * bits / 32;
    const float s = __half2float(sc[(size_t)g * out + o]);
    const float z = (float)(unpack_dev(qz + (size_t)g * zwords, 1, o, bits) + (uint32_t)zoff);
    const float q = (float)unpack_dev(qw + o, out, i, bits);
    W[(size_t)i * out + o] = cv<T>((q - z) * s);
}

static ft_status dequantize(cuda_backend *be, const ft_qlinear *q, void **W, ft_error *err)
{
    FT_TRY(cuda_scratch(be, SCR_DEQ, (size_t)q->in * q->out * 2, W, err));
    const int threads = 128;
    if (32 % q->bits == 0) {
        dim3 grid((q->out + threads - 1) / threads, q->in * q->bits / 32);
        ACT_DISPATCH(&be->base, T,
                     dequant_aligned<T><<<grid, threads, 0, be->stream>>>((T *)*W, q->qweight, q->qzeros, q->scales,
                                                                          q->g_idx, q->in, q->out, q->bits,
                                                                          q->zero_offset));
    } else {
        dim3 grid((q->out + threads - 1) / threads, q->in);
        ACT_DISPATCH(&be->base, T,
                     dequant_generic<T><<<grid, threads, 0, be->stream>>>((T *)*W, q->qweight, q->qzeros, q->scales,
                                                                          q->g_idx, q->in, q->out, q->bits,
                                                                          q->zero_offset));
    }
    LAUNCH_CHECK("GPTQ dequantization");
    return FT_OK;
}

static ft_status upload_copy(cuda_backend *be, const ft_host_tensor *t, size_t bytes, void **dst, ft_error *err)
{
    FT_TRY(cuda_malloc(be, bytes, dst, err, t->name ? t->name : "a quantized tensor"));
    CUDA_TRY(cudaMemcpyAsync(*dst, t->data, bytes, cudaMemcpyHostToDevice, be->stream), "uploading GPTQ weights");
    return FT_OK;
}

extern "C" void cuda_qlinear_destroy(ft_backend *base, ft_qlinear *q)
{
    if (!q) return;
    cuda_backend *be = CB(base);
    cuda_free_ptr(be, q->qweight);
    cuda_free_ptr(be, q->qzeros);
    cuda_free_ptr(be, q->scales);
    cuda_free_ptr(be, q->g_idx);
    cuda_free_ptr(be, q->bias);
    cuda_free_ptr(be, q->gemv_cnt);
    free(q);
}

template <typename S> __global__ void to_f32_kernel(float *d, const S *s, int n)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = ld<S>(s[i]);
}

extern "C" ft_status cuda_qlinear_create(ft_backend *base, const ft_qlinear_desc *d, ft_qlinear **out,
                                         ft_error *err)
{
    cuda_backend *be = CB(base);
    *out = NULL;
    ft_qlinear *q = (ft_qlinear *)calloc(1, sizeof *q);
    if (!q) return ft_fail(err, FT_ENOMEM, "out of host memory");
    q->in = d->in;
    q->out = d->out;
    q->bits = d->bits;
    q->groups = d->groups;
    q->zero_offset = d->zero_offset;
    const ft_host_qlinear *h = d->host;
    ft_status st = upload_copy(be, &h->qweight, (size_t)d->in * d->bits / 32 * d->out * 4, (void **)&q->qweight, err);
    if (!st) st = upload_copy(be, &h->qzeros, (size_t)d->groups * (d->out * d->bits / 32) * 4, (void **)&q->qzeros, err);
    if (!st) st = upload_copy(be, &h->scales, (size_t)d->groups * d->out * 2, (void **)&q->scales, err);
    if (!st) st = upload_copy(be, &h->g_idx, (size_t)d->in * 4, (void **)&q->g_idx, err);
    if (!st && h->bias.data) {
        const size_t bb = (size_t)d->out * ft_dtype_size(h->bias.dtype);
        void *tmp = NULL;
        st = cuda_malloc(be, (size_t)d->out * 4, (void **)&q->bias, err, "a linear bias");
        if (!st) st = upload_copy(be, &h->bias, bb, &tmp, err);
        if (!st) {
            const int n = d->out, g = (n + 255) / 256;
            if (h->bias.dtype == FT_F32) to_f32_kernel<float><<<g, 256, 0, be->stream>>>(q->bias, (const float *)tmp, n);
            else if (h->bias.dtype == FT_F16) to_f32_kernel<f16><<<g, 256, 0, be->stream>>>(q->bias, (const f16 *)tmp, n);
            else to_f32_kernel<bf16><<<g, 256, 0, be->stream>>>(q->bias, (const bf16 *)tmp, n);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess) st = cuda_fail(err, e, "bias conversion");
        }
        cuda_free_ptr(be, tmp);
    }
    if (!st) st = cuda_qgemv_prepare(be, q, (const int32_t *)h->g_idx.data, err);
    if (!st) {
        cudaError_t e = cudaStreamSynchronize(be->stream); /* host arrays may go away after this call */
        if (e != cudaSuccess) st = cuda_fail(err, e, "uploading GPTQ weights");
    }
    if (st) {
        cuda_qlinear_destroy(base, q);
        return st;
    }
    *out = q;
    return FT_OK;
}

template <typename T> __global__ void add_bias_kernel(T *y, const float *bias, int N, int out)
{
    const size_t n = (size_t)N * out;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = cv<T>(ld<T>(y[i]) + bias[i % out]);
}

extern "C" ft_status cuda_qlinear_fwd(ft_backend *base, void *y, const void *x, const ft_qlinear *q, int N,
                                      ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    void *W;
    PROF_T0(be);
    /* few rows (decode): fused dequant-GEMV reading the packed weights (gemv.cu) */
    int done = 0;
    FT_TRY(cuda_qgemv(be, y, x, q, N, &done, err));
    if (done) {
        PROF_MARK(be, PR_QGEMM_F);
        return FT_OK;
    }
    FT_TRY(dequantize(be, q, &W, err));
    PROF_MARK(be, PR_DEQ);
    const cudaDataType_t t = act_cuda_type(base);
    /* y[N,out] = x[N,in] W[in,out]. (A transposed dequantization + "TN" product was tried: its
     * uncoalesced column writes cost more than the layout saved; a tiled, coalesced transpose is
     * the next thing to try.) */
    FT_TRY(gemm_rm(be, 0, 0, N, q->out, q->in, 1.0f, x, t, q->in, W, t, q->out, 0.0f, y, t, q->out, err));
    PROF_MARK(be, PR_QGEMM_F);
    if (q->bias) {
        const size_t n = (size_t)N * q->out;
        ACT_DISPATCH(base, T, add_bias_kernel<T><<<grid_for(n, 256), 256, 0, be->stream>>>((T *)y, q->bias, N, q->out));
        LAUNCH_CHECK("bias add");
    }
    return FT_OK;
}

extern "C" ft_status cuda_qlinear_bwd(ft_backend *base, void *dx, const void *dy, const ft_qlinear *q, int N,
                                      int accumulate, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    void *W;
    PROF_T0(be);
    FT_TRY(dequantize(be, q, &W, err));
    PROF_MARK(be, PR_DEQ);
    const cudaDataType_t t = act_cuda_type(base);
    /* dx[N,in] = dy[N,out] W[in,out]^T */
    FT_TRY(gemm_rm(be, 0, 1, N, q->in, q->out, 1.0f, dy, t, q->out, W, t, q->out, accumulate ? 1.0f : 0.0f, dx, t,
                   q->in, err));
    PROF_MARK(be, PR_QGEMM_B);
    return FT_OK;
}

/* ---- LoRA ---- */

/* xd[i] = dropout(x)[i] in the act dtype (OutT = T) or f32 (OutT = float) */
template <typename T, typename OutT>
__global__ void dropout_kernel(OutT *xd, const T *x, size_t n, float p, uint64_t seed)
{
    const float ks = 1.0f / (1.0f - p);
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        xd[i] = cv<OutT>(ft_dropout_keep(seed, i, p) ? ld<T>(x[i]) * ks : 0.0f);
}

/* y[i] += scale * t[i] */
template <typename T> __global__ void axpy_act_kernel(T *y, const float *t, float scale, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] = cv<T>(ld<T>(y[i]) + scale * t[i]);
}

/* dx[i] += keep(i) * t[i] / (1 - p) */
template <typename T> __global__ void dropout_bwd_kernel(T *dx, const float *t, size_t n, float p, uint64_t seed)
{
    const float ks = p > 0.0f ? 1.0f / (1.0f - p) : 1.0f;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        if (ft_dropout_keep(seed, i, p)) dx[i] = cv<T>(ld<T>(dx[i]) + t[i] * ks);
}

extern "C" ft_status cuda_lora_fwd(ft_backend *base, void *y, float *xa, const void *x, const float *A,
                                   const float *B, int N, int in, int out, int r, float scale, float p, uint64_t seed,
                                   ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    const size_t nx = (size_t)N * in;
    PROF_T0(be);
    /* xd (f32) = dropout(x); xa[N,r] = xd A^T in fp32, like lora_bwd. (A first version converted A
     * to bf16 and used a bf16 GEMM with r = 8 output columns: lora_fwd then took ~2 ms a call at
     * N = 4096 on an H100, while lora_bwd's fp32 products took ~0.5 ms for more work.) */
    void *xdf;
    FT_TRY(cuda_scratch(be, SCR_LORA1, nx * 4, &xdf, err));
    ACT_DISPATCH(base, T,
                 dropout_kernel<T, float><<<grid_for(nx, 256), 256, 0, be->stream>>>((float *)xdf, (const T *)x, nx, p,
                                                                                      seed));
    LAUNCH_CHECK("LoRA dropout");
    FT_TRY(gemm_rm(be, 0, 1, N, r, in, 1.0f, xdf, CUDA_R_32F, in, A, CUDA_R_32F, in, 0.0f, xa, CUDA_R_32F, r, err));
    /* tmp[N,out] (f32) = xa B^T; y += scale tmp */
    void *tmp;
    FT_TRY(cuda_scratch(be, SCR_LORA2, (size_t)N * out * 4, &tmp, err));
    FT_TRY(gemm_rm(be, 0, 1, N, out, r, 1.0f, xa, CUDA_R_32F, r, B, CUDA_R_32F, r, 0.0f, tmp, CUDA_R_32F, out, err));
    const size_t ny = (size_t)N * out;
    ACT_DISPATCH(base, T,
                 axpy_act_kernel<T><<<grid_for(ny, 256), 256, 0, be->stream>>>((T *)y, (const float *)tmp, scale, ny));
    LAUNCH_CHECK("LoRA output add");
    PROF_MARK(be, PR_LORA_F);
    return FT_OK;
}

extern "C" ft_status cuda_lora_bwd(ft_backend *base, void *dx, float *dA, float *dB, const void *dy, const void *x,
                                   const float *xa, const float *A, const float *B, int N, int in, int out, int r,
                                   float scale, float p, uint64_t seed, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    const size_t nx = (size_t)N * in, ny = (size_t)N * out;
    PROF_T0(be);
    /* dy in f32 */
    void *dyf, *xdf, *dxa;
    FT_TRY(cuda_scratch(be, SCR_LORA2, ny * 4 > nx * 4 ? ny * 4 : nx * 4, &dyf, err));
    FT_TRY(cuda_scratch(be, SCR_LORA1, nx * 4, &xdf, err));
    FT_TRY(cuda_scratch(be, SCR_LORA0, (size_t)N * r * 4, &dxa, err));
    FT_TRY(cuda_act_to_f32(be, (float *)dyf, dy, ny, err));
    /* dB[out,r] += s dy^T xa */
    FT_TRY(gemm_rm(be, 1, 0, out, r, N, scale, dyf, CUDA_R_32F, out, xa, CUDA_R_32F, r, 1.0f, dB, CUDA_R_32F, r, err));
    /* dxa[N,r] = s dy B */
    FT_TRY(gemm_rm(be, 0, 0, N, r, out, scale, dyf, CUDA_R_32F, out, B, CUDA_R_32F, r, 0.0f, dxa, CUDA_R_32F, r, err));
    /* xd (f32) = dropout(x); dA[r,in] += dxa^T xd */
    ACT_DISPATCH(base, T,
                 dropout_kernel<T, float><<<grid_for(nx, 256), 256, 0, be->stream>>>((float *)xdf, (const T *)x, nx, p,
                                                                                      seed));
    LAUNCH_CHECK("LoRA dropout");
    FT_TRY(gemm_rm(be, 1, 0, r, in, N, 1.0f, dxa, CUDA_R_32F, r, xdf, CUDA_R_32F, in, 1.0f, dA, CUDA_R_32F, in, err));
    if (dx) {
        /* t[N,in] = dxa A (reuses the xd buffer: dA above is enqueued before) ; dx += dropout'(t) */
        FT_TRY(gemm_rm(be, 0, 0, N, in, r, 1.0f, dxa, CUDA_R_32F, r, A, CUDA_R_32F, in, 0.0f, xdf, CUDA_R_32F, in,
                       err));
        ACT_DISPATCH(base, T,
                     dropout_bwd_kernel<T><<<grid_for(nx, 256), 256, 0, be->stream>>>((T *)dx, (const float *)xdf, nx,
                                                                                      p, seed));
        LAUNCH_CHECK("LoRA input gradient");
    }
    PROF_MARK(be, PR_LORA_B);
    return FT_OK;
}
