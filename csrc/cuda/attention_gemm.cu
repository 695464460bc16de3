/* attention_gemm.cu -- causal softmax attention through cuBLAS batched GEMMs (tensor cores).
 *
 * Same contract as the flash kernels of attention.cu and csrc/cpu/attention.c:
 *   score s_tj = (q_t . k_j + slope_h * kpos_j) * scale, visible when j <= Tk - T + t and
 *   ft_key_visible(kmask_j, kmask_{Tk-T+t}) (segment ids of packed rows, backend.h),
 *   out_t = sum_j p_tj v_j with p = softmax over visible keys; lse_t saved (-inf, out 0: no visible key).
 *
 * Work is cut into chunks whose f32 score block stays within be->attn_chunk_bytes
 * (FT_CUDA_ATTN_CHUNK_MB, 64 MiB by default); the T x T scores of all heads never exist at once.
 *
 * Rows. An "item" is one (batch row b, kv head g): i = b*KV + g. Its query heads h = g*gs .. g*gs+gs-1
 * (gs = H/KV) are contiguous in q [B,H,T,hd], so the item's queries are one [gs*T, hd] matrix whose
 * row r = hh*T + t (hh = h - g*gs) -- and lse [B,H,T], dq [B,H,T,hd] use the same row order (row
 * i*gs*T + r). All heads of an item share K and V [cap, hd], so one GEMM covers them (multi-query:
 * one GEMM for all 71 heads of Falcon-7B).
 * A chunk is either ni whole items (rows 0..gs*T of items i0..i0+ni, one strided-batched GEMM of
 * batch ni), or rows r0..r0+R of a single item when one item alone exceeds the budget.
 *
 * Forward, per chunk:
 *   S[R, Tk]   = Q K^T                         GEMM, f32 out            (F scratch)
 *   P, lse     = softmax(mask((S + alibi) * scale))   kernel, P act     (X scratch)
 *   Ohm[R, hd] = P V                            GEMM, act out (head-major rows)
 *   out[b, t, h*hd..] = Ohm                     scatter kernel (out rows hold all heads of a token)
 * Backward, per chunk (training: Tk == T == cap):
 *   dOhm, Dr   = gather dout rows, D_r = dout_r . out_r        kernel
 *   S          = Q K^T                          GEMM f32 (F)
 *   P          = exp(mask(...) - lse)           kernel -> X (act)
 *   dV        (+)= P^T dOhm                     GEMM
 *   dP         = dOhm V^T                       GEMM f32 (F: S is dead)
 *   G          = P (dP - D)                     kernel, in place on X (dS = scale G)
 *   dQ         = scale G K                      GEMM, straight into dq (act)
 *   dK        (+)= scale G^T Q                  GEMM
 * dK/dV of a whole item are one GEMM each (the K dimension runs over all the group's heads and
 * queries) written straight to dk/dv in act dtype. A split item accumulates its row chunks in f32
 * scratch (beta = 1, fixed order) and is converted once. No atomics: deterministic.
 * G keeps dS unscaled (scale goes into the GEMM alpha) so fp16 keeps 1/scale more headroom above
 * its subnormal range.
 *
 * Scratch per chunk (one SCR_ATTN buffer): F f32 and X act, [rows, ldS] each (ldS = Tk rounded up
 * to 8: 16-byte aligned rows for the tensor-core kernels; columns >= Tk are never read), head-major
 * O / dout rows [rows, hd] act, D [rows] f32, and 2 x [T, hd] f32 for a split item.
 * Causality is applied by the mask only: the GEMMs compute the full T x Tk block (the masked half
 * costs tensor-core time, which is cheap here; the kernels skip reading it).
 */
#include <math.h>

#include "cuda.cuh"

/* ------------------------------------------------------------------------ */
/* chunk geometry and row decoding                                           */

struct ag_p {
    int H, KV, gs, T, Tk, hd, ldS;
    int rows_item; /* gs * T */
    int i0, r0, R; /* chunk: items i0.., rows r0 .. r0+R of each item */
    float scale;
    int kstride;                 /* row stride of kmask / kpos */
    const int32_t *kmask, *kpos; /* [B, kstride] */
    const float *slopes;         /* [H] or NULL */
};

struct ag_row {
    int b, h, t;
    size_t qrow;  /* row in q / dq / lse: i*gs*T + r */
    size_t orow;  /* element offset of this (b, t, h) in out / dout [B, T, H*hd] */
    int n;        /* causally visible keys: 0 .. n-1 (n = Tk - T + t + 1 >= 1) */
    int32_t qseg; /* the query's segment id: kmask at key position n - 1 */
};

/* chunk row w (0 .. ni*R) -> the query it stands for */
__device__ __forceinline__ ag_row ag_row_of(const ag_p &a, int w)
{
    ag_row o;
    const int ci = w / a.R, r = a.r0 + w % a.R;
    const int i = a.i0 + ci, g = i % a.KV, hh = r / a.T;
    o.b = i / a.KV;
    o.t = r % a.T;
    o.h = g * a.gs + hh;
    o.qrow = (size_t)i * a.rows_item + r;
    o.orow = (((size_t)o.b * a.T + o.t) * a.H + o.h) * a.hd;
    o.n = a.Tk - a.T + o.t + 1;
    o.qseg = a.kmask[(size_t)o.b * a.kstride + o.n - 1];
    return o;
}

/* masked, scaled score of key j for the query of row ro from the raw dot product */
__device__ __forceinline__ float ag_score(const ag_p &a, const int32_t *km, const int32_t *kp, float slope,
                                          const ag_row &ro, int j, float dot)
{
    if (j >= ro.n || !ft_key_visible(km[j], ro.qseg)) return -INFINITY;
    if (a.slopes) dot += slope * (float)kp[j];
    return dot * a.scale;
}

/* four consecutive act values, one 8-byte access (rows are 16-byte aligned, j % 4 == 0) */
template <typename T> struct __align__(8) act4 { T v[4]; };

#define AG_WARPS 8 /* rows (one warp each) per block of the row kernels */

static unsigned ag_blocks(size_t rows) { return (unsigned)((rows + AG_WARPS - 1) / AG_WARPS); }

/* ------------------------------------------------------------------------ */
/* row kernels: one warp per score row; lane l covers columns 4l + 128k      */

/* p[0..Tk) = exp(score - ls) (act) of one row held by a warp; 0 where masked, beyond the causal
 * limit ro.n, or for a fully masked row (ls = -inf). Forward and backward write P the same way. */
template <typename T>
__device__ __forceinline__ void ag_write_probs(T *p, const float *s, float ls, const ag_p &a, const ag_row &ro,
                                               const int32_t *km, const int32_t *kp, float slope, int lane)
{
    for (int j = 4 * lane; j < a.Tk; j += 128) {
        act4<T> o;
        if (j < ro.n && ls != -INFINITY) {
            const float4 v = *(const float4 *)(s + j);
            const float d[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = ag_score(a, km, kp, slope, ro, j + e, d[e]);
                o.v[e] = cv<T>(x == -INFINITY ? 0.0f : expf(x - ls));
            }
        } else {
#pragma unroll
            for (int e = 0; e < 4; e++) o.v[e] = cv<T>(0.0f);
        }
        *(act4<T> *)(p + j) = o;
    }
}

/* forward softmax: P[w, 0..Tk) (act), lse of the row. Reads S only where causally visible. */
template <typename T>
__global__ void __launch_bounds__(32 * AG_WARPS) ag_softmax_fwd(T *P, float *lse, const float *S, int nrows, ag_p a)
{
    const int w = blockIdx.x * AG_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= nrows) return; /* whole warp */
    const ag_row ro = ag_row_of(a, w);
    const float *s = S + (size_t)w * a.ldS;
    T *p = P + (size_t)w * a.ldS;
    const int32_t *km = a.kmask + (size_t)ro.b * a.kstride, *kp = a.kpos + (size_t)ro.b * a.kstride;
    const float slope = a.slopes ? a.slopes[ro.h] : 0.0f;

    /* pass 1: online max / sum per lane, merged over the warp */
    float m = -INFINITY, l = 0.0f;
    for (int j = 4 * lane; j < ro.n; j += 128) {
        const float4 v = *(const float4 *)(s + j);
        const float d[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float x = ag_score(a, km, kp, slope, ro, j + e, d[e]);
            if (x > m) {
                l = l * expf(m - x) + 1.0f; /* m == -inf: l == 0 */
                m = x;
            } else if (x != -INFINITY) {
                l += expf(x - m);
            }
        }
    }
    const float M = warp_max(m);
    const float L = warp_sum(m == -INFINITY ? 0.0f : l * expf(m - M));
    const float ls = M == -INFINITY ? -INFINITY : M + logf(L);
    if (lane == 0) lse[ro.qrow] = ls;

    /* pass 2: P = exp(x - lse); zero for masked, non-causal and fully masked rows */
    ag_write_probs(p, s, ls, a, ro, km, kp, slope, lane);
}

/* backward: P[w, 0..Tk) = exp(x - lse) (act) from the recomputed S */
template <typename T>
__global__ void __launch_bounds__(32 * AG_WARPS) ag_probs_bwd(T *P, const float *lse, const float *S, int nrows, ag_p a)
{
    const int w = blockIdx.x * AG_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= nrows) return;
    const ag_row ro = ag_row_of(a, w);
    const float *s = S + (size_t)w * a.ldS;
    T *p = P + (size_t)w * a.ldS;
    const int32_t *km = a.kmask + (size_t)ro.b * a.kstride, *kp = a.kpos + (size_t)ro.b * a.kstride;
    const float slope = a.slopes ? a.slopes[ro.h] : 0.0f;
    const float ls = lse[ro.qrow];
    ag_write_probs(p, s, ls, a, ro, km, kp, slope, lane);
}

/* backward: X[w, j] = P (dP - D_w) in place, for the causally visible columns (P is 0 beyond) */
template <typename T>
__global__ void __launch_bounds__(32 * AG_WARPS) ag_dscores_bwd(T *X, const float *dP, const float *D, int nrows, ag_p a)
{
    const int w = blockIdx.x * AG_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= nrows) return;
    const ag_row ro = ag_row_of(a, w);
    const float *dp = dP + (size_t)w * a.ldS;
    T *x = X + (size_t)w * a.ldS;
    const float Dw = D[w];
    for (int j = 4 * lane; j < ro.n; j += 128) {
        act4<T> o = *(const act4<T> *)(x + j);
        const float4 v = *(const float4 *)(dp + j);
        const float d[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int e = 0; e < 4; e++)
            if (j + e < ro.n) o.v[e] = cv<T>(ld<T>(o.v[e]) * (d[e] - Dw));
        *(act4<T> *)(x + j) = o;
    }
}

/* forward: out[b, t, h*hd + d] = Ohm[w, d] */
template <typename T>
__global__ void __launch_bounds__(32 * AG_WARPS) ag_scatter_out(T *out, const T *Ohm, int nrows, ag_p a)
{
    const int w = blockIdx.x * AG_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= nrows) return;
    const ag_row ro = ag_row_of(a, w);
    for (int d = lane; d < a.hd; d += 32) out[ro.orow + d] = Ohm[(size_t)w * a.hd + d];
}

/* backward: dOhm[w, :] = dout row (head-major copy), D[w] = dout . out of the row */
template <typename T>
__global__ void __launch_bounds__(32 * AG_WARPS) ag_gather_dout(T *dOhm, float *D, const T *dout, const T *out,
                                                                int nrows, ag_p a)
{
    const int w = blockIdx.x * AG_WARPS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (w >= nrows) return;
    const ag_row ro = ag_row_of(a, w);
    float acc = 0.0f;
    for (int d = lane; d < a.hd; d += 32) {
        const T g = dout[ro.orow + d];
        dOhm[(size_t)w * a.hd + d] = g;
        acc = fmaf(ld<T>(g), ld<T>(out[ro.orow + d]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) D[w] = acc;
}

/* ------------------------------------------------------------------------ */
/* host side                                                                 */

/* row-major, strided batched: C_i[M,N] = alpha op(A_i) op(B_i) + beta C_i (fp32 compute).
 * ta/tb as gemm_rm: A is [M,K] (ta = 0) or [K,M] (ta = 1), B is [K,N] or [N,K]. */
static ft_status gemm_sb(cuda_backend *be, int ta, int tb, int M, int N, int K, float alpha, const void *A,
                         cudaDataType_t at, int lda, long long sA, const void *B, cudaDataType_t bt, int ldb,
                         long long sB, float beta, void *C, cudaDataType_t ct, int ldc, long long sC, int batch,
                         ft_error *err)
{
    if (M <= 0 || N <= 0 || batch <= 0) return FT_OK;
    /* row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T */
    const cublasOperation_t opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
    BLAS_TRY(cublasGemmStridedBatchedEx(be->blas, opB, opA, N, M, K, &alpha, B, bt, ldb, sB, A, at, lda, sA, &beta,
                                        C, ct, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
             "an attention matrix product (cublasGemmStridedBatchedEx)");
    return FT_OK;
}

static size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* How the B*KV items are cut: whole items, ni at a time, or row pieces of one item. */
struct ag_plan {
    int items, rows_item, ldS;
    int max_rows; /* rows of one chunk (score rows), >= 1 */
    int split;    /* 1: an item needs several chunks */
    size_t chunk_rows; /* most rows any chunk has */
};

static ag_plan make_plan(const cuda_backend *be, const ft_attn_args *a)
{
    ag_plan pl;
    pl.items = a->B * a->KV;
    pl.rows_item = (a->H / a->KV) * a->T;
    pl.ldS = (a->Tk + 7) & ~7;
    size_t mr = be->attn_chunk_bytes / (sizeof(float) * (size_t)pl.ldS);
    if (mr < 1) mr = 1;
    if (mr > (1u << 30)) mr = 1u << 30;
    pl.max_rows = (int)mr;
    pl.split = pl.rows_item > pl.max_rows;
    if (pl.split) { /* equal pieces, no small remainder chunk */
        const int parts = (pl.rows_item + pl.max_rows - 1) / pl.max_rows;
        pl.max_rows = (pl.rows_item + parts - 1) / parts;
        pl.chunk_rows = (size_t)pl.max_rows;
    } else {
        int ni = pl.max_rows / pl.rows_item;
        if (ni > pl.items) ni = pl.items;
        pl.chunk_rows = (size_t)ni * pl.rows_item;
    }
    return pl;
}

/* Visit the chunks in a fixed order: fn(i0, ni, r0, R). */
#define AG_FOR_CHUNKS(pl, i0, ni, r0, R, ...)                                               \
    for (int i0 = 0, ni = 0; i0 < (pl).items; i0 += ni) {                                   \
        if (!(pl).split) {                                                                  \
            ni = (pl).max_rows / (pl).rows_item;                                            \
            if (ni > (pl).items - i0) ni = (pl).items - i0;                                 \
            const int r0 = 0, R = (pl).rows_item;                                           \
            __VA_ARGS__;                                                                    \
        } else {                                                                            \
            ni = 1;                                                                         \
            for (int r0 = 0; r0 < (pl).rows_item; r0 += (pl).max_rows) {                    \
                const int R = (pl).rows_item - r0 < (pl).max_rows ? (pl).rows_item - r0 : (pl).max_rows; \
                __VA_ARGS__;                                                                \
            }                                                                               \
        }                                                                                   \
    }

static ag_p make_ag(const ft_attn_args *a, const ag_plan &pl)
{
    ag_p p;
    p.H = a->H; p.KV = a->KV; p.gs = a->H / a->KV; p.T = a->T; p.Tk = a->Tk; p.hd = a->hd; p.ldS = pl.ldS;
    p.rows_item = pl.rows_item;
    p.i0 = 0; p.r0 = 0; p.R = 1;
    p.scale = a->scale; p.kstride = a->kstride; p.kmask = a->kmask; p.kpos = a->kpos; p.slopes = a->slopes;
    return p;
}

static ft_status check_args(const ft_attn_args *a, ft_error *err)
{
    if (a->KV <= 0 || a->H % a->KV != 0)
        return ft_fail(err, FT_EINVAL, "attention: %d query heads do not split over %d kv heads", a->H, a->KV);
    if (a->Tk < a->T || a->cap < a->Tk)
        return ft_fail(err, FT_EINVAL, "attention: need T <= Tk <= cap (T %d, Tk %d, cap %d)", a->T, a->Tk, a->cap);
    return FT_OK;
}

extern "C" ft_status cuda_attention_fwd_gemm(ft_backend *base, void *out, float *lse, const void *q, const void *k,
                                             const void *v, const ft_attn_args *a, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    FT_TRY(check_args(a, err));
    const ag_plan pl = make_plan(be, a);
    const int hd = a->hd, Tk = a->Tk;
    const cudaDataType_t act = act_cuda_type(base);
    const size_t act_sz = 2;

    /* scratch: F f32 [rows, ldS] | X act [rows, ldS] | Ohm act [rows, hd] */
    const size_t nF = pl.chunk_rows * pl.ldS;
    const size_t oX = align256(nF * sizeof(float)), oO = oX + align256(nF * act_sz);
    void *scr;
    FT_TRY(cuda_scratch(be, SCR_ATTN, oO + pl.chunk_rows * hd * act_sz, &scr, err));
    float *F = (float *)scr;
    void *X = (char *)scr + oX, *Ohm = (char *)scr + oO;

    const long long sQ = (long long)pl.rows_item * hd, sK = (long long)a->cap * hd;
    ag_p p = make_ag(a, pl);
    cudaStream_t st = be->stream;
    PROF_T0(be);
    AG_FOR_CHUNKS(pl, i0, ni, r0, R, {
        p.i0 = i0; p.r0 = r0; p.R = R;
        const int nrows = ni * R;
        const long long sS = (long long)R * pl.ldS, sO = (long long)R * hd;
        ACT_DISPATCH(base, T, {
            const T *Qc = (const T *)q + ((size_t)i0 * pl.rows_item + r0) * hd; /* [ni] x [R, hd] */
            const T *Kc = (const T *)k + (size_t)i0 * a->cap * hd;             /* [ni] x [Tk, hd] */
            const T *Vc = (const T *)v + (size_t)i0 * a->cap * hd;
            /* S[R, Tk] = Q K^T (f32) */
            FT_TRY(gemm_sb(be, 0, 1, R, Tk, hd, 1.0f, Qc, act, hd, sQ, Kc, act, hd, sK, 0.0f, F, CUDA_R_32F,
                           pl.ldS, sS, ni, err));
            ag_softmax_fwd<T><<<ag_blocks(nrows), 32 * AG_WARPS, 0, st>>>((T *)X, lse, F, nrows, p);
            LAUNCH_CHECK("attention softmax");
            /* Ohm[R, hd] = P V (act) */
            FT_TRY(gemm_sb(be, 0, 0, R, hd, Tk, 1.0f, X, act, pl.ldS, sS, Vc, act, hd, sK, 0.0f, Ohm, act, hd, sO,
                           ni, err));
            ag_scatter_out<T><<<ag_blocks(nrows), 32 * AG_WARPS, 0, st>>>((T *)out, (const T *)Ohm, nrows, p);
            LAUNCH_CHECK("attention output scatter");
        });
    });
    PROF_MARK(be, PR_ATT_F);
    return FT_OK;
}

extern "C" ft_status cuda_attention_bwd_gemm(ft_backend *base, void *dq, void *dk, void *dv, const void *dout,
                                             const void *out, const float *lse, const void *q, const void *k,
                                             const void *v, const ft_attn_args *a, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (a->Tk != a->T || a->cap != a->T)
        return ft_fail(err, FT_EINVAL, "attention backward needs Tk == T == cap (training without cache)");
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    FT_TRY(check_args(a, err));
    const ag_plan pl = make_plan(be, a);
    const int hd = a->hd, Tk = a->Tk;
    const cudaDataType_t act = act_cuda_type(base);
    const size_t act_sz = 2;

    /* scratch: F f32 [rows, ldS] | X act [rows, ldS] | dOhm act [rows, hd] | D f32 [rows] |
     *          split items only: dK, dV f32 accumulators [T, hd] each */
    const size_t nF = pl.chunk_rows * pl.ldS, nkv = (size_t)a->T * hd;
    const size_t oX = align256(nF * sizeof(float));
    const size_t oG = oX + align256(nF * act_sz);
    const size_t oD = oG + align256(pl.chunk_rows * hd * act_sz);
    const size_t oA = oD + align256(pl.chunk_rows * sizeof(float));
    const size_t total = oA + (pl.split ? 2 * nkv * sizeof(float) : 0);
    void *scr;
    FT_TRY(cuda_scratch(be, SCR_ATTN, total, &scr, err));
    float *F = (float *)scr, *D = (float *)((char *)scr + oD);
    void *X = (char *)scr + oX, *dOhm = (char *)scr + oG;
    float *acc_k = (float *)((char *)scr + oA), *acc_v = acc_k + nkv;

    const long long sQ = (long long)pl.rows_item * hd, sK = (long long)a->cap * hd, sKV = (long long)nkv;
    ag_p p = make_ag(a, pl);
    cudaStream_t st = be->stream;
    PROF_T0(be);
    AG_FOR_CHUNKS(pl, i0, ni, r0, R, {
        p.i0 = i0; p.r0 = r0; p.R = R;
        const int nrows = ni * R;
        const long long sS = (long long)R * pl.ldS, sO = (long long)R * hd;
        /* dK/dV destination: the act outputs for whole items, else the f32 accumulators */
        const int whole = !pl.split, last = r0 + R == pl.rows_item;
        const float beta_kv = whole || r0 == 0 ? 0.0f : 1.0f;
        const cudaDataType_t kvt = whole ? act : CUDA_R_32F;
        ACT_DISPATCH(base, T, {
            const T *Qc = (const T *)q + ((size_t)i0 * pl.rows_item + r0) * hd; /* [ni] x [R, hd] */
            const T *Kc = (const T *)k + (size_t)i0 * a->cap * hd;             /* [ni] x [T, hd] */
            const T *Vc = (const T *)v + (size_t)i0 * a->cap * hd;
            T *dQc = (T *)dq + ((size_t)i0 * pl.rows_item + r0) * hd;
            void *dKc = whole ? (void *)((T *)dk + (size_t)i0 * nkv) : (void *)acc_k;
            void *dVc = whole ? (void *)((T *)dv + (size_t)i0 * nkv) : (void *)acc_v;

            ag_gather_dout<T><<<ag_blocks(nrows), 32 * AG_WARPS, 0, st>>>((T *)dOhm, D, (const T *)dout,
                                                                           (const T *)out, nrows, p);
            LAUNCH_CHECK("attention backward gather");
            /* S = Q K^T (f32); P = exp(S' - lse) */
            FT_TRY(gemm_sb(be, 0, 1, R, Tk, hd, 1.0f, Qc, act, hd, sQ, Kc, act, hd, sK, 0.0f, F, CUDA_R_32F,
                           pl.ldS, sS, ni, err));
            ag_probs_bwd<T><<<ag_blocks(nrows), 32 * AG_WARPS, 0, st>>>((T *)X, lse, F, nrows, p);
            LAUNCH_CHECK("attention backward probabilities");
            /* dV[T, hd] (+)= P^T dOhm */
            FT_TRY(gemm_sb(be, 1, 0, Tk, hd, R, 1.0f, X, act, pl.ldS, sS, dOhm, act, hd, sO, beta_kv, dVc, kvt, hd,
                           sKV, ni, err));
            PROF_MARK(be, PR_ATT_DV);
            /* dP = dOhm V^T (f32, over S); G = P (dP - D) in place */
            FT_TRY(gemm_sb(be, 0, 1, R, Tk, hd, 1.0f, dOhm, act, hd, sO, Vc, act, hd, sK, 0.0f, F, CUDA_R_32F,
                           pl.ldS, sS, ni, err));
            ag_dscores_bwd<T><<<ag_blocks(nrows), 32 * AG_WARPS, 0, st>>>((T *)X, F, D, nrows, p);
            LAUNCH_CHECK("attention backward score gradients");
            /* dQ[R, hd] = scale G K */
            FT_TRY(gemm_sb(be, 0, 0, R, hd, Tk, a->scale, X, act, pl.ldS, sS, Kc, act, hd, sK, 0.0f, dQc, act, hd,
                           sQ, ni, err));
            PROF_MARK(be, PR_ATT_DQ);
            /* dK[T, hd] (+)= scale G^T Q */
            FT_TRY(gemm_sb(be, 1, 0, Tk, hd, R, a->scale, X, act, pl.ldS, sS, Qc, act, hd, sQ, beta_kv, dKc, kvt,
                           hd, sKV, ni, err));
            if (!whole && last) {
                FT_TRY(cuda_f32_to_act(be, (T *)dk + (size_t)i0 * nkv, acc_k, nkv, err));
                FT_TRY(cuda_f32_to_act(be, (T *)dv + (size_t)i0 * nkv, acc_v, nkv, err));
            }
            PROF_MARK(be, PR_ATT_DK);
        });
    });
    return FT_OK;
}
