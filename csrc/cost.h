/* cost.h -- engine-counted costs: a counting wrapper around any backend's op table.
 *
 * When FT_COUNT_COSTS is set (to anything but "" or "0") at model creation, the model's
 * backend is wrapped: every op of backend.h adds its FLOPs and the bytes it moves to a
 * per-op counter, then runs on the real backend. Counts follow the op's documented shapes
 * and dtypes in backend.h, never the implementation, so they are the same on every backend
 * (only `bytes` differs, through the activation and weight dtypes). Conventions:
 *
 *  - bytes: each input read once, each output written once; an output that is accumulated
 *    into ("+=") is read and written. Element data only (no argument structs).
 *  - quantized weights: the packed GPTQ tensors as backend.h's ft_host_qlinear holds them
 *    (qweight, qzeros, f16 scales, i32 g_idx; a bias as f32), read once per call. That is
 *    the traffic of a GEMM that reads the packed weights directly ("fused"). A backend that
 *    first dequantizes W[in, out] into a scratch buffer also writes and reads back
 *    `dequant_elems` activation-dtype elements: the projection adds them for that variant.
 *  - FLOPs: a multiply-add is 2; an exp, erf or sqrt is 1; GEMM-like products are 2*M*N*K.
 *    Dropout masks, LoRA scale factors and index arithmetic are not counted. The per-op
 *    formulas are written next to each wrapper in cost.c.
 *  - attention counts the causal (query, key) pairs of its shapes; padding masks are data,
 *    not shapes, and are not looked at.
 *  - upload, download, zero and gather_rows count the raw bytes they are given: a buffer of
 *    activations counts fewer bytes on a bf16/fp16 backend than on the f32 CPU.
 *  - graphs: the counting table has no capture ops, so a decode step always runs its ops
 *    directly (a replayed graph would bypass the counters).
 */
#ifndef FT_COST_H
#define FT_COST_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Every op of ft_backend_ops that does work (destroy is not counted). */
typedef enum {
    FT_COST_ALLOC, FT_COST_FREE, FT_COST_UPLOAD, FT_COST_DOWNLOAD, FT_COST_ZERO, FT_COST_SYNC,
    FT_COST_DENSE_CREATE, FT_COST_QLINEAR_CREATE, FT_COST_QLINEAR_DESTROY,
    FT_COST_EMBED, FT_COST_LAYERNORM_FWD, FT_COST_LAYERNORM_BWD, FT_COST_GELU_FWD, FT_COST_GELU_BWD,
    FT_COST_ADD, FT_COST_QLINEAR_FWD, FT_COST_QLINEAR_BWD, FT_COST_LORA_FWD, FT_COST_LORA_BWD,
    FT_COST_QKV_SPLIT_FWD, FT_COST_QKV_SPLIT_BWD, FT_COST_ATTENTION_FWD, FT_COST_ATTENTION_BWD,
    FT_COST_LM_LOGITS, FT_COST_CROSS_ENTROPY, FT_COST_ARGMAX_ROWS, FT_COST_LM_BWD,
    FT_COST_SUMSQ, FT_COST_ADAMW, FT_COST_GATHER_ROWS,
    FT_COST_NOPS
} ft_cost_op;

typedef struct ft_op_cost {
    uint64_t calls;
    uint64_t flops;
    uint64_t bytes;         /* act_elems, weight_elems at the backend's dtypes + fixed_bytes */
    uint64_t act_elems;     /* activation-dtype elements read + written */
    uint64_t weight_elems;  /* dense-weight-dtype elements read (embedding, norms, lm head) */
    uint64_t fixed_bytes;   /* f32 / i32 / packed-weight bytes read + written */
    uint64_t dequant_elems; /* quantized linears: elements of the dense W[in, out] they multiply by */
} ft_op_cost;

/* "qlinear_fwd", ...: the op's name in backend.h; NULL outside [0, FT_COST_NOPS). */
const char *ft_cost_op_name(int op);

/* Wrap *be in a counting backend when FT_COUNT_COSTS asks for it; otherwise leave it alone.
 * The wrapper owns the wrapped backend from then on. On failure *be has been destroyed and
 * set to NULL (the caller then owns nothing). */
ft_status ft_cost_wrap_from_env(ft_backend **be, ft_error *err);

/* The counters of a model whose backend counts (FT_ESTATE otherwise), then zeroed if reset. */
ft_status ft_model_op_costs(ft_model *m, ft_op_cost out[FT_COST_NOPS], int reset, ft_error *err);

/* model.c: the backend a model drives (the counting wrapper when costs are counted). */
ft_backend *ft_model_backend(ft_model *m);

#ifdef __cplusplus
}
#endif
#endif /* FT_COST_H */
