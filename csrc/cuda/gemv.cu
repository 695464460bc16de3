/* gemv.cu -- launches the fused dequant-GEMV of gemv_kernels.cuh (decode, N <= 8): what its two
 * kernels compute and how the work is split are described there; which one runs, choice.cu's
 * gemv_kernel_choose says. Here: the group lookup prepared at load (cuda_qgemv_prepare), the PTX
 * probe and the launch. */

#include "gemv_kernels.cuh"

namespace {

template <typename T, int BITS>
void launch_bits(dim3 grid, cudaStream_t st, gemv_kernel_why kernel, bool act, void *y, const void *x,
                 const ft_qlinear *q, float *part, int N, int kc, const ft_epilogue &epi)
{
    if constexpr (BITS != 8) {
        if (kernel == GVK_FOLD || kernel == GVK_FOLD_PIPE) {
            auto *fold = kernel == GVK_FOLD_PIPE ? qgemv_fold_kernel<T, BITS, true> : qgemv_fold_kernel<T, BITS, false>;
            fold<<<grid, GV_WARPS * 32, 0, st>>>((T *)y, (const T *)x, q->qweight, q->qzeros, q->scales, q->bias, part,
                                                 q->gemv_cnt, N, q->in, q->out, q->zero_offset, q->gemv_gshift, kc, epi);
            return;
        }
    }
    if (act)
        qgemv_kernel<T, BITS, true><<<grid, GV_WARPS * 32, 0, st>>>(
            (T *)y, (const T *)x, q->qweight, q->qzeros, q->scales, q->g_idx, q->bias, part, q->gemv_cnt, N, q->in,
            q->out, q->zero_offset, q->gemv_gshift, kc, epi);
    else
        qgemv_kernel<T, BITS, false><<<grid, GV_WARPS * 32, 0, st>>>(
            (T *)y, (const T *)x, q->qweight, q->qzeros, q->scales, q->g_idx, q->bias, part, q->gemv_cnt, N, q->in,
            q->out, q->zero_offset, q->gemv_gshift, kc, epi);
}


} // namespace

ft_status cuda_qgemv_prepare(cuda_backend *be, ft_qlinear *q, const int32_t *gidx, ft_error *err)
{
    q->gemv_cnt = NULL;
    q->row_groups = 1;
    q->gemv_gshift = -1;
    if (q->bits != 2 && q->bits != 4 && q->bits != 8) return FT_OK; /* 3 bits: dequantize + GEMM */
    const int per = 32 / q->bits, KW = q->in / per;
    int uniform = 1;
    for (int r = 0; r < KW && uniform; r++)
        for (int v = 1; v < per; v++)
            if (gidx[(size_t)r * per + v] != gidx[(size_t)r * per]) {
                uniform = 0;
                break;
            }
    if (uniform) {
        q->row_groups = 0;
        int sh = -1;
        if (q->groups == 1) {
            sh = 30; /* r >> 30 == 0: KW < 2^30 */
        } else if (gidx[0] == 0) {
            int wpg = 1; /* word rows in group 0 */
            while (wpg < KW && gidx[(size_t)wpg * per] == 0) wpg++;
            if ((wpg & (wpg - 1)) == 0) {
                sh = 0;
                while ((1 << sh) < wpg) sh++;
                for (int r = 0; r < KW; r++)
                    if (gidx[(size_t)r * per] != (r >> sh)) {
                        sh = -1;
                        break;
                    }
            }
        }
        q->gemv_gshift = sh;
    }
    const int tiles = gv_plan(q->in, q->out, q->bits, be->sms).tiles; /* an arrival counter per column tile */
    FT_TRY(cuda_malloc(be, (size_t)tiles * sizeof(int), (void **)&q->gemv_cnt, err, "GEMV counters"));
    CUDA_TRY(cudaMemsetAsync(q->gemv_cnt, 0, (size_t)tiles * sizeof(int), be->stream), "GEMV counters");
    return FT_OK;
}

int cuda_qgemv_ptx(void)
{
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, qgemv_kernel<bf16, 4, false>) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return fa.ptxVersion;
}

/* runs when qgemm_choose (choice.cu) said QGEMM_GEMV: 1 <= N <= 8, 2/4/8 bits, x rows 16-byte
 * aligned (8 at 8 bits), y 8-byte aligned, out % 4 == 0, sm_80 code; epi (may be NULL): its add1 and
 * add2 8-byte aligned (cuda_qlinear_fwd_epi checks) */
ft_status cuda_qgemv(cuda_backend *be, void *y, const void *x, const ft_qlinear *q, int N, const ft_epilogue *epi,
                     ft_error *err)
{
    const gv_grid plan = gv_plan(q->in, q->out, q->bits, be->sms);
    const int bits = q->bits, tiles = plan.tiles, splits = plan.splits, kc = plan.kc;

    void *part;
    FT_TRY(cuda_scratch(be, SCR_DEQ, (size_t)splits * N * q->out * sizeof(float), &part, err));
    const dim3 grid(tiles, splits);
    const bool act = q->row_groups != 0;
    const gemv_kernel_why kernel = gemv_kernel_choose(be, q);
    const ft_epilogue none = {0, NULL, NULL, NULL, NULL, NULL, 0, 0.0f}, &ge = epi ? *epi : none;
    ACT_DISPATCH(&be->base, T, {
        if (bits == 4) launch_bits<T, 4>(grid, be->stream, kernel, act, y, x, q, (float *)part, N, kc, ge);
        else if (bits == 2) launch_bits<T, 2>(grid, be->stream, kernel, act, y, x, q, (float *)part, N, kc, ge);
        else launch_bits<T, 8>(grid, be->stream, kernel, act, y, x, q, (float *)part, N, kc, ge);
    });
    LAUNCH_CHECK("GPTQ GEMV");
    return FT_OK;
}
