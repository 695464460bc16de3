/* cpu.h -- internals of the reference CPU backend (float32 everywhere). */
#ifndef FT_CPU_H
#define FT_CPU_H

#include "../backend.h"
#include "isa.h"

typedef struct cpu_backend {
    ft_backend base;
    float *scratch; /* dequantized weight tile, grown on demand */
    uint64_t dropout_base; /* set_dropout_base */
    size_t scratch_len;
} cpu_backend;

/* A GPTQ linear: its packed arrays are copied into one owned block, so a caller's memory-mapped
 * file that shrinks after loading cannot fault the engine (SIGBUS) in a later step. */
struct ft_qlinear {
    const int32_t *qweight, *qzeros, *g_idx; /* in `packed` */
    const uint16_t *scales;                  /* IEEE half, in `packed` */
    void *packed;                            /* owned */
    float *bias;                             /* owned, NULL when absent */
    int in, out, bits, groups, zero_offset;
};

/* Row-major GEMMs, C = alpha * op(A) op(B) + beta * C, parallel over rows of C,
 * each element summed in a fixed order (deterministic for any thread count).
 *   nn: A[M,K]  B[K,N]      nt: A[M,K]  B[N,K]      tn: A[K,M]  B[K,N]  */
void cpu_gemm_nn(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C, int ldc);
void cpu_gemm_nt(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C, int ldc);
void cpu_gemm_tn(int M, int N, int K, float alpha, const float *A, int lda, const float *B,
                 int ldb, float beta, float *C, int ldc);

float *cpu_scratch(cpu_backend *be, size_t n, ft_error *err);

/* memory ops and lifetime (backend.c): the same in every instruction set's op table */
void cpu_destroy(ft_backend *be);
ft_status cpu_alloc(ft_backend *be, size_t bytes, void **ptr, ft_error *err);
void cpu_free(ft_backend *be, void *ptr);
ft_status cpu_copy(ft_backend *be, void *dst, const void *src, size_t bytes, ft_error *err);
ft_status cpu_zero(ft_backend *be, void *dst, size_t bytes, ft_error *err);
ft_status cpu_sync(ft_backend *be, ft_error *err);
ft_status cpu_set_dropout_base(ft_backend *be, uint64_t base, ft_error *err);
ft_status cpu_dense_create(ft_backend *be, const ft_host_tensor *src, void **dst, ft_error *err);

/* Dot product with 8 independent partial sums: vectorises without -ffast-math, and the
 * summation order is fixed (results do not depend on threads). */
static inline float cpu_dot(const float *restrict a, const float *restrict b, int n)
{
    float acc[8] = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[k + l] * b[k + l];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}


/* op implementations, by family */
ft_status cpu_qlinear_create(ft_backend *be, const ft_qlinear_desc *d, ft_qlinear **out, ft_error *err);
void cpu_qlinear_destroy(ft_backend *be, ft_qlinear *q);
ft_status cpu_qlinear_fwd(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N, ft_error *err);
ft_status cpu_qlinear_fwd_epi(ft_backend *be, void *y, const void *x, const ft_qlinear *q, int N,
                              const ft_epilogue *epi, ft_error *err);
ft_status cpu_qlinear_bwd(ft_backend *be, void *dx, const void *dy, const ft_qlinear *q, int N,
                          int accumulate, ft_error *err);
ft_status cpu_lora_fwd(ft_backend *be, void *y, float *xa, const void *x, const float *A, const float *B,
                       int N, int in, int out, int r, float scale, float p, uint64_t seed, ft_error *err);
ft_status cpu_lora_bwd(ft_backend *be, void *dx, float *dA, float *dB, const void *dy, const void *x,
                       const float *xa, const float *A, const float *B, int N, int in, int out, int r,
                       float scale, float p, uint64_t seed, ft_error *err);

ft_status cpu_embed(ft_backend *be, void *out, const int32_t *ids, const void *table, int N, int D,
                    ft_error *err);
ft_status cpu_layernorm_fwd(ft_backend *be, void *y, float *mean, float *rstd, const void *x,
                            const void *g, const void *b, int N, int D, float eps, ft_error *err);
ft_status cpu_layernorm_bwd(ft_backend *be, void *dx, const void *dy, const void *x, const float *mean,
                            const float *rstd, const void *g, int N, int D, ft_error *err);
ft_status cpu_gelu_fwd(ft_backend *be, void *y, const void *x, size_t n, ft_error *err);
ft_status cpu_gelu_bwd(ft_backend *be, void *dx, const void *dy, const void *x, size_t n, ft_error *err);
ft_status cpu_add(ft_backend *be, void *y, const void *a, const void *b, const void *c, size_t n,
                  ft_error *err);

ft_status cpu_qkv_split_fwd(ft_backend *be, void *q, void *k, void *v, const void *qkv,
                            const ft_qkv_args *a, ft_error *err);
ft_status cpu_qkv_split_bwd(ft_backend *be, void *dqkv, const void *dq, const void *dk, const void *dv,
                            const ft_qkv_args *a, ft_error *err);
ft_status cpu_attention_fwd(ft_backend *be, void *out, float *lse, const void *q, const void *k,
                            const void *v, const ft_attn_args *a, ft_error *err);
ft_status cpu_attention_bwd(ft_backend *be, void *dq, void *dk, void *dv, const void *dout,
                            const void *out, const float *lse, const void *q, const void *k,
                            const void *v, const ft_attn_args *a, ft_error *err);

ft_status cpu_lm_logits(ft_backend *be, float *logits, const void *h, const void *W, int n, int V, int D,
                        ft_error *err);
ft_status cpu_cross_entropy(ft_backend *be, float *logits, float *row_loss, const int32_t *target, int n,
                            int V, float grad_scale, ft_error *err);
ft_status cpu_lm_bwd(ft_backend *be, void *dh, const float *dlogits, const void *W, int n, int V, int D,
                     ft_error *err);
ft_status cpu_argmax_rows(ft_backend *be, const float *logits, int n, int V, int32_t *out, ft_error *err);

ft_status cpu_sumsq(ft_backend *be, const float *x, size_t n, double *out, ft_error *err);
ft_status cpu_adamw(ft_backend *be, float *p, const float *g, float *m, float *v, size_t n, float lr,
                    float beta1, float beta2, float eps, float wd, float gmul, float bc1, float bc2,
                    ft_error *err);
ft_status cpu_gather_rows(ft_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                          size_t row_bytes, ft_error *err);

/* op tables: the baseline kernels (backend.c) and, where built, a copy per instruction set */
extern const ft_backend_ops cpu_ops;
#ifdef FT_CPU_DISPATCH
extern const ft_backend_ops cpu_ops_avx2, cpu_ops_avx512;
#endif

#endif /* FT_CPU_H */
