/* common.c -- errors, dtypes and half-precision conversions shared by the engine. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "ft.h"

ft_status ft_fail(ft_error *err, ft_status status, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->status = status;
    }
    return status;
}

size_t ft_dtype_size(ft_dtype dt)
{
    switch (dt) {
    case FT_F32: case FT_I32: return 4;
    case FT_F16: case FT_BF16: return 2;
    }
    return 0;
}

const char *ft_dtype_name(ft_dtype dt)
{
    switch (dt) {
    case FT_F32: return "float32";
    case FT_F16: return "float16";
    case FT_BF16: return "bfloat16";
    case FT_I32: return "int32";
    }
    return "?";
}

/* The linears of a Falcon layer (ft.h). Every place that names a module or sizes one reads this
 * table: model.c and pymodule.c directly, Python through falcontune._C.MODULES (layout.py). */
static const ft_module_desc modules[] = {
    [FT_MOD_QKV] = {"query_key_value", "self_attention", FT_WIDTH_HIDDEN, FT_WIDTH_QKV},
    [FT_MOD_DENSE] = {"dense", "self_attention", FT_WIDTH_HIDDEN, FT_WIDTH_HIDDEN},
    [FT_MOD_H_TO_4H] = {"dense_h_to_4h", "mlp", FT_WIDTH_HIDDEN, FT_WIDTH_FFN},
    [FT_MOD_4H_TO_H] = {"dense_4h_to_h", "mlp", FT_WIDTH_FFN, FT_WIDTH_HIDDEN},
};
_Static_assert(sizeof modules / sizeof modules[0] == FT_NMOD, "one entry of `modules` per FT_MOD_* index");

const ft_module_desc *ft_module(int mod) { return mod >= 0 && mod < FT_NMOD ? &modules[mod] : NULL; }

const char *ft_module_name(int mod)
{
    const ft_module_desc *d = ft_module(mod);
    return d ? d->name : "?";
}

const char *ft_width_name(ft_width w)
{
    static const char *const names[] = {[FT_WIDTH_HIDDEN] = "hidden", [FT_WIDTH_FFN] = "ffn",
                                        [FT_WIDTH_QKV] = "qkv"};
    _Static_assert(sizeof names / sizeof names[0] == FT_NWIDTH, "one name per ft_width");
    return w >= 0 && w < FT_NWIDTH ? names[w] : "?";
}

static int positive_int(int64_t x) { return x > 0 && x <= INT32_MAX ? (int)x : -1; }

int ft_qkv_width(const ft_config *c)
{
    const int64_t hidden = c->hidden, hd = c->head_dim;
    switch (c->qkv_layout) {
    case FT_QKV_MULTI_QUERY: return positive_int(hidden + 2 * hd);                       /* q heads, 1 k, 1 v */
    case FT_QKV_GROUPED: return positive_int(((int64_t)c->n_head + 2 * (int64_t)c->n_kv_head) * hd);
    case FT_QKV_INTERLEAVED: return positive_int(3 * hidden);                            /* q, k, v per head */
    }
    return -1;
}

int ft_width_of(const ft_config *c, ft_width w)
{
    switch (w) {
    case FT_WIDTH_HIDDEN: return positive_int(c->hidden);
    case FT_WIDTH_FFN: return positive_int(c->ffn);
    case FT_WIDTH_QKV: return ft_qkv_width(c);
    case FT_NWIDTH: break;
    }
    return -1;
}

int ft_module_in(const ft_config *c, int mod)
{
    const ft_module_desc *d = ft_module(mod);
    return d ? ft_width_of(c, d->in) : -1;
}

int ft_module_out(const ft_config *c, int mod)
{
    const ft_module_desc *d = ft_module(mod);
    return d ? ft_width_of(c, d->out) : -1;
}

ft_status ft_parse_device(const char *device, int *cuda_index, ft_error *err)
{
    *cuda_index = -1;
    if (!device) return ft_fail(err, FT_EINVAL, "no device given");
    if (strcmp(device, "cpu") == 0) return FT_OK;
    if (strcmp(device, "cuda") == 0) {
        *cuda_index = 0;
        return FT_OK;
    }
    if (strncmp(device, "cuda:", 5) != 0)
        return ft_fail(err, FT_EINVAL, "unknown device '%s' (expected 'cpu', 'cuda' or 'cuda:N')", device);
    const char *p = device + 5;
    long long n = 0;
    if (!*p) return ft_fail(err, FT_EINVAL, "device '%s': no device number after 'cuda:'", device);
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return ft_fail(err, FT_EINVAL, "device '%s': the device number must be a non-negative decimal integer",
                           device);
        n = n * 10 + (*p - '0');
        if (n > INT32_MAX) return ft_fail(err, FT_EINVAL, "device '%s': device number out of range", device);
    }
    *cuda_index = (int)n;
    return FT_OK;
}

float ft_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: value = man * 2^-24 */
            float f = (float)man * 5.9604644775390625e-8f;
            return sign ? -f : f;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

float ft_bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef FT_WITH_CUDA
#include "backend.h"
int ft_have_cuda(void) { return 1; }
int ft_cuda_device_count(void) { return ft_cuda_count_devices(); }
int ft_cuda_device_memory(size_t *used, size_t *total) { return ft_cuda_mem_info(used, total); }
#else
int ft_have_cuda(void) { return 0; }
int ft_cuda_device_count(void) { return 0; }
int ft_cuda_device_memory(size_t *used, size_t *total)
{
    *used = *total = 0;
    return -1;
}
#endif

/* IEEE binary16, round to nearest even; overflow -> inf */
uint16_t ft_float_to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
    if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past the largest half */
    if (absx < 0x38800000u) {                                     /* subnormal or zero in half */
        float a;
        memcpy(&a, &absx, 4);
        /* value / 2^-24, rounded to nearest even by the FPU */
        float m = a * 16777216.0f;
        uint32_t r = (uint32_t)nearbyintf(m);
        return (uint16_t)(sign | r);
    }
    uint32_t mant = absx & 0x7fffffu;
    uint32_t exp = (absx >> 23) - 112u;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* The sums in the order the separate add op gives them (add1 + add2 + y: y aliases c, or b), so
 * that a step through this and one through the unfused ops agree bit for bit. */
ft_status ft_epilogue_by_ops(ft_backend *be, void *y, const void *x, int N, int in, int out, const ft_epilogue *epi,
                             ft_error *err)
{
    const ft_backend_ops *op = be->ops;
    const size_t n = (size_t)N * out;
    if (!epi || N <= 0) return FT_OK;
    ft_status st = FT_OK;
    if (epi->lora_A)
        st = op->lora_fwd(be, y, epi->lora_xa, x, epi->lora_A, epi->lora_B, N, in, out, epi->lora_r, epi->lora_scale,
                          0.0f, 0, err);
    if (!st && epi->gelu) st = op->gelu_fwd(be, y, y, n, err);
    if (!st && epi->add1)
        st = epi->add2 ? op->add(be, y, epi->add1, epi->add2, y, n, err) : op->add(be, y, epi->add1, y, NULL, n, err);
    return st;
}
