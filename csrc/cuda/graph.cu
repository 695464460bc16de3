/* graph.cu -- recorded steps: the replay op of the CUDA backend.
 *
 * A decode step is ~400 launches of a few microseconds each; replayed as one CUDA graph, most of
 * the gaps between kernels go. Per slot, under one key:
 *
 *   call 1   runs the body directly, so that every scratch buffer it needs is allocated
 *            (nothing may be allocated while a graph is captured: a graph would keep a pointer
 *            the next step may not own);
 *   call 2   captures the body into a graph and launches it (a capture that fails, e.g. because
 *            an op refuses to be captured, turns the slot OFF: the body runs directly from then on);
 *   later    relaunch the graph.
 *
 * A recording is dropped (and the slot starts again at call 1) when the caller's key changes or
 * when a scratch buffer moved since it was made (be->scratch_gen).
 */
#include "cuda.cuh"

static void drop(cuda_replay_slot *s)
{
    if (s->exec) cudaGraphExecDestroy(s->exec);
    cudaGetLastError();
    s->exec = NULL;
    s->state = REPLAY_COLD;
}

void cuda_replay_release(cuda_backend *be)
{
    for (int i = 0; i < FT_REPLAY_SLOTS; i++) drop(&be->replay[i]);
}

/* Capture body into *exec (NULL when the capture failed: the caller runs body directly). */
static void capture(cuda_backend *be, ft_status (*body)(void *ctx, ft_error *err), void *ctx, cudaGraphExec_t *exec)
{
    *exec = NULL;
    if (cudaStreamBeginCapture(be->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return;
    }
    be->capturing = 1;
    ft_error cerr = {FT_OK, {0}};
    const ft_status st = body(ctx, &cerr);
    be->capturing = 0;
    cudaGraph_t g = NULL;
    const cudaError_t e = cudaStreamEndCapture(be->stream, &g);
    if (e == cudaSuccess && st == FT_OK && g && cudaGraphInstantiate(exec, g, 0) != cudaSuccess) *exec = NULL;
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
}

extern "C" ft_status cuda_replay(ft_backend *base, int slot, uint64_t key, ft_status (*body)(void *ctx, ft_error *err),
                                 void *ctx, ft_error *err)
{
    cuda_backend *be = CB(base);
    if (slot < 0 || slot >= FT_REPLAY_SLOTS) return ft_fail(err, FT_EINVAL, "replay slot %d out of range", slot);
    if (!be->graphs_on) return body(ctx, err); /* FT_CUDA_GRAPHS=0, or the profiler is on */
    cuda_replay_slot *s = &be->replay[slot];
    if (s->key != key || s->gen != be->scratch_gen) drop(s); /* what it recorded has moved */
    if (s->exec) {
        CUDA_TRY(cudaGraphLaunch(s->exec, be->stream), "launching a CUDA graph");
        return FT_OK;
    }
    if (s->state == REPLAY_OFF) return body(ctx, err);
    if (s->state == REPLAY_COLD) {
        FT_TRY(body(ctx, err));
        s->state = REPLAY_WARM;
        s->key = key;
        s->gen = be->scratch_gen; /* after the body: the buffers it grew are in place now */
        return FT_OK;
    }
    cudaGraphExec_t exec;
    capture(be, body, ctx, &exec);
    if (!exec) {
        s->state = REPLAY_OFF;
        return body(ctx, err);
    }
    s->exec = exec;
    CUDA_TRY(cudaGraphLaunch(exec, be->stream), "launching a CUDA graph");
    return FT_OK;
}
