/* isa_avx512.c -- the CPU kernels for x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), picked at run time. */
#define FT_CPU_ISA avx512
#define FT_CPU_ISA_TARGET "arch=x86-64-v4"
#define FT_CPU_ISA_LABEL "cpu-avx512"
#include "isa_kernels.h"
