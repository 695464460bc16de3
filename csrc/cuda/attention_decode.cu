/* attention_decode.cu -- attention for one new token per row (decode with the KV cache).
 *
 * T == 1: each (row b, query head h) has one query against the Tk keys of its kv head. The
 * cuBLAS path (attention_gemm.cu) spends ~6 launches and ~12 us per layer on this; here it is
 * one launch. Block (b*H + h, s) takes keys [s*AD_KEYS, s*AD_KEYS + AD_KEYS):
 *
 *   load     the block's K and V rows into shared memory, every 16-byte load issued at once
 *            (a loop of dependent global loads per key was latency bound: ~8 us per call)
 *   scores   two threads per key: s_j = (q . k_j + slope * kpos_j) * scale, -inf where masked
 *   softmax  block max m, p_j = exp(s_j - m), block sum l
 *   p V      thread (pair i of head dims, key group g) sums p_j v_j[2i..2i+1] over its keys;
 *            the groups are added in a fixed order (deterministic)
 *
 * One split writes out = acc / l and lse = m + log l directly. With several splits each block
 * stores (m, l, acc[hd]) in f32 scratch; the last block of a head to arrive (arrival counter
 * per head, reset by that block) merges the splits in split order, as flash-decoding does.
 * A query with no visible key gets out = 0, lse = -inf (the contract of backend.h).
 */
#include <math.h>

#include "cuda.cuh"

namespace {

/* AD_THREADS, AD_KEYS (keys per block) and AD_HD (largest head dim) are in cuda.cuh: the choice
 * (choice.cu) tests them */
constexpr int AD_PAD = 8;               /* shared row padding (elements): rows start on different banks */

struct ad_p {
    int H, KV, Tk, cap, hd, splits, kstride;
    const int32_t *tk_dev; /* Tk on the device (graph replay), or NULL */
    float scale;
    const int32_t *kmask, *kpos;
    const float *slopes;
};

template <typename T>
__global__ void __launch_bounds__(AD_THREADS)
attn_decode_kernel(T *__restrict__ out, float *__restrict__ lse, const T *__restrict__ q, const T *__restrict__ k,
                   const T *__restrict__ v, ad_p a, float *__restrict__ part, int *__restrict__ cnt)
{
    extern __shared__ __align__(16) unsigned char ad_smem[]; /* K tile, V tile: [AD_KEYS][hd + AD_PAD] of T */
    __shared__ float qs[AD_HD];
    __shared__ float p[AD_KEYS];
    __shared__ float acc_sh[AD_THREADS * 2];
    __shared__ float red[32];
    __shared__ int s_last;
    const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H, g = h / (a.H / a.KV);
    const int s = blockIdx.y;
    const int Tk = a.tk_dev ? *a.tk_dev : a.Tk;
    const int j0 = s * AD_KEYS, nk = max(0, min(Tk - j0, AD_KEYS)); /* 0: a split past Tk (graphs) */
    const int hd = a.hd, tid = threadIdx.x, ld_row = hd + AD_PAD;
    T *Ks = (T *)ad_smem, *Vs = Ks + (size_t)AD_KEYS * ld_row;
    const T *kb = k + (((size_t)b * a.KV + g) * a.cap + j0) * hd;
    const T *vb = v + (((size_t)b * a.KV + g) * a.cap + j0) * hd;
    const int32_t *kmb = a.kmask + (size_t)b * a.kstride + j0, *kpb = a.kpos + (size_t)b * a.kstride + j0;
    const float slope = a.slopes ? a.slopes[h] : 0.0f;

    /* K and V rows [0, nk) -> shared, 16 bytes per load (hd % 16 == 0, checked by
     * attn_decode_check: the score loop reads each half row, hd / 2 elements in, as 16-byte vectors) */
    const int vrow = hd / 8, nvec = nk * vrow;
    for (int e = tid; e < nvec; e += AD_THREADS) {
        const int r = e / vrow, c = e % vrow;
        *(uint4 *)(Ks + (size_t)r * ld_row + 8 * c) = __ldg((const uint4 *)(kb + (size_t)r * hd) + c);
        *(uint4 *)(Vs + (size_t)r * ld_row + 8 * c) = __ldg((const uint4 *)(vb + (size_t)r * hd) + c);
    }
    for (int d = tid; d < hd; d += AD_THREADS) qs[d] = ld<T>(q[(size_t)bh * hd + d]);
    __syncthreads();

    /* scores: threads 2j, 2j + 1 take the two halves of key j's dot product */
    const int jj = tid >> 1, half = tid & 1;
    const bool live = jj < nk && kmb[jj];
    float dot = 0.0f;
    if (live) {
        const T *kr = Ks + (size_t)jj * ld_row + half * (hd / 2);
        const float *qh = qs + half * (hd / 2);
        float d0 = 0.0f, d1 = 0.0f;
        for (int c = 0; c < hd / 2; c += 8) {
            const uint4 w = *(const uint4 *)(kr + c);
            const T *e = (const T *)&w;
#pragma unroll
            for (int i = 0; i < 8; i += 2) {
                d0 = fmaf(qh[c + i], ld<T>(e[i]), d0);
                d1 = fmaf(qh[c + i + 1], ld<T>(e[i + 1]), d1);
            }
        }
        dot = d0 + d1;
    }
    dot += __shfl_xor_sync(0xffffffffu, dot, 1);
    float sc = -INFINITY;
    if (live) {
        if (a.slopes) dot += slope * (float)kpb[jj];
        sc = dot * a.scale;
    }
    const float m = block_max(sc, red);
    const float e = m == -INFINITY || sc == -INFINITY ? 0.0f : expf(sc - m);
    if (!half) p[jj] = e;
    const float l = block_sum(half ? 0.0f : e, red); /* its barriers also publish p[] */

    /* p V: thread (pair pi, group gr); groups split the keys round robin */
    const int pairs = hd / 2, groups = AD_THREADS / pairs;
    const int pi = tid % pairs, gr = tid / pairs;
    if (gr < groups) {
        float a0 = 0.0f, a1 = 0.0f;
        for (int j = gr; j < nk; j += groups) {
            const float w = p[j];
            const T *vr = Vs + (size_t)j * ld_row + 2 * pi;
            a0 = fmaf(w, ld<T>(vr[0]), a0);
            a1 = fmaf(w, ld<T>(vr[1]), a1);
        }
        acc_sh[2 * tid] = a0;
        acc_sh[2 * tid + 1] = a1;
    }
    __syncthreads();

    if (a.splits == 1) {
        for (int d = tid; d < hd; d += AD_THREADS) { /* sum over groups, in group order */
            float o = 0.0f;
            for (int q2 = 0; q2 < groups; q2++) o += acc_sh[2 * (q2 * pairs + d / 2) + d % 2];
            out[(size_t)bh * hd + d] = cv<T>(m == -INFINITY ? 0.0f : o / l);
        }
        if (tid == 0) lse[bh] = m == -INFINITY ? -INFINITY : m + logf(l);
        return;
    }
    /* partials [bh][split]: m, l, acc[hd] */
    float *pp = part + ((size_t)bh * a.splits + s) * (hd + 2);
    for (int d = tid; d < hd; d += AD_THREADS) {
        float o = 0.0f;
        for (int q2 = 0; q2 < groups; q2++) o += acc_sh[2 * (q2 * pairs + d / 2) + d % 2];
        pp[2 + d] = o;
    }
    if (tid == 0) {
        pp[0] = m;
        pp[1] = l;
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(cnt + bh, 1) == a.splits - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    const float *pb = part + (size_t)bh * a.splits * (hd + 2);
    float M = -INFINITY;
    for (int i = 0; i < a.splits; i++) M = fmaxf(M, __ldcg(pb + (size_t)i * (hd + 2)));
    float L = 0.0f;
    if (M != -INFINITY)
        for (int i = 0; i < a.splits; i++) {
            const float mi = __ldcg(pb + (size_t)i * (hd + 2));
            if (mi != -INFINITY) L += __ldcg(pb + (size_t)i * (hd + 2) + 1) * expf(mi - M);
        }
    for (int d = tid; d < hd; d += AD_THREADS) {
        float O = 0.0f;
        if (M != -INFINITY)
            for (int i = 0; i < a.splits; i++) {
                const float *pi_ = pb + (size_t)i * (hd + 2);
                const float mi = __ldcg(pi_);
                if (mi != -INFINITY) O += __ldcg(pi_ + 2 + d) * expf(mi - M);
            }
        out[(size_t)bh * hd + d] = cv<T>(M == -INFINITY ? 0.0f : O / L);
    }
    if (tid == 0) {
        lse[bh] = M == -INFINITY ? -INFINITY : M + logf(L);
        cnt[bh] = 0; /* every split has arrived: ready for the next call */
    }
}

} // namespace

/* runs when attn_choose (choice.cu) said ATTN_DECODE: its conditions hold */
ft_status cuda_attention_decode(cuda_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                                const ft_attn_args *a, ft_error *err)
{
    const int bhn = a->B * a->H;
    /* with Tk on the device the grid covers the whole cache: splits past Tk only report -inf */
    const int splits = attn_decode_splits(a);
    float *part = NULL;
    if (splits > 1) {
        void *pv;
        FT_TRY(cuda_scratch(be, SCR_ATTN, (size_t)bhn * splits * (a->hd + 2) * sizeof(float), &pv, err));
        part = (float *)pv;
        if (bhn > be->attn_cnt_n) { /* arrival counters: zero between calls */
            if (be->capturing) return ft_fail(err, FT_ESTATE, "attention counters would grow during graph capture");
            be->scratch_gen++;
            cuda_free_ptr(be, be->attn_cnt);
            be->attn_cnt = NULL;
            be->attn_cnt_n = 0;
            void *c;
            FT_TRY(cuda_malloc(be, (size_t)bhn * sizeof(int), &c, err, "attention counters"));
            CUDA_TRY(cudaMemsetAsync(c, 0, (size_t)bhn * sizeof(int), be->stream), "attention counters");
            be->attn_cnt = (int *)c;
            be->attn_cnt_n = bhn;
        }
    }
    ad_p p;
    p.H = a->H; p.KV = a->KV; p.Tk = a->Tk; p.cap = a->cap; p.hd = a->hd; p.splits = splits;
    p.kstride = a->kstride;
    p.tk_dev = a->tk_dev;
    p.scale = a->scale; p.kmask = a->kmask; p.kpos = a->kpos; p.slopes = a->slopes;
    PROF_T0(be);
    const dim3 grid(bhn, splits);
    const size_t smem = 2 * (size_t)AD_KEYS * (a->hd + AD_PAD) * ft_dtype_size(be->base.act_dtype);
    ACT_DISPATCH(&be->base, T,
                 attn_decode_kernel<T><<<grid, AD_THREADS, smem, be->stream>>>((T *)out, lse, (const T *)q, (const T *)k,
                                                                            (const T *)v, p, part, be->attn_cnt));
    LAUNCH_CHECK("decode attention");
    PROF_MARK(be, PR_ATT_F);
    return FT_OK;
}
