/* nccl_api.h -- the few NCCL entry points falcontune uses, declared here so that the build needs
 * neither NCCL nor its header: dist.c loads the library at run time (dlopen) and looks each one
 * up by name. NCCL's C ABI is stable across 2.x; the values below are those of its nccl.h
 * (ncclResult_t ncclSuccess = 0, ncclDataType_t ncclFloat32 = 7, ncclRedOp_t ncclSum = 0, and a
 * ncclUniqueId of 128 bytes passed by value).
 *
 * Private to dist.c and cuda/nccl.cu.
 */
#ifndef FT_NCCL_API_H
#define FT_NCCL_API_H

#include <stddef.h>

#include "ft.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct ft_nccl_id {
    char internal[FT_DIST_ID_BYTES];
} ft_nccl_id;                                /* ncclUniqueId */
typedef struct ft_nccl_comm *ft_nccl_comm_t; /* ncclComm_t: opaque */
typedef int ft_nccl_result;                  /* ncclResult_t */
enum { FT_NCCL_SUCCESS = 0 };
enum { FT_NCCL_FLOAT32 = 7 }; /* ncclDataType_t */
enum { FT_NCCL_SUM = 0 };     /* ncclRedOp_t */

/* The loaded library and its entry points. */
typedef struct ft_nccl {
    void *lib; /* dlopen handle */
    char path[512];
    int version; /* ncclGetVersion: 22304 for 2.23.4 */
    ft_nccl_result (*get_version)(int *version);
    ft_nccl_result (*get_unique_id)(ft_nccl_id *id);
    ft_nccl_result (*comm_init_rank)(ft_nccl_comm_t *comm, int nranks, ft_nccl_id id, int rank);
    ft_nccl_result (*all_reduce)(const void *send, void *recv, size_t count, int dtype, int op, ft_nccl_comm_t comm,
                                 void *stream /* cudaStream_t */);
    ft_nccl_result (*comm_destroy)(ft_nccl_comm_t comm);
    ft_nccl_result (*comm_abort)(ft_nccl_comm_t comm);
    ft_nccl_result (*comm_get_async_error)(ft_nccl_comm_t comm, ft_nccl_result *async_error);
    const char *(*get_error_string)(ft_nccl_result result);
    const char *(*get_last_error)(ft_nccl_comm_t comm); /* NCCL >= 2.13; NULL before */
} ft_nccl;

/* FT_OK when r is ncclSuccess; otherwise FT_EDEVICE with "<what>: NCCL <version> error <r>
 * (<its string>): <NCCL's last error message, when it has one>". comm may be NULL. */
ft_status ft_nccl_check(const ft_nccl *n, ft_nccl_comm_t comm, ft_nccl_result r, const char *what, ft_error *err);

#ifdef FT_WITH_CUDA
/* cuda/nccl.cu: a communicator on one GPU, with its own stream. */
typedef struct ft_cuda_comm ft_cuda_comm;
/* Make `device` current and join group `id` (blocks until every rank has joined). */
ft_status ft_cuda_comm_create(const ft_nccl *n, int device, const ft_nccl_id *id, int rank, int world,
                              ft_cuda_comm **out, ft_error *err);
/* Sum buf[count] (device memory of that GPU) over the ranks, in place; returns once the sum is
 * there, or with the error NCCL reports (the communicator is then aborted and unusable). */
ft_status ft_cuda_comm_allreduce_f32(const ft_nccl *n, ft_cuda_comm *c, float *buf, size_t count, ft_error *err);
void ft_cuda_comm_free(const ft_nccl *n, ft_cuda_comm *c);
#endif

#ifdef __cplusplus
}
#endif
#endif /* FT_NCCL_API_H */
