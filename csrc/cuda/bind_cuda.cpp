// Registers the CUDA implementations of the operators declared in csrc/ops.cpp.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../tensor_params.h"
#include "de_cuda.h"
#include "merge_cuda.h"
#include "../module.h"

namespace evolver_kernels {
namespace {

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "evolver_kernels: ", op, " CUDA launch failed: ", cudaGetErrorString(status));
}

void de_mutate_crossover_cuda_op(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& base,
                                 const c10::optional<at::Tensor>& b, double F, int64_t threshold, int64_t seed,
                                 int64_t stream, int64_t offset, const at::Tensor& out) {
  const DEParams params = make_de_params(x, a, base, b, F, threshold, seed, stream, offset, out);
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(launch_de_mutate_crossover_cuda(params, c10::cuda::getCurrentCUDAStream()), "de_mutate_crossover");
}

void crossover_mask_cuda_op(const at::Tensor& out, int64_t threshold, int64_t seed, int64_t stream, int64_t offset) {
  const MaskParams params = make_mask_params(out, threshold, seed, stream, offset);
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(launch_crossover_mask_cuda(params, c10::cuda::getCurrentCUDAStream()), "crossover_mask");
}

at::Tensor philox4x32_10_cuda_op(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "evolver_kernels: counters must be an int64 [n, 4] tensor");
  const at::Tensor in = counters.contiguous();
  at::Tensor out = at::empty_like(in);
  const c10::cuda::CUDAGuard guard(in.device());
  check_launch(launch_philox4x32_10_cuda(in.data_ptr<int64_t>(), out.data_ptr<int64_t>(), in.size(0),
                                         static_cast<uint32_t>(k0), static_cast<uint32_t>(k1),
                                         c10::cuda::getCurrentCUDAStream()),
               "philox4x32_10");
  return out;
}

void run_merge_cuda(const MergeParams& params, const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(launch_merge_cuda(params, c10::cuda::getCurrentCUDAStream()), "merge");
}

}  // namespace
}  // namespace evolver_kernels

TORCH_LIBRARY_IMPL(evolver_kernels, CUDA, m) {
  m.impl("de_mutate_crossover_", &evolver_kernels::de_mutate_crossover_cuda_op);
  m.impl("crossover_mask_", &evolver_kernels::crossover_mask_cuda_op);
  m.impl("philox4x32_10", &evolver_kernels::philox4x32_10_cuda_op);
  m.impl("merge_", &evolver_kernels::merge_op<evolver_kernels::run_merge_cuda>);
}

// Importing the module runs the registrations above; the module reports its build (module.h).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { evolver_kernels::describe_build(m); }
