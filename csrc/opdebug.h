/* opdebug.h -- run ONE op of a backend's op table (backend.h) on host arrays: upload, run,
 * download. For tests that compare an op with a float64 reference (CPU) or the CUDA op with the
 * CPU op, so a mismatch names the op (as ggml's test-backend-ops, llm.c's dev/cuda). Not used by
 * the model; exposed to Python as falcontune._C.OpRunner.
 *
 * Values are named as the op's arguments are in backend.h (x, y, dy, N, D, ...). Every array the
 * op touches is given, outputs included (their initial contents are uploaded too, so "=" ops
 * must overwrite them and "+=" ops add to them), and every array is downloaded back into the
 * caller's array after the op: inputs come back as the device held them (act arrays rounded to the
 * act dtype). Arrays are flat here; the scalars give their shapes, and each count is checked.
 */
#ifndef FT_OPDEBUG_H
#define FT_OPDEBUG_H

#include "ft.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FT_OPV_F32 = 0,  /* host float array: act, w or f32 argument */
    FT_OPV_I32 = 1,  /* host int32 array */
    FT_OPV_INT = 2,  /* integer scalar (in `number`) */
    FT_OPV_FLOAT = 3 /* float scalar */
} ft_opv_kind;

typedef struct ft_op_value {
    const char *name;
    ft_opv_kind kind;
    void *data;    /* arrays: float or int32_t [count], written back after the op */
    int64_t count;
    double number; /* scalars */
} ft_op_value;

typedef struct ft_op_runner ft_op_runner;

/* A runner owns one backend. device: as ft_model_create; act_dtype -1: the device's default. */
ft_status ft_op_runner_create(const char *device, int act_dtype, ft_op_runner **out, ft_error *err);
void ft_op_runner_free(ft_op_runner *r);
ft_dtype ft_op_runner_act_dtype(const ft_op_runner *r);
const char *ft_op_runner_backend(const ft_op_runner *r); /* "cpu", "cuda" */
/* Bytes the runner's backend holds now and at most (0, 0 when it does not count). */
ft_status ft_op_runner_memory(ft_op_runner *r, size_t *current, size_t *peak, ft_error *err);

/* Run op `name` once on vals[0..n). graph: run it once directly (creating any scratch), restore
 * every input, then capture the op in a backend graph and replay that (FT_EUNSUPPORTED when the
 * backend has no graphs). A host scalar result (sumsq) goes to *result with *has_result = 1. */
ft_status ft_op_run(ft_op_runner *r, const char *name, ft_op_value *vals, int n, int graph, double *result,
                    int *has_result, ft_error *err);

/* Every entry of ft_backend_ops, in its order, with how the runner covers it. */
int ft_op_count(void);
const char *ft_op_name(int i);
/* "run": ft_op_run runs it; "memory": every run uploads/downloads/allocates/frees through it;
 * "weights": run inside the runs of the ops that need it; "graph": run by graph runs;
 * "lifetime" / "accounting": the runner's create, free and memory functions. */
const char *ft_op_coverage(int i);

#ifdef __cplusplus
}
#endif
#endif /* FT_OPDEBUG_H */
