/* dist.c -- data parallel training over NCCL: the library loaded at run time, group ids, and the
 * all-reduce of a model's flat LoRA gradients (ft.h, "data parallel").
 *
 * NCCL is found by the caller (Python: the nvidia-nccl-cu12/-cu13 wheel's nvidia/nccl/lib, or
 * the system's libnccl.so.2) and opened here with dlopen; nccl_api.h declares the entry points, so the
 * build needs no NCCL. The CUDA side (device, stream, communicator) is cuda/nccl.cu. The CPU
 * backend has no ft_dist: its gradients are summed over MPI by the caller (ft_lora_grad_flat).
 *
 * Each ft_dist owns its loaded library handle and communicator; nothing here is global.
 */
#define _POSIX_C_SOURCE 200809L /* setenv, dlopen with -std=c11 */

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model_internal.h"
#include "nccl_api.h"

/* ncclGetUniqueId starts the group's bootstrap thread inside the library, and the ranks reach it
 * later from ncclCommInitRank: the library must stay mapped (and keep its state) between
 * ft_dist_unique_id and ft_dist_create, so it is never unloaded once loaded. dlclose then only
 * drops the handle; the next dlopen of the same file finds the same, still running copy. */
#ifdef RTLD_NODELETE
#define NCCL_KEEP_LOADED RTLD_NODELETE
#else
#error "dlopen needs RTLD_NODELETE here (glibc, musl and macOS have it)"
#endif

/* NVLink SHARP (multicast) stays off unless the user chose otherwise: it reserves memory on every
 * GPU of the node and has hung on some drivers; a LoRA gradient gains nothing from it. Set before
 * the first NCCL call, which may read its settings. */
static ft_status nvls_off(ft_error *err)
{
    if (setenv("NCCL_NVLS_ENABLE", "0", 0) != 0)
        return ft_fail(err, FT_ENOMEM, "setting NCCL_NVLS_ENABLE=0 in the environment failed");
    return FT_OK;
}

struct ft_dist {
    ft_nccl nccl;
    const ft_backend *be; /* the backend of the model it was made with (checked at each call) */
    int rank, world;
#ifdef FT_WITH_CUDA
    ft_cuda_comm *comm;
#endif
};

/* NCCL's version code as major, minor, patch: X*10000 + Y*100 + Z since 2.9, X*1000 + Y*100 + Z before */
static void nccl_version(int code, int v[3])
{
    const int major_unit = code >= 10000 ? 10000 : 1000;
    v[0] = code / major_unit;
    v[1] = (code % major_unit) / 100;
    v[2] = code % 100;
}

ft_status ft_nccl_check(const ft_nccl *n, ft_nccl_comm_t comm, ft_nccl_result r, const char *what, ft_error *err)
{
    if (r == FT_NCCL_SUCCESS) return FT_OK;
    const char *text = n->get_error_string ? n->get_error_string(r) : NULL;
    const char *last = n->get_last_error ? n->get_last_error(comm) : NULL;
    int v[3];
    nccl_version(n->version, v);
    return ft_fail(err, FT_EDEVICE, "%s: NCCL %d.%d.%d error %d (%s)%s%s", what, v[0], v[1], v[2], r,
                   text ? text : "?", last && *last ? ": " : "", last && *last ? last : "");
}

static void nccl_close(ft_nccl *n)
{
    if (n->lib) dlclose(n->lib);
    memset(n, 0, sizeof *n);
}

/* One entry point by name into *fn_field (a function pointer of ft_nccl, copied bytewise: POSIX
 * makes a function pointer and the void * of dlsym the same size); a missing required one is an
 * error naming it, an optional one stays NULL. */
static ft_status nccl_symbol(ft_nccl *n, const char *name, int required, void *fn_field, ft_error *err)
{
    dlerror();
    void *sym = dlsym(n->lib, name);
    if (!sym && required)
        return ft_fail(err, FT_EUNSUPPORTED, "%s has no %s: it is not a usable NCCL 2 library", n->path, name);
    memcpy(fn_field, &sym, sizeof sym);
    return FT_OK;
}

/* Load NCCL from `path` into *n (zeroed first); on failure *n holds nothing. */
static ft_status nccl_open(const char *path, ft_nccl *n, ft_error *err)
{
    memset(n, 0, sizeof *n);
    if (!path || !*path) return ft_fail(err, FT_EINVAL, "no NCCL library given");
    if (strlen(path) >= sizeof n->path) return ft_fail(err, FT_EINVAL, "NCCL library path too long");
    strcpy(n->path, path);
    n->lib = dlopen(path, RTLD_NOW | RTLD_LOCAL | NCCL_KEEP_LOADED);
    if (!n->lib) {
        const char *why = dlerror();
        return ft_fail(err, FT_EUNSUPPORTED, "cannot load NCCL from %s: %s", path, why ? why : "dlopen failed");
    }
    _Static_assert(sizeof n->get_version == sizeof(void *), "function pointers are as wide as void *");
    struct {
        const char *name;
        void *fn_field;
        int required;
    } syms[] = {
        {"ncclGetVersion", &n->get_version, 1},
        {"ncclGetUniqueId", &n->get_unique_id, 1},
        {"ncclCommInitRank", &n->comm_init_rank, 1},
        {"ncclAllReduce", &n->all_reduce, 1},
        {"ncclCommDestroy", &n->comm_destroy, 1},
        {"ncclCommAbort", &n->comm_abort, 1},
        {"ncclCommGetAsyncError", &n->comm_get_async_error, 1},
        {"ncclGetErrorString", &n->get_error_string, 1},
        {"ncclGetLastError", &n->get_last_error, 0},
    };
    ft_status st = FT_OK;
    for (size_t i = 0; i < sizeof syms / sizeof syms[0] && !st; i++)
        st = nccl_symbol(n, syms[i].name, syms[i].required, syms[i].fn_field, err);
    if (!st) st = ft_nccl_check(n, NULL, n->get_version(&n->version), "ncclGetVersion", err);
    if (!st) {
        int v[3];
        nccl_version(n->version, v);
        if (v[0] < 2 || (v[0] == 2 && v[1] < 4)) /* ncclCommGetAsyncError, ncclCommAbort: 2.4 */
            st = ft_fail(err, FT_EUNSUPPORTED, "%s is NCCL %d.%d.%d; falcontune needs NCCL 2.4 or newer", path, v[0],
                         v[1], v[2]);
    }
    if (st) nccl_close(n);
    return st;
}

ft_status ft_dist_unique_id(const char *nccl_lib, uint8_t id[FT_DIST_ID_BYTES], int *version, ft_error *err)
{
    ft_nccl n;
    CALL(nvls_off(err));
    CALL(nccl_open(nccl_lib, &n, err));
    ft_nccl_id uid;
    memset(&uid, 0, sizeof uid);
    ft_status st = ft_nccl_check(&n, NULL, n.get_unique_id(&uid), "ncclGetUniqueId", err);
    if (!st) {
        memcpy(id, uid.internal, FT_DIST_ID_BYTES);
        *version = n.version;
    }
    nccl_close(&n);
    return st;
}

ft_status ft_dist_create(ft_model *m, const char *nccl_lib, const uint8_t id[FT_DIST_ID_BYTES], int rank, int world,
                         ft_dist **out, ft_error *err)
{
    *out = NULL;
    if (world < 1 || rank < 0 || rank >= world)
        return ft_fail(err, FT_EINVAL, "rank %d of a world of %d: expected 0 <= rank < world", rank, world);
    int device;
    CALL(ft_parse_device(m->device, &device, err));
    if (device < 0)
        return ft_fail(err, FT_EUNSUPPORTED, "NCCL runs on CUDA models; this model is on %s (the CPU backend's "
                                             "gradients are summed over MPI, through ft_lora_grad_flat)", m->device);
#ifndef FT_WITH_CUDA
    (void)nccl_lib;
    (void)id;
    return ft_fail(err, FT_EUNSUPPORTED, "this build of falcontune has no CUDA backend");
#else
    CALL(nvls_off(err));
    ft_dist *d = calloc(1, sizeof *d);
    if (!d) return ft_fail(err, FT_ENOMEM, "out of host memory");
    ft_status st = nccl_open(nccl_lib, &d->nccl, err);
    if (!st) {
        ft_nccl_id uid;
        memcpy(uid.internal, id, FT_DIST_ID_BYTES);
        st = ft_cuda_comm_create(&d->nccl, device, &uid, rank, world, &d->comm, err);
    }
    if (st) {
        ft_dist_free(d);
        return st;
    }
    d->be = m->be;
    d->rank = rank;
    d->world = world;
    *out = d;
    return FT_OK;
#endif
}

ft_status ft_dist_allreduce_grad(ft_dist *d, ft_model *m, ft_error *err)
{
    if (m->be != d->be) return ft_fail(err, FT_EINVAL, "ft_dist_allreduce_grad: not the model the group was made with");
    if (!m->lora_r) return ft_fail(err, FT_ESTATE, "the model has no LoRA adapter");
#ifdef FT_WITH_CUDA
    /* NCCL runs on its own stream: the model's queued work (the backward that wrote the gradients)
     * is finished first, and the sum is complete before the next op of the model is queued */
    CALL(m->be->ops->sync(m->be, err));
    return ft_cuda_comm_allreduce_f32(&d->nccl, d->comm, m->lora_buf[FT_LORA_GRAD], m->lora_n, err);
#else
    return ft_fail(err, FT_EUNSUPPORTED, "this build of falcontune has no CUDA backend");
#endif
}

int ft_dist_rank(const ft_dist *d) { return d->rank; }
int ft_dist_world(const ft_dist *d) { return d->world; }

void ft_dist_free(ft_dist *d)
{
    if (!d) return;
#ifdef FT_WITH_CUDA
    if (d->comm) ft_cuda_comm_free(&d->nccl, d->comm);
#endif
    nccl_close(&d->nccl);
    free(d);
}
