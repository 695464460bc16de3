/* cuda.cuh -- internals shared by the CUDA backend's files.
 *
 * Activations are __nv_bfloat16 or __half (be->act_dtype); every kernel that
 * touches them is a template on that type and is launched through
 * ACT_DISPATCH. Arithmetic is float32 (ld/st convert at the edges).
 */
#ifndef FT_CUDA_CUH
#define FT_CUDA_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include "../backend.h"

typedef __nv_bfloat16 bf16;
typedef __half f16;

/* Optional per-op timing (FT_CUDA_PROFILE=1): synchronises around each timed region
 * and prints a table to stderr when the backend is destroyed. For finding hot spots only. */
enum { PR_DEQ, PR_QGEMM_F, PR_QGEMM_B, PR_LORA_F, PR_LORA_B, PR_ATT_F, PR_ATT_DQ, PR_ATT_DV, PR_ATT_DK,
       PR_ATT_SUM, PR_QKV, PR_LN, PR_ELEM, PR_LM, PR_CE, PR_OPT, PR_N };

/* ---- kernel choice (choice.cu) ----
 * Where an op has more than one kernel, ONE function decides which runs and returns an enum
 * (names in choice.cu's tables); the backend counts every answer and FT_CUDA_PROFILE=1 prints the
 * counts (and the time of each quantized-product variant). */

/* quantized product y = x W (forward) or dx = dy W^T (input gradient):
 *   SCRATCH    dequantize W[in, out] into scratch + cuBLAS (forward "NN", backward "TN")
 *   SCRATCH_T  forward: dequantize W^T[out, in] (tiled transpose) + cuBLAS "TN"; backward: = SCRATCH,
 *              whose [in, out] scratch already is the "TN" layout for dy W^T
 *   FUSED      qgemm.cu: packed weights dequantized tile by tile in shared memory, tensor-core mma
 *   GEMV       gemv.cu: forward with N <= 8 rows (decode) */
typedef enum { QGEMM_SCRATCH, QGEMM_SCRATCH_T, QGEMM_FUSED, QGEMM_GEMV, QGEMM_N } qgemm_kind;
typedef enum { QGEMM_FWD, QGEMM_BWD } qgemm_dir;
/* why the fused kernel cannot run a product (QF_OK: it can) */
typedef enum { QF_OK, QF_BITS, QF_SHAPE, QF_ALIGN, QF_ARCH, QF_N } qfused_why;
/* why the GEMV does not run a forward (GEMV_OK: it does) */
typedef enum { GEMV_OK, GEMV_OFF, GEMV_ROWS, GEMV_BITS, GEMV_SHAPE, GEMV_ALIGN, GEMV_ARCH, GEMV_N } gemv_why;
/* which GEMV kernel runs it: GVK_FOLD / GVK_FOLD_PIPE qgemv_fold_kernel (one stage / two), otherwise
 * qgemv_kernel, and why */
typedef enum { GVK_FOLD, GVK_FOLD_PIPE, GVK_OFF, GVK_BITS, GVK_GROUPS, GVK_N } gemv_kernel_why;
/* where qlinear_fwd_epi's epilogue runs: in the GEMV's reduction (QE_GEMV), else as separate ops, and why */
typedef enum { QE_GEMV, QE_OFF, QE_KERNEL, QE_ALIGN, QE_RANK, QE_N } qlinear_epi_why;
/* the largest LoRA rank the GEMV's reduction adds itself (its loop over the rank per column) */
constexpr int GV_LORA_MAX_R = 64;
/* attention: cuBLAS chunks (default), scalar flash kernels (FT_CUDA_ATTN=flash), one-launch decode,
 * tensor-core flash kernels (FT_CUDA_ATTN=mma, attention_mma.cu) */
typedef enum { ATTN_GEMM, ATTN_FLASH, ATTN_DECODE, ATTN_MMA, ATTN_N } attn_kind;
/* why the tensor-core flash kernels do not run an attention call asked of them (AMM_OK: they do) */
typedef enum { AMM_OK, AMM_HEAD, AMM_SHAPE, AMM_ALIGN, AMM_ARCH, AMM_N } attn_mma_why;
/* why the decode attention does not run a forward (AD_OK: it does) */
typedef enum { AD_OK, AD_OFF, AD_ROWS, AD_HEAD, AD_ALIGN, AD_SIZE, AD_N } attn_decode_why;

/* the counted choices: one row each in the profiler's table */
enum { CH_QGEMM_FWD, CH_QGEMM_BWD, CH_QFUSED, CH_GEMV, CH_GEMV_KERNEL, CH_QLINEAR_EPI, CH_ATTN_FWD, CH_ATTN_BWD,
       CH_ATTN_DECODE, CH_ATTN_MMA, CH_N };
#define CH_MAXV 8 /* most answers of one choice */

/* the decode attention's limits (attention_decode.cu), which attn_decode_check tests */
constexpr int AD_THREADS = 128;
constexpr int AD_KEYS = AD_THREADS / 2; /* keys per block: two threads per key */
constexpr int AD_HD = 128;              /* largest head dim (K+V tiles: 34 KB of shared memory) */

/* scratch slots: each a device buffer grown on demand, reused call after call */
enum { SCR_DEQ = 0, SCR_LORA0, SCR_LORA1, SCR_LORA2, SCR_ATTN, SCR_MISC, SCR_N };

/* One recorded step (graph.cu): a CUDA graph of what the caller's body enqueued under `key`, valid
 * while the backend's scratch memory stays where it was (scratch_gen == gen). */
enum { REPLAY_COLD = 0, REPLAY_WARM = 1, REPLAY_OFF = 2 };
typedef struct cuda_replay_slot {
    cudaGraphExec_t exec; /* NULL: nothing recorded */
    uint64_t key, gen;    /* key and scratch generation of the recording, or of the last direct run */
    int state;            /* COLD; WARM: ran directly under (key, gen), the next call captures;
                           * OFF: capture failed under key, run directly */
} cuda_replay_slot;

struct cuda_backend {
    ft_backend base;
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;
    void *scratch[SCR_N];
    size_t scratch_bytes[SCR_N];
    double *red; /* [RED_BLOCKS] partial sums for sumsq */
    double *red_host;
    uint64_t *dropout_base; /* [1]: set_dropout_base's value, read by the LoRA dropout kernels */
    void *alloc_map; /* pointer -> bytes map (backend.cu) for the memory counters */
    size_t cur_bytes, peak_bytes; /* this backend's device allocations: now, and the high-water mark */
    int prof_on;                  /* FT_CUDA_PROFILE=1 */
    double prof_s[PR_N];          /* seconds per op family */
    long prof_calls[PR_N];
    long choice_calls[CH_N][CH_MAXV]; /* how often each answer of each choice was given */
    double choice_s[CH_N][CH_MAXV];   /* profiled seconds of the ops that ran each answer */
    int *attn_cnt;   /* decode attention: arrival counter per (row, head), zero between calls */
    int attn_cnt_n;
    int cc_major, sms; /* compute capability major, multiprocessors */
    int sm;            /* compute capability, major * 10 + minor */
    /* what this build can run on this device (choice.cu: cuda_probe_kernels): the PTX
     * architecture the kernels were compiled from, which a JIT-compiled sm_75 build keeps low
     * on an sm_90 card */
    int gemv_ptx, qgemm_ptx, attn_mma_ptx;
    /* settings, read once by cuda_read_env (choice.cu) when the backend is created */
    attn_kind attn_pref; /* FT_CUDA_ATTN: ATTN_MMA (default, where it can run), ATTN_GEMM or ATTN_FLASH */
    size_t attn_chunk_bytes; /* f32 score scratch per attention chunk (FT_CUDA_ATTN_CHUNK_MB) */
    int gemv_on;       /* FT_CUDA_GEMV != 0: fused dequant-GEMV for N <= 8 rows */
    int gemv_epi_on;   /* FT_CUDA_GEMV_EPILOGUE != 0: qlinear_fwd_epi's epilogue in the GEMV's reduction */
    int gemv_fold;     /* FT_CUDA_GEMV_FOLD: 1 its fold kernel where gv_fold_ok (gemv_kernels.cuh), 2 the same
                        * with two register stages, 0 (default) the pairs kernel everywhere */
    int attn_decode_on; /* FT_CUDA_ATTN_DECODE != 0: one-launch attention for T == 1 */
    int graphs_on;      /* FT_CUDA_GRAPHS != 0: replay records CUDA graphs (decode steps) */
    int qgemm_force;    /* FT_CUDA_QGEMM: -1 auto, else the qgemm_kind every product uses where it can */
    int poison;         /* FT_CUDA_POISON=1 (tests): quantized products fill their output with NaN first */
    size_t mem_limit;   /* FT_CUDA_MEM_LIMIT_MB (tests): cap on this backend's bytes, 0: none */
    int capturing;      /* while replay captures a graph: no allocation may happen */
    uint64_t scratch_gen; /* bumped whenever a scratch buffer (or the attention counters) moves */
    cuda_replay_slot replay[FT_REPLAY_SLOTS];
};

struct ft_qlinear {
    int32_t *qweight, *qzeros, *g_idx;
    f16 *scales;
    float *bias; /* NULL when absent */
    int in, out, bits, groups, zero_offset;
    /* group lookup of the packed-weight kernels (gemv.cu, qgemm.cu), set by cuda_qgemv_prepare for
     * 2/4/8 bits: row_groups = 0: the rows of every packed word share one group, found as
     * word_row >> gemv_gshift (gemv_gshift >= 0) or g_idx[word_row * 32/bits]; 1: some word holds
     * rows of several groups (act-order checkpoints), looked up per row */
    int row_groups, gemv_gshift;
    int *gemv_cnt; /* GEMV: per column tile arrival counters (zero between calls); NULL: 3 bits */
};

#define RED_BLOCKS 1024

static inline cuda_backend *CB(ft_backend *be) { return (cuda_backend *)be; }

/* ---- errors ---- */
ft_status cuda_fail(ft_error *err, cudaError_t e, const char *what);
ft_status cublas_fail(ft_error *err, cublasStatus_t s, const char *what);

#define CUDA_TRY(expr, what)                                \
    do {                                                    \
        cudaError_t e_ = (expr);                            \
        if (e_ != cudaSuccess) return cuda_fail(err, e_, what); \
    } while (0)
/* after a kernel launch */
#define LAUNCH_CHECK(what) CUDA_TRY(cudaGetLastError(), what)
#define BLAS_TRY(expr, what)                                      \
    do {                                                          \
        cublasStatus_t s_ = (expr);                               \
        if (s_ != CUBLAS_STATUS_SUCCESS) return cublas_fail(err, s_, what); \
    } while (0)
#define FT_TRY(expr)                  \
    do {                              \
        ft_status st_ = (expr);       \
        if (st_ != FT_OK) return st_; \
    } while (0)

/* Makes the backend's GPU current on the calling thread (every entry of the op table does). */
void cuda_enter(cuda_backend *be);

/* graph.cu: the replay op, and the release of every recording (backend destruction) */
extern "C" ft_status cuda_replay(ft_backend *be, int slot, uint64_t key, ft_status (*body)(void *ctx, ft_error *err),
                                 void *ctx, ft_error *err);
void cuda_replay_release(cuda_backend *be);

/* device buffers */
ft_status cuda_malloc(cuda_backend *be, size_t bytes, void **ptr, ft_error *err, const char *what);
void cuda_free_ptr(cuda_backend *be, void *ptr);
/* scratch slot `slot` of at least `bytes` (contents undefined) */
ft_status cuda_scratch(cuda_backend *be, int slot, size_t bytes, void **ptr, ft_error *err);

/* ---- act dtype helpers ---- */
template <typename T> __device__ __forceinline__ float ld(T v);
template <> __device__ __forceinline__ float ld<float>(float v) { return v; }
template <> __device__ __forceinline__ float ld<f16>(f16 v) { return __half2float(v); }
template <> __device__ __forceinline__ float ld<bf16>(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T cv(float v);
template <> __device__ __forceinline__ float cv<float>(float v) { return v; }
template <> __device__ __forceinline__ f16 cv<f16>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ bf16 cv<bf16>(float v) { return __float2bfloat16_rn(v); }

/* eight 2-byte activations in one 16-byte word: the elementwise kernels move memory in 16-byte
 * loads and stores (2-byte accesses reach about a quarter of the card's bandwidth). The word comes
 * by value: taken by reference, unpack8(((const uint4 *)a)[i], f) read global memory through the
 * reference 2 bytes at a time (eight ld.global.u16 in the PTX of the residual add, the layernorm
 * backward's dx and the qkv split) instead of one 16-byte load. */
template <typename T> __device__ __forceinline__ void unpack8(const uint4 w, float f[8])
{
    const T *e = (const T *)&w;
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = ld<T>(e[k]);
}
template <typename T> __device__ __forceinline__ uint4 pack8(const float f[8])
{
    uint4 w;
    T *e = (T *)&w;
#pragma unroll
    for (int k = 0; k < 8; k++) e[k] = cv<T>(f[k]);
    return w;
}
/* V activations as one access: a 16-byte word (V = 8: 16-byte aligned) or one element (V = 1).
 * act_load issues the access, act_unpack converts, so a kernel can keep several loads in flight
 * before it uses them. */
template <typename T, int V> struct act_vec {
    using type = uint4;
};
template <typename T> struct act_vec<T, 1> {
    using type = T;
};
template <typename T, int V>
__device__ __forceinline__ void act_unpack(const typename act_vec<T, V>::type &w, float f[V])
{
    if constexpr (V == 8) unpack8<T>(w, f);
    else f[0] = ld<T>(w);
}
template <typename T, int V> __device__ __forceinline__ typename act_vec<T, V>::type act_pack(const float f[V])
{
    if constexpr (V == 8) return pack8<T>(f);
    else return cv<T>(f[0]);
}
template <typename T, int V> __device__ __forceinline__ typename act_vec<T, V>::type act_load(const T *p)
{
    return *(const typename act_vec<T, V>::type *)p;
}
template <typename T, int V> __device__ __forceinline__ void act_store(T *p, const float f[V])
{
    *(typename act_vec<T, V>::type *)p = act_pack<T, V>(f);
}
static inline bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

template <typename T> struct cuda_type;
template <> struct cuda_type<f16> { static constexpr cudaDataType_t v = CUDA_R_16F; };
template <> struct cuda_type<bf16> { static constexpr cudaDataType_t v = CUDA_R_16BF; };

static inline cudaDataType_t act_cuda_type(const ft_backend *be)
{
    return be->act_dtype == FT_BF16 ? CUDA_R_16BF : CUDA_R_16F;
}

/* ACT_DISPATCH(be, T, body): body compiled for T = bf16 and T = f16 */
#define ACT_DISPATCH(be, T, ...)                     \
    do {                                             \
        if ((be)->act_dtype == FT_BF16) {            \
            typedef bf16 T;                          \
            __VA_ARGS__;                             \
        } else {                                     \
            typedef f16 T;                           \
            __VA_ARGS__;                             \
        }                                            \
    } while (0)

static inline unsigned grid_for(size_t n, int threads)
{
    size_t b = (n + threads - 1) / threads;
    return (unsigned)(b > 65535u * 8u ? 65535u * 8u : (b ? b : 1));
}

/* warp / block reductions (block size a multiple of 32, at most 1024) */
__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
/* sum over the block; every thread gets the result. sh: 32 floats of shared memory */
__device__ __forceinline__ float block_sum(float v, float *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

double prof_now(cuda_backend *be);
void prof_add(cuda_backend *be, int id, double t0);
/* profiled seconds since t0 of an op that ran answer v of choice ch (FT_CUDA_PROFILE=1 only) */
void prof_choice(cuda_backend *be, int ch, int v, double t0);
#define PROF_T0(be) double prof_t0_ = (be)->prof_on ? prof_now(be) : 0.0
#define PROF_MARK(be, id)                          \
    do {                                           \
        if ((be)->prof_on) {                       \
            prof_add(be, id, prof_t0_);            \
            prof_t0_ = prof_now(be);               \
        }                                          \
    } while (0)

/* f32 -> act conversion of n elements (scratch helpers used by several files) */
ft_status cuda_f32_to_act(cuda_backend *be, void *dst, const float *src, size_t n, ft_error *err);
ft_status cuda_act_to_f32(cuda_backend *be, float *dst, const void *src, size_t n, ft_error *err);

/* op implementations, by family */
extern "C" {
ft_status cuda_qlinear_create(ft_backend *be, const ft_qlinear_desc *d, ft_qlinear **out, ft_error *err);
void cuda_qlinear_destroy(ft_backend *be, ft_qlinear *q);
ft_status cuda_qlinear_fwd(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N, ft_error *err);
ft_status cuda_qlinear_fwd_epi(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N,
                               const ft_epilogue *epi, ft_error *err);
ft_status cuda_qlinear_bwd(ft_backend *be, void *dx, const void *dy, const ft_qlinear *q, int N, int accumulate,
                           ft_error *err);
ft_status cuda_lora_fwd(ft_backend *be, void *y, float *xa, const void *x, const float *A, const float *B, int N,
                        int in, int out, int r, float scale, float p, uint64_t seed, ft_error *err);
ft_status cuda_lora_bwd(ft_backend *be, void *dx, float *dA, float *dB, const void *dy, const void *x,
                        const float *xa, const float *A, const float *B, int N, int in, int out, int r, float scale,
                        float p, uint64_t seed, ft_error *err);
ft_status cuda_set_dropout_base(ft_backend *be, uint64_t base, ft_error *err);

ft_status cuda_embed(ft_backend *be, void *out, const int32_t *ids, const void *table, int N, int D, ft_error *err);
ft_status cuda_layernorm_fwd(ft_backend *be, void *y, float *mean, float *rstd, const void *x, const void *g,
                             const void *b, int N, int D, float eps, ft_error *err);
ft_status cuda_layernorm_bwd(ft_backend *be, void *dx, const void *dy, const void *x, const float *mean,
                             const float *rstd, const void *g, int N, int D, ft_error *err);
ft_status cuda_gelu_fwd(ft_backend *be, void *y, const void *x, size_t n, ft_error *err);
ft_status cuda_gelu_bwd(ft_backend *be, void *dx, const void *dy, const void *x, size_t n, ft_error *err);
ft_status cuda_add(ft_backend *be, void *y, const void *a, const void *b, const void *c, size_t n, ft_error *err);

ft_status cuda_qkv_split_fwd(ft_backend *be, void *q, void *k, void *v, const void *qkv, const ft_qkv_args *a,
                             ft_error *err);
ft_status cuda_qkv_split_bwd(ft_backend *be, void *dqkv, const void *dq, const void *dk, const void *dv,
                             const ft_qkv_args *a, ft_error *err);
ft_status cuda_attention_fwd(ft_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                             const ft_attn_args *a, ft_error *err);
ft_status cuda_attention_bwd(ft_backend *be, void *dq, void *dk, void *dv, const void *dout, const void *out,
                             const float *lse, const void *q, const void *k, const void *v, const ft_attn_args *a,
                             ft_error *err);
/* attention_gemm.cu: the same two ops through cuBLAS batched GEMMs over bounded chunks */
ft_status cuda_attention_fwd_gemm(ft_backend *be, void *out, float *lse, const void *q, const void *k,
                                  const void *v, const ft_attn_args *a, ft_error *err);
ft_status cuda_attention_bwd_gemm(ft_backend *be, void *dq, void *dk, void *dv, const void *dout, const void *out,
                                  const float *lse, const void *q, const void *k, const void *v,
                                  const ft_attn_args *a, ft_error *err);

ft_status cuda_lm_logits(ft_backend *be, float *logits, const void *h, const void *W, int n, int V, int D,
                         ft_error *err);
ft_status cuda_cross_entropy(ft_backend *be, float *logits, float *row_loss, const int32_t *target, int n, int V,
                             float grad_scale, ft_error *err);
ft_status cuda_lm_bwd(ft_backend *be, void *dh, const float *dlogits, const void *W, int n, int V, int D,
                      ft_error *err);
ft_status cuda_argmax_rows(ft_backend *be, const float *logits, int n, int V, int32_t *out, ft_error *err);

ft_status cuda_sumsq(ft_backend *be, const float *x, size_t n, double *out, ft_error *err);
ft_status cuda_adamw(ft_backend *be, float *p, const float *g, float *m, float *v, size_t n, float lr, float beta1,
                     float beta2, float eps, float wd, float gmul, float bc1, float bc2, ft_error *err);
ft_status cuda_gather_rows(ft_backend *be, void *dst, const void *src, const int32_t *idx, int n, size_t row_bytes,
                           ft_error *err);
}

/* ---- choice.cu: settings, what the build can run, and the choices ---- */
/* every FT_CUDA_* variable, read once when the backend is created (be->device set) */
ft_status cuda_read_env(cuda_backend *be, ft_error *err);
/* be->gemv_ptx, be->qgemm_ptx, be->attn_mma_ptx from the kernels as loaded on this device */
void cuda_probe_kernels(cuda_backend *be);
/* the choice table of FT_CUDA_PROFILE=1 (stderr) */
void choice_report(const cuda_backend *be);
/* which kernel computes a quantized product with N rows; a: its act input (x or dy), c: its output */
qgemm_kind qgemm_choose(cuda_backend *be, const ft_qlinear *q, int N, qgemm_dir dir, const void *a, const void *c);
/* which GEMV kernel runs a product qgemm_choose gave to the GEMV */
gemv_kernel_why gemv_kernel_choose(cuda_backend *be, const ft_qlinear *q);
/* where the epilogue of a qlinear_fwd_epi whose product runs on kernel `kind` goes */
qlinear_epi_why qlinear_epi_choose(cuda_backend *be, qgemm_kind kind, const ft_epilogue *epi);
/* which attention kernel runs (backward: never ATTN_DECODE); others: the bitwise OR of the addresses
 * of the call's other tensors (q, out, and in backward dout, dq, dk, dv), for the alignment checks */
attn_kind attn_choose(cuda_backend *be, const ft_attn_args *a, const void *k, const void *v, uintptr_t others,
                      int backward);

/* gemv.cu: fused dequant-GEMV for few rows (decode). prepare: at qlinear_create (host g_idx);
 * cuda_qgemv runs when qgemm_choose said QGEMM_GEMV, with qlinear_fwd_epi's epilogue (epi, may be
 * NULL) applied in its reduction. ptx: the PTX arch of its kernels here. */
ft_status cuda_qgemv_prepare(cuda_backend *be, ft_qlinear *q, const int32_t *host_gidx, ft_error *err);
ft_status cuda_qgemv(cuda_backend *be, void *y, const void *x, const ft_qlinear *q, int N, const ft_epilogue *epi,
                     ft_error *err);
/* lora.cu: xa[N,r] = x A^T (A [r, in]), no dropout: qlinear_fwd_epi's LoRA before a GEMV that adds
 * scale xa B^T in its reduction */
ft_status cuda_lora_down(cuda_backend *be, float *xa, const void *x, const float *A, int N, int in, int r,
                         ft_error *err);
int cuda_qgemv_ptx(void);
/* qgemm.cu: the fused quantized GEMM (QGEMM_FUSED). fwd: y[N,out] = x W + bias;
 * bwd: dx[N,in] (=, += when accumulate) dy W^T. ptx: as above. */
ft_status cuda_qgemm_fused(cuda_backend *be, qgemm_dir dir, void *c, const void *a, const ft_qlinear *q, int N,
                           int accumulate, ft_error *err);
int cuda_qgemm_ptx(void);
/* attention_mma.cu: the tensor-core flash attention (when attn_choose said ATTN_MMA); ptx: as above */
ft_status cuda_attention_fwd_mma(cuda_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                                 const ft_attn_args *a, ft_error *err);
ft_status cuda_attention_bwd_mma(cuda_backend *be, void *dq, void *dk, void *dv, const void *dout, const void *out,
                                 const float *lse, const void *q, const void *k, const void *v, const ft_attn_args *a,
                                 ft_error *err);
int cuda_attention_mma_ptx(void);
/* attention_decode.cu: attention_fwd for T == 1 in one launch (when attn_choose said ATTN_DECODE) */
ft_status cuda_attention_decode(cuda_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                                const ft_attn_args *a, ft_error *err);
/* the decode kernel's key splits for these arguments */
static inline int attn_decode_splits(const ft_attn_args *a)
{
    return ((a->tk_dev ? a->cap : a->Tk) + AD_KEYS - 1) / AD_KEYS;
}

/* row-major GEMM helpers over cuBLAS (column-major): C[M,N] = alpha op(A) op(B) + beta C.
 * ta/tb: 0 = as stored, 1 = transposed. A is [M,K] (or [K,M] when ta), B [K,N] (or [N,K]).
 * Types: act x act -> act or f32 (fp32 compute); f32 x f32 -> f32 (sgemm). */
ft_status gemm_rm(cuda_backend *be, int ta, int tb, int M, int N, int K, float alpha, const void *A,
                  cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb, float beta, void *C,
                  cudaDataType_t ct, int ldc, ft_error *err);

#endif /* FT_CUDA_CUH */
