/* Fused CPU kernels for the merge engine (worker/engine.py), built by setup.py when a C compiler
 * is there; without them the engine does the same arithmetic with torch ops, in more passes.
 *
 * add_bf16: out = bfloat16(float32(weight) + delta), the last step of a LoRA merge of a bfloat16
 * weight. torch does it in four passes over a row block (upcast, add, finite check, downcast),
 * each reading or writing memory; this is one. The arithmetic is torch's, bit for bit:
 *   - bfloat16 -> float32 is exact (the 16 bits become the high half);
 *   - one IEEE float32 addition (no fast-math: the compiler may not reorder or fuse it);
 *   - float32 -> bfloat16 rounds to nearest even, as c10::BFloat16 does for every finite value.
 * It returns False when any result is NaN or infinite (a NaN or infinite input, a float32 sum
 * that overflowed, or a sum that rounded up past bfloat16's largest value); the engine then names
 * the tensor in its error, and the output holds garbage nobody publishes.
 *
 * The arguments are addresses of contiguous CPU tensors (torch's data_ptr()), checked by the
 * caller: `count` bfloat16 weights, `count` float32 deltas, `count` bfloat16 outputs. `out` may
 * be `weight` itself (the engine merges in place); each element is read before it is written. The
 * GIL is released while the loop runs, so the pipeline's other threads keep going.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Vectorise without a run-time overlap check: out == weight is safe (same index, read first),
 * but a compiler that only knows they may overlap would take its scalar loop for it. */
#if defined(__clang__)
#define IGNORE_OVERLAP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define IGNORE_OVERLAP _Pragma("GCC ivdep")
#else
#define IGNORE_OVERLAP
#endif

/* x86-64 builds for the baseline (SSE2) unless told otherwise, and its SSE2 loop was 3x slower
 * than AVX2's here (16 vs 5.6 ms per 5632x2048 weight: SSE2 has no 16 -> 32-bit widening load).
 * With glibc, GCC and clang build an AVX2 copy too and the loader picks one for the CPU. */
#if defined(__x86_64__) && defined(__GLIBC__) && (defined(__GNUC__) || defined(__clang__))
#define FOR_EACH_CPU __attribute__((target_clones("avx2", "default")))
#else
#define FOR_EACH_CPU
#endif

FOR_EACH_CPU
static int add_bf16_loop(const uint16_t *weight, const float *delta, uint16_t *out,
                         size_t count) {
    uint32_t non_finite = 0;
    IGNORE_OVERLAP
    for (size_t i = 0; i < count; i++) {
        uint32_t weight_bits = (uint32_t)weight[i] << 16;
        float weight_value;
        memcpy(&weight_value, &weight_bits, sizeof weight_value);
        float sum = delta[i] + weight_value;
        uint32_t bits;
        memcpy(&bits, &sum, sizeof bits);
        uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
        out[i] = (uint16_t)rounded;
        /* all exponent bits set: the sum is NaN or inf, or rounding carried it to inf */
        non_finite |= ((bits & 0x7F800000u) == 0x7F800000u) | ((rounded & 0x7F80u) == 0x7F80u);
    }
    return non_finite == 0;
}

static PyObject *add_bf16(PyObject *self, PyObject *args) {
    unsigned long long weight, delta, out;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "KKKn:add_bf16", &weight, &delta, &out, &count)) {
        return NULL;
    }
    if (count < 0 || !weight || !delta || !out) {
        PyErr_SetString(PyExc_ValueError, "add_bf16: null address or negative count");
        return NULL;
    }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = add_bf16_loop((const uint16_t *)(uintptr_t)weight, (const float *)(uintptr_t)delta,
                           (uint16_t *)(uintptr_t)out, (size_t)count);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(finite);
}

static PyMethodDef methods[] = {
    {"add_bf16", add_bf16, METH_VARARGS,
     "add_bf16(weight, delta, out, count) -> bool: out = bfloat16(float32(weight) + delta), "
     "rounded as torch rounds; False if any result is not finite. Addresses of contiguous "
     "tensors; out may be weight."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "worker._kernels", "Fused CPU kernels for the merge engine.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
