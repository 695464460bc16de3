/* model.c -- the model object: config checks, weight binding, create / free, accessors.
 *
 * The model's other jobs live beside it (model_internal.h lists them): LoRA storage (lora.c),
 * the activation workspace (workspace.c), one layer forward and backward (layer.c), the full
 * forward (forward.c), loss and optimizer (train.c), the KV cache and decoding (decode.c).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cost.h"
#include "model_internal.h"

/* ------------------------------------------------------------------------ */
/* config and weights                                                        */

static ft_status check_config(const ft_config *c, ft_error *err)
{
    if (c->vocab_size <= 0 || c->hidden <= 0 || c->n_head <= 0 || c->n_kv_head <= 0 || c->n_layer <= 0 ||
        c->ffn <= 0)
        return ft_fail(err, FT_EINVAL, "config: vocab_size, hidden_size, heads, kv heads, layers and "
                                       "ffn_hidden_size must be positive");
    /* every width the engine derives (qkv up to 3 x hidden, packed words of 8-bit values) stays an int */
    if (c->vocab_size > FT_MAX_DIM || c->hidden > FT_MAX_DIM || c->ffn > FT_MAX_DIM || c->n_layer > FT_MAX_DIM)
        return ft_fail(err, FT_EUNSUPPORTED, "config: vocab_size %d, hidden_size %d, ffn_hidden_size %d and layers %d "
                       "must each be at most %d", c->vocab_size, c->hidden, c->ffn, c->n_layer, FT_MAX_DIM);
    if ((int64_t)c->head_dim * c->n_head != c->hidden)
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
    if (!st) st = ft_cost_wrap_from_env(&m->be, err); /* FT_COUNT_COSTS: cost.h */
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

void ft_model_free(ft_model *m)
{
    if (!m) return;
    ft_backend *be = m->be;
    if (be) {
        ft_cache_free(m);
        workspace_free(m);
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
ft_backend *ft_model_backend(ft_model *m) { return m->be; }
const char *ft_model_device(const ft_model *m) { return m->device; }
ft_dtype ft_model_act_dtype(const ft_model *m) { return m->be->act_dtype; }
