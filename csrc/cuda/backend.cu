/* backend.cu -- the CUDA backend: device, stream, cuBLAS, memory, dense
 * weights, GEMM helper, error mapping and the op table.
 *
 * Every op is enqueued on the backend's one stream; download and sync wait.
 * A failed allocation (cudaErrorMemoryAllocation) is reported as FT_EDEVMEM
 * and leaves the backend usable: nothing is half-allocated. Memory counters
 * (current and high-water bytes of everything this backend allocated,
 * scratch and the cuBLAS workspace included) live in the backend object and
 * are read through the memory_stats op (model.memory_stats() in Python).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda.cuh"

/* No C++ runtime here (the extension links as C): a small open-addressing map
 * pointer -> size, and GCC atomics for the process-wide counters. */
typedef struct size_map {
    void **keys;
    size_t *vals;
    size_t cap, len; /* cap a power of two */
} size_map;

static size_t map_slot(const size_map *m, void *p)
{
    size_t h = ((uintptr_t)p >> 8) * 0x9E3779B97F4A7C15ull;
    size_t i = h & (m->cap - 1);
    while (m->keys[i] && m->keys[i] != p) i = (i + 1) & (m->cap - 1);
    return i;
}

static int map_put(size_map *m, void *p, size_t v)
{
    if (2 * (m->len + 1) > m->cap) {
        size_map n;
        n.cap = m->cap ? m->cap * 2 : 1024;
        n.len = 0;
        n.keys = (void **)calloc(n.cap, sizeof(void *));
        n.vals = (size_t *)calloc(n.cap, sizeof(size_t));
        if (!n.keys || !n.vals) {
            free(n.keys);
            free(n.vals);
            return -1;
        }
        for (size_t i = 0; i < m->cap; i++)
            if (m->keys[i]) {
                size_t j = map_slot(&n, m->keys[i]);
                n.keys[j] = m->keys[i];
                n.vals[j] = m->vals[i];
                n.len++;
            }
        free(m->keys);
        free(m->vals);
        *m = n;
    }
    size_t i = map_slot(m, p);
    if (!m->keys[i]) m->len++;
    m->keys[i] = p;
    m->vals[i] = v;
    return 0;
}

/* removes p; returns its size (0 when unknown) */
static size_t map_take(size_map *m, void *p)
{
    if (!m->cap) return 0;
    size_t i = map_slot(m, p);
    if (!m->keys[i]) return 0;
    const size_t v = m->vals[i];
    m->keys[i] = NULL;
    m->len--;
    /* re-insert the rest of the cluster (linear probing deletion) */
    for (size_t j = (i + 1) & (m->cap - 1); m->keys[j]; j = (j + 1) & (m->cap - 1)) {
        void *k = m->keys[j];
        size_t kv = m->vals[j];
        m->keys[j] = NULL;
        m->len--;
        size_t s = map_slot(m, k);
        m->keys[s] = k;
        m->vals[s] = kv;
        m->len++;
    }
    return v;
}

static void count_alloc(cuda_backend *be, size_t bytes)
{
    be->cur_bytes += bytes;
    if (be->cur_bytes > be->peak_bytes) be->peak_bytes = be->cur_bytes;
}

static ft_status op_memory_stats(ft_backend *base, size_t *current, size_t *peak, int reset, ft_error *err)
{
    (void)err;
    cuda_backend *be = CB(base);
    *current = be->cur_bytes;
    *peak = be->peak_bytes;
    if (reset) be->peak_bytes = be->cur_bytes;
    return FT_OK;
}

/* Device-wide use (every process and context), for benchmarks: total - free. */
extern "C" int ft_cuda_mem_info(size_t *used, size_t *total)
{
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    *used = tot - fr;
    *total = tot;
    return 0;
}

static const char *const g_prof_names[PR_N] = {
    "dequant", "qlinear gemm fwd", "qlinear gemm bwd", "lora fwd", "lora bwd", "attention fwd",
    "attention bwd dq", "attention bwd dv", "attention bwd dk", "attention bwd group sum", "qkv split",
    "layernorm", "gelu/add", "lm_head gemms", "cross-entropy", "optimizer"};

double prof_now(cuda_backend *be)
{
    cudaStreamSynchronize(be->stream);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void prof_add(cuda_backend *be, int id, double t0)
{
    be->prof_s[id] += prof_now(be) - t0;
    be->prof_calls[id]++;
}

void prof_choice(cuda_backend *be, int ch, int v, double t0)
{
    if (be->prof_on) be->choice_s[ch][v] += prof_now(be) - t0;
}

static void prof_report(cuda_backend *be)
{
    const double *g_prof = be->prof_s;
    const long *g_prof_n = be->prof_calls;
    double tot = 0;
    for (int i = 0; i < PR_N; i++) tot += g_prof[i];
    if (tot <= 0) return;
    fprintf(stderr, "ft cuda profile (synchronised regions, total %.3f s):\n", tot);
    for (int i = 0; i < PR_N; i++)
        if (g_prof_n[i])
            fprintf(stderr, "  %-26s %9.3f ms %5.1f%% (%ld calls)\n", g_prof_names[i], 1e3 * g_prof[i],
                    100 * g_prof[i] / tot, g_prof_n[i]);
    choice_report(be);
}

ft_status cuda_fail(ft_error *err, cudaError_t e, const char *what)
{
    cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
    if (e == cudaErrorMemoryAllocation)
        return ft_fail(err, FT_EDEVMEM, "CUDA out of memory (%s)", what);
    return ft_fail(err, FT_EDEVICE, "CUDA error in %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

ft_status cublas_fail(ft_error *err, cublasStatus_t s, const char *what)
{
    cudaGetLastError();
    if (s == CUBLAS_STATUS_ALLOC_FAILED)
        return ft_fail(err, FT_EDEVMEM, "cuBLAS out of memory (%s)", what);
    return ft_fail(err, FT_EDEVICE, "cuBLAS error %d in %s", (int)s, what);
}

ft_status cuda_malloc(cuda_backend *be, size_t bytes, void **ptr, ft_error *err, const char *what)
{
    *ptr = NULL;
    if (be->capturing) /* a captured graph would keep a pointer the next step may not own */
        return ft_fail(err, FT_ESTATE, "allocating %s during graph capture", what);
    size_t n = bytes ? (bytes + 255) & ~(size_t)255 : 256;
    void *p = NULL;
    /* FT_CUDA_MEM_LIMIT_MB (tests): the backend's own bytes are capped, and an allocation past the cap
     * fails as cudaMalloc does when the card is full, so out-of-memory paths run on any card */
    cudaError_t e = be->mem_limit && be->cur_bytes + n > be->mem_limit ? cudaErrorMemoryAllocation
                                                                       : cudaMalloc(&p, n);
    if (e != cudaSuccess) {
        cudaGetLastError();
        if (e == cudaErrorMemoryAllocation) {
            size_t fr = 0, tot = 0;
            cudaMemGetInfo(&fr, &tot);
            cudaGetLastError();
            return ft_fail(err, FT_EDEVMEM,
                           "CUDA out of memory allocating %.1f MiB for %s (%.1f MiB free of %.1f MiB)",
                           n / 1048576.0, what, fr / 1048576.0, tot / 1048576.0);
        }
        return cuda_fail(err, e, what);
    }
    if (map_put((size_map *)be->alloc_map, p, n)) {
        cudaFree(p);
        return ft_fail(err, FT_ENOMEM, "out of host memory");
    }
    count_alloc(be, n);
    *ptr = p;
    return FT_OK;
}

void cuda_free_ptr(cuda_backend *be, void *ptr)
{
    if (!ptr) return;
    const size_t n = map_take((size_map *)be->alloc_map, ptr);
    be->cur_bytes -= n;
    /* cudaFree synchronises the device: pending kernels that use ptr finish first */
    cudaFree(ptr);
    cudaGetLastError();
}

ft_status cuda_scratch(cuda_backend *be, int slot, size_t bytes, void **ptr, ft_error *err)
{
    if (bytes > be->scratch_bytes[slot]) {
        if (be->capturing) return ft_fail(err, FT_ESTATE, "scratch memory would grow during graph capture");
        be->scratch_gen++;
        cuda_free_ptr(be, be->scratch[slot]);
        be->scratch[slot] = NULL;
        be->scratch_bytes[slot] = 0;
        /* grow with a little headroom so slowly growing sizes do not reallocate each call */
        size_t want = bytes + bytes / 8;
        void *p;
        if (cuda_malloc(be, want, &p, err, "scratch") != FT_OK &&
            cuda_malloc(be, bytes, &p, err, "scratch") != FT_OK)
            return err->status;
        be->scratch[slot] = p;
        be->scratch_bytes[slot] = bytes > want ? bytes : want;
    }
    *ptr = be->scratch[slot];
    return FT_OK;
}

/* ---- memory ops ---- */

static ft_status op_alloc(ft_backend *base, size_t bytes, void **ptr, ft_error *err)
{
    return cuda_malloc(CB(base), bytes, ptr, err, "a device buffer");
}

static void op_free(ft_backend *base, void *ptr) { cuda_free_ptr(CB(base), ptr); }

static ft_status op_upload(ft_backend *base, void *dst, const void *src, size_t bytes, ft_error *err)
{
    if (!bytes) return FT_OK;
    /* pageable source: returns once the data is staged, so the caller may free it */
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, CB(base)->stream), "upload");
    return FT_OK;
}

static ft_status op_download(ft_backend *base, void *dst, const void *src, size_t bytes, ft_error *err)
{
    if (!bytes) return FT_OK;
    CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, CB(base)->stream), "download");
    CUDA_TRY(cudaStreamSynchronize(CB(base)->stream), "download");
    return FT_OK;
}

static ft_status op_zero(ft_backend *base, void *dst, size_t bytes, ft_error *err)
{
    if (!bytes) return FT_OK;
    CUDA_TRY(cudaMemsetAsync(dst, 0, bytes, CB(base)->stream), "zero");
    return FT_OK;
}

static ft_status op_sync(ft_backend *base, ft_error *err)
{
    CUDA_TRY(cudaStreamSynchronize(CB(base)->stream), "a kernel (reported at sync)");
    return FT_OK;
}

/* ---- conversions ---- */

template <typename S, typename D> __global__ void convert_kernel(D *dst, const S *src, size_t n)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = cv<D>(ld<S>(src[i]));
}

ft_status cuda_f32_to_act(cuda_backend *be, void *dst, const float *src, size_t n, ft_error *err)
{
    if (!n) return FT_OK;
    ACT_DISPATCH(&be->base, T, convert_kernel<float, T><<<grid_for(n, 256), 256, 0, be->stream>>>((T *)dst, src, n));
    LAUNCH_CHECK("f32 -> activation conversion");
    return FT_OK;
}

ft_status cuda_act_to_f32(cuda_backend *be, float *dst, const void *src, size_t n, ft_error *err)
{
    if (!n) return FT_OK;
    ACT_DISPATCH(&be->base, T,
                 convert_kernel<T, float><<<grid_for(n, 256), 256, 0, be->stream>>>(dst, (const T *)src, n));
    LAUNCH_CHECK("activation -> f32 conversion");
    return FT_OK;
}

/* host f16/bf16/f32 tensor -> act dtype: staged through a temporary device copy */
static ft_status op_dense_create(ft_backend *base, const ft_host_tensor *src, void **dst, ft_error *err)
{
    cuda_backend *be = CB(base);
    *dst = NULL;
    size_t n = 1;
    for (int i = 0; i < src->ndim; i++) n *= (size_t)src->shape[i];
    if (src->dtype != FT_F32 && src->dtype != FT_F16 && src->dtype != FT_BF16)
        return ft_fail(err, FT_EINVAL, "%s: expected float16, bfloat16 or float32, got %s",
                       src->name ? src->name : "tensor", ft_dtype_name(src->dtype));
    const size_t in_bytes = n * ft_dtype_size(src->dtype);
    void *out;
    FT_TRY(cuda_malloc(be, n * 2, &out, err, src->name ? src->name : "a dense weight"));
    if (src->dtype == base->act_dtype) {
        ft_status st = op_upload(base, out, src->data, in_bytes, err);
        if (st) {
            cuda_free_ptr(be, out);
            return st;
        }
        *dst = out;
        return FT_OK;
    }
    void *tmp;
    ft_status st = cuda_malloc(be, in_bytes, &tmp, err, "a dense weight being converted");
    if (st) {
        cuda_free_ptr(be, out);
        return st;
    }
    st = op_upload(base, tmp, src->data, in_bytes, err);
    if (!st && n) {
        const unsigned g = grid_for(n, 256);
        ACT_DISPATCH(base, T, {
            if (src->dtype == FT_F32) convert_kernel<float, T><<<g, 256, 0, be->stream>>>((T *)out, (const float *)tmp, n);
            else if (src->dtype == FT_F16) convert_kernel<f16, T><<<g, 256, 0, be->stream>>>((T *)out, (const f16 *)tmp, n);
            else convert_kernel<bf16, T><<<g, 256, 0, be->stream>>>((T *)out, (const bf16 *)tmp, n);
        });
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) st = cuda_fail(err, e, "dense weight conversion");
    }
    cuda_free_ptr(be, tmp); /* synchronises: the conversion is done */
    if (st) {
        cuda_free_ptr(be, out);
        return st;
    }
    *dst = out;
    return FT_OK;
}

/* ---- GEMM ---- */

ft_status gemm_rm(cuda_backend *be, int ta, int tb, int M, int N, int K, float alpha, const void *A,
                  cudaDataType_t at, int lda, const void *B, cudaDataType_t bt, int ldb, float beta, void *C,
                  cudaDataType_t ct, int ldc, ft_error *err)
{
    if (M <= 0 || N <= 0) return FT_OK;
    /* row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T */
    const cublasOperation_t opB = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opA = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (K <= 0) { /* C = beta C: let cuBLAS handle k == 0 (it scales C) */
    }
    cublasComputeType_t comp = CUBLAS_COMPUTE_32F;
    if (at == CUDA_R_32F && bt == CUDA_R_32F) comp = CUBLAS_COMPUTE_32F; /* pure fp32, no TF32 */
    BLAS_TRY(cublasGemmEx(be->blas, opB, opA, N, M, K, &alpha, B, bt, ldb, A, at, lda, &beta, C, ct, ldc, comp,
                          CUBLAS_GEMM_DEFAULT),
             "a matrix product (cublasGemmEx)");
    return FT_OK;
}

/* ---- lifetime ---- */

static void op_destroy(ft_backend *base)
{
    cuda_backend *be = CB(base);
    cudaStreamSynchronize(be->stream);
    if (be->prof_on) prof_report(be);
    cuda_replay_release(be);
    for (int i = 0; i < SCR_N; i++) cuda_free_ptr(be, be->scratch[i]);
    cuda_free_ptr(be, be->red);
    cuda_free_ptr(be, be->dropout_base);
    cuda_free_ptr(be, be->attn_cnt);
    if (be->blas) cublasDestroy(be->blas);
    cuda_free_ptr(be, be->blas_ws);
    if (be->stream) cudaStreamDestroy(be->stream);
    cudaFreeHost(be->red_host);
    cudaGetLastError();
    size_map *m = (size_map *)be->alloc_map;
    if (m) {
        free(m->keys);
        free(m->vals);
        free(m);
    }
    free(be);
}

/* ---- the op table ----
 * Every entry makes the backend's GPU current first, as ggml's CUDA backend does at each of its
 * entry points: a model on cuda:1, or one used from a thread whose current device is another,
 * allocates and launches on its own GPU. A failed switch surfaces as the op's own CUDA error. */

void cuda_enter(cuda_backend *be)
{
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != be->device) cudaSetDevice(be->device);
}

template <auto fn> struct on_device;
template <typename R, typename... A, R (*fn)(ft_backend *, A...)> struct on_device<fn> {
    static R call(ft_backend *be, A... args)
    {
        cuda_enter(CB(be));
        return fn(be, args...);
    }
};
#define ENTRY(fn) (on_device<fn>::call)

static const ft_backend_ops cuda_ops = {
    "cuda",
    ENTRY(op_destroy),
    ENTRY(op_alloc),
    ENTRY(op_free),
    ENTRY(op_upload),
    ENTRY(op_download),
    ENTRY(op_zero),
    ENTRY(op_sync),
    ENTRY(op_dense_create),
    ENTRY(cuda_qlinear_create),
    ENTRY(cuda_qlinear_destroy),
    ENTRY(cuda_embed),
    ENTRY(cuda_layernorm_fwd),
    ENTRY(cuda_layernorm_bwd),
    ENTRY(cuda_gelu_fwd),
    ENTRY(cuda_gelu_bwd),
    ENTRY(cuda_add),
    ENTRY(cuda_qlinear_fwd),
    ENTRY(cuda_qlinear_fwd_epi),
    ENTRY(cuda_qlinear_bwd),
    ENTRY(cuda_lora_fwd),
    ENTRY(cuda_lora_bwd),
    ENTRY(cuda_set_dropout_base),
    ENTRY(cuda_qkv_split_fwd),
    ENTRY(cuda_qkv_split_bwd),
    ENTRY(cuda_attention_fwd),
    ENTRY(cuda_attention_bwd),
    ENTRY(cuda_lm_logits),
    ENTRY(cuda_cross_entropy),
    ENTRY(cuda_argmax_rows),
    ENTRY(cuda_lm_bwd),
    ENTRY(cuda_sumsq),
    ENTRY(cuda_adamw),
    ENTRY(cuda_gather_rows),
    ENTRY(cuda_replay),
    ENTRY(op_memory_stats),
};

extern "C" int ft_cuda_count_devices(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" ft_status ft_cuda_backend_create(int device, int act_dtype, ft_backend **out, ft_error *err)
{
    *out = NULL;
    const int n = ft_cuda_count_devices();
    if (n <= 0) return ft_fail(err, FT_EUNSUPPORTED, "no CUDA device is visible (driver missing or no GPU)");
    if (device < 0 || device >= n)
        return ft_fail(err, FT_EINVAL, "device cuda:%d does not exist (%d CUDA device%s visible)", device, n,
                       n == 1 ? "" : "s");
    CUDA_TRY(cudaSetDevice(device), "cudaSetDevice");
    cudaDeviceProp prop;
    CUDA_TRY(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    const int sm = prop.major * 10 + prop.minor;
    if (sm < 75)
        return ft_fail(err, FT_EUNSUPPORTED, "GPU %s has compute capability %d.%d; falcontune needs 7.5 or newer",
                       prop.name, prop.major, prop.minor);
    ft_dtype dt;
    if (act_dtype < 0) dt = sm >= 80 ? FT_BF16 : FT_F16;
    else if (act_dtype == FT_BF16 || act_dtype == FT_F16) dt = (ft_dtype)act_dtype;
    else
        return ft_fail(err, FT_EUNSUPPORTED, "the CUDA backend computes in float16 or bfloat16, not %s",
                       ft_dtype_name((ft_dtype)act_dtype));
    if (dt == FT_BF16 && sm < 80)
        return ft_fail(err, FT_EUNSUPPORTED, "bfloat16 needs compute capability 8.0+ (%s is %d.%d: float16 only)",
                       prop.name, prop.major, prop.minor);

    cuda_backend *be = (cuda_backend *)calloc(1, sizeof *be);
    if (!be) return ft_fail(err, FT_ENOMEM, "out of host memory creating the CUDA backend");
    /* every FT_CUDA_* switch, read once here (not per call: ~400 ops per decoded token) */
    if (cuda_read_env(be, err) != FT_OK) {
        free(be);
        return err->status;
    }
    be->alloc_map = calloc(1, sizeof(size_map));
    if (!be->alloc_map) {
        free(be);
        return ft_fail(err, FT_ENOMEM, "out of host memory creating the CUDA backend");
    }
    be->base.ops = &cuda_ops;
    be->base.act_dtype = dt;
    be->base.weight_dtype = dt;
    be->device = device;
    be->cc_major = prop.major;
    be->sm = sm;
    be->sms = prop.multiProcessorCount;
    cuda_probe_kernels(be); /* which kernels this build can run here */
    ft_status st = FT_OK;
    cudaError_t e = cudaStreamCreateWithFlags(&be->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) st = cuda_fail(err, e, "creating a CUDA stream");
    if (!st) {
        cublasStatus_t s = cublasCreate(&be->blas);
        if (s != CUBLAS_STATUS_SUCCESS) {
            be->blas = NULL;
            st = cublas_fail(err, s, "cublasCreate");
        }
    }
    if (!st) {
        cublasSetStream(be->blas, be->stream);
        cublasSetMathMode(be->blas, CUBLAS_DEFAULT_MATH);
        /* our own workspace, so the memory counters see it (32 MiB suits Hopper) */
        const size_t ws = 32u << 20;
        st = cuda_malloc(be, ws, &be->blas_ws, err, "the cuBLAS workspace");
        if (!st && cublasSetWorkspace(be->blas, be->blas_ws, ws) != CUBLAS_STATUS_SUCCESS)
            st = ft_fail(err, FT_EDEVICE, "cublasSetWorkspace failed");
    }
    if (!st) st = cuda_malloc(be, RED_BLOCKS * sizeof(double), (void **)&be->red, err, "reduction buffer");
    if (!st) st = cuda_malloc(be, sizeof(uint64_t), (void **)&be->dropout_base, err, "the dropout base");
    if (!st) st = cuda_set_dropout_base(&be->base, 0, err);
    if (!st) {
        e = cudaMallocHost(&be->red_host, RED_BLOCKS * sizeof(double));
        if (e != cudaSuccess) {
            be->red_host = NULL;
            st = cuda_fail(err, e, "pinned host buffer");
        }
    }
    if (st) {
        op_destroy(&be->base);
        return st;
    }
    *out = &be->base;
    return FT_OK;
}
