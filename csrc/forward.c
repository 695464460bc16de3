/* forward.c -- what every step shares: input checks, token positions, the layer stack, the head;
 * and the plain forward (ft_forward: logits of every position, no cache).
 */
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"

ft_status check_ids(const ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, int mask_T,
                    int segments, ft_error *err)
{
    if (B <= 0 || T <= 0) return ft_fail(err, FT_EINVAL, "input_ids: expected a non-empty [batch, tokens] array");
    if ((int64_t)B * T > (1 << 26)) return ft_fail(err, FT_EINVAL, "input_ids: too many tokens (%d x %d)", B, T);
    /* the widest activation row: qkv, ffn, or the LoRA rank (heads x head_dim = hidden <= qkv) */
    const int64_t width = m->qkv_width > m->cfg.ffn ? m->qkv_width : m->cfg.ffn;
    const int64_t elems = (int64_t)B * T * (width > m->lora_r ? width : m->lora_r);
    if (elems > FT_MAX_ELEMS)
        return ft_fail(err, FT_EINVAL, "input_ids: %d x %d tokens need activations of %lld elements, more than the "
                       "engine's limit of 2^31 - 1 per tensor: use fewer tokens per batch", B, T, (long long)elems);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t id = ids[(size_t)b * T + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return ft_fail(err, FT_EINVAL, "input_ids[%d, %d] = %d is outside the vocabulary [0, %d)", b, t,
                               (int)id, m->cfg.vocab_size);
        }
    if (!mask) return FT_OK;
    for (int b = 0; b < B; b++) {
        int32_t prev = 0; /* the last segment id seen in this row */
        for (int j = 0; j < mask_T; j++) {
            const int32_t s = mask[(size_t)b * mask_T + j];
            if (s < 0 || (!segments && s > 1))
                return ft_fail(err, FT_EINVAL, "attention_mask[%d, %d] = %d: expected 0 or 1%s", b, j, (int)s,
                               segments ? " or a segment id > 0 (packed rows)"
                                        : " (segment ids need a call without the KV cache)");
            if (s != 0 && s < prev)
                return ft_fail(err, FT_EINVAL, "attention_mask[%d, %d] = %d: segment ids must not decrease along a "
                               "row (segment %d came earlier; each segment is one block of tokens)", b, j, (int)s,
                               (int)prev);
            if (s != 0) prev = s;
        }
    }
    return FT_OK;
}

/* A token's position counts the real tokens before it, so left and right padding both work. */
void token_positions(const int32_t *mask, int B, int T, int Tk, int32_t *pos, int32_t *kmask, int32_t *kpos,
                     int32_t *row_real)
{
    for (int b = 0; b < B; b++) {
        int32_t seen = 0, seg = 0, in_seg = 0; /* real tokens so far; current segment, its tokens so far */
        for (int j = 0; j < Tk; j++) {
            const int32_t mj = mask ? mask[(size_t)b * Tk + j] : 1;
            if (mj != 0 && mj != seg) {
                seg = mj;
                in_seg = 0;
            }
            if (kmask) {
                kmask[(size_t)b * Tk + j] = mj;
                kpos[(size_t)b * Tk + j] = mj ? in_seg : 0;
            }
            if (j >= Tk - T) pos[(size_t)b * T + j - (Tk - T)] = mj ? in_seg : seen;
            seen += mj != 0;
            in_seg += mj != 0;
        }
        if (row_real) row_real[b] = seen;
    }
}

ft_status prepare_step(ft_model *m, step_ctx *s, const int32_t *ids, const int32_t *tgt, const int32_t *mask, int B,
                       int T, ft_error *err)
{
    workspace *ws = &m->ws;
    const size_t N = (size_t)B * T, stride = ws->int_stride;
    /* ids, tgt, pos, kmask, kpos at the workspace's stride: one upload (profiled on an H200, five
     * pageable copies at the start of a step were ~140 us apart while the GPU waited) */
    int32_t *host = calloc(4 * stride + N, sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    memcpy(host, ids, N * sizeof(int32_t));
    if (tgt) memcpy(host + stride, tgt, N * sizeof(int32_t));
    token_positions(mask, B, T, T, host + 2 * stride, host + 3 * stride, host + 4 * stride, NULL);
    ft_status st = m->be->ops->upload(m->be, ws->ids, host, (4 * stride + N) * sizeof(int32_t), err);
    free(host);
    memset(s, 0, sizeof *s);
    s->B = B; s->T = T; s->N = (int)N; s->Tk = T; s->cap = T; s->past = 0; s->kstride = T;
    s->kmask = ws->kmask; s->kpos = ws->kpos; s->pos = ws->pos;
    return st;
}

/* Layers l0 .. l1-1; the embedding first when l0 == 0, ln_f last when l1 == n_layer. A step with a
 * backward keeps each layer's activations (a training workspace); otherwise every layer reuses the
 * shared set (inference, evaluation). */
ft_status run_layer_range(ft_model *m, const step_ctx *s, int l0, int l1, ft_error *err)
{
    workspace *ws = &m->ws;
    const int L = m->cfg.n_layer;
    if (l0 == 0) CALL(m->be->ops->embed(m->be, ws->xs[0], ws->ids, m->embed, s->N, m->cfg.hidden, err));
    for (int l = l0; l < l1; l++) {
        layer_acts *A = s->backward ? &ws->acts[l] : &ws->shared;
        CALL(layer_forward(m, s, l, A, ws->xs[l], ws->xs[l + 1], NULL, NULL, err));
    }
    if (l1 < L) return FT_OK;
    return m->be->ops->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, ws->xs[L], m->lnf_w, m->lnf_b, s->N,
                                     m->cfg.hidden, m->cfg.ln_eps, err);
}

ft_status head_logits(ft_model *m, const void *h, int n, float *logits, ft_error *err)
{
    workspace *ws = &m->ws;
    const int V = m->cfg.vocab_size, D = m->cfg.hidden;
    for (int r0 = 0; r0 < n; r0 += ws->chunk) {
        const int rows = n - r0 < ws->chunk ? n - r0 : ws->chunk;
        const char *hr = (const char *)h + act_bytes(m, (size_t)r0 * D);
        CALL(m->be->ops->lm_logits(m->be, ws->logits, hr, m->lm_head, rows, V, D, err));
        CALL(m->be->ops->download(m->be, logits + (size_t)r0 * V, ws->logits, (size_t)rows * V * sizeof(float), err));
    }
    return FT_OK;
}

ft_status ft_forward(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, float *logits,
                     ft_error *err)
{
    CALL(check_ids(m, ids, mask, B, T, T, 1, err));
    CALL(workspace_ensure(m, B * T, 0, err));
    step_ctx s;
    CALL(prepare_step(m, &s, ids, NULL, mask, B, T, err));
    s.train = 0;
    CALL(run_layer_range(m, &s, 0, m->cfg.n_layer, err));
    return head_logits(m, m->ws.hf, s.N, logits, err);
}
