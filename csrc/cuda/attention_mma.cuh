/* attention_mma.cuh -- flash attention on the tensor cores (mma.sync m16n8k16), head dim 64.
 *
 * The kernels only (attention_mma.cu launches them). They depend on nothing but mma.cuh's helpers,
 * the act types and backend.h, so that tests/cuda_emu can compile this file for the CPU and run it
 * under an emulation of the warp, its ldmatrix and its mma: their indexing and masking are tested
 * without a GPU.
 *
 * Same contract as attention_gemm.cu and csrc/cpu/attention.c:
 *   s_tj = (q_t . k_j + slope_h kpos_j) scale, visible when j <= Tk - T + t and
 *   ft_key_visible(kmask_j, kmask_{Tk-T+t}); out_t = sum_j p_tj v_j, p = softmax over the visible keys;
 *   lse_t saved (-inf and out 0 for a query that sees no key).
 * Rows as in attention_gemm.cu: an item is (batch row b, kv head g), i = b KV + g; its queries are the
 * [gs T, hd] matrix of q [B,H,T,hd] at row i gs T (row r = hh T + t, head h = g gs + hh), and lse, dq
 * use the same rows. K and V of the item are [cap, hd] at k + i cap hd.
 *
 * Forward (am_fwd_kernel), a block per (64 item rows, item): each of 4 warps owns 16 rows and keeps
 * their Q fragments, running max m, per-lane partial sum l and O[16, 64] in registers; key tiles of 64
 * go through shared memory row-major, the next tile's copies in flight while one is multiplied on
 * sm_80+ (am_pipeline) (B fragments by ldmatrix, .trans where the tile's rows are the
 * product's k), S = Q K^T and O += P V are mma tiles; P goes from the S accumulators straight into
 * the A fragments of the second product (the accumulator layout of m16n8 is the A layout of m16k16
 * over two n tiles).
 * Backward, with D_t = dout_t . out_t (am_dot_kernel) and G = P (dP - D) (dS = scale G; G unscaled
 * keeps fp16 further from its subnormals):
 *   am_dq_kernel   a block per 64 item rows, over key tiles:  S, P, dP = dO V^T, G; dQ += G K
 *   am_dkv_kernel  a block per (64 keys, item, split of the item's query heads), over query tiles of
 *                  each head of the split: S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, G^T,
 *                  dK += G^T Q; f32 partials per split, summed in a fixed order (am_split_sum_kernel)
 * No atomics: deterministic. Sums are fp32; P and G are rounded to the act type before their
 * product, as the cuBLAS path rounds them into its act scratch.
 */
#ifndef FT_CUDA_ATTENTION_MMA_CUH
#define FT_CUDA_ATTENTION_MMA_CUH

#include <math.h>
#include <stdint.h>

#include "../backend.h"
#include "mma.cuh"

constexpr int AM_HD = 64;                /* the head dim these kernels handle */
constexpr int AM_BM = 64;                /* query rows per block: 4 warps x 16 */
constexpr int AM_BN = 64;                /* keys per tile (and per dK/dV block) */
constexpr int AM_THREADS = 128;
constexpr int AM_KS = AM_HD / 16;        /* k steps of a product over the head dim */
constexpr int AM_NT = AM_BN / 8;         /* n tiles of 8 keys (or 8 dims) */
/* shared tile row stride in 2-byte elements: rows of 144 bytes keep the 16-byte rows that an
 * ldmatrix phase reads from 8 tile rows on 32 different banks (and the stores 16-byte aligned) */
constexpr int AM_LD = 64 + 8;
/* one tile shape serves every product: k over 64 keys or queries, n over 8 tiles of keys or dims */
static_assert(AM_HD == 64 && AM_BN == 64 && AM_BM == 64, "the fragment loops assume 64 x 64 tiles");
/* tiles in shared memory: on sm_80+ two stages, the next tile's cp.async copies in flight while the
 * current one is multiplied; below sm_80 (no cp.async; a T4 has 64 KB of shared memory per SM) one
 * stage, loaded synchronously. tests/cuda_emu builds both (-DAM_STAGES=1, 2). */
#ifndef AM_STAGES
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define AM_STAGES 1
#else
#define AM_STAGES 2
#endif
#endif
static_assert(AM_STAGES == 1 || AM_STAGES == 2, "one or two tile stages");

struct am_p {
    int H, KV, gs, T, Tk, cap;
    int rows_item; /* gs * T */
    float scale;
    int kstride;                 /* row stride of kmask / kpos */
    const int32_t *kmask, *kpos; /* [B, kstride] */
    const float *slopes;         /* [H] or NULL */
    int hps;                     /* backward dK/dV: query heads per split */
};

/* the kernels' view of an attention call */
static inline am_p am_params(const ft_attn_args *a)
{
    am_p p;
    p.H = a->H;
    p.KV = a->KV;
    p.gs = a->H / a->KV;
    p.T = a->T;
    p.Tk = a->Tk;
    p.cap = a->cap;
    p.rows_item = p.gs * a->T;
    p.scale = a->scale;
    p.kstride = a->kstride;
    p.kmask = a->kmask;
    p.kpos = a->kpos;
    p.slopes = a->slopes;
    p.hps = p.gs; /* am_plan sets it for a backward */
    return p;
}

/* The grids of a call with `items` = B KV items: rows (forward, dq, dot: blocks of 64 item rows x
 * items) and keys (dK/dV: blocks of 64 keys x items x head splits). A kv head of Falcon-7B has 71
 * query heads and a 7B step at mb 1 only 4 blocks of 64 keys, so the heads are split until ~4 blocks
 * per multiprocessor run, each split writing f32 partials (splits x items x T x 64 floats, twice).
 * Sets p->hps. */
struct am_grids {
    dim3 rows, keys;
    int splits;
};
static inline am_grids am_plan(am_p *p, int items, int sms)
{
    const int key_blocks = (p->T + AM_BN - 1) / AM_BN;
    const long want = 4L * (sms > 0 ? sms : 1), have = (long)items * key_blocks;
    long splits = (want + have - 1) / have;
    if (splits > p->gs) splits = p->gs;
    if (splits < 1) splits = 1;
    p->hps = (int)((p->gs + splits - 1) / splits);
    am_grids g;
    g.splits = (p->gs + p->hps - 1) / p->hps;
    g.rows = dim3((unsigned)((p->rows_item + AM_BM - 1) / AM_BM), (unsigned)items);
    g.keys = dim3((unsigned)key_blocks, (unsigned)items, (unsigned)g.splits);
    return g;
}

/* The backward's f32 scratch, in floats: D [nq] (am_dot_kernel), then the dK and dV partials
 * [splits][nkv] each (am_dkv_kernel, summed by am_split_sum_kernel). am_dkv_kernel stores float2
 * pairs, so the partials start 16-byte aligned: D is padded to 4 floats (nkv is a multiple of 64).
 * An odd B H T (the tutorial's 7B batch: 1 x 71 x 45) once put them 4 bytes off. */
struct am_scratch {
    size_t dk, dv, floats; /* offsets of the partials; the total (D at 0) */
};
static inline am_scratch am_bwd_scratch(size_t nq, int splits, size_t nkv)
{
    am_scratch s;
    s.dk = (nq + 3) / 4 * 4;
    s.dv = s.dk + (size_t)splits * nkv;
    s.floats = s.dv + (size_t)splits * nkv;
    return s;
}

/* One query row of a block, seen by the lanes that hold it. */
struct am_row {
    int ok;       /* a real row of the item */
    int t, h;     /* query index, head */
    int n;        /* causally visible keys 0 .. n-1 */
    int32_t seg;  /* the query's segment id */
    float slope;  /* alibi slope of the head, 0 without alibi */
    size_t qrow;  /* row in q / dq / lse: i gs T + r */
    size_t orow;  /* element offset in out / dout [B, T, H hd] */
};

/* the first of the two rows (r, r + 8) of a 64-row block that this lane holds in m16n8 tiles: warp w
 * owns rows 16 w .. 16 w + 15, lane l rows l / 4 and l / 4 + 8 of them */
__device__ __forceinline__ int am_lane_row() { return (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 2); }

__device__ __forceinline__ am_row am_row_of(const am_p &p, int item, int r)
{
    am_row o;
    o.ok = r < p.rows_item;
    if (!o.ok) r = 0;
    const int b = item / p.KV, g = item % p.KV, hh = r / p.T;
    o.t = r % p.T;
    o.h = g * p.gs + hh;
    const int qp = p.Tk - p.T + o.t;
    o.n = qp + 1;
    o.seg = p.kmask[(size_t)b * p.kstride + qp];
    o.slope = p.slopes ? p.slopes[o.h] : 0.0f;
    o.qrow = (size_t)item * p.rows_item + r;
    o.orow = (((size_t)b * p.T + o.t) * p.H + o.h) * AM_HD;
    return o;
}

/* ---- tiles in shared memory (2-byte elements, row stride AM_LD) ---- */

/* starts rows[n][0..64) = row n of src (rows `stride` elements apart) for n < 64, zeros where
 * n >= valid (src itself must be a row: the zero-fill copies name it) */
__device__ __forceinline__ void am_load_rows(uint16_t *rows, const uint16_t *src, size_t stride, int valid)
{
    for (int c = threadIdx.x; c < 64 * (AM_HD / 8); c += AM_THREADS) {
        const int n = c / (AM_HD / 8), d8 = (c % (AM_HD / 8)) * 8;
        const bool ok = n < valid;
        cp_async16(rows + n * AM_LD + d8, ok ? src + (size_t)n * stride + d8 : src, ok);
    }
}

/* Tiles 0 .. tiles-1 through AM_STAGES shared-memory stages: issue(u, st) starts tile u's copies
 * into stage st (cp.async, plus plain stores of small per-row values), use(u, st) consumes it. With
 * two stages tile u + 1 is in flight while tile u is used; the barrier after use frees its stage
 * for the tile issued in the next round. */
template <typename Issue, typename Use>
__device__ __forceinline__ void am_pipeline(int tiles, Issue &&issue, Use &&use)
{
#pragma unroll
    for (int u = 0; u < AM_STAGES - 1; u++) {
        if (u < tiles) issue(u, u);
        cp_async_commit();
    }
    for (int u = 0; u < tiles; u++) {
        const int next = u + AM_STAGES - 1;
        if (next < tiles) issue(next, next % AM_STAGES);
        cp_async_commit();
        cp_async_wait<AM_STAGES - 1>(); /* tile u has landed (this thread's copies) */
        __syncthreads();                /* ... and every thread's */
        use(u, u % AM_STAGES);
        __syncthreads();
    }
}

__device__ __forceinline__ void am_zero(float (&x)[AM_NT][4])
{
#pragma unroll
    for (int nt = 0; nt < AM_NT; nt++) x[nt][0] = x[nt][1] = x[nt][2] = x[nt][3] = 0.0f;
}

/* acc[nt] = A B over 8 n tiles: A (16 x 64) given as fragments a[ks], B[k][n] = tile[n][k] (a tile
 * whose rows are the n index: K rows for S = Q K^T) */
template <typename T>
__device__ __forceinline__ void am_mma_rows(float (&acc)[AM_NT][4], const uint32_t (&a)[AM_KS][4],
                                            const uint16_t *tile)
{
    const int lane = threadIdx.x & 31;
    am_zero(acc);
    const uint16_t *at = tile + ((lane & 7) + (lane >> 4) * 8) * AM_LD + ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int ks = 0; ks < AM_KS; ks++)
#pragma unroll
        for (int np = 0; np < AM_NT / 2; np++) {
            uint32_t b[4]; /* b0, b1 of n tiles 2 np and 2 np + 1 */
            ldsm_x4(b, at + np * 16 * AM_LD + ks * 16);
            mma16816<T>(acc[2 * np], a[ks][0], a[ks][1], a[ks][2], a[ks][3], b[0], b[1]);
            mma16816<T>(acc[2 * np + 1], a[ks][0], a[ks][1], a[ks][2], a[ks][3], b[2], b[3]);
        }
}

/* acc[nt] += X B over 8 n tiles: X (16 x 64 over k) given as the f32 values of an m16n8 accumulator
 * set, rounded to T (the accumulator layout of two n tiles is the A layout of one k16 step);
 * B[k][n] = tile[k][n] (a tile whose rows are the k index: V rows for O += P V), read transposed by
 * ldmatrix */
template <typename T>
__device__ __forceinline__ void am_mma_acc(float (&acc)[AM_NT][4], const float (&x)[AM_NT][4], const uint16_t *tile)
{
    const int lane = threadIdx.x & 31;
    const uint16_t *at = tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * AM_LD + (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < AM_BN / 16; ks++) {
        const uint32_t a0 = pack2<T>(x[2 * ks][0], x[2 * ks][1]), a1 = pack2<T>(x[2 * ks][2], x[2 * ks][3]);
        const uint32_t a2 = pack2<T>(x[2 * ks + 1][0], x[2 * ks + 1][1]);
        const uint32_t a3 = pack2<T>(x[2 * ks + 1][2], x[2 * ks + 1][3]);
#pragma unroll
        for (int np = 0; np < AM_NT / 2; np++) {
            uint32_t b[4];
            ldsm_x4_trans(b, at + ks * 16 * AM_LD + np * 16);
            mma16816<T>(acc[2 * np], a0, a1, a2, a3, b[0], b[1]);
            mma16816<T>(acc[2 * np + 1], a0, a1, a2, a3, b[2], b[3]);
        }
    }
}

/* A fragments of 16 rows (this lane's rows lo, hi) of a [*, 64] matrix in global memory */
__device__ __forceinline__ void am_frag_global(uint32_t (&a)[AM_KS][4], const uint16_t *lo, const uint16_t *hi,
                                               int ok_lo, int ok_hi)
{
    const int t2 = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int ks = 0; ks < AM_KS; ks++) {
        const int c = ks * 16 + t2;
        a[ks][0] = ok_lo ? *reinterpret_cast<const uint32_t *>(lo + c) : 0u;
        a[ks][1] = ok_hi ? *reinterpret_cast<const uint32_t *>(hi + c) : 0u;
        a[ks][2] = ok_lo ? *reinterpret_cast<const uint32_t *>(lo + c + 8) : 0u;
        a[ks][3] = ok_hi ? *reinterpret_cast<const uint32_t *>(hi + c + 8) : 0u;
    }
}

/* max / sum over the 4 lanes that hold one row of an m16n8 accumulator */
__device__ __forceinline__ float am_quad_max(float x)
{
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float am_quad_sum(float x)
{
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

/* the lane's pairs of an m16n8 accumulator set (rows lo, hi; 64 columns) times f_lo / f_hi into the
 * rows dst_lo / dst_hi (NULL: not a real row): act pairs, or f32 pairs when T is float */
template <typename T>
__device__ __forceinline__ void am_store(T *dst_lo, T *dst_hi, const float (&x)[AM_NT][4], float f_lo, float f_hi)
{
    const int t2 = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < AM_NT; nt++) {
        T *lo = dst_lo ? dst_lo + nt * 8 + t2 : nullptr, *hi = dst_hi ? dst_hi + nt * 8 + t2 : nullptr;
        if constexpr (sizeof(T) == 4) {
            if (lo) *reinterpret_cast<float2 *>(lo) = make_float2(f_lo * x[nt][0], f_lo * x[nt][1]);
            if (hi) *reinterpret_cast<float2 *>(hi) = make_float2(f_hi * x[nt][2], f_hi * x[nt][3]);
        } else {
            if (lo) *reinterpret_cast<uint32_t *>(lo) = pack2<T>(f_lo * x[nt][0], f_lo * x[nt][1]);
            if (hi) *reinterpret_cast<uint32_t *>(hi) = pack2<T>(f_hi * x[nt][2], f_hi * x[nt][3]);
        }
    }
}

/* key tiles a block of rows r0 .. r0+63 of one item must visit: up to the causal bound of its last
 * row, or all Tk keys when the block spans two heads (its rows' t are then not increasing) */
__device__ __forceinline__ int am_key_tiles(const am_p &p, int r0)
{
    const int last = min(r0 + AM_BM, p.rows_item) - 1;
    const int end = last / p.T != r0 / p.T ? p.Tk : p.Tk - p.T + last % p.T + 1;
    return (end + AM_BN - 1) / AM_BN;
}

/* the key tile's segment ids and alibi positions (0 past Tk) */
__device__ __forceinline__ void am_load_keyinfo(int32_t *seg, float *pos, const am_p &p, int b, int j0)
{
    for (int jj = threadIdx.x; jj < AM_BN; jj += AM_THREADS) {
        const int j = j0 + jj;
        const size_t at = (size_t)b * p.kstride + j;
        seg[jj] = j < p.Tk ? p.kmask[at] : 0;
        pos[jj] = j < p.Tk && p.slopes ? (float)p.kpos[at] : 0.0f;
    }
}

/* starts key tile j0 of an item (K, V rows; their segment ids and alibi positions) into one stage */
__device__ __forceinline__ void am_issue_keys(uint16_t *Ks, uint16_t *Vs, int32_t *seg, float *pos,
                                              const uint16_t *kb, const uint16_t *vb, const am_p &p, int b, int j0)
{
    am_load_rows(Ks, kb + (size_t)j0 * AM_HD, AM_HD, p.Tk - j0);
    am_load_rows(Vs, vb + (size_t)j0 * AM_HD, AM_HD, p.Tk - j0);
    am_load_keyinfo(seg, pos, p, b, j0);
}

/* the score of key j (segment kseg, alibi position kpos) for a query that sees keys below n and is
 * of segment qseg: (q.k + slope kpos) scale, or -inf where the key is not visible */
__device__ __forceinline__ float am_mask_score(float s, int j, int n, int32_t kseg, int32_t qseg, float slope,
                                               float kpos, float scale)
{
    if (!(j < n) || !ft_key_visible(kseg, qseg)) return -INFINITY;
    return (s + slope * kpos) * scale;
}

/* backward, one score: s (masked, scaled) becomes P = exp(s - lse), 0 where either is -inf; dp
 * becomes G = P (dp - D) */
__device__ __forceinline__ void am_prob_grad(float &s, float &dp, float L, float D)
{
    const float pr = s == -INFINITY || L == -INFINITY ? 0.0f : __expf(s - L);
    s = pr;
    dp = pr * (dp - D);
}

/* a score tile held as m16n8 accumulators (this lane: rows lo, hi; tile columns nt*8 + 2t + 0/1),
 * raw q.k in, masked and scaled scores out */
__device__ __forceinline__ void am_scores(float (&s)[AM_NT][4], const am_row &lo, const am_row &hi, int j0,
                                          const int32_t *seg, const float *pos, float scale)
{
    const int t2 = (threadIdx.x & 3) * 2;
#pragma unroll
    for (int nt = 0; nt < AM_NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int jj = nt * 8 + t2 + (e & 1);
            const am_row &row = e < 2 ? lo : hi;
            s[nt][e] = am_mask_score(s[nt][e], j0 + jj, row.n, seg[jj], row.seg, row.slope, pos[jj], scale);
        }
}

/* ------------------------------------------------------------------------ */
/* forward                                                                   */

template <typename T>
__global__ void __launch_bounds__(AM_THREADS)
am_fwd_kernel(T *__restrict__ out, float *__restrict__ lse, const T *__restrict__ q, const T *__restrict__ k,
              const T *__restrict__ v, am_p p)
{
    __shared__ __align__(16) uint16_t Ks[AM_STAGES][AM_BN * AM_LD]; /* [key][dim] */
    __shared__ __align__(16) uint16_t Vs[AM_STAGES][AM_BN * AM_LD]; /* [key][dim] */
    __shared__ int32_t kseg[AM_STAGES][AM_BN];
    __shared__ float kpos[AM_STAGES][AM_BN];
    const int item = blockIdx.y, b = item / p.KV, r0 = blockIdx.x * AM_BM;
    const am_row lo = am_row_of(p, item, r0 + am_lane_row()), hi = am_row_of(p, item, r0 + am_lane_row() + 8);
    const uint16_t *q16 = reinterpret_cast<const uint16_t *>(q);
    uint32_t qa[AM_KS][4];
    am_frag_global(qa, q16 + lo.qrow * AM_HD, q16 + hi.qrow * AM_HD, lo.ok, hi.ok);
    const uint16_t *kb = reinterpret_cast<const uint16_t *>(k) + (size_t)item * p.cap * AM_HD;
    const uint16_t *vb = reinterpret_cast<const uint16_t *>(v) + (size_t)item * p.cap * AM_HD;

    float o[AM_NT][4];
    am_zero(o);
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f; /* l: this lane's columns only */
    const int tiles = am_key_tiles(p, r0);
    auto issue = [&](int u, int st) { am_issue_keys(Ks[st], Vs[st], kseg[st], kpos[st], kb, vb, p, b, u * AM_BN); };
    auto use = [&](int u, int st) {
        const int j0 = u * AM_BN;
        float s[AM_NT][4];
        am_mma_rows<T>(s, qa, Ks[st]);
        am_scores(s, lo, hi, j0, kseg[st], kpos[st], p.scale);
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < AM_NT; nt++) {
            mx_lo = fmaxf(mx_lo, fmaxf(s[nt][0], s[nt][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[nt][2], s[nt][3]));
        }
        const float mn_lo = fmaxf(m_lo, am_quad_max(mx_lo)), mn_hi = fmaxf(m_hi, am_quad_max(mx_hi));
        /* reference point: 0 while a row has seen no visible key (exp(-inf - 0) = 0, never NaN) */
        const float ref_lo = mn_lo == -INFINITY ? 0.0f : mn_lo, ref_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
        const float al_lo = __expf(m_lo - ref_lo), al_hi = __expf(m_hi - ref_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        l_lo *= al_lo;
        l_hi *= al_hi;
#pragma unroll
        for (int nt = 0; nt < AM_NT; nt++) {
            s[nt][0] = __expf(s[nt][0] - ref_lo);
            s[nt][1] = __expf(s[nt][1] - ref_lo);
            s[nt][2] = __expf(s[nt][2] - ref_hi);
            s[nt][3] = __expf(s[nt][3] - ref_hi);
            l_lo += s[nt][0] + s[nt][1];
            l_hi += s[nt][2] + s[nt][3];
            o[nt][0] *= al_lo;
            o[nt][1] *= al_lo;
            o[nt][2] *= al_hi;
            o[nt][3] *= al_hi;
        }
        am_mma_acc<T>(o, s, Vs[st]);
    };
    am_pipeline(tiles, issue, use);
    l_lo = am_quad_sum(l_lo);
    l_hi = am_quad_sum(l_hi);
    am_store<T>(lo.ok ? out + lo.orow : nullptr, hi.ok ? out + hi.orow : nullptr, o, l_lo > 0.0f ? 1.0f / l_lo : 0.0f,
                l_hi > 0.0f ? 1.0f / l_hi : 0.0f);
    if ((threadIdx.x & 3) == 0) {
        if (lo.ok) lse[lo.qrow] = m_lo == -INFINITY ? -INFINITY : m_lo + logf(l_lo);
        if (hi.ok) lse[hi.qrow] = m_hi == -INFINITY ? -INFINITY : m_hi + logf(l_hi);
    }
}

/* ------------------------------------------------------------------------ */
/* backward (training: Tk == T == cap)                                       */

/* D[row] = dout_row . out_row (f32), rows in lse order: AM_DOT_LANES lanes per query row, 16 bytes
 * of each tensor a lane (a warp per row with 4 bytes a lane moved ~1.1 TB/s on an H200: 68 us of
 * a 7B layer's backward at mb 16). Launch AM_DOT_LANES threads per row. */
constexpr int AM_DOT_LANES = AM_HD / 8;
template <typename T>
__global__ void am_dot_kernel(float *__restrict__ D, const T *__restrict__ dout, const T *__restrict__ out, am_p p,
                              int items)
{
    const size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / AM_DOT_LANES;
    const int part = threadIdx.x % AM_DOT_LANES;
    const bool live = w < (size_t)items * p.rows_item; /* no early return: every lane shuffles */
    float s = 0.0f;
    if (live) {
        const am_row row = am_row_of(p, (int)(w / p.rows_item), (int)(w % p.rows_item));
        const size_t at = row.orow + 8 * (size_t)part;
        const uint4 a = *reinterpret_cast<const uint4 *>(reinterpret_cast<const uint16_t *>(dout) + at);
        const uint4 c = *reinterpret_cast<const uint4 *>(reinterpret_cast<const uint16_t *>(out) + at);
        const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, cw[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float2 x = unpack2<T>(aw[e]), y = unpack2<T>(cw[e]);
            s += x.x * y.x + x.y * y.y;
        }
    }
    for (int m = AM_DOT_LANES / 2; m; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (live && part == 0) D[w] = s;
}

/* P and G = P (dP - D) of one score tile held as m16n8 accumulators (rows lo/hi);
 * in: s (masked, scaled scores) and dp; out: s = P, dp = G */
__device__ __forceinline__ void am_probs_grad(float (&s)[AM_NT][4], float (&dp)[AM_NT][4], float lse_lo,
                                              float lse_hi, float D_lo, float D_hi)
{
#pragma unroll
    for (int nt = 0; nt < AM_NT; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) am_prob_grad(s[nt][e], dp[nt][e], e < 2 ? lse_lo : lse_hi, e < 2 ? D_lo : D_hi);
}

template <typename T>
__global__ void __launch_bounds__(AM_THREADS)
am_dq_kernel(T *__restrict__ dq, const T *__restrict__ dout, const float *__restrict__ lse,
             const float *__restrict__ D, const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,
             am_p p)
{
    __shared__ __align__(16) uint16_t Ks[AM_STAGES][AM_BN * AM_LD]; /* [key][dim]: S = Q K^T, dQ += G K */
    __shared__ __align__(16) uint16_t Vs[AM_STAGES][AM_BN * AM_LD]; /* [key][dim]: dP = dO V^T */
    __shared__ int32_t kseg[AM_STAGES][AM_BN];
    __shared__ float kpos[AM_STAGES][AM_BN];
    const int item = blockIdx.y, b = item / p.KV, r0 = blockIdx.x * AM_BM;
    const am_row lo = am_row_of(p, item, r0 + am_lane_row()), hi = am_row_of(p, item, r0 + am_lane_row() + 8);
    uint32_t qa[AM_KS][4], da[AM_KS][4];
    const uint16_t *q16 = reinterpret_cast<const uint16_t *>(q), *d16 = reinterpret_cast<const uint16_t *>(dout);
    am_frag_global(qa, q16 + lo.qrow * AM_HD, q16 + hi.qrow * AM_HD, lo.ok, hi.ok);
    am_frag_global(da, d16 + lo.orow, d16 + hi.orow, lo.ok, hi.ok);
    const float lse_lo = lo.ok ? lse[lo.qrow] : -INFINITY, lse_hi = hi.ok ? lse[hi.qrow] : -INFINITY;
    const float D_lo = lo.ok ? D[lo.qrow] : 0.0f, D_hi = hi.ok ? D[hi.qrow] : 0.0f;
    const uint16_t *kb = reinterpret_cast<const uint16_t *>(k) + (size_t)item * p.cap * AM_HD;
    const uint16_t *vb = reinterpret_cast<const uint16_t *>(v) + (size_t)item * p.cap * AM_HD;

    float acc[AM_NT][4];
    am_zero(acc);
    const int tiles = am_key_tiles(p, r0);
    auto issue = [&](int u, int st) { am_issue_keys(Ks[st], Vs[st], kseg[st], kpos[st], kb, vb, p, b, u * AM_BN); };
    auto use = [&](int u, int st) {
        float s[AM_NT][4], dp[AM_NT][4];
        am_mma_rows<T>(s, qa, Ks[st]);
        am_mma_rows<T>(dp, da, Vs[st]);
        am_scores(s, lo, hi, u * AM_BN, kseg[st], kpos[st], p.scale);
        am_probs_grad(s, dp, lse_lo, lse_hi, D_lo, D_hi);
        am_mma_acc<T>(acc, dp, Ks[st]);
    };
    am_pipeline(tiles, issue, use);
    am_store<T>(lo.ok ? dq + lo.qrow * AM_HD : nullptr, hi.ok ? dq + hi.qrow * AM_HD : nullptr, acc, p.scale, p.scale);
}

/* dK, dV partials of keys j0 .. j0+63 of one item over the query heads of split z:
 * dk_part / dv_part [splits][items T hd] f32 */
template <typename T>
__global__ void __launch_bounds__(AM_THREADS)
am_dkv_kernel(float *__restrict__ dk_part, float *__restrict__ dv_part, const T *__restrict__ dout,
              const float *__restrict__ lse, const float *__restrict__ D, const T *__restrict__ q,
              const T *__restrict__ k, const T *__restrict__ v, am_p p)
{
    __shared__ __align__(16) uint16_t Qs[AM_STAGES][AM_BM * AM_LD]; /* [query][dim]: S^T = K Q^T, dK += G^T Q */
    __shared__ __align__(16) uint16_t Os[AM_STAGES][AM_BM * AM_LD]; /* dout [query][dim]: dP^T = V dO^T, dV += P^T dO */
    __shared__ float qlse[AM_STAGES][AM_BM], qD[AM_STAGES][AM_BM];
    __shared__ int32_t qseg[AM_STAGES][AM_BM];
    const int item = blockIdx.y, b = item / p.KV, g_kv = item % p.KV, j0 = blockIdx.x * AM_BN, z = blockIdx.z;
    const int t2 = (threadIdx.x & 3) * 2;
    /* this lane's two keys (the "rows" of the transposed products) */
    const int j_lo = j0 + am_lane_row(), j_hi = j_lo + 8;
    const int ok_lo = j_lo < p.T, ok_hi = j_hi < p.T;
    const size_t kat = (size_t)b * p.kstride;
    const int32_t seg_lo = ok_lo ? p.kmask[kat + j_lo] : 0, seg_hi = ok_hi ? p.kmask[kat + j_hi] : 0;
    const float pos_lo = ok_lo && p.slopes ? (float)p.kpos[kat + j_lo] : 0.0f;
    const float pos_hi = ok_hi && p.slopes ? (float)p.kpos[kat + j_hi] : 0.0f;
    const uint16_t *kb = reinterpret_cast<const uint16_t *>(k) + (size_t)item * p.cap * AM_HD;
    const uint16_t *vb = reinterpret_cast<const uint16_t *>(v) + (size_t)item * p.cap * AM_HD;
    uint32_t ka[AM_KS][4], va[AM_KS][4];
    am_frag_global(ka, kb + (size_t)j_lo * AM_HD, kb + (size_t)j_hi * AM_HD, ok_lo, ok_hi);
    am_frag_global(va, vb + (size_t)j_lo * AM_HD, vb + (size_t)j_hi * AM_HD, ok_lo, ok_hi);
    const uint16_t *q16 = reinterpret_cast<const uint16_t *>(q), *d16 = reinterpret_cast<const uint16_t *>(dout);

    float dk[AM_NT][4], dv[AM_NT][4];
    am_zero(dk);
    am_zero(dv);
    /* tiles: (query head hh of the split, 64 queries from t0), queries before j0 seeing none of
     * these keys */
    const int hh0 = z * p.hps, hh1 = min(p.gs, (z + 1) * p.hps);
    const int qtiles = (p.T - j0 + AM_BM - 1) / AM_BM;
    auto head_of = [&](int u) { return hh0 + u / qtiles; };
    auto t0_of = [&](int u) { return j0 + (u % qtiles) * AM_BM; };
    auto issue = [&](int u, int st) {
        const int hh = head_of(u), h = g_kv * p.gs + hh, t0 = t0_of(u), nq = p.T - t0;
        const size_t qrow0 = (size_t)item * p.rows_item + (size_t)hh * p.T; /* row of t = 0 */
        am_load_rows(Qs[st], q16 + (qrow0 + t0) * AM_HD, AM_HD, nq);
        am_load_rows(Os[st], d16 + (((size_t)b * p.T + t0) * p.H + h) * AM_HD, (size_t)p.H * AM_HD, nq);
        for (int tt = threadIdx.x; tt < AM_BM; tt += AM_THREADS) {
            const int ok = tt < nq;
            qlse[st][tt] = ok ? lse[qrow0 + t0 + tt] : -INFINITY;
            qD[st][tt] = ok ? D[qrow0 + t0 + tt] : 0.0f;
            qseg[st][tt] = ok ? p.kmask[kat + t0 + tt] : 0;
        }
    };
    auto use = [&](int u, int st) {
        const int t0 = t0_of(u);
        const float slope = p.slopes ? p.slopes[g_kv * p.gs + head_of(u)] : 0.0f;
        float s[AM_NT][4], dp[AM_NT][4];
        am_mma_rows<T>(s, ka, Qs[st]);
        am_mma_rows<T>(dp, va, Os[st]);
#pragma unroll
        for (int nt = 0; nt < AM_NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int tt = nt * 8 + t2 + (e & 1), t = t0 + tt;
                const int j = e < 2 ? j_lo : j_hi;
                const int32_t ks = e < 2 ? seg_lo : seg_hi;
                const float kp = e < 2 ? pos_lo : pos_hi;
                /* query t sees keys below t + 1 (Tk == T); past T: none */
                s[nt][e] = am_mask_score(s[nt][e], j, t < p.T ? t + 1 : 0, ks, qseg[st][tt], slope, kp, p.scale);
                am_prob_grad(s[nt][e], dp[nt][e], qlse[st][tt], qD[st][tt]);
            }
        am_mma_acc<T>(dv, s, Os[st]);
        am_mma_acc<T>(dk, dp, Qs[st]);
    };
    am_pipeline(hh1 > hh0 ? (hh1 - hh0) * qtiles : 0, issue, use);
    const size_t base = ((size_t)z * gridDim.y + item) * p.T * AM_HD; /* split z, item's key 0 */
    const size_t at_lo = base + (size_t)j_lo * AM_HD, at_hi = base + (size_t)j_hi * AM_HD;
    am_store<float>(ok_lo ? dk_part + at_lo : nullptr, ok_hi ? dk_part + at_hi : nullptr, dk, p.scale, p.scale);
    am_store<float>(ok_lo ? dv_part + at_lo : nullptr, ok_hi ? dv_part + at_hi : nullptr, dv, 1.0f, 1.0f);
}

/* dst[e] = sum over splits z = 0, 1, .. of part[z][e], in that order, rounded once to T */
template <typename T>
__global__ void am_split_sum_kernel(T *__restrict__ dst, const float *__restrict__ part, int splits, size_t n)
{
    const size_t e = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (e >= n) return;
    float a = 0.0f, c = 0.0f;
    for (int z = 0; z < splits; z++) {
        const float2 w = *reinterpret_cast<const float2 *>(part + (size_t)z * n + e);
        a += w.x;
        c += w.y;
    }
    *reinterpret_cast<uint32_t *>(reinterpret_cast<uint16_t *>(dst) + e) = pack2<T>(a, c);
}

#endif /* FT_CUDA_ATTENTION_MMA_CUH */
