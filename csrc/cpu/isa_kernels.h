/* isa_kernels.h -- the CPU kernels compiled once more for one instruction set (isa_avx2.c,
 * isa_avx512.c define FT_CPU_ISA, FT_CPU_ISA_TARGET and FT_CPU_ISA_LABEL, then include this).
 *
 * The default build targets the x86-64 baseline (SSE2), so a wheel runs on any x86-64 CPU;
 * backend.c picks the widest of these copies the CPU supports when a model is created. A pragma,
 * not a target_clones attribute, sets the instruction set: it also covers the functions GCC
 * outlines for OpenMP regions, where the hot loops are. Results are bit-identical across copies:
 * ISO C mode (-std=c11) contracts no a*b+c into FMA, and every reduction has a fixed order that
 * vectorisation does not change (cpu_dot's eight lanes, sequential double sums).
 */
#include "isa.h"
#if defined(FT_CPU_DISPATCH)

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* #pragma does not expand macros: _Pragma over a string built after expansion does */
#define FT_ISA_PRAGMA_(x) _Pragma(#x)
#define FT_ISA_TARGET_PRAGMA(t) FT_ISA_PRAGMA_(GCC target(t))
#pragma GCC push_options
FT_ISA_TARGET_PRAGMA(FT_CPU_ISA_TARGET)

#include "isa_rename.h"

#include "attention.c"
#include "gemm.c"
#include "loss.c"
#include "norm_act.c"
#include "optim.c"
#include "qmatmul.c"

#define CPU_OPS_NAME FT_ISA_NAME(cpu_ops)
#define CPU_OPS_LABEL FT_CPU_ISA_LABEL
#include "ops_table.h"

#pragma GCC pop_options

#else
typedef int ft_cpu_isa_not_built; /* an ISO C translation unit may not be empty */
#endif
