/* train.c -- the training step: loss (and its LoRA gradients), evaluation loss, gradient norm,
 * AdamW; the dropout stream and training mode.
 */
#include <math.h>
#include <stdlib.h>

#include "model_internal.h"
#include "rng.h"

void ft_set_training(ft_model *m, int training) { m->training = training != 0; }
void ft_set_rng(ft_model *m, uint64_t seed, uint64_t counter)
{
    m->rng_seed = seed;
    m->rng_counter = counter;
}
void ft_get_rng(const ft_model *m, uint64_t *seed, uint64_t *counter)
{
    *seed = m->rng_seed;
    *counter = m->rng_counter;
}

/* ---- the step's device work, recorded and replayed where the backend can (CUDA graphs) ----
 *
 * A 7B step is ~1,300-1,600 launches; replayed as graphs, the spacing between kernels shrinks
 * (measured on an H200: ~1.8 ms of a 28.5 ms step at mb 1 went to gaps of 0-5 us). Both halves
 * read everything that changes from step to step from backend memory (ids, positions, masks,
 * targets: uploaded by the caller; dropout masks: the backend's dropout base), so one recording
 * serves every step of the same shape. The head (loss chunks) runs between them, unrecorded: its
 * gradient scale is the step's.
 *
 * Each half is recorded in up to STEP_PIECES pieces of consecutive layers, a graph each: a graph's
 * work starts once its launch is submitted, and one graph of a 7B half took the host 1.5-1.9 ms
 * to launch (H200, under the CUDA-runtime trace, which slows the host itself). With pieces the GPU
 * can wait at a step's start for the first piece's launch only (<= 0.22 ms measured the same way);
 * the others are launched while it runs. The throughput effect was within the spread between
 * machines (docs/PERF.md). */
typedef struct step_call {
    ft_model *m;
    const step_ctx *s;
    int l0, l1; /* the piece's layers */
} step_call;

/* What the recorded ops depend on besides backend memory: a new recording when it changes. The
 * buffers, the adapter (scale, dropout) and the checkpointed layers (a new workspace) are all in
 * bind_gen; the shape, the mode and the piece's layers are the call's. */
static uint64_t step_key(const ft_model *m, const step_call *c)
{
    const uint64_t k = ft_mix64(m->bind_gen ^ ((uint64_t)(uint32_t)c->l0 << 32 | (uint32_t)c->l1));
    return ft_mix64(k ^ ((uint64_t)(uint32_t)c->s->B << 32 | (uint64_t)(uint32_t)c->s->T << 2 |
                         (uint64_t)(c->s->train != 0) << 1 | (uint64_t)(c->s->backward != 0)));
}

static ft_status forward_body(void *ctx, ft_error *err)
{
    const step_call *c = ctx;
    return run_layer_range(c->m, c->s, c->l0, c->l1, err);
}

/* dhf (in ws.da1) -> the LoRA gradients of layers l1-1 down to l0; the piece with the top layer
 * starts with dres = ln_f'(dhf) */
static ft_status backward_body(void *ctx, ft_error *err)
{
    const step_call *c = ctx;
    ft_model *m = c->m;
    const ft_backend_ops *op = m->be->ops;
    workspace *ws = &m->ws;
    const int N = c->s->N, D = m->cfg.hidden, L = m->cfg.n_layer;
    if (c->l1 == L) {
        CALL(op->zero(m->be, ws->dres, act_bytes(m, (size_t)N * D), err));
        CALL(op->layernorm_bwd(m->be, ws->dres, ws->da1, ws->xs[L], ws->meanf, ws->rstdf, m->lnf_w, N, D, err));
    }
    const int n_ckpt = L - ws->n_saved;
    for (int l = c->l1 - 1; l >= c->l0; l--) {
        layer_acts *A = &ws->acts[l];
        if (l < n_ckpt) /* recompute this layer's activations (same dropout masks) */
            CALL(layer_forward(m, c->s, l, A, ws->xs[l], ws->ytmp, NULL, NULL, err));
        CALL(layer_backward(m, c->s, l, A, ws->xs[l], l > m->lora_min_layer, err));
    }
    return FT_OK;
}

/* body over layers lo .. hi-1 in pieces (slots slot0 ..): upwards for the forward, downwards for
 * the backward; one piece (lo == hi) still runs, for the backward's ln_f */
static ft_status run_recorded(ft_model *m, int slot0, const step_ctx *s, int down, int lo, int hi,
                              ft_status (*body)(void *ctx, ft_error *err), ft_error *err)
{
    const int n = hi - lo, per = n > STEP_PIECES ? (n + STEP_PIECES - 1) / STEP_PIECES : 1;
    for (int k = 0; k == 0 || k * per < n; k++) {
        const int a = k * per, z = a + per < n ? a + per : n;
        step_call c = {m, s, down ? hi - z : lo + a, down ? hi - a : lo + z};
        if (!m->be->ops->replay) CALL(body(&c, err));
        else CALL(m->be->ops->replay(m->be, slot0 + k, step_key(m, &c), body, &c, err));
    }
    return FT_OK;
}

/* The loss of a batch, and with `backward` its LoRA gradients. Without backward nothing is
 * kept for a backward pass, no dropout is drawn and no LoRA is needed (evaluation). */
static ft_status loss_step(ft_model *m, const int32_t *ids, const int32_t *labels, const int32_t *mask, int B, int T,
                           float grad_scale, int backward, double *loss, int64_t *n_tokens, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    CALL(check_ids(m, ids, mask, B, T, T, 1, err));
    if (backward && !m->lora_r)
        return ft_fail(err, FT_ESTATE, "forward_backward: the model has no LoRA adapter to train");
    if (!isfinite(grad_scale)) return ft_fail(err, FT_EINVAL, "grad_scale must be finite");
    const int N = B * T, V = c->vocab_size, D = c->hidden;

    /* targets: position t predicts labels[t + 1] */
    int32_t *tgt = malloc((size_t)N * sizeof(int32_t));
    if (!tgt) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int64_t n_valid = 0;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t y = t + 1 < T ? labels[(size_t)b * T + t + 1] : -100;
            if (y != -100 && (y < 0 || y >= V)) {
                free(tgt);
                return ft_fail(err, FT_EINVAL, "labels[%d, %d] = %d: expected -100 or an id in [0, %d)", b, t + 1,
                               (int)y, V);
            }
            tgt[(size_t)b * T + t] = y < 0 ? -1 : y;
            n_valid += y >= 0;
        }
    *loss = 0.0;
    *n_tokens = n_valid;
    if (n_valid == 0) { /* nothing to learn from: no gradient, loss 0 */
        free(tgt);
        return FT_OK;
    }
    ft_status st = workspace_ensure(m, N, backward, err);
    workspace *ws = &m->ws;
    step_ctx s;
    if (!st) st = prepare_step(m, &s, ids, tgt, mask, B, T, err);
    free(tgt);
    if (st) return st;
    if (backward) {
        s.backward = 1;
        s.train = m->training;
        CALL(op->set_dropout_base(m->be, ft_mix64(m->rng_seed ^ ft_mix64(m->rng_counter)), err));
        m->rng_counter++;
    }
    CALL(run_recorded(m, backward ? REPLAY_SLOT_TRAIN_FWD : REPLAY_SLOT_EVAL_FWD, &s, 0, 0, c->n_layer,
                      forward_body, err));

    /* head + loss in row chunks: logits -> dlogits in place -> dhf (into da1). The row losses stay
     * on the device and come back in one download once the whole step is enqueued, instead of a
     * download (a host wait) per chunk; on an H200 that wait was not what spaced the step's
     * kernels (docs/PERF.md), but the host no longer waits mid-step at all. */
    const float gmul = backward ? grad_scale / (float)n_valid : 0.0f;
    for (int r0 = 0; r0 < N; r0 += ws->chunk) {
        const int n = N - r0 < ws->chunk ? N - r0 : ws->chunk;
        const char *h = (const char *)ws->hf + act_bytes(m, (size_t)r0 * D);
        char *dh = (char *)ws->da1 + act_bytes(m, (size_t)r0 * D);
        CALL(op->lm_logits(m->be, ws->logits, h, m->lm_head, n, V, D, err));
        CALL(op->cross_entropy(m->be, ws->logits, ws->row_loss + r0, ws->tgt + r0, n, V, gmul, err));
        if (backward) CALL(op->lm_bwd(m->be, dh, ws->logits, m->lm_head, n, V, D, err));
    }

    if (backward)
        CALL(run_recorded(m, REPLAY_SLOT_TRAIN_BWD, &s, 1, m->lora_min_layer, c->n_layer, backward_body, err));

    /* the download waits for the step's last kernel, so a failed kernel is reported here */
    float *row_loss = malloc((size_t)N * sizeof(float));
    if (!row_loss) return ft_fail(err, FT_ENOMEM, "out of host memory");
    st = op->download(m->be, row_loss, ws->row_loss, (size_t)N * sizeof(float), err);
    double sum = 0.0;
    for (int i = 0; i < N && !st; i++) sum += row_loss[i];
    free(row_loss);
    if (st) return st;
    *loss = sum / (double)n_valid;
    return FT_OK;
}

ft_status ft_forward_backward(ft_model *m, const int32_t *ids, const int32_t *labels, const int32_t *mask, int B,
                              int T, float grad_scale, double *loss, int64_t *n_tokens, ft_error *err)
{
    return loss_step(m, ids, labels, mask, B, T, grad_scale, 1, loss, n_tokens, err);
}

ft_status ft_forward_loss(ft_model *m, const int32_t *ids, const int32_t *labels, const int32_t *mask, int B, int T,
                          double *loss, int64_t *n_tokens, ft_error *err)
{
    return loss_step(m, ids, labels, mask, B, T, 1.0f, 0, loss, n_tokens, err);
}


ft_status ft_grad_norm(ft_model *m, double *norm, ft_error *err)
{
    *norm = 0.0;
    if (!m->lora_r) return FT_OK;
    double ss;
    CALL(m->be->ops->sumsq(m->be, m->lora_buf[FT_LORA_GRAD], m->lora_n, &ss, err));
    *norm = sqrt(ss);
    return FT_OK;
}

ft_status ft_adamw_step(ft_model *m, const ft_adamw_params *p, double *grad_norm, ft_error *err)
{
    if (!m->lora_r) return ft_fail(err, FT_ESTATE, "the model has no LoRA adapter to optimise");
    if (p->step < 1) return ft_fail(err, FT_EINVAL, "AdamW step must start at 1");
    if (!(p->grad_scale > 0.0f)) return ft_fail(err, FT_EINVAL, "grad_scale must be positive");
    double norm;
    CALL(ft_grad_norm(m, &norm, err));
    norm /= p->grad_scale;
    *grad_norm = norm;
    if (!isfinite(norm)) return FT_OK; /* skipped: the caller decides what to do (loss scaling) */
    double gmul = 1.0 / p->grad_scale;
    if (p->max_grad_norm > 0.0f && norm > p->max_grad_norm) gmul *= p->max_grad_norm / (norm + 1e-6);
    const float bc1 = (float)(1.0 - pow(p->beta1, (double)p->step));
    const float bc2 = (float)(1.0 - pow(p->beta2, (double)p->step));
    return m->be->ops->adamw(m->be, m->lora_buf[FT_LORA_WEIGHT], m->lora_buf[FT_LORA_GRAD],
                             m->lora_buf[FT_LORA_ADAM_M], m->lora_buf[FT_LORA_ADAM_V], m->lora_n, p->lr, p->beta1,
                             p->beta2, p->eps, p->weight_decay, (float)gmul, bc1, bc2, err);
}
