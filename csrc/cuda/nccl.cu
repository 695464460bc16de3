/* nccl.cu -- the CUDA side of data parallel training (dist.c): an NCCL communicator on one GPU, with
 * its own stream, and the in-place sum of a float buffer over the ranks.
 *
 * NCCL's functions come from the library dist.c loaded (nccl_api.h); nothing here links NCCL. The
 * all-reduce is waited for by polling: a rank that fails elsewhere makes NCCL report an
 * asynchronous error instead of leaving this one blocked in cudaStreamSynchronize forever.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "cuda.cuh"
#include "../nccl_api.h"

struct ft_cuda_comm {
    int device;
    cudaStream_t stream;
    ft_nccl_comm_t comm;
};

extern "C" void ft_cuda_comm_free(const ft_nccl *n, ft_cuda_comm *c)
{
    if (!c) return;
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != c->device) cudaSetDevice(c->device);
    if (c->comm) n->comm_destroy(c->comm);
    if (c->stream) cudaStreamDestroy(c->stream);
    cudaGetLastError(); /* teardown errors are not the next caller's */
    free(c);
}

extern "C" ft_status ft_cuda_comm_create(const ft_nccl *n, int device, const ft_nccl_id *id, int rank, int world,
                                         ft_cuda_comm **out, ft_error *err)
{
    *out = NULL;
    CUDA_TRY(cudaSetDevice(device), "cudaSetDevice (NCCL)");
    ft_cuda_comm *c = (ft_cuda_comm *)calloc(1, sizeof *c);
    if (!c) return ft_fail(err, FT_ENOMEM, "out of host memory");
    c->device = device;
    ft_status st = FT_OK;
    cudaError_t e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        c->stream = NULL;
        st = cuda_fail(err, e, "creating the NCCL stream");
    }
    if (!st) {
        char what[96];
        snprintf(what, sizeof what, "ncclCommInitRank (rank %d of %d, cuda:%d)", rank, world, device);
        ft_nccl_result r = n->comm_init_rank(&c->comm, world, *id, rank);
        if (r != FT_NCCL_SUCCESS) c->comm = NULL;
        st = ft_nccl_check(n, NULL, r, what, err);
    }
    if (st) {
        ft_cuda_comm_free(n, c);
        return st;
    }
    *out = c;
    return FT_OK;
}

extern "C" ft_status ft_cuda_comm_allreduce_f32(const ft_nccl *n, ft_cuda_comm *c, float *buf, size_t count,
                                                ft_error *err)
{
    if (!c->comm) return ft_fail(err, FT_ESTATE, "the NCCL communicator was aborted by an earlier error");
    CUDA_TRY(cudaSetDevice(c->device), "cudaSetDevice (NCCL)");
    ft_status st = ft_nccl_check(n, c->comm,
                                 n->all_reduce(buf, buf, count, FT_NCCL_FLOAT32, FT_NCCL_SUM, c->comm, c->stream),
                                 "ncclAllReduce of the LoRA gradients", err);
    const struct timespec pause = {0, 50 * 1000}; /* 50 us between polls */
    while (!st) {
        cudaError_t e = cudaStreamQuery(c->stream);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) {
            st = cuda_fail(err, e, "the NCCL all-reduce");
            break;
        }
        ft_nccl_result async_error = FT_NCCL_SUCCESS;
        st = ft_nccl_check(n, c->comm, n->comm_get_async_error(c->comm, &async_error), "ncclCommGetAsyncError", err);
        if (!st) st = ft_nccl_check(n, c->comm, async_error, "ncclAllReduce of the LoRA gradients", err);
        if (!st) nanosleep(&pause, NULL);
    }
    if (st) { /* the group is broken: free its resources now, later calls say so */
        n->comm_abort(c->comm);
        c->comm = NULL;
    }
    return st;
}
