/* backend.c -- the CPU backend: memory, weight conversion, the op table and the choice of kernel
 * copy (isa_kernels.h). Memory is host memory; "upload" and "download" are copies. */
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

ft_status cpu_alloc(ft_backend *be, size_t bytes, void **ptr, ft_error *err)
{
    (void)be;
    /* 64-byte alignment keeps vector loads aligned; round the size up as aligned_alloc wants. */
    size_t n = (bytes + 63) & ~(size_t)63;
    *ptr = aligned_alloc(64, n ? n : 64);
    if (!*ptr) return ft_fail(err, FT_ENOMEM, "out of host memory allocating %zu bytes", bytes);
    return FT_OK;
}

void cpu_free(ft_backend *be, void *ptr)
{
    (void)be;
    free(ptr);
}

ft_status cpu_copy(ft_backend *be, void *dst, const void *src, size_t bytes, ft_error *err)
{
    (void)be; (void)err;
    if (bytes) memmove(dst, src, bytes);
    return FT_OK;
}

ft_status cpu_zero(ft_backend *be, void *dst, size_t bytes, ft_error *err)
{
    (void)be; (void)err;
    if (bytes) memset(dst, 0, bytes);
    return FT_OK;
}

ft_status cpu_sync(ft_backend *be, ft_error *err)
{
    (void)be; (void)err;
    return FT_OK;
}

ft_status cpu_dense_create(ft_backend *be, const ft_host_tensor *src, void **dst, ft_error *err)
{
    size_t n = 1;
    for (int i = 0; i < src->ndim; i++) n *= (size_t)src->shape[i];
    ft_status st = cpu_alloc(be, n * sizeof(float), dst, err);
    if (st) return st;
    float *out = *dst;
    switch (src->dtype) {
    case FT_F32: memcpy(out, src->data, n * sizeof(float)); break;
    case FT_F16: {
        const uint16_t *h = src->data;
        for (size_t i = 0; i < n; i++) out[i] = ft_half_to_float(h[i]);
        break;
    }
    case FT_BF16: {
        const uint16_t *h = src->data;
        for (size_t i = 0; i < n; i++) out[i] = ft_bf16_to_float(h[i]);
        break;
    }
    default:
        cpu_free(be, *dst);
        *dst = NULL;
        return ft_fail(err, FT_EINVAL, "%s: expected float16, bfloat16 or float32, got %s",
                       src->name ? src->name : "tensor", ft_dtype_name(src->dtype));
    }
    return FT_OK;
}

float *cpu_scratch(cpu_backend *be, size_t n, ft_error *err)
{
    if (n > be->scratch_len) {
        free(be->scratch);
        be->scratch = NULL;
        be->scratch_len = 0;
        void *p = NULL;
        if (cpu_alloc(&be->base, n * sizeof(float), &p, err)) return NULL;
        be->scratch = p;
        be->scratch_len = n;
    }
    return be->scratch;
}

ft_status cpu_set_dropout_base(ft_backend *be, uint64_t base, ft_error *err)
{
    (void)err;
    ((cpu_backend *)be)->dropout_base = base;
    return FT_OK;
}

void cpu_destroy(ft_backend *base)
{
    cpu_backend *be = (cpu_backend *)base;
    free(be->scratch);
    free(be);
}

#define CPU_OPS_NAME cpu_ops
#define CPU_OPS_LABEL "cpu"
#include "ops_table.h"

/* The widest kernel copy this CPU runs (isa_*.c), or the one FT_CPU_ISA names: "baseline",
 * "avx2" or "avx512" (benchmarks and the tests that check the copies agree bit for bit). */
static ft_status pick_ops(const ft_backend_ops **ops, ft_error *err)
{
    const char *want = getenv("FT_CPU_ISA");
    if (want && !*want) want = NULL;
    *ops = &cpu_ops;
    if (want && strcmp(want, "baseline") && strcmp(want, "avx2") && strcmp(want, "avx512"))
        return ft_fail(err, FT_EINVAL, "FT_CPU_ISA must be 'baseline', 'avx2' or 'avx512', got '%s'", want);
    if (want && !strcmp(want, "baseline")) return FT_OK;
#ifdef FT_CPU_DISPATCH
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
    const int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                       __builtin_cpu_supports("avx512vl");
    if ((!want || !strcmp(want, "avx512")) && avx512) *ops = &cpu_ops_avx512;
    else if ((!want || !strcmp(want, "avx2")) && avx2) *ops = &cpu_ops_avx2;
    else if (want) return ft_fail(err, FT_EUNSUPPORTED, "FT_CPU_ISA=%s: this CPU does not have it", want);
    return FT_OK;
#else
    if (want) return ft_fail(err, FT_EUNSUPPORTED, "FT_CPU_ISA=%s: this build has only its own kernels", want);
    return FT_OK;
#endif
}

ft_status ft_cpu_backend_create(ft_backend **out, ft_error *err)
{
    const ft_backend_ops *ops;
    ft_status st = pick_ops(&ops, err);
    if (st) return st;
    cpu_backend *be = calloc(1, sizeof *be);
    if (!be) return ft_fail(err, FT_ENOMEM, "out of host memory creating the CPU backend");
    be->base.ops = ops;
    be->base.act_dtype = FT_F32;
    be->base.weight_dtype = FT_F32;
    *out = &be->base;
    return FT_OK;
}
