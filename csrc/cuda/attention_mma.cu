/* attention_mma.cu -- launches the tensor-core flash attention of attention_mma.cuh
 * (ATTN_MMA: FT_CUDA_ATTN=mma, head dim 64; choice.cu decides when it runs).
 *
 * Forward: one launch, grid (row blocks of 64 item rows, items). Backward (training shape):
 *   am_dot_kernel         D [B, H, T] f32                        scratch
 *   am_dq_kernel          dq (=) in the act type
 *   am_dkv_kernel         dK, dV partials [splits][B KV T 64] f32 scratch (splits: am_plan)
 *   am_split_sum_kernel   dk, dv (=), summed over splits in order
 * Scratch: one SCR_ATTN buffer laid out by am_bwd_scratch (D, then the 16-byte aligned partials).
 */
#include "attention_mma.cuh"

int cuda_attention_mma_ptx(void)
{
    cudaFuncAttributes fa;
    if (cudaFuncGetAttributes(&fa, am_fwd_kernel<bf16>) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return fa.ptxVersion;
}

/* runs when attn_choose said ATTN_MMA: hd == 64, H % KV == 0, 16-byte aligned tensors, grid within
 * limits, code for the act dtype's mma */
ft_status cuda_attention_fwd_mma(cuda_backend *be, void *out, float *lse, const void *q, const void *k, const void *v,
                                 const ft_attn_args *a, ft_error *err)
{
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    am_p p = am_params(a);
    const am_grids grids = am_plan(&p, a->B * a->KV, be->sms);
    cudaStream_t s = be->stream;
    PROF_T0(be);
    ACT_DISPATCH(&be->base, T, am_fwd_kernel<T><<<grids.rows, AM_THREADS, 0, s>>>((T *)out, lse, (const T *)q,
                                                                             (const T *)k, (const T *)v, p));
    LAUNCH_CHECK("attention (mma)");
    PROF_MARK(be, PR_ATT_F);
    return FT_OK;
}

ft_status cuda_attention_bwd_mma(cuda_backend *be, void *dq, void *dk, void *dv, const void *dout, const void *out,
                                 const float *lse, const void *q, const void *k, const void *v, const ft_attn_args *a,
                                 ft_error *err)
{
    if (a->Tk != a->T || a->cap != a->T)
        return ft_fail(err, FT_EINVAL, "attention backward needs Tk == T == cap (training without cache)");
    if (a->B <= 0 || a->T <= 0) return FT_OK;
    am_p p = am_params(a);
    const int items = a->B * a->KV;
    const am_grids grids = am_plan(&p, items, be->sms);
    const int splits = grids.splits;
    const size_t nq = (size_t)items * p.rows_item, nkv = (size_t)items * a->T * AM_HD;
    const am_scratch at = am_bwd_scratch(nq, splits, nkv);
    void *scr;
    FT_TRY(cuda_scratch(be, SCR_ATTN, at.floats * sizeof(float), &scr, err));
    float *D = (float *)scr, *dk_part = D + at.dk, *dv_part = D + at.dv;
    cudaStream_t s = be->stream;
    PROF_T0(be);
    ACT_DISPATCH(&be->base, T, {
        am_dot_kernel<T><<<grid_for(nq * AM_DOT_LANES, 256), 256, 0, s>>>(D, (const T *)dout, (const T *)out, p, items);
        am_dq_kernel<T><<<grids.rows, AM_THREADS, 0, s>>>((T *)dq, (const T *)dout, lse, D, (const T *)q,
                                                         (const T *)k, (const T *)v, p);
        PROF_MARK(be, PR_ATT_DQ);
        am_dkv_kernel<T><<<grids.keys, AM_THREADS, 0, s>>>(dk_part, dv_part, (const T *)dout, lse, D, (const T *)q,
                                                          (const T *)k, (const T *)v, p);
        PROF_MARK(be, PR_ATT_DK);
        am_split_sum_kernel<T><<<grid_for(nkv / 2, 256), 256, 0, s>>>((T *)dk, dk_part, splits, nkv);
        am_split_sum_kernel<T><<<grid_for(nkv / 2, 256), 256, 0, s>>>((T *)dv, dv_part, splits, nkv);
        PROF_MARK(be, PR_ATT_SUM);
    });
    LAUNCH_CHECK("attention backward (mma)");
    return FT_OK;
}
