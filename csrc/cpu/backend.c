/* backend.c -- the CPU backend: memory, weight conversion and the op table.
 * Memory is host memory; "upload" and "download" are copies. */
#include <stdlib.h>
#include <string.h>

#include "cpu.h"

static ft_status cpu_alloc(ft_backend *be, size_t bytes, void **ptr, ft_error *err)
{
    (void)be;
    /* 64-byte alignment keeps vector loads aligned; round the size up as aligned_alloc wants. */
    size_t n = (bytes + 63) & ~(size_t)63;
    *ptr = aligned_alloc(64, n ? n : 64);
    if (!*ptr) return ft_fail(err, FT_ENOMEM, "out of host memory allocating %zu bytes", bytes);
    return FT_OK;
}

static void cpu_free(ft_backend *be, void *ptr)
{
    (void)be;
    free(ptr);
}

static ft_status cpu_copy(ft_backend *be, void *dst, const void *src, size_t bytes, ft_error *err)
{
    (void)be; (void)err;
    if (bytes) memmove(dst, src, bytes);
    return FT_OK;
}

static ft_status cpu_zero(ft_backend *be, void *dst, size_t bytes, ft_error *err)
{
    (void)be; (void)err;
    if (bytes) memset(dst, 0, bytes);
    return FT_OK;
}

static ft_status cpu_sync(ft_backend *be, ft_error *err)
{
    (void)be; (void)err;
    return FT_OK;
}

static ft_status cpu_dense_create(ft_backend *be, const ft_host_tensor *src, void **dst, ft_error *err)
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

static void cpu_destroy(ft_backend *base)
{
    cpu_backend *be = (cpu_backend *)base;
    free(be->scratch);
    free(be);
}

static const ft_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .zero = cpu_zero,
    .sync = cpu_sync,
    .dense_create = cpu_dense_create,
    .qlinear_create = cpu_qlinear_create,
    .qlinear_destroy = cpu_qlinear_destroy,
    .embed = cpu_embed,
    .layernorm_fwd = cpu_layernorm_fwd,
    .layernorm_bwd = cpu_layernorm_bwd,
    .gelu_fwd = cpu_gelu_fwd,
    .gelu_bwd = cpu_gelu_bwd,
    .add = cpu_add,
    .qlinear_fwd = cpu_qlinear_fwd,
    .qlinear_bwd = cpu_qlinear_bwd,
    .lora_fwd = cpu_lora_fwd,
    .lora_bwd = cpu_lora_bwd,
    .qkv_split_fwd = cpu_qkv_split_fwd,
    .qkv_split_bwd = cpu_qkv_split_bwd,
    .attention_fwd = cpu_attention_fwd,
    .attention_bwd = cpu_attention_bwd,
    .lm_logits = cpu_lm_logits,
    .cross_entropy = cpu_cross_entropy,
    .argmax_rows = cpu_argmax_rows,
    .lm_bwd = cpu_lm_bwd,
    .sumsq = cpu_sumsq,
    .adamw = cpu_adamw,
    .gather_rows = cpu_gather_rows,
};

ft_status ft_cpu_backend_create(ft_backend **out, ft_error *err)
{
    cpu_backend *be = calloc(1, sizeof *be);
    if (!be) return ft_fail(err, FT_ENOMEM, "out of host memory creating the CPU backend");
    be->base.ops = &cpu_ops;
    be->base.act_dtype = FT_F32;
    be->base.weight_dtype = FT_F32;
    *out = &be->base;
    return FT_OK;
}
