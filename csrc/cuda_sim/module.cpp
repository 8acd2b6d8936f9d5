// segfast._cuda_sim: importing it registers the simulated CUDA kernels (csrc/cuda/*.cu compiled
// with SEGFAST_CUDA_SIM) as torch.ops.segfast_sim.* for CPU tensors. A test-only module: wheels do
// not build it (SEGFAST_CUDA_SIM=OFF).
#include <Python.h>

PyMODINIT_FUNC PyInit__cuda_sim(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_cuda_sim",
                               "CUDA kernels on the CPU SIMT simulation, as torch.ops.segfast_sim.*",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
