/* emu.h -- run CUDA kernels on the CPU: one fiber per CUDA thread, blocks one after another.
 *
 * For kernels written against a small surface (threadIdx/blockIdx/blockDim, __syncthreads,
 * __shfl_xor_sync, static __shared__ arrays, mma.cuh's pack2/unpack2/mma16816/ldsm_x4/cp_async16), so that their
 * indexing, masking and fragment bookkeeping can be tested on a machine without a GPU. A warp is 32
 * threads meeting at a barrier for every collective; mma16816 gathers the warp's fragments and
 * computes the m16n8k16 product from the PTX fragment layout that mma.cuh documents, in fp32.
 * Fibers switch only at barriers; the scheduler resumes a random half of them, in a random order, at
 * every sweep, so warps drift apart and a shared-memory access that no __syncthreads orders against
 * another warp's sees the wrong data in some sweep. What it cannot see: timing, bank conflicts,
 * and the hardware's own summation order inside one mma. A fiber starts through makecontext and
 * switches with _setjmp/_longjmp (swapcontext saves the signal mask: a syscall per switch).
 *
 * Include it before the kernel header; compile with g++ -std=c++20 -I<cuda>/include.
 */
#ifndef FT_CUDA_EMU_H
#define FT_CUDA_EMU_H

/* fibers switch stacks with _longjmp, which the fortified longjmp check would take for a jump
 * into a dead frame */
#undef _FORTIFY_SOURCE

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#undef __shared__
#define __shared__ static /* one block runs at a time: a function-local static is its shared memory */
#define __launch_bounds__(...)

typedef __nv_bfloat16 bf16;
typedef __half f16;

/* A barrier of n fibers: the last to arrive opens the next generation; the others yield to the
 * scheduler until it has. */
struct emu_barrier {
    int n, count = 0;
    unsigned gen = 0;
    explicit emu_barrier(int n_) : n(n_) {}
    void arrive_and_wait();
};

struct emu_warp {
    emu_barrier bar{32};
    float f[32];
    uint32_t frag[32][6];
    const uint16_t *ptr[32];
};

struct emu_block {
    explicit emu_block(int threads) : bar(threads), warps(threads / 32) {}
    emu_barrier bar;
    std::vector<emu_warp> warps;
};

/* a cp.async copy not yet made (cp_async16 below) */
struct emu_copy {
    void *dst;
    const void *src;
    bool ok;
};

struct emu_thread {
    uint3 tid, bid;
    emu_block *block;
    std::vector<emu_copy> open;                /* cp.async copies since the last commit */
    std::vector<std::vector<emu_copy>> groups; /* committed, not yet waited for, oldest first */
    ucontext_t ctx;  /* the first entry (makecontext) */
    jmp_buf jb;      /* where it yielded */
    bool started;
    bool done;
};
inline emu_thread *emu_cur;     /* the fiber running now */
inline ucontext_t emu_sched;    /* the scheduler's context for a fiber's first entry */
inline jmp_buf emu_sched_jb;    /* the scheduler, for every later switch (no signal-mask syscalls) */
inline dim3 emu_block_dim, emu_grid_dim;
inline std::mt19937 emu_order_rng{12345u};
#define emu_self (*emu_cur)

inline void emu_yield()
{
    if (!_setjmp(emu_cur->jb)) _longjmp(emu_sched_jb, 1);
}
inline void emu_barrier::arrive_and_wait()
{
    const unsigned my = gen;
    if (++count == n) {
        count = 0;
        gen++;
        return;
    }
    while (gen == my) emu_yield();
}

#define threadIdx (emu_self.tid)
#define blockIdx (emu_self.bid)
#define blockDim (emu_block_dim)
#define gridDim (emu_grid_dim)

inline emu_warp &emu_my_warp() { return emu_self.block->warps[emu_self.tid.x / 32]; }

inline std::function<void()> emu_body; /* the kernel call every fiber of a launch makes */

/* a fiber's entry: runs the launched kernel once, marks itself finished and jumps back to the
 * scheduler (never returns: its stack is simply reused by the next block) */
inline void emu_fiber_main()
{
    emu_body();
    emu_cur->done = true;
    _longjmp(emu_sched_jb, 1);
}

inline void emu_syncthreads() { emu_self.block->bar.arrive_and_wait(); }
#define __syncthreads() emu_syncthreads()

inline float emu_shfl_xor_sync(unsigned mask, float v, int lanes)
{
    (void)mask;
    emu_warp &w = emu_my_warp();
    const int lane = emu_self.tid.x & 31;
    w.f[lane] = v;
    w.bar.arrive_and_wait();
    const float r = w.f[lane ^ lanes];
    w.bar.arrive_and_wait();
    return r;
}
#define __shfl_xor_sync emu_shfl_xor_sync

inline float emu_expf(float x) { return std::exp(x); }
#define __expf emu_expf
using std::min;
using std::max;

/* ---- mma.cuh, emulated ---- */
#define FT_CUDA_MMA_CUH

template <typename T> inline uint32_t pack2(float lo, float hi);
template <> inline uint32_t pack2<bf16>(float lo, float hi)
{
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &h, 4);
    return u;
}
template <> inline uint32_t pack2<f16>(float lo, float hi)
{
    __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    std::memcpy(&u, &h, 4);
    return u;
}
template <typename T> inline float2 unpack2(uint32_t v);
template <> inline float2 unpack2<bf16>(uint32_t v)
{
    __nv_bfloat162 h;
    std::memcpy(static_cast<void *>(&h), &v, 4);
    return __bfloat1622float2(h);
}
template <> inline float2 unpack2<f16>(uint32_t v)
{
    __half2 h;
    std::memcpy(static_cast<void *>(&h), &v, 4);
    return __half22float2(h);
}

/* A pessimistic model of the tensor cores' own fp32 summation, for kernels whose accuracy rests on
 * it (the GEMV's fold kernel sums x (128 + q) and cancels 128 sum x later). Measurements of fp16
 * mma with fp32 accumulation on V100 / T4 / A100 (Fasi, Higham, Mikaitis, Pranesh, "Numerical
 * behavior of NVIDIA tensor cores", PeerJ CS 2021) found the exact products and the accumulator
 * aligned to the largest exponent among them, the aligned significands truncated (toward zero,
 * with a few extra bits), summed, and the sum truncated to fp32. Here: blocks of 4 products with
 * the accumulator, every term truncated at 2^-23 of the block's largest (no extra bits), the sum
 * truncated to 24 bits: at least as lossy as the measured hardware. emu_mma_truncate = true makes
 * mma16816 sum that way. */
inline bool emu_mma_truncate = false;

template <typename Product> inline float emu_truncating_dot(float c, Product product)
{
    auto trunc_at = [](double v, int e) { return std::trunc(std::ldexp(v, -e)) * std::ldexp(1.0, e); };
    double acc = c;
    for (int k0 = 0; k0 < 16; k0 += 4) {
        double terms[5] = {acc, product(k0), product(k0 + 1), product(k0 + 2), product(k0 + 3)};
        int emax = INT32_MIN;
        for (double v : terms)
            if (v != 0.0) emax = std::max(emax, std::ilogb(v));
        if (emax == INT32_MIN) continue; /* all zero */
        double sum = 0.0;
        for (double v : terms) sum += trunc_at(v, emax - 23);
        acc = sum == 0.0 ? 0.0 : trunc_at(sum, std::ilogb(sum) - 23);
    }
    return (float)acc;
}

/* d (this lane's D[g][2t..2t+1], D[g+8][2t..2t+1]) += A B over the warp's fragments */
template <typename T>
inline void mma16816(float *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1)
{
    emu_warp &w = emu_my_warp();
    const int lane = emu_self.tid.x & 31, g = lane >> 2, t = lane & 3;
    const uint32_t mine[6] = {a0, a1, a2, a3, b0, b1};
    std::memcpy(w.frag[lane], mine, sizeof mine);
    w.bar.arrive_and_wait();
    auto half_of = [](uint32_t v, int k) {
        const float2 f = unpack2<T>(v);
        return (k & 1) ? f.y : f.x;
    };
    /* A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register a0 (row < 8, k < 8), a1 (row >= 8),
     * a2 (k >= 8), a3 (both); B[k][n]: lane n * 4 + (k % 8) / 2, register b0 (k < 8) or b1 */
    auto A = [&](int row, int k) {
        return half_of(w.frag[(row % 8) * 4 + (k % 8) / 2][(row < 8 ? 0 : 1) + (k < 8 ? 0 : 2)], k);
    };
    auto B = [&](int k, int n) { return half_of(w.frag[n * 4 + (k % 8) / 2][k < 8 ? 4 : 5], k); };
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        if (emu_mma_truncate) {
            out[i] = emu_truncating_dot(d[i], [&](int k) { return (double)A(row, k) * (double)B(k, col); });
            continue;
        }
        float s = 0.0f;
        for (int k = 0; k < 16; k++) s += A(row, k) * B(k, col);
        out[i] = d[i] + s;
    }
    w.bar.arrive_and_wait(); /* every lane has read the fragments before any lane writes again */
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

/* ldmatrix .x4 (mma.cuh's ldsm_x4 / ldsm_x4_trans): lanes 8i .. 8i+7 give the row addresses of 8 x 8
 * b16 matrix i; lane l receives r[i] = matrix i (row l / 4, elements 2 (l % 4), +1), or with trans
 * (rows 2 (l % 4), +1 of column l / 4) */
inline void emu_ldsm(uint32_t *r, const void *p, bool trans)
{
    emu_warp &w = emu_my_warp();
    const int lane = emu_self.tid.x & 31;
    w.ptr[lane] = static_cast<const uint16_t *>(p);
    w.bar.arrive_and_wait();
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t *row = w.ptr[8 * i + lane / 4];
            lo = row[2 * (lane % 4)];
            hi = row[2 * (lane % 4) + 1];
        } else {
            lo = w.ptr[8 * i + 2 * (lane % 4)][lane / 4];
            hi = w.ptr[8 * i + 2 * (lane % 4) + 1][lane / 4];
        }
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    w.bar.arrive_and_wait();
}
/* mma.cuh's LOP3 helper: (a & b) | c */
inline uint32_t lop_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
inline void ldsm_x4(uint32_t *r, const void *p) { emu_ldsm(r, p, false); }
inline void ldsm_x4_trans(uint32_t *r, const void *p) { emu_ldsm(r, p, true); }

/* cp.async (mma.cuh's cp_async16 / commit / wait): a copy lands at once or only when a wait retires
 * its group, at random, as the hardware may do either. Read before its wait (or, by another thread,
 * before the barrier after that wait), the shared memory holds the old tile; overwritten while
 * another warp still reads the stage (no barrier after the use), it holds the new one: either way
 * the result is wrong in some sweep. */
inline void emu_copy_now(const emu_copy &c)
{
    if (c.ok) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
}
inline void cp_async16(void *dst, const void *src, bool ok)
{
    if (emu_order_rng() & 1) emu_copy_now({dst, src, ok});
    else emu_self.open.push_back({dst, src, ok});
}
inline void cp_async_commit()
{
    emu_self.groups.push_back(std::move(emu_self.open));
    emu_self.open.clear();
}
template <int N> inline void cp_async_wait()
{
    auto &g = emu_self.groups;
    while (g.size() > (size_t)N) {
        for (const emu_copy &c : g.front()) emu_copy_now(c);
        g.erase(g.begin());
    }
}

/* runs one fiber until it yields or ends (kept out of line: the caller's locals stay clear of the
 * context switch) */
[[gnu::noinline]] inline void emu_resume(emu_thread *e)
{
    emu_cur = e;
    if (_setjmp(emu_sched_jb)) return; /* the fiber yielded or ended */
    if (!e->started) {
        e->started = true;
        swapcontext(&emu_sched, &e->ctx);
    } else {
        _longjmp(e->jb, 1);
    }
}

/* one stack per thread index, kept from block to block and launch to launch */
constexpr size_t emu_stack_bytes = 256 * 1024;
inline std::vector<std::unique_ptr<char[]>> emu_stacks;

/* a fiber that starts in emu_fiber_main on the stack of its thread index (out of line, as emu_resume) */
[[gnu::noinline]] inline void emu_fiber_init(emu_thread *e, unsigned t)
{
    if (emu_stacks.size() <= t) emu_stacks.resize(t + 1);
    if (!emu_stacks[t]) emu_stacks[t].reset(new char[emu_stack_bytes]);
    getcontext(&e->ctx);
    e->ctx.uc_stack.ss_sp = emu_stacks[t].get();
    e->ctx.uc_stack.ss_size = emu_stack_bytes;
    e->ctx.uc_link = nullptr; /* emu_fiber_main never returns */
    e->started = false;
    makecontext(&e->ctx, emu_fiber_main, 0);
}

/* block (x, y, z) of the current launch: its threads are fibers of this OS thread, switched at every
 * barrier, a random half of them in a random order at every sweep */
inline void emu_run_block(uint3 bid)
{
    const unsigned n = emu_block_dim.x;
    emu_block blk((int)n);
    std::vector<emu_thread> th(n);
    std::vector<unsigned> order(n);
    for (unsigned t = 0; t < n; t++) {
        emu_thread &e = th[t];
        e.tid = make_uint3(t, 0, 0);
        e.bid = bid;
        e.block = &blk;
        e.done = false;
        emu_fiber_init(&e, t);
        order[t] = t;
    }
    for (unsigned left = n; left;) {
        left = 0;
        std::shuffle(order.begin(), order.end(), emu_order_rng);
        for (unsigned o : order) {
            if (th[o].done) continue;
            if (emu_order_rng() & 1) emu_resume(&th[o]); /* skipped half the time: warps drift apart */
            left += !th[o].done;
        }
    }
}

/* kernel<<<grid, block>>>(args...) with 1-D blocks of a multiple of 32 threads, blocks in order */
template <typename... P, typename... A>
void emu_launch(dim3 grid, dim3 block, void (*kernel)(P...), A... args)
{
    emu_grid_dim = grid;
    emu_block_dim = block;
    emu_body = [=] { kernel(args...); };
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) emu_run_block(make_uint3(x, y, z));
    emu_body = nullptr;
}

/* ---- the rest of what gemv_kernels.cuh uses: cache-hinted loads and stores are plain ones,
 * device-wide fences are no-ops and atomics need nothing (one block runs at a time, and fibers
 * switch only at barriers), __byte_perm picks bytes of {y, x} as the PTX prmt does ---- */
template <typename V> inline V __ldg(const V *p) { return *p; }
template <typename V> inline V __ldcs(const V *p) { return *p; }
template <typename V> inline V __ldcg(const V *p) { return *p; }
template <typename V> inline void __stcg(V *p, V v) { *p = v; }
inline void __threadfence() {}
inline float __uint_as_float(unsigned u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int atomicAdd(int *p, int v)
{
    const int old = *p;
    *p = old + v;
    return old;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    const uint64_t bytes = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
    return r;
}

/* A harness's main loop: every case in f16 then in bf16, each run with its own seed (seed, seed + 1,
 * ...), then the summary line tests/test_cuda_emu.py looks for; returns the exit status. */
template <typename Spec, size_t K, typename RunF16, typename RunBF16>
int emu_run_cases(const Spec (&cases)[K], uint64_t seed, RunF16 run_f16, RunBF16 run_bf16)
{
    int bad = 0;
    for (const Spec &c : cases) {
        bad += run_f16(c, seed++);
        bad += run_bf16(c, seed++);
    }
    std::printf("%s: %d case(s) failed\n", bad ? "FAILED" : "passed", bad);
    return bad ? 1 : 0;
}

#endif /* FT_CUDA_EMU_H */
