/* py_binding.h -- what the files of falcontune._C share (pymodule.c, py_convert.c, py_model.c,
 * py_oprunner.c). These files are the binding: the only ones that include Python.h and numpy.
 * Each other C file of the engine sees ft.h / backend.h only.
 *
 * numpy's C API is a table of function pointers that import_array() fills once, in pymodule.c;
 * the other files reach the same table through PY_ARRAY_UNIQUE_SYMBOL and NO_IMPORT_ARRAY.
 */
#ifndef FT_PY_BINDING_H
#define FT_PY_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL falcontune_ARRAY_API
#ifndef FT_PY_IMPORT_ARRAY /* defined by pymodule.c only, which calls import_array() */
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "ft.h"

/* ---- errors (pymodule.c) ---- */
/* falcontune._C.OutOfMemoryError (a MemoryError) and DeviceError (a RuntimeError) */
extern PyObject *ft_py_OutOfMemoryError, *ft_py_DeviceError;
/* Raise the Python exception matching an engine error; returns NULL. */
PyObject *ft_py_raise(const ft_error *e);

/* Run `call`, an ft_status expression whose error argument is ERR, with the GIL released; on
 * failure raise the engine's error and run `on_fail` (e.g. `return NULL` or `goto done`). */
#define ERR (&engine_err_)
#define ENGINE(call, on_fail)                     \
    do {                                          \
        ft_error engine_err_ = {0};               \
        ft_status engine_st_;                     \
        Py_BEGIN_ALLOW_THREADS                    \
        engine_st_ = (call);                      \
        Py_END_ALLOW_THREADS                      \
        if (engine_st_ != FT_OK) {                \
            ft_py_raise(&engine_err_);            \
            on_fail;                              \
        }                                         \
    } while (0)

/* PyModule_AddObjectRef arrived in Python 3.10; the project supports 3.9. */
#if PY_VERSION_HEX < 0x030A0000
static inline int PyModule_AddObjectRef(PyObject *m, const char *name, PyObject *value)
{
    Py_XINCREF(value);
    int rc = PyModule_AddObject(m, name, value); /* steals the reference only on success */
    if (rc < 0) Py_XDECREF(value);
    return rc;
}
#endif

/* ---- numpy arguments (py_convert.c) ---- */
/* A C-contiguous int32 copy of an integer array (bool too when allow_bool) of rank ndim, every
 * value range-checked; `what` names the argument in messages. */
PyArrayObject *ft_py_int32_array(PyObject *obj, int ndim, const char *what, int allow_bool);
/* A C-contiguous float32 array of exactly `shape` from a float array (no silent casts from
 * integers); a copy when obj is not already one. */
PyArrayObject *ft_py_f32_array(PyObject *obj, int ndim, const npy_intp *shape, const char *what);
/* A host tensor viewing `obj`: an ndarray (float16, float32 or int32), or (uint16 ndarray,
 * "bfloat16"); C-contiguous, aligned, native-endian, rank 1 or 2. The array is appended to `keep`
 * (the engine points into it). `name` (kept by the caller) names it in messages. */
int ft_py_host_tensor(PyObject *obj, PyObject *keep, const char *name, ft_host_tensor *t);
/* The engine config and the GPTQ bits / zero offset from the dict falcontune.model builds. */
int ft_py_parse_config(PyObject *d, ft_config *c, int *bits, int *zero_offset);
/* Bind every tensor the config needs from `weights` (name -> array): checkpoint names are built
 * from the module table. names: n_layer * FT_PY_NAMES_PER_LAYER + FT_PY_NAMES_GLOBAL buffers that
 * must outlive the engine call (messages point at them). */
typedef char ft_py_name[128];
enum { FT_PY_NAMES_GLOBAL = 4, FT_PY_NAMES_PER_LAYER = 4 + 5 * FT_NMOD };
int ft_py_bind_weights(PyObject *weights, PyObject *keep, const ft_config *c, ft_host_weights *w,
                       ft_host_layer *layers, ft_py_name *names);

/* ---- types ---- */
extern PyTypeObject ft_py_ModelType;    /* py_model.c */
extern PyTypeObject ft_py_OpRunnerType; /* py_oprunner.c */
/* _C.OPS: (name, coverage) of every entry of the backend op table (py_oprunner.c) */
int ft_py_add_op_constants(PyObject *module);

#endif /* FT_PY_BINDING_H */
