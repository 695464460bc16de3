/* lora.cu -- the rank-r LoRA products on the GPU (backend.h's lora_fwd / lora_bwd).
 *
 * A, B and their gradients are f32. The products run in fused kernels that read the activations
 * once in their act dtype (no f32 copies of x or dy, no [N, out] f32 temporary): lora_down (N x r
 * results, one block per rows, fixed-order block reduction), lora_up (one pass over the output) and
 * lora_outer (r x C gradients, split over rows with a fixed-order sum). Dropout masks come from
 * rng.h, element index i of the [N, in] input, in forward and backward alike (csrc/cpu's LoRA is
 * the reference); the kernels read the step's dropout base from backend memory (set_dropout_base)
 * and XOR it into their seed, so a recorded step replays with new masks. Split out of qmatmul.cu,
 * which keeps the quantized linears.
 */
#include "../rng.h"
#include "cuda.cuh"

/* ---- LoRA ----
 *
 * Three kernels serve both directions; a rank-r matrix is either [r, X] ("r-major": A, dA) or
 * [X, r] (B, dB), and d() is dropout (keep(seed ^ base, n*X + k) ? v * 1/(1-p) : 0) where asked:
 *   lora_down   u[n, j] = alpha sum_k d(v[n, k]) W(j, k)    forward xa = d(x) A^T; backward dxa = s dy B
 *   lora_up     y[n, c] += alpha sum_j u[n, j] W(c, j)       forward y += s xa B^T;
 *               (DROP: only kept elements, as the CPU)       backward dx += d'(dxa A)
 *   lora_outer  G(j, c) += alpha sum_n u[n, j] d(v[n, c])   backward dB += s dy^T xa, dA += dxa^T d(x)
 * A thread owns V consecutive activations of a row: V = 8 (one 16-byte access) when the row length
 * is a multiple of 8 and the pointer 16-byte aligned (every Falcon shape), else V = 1. Accessed 2
 * bytes at a time with r rank loads per activation, these products moved 0.2-0.4 TB/s on an H200 at
 * 7B shapes (lora_up 196 us for one [4096, 4672] output, a 76 MB pass). The kernels read W r-major
 * (B is copied transposed into scratch first: read column-wise, 8 columns per thread touched 32
 * cache lines per warp load), keep V x LR_J rank entries in registers over several rows, and issue
 * their activation loads before the arithmetic. Sums run in fp32 in a fixed order (no atomics):
 * deterministic. */

constexpr int LR_J = 8;           /* rank entries per pass (more passes when r > 8) */
constexpr int LR_THREADS = 256;   /* lora_down: a block reduces over k */
constexpr int LRV_THREADS = 128;  /* lora_up: a thread per V columns */
constexpr int LO_THREADS = 256;   /* lora_outer: LO_CT column slots x LO_RG row groups */
constexpr int LO_CT = 8;
constexpr int LO_RG = LO_THREADS / LO_CT;

/* bit c: element i + c survives dropout. V = 8: i is a multiple of 8 (rows and row starts are),
 * so the 8 elements are 4 whole pairs of rng.h: 4 hashes, not 8. */
template <int V> __device__ __forceinline__ unsigned keep_bits(uint64_t key, size_t i, float p)
{
    if constexpr (V == 1) {
        return (unsigned)ft_dropout_keep(key, i, p);
    } else {
        static_assert(V % 2 == 0, "whole pairs");
        unsigned bits = 0;
#pragma unroll
        for (int q = 0; q < V / 2; q++) bits |= ft_dropout_keep_pair(key, (i >> 1) + q, p) << (2 * q);
        return bits;
    }
}

/* v[c] = d(v[c]): kept elements times ks, the others 0 */
template <int V> __device__ __forceinline__ void drop_vec(float v[V], uint64_t key, size_t i, float p, float ks)
{
    const unsigned bits = keep_bits<V>(key, i, p);
#pragma unroll
    for (int c = 0; c < V; c++) v[c] = (bits >> c) & 1u ? v[c] * ks : 0.0f;
}

/* w[c][jj] = W[j0 + jj, c0 + c] for V columns (0 past r); W r-major [r, X] */
template <int V>
__device__ __forceinline__ void rank_block(float w[V][LR_J], const float *W, int X, int r, int j0, int c0)
{
    const bool v4 = V == 8 && ((uintptr_t)W & 15u) == 0; /* uniform; X % 8 == 0 when V == 8 */
#pragma unroll
    for (int jj = 0; jj < LR_J; jj++) {
        const int j = j0 + jj;
        if (j < r && v4) {
            const float4 a = __ldg((const float4 *)(W + (size_t)j * X + c0));
            const float4 b = __ldg((const float4 *)(W + (size_t)j * X + c0) + 1);
            const float e[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
            for (int c = 0; c < V; c++) w[c][jj] = e[c];
        } else {
#pragma unroll
            for (int c = 0; c < V; c++) w[c][jj] = j < r ? __ldg(W + (size_t)j * X + c0 + c) : 0.0f;
        }
    }
}

/* Wt[j, c] = W[c, j]: B [C, r] -> r-major [r, C] */
__global__ void rank_transpose(float *__restrict__ Wt, const float *__restrict__ W, int C, int r)
{
    const size_t n = (size_t)r * C;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x)
        Wt[e] = W[(e % C) * r + e / C];
}

/* u[n0 + rr, j0 + jj] = alpha * (the block's sum of acc[rr][jj]): warps first, then the warps in
 * their order (fixed: deterministic) */
template <int ROWS>
__device__ __forceinline__ void rows_rank_sum(float *u, float (*part)[ROWS * LR_J], const float (&acc)[ROWS][LR_J],
                                              int n0, int j0, int N, int r, float alpha)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int jj = 0; jj < LR_J; jj++) {
            const float s = warp_sum(acc[rr][jj]);
            if (lane == 0) part[warp][rr * LR_J + jj] = s;
        }
    __syncthreads();
    if (threadIdx.x < ROWS * LR_J) {
        const int n = n0 + threadIdx.x / LR_J, j = j0 + threadIdx.x % LR_J;
        float s = 0.0f;
        for (int w = 0; w < LR_THREADS / 32; w++) s += part[w][threadIdx.x];
        if (n < N && j < r) u[(size_t)n * r + j] = alpha * s;
    }
    __syncthreads();
}

/* block b: rows b*ROWS .. +ROWS; each thread V consecutive k per step (steps strided over the
 * block), LR_J accumulators per row, then the block's fixed-order reduction. W r-major [r, K]. */
template <typename T, bool DROP, int ROWS, int V>
__global__ void __launch_bounds__(LR_THREADS, 2) lora_down_kernel(float *__restrict__ u, const T *__restrict__ v,
                                                                  const float *__restrict__ W, int N, int K, int r,
                                                                  float alpha, float p, uint64_t seed,
                                                                  const uint64_t *__restrict__ base)
{
    __shared__ float part[LR_THREADS / 32][ROWS * LR_J];
    const int n0 = blockIdx.x * ROWS;
    const float ks = DROP ? 1.0f / (1.0f - p) : 1.0f;
    const uint64_t key = DROP ? seed ^ *base : 0;
    for (int j0 = 0; j0 < r; j0 += LR_J) {
        float acc[ROWS][LR_J];
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
            for (int jj = 0; jj < LR_J; jj++) acc[rr][jj] = 0.0f;
        for (int k0 = threadIdx.x * V; k0 < K; k0 += LR_THREADS * V) {
            typename act_vec<T, V>::type xw[ROWS]; /* in flight with the rank loads */
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++)
                if (n0 + rr < N) xw[rr] = act_load<T, V>(v + (size_t)(n0 + rr) * K + k0);
            float w[V][LR_J];
            rank_block<V>(w, W, K, r, j0, k0);
#pragma unroll
            for (int rr = 0; rr < ROWS; rr++) {
                const int n = n0 + rr;
                if (n >= N) break;
                const size_t i = (size_t)n * K + k0;
                float xv[V];
                act_unpack<T, V>(xw[rr], xv);
                if (DROP) drop_vec<V>(xv, key, i, p, ks);
#pragma unroll
                for (int c = 0; c < V; c++)
#pragma unroll
                    for (int jj = 0; jj < LR_J; jj++) acc[rr][jj] += xv[c] * w[c][jj];
            }
        }
        rows_rank_sum<ROWS>(u, part, acc, n0, j0, N, r, alpha);
    }
}

/* block (column chunk, row group): y[n, c0..c0+V) += alpha sum_j u[n, j] W[j, c], j in order;
 * W r-major [r, C] */
template <typename T, bool DROP, int ROWS, int V>
__global__ void __launch_bounds__(LRV_THREADS, 4) lora_up_kernel(T *__restrict__ y, const float *__restrict__ u,
                                                                 const float *__restrict__ W, int N, int C, int r,
                                                                 float alpha, float p, uint64_t seed,
                                                                 const uint64_t *__restrict__ base)
{
    const int c0 = (blockIdx.x * LRV_THREADS + threadIdx.x) * V, n0 = blockIdx.y * ROWS;
    if (c0 >= C) return;
    const uint64_t key = DROP ? seed ^ *base : 0;
    typename act_vec<T, V>::type yw[ROWS]; /* in flight while the rank products run */
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
        if (n0 + rr < N) yw[rr] = act_load<T, V>(y + (size_t)(n0 + rr) * C + c0);
    float t[ROWS][V];
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++)
#pragma unroll
        for (int c = 0; c < V; c++) t[rr][c] = 0.0f;
    for (int j0 = 0; j0 < r; j0 += LR_J) {
        float w[V][LR_J];
        rank_block<V>(w, W, C, r, j0, c0);
#pragma unroll
        for (int rr = 0; rr < ROWS; rr++) {
            const int n = n0 + rr;
            if (n >= N) break;
#pragma unroll
            for (int jj = 0; jj < LR_J; jj++) {
                if (j0 + jj >= r) break;
                const float uj = __ldg(u + (size_t)n * r + j0 + jj);
#pragma unroll
                for (int c = 0; c < V; c++) t[rr][c] += uj * w[c][jj];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < ROWS; rr++) {
        const int n = n0 + rr;
        if (n >= N) break;
        const size_t i = (size_t)n * C + c0;
        float yv[V];
        act_unpack<T, V>(yw[rr], yv);
        const unsigned bits = DROP ? keep_bits<V>(key, i, p) : ~0u;
#pragma unroll
        for (int c = 0; c < V; c++)
            if ((bits >> c) & 1u) yv[c] += alpha * t[rr][c];
        act_store<T, V>(y + i, yv);
    }
}

/* block (column tile of LO_CT * V columns, split s): G(j, c) summed over the split's rows. Thread
 * t owns the V columns of tile slot t % LO_CT and every LO_RG-th row of the split from t / LO_CT on:
 * its row loads are in flight together, and the loop holds no reduction. The four row groups of a
 * warp that share columns are then summed by shuffles (xor 8, 16), the warps in order through
 * shared memory: a fixed order, deterministic. One split: G += alpha * sum; several:
 * part[s][j][c] = sum (lora_outer_sum adds them in split order). G r-major [r, C] (RMAJ) or [C, r].
 * (The kernel it replaced gave each thread a split's rows one after the other, 8-39 of them at 7B
 * shapes: 16-21 us a call at 256 rows for ~1 us of loads.) */
template <typename T, bool RMAJ, bool DROP, int V>
__global__ void __launch_bounds__(LO_THREADS, 2) lora_outer_kernel(float *__restrict__ G, float *__restrict__ part,
                                                                   const float *__restrict__ u, const T *__restrict__ v,
                                                                   int N, int C, int r, int rows, float alpha, float p,
                                                                   uint64_t seed, const uint64_t *__restrict__ base)
{
    constexpr int TILE = LO_CT * V;
    __shared__ float red[LO_THREADS / 32][LR_J * TILE];
    const int slot = threadIdx.x % LO_CT, rg = threadIdx.x / LO_CT;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = blockIdx.x * TILE + slot * V, s = blockIdx.y;
    const int nb = s * rows, ne = min(N, nb + rows);
    const float ks = DROP ? 1.0f / (1.0f - p) : 1.0f;
    const uint64_t key = DROP ? seed ^ *base : 0;
    static_assert(32 % LO_CT == 0 && LO_THREADS % 32 == 0, "whole row groups per warp");
    for (int j0 = 0; j0 < r; j0 += LR_J) {
        float acc[V][LR_J];
#pragma unroll
        for (int c = 0; c < V; c++)
#pragma unroll
            for (int jj = 0; jj < LR_J; jj++) acc[c][jj] = 0.0f;
        if (c0 < C) { /* C % V == 0: a thread's columns are all in or all out */
#pragma unroll 2
            for (int n = nb + rg; n < ne; n += LO_RG) {
                const size_t i = (size_t)n * C + c0;
                float xv[V];
                act_unpack<T, V>(act_load<T, V>(v + i), xv);
                if (DROP) drop_vec<V>(xv, key, i, p, ks);
#pragma unroll
                for (int jj = 0; jj < LR_J; jj++) {
                    const float uj = j0 + jj < r ? __ldg(u + (size_t)n * r + j0 + jj) : 0.0f;
#pragma unroll
                    for (int c = 0; c < V; c++) acc[c][jj] += uj * xv[c];
                }
            }
        }
#pragma unroll
        for (int c = 0; c < V; c++)
#pragma unroll
            for (int jj = 0; jj < LR_J; jj++) {
                float a = acc[c][jj];
#pragma unroll
                for (int m = LO_CT; m < 32; m <<= 1) a += __shfl_xor_sync(0xffffffffu, a, m);
                if (lane < LO_CT) red[warp][jj * TILE + lane * V + c] = a;
            }
        __syncthreads();
        for (int e = threadIdx.x; e < LR_J * TILE; e += LO_THREADS) {
            const int j = j0 + e / TILE, c = blockIdx.x * TILE + e % TILE;
            if (j >= r || c >= C) continue;
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < LO_THREADS / 32; w++) sum += red[w][e];
            if (gridDim.y == 1) G[RMAJ ? (size_t)j * C + c : (size_t)c * r + j] += alpha * sum;
            else part[((size_t)s * r + j) * C + c] = sum;
        }
        __syncthreads();
    }
}

template <bool RMAJ>
__global__ void lora_outer_sum(float *__restrict__ G, const float *__restrict__ part, int splits, int r, int C,
                               float alpha)
{
    const size_t n = (size_t)r * C;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const int j = (int)(e / C), c = (int)(e % C);
        float s = 0.0f;
        for (int sp = 0; sp < splits; sp++) s += part[(size_t)sp * n + e];
        G[RMAJ ? e : (size_t)c * r + j] += alpha * s;
    }
}

/* the r-major form of W: W itself (RMAJ), else W^T in scratch */
template <bool RMAJ>
static ft_status rank_major(cuda_backend *be, const float *W, int X, int r, const float **Wr, ft_error *err)
{
    if constexpr (RMAJ) {
        *Wr = W;
    } else {
        void *t;
        FT_TRY(cuda_scratch(be, SCR_LORA2, (size_t)r * X * sizeof(float), &t, err));
        rank_transpose<<<grid_for((size_t)r * X, 256), 256, 0, be->stream>>>((float *)t, W, X, r);
        LAUNCH_CHECK("LoRA rank-major copy");
        *Wr = (const float *)t;
    }
    return FT_OK;
}

/* 8 activations per access when the rows allow it */
static int act_width(int row_len, const void *p) { return row_len % 8 == 0 && aligned16(p) ? 8 : 1; }

/* u[N, r] = alpha d(v[N, K]) W^T; W r-major [r, K] (RMAJ) or [K, r] */
template <bool RMAJ>
static ft_status lora_down(cuda_backend *be, float *u, const void *v, const float *W, int N, int K, int r, float alpha,
                           float p, uint64_t seed, ft_error *err)
{
    const float *Wr = NULL;
    FT_TRY(rank_major<RMAJ>(be, W, K, r, &Wr, err));
    /* 4 rows per block once there are blocks enough: W is read from L2 once per block */
    const bool four = N >= 4 * be->sms, drop = p > 0.0f, v8 = act_width(K, v) == 8;
    const unsigned blocks = (unsigned)(four ? (N + 3) / 4 : N);
#define LORA_DOWN(DROP, ROWS, V) \
    lora_down_kernel<T, DROP, ROWS, V><<<blocks, LR_THREADS, 0, be->stream>>>(u, (const T *)v, Wr, N, K, r, alpha, p, seed, \
                                                                         be->dropout_base)
#define LORA_DOWN_V(DROP, ROWS) \
    do {                        \
        if (v8) LORA_DOWN(DROP, ROWS, 8); \
        else LORA_DOWN(DROP, ROWS, 1);    \
    } while (0)
    ACT_DISPATCH(&be->base, T, {
        if (drop && four) LORA_DOWN_V(true, 4);
        else if (drop) LORA_DOWN_V(true, 1);
        else if (four) LORA_DOWN_V(false, 4);
        else LORA_DOWN_V(false, 1);
    });
#undef LORA_DOWN_V
#undef LORA_DOWN
    LAUNCH_CHECK("LoRA rank-r product");
    return FT_OK;
}

/* y[N, C] += alpha u W^T (DROP: kept elements only); W r-major [r, C] (RMAJ) or [C, r] */
template <bool RMAJ>
static ft_status lora_up(cuda_backend *be, void *y, const float *u, const float *W, int N, int C, int r, float alpha,
                         float p, uint64_t seed, ft_error *err)
{
    const float *Wr = NULL;
    FT_TRY(rank_major<RMAJ>(be, W, C, r, &Wr, err));
    const int V = act_width(C, y);
    const bool drop = p > 0.0f;
    /* 4 rows per thread once that still leaves ~8 blocks per SM: rank entries loaded once per 4 rows */
    const unsigned cblocks = (unsigned)((C / V + LRV_THREADS - 1) / LRV_THREADS);
    const bool four = (size_t)cblocks * (size_t)(N / 4) >= (size_t)8 * be->sms;
    const dim3 grid(cblocks, (unsigned)(four ? (N + 3) / 4 : N));
#define LORA_UP(DROP, ROWS, VV) \
    lora_up_kernel<T, DROP, ROWS, VV><<<grid, LRV_THREADS, 0, be->stream>>>((T *)y, u, Wr, N, C, r, alpha, p, seed, \
                                                                        be->dropout_base)
#define LORA_UP_V(DROP, ROWS) \
    do {                      \
        if (V == 8) LORA_UP(DROP, ROWS, 8); \
        else LORA_UP(DROP, ROWS, 1);        \
    } while (0)
    ACT_DISPATCH(&be->base, T, {
        if (drop && four) LORA_UP_V(true, 4);
        else if (drop) LORA_UP_V(true, 1);
        else if (four) LORA_UP_V(false, 4);
        else LORA_UP_V(false, 1);
    });
#undef LORA_UP_V
#undef LORA_UP
    LAUNCH_CHECK("LoRA output product");
    return FT_OK;
}

/* G += alpha u^T d(v): u [N, r], v [N, C], G r-major [r, C] (RMAJ) or [C, r] */
template <bool RMAJ>
static ft_status lora_outer(cuda_backend *be, float *G, const float *u, const void *v, int N, int C, int r, float alpha,
                            float p, uint64_t seed, ft_error *err)
{
    const int V = act_width(C, v);
    /* one wave: as many row splits as the column tiles leave room for at 2 blocks per SM (the
     * kernel's launch bounds), keeping at least 4 rows per thread (LO_RG row groups). Rounding up
     * instead put 284 blocks on the 264 places of an H200 at 7B shapes: a second wave of 20. */
    const int cblocks = (C + LO_CT * V - 1) / (LO_CT * V);
    int splits = 2 * be->sms / cblocks;
    const int max_splits = (N + 4 * LO_RG - 1) / (4 * LO_RG);
    if (splits > max_splits) splits = max_splits;
    if (splits < 1) splits = 1;
    const int rows = (N + splits - 1) / splits;
    splits = (N + rows - 1) / rows;
    void *part = NULL;
    if (splits > 1) FT_TRY(cuda_scratch(be, SCR_LORA1, (size_t)splits * r * C * sizeof(float), &part, err));
    const dim3 grid((unsigned)cblocks, (unsigned)splits);
#define LORA_OUTER(DROP, VV)                                                                                   \
    lora_outer_kernel<T, RMAJ, DROP, VV><<<grid, LO_THREADS, 0, be->stream>>>(G, (float *)part, u, (const T *)v, N, C,  \
                                                                               r, rows, alpha, p, seed, be->dropout_base)
    ACT_DISPATCH(&be->base, T, {
        if (p > 0.0f && V == 8) LORA_OUTER(true, 8);
        else if (p > 0.0f) LORA_OUTER(true, 1);
        else if (V == 8) LORA_OUTER(false, 8);
        else LORA_OUTER(false, 1);
    });
#undef LORA_OUTER
    LAUNCH_CHECK("LoRA weight gradient");
    if (splits > 1) {
        lora_outer_sum<RMAJ><<<grid_for((size_t)r * C, 256), 256, 0, be->stream>>>(G, (const float *)part, splits, r, C,
                                                                                 alpha);
        LAUNCH_CHECK("LoRA weight gradient (split sum)");
    }
    return FT_OK;
}

__global__ void set_u64_kernel(uint64_t *dst, uint64_t value) { *dst = value; }

/* A one-thread kernel rather than a copy from the host: the value travels as a launch argument,
 * so the op can also be recorded in a graph (a captured copy would keep the host address). */
extern "C" ft_status cuda_set_dropout_base(ft_backend *base, uint64_t value, ft_error *err)
{
    cuda_backend *be = CB(base);
    set_u64_kernel<<<1, 1, 0, be->stream>>>(be->dropout_base, value);
    LAUNCH_CHECK("setting the dropout base");
    return FT_OK;
}

/* xa[N,r] = x A^T without dropout: the half of lora_fwd that qlinear_fwd_epi runs before a GEMV whose
 * reduction adds the other (gemv_kernels.cuh) */
ft_status cuda_lora_down(cuda_backend *be, float *xa, const void *x, const float *A, int N, int in, int r,
                         ft_error *err)
{
    return lora_down<true>(be, xa, x, A, N, in, r, 1.0f, 0.0f, 0, err);
}

extern "C" ft_status cuda_lora_fwd(ft_backend *base, void *y, float *xa, const void *x, const float *A,
                                   const float *B, int N, int in, int out, int r, float scale, float p, uint64_t seed,
                                   ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    PROF_T0(be);
    /* xa[N,r] = dropout(x) A^T  (A [r, in]) */
    FT_TRY(lora_down<true>(be, xa, x, A, N, in, r, 1.0f, p, seed, err));
    /* y[N,out] += scale xa B^T  (B [out, r]) */
    FT_TRY(lora_up<false>(be, y, xa, B, N, out, r, scale, 0.0f, 0, err));
    PROF_MARK(be, PR_LORA_F);
    return FT_OK;
}

extern "C" ft_status cuda_lora_bwd(ft_backend *base, void *dx, float *dA, float *dB, const void *dy, const void *x,
                                   const float *xa, const float *A, const float *B, int N, int in, int out, int r,
                                   float scale, float p, uint64_t seed, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (N <= 0) return FT_OK;
    PROF_T0(be);
    void *dxa;
    FT_TRY(cuda_scratch(be, SCR_LORA0, (size_t)N * r * sizeof(float), &dxa, err));
    /* dB[out,r] += scale dy^T xa */
    FT_TRY(lora_outer<false>(be, dB, xa, dy, N, out, r, scale, 0.0f, 0, err));
    /* dxa[N,r] = scale dy B */
    FT_TRY(lora_down<false>(be, (float *)dxa, dy, B, N, out, r, scale, 0.0f, 0, err));
    /* dA[r,in] += dxa^T dropout(x) */
    FT_TRY(lora_outer<true>(be, dA, (const float *)dxa, x, N, in, r, 1.0f, p, seed, err));
    /* dx[N,in] += dropout'(dxa A): kept elements, times 1/(1-p) */
    if (dx) FT_TRY(lora_up<true>(be, dx, (const float *)dxa, A, N, in, r, p > 0.0f ? 1.0f / (1.0f - p) : 1.0f, p, seed, err));
    PROF_MARK(be, PR_LORA_B);
    return FT_OK;
}
