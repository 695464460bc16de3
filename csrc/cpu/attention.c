/* attention.c -- qkv split + rotary, and causal softmax attention (CPU).
 *
 * Attention never stores the T x T probabilities: forward saves the
 * log-sum-exp per query and backward recomputes probabilities from it, the
 * same contract the CUDA flash kernels follow. Key masks hold segment ids (packed rows): a
 * query sees the causal keys ft_key_visible allows (backend.h).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

/* cos/sin of pos * theta^(-2i/hd) for i < hd/2 (NeoX rotate-half pairs i, i + hd/2). */
static void rope_table(float *cs, float *sn, int pos, int hd, float theta)
{
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        /* inverse frequency rounded to f32 first, as the reference computes it */
        float inv = (float)(1.0 / pow((double)theta, (2.0 * i) / hd));
        double ang = (double)((float)pos * inv);
        cs[i] = (float)cos(ang);
        sn[i] = (float)sin(ang);
    }
}

/* dst = rotate(src) (dir = +1) or its inverse (dir = -1) */
static void rope_apply(float *dst, const float *src, const float *cs, const float *sn, int hd, int dir)
{
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float x1 = src[i], x2 = src[i + half], s = dir * sn[i];
        dst[i] = x1 * cs[i] - x2 * s;
        dst[i + half] = x2 * cs[i] + x1 * s;
    }
}

ft_status cpu_qkv_split_fwd(ft_backend *be, void *q_, void *k_, void *v_, const void *qkv_,
                            const ft_qkv_args *a, ft_error *err)
{
    (void)be; (void)err;
    float *q = q_, *k = k_, *v = v_;
    const float *qkv = qkv_;
    const int hd = a->hd, H = a->H, KV = a->KV;
#pragma omp parallel for schedule(static) if ((long)a->B * a->T * a->qkv_width > 65536)
    for (int bt = 0; bt < a->B * a->T; bt++) {
        const int b = bt / a->T, t = bt % a->T;
        const float *row = qkv + (size_t)bt * a->qkv_width;
        float cs[512], sn[512]; /* hd <= 1024, checked by model.c */
        if (a->rope) rope_table(cs, sn, a->pos[bt], hd, a->theta);
        for (int h = 0; h < H; h++) {
            float *dst = q + (((size_t)b * H + h) * a->T + t) * hd;
            const float *src = row + a->cols[h];
            if (a->rope) rope_apply(dst, src, cs, sn, hd, 1);
            else memcpy(dst, src, hd * sizeof(float));
        }
        for (int g = 0; g < KV; g++) {
            size_t off = (((size_t)b * KV + g) * a->cap + a->past + t) * hd;
            const float *ks = row + a->cols[H + g], *vs = row + a->cols[H + KV + g];
            if (a->rope) rope_apply(k + off, ks, cs, sn, hd, 1);
            else memcpy(k + off, ks, hd * sizeof(float));
            memcpy(v + off, vs, hd * sizeof(float));
        }
    }
    return FT_OK;
}

ft_status cpu_qkv_split_bwd(ft_backend *be, void *dqkv_, const void *dq_, const void *dk_, const void *dv_,
                            const ft_qkv_args *a, ft_error *err)
{
    (void)be; (void)err;
    float *dqkv = dqkv_;
    const float *dq = dq_, *dk = dk_, *dv = dv_;
    const int hd = a->hd, H = a->H, KV = a->KV;
#pragma omp parallel for schedule(static) if ((long)a->B * a->T * a->qkv_width > 65536)
    for (int bt = 0; bt < a->B * a->T; bt++) {
        const int b = bt / a->T, t = bt % a->T;
        float *row = dqkv + (size_t)bt * a->qkv_width;
        float cs[512], sn[512];
        if (a->rope) rope_table(cs, sn, a->pos[bt], hd, a->theta);
        for (int h = 0; h < H; h++) {
            const float *src = dq + (((size_t)b * H + h) * a->T + t) * hd;
            if (a->rope) rope_apply(row + a->cols[h], src, cs, sn, hd, -1);
            else memcpy(row + a->cols[h], src, hd * sizeof(float));
        }
        for (int g = 0; g < KV; g++) {
            size_t off = (((size_t)b * KV + g) * a->cap + a->past + t) * hd;
            if (a->rope) rope_apply(row + a->cols[H + g], dk + off, cs, sn, hd, -1);
            else memcpy(row + a->cols[H + g], dk + off, hd * sizeof(float));
            memcpy(row + a->cols[H + KV + g], dv + off, hd * sizeof(float));
        }
    }
    return FT_OK;
}

/* Pointers to the rows of one (b, h) query stream and its kv head. */
typedef struct attn_view {
    const float *q;    /* [T, hd] */
    const float *k, *v; /* [cap, hd] */
    const int32_t *kmask, *kpos;
    float slope;
    int first_q_pos; /* key position of query 0: Tk - T */
} attn_view;

static attn_view view_of(const ft_attn_args *a, const float *q, const float *k, const float *v, int b, int h)
{
    const int g = h / (a->H / a->KV);
    attn_view w;
    w.q = q + ((size_t)b * a->H + h) * a->T * a->hd;
    w.k = k + ((size_t)b * a->KV + g) * a->cap * a->hd;
    w.v = v + ((size_t)b * a->KV + g) * a->cap * a->hd;
    w.kmask = a->kmask + (size_t)b * a->kstride;
    w.kpos = a->kpos + (size_t)b * a->kstride;
    w.slope = a->slopes ? a->slopes[h] : 0.0f;
    w.first_q_pos = a->Tk - a->T;
    return w;
}

/* score of query t against key j: (q.k + alibi) * scale */
static inline float score(const ft_attn_args *a, const attn_view *w, int t, int j)
{
    float s = cpu_dot(w->q + (size_t)t * a->hd, w->k + (size_t)j * a->hd, a->hd);
    if (a->slopes) s += w->slope * (float)w->kpos[j];
    return s * a->scale;
}

ft_status cpu_attention_fwd(ft_backend *be, void *out_, float *lse, const void *q, const void *k,
                            const void *v, const ft_attn_args *a, ft_error *err)
{
    (void)be;
    float *out = out_;
    const int hd = a->hd, T = a->T, H = a->H;
    int failed = 0;
    /* (b, h) pairs, queries and keys are counted in int64: B*H*T can pass 2^31 */
    const int64_t n_bh = (int64_t)a->B * H;
#pragma omp parallel for schedule(dynamic) if (n_bh * T * a->Tk * hd > 100000)
    for (int64_t bh = 0; bh < n_bh; bh++) {
        const int b = (int)(bh / H), h = (int)(bh % H);
        attn_view w = view_of(a, q, k, v, b, h);
        float *p = malloc((size_t)a->Tk * sizeof(float));
        if (!p) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int t = 0; t < T; t++) {
            const int last = w.first_q_pos + t; /* causal: keys 0..last */
            const int32_t qseg = w.kmask[last];
            float *o = out + ((size_t)b * T + t) * H * hd + (size_t)h * hd;
            float mx = -INFINITY;
            for (int j = 0; j <= last; j++) {
                p[j] = ft_key_visible(w.kmask[j], qseg) ? score(a, &w, t, j) : -INFINITY;
                if (p[j] > mx) mx = p[j];
            }
            memset(o, 0, hd * sizeof(float));
            if (mx == -INFINITY) { /* no visible key (a left-padding query) */
                lse[(size_t)bh * T + t] = -INFINITY;
                continue;
            }
            double sum = 0.0;
            for (int j = 0; j <= last; j++) {
                p[j] = p[j] == -INFINITY ? 0.0f : expf(p[j] - mx);
                sum += p[j];
            }
            const float inv = (float)(1.0 / sum);
            for (int j = 0; j <= last; j++) {
                if (p[j] == 0.0f) continue;
                const float pj = p[j] * inv;
                const float *vr = w.v + (size_t)j * hd;
                for (int d = 0; d < hd; d++) o[d] += pj * vr[d];
            }
            lse[(size_t)bh * T + t] = mx + (float)log(sum);
        }
        free(p);
    }
    if (failed) return ft_fail(err, FT_ENOMEM, "out of host memory (attention)");
    return FT_OK;
}

/* Backward, in two row-parallel passes that each recompute the probabilities:
 *   p_tj = exp(s_tj - lse_t), dP_tj = dout_t . v_j, D_t = dout_t . out_t
 *   dS_tj = p_tj (dP_tj - D_t)
 *   dq_t = scale sum_j dS_tj k_j                      (pass 1, per query)
 *   dk_j = scale sum_{h in group, t} dS_tj q_t,  dv_j = sum p_tj dout_t   (pass 2, per key) */
ft_status cpu_attention_bwd(ft_backend *be, void *dq_, void *dk_, void *dv_, const void *dout_,
                            const void *out_, const float *lse, const void *q, const void *k,
                            const void *v, const ft_attn_args *a, ft_error *err)
{
    (void)be;
    float *dq = dq_, *dk = dk_, *dv = dv_;
    const float *dout = dout_, *out = out_;
    const int hd = a->hd, T = a->T, H = a->H, KV = a->KV, gs = H / KV;
    const size_t row = (size_t)H * hd; /* stride between tokens in out/dout */
    float *Dt = malloc((size_t)a->B * H * T * sizeof(float));
    if (!Dt) return ft_fail(err, FT_ENOMEM, "out of host memory (attention backward)");
    const int64_t n_q = (int64_t)a->B * H * T, n_k = (int64_t)a->B * KV * T;
    const int big = n_q * T * hd > 100000;

#pragma omp parallel for schedule(static) if (big)
    for (int64_t bht = 0; bht < n_q; bht++) {
        const int t = (int)(bht % T), h = (int)(bht / T % H), b = (int)(bht / ((int64_t)T * H));
        const float *go = dout + ((size_t)b * T + t) * row + (size_t)h * hd;
        Dt[bht] = cpu_dot(go, out + ((size_t)b * T + t) * row + (size_t)h * hd, hd);
    }

#pragma omp parallel for schedule(dynamic) if (big)
    for (int64_t bht = 0; bht < n_q; bht++) {
        const int t = (int)(bht % T), h = (int)(bht / T % H), b = (int)(bht / ((int64_t)T * H));
        attn_view w = view_of(a, q, k, v, b, h);
        float *dqr = dq + (size_t)bht * hd;
        memset(dqr, 0, hd * sizeof(float));
        const float l = lse[bht];
        if (l == -INFINITY) continue;
        const float *go = dout + ((size_t)b * T + t) * row + (size_t)h * hd;
        const int32_t qseg = w.kmask[w.first_q_pos + t];
        for (int j = 0; j <= w.first_q_pos + t; j++) {
            if (!ft_key_visible(w.kmask[j], qseg)) continue;
            float p = expf(score(a, &w, t, j) - l);
            float ds = p * (cpu_dot(go, w.v + (size_t)j * hd, hd) - Dt[bht]) * a->scale;
            const float *kr = w.k + (size_t)j * hd;
            for (int d = 0; d < hd; d++) dqr[d] += ds * kr[d];
        }
    }

#pragma omp parallel for schedule(dynamic) if (big)
    for (int64_t bgj = 0; bgj < n_k; bgj++) {
        const int j = (int)(bgj % T), g = (int)(bgj / T % KV), b = (int)(bgj / ((int64_t)T * KV));
        float *dkr = dk + (size_t)bgj * hd, *dvr = dv + (size_t)bgj * hd;
        memset(dkr, 0, hd * sizeof(float));
        memset(dvr, 0, hd * sizeof(float));
        const int32_t *kmb = a->kmask + (size_t)b * a->kstride;
        if (!kmb[j]) continue;
        for (int h = g * gs; h < (g + 1) * gs; h++) {
            attn_view w = view_of(a, q, k, v, b, h);
            const float *vr = w.v + (size_t)j * hd;
            for (int t = j - w.first_q_pos; t < T; t++) {
                if (t < 0 || !ft_key_visible(kmb[j], kmb[w.first_q_pos + t])) continue;
                const size_t bht = ((size_t)b * H + h) * T + t;
                const float l = lse[bht];
                if (l == -INFINITY) continue;
                const float *go = dout + ((size_t)b * T + t) * row + (size_t)h * hd;
                float p = expf(score(a, &w, t, j) - l);
                float ds = p * (cpu_dot(go, vr, hd) - Dt[bht]) * a->scale;
                const float *qr = w.q + (size_t)t * hd;
                for (int d = 0; d < hd; d++) {
                    dkr[d] += ds * qr[d];
                    dvr[d] += p * go[d];
                }
            }
        }
    }
    free(Dt);
    return FT_OK;
}
