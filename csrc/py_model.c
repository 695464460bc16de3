/* py_model.c -- falcontune._C.Model: one engine model (ft_model) and the arrays it points into.
 *
 * Every method runs through `guarded`: the model must be open and not in use by another thread
 * (a call that released the GIL holds it), so no two calls ever reach one ft_model at once. The
 * method table at the end lists each method once, with its text signature (inspect.signature).
 */
#include "py_binding.h" /* Python.h first, as it asks */
#include "cost.h"

#include <stdio.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    ft_model *model;
    PyObject *keep; /* list of the weight arrays the engine points into */
    ft_dist *dist;  /* NCCL group of data parallel training (dist_init), freed before the model */
    int busy;       /* a method is running (perhaps with the GIL released) */
} ModelObject;

typedef PyObject *(*method_body)(ModelObject *self, PyObject *args, PyObject *kwds);

static PyObject *guarded(ModelObject *self, PyObject *args, PyObject *kwds, method_body body)
{
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    if (self->busy) return PyErr_Format(PyExc_RuntimeError, "model is in use by another thread");
    self->busy = 1;
    PyObject *ret = body(self, args, kwds);
    self->busy = 0;
    return ret;
}

static int no_args(PyObject *args, PyObject *kwds, const char *fmt)
{
    static char *kwlist[] = {NULL};
    return PyArg_ParseTupleAndKeywords(args, kwds, fmt, kwlist) ? 0 : -1;
}

/* ---- life ---- */

static int Model_init(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"config", "weights", "device", "act_dtype", NULL};
    PyObject *config, *weights;
    const char *device = "cpu";
    int act_dtype = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!|si", kwlist, &config, &PyDict_Type, &weights, &device,
                                     &act_dtype))
        return -1;
    if (self->model || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "Model is already initialised");
        return -1;
    }
    int cuda_index;
    ENGINE(ft_parse_device(device, &cuda_index, ERR), return -1); /* before any weight is looked at */
    ft_config cfg;
    ft_host_weights w;
    memset(&w, 0, sizeof w);
    if (ft_py_parse_config(config, &cfg, &w.bits, &w.zero_offset)) return -1;
    if (cfg.n_layer <= 0 || cfg.n_layer > 100000) {
        PyErr_Format(PyExc_ValueError, "config: n_layer %d out of range", cfg.n_layer);
        return -1;
    }
    Py_XDECREF(self->keep);
    self->keep = PyList_New(0);
    const int n_names = FT_PY_NAMES_GLOBAL + cfg.n_layer * FT_PY_NAMES_PER_LAYER;
    ft_host_layer *layers = calloc((size_t)cfg.n_layer, sizeof *layers);
    ft_py_name *names = calloc((size_t)n_names, sizeof *names);
    ft_model *model = NULL;
    int rc = -1;
    if (!self->keep || !layers || !names) {
        PyErr_NoMemory();
        goto done;
    }
    w.layers = layers;
    if (ft_py_bind_weights(weights, self->keep, &cfg, &w, layers, names)) goto done;
    self->busy = 1; /* no method may run on the half-built object while the GIL is released */
    ENGINE(ft_model_create(&cfg, &w, device, act_dtype, &model, ERR), self->busy = 0; goto done);
    self->busy = 0;
    self->model = model;
    rc = 0;
done:
    free(layers);
    free(names);
    return rc;
}

static void Model_dealloc(ModelObject *self)
{
    ft_dist_free(self->dist);
    if (self->model) ft_model_free(self->model);
    Py_XDECREF(self->keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Model_close(ModelObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->busy) return PyErr_Format(PyExc_RuntimeError, "model is in use by another thread");
    ft_dist_free(self->dist);
    self->dist = NULL;
    if (self->model) ft_model_free(self->model);
    self->model = NULL;
    Py_CLEAR(self->keep);
    Py_RETURN_NONE;
}

/* ---- LoRA ---- */

static PyObject *m_lora_init(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"r", "alpha", "dropout", "target_mask", NULL};
    int r;
    float alpha, dropout;
    unsigned int targets;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iffI:lora_init", kwlist, &r, &alpha, &dropout, &targets))
        return NULL;
    ENGINE(ft_lora_init(self->model, r, alpha, dropout, targets, ERR), return NULL);
    Py_RETURN_NONE;
}

static PyObject *m_lora_remove(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":lora_remove")) return NULL;
    ft_lora_remove(self->model);
    Py_RETURN_NONE;
}

static PyObject *m_lora_info(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":lora_info")) return NULL;
    return Py_BuildValue("(iIf)", ft_lora_rank(self->model), ft_lora_targets(self->model),
                         (double)ft_lora_scale(self->model));
}

static PyObject *m_set_lora_dropout(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"p", NULL};
    float p;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "f:set_lora_dropout", kwlist, &p)) return NULL;
    ENGINE(ft_lora_set_dropout(self->model, p, ERR), return NULL);
    Py_RETURN_NONE;
}

/* Shapes of one module's A [r, in] and B [out, r], from the module table. */
static int lora_shapes(ModelObject *self, int layer, int mod, npy_intp *ashape, npy_intp *bshape)
{
    const ft_config *c = ft_model_config(self->model);
    int r = ft_lora_rank(self->model);
    if (!r) {
        PyErr_SetString(PyExc_RuntimeError, "the model has no LoRA adapter");
        return -1;
    }
    if (layer < 0 || layer >= c->n_layer || !ft_module(mod)) {
        PyErr_Format(PyExc_IndexError, "LoRA layer %d / module %d out of range", layer, mod);
        return -1;
    }
    ashape[0] = r;
    ashape[1] = ft_module_in(c, mod);
    bshape[0] = ft_module_out(c, mod);
    bshape[1] = r;
    return 0;
}

static PyObject *m_lora_read(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slot", "layer", "module", NULL};
    int slot, layer, mod;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iii:lora_read", kwlist, &slot, &layer, &mod)) return NULL;
    npy_intp as[2], bs[2];
    PyObject *A = NULL, *B = NULL;
    if (lora_shapes(self, layer, mod, as, bs)) goto fail;
    A = PyArray_SimpleNew(2, as, NPY_FLOAT32);
    B = PyArray_SimpleNew(2, bs, NPY_FLOAT32);
    if (!A || !B) goto fail;
    float *a = PyArray_DATA((PyArrayObject *)A), *b = PyArray_DATA((PyArrayObject *)B);
    ENGINE(ft_lora_read(self->model, (ft_lora_slot)slot, layer, mod, a, b, ERR), goto fail);
    return Py_BuildValue("(NN)", A, B);
fail:
    Py_XDECREF(A);
    Py_XDECREF(B);
    return NULL;
}

static PyObject *m_lora_write(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"slot", "layer", "module", "A", "B", NULL};
    int slot, layer, mod;
    PyObject *Aobj, *Bobj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiOO:lora_write", kwlist, &slot, &layer, &mod, &Aobj, &Bobj))
        return NULL;
    npy_intp as[2], bs[2];
    PyArrayObject *A = NULL, *B = NULL;
    PyObject *ret = NULL;
    char what[96];
    if (lora_shapes(self, layer, mod, as, bs)) goto done;
    snprintf(what, sizeof what, "layer %d %s lora_A", layer, ft_module_name(mod));
    if (!(A = ft_py_f32_array(Aobj, 2, as, what))) goto done;
    snprintf(what, sizeof what, "layer %d %s lora_B", layer, ft_module_name(mod));
    if (!(B = ft_py_f32_array(Bobj, 2, bs, what))) goto done;
    ENGINE(ft_lora_write(self->model, (ft_lora_slot)slot, layer, mod, PyArray_DATA(A), PyArray_DATA(B), ERR),
           goto done);
    Py_INCREF(Py_None);
    ret = Py_None;
done:
    Py_XDECREF(A);
    Py_XDECREF(B);
    return ret;
}

static PyObject *m_zero_grad(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":zero_grad")) return NULL;
    ENGINE(ft_zero_grad(self->model, ERR), return NULL);
    Py_RETURN_NONE;
}

/* The flat LoRA gradients (ft_lora_grad_flat): a float32 copy [numel] */
static PyObject *m_lora_grad_flat(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":lora_grad_flat")) return NULL;
    if (!ft_lora_rank(self->model)) return PyErr_Format(PyExc_RuntimeError, "the model has no LoRA adapter");
    npy_intp n = (npy_intp)ft_lora_numel(self->model);
    PyObject *out = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    if (!out) return NULL;
    float *host = PyArray_DATA((PyArrayObject *)out);
    ENGINE(ft_lora_grad_flat(self->model, host, (size_t)n, 0, ERR), Py_DECREF(out); return NULL);
    return out;
}

static PyObject *m_set_lora_grad_flat(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"grad", NULL};
    PyObject *obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:set_lora_grad_flat", kwlist, &obj)) return NULL;
    if (!ft_lora_rank(self->model)) return PyErr_Format(PyExc_RuntimeError, "the model has no LoRA adapter");
    npy_intp n = (npy_intp)ft_lora_numel(self->model);
    PyArrayObject *g = ft_py_f32_array(obj, 1, &n, "flat LoRA gradient");
    if (!g) return NULL;
    ENGINE(ft_lora_grad_flat(self->model, PyArray_DATA(g), (size_t)n, 1, ERR), Py_DECREF(g); return NULL);
    Py_DECREF(g);
    Py_RETURN_NONE;
}

/* ---- data parallel: NCCL (dist.c) ---- */

static PyObject *m_dist_init(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"nccl_lib", "unique_id", "rank", "world", NULL};
    const char *lib, *id;
    Py_ssize_t id_len;
    int rank, world;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sy#ii:dist_init", kwlist, &lib, &id, &id_len, &rank, &world))
        return NULL;
    if (id_len != FT_DIST_ID_BYTES)
        return PyErr_Format(PyExc_ValueError, "unique_id: expected %d bytes (dist_unique_id), got %zd",
                            FT_DIST_ID_BYTES, id_len);
    if (self->dist) return PyErr_Format(PyExc_RuntimeError, "dist_init: the model already belongs to a group");
    ft_dist *d = NULL;
    ENGINE(ft_dist_create(self->model, lib, (const uint8_t *)id, rank, world, &d, ERR), return NULL);
    self->dist = d;
    Py_RETURN_NONE;
}

static PyObject *m_dist_allreduce_grad(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":dist_allreduce_grad")) return NULL;
    if (!self->dist)
        return PyErr_Format(PyExc_RuntimeError, "dist_allreduce_grad: the model is in no NCCL group (dist_init)");
    ENGINE(ft_dist_allreduce_grad(self->dist, self->model, ERR), return NULL);
    Py_RETURN_NONE;
}

static PyObject *m_dist_close(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":dist_close")) return NULL;
    ft_dist *d = self->dist;
    self->dist = NULL;
    Py_BEGIN_ALLOW_THREADS
    ft_dist_free(d);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ---- training state ---- */

static PyObject *m_set_training(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"training", NULL};
    int training;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "p:set_training", kwlist, &training)) return NULL;
    ft_set_training(self->model, training);
    Py_RETURN_NONE;
}

static PyObject *m_set_rng(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"seed", "counter", NULL};
    unsigned long long seed, counter;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KK:set_rng", kwlist, &seed, &counter)) return NULL;
    ft_set_rng(self->model, seed, counter);
    Py_RETURN_NONE;
}

static PyObject *m_get_rng(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":get_rng")) return NULL;
    uint64_t seed, counter;
    ft_get_rng(self->model, &seed, &counter);
    return Py_BuildValue("(KK)", (unsigned long long)seed, (unsigned long long)counter);
}

static PyObject *m_set_checkpointing(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ratio", NULL};
    float ratio;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "f:set_checkpointing", kwlist, &ratio)) return NULL;
    ft_set_checkpointing(self->model, ratio);
    Py_RETURN_NONE;
}

/* ---- compute ---- */

/* ids [B,T] and an optional mask [B, T + Tm_extra] as int32 arrays */
static int ids_and_mask(PyObject *ids_obj, PyObject *mask_obj, PyArrayObject **ids, PyArrayObject **mask, int Tm_extra)
{
    *ids = ft_py_int32_array(ids_obj, 2, "input_ids", 0);
    *mask = NULL;
    if (!*ids) return -1;
    if (mask_obj && mask_obj != Py_None) {
        *mask = ft_py_int32_array(mask_obj, 2, "attention_mask", 1);
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
static PyObject *logits_call(ModelObject *self, PyObject *args, PyObject *kwds, int cached)
{
    static char *kwlist[] = {"ids", "mask", NULL};
    PyObject *ids_obj, *mask_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, cached ? "O|O:forward_cached" : "O|O:forward", kwlist, &ids_obj,
                                     &mask_obj))
        return NULL;
    PyArrayObject *ids = NULL, *mask = NULL;
    PyObject *logits = NULL;
    if (ids_and_mask(ids_obj, mask_obj, &ids, &mask, cached ? ft_cache_len(self->model) : 0)) goto fail;
    const int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1);
    const int V = ft_model_config(self->model)->vocab_size;
    npy_intp shape[3] = {B, cached ? V : T, V};
    logits = PyArray_SimpleNew(cached ? 2 : 3, shape, NPY_FLOAT32);
    if (!logits) goto fail;
    const int32_t *mask_data = mask ? PyArray_DATA(mask) : NULL;
    float *out = PyArray_DATA((PyArrayObject *)logits);
    ENGINE(cached ? ft_forward_cached(self->model, PyArray_DATA(ids), mask_data, B, T, out, ERR)
                  : ft_forward(self->model, PyArray_DATA(ids), mask_data, B, T, out, ERR),
           goto fail);
    Py_DECREF(ids);
    Py_XDECREF(mask);
    return logits;
fail:
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(logits);
    return NULL;
}

static PyObject *m_forward(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return logits_call(self, args, kwds, 0);
}

/* forward_backward (backward = 1) and forward_loss (0) share their argument handling */
static PyObject *loss_call(ModelObject *self, PyObject *args, PyObject *kwds, int backward)
{
    static char *kwlist_bwd[] = {"ids", "labels", "mask", "grad_scale", NULL};
    static char *kwlist_loss[] = {"ids", "labels", "mask", NULL};
    char **kwlist = backward ? kwlist_bwd : kwlist_loss;
    PyObject *ids_obj, *labels_obj, *mask_obj = Py_None;
    float grad_scale = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, backward ? "OO|Of:forward_backward" : "OO|O:forward_loss", kwlist,
                                     &ids_obj, &labels_obj, &mask_obj, &grad_scale))
        return NULL;
    PyArrayObject *ids = NULL, *mask = NULL, *labels = NULL;
    PyObject *ret = NULL;
    if (ids_and_mask(ids_obj, mask_obj, &ids, &mask, 0)) goto done;
    if (!(labels = ft_py_int32_array(labels_obj, 2, "labels", 0))) goto done;
    if (PyArray_DIM(labels, 0) != PyArray_DIM(ids, 0) || PyArray_DIM(labels, 1) != PyArray_DIM(ids, 1)) {
        PyErr_Format(PyExc_ValueError, "labels: expected the shape of input_ids (%zd, %zd)",
                     (Py_ssize_t)PyArray_DIM(ids, 0), (Py_ssize_t)PyArray_DIM(ids, 1));
        goto done;
    }
    const int B = (int)PyArray_DIM(ids, 0), T = (int)PyArray_DIM(ids, 1);
    const int32_t *id = PyArray_DATA(ids), *lab = PyArray_DATA(labels), *msk = mask ? PyArray_DATA(mask) : NULL;
    double loss = 0.0;
    int64_t n = 0;
    ENGINE(backward ? ft_forward_backward(self->model, id, lab, msk, B, T, grad_scale, &loss, &n, ERR)
                    : ft_forward_loss(self->model, id, lab, msk, B, T, &loss, &n, ERR),
           goto done);
    ret = Py_BuildValue("(dL)", loss, (long long)n);
done:
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(labels);
    return ret;
}

static PyObject *m_forward_backward(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return loss_call(self, args, kwds, 1);
}

static PyObject *m_forward_loss(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return loss_call(self, args, kwds, 0);
}

static PyObject *m_adamw_step(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"lr", "beta1", "beta2", "eps", "weight_decay", "max_grad_norm", "grad_scale", "step",
                             NULL};
    ft_adamw_params p = {0};
    long long step;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "fffffffL:adamw_step", kwlist, &p.lr, &p.beta1, &p.beta2, &p.eps,
                                     &p.weight_decay, &p.max_grad_norm, &p.grad_scale, &step))
        return NULL;
    p.step = step;
    double norm = 0.0;
    ENGINE(ft_adamw_step(self->model, &p, &norm, ERR), return NULL);
    return PyFloat_FromDouble(norm);
}

static PyObject *m_grad_norm(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":grad_norm")) return NULL;
    double norm = 0.0;
    ENGINE(ft_grad_norm(self->model, &norm, ERR), return NULL);
    return PyFloat_FromDouble(norm);
}

/* ---- KV cache ---- */

static PyObject *m_cache_init(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"batch", "capacity", NULL};
    int B, cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ii:cache_init", kwlist, &B, &cap)) return NULL;
    ENGINE(ft_cache_init(self->model, B, cap, ERR), return NULL);
    Py_RETURN_NONE;
}

static PyObject *m_cache_free(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":cache_free")) return NULL;
    ft_cache_free(self->model);
    Py_RETURN_NONE;
}

static PyObject *m_cache_len(ModelObject *self, PyObject *args, PyObject *kwds)
{
    if (no_args(args, kwds, ":cache_len")) return NULL;
    return PyLong_FromLong(ft_cache_len(self->model));
}

static PyObject *m_forward_cached(ModelObject *self, PyObject *args, PyObject *kwds)
{
    return logits_call(self, args, kwds, 1);
}

/* ids of a decode step: int32 [B], one new token per row (B >= 1); sets *B */
static PyArrayObject *step_ids(PyObject *obj, npy_intp *B)
{
    PyArrayObject *ids = ft_py_int32_array(obj, 1, "ids", 0);
    if (!ids) return NULL;
    *B = PyArray_DIM(ids, 0);
    if (*B <= 0 || *B > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "ids: expected a non-empty [batch] array (one new token per row)");
        Py_DECREF(ids);
        return NULL;
    }
    return ids;
}

static PyObject *m_decode_greedy(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ids", "n", NULL};
    PyObject *ids_obj;
    int n;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Oi:decode_greedy", kwlist, &ids_obj, &n)) return NULL;
    PyObject *ids32 = NULL, *out = NULL;
    npy_intp B;
    PyArrayObject *ids = step_ids(ids_obj, &B);
    if (!ids) goto fail;
    if (n <= 0 || (int64_t)n * B > INT32_MAX) { /* the engine checks n against the cache's room */
        PyErr_Format(PyExc_ValueError, "n: expected a positive number of tokens (n x batch < 2^31), got %d", n);
        goto fail;
    }
    npy_intp shape[2] = {n, B};
    ids32 = PyArray_SimpleNew(2, shape, NPY_INT32);
    if (!ids32) goto fail;
    ENGINE(ft_decode_greedy(self->model, PyArray_DATA(ids), (int)B, n, PyArray_DATA((PyArrayObject *)ids32), ERR),
           goto fail);
    out = PyArray_Cast((PyArrayObject *)ids32, NPY_INT64);
    if (!out) goto fail;
    Py_DECREF(ids32);
    Py_DECREF(ids);
    return out;
fail:
    Py_XDECREF(ids);
    Py_XDECREF(ids32);
    Py_XDECREF(out);
    return NULL;
}

static PyObject *m_decode_step(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ids", "mask", "argmax", NULL};
    PyObject *ids_obj, *mask_obj = Py_None;
    int want_ids = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|Op:decode_step", kwlist, &ids_obj, &mask_obj, &want_ids))
        return NULL;
    PyArrayObject *mask = NULL;
    PyObject *out = NULL, *ids32 = NULL;
    npy_intp rows;
    PyArrayObject *ids = step_ids(ids_obj, &rows);
    if (!ids) goto fail;
    const int B = (int)rows;
    if (mask_obj != Py_None) {
        mask = ft_py_int32_array(mask_obj, 1, "mask", 1);
        if (!mask) goto fail;
        if (PyArray_DIM(mask, 0) != B) {
            PyErr_Format(PyExc_ValueError, "mask: expected shape (%d,), got (%zd,)", B,
                         (Py_ssize_t)PyArray_DIM(mask, 0));
            goto fail;
        }
    }
    const int V = ft_model_config(self->model)->vocab_size;
    npy_intp shape[2] = {B, V};
    if (want_ids) ids32 = PyArray_SimpleNew(1, shape, NPY_INT32);
    else out = PyArray_SimpleNew(2, shape, NPY_FLOAT32);
    if (!ids32 && !out) goto fail;
    const int32_t *mask_data = mask ? PyArray_DATA(mask) : NULL;
    float *logits = out ? PyArray_DATA((PyArrayObject *)out) : NULL;
    int32_t *next = ids32 ? PyArray_DATA((PyArrayObject *)ids32) : NULL;
    ENGINE(ft_decode_step(self->model, PyArray_DATA(ids), mask_data, B, logits, next, ERR), goto fail);
    if (ids32) {
        out = PyArray_Cast((PyArrayObject *)ids32, NPY_INT64);
        if (!out) goto fail;
        Py_CLEAR(ids32);
    }
    Py_DECREF(ids);
    Py_XDECREF(mask);
    return out;
fail:
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    Py_XDECREF(out);
    Py_XDECREF(ids32);
    return NULL;
}

static PyObject *m_cache_reorder(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"src_rows", NULL};
    PyObject *src_obj;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:cache_reorder", kwlist, &src_obj)) return NULL;
    PyArrayObject *src = ft_py_int32_array(src_obj, 1, "beam indices", 0);
    if (!src) return NULL;
    const int B = (int)PyArray_DIM(src, 0);
    ENGINE(ft_cache_reorder(self->model, PyArray_DATA(src), B, ERR), Py_DECREF(src); return NULL);
    Py_DECREF(src);
    Py_RETURN_NONE;
}

static PyObject *m_memory_stats(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:memory_stats", kwlist, &reset)) return NULL;
    size_t current = 0, peak = 0;
    ENGINE(ft_memory_stats(self->model, &current, &peak, reset, ERR), return NULL);
    return Py_BuildValue("(nn)", (Py_ssize_t)current, (Py_ssize_t)peak);
}

/* op_costs(reset=False) -> {op: {"calls", "flops", "bytes", ...}} for the ops called at least once
 * since the model was made or last reset (cost.h; the model must be made under FT_COUNT_COSTS=1). */
static PyObject *m_op_costs(ModelObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"reset", NULL};
    int reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:op_costs", kwlist, &reset)) return NULL;
    ft_op_cost costs[FT_COST_NOPS];
    ENGINE(ft_model_op_costs(self->model, costs, reset, ERR), return NULL);
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

/* ---- attributes ---- */

static PyObject *Model_get_device(ModelObject *self, void *closure)
{
    (void)closure;
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return PyUnicode_FromString(ft_model_device(self->model)); /* fixed at creation */
}

static PyObject *Model_get_act_dtype(ModelObject *self, void *closure)
{
    (void)closure;
    if (!self->model) return PyErr_Format(PyExc_RuntimeError, "model is closed");
    return PyUnicode_FromString(ft_dtype_name(ft_model_act_dtype(self->model)));
}

/* ---- the method table: name and docstring (its first lines are the text signature) ---- */
#define MODEL_METHODS(X)                                                                                          \
    X(lora_init, "lora_init($self, /, r, alpha, dropout, target_mask)\n--\n\n"                                    \
                 "Add a LoRA adapter of rank r (scale alpha / r) on the modules of the bit mask target_mask.")      \
    X(lora_remove, "lora_remove($self, /)\n--\n\nDrop the LoRA adapter.")                                          \
    X(lora_info, "lora_info($self, /)\n--\n\n(rank, target_mask, scale); rank 0 without an adapter.")               \
    X(set_lora_dropout, "set_lora_dropout($self, /, p)\n--\n\nThe LoRA dropout probability, in [0, 1).")            \
    X(lora_read, "lora_read($self, /, slot, layer, module)\n--\n\n"                                               \
                 "(A [r, in], B [out, r]) float32 of one module; slot: 0 weight, 1 grad, 2 Adam m, 3 Adam v.")   \
    X(lora_write, "lora_write($self, /, slot, layer, module, A, B)\n--\n\n"                                     \
                  "Set A [r, in] and B [out, r] of one module.")                                                  \
    X(zero_grad, "zero_grad($self, /)\n--\n\nZero the LoRA gradients.")                                             \
    X(lora_grad_flat, "lora_grad_flat($self, /)\n--\n\n"                                                        \
                      "Every LoRA gradient as one float32 array (layer by layer, A then B of each module).")       \
    X(set_lora_grad_flat, "set_lora_grad_flat($self, /, grad)\n--\n\n"                                          \
                          "Replace the LoRA gradients by grad, laid out as lora_grad_flat returns them.")          \
    X(dist_init, "dist_init($self, /, nccl_lib, unique_id, rank, world)\n--\n\n"                                 \
                 "Join the NCCL group unique_id (dist_unique_id's bytes) as rank of world (CUDA models).")         \
    X(dist_allreduce_grad, "dist_allreduce_grad($self, /)\n--\n\n"                                              \
                           "Sum the LoRA gradients over the ranks of the NCCL group, in place.")                   \
    X(dist_close, "dist_close($self, /)\n--\n\nLeave the NCCL group (also done when the model is closed).")       \
    X(set_training, "set_training($self, /, training)\n--\n\nLoRA dropout on (True) or off.")                       \
    X(set_rng, "set_rng($self, /, seed, counter)\n--\n\nThe dropout stream's seed and position.")                   \
    X(get_rng, "get_rng($self, /)\n--\n\n(seed, counter) of the dropout stream.")                                   \
    X(set_checkpointing, "set_checkpointing($self, /, ratio)\n--\n\n"                                             \
                         "Recompute the activations of the first round(ratio * layers) layers in backward.")     \
    X(forward, "forward($self, /, ids, mask=None)\n--\n\nfloat32 logits [B, T, V].")                                \
    X(forward_backward, "forward_backward($self, /, ids, labels, mask=None, grad_scale=1.0)\n--\n\n"               \
                        "(loss, n_tokens); adds grad_scale * d(loss)/d(LoRA) to the gradients.")                  \
    X(forward_loss, "forward_loss($self, /, ids, labels, mask=None)\n--\n\n"                                      \
                    "(loss, n_tokens): the loss without gradients or dropout.")                                   \
    X(adamw_step, "adamw_step($self, /, lr, beta1, beta2, eps, weight_decay, max_grad_norm, grad_scale, step)\n--\n\n" \
                  "One AdamW update of the LoRA weights; returns the gradient norm before clipping.")             \
    X(grad_norm, "grad_norm($self, /)\n--\n\nL2 norm of the LoRA gradients.")                                       \
    X(cache_init, "cache_init($self, /, batch, capacity)\n--\n\nA KV cache of capacity tokens for batch rows.")      \
    X(cache_free, "cache_free($self, /)\n--\n\nFree the KV cache.")                                                 \
    X(cache_len, "cache_len($self, /)\n--\n\nTokens held in the KV cache.")                                         \
    X(forward_cached, "forward_cached($self, /, ids, mask=None)\n--\n\n"                                          \
                      "Append ids [B, T] to the cache; float32 logits [B, V] of the last position.")             \
    X(cache_reorder, "cache_reorder($self, /, src_rows)\n--\n\nRow b of the cache becomes old row src_rows[b].")    \
    X(decode_step, "decode_step($self, /, ids, mask=None, argmax=False)\n--\n\n"                                  \
                   "One token per row through the cache: float32 logits [B, V], or with argmax=True the int64 "   \
                   "greedy ids [B] (found on the device).")                                                       \
    X(decode_greedy, "decode_greedy($self, /, ids, n)\n--\n\n"                                                    \
                     "n greedy tokens per row through the cache, starting from ids [B]: int64 [n, B], row i the " \
                     "argmax after step i, fed back on the device (no host round trip per token).")             \
    X(memory_stats, "memory_stats($self, /, reset=False)\n--\n\n"                                                 \
                    "(bytes held now, high-water mark) of the backend; (0, 0) on the CPU.")                \
    X(op_costs, "op_costs($self, /, reset=False)\n--\n\n"                                                     \
                "{op: {calls, flops, bytes, ...}} counted since creation or the last reset (needs "          \
                "FT_COUNT_COSTS=1 when the model is made).")

#define TRAMPOLINE(name, doc)                                                                                     \
    static PyObject *Model_##name(PyObject *self, PyObject *args, PyObject *kwds)                                 \
    {                                                                                                             \
        return guarded((ModelObject *)self, args, kwds, m_##name);                                                \
    }
MODEL_METHODS(TRAMPOLINE)
#undef TRAMPOLINE

#define ENTRY(name, doc) {#name, (PyCFunction)(void (*)(void))Model_##name, METH_VARARGS | METH_KEYWORDS, doc},
static PyMethodDef Model_methods[] = {
    {"close", (PyCFunction)Model_close, METH_NOARGS, "close($self, /)\n--\n\nFree the engine's memory now."},
    MODEL_METHODS(ENTRY){NULL, NULL, 0, NULL},
};
#undef ENTRY

static PyGetSetDef Model_getset[] = {
    {"device", (getter)Model_get_device, NULL, "device string ('cpu', 'cuda:0', ...)", NULL},
    {"act_dtype", (getter)Model_get_act_dtype, NULL, "activation dtype ('float32', 'bfloat16', 'float16')", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ft_py_ModelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "falcontune._C.Model",
    .tp_basicsize = sizeof(ModelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Model(config, weights, device='cpu', act_dtype=-1)\n--\n\n"
              "The falcontune engine: a GPTQ Falcon model with optional LoRA. config: the dict of "
              "falcontune.model; weights: checkpoint name -> array; act_dtype: -1 for the device's default.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Model_init,
    .tp_dealloc = (destructor)Model_dealloc,
    .tp_methods = Model_methods,
    .tp_getset = Model_getset,
};
