/* qmatmul.cu -- GPTQ linears on the GPU.
 *
 * A quantized linear keeps only its packed tensors on the device. qgemm_choose (choice.cu) picks
 * how each product runs:
 *   fused      qgemm.cu reads the packed weights inside a tensor-core GEMM;
 *   gemv       gemv.cu, forward with N <= 8 rows (decode);
 *   scratch    W[in, out] dequantized (act dtype) into ONE scratch buffer shared by every linear
 *              (sized for the largest), then cublasGemmEx with fp32 accumulation; the forward call
 *              is "NN" in cuBLAS's column-major terms, the input gradient "TN";
 *   scratch_t  forward only: W^T[out, in] dequantized through a shared-memory tiled transpose so the
 *              cuBLAS call is "TN" (measured ~3x faster per call than "NN" on an H200).
 * The math is csrc/cpu/qmatmul.c's:
 *   W[i, o] = (q[i, o] - (zstored[g, o] + zero_offset)) * scale[g, o],  g = g_idx[i],
 * in fp32 with one rounding to the act dtype, on every path.
 *
 * The LoRA products that run beside each linear are in lora.cu.
 */
#include <stdlib.h>

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

/* 2/4/8 bits and out % 8 == 0: one thread per (packed word row, 8 consecutive columns). Its 8 words
 * arrive in two 16-byte loads and each of its per = 32/bits rows leaves in one 16-byte store: the
 * one-column kernel above issues 2-byte stores and ran at ~1.6 TB/s on an H200 (21 ms of a 42 ms
 * Falcon-7B step at mb 1, bench/train_profile.py, 2026-12-04). Same math, same rounding. */
template <typename T>
__global__ void dequant_vec8(T *__restrict__ W, const int32_t *__restrict__ qw, const int32_t *__restrict__ qz,
                             const f16 *__restrict__ sc, const int32_t *__restrict__ gidx, int in, int out, int bits,
                             int zoff)
{
    const int o8 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    const int wr = blockIdx.y;
    if (o8 >= out) return;
    const int per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const int4 wa = __ldg((const int4 *)(qw + (size_t)wr * out + o8));
    const int4 wb = __ldg((const int4 *)(qw + (size_t)wr * out + o8 + 4));
    const uint32_t word[8] = {(uint32_t)wa.x, (uint32_t)wa.y, (uint32_t)wa.z, (uint32_t)wa.w,
                              (uint32_t)wb.x, (uint32_t)wb.y, (uint32_t)wb.z, (uint32_t)wb.w};
    const int zwords = out * bits / 32;
    int gprev = -1;
    float s[8], z[8];
    for (int k = 0; k < per; k++) {
        const int i = wr * per + k;
        if (i >= in) break;
        const int g = gidx[i];
        if (g != gprev) {
            const uint4 sv = __ldg((const uint4 *)(sc + (size_t)g * out + o8));
            const f16 *sh = (const f16 *)&sv;
#pragma unroll
            for (int c = 0; c < 8; c++) {
                s[c] = __half2float(sh[c]);
                z[c] = (float)(unpack_dev(qz + (size_t)g * zwords, 1, o8 + c, bits) + (uint32_t)zoff);
            }
            gprev = g;
        }
        uint4 packed;
        T *v = (T *)&packed;
#pragma unroll
        for (int c = 0; c < 8; c++) v[c] = cv<T>(((float)((word[c] >> (k * bits)) & mask) - z[c]) * s[c]);
        *(uint4 *)(W + (size_t)i * out + o8) = packed;
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

/* W^T[out, in] (scratch_t): a 64 x 64 tile (rows i, columns o) per block goes through shared memory,
 * so both the packed reads (consecutive o) and the act writes (consecutive i) are coalesced. Any bits. */
constexpr int DQT_TILE = 64;
template <typename T>
__global__ void __launch_bounds__(256) dequant_t_kernel(T *__restrict__ Wt, const int32_t *__restrict__ qw,
                                                        const int32_t *__restrict__ qz, const f16 *__restrict__ sc,
                                                        const int32_t *__restrict__ gidx, int in, int out, int bits,
                                                        int zoff)
{
    __shared__ T tile[DQT_TILE][DQT_TILE + 2]; /* [o][i]; +2: a column walk hits 32 banks */
    const int i0 = blockIdx.y * DQT_TILE, o0 = blockIdx.x * DQT_TILE;
    const int zwords = out * bits / 32;
    const int lo = threadIdx.x % DQT_TILE, hi = threadIdx.x / DQT_TILE; /* 64 x 4 threads */
    for (int r = hi; r < DQT_TILE; r += 256 / DQT_TILE) {
        const int i = i0 + r, o = o0 + lo;
        float w = 0.0f;
        if (i < in && o < out) {
            const int g = gidx[i];
            const float z = (float)(unpack_dev(qz + (size_t)g * zwords, 1, o, bits) + (uint32_t)zoff);
            w = ((float)unpack_dev(qw + o, out, i, bits) - z) * __half2float(sc[(size_t)g * out + o]);
        }
        tile[lo][r] = cv<T>(w);
    }
    __syncthreads();
    for (int r = hi; r < DQT_TILE; r += 256 / DQT_TILE) {
        const int o = o0 + r, i = i0 + lo;
        if (i < in && o < out) Wt[(size_t)o * in + i] = tile[r][lo];
    }
}

/* W (transposed: W^T) into the shared dequantization scratch */
static ft_status dequantize(cuda_backend *be, const ft_qlinear *q, int transposed, void **W, ft_error *err)
{
    FT_TRY(cuda_scratch(be, SCR_DEQ, (size_t)q->in * q->out * 2, W, err));
    const int threads = 128;
    if (transposed) {
        dim3 grid((q->out + DQT_TILE - 1) / DQT_TILE, (q->in + DQT_TILE - 1) / DQT_TILE);
        ACT_DISPATCH(&be->base, T,
                     dequant_t_kernel<T><<<grid, 256, 0, be->stream>>>((T *)*W, q->qweight, q->qzeros, q->scales,
                                                                       q->g_idx, q->in, q->out, q->bits,
                                                                       q->zero_offset));
    } else if (32 % q->bits == 0 && q->out % 8 == 0) {
        dim3 grid((q->out / 8 + threads - 1) / threads, q->in * q->bits / 32);
        ACT_DISPATCH(&be->base, T,
                     dequant_vec8<T><<<grid, threads, 0, be->stream>>>((T *)*W, q->qweight, q->qzeros, q->scales,
                                                                       q->g_idx, q->in, q->out, q->bits,
                                                                       q->zero_offset));
    } else if (32 % q->bits == 0) {
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

/* FT_CUDA_POISON=1 (tests): NaN (0xFFFF in bf16 and fp16) in every element a product is about to
 * write, so an element a kernel forgets shows up */
static ft_status poison(cuda_backend *be, void *p, size_t n, ft_error *err)
{
    if (be->poison) CUDA_TRY(cudaMemsetAsync(p, 0xFF, n * 2, be->stream), "poisoning an output");
    return FT_OK;
}

/* y = x W + bias, and the epilogue (may be NULL) where the GEMV runs the product: *epi_done says
 * whether it did */
static ft_status qlinear_forward(cuda_backend *be, void *y, const void *x, const ft_qlinear *q, int N,
                                 const ft_epilogue *epi, bool *epi_done, ft_error *err)
{
    ft_backend *base = &be->base;
    *epi_done = false;
    if (N <= 0) return FT_OK;
    const qgemm_kind kind = qgemm_choose(be, q, N, QGEMM_FWD, x, y);
    FT_TRY(poison(be, y, (size_t)N * q->out, err));
    PROF_T0(be);
    const double t_op = prof_t0_;
    const bool fuse = epi && qlinear_epi_choose(be, kind, epi) == QE_GEMV;
    if (kind == QGEMM_GEMV) {
        if (fuse && epi->lora_A) /* the LoRA's xa first: the GEMV's reduction adds scale xa B^T */
            FT_TRY(cuda_lora_down(be, epi->lora_xa, x, epi->lora_A, N, q->in, epi->lora_r, err));
        FT_TRY(cuda_qgemv(be, y, x, q, N, fuse ? epi : NULL, err)); /* bias included */
        *epi_done = fuse;
    } else if (kind == QGEMM_FUSED) {
        FT_TRY(cuda_qgemm_fused(be, QGEMM_FWD, y, x, q, N, 0, err)); /* bias included */
    } else {
        const int tr = kind == QGEMM_SCRATCH_T;
        void *W;
        FT_TRY(dequantize(be, q, tr, &W, err));
        PROF_MARK(be, PR_DEQ);
        const cudaDataType_t t = act_cuda_type(base);
        /* y[N,out] = x[N,in] W[in,out]: W^T [out,in] ("TN") or W [in,out] ("NN") */
        if (tr) FT_TRY(gemm_rm(be, 0, 1, N, q->out, q->in, 1.0f, x, t, q->in, W, t, q->in, 0.0f, y, t, q->out, err));
        else FT_TRY(gemm_rm(be, 0, 0, N, q->out, q->in, 1.0f, x, t, q->in, W, t, q->out, 0.0f, y, t, q->out, err));
        if (q->bias) {
            const size_t n = (size_t)N * q->out;
            ACT_DISPATCH(base, T,
                         add_bias_kernel<T><<<grid_for(n, 256), 256, 0, be->stream>>>((T *)y, q->bias, N, q->out));
            LAUNCH_CHECK("bias add");
        }
    }
    PROF_MARK(be, PR_QGEMM_F);
    prof_choice(be, CH_QGEMM_FWD, kind, t_op);
    return FT_OK;
}

extern "C" ft_status cuda_qlinear_fwd(ft_backend *base, void *y, const void *x, const ft_qlinear *q, int N,
                                      ft_error *err)
{
    bool unused;
    return qlinear_forward(CB(base), y, x, q, N, NULL, &unused, err);
}

/* The GEMV applies the epilogue in its reduction (one launch, y written once); the other kernels
 * are followed by the elementwise ops, in place, in the order ft_epilogue gives (the order, and so
 * the bits, of the separate ops layer_forward ran before). */
extern "C" ft_status cuda_qlinear_fwd_epi(ft_backend *base, void *y, const void *x, const ft_qlinear *q, int N,
                                          const ft_epilogue *epi, ft_error *err)
{
    bool done;
    FT_TRY(qlinear_forward(CB(base), y, x, q, N, epi, &done, err));
    return done ? FT_OK : ft_epilogue_by_ops(base, y, x, N, q->in, q->out, epi, err);
}

extern "C" ft_status cuda_qlinear_bwd(ft_backend *base, void *dx, const void *dy, const ft_qlinear *q, int N,
                                      int accumulate, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    const qgemm_kind kind = qgemm_choose(be, q, N, QGEMM_BWD, dy, dx);
    if (!accumulate) FT_TRY(poison(be, dx, (size_t)N * q->in, err));
    PROF_T0(be);
    const double t_op = prof_t0_;
    if (kind == QGEMM_FUSED) {
        FT_TRY(cuda_qgemm_fused(be, QGEMM_BWD, dx, dy, q, N, accumulate, err));
    } else {
        void *W;
        FT_TRY(dequantize(be, q, 0, &W, err));
        PROF_MARK(be, PR_DEQ);
        const cudaDataType_t t = act_cuda_type(base);
        /* dx[N,in] = dy[N,out] W[in,out]^T ("TN") */
        FT_TRY(gemm_rm(be, 0, 1, N, q->in, q->out, 1.0f, dy, t, q->out, W, t, q->out, accumulate ? 1.0f : 0.0f, dx,
                       t, q->in, err));
    }
    PROF_MARK(be, PR_QGEMM_B);
    prof_choice(be, CH_QGEMM_BWD, kind, t_op);
    return FT_OK;
}

