// The pybind11 module _C: loading it registers every op (TORCH_LIBRARY in ops.cpp and the kernels);
// pybind11 itself carries helpers only: build_info.
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include <pybind11/pybind11.h>

namespace {

// How many threads at::parallel_for really uses here: 1 when the module was built without
// -fopenmp, whatever at::get_num_threads() says.
int64_t parallel_for_threads() {
  const int64_t n = 4 * at::get_num_threads();
  std::vector<int64_t> thread_of(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) thread_of[i] = at::get_thread_num();
  });
  std::sort(thread_of.begin(), thread_of.end());
  return std::unique(thread_of.begin(), thread_of.end()) - thread_of.begin();
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = SEGFAST_TORCH_VERSION;
  info["compiler"] = SEGFAST_CXX_COMPILER;
#ifdef SEGFAST_WITH_CUDA
  info["cuda"] = true;
  info["nvcc"] = SEGFAST_NVCC_VERSION;
  pybind11::list archs;
  std::string_view list = SEGFAST_CUDA_ARCHS;  // TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0+PTX"
  while (!list.empty()) {
    const size_t end = std::min(list.find_first_of("; "), list.size());
    if (end > 0) archs.append(std::string(list.substr(0, end)));
    list.remove_prefix(std::min(end + 1, list.size()));
  }
  info["cuda_archs"] = archs;
#else
  info["cuda"] = false;
  info["nvcc"] = pybind11::none();
  info["cuda_archs"] = pybind11::list();
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_for_threads"] = parallel_for_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "segfast C++ operators (registered as torch.ops.segfast.*) and build information";
  m.def("build_info", &build_info, "How this segfast extension was built.");
}
