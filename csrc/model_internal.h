/* model_internal.h -- the ft_model object, shared by the files that implement ft.h's model API.
 *
 * Private to the engine (pymodule.c never includes it). Each file owns one job:
 *   model.c      config checks, weight binding, create / free, accessors
 *   lora.c       LoRA storage: parameters, gradients, AdamW moments (one buffer per slot)
 *   workspace.c  the activation workspace: one backend block carved into named buffers
 *   layer.c      one Falcon layer, forward and backward side by side
 *   forward.c    input checks, token positions, the full forward (embedding, layers, ln_f, head)
 *   train.c      loss, forward_backward, evaluation loss, gradient norm, AdamW
 *   decode.c     the KV cache: cached forward, decode step, beam reorder
 *   dist.c       data parallel: the NCCL all-reduce of the flat LoRA gradients (cuda/nccl.cu)
 * None of them reads element data: every number is computed by the backend (backend.h).
 *
 * Shapes: B batch, T tokens, N = B*T rows, D hidden, F ffn, W qkv width,
 * H query heads, KV kv heads, hd head dim, r LoRA rank, V vocab.
 */
#ifndef FT_MODEL_INTERNAL_H
#define FT_MODEL_INTERNAL_H

#include "backend.h"

#define CALL(expr)                    \
    do {                              \
        ft_status st_ = (expr);       \
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
    int32_t *ids, *tgt, *pos, *kmask, *kpos; /* [N] each (kmask/kpos: [B,T] without cache), in this
                                              * order int_stride apart */
    size_t int_stride;
} workspace;

typedef struct kv_cache {
    int B, cap, len;
    void **k, **v; /* [L] each [B,KV,cap,hd] */
    void *tmp;     /* [B,KV,cap,hd] for reordering */
    int32_t *kmask, *kpos; /* [B,cap]: key mask and alibi position of each cached token */
    int32_t *gather_idx;   /* [B] */
    int32_t *seen;         /* host [B]: real (mask 1) tokens cached per row = next position */
    int32_t *step_dev;     /* [2]: past, Tk of the current decode step, read by the kernels */
    int32_t *chain;        /* [2 B cap + 2 cap]: decode_greedy's results [n, B], then its steps'
                            * positions [n, B] and {past, Tk} [n, 2] (n <= cap) */
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
    /* Bumped whenever a buffer or constant that a recorded step hands to the backend changes (the
     * workspace is carved, the adapter added or removed or its dropout set, the cache made or
     * freed): part of the key under which the backend may replay a recorded decode or training
     * step (backend.h, replay). */
    uint64_t bind_gen;
};

/* Limits that keep every int the engine computes from them in range: a config dimension (hidden,
 * ffn, vocab, layers), and the elements of one activation tensor or KV-cache buffer (both backends
 * index some of them with int). */
#define FT_MAX_DIM (1 << 24)
#define FT_MAX_ELEMS ((int64_t)INT32_MAX)

/* Module widths come from the module table (common.c); m->qkv_width is the ft_qkv_width the
 * table gives for query_key_value. */
static inline int mod_in(const ft_config *c, int mod) { return ft_module_in(c, mod); }
static inline int mod_out(const ft_config *c, int mod, int qkv_width)
{
    (void)qkv_width;
    return ft_module_out(c, mod);
}

static inline size_t act_bytes(const ft_model *m, size_t n)
{
    return n * ft_dtype_size(m->be->act_dtype);
}

static inline int has_lora(const ft_model *m, int mod) { return (m->lora_targets >> mod) & 1u; }

/* Replay slots (backend.h): decode.c records its steps in the first two (one per head kind),
 * train.c a training step's forward and backward halves and the evaluation forward, each in up to
 * STEP_PIECES pieces of consecutive layers (a slot per piece: train.c says why). */
enum { STEP_PIECES = 8 };
enum {
    REPLAY_SLOT_DECODE_END = 2,
    REPLAY_SLOT_TRAIN_FWD = 2,
    REPLAY_SLOT_TRAIN_BWD = REPLAY_SLOT_TRAIN_FWD + STEP_PIECES,
    REPLAY_SLOT_EVAL_FWD = REPLAY_SLOT_TRAIN_BWD + STEP_PIECES
};
_Static_assert((int)REPLAY_SLOT_EVAL_FWD + STEP_PIECES <= (int)FT_REPLAY_SLOTS,
               "a replay slot for each piece of each recorded kind of step");

/* ---- lora.c ---- */
/* A [r, in] and B [out, r] of one module in LoRA slot `slot` (backend memory). */
ft_status lora_locate(const ft_model *m, ft_lora_slot slot, int layer, int mod, float **A, float **B, size_t *na,
                      size_t *nb, ft_error *err);

/* ---- workspace.c ---- */
/* A workspace for N rows (train: with backward buffers and saved activations); grows, never shrinks. */
ft_status workspace_ensure(ft_model *m, int N, int train, ft_error *err);
void workspace_free(ft_model *m);

/* ---- layer.c ---- */
/* What the ops of one step need besides the layer's weights. */
typedef struct step_ctx {
    int B, T, N;
    int Tk, cap, past;   /* attention keys */
    int kstride;         /* row stride of kmask / kpos */
    const int32_t *kmask, *kpos, *pos; /* backend arrays */
    const int32_t *past_dev, *tk_dev;  /* decode steps: past and Tk in backend memory (graph replay) */
    int train;           /* dropout active (the step's masks: the backend's dropout base) */
    int backward;        /* a backward pass reads this step's activations: each layer keeps its own, and no
                          * linear fuses its epilogue (layer.c) */
} step_ctx;

/* y[N,D] = layer l (x[N,D]); k/v go to kbuf/vbuf (the cache) when given, else to A. */
ft_status layer_forward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x, void *y, void *kbuf,
                        void *vbuf, ft_error *err);
/* On entry ws.dres holds dL/dy of layer l; on exit dL/dx (when need_dx). */
ft_status layer_backward(ft_model *m, const step_ctx *s, int l, layer_acts *A, const void *x, int need_dx,
                         ft_error *err);

/* ---- forward.c ---- */
/* ids in [0, V), mask (B x mask_T) of 0 or 1 -- or, with segments (packed rows, no KV cache),
 * segment ids >= 0 that never decrease along a row -- and the B*T rows of every activation of the
 * step within FT_MAX_ELEMS. */
ft_status check_ids(const ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T, int mask_T,
                    int segments, ft_error *err);
/* Host arrays: positions of the last T of Tk tokens per row (tokens of the same segment before
 * each; a padding token counts every real token before it), key masks
 * and alibi key positions (each may be NULL), row_real[b] = real tokens of row b (may be NULL). */
void token_positions(const int32_t *mask, int B, int T, int Tk, int32_t *pos, int32_t *kmask, int32_t *kpos,
                     int32_t *row_real);
/* Uploads ids, targets (tgt [N], or NULL: none), positions and key masks of a step without cache,
 * in one copy, and fills s. */
ft_status prepare_step(ft_model *m, step_ctx *s, const int32_t *ids, const int32_t *tgt, const int32_t *mask, int B,
                       int T, ft_error *err);
/* Layers l0 .. l1-1 (each its own activations when s->backward), with the embedding when l0 == 0 and
 * ln_f into ws.hf when l1 == n_layer. */
ft_status run_layer_range(ft_model *m, const step_ctx *s, int l0, int l1, ft_error *err);
/* Logits of the n rows of h (ln_f output, act [n, D]) to host logits [n, V], in chunks of ws.chunk. */
ft_status head_logits(ft_model *m, const void *h, int n, float *logits, ft_error *err);

#endif /* FT_MODEL_INTERNAL_H */
