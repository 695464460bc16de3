/* pymodule.c -- falcontune._C: the only file that includes Python.h and numpy.
 *
 * Converts Python objects to engine structs (checking dtype, shape and
 * contiguity of every array), releases the GIL around compute, and maps
 * engine errors to Python exceptions. Arrays handed to the engine as weights
 * are kept alive by the Model object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <stdio.h>
#include <string.h>

#include "cost.h"
#include "ft.h"

static PyObject *OutOfMemoryError; /* falcontune._C.OutOfMemoryError(MemoryError) */
static PyObject *DeviceError;      /* falcontune._C.DeviceError(RuntimeError) */

static PyObject *raise_ft(const ft_error *e)
{
    PyObject *type;
    switch (e->status) {
    case FT_EINVAL: type = PyExc_ValueError; break;
    case FT_ENOMEM: case FT_EDEVMEM: type = OutOfMemoryError; break;
    case FT_EDEVICE: type = DeviceError; break;
    case FT_EUNSUPPORTED: type = PyExc_NotImplementedError; break;
    default: type = PyExc_RuntimeError; break;
    }
    PyErr_SetString(type, e->msg[0] ? e->msg : "falcontune engine error");
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* argument helpers                                                          */

/* A C-contiguous int32 copy of an integer array (bool too when allow_bool) of the given rank,
 * range-checked. */
static PyArrayObject *int32_array(PyObject *obj, int ndim, const char *what, int allow_bool)
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

/* A C-contiguous float32 array of exactly the given shape (no silent casts from non-floats). */
static PyArrayObject *f32_array(PyObject *obj, int ndim, const npy_intp *shape, const char *what)
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

/* ------------------------------------------------------------------------ */
/* Model                                                                     */

typedef struct {
    PyObject_HEAD
    ft_model *model;
    PyObject *keep; /* list of the weight arrays the engine points into */
    int busy;
} ModelObject;

static int begin(ModelObject *self)
{
    if (!self->model) {
        PyErr_SetString(PyExc_RuntimeError, "model is closed");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "model is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void end(ModelObject *self) { self->busy = 0; }

/* Look up one weight by name: an ndarray, or (uint16 ndarray, "bfloat16"). */
static int get_tensor(PyObject *weights, PyObject *keep, const char *name, int required, ft_host_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    PyObject *item = PyDict_GetItemString(weights, name); /* borrowed */
    if (!item) {
        if (required) {
            PyErr_Format(PyExc_KeyError, "missing tensor %s in the checkpoint", name);
            return -1;
        }
        return 0;
    }
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

static int parse_config(PyObject *d, ft_config *c, int *bits, int *zero_offset)
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

static const char *const MOD_PATHS[FT_NMOD] = {"self_attention.query_key_value", "self_attention.dense",
                                               "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"};

/* Names are built into a table owned by the caller so messages can point at them. */
typedef char name_buf[128];

static int bind_weights(PyObject *weights, PyObject *keep, const ft_config *c, ft_host_weights *w,
                        ft_host_layer *layers, name_buf *names)
{
    int k = 0;
#define NAME(...) (snprintf(names[k], sizeof names[k], __VA_ARGS__), names[k++])
    if (get_tensor(weights, keep, NAME("transformer.word_embeddings.weight"), 1, &w->embed) ||
        get_tensor(weights, keep, NAME("transformer.ln_f.weight"), 1, &w->lnf_w) ||
        get_tensor(weights, keep, NAME("transformer.ln_f.bias"), 1, &w->lnf_b) ||
        get_tensor(weights, keep, NAME("lm_head.weight"), 0, &w->lm_head))
        return -1;
    const int two_ln = c->parallel_attn && c->n_ln == 2;
    const char *ln1 = two_ln ? "ln_attn" : "input_layernorm";
    const char *ln2 = two_ln ? "ln_mlp" : "post_attention_layernorm";
    const int want_ln2 = two_ln || !c->parallel_attn;
    for (int l = 0; l < c->n_layer; l++) {
        ft_host_layer *hl = &layers[l];
        if (get_tensor(weights, keep, NAME("transformer.h.%d.%s.weight", l, ln1), 1, &hl->ln1_w) ||
            get_tensor(weights, keep, NAME("transformer.h.%d.%s.bias", l, ln1), 1, &hl->ln1_b) ||
            get_tensor(weights, keep, NAME("transformer.h.%d.%s.weight", l, ln2), want_ln2, &hl->ln2_w) ||
            get_tensor(weights, keep, NAME("transformer.h.%d.%s.bias", l, ln2), want_ln2, &hl->ln2_b))
            return -1;
        for (int mod = 0; mod < FT_NMOD; mod++) {
            ft_host_qlinear *q = &hl->lin[mod];
            const char *p = MOD_PATHS[mod];
            if (get_tensor(weights, keep, NAME("transformer.h.%d.%s.qweight", l, p), 1, &q->qweight) ||
                get_tensor(weights, keep, NAME("transformer.h.%d.%s.qzeros", l, p), 1, &q->qzeros) ||
                get_tensor(weights, keep, NAME("transformer.h.%d.%s.scales", l, p), 1, &q->scales) ||
                get_tensor(weights, keep, NAME("transformer.h.%d.%s.g_idx", l, p), 1, &q->g_idx) ||
                get_tensor(weights, keep, NAME("transformer.h.%d.%s.bias", l, p), 0, &q->bias))
                return -1;
            if (c->bias && !q->bias.data) {
                PyErr_Format(PyExc_KeyError, "missing tensor transformer.h.%d.%s.bias (the config says bias=true)", l, p);
                return -1;
            }
        }
    }
#undef NAME
    return 0;
}

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", "weights", "device", "act_dtype", NULL};
    PyObject *config, *weights;
    const char *device = "cpu";
    int act_dtype = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!|si", kwlist, &config, &PyDict_Type, &weights, &device,
                                     &act_dtype))
        return -1;
    if (self->model) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    ft_config cfg;
    ft_host_weights w;
    memset(&w, 0, sizeof w);
    if (parse_config(config, &cfg, &w.bits, &w.zero_offset)) return -1;
    if (cfg.n_layer <= 0 || cfg.n_layer > 100000) {
        PyErr_Format(PyExc_ValueError, "config: n_layer %d out of range", cfg.n_layer);
        return -1;
    }
    Py_XDECREF(self->keep);
    self->keep = PyList_New(0);
    const int n_names = 4 + cfg.n_layer * (4 + 5 * FT_NMOD);
    ft_host_layer *layers = calloc((size_t)cfg.n_layer, sizeof *layers);
    name_buf *names = calloc((size_t)n_names, sizeof *names);
    int rc = -1;
    if (!self->keep || !layers || !names) {
        PyErr_NoMemory();
        goto done;
    }
    w.layers = layers;
    if (bind_weights(weights, self->keep, &cfg, &w, layers, names)) goto done;
    ft_error err = {0};
    ft_status st;
    ft_model *model = NULL;
    Py_BEGIN_ALLOW_THREADS
    st = ft_model_create(&cfg, &w, device, act_dtype, &model, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto done;
    }
    self->model = model;
    rc = 0;
done:
    free(layers);
    free(names);
    return rc;
}

static void Model_dealloc(ModelObject *self)
{
    if (self->model) ft_model_free(self->model);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Model_close(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "model is in use by another thread");
        return NULL;
    }
    if (self->model) ft_model_free(self->model);
    self->model = NULL;
    Py_CLEAR(self->keep);
    Py_RETURN_NONE;
}

/* ---- LoRA ---- */

static PyObject *Model_lora_init(ModelObject *self, PyObject *args)
{
    int r;
    float alpha, dropout;
    unsigned int targets;
    if (!PyArg_ParseTuple(args, "iffI", &r, &alpha, &dropout, &targets)) return NULL;
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_status st = ft_lora_init(self->model, r, alpha, dropout, targets, &err);
    end(self);
    if (st) return raise_ft(&err);
    Py_RETURN_NONE;
}

static PyObject *Model_lora_remove(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (begin(self)) return NULL;
    ft_lora_remove(self->model);
    end(self);
    Py_RETURN_NONE;
}

static PyObject *Model_lora_info(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return Py_BuildValue("(iIf)", ft_lora_rank(self->model), ft_lora_targets(self->model),
                         (double)ft_lora_scale(self->model));
}

static PyObject *Model_set_lora_dropout(ModelObject *self, PyObject *args)
{
    float p;
    if (!PyArg_ParseTuple(args, "f", &p)) return NULL;
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_status st = ft_lora_set_dropout(self->model, p, &err);
    end(self);
    if (st) return raise_ft(&err);
    Py_RETURN_NONE;
}

static int lora_shapes(ModelObject *self, int layer, int mod, npy_intp *ashape, npy_intp *bshape)
{
    const ft_config *c = ft_model_config(self->model);
    int r = ft_lora_rank(self->model);
    if (!r) {
        PyErr_SetString(PyExc_RuntimeError, "the model has no LoRA adapter (call add_lora first)");
        return -1;
    }
    if (layer < 0 || layer >= c->n_layer || mod < 0 || mod >= FT_NMOD) {
        PyErr_Format(PyExc_IndexError, "LoRA layer %d / module %d out of range", layer, mod);
        return -1;
    }
    int qkv_w = c->qkv_layout == FT_QKV_MULTI_QUERY ? c->hidden + 2 * c->head_dim
                : c->qkv_layout == FT_QKV_GROUPED ? (c->n_head + 2 * c->n_kv_head) * c->head_dim
                                                  : 3 * c->hidden;
    int in = mod == FT_MOD_4H_TO_H ? c->ffn : c->hidden;
    int out = mod == FT_MOD_QKV ? qkv_w : mod == FT_MOD_H_TO_4H ? c->ffn : c->hidden;
    ashape[0] = r; ashape[1] = in;
    bshape[0] = out; bshape[1] = r;
    return 0;
}

static PyObject *Model_lora_read(ModelObject *self, PyObject *args)
{
    int slot, layer, mod;
    if (!PyArg_ParseTuple(args, "iii", &slot, &layer, &mod)) return NULL;
    if (begin(self)) return NULL;
    npy_intp as[2], bs[2];
    PyObject *A = NULL, *B = NULL;
    if (lora_shapes(self, layer, mod, as, bs)) goto fail;
    A = PyArray_SimpleNew(2, as, NPY_FLOAT32);
    B = PyArray_SimpleNew(2, bs, NPY_FLOAT32);
    if (!A || !B) goto fail;
    ft_error err = {0};
    ft_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ft_lora_read(self->model, (ft_lora_slot)slot, layer, mod, PyArray_DATA((PyArrayObject *)A),
                      PyArray_DATA((PyArrayObject *)B), &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto fail;
    }
    end(self);
    return Py_BuildValue("(NN)", A, B);
fail:
    end(self);
    Py_XDECREF(A);
    Py_XDECREF(B);
    return NULL;
}

static PyObject *Model_lora_write(ModelObject *self, PyObject *args)
{
    int slot, layer, mod;
    PyObject *Aobj, *Bobj;
    if (!PyArg_ParseTuple(args, "iiiOO", &slot, &layer, &mod, &Aobj, &Bobj)) return NULL;
    if (begin(self)) return NULL;
    npy_intp as[2], bs[2];
    PyArrayObject *A = NULL, *B = NULL;
    PyObject *ret = NULL;
    if (lora_shapes(self, layer, mod, as, bs)) goto done;
    char what[96];
    snprintf(what, sizeof what, "layer %d %s lora_A", layer, ft_module_name(mod));
    if (!(A = f32_array(Aobj, 2, as, what))) goto done;
    snprintf(what, sizeof what, "layer %d %s lora_B", layer, ft_module_name(mod));
    if (!(B = f32_array(Bobj, 2, bs, what))) goto done;
    ft_error err = {0};
    ft_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ft_lora_write(self->model, (ft_lora_slot)slot, layer, mod, PyArray_DATA(A), PyArray_DATA(B), &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    end(self);
    Py_XDECREF(A);
    Py_XDECREF(B);
    return ret;
}

static PyObject *Model_zero_grad(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_status st = ft_zero_grad(self->model, &err);
    end(self);
    if (st) return raise_ft(&err);
    Py_RETURN_NONE;
}

static PyObject *Model_set_training(ModelObject *self, PyObject *args)
{
    int training;
    if (!PyArg_ParseTuple(args, "p", &training)) return NULL;
    if (begin(self)) return NULL;
    ft_set_training(self->model, training);
    end(self);
    Py_RETURN_NONE;
}

static PyObject *Model_set_rng(ModelObject *self, PyObject *args)
{
    unsigned long long seed, counter;
    if (!PyArg_ParseTuple(args, "KK", &seed, &counter)) return NULL;
    if (begin(self)) return NULL;
    ft_set_rng(self->model, seed, counter);
    end(self);
    Py_RETURN_NONE;
}

static PyObject *Model_get_rng(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    uint64_t seed, counter;
    ft_get_rng(self->model, &seed, &counter);
    return Py_BuildValue("(KK)", (unsigned long long)seed, (unsigned long long)counter);
}

static PyObject *Model_set_checkpointing(ModelObject *self, PyObject *args)
{
    float ratio;
    if (!PyArg_ParseTuple(args, "f", &ratio)) return NULL;
    if (begin(self)) return NULL;
    ft_set_checkpointing(self->model, ratio);
    end(self);
    Py_RETURN_NONE;
}

/* ---- compute ---- */

/* ids [B,T] and an optional mask [B,Tm] as int32 arrays */
static int ids_and_mask(PyObject *ids_obj, PyObject *mask_obj, PyArrayObject **ids, PyArrayObject **mask, int Tm_extra)
{
    *ids = int32_array(ids_obj, 2, "input_ids", 0);
    *mask = NULL;
    if (!*ids) return -1;
    if (mask_obj && mask_obj != Py_None) {
        *mask = int32_array(mask_obj, 2, "attention_mask", 1);
        if (!*mask) return -1;
        if (PyArray_DIM(*mask, 0) != PyArray_DIM(*ids, 0) || PyArray_DIM(*mask, 1) != PyArray_DIM(*ids, 1) + Tm_extra) {
            PyErr_Format(PyExc_ValueError, "attention_mask: expected shape (%zd, %zd), got (%zd, %zd)",
                         (Py_ssize_t)PyArray_DIM(*ids, 0), (Py_ssize_t)(PyArray_DIM(*ids, 1) + Tm_extra),
                         (Py_ssize_t)PyArray_DIM(*mask, 0), (Py_ssize_t)PyArray_DIM(*mask, 1));
            return -1;
        }
    }
    if (PyArray_DIM(*ids, 0) <= 0 || PyArray_DIM(*ids, 1) <= 0 || PyArray_DIM(*ids, 0) > INT32_MAX ||
        PyArray_DIM(*ids, 1) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "input_ids: expected a non-empty [batch, tokens] array");
        return -1;
    }
    return 0;
}

/* forward (logits [B,T,V]) and forward_cached (logits of the last position [B,V]) share
 * their argument handling; `cached` picks the engine call. */
static PyObject *logits_call(ModelObject *self, PyObject *args, int cached)
{
    PyObject *ids_obj, *mask_obj = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &ids_obj, &mask_obj)) return NULL;
    if (begin(self)) return NULL;
    PyArrayObject *ids = NULL, *mask = NULL;
    PyObject *logits = NULL;
    if (ids_and_mask(ids_obj, mask_obj, &ids, &mask, cached ? ft_cache_len(self->model) : 0)) goto fail;
    const int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1);
    const int V = ft_model_config(self->model)->vocab_size;
    npy_intp shape[3] = {B, cached ? V : T, V};
    logits = PyArray_SimpleNew(cached ? 2 : 3, shape, NPY_FLOAT32);
    if (!logits) goto fail;
    ft_error err = {0};
    ft_status st;
    const int32_t *mask_data = mask ? PyArray_DATA(mask) : NULL;
    float *out = PyArray_DATA((PyArrayObject *)logits);
    Py_BEGIN_ALLOW_THREADS
    st = cached ? ft_forward_cached(self->model, PyArray_DATA(ids), mask_data, B, T, out, &err)
                : ft_forward(self->model, PyArray_DATA(ids), mask_data, B, T, out, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto fail;
    }
    end(self);
    Py_DECREF(ids);
    Py_XDECREF(mask);
    return logits;
fail:
    end(self);
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(logits);
    return NULL;
}

static PyObject *Model_forward(ModelObject *self, PyObject *args) { return logits_call(self, args, 0); }

/* forward_backward (backward = 1) and forward_loss (0) share their argument handling */
static PyObject *loss_call(ModelObject *self, PyObject *args, int backward)
{
    PyObject *ids_obj, *labels_obj, *mask_obj = Py_None;
    float grad_scale = 1.0f;
    if (!PyArg_ParseTuple(args, backward ? "OO|Of" : "OO|O", &ids_obj, &labels_obj, &mask_obj, &grad_scale))
        return NULL;
    if (begin(self)) return NULL;
    PyArrayObject *ids = NULL, *mask = NULL, *labels = NULL;
    PyObject *ret = NULL;
    if (ids_and_mask(ids_obj, mask_obj, &ids, &mask, 0)) goto done;
    if (!(labels = int32_array(labels_obj, 2, "labels", 0))) goto done;
    if (PyArray_DIM(labels, 0) != PyArray_DIM(ids, 0) || PyArray_DIM(labels, 1) != PyArray_DIM(ids, 1)) {
        PyErr_Format(PyExc_ValueError, "labels: expected the shape of input_ids (%zd, %zd)",
                     (Py_ssize_t)PyArray_DIM(ids, 0), (Py_ssize_t)PyArray_DIM(ids, 1));
        goto done;
    }
    const int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1);
    ft_error err = {0};
    ft_status st;
    double loss = 0.0;
    int64_t n = 0;
    Py_BEGIN_ALLOW_THREADS
    st = backward ? ft_forward_backward(self->model, PyArray_DATA(ids), PyArray_DATA(labels),
                                        mask ? PyArray_DATA(mask) : NULL, B, T, grad_scale, &loss, &n, &err)
                  : ft_forward_loss(self->model, PyArray_DATA(ids), PyArray_DATA(labels),
                                    mask ? PyArray_DATA(mask) : NULL, B, T, &loss, &n, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto done;
    }
    ret = Py_BuildValue("(dL)", loss, (long long)n);
done:
    end(self);
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(labels);
    return ret;
}

static PyObject *Model_forward_backward(ModelObject *self, PyObject *args) { return loss_call(self, args, 1); }
static PyObject *Model_forward_loss(ModelObject *self, PyObject *args) { return loss_call(self, args, 0); }

static PyObject *Model_adamw_step(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "grad_scale", "step",
                             NULL};
    ft_adamw_params p = {0};
    p.grad_scale = 1.0f;
    long long step;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "fffffffL", kwlist, &p.lr, &p.beta1, &p.beta2, &p.eps,
                                     &p.weight_decay, &p.max_grad_norm, &p.grad_scale, &step))
        return NULL;
    p.step = step;
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_status st;
    double norm = 0.0;
    Py_BEGIN_ALLOW_THREADS
    st = ft_adamw_step(self->model, &p, &norm, &err);
    Py_END_ALLOW_THREADS
    end(self);
    if (st) return raise_ft(&err);
    return PyFloat_FromDouble(norm);
}

static PyObject *Model_grad_norm(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (begin(self)) return NULL;
    ft_error err = {0};
    double norm = 0.0;
    ft_status st = ft_grad_norm(self->model, &norm, &err);
    end(self);
    if (st) return raise_ft(&err);
    return PyFloat_FromDouble(norm);
}

/* ---- KV cache ---- */

static PyObject *Model_cache_init(ModelObject *self, PyObject *args)
{
    int B, cap;
    if (!PyArg_ParseTuple(args, "ii", &B, &cap)) return NULL;
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ft_cache_init(self->model, B, cap, &err);
    Py_END_ALLOW_THREADS
    end(self);
    if (st) return raise_ft(&err);
    Py_RETURN_NONE;
}

static PyObject *Model_cache_free(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (begin(self)) return NULL;
    ft_cache_free(self->model);
    end(self);
    Py_RETURN_NONE;
}

static PyObject *Model_cache_len(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return PyLong_FromLong(ft_cache_len(self->model));
}

static PyObject *Model_forward_cached(ModelObject *self, PyObject *args) { return logits_call(self, args, 1); }

/* decode_step(ids [B], mask=None [B], argmax=False): one token per row through the cache;
 * float32 logits [B, V], or with argmax=True the int64 greedy ids [B] (argmax on the device) */
static PyObject *Model_decode_step(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ids", "mask", "argmax", NULL};
    PyObject *ids_obj, *mask_obj = Py_None;
    int want_ids = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|Op", kwlist, &ids_obj, &mask_obj, &want_ids)) return NULL;
    if (begin(self)) return NULL;
    PyArrayObject *ids = NULL, *mask = NULL;
    PyObject *out = NULL, *ids32 = NULL;
    ids = int32_array(ids_obj, 1, "ids", 0);
    if (!ids) goto fail;
    const int B = (int)PyArray_DIM(ids, 0);
    if (B <= 0 || PyArray_DIM(ids, 0) > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ids: expected a non-empty [batch] array (one new token per row)");
        goto fail;
    }
    if (mask_obj != Py_None) {
        mask = int32_array(mask_obj, 1, "mask", 1);
        if (!mask) goto fail;
        if (PyArray_DIM(mask, 0) != B) {
            PyErr_Format(PyExc_ValueError, "mask: expected shape (%d,), got (%zd,)", B, (Py_ssize_t)PyArray_DIM(mask, 0));
            goto fail;
        }
    }
    const int V = ft_model_config(self->model)->vocab_size;
    npy_intp shape[2] = {B, V};
    if (want_ids) ids32 = PyArray_SimpleNew(1, shape, NPY_INT32);
    else out = PyArray_SimpleNew(2, shape, NPY_FLOAT32);
    if (!ids32 && !out) goto fail;
    ft_error err = {0};
    ft_status st;
    const int32_t *mask_data = mask ? PyArray_DATA(mask) : NULL;
    float *logits = out ? PyArray_DATA((PyArrayObject *)out) : NULL;
    int32_t *next = ids32 ? PyArray_DATA((PyArrayObject *)ids32) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = ft_decode_step(self->model, PyArray_DATA(ids), mask_data, B, logits, next, &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto fail;
    }
    if (ids32) {
        out = PyArray_Cast((PyArrayObject *)ids32, NPY_INT64);
        if (!out) goto fail;
        Py_DECREF(ids32);
    }
    end(self);
    Py_DECREF(ids);
    Py_XDECREF(mask);
    return out;
fail:
    end(self);
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(out);
    Py_XDECREF(ids32);
    return NULL;
}

static PyObject *Model_cache_reorder(ModelObject *self, PyObject *args)
{
    PyObject *src_obj;
    if (!PyArg_ParseTuple(args, "O", &src_obj)) return NULL;
    PyArrayObject *src = int32_array(src_obj, 1, "beam indices", 0);
    if (!src) return NULL;
    if (begin(self)) {
        Py_DECREF(src);
        return NULL;
    }
    ft_error err = {0};
    ft_status st;
    const int B = (int)PyArray_DIM(src, 0);
    Py_BEGIN_ALLOW_THREADS
    st = ft_cache_reorder(self->model, PyArray_DATA(src), B, &err);
    Py_END_ALLOW_THREADS
    end(self);
    Py_DECREF(src);
    if (st) return raise_ft(&err);
    Py_RETURN_NONE;
}

static PyObject *Model_memory_stats(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p", kwlist, &reset)) return NULL;
    if (begin(self)) return NULL;
    ft_error err = {0};
    size_t current = 0, peak = 0;
    ft_status st = ft_memory_stats(self->model, &current, &peak, reset, &err);
    end(self);
    if (st) return raise_ft(&err);
    return Py_BuildValue("(nn)", (Py_ssize_t)current, (Py_ssize_t)peak);
}

/* op_costs(reset=False) -> {op: {"calls", "flops", "bytes", ...}} for the ops called at least once
 * since the model was made or last reset (cost.h; the model must be made under FT_COUNT_COSTS=1). */
static PyObject *Model_op_costs(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p", kwlist, &reset)) return NULL;
    if (begin(self)) return NULL;
    ft_error err = {0};
    ft_op_cost costs[FT_COST_NOPS];
    ft_status st = ft_model_op_costs(self->model, costs, reset, &err);
    end(self);
    if (st) return raise_ft(&err);
    PyObject *out = PyDict_New();
    for (int op = 0; out && op < FT_COST_NOPS; op++) {
        const ft_op_cost *c = &costs[op];
        if (!c->calls) continue;
        PyObject *d = Py_BuildValue("{sKsKsKsKsKsKsK}", "calls", (unsigned long long)c->calls, "flops",
                                    (unsigned long long)c->flops, "bytes", (unsigned long long)c->bytes, "act_elems",
                                    (unsigned long long)c->act_elems, "weight_elems",
                                    (unsigned long long)c->weight_elems, "fixed_bytes",
                                    (unsigned long long)c->fixed_bytes, "dequant_elems",
                                    (unsigned long long)c->dequant_elems);
        if (!d || PyDict_SetItemString(out, ft_cost_op_name(op), d) < 0) Py_CLEAR(out);
        Py_XDECREF(d);
    }
    return out;
}

static PyObject *Model_get_device(ModelObject *self, void *closure)
{
    (void)closure;
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return PyUnicode_FromString(ft_model_device(self->model));
}

static PyObject *Model_get_act_dtype(ModelObject *self, void *closure)
{
    (void)closure;
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return PyUnicode_FromString(ft_dtype_name(ft_model_act_dtype(self->model)));
}

static PyMethodDef Model_methods[] = {
    {"close", (PyCFunction)Model_close, METH_NOARGS, "Free the engine's memory now."},
    {"lora_init", (PyCFunction)Model_lora_init, METH_VARARGS, "lora_init(r, alpha, dropout, target_mask)"},
    {"lora_remove", (PyCFunction)Model_lora_remove, METH_NOARGS, "Drop the LoRA adapter."},
    {"lora_info", (PyCFunction)Model_lora_info, METH_NOARGS, "(rank, target_mask, scale)"},
    {"set_lora_dropout", (PyCFunction)Model_set_lora_dropout, METH_VARARGS, "set_lora_dropout(p)"},
    {"lora_read", (PyCFunction)Model_lora_read, METH_VARARGS, "lora_read(slot, layer, module) -> (A, B)"},
    {"lora_write", (PyCFunction)Model_lora_write, METH_VARARGS, "lora_write(slot, layer, module, A, B)"},
    {"zero_grad", (PyCFunction)Model_zero_grad, METH_NOARGS, "Zero the LoRA gradients."},
    {"set_training", (PyCFunction)Model_set_training, METH_VARARGS, "set_training(bool): LoRA dropout on/off"},
    {"set_rng", (PyCFunction)Model_set_rng, METH_VARARGS, "set_rng(seed, counter)"},
    {"get_rng", (PyCFunction)Model_get_rng, METH_NOARGS, "(seed, counter)"},
    {"set_checkpointing", (PyCFunction)Model_set_checkpointing, METH_VARARGS, "set_checkpointing(ratio)"},
    {"forward", (PyCFunction)Model_forward, METH_VARARGS, "forward(ids, mask=None) -> float32 [B, T, V]"},
    {"forward_backward", (PyCFunction)Model_forward_backward, METH_VARARGS,
     "forward_backward(ids, labels, mask=None, grad_scale=1.0) -> (loss, n_tokens)"},
    {"forward_loss", (PyCFunction)Model_forward_loss, METH_VARARGS,
     "forward_loss(ids, labels, mask=None) -> (loss, n_tokens): the loss without gradients or dropout"},
    {"adamw_step", (PyCFunction)(void (*)(void))Model_adamw_step, METH_VARARGS | METH_KEYWORDS,
     "adamw_step(lr, beta1, beta2, eps, weight_decay, max_grad_norm, grad_scale, step) -> grad norm"},
    {"grad_norm", (PyCFunction)Model_grad_norm, METH_NOARGS, "L2 norm of the LoRA gradients"},
    {"cache_init", (PyCFunction)Model_cache_init, METH_VARARGS, "cache_init(batch, capacity)"},
    {"cache_free", (PyCFunction)Model_cache_free, METH_NOARGS, "Free the KV cache."},
    {"cache_len", (PyCFunction)Model_cache_len, METH_NOARGS, "Tokens held in the KV cache."},
    {"forward_cached", (PyCFunction)Model_forward_cached, METH_VARARGS,
     "forward_cached(ids, mask=None) -> float32 [B, V] logits of the last position"},
    {"cache_reorder", (PyCFunction)Model_cache_reorder, METH_VARARGS, "cache_reorder(src_rows)"},
    {"decode_step", (PyCFunction)(void (*)(void))Model_decode_step, METH_VARARGS | METH_KEYWORDS,
     "decode_step(ids, mask=None, argmax=False) -> float32 [B, V] logits of the new tokens, or with "
     "argmax=True int64 [B] greedy ids (found on the device)"},
    {"memory_stats", (PyCFunction)(void (*)(void))Model_memory_stats, METH_VARARGS | METH_KEYWORDS,
     "memory_stats(reset=False) -> (bytes held now, high-water mark); (0, 0) on the CPU"},
    {"op_costs", (PyCFunction)(void (*)(void))Model_op_costs, METH_VARARGS | METH_KEYWORDS,
     "op_costs(reset=False) -> {op: {calls, flops, bytes, ...}} (needs FT_COUNT_COSTS=1 at model creation)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Model_getset[] = {
    {"device", (getter)Model_get_device, NULL, "device string", NULL},
    {"act_dtype", (getter)Model_get_act_dtype, NULL, "activation dtype", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "falcontune._C.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The falcontune engine: a GPTQ Falcon model with optional LoRA.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};

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
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOffifd", kwlist, &logits_obj, &prev_obj, &rep, &temp, &top_k,
                                     &top_p, &u))
        return NULL;
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(logits_obj, NPY_FLOAT32, 1, 1,
                                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!in) return NULL;
    PyArrayObject *logits = (PyArrayObject *)PyArray_NewCopy(in, NPY_CORDER); /* sampled in place */
    Py_DECREF(in);
    PyArrayObject *prev = logits ? int32_array(prev_obj, 1, "prev", 0) : NULL;
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

/* quantize_rtn(weight [out, in] float16/float32 or (uint16, 'bfloat16'), bits, group_size)
 *   -> (qweight, qzeros, scales float16, g_idx) in AutoGPTQ layout, zeros stored as is (v2) */
static PyObject *mod_quantize_rtn(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *wobj;
    int bits, group_size;
    if (!PyArg_ParseTuple(args, "Oii", &wobj, &bits, &group_size)) return NULL;
    PyObject *holder = PyDict_New();
    PyObject *keep = PyList_New(0);
    PyObject *ret = NULL, *qw = NULL, *qz = NULL, *sc = NULL, *gi = NULL;
    if (!holder || !keep || PyDict_SetItemString(holder, "weight", wobj)) goto done;
    ft_host_tensor t;
    if (get_tensor(holder, keep, "weight", 1, &t)) goto done;
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
    ft_error err = {0};
    ft_status st;
    Py_BEGIN_ALLOW_THREADS
    st = ft_gptq_quantize_rtn(t.data, t.dtype, (int)out, (int)in, bits, group_size,
                              PyArray_DATA((PyArrayObject *)qw), PyArray_DATA((PyArrayObject *)qz),
                              PyArray_DATA((PyArrayObject *)sc), PyArray_DATA((PyArrayObject *)gi), &err);
    Py_END_ALLOW_THREADS
    if (st) {
        raise_ft(&err);
        goto done;
    }
    ret = Py_BuildValue("(OOOO)", qw, qz, sc, gi);
done:
    Py_XDECREF(holder);
    Py_XDECREF(keep);
    Py_XDECREF(qw);
    Py_XDECREF(qz);
    Py_XDECREF(sc);
    Py_XDECREF(gi);
    return ret;
}

static PyMethodDef module_methods[] = {
    {"quantize_rtn", mod_quantize_rtn, METH_VARARGS,
     "quantize_rtn(weight, bits, group_size) -> (qweight, qzeros, scales, g_idx)"},
    {"have_cuda", mod_have_cuda, METH_NOARGS, "True when built with the CUDA backend."},
    {"cuda_device_count", mod_cuda_device_count, METH_NOARGS, "Number of usable CUDA devices (0 without)."},
    {"cuda_device_memory", mod_cuda_device_memory, METH_NOARGS,
     "(bytes in use, total) of the current CUDA device, all processes; None without CUDA."},
    {"sample_token", (PyCFunction)(void (*)(void))mod_sample_token, METH_VARARGS | METH_KEYWORDS,
     "sample_token(logits, prev, repetition_penalty, temperature, top_k, top_p, u) -> id"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "falcontune._C", "The falcontune numeric engine.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void)
{
    import_array();
    if (PyType_Ready(&ModelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    OutOfMemoryError = PyErr_NewExceptionWithDoc("falcontune._C.OutOfMemoryError",
                                                 "Host or GPU memory ran out; the model stays usable.",
                                                 PyExc_MemoryError, NULL);
    DeviceError = PyErr_NewExceptionWithDoc("falcontune._C.DeviceError", "A CUDA runtime or cuBLAS error.",
                                            PyExc_RuntimeError, NULL);
    if (!OutOfMemoryError || !DeviceError) goto fail;
    Py_INCREF(&ModelType);
    if (PyModule_AddObject(m, "Model", (PyObject *)&ModelType) < 0) {
        Py_DECREF(&ModelType);
        goto fail;
    }
    Py_INCREF(OutOfMemoryError);
    if (PyModule_AddObject(m, "OutOfMemoryError", OutOfMemoryError) < 0) goto fail;
    Py_INCREF(DeviceError);
    if (PyModule_AddObject(m, "DeviceError", DeviceError) < 0) goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
