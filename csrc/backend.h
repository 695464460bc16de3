/* backend.h -- the op table every backend implements.
 *
 * The engine (model.c and its siblings, model_internal.h) drives the layers
 * through this table only; it never touches element data itself. Pointers named `act` hold activations in the backend's
 * activation dtype (be->act_dtype: f32 on the CPU, bf16/f16 on CUDA); `w` are
 * dense weights in the backend's weight dtype (made by dense_create); f32 and
 * i32 buffers are always float / int32_t. All pointers live in backend memory
 * (made by alloc) unless the argument says "host".
 *
 * Shapes use N = B*T rows. Ops that say "+=" accumulate into their output.
 */
#ifndef FT_BACKEND_H
#define FT_BACKEND_H

#include "ft.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ft_backend ft_backend;
typedef struct ft_qlinear ft_qlinear; /* backend-owned quantized weight */

/* What qlinear_fwd_epi does to x W + bias before storing it, in this order: the LoRA term when
 * lora_A != NULL (+ lora_scale (x A^T) B^T, A [lora_r, in] and B [out, lora_r] f32, no dropout;
 * lora_xa [N, lora_r] f32 receives x A^T), GELU (exact erf form) when gelu != 0, then
 * y = add1 + add2 + that (add1, add2: act [N, out], each NULL when absent). */
typedef struct ft_epilogue {
    int gelu;
    const void *add1, *add2;
    const float *lora_A, *lora_B;
    float *lora_xa;
    int lora_r;
    float lora_scale;
} ft_epilogue;

enum { FT_REPLAY_SLOTS = 26 }; /* independent recorded steps a backend keeps (replay) */

/* A quantized linear, validated by gptq.c before a backend sees it. */
typedef struct ft_qlinear_desc {
    const ft_host_qlinear *host;
    int in, out, bits, groups, zero_offset;
} ft_qlinear_desc;

typedef struct ft_attn_args {
    int B, H, KV, T; /* queries per row: T */
    int Tk;          /* keys per row (past + T) */
    int cap;         /* key/value buffer length per (b, kv head) >= Tk */
    int hd;
    float scale;          /* 1/sqrt(hd) */
    int kstride;          /* row stride of kmask / kpos (>= Tk: the cache keeps rows of cap) */
    const int32_t *kmask; /* i32 [B, kstride], first Tk used: segment id of each key, 0 on padding
                           * (0/1 masks: one segment). See ft_key_visible. */
    const int32_t *kpos;  /* i32 [B, kstride], first Tk used: alibi position of each key in its segment */
    const float *slopes;  /* f32 [H] alibi slopes, NULL: no alibi */
    /* i32 [1] or NULL (T == 1 only): the same Tk in backend memory, for a step that is replayed
     * (replay below) at later cache lengths. A path that reads it bounds its keys by cap; a path
     * that sizes its work from the host Tk above must refuse to be recorded. Both always hold the
     * same value: the host one is authoritative and the device copy is uploaded from it. */
    const int32_t *tk_dev;
} ft_attn_args;

#ifdef __CUDACC__
#define FT_HOST_DEVICE __host__ __device__
#else
#define FT_HOST_DEVICE
#endif

/* Packed rows: query t (segment kmask[Tk-T+t]) sees causal key j when the key is a real token of
 * its own segment. A padding query (segment 0) sees every real key before it, as with 0/1 masks:
 * its output is never used, and this keeps 0/1 masks exactly as they were. The decode path
 * (T == 1 with a cache) only ever holds 0/1 masks. */
static inline FT_HOST_DEVICE int ft_key_visible(int32_t key_segment, int32_t query_segment)
{
    return key_segment != 0 && (query_segment == 0 || key_segment == query_segment);
}

typedef struct ft_qkv_args {
    int B, T, H, KV, hd, qkv_width;
    int cap, past;       /* k/v written at time index past.. of buffers of length cap */
    const int32_t *cols; /* i32 [H + 2*KV]: first column of each q head, k head, v head */
    const int32_t *pos;  /* i32 [B, T] rotary positions */
    int rope;            /* 0: no rotary (alibi models) */
    float theta;
    const int32_t *past_dev; /* i32 [1] or NULL: the same past in backend memory (as tk_dev) */
} ft_qkv_args;

typedef struct ft_backend_ops {
    const char *name;
    void (*destroy)(ft_backend *be);

    /* ---- memory ---- */
    ft_status (*alloc)(ft_backend *be, size_t bytes, void **ptr, ft_error *err);
    void (*free)(ft_backend *be, void *ptr);
    ft_status (*upload)(ft_backend *be, void *dst, const void *host_src, size_t bytes, ft_error *err);
    ft_status (*download)(ft_backend *be, void *host_dst, const void *src, size_t bytes, ft_error *err);
    ft_status (*zero)(ft_backend *be, void *dst, size_t bytes, ft_error *err);
    ft_status (*sync)(ft_backend *be, ft_error *err);

    /* ---- weights ---- */
    /* Host f16/bf16/f32 tensor -> backend weight dtype. */
    ft_status (*dense_create)(ft_backend *be, const ft_host_tensor *src, void **dst, ft_error *err);
    ft_status (*qlinear_create)(ft_backend *be, const ft_qlinear_desc *d, ft_qlinear **out, ft_error *err);
    void (*qlinear_destroy)(ft_backend *be, ft_qlinear *q);

    /* ---- embedding / norms / activations ---- */
    /* out[N,D] = table[ids[n]] */
    ft_status (*embed)(ft_backend *be, void *out, const int32_t *ids, const void *table, int N, int D,
                       ft_error *err);
    /* y[N,D] = (x - mean) * rstd * g + b; saves mean[N], rstd[N] (f32) */
    ft_status (*layernorm_fwd)(ft_backend *be, void *y, float *mean, float *rstd, const void *x,
                               const void *g, const void *b, int N, int D, float eps, ft_error *err);
    /* dx[N,D] += d/dx of the above (weights frozen) */
    ft_status (*layernorm_bwd)(ft_backend *be, void *dx, const void *dy, const void *x,
                               const float *mean, const float *rstd, const void *g, int N, int D,
                               ft_error *err);
    /* y = gelu(x) (exact erf form), n elements; y may alias x */
    ft_status (*gelu_fwd)(ft_backend *be, void *y, const void *x, size_t n, ft_error *err);
    /* dx = dy * gelu'(x) */
    ft_status (*gelu_bwd)(ft_backend *be, void *dx, const void *dy, const void *x, size_t n,
                          ft_error *err);
    /* y = a + b (+ c when c != NULL); y may alias a, b or c */
    ft_status (*add)(ft_backend *be, void *y, const void *a, const void *b, const void *c, size_t n,
                     ft_error *err);

    /* ---- linears ---- */
    /* y[N,out] = x[N,in] W + bias, W dequantized from the packed GPTQ weight */
    ft_status (*qlinear_fwd)(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N,
                             ft_error *err);
    /* the same, then the epilogue (ft_epilogue; NULL: none), as one op where the backend can fuse it
     * (the CUDA GEMV does in its reduction); y aliases none of x, add1, add2. NULL in a backend
     * without it: the engine then runs qlinear_fwd, gelu_fwd and add */
    ft_status (*qlinear_fwd_epi)(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N,
                                 const ft_epilogue *epi, ft_error *err);
    /* dx[N,in] (=, or += when accumulate) dy[N,out] W^T */
    ft_status (*qlinear_bwd)(ft_backend *be, void *dx, const void *dy, const ft_qlinear *q, int N,
                             int accumulate, ft_error *err);
    /* xa[N,r] = dropout(x) A^T (f32, saved);  y[N,out] += scale * xa B^T.
     * Dropout keeps element i of x when ft_dropout_keep(seed ^ base, i, p), scaled 1/(1-p), base
     * being the backend's dropout base (set_dropout_base; 0 until set). */
    ft_status (*lora_fwd)(ft_backend *be, void *y, float *xa, const void *x, const float *A,
                          const float *B, int N, int in, int out, int r, float scale, float p,
                          uint64_t seed, ft_error *err);
    /* dB[out,r] += scale dy^T xa;  dA[r,in] += (scale dy B)^T dropout(x);
     * dx[N,in] += dropout'(scale dy B A) */
    ft_status (*lora_bwd)(ft_backend *be, void *dx, float *dA, float *dB, const void *dy,
                          const void *x, const float *xa, const float *A, const float *B, int N,
                          int in, int out, int r, float scale, float p, uint64_t seed, ft_error *err);
    /* The dropout base every later lora_fwd / lora_bwd XORs into its seed, kept in backend
     * memory: a training step sets it once and its ops pass seeds that do not change from step
     * to step, so a recording of them (replay) draws new masks each time it is replayed. */
    ft_status (*set_dropout_base)(ft_backend *be, uint64_t base, ft_error *err);

    /* ---- attention ---- */
    /* qkv[B*T, width] -> q[B,H,T,hd], k/v[B,KV,cap,hd] at time past.., rotary applied to q, k */
    ft_status (*qkv_split_fwd)(ft_backend *be, void *q, void *k, void *v, const void *qkv,
                               const ft_qkv_args *a, ft_error *err);
    /* dqkv[B*T, width] (=) from dq, dk, dv (training: cap == T, past == 0) */
    ft_status (*qkv_split_bwd)(ft_backend *be, void *dqkv, const void *dq, const void *dk,
                               const void *dv, const ft_qkv_args *a, ft_error *err);
    /* out[B,T,H*hd]: causal softmax attention; query t sits at key position Tk-T+t.
     * Saves lse[B,H,T] (f32; -inf for a query with no visible key, whose output is 0). */
    ft_status (*attention_fwd)(ft_backend *be, void *out, float *lse, const void *q, const void *k,
                               const void *v, const ft_attn_args *a, ft_error *err);
    /* dq (=), dk, dv (=) [B,KV,T,hd] from dout (training: Tk == T == cap) */
    ft_status (*attention_bwd)(ft_backend *be, void *dq, void *dk, void *dv, const void *dout,
                               const void *out, const float *lse, const void *q, const void *k,
                               const void *v, const ft_attn_args *a, ft_error *err);

    /* ---- head and loss ---- */
    /* logits[n,V] (f32) = h[n,D] W[V,D]^T */
    ft_status (*lm_logits)(ft_backend *be, float *logits, const void *h, const void *W, int n, int V,
                           int D, ft_error *err);
    /* row_loss[n] = CE(logits[i], target[i]) (0 where target == -100). When
     * grad_scale != 0, logits are overwritten with grad_scale * dCE/dlogits. */
    ft_status (*cross_entropy)(ft_backend *be, float *logits, float *row_loss, const int32_t *target,
                               int n, int V, float grad_scale, ft_error *err);
    /* out[i] (i32) = the index of the largest of logits[i, :V]; the lowest index among equal
     * maxima; a NaN counts as the largest (as numpy.argmax) */
    ft_status (*argmax_rows)(ft_backend *be, const float *logits, int n, int V, int32_t *out, ft_error *err);
    /* dh[n,D] (=) dlogits[n,V] W[V,D] */
    ft_status (*lm_bwd)(ft_backend *be, void *dh, const float *dlogits, const void *W, int n, int V,
                        int D, ft_error *err);

    /* ---- optimizer and misc (f32) ---- */
    /* host *out = sum x^2 (accumulated in double) */
    ft_status (*sumsq)(ft_backend *be, const float *x, size_t n, double *out, ft_error *err);
    /* torch.optim.AdamW on n params; g is multiplied by gmul first */
    ft_status (*adamw)(ft_backend *be, float *p, const float *g, float *m, float *v, size_t n,
                       float lr, float beta1, float beta2, float eps, float wd, float gmul,
                       float bias_corr1, float bias_corr2, ft_error *err);
    /* dst row i = src row idx[i] (rows of row_bytes); dst and src do not overlap */
    ft_status (*gather_rows)(ft_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                             size_t row_bytes, ft_error *err);

    /* ---- recorded steps (optional: NULL when the backend has none) ---- */
    /* Runs body(ctx, err), which enqueues ops on this backend, or replays a recording of what an
     * earlier call with the same slot (0 .. FT_REPLAY_SLOTS - 1) and key enqueued. For one (slot,
     * key) the caller's body enqueues the same ops with the same arguments every time: whatever
     * changes from call to call is read from backend memory (e.g. ft_attn_args.tk_dev), and the
     * caller changes the key whenever a buffer or constant that body passes changes. The backend
     * decides when to record and drops a recording once its own scratch memory has moved. */
    ft_status (*replay)(ft_backend *be, int slot, uint64_t key, ft_status (*body)(void *ctx, ft_error *err),
                        void *ctx, ft_error *err);

    /* ---- accounting (optional: NULL when the backend does not count) ---- */
    /* bytes this backend holds now and its high-water mark; reset: mark = now */
    ft_status (*memory_stats)(ft_backend *be, size_t *current, size_t *peak, int reset, ft_error *err);
} ft_backend_ops;

struct ft_backend {
    const ft_backend_ops *ops;
    ft_dtype act_dtype;    /* activations */
    ft_dtype weight_dtype; /* dense weights made by dense_create */
};

ft_status ft_cpu_backend_create(ft_backend **out, ft_error *err);
#ifdef FT_WITH_CUDA
ft_status ft_cuda_backend_create(int device, int act_dtype, ft_backend **out, ft_error *err);
int ft_cuda_count_devices(void);
int ft_cuda_mem_info(size_t *used, size_t *total);
#endif

/* gptq.c: check one quantized linear against the expected shapes and bits. */
ft_status ft_gptq_check(const ft_host_qlinear *q, int in, int out, int bits, int *groups,
                        ft_error *err);
/* common.c: what an epilogue stands for, after y = x W + bias is already in y, run through be's own
 * ops (lora_fwd without dropout, gelu_fwd, add) in ft_epilogue's order: the backends' qlinear_fwd_epi
 * where they do not fuse it. in, out: the linear's widths. */
ft_status ft_epilogue_by_ops(ft_backend *be, void *y, const void *x, int N, int in, int out, const ft_epilogue *epi,
                             ft_error *err);
/* gptq.c: index of the first NaN/inf element of n float16/bfloat16/float32 values, or -1. */
int64_t ft_first_nonfinite(const void *data, ft_dtype dt, int64_t n);
/* Value i of a little-endian bit stream of `bits`-wide integers held in 32-bit
 * words spaced `stride` words apart (AutoGPTQ packs 3-bit values across words). */
static inline uint32_t ft_unpack(const int32_t *words, int64_t stride, int64_t i, int bits)
{
    int64_t bit = i * bits;
    int64_t w = bit >> 5;
    int sh = (int)(bit & 31);
    uint64_t lo = (uint32_t)words[w * stride];
    if (sh + bits > 32) lo |= (uint64_t)(uint32_t)words[(w + 1) * stride] << 32;
    return (uint32_t)(lo >> sh) & ((1u << bits) - 1u);
}

#ifdef __cplusplus
}
#endif
#endif /* FT_BACKEND_H */
