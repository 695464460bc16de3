/* isa.h -- whether this build carries instruction-set copies of the CPU kernels (isa_*.c).
 *
 * GCC on x86-64, unless the whole build already targets the compiling machine
 * (FALCONTUNE_NATIVE=1 defines FT_CPU_NATIVE): there the baseline kernels are the fast ones. */
#ifndef FT_CPU_ISA_H
#define FT_CPU_ISA_H
#if !defined(FT_CPU_NATIVE) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FT_CPU_DISPATCH 1
#endif
#endif /* FT_CPU_ISA_H */
