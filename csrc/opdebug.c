/* opdebug.c -- run one op of a backend's op table on host arrays (opdebug.h).
 *
 * One runner function per op binds the op's arguments by name: it checks each array's element
 * count against the scalars (and every index array's values, since the ops trust theirs), uploads
 * the array in the backend's dtype, then calls the op. Binding twice re-uploads the same host values
 * into the same buffers, which is how a graph run restores its inputs before the capture. Only
 * backend.h is used: the runner is another caller of the op table, like model.c.
 *
 * The list of ft_backend_ops entries below is checked against the struct at compile time (same
 * count, same order), so an op added to the table does not build until it is listed here, and
 * tests/test_ops.py fails until it has a test case.
 *
 * Longer than ~700 lines on purpose: one short runner per op of the table (about thirty), kept in
 * one file with the list they must match, so an op's runner and its entry are reviewed together.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "opdebug.h"

struct ft_op_runner {
    ft_backend *be;
    uint64_t runs; /* ops run so far: each graph run records under a new replay key */
};

typedef enum {
    BUF_ACT, /* activation dtype (host float converted) */
    BUF_F32, /* float */
    BUF_I32, /* int32_t */
    BUF_W    /* dense weight: made by dense_create, in the weight dtype */
} buf_type;

typedef struct op_buf {
    int val;       /* index of its ft_op_value */
    buf_type type;
    void *dev;     /* backend memory */
    void *stage;   /* host copy in the backend's 16-bit dtype; NULL when the dtype is float/int32 */
    size_t count;
} op_buf;

enum { MAX_BUFS = 16, MAX_DIM = 1 << 30 };
#define MAX_ELEMS ((int64_t)1 << 40)

typedef struct op_ctx {
    ft_backend *be;
    const char *op;
    ft_op_value *vals;
    int n_vals;
    unsigned char *used; /* [n_vals]: the op took this value */
    ft_error *err;
    ft_status st; /* the first binding error */
    op_buf bufs[MAX_BUFS];
    int n_bufs;
    ft_host_qlinear hq; /* host arrays of the op's quantized linear */
    uint16_t *scales_f16;
    ft_qlinear *ql;
    int in_body;         /* inside a replay body: bound inputs are not uploaded again (a capture
                          * cannot copy from host memory; run_captured restores them before) */
    const struct op_entry *entry; /* the op a replay body runs */
    uint64_t replay_key;
    int has_result;
    double result;
} op_ctx;

#define FAIL(c, status, ...) ((c)->st ? (c)->st : ((c)->st = ft_fail((c)->err, (status), __VA_ARGS__)))
#define OPS (c->be->ops)

/* ------------------------------------------------------------------------ */
/* dtype conversions of staged host copies                                   */

static uint16_t float_to_bf16(float f) /* round to nearest even; NaN stays NaN */
{
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static void floats_to(ft_dtype dt, const float *src, void *dst, size_t n)
{
    uint16_t *h = dst;
    if (dt == FT_F16)
        for (size_t i = 0; i < n; i++) h[i] = ft_float_to_half(src[i]);
    else if (dt == FT_BF16)
        for (size_t i = 0; i < n; i++) h[i] = float_to_bf16(src[i]);
    else
        memcpy(dst, src, n * sizeof(float));
}

static void floats_from(ft_dtype dt, const void *src, float *dst, size_t n)
{
    const uint16_t *h = src;
    if (dt == FT_F16)
        for (size_t i = 0; i < n; i++) dst[i] = ft_half_to_float(h[i]);
    else if (dt == FT_BF16)
        for (size_t i = 0; i < n; i++) dst[i] = ft_bf16_to_float(h[i]);
    else
        memcpy(dst, src, n * sizeof(float));
}

/* ------------------------------------------------------------------------ */
/* binding arguments by name                                                 */

static int find(op_ctx *c, const char *name)
{
    for (int i = 0; i < c->n_vals; i++)
        if (strcmp(c->vals[i].name, name) == 0) {
            c->used[i] = 1;
            return i;
        }
    return -1;
}

/* a * b elements, or -1 when either is -1 or the product passes MAX_ELEMS */
static int64_t P(int64_t a, int64_t b)
{
    if (a < 0 || b < 0 || (b && a > MAX_ELEMS / b)) return -1;
    return a * b;
}

/* An integer scalar in [lo, hi]; `dflt` when absent and not required. */
static int64_t integer(op_ctx *c, const char *name, int64_t lo, int64_t hi, int required, int64_t dflt)
{
    const int i = find(c, name);
    if (i < 0) {
        if (required) FAIL(c, FT_EINVAL, "op %s: missing scalar '%s'", c->op, name);
        return dflt;
    }
    const ft_op_value *v = &c->vals[i];
    if (v->kind != FT_OPV_INT || !(v->number >= (double)lo && v->number <= (double)hi)) {
        FAIL(c, FT_EINVAL, "op %s: '%s' must be an integer in [%lld, %lld]", c->op, name, (long long)lo,
             (long long)hi);
        return dflt;
    }
    return (int64_t)v->number;
}

#define DIM(name) ((int)integer(c, name, 1, MAX_DIM, 1, 1))

/* A finite float scalar; `dflt` when absent and not required. */
static float number(op_ctx *c, const char *name, int required, float dflt)
{
    const int i = find(c, name);
    if (i < 0) {
        if (required) FAIL(c, FT_EINVAL, "op %s: missing scalar '%s'", c->op, name);
        return dflt;
    }
    const ft_op_value *v = &c->vals[i];
    if ((v->kind != FT_OPV_INT && v->kind != FT_OPV_FLOAT) || !isfinite(v->number)) {
        FAIL(c, FT_EINVAL, "op %s: '%s' must be a finite number", c->op, name);
        return dflt;
    }
    return (float)v->number;
}

static size_t elem_size(const op_ctx *c, buf_type t)
{
    switch (t) {
    case BUF_ACT: return ft_dtype_size(c->be->act_dtype);
    case BUF_W: return ft_dtype_size(c->be->weight_dtype);
    case BUF_F32: case BUF_I32: break;
    }
    return 4;
}

static ft_dtype buf_dtype(const op_ctx *c, buf_type t)
{
    return t == BUF_ACT ? c->be->act_dtype : t == BUF_W ? c->be->weight_dtype : t == BUF_F32 ? FT_F32 : FT_I32;
}

/* Copy the value's host data to its buffer (converted to the buffer's dtype). */
static void upload(op_ctx *c, op_buf *b)
{
    const ft_op_value *v = &c->vals[b->val];
    const void *src = v->data;
    if (b->stage) {
        floats_to(buf_dtype(c, b->type), v->data, b->stage, b->count);
        src = b->stage;
    }
    ft_status st = OPS->upload(c->be, b->dev, src, b->count * elem_size(c, b->type), c->err);
    if (st && !c->st) c->st = st;
}

/* The backend buffer of array `name` holding `count` elements of type t (count -1: the scalars
 * overflow), uploaded from the host; NULL when absent and optional, or on an error. */
static void *array(op_ctx *c, const char *name, buf_type t, int64_t count, int optional)
{
    const int i = find(c, name);
    if (c->st) return NULL;
    if (i < 0) {
        if (!optional) FAIL(c, FT_EINVAL, "op %s: missing array '%s'", c->op, name);
        return NULL;
    }
    if (count < 0) {
        FAIL(c, FT_EINVAL, "op %s: the sizes given for '%s' overflow", c->op, name);
        return NULL;
    }
    const ft_op_value *v = &c->vals[i];
    if (v->kind != (t == BUF_I32 ? FT_OPV_I32 : FT_OPV_F32)) {
        FAIL(c, FT_EINVAL, "op %s: '%s' must be a %s array", c->op, name, t == BUF_I32 ? "int32" : "float");
        return NULL;
    }
    if (v->count != count) {
        FAIL(c, FT_EINVAL, "op %s: '%s' has %lld elements, expected %lld", c->op, name, (long long)v->count,
             (long long)count);
        return NULL;
    }
    for (int k = 0; k < c->n_bufs; k++)
        if (c->bufs[k].val == i) { /* bound before: rebinding restores the input */
            if (t != BUF_W && !c->in_body) upload(c, &c->bufs[k]);
            return c->bufs[k].dev;
        }
    if (c->n_bufs == MAX_BUFS) {
        FAIL(c, FT_EINVAL, "op %s: too many arrays", c->op);
        return NULL;
    }
    op_buf *b = &c->bufs[c->n_bufs];
    memset(b, 0, sizeof *b);
    b->val = i;
    b->type = t;
    b->count = (size_t)count;
    ft_status st;
    if (t == BUF_W) {
        ft_host_tensor ht = {v->data, FT_F32, 1, {count, 0}, name};
        st = OPS->dense_create(c->be, &ht, &b->dev, c->err);
    } else {
        if (ft_dtype_size(buf_dtype(c, t)) == 2 && !(b->stage = malloc(b->count * 2 + 2)))
            return FAIL(c, FT_ENOMEM, "op %s: out of host memory staging '%s'", c->op, name), NULL;
        st = OPS->alloc(c->be, (count ? b->count : 1) * elem_size(c, t), &b->dev, c->err);
    }
    if (st) {
        free(b->stage);
        if (!c->st) c->st = st;
        return NULL;
    }
    c->n_bufs++;
    if (t != BUF_W) upload(c, b);
    return b->dev;
}

#define ACT(name, count) array(c, name, BUF_ACT, count, 0)
#define F32(name, count) ((float *)array(c, name, BUF_F32, count, 0))
#define I32(name, count) ((int32_t *)array(c, name, BUF_I32, count, 0))
#define W(name, count) array(c, name, BUF_W, count, 0)

/* An int32 array whose values must lie in [lo, hi] (or equal `also`): the ops index memory with them. */
static int32_t *indices(op_ctx *c, const char *name, int64_t count, int64_t lo, int64_t hi, int64_t also,
                        int optional)
{
    const int i = find(c, name);
    if (i >= 0 && !c->st && c->vals[i].kind == FT_OPV_I32 && c->vals[i].count == count) {
        const int32_t *x = c->vals[i].data;
        for (int64_t k = 0; k < count; k++)
            if ((x[k] < lo || x[k] > hi) && x[k] != also) {
                FAIL(c, FT_EINVAL, "op %s: %s[%lld] = %d is out of range [%lld, %lld]", c->op, name, (long long)k,
                     (int)x[k], (long long)lo, (long long)hi);
                return NULL;
            }
    }
    return (int32_t *)array(c, name, BUF_I32, count, optional);
}

/* The op's quantized linear [in, out] from host qweight, qzeros, scales (float, stored as float16),
 * g_idx (int32) and an optional float bias, checked as model.c checks a checkpoint's. */
static const ft_qlinear *qlinear(op_ctx *c, int in, int out)
{
    const int bits = (int)integer(c, "bits", 2, 8, 1, 4), zero_offset = (int)integer(c, "zero_offset", 0, 1, 0, 1);
    static const char *const parts[] = {"qweight", "qzeros", "scales", "g_idx", "bias"};
    ft_host_tensor *t[] = {&c->hq.qweight, &c->hq.qzeros, &c->hq.scales, &c->hq.g_idx, &c->hq.bias};
    const int64_t cols[] = {out, (int64_t)out * bits / 32, out, 1, 1}; /* row length of each */
    for (int k = 0; k < 5; k++) {
        const int i = find(c, parts[k]);
        if (i < 0 && k < 4) FAIL(c, FT_EINVAL, "op %s: missing array '%s'", c->op, parts[k]);
        if (c->st || c->ql || i < 0) continue;
        const ft_op_value *v = &c->vals[i];
        const int want_int = k != 2 && k != 4;
        if (v->kind != (want_int ? FT_OPV_I32 : FT_OPV_F32)) {
            FAIL(c, FT_EINVAL, "op %s: '%s' must be a %s array", c->op, parts[k], want_int ? "int32" : "float");
            continue;
        }
        t[k]->name = parts[k];
        t[k]->data = v->data;
        t[k]->dtype = want_int ? FT_I32 : FT_F32;
        t[k]->ndim = cols[k] > 1 ? 2 : 1;
        t[k]->shape[0] = cols[k] > 1 && v->count % cols[k] == 0 ? v->count / cols[k] : v->count;
        t[k]->shape[1] = cols[k] > 1 ? (v->count % cols[k] == 0 ? cols[k] : 1) : 0;
    }
    if (c->st || c->ql) return c->ql;
    if (c->hq.bias.data && c->hq.bias.shape[0] != out) {
        FAIL(c, FT_EINVAL, "op %s: 'bias' has %lld elements, expected %d", c->op, (long long)c->hq.bias.shape[0], out);
        return NULL;
    }
    const ft_host_tensor *sc = &c->hq.scales;
    const size_t n_scales = (size_t)sc->shape[0] * (size_t)(sc->ndim == 2 ? sc->shape[1] : 1);
    if (!(c->scales_f16 = malloc(n_scales * 2 + 2)))
        return FAIL(c, FT_ENOMEM, "op %s: out of host memory", c->op), NULL;
    floats_to(FT_F16, c->hq.scales.data, c->scales_f16, n_scales);
    c->hq.scales.data = c->scales_f16;
    c->hq.scales.dtype = FT_F16;
    ft_qlinear_desc d = {&c->hq, in, out, bits, 0, zero_offset};
    ft_status st = ft_gptq_check(&c->hq, in, out, bits, &d.groups, c->err);
    if (!st) st = OPS->qlinear_create(c->be, &d, &c->ql, c->err);
    if (st && !c->st) c->st = st;
    return c->ql;
}

/* Every argument bound: refuse values the op does not take. */
static int ready(op_ctx *c)
{
    for (int i = 0; i < c->n_vals && !c->st; i++)
        if (!c->used[i]) FAIL(c, FT_EINVAL, "op %s takes no argument '%s'", c->op, c->vals[i].name);
    return !c->st;
}

/* ------------------------------------------------------------------------ */
/* one runner per op (argument names as in backend.h)                        */

static ft_status run_zero(op_ctx *c)
{
    const int n = DIM("n");
    void *x = ACT("x", n);
    if (!ready(c)) return c->st;
    return OPS->zero(c->be, x, (size_t)n * elem_size(c, BUF_ACT), c->err);
}

/* dst (float [n]) = the weight dense_create makes from src stored on the host as src_dtype */
static ft_status run_dense_create(op_ctx *c)
{
    const int n = DIM("n");
    const ft_dtype dt = (ft_dtype)integer(c, "src_dtype", FT_F32, FT_BF16, 1, FT_F32);
    const int si = find(c, "src"), di = find(c, "dst");
    if (si < 0 || di < 0) FAIL(c, FT_EINVAL, "op %s: needs arrays 'src' and 'dst'", c->op);
    else if (c->vals[si].kind != FT_OPV_F32 || c->vals[si].count != n || c->vals[di].kind != FT_OPV_F32 ||
             c->vals[di].count != n)
        FAIL(c, FT_EINVAL, "op %s: 'src' and 'dst' must be float arrays of n = %d elements", c->op, n);
    if (c->n_bufs == MAX_BUFS) FAIL(c, FT_EINVAL, "op %s: too many arrays", c->op);
    if (!ready(c)) return c->st;
    void *host = malloc((size_t)n * 4);
    if (!host) return ft_fail(c->err, FT_ENOMEM, "op %s: out of host memory", c->op);
    floats_to(dt, c->vals[si].data, host, (size_t)n);
    ft_host_tensor ht = {host, dt, 1, {n, 0}, "src"};
    op_buf *b = &c->bufs[c->n_bufs];
    memset(b, 0, sizeof *b);
    ft_status st = OPS->dense_create(c->be, &ht, &b->dev, c->err);
    free(host);
    if (st) return st;
    b->val = di; /* downloaded into dst with the others */
    b->type = BUF_W;
    b->count = (size_t)n;
    c->n_bufs++;
    return FT_OK;
}

static ft_status run_embed(op_ctx *c)
{
    const int N = DIM("N"), D = DIM("D"), V = DIM("V");
    void *out = ACT("out", P(N, D));
    const int32_t *ids = indices(c, "ids", N, 0, V - 1, 0, 0);
    const void *table = W("table", P(V, D));
    if (!ready(c)) return c->st;
    return OPS->embed(c->be, out, ids, table, N, D, c->err);
}

static ft_status run_layernorm_fwd(op_ctx *c)
{
    const int N = DIM("N"), D = DIM("D");
    const float eps = number(c, "eps", 1, 1e-5f);
    void *y = ACT("y", P(N, D)), *x = ACT("x", P(N, D));
    float *mean = F32("mean", N), *rstd = F32("rstd", N);
    const void *g = W("g", D), *b = W("b", D);
    if (!(eps > 0.0f)) FAIL(c, FT_EINVAL, "op %s: eps must be positive", c->op);
    if (!ready(c)) return c->st;
    return OPS->layernorm_fwd(c->be, y, mean, rstd, x, g, b, N, D, eps, c->err);
}

static ft_status run_layernorm_bwd(op_ctx *c)
{
    const int N = DIM("N"), D = DIM("D");
    void *dx = ACT("dx", P(N, D)), *dy = ACT("dy", P(N, D)), *x = ACT("x", P(N, D));
    float *mean = F32("mean", N), *rstd = F32("rstd", N);
    const void *g = W("g", D);
    if (!ready(c)) return c->st;
    return OPS->layernorm_bwd(c->be, dx, dy, x, mean, rstd, g, N, D, c->err);
}

static ft_status run_gelu_fwd(op_ctx *c)
{
    const int n = DIM("n");
    void *y = ACT("y", n), *x = ACT("x", n);
    if (!ready(c)) return c->st;
    return OPS->gelu_fwd(c->be, y, x, (size_t)n, c->err);
}

static ft_status run_gelu_bwd(op_ctx *c)
{
    const int n = DIM("n");
    void *dx = ACT("dx", n), *dy = ACT("dy", n), *x = ACT("x", n);
    if (!ready(c)) return c->st;
    return OPS->gelu_bwd(c->be, dx, dy, x, (size_t)n, c->err);
}

/* y = a + b (+ c); without 'y' the sum goes to a (the aliased form model.c uses) */
static ft_status run_add(op_ctx *c)
{
    const int n = DIM("n");
    void *a = ACT("a", n), *b = ACT("b", n);
    void *cc = array(c, "c", BUF_ACT, n, 1), *y = array(c, "y", BUF_ACT, n, 1);
    if (!ready(c)) return c->st;
    return OPS->add(c->be, y ? y : a, a, b, cc, (size_t)n, c->err);
}

static ft_status run_qlinear_fwd(op_ctx *c)
{
    const int N = DIM("N"), in = DIM("in"), out = DIM("out");
    void *y = ACT("y", P(N, out)), *x = ACT("x", P(N, in));
    const ft_qlinear *q = qlinear(c, in, out);
    if (!ready(c)) return c->st;
    return OPS->qlinear_fwd(c->be, y, x, q, N, c->err);
}

/* qlinear_fwd and its epilogue: 'gelu' (0 or 1), optional act arrays 'add1', 'add2' [N, out], and a
 * LoRA when 'r' is given: f32 'A' [r, in], 'B' [out, r], output 'xa' [N, r], scalar 'scale' */
static ft_status run_qlinear_fwd_epi(op_ctx *c)
{
    const int N = DIM("N"), in = DIM("in"), out = DIM("out");
    const int gelu = (int)integer(c, "gelu", 0, 1, 0, 0), r = (int)integer(c, "r", 1, MAX_DIM, 0, 0);
    void *y = ACT("y", P(N, out)), *x = ACT("x", P(N, in));
    const void *add1 = array(c, "add1", BUF_ACT, P(N, out), 1), *add2 = array(c, "add2", BUF_ACT, P(N, out), 1);
    const float *A = r ? F32("A", P(r, in)) : NULL, *B = r ? F32("B", P(out, r)) : NULL;
    float *xa = r ? F32("xa", P(N, r)) : NULL;
    const float scale = r ? number(c, "scale", 1, 0.0f) : 0.0f;
    const ft_qlinear *q = qlinear(c, in, out);
    if (!ready(c)) return c->st;
    const ft_epilogue epi = {gelu, add1, add2, A, B, xa, r, scale};
    return OPS->qlinear_fwd_epi(c->be, y, x, q, N, &epi, c->err);
}

static ft_status run_qlinear_bwd(op_ctx *c)
{
    const int N = DIM("N"), in = DIM("in"), out = DIM("out");
    const int accumulate = (int)integer(c, "accumulate", 0, 1, 0, 0);
    void *dx = ACT("dx", P(N, in)), *dy = ACT("dy", P(N, out));
    const ft_qlinear *q = qlinear(c, in, out);
    if (!ready(c)) return c->st;
    return OPS->qlinear_bwd(c->be, dx, dy, q, N, accumulate, c->err);
}

/* The scalars lora_fwd and lora_bwd share. */
typedef struct lora_dims {
    int N, in, out, r;
    float scale, p;
    uint64_t seed, base;
} lora_dims;

/* 'base' (default 0) is given to set_dropout_base before the op runs */
static lora_dims lora_args(op_ctx *c)
{
    lora_dims d = {DIM("N"), DIM("in"), DIM("out"), DIM("r"), number(c, "scale", 1, 1.0f), number(c, "p", 0, 0.0f),
                   (uint64_t)integer(c, "seed", 0, (int64_t)1 << 53, 0, 0),
                   (uint64_t)integer(c, "base", 0, (int64_t)1 << 53, 0, 0)};
    if (!(d.p >= 0.0f && d.p < 1.0f)) FAIL(c, FT_EINVAL, "op %s: p must be in [0, 1)", c->op);
    return d;
}

static ft_status run_lora_fwd(op_ctx *c)
{
    const lora_dims d = lora_args(c);
    void *y = ACT("y", P(d.N, d.out)), *x = ACT("x", P(d.N, d.in));
    float *xa = F32("xa", P(d.N, d.r)), *A = F32("A", P(d.r, d.in)), *B = F32("B", P(d.out, d.r));
    if (!ready(c)) return c->st;
    if (OPS->set_dropout_base(c->be, d.base, c->err)) return c->err->status;
    return OPS->lora_fwd(c->be, y, xa, x, A, B, d.N, d.in, d.out, d.r, d.scale, d.p, d.seed, c->err);
}

/* without 'dx' the op skips the input gradient (a first layer's LoRA) */
static ft_status run_lora_bwd(op_ctx *c)
{
    const lora_dims d = lora_args(c);
    void *dx = array(c, "dx", BUF_ACT, P(d.N, d.in), 1), *dy = ACT("dy", P(d.N, d.out)), *x = ACT("x", P(d.N, d.in));
    float *dA = F32("dA", P(d.r, d.in)), *dB = F32("dB", P(d.out, d.r)), *xa = F32("xa", P(d.N, d.r));
    float *A = F32("A", P(d.r, d.in)), *B = F32("B", P(d.out, d.r));
    if (!ready(c)) return c->st;
    if (OPS->set_dropout_base(c->be, d.base, c->err)) return c->err->status;
    return OPS->lora_bwd(c->be, dx, dA, dB, dy, x, xa, A, B, d.N, d.in, d.out, d.r, d.scale, d.p, d.seed, c->err);
}

static ft_qkv_args qkv_args(op_ctx *c)
{
    ft_qkv_args a;
    memset(&a, 0, sizeof a);
    a.B = DIM("B"), a.T = DIM("T"), a.H = DIM("H"), a.KV = DIM("KV"), a.hd = DIM("hd");
    a.qkv_width = DIM("qkv_width"), a.cap = DIM("cap");
    a.past = (int)integer(c, "past", 0, MAX_DIM, 0, 0);
    a.rope = (int)integer(c, "rope", 0, 1, 1, 0);
    a.theta = number(c, "theta", 0, 10000.0f);
    if (a.H % a.KV || a.hd > 1024 || (a.rope && a.hd % 2) || a.hd > a.qkv_width || a.past + (int64_t)a.T > a.cap ||
        !(a.theta > 0.0f))
        FAIL(c, FT_EINVAL, "op %s: need H %% KV == 0, hd <= min(1024, qkv_width) (even with rope), "
                           "past + T <= cap, theta > 0", c->op);
    a.cols = indices(c, "cols", (int64_t)a.H + 2 * (int64_t)a.KV, 0, (int64_t)a.qkv_width - a.hd, 0, 0);
    a.pos = I32("pos", P(a.B, a.T));
    a.past_dev = indices(c, "past_dev", 1, 0, (int64_t)a.cap - a.T, 0, 1);
    return a;
}

static ft_status run_qkv_split_fwd(op_ctx *c)
{
    const ft_qkv_args a = qkv_args(c);
    void *q = ACT("q", P(P(a.B, a.H), P(a.T, a.hd))), *qkv = ACT("qkv", P(P(a.B, a.T), a.qkv_width));
    void *k = ACT("k", P(P(a.B, a.KV), P(a.cap, a.hd))), *v = ACT("v", P(P(a.B, a.KV), P(a.cap, a.hd)));
    if (!ready(c)) return c->st;
    return OPS->qkv_split_fwd(c->be, q, k, v, qkv, &a, c->err);
}

static ft_status run_qkv_split_bwd(op_ctx *c)
{
    const ft_qkv_args a = qkv_args(c);
    void *dqkv = ACT("dqkv", P(P(a.B, a.T), a.qkv_width)), *dq = ACT("dq", P(P(a.B, a.H), P(a.T, a.hd)));
    void *dk = ACT("dk", P(P(a.B, a.KV), P(a.cap, a.hd))), *dv = ACT("dv", P(P(a.B, a.KV), P(a.cap, a.hd)));
    if (!ready(c)) return c->st;
    return OPS->qkv_split_bwd(c->be, dqkv, dq, dk, dv, &a, c->err);
}

static ft_attn_args attn_args(op_ctx *c)
{
    ft_attn_args a;
    memset(&a, 0, sizeof a);
    a.B = DIM("B"), a.H = DIM("H"), a.KV = DIM("KV"), a.T = DIM("T"), a.Tk = DIM("Tk"), a.cap = DIM("cap");
    a.hd = DIM("hd");
    a.kstride = (int)integer(c, "kstride", 1, MAX_DIM, 0, a.Tk);
    a.scale = number(c, "scale", 0, (float)(1.0 / sqrt((double)a.hd)));
    if (a.H % a.KV || a.hd > 1024 || a.T > a.Tk || a.Tk > a.cap || a.kstride < a.Tk)
        FAIL(c, FT_EINVAL, "op %s: need H %% KV == 0, hd <= 1024, T <= Tk <= cap, kstride >= Tk", c->op);
    a.kmask = I32("kmask", P(a.B, a.kstride));
    a.kpos = I32("kpos", P(a.B, a.kstride));
    a.slopes = (const float *)array(c, "slopes", BUF_F32, a.H, 1);
    return a;
}

static ft_status run_attention_fwd(op_ctx *c)
{
    ft_attn_args a = attn_args(c);
    /* Tk on the device: keys up to cap may be read, so the mask rows must cover cap */
    a.tk_dev = indices(c, "tk_dev", 1, 1, a.cap, 0, 1);
    if (a.tk_dev && (a.T != 1 || a.kstride < a.cap))
        FAIL(c, FT_EINVAL, "op %s: tk_dev needs T == 1 and kstride >= cap", c->op);
    void *out = ACT("out", P(P(a.B, a.T), P(a.H, a.hd))), *q = ACT("q", P(P(a.B, a.H), P(a.T, a.hd)));
    void *k = ACT("k", P(P(a.B, a.KV), P(a.cap, a.hd))), *v = ACT("v", P(P(a.B, a.KV), P(a.cap, a.hd)));
    float *lse = F32("lse", P(P(a.B, a.H), a.T));
    if (!ready(c)) return c->st;
    return OPS->attention_fwd(c->be, out, lse, q, k, v, &a, c->err);
}

static ft_status run_attention_bwd(op_ctx *c)
{
    const ft_attn_args a = attn_args(c);
    if (a.Tk != a.T || a.cap != a.T) FAIL(c, FT_EINVAL, "op %s: backward needs Tk == T == cap", c->op);
    const int64_t nq = P(P(a.B, a.H), P(a.T, a.hd)), nk = P(P(a.B, a.KV), P(a.T, a.hd));
    void *dq = ACT("dq", nq), *dk = ACT("dk", nk), *dv = ACT("dv", nk), *q = ACT("q", nq), *k = ACT("k", nk);
    void *v = ACT("v", nk), *dout = ACT("dout", nq), *out = ACT("out", nq);
    float *lse = F32("lse", P(P(a.B, a.H), a.T));
    if (!ready(c)) return c->st;
    return OPS->attention_bwd(c->be, dq, dk, dv, dout, out, lse, q, k, v, &a, c->err);
}

static ft_status run_lm_logits(op_ctx *c)
{
    const int n = DIM("n"), V = DIM("V"), D = DIM("D");
    float *logits = F32("logits", P(n, V));
    void *h = ACT("h", P(n, D));
    const void *Wm = W("W", P(V, D));
    if (!ready(c)) return c->st;
    return OPS->lm_logits(c->be, logits, h, Wm, n, V, D, c->err);
}

static ft_status run_cross_entropy(op_ctx *c)
{
    const int n = DIM("n"), V = DIM("V");
    const float grad_scale = number(c, "grad_scale", 1, 0.0f);
    float *logits = F32("logits", P(n, V)), *row_loss = F32("row_loss", n);
    const int32_t *target = indices(c, "target", n, 0, V - 1, -100, 0);
    if (!ready(c)) return c->st;
    return OPS->cross_entropy(c->be, logits, row_loss, target, n, V, grad_scale, c->err);
}

static ft_status run_argmax_rows(op_ctx *c)
{
    const int n = DIM("n"), V = DIM("V");
    const float *logits = F32("logits", P(n, V));
    int32_t *out = I32("out", n);
    if (!ready(c)) return c->st;
    return OPS->argmax_rows(c->be, logits, n, V, out, c->err);
}

static ft_status run_lm_bwd(op_ctx *c)
{
    const int n = DIM("n"), V = DIM("V"), D = DIM("D");
    void *dh = ACT("dh", P(n, D));
    const float *dlogits = F32("dlogits", P(n, V));
    const void *Wm = W("W", P(V, D));
    if (!ready(c)) return c->st;
    return OPS->lm_bwd(c->be, dh, dlogits, Wm, n, V, D, c->err);
}

static ft_status run_sumsq(op_ctx *c)
{
    const int n = DIM("n");
    const float *x = F32("x", n);
    if (!ready(c)) return c->st;
    c->has_result = 1;
    return OPS->sumsq(c->be, x, (size_t)n, &c->result, c->err);
}

static ft_status run_adamw(op_ctx *c)
{
    const int n = DIM("n");
    float *p = F32("p", n), *g = F32("g", n), *m = F32("m", n), *v = F32("v", n);
    const float lr = number(c, "lr", 1, 0), b1 = number(c, "beta1", 1, 0), b2 = number(c, "beta2", 1, 0);
    const float eps = number(c, "eps", 1, 0), wd = number(c, "wd", 1, 0), gmul = number(c, "gmul", 1, 0);
    const float bc1 = number(c, "bias_corr1", 1, 1), bc2 = number(c, "bias_corr2", 1, 1);
    if (!(bc1 > 0.0f && bc2 > 0.0f)) FAIL(c, FT_EINVAL, "op %s: bias corrections must be positive", c->op);
    if (!ready(c)) return c->st;
    return OPS->adamw(c->be, p, g, m, v, (size_t)n, lr, b1, b2, eps, wd, gmul, bc1, bc2, c->err);
}

/* dst row i = src row idx[i]: rows of `row` activations, src holding `rows` of them */
static ft_status run_gather_rows(op_ctx *c)
{
    const int n = DIM("n"), rows = DIM("rows"), row = DIM("row");
    void *dst = ACT("dst", P(n, row));
    const void *src = ACT("src", P(rows, row));
    const int32_t *idx = indices(c, "idx", n, 0, rows - 1, 0, 0);
    if (!ready(c)) return c->st;
    return OPS->gather_rows(c->be, dst, src, idx, n, (size_t)row * elem_size(c, BUF_ACT), c->err);
}

/* ------------------------------------------------------------------------ */
/* the op table                                                              */

/* Every entry of ft_backend_ops in order: name, how it is covered, its runner (run_* or NULL). */
#define BACKEND_OPS(X)                                                                                            \
    X(destroy, "lifetime", NULL) X(alloc, "memory", NULL) X(free, "memory", NULL) X(upload, "memory", NULL)       \
    X(download, "memory", NULL) X(zero, "run", run_zero) X(sync, "memory", NULL)                                  \
    X(dense_create, "run", run_dense_create) X(qlinear_create, "weights", NULL)                                   \
    X(qlinear_destroy, "weights", NULL) X(embed, "run", run_embed) X(layernorm_fwd, "run", run_layernorm_fwd)     \
    X(layernorm_bwd, "run", run_layernorm_bwd) X(gelu_fwd, "run", run_gelu_fwd) X(gelu_bwd, "run", run_gelu_bwd) \
    X(add, "run", run_add) X(qlinear_fwd, "run", run_qlinear_fwd) X(qlinear_fwd_epi, "run", run_qlinear_fwd_epi) \
    X(qlinear_bwd, "run", run_qlinear_bwd)                                                                        \
    X(lora_fwd, "run", run_lora_fwd) X(lora_bwd, "run", run_lora_bwd)                                             \
    X(set_dropout_base, "state", NULL)                                                                            \
    X(qkv_split_fwd, "run", run_qkv_split_fwd) X(qkv_split_bwd, "run", run_qkv_split_bwd)                         \
    X(attention_fwd, "run", run_attention_fwd) X(attention_bwd, "run", run_attention_bwd)                         \
    X(lm_logits, "run", run_lm_logits) X(cross_entropy, "run", run_cross_entropy)                                 \
    X(argmax_rows, "run", run_argmax_rows) X(lm_bwd, "run", run_lm_bwd) X(sumsq, "run", run_sumsq)               \
    X(adamw, "run", run_adamw) X(gather_rows, "run", run_gather_rows) X(replay, "graph", NULL)                    \
    X(memory_stats, "accounting", NULL)

#define INDEX(name, coverage, runner) OP_##name,
enum { BACKEND_OPS(INDEX) N_OPS };
#undef INDEX

/* the struct is `name` then one function pointer per op, listed above in the same order */
_Static_assert(sizeof(ft_backend_ops) == sizeof(const char *) + N_OPS * sizeof(void (*)(void)),
               "ft_backend_ops changed: list every op in BACKEND_OPS of opdebug.c (and test it in test_ops.py)");
#define IN_ORDER(name, coverage, runner)                                                                          \
    _Static_assert(offsetof(ft_backend_ops, name) == sizeof(const char *) + OP_##name * sizeof(void (*)(void)),   \
                   "BACKEND_OPS lists " #name " out of the order of ft_backend_ops");
BACKEND_OPS(IN_ORDER)
#undef IN_ORDER

typedef struct op_entry {
    const char *name, *coverage;
    ft_status (*run)(op_ctx *c);
} op_entry;

#define ENTRY(name, coverage, runner) {#name, coverage, runner},
static const op_entry op_table[N_OPS] = {BACKEND_OPS(ENTRY)};
#undef ENTRY

int ft_op_count(void) { return N_OPS; }
const char *ft_op_name(int i) { return i >= 0 && i < N_OPS ? op_table[i].name : NULL; }
const char *ft_op_coverage(int i) { return i >= 0 && i < N_OPS ? op_table[i].coverage : NULL; }

/* ------------------------------------------------------------------------ */
/* runner                                                                    */

ft_status ft_op_runner_create(const char *device, int act_dtype, ft_op_runner **out, ft_error *err)
{
    *out = NULL;
    int index;
    ft_status st = ft_parse_device(device, &index, err);
    if (st) return st;
    ft_backend *be = NULL;
    if (index < 0) {
        if (act_dtype >= 0 && act_dtype != FT_F32)
            return ft_fail(err, FT_EUNSUPPORTED, "the CPU backend computes in float32 only");
        st = ft_cpu_backend_create(&be, err);
    } else {
#ifdef FT_WITH_CUDA
        st = ft_cuda_backend_create(index, act_dtype, &be, err);
#else
        return ft_fail(err, FT_EUNSUPPORTED, "device '%s': this build of falcontune has no CUDA backend", device);
#endif
    }
    if (st) return st;
    ft_op_runner *r = calloc(1, sizeof *r);
    if (!r) {
        be->ops->destroy(be);
        return ft_fail(err, FT_ENOMEM, "out of host memory");
    }
    r->be = be;
    *out = r;
    return FT_OK;
}

void ft_op_runner_free(ft_op_runner *r)
{
    if (!r) return;
    r->be->ops->destroy(r->be);
    free(r);
}

ft_dtype ft_op_runner_act_dtype(const ft_op_runner *r) { return r->be->act_dtype; }
const char *ft_op_runner_backend(const ft_op_runner *r) { return r->be->ops->name; }

ft_status ft_op_runner_memory(ft_op_runner *r, size_t *current, size_t *peak, ft_error *err)
{
    *current = *peak = 0;
    return r->be->ops->memory_stats ? r->be->ops->memory_stats(r->be, current, peak, 0, err) : FT_OK;
}

/* A replay body: the op's runner again, on the buffers it bound (no allocation, no upload). */
static ft_status replay_body(void *ctx, ft_error *err)
{
    op_ctx *c = ctx;
    (void)err; /* the runner reports through c->err */
    c->in_body = 1;
    const ft_status st = c->entry->run(c);
    c->in_body = 0;
    return st;
}

/* Run the op through the backend's replay op: call 1 runs it directly, call 2 captures and launches
 * a graph, call 3 relaunches the recording (graph.cu); the inputs are uploaded again before each. */
static ft_status run_captured(op_ctx *c, const op_entry *e)
{
    if (!OPS->replay) return ft_fail(c->err, FT_EUNSUPPORTED, "the %s backend has no graphs", OPS->name);
    c->entry = e;
    for (int call = 0; call < 3; call++) {
        for (int k = 0; k < c->n_bufs; k++)
            if (c->bufs[k].type != BUF_W) upload(c, &c->bufs[k]);
        if (c->st) return c->st;
        ft_status st = OPS->replay(c->be, 0, c->replay_key, replay_body, c, c->err);
        if (st) return st;
    }
    return FT_OK;
}

/* Every buffer back into its host array, as float (act, weight, f32) or int32. */
static ft_status download_all(op_ctx *c)
{
    for (int k = 0; k < c->n_bufs; k++) {
        op_buf *b = &c->bufs[k];
        const ft_dtype dt = buf_dtype(c, b->type);
        if (ft_dtype_size(dt) == 2 && !b->stage && !(b->stage = malloc(b->count * 2 + 2)))
            return ft_fail(c->err, FT_ENOMEM, "op %s: out of host memory", c->op);
        void *host = b->stage ? b->stage : c->vals[b->val].data;
        ft_status st = OPS->download(c->be, host, b->dev, b->count * ft_dtype_size(dt), c->err);
        if (st) return st;
        if (b->stage) floats_from(dt, b->stage, c->vals[b->val].data, b->count);
    }
    return FT_OK;
}

ft_status ft_op_run(ft_op_runner *r, const char *name, ft_op_value *vals, int n, int graph, double *result,
                    int *has_result, ft_error *err)
{
    *has_result = 0;
    const op_entry *e = NULL;
    for (int i = 0; i < N_OPS && !e; i++)
        if (strcmp(op_table[i].name, name) == 0) e = &op_table[i];
    if (!e || !e->run)
        return ft_fail(err, FT_EINVAL, "'%s' is not an op the runner runs (see falcontune._C.OPS)", name);
    op_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    op_ctx *c = &ctx;
    c->be = r->be;
    c->op = e->name;
    c->vals = vals;
    c->n_vals = n;
    c->err = err;
    c->replay_key = ++r->runs; /* a new recording for every run */
    c->used = calloc((size_t)(n > 0 ? n : 1), 1);
    if (!c->used) return ft_fail(err, FT_ENOMEM, "out of host memory");
    ft_status st = e->run(c);
    if (!st && graph) st = run_captured(c, e);
    if (!st) st = OPS->sync(c->be, err);
    if (!st) st = download_all(c);
    if (!st && c->has_result) {
        *result = c->result;
        *has_result = 1;
    }
    /* one cleanup path: after an error the backend may still be running the op, so sync first */
    ft_error ignored;
    OPS->sync(c->be, &ignored);
    for (int k = 0; k < c->n_bufs; k++) {
        OPS->free(c->be, c->bufs[k].dev);
        free(c->bufs[k].stage);
    }
    if (c->ql) OPS->qlinear_destroy(c->be, c->ql);
    free(c->scales_f16);
    free(c->used);
    return st;
}
