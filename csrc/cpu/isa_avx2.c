/* isa_avx2.c -- the CPU kernels for x86-64-v3 (AVX2, FMA, F16C, BMI), picked at run time. */
#define FT_CPU_ISA avx2
#define FT_CPU_ISA_TARGET "arch=x86-64-v3"
#define FT_CPU_ISA_LABEL "cpu-avx2"
#include "isa_kernels.h"
