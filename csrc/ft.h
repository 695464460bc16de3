/* ft.h -- the falcontune engine's C API.
 *
 * No Python here: pymodule.c is the only file that knows about Python/numpy.
 * The caller (Python) parses files and hands host arrays; the engine validates
 * every shape, dtype and value it is given and never trusts them.
 *
 * Every function returns an ft_status; on failure the ft_error it was given
 * holds a message naming the tensor/argument and what was expected.
 */
#ifndef FT_H
#define FT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FT_OK = 0,
    FT_EINVAL,       /* bad argument: shape, dtype, value out of range */
    FT_ENOMEM,       /* host allocation failed */
    FT_EDEVMEM,      /* device out of memory */
    FT_EDEVICE,      /* device or runtime library error */
    FT_EUNSUPPORTED, /* valid request this build/device cannot do */
    FT_ESTATE        /* call not valid in the current state (e.g. no LoRA) */
} ft_status;

typedef struct ft_error {
    ft_status status;
    char msg[768];
} ft_error;

/* Record an error (printf-style) and return its status. */
ft_status ft_fail(ft_error *err, ft_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

typedef enum { FT_F32 = 0, FT_F16 = 1, FT_BF16 = 2, FT_I32 = 3 } ft_dtype;
size_t ft_dtype_size(ft_dtype dt);
const char *ft_dtype_name(ft_dtype dt);

/* How the fused query_key_value output is laid out (DESIGN.md). */
typedef enum {
    FT_QKV_MULTI_QUERY = 0, /* [heads q | 1 k | 1 v] x head_dim                  */
    FT_QKV_GROUPED = 1,     /* [kv, heads/kv + 2, head_dim]: q..., k, v per group */
    FT_QKV_INTERLEAVED = 2  /* [heads, 3, head_dim]: q, k, v per head             */
} ft_qkv_layout;

typedef struct ft_config {
    int vocab_size, hidden, n_head, n_kv_head, n_layer, head_dim, ffn;
    ft_qkv_layout qkv_layout;
    int parallel_attn; /* h = x + attn(ln(x)) + mlp(ln'(x)) */
    int n_ln;          /* parallel only: 1 (input_layernorm) or 2 (ln_attn + ln_mlp) */
    int alibi;         /* alibi bias instead of rotary */
    int bias;          /* linears carry a bias (checked against the weights) */
    float ln_eps, rope_theta;
} ft_config;

/* ---- the linears of a Falcon layer: the one description every other place reads ----
 * (common.c holds the table; Python gets it as falcontune._C.MODULES.) A module's checkpoint
 * names are transformer.h.<layer>.<parent>.<name>.{qweight, qzeros, scales, g_idx, bias}; its
 * PEFT LoRA names are base_model.model.transformer.h.<layer>.<parent>.<name>.lora_{A,B}.weight,
 * A [r, in] and B [out, r]; the GPTQ qweight is [in*bits/32, out]. */
enum { FT_MOD_QKV = 0, FT_MOD_DENSE = 1, FT_MOD_H_TO_4H = 2, FT_MOD_4H_TO_H = 3, FT_NMOD = 4 };

/* A width of the config that a module's input or output has. */
typedef enum {
    FT_WIDTH_HIDDEN = 0, /* hidden */
    FT_WIDTH_FFN = 1,    /* ffn */
    FT_WIDTH_QKV = 2,    /* the fused qkv output: ft_qkv_width */
    FT_NWIDTH = 3
} ft_width;

typedef struct ft_module_desc {
    const char *name;   /* "query_key_value": the PEFT target name */
    const char *parent; /* "self_attention" or "mlp" */
    ft_width in, out;
} ft_module_desc;

/* The module of index mod (FT_MOD_*), NULL when out of range. */
const ft_module_desc *ft_module(int mod);
const char *ft_module_name(int mod); /* "query_key_value", ...; "?" when out of range */
const char *ft_width_name(ft_width w); /* "hidden", "ffn", "qkv" */
/* Columns of the fused qkv output (multi-query: hidden + 2 head_dim; grouped:
 * (heads + 2 kv heads) head_dim; interleaved: 3 hidden). These four return -1 for a
 * width that is not positive or does not fit in an int, or an unknown layout / module. */
int ft_qkv_width(const ft_config *c);
int ft_width_of(const ft_config *c, ft_width w);
int ft_module_in(const ft_config *c, int mod);  /* in_features of module mod */
int ft_module_out(const ft_config *c, int mod); /* out_features */

/* A host array handed over by the caller, who keeps it alive for the model's life. */
typedef struct ft_host_tensor {
    const void *data; /* NULL: absent */
    ft_dtype dtype;
    int ndim;
    int64_t shape[2];
    const char *name; /* checkpoint name, for messages */
} ft_host_tensor;

typedef struct ft_host_qlinear {
    ft_host_tensor qweight; /* int32 [in*bits/32, out] */
    ft_host_tensor qzeros;  /* int32 [groups, out*bits/32] */
    ft_host_tensor scales;  /* f16 [groups, out] */
    ft_host_tensor g_idx;   /* int32 [in] */
    ft_host_tensor bias;    /* f16/bf16/f32 [out], optional */
} ft_host_qlinear;

typedef struct ft_host_layer {
    ft_host_tensor ln1_w, ln1_b; /* input_layernorm or ln_attn */
    ft_host_tensor ln2_w, ln2_b; /* ln_mlp or post_attention_layernorm; absent for 1-LN parallel */
    ft_host_qlinear lin[FT_NMOD];
} ft_host_layer;

typedef struct ft_host_weights {
    ft_host_tensor embed;        /* [vocab, hidden] */
    ft_host_tensor lnf_w, lnf_b; /* [hidden] */
    ft_host_tensor lm_head;      /* [vocab, hidden]; data NULL when tied to embed */
    const ft_host_layer *layers; /* [n_layer] */
    int bits;                    /* 2, 3, 4, 8 */
    int zero_offset;             /* 1: GPTQ v1 (stored zero + 1); 0: v2 */
} ft_host_weights;

typedef struct ft_model ft_model;

/* A device string: "cpu" (*cuda_index = -1), "cuda" (0) or "cuda:N" with N decimal digits only
 * (no sign, space or suffix). Anything else is FT_EINVAL. */
ft_status ft_parse_device(const char *device, int *cuda_index, ft_error *err);

/* device: "cpu" or "cuda:N" (ft_parse_device). act_dtype: FT_F32 (cpu), FT_BF16 or FT_F16 (cuda);
 * -1 picks the device's default. */
ft_status ft_model_create(const ft_config *cfg, const ft_host_weights *w, const char *device,
                          int act_dtype, ft_model **out, ft_error *err);
void ft_model_free(ft_model *m);
const ft_config *ft_model_config(const ft_model *m);
const char *ft_model_device(const ft_model *m);
ft_dtype ft_model_act_dtype(const ft_model *m);

/* ---- LoRA ---------------------------------------------------------------
 * Parameters, gradients and AdamW moments are fp32, stored by the backend.
 * A is [r, in], B is [out, r]; out += scale * B(A(dropout(x))). */
typedef enum { FT_LORA_WEIGHT = 0, FT_LORA_GRAD = 1, FT_LORA_ADAM_M = 2, FT_LORA_ADAM_V = 3 } ft_lora_slot;

ft_status ft_lora_init(ft_model *m, int r, float alpha, float dropout, unsigned target_mask,
                       ft_error *err);
void ft_lora_remove(ft_model *m);
int ft_lora_rank(const ft_model *m);         /* 0: no LoRA */
unsigned ft_lora_targets(const ft_model *m); /* bit mask of FT_MOD_* */
float ft_lora_scale(const ft_model *m);
ft_status ft_lora_set_dropout(ft_model *m, float dropout, ft_error *err);
/* Copy A [r, in] and B [out, r] of one module between host and the model. */
ft_status ft_lora_read(ft_model *m, ft_lora_slot slot, int layer, int mod, float *A, float *B,
                       ft_error *err);
ft_status ft_lora_write(ft_model *m, ft_lora_slot slot, int layer, int mod, const float *A,
                        const float *B, ft_error *err);
ft_status ft_zero_grad(ft_model *m, ft_error *err);
/* The LoRA gradients as one flat f32 array (the layout above, layer by layer, A then B of each
 * adapted module): ft_lora_numel floats (0 without LoRA). ft_lora_grad_flat copies all of them to
 * host (write 0) or from host (write 1); n must equal ft_lora_numel. Data parallel training sums
 * this array over the processes (MPI on the CPU, ft_dist on CUDA). */
size_t ft_lora_numel(const ft_model *m);
ft_status ft_lora_grad_flat(ft_model *m, float *host, size_t n, int write, ft_error *err);

/* Training mode: dropout on. The dropout stream is (seed, counter): each
 * forward_backward advances the counter, so a run is reproducible and resumable. */
void ft_set_training(ft_model *m, int training);
void ft_set_rng(ft_model *m, uint64_t seed, uint64_t counter);
void ft_get_rng(const ft_model *m, uint64_t *seed, uint64_t *counter);
/* Recompute the activations of the first round(ratio * n_layer) layers in backward. */
void ft_set_checkpointing(ft_model *m, float ratio);

/* ---- compute ------------------------------------------------------------
 * ids/labels/mask are int32 [B, T] host arrays; mask may be NULL (all ones).
 * Token positions (rotary, alibi) count the unmasked tokens before each one,
 * so left and right padding both work.
 * Packed rows: mask values are segment ids (0 = padding, k > 0 = a token of
 * example k; non-decreasing along a row). A token attends to the earlier tokens
 * of its own segment and its position counts only those, so each example is
 * computed as if alone. Segment ids are refused where a KV cache is used. */
ft_status ft_forward(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T,
                     float *logits /* [B, T, V] */, ft_error *err);
/* Loss = mean over labels != -100 of CE(logits[t], labels[t+1]) (shift inside).
 * Adds grad_scale * d(loss)/d(lora) to the gradients. */
ft_status ft_forward_backward(ft_model *m, const int32_t *ids, const int32_t *labels,
                              const int32_t *mask, int B, int T, float grad_scale,
                              double *loss, int64_t *n_tokens, ft_error *err);
/* The same loss without gradients, dropout or a LoRA requirement (evaluation): the logits
 * never leave the device. */
ft_status ft_forward_loss(ft_model *m, const int32_t *ids, const int32_t *labels, const int32_t *mask, int B,
                          int T, double *loss, int64_t *n_tokens, ft_error *err);

/* ---- optimizer ----------------------------------------------------------- */
typedef struct ft_adamw_params {
    float lr, beta1, beta2, eps, weight_decay;
    float max_grad_norm; /* <= 0: no clipping */
    float grad_scale;    /* gradients are divided by this first (loss scaling) */
    int64_t step;        /* 1-based step number, for bias correction */
} ft_adamw_params;
/* Returns the gradient norm before clipping (after unscaling). A non-finite
 * norm skips the update and leaves parameters untouched. */
ft_status ft_adamw_step(ft_model *m, const ft_adamw_params *p, double *grad_norm, ft_error *err);
ft_status ft_grad_norm(ft_model *m, double *norm, ft_error *err);

/* ---- data parallel: NCCL (CUDA models) -----------------------------------
 * NCCL is loaded at run time (dlopen) from nccl_lib: a path, or a name the dynamic loader finds
 * ("libnccl.so.2"); the build does not need NCCL. One process per GPU: rank 0 makes the group's
 * id with ft_dist_unique_id, the caller sends those bytes to every rank (MPI), and each rank joins
 * with its model. NCCL_NVLS_ENABLE is set to 0 when unset (no NVLink multicast). The library,
 * once loaded, stays loaded: the id's bootstrap thread runs inside it until the group forms. */
#define FT_DIST_ID_BYTES 128
typedef struct ft_dist ft_dist;
/* A new group id; *version: NCCL's version code (e.g. 22304 for 2.23.4). */
ft_status ft_dist_unique_id(const char *nccl_lib, uint8_t id[FT_DIST_ID_BYTES], int *version, ft_error *err);
/* Join group `id` as rank `rank` of `world` on the GPU of model m (a CUDA model; the CPU backend
 * is FT_EUNSUPPORTED). Blocks until every rank has joined. m must outlive the ft_dist. */
ft_status ft_dist_create(ft_model *m, const char *nccl_lib, const uint8_t id[FT_DIST_ID_BYTES], int rank,
                         int world, ft_dist **out, ft_error *err);
/* The flat LoRA gradients of m (the model the ft_dist was made with) become their sum over the
 * ranks, in place, on every rank; returns when the sum is in the buffer. */
ft_status ft_dist_allreduce_grad(ft_dist *d, ft_model *m, ft_error *err);
int ft_dist_rank(const ft_dist *d);
int ft_dist_world(const ft_dist *d);
void ft_dist_free(ft_dist *d);

/* ---- generation: KV cache ------------------------------------------------ */
ft_status ft_cache_init(ft_model *m, int B, int capacity, ft_error *err);
void ft_cache_free(ft_model *m);
int ft_cache_len(const ft_model *m);
/* Appends T tokens per row. mask: int32 [B, cache_len + T] (NULL: all ones).
 * Writes logits of the last position of each row: [B, V]. */
ft_status ft_forward_cached(ft_model *m, const int32_t *ids, const int32_t *mask, int B, int T,
                            float *last_logits, ft_error *err);
/* Appends one token per row (generation): ids int32 [B], mask int32 [B] (1: a real token,
 * 0: padding; NULL: all ones). Only the new token's key data is uploaded. Exactly one of
 * last_logits ([B, V] logits of the new tokens) and out_ids ([B] greedy argmax of those
 * logits, computed on the device: ties go to the lowest id) is non-NULL. */
ft_status ft_decode_step(ft_model *m, const int32_t *ids, const int32_t *mask, int B, float *last_logits,
                         int32_t *out_ids, ft_error *err);
/* n greedy tokens per row from ids int32 [B] (every new token a real one): out_ids int32 [n, B],
 * row i the argmax after step i, fed to step i + 1 on the device. The same ids as n decode_step
 * calls with argmax, without a host round trip per token. */
ft_status ft_decode_greedy(ft_model *m, const int32_t *ids, int B, int n, int32_t *out_ids, ft_error *err);
/* Row b of the cache becomes old row src[b] (beam search). */
ft_status ft_cache_reorder(ft_model *m, const int32_t *src, int B, ft_error *err);

/* ---- sampling helpers (host) --------------------------------------------- */
/* In place on logits [V]: repetition penalty over `prev` ids, temperature,
 * top-k, top-p; then draws with u in [0,1). Returns the token id. */
int ft_sample_token(float *logits, int V, const int32_t *prev, int n_prev, float repetition_penalty,
                    float temperature, int top_k, float top_p, double u, int32_t *scratch_idx);

/* ---- quantization on load (unquantized checkpoints) --------------------------
 * Round-to-nearest asymmetric GPTQ packing of an nn.Linear weight w [out, in]
 * (f16/bf16/f32), per group of group_size input rows (-1: one group), zero points
 * stored as is (GPTQ v2: zero_offset 0). Outputs, allocated by the caller:
 * qweight int32 [in*bits/32, out], qzeros int32 [groups, out*bits/32],
 * scales f16 [groups, out], g_idx int32 [in]. */
ft_status ft_gptq_quantize_rtn(const void *w, ft_dtype dtype, int out, int in, int bits, int group_size,
                               int32_t *qweight, int32_t *qzeros, uint16_t *scales, int32_t *g_idx,
                               ft_error *err);
uint16_t ft_float_to_half(float f);
float ft_half_to_float(uint16_t h);
float ft_bf16_to_float(uint16_t h);

/* Build info: 1 when compiled with the CUDA backend. */
int ft_have_cuda(void);
int ft_cuda_device_count(void);
/* Device-wide memory in use and total of the current CUDA device; -1 without CUDA. */
int ft_cuda_device_memory(size_t *used, size_t *total);

/* Bytes the model's backend holds now and at most since the last reset (0, 0 on the
 * CPU, which does not count). reset: the high-water mark restarts from now. */
ft_status ft_memory_stats(ft_model *m, size_t *current, size_t *peak, int reset, ft_error *err);

#ifdef __cplusplus
}
#endif
#endif /* FT_H */
