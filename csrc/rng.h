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

#define FT_GOLDEN_GAMMA 0x9E3779B97F4A7C15ull /* splitmix64's increment: 2^64 / golden ratio */

/* splitmix64 finaliser: a bijective 64-bit mix. */
FT_HD uint64_t ft_mix64(uint64_t x)
{
    x += FT_GOLDEN_GAMMA;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Bit 0 (bit 1): element 2j (2j + 1) survives dropout with drop probability p. The pair shares
 * one output of the splitmix64 stream that starts at seed, ft_mix64(seed + j * gamma): its bits
 * 40..63 and 16..39 are the two elements' 24-bit uniforms. One 64-bit mix per two elements (two
 * per element before 2026-12: the hashing was most of a dropout kernel's time on a GPU). */
FT_HD unsigned ft_dropout_keep_pair(uint64_t seed, uint64_t j, float p)
{
    if (p <= 0.0f) return 3u;
    const uint64_t h = ft_mix64(seed + j * FT_GOLDEN_GAMMA);
    const float threshold = p * 16777216.0f;
    return (unsigned)((float)(uint32_t)(h >> 40) >= threshold) |
           (unsigned)((float)(uint32_t)((h >> 16) & 0xFFFFFFu) >= threshold) << 1;
}

/* 1 when element i survives dropout with drop probability p. */
FT_HD int ft_dropout_keep(uint64_t seed, uint64_t i, float p)
{
    return (int)(ft_dropout_keep_pair(seed, i >> 1, p) >> (i & 1)) & 1;
}

#endif /* FT_RNG_H */
