// segfast._cuda_sim: importing it registers the simulated CUDA kernels (csrc/cuda/*.cu compiled
// with SEGFAST_CUDA_SIM) as torch.ops.segfast_sim.* for CPU tensors. A test-only module: wheels do
// not build it (SEGFAST_CUDA_SIM=OFF).
#include <Python.h>

#include "cuda_sim/simt.h"

namespace {

// set_stream_capturing(flag): the simulated cudaStreamIsCapturing answers flag from now on.
PyObject* set_stream_capturing(PyObject*, PyObject* flag) {
  const int value = PyObject_IsTrue(flag);
  if (value < 0) return nullptr;
  segfast::sim::set_stream_capturing(value != 0);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"set_stream_capturing", set_stream_capturing, METH_O,
     "set_stream_capturing(flag): the kernels see the stream as being captured into a CUDA graph (or not)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__cuda_sim(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_cuda_sim",
                               "CUDA kernels on the CPU SIMT simulation, as torch.ops.segfast_sim.*",
                               -1,
                               methods,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
