/* qgemm.cu -- quantized GEMM that never writes a dequantized copy (QGEMM_FUSED of choice.cu).
 *
 *   forward          C[M, out] = A[M, in] W + bias            A = x,  K = in   (packed along K)
 *   input gradient   C[M, in] (=, +=) A[M, out] W^T            A = dy, K = out  (packed along C's columns)
 *
 * W[i, o] = (q[i, o] - (z[g, o] + zero_offset)) * scale[g, o], g = g_idx[i] (csrc/cpu/qmatmul.c); a
 * packed int32 word holds 32/bits values of consecutive i: qweight[i / per, o].
 *
 * Block tile BM x 128 columns of C, K in steps of 32, 8 warps in 2 x 4: each warp owns a
 * (BM/2) x 32 piece of C as m16n8k16 tiles (mma.cuh; sm_75 fp16: two m16n8k8) with fp32
 * accumulators. Two shared-memory stages. While the tensor cores work on step k, the A tile of
 * step k+1 is in flight (cp.async on sm_80+, registers on sm_75) and the packed words of step
 * k+1 with their scales and zeros sit in registers; after the products they are dequantized into
 * the other B stage as act values [32 k][128 n]. One barrier per step. Fragments come from
 * shared memory by ldmatrix (B with .trans). Rows are padded by 8 elements so the 8 row addresses
 * of an ldmatrix fall on distinct banks.
 *
 * Dequantization runs in fp32 with one rounding to the act dtype: the values of the scratch path's
 * dequantized W, so fused and scratch differ only in the order of the fp32 sums. Checkpoints whose
 * packed words span several groups (act-order: row_groups) look up each row's group while
 * dequantizing (slower; still this kernel). Epilogue: the bias (forward) or the old C
 * (accumulate) added in fp32, one rounding, pairs of columns per store. When the tiles leave SMs
 * idle (small N, narrow outputs) K is split over blockIdx.z: each split stores f32 partial sums and
 * qg_split_sum adds them in split order. No atomics: runs are bit-identical.
 */
#include "mma.cuh"

namespace {

constexpr int QG_THREADS = 256;
constexpr int QG_BN = 128; /* C columns per block */
constexpr int QG_BK = 32;  /* K per step */
constexpr int QG_PAD = 8;  /* shared row padding, elements */
constexpr int QG_WARPS_M = 2, QG_WARPS_N = 4;
constexpr int QG_WN = QG_BN / QG_WARPS_N; /* 32 columns per warp */
constexpr int QG_NT = QG_WN / 8;          /* n8 tiles per warp */

/* A stages in shared memory: sm_80+ copies A two steps ahead with cp.async (three stages); sm_75
 * holds those two steps in registers, so two stages do and two blocks of BM 64 fit a T4's 64 KB */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define QG_A_STAGES 2
#else
#define QG_A_STAGES 3
#endif

struct qg_args {
    void *c;
    const void *a;
    const int32_t *qw, *qz, *gidx;
    const f16 *sc;
    const float *bias; /* forward only; NULL: none */
    int M, Nc, K;      /* C [M, Nc], A [M, K] */
    int out;           /* the linear's out: row stride of qweight and scales */
    int zwords;        /* row stride of qzeros: out * bits / 32 */
    int zoff, accumulate;
    float *part;     /* split-K: f32 partial sums [gridDim.z][M][Nc], summed by qg_split_sum; NULL: none */
    int split_steps; /* K steps per blockIdx.z */
};

/* (2^23 + q) - (2^23 + z) is q - z exactly: one LOP3 and one FADD instead of an int->float conversion */
__device__ __forceinline__ float q_minus_z(uint32_t q, float z_biased)
{
    return __uint_as_float(0x4B000000u | q) - z_biased;
}

/* zero point of column o in group g, biased by 2^23 (see q_minus_z) */
template <int BITS>
__device__ __forceinline__ float zero_biased(const qg_args &p, int g, int o)
{
    constexpr int PER = 32 / BITS;
    const uint32_t w = (uint32_t)__ldg(p.qz + (size_t)g * p.zwords + o / PER);
    return 8388608.0f + (float)(((w >> ((o % PER) * BITS)) & ((1u << BITS) - 1u)) + (uint32_t)p.zoff);
}

template <typename T, int BITS, int DIR, bool ROWG, int BM> struct qg {
    static constexpr int PER = 32 / BITS;
    static constexpr uint32_t MASK = (1u << BITS) - 1u;
    static constexpr int WM = BM / QG_WARPS_M;
    static constexpr int MT = WM / 16;                /* m16 tiles per warp */
    static constexpr int AS = QG_BK + QG_PAD;         /* A row stride (elements) */
    static constexpr int BS = QG_BN + QG_PAD;         /* B row stride */
    static constexpr int A_PER_T = BM * QG_BK / 8 / QG_THREADS; /* 16-byte pieces per thread */
    static constexpr int A_STAGE = BM * AS;       /* elements of one A stage */
    static constexpr int B_STAGE = QG_BK * BS;    /* elements of one B stage */
    typedef T T_;
    /* B work items. Forward: (word row of the 32 k, column pair): two words. Gradient: (word row of
     * the 128 columns, k): one word. */
    static constexpr int B_TASKS = DIR == 0 ? (QG_BK / PER) * (QG_BN / 2) : (QG_BN / PER) * QG_BK;
    static constexpr int B_PER_T = (B_TASKS + QG_THREADS - 1) / QG_THREADS;

    struct bpre { /* one B item between its load and its dequantization */
        uint32_t q0, q1; /* packed words (forward: columns n, n + 1) */
        uint32_t s;      /* f16 scale bits (forward: both columns) */
        float z0, z1;    /* biased zero points (forward: both columns) */
        bool ok;
    };

    /* ---- A: rows m0.., k0.. of A into stage `as` ---- */
    struct apre { /* sm_75: one step of A between its load and its store to shared memory */
        uint4 v[A_PER_T];
    };
    static __device__ __forceinline__ void load_a(const qg_args &p, T *as, int m0, int k0, apre &ar)
    {
        const T *A = (const T *)p.a;
#pragma unroll
        for (int u = 0; u < A_PER_T; u++) {
            const int piece = threadIdx.x + u * QG_THREADS;
            const int r = piece / (QG_BK / 8), c8 = piece % (QG_BK / 8);
            const int m = m0 + r, k = k0 + c8 * 8;
            const bool ok = m < p.M && k < p.K; /* K % 8 == 0: whole pieces */
            const T *src = ok ? A + (size_t)m * p.K + k : A;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
            (void)ar;
            cp_async16(as + r * AS + c8 * 8, src, ok);
#else
            (void)as;
            ar.v[u] = ok ? __ldg((const uint4 *)src) : make_uint4(0u, 0u, 0u, 0u);
#endif
        }
    }
    /* sm_75: the registers of load_a into the stage (sm_80+: cp.async writes it) */
    static __device__ __forceinline__ void store_a(T *as, const apre &ar)
    {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        (void)as;
        (void)ar;
#else
#pragma unroll
        for (int u = 0; u < A_PER_T; u++) {
            const int piece = threadIdx.x + u * QG_THREADS;
            const int r = piece / (QG_BK / 8), c8 = piece % (QG_BK / 8);
            *(uint4 *)(as + r * AS + c8 * 8) = ar.v[u];
        }
#endif
    }
    /* close the cp.async group of this step's loads (possibly empty) */
    static __device__ __forceinline__ void commit_a() { cp_async_commit(); }
    /* every group but the newest has landed */
    static __device__ __forceinline__ void wait_a() { cp_async_wait<1>(); }

    /* ---- B: the packed words (and, unless ROWG, their groups' scales and zeros) of step k0 ---- */
    static __device__ __forceinline__ void load_b(const qg_args &p, int n0, int k0, bpre *b)
    {
#pragma unroll
        for (int u = 0; u < B_PER_T; u++) {
            const int task = threadIdx.x + u * QG_THREADS;
            bpre &e = b[u];
            e.q0 = e.q1 = e.s = 0u;
            e.z0 = e.z1 = 0.0f;
            e.ok = false;
            if (task >= B_TASKS) continue;
            if (DIR == 0) {
                const int wr = task / (QG_BN / 2), n = n0 + 2 * (task % (QG_BN / 2));
                const int kw = k0 / PER + wr; /* word row of qweight */
                e.ok = kw < p.K / PER && n < p.Nc;
                if (!e.ok) continue;
                const int2 w = __ldg((const int2 *)(p.qw + (size_t)kw * p.out + n));
                e.q0 = (uint32_t)w.x;
                e.q1 = (uint32_t)w.y;
                if (!ROWG) {
                    const int g = __ldg(p.gidx + (size_t)kw * PER);
                    e.s = __ldg((const unsigned int *)(p.sc + (size_t)g * p.out + n));
                    e.z0 = zero_biased<BITS>(p, g, n);
                    e.z1 = zero_biased<BITS>(p, g, n + 1);
                }
            } else {
                const int o = k0 + task % QG_BK, wr = task / QG_BK;
                const int kw = n0 / PER + wr;
                e.ok = o < p.K && kw < p.Nc / PER;
                if (!e.ok) continue;
                e.q0 = (uint32_t)__ldg(p.qw + (size_t)kw * p.out + o);
                if (!ROWG) {
                    const int g = __ldg(p.gidx + (size_t)kw * PER);
                    e.s = __ldg((const unsigned short *)(p.sc + (size_t)g * p.out + o));
                    e.z0 = zero_biased<BITS>(p, g, o);
                }
            }
        }
    }

    static __device__ __forceinline__ float f16bits(uint32_t h) { return __half2float(__ushort_as_half((unsigned short)h)); }

    /* dequantize the loaded items into stage `bs` ([32 k][128 n] act values) */
    static __device__ __forceinline__ void store_b(const qg_args &p, T *bs, int n0, int k0, const bpre *b)
    {
#pragma unroll
        for (int u = 0; u < B_PER_T; u++) {
            const int task = threadIdx.x + u * QG_THREADS;
            if (task >= B_TASKS) continue;
            const bpre &e = b[u];
            if (DIR == 0) {
                const int wr = task / (QG_BN / 2), nl = 2 * (task % (QG_BN / 2));
                uint32_t *dst = (uint32_t *)(bs + (wr * PER) * BS + nl);
                float s0 = f16bits(e.s & 0xFFFFu), s1 = f16bits(e.s >> 16), z0 = e.z0, z1 = e.z1;
#pragma unroll
                for (int j = 0; j < PER; j++) {
                    uint32_t v = 0u;
                    if (e.ok) {
                        if (ROWG) { /* this row's own group */
                            const int k = k0 + wr * PER + j, n = n0 + nl;
                            const int g = __ldg(p.gidx + k);
                            const uint32_t sp = __ldg((const unsigned int *)(p.sc + (size_t)g * p.out + n));
                            s0 = f16bits(sp & 0xFFFFu);
                            s1 = f16bits(sp >> 16);
                            z0 = zero_biased<BITS>(p, g, n);
                            z1 = zero_biased<BITS>(p, g, n + 1);
                        }
                        v = pack2<T>(q_minus_z((e.q0 >> (BITS * j)) & MASK, z0) * s0,
                                     q_minus_z((e.q1 >> (BITS * j)) & MASK, z1) * s1);
                    }
                    dst[j * BS / 2] = v;
                }
            } else {
                const int ol = task % QG_BK, wr = task / QG_BK;
                uint32_t pk[PER / 2];
                float s = f16bits(e.s), z = e.z0;
#pragma unroll
                for (int j = 0; j < PER; j += 2) {
                    float w[2] = {0.0f, 0.0f};
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        if (!e.ok) continue;
                        if (ROWG) {
                            const int g = __ldg(p.gidx + (size_t)n0 + wr * PER + j + h);
                            const int o = k0 + ol;
                            s = f16bits(__ldg((const unsigned short *)(p.sc + (size_t)g * p.out + o)));
                            z = zero_biased<BITS>(p, g, o);
                        }
                        w[h] = q_minus_z((e.q0 >> (BITS * (j + h))) & MASK, z) * s;
                    }
                    pk[j / 2] = pack2<T>(w[0], w[1]);
                }
                T *dst = bs + ol * BS + wr * PER;
                if constexpr (PER == 16) {
                    ((uint4 *)dst)[0] = make_uint4(pk[0], pk[1], pk[2], pk[3]);
                    ((uint4 *)dst)[1] = make_uint4(pk[4], pk[5], pk[6], pk[7]);
                } else if constexpr (PER == 8) {
                    *(uint4 *)dst = make_uint4(pk[0], pk[1], pk[2], pk[3]);
                } else {
                    *(uint2 *)dst = make_uint2(pk[0], pk[1]);
                }
            }
        }
    }

    /* acc += the products of one stage */
    static __device__ __forceinline__ void compute(const T *as, const T *bs, float (*acc)[QG_NT][4], int wm, int wn)
    {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int kk = 0; kk < QG_BK; kk += 16) {
            uint32_t af[MT][4], bf[QG_NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
                ldsm_x4(af[mt], as + (wm * WM + mt * 16 + (lane & 15)) * AS + kk + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < QG_NT / 2; np++) {
                uint32_t r[4];
                ldsm_x4_trans(r, bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * BS + wn * QG_WN + np * 16 +
                                     (lane >> 4) * 8);
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < QG_NT; nt++)
                    mma16816<T>(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt][0], bf[nt][1]);
        }
    }
};

/* one step s of the main loop; P = s & 1 picks the register sets (a compile-time index, so the
 * sets stay in registers). On entry: A and B of step s are in shared memory (A stage s % QG_A_STAGES, Bs[P]),
 * A of step s+1 is in flight (cp.async) or in ar[P ^ 1], B of step s+1 in b[P ^ 1]. */
template <typename K, int P>
__device__ __forceinline__ void qg_step(const qg_args &p, int s, int steps, int kb, int m0, int n0, int wm, int wn,
                                        typename K::T_ *As, typename K::T_ *Bs, typename K::apre *ar,
                                        typename K::bpre (*b)[K::B_PER_T], float (*acc)[QG_NT][4])
{
    if (s + 2 < steps) { /* two steps ahead: the loads have a whole step of products to land */
        K::load_a(p, As + ((s + 2) % QG_A_STAGES) * K::A_STAGE, m0, kb + (s + 2) * QG_BK, ar[P]);
        K::load_b(p, n0, kb + (s + 2) * QG_BK, b[P]);
    }
    K::commit_a();
    K::compute(As + (s % QG_A_STAGES) * K::A_STAGE, Bs + P * K::B_STAGE, acc, wm, wn);
    if (s + 1 < steps) {
        K::store_a(As + ((s + 1) % QG_A_STAGES) * K::A_STAGE, ar[P ^ 1]);
        K::store_b(p, Bs + (P ^ 1) * K::B_STAGE, n0, kb + (s + 1) * QG_BK, b[P ^ 1]);
    }
    K::wait_a();
    __syncthreads();
}

template <typename T, int BITS, int DIR, bool ROWG, int BM>
__global__ void __launch_bounds__(QG_THREADS, 2) qgemm_kernel(const qg_args p)
{
    typedef qg<T, BITS, DIR, ROWG, BM> K;
    /* A in three stages (loads two steps ahead), B (dequantized) in two: 48,128 bytes at BM 128 */
    __shared__ __align__(16) T As[QG_A_STAGES * K::A_STAGE];
    __shared__ __align__(16) T Bs[2 * K::B_STAGE];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm = warp % QG_WARPS_M, wn = warp / QG_WARPS_M;
    const int n0 = blockIdx.x * QG_BN, m0 = blockIdx.y * BM;
    /* this block's K steps: split z of the whole (split-K when the grid alone leaves SMs idle) */
    const int s0 = blockIdx.z * p.split_steps;
    const int steps = min((p.K + QG_BK - 1) / QG_BK - s0, p.split_steps), kb = s0 * QG_BK;

    float acc[K::MT][QG_NT][4];
#pragma unroll
    for (int mt = 0; mt < K::MT; mt++)
#pragma unroll
        for (int nt = 0; nt < QG_NT; nt++) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.0f;

    typename K::apre ar[2];
    typename K::bpre b[2][K::B_PER_T];
    K::load_a(p, As, m0, kb, ar[0]);
    K::load_b(p, n0, kb, b[0]);
    K::commit_a();
    if (steps > 1) {
        K::load_a(p, As + K::A_STAGE, m0, kb + QG_BK, ar[1]);
        K::load_b(p, n0, kb + QG_BK, b[1]);
    }
    K::commit_a();
    K::store_a(As, ar[0]);
    K::store_b(p, Bs, n0, kb, b[0]);
    K::wait_a();
    __syncthreads();
    for (int s = 0; s < steps; s += 2) {
        qg_step<K, 0>(p, s, steps, kb, m0, n0, wm, wn, As, Bs, ar, b, acc);
        if (s + 1 < steps) qg_step<K, 1>(p, s + 1, steps, kb, m0, n0, wm, wn, As, Bs, ar, b, acc);
    }

    /* thread (g, t) holds C[g][2t..2t+1] and C[g + 8][2t..2t+1] of each tile */
    const int g = lane >> 2, t = lane & 3;
    T *C = (T *)p.c;
#pragma unroll
    for (int mt = 0; mt < K::MT; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = m0 + wm * K::WM + mt * 16 + g + 8 * h;
            if (row >= p.M) continue;
#pragma unroll
            for (int nt = 0; nt < QG_NT; nt++) {
                const int col = n0 + wn * QG_WN + nt * 8 + 2 * t;
                if (col >= p.Nc) continue; /* Nc is even: col + 1 < Nc too */
                float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
                if (p.part) { /* split-K: raw partial sums; qg_split_sum finishes */
                    *(float2 *)(p.part + ((size_t)blockIdx.z * p.M + row) * p.Nc + col) = make_float2(v0, v1);
                    continue;
                }
                uint32_t *dst = (uint32_t *)(C + (size_t)row * p.Nc + col);
                if (DIR == 0 && p.bias) {
                    v0 += __ldg(p.bias + col);
                    v1 += __ldg(p.bias + col + 1);
                }
                if (DIR == 1 && p.accumulate) {
                    const float2 old = unpack2<T>(*dst);
                    v0 += old.x;
                    v1 += old.y;
                }
                *dst = pack2<T>(v0, v1);
            }
        }
}

/* split-K epilogue: C = the splits' partial sums in split order, + bias or the old C, one rounding */
template <typename T, int DIR> __global__ void qg_split_sum(const qg_args p, int splits)
{
    const size_t pairs = (size_t)p.M * p.Nc / 2, plane = (size_t)p.M * p.Nc;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < pairs; e += (size_t)gridDim.x * blockDim.x) {
        const size_t i = 2 * e;
        const int col = (int)(i % p.Nc);
        float v0 = 0.0f, v1 = 0.0f;
        for (int z = 0; z < splits; z++) {
            const float2 t = *(const float2 *)(p.part + z * plane + i);
            v0 += t.x;
            v1 += t.y;
        }
        uint32_t *dst = (uint32_t *)((T *)p.c + i);
        if (DIR == 0 && p.bias) {
            v0 += p.bias[col];
            v1 += p.bias[col + 1];
        }
        if (DIR == 1 && p.accumulate) {
            const float2 old = unpack2<T>(*dst);
            v0 += old.x;
            v1 += old.y;
        }
        *dst = pack2<T>(v0, v1);
    }
}

template <typename T, int BITS, int DIR>
void qg_launch(const qg_args &p, bool rowg, int bm, int splits, cudaStream_t st)
{
    const dim3 grid((p.Nc + QG_BN - 1) / QG_BN, (p.M + bm - 1) / bm, splits);
    if (bm == 128) {
        if (rowg) qgemm_kernel<T, BITS, DIR, true, 128><<<grid, QG_THREADS, 0, st>>>(p);
        else qgemm_kernel<T, BITS, DIR, false, 128><<<grid, QG_THREADS, 0, st>>>(p);
    } else {
        if (rowg) qgemm_kernel<T, BITS, DIR, true, 64><<<grid, QG_THREADS, 0, st>>>(p);
        else qgemm_kernel<T, BITS, DIR, false, 64><<<grid, QG_THREADS, 0, st>>>(p);
    }
}

template <typename T, int DIR>
void qg_launch_bits(const qg_args &p, int bits, bool rowg, int bm, int splits, cudaStream_t st)
{
    if (bits == 4) qg_launch<T, 4, DIR>(p, rowg, bm, splits, st);
    else if (bits == 2) qg_launch<T, 2, DIR>(p, rowg, bm, splits, st);
    else qg_launch<T, 8, DIR>(p, rowg, bm, splits, st);
    if (splits > 1)
        qg_split_sum<T, DIR><<<grid_for((size_t)p.M * p.Nc / 2, 256), 256, 0, st>>>(p, splits);
}

} // namespace

int cuda_qgemm_ptx(void)
{
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, qgemm_kernel<bf16, 4, 0, false, 128>) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return fa.ptxVersion;
}

/* runs when qgemm_choose (choice.cu) said QGEMM_FUSED: 2/4/8 bits, K % 8 == 0, A 16-byte and C 4-byte
 * aligned, N <= 65535 * 64, code for the act dtype's mma */
ft_status cuda_qgemm_fused(cuda_backend *be, qgemm_dir dir, void *c, const void *a, const ft_qlinear *q, int N,
                           int accumulate, ft_error *err)
{
    qg_args p;
    p.c = c;
    p.a = a;
    p.qw = q->qweight;
    p.qz = q->qzeros;
    p.gidx = q->g_idx;
    p.sc = q->scales;
    p.M = N;
    p.out = q->out;
    p.zwords = q->out * q->bits / 32;
    p.zoff = q->zero_offset;
    if (dir == QGEMM_FWD) {
        p.Nc = q->out;
        p.K = q->in;
        p.bias = q->bias;
        p.accumulate = 0;
    } else {
        p.Nc = q->in;
        p.K = q->out;
        p.bias = NULL;
        p.accumulate = accumulate;
    }
    /* 128-row tiles when they still give every SM a block, else 64 (small N: more blocks). sm_75 code
     * runs 64 only: at 128 its two register sets of A spill (ptxas: 40-150 bytes). */
    const long col_tiles = (p.Nc + QG_BN - 1) / QG_BN;
    const int bm = be->qgemm_ptx >= 80 && col_tiles * ((N + 127) / 128) >= be->sms ? 128 : 64;
    /* split-K when the tiles give fewer than two blocks per SM (small N, narrow outputs): up to 8
     * splits of at least 16 K steps, partial sums in the dequantization scratch, summed in order */
    const long blocks = col_tiles * ((N + bm - 1) / bm);
    const int total = (p.K + QG_BK - 1) / QG_BK;
    int splits = 1;
    if (blocks < 2L * be->sms) {
        splits = (int)((2L * be->sms + blocks - 1) / blocks);
        if (splits > 8) splits = 8;
        if (splits > total / 16) splits = total / 16;
        if (splits < 1) splits = 1;
    }
    p.split_steps = (total + splits - 1) / splits;
    splits = (total + p.split_steps - 1) / p.split_steps;
    p.part = NULL;
    if (splits > 1) {
        void *part;
        FT_TRY(cuda_scratch(be, SCR_DEQ, (size_t)splits * N * p.Nc * sizeof(float), &part, err));
        p.part = (float *)part;
    }
    const bool rowg = q->row_groups != 0;
    ACT_DISPATCH(&be->base, T, {
        if (dir == QGEMM_FWD) qg_launch_bits<T, 0>(p, q->bits, rowg, bm, splits, be->stream);
        else qg_launch_bits<T, 1>(p, q->bits, rowg, bm, splits, be->stream);
    });
    LAUNCH_CHECK(dir == QGEMM_FWD ? "fused quantized GEMM (forward)" : "fused quantized GEMM (input gradient)");
    return FT_OK;
}
