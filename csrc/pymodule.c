/* pymodule.c -- falcontune._C: the module, its functions and constants, engine errors as Python
 * exceptions.
 *
 * The binding is split by job, and these files are the only ones that include Python.h and numpy:
 *   pymodule.c     the module: init, exceptions, module functions, the module table as constants
 *   py_convert.c   Python objects -> engine structs (array checks, config dict, checkpoint names)
 *   py_model.c     the Model type (one ft_model; busy guard; GIL released around compute)
 *   py_oprunner.c  the OpRunner type: one op of the backend table on numpy arrays (opdebug.c)
 * py_binding.h holds what they share.
 */
#define FT_PY_IMPORT_ARRAY /* this file calls import_array() for the whole extension */
#include "py_binding.h"

#include <string.h>

PyObject *ft_py_OutOfMemoryError, *ft_py_DeviceError;

PyObject *ft_py_raise(const ft_error *e)
{
    PyObject *type;
    switch (e->status) {
    case FT_EINVAL: type = PyExc_ValueError; break;
    case FT_ENOMEM: case FT_EDEVMEM: type = ft_py_OutOfMemoryError; break;
    case FT_EDEVICE: type = ft_py_DeviceError; break;
    case FT_EUNSUPPORTED: type = PyExc_NotImplementedError; break;
    default: type = PyExc_RuntimeError; break;
    }
    PyErr_SetString(type, e->msg[0] ? e->msg : "falcontune engine error");
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* the Falcon layer's modules (ft.h, common.c)                               */

/* Python's names of the fused qkv layouts, by ft_qkv_layout value */
static const char *const qkv_layouts[] = {
    [FT_QKV_MULTI_QUERY] = "multi_query",
    [FT_QKV_GROUPED] = "grouped",
    [FT_QKV_INTERLEAVED] = "interleaved",
};
enum { N_QKV_LAYOUTS = (int)(sizeof qkv_layouts / sizeof qkv_layouts[0]) };

static PyObject *mod_module_shapes(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"hidden", "ffn", "n_head", "n_kv_head", "head_dim", "qkv_layout", NULL};
    ft_config c;
    memset(&c, 0, sizeof c);
    const char *layout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "$iiiiis:module_shapes", kwlist, &c.hidden, &c.ffn, &c.n_head,
                                     &c.n_kv_head, &c.head_dim, &layout))
        return NULL;
    int found = 0;
    for (int i = 0; i < N_QKV_LAYOUTS && !found; i++)
        if (strcmp(layout, qkv_layouts[i]) == 0) {
            c.qkv_layout = (ft_qkv_layout)i;
            found = 1;
        }
    if (!found)
        return PyErr_Format(PyExc_ValueError,
                            "qkv_layout: expected 'multi_query', 'grouped' or 'interleaved', got '%s'", layout);
    PyObject *out = PyTuple_New(FT_NMOD);
    if (!out) return NULL;
    for (int mod = 0; mod < FT_NMOD; mod++) {
        const int in = ft_module_in(&c, mod), outw = ft_module_out(&c, mod);
        if (in <= 0 || outw <= 0) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_ValueError, "%s: in/out widths %d, %d are not positive 32-bit integers",
                                ft_module_name(mod), in, outw);
        }
        PyObject *pair = Py_BuildValue("(ii)", in, outw);
        if (!pair) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, mod, pair);
    }
    return out;
}

/* _C.MODULES: ((name, parent, in width, out width), ...) in FT_MOD_* order; _C.QKV_LAYOUTS */
static int add_layout_constants(PyObject *m)
{
    PyObject *mods = PyTuple_New(FT_NMOD), *layouts = PyTuple_New(N_QKV_LAYOUTS);
    int rc = -1;
    if (!mods || !layouts) goto done;
    for (int i = 0; i < FT_NMOD; i++) {
        const ft_module_desc *d = ft_module(i);
        PyObject *t = Py_BuildValue("(ssss)", d->name, d->parent, ft_width_name(d->in), ft_width_name(d->out));
        if (!t) goto done;
        PyTuple_SET_ITEM(mods, i, t);
    }
    for (int i = 0; i < N_QKV_LAYOUTS; i++) {
        PyObject *s = PyUnicode_FromString(qkv_layouts[i]);
        if (!s) goto done;
        PyTuple_SET_ITEM(layouts, i, s);
    }
    if (PyModule_AddObjectRef(m, "MODULES", mods) < 0 || PyModule_AddObjectRef(m, "QKV_LAYOUTS", layouts) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(mods);
    Py_XDECREF(layouts);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* module functions                                                          */

static PyObject *mod_have_cuda(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    return PyBool_FromLong(ft_have_cuda());
}

static PyObject *mod_cuda_device_count(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = ft_cuda_device_count();
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *mod_cuda_device_memory(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    size_t used = 0, total = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = ft_cuda_device_memory(&used, &total);
    Py_END_ALLOW_THREADS
    if (rc) Py_RETURN_NONE;
    return Py_BuildValue("(nn)", (Py_ssize_t)used, (Py_ssize_t)total);
}

static PyObject *mod_sample_token(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"logits", "prev", "repetition_penalty", "temperature", "top_k", "top_p", "u", NULL};
    PyObject *logits_obj, *prev_obj;
    float rep, temp, top_p;
    int top_k;
    double u;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOffifd:sample_token", kwlist, &logits_obj, &prev_obj, &rep, &temp,
                                     &top_k, &top_p, &u))
        return NULL;
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(logits_obj, NPY_FLOAT32, 1, 1,
                                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!in) return NULL;
    PyArrayObject *logits = (PyArrayObject *)PyArray_NewCopy(in, NPY_CORDER); /* sampled in place */
    Py_DECREF(in);
    PyArrayObject *prev = logits ? ft_py_int32_array(prev_obj, 1, "prev", 0) : NULL;
    const int V = logits ? (int)PyArray_DIM(logits, 0) : 0;
    int32_t *scratch = logits ? PyMem_Malloc((size_t)(V > 0 ? V : 1) * sizeof(int32_t)) : NULL;
    PyObject *ret = NULL;
    if (!logits || !prev || !scratch) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    if (V <= 0 || !(u >= 0.0 && u < 1.0) || !(temp >= 0.0f) || !(top_p > 0.0f && top_p <= 1.0f) || top_k < 0 ||
        !(rep > 0.0f)) {
        PyErr_SetString(PyExc_ValueError, "sample_token: need logits, u in [0,1), temperature >= 0, "
                                          "top_p in (0,1], top_k >= 0, repetition_penalty > 0");
        goto done;
    }
    int tok;
    Py_BEGIN_ALLOW_THREADS
    tok = ft_sample_token(PyArray_DATA(logits), V, PyArray_DATA(prev), (int)PyArray_DIM(prev, 0), rep, temp, top_k,
                          top_p, u, scratch);
    Py_END_ALLOW_THREADS
    ret = PyLong_FromLong(tok);
done:
    Py_XDECREF(logits);
    Py_XDECREF(prev);
    PyMem_Free(scratch);
    return ret;
}

static PyObject *mod_quantize_rtn(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"weight", "bits", "group_size", NULL};
    PyObject *wobj;
    int bits, group_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oii:quantize_rtn", kwlist, &wobj, &bits, &group_size)) return NULL;
    PyObject *keep = PyList_New(0);
    PyObject *ret = NULL, *qw = NULL, *qz = NULL, *sc = NULL, *gi = NULL;
    ft_host_tensor t;
    if (!keep || ft_py_host_tensor(wobj, keep, "weight", &t)) goto done;
    if (t.ndim != 2 || t.dtype == FT_I32) {
        PyErr_SetString(PyExc_ValueError, "quantize_rtn: expected a 2-d float weight [out, in]");
        goto done;
    }
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
        PyErr_Format(PyExc_ValueError, "quantize_rtn: bits must be 2, 3, 4 or 8, got %d", bits);
        goto done;
    }
    const npy_intp out = t.shape[0], in = t.shape[1];
    const npy_intp gs = group_size <= 0 ? in : group_size, G = (in + gs - 1) / gs;
    if ((in * bits) % 32 || (out * bits) % 32) {
        PyErr_Format(PyExc_ValueError, "quantize_rtn: a %zd x %zd weight does not pack into 32-bit words at %d bits",
                     (Py_ssize_t)out, (Py_ssize_t)in, bits);
        goto done;
    }
    npy_intp s_qw[2] = {in * bits / 32, out}, s_qz[2] = {G, out * bits / 32}, s_sc[2] = {G, out}, s_gi[1] = {in};
    qw = PyArray_SimpleNew(2, s_qw, NPY_INT32);
    qz = PyArray_SimpleNew(2, s_qz, NPY_INT32);
    sc = PyArray_SimpleNew(2, s_sc, NPY_FLOAT16);
    gi = PyArray_SimpleNew(1, s_gi, NPY_INT32);
    if (!qw || !qz || !sc || !gi) goto done;
    ENGINE(ft_gptq_quantize_rtn(t.data, t.dtype, (int)out, (int)in, bits, group_size,
                                PyArray_DATA((PyArrayObject *)qw), PyArray_DATA((PyArrayObject *)qz),
                                PyArray_DATA((PyArrayObject *)sc), PyArray_DATA((PyArrayObject *)gi), ERR),
           goto done);
    ret = Py_BuildValue("(OOOO)", qw, qz, sc, gi);
done:
    Py_XDECREF(keep);
    Py_XDECREF(qw);
    Py_XDECREF(qz);
    Py_XDECREF(sc);
    Py_XDECREF(gi);
    return ret;
}

/* dist_unique_id(nccl_lib) -> (128 bytes, NCCL version): rank 0's new group id (dist.c) */
static PyObject *mod_dist_unique_id(PyObject *self, PyObject *args, PyObject *kwds)
{
    (void)self;
    static char *kwlist[] = {"nccl_lib", NULL};
    const char *lib;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "s:dist_unique_id", kwlist, &lib)) return NULL;
    uint8_t id[FT_DIST_ID_BYTES];
    int version = 0;
    ENGINE(ft_dist_unique_id(lib, id, &version, ERR), return NULL);
    return Py_BuildValue("(y#i)", (const char *)id, (Py_ssize_t)FT_DIST_ID_BYTES, version);
}

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef module_methods[] = {
    {"quantize_rtn", KW mod_quantize_rtn, METH_VARARGS | METH_KEYWORDS,
     "quantize_rtn(weight, bits, group_size)\n--\n\n"
     "Round-to-nearest GPTQ packing of weight [out, in] (float16, float32 or (uint16, 'bfloat16')): "
     "(qweight, qzeros, scales, g_idx) in AutoGPTQ layout, zeros stored as is (GPTQ v2)."},
    {"module_shapes", KW mod_module_shapes, METH_VARARGS | METH_KEYWORDS,
     "module_shapes(*, hidden, ffn, n_head, n_kv_head, head_dim, qkv_layout)\n--\n\n"
     "(in_features, out_features) of each module of MODULES for this config; qkv_layout is one of QKV_LAYOUTS."},
    {"dist_unique_id", KW mod_dist_unique_id, METH_VARARGS | METH_KEYWORDS,
     "dist_unique_id(nccl_lib)\n--\n\n"
     "(id, version): a new NCCL group id (128 bytes) made with the library nccl_lib, and NCCL's version code."},
    {"have_cuda", mod_have_cuda, METH_NOARGS, "have_cuda()\n--\n\nTrue when built with the CUDA backend."},
    {"cuda_device_count", mod_cuda_device_count, METH_NOARGS,
     "cuda_device_count()\n--\n\nNumber of usable CUDA devices (0 without)."},
    {"cuda_device_memory", mod_cuda_device_memory, METH_NOARGS,
     "cuda_device_memory()\n--\n\n(bytes in use, total) of the current CUDA device, all processes; None without CUDA."},
    {"sample_token", KW mod_sample_token, METH_VARARGS | METH_KEYWORDS,
     "sample_token(logits, prev, repetition_penalty, temperature, top_k, top_p, u)\n--\n\n"
     "The next token id from logits [V] after penalty, temperature, top-k and top-p; u in [0, 1) draws it."},
    {NULL, NULL, 0, NULL},
};
#undef KW

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "falcontune._C",
    "The falcontune numeric engine. MODULES: (name, parent, in width, out width) of each linear of a Falcon "
    "layer, in the engine's module order.",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    if (PyType_Ready(&ft_py_ModelType) < 0 || PyType_Ready(&ft_py_OpRunnerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    ft_py_OutOfMemoryError = PyErr_NewExceptionWithDoc("falcontune._C.OutOfMemoryError",
                                                       "Host or GPU memory ran out; the model stays usable.",
                                                       PyExc_MemoryError, NULL);
    ft_py_DeviceError = PyErr_NewExceptionWithDoc("falcontune._C.DeviceError", "A CUDA runtime or cuBLAS error.",
                                                  PyExc_RuntimeError, NULL);
    if (!ft_py_OutOfMemoryError || !ft_py_DeviceError ||
        PyModule_AddObjectRef(m, "Model", (PyObject *)&ft_py_ModelType) < 0 ||
        PyModule_AddObjectRef(m, "OpRunner", (PyObject *)&ft_py_OpRunnerType) < 0 || ft_py_add_op_constants(m) < 0 ||
        PyModule_AddObjectRef(m, "OutOfMemoryError", ft_py_OutOfMemoryError) < 0 ||
        PyModule_AddObjectRef(m, "DeviceError", ft_py_DeviceError) < 0 || add_layout_constants(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
