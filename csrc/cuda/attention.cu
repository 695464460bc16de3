/* attention.cu -- qkv split + rotary, and flash-style causal attention on the GPU
 * (FT_CUDA_ATTN=flash; the default cuBLAS path is attention_gemm.cu).
 *
 * Scores are never stored: forward keeps a running max / sum per query over
 * key tiles held in shared memory and saves lse; backward recomputes the
 * probabilities from lse, as csrc/cpu/attention.c does:
 *   p = exp(s - lse), dP = dout . v, D = dout . out, dS = p (dP - D)
 *   dq = scale sum_j dS k_j              (one thread per query)
 *   dv_h = sum_t p dout_t, dk_h = scale sum_t dS q_t   (one thread per key and query head)
 * and dk/dv of a kv head sum dk_h/dv_h over its query heads in a fixed order
 * (f32 scratch, no atomics: deterministic).
 * score = (q.k + slope * kpos) * scale; query t sits at key position Tk - T + t and sees the
 * causal keys ft_key_visible allows (segment ids of packed rows, backend.h).
 * One thread owns one query (or key) row of up to HDM dims in registers;
 * head dims are padded with zeros up to HDM in {32, 64, 128, 256}.
 */
#include <math.h>

#include "cuda.cuh"

/* ------------------------------------------------------------------------ */
/* qkv split + rotary                                                        */

/* Block (row group, slot chunk): up to QKV_ROWS token rows and head slots [c*spb, c*spb + spb) of
 * the H query heads, KV key heads (rotated) and KV value heads (copied). The inverse frequencies
 * (double pow rounded to f32, as csrc/cpu and the reference compute them) are made once per block
 * and the rows' cos/sin in f32 once per (row, pair) in shared memory, where the old form made a
 * double pow/cos/sin table per row (FP64 runs at 1/32 rate on a T4). Work items are V consecutive
 * elements (V = 8: one 16-byte access, V = 1 otherwise). On an H200 at mb 16 (7B) a call went from
 * 63 us (2-byte items, a block per row) to 36 us. Training has thousands of rows: spb = every slot.
 * Decode has B rows: chunks of 4 slots spread a row over ~20 blocks. */
constexpr int QKV_ROWS = 8;
constexpr int QKV_THREADS = 256;

template <typename T, int V>
__global__ void __launch_bounds__(QKV_THREADS)
    qkv_split_kernel(T *q, T *k, T *v, const T *qkv, const int32_t *cols, const int32_t *pos, int rows, int T_, int H,
                     int KV, int hd, int width, int cap, int past_arg, const int32_t *past_dev, int rope, float theta,
                     int spb, int backward)
{
    const int past = past_dev ? *past_dev : past_arg;
    extern __shared__ float tab[]; /* inv[hd/2], cs[QKV_ROWS][hd/2], sn[QKV_ROWS][hd/2] */
    const int half = hd / 2;
    const int row0 = blockIdx.x * QKV_ROWS, nr = min(QKV_ROWS, rows - row0);
    const int s0 = blockIdx.y * spb, s1 = min(H + 2 * KV, s0 + spb);
    float *inv = tab, *cs = tab + half, *sn = cs + QKV_ROWS * half;
    if (rope && s0 < H + KV) {
        for (int i = threadIdx.x; i < half; i += blockDim.x)
            inv[i] = (float)(1.0 / pow((double)theta, (2.0 * i) / hd));
        __syncthreads();
        for (int e = threadIdx.x; e < nr * half; e += blockDim.x) {
            const int r = e / half, i = e % half;
            sincosf((float)pos[row0 + r] * inv[i], &sn[r * half + i], &cs[r * half + i]);
        }
        __syncthreads();
    }
    /* rotated pairs of the q and k slots in [s0, s1): item = (row, slot, V elements of the first half) */
    const int r1 = min(s1, H + KV), nrs = r1 > s0 ? r1 - s0 : 0, hv = half / V;
    for (int e = threadIdx.x; e < nr * nrs * hv; e += blockDim.x) {
        const int i = (e % hv) * V, slot = s0 + (e / hv) % nrs, r = e / (hv * nrs);
        const int bt = row0 + r, b = bt / T_, t = bt % T_;
        T *qk = slot < H ? q + (((size_t)b * H + slot) * T_ + t) * hd
                         : k + (((size_t)b * KV + (slot - H)) * cap + past + t) * hd; /* the q/k buffer row */
        T *fused = (T *)qkv + (size_t)bt * width + cols[slot];
        const T *src = backward ? qk : fused;
        T *dst = backward ? fused : qk;
        float x1[V], x2[V], y1[V], y2[V];
        act_unpack<T, V>(act_load<T, V>(src + i), x1);
        act_unpack<T, V>(act_load<T, V>(src + i + half), x2);
#pragma unroll
        for (int c = 0; c < V; c++) { /* backward rotates by the opposite angle */
            const float cc = rope ? cs[r * half + i + c] : 1.0f;
            const float sg = rope ? (backward ? -sn[r * half + i + c] : sn[r * half + i + c]) : 0.0f;
            y1[c] = rope ? x1[c] * cc - x2[c] * sg : x1[c];
            y2[c] = rope ? x2[c] * cc + x1[c] * sg : x2[c];
        }
        act_store<T, V>(dst + i, y1);
        act_store<T, V>(dst + i + half, y2);
    }
    /* value slots in [s0, s1): plain copies, item = (row, slot, V elements) */
    const int v0 = max(s0, H + KV), nvs = s1 > v0 ? s1 - v0 : 0, dv = hd / V;
    for (int e = threadIdx.x; e < nr * nvs * dv; e += blockDim.x) {
        const int d = (e % dv) * V, gq = v0 - H - KV + (e / dv) % nvs, r = e / (dv * nvs);
        const int bt = row0 + r, b = bt / T_, t = bt % T_;
        T *vv = v + (((size_t)b * KV + gq) * cap + past + t) * hd + d;
        T *fused = (T *)qkv + (size_t)bt * width + cols[H + KV + gq] + d;
        float x[V];
        act_unpack<T, V>(act_load<T, V>(backward ? vv : fused), x);
        act_store<T, V>(backward ? fused : vv, x);
    }
}

static ft_status qkv_split_launch(ft_backend *base, void *q, void *k, void *v, const void *qkv, const ft_qkv_args *a,
                                  int backward, ft_error *err)
{
    const int rows = a->B * a->T;
    if (rows <= 0) return FT_OK;
    const size_t sh = (size_t)(1 + 2 * QKV_ROWS) * (a->hd / 2) * sizeof(float);
    const int slots = a->H + 2 * a->KV;
    const int spb = rows >= 512 ? slots : 4;
    const dim3 grid((unsigned)((rows + QKV_ROWS - 1) / QKV_ROWS), (unsigned)((slots + spb - 1) / spb));
    /* 16-byte items: every column offset is a head start (a multiple of hd), so hd % 16 == 0, an
     * 8-element row width and 16-byte buffers keep every item aligned */
    const bool v8 = a->hd % 16 == 0 && a->qkv_width % 8 == 0 && aligned16(q) && aligned16(k) && aligned16(v) &&
                    aligned16(qkv);
    PROF_T0(CB(base));
#define QKV_SPLIT(VV)                                                                                            \
    qkv_split_kernel<T, VV><<<grid, QKV_THREADS, sh, CB(base)->stream>>>(                                        \
        (T *)q, (T *)k, (T *)v, (const T *)qkv, a->cols, a->pos, rows, a->T, a->H, a->KV, a->hd, a->qkv_width, \
        a->cap, a->past, a->past_dev, a->rope, a->theta, spb, backward)
    ACT_DISPATCH(base, T, {
        if (v8) QKV_SPLIT(8);
        else QKV_SPLIT(1);
    });
#undef QKV_SPLIT
    LAUNCH_CHECK(backward ? "qkv split backward" : "qkv split");
    PROF_MARK(CB(base), PR_QKV);
    return FT_OK;
}

extern "C" ft_status cuda_qkv_split_fwd(ft_backend *base, void *q, void *k, void *v, const void *qkv,
                                        const ft_qkv_args *a, ft_error *err)
{
    return qkv_split_launch(base, q, k, v, qkv, a, 0, err);
}

extern "C" ft_status cuda_qkv_split_bwd(ft_backend *base, void *dqkv, const void *dq, const void *dk,
                                        const void *dv, const ft_qkv_args *a, ft_error *err)
{
    return qkv_split_launch(base, (void *)dq, (void *)dk, (void *)dv, dqkv, a, 1, err);
}

/* ------------------------------------------------------------------------ */
/* attention                                                                 */

#define BQ 64 /* queries (or keys) per block = threads per block */

template <int HDM> struct kt { static constexpr int BK = HDM <= 64 ? 32 : HDM <= 128 ? 16 : 8; };

template <typename T, int HDM> __device__ __forceinline__ void load_row(float (&r)[HDM], const T *src, int hd)
{
#pragma unroll
    for (int d = 0; d < HDM; d++) r[d] = d < hd ? ld<T>(src[d]) : 0.0f;
}

/* four independent accumulators: the FMA chains overlap (latency, not throughput, bound otherwise) */
template <int HDM> __device__ __forceinline__ float dot_sh(const float (&r)[HDM], const float *s)
{
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma unroll
    for (int d = 0; d < HDM; d += 4) {
        const float4 x = *(const float4 *)(s + d);
        a0 = fmaf(r[d], x.x, a0);
        a1 = fmaf(r[d + 1], x.y, a1);
        a2 = fmaf(r[d + 2], x.z, a2);
        a3 = fmaf(r[d + 3], x.w, a3);
    }
    return (a0 + a1) + (a2 + a3);
}

template <int HDM> __device__ __forceinline__ void axpy_sh(float (&r)[HDM], float a, const float *s)
{
#pragma unroll
    for (int d = 0; d < HDM; d += 4) {
        const float4 x = *(const float4 *)(s + d);
        r[d] = fmaf(a, x.x, r[d]);
        r[d + 1] = fmaf(a, x.y, r[d + 1]);
        r[d + 2] = fmaf(a, x.z, r[d + 2]);
        r[d + 3] = fmaf(a, x.w, r[d + 3]);
    }
}

/* cooperative load of rows [r0, r0+n) of a [*, hd] act matrix into sm[n][HDM] (f32, zero padded) */
template <typename T, int HDM>
__device__ __forceinline__ void load_tile(float *sm, const T *src, int r0, int n, int rmax, int hd)
{
    for (int e = threadIdx.x; e < n * HDM; e += blockDim.x) {
        const int r = e / HDM, d = e % HDM;
        sm[e] = (d < hd && r0 + r < rmax) ? ld<T>(src[(size_t)(r0 + r) * hd + d]) : 0.0f;
    }
}

struct attn_p {
    int B, H, KV, T, Tk, cap, hd;
    float scale;
    int kstride; /* row stride of kmask / kpos */
    const int32_t *kmask, *kpos;
    const float *slopes;
};

/* The flash kernels run on a 1-D grid of B*H*ceil(T/BQ) blocks: gridDim.x allows 2^31 - 1 blocks (the
 * engine keeps B*H*T below that), where a y dimension of B*H stopped at 65535. Block -> (b*H + h, tile). */
__device__ __forceinline__ void attn_block(const attn_p &a, int &bh, int &tile)
{
    const int tiles = (a.T + BQ - 1) / BQ;
    bh = (int)(blockIdx.x / tiles);
    tile = (int)(blockIdx.x % tiles);
}

/* 0 when the blocks would not fit a grid (the engine's size limits, forward.c, keep that from happening) */
static unsigned attn_grid(const ft_attn_args *a)
{
    const size_t n = (size_t)a->B * a->H * ((a->T + BQ - 1) / BQ);
    return n <= 0x7fffffffu ? (unsigned)n : 0u;
}

template <typename T, int HDM>
__global__ void __launch_bounds__(BQ) attn_fwd_kernel(T *out, float *lse, const T *q, const T *k, const T *v, attn_p a)
{
    constexpr int BK = kt<HDM>::BK;
    __shared__ __align__(16) float Ks[BK * HDM];
    __shared__ __align__(16) float Vs[BK * HDM];
    __shared__ int km[BK];
    __shared__ float kp[BK];
    int bh, tile;
    attn_block(a, bh, tile);
    const int b = bh / a.H, h = bh % a.H, g = h / (a.H / a.KV);
    const int t = tile * BQ + threadIdx.x;
    const int off = a.Tk - a.T;
    const int qpos = off + t;
    const bool valid = t < a.T;
    const float slope = a.slopes ? a.slopes[h] : 0.0f;
    const T *kb = k + ((size_t)b * a.KV + g) * a.cap * a.hd;
    const T *vb = v + ((size_t)b * a.KV + g) * a.cap * a.hd;
    const int32_t *kmb = a.kmask + (size_t)b * a.kstride, *kpb = a.kpos + (size_t)b * a.kstride;
    const int32_t qseg = valid ? kmb[qpos] : 0; /* the query's segment (packed rows) */

    float qr[HDM], o[HDM];
    if (valid) load_row<T, HDM>(qr, q + ((size_t)bh * a.T + t) * a.hd, a.hd);
    else
#pragma unroll
        for (int d = 0; d < HDM; d++) qr[d] = 0.0f;
#pragma unroll
    for (int d = 0; d < HDM; d++) o[d] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    const int last_t = min(a.T - 1, tile * BQ + BQ - 1);
    const int kend = min(a.Tk, off + last_t + 1); /* keys any query of the block can see */
    for (int j0 = 0; j0 < kend; j0 += BK) {
        __syncthreads();
        load_tile<T, HDM>(Ks, kb, j0, BK, kend, a.hd);
        load_tile<T, HDM>(Vs, vb, j0, BK, kend, a.hd);
        for (int jj = threadIdx.x; jj < BK; jj += blockDim.x) {
            const int j = j0 + jj;
            km[jj] = j < kend ? kmb[j] : 0;
            kp[jj] = j < kend ? (float)kpb[j] : 0.0f;
        }
        __syncthreads();
        float s[BK];
        float mt = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            const int j = j0 + jj;
            float sc = -INFINITY;
            if (valid && j <= qpos && ft_key_visible(km[jj], qseg)) {
                float d = dot_sh<HDM>(qr, Ks + jj * HDM);
                if (a.slopes) d += slope * kp[jj];
                sc = d * a.scale;
            }
            s[jj] = sc;
            mt = fmaxf(mt, sc);
        }
        if (mt == -INFINITY) continue;
        const float mn = fmaxf(m, mt);
        const float corr = expf(m - mn); /* 0 when m == -inf */
        l *= corr;
#pragma unroll
        for (int d = 0; d < HDM; d++) o[d] *= corr;
        m = mn;
#pragma unroll
        for (int jj = 0; jj < BK; jj++) {
            if (s[jj] == -INFINITY) continue;
            const float p = expf(s[jj] - m);
            l += p;
            axpy_sh<HDM>(o, p, Vs + jj * HDM);
        }
    }
    if (!valid) return;
    T *orow = out + (((size_t)b * a.T + t) * a.H + h) * a.hd;
    if (m == -INFINITY) {
        for (int d = 0; d < a.hd; d++) orow[d] = cv<T>(0.0f);
        lse[(size_t)bh * a.T + t] = -INFINITY;
        return;
    }
    const float inv = 1.0f / l;
#pragma unroll
    for (int d = 0; d < HDM; d++)
        if (d < a.hd) orow[d] = cv<T>(o[d] * inv);
    lse[(size_t)bh * a.T + t] = m + logf(l);
}

/* dq per query; also writes Dt = dout . out for the key kernels */
template <typename T, int HDM>
__global__ void __launch_bounds__(BQ) attn_dq_kernel(T *dq, float *Dt, const T *dout, const T *out, const float *lse,
                                                     const T *q, const T *k, const T *v, attn_p a)
{
    constexpr int BK = kt<HDM>::BK;
    __shared__ __align__(16) float Ks[BK * HDM];
    __shared__ __align__(16) float Vs[BK * HDM];
    __shared__ int km[BK];
    __shared__ float kp[BK];
    int bh, tile;
    attn_block(a, bh, tile);
    const int b = bh / a.H, h = bh % a.H, g = h / (a.H / a.KV);
    const int t = tile * BQ + threadIdx.x;
    const int off = a.Tk - a.T, qpos = off + t;
    const bool valid = t < a.T;
    const float slope = a.slopes ? a.slopes[h] : 0.0f;
    const T *kb = k + ((size_t)b * a.KV + g) * a.cap * a.hd;
    const T *vb = v + ((size_t)b * a.KV + g) * a.cap * a.hd;
    const int32_t *kmb = a.kmask + (size_t)b * a.kstride, *kpb = a.kpos + (size_t)b * a.kstride;
    const int32_t qseg = valid ? kmb[qpos] : 0;

    float qr[HDM], go[HDM], acc[HDM];
    float L = -INFINITY, D = 0.0f;
    if (valid) {
        const size_t orow = (((size_t)b * a.T + t) * a.H + h) * a.hd;
        load_row<T, HDM>(go, dout + orow, a.hd);
        load_row<T, HDM>(acc, out + orow, a.hd); /* out row, temporarily */
#pragma unroll
        for (int d = 0; d < HDM; d++) D = fmaf(go[d], acc[d], D);
        load_row<T, HDM>(qr, q + ((size_t)bh * a.T + t) * a.hd, a.hd);
        L = lse[(size_t)bh * a.T + t];
        Dt[(size_t)bh * a.T + t] = D;
    } else {
#pragma unroll
        for (int d = 0; d < HDM; d++) qr[d] = go[d] = 0.0f;
    }
#pragma unroll
    for (int d = 0; d < HDM; d++) acc[d] = 0.0f;
    const bool live = valid && L != -INFINITY;

    const int last_t = min(a.T - 1, tile * BQ + BQ - 1);
    const int kend = min(a.Tk, off + last_t + 1);
    for (int j0 = 0; j0 < kend; j0 += BK) {
        __syncthreads();
        load_tile<T, HDM>(Ks, kb, j0, BK, kend, a.hd);
        load_tile<T, HDM>(Vs, vb, j0, BK, kend, a.hd);
        for (int jj = threadIdx.x; jj < BK; jj += blockDim.x) {
            const int j = j0 + jj;
            km[jj] = j < kend ? kmb[j] : 0;
            kp[jj] = j < kend ? (float)kpb[j] : 0.0f;
        }
        __syncthreads();
        if (!live) continue;
#pragma unroll 4
        for (int jj = 0; jj < BK; jj++) {
            const int j = j0 + jj;
            if (j > qpos || !ft_key_visible(km[jj], qseg)) continue;
            float sc = dot_sh<HDM>(qr, Ks + jj * HDM);
            if (a.slopes) sc += slope * kp[jj];
            sc *= a.scale;
            const float p = expf(sc - L);
            const float dp = dot_sh<HDM>(go, Vs + jj * HDM);
            const float ds = p * (dp - D) * a.scale;
            axpy_sh<HDM>(acc, ds, Ks + jj * HDM);
        }
    }
    if (!valid) return;
    T *dqr = dq + ((size_t)bh * a.T + t) * a.hd;
#pragma unroll
    for (int d = 0; d < HDM; d++)
        if (d < a.hd) dqr[d] = cv<T>(acc[d]);
}

/* per (key, query head): WANT_DK = 0 -> dv_h = sum_t p dout_t; 1 -> dk_h = scale sum_t dS q_t.
 * Written f32 into [B, H, T, hd] scratch. Training only: Tk == T == cap. */
template <typename T, int HDM, int WANT_DK>
__global__ void __launch_bounds__(BQ) attn_dkv_kernel(float *dst, const T *dout, const float *lse, const float *Dt,
                                                      const T *q, const T *k, const T *v, attn_p a)
{
    constexpr int BT = kt<HDM>::BK; /* queries per shared tile */
    __shared__ __align__(16) float Qs[BT * HDM];
    __shared__ __align__(16) float Gs[BT * HDM];
    __shared__ float Ls[BT], Ds[BT];
    __shared__ int Qseg[BT]; /* segment of each query of the tile (Tk == T: query t is key t) */
    int bh, tile;
    attn_block(a, bh, tile);
    const int b = bh / a.H, h = bh % a.H, g = h / (a.H / a.KV);
    const int j = tile * BQ + threadIdx.x; /* key */
    const bool valid = j < a.T;
    const float slope = a.slopes ? a.slopes[h] : 0.0f;
    const size_t krow = (((size_t)b * a.KV + g) * a.cap + j) * a.hd;
    const int32_t *kmb = a.kmask + (size_t)b * a.kstride;
    const int32_t kseg = valid ? kmb[j] : 0;
    const bool live = kseg != 0;
    const float kpj = valid ? (float)a.kpos[(size_t)b * a.kstride + j] : 0.0f;

    float kr[HDM], vr[HDM], acc[HDM];
    if (live) {
        load_row<T, HDM>(kr, k + krow, a.hd);
        if (WANT_DK) load_row<T, HDM>(vr, v + krow, a.hd);
    } else {
#pragma unroll
        for (int d = 0; d < HDM; d++) kr[d] = vr[d] = 0.0f;
    }
#pragma unroll
    for (int d = 0; d < HDM; d++) acc[d] = 0.0f;

    const int t_first = tile * BQ; /* queries t >= key j can see it (Tk == T) */
    const T *qb = q + (size_t)bh * a.T * a.hd;
    for (int t0 = t_first; t0 < a.T; t0 += BT) {
        __syncthreads();
        load_tile<T, HDM>(Qs, qb, t0, BT, a.T, a.hd);
        for (int e = threadIdx.x; e < BT * HDM; e += blockDim.x) {
            const int r = e / HDM, d = e % HDM, t = t0 + r;
            Gs[e] = (d < a.hd && t < a.T) ? ld<T>(dout[(((size_t)b * a.T + t) * a.H + h) * a.hd + d]) : 0.0f;
        }
        for (int r = threadIdx.x; r < BT; r += blockDim.x) {
            const int t = t0 + r;
            Ls[r] = t < a.T ? lse[(size_t)bh * a.T + t] : -INFINITY;
            Ds[r] = t < a.T ? Dt[(size_t)bh * a.T + t] : 0.0f;
            Qseg[r] = t < a.T ? kmb[t] : 0;
        }
        __syncthreads();
        if (!live) continue;
#pragma unroll 2
        for (int r = 0; r < BT; r++) {
            const int t = t0 + r;
            if (t < j || Ls[r] == -INFINITY || !ft_key_visible(kseg, Qseg[r])) continue;
            float sc = dot_sh<HDM>(kr, Qs + r * HDM);
            if (a.slopes) sc += slope * kpj;
            sc *= a.scale;
            const float p = expf(sc - Ls[r]);
            if (WANT_DK) {
                const float dp = dot_sh<HDM>(vr, Gs + r * HDM);
                axpy_sh<HDM>(acc, p * (dp - Ds[r]) * a.scale, Qs + r * HDM);
            } else {
                axpy_sh<HDM>(acc, p, Gs + r * HDM);
            }
        }
    }
    if (!valid) return;
    float *o = dst + ((size_t)bh * a.T + j) * a.hd;
#pragma unroll
    for (int d = 0; d < HDM; d++)
        if (d < a.hd) o[d] = acc[d];
}

/* dk[b,g,t,:] = sum over the group's heads of the per-head f32 rows */
template <typename T> __global__ void group_sum_kernel(T *dst, const float *src, int B, int H, int KV, int Tn, int hd)
{
    const size_t n = (size_t)B * KV * Tn * hd;
    const int gs = H / KV;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int d = (int)(i % hd);
        const size_t r = i / hd;
        const int t = (int)(r % Tn);
        const int bg = (int)(r / Tn), b = bg / KV, g = bg % KV;
        float s = 0.0f;
        for (int hh = 0; hh < gs; hh++) s += src[((((size_t)b * H + g * gs + hh) * Tn) + t) * hd + d];
        dst[i] = cv<T>(s);
    }
}

static attn_p make_p(const ft_attn_args *a)
{
    attn_p p;
    p.B = a->B; p.H = a->H; p.KV = a->KV; p.T = a->T; p.Tk = a->Tk; p.cap = a->cap; p.hd = a->hd;
    p.scale = a->scale; p.kstride = a->kstride; p.kmask = a->kmask; p.kpos = a->kpos; p.slopes = a->slopes;
    return p;
}

#define HD_DISPATCH(hd, HDM, ...)                       \
    do {                                                \
        if ((hd) <= 32) { constexpr int HDM = 32; __VA_ARGS__; }        \
        else if ((hd) <= 64) { constexpr int HDM = 64; __VA_ARGS__; }   \
        else if ((hd) <= 128) { constexpr int HDM = 128; __VA_ARGS__; } \
        else { constexpr int HDM = 256; __VA_ARGS__; }                  \
    } while (0)

/* attn_choose (choice.cu) picks: decode (attention_decode.cu), gemm (default, attention_gemm.cu),
 * flash (FT_CUDA_ATTN=flash, the kernels above) or mma (FT_CUDA_ATTN=mma, attention_mma.cu). All save
 * the same lse, so a forward of one kind and a backward of another agree. */
extern "C" ft_status cuda_attention_fwd(ft_backend *base, void *out, float *lse, const void *q, const void *k,
                                        const void *v, const ft_attn_args *a, ft_error *err)
{
    const attn_kind kind = attn_choose(CB(base), a, k, v, (uintptr_t)q | (uintptr_t)out, 0);
    if (kind == ATTN_DECODE) return cuda_attention_decode(CB(base), out, lse, q, k, v, a, err);
    /* the paths below size their work from the host's Tk: fine when run directly, wrong in a
     * graph replayed at later steps (the caller then runs its steps uncaptured) */
    if (a->tk_dev && CB(base)->capturing)
        return ft_fail(err, FT_EUNSUPPORTED, "attention with Tk on the device needs the decode kernel");
    if (kind == ATTN_GEMM) return cuda_attention_fwd_gemm(base, out, lse, q, k, v, a, err);
    if (kind == ATTN_MMA) return cuda_attention_fwd_mma(CB(base), out, lse, q, k, v, a, err);
    if (a->hd > 256) return ft_fail(err, FT_EUNSUPPORTED, "CUDA attention supports head_dim <= 256, got %d", a->hd);
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    const attn_p p = make_p(a);
    const unsigned grid = attn_grid(a);
    if (!grid) return ft_fail(err, FT_EUNSUPPORTED, "attention: %d x %d heads x %d queries is too large", a->B, a->H, a->T);
    cudaStream_t s = CB(base)->stream;
    PROF_T0(CB(base));
    ACT_DISPATCH(base, T, HD_DISPATCH(a->hd, HDM, attn_fwd_kernel<T, HDM><<<grid, BQ, 0, s>>>(
                                                      (T *)out, lse, (const T *)q, (const T *)k, (const T *)v, p)));
    LAUNCH_CHECK("attention");
    PROF_MARK(CB(base), PR_ATT_F);
    return FT_OK;
}

extern "C" ft_status cuda_attention_bwd(ft_backend *base, void *dq, void *dk, void *dv, const void *dout,
                                        const void *out, const float *lse, const void *q, const void *k,
                                        const void *v, const ft_attn_args *a, ft_error *err)
{
    cuda_backend *be = CB(base);
    const uintptr_t others = (uintptr_t)q | (uintptr_t)out | (uintptr_t)dout | (uintptr_t)dq | (uintptr_t)dk |
                             (uintptr_t)dv;
    const attn_kind kind = attn_choose(be, a, k, v, others, 1);
    if (kind == ATTN_GEMM) return cuda_attention_bwd_gemm(base, dq, dk, dv, dout, out, lse, q, k, v, a, err);
    if (kind == ATTN_MMA) return cuda_attention_bwd_mma(be, dq, dk, dv, dout, out, lse, q, k, v, a, err);
    if (a->hd > 256) return ft_fail(err, FT_EUNSUPPORTED, "CUDA attention supports head_dim <= 256, got %d", a->hd);
    if (a->Tk != a->T || a->cap != a->T)
        return ft_fail(err, FT_EINVAL, "attention backward needs Tk == T == cap (training without cache)");
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    const attn_p p = make_p(a);
    const size_t nq = (size_t)a->B * a->H * a->T;
    const size_t per = nq * a->hd;
    const unsigned grid = attn_grid(a);
    if (!grid) return ft_fail(err, FT_EUNSUPPORTED, "attention: %d x %d heads x %d queries is too large", a->B, a->H, a->T);
    void *scr;
    FT_TRY(cuda_scratch(be, SCR_ATTN, (2 * per + nq) * sizeof(float), &scr, err));
    float *dk_h = (float *)scr, *dv_h = dk_h + per, *Dt = dv_h + per;
    cudaStream_t s = be->stream;
    const size_t nkv = (size_t)a->B * a->KV * a->T * a->hd;
    PROF_T0(be);
    ACT_DISPATCH(base, T, HD_DISPATCH(a->hd, HDM, {
        attn_dq_kernel<T, HDM><<<grid, BQ, 0, s>>>((T *)dq, Dt, (const T *)dout, (const T *)out, lse, (const T *)q,
                                                   (const T *)k, (const T *)v, p);
        PROF_MARK(be, PR_ATT_DQ);
        attn_dkv_kernel<T, HDM, 0><<<grid, BQ, 0, s>>>(dv_h, (const T *)dout, lse, Dt, (const T *)q, (const T *)k,
                                                       (const T *)v, p);
        PROF_MARK(be, PR_ATT_DV);
        attn_dkv_kernel<T, HDM, 1><<<grid, BQ, 0, s>>>(dk_h, (const T *)dout, lse, Dt, (const T *)q, (const T *)k,
                                                       (const T *)v, p);
        PROF_MARK(be, PR_ATT_DK);
        group_sum_kernel<T><<<grid_for(nkv, 256), 256, 0, s>>>((T *)dk, dk_h, a->B, a->H, a->KV, a->T, a->hd);
        group_sum_kernel<T><<<grid_for(nkv, 256), 256, 0, s>>>((T *)dv, dv_h, a->B, a->H, a->KV, a->T, a->hd);
        PROF_MARK(be, PR_ATT_SUM);
    }));
    LAUNCH_CHECK("attention backward");
    return FT_OK;
}
