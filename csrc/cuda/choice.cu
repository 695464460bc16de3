/* choice.cu -- which kernel runs, decided in one place per choice.
 *
 * Three things live here and nowhere else:
 *   1. the settings: every FT_CUDA_* environment variable, read once by cuda_read_env when the
 *      backend is created (an op never calls getenv: a decode step runs ~400 of them);
 *   2. what this build can run on this device: cuda_probe_kernels asks the runtime which PTX
 *      architecture each family of kernels was compiled from. A FALCONTUNE_CUDA_ARCH=75 build
 *      JIT-compiles sm_75 PTX on an sm_90 card: the device's compute capability says 9.0 while
 *      the sm_80 mma instructions are not in the code, so the choice goes by the PTX;
 *   3. the choices: qgemm_choose (quantized products, with the GEMV and the fused kernel's
 *      conditions), attn_choose (attention, with the decode kernel's conditions). Each returns an
 *      enum of cuda.cuh and counts the answer, and why a special kernel was not taken; the
 *      profiler (FT_CUDA_PROFILE=1) prints the counts when the backend is destroyed.
 *
 * The kernels themselves trust the answer: they do not re-check their conditions.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda.cuh"
#include "gemv_kernels.cuh" /* gv_fold_ok, shared with the kernel's emulator test */

/* ---- names (the profiler's table and error messages) ---- */

static const char *const qgemm_names[QGEMM_N] = {"scratch", "scratch_t", "fused", "gemv"};
static const char *const qfused_names[QF_N] = {"ok", "bits (3 bits)", "shape (K % 8, or N too large)",
                                               "alignment", "arch (built without bf16 mma)"};
static const char *const gemv_names[GEMV_N] = {"ok", "off (FT_CUDA_GEMV=0)", "rows (N > 8)", "bits (3 bits)",
                                               "shape", "alignment", "arch (built without bf16 mma)"};
static const char *const gemv_kernel_names[GVK_N] = {"fold", "fold, two stages", "pairs: off (FT_CUDA_GEMV_FOLD=0)",
                                                     "pairs: 8 bits",
                                                     "pairs: groups (act-order, by g_idx, or < 8 word rows)"};
static const char *const qlinear_epi_names[QE_N] = {"gemv reduction", "separate ops: off (FT_CUDA_GEMV_EPILOGUE=0)",
                                                    "separate ops: not the GEMV", "separate ops: alignment",
                                                    "separate ops: LoRA rank > 64"};
static const char *const attn_names[ATTN_N] = {"gemm", "flash", "decode", "mma"};
static const char *const attn_mma_names[AMM_N] = {"ok", "head (hd != 64 or H % KV)",
                                                  "shape (> 65535 items, or backward with a cache)", "alignment",
                                                  "arch (built without bf16 mma)"};
static const char *const attn_decode_names[AD_N] = {"ok", "off (FT_CUDA_ATTN_DECODE=0)", "rows (T != 1)",
                                                    "head (hd % 16, hd > 128 or H % KV)", "alignment",
                                                    "size (no rows, or > 65535 key splits)"};

static const struct {
    const char *title;
    int n;
    const char *const *names;
} choice_tables[CH_N] = {
    {"qlinear fwd kernel", QGEMM_N, qgemm_names},
    {"qlinear bwd kernel", QGEMM_N, qgemm_names},
    {"fused qgemm usable", QF_N, qfused_names},
    {"gemv usable", GEMV_N, gemv_names},
    {"gemv kernel", GVK_N, gemv_kernel_names},
    {"qlinear epilogue kernel", QE_N, qlinear_epi_names},
    {"attention fwd kernel", ATTN_N, attn_names},
    {"attention bwd kernel", ATTN_N, attn_names},
    {"decode attention usable", AD_N, attn_decode_names},
    {"mma attention usable", AMM_N, attn_mma_names},
};

static int note(cuda_backend *be, int ch, int v)
{
    be->choice_calls[ch][v]++;
    return v;
}

void choice_report(const cuda_backend *be)
{
    fprintf(stderr, "ft cuda kernel choices (calls; profiled ms of the op where timed):\n");
    for (int ch = 0; ch < CH_N; ch++) {
        long tot = 0;
        for (int v = 0; v < choice_tables[ch].n; v++) tot += be->choice_calls[ch][v];
        if (!tot) continue;
        fprintf(stderr, "  %s:", choice_tables[ch].title);
        for (int v = 0; v < choice_tables[ch].n; v++) {
            if (!be->choice_calls[ch][v]) continue;
            fprintf(stderr, " %s %ld", choice_tables[ch].names[v], be->choice_calls[ch][v]);
            if (be->choice_s[ch][v] > 0) fprintf(stderr, " (%.3f ms)", 1e3 * be->choice_s[ch][v]);
            fprintf(stderr, ";");
        }
        fprintf(stderr, "\n");
    }
}

/* ---- 1. settings ---- */

/* unset or empty: dflt; "0": 0; anything else: 1 */
static int env_on(const char *name, int dflt)
{
    const char *e = getenv(name);
    if (!e || !e[0]) return dflt;
    return strcmp(e, "0") != 0;
}

ft_status cuda_read_env(cuda_backend *be, ft_error *err)
{
    /* attention: FT_CUDA_ATTN=mma (default: tensor-core flash kernels where attn_mma_check allows,
     * else gemm), gemm (cuBLAS tensor cores over score chunks) or flash (scalar) */
    const char *ae = getenv("FT_CUDA_ATTN");
    be->attn_pref = ATTN_MMA;
    if (ae && ae[0]) {
        if (!strcmp(ae, "flash")) be->attn_pref = ATTN_FLASH;
        else if (!strcmp(ae, "mma")) be->attn_pref = ATTN_MMA;
        else if (strcmp(ae, "gemm") != 0)
            return ft_fail(err, FT_EINVAL, "FT_CUDA_ATTN must be 'gemm', 'flash' or 'mma', got '%s'", ae);
    }
    /* f32 score scratch of one attention chunk, MiB (fractions allowed: tests force small chunks) */
    const char *ce = getenv("FT_CUDA_ATTN_CHUNK_MB");
    const double chunk_mb = ce && ce[0] ? strtod(ce, NULL) : 64.0;
    if (!(chunk_mb > 0.0 && chunk_mb <= 65536.0))
        return ft_fail(err, FT_EINVAL, "FT_CUDA_ATTN_CHUNK_MB must be in (0, 65536], got '%s'", ce);
    be->attn_chunk_bytes = (size_t)(chunk_mb * 1048576.0);
    /* quantized products: auto (qgemm_auto_rules below) or one variant for A/B tests */
    const char *qe = getenv("FT_CUDA_QGEMM");
    be->qgemm_force = -1;
    if (qe && qe[0] && strcmp(qe, "auto") != 0) {
        for (int k = 0; k < QGEMM_N; k++)
            if (k != QGEMM_GEMV && !strcmp(qe, qgemm_names[k])) be->qgemm_force = k;
        if (be->qgemm_force < 0)
            return ft_fail(err, FT_EINVAL, "FT_CUDA_QGEMM must be 'auto', 'scratch', 'scratch_t' or 'fused', got '%s'",
                           qe);
    }
    be->gemv_on = env_on("FT_CUDA_GEMV", 1);
    be->gemv_epi_on = env_on("FT_CUDA_GEMV_EPILOGUE", 1);
    /* the GEMV's fold kernel: 0 off (default until a GPU has measured it against the pairs kernel,
     * docs/PERF.md's decode section), 1 one register stage, 2 two */
    const char *fe = getenv("FT_CUDA_GEMV_FOLD");
    be->gemv_fold = 0;
    if (fe && fe[0]) {
        if (strcmp(fe, "0") && strcmp(fe, "1") && strcmp(fe, "2"))
            return ft_fail(err, FT_EINVAL, "FT_CUDA_GEMV_FOLD must be 0, 1 or 2, got '%s'", fe);
        be->gemv_fold = fe[0] - '0';
    }
    be->attn_decode_on = env_on("FT_CUDA_ATTN_DECODE", 1);
    be->graphs_on = env_on("FT_CUDA_GRAPHS", 1);
    const char *pe = getenv("FT_CUDA_PROFILE");
    be->prof_on = pe && pe[0] == '1';
    if (be->prof_on) be->graphs_on = 0; /* the profiler synchronises around ops: not capturable */
    const char *po = getenv("FT_CUDA_POISON");
    be->poison = po && po[0] == '1';
    const char *ml = getenv("FT_CUDA_MEM_LIMIT_MB");
    if (ml && ml[0]) {
        char *end = NULL;
        const double mb = strtod(ml, &end);
        if (!(end && *end == '\0' && mb > 0.0 && mb < 1e9))
            return ft_fail(err, FT_EINVAL, "FT_CUDA_MEM_LIMIT_MB must be a positive number of MiB, got '%s'", ml);
        be->mem_limit = (size_t)(mb * 1048576.0);
    }
    return FT_OK;
}

/* ---- 2. what the build can run ---- */

void cuda_probe_kernels(cuda_backend *be)
{
    be->gemv_ptx = cuda_qgemv_ptx();
    be->qgemm_ptx = cuda_qgemm_ptx();
    be->attn_mma_ptx = cuda_attention_mma_ptx();
}

/* ---- 3. the choices ---- */

/* The GEMV (gemv.cu) reads x rows with 16-byte vectors (8 bytes at 8 bits) and writes y in 8-byte
 * pairs of column pairs; its bf16 mma needs sm_80 code, fp16 runs sm_75's m16n8k8 (mma.cuh). */
static gemv_why gemv_check(const cuda_backend *be, const ft_qlinear *q, int N, const void *x, const void *y)
{
    if (N < 1 || N > 8) return GEMV_ROWS;
    if (!be->gemv_on) return GEMV_OFF;
    if (!q->gemv_cnt) return GEMV_BITS;
    const int per = 32 / q->bits;
    const size_t xalign = q->bits == 8 ? 8 : 16;
    if (q->out % 4 || q->in % per || ((size_t)q->in * 2) % xalign) return GEMV_SHAPE;
    if ((uintptr_t)x % xalign || (uintptr_t)y % 8) return GEMV_ALIGN;
    if (be->gemv_ptx < (be->base.act_dtype == FT_BF16 ? 80 : 75)) return GEMV_ARCH; /* mma.cuh */
    return GEMV_OK;
}

/* The fused kernel (qgemm.cu): 2/4/8 bits (the group layout of cuda_qgemv_prepare), A rows copied
 * in 16-byte pieces (K % 8 == 0, A 16-byte aligned), C written in pairs (4-byte aligned), at most
 * 65535 row tiles of 64; bf16 mma needs sm_80 code, fp16 runs sm_75's m16n8k8. */
static qfused_why qfused_check(const cuda_backend *be, const ft_qlinear *q, int N, qgemm_dir dir, const void *a,
                               const void *c)
{
    if (!q->gemv_cnt) return QF_BITS;
    const int K = dir == QGEMM_FWD ? q->in : q->out;
    if (K % 8 || N > 65535 * 64) return QF_SHAPE;
    if ((uintptr_t)a % 16 || (uintptr_t)c % 4) return QF_ALIGN;
    if (be->qgemm_ptx < (be->base.act_dtype == FT_BF16 ? 80 : 75)) return QF_ARCH;
    return QF_OK;
}

/* FT_CUDA_QGEMM=auto: the first row whose min_sm <= the device's decides. Products of at most
 * fused_rows rows run the fused kernel, larger ones `large` (the scratch path: dequantize, cuBLAS).
 * Measured on an H200 (2026-12-04, bench/device_perf.sh, Falcon-7B shapes, tok/s at mb 1/4/16):
 * scratch 6,000 / 12,020 / 14,796; scratch_t 4,636 / 10,478 / 14,250 (its transposed dequantization
 * costs 2x the plain one and the "TN" product gained nothing); fused 2,407 / 3,742 / 5,228 (the
 * mma.sync kernel runs ~350 us per 7B product at 256 rows, ~27 TFLOP/s). So no row picks fused or
 * scratch_t until a faster kernel is measured; on sm_75..89 the same rule holds by projection (the
 * fused kernel would need >= ~40% of cuBLAS's rate to pay back the copy's bytes on a T4). The
 * variants stay for A/B tests (FT_CUDA_QGEMM=fused|scratch_t). */
static const struct {
    int min_sm;
    int fused_rows; /* 0: never fused */
    qgemm_kind large;
} qgemm_auto_rules[] = {
    {90, 0, QGEMM_SCRATCH}, /* Hopper */
    {80, 0, QGEMM_SCRATCH}, /* Ampere, Ada */
    {75, 0, QGEMM_SCRATCH}, /* Turing (the tutorial's T4) */
};

static qgemm_kind qgemm_auto(const cuda_backend *be, int N)
{
    for (size_t i = 0; i < sizeof qgemm_auto_rules / sizeof qgemm_auto_rules[0]; i++)
        if (be->sm >= qgemm_auto_rules[i].min_sm)
            return N <= qgemm_auto_rules[i].fused_rows ? QGEMM_FUSED : qgemm_auto_rules[i].large;
    return QGEMM_SCRATCH;
}

qgemm_kind qgemm_choose(cuda_backend *be, const ft_qlinear *q, int N, qgemm_dir dir, const void *a, const void *c)
{
    const int ch = dir == QGEMM_FWD ? CH_QGEMM_FWD : CH_QGEMM_BWD;
    if (dir == QGEMM_FWD && note(be, CH_GEMV, gemv_check(be, q, N, a, c)) == GEMV_OK)
        return (qgemm_kind)note(be, ch, QGEMM_GEMV);
    const qfused_why f = (qfused_why)note(be, CH_QFUSED, qfused_check(be, q, N, dir, a, c));
    qgemm_kind k = be->qgemm_force >= 0 ? (qgemm_kind)be->qgemm_force : qgemm_auto(be, N);
    if (k == QGEMM_FUSED && f != QF_OK) k = QGEMM_SCRATCH_T; /* counted above under "fused qgemm usable" */
    if (dir == QGEMM_BWD && k == QGEMM_SCRATCH_T) k = QGEMM_SCRATCH; /* its [in, out] scratch is "TN" */
    return (qgemm_kind)note(be, ch, k);
}

/* The GEMV's two kernels (gemv_kernels.cuh): the fold kernel where its group layout allows (2/4
 * bits, groups by shift of >= 8 word rows), qgemv_kernel for the rest and when FT_CUDA_GEMV_FOLD=0. */
gemv_kernel_why gemv_kernel_choose(cuda_backend *be, const ft_qlinear *q)
{
    gemv_kernel_why k = be->gemv_fold == 2 ? GVK_FOLD_PIPE : GVK_FOLD;
    if (!be->gemv_fold) k = GVK_OFF;
    else if (q->bits != 2 && q->bits != 4) k = GVK_BITS;
    else if (!gv_fold_ok(q->bits, q->row_groups, q->gemv_gshift, q->groups, q->out)) k = GVK_GROUPS;
    return (gemv_kernel_why)note(be, CH_GEMV_KERNEL, k);
}

/* qlinear_fwd_epi's LoRA up-projection, GELU and residual add: in the GEMV's reduction, whose residual
 * loads are 8 bytes (4 act values) wide and whose LoRA loop runs over the rank per column; after any
 * other kernel, the LoRA and elementwise ops (qmatmul.cu). */
qlinear_epi_why qlinear_epi_choose(cuda_backend *be, qgemm_kind kind, const ft_epilogue *epi)
{
    qlinear_epi_why k = QE_GEMV;
    if (!be->gemv_epi_on) k = QE_OFF;
    else if (kind != QGEMM_GEMV) k = QE_KERNEL;
    else if (((uintptr_t)epi->add1 | (uintptr_t)epi->add2) % 8) k = QE_ALIGN;
    else if (epi->lora_A && epi->lora_r > GV_LORA_MAX_R) k = QE_RANK;
    return (qlinear_epi_why)note(be, CH_QLINEAR_EPI, k);
}

/* The decode kernel (attention_decode.cu): one query per row, head dims that are a multiple of 8 up
 * to AD_HD (16-byte rows in shared memory), whole query groups per kv head, 16-byte aligned K and V,
 * the key splits in gridDim.y. */
static attn_decode_why attn_decode_check(const cuda_backend *be, const ft_attn_args *a, const void *k,
                                         const void *v)
{
    if (a->T != 1) return AD_ROWS;
    if (!be->attn_decode_on) return AD_OFF;
    if (a->hd % 16 || a->hd > AD_HD || a->H % a->KV) return AD_HEAD;
    if (((uintptr_t)k | (uintptr_t)v) % 16) return AD_ALIGN;
    const int splits = attn_decode_splits(a);
    if (a->B * a->H <= 0 || splits <= 0 || splits > 65535) return AD_SIZE;
    return AD_OK;
}

/* The tensor-core flash kernels (attention_mma.cuh): head dim 64 (16-byte fragment and tile loads of
 * 128-byte rows), whole query groups per kv head, items in gridDim.y, backward only for the training
 * shape; bf16 mma needs sm_80 code, fp16 runs sm_75's m16n8k8. */
static attn_mma_why attn_mma_check(const cuda_backend *be, const ft_attn_args *a, uintptr_t addr_bits, int backward)
{
    if (a->hd != 64 || a->KV <= 0 || a->H % a->KV) return AMM_HEAD;
    if ((long)a->B * a->KV > 65535 || (backward && (a->Tk != a->T || a->cap != a->T))) return AMM_SHAPE;
    if (addr_bits % 16) return AMM_ALIGN;
    if (be->attn_mma_ptx < (be->base.act_dtype == FT_BF16 ? 80 : 75)) return AMM_ARCH;
    return AMM_OK;
}

attn_kind attn_choose(cuda_backend *be, const ft_attn_args *a, const void *k, const void *v, uintptr_t others,
                      int backward)
{
    if (!backward && note(be, CH_ATTN_DECODE, attn_decode_check(be, a, k, v)) == AD_OK)
        return (attn_kind)note(be, CH_ATTN_FWD, ATTN_DECODE);
    attn_kind kind = be->attn_pref;
    if (kind == ATTN_MMA &&
        note(be, CH_ATTN_MMA, attn_mma_check(be, a, (uintptr_t)k | (uintptr_t)v | others, backward)) != AMM_OK)
        kind = ATTN_GEMM;
    return (attn_kind)note(be, backward ? CH_ATTN_BWD : CH_ATTN_FWD, kind);
}
