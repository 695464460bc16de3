/* py_convert.c -- Python objects to engine structs: numpy arrays checked for dtype, rank, shape
 * and layout; the config dict; the checkpoint's tensors by name (names built from the module
 * table of common.c). Nothing here runs the engine. */
#include "py_binding.h" /* Python.h first, as it asks */

#include <stdio.h>
#include <string.h>

PyArrayObject *ft_py_int32_array(PyObject *obj, int ndim, const char *what, int allow_bool)
{
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(obj, NPY_NOTYPE, 0, 0, 0);
    if (!in) return NULL;
    if (!PyArray_ISINTEGER(in) && !(allow_bool && PyArray_ISBOOL(in))) {
        PyErr_Format(PyExc_TypeError, "%s: expected an integer array, got dtype %R", what,
                     (PyObject *)PyArray_DESCR(in));
        Py_DECREF(in);
        return NULL;
    }
    if (PyArray_NDIM(in) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", what, ndim, PyArray_NDIM(in));
        Py_DECREF(in);
        return NULL;
    }
    PyArrayObject *wide = (PyArrayObject *)PyArray_FROMANY((PyObject *)in, NPY_INT64, ndim, ndim,
                                                           NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    Py_DECREF(in);
    if (!wide) return NULL;
    npy_intp n = PyArray_SIZE(wide);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(ndim, PyArray_DIMS(wide), NPY_INT32);
    if (!out) {
        Py_DECREF(wide);
        return NULL;
    }
    const int64_t *src = PyArray_DATA(wide);
    int32_t *dst = PyArray_DATA(out);
    for (npy_intp i = 0; i < n; i++) {
        if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s: value %lld at flat index %zd does not fit in int32", what,
                         (long long)src[i], (Py_ssize_t)i);
            Py_DECREF(wide);
            Py_DECREF(out);
            return NULL;
        }
        dst[i] = (int32_t)src[i];
    }
    Py_DECREF(wide);
    return out;
}

PyArrayObject *ft_py_f32_array(PyObject *obj, int ndim, const npy_intp *shape, const char *what)
{
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(obj, NPY_NOTYPE, 0, 0, 0);
    if (!in) return NULL;
    if (!PyArray_ISFLOAT(in)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a float array, got dtype %R", what, (PyObject *)PyArray_DESCR(in));
        Py_DECREF(in);
        return NULL;
    }
    int ok = PyArray_NDIM(in) == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = PyArray_DIM(in, i) == shape[i];
    if (!ok) {
        PyObject *got = PyObject_GetAttrString((PyObject *)in, "shape");
        if (ndim == 2)
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%zd, %zd), got %R", what, (Py_ssize_t)shape[0],
                         (Py_ssize_t)shape[1], got);
        else if (ndim == 1)
            PyErr_Format(PyExc_ValueError, "%s: expected shape (%zd,), got %R", what, (Py_ssize_t)shape[0], got);
        else
            PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %R", what, ndim, got);
        Py_XDECREF(got);
        Py_DECREF(in);
        return NULL;
    }
    PyArrayObject *out = (PyArrayObject *)PyArray_FROMANY((PyObject *)in, NPY_FLOAT32, ndim, ndim,
                                                          NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                              NPY_ARRAY_FORCECAST);
    Py_DECREF(in);
    return out;
}

int ft_py_host_tensor(PyObject *item, PyObject *keep, const char *name, ft_host_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    int bf16 = 0;
    PyObject *arr_obj = item;
    if (PyTuple_Check(item)) {
        if (PyTuple_GET_SIZE(item) != 2 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 1)) ||
            PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(item, 1), "bfloat16") != 0) {
            PyErr_Format(PyExc_TypeError, "%s: expected an array or (uint16 array, 'bfloat16')", name);
            return -1;
        }
        arr_obj = PyTuple_GET_ITEM(item, 0);
        bf16 = 1;
    }
    if (!PyArray_Check(arr_obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy array", name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)arr_obj;
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || PyArray_ISBYTESWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous, aligned, native-endian array", name);
        return -1;
    }
    if (PyArray_NDIM(a) < 1 || PyArray_NDIM(a) > 2) {
        PyErr_Format(PyExc_ValueError, "%s: expected 1 or 2 dimensions, got %d", name, PyArray_NDIM(a));
        return -1;
    }
    int type = PyArray_TYPE(a);
    if (bf16) {
        if (type != NPY_UINT16) {
            PyErr_Format(PyExc_TypeError, "%s: bfloat16 data must come as a uint16 array", name);
            return -1;
        }
        t->dtype = FT_BF16;
    } else if (type == NPY_FLOAT32) {
        t->dtype = FT_F32;
    } else if (type == NPY_FLOAT16) {
        t->dtype = FT_F16;
    } else if (type == NPY_INT32) {
        t->dtype = FT_I32;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: unsupported dtype %R (expected float16, bfloat16, float32 or int32)", name,
                     (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    t->data = PyArray_DATA(a);
    t->ndim = PyArray_NDIM(a);
    t->shape[0] = PyArray_DIM(a, 0);
    t->shape[1] = t->ndim > 1 ? PyArray_DIM(a, 1) : 0;
    return PyList_Append(keep, arr_obj);
}

/* One weight by name; absent and not required leaves t empty (data NULL). */
static int weight(PyObject *weights, PyObject *keep, const char *name, int required, ft_host_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    PyObject *item = PyDict_GetItemString(weights, name); /* borrowed */
    if (!item) {
        if (!required) return 0;
        PyErr_Format(PyExc_KeyError, "missing tensor %s in the checkpoint", name);
        return -1;
    }
    return ft_py_host_tensor(item, keep, name, t);
}

static int get_int(PyObject *d, const char *key, int *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "config: missing '%s'", key);
        return -1;
    }
    long x = PyLong_AsLong(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    if (x < INT32_MIN || x > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "config: '%s' out of range", key);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int get_float(PyObject *d, const char *key, float *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v) {
        PyErr_Format(PyExc_KeyError, "config: missing '%s'", key);
        return -1;
    }
    double x = PyFloat_AsDouble(v);
    if (x == -1.0 && PyErr_Occurred()) return -1;
    *out = (float)x;
    return 0;
}

int ft_py_parse_config(PyObject *d, ft_config *c, int *bits, int *zero_offset)
{
    memset(c, 0, sizeof *c);
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "config must be a dict");
        return -1;
    }
    int layout;
    if (get_int(d, "vocab_size", &c->vocab_size) || get_int(d, "hidden", &c->hidden) ||
        get_int(d, "n_head", &c->n_head) || get_int(d, "n_kv_head", &c->n_kv_head) ||
        get_int(d, "n_layer", &c->n_layer) || get_int(d, "head_dim", &c->head_dim) || get_int(d, "ffn", &c->ffn) ||
        get_int(d, "qkv_layout", &layout) || get_int(d, "parallel_attn", &c->parallel_attn) ||
        get_int(d, "n_ln", &c->n_ln) || get_int(d, "alibi", &c->alibi) || get_int(d, "bias", &c->bias) ||
        get_float(d, "ln_eps", &c->ln_eps) || get_float(d, "rope_theta", &c->rope_theta) ||
        get_int(d, "bits", bits) || get_int(d, "zero_offset", zero_offset))
        return -1;
    c->qkv_layout = (ft_qkv_layout)layout;
    return 0;
}

int ft_py_bind_weights(PyObject *weights, PyObject *keep, const ft_config *c, ft_host_weights *w,
                       ft_host_layer *layers, ft_py_name *names)
{
    int k = 0;
#define NAME(...) (snprintf(names[k], sizeof names[k], __VA_ARGS__), names[k++])
    if (weight(weights, keep, NAME("transformer.word_embeddings.weight"), 1, &w->embed) ||
        weight(weights, keep, NAME("transformer.ln_f.weight"), 1, &w->lnf_w) ||
        weight(weights, keep, NAME("transformer.ln_f.bias"), 1, &w->lnf_b) ||
        weight(weights, keep, NAME("lm_head.weight"), 0, &w->lm_head))
        return -1;
    const int two_ln = c->parallel_attn && c->n_ln == 2;
    const char *ln1 = two_ln ? "ln_attn" : "input_layernorm";
    const char *ln2 = two_ln ? "ln_mlp" : "post_attention_layernorm";
    const int want_ln2 = two_ln || !c->parallel_attn;
    for (int l = 0; l < c->n_layer; l++) {
        ft_host_layer *hl = &layers[l];
        if (weight(weights, keep, NAME("transformer.h.%d.%s.weight", l, ln1), 1, &hl->ln1_w) ||
            weight(weights, keep, NAME("transformer.h.%d.%s.bias", l, ln1), 1, &hl->ln1_b) ||
            weight(weights, keep, NAME("transformer.h.%d.%s.weight", l, ln2), want_ln2, &hl->ln2_w) ||
            weight(weights, keep, NAME("transformer.h.%d.%s.bias", l, ln2), want_ln2, &hl->ln2_b))
            return -1;
        for (int mod = 0; mod < FT_NMOD; mod++) {
            ft_host_qlinear *q = &hl->lin[mod];
            const char *pa = ft_module(mod)->parent, *nm = ft_module(mod)->name;
#define LIN(part) NAME("transformer.h.%d.%s.%s." part, l, pa, nm)
            if (weight(weights, keep, LIN("qweight"), 1, &q->qweight) ||
                weight(weights, keep, LIN("qzeros"), 1, &q->qzeros) ||
                weight(weights, keep, LIN("scales"), 1, &q->scales) ||
                weight(weights, keep, LIN("g_idx"), 1, &q->g_idx) ||
                weight(weights, keep, LIN("bias"), 0, &q->bias))
                return -1;
#undef LIN
            if (c->bias && !q->bias.data) {
                PyErr_Format(PyExc_KeyError, "missing tensor %s (the config says bias=true)", q->bias.name);
                return -1;
            }
        }
    }
#undef NAME
    return 0;
}
