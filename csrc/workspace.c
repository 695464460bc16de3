/* workspace.c -- the activation workspace of a model.
 *
 * Every activation, gradient and staging buffer of a step is carved from ONE backend allocation,
 * sized for n_cap rows. Carving runs twice: first with no base to sum the sizes, then over the
 * allocated block to hand out the pointers. Inference keeps two ping-pong layer inputs and one
 * shared set of layer activations; training keeps every layer's input and the activations of the
 * layers that are not checkpointed (the checkpointed ones share one set and are recomputed).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"

void workspace_free(ft_model *m)
{
    workspace *ws = &m->ws;
    if (ws->block) m->be->ops->free(m->be, ws->block);
    free(ws->xs);
    free(ws->acts);
    memset(ws, 0, sizeof *ws);
}

/* Carving: with base == NULL only sizes are summed. */
typedef struct carver {
    char *base;
    size_t off;
} carver;

static void *carve(carver *cv, size_t bytes)
{
    void *p = cv->base ? cv->base + cv->off : NULL;
    cv->off += (bytes + 255) & ~(size_t)255;
    return p;
}

static void carve_acts(ft_model *m, carver *cv, layer_acts *a, int N)
{
    const ft_config *c = &m->cfg;
    const size_t D = c->hidden;
    memset(a, 0, sizeof *a);
    a->a1 = carve(cv, act_bytes(m, N * D));
    a->mean1 = carve(cv, N * sizeof(float));
    a->rstd1 = carve(cv, N * sizeof(float));
    if (!c->parallel_attn || c->n_ln == 2) {
        a->a2 = carve(cv, act_bytes(m, N * D));
        a->mean2 = carve(cv, N * sizeof(float));
        a->rstd2 = carve(cv, N * sizeof(float));
    }
    if (!c->parallel_attn) a->r = carve(cv, act_bytes(m, N * D));
    a->q = carve(cv, act_bytes(m, (size_t)N * c->n_head * c->head_dim));
    a->k = carve(cv, act_bytes(m, (size_t)N * c->n_kv_head * c->head_dim));
    a->v = carve(cv, act_bytes(m, (size_t)N * c->n_kv_head * c->head_dim));
    a->ctx = carve(cv, act_bytes(m, N * D));
    a->lse = carve(cv, (size_t)N * c->n_head * sizeof(float));
    a->h = carve(cv, act_bytes(m, (size_t)N * c->ffn));
    for (int mod = 0; mod < FT_NMOD; mod++)
        if (m->lora_targets & (1u << mod)) a->xa[mod] = carve(cv, (size_t)N * m->lora_r * sizeof(float));
}

static void carve_workspace(ft_model *m, carver *cv, workspace *ws, int N, int train, int n_saved)
{
    const ft_config *c = &m->cfg;
    const size_t D = c->hidden, F = c->ffn, W = m->qkv_width;
    const int L = c->n_layer;
    /* layer inputs: all kept in training; two ping-pong buffers in inference */
    const int nx = train ? L + 1 : 2;
    void *xbuf[2] = {NULL, NULL};
    for (int i = 0; i < nx; i++) {
        void *p = carve(cv, act_bytes(m, N * D));
        if (train && ws->xs) ws->xs[i] = p;
        else if (!train) xbuf[i] = p;
    }
    if (!train && ws->xs)
        for (int l = 0; l <= L; l++) ws->xs[l] = xbuf[l % 2];
    carve_acts(m, cv, &ws->shared, N);
    /* the first L - n_saved layers are checkpointed: they share `shared` */
    for (int l = 0; l < L; l++) {
        layer_acts tmp;
        if (l >= L - n_saved) carve_acts(m, cv, ws->acts ? &ws->acts[l] : &tmp, N);
        else if (ws->acts) ws->acts[l] = ws->shared;
    }
    ws->qkv = carve(cv, act_bytes(m, N * W));
    ws->attn_o = carve(cv, act_bytes(m, N * D));
    ws->g = carve(cv, act_bytes(m, N * F));
    ws->mlp_o = carve(cv, act_bytes(m, N * D));
    ws->ytmp = carve(cv, act_bytes(m, N * D));
    ws->hf = carve(cv, act_bytes(m, N * D));
    ws->meanf = carve(cv, N * sizeof(float));
    ws->rstdf = carve(cv, N * sizeof(float));
    if (train) {
        ws->dres = carve(cv, act_bytes(m, N * D));
        ws->da1 = carve(cv, act_bytes(m, N * D));
        ws->da2 = carve(cv, act_bytes(m, N * D));
        ws->dctx = carve(cv, act_bytes(m, N * D));
        ws->dqkv = carve(cv, act_bytes(m, N * W));
        ws->dq = carve(cv, act_bytes(m, (size_t)N * c->n_head * c->head_dim));
        ws->dk = carve(cv, act_bytes(m, (size_t)N * c->n_kv_head * c->head_dim));
        ws->dv = carve(cv, act_bytes(m, (size_t)N * c->n_kv_head * c->head_dim));
        ws->dh = carve(cv, act_bytes(m, N * F));
    }
    /* logits are produced in chunks of rows: about 64 MiB of f32 at a time */
    int chunk = (int)((64u << 20) / ((size_t)c->vocab_size * sizeof(float)));
    chunk = chunk < 1 ? 1 : chunk > N ? N : chunk;
    ws->chunk = chunk;
    ws->logits = carve(cv, (size_t)chunk * c->vocab_size * sizeof(float));
    ws->row_loss = carve(cv, (size_t)N * sizeof(float));
    /* the step's integer inputs, one after the other at a fixed stride: prepare_step uploads them
     * in one copy */
    const size_t stride = ((size_t)N * sizeof(int32_t) + 255) & ~(size_t)255;
    ws->int_stride = stride / sizeof(int32_t);
    ws->ids = carve(cv, 5 * stride);
    ws->tgt = ws->ids ? ws->ids + ws->int_stride : NULL;
    ws->pos = ws->ids ? ws->ids + 2 * ws->int_stride : NULL;
    ws->kmask = ws->ids ? ws->ids + 3 * ws->int_stride : NULL;
    ws->kpos = ws->ids ? ws->ids + 4 * ws->int_stride : NULL;
}

static int n_checkpointed(const ft_model *m)
{
    return (int)lroundf(m->ckpt_ratio * (float)m->cfg.n_layer);
}

ft_status workspace_ensure(ft_model *m, int N, int train, ft_error *err)
{
    workspace *ws = &m->ws;
    const int L = m->cfg.n_layer;
    const int n_saved = train ? L - n_checkpointed(m) : 0;
    if (ws->block && N <= ws->n_cap && (ws->train || !train) && ws->lora_r == m->lora_r &&
        (!train || ws->n_saved == n_saved))
        return FT_OK;
    /* grow: at least the old capacity, so alternating sizes do not thrash */
    int n_cap = N > ws->n_cap ? N : ws->n_cap;
    train = train || ws->train;
    int saved = train ? L - n_checkpointed(m) : 0;
    workspace_free(m);
    ws->xs = calloc((size_t)L + 1, sizeof(void *));
    ws->acts = calloc((size_t)L, sizeof(layer_acts));
    if (!ws->xs || !ws->acts) {
        workspace_free(m);
        return ft_fail(err, FT_ENOMEM, "out of host memory");
    }
    carver cv = {NULL, 0};
    carve_workspace(m, &cv, ws, n_cap, train, saved);
    void *block;
    ft_status st = m->be->ops->alloc(m->be, cv.off, &block, err);
    if (st) {
        workspace_free(m);
        if (st == FT_EDEVMEM || st == FT_ENOMEM)
            return ft_fail(err, st, "out of memory allocating %.1f MiB of activations for %d tokens",
                           cv.off / 1048576.0, N);
        return st;
    }
    ws->block = block;
    m->bind_gen++; /* every buffer a recorded decode step used has moved (even at the same address) */
    cv.base = block;
    cv.off = 0;
    carve_workspace(m, &cv, ws, n_cap, train, saved);
    ws->n_cap = n_cap;
    ws->train = train;
    ws->n_saved = saved;
    ws->lora_r = m->lora_r;
    return FT_OK;
}

/* The workspace's layout depends on the ratio: a new one is carved at the next step. */
void ft_set_checkpointing(ft_model *m, float ratio)
{
    float r = !(ratio > 0.0f) ? 0.0f : ratio > 1.0f ? 1.0f : ratio; /* NaN -> 0 */
    if (r != m->ckpt_ratio) workspace_free(m);
    m->ckpt_ratio = r;
}
