/* gemv_emu.cpp -- csrc/cuda/gemv_kernels.cuh (the decode GEMV's two kernels) run under emu.h,
 * against a float64 reference.
 *
 * Every case draws fresh random packed weights, zeros, scales, x and bias, launches the kernel gemv.cu
 * would (qgemv_fold_kernel where gv_fold_ok, and then qgemv_kernel as well; qgemv_kernel alone
 * elsewhere) with its geometry (gv_plan, split-K ranges, the arrival counters), and compares y with
 * x . W + bias in float64, W dequantized as each kernel promises: pairs kernel, (q - z) times the
 * scale rounded once to the act type (2/4 bits: the scale rounded to bf16 first in bf16; 8 bits and
 * act-order in fp32); fold kernel, (q - z) times the f16 scale exactly (only y is rounded). Cases
 * cover 2, 4 and 8 bits, 1 to 8 rows, a split's partial last iteration (KW % 16 != 0), column tiles
 * cut by `out`, group lookups by shift and by g_idx, act-order, the bias, and x of large mean (the
 * fold's A0 sum x term then cancels most of its sum x A: its fp32 partials, read back from the split
 * scratch before y's rounding, must be within fold_ptol of float64); the counters must be back to
 * zero after each call. Every case runs twice: with the emulated mma summing in fp32, and summing as
 * lossily as tensor cores do (emu.h's emu_mma_truncate). Exit status 0 when every case passes.
 * Built and run by tests/test_cuda_emu.py.
 */
#include "emu.h"

#include "cuda/gemv_kernels.cuh"

#include <cstdio>
#include <cstdlib>
#include <random>

struct gv_spec {
    int N, in, out, bits, group; /* group: rows per group (-1: one group) */
    int act;                     /* 1: act-order (a random group per input row) */
    int by_gidx;                 /* 1: look groups up in g_idx even where a shift would do */
    int bias, zoff, sms;
    float xmean; /* x drawn from xmean + [-1, 1): a large mean makes sum x large against the result */
    int epi;     /* the epilogue (ft_epilogue): 0 none, 1 GELU, 2 add1 + add2, 3 add1; + 4: with a LoRA of rank 8 */
};

template <typename T> static float round_to(float v);
template <> float round_to<bf16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
template <> float round_to<f16>(float v) { return __half2float(__float2half_rn(v)); }

template <typename T> static T to_act(float v);
template <> bf16 to_act<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> f16 to_act<f16>(float v) { return __float2half_rn(v); }

template <typename T> static float act_to_float(T v);
template <> float act_to_float<bf16>(bf16 v) { return __bfloat162float(v); }
template <> float act_to_float<f16>(f16 v) { return __half2float(v); }

/* the group shift cuda_qgemv_prepare derives from g_idx (word rows of a group a power of 2), or -1 */
static int group_shift(const std::vector<int32_t> &gidx, int per, int KW, int groups)
{
    if (groups == 1) return 30;
    if (gidx[0] != 0) return -1;
    int wpg = 1;
    while (wpg < KW && gidx[(size_t)wpg * per] == 0) wpg++;
    if (wpg & (wpg - 1)) return -1;
    int sh = 0;
    while ((1 << sh) < wpg) sh++;
    for (int r = 0; r < KW; r++)
        if (gidx[(size_t)r * per] != (r >> sh)) return -1;
    return sh;
}

/* fold: run qgemv_fold_kernel (gemv.cu does where gv_fold_ok; 1 one register stage, 2 two), whose
 * weights are (q - z) s exactly: its fp32 partials must match float64 within fold_ptol */
constexpr double fold_ptol = 2e-5;

template <typename T, int BITS>
static int run_case(const gv_spec &c, uint64_t seed, const char *tname, double tol, int fold)
{
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
    const int per = 32 / BITS, KW = c.in / per, mask = (1 << BITS) - 1;
    const int gsize = c.group > 0 ? c.group : c.in, groups = (c.in + gsize - 1) / gsize;
    std::vector<int32_t> qw((size_t)KW * c.out), qz((size_t)groups * (c.out / per)), gidx(c.in);
    for (auto &w : qw) w = (int32_t)(uint32_t)rng();
    for (auto &z : qz) z = (int32_t)(uint32_t)rng();
    std::vector<f16> sc((size_t)groups * c.out);
    for (auto &s : sc) s = __float2half_rn((0.002f + 0.02f * (0.5f + 0.5f * uni(rng))) * (rng() & 1 ? 1.0f : -1.0f));
    for (int i = 0; i < c.in; i++) gidx[i] = c.act ? (int)(rng() % groups) : i / gsize;
    std::vector<T> x((size_t)c.N * c.in);
    for (auto &v : x) v = to_act<T>(c.xmean + uni(rng));
    std::vector<float> bias(c.out);
    for (auto &b : bias) b = uni(rng);
    std::vector<T> add1((size_t)c.N * c.out), add2((size_t)c.N * c.out);
    for (auto &v : add1) v = to_act<T>(uni(rng));
    for (auto &v : add2) v = to_act<T>(uni(rng));
    const int lora_r = c.epi >= 4 ? 8 : 0, post = c.epi % 4;
    const float lora_scale = 0.75f;
    std::vector<float> xa((size_t)c.N * 8), lB((size_t)c.out * 8);
    for (auto &v : xa) v = uni(rng);
    for (auto &v : lB) v = 0.2f * uni(rng);

    /* the reference: W as the kernel dequantizes it, then x . W + bias in float64 */
    const bool f32path = c.act || BITS == 8;
    std::vector<double> ref((size_t)c.N * c.out, 0.0);
    for (int i = 0; i < c.in; i++) {
        const int g = gidx[i], r = i / per, j = i % per;
        for (int o = 0; o < c.out; o++) {
            const int q = (int)(((uint32_t)qw[(size_t)r * c.out + o] >> (BITS * j)) & mask);
            const int z = (int)(((uint32_t)qz[(size_t)g * (c.out / per) + o / per] >> (BITS * (o % per))) & mask) + c.zoff;
            float s = __half2float(sc[(size_t)g * c.out + o]);
            if (!f32path && !fold) s = round_to<T>(s);
            const double w = fold ? (double)(q - z) * (double)s : (double)round_to<T>((float)(q - z) * s);
            for (int n = 0; n < c.N; n++) ref[(size_t)n * c.out + o] += (double)act_to_float<T>(x[(size_t)n * c.in + i]) * w;
        }
    }
    if (c.bias)
        for (int n = 0; n < c.N; n++)
            for (int o = 0; o < c.out; o++) ref[(size_t)n * c.out + o] += bias[o];
    /* the fp32 partials' check below is of the product alone: keep it before the epilogue */
    const std::vector<double> prod = ref;
    for (size_t e = 0; e < ref.size(); e++) {
        const size_t n = e / c.out, o = e % c.out;
        for (int k = 0; k < lora_r; k++) ref[e] += (double)lora_scale * xa[n * 8 + k] * lB[o * 8 + k];
        if (post == 1) ref[e] = 0.5 * ref[e] * (1.0 + std::erf(ref[e] / std::sqrt(2.0)));
        if (post >= 2) ref[e] += act_to_float<T>(add1[e]) + (post == 2 ? act_to_float<T>(add2[e]) : 0.0);
    }
    /* lora_A is only a flag to the kernel (xa is computed before its launch) */
    const ft_epilogue epi = {post == 1, post >= 2 ? (const void *)add1.data() : nullptr,
                             post == 2 ? (const void *)add2.data() : nullptr, lora_r ? lB.data() : nullptr,
                             lora_r ? lB.data() : nullptr, lora_r ? xa.data() : nullptr, lora_r, lora_scale};

    const gv_grid plan = gv_plan(c.in, c.out, BITS, c.sms);
    const int gshift = c.act || c.by_gidx ? -1 : group_shift(gidx, per, KW, groups);
    std::vector<float> part((size_t)plan.splits * c.N * c.out, -7.0f);
    std::vector<int> cnt(plan.tiles, 0);
    std::vector<T> y((size_t)c.N * c.out, to_act<T>(-7.0f));
    /* act-order: the kernel that looks up each row's group (gemv.cu: row_groups != 0) */
    if (fold)
        emu_launch(dim3(plan.tiles, plan.splits), dim3(GV_WARPS * 32),
                   fold == 2 ? qgemv_fold_kernel<T, BITS, true> : qgemv_fold_kernel<T, BITS, false>, y.data(),
                   (const T *)x.data(), (const int32_t *)qw.data(), (const int32_t *)qz.data(), (const f16 *)sc.data(),
                   (const float *)(c.bias ? bias.data() : nullptr), part.data(), cnt.data(), c.N, c.in, c.out, c.zoff,
                   gshift, plan.kc, epi);
    else
        emu_launch(dim3(plan.tiles, plan.splits), dim3(GV_WARPS * 32),
                   c.act ? qgemv_kernel<T, BITS, true> : qgemv_kernel<T, BITS, false>, y.data(), (const T *)x.data(),
                   (const int32_t *)qw.data(), (const int32_t *)qz.data(), (const f16 *)sc.data(),
                   (const int32_t *)gidx.data(), (const float *)(c.bias ? bias.data() : nullptr), part.data(),
                   cnt.data(), c.N, c.in, c.out, c.zoff, gshift, plan.kc, epi);
    double num = 0.0, den = 0.0, worst = 0.0;
    for (size_t e = 0; e < y.size(); e++) {
        const double d = act_to_float<T>(y[e]) - ref[e];
        num += d * d;
        den += ref[e] * ref[e];
        worst = std::max(worst, std::abs(d) / (std::abs(ref[e]) + 1e-2));
    }
    const double rel = std::sqrt(num / (den > 0.0 ? den : 1.0));
    /* the fp32 partials of the splits (still in `part`), summed in float64, before y's rounding to
     * the act dtype: for the fold kernel, whose weights are exact, this sees its summation alone */
    double pnum = 0.0;
    for (int n = 0; n < c.N; n++)
        for (int o = 0; o < c.out; o++) {
            double v = c.bias ? bias[o] : 0.0;
            for (int sp = 0; sp < plan.splits; sp++) v += part[((size_t)sp * c.N + n) * c.out + o];
            const double d = v - prod[(size_t)n * c.out + o];
            pnum += d * d;
        }
    double pden = 0.0;
    for (double v : prod) pden += v * v;
    const double prel = std::sqrt(pnum / (pden > 0.0 ? pden : 1.0));
    bool bad = !(rel <= tol) || (fold && !(prel <= fold_ptol));
    int stale = 0;
    for (int v : cnt) stale += v != 0;
    bad |= stale != 0;
    std::printf("%s %s %s N=%d in=%d out=%d bits=%d group=%d act=%d gidx=%d bias=%d xmean=%g epi=%d splits=%d kc=%d "
                "gshift=%d: rel %.2e, worst %.2e, fp32 partials rel %.2e, counters left %d\n",
                bad ? "FAIL" : "ok  ", tname, fold == 2 ? "fold2" : fold ? "fold " : "pairs", c.N, c.in, c.out, BITS,
                c.group, c.act, c.by_gidx, c.bias, (double)c.xmean, c.epi, plan.splits, plan.kc, c.act ? -1 : gshift, rel,
                worst, prel, stale);
    return bad ? 1 : 0;
}

/* Each case runs the kernel gemv.cu picks for it; where that is the fold kernel, both of its
 * variants and qgemv_kernel too (what FT_CUDA_GEMV_FOLD=0 runs). The fold kernel's weights are not
 * rounded to the act dtype: its tolerance is that of y's own rounding (ftol). */
template <typename T> static int run_bits(const gv_spec &c, uint64_t seed, const char *tname, double tol, double ftol)
{
    const int per = 32 / c.bits, KW = c.in / per, gsize = c.group > 0 ? c.group : c.in;
    const int groups = (c.in + gsize - 1) / gsize;
    std::vector<int32_t> gidx(c.in);
    for (int i = 0; i < c.in; i++) gidx[i] = i / gsize;
    const int gshift = c.act || c.by_gidx ? -1 : group_shift(gidx, per, KW, groups);
    const bool fold = gv_fold_ok(c.bits, c.act, gshift, groups, c.out);
    int failed = 0;
    for (int f = fold ? 2 : 0; f >= 0; f--) {
        const double t = f ? ftol : tol;
        if (c.bits == 2) failed += run_case<T, 2>(c, seed, tname, t, f);
        else if (c.bits == 8) failed += run_case<T, 8>(c, seed, tname, t, f);
        else failed += run_case<T, 4>(c, seed, tname, t, f);
    }
    return failed;
}

int main(int argc, char **argv)
{
    const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20261204u;
    const gv_spec cases[] = {
        /* N  in    out  bits group act gidx bias zoff sms xmean epi */
        {1, 512, 384, 4, 64, 0, 0, 1, 1, 2, 0.0f, 1},    /* decode: one row, 3 column tiles, 4 splits (fold) */
        {3, 704, 256, 4, 32, 0, 0, 0, 1, 1, 0.0f, 4},    /* KW = 88: the last split ends mid-iteration; g32: pairs */
        {3, 704, 256, 4, 64, 0, 0, 0, 1, 1, 0.0f, 2},    /* the same in groups of 64 (fold) */
        {8, 1024, 128, 2, 128, 0, 0, 1, 0, 2, 0.0f, 5},  /* 2 bits, 8 rows, zero offset 0 (fold) */
        {2, 1024, 128, 2, 64, 0, 0, 1, 1, 2, 0.0f, 2},   /* 2 bits in groups of 4 word rows: pairs */
        {2, 256, 256, 8, 64, 0, 0, 1, 1, 2, 0.0f, 3},    /* 8 bits: the fp32 path */
        {5, 512, 100, 4, 64, 0, 0, 1, 1, 1, 0.0f, 1},    /* out = 100: warps past the last column (fold) */
        {1, 512, 256, 4, 64, 0, 1, 0, 1, 2, 0.0f, 6},    /* groups looked up in g_idx */
        {4, 256, 128, 4, -1, 0, 0, 1, 1, 2, 0.0f, 7},    /* one group (Falcon-40B's checkpoints; fold) */
        {2, 512, 256, 4, 32, 1, 0, 1, 1, 2, 0.0f, 3},    /* act-order: a group per input row */
        {1, 4096, 128, 4, -1, 0, 0, 0, 1, 1, 2.0f, 0},   /* one group, one split, sum x ~ 8000: the fold's cancellation */
        {2, 2048, 256, 4, 128, 0, 0, 1, 1, 2, 1.5f, 2},  /* groups of 16 word rows, x of mean 1.5 (fold) */
    };
    const int exact = emu_run_cases(
        cases, seed, [](const gv_spec &c, uint64_t s) { return run_bits<f16>(c, s, "f16 ", 2e-3, 5e-4); },
        [](const gv_spec &c, uint64_t s) { return run_bits<bf16>(c, s, "bf16", 1e-2, 4e-3); });
    /* again with the mma's sums truncated as (at least as badly as) the tensor cores do: the fold
     * kernel's cancellation of A0 sum x must stay within the same tolerances */
    std::printf("-- mma sums truncated (emu_mma_truncate) --\n");
    emu_mma_truncate = true;
    const int truncated = emu_run_cases(
        cases, seed, [](const gv_spec &c, uint64_t s) { return run_bits<f16>(c, s, "f16 ", 2e-3, 5e-4); },
        [](const gv_spec &c, uint64_t s) { return run_bits<bf16>(c, s, "bf16", 1e-2, 4e-3); });
    return exact || truncated;
}
