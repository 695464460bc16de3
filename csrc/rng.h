/* rng.h -- counter-based random numbers shared by every backend.
 *
 * Dropout masks are a pure function of (seed, element index), so the CPU and
 * CUDA backends draw the same mask, backward regenerates it instead of storing
 * it, and a resumed run continues the exact stream.
 */
#ifndef FT_RNG_H
#define FT_RNG_H

#include <stdint.h>

#if defined(__CUDACC__)
#define FT_HD __host__ __device__ __forceinline__
#else
#define FT_HD static inline
#endif

/* splitmix64 finaliser: a bijective 64-bit mix. */
FT_HD uint64_t ft_mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* 1 when element i survives dropout with drop probability p. */
FT_HD int ft_dropout_keep(uint64_t seed, uint64_t i, float p)
{
    if (p <= 0.0f) return 1;
    uint32_t u = (uint32_t)(ft_mix64(seed ^ ft_mix64(i)) >> 40); /* 24 random bits */
    return (float)u >= p * 16777216.0f;
}

#endif /* FT_RNG_H */
