/* py_oprunner.c -- falcontune._C.OpRunner: one op of the backend table on numpy arrays (opdebug.h),
 * for the op-level tests (tests/test_ops.py); and _C.OPS, the op table as the runner covers it. */
#include "py_binding.h" /* Python.h first, as it asks */

#include <string.h>

#include "opdebug.h"

typedef struct {
    PyObject_HEAD
    ft_op_runner *runner;
    int busy;
} OpRunnerObject;

static int parse_act_dtype(PyObject *obj, int *out)
{
    *out = -1;
    if (obj == Py_None) return 0;
    const char *s = PyUnicode_Check(obj) ? PyUnicode_AsUTF8(obj) : NULL;
    for (int dt = FT_F32; s && dt <= FT_BF16; dt++)
        if (strcmp(s, ft_dtype_name((ft_dtype)dt)) == 0) {
            *out = dt;
            return 0;
        }
    if (!PyErr_Occurred())
        PyErr_Format(PyExc_ValueError, "act_dtype: expected None, 'float32', 'float16' or 'bfloat16', got %R", obj);
    return -1;
}

static int OpRunner_init(OpRunnerObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"device", "act_dtype", NULL};
    const char *device = "cpu";
    PyObject *dtype_obj = Py_None;
    int act_dtype;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|sO:OpRunner", kwlist, &device, &dtype_obj)) return -1;
    if (self->runner || self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "OpRunner is already initialised");
        return -1;
    }
    if (parse_act_dtype(dtype_obj, &act_dtype)) return -1;
    ft_op_runner *r = NULL;
    self->busy = 1;
    ENGINE(ft_op_runner_create(device, act_dtype, &r, ERR), self->busy = 0; return -1);
    self->busy = 0;
    self->runner = r;
    return 0;
}

static void OpRunner_dealloc(OpRunnerObject *self)
{
    ft_op_runner_free(self->runner);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int hold(OpRunnerObject *self)
{
    if (!self->runner) {
        PyErr_SetString(PyExc_RuntimeError, "OpRunner is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "OpRunner is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

/* One keyword value: an int / bool / float scalar, or an array copied to a fresh float32 or int32
 * array (the op's results are written into the copy, which run() returns). */
static int op_value(PyObject *name, PyObject *obj, ft_op_value *v, PyObject *arrays)
{
    memset(v, 0, sizeof *v);
    if (!(v->name = PyUnicode_AsUTF8(name))) return -1;
    if (PyBool_Check(obj) || PyLong_Check(obj)) {
        long long x = PyLong_AsLongLong(obj);
        if (x == -1 && PyErr_Occurred()) return -1;
        if (x > (1LL << 53) || x < -(1LL << 53))
            return PyErr_Format(PyExc_ValueError, "%s: integer out of range", v->name), -1;
        v->kind = FT_OPV_INT;
        v->number = (double)x;
        return 0;
    }
    if (PyFloat_Check(obj)) {
        v->kind = FT_OPV_FLOAT;
        v->number = PyFloat_AS_DOUBLE(obj);
        return 0;
    }
    PyArrayObject *in = (PyArrayObject *)PyArray_FROMANY(obj, NPY_NOTYPE, 0, 0, 0);
    if (!in) return -1;
    PyArrayObject *a = NULL;
    if (PyArray_ISINTEGER(in) || PyArray_ISBOOL(in)) {
        a = ft_py_int32_array((PyObject *)in, PyArray_NDIM(in), v->name, 1); /* always a fresh copy */
        v->kind = FT_OPV_I32;
    } else if (PyArray_ISFLOAT(in)) {
        a = (PyArrayObject *)PyArray_FROMANY((PyObject *)in, NPY_FLOAT32, 0, 0,
                                             NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST |
                                                 NPY_ARRAY_ENSURECOPY);
        v->kind = FT_OPV_F32;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: expected a number or an integer / float array, got dtype %R", v->name,
                     (PyObject *)PyArray_DESCR(in));
    }
    Py_DECREF(in);
    if (!a) return -1;
    v->data = PyArray_DATA(a);
    v->count = PyArray_SIZE(a);
    int rc = PyDict_SetItem(arrays, name, (PyObject *)a);
    Py_DECREF(a);
    return rc;
}

static PyObject *OpRunner_run(OpRunnerObject *self, PyObject *args, PyObject *kwds)
{
    const char *op;
    if (!PyArg_ParseTuple(args, "s:run", &op)) return NULL;
    if (hold(self)) return NULL;
    PyObject *arrays = PyDict_New(), *ret = NULL;
    const Py_ssize_t n = kwds ? PyDict_Size(kwds) : 0;
    ft_op_value *vals = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof *vals);
    int graph = 0, nv = 0;
    if (!arrays || !vals) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (kwds && PyDict_Next(kwds, &pos, &key, &value)) {
        if (PyUnicode_Check(key) && PyUnicode_CompareWithASCIIString(key, "graph") == 0) {
            if ((graph = PyObject_IsTrue(value)) < 0) goto done;
            continue;
        }
        if (op_value(key, value, &vals[nv++], arrays)) goto done;
    }
    double result = 0.0;
    int has_result = 0;
    ENGINE(ft_op_run(self->runner, op, vals, nv, graph, &result, &has_result, ERR), goto done);
    if (has_result) {
        PyObject *r = PyFloat_FromDouble(result);
        if (!r || PyDict_SetItemString(arrays, "result", r)) {
            Py_XDECREF(r);
            goto done;
        }
        Py_DECREF(r);
    }
    ret = arrays;
    arrays = NULL;
done:
    self->busy = 0;
    Py_XDECREF(arrays);
    PyMem_Free(vals);
    return ret;
}

static PyObject *OpRunner_memory_stats(OpRunnerObject *self, PyObject *Py_UNUSED(ignored))
{
    if (hold(self)) return NULL;
    size_t current = 0, peak = 0;
    ft_error err = {0};
    ft_status st = ft_op_runner_memory(self->runner, &current, &peak, &err);
    self->busy = 0;
    if (st) return ft_py_raise(&err);
    return Py_BuildValue("(nn)", (Py_ssize_t)current, (Py_ssize_t)peak);
}

static PyObject *OpRunner_get_act_dtype(OpRunnerObject *self, void *closure)
{
    (void)closure;
    if (!self->runner) return PyErr_Format(PyExc_RuntimeError, "OpRunner is not initialised");
    return PyUnicode_FromString(ft_dtype_name(ft_op_runner_act_dtype(self->runner)));
}

static PyObject *OpRunner_get_backend(OpRunnerObject *self, void *closure)
{
    (void)closure;
    if (!self->runner) return PyErr_Format(PyExc_RuntimeError, "OpRunner is not initialised");
    return PyUnicode_FromString(ft_op_runner_backend(self->runner));
}

static PyMethodDef OpRunner_methods[] = {
    {"run", (PyCFunction)(void (*)(void))OpRunner_run, METH_VARARGS | METH_KEYWORDS,
     "run($self, op, /, **values)\n--\n\n"
     "Run one op of the backend table: values are its arguments by their backend.h names (arrays of any "
     "shape, flat to the op; ints; floats), every array it touches included; graph=True runs it captured in a "
     "backend graph. Returns {name: array after the op} (float32 or int32 copies), plus 'result' for sumsq."},
    {"memory_stats", (PyCFunction)OpRunner_memory_stats, METH_NOARGS,
     "memory_stats($self, /)\n--\n\n(bytes the backend holds now, high-water mark); (0, 0) on the CPU."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef OpRunner_getset[] = {
    {"act_dtype", (getter)OpRunner_get_act_dtype, NULL, "activation dtype of the backend", NULL},
    {"backend", (getter)OpRunner_get_backend, NULL, "'cpu' or 'cuda'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject ft_py_OpRunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "falcontune._C.OpRunner",
    .tp_basicsize = sizeof(OpRunnerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "OpRunner(device='cpu', act_dtype=None)\n--\n\n"
              "One backend, to run single ops of its op table on host arrays (op-level tests).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)OpRunner_init,
    .tp_dealloc = (destructor)OpRunner_dealloc,
    .tp_methods = OpRunner_methods,
    .tp_getset = OpRunner_getset,
};

int ft_py_add_op_constants(PyObject *m)
{
    const int n = ft_op_count();
    PyObject *ops = PyTuple_New(n);
    if (!ops) return -1;
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(ss)", ft_op_name(i), ft_op_coverage(i));
        if (!t) {
            Py_DECREF(ops);
            return -1;
        }
        PyTuple_SET_ITEM(ops, i, t);
    }
    int rc = PyModule_AddObjectRef(m, "OPS", ops);
    Py_DECREF(ops);
    return rc;
}
