/* mma.cuh -- tensor-core, ldmatrix and pair-packing helpers (gemv.cu, qgemm.cu, attention_mma.cuh).
 *
 * mma16816<T>: d[0..3] += A B for one m16n8k16 tile, fp32 accumulators, the PTX fragment layout
 * (thread g = lane / 4, t = lane % 4): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
 * a3 = A[g+8][2t+8..]; b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]; d = D[g][2t..2t+1], D[g+8][2t..].
 * sm_80+: one mma.sync m16n8k16 (bf16 or f16). sm_75 (Turing has no bf16 and no k16 shape): f16 as two
 * m16n8k8, whose fragments are the two k halves of the above; bf16 traps there (choice.cu never
 * launches a bf16 tensor-core kernel from code compiled below sm_80).
 * cp_async16 / cp_async_commit / cp_async_wait: asynchronous 16-byte copies to shared memory (sm_80+).
 */
#ifndef FT_CUDA_MMA_CUH
#define FT_CUDA_MMA_CUH

#include "cuda.cuh"

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<bf16>(float lo, float hi)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<f16>(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* the two act values of a 32-bit pair as floats */
template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t v);
template <> __device__ __forceinline__ float2 unpack2<bf16>(uint32_t v)
{
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&v));
}
template <> __device__ __forceinline__ float2 unpack2<f16>(uint32_t v)
{
    return __half22float2(*reinterpret_cast<__half2 *>(&v));
}

/* one m16n8k16 mma.sync on act type TY ("bf16" or "f16"), accumulating in d */
#define FT_MMA16816(TY)                                                                                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TY "." TY ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
                 "{%8,%9}, {%0,%1,%2,%3};\n"                                                             \
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                         \
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1))

template <typename T>
__device__ __forceinline__ void mma16816(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<bf16>(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FT_MMA16816("bf16");
#else /* never launched below sm_80 (choice.cu checks the PTX architecture) */
    (void)d; (void)a0; (void)a1; (void)a2; (void)a3; (void)b0; (void)b1;
    __trap();
#endif
}
template <>
__device__ __forceinline__ void mma16816<f16>(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    FT_MMA16816("f16");
#else /* sm_75: k 0..7 then k 8..15 */
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a2), "r"(a3), "r"(b1));
#endif
}
#undef FT_MMA16816

/* ---- fragments from shared memory (ldmatrix, sm_75+) ----
 * ldsm_x4: lanes 8i .. 8i+7 give the row addresses (16-byte aligned, 8 b16 each) of 8 x 8 matrix i;
 * r[i] of lane l = matrix i, row l / 4, elements 2 (l % 4) and 2 (l % 4) + 1. ldsm_x4_trans: r[i] of
 * lane l = matrix i, rows 2 (l % 4) and 2 (l % 4) + 1 of column l / 4 (the transposed matrix's pair).
 * So for a row-major A tile, lane address (row lane % 16, col (lane / 16) 8) gives a0..a3 of mma16816;
 * for B[k][n] stored as tile[n][k], (row (lane % 8) + (lane / 16) 8, col ((lane / 8) % 2) 8) gives b0, b1
 * of two n tiles; for B stored as tile[k][n], the trans form with (row (lane % 8) + ((lane / 8) % 2) 8,
 * col (lane / 16) 8) does. */
__device__ __forceinline__ unsigned smem_addr(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

/* (a & b) | c in one LOP3 (the compiler splits it in two when b and c are immediates) */
__device__ __forceinline__ uint32_t lop_and_or(uint32_t a, uint32_t b, uint32_t c)
{
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ void ldsm_x4(uint32_t *r, const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t *r, const void *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

/* cp_async16: 16 bytes global -> shared (zeros when !ok; src must be a valid address either way),
 * asynchronous on sm_80+ (cp.async.cg, L2 only) and a plain copy below. cp_async_commit closes the
 * thread's group of copies; cp_async_wait<N> returns once all but its newest N groups have landed
 * (the shared memory is then this thread's to read; other threads need a __syncthreads after it). */
__device__ __forceinline__ void cp_async16(void *smem, const void *src, bool ok)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(src),
                 "r"(ok ? 16 : 0));
#else
    *reinterpret_cast<uint4 *>(smem) = ok ? *reinterpret_cast<const uint4 *>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}
__device__ __forceinline__ void cp_async_commit()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#endif /* FT_CUDA_MMA_CUH */
