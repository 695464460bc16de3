/* attention_mma_emu.cpp -- csrc/cuda/attention_mma.cuh run under emu.h, against a float64 reference.
 *
 * Every case draws fresh random q, k, v, dout (rounded to the act type, so the reference sees the
 * kernels' inputs), segment ids with padding and packed examples, alibi or not, and checks out, lse,
 * then dq, dk, dv from am_dot / am_dq / am_dkv / am_split_sum with the launch geometry
 * attention_mma.cu uses (am_params, am_plan). Exit status 0 when every case passes.
 * Built and run by tests/test_cuda_emu.py.
 */
#include "emu.h"

#include "cuda/attention_mma.cuh"

#include <cstdio>
#include <cstdlib>
#include <random>

struct spec {
    int B, H, KV, T, past, extra_cap; /* Tk = past + T, cap = Tk + extra_cap */
    int segments;                     /* 0: 0/1 mask with left padding; n: n packed examples per row */
    int alibi;
    int sms;                          /* multiprocessors assumed for the split choice */
};

template <typename T> static float round_to(float x) { return unpack2<T>(pack2<T>(x, 0.0f)).x; }

template <typename T> static std::vector<uint16_t> to_act(const std::vector<float> &x)
{
    std::vector<uint16_t> o(x.size());
    for (size_t i = 0; i < x.size(); i++) o[i] = (uint16_t)(pack2<T>(x[i], 0.0f) & 0xffffu);
    return o;
}
template <typename T> static float from_act(uint16_t v) { return unpack2<T>((uint32_t)v).x; }

/* max |a - b| / max |b| over a tensor (the kernels round P, G and the outputs to the act type); the
 * denominator is at least 0.01, the inputs being of order 1: a gradient that is zero in exact
 * arithmetic (one visible key) comes out as rounding noise */
static double rel_err(const std::vector<double> &want, const std::vector<float> &got)
{
    double num = 0.0, den = 1e-2;
    for (size_t i = 0; i < want.size(); i++) {
        num = std::max(num, std::fabs(want[i] - (double)got[i]));
        den = std::max(den, std::fabs(want[i]));
    }
    return num / den;
}

template <typename T> static int run_case(const spec &c, uint64_t seed, const char *tname, double tol)
{
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const int hd = AM_HD, gs = c.H / c.KV, Tk = c.past + c.T, cap = Tk + c.extra_cap, kstride = cap + 3;
    const int training = c.past == 0 && c.extra_cap == 0;
    auto draw = [&](size_t n, float s) {
        std::vector<float> v(n);
        for (auto &x : v) x = round_to<T>(s * nd(rng));
        return v;
    };
    std::vector<float> q = draw((size_t)c.B * c.H * c.T * hd, 1.0f);
    std::vector<float> k = draw((size_t)c.B * c.KV * cap * hd, 1.0f);
    std::vector<float> v = draw((size_t)c.B * c.KV * cap * hd, 1.0f);
    std::vector<float> dout = draw((size_t)c.B * c.T * c.H * hd, 1.0f);
    /* segment ids: packed rows get c.segments examples of random lengths then padding; 0/1 masks get
     * left padding of a random length (a row may be all padding) */
    std::vector<int32_t> kmask((size_t)c.B * kstride, -7), kpos((size_t)c.B * kstride, -7);
    for (int b = 0; b < c.B; b++) {
        int32_t *m = &kmask[(size_t)b * kstride], *ps = &kpos[(size_t)b * kstride];
        if (c.segments == 0) {
            const int pad = (int)(rng() % (Tk / 2 + 2));
            for (int j = 0; j < Tk; j++) {
                m[j] = j >= pad;
                ps[j] = j >= pad ? j - pad : 0;
            }
        } else {
            int j = 0;
            for (int s = 1; s <= c.segments && j < Tk; s++) {
                const int len = 1 + (int)(rng() % (2 * Tk / c.segments + 1));
                for (int e = 0; e < len && j < Tk; e++, j++) {
                    m[j] = s;
                    ps[j] = e;
                }
            }
            for (; j < Tk; j++) m[j] = ps[j] = 0;
        }
    }
    std::vector<float> slopes(c.H);
    for (int h = 0; h < c.H; h++) slopes[h] = std::pow(2.0f, -8.0f * (h + 1) / c.H);
    const float scale = 1.0f / std::sqrt((float)hd);

    /* float64 reference: out, lse, and the gradients of sum(dout . out) */
    const size_t nq = (size_t)c.B * c.H * c.T;
    std::vector<double> ref_out(nq * hd, 0.0), ref_lse(nq), ref_dq(nq * hd, 0.0);
    std::vector<double> ref_dk((size_t)c.B * c.KV * c.T * hd, 0.0), ref_dv(ref_dk.size(), 0.0);
    std::vector<double> P(Tk);
    for (int b = 0; b < c.B; b++)
        for (int h = 0; h < c.H; h++)
            for (int t = 0; t < c.T; t++) {
                const int qp = Tk - c.T + t;
                const int32_t qseg = kmask[(size_t)b * kstride + qp];
                const float *qr = &q[(((size_t)b * c.H + h) * c.T + t) * hd];
                const float *kb = &k[((size_t)b * c.KV + h / gs) * cap * hd];
                const float *vb = &v[((size_t)b * c.KV + h / gs) * cap * hd];
                double mx = -INFINITY;
                for (int j = 0; j < Tk; j++) {
                    P[j] = -INFINITY;
                    if (j > qp || !ft_key_visible(kmask[(size_t)b * kstride + j], qseg)) continue;
                    double s = 0.0;
                    for (int d = 0; d < hd; d++) s += (double)qr[d] * kb[(size_t)j * hd + d];
                    if (c.alibi) s += (double)slopes[h] * kpos[(size_t)b * kstride + j];
                    P[j] = s * scale;
                    mx = std::max(mx, P[j]);
                }
                const size_t row = ((size_t)b * c.H + h) * c.T + t;
                double *o = &ref_out[row * hd];
                if (mx == -INFINITY) {
                    ref_lse[row] = -INFINITY;
                    continue;
                }
                double sum = 0.0;
                for (int j = 0; j < Tk; j++) sum += P[j] == -INFINITY ? 0.0 : std::exp(P[j] - mx);
                ref_lse[row] = mx + std::log(sum);
                for (int j = 0; j < Tk; j++) {
                    P[j] = P[j] == -INFINITY ? 0.0 : std::exp(P[j] - ref_lse[row]);
                    for (int d = 0; d < hd; d++) o[d] += P[j] * vb[(size_t)j * hd + d];
                }
                if (!training) continue;
                const float *dor = &dout[(((size_t)b * c.T + t) * c.H + h) * hd];
                double Dt = 0.0;
                for (int d = 0; d < hd; d++) Dt += (double)dor[d] * o[d];
                double *dkb = &ref_dk[((size_t)b * c.KV + h / gs) * c.T * hd];
                double *dvb = &ref_dv[((size_t)b * c.KV + h / gs) * c.T * hd];
                for (int j = 0; j < Tk; j++) {
                    if (P[j] == 0.0) continue;
                    double dp = 0.0;
                    for (int d = 0; d < hd; d++) dp += (double)dor[d] * vb[(size_t)j * hd + d];
                    const double ds = P[j] * (dp - Dt) * scale;
                    for (int d = 0; d < hd; d++) {
                        ref_dq[row * hd + d] += ds * kb[(size_t)j * hd + d];
                        dkb[(size_t)j * hd + d] += ds * qr[d];
                        dvb[(size_t)j * hd + d] += P[j] * dor[d];
                    }
                }
            }

    /* the kernels, launched as attention_mma.cu launches them */
    ft_attn_args a{};
    a.B = c.B;
    a.H = c.H;
    a.KV = c.KV;
    a.T = c.T;
    a.Tk = Tk;
    a.cap = cap;
    a.hd = hd;
    a.scale = scale;
    a.kstride = kstride;
    a.kmask = kmask.data();
    a.kpos = kpos.data();
    a.slopes = c.alibi ? slopes.data() : nullptr;
    am_p p = am_params(&a);
    const int items = c.B * c.KV;
    const am_grids grids = am_plan(&p, items, c.sms);
    std::vector<uint16_t> q16 = to_act<T>(q), k16 = to_act<T>(k), v16 = to_act<T>(v), do16 = to_act<T>(dout);
    std::vector<uint16_t> out16(nq * hd, 0x7e00u); /* NaN-ish poison: every element must be written */
    std::vector<float> lse(nq, 12345.0f);
    emu_launch(grids.rows, dim3(AM_THREADS), am_fwd_kernel<T>, (T *)out16.data(), lse.data(), (const T *)q16.data(),
               (const T *)k16.data(), (const T *)v16.data(), p);
    std::vector<float> out(nq * hd);
    for (size_t i = 0; i < out.size(); i++) out[i] = from_act<T>(out16[i]);
    /* out is [B, T, H hd]; the reference [B, H, T, hd]: compare in the reference's order */
    std::vector<float> out_bhtd(nq * hd);
    for (int b = 0; b < c.B; b++)
        for (int h = 0; h < c.H; h++)
            for (int t = 0; t < c.T; t++)
                for (int d = 0; d < hd; d++)
                    out_bhtd[(((size_t)b * c.H + h) * c.T + t) * hd + d] =
                        out[(((size_t)b * c.T + t) * c.H + h) * hd + d];
    int bad = 0;
    double lse_err = 0.0;
    for (size_t i = 0; i < nq; i++) {
        if (std::isinf(ref_lse[i]) || std::isinf(lse[i])) {
            if (!(std::isinf(ref_lse[i]) && std::isinf(lse[i]) && lse[i] < 0)) lse_err = INFINITY;
        } else {
            lse_err = std::max(lse_err, std::fabs(ref_lse[i] - lse[i]) / std::max(1.0, std::fabs(ref_lse[i])));
        }
    }
    const double e_out = rel_err(ref_out, out_bhtd);
    bad |= !(e_out <= tol) || !(lse_err <= 1e-4);
    double e_dq = 0, e_dk = 0, e_dv = 0;
    int hps = 0;
    if (training) {
        const int splits = grids.splits;
        const size_t nkv = (size_t)items * c.T * hd;
        /* one scratch laid out as the launcher lays it (am_bwd_scratch): D, then the partials */
        const am_scratch at = am_bwd_scratch(nq, splits, nkv);
        std::vector<float> scr(at.floats + 4, NAN);
        float *base = scr.data() + (16 - (uintptr_t)scr.data() % 16) % 16 / sizeof(float); /* as cudaMalloc: aligned */
        float *D = base, *dkp = base + at.dk, *dvp = base + at.dv;
        for (size_t i = 0; i < nq; i++) D[i] = 777.0f;
        if ((uintptr_t)dkp % 16 || (uintptr_t)dvp % 16) { /* am_dkv_kernel's float2 stores would fault */
            std::printf("FAIL scratch: partials not 16-byte aligned (nq %zu)\n", nq);
            bad = 1;
        }
        emu_launch(dim3((unsigned)((nq * AM_DOT_LANES + 255) / 256)), dim3(256), am_dot_kernel<T>, D,
                   (const T *)do16.data(), (const T *)out16.data(), p, items);
        std::vector<uint16_t> dq16(nq * hd, 0x7e00u);
        emu_launch(grids.rows, dim3(AM_THREADS), am_dq_kernel<T>, (T *)dq16.data(), (const T *)do16.data(),
                   (const float *)lse.data(), (const float *)D, (const T *)q16.data(), (const T *)k16.data(),
                   (const T *)v16.data(), p);
        hps = p.hps;
        emu_launch(grids.keys, dim3(AM_THREADS), am_dkv_kernel<T>, dkp,
                   dvp, (const T *)do16.data(), (const float *)lse.data(), (const float *)D,
                   (const T *)q16.data(), (const T *)k16.data(), (const T *)v16.data(), p);
        std::vector<uint16_t> dk16(nkv, 0x7e00u), dv16(nkv, 0x7e00u);
        const dim3 sg((unsigned)((nkv / 2 + 255) / 256));
        emu_launch(sg, dim3(256), am_split_sum_kernel<T>, (T *)dk16.data(), (const float *)dkp, splits, nkv);
        emu_launch(sg, dim3(256), am_split_sum_kernel<T>, (T *)dv16.data(), (const float *)dvp, splits, nkv);
        auto unact = [&](const std::vector<uint16_t> &x) {
            std::vector<float> f(x.size());
            for (size_t i = 0; i < x.size(); i++) f[i] = from_act<T>(x[i]);
            return f;
        };
        e_dq = rel_err(ref_dq, unact(dq16));
        e_dk = rel_err(ref_dk, unact(dk16));
        e_dv = rel_err(ref_dv, unact(dv16));
        bad |= !(e_dq <= 2 * tol) || !(e_dk <= 2 * tol) || !(e_dv <= 2 * tol);
    }
    std::printf("%s %s B=%d H=%d KV=%d T=%d past=%d cap+%d seg=%d alibi=%d hps=%d: out %.2e lse %.2e dq %.2e "
                "dk %.2e dv %.2e\n",
                bad ? "FAIL" : "ok  ", tname, c.B, c.H, c.KV, c.T, c.past, c.extra_cap, c.segments, c.alibi, hps,
                e_out, lse_err, e_dq, e_dk, e_dv);
    return bad;
}

/* The emulated ldmatrix against mma.cuh's fragment layout, with the address patterns of qgemm.cu
 * (whose GPU tests validate those patterns on hardware): on a 32 x 32 tile holding value 64 row + col,
 * the non-trans load of a row-major A gives a0..a3 (a0 = A[g][2t..], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
 * a3 = A[g+8][2t+8..]) and the trans load of a tile[k][n] gives b0 = B[2t..][g], b1 = B[2t+8..][g] of two
 * n tiles. Mismatching registers are counted in ldsm_layout_kernel_bad. */
static int ldsm_layout_kernel_bad;
static void ldsm_layout_kernel(const uint16_t *tile, int ld)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto want = [&](int r, int c) { return (uint32_t)(64 * r + c) | (uint32_t)(64 * r + c + 1) << 16; };
    auto want_t = [&](int k, int n) { return (uint32_t)(64 * k + n) | (uint32_t)(64 * (k + 1) + n) << 16; };
    uint32_t a[4], b[4];
    ldsm_x4(a, tile + (lane & 15) * ld + (lane >> 4) * 8);
    const uint32_t wa[4] = {want(g, 2 * t), want(g + 8, 2 * t), want(g, 2 * t + 8), want(g + 8, 2 * t + 8)};
    ldsm_x4_trans(b, tile + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8);
    const uint32_t wb[4] = {want_t(2 * t, g), want_t(2 * t + 8, g), want_t(2 * t, g + 8), want_t(2 * t + 8, g + 8)};
    for (int i = 0; i < 4; i++) ldsm_layout_kernel_bad += (a[i] != wa[i]) + (b[i] != wb[i]);
}

int main(int argc, char **argv)
{
    {
        std::vector<uint16_t> tile(32 * 40);
        for (int r = 0; r < 32; r++)
            for (int c = 0; c < 40; c++) tile[r * 40 + c] = (uint16_t)(64 * r + c);
        emu_launch(dim3(1), dim3(32), ldsm_layout_kernel, (const uint16_t *)tile.data(), 40);
        std::printf("%s ldmatrix layout: %d register(s) off\n", ldsm_layout_kernel_bad ? "FAIL" : "ok  ",
                    ldsm_layout_kernel_bad);
        if (ldsm_layout_kernel_bad) return 1;
    }
    const uint64_t seed = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 20261204u;
    const spec cases[] = {
        /* B  H  KV  T  past cap seg alibi sms */
        {1, 1, 1, 64, 0, 0, 0, 0, 132},   /* one tile */
        {2, 3, 1, 37, 0, 0, 0, 1, 132},   /* rows of 3 heads span blocks, left padding, alibi */
        {1, 4, 2, 100, 0, 0, 3, 0, 2},    /* two kv heads, packed examples, T over two tiles, few SMs */
        {2, 6, 1, 130, 0, 0, 2, 1, 1},    /* three key tiles, packed + alibi, all 6 heads in one split */
        {1, 8, 1, 70, 0, 0, 0, 1, 2},     /* splits of 2 heads */
        {1, 2, 1, 1, 0, 0, 0, 0, 132},    /* one query */
        {1, 2, 1, 5, 70, 9, 0, 1, 132},   /* prefill after a cache: Tk > T, cap > Tk (forward only) */
        {2, 4, 4, 48, 0, 0, 1, 0, 132},   /* one query head per kv head */
        {1, 71, 1, 77, 0, 0, 2, 0, 8},    /* Falcon-7B's 71 heads per kv head: 15 splits of 5 heads, the last of 1 */
    };
    return emu_run_cases(
        cases, seed, [](const spec &c, uint64_t s) { return run_case<f16>(c, s, "f16 ", 4e-3); },
        [](const spec &c, uint64_t s) { return run_case<bf16>(c, s, "bf16", 3e-2); });
}
