/* layer.c -- one Falcon decoder layer, forward and backward side by side.
 *
 * Forward, with the buffers each step writes (N = B*T rows):
 *
 *   a1  [N,D]  = layernorm(x)                      ln_attn / input_layernorm
 *   qkv [N,W]  = Wqkv a1 (+ LoRA)                  query_key_value
 *   q [B,H,T,hd], k/v [B,KV,cap,hd] = split(qkv) + rotary   (k/v: the cache when decoding)
 *   ctx [N,D]  = causal softmax attention(q, k, v) (lse [B,H,T] saved)
 *   ao  [N,D]  = Wd ctx (+ LoRA)                   dense
 *   mlp input  = a1 (7B: one layernorm), a2 = ln_mlp(x) (40B), or a2 = ln(r), r = x + ao (RW)
 *   h   [N,F]  = W1 (mlp input) (+ LoRA)           dense_h_to_4h
 *   mo  [N,D]  = W2 gelu(h) (+ LoRA)               dense_4h_to_h
 *   y   [N,D]  = x + ao + mo (parallel) or r + mo
 *
 * Backward walks the same list upwards; only LoRA parameters get gradients (the quantized
 * weights and layer norms are frozen), so a linear's input gradient is skipped where nothing
 * consumes it.
 */
#include <math.h>

#include "model_internal.h"
#include "rng.h"

/* Each (step, layer, module) draws its own dropout mask: the LoRA ops XOR this fixed seed of the
 * (layer, module) with the step's dropout base, which the step gives the backend once
 * (set_dropout_base, train.c). Backward and a checkpointed layer's recomputation regenerate the
 * same mask, and the ops' arguments stay the same from step to step (a recorded step replays). */
static uint64_t dropout_seed(int l, int mod)
{
    return ft_mix64((uint64_t)l * FT_NMOD + (uint64_t)mod);
}

/* Whether a step's linears run with their LoRA and the elementwise op after them as one
 * qlinear_fwd_epi: the backend has it and no backward reads the step (the pre-GELU h, the product
 * before the residual). Without a backward there is no dropout either, which the op does not draw. */
static int fuse_epilogues(const ft_model *m, const step_ctx *s)
{
    return m->be->ops->qlinear_fwd_epi && !s->backward && !s->train;
}

/* y = post(W x + LoRA) as one qlinear_fwd_epi (fuse_epilogues), the LoRA A output in xa; post may be
 * NULL. A module with neither LoRA nor post is a plain qlinear_fwd. */
static ft_status linear_fwd_fused(ft_model *m, const step_ctx *s, int l, int mod, void *y, const void *x, float *xa,
                                  const ft_epilogue *post, ft_error *err)
{
    const ft_backend_ops *op = m->be->ops;
    const ft_qlinear *lin = m->layers[l].lin[mod];
    if (!has_lora(m, mod) && !post) return op->qlinear_fwd(m->be, y, x, lin, s->N, err);
    ft_epilogue e = {0, NULL, NULL, NULL, NULL, NULL, 0, 0.0f};
    if (post) e = *post;
    if (has_lora(m, mod)) {
        float *A, *Bm;
        size_t na, nb;
        CALL(lora_locate(m, FT_LORA_WEIGHT, l, mod, &A, &Bm, &na, &nb, err));
        e.lora_A = A;
        e.lora_B = Bm;
        e.lora_xa = xa;
        e.lora_r = m->lora_r;
        e.lora_scale = m->lora_scale;
    }
    return op->qlinear_fwd_epi(m->be, y, x, lin, s->N, &e, err);
}

/* y = W x (+ LoRA), the LoRA A output saved in xa (one qlinear_fwd_epi where fuse_epilogues) */
static ft_status linear_fwd(ft_model *m, const step_ctx *s, int l, int mod, void *y, const void *x, float *xa,
                            ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (fuse_epilogues(m, s)) return linear_fwd_fused(m, s, l, mod, y, x, xa, NULL, err);
    CALL(m->be->ops->qlinear_fwd(m->be, y, x, m->layers[l].lin[mod], s->N, err));
    if (!has_lora(m, mod)) return FT_OK;
    float *A, *Bm;
    size_t na, nb;
    CALL(lora_locate(m, FT_LORA_WEIGHT, l, mod, &A, &Bm, &na, &nb, err));
    const float p = s->train ? m->lora_dropout : 0.0f;
    return m->be->ops->lora_fwd(m->be, y, xa, x, A, Bm, s->N, mod_in(c, mod), mod_out(c, mod, m->qkv_width),
                                m->lora_r, m->lora_scale, p, dropout_seed(l, mod), err);
}

/* dx (= or +=) W^T dy, plus the LoRA gradients. dx == NULL: input gradient not needed. */
static ft_status linear_bwd(ft_model *m, const step_ctx *s, int l, int mod, void *dx, int accumulate,
                            const void *dy, const void *x, const float *xa, ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (dx) CALL(m->be->ops->qlinear_bwd(m->be, dx, dy, m->layers[l].lin[mod], s->N, accumulate, err));
    if (!has_lora(m, mod)) return FT_OK;
    float *A, *Bm, *dA, *dB;
    size_t na, nb;
    CALL(lora_locate(m, FT_LORA_WEIGHT, l, mod, &A, &Bm, &na, &nb, err));
    CALL(lora_locate(m, FT_LORA_GRAD, l, mod, &dA, &dB, &na, &nb, err));
    const float p = s->train ? m->lora_dropout : 0.0f;
    return m->be->ops->lora_bwd(m->be, dx, dA, dB, dy, x, xa, A, Bm, s->N, mod_in(c, mod),
                                mod_out(c, mod, m->qkv_width), m->lora_r, m->lora_scale, p,
                                dropout_seed(l, mod), err);
}

static void attn_args(const ft_model *m, const step_ctx *s, ft_attn_args *a)
{
    const ft_config *c = &m->cfg;
    a->B = s->B; a->H = c->n_head; a->KV = c->n_kv_head; a->T = s->T;
    a->Tk = s->Tk; a->cap = s->cap; a->hd = c->head_dim;
    a->scale = 1.0f / sqrtf((float)c->head_dim);
    a->kstride = s->kstride; a->kmask = s->kmask; a->kpos = s->kpos; a->slopes = m->slopes;
    a->tk_dev = s->tk_dev;
}

static void qkv_args(const ft_model *m, const step_ctx *s, ft_qkv_args *a)
{
    const ft_config *c = &m->cfg;
    a->B = s->B; a->T = s->T; a->H = c->n_head; a->KV = c->n_kv_head; a->hd = c->head_dim;
    a->qkv_width = m->qkv_width; a->cap = s->cap; a->past = s->past;
    a->cols = m->qkv_cols; a->pos = s->pos; a->rope = !c->alibi; a->theta = c->rope_theta;
    a->past_dev = s->past_dev;
}

/* y[N,D] = layer l (x[N,D]). k/v go to kbuf/vbuf (cache) when given, else to A. */
ft_status layer_forward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x, void *y,
                        void *kbuf, void *vbuf, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    const layer_weights *lw = &m->layers[l];
    workspace *ws = &m->ws;
    const int N = s->N, D = c->hidden;
    void *k = kbuf ? kbuf : A->k, *v = vbuf ? vbuf : A->v;

    /* attention branch: a1 = ln(x); qkv = W a1; q,k,v = split + rotary; ctx = attn; ao = Wd ctx */
    const int fused = fuse_epilogues(m, s);
    CALL(op->layernorm_fwd(m->be, A->a1, A->mean1, A->rstd1, x, lw->ln1_w, lw->ln1_b, N, D, c->ln_eps, err));
    CALL(linear_fwd(m, s, l, FT_MOD_QKV, ws->qkv, A->a1, A->xa[FT_MOD_QKV], err));
    ft_qkv_args qa;
    qkv_args(m, s, &qa);
    CALL(op->qkv_split_fwd(m->be, A->q, k, v, ws->qkv, &qa, err));
    ft_attn_args aa;
    attn_args(m, s, &aa);
    CALL(op->attention_fwd(m->be, A->ctx, A->lse, A->q, k, v, &aa, err));
    CALL(linear_fwd(m, s, l, FT_MOD_DENSE, ws->attn_o, A->ctx, A->xa[FT_MOD_DENSE], err));

    /* mlp input: the same ln output, ln_mlp(x), or post_attention_layernorm(x + ao) */
    const void *mlp_in = A->a1;
    if (c->parallel_attn && c->n_ln == 2) {
        CALL(op->layernorm_fwd(m->be, A->a2, A->mean2, A->rstd2, x, lw->ln2_w, lw->ln2_b, N, D, c->ln_eps, err));
        mlp_in = A->a2;
    } else if (!c->parallel_attn) {
        CALL(op->add(m->be, A->r, x, ws->attn_o, NULL, (size_t)N * D, err));
        CALL(op->layernorm_fwd(m->be, A->a2, A->mean2, A->rstd2, A->r, lw->ln2_w, lw->ln2_b, N, D, c->ln_eps, err));
        mlp_in = A->a2;
    }
    /* mlp: h = W1 in; g = gelu(h); mo = W2 g (g straight from the product where it fuses: decode,
     * prefill, evaluation) */
    if (fused) {
        const ft_epilogue gelu = {1, NULL, NULL, NULL, NULL, NULL, 0, 0.0f};
        CALL(linear_fwd_fused(m, s, l, FT_MOD_H_TO_4H, ws->g, mlp_in, A->xa[FT_MOD_H_TO_4H], &gelu, err));
    } else {
        CALL(linear_fwd(m, s, l, FT_MOD_H_TO_4H, A->h, mlp_in, A->xa[FT_MOD_H_TO_4H], err));
        CALL(op->gelu_fwd(m->be, ws->g, A->h, (size_t)N * c->ffn, err));
    }

    /* residual: y = x + ao + mo (parallel) or r + mo, added to the product itself where it fuses */
    const void *r1 = c->parallel_attn ? x : A->r, *r2 = c->parallel_attn ? ws->attn_o : NULL;
    if (fused) {
        const ft_epilogue residual = {0, r1, r2, NULL, NULL, NULL, 0, 0.0f};
        return linear_fwd_fused(m, s, l, FT_MOD_4H_TO_H, y, ws->g, A->xa[FT_MOD_4H_TO_H], &residual, err);
    }
    CALL(linear_fwd(m, s, l, FT_MOD_4H_TO_H, ws->mlp_o, ws->g, A->xa[FT_MOD_4H_TO_H], err));
    return op->add(m->be, y, r1, r2 ? r2 : ws->mlp_o, r2 ? ws->mlp_o : NULL, (size_t)N * D, err);
}

/* On entry ws->dres holds dL/dy of layer l; on exit dL/dx (when need_dx). */
ft_status layer_backward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x,
                         int need_dx, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    const layer_weights *lw = &m->layers[l];
    workspace *ws = &m->ws;
    const int N = s->N, D = c->hidden;
    const int shared_ln = c->parallel_attn && c->n_ln == 1;
    const void *mlp_in = shared_ln ? A->a1 : A->a2;
    void *dmlp_in = shared_ln ? ws->da1 : ws->da2;
    /* the mlp input gradient is needed below unless nothing consumes it */
    const int need_dmlp = need_dx || !c->parallel_attn;

    /* mlp: dg = W2^T dres; dh = gelu'(h) dg; d(mlp_in) = W1^T dh */
    if (has_lora(m, FT_MOD_4H_TO_H)) CALL(op->gelu_fwd(m->be, ws->g, A->h, (size_t)N * c->ffn, err));
    CALL(linear_bwd(m, s, l, FT_MOD_4H_TO_H, ws->dh, 0, ws->dres, ws->g, A->xa[FT_MOD_4H_TO_H], err));
    CALL(op->gelu_bwd(m->be, ws->dh, ws->dh, A->h, (size_t)N * c->ffn, err));
    CALL(linear_bwd(m, s, l, FT_MOD_H_TO_4H, need_dmlp ? dmlp_in : NULL, 0, ws->dh, mlp_in,
                    A->xa[FT_MOD_H_TO_4H], err));
    if (!c->parallel_attn) /* dr = dy + ln2'(d mlp_in): the attention branch sees dr */
        CALL(op->layernorm_bwd(m->be, ws->dres, ws->da2, A->r, A->mean2, A->rstd2, lw->ln2_w, N, D, err));

    /* attention: dctx = Wd^T dres; dq,dk,dv; dqkv; da1 (+)= Wqkv^T dqkv */
    CALL(linear_bwd(m, s, l, FT_MOD_DENSE, ws->dctx, 0, ws->dres, A->ctx, A->xa[FT_MOD_DENSE], err));
    ft_attn_args aa;
    attn_args(m, s, &aa);
    CALL(op->attention_bwd(m->be, ws->dq, ws->dk, ws->dv, ws->dctx, A->ctx, A->lse, A->q, A->k, A->v, &aa, err));
    ft_qkv_args qa;
    qkv_args(m, s, &qa);
    CALL(op->qkv_split_bwd(m->be, ws->dqkv, ws->dq, ws->dk, ws->dv, &qa, err));
    CALL(linear_bwd(m, s, l, FT_MOD_QKV, need_dx ? ws->da1 : NULL, shared_ln, ws->dqkv, A->a1,
                    A->xa[FT_MOD_QKV], err));
    if (!need_dx) return FT_OK;

    /* dx = dres (residual) + ln1'(da1) (+ ln_mlp'(da2)) */
    CALL(op->layernorm_bwd(m->be, ws->dres, ws->da1, x, A->mean1, A->rstd1, lw->ln1_w, N, D, err));
    if (c->parallel_attn && c->n_ln == 2)
        CALL(op->layernorm_bwd(m->be, ws->dres, ws->da2, x, A->mean2, A->rstd2, lw->ln2_w, N, D, err));
    return FT_OK;
}
