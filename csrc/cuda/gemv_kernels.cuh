/* gemv_kernels.cuh -- the kernels of the fused dequant-GEMV (gemv.cu launches them): qgemv_kernel
 * (the "pairs" kernel, below) and qgemv_fold_kernel (after it: the same work split and reduction,
 * scale and zero applied per group in fp32; choice.cu's gemv_kernel_choose picks).
 *
 * The kernel and its launch geometry only: it depends on mma.cuh's helpers, the act types and
 * backend.h, so that tests/cuda_emu can compile it for the CPU and run it under an emulation of the
 * warp and its mma (tests/cuda_emu/gemv_emu.cpp), as it does for attention_mma.cuh.
 *
 * y[n, o] = sum_i x[n, i] W[i, o] + bias[o], reading the packed weights directly instead of
 * dequantizing W[in, out] into scratch and calling cuBLAS (qmatmul.cu's other paths, for N > 8,
 * 3-bit, bf16 in builds without sm_80 code and FT_CUDA_GEMV=0: qgemm_choose in choice.cu decides).
 *
 * Work split. A block has 4 warps; warp w of block (bx, by) owns the 32 output columns
 * bx*128 + w*32 .. +31 and the packed word rows [by*kc, by*kc + kc) (split-K over blockIdx.y).
 * Each step a warp reads 4 word rows x 32 columns: lane = 4*gi + t loads one 16-byte vector
 * (4 columns, word row r0 + t), so a warp load is 4 x 128 contiguous bytes.
 *
 * Products on the tensor cores (mma.sync m16n8k16 of mma.cuh, fp32 accumulation). The k (input) order
 * inside an mma does not matter as long as A and B agree, so thread (gi, t) supplies, for
 * its own word row, the pairs (value j, value j + per/2) of that word -- which one shift and
 * one mask extract at once -- and the matching x pairs (two byte permutes of one vector
 * load of x[gi, 8 consecutive inputs]). Two m16n8k16 tiles: A's rows are weight columns (tile
 * p: row gi is column 4*gi + 2p, row gi + 8 column 4*gi + 2p + 1), B's columns the N <= 8 batch
 * rows (D columns past N are never stored).
 *
 * Dequantization, 2/4 bits: (MAGIC | q) is the act-dtype number MAGIC + q (bf16 128, f16
 * 1024: unit spacing there), minus (MAGIC + z) exactly, times the scale (one rounding to the
 * act dtype, as the old path's dequantized W; bf16 rounds the f16 scale to bf16 first).
 * 8 bits and act-order go through fp32: ((float)q - z) * s rounded once.
 *
 * Reduction: each warp stores its fp32 partial [N, 32] into scratch [splits, N, out]; the
 * last block of a column tile to finish (an arrival counter per tile, reset by that block)
 * sums the splits in order, adds the bias and writes y: deterministic, one launch.
 */
#ifndef FT_CUDA_GEMV_KERNELS_CUH
#define FT_CUDA_GEMV_KERNELS_CUH

#include <stdint.h>

#include "../backend.h"
#include "mma.cuh"

namespace {

constexpr int GV_WARPS = 4;
constexpr int GV_COLS = GV_WARPS * 32; /* columns per block */
constexpr int GV_U = 4;                /* steps (of 4 word rows) whose loads are issued together */

template <typename T> struct gv_traits;
template <> struct gv_traits<bf16> {
    static constexpr uint32_t magic = 0x4300u; /* 128.0 */
};
template <> struct gv_traits<f16> {
    static constexpr uint32_t magic = 0x6400u; /* 1024.0 */
};

/* (a - b) * s on pairs of the act dtype */
template <typename T> __device__ __forceinline__ uint32_t sub_mul2(uint32_t a, uint32_t b, uint32_t s);
template <> __device__ __forceinline__ uint32_t sub_mul2<bf16>(uint32_t a, uint32_t b, uint32_t s)
{
    __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162 *>(&a), *reinterpret_cast<__nv_bfloat162 *>(&b)),
                               *reinterpret_cast<__nv_bfloat162 *>(&s));
    return *reinterpret_cast<uint32_t *>(&r);
}
template <> __device__ __forceinline__ uint32_t sub_mul2<f16>(uint32_t a, uint32_t b, uint32_t s)
{
    __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b)),
                        *reinterpret_cast<__half2 *>(&s));
    return *reinterpret_cast<uint32_t *>(&r);
}

/* f16 scale bits -> the act dtype's bits, in both halves */
template <typename T> __device__ __forceinline__ uint32_t scale2(uint32_t h16);
template <> __device__ __forceinline__ uint32_t scale2<f16>(uint32_t h16) { return h16 | (h16 << 16); }
template <> __device__ __forceinline__ uint32_t scale2<bf16>(uint32_t h16)
{
    __half h = __ushort_as_half((unsigned short)h16);
    const uint32_t b = __bfloat16_as_ushort(__float2bfloat16_rn(__half2float(h)));
    return b | (b << 16);
}

/* x[gi, k0 .. k0 + 32/BITS) as 32-bit words (pairs of act values) */
template <int BITS> struct xvec;
template <> struct xvec<2> {
    __device__ static void load(uint32_t *w, const void *p)
    {
        const uint4 a = __ldg((const uint4 *)p), b = __ldg((const uint4 *)p + 1);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    }
};
template <> struct xvec<4> {
    __device__ static void load(uint32_t *w, const void *p)
    {
        const uint4 a = __ldg((const uint4 *)p);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    }
};
template <> struct xvec<8> {
    __device__ static void load(uint32_t *w, const void *p)
    {
        const uint2 a = __ldg((const uint2 *)p);
        w[0] = a.x; w[1] = a.y;
    }
};

/* A thread's accumulators (two m16n8k16 D tiles: tile p's rows gi, gi + 8 are columns col0 + 2p,
 * col0 + 2p + 1; its columns 2t, 2t + 1 are batch rows) into split blockIdx.y's fp32 partials
 * [splits, N, out], the layout gv_reduce_splits sums: columns col0 .. col0 + 3 of rows 2t, 2t + 1. */
__device__ __forceinline__ void gv_store_partials(float *__restrict__ part, const float (&acc)[2][4], int N, int out,
                                                  int t, int col0)
{
    float *p = part + ((size_t)blockIdx.y * N + 2 * t) * out + col0;
    if (2 * t < N) __stcg((float4 *)p, make_float4(acc[0][0], acc[0][2], acc[1][0], acc[1][2]));
    if (2 * t + 1 < N) __stcg((float4 *)(p + out), make_float4(acc[0][1], acc[0][3], acc[1][1], acc[1][3]));
}

__device__ __forceinline__ float gv_gelu(float v) { return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); }

/* four act values at p (8-byte aligned) as floats */
template <typename T> __device__ __forceinline__ float4 gv_load4(const void *p)
{
    const uint2 v = *(const uint2 *)p;
    const float2 lo = unpack2<T>(v.x), hi = unpack2<T>(v.y);
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}

/* After a block's warps have stored their partials [N, 32 columns] of split blockIdx.y: the last
 * block of this column tile to arrive sums the splits in order, adds the bias, applies
 * qlinear_fwd_epi's epilogue (backend.h's ft_epilogue, in its order: the LoRA from lora_xa, already
 * computed, and lora_B; GELU; add1 + add2, 8-byte aligned) and writes y (the same order whatever the
 * timing: deterministic), then resets the tile's arrival counter. */
template <typename T>
__device__ __forceinline__ void gv_reduce_splits(T *__restrict__ y, const float *__restrict__ bias,
                                                 const float *__restrict__ part, int *__restrict__ cnt, int N, int out,
                                                 const ft_epilogue &epi)
{
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) s_last = atomicAdd(cnt + blockIdx.x, 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const int splits = gridDim.y;
    for (int it = threadIdx.x; it < N * (GV_COLS / 4); it += blockDim.x) {
        const int n = it / (GV_COLS / 4);
        const int col = blockIdx.x * GV_COLS + 4 * (it % (GV_COLS / 4));
        if (col >= out) continue;
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        const float *p = part + (size_t)n * out + col;
        const size_t stride = (size_t)N * out;
        for (int sp = 0; sp < splits; sp++) {
            const float4 v = __ldcg((const float4 *)(p + sp * stride));
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        if (bias) {
            s.x += bias[col]; s.y += bias[col + 1]; s.z += bias[col + 2]; s.w += bias[col + 3];
        }
        if (epi.lora_A) { /* columns col .. col + 3: B's rows, r floats each, one after the other */
            const int r = epi.lora_r;
            const float *xa = epi.lora_xa + (size_t)n * r, *B = epi.lora_B + (size_t)col * r;
            float4 t = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            for (int k = 0; k < r; k++) {
                const float a = xa[k];
                t.x = fmaf(a, B[k], t.x);
                t.y = fmaf(a, B[r + k], t.y);
                t.z = fmaf(a, B[2 * r + k], t.z);
                t.w = fmaf(a, B[3 * r + k], t.w);
            }
            s.x = fmaf(epi.lora_scale, t.x, s.x); s.y = fmaf(epi.lora_scale, t.y, s.y);
            s.z = fmaf(epi.lora_scale, t.z, s.z); s.w = fmaf(epi.lora_scale, t.w, s.w);
        }
        if (epi.gelu) {
            s.x = gv_gelu(s.x); s.y = gv_gelu(s.y); s.z = gv_gelu(s.z); s.w = gv_gelu(s.w);
        }
        if (epi.add1) { /* add1 + add2 + s, the order of the separate add op */
            float4 a = gv_load4<T>((const T *)epi.add1 + (size_t)n * out + col);
            if (epi.add2) {
                const float4 b = gv_load4<T>((const T *)epi.add2 + (size_t)n * out + col);
                a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
            }
            s.x = a.x + s.x; s.y = a.y + s.y; s.z = a.z + s.z; s.w = a.w + s.w;
        }
        uint2 o;
        o.x = pack2<T>(s.x, s.y);
        o.y = pack2<T>(s.z, s.w);
        *(uint2 *)(y + (size_t)n * out + col) = o;
    }
    if (threadIdx.x == 0) cnt[blockIdx.x] = 0; /* every split has arrived: ready for the next call */
}

/* the x pairs (x_j, x_{j+P2}) of one word row, j < P2 (the mma's B operand), from its 2 P2 values
 * as 32-bit words xw (x_0 x_1 | x_2 x_3 | ...) */
template <int P2> __device__ __forceinline__ void gv_x_pairs(uint32_t *xp, const uint32_t *xw)
{
#pragma unroll
    for (int j = 0; j < P2; j++) xp[j] = __byte_perm(xw[j >> 1], xw[(j >> 1) + P2 / 2], (j & 1) ? 0x7632 : 0x5410);
}

/* ACT = false: the rows of one packed word share a group: g = r >> gshift, or g_idx[r * PER]
 * when gshift < 0. ACT = true: every row looks up its own group (act-order checkpoints). */
template <typename T, int BITS, bool ACT>
__global__ void __launch_bounds__(GV_WARPS * 32)
qgemv_kernel(T *__restrict__ y, const T *__restrict__ x, const int32_t *__restrict__ qw,
             const int32_t *__restrict__ qz, const f16 *__restrict__ sc, const int32_t *__restrict__ gidx,
             const float *__restrict__ bias, float *__restrict__ part, int *__restrict__ cnt, int N, int in,
             int out, int zoff, int gshift, int kc, ft_epilogue epi)
{
    constexpr int PER = 32 / BITS; /* values per word */
    constexpr int P2 = PER / 2;    /* value pairs (j, j + P2) per word */
    constexpr int KS = P2 / 2;     /* mma k-steps per word */
    constexpr int XW = P2;         /* 32-bit words of x per word row */
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    constexpr uint32_t MASK2 = MASK * 0x00010001u;
    constexpr uint32_t MAGIC = gv_traits<T>::magic;
    constexpr uint32_t MAGIC2 = MAGIC * 0x00010001u;
    constexpr bool F32PATH = ACT || BITS == 8;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gi = lane >> 2, t = lane & 3;
    const int base = blockIdx.x * GV_COLS + warp * 32; /* the warp's first column */
    const int col0 = base + 4 * gi;                    /* this thread's 4 B columns */
    const bool colok = col0 < out;                     /* out % 4 == 0: all 4 or none */
    const bool rowok = gi < N;
    const int KW = in / PER;
    const int r_begin = blockIdx.y * kc;
    const int r_end = min(KW, r_begin + kc);
    const int zrow = out / PER; /* zero words per group */
    const int zsh = (col0 % PER) * BITS;
    const T *xrow = x + (size_t)gi * in;

    /* two m16n8k16 tiles: tile p's A row gi is column col0 + 2p, row gi + 8 is col0 + 2p + 1;
     * B column gi is batch row gi; D[m][n]: thread holds D[gi][2t], D[gi][2t+1], D[gi+8][2t], D[gi+8][2t+1] */
    float acc[2][4];
#pragma unroll
    for (int p = 0; p < 2; p++) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.0f;

    if (base < out) { /* warp-uniform */
        int gprev = -1;
        uint32_t ss[4] = {0u, 0u, 0u, 0u}, zz[4] = {0u, 0u, 0u, 0u}; /* per column: scale and MAGIC + z pairs */
        for (int r0 = r_begin; r0 < r_end; r0 += 4 * GV_U) {
            int4 wv[GV_U];
            uint32_t xw[GV_U][XW];
            uint2 sv[GV_U];
            uint32_t zv[GV_U];
            int gg[GV_U];
#pragma unroll
            for (int u = 0; u < GV_U; u++) {
                const int r = r0 + 4 * u + t;
                const bool ok = r < r_end;
                wv[u] = make_int4(0, 0, 0, 0);
                if (ok && colok) wv[u] = __ldcs((const int4 *)(qw + (size_t)r * out + col0));
#pragma unroll
                for (int k = 0; k < XW; k++) xw[u][k] = 0u;
                if (ok && rowok) xvec<BITS>::load(xw[u], xrow + (size_t)r * PER);
                sv[u] = make_uint2(0u, 0u);
                zv[u] = 0u;
                gg[u] = 0;
                if (!ACT && colok) {
                    const int rg = ok ? r : r_end - 1;
                    const int g = gshift >= 0 ? (rg >> gshift) : __ldg(gidx + (size_t)rg * PER);
                    gg[u] = g;
                    sv[u] = __ldg((const uint2 *)(sc + (size_t)g * out + col0));
                    zv[u] = (uint32_t)__ldg(qz + (size_t)g * zrow + col0 / PER);
                }
            }
#pragma unroll
            for (int u = 0; u < GV_U; u++) {
                uint32_t xp[P2]; /* the B operand */
                gv_x_pairs<P2>(xp, xw[u]);
                const uint32_t wc[4] = {(uint32_t)wv[u].x, (uint32_t)wv[u].y, (uint32_t)wv[u].z, (uint32_t)wv[u].w};
                /* W pairs (W_j, W_{j+P2}) of column col0 + c: the A operand */
                uint32_t ap[4][P2];
                if (!F32PATH) {
                    if (gg[u] != gprev) { /* a new group: convert its scales and zeros once */
                        gprev = gg[u];
#pragma unroll
                        for (int c = 0; c < 4; c++) {
                            const uint32_t h16 = c < 2 ? (sv[u].x >> (16 * c)) & 0xFFFFu : (sv[u].y >> (16 * (c - 2))) & 0xFFFFu;
                            ss[c] = scale2<T>(h16);
                            const uint32_t z = ((zv[u] >> (zsh + c * BITS)) & MASK) + (uint32_t)zoff;
                            zz[c] = (MAGIC + z) * 0x00010001u;
                        }
                    }
#pragma unroll
                    for (int c = 0; c < 4; c++)
#pragma unroll
                        for (int j = 0; j < P2; j++)
                            ap[c][j] = sub_mul2<T>(lop_and_or(wc[c] >> (BITS * j), MASK2, MAGIC2), zz[c], ss[c]);
                } else {
                    /* per-value scale and zero in fp32: 8 bits, or act-order (group per row) */
                    const int r = r0 + 4 * u + t;
                    const int rg = r < r_end ? r : r_end - 1;
#pragma unroll
                    for (int j = 0; j < P2; j++) {
                        float s[2][4], zf[2][4];
#pragma unroll
                        for (int e = 0; e < 2; e++) {
                            uint2 s4 = sv[u];
                            uint32_t zw = zv[u];
                            if (ACT && colok) {
                                const int g = __ldg(gidx + (size_t)rg * PER + j + e * P2);
                                s4 = __ldg((const uint2 *)(sc + (size_t)g * out + col0));
                                zw = (uint32_t)__ldg(qz + (size_t)g * zrow + col0 / PER);
                            }
#pragma unroll
                            for (int c = 0; c < 4; c++) {
                                const uint32_t h16 = c < 2 ? (s4.x >> (16 * c)) & 0xFFFFu : (s4.y >> (16 * (c - 2))) & 0xFFFFu;
                                s[e][c] = __half2float(__ushort_as_half((unsigned short)h16));
                                /* 2^23 + z: exact */
                                zf[e][c] = 8388608.0f + (float)(((zw >> (zsh + c * BITS)) & MASK) + (uint32_t)zoff);
                            }
                        }
#pragma unroll
                        for (int c = 0; c < 4; c++) {
                            const uint32_t qa = (wc[c] >> (BITS * j)) & MASK;
                            const uint32_t qb = (wc[c] >> (BITS * (j + P2))) & MASK;
                            /* (2^23 + q) - (2^23 + z) = q - z exactly, times the scale: one rounding */
                            const float va = (__uint_as_float(0x4B000000u | qa) - zf[0][c]) * s[0][c];
                            const float vb = (__uint_as_float(0x4B000000u | qb) - zf[1][c]) * s[1][c];
                            ap[c][j] = pack2<T>(va, vb);
                        }
                    }
                }
#pragma unroll
                for (int p = 0; p < 2; p++)
#pragma unroll
                    for (int h = 0; h < KS; h++)
                        mma16816<T>(acc[p], ap[2 * p][2 * h], ap[2 * p + 1][2 * h], ap[2 * p][2 * h + 1],
                                    ap[2 * p + 1][2 * h + 1], xp[2 * h], xp[2 * h + 1]);
            }
        }
        if (colok) gv_store_partials(part, acc, N, out, t, col0);
    }

    gv_reduce_splits<T>(y, bias, part, cnt, N, out, epi);
}


/* ---- the fold kernel: scale and zero applied per group in fp32 (gv_fold_ok says where) ----
 *
 * For a column c and a group g of its weights, sum_i x_i (q_i - z) s = s (sum_i x_i A_i - (A0 + z) sum_i x_i)
 * where A_i = A0 + q_i is the mma's A operand as the extraction leaves it: the (MAGIC | q) pair
 * itself in bf16 (A0 = 128), or q after one exact subtraction of MAGIC in f16 (A0 = 0: f16's MAGIC
 * is 1024, and products of x with 1024 + q would put the tensor cores' fp32 sums far above the
 * result they cancel to). sum_i x_i comes from one more mma per k-step whose A is all ones (its 16
 * rows are equal: D[., 2t] and D[., 2t + 1] are the sums of batch rows 2t and 2t + 1). Both sums
 * are fp32; the group's scale and zero are applied once, in fp32, when the group ends, and at
 * least every 16 word rows (which bounds the A0 sum x cancellation in a single-group layer).
 * Against qgemv_kernel: no half2 subtract and multiply per weight pair in bf16 (32 of ~150
 * instructions a step there), the weights never rounded to the act dtype, scales and zeros
 * loaded once per 16 word rows instead of every step, no bounds tests outside a split's last
 * partial iteration. Columns past `out` read column out - 4 and rows of B past N read row N - 1:
 * what they produce lands only in D rows or columns that are never stored.
 */
template <typename T> struct gv_fold;
template <> struct gv_fold<bf16> {
    static constexpr bool sub_magic = false;
    static constexpr float a0 = 128.0f;
    static constexpr uint32_t one2 = 0x3F803F80u; /* (1.0, 1.0) */
};
template <> struct gv_fold<f16> {
    static constexpr bool sub_magic = true;
    static constexpr float a0 = 0.0f;
    static constexpr uint32_t one2 = 0x3C003C00u;
};

/* a - b on f16 pairs (the f16 fold's exact MAGIC + q - MAGIC) */
__device__ __forceinline__ uint32_t sub2_f16(uint32_t a, uint32_t b)
{
    __half2 r = __hsub2(*reinterpret_cast<__half2 *>(&a), *reinterpret_cast<__half2 *>(&b));
    return *reinterpret_cast<uint32_t *>(&r);
}

/* The fold kernel serves 2 and 4 bits without act-order whose groups are found by shift and span
 * at least 8 word rows (64 inputs at 4 bits, 128 at 2): a step's 4 word rows and each half of a
 * 16-row iteration then lie in one group (r0 is a multiple of 16). Its scale and zero offsets are
 * 32-bit: groups x out < 2^32. */
static inline bool gv_fold_ok(int bits, int row_groups, int gshift, int groups, int out)
{
    return (bits == 2 || bits == 4) && row_groups == 0 && gshift >= 3 &&
           (unsigned long long)groups * (unsigned long long)out <= 0xFFFFFFFFull;
}

/* PIPE: the weights, scales and zeros of the next 16 word rows are loaded before the current ones
 * are multiplied (two register stages, x loaded per stage when used), so that a warp always has its
 * next 2 KiB of weights in flight. Both variants are held to 128 registers: 4 blocks (16 warps) a
 * SM, the residency gv_plan's grid assumes. */
template <typename T, int BITS, bool PIPE>
__global__ void __launch_bounds__(GV_WARPS * 32, 4)
qgemv_fold_kernel(T *__restrict__ y, const T *__restrict__ x, const int32_t *__restrict__ qw,
                  const int32_t *__restrict__ qz, const f16 *__restrict__ sc, const float *__restrict__ bias,
                  float *__restrict__ part, int *__restrict__ cnt, int N, int in, int out, int zoff, int gshift, int kc,
                  ft_epilogue epi)
{
    constexpr int PER = 32 / BITS; /* values per word */
    constexpr int P2 = PER / 2;    /* value pairs (j, j + P2) per word */
    constexpr int KS = P2 / 2;     /* mma k-steps per word */
    constexpr int XW = P2;         /* 32-bit words of x per word row */
    constexpr int ROWS = 4 * GV_U; /* word rows of one iteration */
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    constexpr uint32_t MASK2 = MASK * 0x00010001u;
    constexpr uint32_t MAGIC2 = gv_traits<T>::magic * 0x00010001u;
    constexpr uint32_t ONE2 = gv_fold<T>::one2;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gi = lane >> 2, t = lane & 3;
    const int base = blockIdx.x * GV_COLS + warp * 32; /* the warp's first column */
    const int col0 = base + 4 * gi;                    /* this thread's 4 columns */
    const bool colok = col0 < out;                     /* out % 4 == 0: all 4 or none */
    const int colc = colok ? col0 : out - 4;           /* the columns it reads */
    const int KW = in / PER;
    const int r_begin = blockIdx.y * kc;
    const int r_end = min(KW, r_begin + kc);
    const int zrow = out / PER; /* zero words per group */
    const int zsh = (colc % PER) * BITS;
    const int fmask = (1 << min(gshift, 4)) - 1; /* flush when the next row is a multiple of fmask + 1 */
    /* 2^23 + z read as a float, minus this, is A0 + z + zoff: the term sum x is multiplied by */
    const float zbias = 8388608.0f - (float)zoff - gv_fold<T>::a0;

    /* accumulators (D of m16n8k16, tile p: A row gi is column col0 + 2p, row gi + 8 is col0 + 2p + 1;
     * B column gi is batch row gi): acc the scaled sums, gacc the current group's sum x A, xs its sum x */
    float acc[2][4], gacc[2][4], xs[4];
#pragma unroll
    for (int e = 0; e < 4; e++) acc[0][e] = acc[1][e] = gacc[0][e] = gacc[1][e] = xs[e] = 0.0f;

    if (base < out) { /* warp-uniform */
        const size_t wstep = (size_t)4 * out; /* int32 elements between a thread's word rows of two steps */
        /* this thread's word row of the next stage to load, and of the next x to load */
        const int32_t *wp = qw + (size_t)(r_begin + t) * out + colc;
        const T *xp = x + (size_t)min(gi, N - 1) * in + (size_t)(r_begin + t) * PER;
        const f16 *scp = sc + colc;           /* group g's scales: scp[g * out], 32-bit offsets */
        const int32_t *zp = qz + colc / PER; /* and zeros: zp[g * zrow] */

        /* what one iteration reads: the weights of rows r0 .. r0 + 15 (this thread's word row of
         * each step), and the scales and zeros of the groups of rows r0 and r0 + 8 */
        struct stage {
            int4 wv[GV_U];
            uint2 sv[2];
            uint32_t zv[2];
        };
        /* rows past r_end (a split's partial last iteration) read row r_end - 1; their x is 0 */
        auto load_stage = [&](stage &st, int r0) {
            if (r0 + ROWS <= r_end) {
#pragma unroll
                for (int u = 0; u < GV_U; u++) st.wv[u] = __ldcs((const int4 *)(wp + u * wstep));
            } else {
#pragma unroll
                for (int u = 0; u < GV_U; u++) {
                    const bool ok = r0 + 4 * u + t < r_end;
                    st.wv[u] = __ldcs((const int4 *)(wp + (ok ? (ptrdiff_t)u * (ptrdiff_t)wstep
                                                              : (ptrdiff_t)(r_end - 1 - (r0 + t)) * out)));
                }
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const unsigned g = (unsigned)(min(r0 + 8 * h, r_end - 1) >> gshift);
                st.sv[h] = __ldg((const uint2 *)(scp + g * (unsigned)out));
                st.zv[h] = (uint32_t)__ldg(zp + g * (unsigned)zrow);
            }
            wp += GV_U * wstep;
        };
        auto load_x = [&](uint32_t (&xw)[GV_U][XW], int r0) {
            if (r0 + ROWS <= r_end) {
#pragma unroll
                for (int u = 0; u < GV_U; u++) xvec<BITS>::load(xw[u], xp + 4 * u * PER);
            } else {
#pragma unroll
                for (int u = 0; u < GV_U; u++) {
#pragma unroll
                    for (int k = 0; k < XW; k++) xw[u][k] = 0u;
                    if (r0 + 4 * u + t < r_end) xvec<BITS>::load(xw[u], xp + 4 * u * PER);
                }
            }
            xp += ROWS * PER;
        };
        auto compute = [&](const stage &st, const uint32_t (&xw)[GV_U][XW], int r0) {
#pragma unroll
            for (int u = 0; u < GV_U; u++) {
                uint32_t xq[P2]; /* the B operand */
                gv_x_pairs<P2>(xq, xw[u]);
                const uint32_t wc[4] = {(uint32_t)st.wv[u].x, (uint32_t)st.wv[u].y, (uint32_t)st.wv[u].z,
                                        (uint32_t)st.wv[u].w};
                /* A pairs (A0 + q_j, A0 + q_{j+P2}) of column col0 + c */
                uint32_t ap[4][P2];
#pragma unroll
                for (int c = 0; c < 4; c++)
#pragma unroll
                    for (int j = 0; j < P2; j++) {
                        ap[c][j] = lop_and_or(wc[c] >> (BITS * j), MASK2, MAGIC2);
                        if constexpr (gv_fold<T>::sub_magic) ap[c][j] = sub2_f16(ap[c][j], MAGIC2);
                    }
#pragma unroll
                for (int h = 0; h < KS; h++) {
#pragma unroll
                    for (int p = 0; p < 2; p++)
                        mma16816<T>(gacc[p], ap[2 * p][2 * h], ap[2 * p + 1][2 * h], ap[2 * p][2 * h + 1],
                                    ap[2 * p + 1][2 * h + 1], xq[2 * h], xq[2 * h + 1]);
                    mma16816<T>(xs, ONE2, ONE2, ONE2, ONE2, xq[2 * h], xq[2 * h + 1]);
                }
                const int rn = r0 + 4 * u + 4; /* the next step's first row */
                if ((rn & fmask) == 0 || rn >= r_end) { /* warp-uniform: the group (or 16 rows) ends */
                    const int h = u >= GV_U / 2; /* rows r0 + 4u .. + 3 lie in the group of r0 + 8h */
                    const uint32_t zw = st.zv[h] >> zsh;
                    float s[4], zf[4];
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        const uint32_t h16 =
                            c < 2 ? (st.sv[h].x >> (16 * c)) & 0xFFFFu : (st.sv[h].y >> (16 * (c - 2))) & 0xFFFFu;
                        s[c] = __half2float(__ushort_as_half((unsigned short)h16));
                        zf[c] = __uint_as_float(lop_and_or(zw >> (c * BITS), MASK, 0x4B000000u)) - zbias;
                    }
#pragma unroll
                    for (int p = 0; p < 2; p++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int c = 2 * p + (e >> 1);
                            acc[p][e] = fmaf(s[c], fmaf(-zf[c], xs[e & 1], gacc[p][e]), acc[p][e]);
                            gacc[p][e] = 0.0f;
                        }
#pragma unroll
                    for (int e = 0; e < 4; e++) xs[e] = 0.0f;
                } /* steps past r_end (a partial iteration) add zeros: x is 0 there */
            }
        };

        uint32_t xw[GV_U][XW];
        if (!PIPE) {
            for (int r0 = r_begin; r0 < r_end; r0 += ROWS) {
                stage st;
                load_stage(st, r0);
                load_x(xw, r0);
                compute(st, xw, r0);
            }
        } else { /* two stages, alternating, so that no copy moves one into the other */
            stage s0, s1;
            load_stage(s0, r_begin);
            for (int r0 = r_begin; r0 < r_end; r0 += 2 * ROWS) {
                if (r0 + ROWS < r_end) load_stage(s1, r0 + ROWS);
                load_x(xw, r0);
                compute(s0, xw, r0);
                if (r0 + ROWS >= r_end) break;
                if (r0 + 2 * ROWS < r_end) load_stage(s0, r0 + 2 * ROWS);
                load_x(xw, r0 + ROWS);
                compute(s1, xw, r0 + ROWS);
            }
        }
        if (colok) gv_store_partials(part, acc, N, out, t, col0);
    }
    gv_reduce_splits<T>(y, bias, part, cnt, N, out, epi);
}

/* Split-K of a call: tiles of GV_COLS columns x `splits` ranges of kc word rows (kc a multiple of
 * 4 GV_U). About 4 blocks (16 warps) per SM in one wave; each warp takes >= 16 word rows. Measured
 * on an H200 (bench/decode_profile.py): 5 or 6 blocks per SM, or capping registers for 6 or 8
 * resident blocks, did not help; the kernel is bound by load latency at ~1.6 TB/s (see
 * docs/PERF.md). splits <= 4 * SMs: always within gridDim.y's 65535. */
struct gv_grid {
    int tiles, splits, kc;
};
static inline gv_grid gv_plan(int in, int out, int bits, int sms)
{
    const int per = 32 / bits, KW = in / per;
    gv_grid g;
    g.tiles = (out + GV_COLS - 1) / GV_COLS;
    const int target = 4 * sms;
    int splits = (target + g.tiles - 1) / g.tiles;
    const int max_splits = (KW + 4 * GV_U - 1) / (4 * GV_U);
    if (splits > max_splits) splits = max_splits;
    if (splits < 1) splits = 1;
    int kc = (KW + splits - 1) / splits;
    kc = (kc + 4 * GV_U - 1) / (4 * GV_U) * (4 * GV_U);
    g.kc = kc;
    g.splits = (KW + kc - 1) / kc;
    return g;
}

} // namespace

#endif /* FT_CUDA_GEMV_KERNELS_CUH */
