/* gemm.c -- plain row-major float32 GEMMs for the reference backend.
 *
 * Each output element is produced by one thread with a fixed summation order,
 * so results do not depend on the number of OpenMP threads. The inner loops
 * are written so the compiler vectorises them (contiguous axpy / 8-lane dots).
 */
#include "cpu.h"

#define KBLK 256

static void scale_rows(int M, int N, float beta, float *C, int ldc)
{
    if (beta == 1.0f) return;
#pragma omp parallel for schedule(static) if ((long)M * N > 65536)
    for (int i = 0; i < M; i++) {
        float *c = C + (size_t)i * ldc;
        if (beta == 0.0f)
            for (int j = 0; j < N; j++) c[j] = 0.0f;
        else
            for (int j = 0; j < N; j++) c[j] *= beta;
    }
}

/* C[M,N] = alpha A[M,K] B[K,N] + beta C */
void cpu_gemm_nn(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc)
{
    scale_rows(M, N, beta, C, ldc);
    /* Parallel over rows of C; k blocked so a block of B rows stays in cache. */
    for (int k0 = 0; k0 < K; k0 += KBLK) {
        int k1 = k0 + KBLK < K ? k0 + KBLK : K;
#pragma omp parallel for schedule(static) if ((long)M * N * (k1 - k0) > 200000)
        for (int i = 0; i < M; i++) {
            float *restrict c = C + (size_t)i * ldc;
            const float *a = A + (size_t)i * lda;
            for (int k = k0; k < k1; k++) {
                float s = alpha * a[k];
                if (s == 0.0f) continue;
                const float *restrict b = B + (size_t)k * ldb;
                for (int j = 0; j < N; j++) c[j] += s * b[j];
            }
        }
    }
}

/* C[M,N] = alpha A[M,K] B[N,K]^T + beta C */
void cpu_gemm_nt(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc)
{
    long work = (long)M * N * K;
    if (M >= N) {
#pragma omp parallel for schedule(static) if (work > 200000)
        for (int i = 0; i < M; i++)
            for (int j = 0; j < N; j++) {
                float d = alpha * cpu_dot(A + (size_t)i * lda, B + (size_t)j * ldb, K);
                float *c = C + (size_t)i * ldc + j;
                *c = (beta == 0.0f ? 0.0f : beta * *c) + d;
            }
    } else {
#pragma omp parallel for schedule(static) if (work > 200000)
        for (int j = 0; j < N; j++)
            for (int i = 0; i < M; i++) {
                float d = alpha * cpu_dot(A + (size_t)i * lda, B + (size_t)j * ldb, K);
                float *c = C + (size_t)i * ldc + j;
                *c = (beta == 0.0f ? 0.0f : beta * *c) + d;
            }
    }
}

/* C[M,N] = alpha A[K,M]^T B[K,N] + beta C */
void cpu_gemm_tn(int M, int N, int K, float alpha, const float *A, int lda, const float *B, int ldb,
                 float beta, float *C, int ldc)
{
    scale_rows(M, N, beta, C, ldc);
#pragma omp parallel for schedule(static) if ((long)M * N * K > 200000)
    for (int i = 0; i < M; i++) {
        float *restrict c = C + (size_t)i * ldc;
        for (int k = 0; k < K; k++) {
            float s = alpha * A[(size_t)k * lda + i];
            if (s == 0.0f) continue;
            const float *restrict b = B + (size_t)k * ldb;
            for (int j = 0; j < N; j++) c[j] += s * b[j];
        }
    }
}
