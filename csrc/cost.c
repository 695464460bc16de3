/* cost.c -- the counting backend of cost.h: each op adds its cost to a counter, then runs on
 * the wrapped backend. Only shapes and dtypes are looked at, never element data.
 *
 * Shapes as in backend.h: N rows, D features, V vocab, r LoRA rank, hd head dim, H query
 * heads, KV key/value heads, T queries and Tk keys per row. "act" counts activation-dtype
 * elements, "weight" dense-weight-dtype elements, "fixed" bytes of f32 / i32 / packed data.
 */
#include <stdlib.h>
#include <string.h>

#include "cost.h"

typedef struct cost_backend {
    ft_backend base; /* ops = cost_ops; dtypes those of the wrapped backend */
    ft_backend *inner;
    ft_op_cost count[FT_COST_NOPS];
} cost_backend;

/* A quantized linear as the counter sees it: the shapes its costs need, and the real one. */
typedef struct cost_qlinear {
    ft_qlinear *inner;
    uint64_t in, out;
    uint64_t packed_bytes; /* qweight + qzeros + scales + g_idx, as the host tensors hold them */
    uint64_t bias_bytes;   /* f32 bias, 0 when absent */
} cost_qlinear;

typedef struct cost {
    uint64_t flops, act, weight, fixed, dequant;
} cost;

static cost_backend *CB(ft_backend *be) { return (cost_backend *)be; }
static ft_backend *IN(ft_backend *be) { return CB(be)->inner; }
static const cost_qlinear *CQ(const ft_qlinear *q) { return (const cost_qlinear *)(const void *)q; }

/* forward one op to the wrapped backend */
#define FWD(op, ...) IN(be)->ops->op(IN(be), __VA_ARGS__)

static ft_status tally(ft_backend *be, ft_cost_op op, ft_status st, cost c)
{
    if (st != FT_OK) return st; /* a failed op moved nothing we can vouch for */
    ft_op_cost *k = &CB(be)->count[op];
    k->calls++;
    k->flops += c.flops;
    k->act_elems += c.act;
    k->weight_elems += c.weight;
    k->fixed_bytes += c.fixed;
    k->dequant_elems += c.dequant;
    k->bytes += c.act * ft_dtype_size(be->act_dtype) + c.weight * ft_dtype_size(be->weight_dtype) + c.fixed;
    return st;
}

static const cost NONE = {0, 0, 0, 0, 0};

/* ---- memory: transfers count their bytes, bookkeeping only its calls ---- */

static void c_destroy(ft_backend *be)
{
    IN(be)->ops->destroy(IN(be));
    free(CB(be));
}

static ft_status c_alloc(ft_backend *be, size_t bytes, void **ptr, ft_error *err)
{
    return tally(be, FT_COST_ALLOC, FWD(alloc, bytes, ptr, err), NONE);
}

static void c_free(ft_backend *be, void *ptr)
{
    FWD(free, ptr);
    tally(be, FT_COST_FREE, FT_OK, NONE);
}

static ft_status c_upload(ft_backend *be, void *dst, const void *src, size_t bytes, ft_error *err)
{
    return tally(be, FT_COST_UPLOAD, FWD(upload, dst, src, bytes, err), (cost){.fixed = bytes});
}

static ft_status c_download(ft_backend *be, void *dst, const void *src, size_t bytes, ft_error *err)
{
    return tally(be, FT_COST_DOWNLOAD, FWD(download, dst, src, bytes, err), (cost){.fixed = bytes});
}

static ft_status c_zero(ft_backend *be, void *dst, size_t bytes, ft_error *err)
{
    return tally(be, FT_COST_ZERO, FWD(zero, dst, bytes, err), (cost){.fixed = bytes});
}

static ft_status c_sync(ft_backend *be, ft_error *err)
{
    return tally(be, FT_COST_SYNC, IN(be)->ops->sync(IN(be), err), NONE);
}

/* ---- weights (load time: calls only) ---- */

static ft_status c_dense_create(ft_backend *be, const ft_host_tensor *src, void **dst, ft_error *err)
{
    return tally(be, FT_COST_DENSE_CREATE, FWD(dense_create, src, dst, err), NONE);
}

static uint64_t host_bytes(const ft_host_tensor *t)
{
    if (!t->data) return 0;
    uint64_t n = ft_dtype_size(t->dtype);
    for (int i = 0; i < t->ndim; i++) n *= (uint64_t)t->shape[i];
    return n;
}

static ft_status c_qlinear_create(ft_backend *be, const ft_qlinear_desc *d, ft_qlinear **out, ft_error *err)
{
    *out = NULL;
    cost_qlinear *q = calloc(1, sizeof *q);
    if (!q) return ft_fail(err, FT_ENOMEM, "out of host memory");
    ft_status st = FWD(qlinear_create, d, &q->inner, err);
    if (st) {
        free(q);
        return st;
    }
    const ft_host_qlinear *h = d->host;
    q->in = (uint64_t)d->in;
    q->out = (uint64_t)d->out;
    q->packed_bytes = host_bytes(&h->qweight) + host_bytes(&h->qzeros) + host_bytes(&h->scales) +
                      host_bytes(&h->g_idx);
    q->bias_bytes = h->bias.data ? q->out * sizeof(float) : 0;
    *out = (ft_qlinear *)(void *)q;
    return tally(be, FT_COST_QLINEAR_CREATE, FT_OK, NONE);
}

static void c_qlinear_destroy(ft_backend *be, ft_qlinear *q)
{
    if (!q) return;
    cost_qlinear *cq = (cost_qlinear *)(void *)q;
    FWD(qlinear_destroy, cq->inner);
    free(cq);
    tally(be, FT_COST_QLINEAR_DESTROY, FT_OK, NONE);
}

/* ---- embedding / norms / activations ---- */

/* out[N,D] written; N table rows and N ids read */
static ft_status c_embed(ft_backend *be, void *out, const int32_t *ids, const void *table, int N, int D,
                         ft_error *err)
{
    const uint64_t nd = (uint64_t)N * D;
    return tally(be, FT_COST_EMBED, FWD(embed, out, ids, table, N, D, err),
                 (cost){.act = nd, .weight = nd, .fixed = (uint64_t)N * 4});
}

/* 8 FLOPs an element: mean 1; variance 3 (subtract, square, add); normalize + affine 4.
 * x read, y written; g, b read; mean, rstd written. */
static ft_status c_layernorm_fwd(ft_backend *be, void *y, float *mean, float *rstd, const void *x, const void *g,
                                 const void *b, int N, int D, float eps, ft_error *err)
{
    const uint64_t nd = (uint64_t)N * D;
    const uint64_t w = (g ? (uint64_t)D : 0) + (b ? (uint64_t)D : 0);
    return tally(be, FT_COST_LAYERNORM_FWD, FWD(layernorm_fwd, y, mean, rstd, x, g, b, N, D, eps, err),
                 (cost){.flops = 8 * nd, .act = 2 * nd, .weight = w, .fixed = (uint64_t)N * 8});
}

/* 11 FLOPs an element: x-hat 2, g*dy 1, the two row sums 3, the gradient 4, the += 1.
 * dy, x read; dx read and written; g, mean, rstd read. */
static ft_status c_layernorm_bwd(ft_backend *be, void *dx, const void *dy, const void *x, const float *mean,
                                 const float *rstd, const void *g, int N, int D, ft_error *err)
{
    const uint64_t nd = (uint64_t)N * D;
    return tally(be, FT_COST_LAYERNORM_BWD, FWD(layernorm_bwd, dx, dy, x, mean, rstd, g, N, D, err),
                 (cost){.flops = 11 * nd, .act = 4 * nd, .weight = g ? (uint64_t)D : 0, .fixed = (uint64_t)N * 8});
}

/* 0.5 x (1 + erf(x / sqrt 2)): 5 FLOPs an element */
static ft_status c_gelu_fwd(ft_backend *be, void *y, const void *x, size_t n, ft_error *err)
{
    return tally(be, FT_COST_GELU_FWD, FWD(gelu_fwd, y, x, n, err), (cost){.flops = 5 * (uint64_t)n, .act = 2 * n});
}

/* dy (Phi(x) + x phi(x)): Phi 4, phi 4, the rest 3: 11 FLOPs an element */
static ft_status c_gelu_bwd(ft_backend *be, void *dx, const void *dy, const void *x, size_t n, ft_error *err)
{
    return tally(be, FT_COST_GELU_BWD, FWD(gelu_bwd, dx, dy, x, n, err),
                 (cost){.flops = 11 * (uint64_t)n, .act = 3 * (uint64_t)n});
}

static ft_status c_add(ft_backend *be, void *y, const void *a, const void *b, const void *c, size_t n, ft_error *err)
{
    const uint64_t terms = c ? 3 : 2;
    return tally(be, FT_COST_ADD, FWD(add, y, a, b, c, n, err),
                 (cost){.flops = (terms - 1) * n, .act = (terms + 1) * n});
}

/* ---- linears ---- */

/* y[N,out] = x[N,in] W + bias: 2 N in out (+ N out). x read, y written, packed W read. */
static ft_status c_qlinear_fwd(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N, ft_error *err)
{
    const cost_qlinear *cq = CQ(q);
    const uint64_t n = N > 0 ? (uint64_t)N : 0;
    cost c = NONE;
    if (n) {
        c.flops = 2 * n * cq->in * cq->out + (cq->bias_bytes ? n * cq->out : 0);
        c.act = n * (cq->in + cq->out);
        c.fixed = cq->packed_bytes + cq->bias_bytes;
        c.dequant = cq->in * cq->out;
    }
    return tally(be, FT_COST_QLINEAR_FWD, FWD(qlinear_fwd, y, x, cq->inner, N, err), c);
}

/* dx[N,in] (+)= dy[N,out] W^T: 2 N in out (+ N in). dy read, dx written (and read), packed W read. */
static ft_status c_qlinear_bwd(ft_backend *be, void *dx, const void *dy, const ft_qlinear *q, int N, int accumulate,
                               ft_error *err)
{
    const cost_qlinear *cq = CQ(q);
    const uint64_t n = N > 0 ? (uint64_t)N : 0;
    cost c = NONE;
    if (n) {
        c.flops = 2 * n * cq->in * cq->out + (accumulate ? n * cq->in : 0);
        c.act = n * cq->out + n * cq->in * (accumulate ? 2 : 1);
        c.fixed = cq->packed_bytes;
        c.dequant = cq->in * cq->out;
    }
    return tally(be, FT_COST_QLINEAR_BWD, FWD(qlinear_bwd, dx, dy, cq->inner, N, accumulate, err), c);
}

/* xa = x A^T: 2 N in r; y += xa B^T: 2 N r out + the scaled add 2 N out.
 * x read, y read and written (act); A, B read, xa written (f32). */
static ft_status c_lora_fwd(ft_backend *be, void *y, float *xa, const void *x, const float *A, const float *B, int N,
                            int in, int out, int r, float scale, float p, uint64_t seed, ft_error *err)
{
    const uint64_t n = (uint64_t)N, i = (uint64_t)in, o = (uint64_t)out, k = (uint64_t)r;
    return tally(be, FT_COST_LORA_FWD, FWD(lora_fwd, y, xa, x, A, B, N, in, out, r, scale, p, seed, err),
                 (cost){.flops = 2 * n * i * k + 2 * n * k * o + 2 * n * o,
                        .act = n * i + 2 * n * o,
                        .fixed = 4 * (k * i + o * k + n * k)});
}

/* dB += dy^T xa: 2 N out r; t = dy B: 2 N out r; dA += t^T x: 2 N r in; dx += t A: 2 N r in + N in.
 * dy, x read, dx read and written (act); xa, A, B read, dA, dB read and written (f32). */
static ft_status c_lora_bwd(ft_backend *be, void *dx, float *dA, float *dB, const void *dy, const void *x,
                            const float *xa, const float *A, const float *B, int N, int in, int out, int r, float scale,
                            float p, uint64_t seed, ft_error *err)
{
    const uint64_t n = (uint64_t)N, i = (uint64_t)in, o = (uint64_t)out, k = (uint64_t)r;
    cost c = {.flops = 4 * n * o * k + 2 * n * k * i, .act = n * o + n * i,
              .fixed = 4 * (n * k + k * i + o * k + 2 * k * i + 2 * o * k)};
    if (dx) {
        c.flops += 2 * n * k * i + n * i;
        c.act += 2 * n * i;
    }
    return tally(be, FT_COST_LORA_BWD,
                 FWD(lora_bwd, dx, dA, dB, dy, x, xa, A, B, N, in, out, r, scale, p, seed, err), c);
}

/* state, no cost */
static ft_status c_set_dropout_base(ft_backend *be, uint64_t base, ft_error *err)
{
    return FWD(set_dropout_base, base, err);
}

/* ---- attention ---- */

/* qkv[N, (H+2KV) hd] read; q, k, v written; rotary: 3 FLOPs an element of q and k; pos, cols read */
static cost qkv_split_cost(const ft_qkv_args *a)
{
    const uint64_t n = (uint64_t)a->B * a->T, hd = (uint64_t)a->hd;
    const uint64_t heads = (uint64_t)a->H + 2 * (uint64_t)a->KV;
    return (cost){.flops = a->rope ? 3 * n * ((uint64_t)a->H + a->KV) * hd : 0,
                  .act = 2 * n * heads * hd,
                  .fixed = (a->rope ? n * 4 : 0) + heads * 4};
}

static ft_status c_qkv_split_fwd(ft_backend *be, void *q, void *k, void *v, const void *qkv, const ft_qkv_args *a,
                                 ft_error *err)
{
    return tally(be, FT_COST_QKV_SPLIT_FWD, FWD(qkv_split_fwd, q, k, v, qkv, a, err), qkv_split_cost(a));
}

static ft_status c_qkv_split_bwd(ft_backend *be, void *dqkv, const void *dq, const void *dk, const void *dv,
                                 const ft_qkv_args *a, ft_error *err)
{
    return tally(be, FT_COST_QKV_SPLIT_BWD, FWD(qkv_split_bwd, dqkv, dq, dk, dv, a, err), qkv_split_cost(a));
}

/* (query, key) pairs one (batch row, head) computes: query t sees keys 0 .. Tk-T+t */
static uint64_t causal_pairs(const ft_attn_args *a)
{
    const uint64_t T = (uint64_t)a->T, past = (uint64_t)(a->Tk - a->T);
    return T * past + T * (T + 1) / 2;
}

/* Per pair: scores 2 hd, probabilities x V 2 hd, softmax 5 (scale, max, subtract, exp, sum).
 * q, k, v read, out written (act); lse written, kmask, kpos (and alibi slopes) read. */
static ft_status c_attention_fwd(ft_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                                 const ft_attn_args *a, ft_error *err)
{
    const uint64_t B = (uint64_t)a->B, H = (uint64_t)a->H, KV = (uint64_t)a->KV, hd = (uint64_t)a->hd;
    const uint64_t T = (uint64_t)a->T, Tk = (uint64_t)a->Tk;
    cost c = {.flops = B * H * causal_pairs(a) * (4 * hd + 5),
              .act = 2 * B * H * T * hd + 2 * B * KV * Tk * hd,
              .fixed = 4 * (B * H * T + 2 * B * Tk + (a->slopes ? H : 0))};
    return tally(be, FT_COST_ATTENTION_FWD, FWD(attention_fwd, out, lse, q, k, v, a, err), c);
}

/* Per pair: scores again 2 hd, dP = dout V^T 2 hd, dV, dQ, dK 2 hd each, probabilities and dS 5;
 * per query: D = rowsum(dout * out) 2 hd. dout, out, q, k, v read; dq, dk, dv written (act);
 * lse, kmask, kpos (and slopes) read. */
static ft_status c_attention_bwd(ft_backend *be, void *dq, void *dk, void *dv, const void *dout, const void *out,
                                 const float *lse, const void *q, const void *k, const void *v, const ft_attn_args *a,
                                 ft_error *err)
{
    const uint64_t B = (uint64_t)a->B, H = (uint64_t)a->H, KV = (uint64_t)a->KV, hd = (uint64_t)a->hd;
    const uint64_t T = (uint64_t)a->T, Tk = (uint64_t)a->Tk;
    cost c = {.flops = B * H * causal_pairs(a) * (10 * hd + 5) + 2 * B * H * T * hd,
              .act = 4 * B * H * T * hd + 4 * B * KV * Tk * hd,
              .fixed = 4 * (B * H * T + 2 * B * Tk + (a->slopes ? H : 0))};
    return tally(be, FT_COST_ATTENTION_BWD, FWD(attention_bwd, dq, dk, dv, dout, out, lse, q, k, v, a, err), c);
}

/* ---- head and loss ---- */

/* logits[n,V] = h W^T: 2 n V D; h read (act), W read (weight), logits written (f32) */
static ft_status c_lm_logits(ft_backend *be, float *logits, const void *h, const void *W, int n, int V, int D,
                             ft_error *err)
{
    const uint64_t nv = (uint64_t)n * V, vd = (uint64_t)V * D;
    return tally(be, FT_COST_LM_LOGITS, FWD(lm_logits, logits, h, W, n, V, D, err),
                 (cost){.flops = 2 * nv * D, .act = (uint64_t)n * D, .weight = vd, .fixed = 4 * nv});
}

/* loss: 4 FLOPs a logit (max, subtract, exp, sum); the gradient 2 more (normalize, scale).
 * logits read (and written with the gradient), targets read, row losses written. */
static ft_status c_cross_entropy(ft_backend *be, float *logits, float *row_loss, const int32_t *target, int n, int V,
                                 float grad_scale, ft_error *err)
{
    const uint64_t nv = (uint64_t)n * V;
    const int grad = grad_scale != 0.0f;
    return tally(be, FT_COST_CROSS_ENTROPY, FWD(cross_entropy, logits, row_loss, target, n, V, grad_scale, err),
                 (cost){.flops = (grad ? 6 : 4) * nv, .fixed = 4 * nv * (grad ? 2 : 1) + 8 * (uint64_t)n});
}

/* one comparison a logit; logits read, ids written */
static ft_status c_argmax_rows(ft_backend *be, const float *logits, int n, int V, int32_t *out, ft_error *err)
{
    const uint64_t nv = (uint64_t)n * V;
    return tally(be, FT_COST_ARGMAX_ROWS, FWD(argmax_rows, logits, n, V, out, err),
                 (cost){.flops = nv, .fixed = 4 * nv + 4 * (uint64_t)n});
}

/* dh[n,D] = dlogits W: 2 n V D; dlogits read (f32), W read (weight), dh written (act) */
static ft_status c_lm_bwd(ft_backend *be, void *dh, const float *dlogits, const void *W, int n, int V, int D,
                          ft_error *err)
{
    const uint64_t nv = (uint64_t)n * V;
    return tally(be, FT_COST_LM_BWD, FWD(lm_bwd, dh, dlogits, W, n, V, D, err),
                 (cost){.flops = 2 * nv * D, .act = (uint64_t)n * D, .weight = (uint64_t)V * D, .fixed = 4 * nv});
}

/* ---- optimizer and misc ---- */

static ft_status c_sumsq(ft_backend *be, const float *x, size_t n, double *out, ft_error *err)
{
    return tally(be, FT_COST_SUMSQ, FWD(sumsq, x, n, out, err), (cost){.flops = 2 * (uint64_t)n, .fixed = 4 * n});
}

/* 16 FLOPs a parameter (gradient scale 1, two moments 7, decay 2, the step 6);
 * p, g, m, v read, p, m, v written */
static ft_status c_adamw(ft_backend *be, float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                         float beta2, float eps, float wd, float gmul, float bias_corr1, float bias_corr2,
                         ft_error *err)
{
    return tally(be, FT_COST_ADAMW,
                 FWD(adamw, p, g, m, v, n, lr, beta1, beta2, eps, wd, gmul, bias_corr1, bias_corr2, err),
                 (cost){.flops = 16 * (uint64_t)n, .fixed = 28 * (uint64_t)n});
}

/* rows of raw bytes: read and written, indices read */
static ft_status c_gather_rows(ft_backend *be, void *dst, const void *src, const int32_t *idx, int n, size_t row_bytes,
                               ft_error *err)
{
    return tally(be, FT_COST_GATHER_ROWS, FWD(gather_rows, dst, src, idx, n, row_bytes, err),
                 (cost){.fixed = 2 * (uint64_t)n * row_bytes + 4 * (uint64_t)n});
}

static ft_status c_memory_stats(ft_backend *be, size_t *current, size_t *peak, int reset, ft_error *err)
{
    if (!IN(be)->ops->memory_stats) {
        *current = *peak = 0;
        return FT_OK;
    }
    return FWD(memory_stats, current, peak, reset, err);
}

/* No capture ops: a graph replay would run the ops without passing through the counters. */
static const ft_backend_ops cost_ops = {
    .name = "counting",
    .destroy = c_destroy,
    .alloc = c_alloc,
    .free = c_free,
    .upload = c_upload,
    .download = c_download,
    .zero = c_zero,
    .sync = c_sync,
    .dense_create = c_dense_create,
    .qlinear_create = c_qlinear_create,
    .qlinear_destroy = c_qlinear_destroy,
    .embed = c_embed,
    .layernorm_fwd = c_layernorm_fwd,
    .layernorm_bwd = c_layernorm_bwd,
    .gelu_fwd = c_gelu_fwd,
    .gelu_bwd = c_gelu_bwd,
    .add = c_add,
    .qlinear_fwd = c_qlinear_fwd,
    /* no qlinear_fwd_epi: the engine then runs qlinear_fwd, gelu_fwd and add, each counted as
     * the separate op whose work a fused epilogue does */
    .qlinear_bwd = c_qlinear_bwd,
    .lora_fwd = c_lora_fwd,
    .lora_bwd = c_lora_bwd,
    .set_dropout_base = c_set_dropout_base,
    .qkv_split_fwd = c_qkv_split_fwd,
    .qkv_split_bwd = c_qkv_split_bwd,
    .attention_fwd = c_attention_fwd,
    .attention_bwd = c_attention_bwd,
    .lm_logits = c_lm_logits,
    .cross_entropy = c_cross_entropy,
    .argmax_rows = c_argmax_rows,
    .lm_bwd = c_lm_bwd,
    .sumsq = c_sumsq,
    .adamw = c_adamw,
    .gather_rows = c_gather_rows,
    .memory_stats = c_memory_stats,
};

static const char *const OP_NAMES[FT_COST_NOPS] = {
    [FT_COST_ALLOC] = "alloc", [FT_COST_FREE] = "free", [FT_COST_UPLOAD] = "upload",
    [FT_COST_DOWNLOAD] = "download", [FT_COST_ZERO] = "zero", [FT_COST_SYNC] = "sync",
    [FT_COST_DENSE_CREATE] = "dense_create", [FT_COST_QLINEAR_CREATE] = "qlinear_create",
    [FT_COST_QLINEAR_DESTROY] = "qlinear_destroy", [FT_COST_EMBED] = "embed",
    [FT_COST_LAYERNORM_FWD] = "layernorm_fwd", [FT_COST_LAYERNORM_BWD] = "layernorm_bwd",
    [FT_COST_GELU_FWD] = "gelu_fwd", [FT_COST_GELU_BWD] = "gelu_bwd", [FT_COST_ADD] = "add",
    [FT_COST_QLINEAR_FWD] = "qlinear_fwd", [FT_COST_QLINEAR_BWD] = "qlinear_bwd",
    [FT_COST_LORA_FWD] = "lora_fwd", [FT_COST_LORA_BWD] = "lora_bwd",
    [FT_COST_QKV_SPLIT_FWD] = "qkv_split_fwd", [FT_COST_QKV_SPLIT_BWD] = "qkv_split_bwd",
    [FT_COST_ATTENTION_FWD] = "attention_fwd", [FT_COST_ATTENTION_BWD] = "attention_bwd",
    [FT_COST_LM_LOGITS] = "lm_logits", [FT_COST_CROSS_ENTROPY] = "cross_entropy",
    [FT_COST_ARGMAX_ROWS] = "argmax_rows", [FT_COST_LM_BWD] = "lm_bwd", [FT_COST_SUMSQ] = "sumsq",
    [FT_COST_ADAMW] = "adamw", [FT_COST_GATHER_ROWS] = "gather_rows",
};

const char *ft_cost_op_name(int op)
{
    return op >= 0 && op < FT_COST_NOPS ? OP_NAMES[op] : NULL;
}

ft_status ft_cost_wrap_from_env(ft_backend **be, ft_error *err)
{
    const char *flag = getenv("FT_COUNT_COSTS");
    if (!flag || !flag[0] || strcmp(flag, "0") == 0) return FT_OK;
    cost_backend *cb = calloc(1, sizeof *cb);
    if (!cb) {
        (*be)->ops->destroy(*be);
        *be = NULL;
        return ft_fail(err, FT_ENOMEM, "out of host memory creating the cost counters");
    }
    cb->inner = *be;
    cb->base.ops = &cost_ops;
    cb->base.act_dtype = cb->inner->act_dtype;
    cb->base.weight_dtype = cb->inner->weight_dtype;
    *be = &cb->base;
    return FT_OK;
}

ft_status ft_model_op_costs(ft_model *m, ft_op_cost out[FT_COST_NOPS], int reset, ft_error *err)
{
    ft_backend *be = ft_model_backend(m);
    if (be->ops != &cost_ops)
        return ft_fail(err, FT_ESTATE, "op costs are not counted for this model: set FT_COUNT_COSTS=1 in the "
                                       "environment before loading it");
    cost_backend *cb = CB(be);
    memcpy(out, cb->count, sizeof cb->count);
    if (reset) memset(cb->count, 0, sizeof cb->count);
    return FT_OK;
}
