/* model.c -- Falcon forward and backward over layers, on any backend.
 *
 * This file decides what is computed, in which order, and what is kept for
 * backward; the backend (backend.h) decides how. It never reads element data.
 *
 * Shapes: B batch, T tokens, N = B*T rows, D hidden, F ffn, W qkv width,
 * H query heads, KV kv heads, hd head dim, r LoRA rank, V vocab.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rng.h"

#define CALL(expr)                  \
    do {                            \
        ft_status st_ = (expr);     \
        if (st_ != FT_OK) return st_; \
    } while (0)

typedef struct layer_weights {
    void *ln1_w, *ln1_b, *ln2_w, *ln2_b; /* ln2: NULL for a one-LN parallel layer */
    ft_qlinear *lin[FT_NMOD];
} layer_weights;

/* What one layer keeps from forward for backward (or recomputes when checkpointed). */
typedef struct layer_acts {
    void *a1;            /* [N,D] ln_attn / input_layernorm output */
    float *mean1, *rstd1;
    void *a2;            /* [N,D] ln_mlp / post_attention_layernorm output (NULL: uses a1) */
    float *mean2, *rstd2;
    void *r;             /* [N,D] non-parallel: x + attention output */
    void *q, *k, *v;     /* [B,H,T,hd], [B,KV,T,hd] */
    void *ctx;           /* [N,D] attention output, input of dense */
    float *lse;          /* [B,H,T] */
    void *h;             /* [N,F] dense_h_to_4h output, before GELU */
    float *xa[FT_NMOD];  /* [N,r] LoRA A outputs */
} layer_acts;

typedef struct workspace {
    void *block;     /* one backend allocation, carved below */
    int n_cap;       /* rows it was sized for */
    int train;       /* holds the backward buffers and per-layer activations */
    int n_saved;     /* layers with their own layer_acts (the rest share `shared`) */
    int lora_r;      /* rank the xa buffers were sized for */
    void **xs;       /* [L+1] layer inputs [N,D]; xs[L] is the last layer's output (host array of pointers) */
    layer_acts *acts; /* [L] host array; checkpointed layers alias `shared` */
    layer_acts shared;
    void *qkv, *attn_o, *g, *mlp_o, *ytmp; /* [N,W] [N,D] [N,F] [N,D] [N,D] */
    void *hf; float *meanf, *rstdf;         /* ln_f output */
    void *dres, *da1, *da2, *dctx, *dqkv, *dq, *dk, *dv, *dh;
    float *logits, *row_loss; /* [chunk,V], [N] */
    int chunk;
    int32_t *ids, *tgt, *pos, *kmask, *kpos; /* [N] each (kmask/kpos: [B,T] without cache) */
} workspace;

typedef struct kv_cache {
    int B, cap, len;
    void **k, **v; /* [L] each [B,KV,cap,hd] */
    void *tmp;     /* [B,KV,cap,hd] for reordering */
    int32_t *kmask, *kpos; /* [B,cap]: key mask and alibi position of each cached token */
    int32_t *gather_idx;   /* [B] */
    int32_t *seen;         /* host [B]: real (mask 1) tokens cached per row = next position */
    int32_t *step_dev;     /* [2]: past, Tk of the current decode step, read by the kernels */
    /* decode_step replayed as a backend graph, per kind (0: logits, 1: argmax). A graph is valid
     * while the workspace block and the backend's scratch generation are those it was captured
     * with; warm_gen: generation after an uncaptured run of that kind (capture needs one first,
     * so that every scratch buffer the step uses already exists). */
    void *graph[2];
    void *graph_ws[2];
    uint64_t graph_gen[2], warm_gen[2];
    int warm[2]; /* 0: not run yet, 1: ran uncaptured at warm_gen, -1: no graphs (off or capture failed) */
} kv_cache;

struct ft_model {
    ft_config cfg;
    ft_backend *be;
    char device[32];
    int qkv_width;
    void *embed, *lnf_w, *lnf_b, *lm_head; /* lm_head == embed when tied */
    layer_weights *layers;
    int32_t *qkv_cols; /* [H + 2KV] */
    float *slopes;     /* [H] alibi, or NULL */
    /* LoRA: one f32 buffer per slot, modules laid out layer by layer, A then B */
    int lora_r;
    float lora_scale, lora_dropout;
    unsigned lora_targets;
    size_t lora_n;
    size_t *lora_off; /* [L*FT_NMOD] offset of A (B follows), or SIZE_MAX */
    float *lora_buf[4];
    int lora_min_layer;
    /* training state */
    int training;
    uint64_t rng_seed, rng_counter;
    float ckpt_ratio;
    workspace ws;
    kv_cache cache;
};

/* Module widths come from the module table (common.c); qkv_width (m->qkv_width) is the same
 * ft_qkv_width the table gives for query_key_value. */
static int mod_in(const ft_config *c, int mod) { return ft_module_in(c, mod); }
static int mod_out(const ft_config *c, int mod, int qkv_width) { (void)qkv_width; return ft_module_out(c, mod); }

static size_t act_bytes(const ft_model *m, size_t n)
{
    return n * ft_dtype_size(m->be->act_dtype);
}

/* ------------------------------------------------------------------------ */
/* config and weights                                                        */

static ft_status check_config(const ft_config *c, ft_error *err)
{
    if (c->vocab_size <= 0 || c->hidden <= 0 || c->n_head <= 0 || c->n_kv_head <= 0 || c->n_layer <= 0 ||
        c->ffn <= 0)
        return ft_fail(err, FT_EINVAL, "config: vocab_size, hidden_size, heads, kv heads, layers and "
                                       "ffn_hidden_size must be positive");
    if (c->head_dim * c->n_head != c->hidden)
        return ft_fail(err, FT_EINVAL, "config: head_dim %d * heads %d != hidden_size %d", c->head_dim,
                       c->n_head, c->hidden);
    if (c->head_dim % 2 || c->head_dim > 1024)
        return ft_fail(err, FT_EUNSUPPORTED, "config: head_dim %d must be even and at most 1024", c->head_dim);
    if (c->n_head % c->n_kv_head)
        return ft_fail(err, FT_EINVAL, "config: %d heads are not a multiple of %d kv heads", c->n_head,
                       c->n_kv_head);
    if (c->qkv_layout == FT_QKV_MULTI_QUERY && c->n_kv_head != 1)
        return ft_fail(err, FT_EINVAL, "config: a multi-query model has one kv head, got %d", c->n_kv_head);
    if (c->qkv_layout == FT_QKV_INTERLEAVED && c->n_kv_head != c->n_head)
        return ft_fail(err, FT_EINVAL, "config: interleaved qkv needs kv heads == heads");
    if (c->qkv_layout < FT_QKV_MULTI_QUERY || c->qkv_layout > FT_QKV_INTERLEAVED)
        return ft_fail(err, FT_EINVAL, "config: unknown qkv layout %d", (int)c->qkv_layout);
    if (c->n_ln != 1 && c->n_ln != 2) return ft_fail(err, FT_EINVAL, "config: n_ln must be 1 or 2");
    if (!(c->ln_eps > 0.0f) || !(c->rope_theta > 0.0f))
        return ft_fail(err, FT_EINVAL, "config: layer_norm_epsilon and rope_theta must be positive");
    return FT_OK;
}

static ft_status check_dense(const ft_host_tensor *t, int64_t d0, int64_t d1, int ndim, ft_error *err)
{
    const char *name = t->name ? t->name : "tensor";
    if (!t->data) return ft_fail(err, FT_EINVAL, "missing tensor %s", name);
    if (t->dtype != FT_F32 && t->dtype != FT_F16 && t->dtype != FT_BF16)
        return ft_fail(err, FT_EINVAL, "%s: expected float16, bfloat16 or float32, got %s", name,
                       ft_dtype_name(t->dtype));
    if (t->ndim != ndim || t->shape[0] != d0 || (ndim == 2 && t->shape[1] != d1)) {
        if (ndim == 2)
            return ft_fail(err, FT_EINVAL, "%s: expected shape [%lld, %lld], got [%lld, %lld] (rank %d)", name,
                           (long long)d0, (long long)d1, (long long)t->shape[0],
                           (long long)(t->ndim > 1 ? t->shape[1] : 0), t->ndim);
        return ft_fail(err, FT_EINVAL, "%s: expected shape [%lld], got rank %d, first dim %lld", name,
                       (long long)d0, t->ndim, (long long)t->shape[0]);
    }
    const int64_t bad = ft_first_nonfinite(t->data, t->dtype, ndim == 2 ? d0 * d1 : d0);
    if (bad >= 0) {
        if (ndim == 2)
            return ft_fail(err, FT_EINVAL, "%s: NaN or infinite value at [%lld, %lld]", name,
                           (long long)(bad / d1), (long long)(bad % d1));
        return ft_fail(err, FT_EINVAL, "%s: NaN or infinite value at [%lld]", name, (long long)bad);
    }
    return FT_OK;
}

static ft_status make_dense(ft_model *m, const ft_host_tensor *t, int64_t d0, int64_t d1, int ndim,
                            void **dst, ft_error *err)
{
    CALL(check_dense(t, d0, d1, ndim, err));
    return m->be->ops->dense_create(m->be, t, dst, err);
}

/* First column of each q head, k head and v head in the fused qkv output. */
static void qkv_columns(const ft_config *c, int32_t *cols)
{
    const int H = c->n_head, KV = c->n_kv_head, hd = c->head_dim, gs = H / KV;
    for (int h = 0; h < H; h++) {
        switch (c->qkv_layout) {
        case FT_QKV_MULTI_QUERY: cols[h] = h * hd; break;
        case FT_QKV_GROUPED: cols[h] = (h / gs) * (gs + 2) * hd + (h % gs) * hd; break;
        case FT_QKV_INTERLEAVED: cols[h] = h * 3 * hd; break;
        }
    }
    for (int g = 0; g < KV; g++) {
        switch (c->qkv_layout) {
        case FT_QKV_MULTI_QUERY: cols[H + g] = H * hd; cols[H + KV + g] = (H + 1) * hd; break;
        case FT_QKV_GROUPED:
            cols[H + g] = g * (gs + 2) * hd + gs * hd;
            cols[H + KV + g] = g * (gs + 2) * hd + (gs + 1) * hd;
            break;
        case FT_QKV_INTERLEAVED: cols[H + g] = g * 3 * hd + hd; cols[H + KV + g] = g * 3 * hd + 2 * hd; break;
        }
    }
}

/* ALiBi slopes as the reference builds them (a geometric series per power of two). */
static void alibi_slopes(int H, float *s)
{
    int p2 = 1;
    while (p2 * 2 <= H) p2 *= 2;
    double base = pow(2.0, -pow(2.0, -(log2((double)p2) - 3.0)));
    for (int i = 0; i < p2; i++) s[i] = (float)pow(base, i + 1);
    if (p2 != H) {
        double extra = pow(2.0, -pow(2.0, -(log2(2.0 * p2) - 3.0)));
        int rem = H - p2 < p2 ? H - p2 : p2;
        for (int i = 0; i < rem; i++) s[p2 + i] = (float)pow(extra, 2 * i + 1);
    }
}

static ft_status upload_new(ft_model *m, const void *src, size_t bytes, void **dst, ft_error *err)
{
    CALL(m->be->ops->alloc(m->be, bytes, dst, err));
    return m->be->ops->upload(m->be, *dst, src, bytes, err);
}

static ft_status bind_layer(ft_model *m, int l, const ft_host_layer *hl, int bits, int zero_offset,
                            ft_error *err)
{
    const ft_config *c = &m->cfg;
    layer_weights *lw = &m->layers[l];
    const int D = c->hidden;
    CALL(make_dense(m, &hl->ln1_w, D, 0, 1, &lw->ln1_w, err));
    CALL(make_dense(m, &hl->ln1_b, D, 0, 1, &lw->ln1_b, err));
    const int want_ln2 = !c->parallel_attn || c->n_ln == 2;
    if (want_ln2) {
        CALL(make_dense(m, &hl->ln2_w, D, 0, 1, &lw->ln2_w, err));
        CALL(make_dense(m, &hl->ln2_b, D, 0, 1, &lw->ln2_b, err));
    } else if (hl->ln2_w.data) {
        return ft_fail(err, FT_EINVAL, "%s: unexpected second layernorm for this config", hl->ln2_w.name);
    }
    for (int mod = 0; mod < FT_NMOD; mod++) {
        const ft_host_qlinear *hq = &hl->lin[mod];
        ft_qlinear_desc d = {hq, mod_in(c, mod), mod_out(c, mod, m->qkv_width), bits, 0, zero_offset};
        CALL(ft_gptq_check(hq, d.in, d.out, bits, &d.groups, err));
        if (hq->bias.data) CALL(check_dense(&hq->bias, d.out, 0, 1, err));
        CALL(m->be->ops->qlinear_create(m->be, &d, &lw->lin[mod], err));
    }
    return FT_OK;
}

static ft_status create_backend(const char *device, int act_dtype, ft_backend **be, ft_error *err)
{
    if (strcmp(device, "cpu") == 0) {
        if (act_dtype >= 0 && act_dtype != FT_F32)
            return ft_fail(err, FT_EUNSUPPORTED, "the CPU backend computes in float32 only");
        return ft_cpu_backend_create(be, err);
    }
    if (strncmp(device, "cuda", 4) == 0) {
#ifdef FT_WITH_CUDA
        int index;
        CALL(ft_parse_device(device, &index, err));
        return ft_cuda_backend_create(index, act_dtype, be, err);
#else
        (void)act_dtype;
        return ft_fail(err, FT_EUNSUPPORTED, "device '%s': this build of falcontune has no CUDA backend "
                                             "(nvcc was not found when it was installed)", device);
#endif
    }
    return ft_fail(err, FT_EINVAL, "unknown device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
}

ft_status ft_model_create(const ft_config *cfg, const ft_host_weights *w, const char *device, int act_dtype,
                          ft_model **out, ft_error *err)
{
    *out = NULL;
    CALL(check_config(cfg, err));
    if (!w->layers) return ft_fail(err, FT_EINVAL, "no layers given");
    if (w->zero_offset != 0 && w->zero_offset != 1)
        return ft_fail(err, FT_EINVAL, "zero_offset must be 0 (GPTQ v2) or 1 (GPTQ v1)");
    ft_model *m = calloc(1, sizeof *m);
    if (!m) return ft_fail(err, FT_ENOMEM, "out of host memory");
    m->cfg = *cfg;
    snprintf(m->device, sizeof m->device, "%s", device);
    m->rng_seed = 0;
    m->lora_min_layer = cfg->n_layer;
    const ft_config *c = &m->cfg;
    m->qkv_width = ft_qkv_width(c);
    ft_status st = create_backend(device, act_dtype, &m->be, err);
    if (st) {
        free(m);
        return st;
    }
    m->layers = calloc((size_t)c->n_layer, sizeof *m->layers);
    if (!m->layers) {
        st = ft_fail(err, FT_ENOMEM, "out of host memory");
        goto fail;
    }
    if ((st = make_dense(m, &w->embed, c->vocab_size, c->hidden, 2, &m->embed, err))) goto fail;
    if ((st = make_dense(m, &w->lnf_w, c->hidden, 0, 1, &m->lnf_w, err))) goto fail;
    if ((st = make_dense(m, &w->lnf_b, c->hidden, 0, 1, &m->lnf_b, err))) goto fail;
    if (w->lm_head.data) {
        if ((st = make_dense(m, &w->lm_head, c->vocab_size, c->hidden, 2, &m->lm_head, err))) goto fail;
    } else {
        m->lm_head = m->embed;
    }
    for (int l = 0; l < c->n_layer; l++)
        if ((st = bind_layer(m, l, &w->layers[l], w->bits, w->zero_offset, err))) goto fail;
    {
        int32_t cols[3 * 1024];
        const int ncols = c->n_head + 2 * c->n_kv_head;
        if (ncols > 3 * 1024) {
            st = ft_fail(err, FT_EUNSUPPORTED, "config: too many heads (%d)", c->n_head);
            goto fail;
        }
        qkv_columns(c, cols);
        if ((st = upload_new(m, cols, ncols * sizeof(int32_t), (void **)&m->qkv_cols, err))) goto fail;
        if (c->alibi) {
            float slopes[3 * 1024];
            alibi_slopes(c->n_head, slopes);
            if ((st = upload_new(m, slopes, c->n_head * sizeof(float), (void **)&m->slopes, err))) goto fail;
        }
    }
    *out = m;
    return FT_OK;
fail:
    ft_model_free(m);
    return st;
}

static void free_workspace(ft_model *m)
{
    workspace *ws = &m->ws;
    if (ws->block) m->be->ops->free(m->be, ws->block);
    free(ws->xs);
    free(ws->acts);
    memset(ws, 0, sizeof *ws);
}

void ft_model_free(ft_model *m)
{
    if (!m) return;
    ft_backend *be = m->be;
    if (be) {
        ft_cache_free(m);
        free_workspace(m);
        ft_lora_remove(m);
        if (m->layers) {
            for (int l = 0; l < m->cfg.n_layer; l++) {
                layer_weights *lw = &m->layers[l];
                be->ops->free(be, lw->ln1_w);
                be->ops->free(be, lw->ln1_b);
                be->ops->free(be, lw->ln2_w);
                be->ops->free(be, lw->ln2_b);
                for (int mod = 0; mod < FT_NMOD; mod++)
                    if (lw->lin[mod]) be->ops->qlinear_destroy(be, lw->lin[mod]);
            }
        }
        if (m->lm_head != m->embed) be->ops->free(be, m->lm_head);
        be->ops->free(be, m->embed);
        be->ops->free(be, m->lnf_w);
        be->ops->free(be, m->lnf_b);
        be->ops->free(be, m->qkv_cols);
        be->ops->free(be, m->slopes);
        be->ops->destroy(be);
    }
    free(m->layers);
    free(m);
}

const ft_config *ft_model_config(const ft_model *m) { return &m->cfg; }

ft_status ft_memory_stats(ft_model *m, size_t *current, size_t *peak, int reset, ft_error *err)
{
    *current = *peak = 0;
    if (!m->be->ops->memory_stats) return FT_OK;
    return m->be->ops->memory_stats(m->be, current, peak, reset, err);
}
const char *ft_model_device(const ft_model *m) { return m->device; }
ft_dtype ft_model_act_dtype(const ft_model *m) { return m->be->act_dtype; }

/* ------------------------------------------------------------------------ */
/* LoRA                                                                      */

static void cache_drop_graphs(ft_model *m);

ft_status ft_lora_init(ft_model *m, int r, float alpha, float dropout, unsigned target_mask, ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (r <= 0 || r > 4096) return ft_fail(err, FT_EINVAL, "lora r must be in [1, 4096], got %d", r);
    if (!isfinite(alpha)) return ft_fail(err, FT_EINVAL, "lora alpha must be finite, got %g", (double)alpha);
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return ft_fail(err, FT_EINVAL, "lora dropout must be in [0, 1), got %g", (double)dropout);
    if (!target_mask || target_mask >= (1u << FT_NMOD))
        return ft_fail(err, FT_EINVAL, "lora target modules: mask 0x%x is not a non-empty set of the %d modules",
                       target_mask, FT_NMOD);
    ft_lora_remove(m);
    free_workspace(m); /* xa buffers depend on r */
    m->lora_off = malloc((size_t)c->n_layer * FT_NMOD * sizeof(size_t));
    if (!m->lora_off) return ft_fail(err, FT_ENOMEM, "out of host memory");
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++)
        for (int mod = 0; mod < FT_NMOD; mod++) {
            if (!(target_mask & (1u << mod))) {
                m->lora_off[l * FT_NMOD + mod] = SIZE_MAX;
                continue;
            }
            m->lora_off[l * FT_NMOD + mod] = n;
            n += (size_t)r * mod_in(c, mod) + (size_t)mod_out(c, mod, m->qkv_width) * r;
        }
    for (int s = 0; s < 4; s++) {
        ft_status st = m->be->ops->alloc(m->be, n * sizeof(float), (void **)&m->lora_buf[s], err);
        if (!st) st = m->be->ops->zero(m->be, m->lora_buf[s], n * sizeof(float), err);
        if (st) {
            ft_lora_remove(m);
            return st;
        }
    }
    m->lora_n = n;
    m->lora_r = r;
    m->lora_scale = alpha / (float)r;
    m->lora_dropout = dropout;
    m->lora_targets = target_mask;
    m->lora_min_layer = 0;
    cache_drop_graphs(m); /* captured decode steps hold the old adapter's buffers and scale */
    return FT_OK;
}

void ft_lora_remove(ft_model *m)
{
    cache_drop_graphs(m);
    for (int s = 0; s < 4; s++) {
        if (m->lora_buf[s]) m->be->ops->free(m->be, m->lora_buf[s]);
        m->lora_buf[s] = NULL;
    }
    free(m->lora_off);
    m->lora_off = NULL;
    m->lora_n = 0;
    m->lora_r = 0;
    m->lora_targets = 0;
    m->lora_min_layer = m->cfg.n_layer;
}

int ft_lora_rank(const ft_model *m) { return m->lora_r; }
unsigned ft_lora_targets(const ft_model *m) { return m->lora_targets; }
float ft_lora_scale(const ft_model *m) { return m->lora_scale; }

ft_status ft_lora_set_dropout(ft_model *m, float dropout, ft_error *err)
{
    if (!(dropout >= 0.0f && dropout < 1.0f))
        return ft_fail(err, FT_EINVAL, "lora dropout must be in [0, 1), got %g", (double)dropout);
    m->lora_dropout = dropout;
    return FT_OK;
}

static ft_status lora_locate(const ft_model *m, ft_lora_slot slot, int layer, int mod, float **A, float **B,
                             size_t *na, size_t *nb, ft_error *err)
{
    *A = *B = NULL;
    *na = *nb = 0;
    if (!m->lora_r) return ft_fail(err, FT_ESTATE, "the model has no LoRA adapter");
    if (slot < FT_LORA_WEIGHT || slot > FT_LORA_ADAM_V) return ft_fail(err, FT_EINVAL, "bad LoRA slot");
    if (layer < 0 || layer >= m->cfg.n_layer || mod < 0 || mod >= FT_NMOD)
        return ft_fail(err, FT_EINVAL, "LoRA layer %d / module %d out of range", layer, mod);
    size_t off = m->lora_off[layer * FT_NMOD + mod];
    if (off == SIZE_MAX)
        return ft_fail(err, FT_EINVAL, "layer %d: %s has no LoRA (targets do not include it)", layer,
                       ft_module_name(mod));
    *na = (size_t)m->lora_r * mod_in(&m->cfg, mod);
    *nb = (size_t)mod_out(&m->cfg, mod, m->qkv_width) * m->lora_r;
    *A = m->lora_buf[slot] + off;
    *B = *A + *na;
    return FT_OK;
}

ft_status ft_lora_read(ft_model *m, ft_lora_slot slot, int layer, int mod, float *A, float *B, ft_error *err)
{
    float *dA, *dB;
    size_t na, nb;
    CALL(lora_locate(m, slot, layer, mod, &dA, &dB, &na, &nb, err));
    CALL(m->be->ops->download(m->be, A, dA, na * sizeof(float), err));
    return m->be->ops->download(m->be, B, dB, nb * sizeof(float), err);
}

ft_status ft_lora_write(ft_model *m, ft_lora_slot slot, int layer, int mod, const float *A, const float *B,
                        ft_error *err)
{
    float *dA, *dB;
    size_t na, nb;
    CALL(lora_locate(m, slot, layer, mod, &dA, &dB, &na, &nb, err));
    for (size_t i = 0; i < na; i++)
        if (!isfinite(A[i])) return ft_fail(err, FT_EINVAL, "layer %d %s lora_A: non-finite value at %zu", layer, ft_module_name(mod), i);
    for (size_t i = 0; i < nb; i++)
        if (!isfinite(B[i])) return ft_fail(err, FT_EINVAL, "layer %d %s lora_B: non-finite value at %zu", layer, ft_module_name(mod), i);
    CALL(m->be->ops->upload(m->be, dA, A, na * sizeof(float), err));
    return m->be->ops->upload(m->be, dB, B, nb * sizeof(float), err);
}

ft_status ft_zero_grad(ft_model *m, ft_error *err)
{
    if (!m->lora_r) return FT_OK;
    return m->be->ops->zero(m->be, m->lora_buf[FT_LORA_GRAD], m->lora_n * sizeof(float), err);
}

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
void ft_set_checkpointing(ft_model *m, float ratio)
{
    float r = !(ratio > 0.0f) ? 0.0f : ratio > 1.0f ? 1.0f : ratio; /* NaN -> 0 */
    if (r != m->ckpt_ratio) free_workspace(m);
    m->ckpt_ratio = r;
}

static int n_checkpointed(const ft_model *m)
{
    return (int)lroundf(m->ckpt_ratio * (float)m->cfg.n_layer);
}

/* ------------------------------------------------------------------------ */
/* workspace                                                                 */

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
    ws->ids = carve(cv, N * sizeof(int32_t));
    ws->tgt = carve(cv, N * sizeof(int32_t));
    ws->pos = carve(cv, N * sizeof(int32_t));
    ws->kmask = carve(cv, N * sizeof(int32_t));
    ws->kpos = carve(cv, N * sizeof(int32_t));
}

static ft_status ensure_workspace(ft_model *m, int N, int train, ft_error *err)
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
    free_workspace(m);
    ws->xs = calloc((size_t)L + 1, sizeof(void *));
    ws->acts = calloc((size_t)L, sizeof(layer_acts));
    if (!ws->xs || !ws->acts) {
        free_workspace(m);
        return ft_fail(err, FT_ENOMEM, "out of host memory");
    }
    carver cv = {NULL, 0};
    carve_workspace(m, &cv, ws, n_cap, train, saved);
    void *block;
    ft_status st = m->be->ops->alloc(m->be, cv.off, &block, err);
    if (st) {
        free_workspace(m);
        if (st == FT_EDEVMEM || st == FT_ENOMEM)
            return ft_fail(err, st, "out of memory allocating %.1f MiB of activations for %d tokens",
                           cv.off / 1048576.0, N);
        return st;
    }
    ws->block = block;
    cv.base = block;
    cv.off = 0;
    carve_workspace(m, &cv, ws, n_cap, train, saved);
    ws->n_cap = n_cap;
    ws->train = train;
    ws->n_saved = saved;
    ws->lora_r = m->lora_r;
    return FT_OK;
}

/* ------------------------------------------------------------------------ */
/* forward and backward of one layer                                          */

typedef struct step_ctx {
    int B, T, N;
    int Tk, cap, past;   /* attention keys */
    int kstride;         /* row stride of kmask / kpos */
    const int32_t *kmask, *kpos, *pos; /* backend arrays */
    const int32_t *past_dev, *tk_dev;  /* decode steps: past and Tk in backend memory (graph replay) */
    int train;           /* dropout active */
    uint64_t seed;       /* this step's dropout seed */
} step_ctx;

static uint64_t dropout_seed(const step_ctx *s, int l, int mod)
{
    return ft_mix64(s->seed + (uint64_t)l * FT_NMOD + (uint64_t)mod);
}

static int has_lora(const ft_model *m, int mod) { return (m->lora_targets >> mod) & 1u; }

/* y = W x (+ LoRA), the LoRA A output saved in xa */
static ft_status linear_fwd(ft_model *m, const step_ctx *s, int l, int mod, void *y, const void *x, float *xa,
                            ft_error *err)
{
    const ft_config *c = &m->cfg;
    CALL(m->be->ops->qlinear_fwd(m->be, y, x, m->layers[l].lin[mod], s->N, err));
    if (!has_lora(m, mod)) return FT_OK;
    float *A, *Bm;
    size_t na, nb;
    CALL(lora_locate(m, FT_LORA_WEIGHT, l, mod, &A, &Bm, &na, &nb, err));
    const float p = s->train ? m->lora_dropout : 0.0f;
    return m->be->ops->lora_fwd(m->be, y, xa, x, A, Bm, s->N, mod_in(c, mod), mod_out(c, mod, m->qkv_width),
                                m->lora_r, m->lora_scale, p, dropout_seed(s, l, mod), err);
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
                                dropout_seed(s, l, mod), err);
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
static ft_status layer_forward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x, void *y,
                               void *kbuf, void *vbuf, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    const layer_weights *lw = &m->layers[l];
    workspace *ws = &m->ws;
    const int N = s->N, D = c->hidden;
    void *k = kbuf ? kbuf : A->k, *v = vbuf ? vbuf : A->v;

    /* attention branch: a1 = ln(x); qkv = W a1; q,k,v = split + rotary; ctx = attn; ao = Wd ctx */
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
    /* mlp: h = W1 in; g = gelu(h); mo = W2 g */
    CALL(linear_fwd(m, s, l, FT_MOD_H_TO_4H, A->h, mlp_in, A->xa[FT_MOD_H_TO_4H], err));
    CALL(op->gelu_fwd(m->be, ws->g, A->h, (size_t)N * c->ffn, err));
    CALL(linear_fwd(m, s, l, FT_MOD_4H_TO_H, ws->mlp_o, ws->g, A->xa[FT_MOD_4H_TO_H], err));

    /* residual: y = x + ao + mo (parallel) or r + mo */
    if (c->parallel_attn) return op->add(m->be, y, x, ws->attn_o, ws->mlp_o, (size_t)N * D, err);
    return op->add(m->be, y, A->r, ws->mlp_o, NULL, (size_t)N * D, err);
}

/* On entry ws->dres holds dL/dy of layer l; on exit dL/dx (when need_dx). */
static ft_status layer_backward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x,
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

/* ------------------------------------------------------------------------ */
/* steps                                                                     */

static ft_status check_ids(const ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T,
                           int mask_T, ft_error *err)
{
    if (B <= 0 || T <= 0) return ft_fail(err, FT_EINVAL, "input_ids: expected a non-empty [batch, tokens] array");
    if ((int64_t)B * T > (1 << 26)) return ft_fail(err, FT_EINVAL, "input_ids: too many tokens (%d x %d)", B, T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t id = ids[(size_t)b * T + t];
            if (id < 0 || id >= m->cfg.vocab_size)
                return ft_fail(err, FT_EINVAL, "input_ids[%d, %d] = %d is outside the vocabulary [0, %d)", b, t,
                               (int)id, m->cfg.vocab_size);
        }
    if (mask)
        for (size_t i = 0; i < (size_t)B * mask_T; i++)
            if (mask[i] != 0 && mask[i] != 1)
                return ft_fail(err, FT_EINVAL, "attention_mask: expected 0 or 1, got %d at [%zu, %zu]",
                               (int)mask[i], i / mask_T, i % mask_T);
    return FT_OK;
}

/* Positions of the last T of Tk tokens per row = count of real tokens before
 * each; alibi key positions likewise (0 on padding); row_real[b] (when given) = real tokens of
 * row b, the position of its next token. Host arrays. */
static void positions(const int32_t *mask, int B, int T, int Tk, int32_t *pos, int32_t *kmask, int32_t *kpos,
                      int32_t *row_real)
{
    for (int b = 0; b < B; b++) {
        int32_t seen = 0;
        for (int j = 0; j < Tk; j++) {
            int32_t mj = mask ? mask[(size_t)b * Tk + j] : 1;
            if (kmask) {
                kmask[(size_t)b * Tk + j] = mj;
                kpos[(size_t)b * Tk + j] = mj ? seen : 0;
            }
            if (j >= Tk - T) pos[(size_t)b * T + j - (Tk - T)] = seen;
            seen += mj;
        }
        if (row_real) row_real[b] = seen;
    }
}

/* Upload ids, positions and key masks for a step without cache. */
static ft_status prepare_step(ft_model *m, step_ctx *s, const int32_t *ids, const int32_t *mask, int B, int T,
                              ft_error *err)
{
    workspace *ws = &m->ws;
    const size_t N = (size_t)B * T;
    int32_t *host = malloc(3 * N * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    positions(mask, B, T, T, host, host + N, host + 2 * N, NULL);
    ft_status st = m->be->ops->upload(m->be, ws->ids, ids, N * sizeof(int32_t), err);
    if (!st) st = m->be->ops->upload(m->be, ws->pos, host, N * sizeof(int32_t), err);
    if (!st) st = m->be->ops->upload(m->be, ws->kmask, host + N, N * sizeof(int32_t), err);
    if (!st) st = m->be->ops->upload(m->be, ws->kpos, host + 2 * N, N * sizeof(int32_t), err);
    free(host);
    memset(s, 0, sizeof *s);
    s->B = B; s->T = T; s->N = (int)N; s->Tk = T; s->cap = T; s->past = 0; s->kstride = T;
    s->kmask = ws->kmask; s->kpos = ws->kpos; s->pos = ws->pos;
    return st;
}

/* Embedding, layers, ln_f. save: keep each layer's activations for backward (a training
 * workspace); otherwise every layer reuses the shared set (inference, evaluation). */
static ft_status run_layers(ft_model *m, const step_ctx *s, int save, ft_error *err)
{
    workspace *ws = &m->ws;
    const int L = m->cfg.n_layer;
    CALL(m->be->ops->embed(m->be, ws->xs[0], ws->ids, m->embed, s->N, m->cfg.hidden, err));
    for (int l = 0; l < L; l++) {
        layer_acts *A = save ? &ws->acts[l] : &ws->shared;
        CALL(layer_forward(m, s, l, A, ws->xs[l], ws->xs[l + 1], NULL, NULL, err));
    }
    return m->be->ops->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, ws->xs[L], m->lnf_w, m->lnf_b, s->N,
                                     m->cfg.hidden, m->cfg.ln_eps, err);
}

ft_status ft_forward(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, float *logits,
                     ft_error *err)
{
    CALL(check_ids(m, ids, mask, B, T, T, err));
    CALL(ensure_workspace(m, B * T, 0, err));
    step_ctx s;
    CALL(prepare_step(m, &s, ids, mask, B, T, err));
    s.train = 0;
    workspace *ws = &m->ws;
    CALL(run_layers(m, &s, 0, err));
    const int V = m->cfg.vocab_size, D = m->cfg.hidden;
    for (int r0 = 0; r0 < s.N; r0 += ws->chunk) {
        const int n = s.N - r0 < ws->chunk ? s.N - r0 : ws->chunk;
        const char *h = (const char *)ws->hf + act_bytes(m, (size_t)r0 * D);
        CALL(m->be->ops->lm_logits(m->be, ws->logits, h, m->lm_head, n, V, D, err));
        CALL(m->be->ops->download(m->be, logits + (size_t)r0 * V, ws->logits, (size_t)n * V * sizeof(float), err));
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
    CALL(check_ids(m, ids, mask, B, T, T, err));
    if (backward && !m->lora_r)
        return ft_fail(err, FT_ESTATE, "forward_backward: the model has no LoRA adapter to train");
    if (!isfinite(grad_scale)) return ft_fail(err, FT_EINVAL, "grad_scale must be finite");
    const int N = B * T, V = c->vocab_size, D = c->hidden, L = c->n_layer;

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
    ft_status st = ensure_workspace(m, N, backward, err);
    workspace *ws = &m->ws;
    step_ctx s;
    if (!st) st = prepare_step(m, &s, ids, mask, B, T, err);
    if (!st) st = op->upload(m->be, ws->tgt, tgt, (size_t)N * sizeof(int32_t), err);
    free(tgt);
    if (st) return st;
    if (backward) {
        s.train = m->training;
        s.seed = ft_mix64(m->rng_seed ^ ft_mix64(m->rng_counter));
        m->rng_counter++;
    }
    CALL(run_layers(m, &s, backward, err));

    /* head + loss in row chunks: logits -> dlogits in place -> dhf (into da1) */
    const float gmul = backward ? grad_scale / (float)n_valid : 0.0f;
    double sum = 0.0;
    float *row_loss = malloc((size_t)ws->chunk * sizeof(float));
    if (!row_loss) return ft_fail(err, FT_ENOMEM, "out of host memory");
    for (int r0 = 0; r0 < N && !st; r0 += ws->chunk) {
        const int n = N - r0 < ws->chunk ? N - r0 : ws->chunk;
        const char *h = (const char *)ws->hf + act_bytes(m, (size_t)r0 * D);
        char *dh = (char *)ws->da1 + act_bytes(m, (size_t)r0 * D);
        st = op->lm_logits(m->be, ws->logits, h, m->lm_head, n, V, D, err);
        if (!st) st = op->cross_entropy(m->be, ws->logits, ws->row_loss, ws->tgt + r0, n, V, gmul, err);
        if (!st && backward) st = op->lm_bwd(m->be, dh, ws->logits, m->lm_head, n, V, D, err);
        if (!st) st = op->download(m->be, row_loss, ws->row_loss, (size_t)n * sizeof(float), err);
        for (int i = 0; i < n && !st; i++) sum += row_loss[i];
    }
    free(row_loss);
    if (st) return st;
    *loss = sum / (double)n_valid;
    if (!backward) return FT_OK;

    /* dres = ln_f'(dhf) */
    CALL(op->zero(m->be, ws->dres, act_bytes(m, (size_t)N * D), err));
    CALL(op->layernorm_bwd(m->be, ws->dres, ws->da1, ws->xs[L], ws->meanf, ws->rstdf, m->lnf_w, N, D, err));

    const int n_ckpt = L - ws->n_saved;
    for (int l = L - 1; l >= m->lora_min_layer; l--) {
        layer_acts *A = &ws->acts[l];
        if (l < n_ckpt) /* recompute this layer's activations (same dropout seeds) */
            CALL(layer_forward(m, &s, l, A, ws->xs[l], ws->ytmp, NULL, NULL, err));
        CALL(layer_backward(m, &s, l, A, ws->xs[l], l > m->lora_min_layer, err));
    }
    return op->sync(m->be, err);
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

/* ------------------------------------------------------------------------ */
/* optimizer                                                                 */

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

/* ------------------------------------------------------------------------ */
/* generation with a KV cache                                                */

/* Captured decode steps keep the pointers and arguments they were recorded with: dropped when
 * the adapter changes. The next steps run directly, then capture again. */
static void cache_drop_graphs(ft_model *m)
{
    kv_cache *kc = &m->cache;
    for (int i = 0; i < 2; i++) {
        if (kc->graph[i]) m->be->ops->graph_destroy(m->be, kc->graph[i]);
        kc->graph[i] = NULL;
        if (kc->warm[i] > 0) kc->warm[i] = 0;
    }
}

void ft_cache_free(ft_model *m)
{
    kv_cache *kc = &m->cache;
    ft_backend *be = m->be;
    for (int l = 0; kc->k && l < m->cfg.n_layer; l++) {
        be->ops->free(be, kc->k[l]);
        be->ops->free(be, kc->v[l]);
    }
    free(kc->k);
    free(kc->v);
    if (kc->tmp) be->ops->free(be, kc->tmp);
    if (kc->kmask) be->ops->free(be, kc->kmask);
    if (kc->kpos) be->ops->free(be, kc->kpos);
    if (kc->gather_idx) be->ops->free(be, kc->gather_idx);
    if (kc->step_dev) be->ops->free(be, kc->step_dev);
    for (int i = 0; i < 2; i++)
        if (kc->graph[i]) be->ops->graph_destroy(be, kc->graph[i]);
    free(kc->seen);
    memset(kc, 0, sizeof *kc);
}

int ft_cache_len(const ft_model *m) { return m->cache.len; }

ft_status ft_cache_init(ft_model *m, int B, int capacity, ft_error *err)
{
    const ft_config *c = &m->cfg;
    if (B <= 0 || capacity <= 0) return ft_fail(err, FT_EINVAL, "cache: batch and capacity must be positive");
    ft_cache_free(m);
    kv_cache *kc = &m->cache;
    const size_t kv_bytes = act_bytes(m, (size_t)B * c->n_kv_head * capacity * c->head_dim);
    kc->k = calloc((size_t)c->n_layer, sizeof(void *));
    kc->v = calloc((size_t)c->n_layer, sizeof(void *));
    kc->seen = calloc((size_t)B, sizeof(int32_t));
    ft_status st = (!kc->k || !kc->v || !kc->seen) ? ft_fail(err, FT_ENOMEM, "out of host memory") : FT_OK;
    for (int l = 0; l < c->n_layer && !st; l++) {
        st = m->be->ops->alloc(m->be, kv_bytes, &kc->k[l], err);
        if (!st) st = m->be->ops->alloc(m->be, kv_bytes, &kc->v[l], err);
    }
    const size_t mask_bytes = (size_t)B * capacity * sizeof(int32_t); /* tmp also reorders the masks */
    if (!st) st = m->be->ops->alloc(m->be, kv_bytes > mask_bytes ? kv_bytes : mask_bytes, &kc->tmp, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * capacity * sizeof(int32_t), (void **)&kc->kmask, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * capacity * sizeof(int32_t), (void **)&kc->kpos, err);
    if (!st) st = m->be->ops->alloc(m->be, (size_t)B * sizeof(int32_t), (void **)&kc->gather_idx, err);
    if (!st) st = m->be->ops->alloc(m->be, 2 * sizeof(int32_t), (void **)&kc->step_dev, err);
    if (st) {
        ft_cache_free(m);
        if (st == FT_EDEVMEM || st == FT_ENOMEM)
            return ft_fail(err, st, "out of memory allocating the KV cache for %d x %d tokens", B, capacity);
        return st;
    }
    kc->B = B;
    kc->cap = capacity;
    kc->len = 0;
    return FT_OK;
}

/* ln_f and the lm head over x[B, D] (act) -> host logits [B, V], in row chunks of ws->chunk */
static ft_status head_rows(ft_model *m, const void *x, int B, float *logits, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    workspace *ws = &m->ws;
    const int D = c->hidden, V = c->vocab_size;
    CALL(op->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, x, m->lnf_w, m->lnf_b, B, D, c->ln_eps, err));
    for (int r0 = 0; r0 < B; r0 += ws->chunk) {
        const int n = B - r0 < ws->chunk ? B - r0 : ws->chunk;
        CALL(op->lm_logits(m->be, ws->logits, (const char *)ws->hf + act_bytes(m, (size_t)r0 * D), m->lm_head, n, V,
                           D, err));
        CALL(op->download(m->be, logits + (size_t)r0 * V, ws->logits, (size_t)n * V * sizeof(float), err));
    }
    return FT_OK;
}

ft_status ft_forward_cached(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, float *last_logits,
                            ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    if (!kc->k) return ft_fail(err, FT_ESTATE, "no KV cache (cache_init was not called)");
    if (B != kc->B) return ft_fail(err, FT_EINVAL, "batch %d does not match the cache's %d", B, kc->B);
    const int Tk = kc->len + T;
    if (Tk > kc->cap)
        return ft_fail(err, FT_EINVAL, "KV cache full: %d + %d tokens exceed its capacity %d", kc->len, T, kc->cap);
    CALL(check_ids(m, ids, mask, B, T, Tk, err));
    const int N = B * T, D = c->hidden, L = c->n_layer;
    CALL(ensure_workspace(m, N, 0, err));
    workspace *ws = &m->ws;

    /* positions of the new tokens, and the key masks over the whole cache */
    int32_t *host = malloc(((size_t)N + 2 * (size_t)B * Tk + B) * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int32_t *pos = host, *kmask = host + N, *kpos = kmask + (size_t)B * Tk, *last = kpos + (size_t)B * Tk;
    positions(mask, B, T, Tk, pos, kmask, kpos, kc->seen);
    for (int b = 0; b < B; b++) last[b] = b * T + T - 1;
    /* the cache's mask/pos rows are [B, cap]: upload row by row at stride cap */
    ft_status st = op->upload(m->be, ws->ids, ids, (size_t)N * sizeof(int32_t), err);
    if (!st) st = op->upload(m->be, ws->pos, pos, (size_t)N * sizeof(int32_t), err);
    for (int b = 0; b < B && !st; b++) {
        const size_t row = (size_t)b * kc->cap;
        st = op->upload(m->be, kc->kmask + row, kmask + (size_t)b * Tk, (size_t)Tk * sizeof(int32_t), err);
        if (!st) st = op->upload(m->be, kc->kpos + row, kpos + (size_t)b * Tk, (size_t)Tk * sizeof(int32_t), err);
    }
    if (!st) st = op->upload(m->be, kc->gather_idx, last, (size_t)B * sizeof(int32_t), err);
    free(host);
    if (st) return st;

    step_ctx s;
    memset(&s, 0, sizeof s);
    s.B = B; s.T = T; s.N = N; s.Tk = Tk; s.cap = kc->cap; s.past = kc->len; s.kstride = kc->cap;
    s.kmask = kc->kmask; s.kpos = kc->kpos; s.pos = ws->pos;
    CALL(op->embed(m->be, ws->xs[0], ws->ids, m->embed, N, D, err));
    for (int l = 0; l < L; l++)
        CALL(layer_forward(m, &s, l, &ws->shared, ws->xs[l], ws->xs[l + 1], kc->k[l], kc->v[l], err));
    /* last position of each row -> ln_f -> logits [B, V] */
    CALL(op->gather_rows(m->be, ws->ytmp, ws->xs[L], kc->gather_idx, B, act_bytes(m, D), err));
    CALL(head_rows(m, ws->ytmp, B, last_logits, err));
    kc->len = Tk;
    return FT_OK;
}

enum { HEAD_LOGITS = 0, HEAD_ARGMAX = 1, HEAD_NONE = 2 };

/* The device work of one decode step (the step's ids, positions, key column and {past, Tk} are
 * already uploaded): embedding, layers, then per `head`: ln_f + lm head into ws->logits
 * (B <= ws->chunk), the same plus the greedy ids into ws->tgt, or nothing (the caller runs
 * head_rows). Past and Tk are read on the device, so the same launches serve every step: a
 * captured graph of them is replayed. */
static ft_status decode_body(ft_model *m, int B, int head, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    workspace *ws = &m->ws;
    step_ctx s;
    memset(&s, 0, sizeof s);
    s.B = B; s.T = 1; s.N = B; s.Tk = kc->len + 1; s.cap = kc->cap; s.past = kc->len; s.kstride = kc->cap;
    s.kmask = kc->kmask; s.kpos = kc->kpos; s.pos = ws->pos;
    s.past_dev = kc->step_dev;
    s.tk_dev = kc->step_dev + 1;
    CALL(op->embed(m->be, ws->xs[0], ws->ids, m->embed, B, c->hidden, err));
    for (int l = 0; l < c->n_layer; l++)
        CALL(layer_forward(m, &s, l, &ws->shared, ws->xs[l], ws->xs[l + 1], kc->k[l], kc->v[l], err));
    if (head == HEAD_NONE) return FT_OK;
    CALL(op->layernorm_fwd(m->be, ws->hf, ws->meanf, ws->rstdf, ws->xs[c->n_layer], m->lnf_w, m->lnf_b, B, c->hidden,
                           c->ln_eps, err));
    for (int r0 = 0; r0 < B; r0 += ws->chunk) { /* one chunk unless argmax over many rows */
        const int n = B - r0 < ws->chunk ? B - r0 : ws->chunk;
        CALL(op->lm_logits(m->be, ws->logits, (const char *)ws->hf + act_bytes(m, (size_t)r0 * c->hidden), m->lm_head,
                           n, c->vocab_size, c->hidden, err));
        if (head == HEAD_ARGMAX) CALL(op->argmax_rows(m->be, ws->logits, n, c->vocab_size, ws->tgt + r0, err));
    }
    return FT_OK;
}

/* decode_body, replayed from a graph where the backend has them: the first step of a kind runs
 * directly (it creates every scratch buffer), the second is captured, later ones replay it. */
static ft_status decode_run(ft_model *m, int B, int head, ft_error *err)
{
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    const int k = head;
    if (!op->capture_begin || head == HEAD_NONE || kc->warm[k] < 0) return decode_body(m, B, head, err);
    const uint64_t gen = op->scratch_generation(m->be);
    if (kc->graph[k] && (kc->graph_gen[k] != gen || kc->graph_ws[k] != m->ws.block)) {
        op->graph_destroy(m->be, kc->graph[k]); /* its buffers moved */
        kc->graph[k] = NULL;
        kc->warm[k] = 0;
    }
    if (!kc->graph[k]) {
        if (!kc->warm[k] || kc->warm_gen[k] != gen) {
            CALL(decode_body(m, B, head, err));
            kc->warm[k] = 1;
            kc->warm_gen[k] = op->scratch_generation(m->be);
            return FT_OK;
        }
        ft_error cerr = {0};
        void *g = NULL;
        if (op->capture_begin(m->be, &cerr) == FT_OK) {
            const ft_status body = decode_body(m, B, head, &cerr);
            if (op->capture_end(m->be, body == FT_OK, &g, &cerr) != FT_OK) g = NULL;
        }
        if (!g) { /* no graph (off, or capture failed): run directly from now on */
            kc->warm[k] = -1;
            return decode_body(m, B, head, err);
        }
        kc->graph[k] = g;
        kc->graph_gen[k] = op->scratch_generation(m->be);
        kc->graph_ws[k] = m->ws.block;
    }
    return op->graph_launch(m->be, kc->graph[k], err);
}

/* One token per row appended to the cache. Only the new key's mask and position are uploaded
 * (the cache keeps [B, cap] rows), not the whole history as forward_cached does. */
ft_status ft_decode_step(ft_model *m, const int32_t *ids, const int32_t *mask, int B, float *last_logits,
                         int32_t *out_ids, ft_error *err)
{
    const ft_config *c = &m->cfg;
    const ft_backend_ops *op = m->be->ops;
    kv_cache *kc = &m->cache;
    if (!kc->k) return ft_fail(err, FT_ESTATE, "no KV cache (cache_init was not called)");
    if (B != kc->B) return ft_fail(err, FT_EINVAL, "batch %d does not match the cache's %d", B, kc->B);
    if (kc->len + 1 > kc->cap)
        return ft_fail(err, FT_EINVAL, "KV cache full: %d + 1 tokens exceed its capacity %d", kc->len, kc->cap);
    if (!last_logits == !out_ids) return ft_fail(err, FT_EINVAL, "decode_step: ask for logits or for ids");
    CALL(check_ids(m, ids, mask, B, 1, 1, err));
    const int past = kc->len;
    CALL(ensure_workspace(m, B, 0, err));
    workspace *ws = &m->ws;

    /* new token of row b: position seen[b]; its key: mask[b], alibi position seen[b] (0 if padding) */
    int32_t *host = malloc(3 * (size_t)B * sizeof(int32_t));
    if (!host) return ft_fail(err, FT_ENOMEM, "out of host memory");
    int32_t *pos = host, *km = host + B, *kp = host + 2 * B;
    for (int b = 0; b < B; b++) {
        pos[b] = kc->seen[b];
        km[b] = mask ? mask[b] : 1;
        kp[b] = km[b] ? kc->seen[b] : 0;
    }
    ft_status st = op->upload(m->be, ws->ids, ids, (size_t)B * sizeof(int32_t), err);
    if (!st) st = op->upload(m->be, ws->pos, pos, (size_t)B * sizeof(int32_t), err);
    for (int b = 0; b < B && !st; b++) {
        const size_t at = (size_t)b * kc->cap + past;
        st = op->upload(m->be, kc->kmask + at, km + b, sizeof(int32_t), err);
        if (!st) st = op->upload(m->be, kc->kpos + at, kp + b, sizeof(int32_t), err);
    }
    if (st) {
        free(host);
        return st;
    }

    const int32_t step[2] = {past, past + 1};
    const int head = out_ids ? HEAD_ARGMAX : B <= ws->chunk ? HEAD_LOGITS : HEAD_NONE;
    st = op->upload(m->be, kc->step_dev, step, sizeof step, err);
    if (!st) st = decode_run(m, B, head, err);
    if (!st && head == HEAD_ARGMAX) st = op->download(m->be, out_ids, ws->tgt, (size_t)B * sizeof(int32_t), err);
    if (!st && head == HEAD_LOGITS)
        st = op->download(m->be, last_logits, ws->logits, (size_t)B * c->vocab_size * sizeof(float), err);
    if (!st && head == HEAD_NONE) st = head_rows(m, ws->xs[c->n_layer], B, last_logits, err);
    if (!st) { /* committed only when the step went through */
        for (int b = 0; b < B; b++) kc->seen[b] += km[b];
        kc->len = past + 1;
    }
    free(host);
    return st;
}

ft_status ft_cache_reorder(ft_model *m, const int32_t *src, int B, ft_error *err)
{
    kv_cache *kc = &m->cache;
    const ft_config *c = &m->cfg;
    if (!kc->k) return ft_fail(err, FT_ESTATE, "no KV cache to reorder");
    if (B != kc->B) return ft_fail(err, FT_EINVAL, "reorder: %d rows for a cache of %d", B, kc->B);
    for (int b = 0; b < B; b++)
        if (src[b] < 0 || src[b] >= B) return ft_fail(err, FT_EINVAL, "reorder: row %d out of range", (int)src[b]);
    const size_t row = act_bytes(m, (size_t)c->n_kv_head * kc->cap * c->head_dim);
    int32_t *ident = malloc((size_t)B * sizeof(int32_t));
    if (!ident) return ft_fail(err, FT_ENOMEM, "out of host memory");
    for (int b = 0; b < B; b++) ident[b] = b;
    ft_status st = FT_OK;
    /* every layer's k and v, then the key masks and positions ([B, cap] int32: tmp holds them) */
    for (int l = 0; l <= c->n_layer && !st; l++) {
        void *bufs[2];
        size_t rb = row;
        if (l < c->n_layer) {
            bufs[0] = kc->k[l];
            bufs[1] = kc->v[l];
        } else {
            bufs[0] = kc->kmask;
            bufs[1] = kc->kpos;
            rb = (size_t)kc->cap * sizeof(int32_t);
        }
        for (int i = 0; i < 2 && !st; i++) {
            st = m->be->ops->upload(m->be, kc->gather_idx, src, (size_t)B * sizeof(int32_t), err);
            if (!st) st = m->be->ops->gather_rows(m->be, kc->tmp, bufs[i], kc->gather_idx, B, rb, err);
            if (!st) st = m->be->ops->upload(m->be, kc->gather_idx, ident, (size_t)B * sizeof(int32_t), err);
            if (!st) st = m->be->ops->gather_rows(m->be, bufs[i], kc->tmp, kc->gather_idx, B, rb, err);
        }
    }
    if (!st) { /* host counters follow their rows */
        for (int b = 0; b < B; b++) ident[b] = kc->seen[src[b]];
        memcpy(kc->seen, ident, (size_t)B * sizeof(int32_t));
    }
    free(ident);
    return st;
}
