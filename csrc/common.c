/* common.c -- errors, dtypes and half-precision conversions shared by the engine. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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

const char *ft_module_name(int mod)
{
    static const char *const names[FT_NMOD] = {"query_key_value", "dense", "dense_h_to_4h",
                                               "dense_4h_to_h"};
    return (mod >= 0 && mod < FT_NMOD) ? names[mod] : "?";
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
