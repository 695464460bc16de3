/* isa_rename.h -- gives every CPU kernel an instruction-set suffix (FT_CPU_ISA), so that the
 * kernel sources compiled again by isa_*.c define cpu_gemm_nn_avx2 and so on beside the
 * baseline cpu_gemm_nn. A name does not expand inside its own expansion: each line below pastes
 * the plain name and the suffix. Every function the kernel files define or inline is listed
 * (static ones too), so that every function of those copies carries the suffix in the built
 * module: tests/test_build.py checks that AVX code lives in no other function. */
#ifndef FT_CPU_ISA_RENAME_H
#define FT_CPU_ISA_RENAME_H

#define FT_ISA_PASTE_(a, b) a##_##b
#define FT_ISA_PASTE(a, b) FT_ISA_PASTE_(a, b)
#define FT_ISA_NAME(f) FT_ISA_PASTE(f, FT_CPU_ISA)

#define cpu_gemm_nn FT_ISA_NAME(cpu_gemm_nn)
#define cpu_gemm_nt FT_ISA_NAME(cpu_gemm_nt)
#define cpu_gemm_tn FT_ISA_NAME(cpu_gemm_tn)
#define cpu_qlinear_create FT_ISA_NAME(cpu_qlinear_create)
#define cpu_qlinear_destroy FT_ISA_NAME(cpu_qlinear_destroy)
#define cpu_qlinear_fwd FT_ISA_NAME(cpu_qlinear_fwd)
#define cpu_qlinear_fwd_epi FT_ISA_NAME(cpu_qlinear_fwd_epi)
#define cpu_qlinear_bwd FT_ISA_NAME(cpu_qlinear_bwd)
#define cpu_lora_fwd FT_ISA_NAME(cpu_lora_fwd)
#define cpu_lora_bwd FT_ISA_NAME(cpu_lora_bwd)
#define cpu_embed FT_ISA_NAME(cpu_embed)
#define cpu_layernorm_fwd FT_ISA_NAME(cpu_layernorm_fwd)
#define cpu_layernorm_bwd FT_ISA_NAME(cpu_layernorm_bwd)
#define cpu_gelu_fwd FT_ISA_NAME(cpu_gelu_fwd)
#define cpu_gelu_bwd FT_ISA_NAME(cpu_gelu_bwd)
#define cpu_add FT_ISA_NAME(cpu_add)
#define cpu_qkv_split_fwd FT_ISA_NAME(cpu_qkv_split_fwd)
#define cpu_qkv_split_bwd FT_ISA_NAME(cpu_qkv_split_bwd)
#define cpu_attention_fwd FT_ISA_NAME(cpu_attention_fwd)
#define cpu_attention_bwd FT_ISA_NAME(cpu_attention_bwd)
#define cpu_lm_logits FT_ISA_NAME(cpu_lm_logits)
#define cpu_cross_entropy FT_ISA_NAME(cpu_cross_entropy)
#define cpu_argmax_rows FT_ISA_NAME(cpu_argmax_rows)
#define cpu_lm_bwd FT_ISA_NAME(cpu_lm_bwd)
#define cpu_sumsq FT_ISA_NAME(cpu_sumsq)
#define cpu_adamw FT_ISA_NAME(cpu_adamw)
#define cpu_gather_rows FT_ISA_NAME(cpu_gather_rows)
/* static functions of the kernel files, and the inline helpers of the headers they include */
#define scale_rows FT_ISA_NAME(scale_rows)
#define host_bytes FT_ISA_NAME(host_bytes)
#define dequantize FT_ISA_NAME(dequantize)
#define apply_dropout FT_ISA_NAME(apply_dropout)
#define rope_table FT_ISA_NAME(rope_table)
#define rope_apply FT_ISA_NAME(rope_apply)
#define view_of FT_ISA_NAME(view_of)
#define score FT_ISA_NAME(score)
#define cpu_dot FT_ISA_NAME(cpu_dot)
#define ft_unpack FT_ISA_NAME(ft_unpack)
#define ft_mix64 FT_ISA_NAME(ft_mix64)
#define ft_dropout_keep FT_ISA_NAME(ft_dropout_keep)
#define ft_dropout_keep_pair FT_ISA_NAME(ft_dropout_keep_pair)

#endif /* FT_CPU_ISA_RENAME_H */
