// CUDA backend entry points. Plain C++ (no torch headers): csrc/cuda/bind_cuda.cpp wraps them as ops.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../de_params.h"

namespace evolver_kernels {

// Both enqueue on `stream` and return the launch status.
cudaError_t launch_de_mutate_crossover_cuda(const DEParams& params, cudaStream_t stream);
cudaError_t launch_crossover_mask_cuda(const MaskParams& params, cudaStream_t stream);
// Test hook: Philox4x32-10 of n rows of 4 counters (int64 holding 32-bit values) into out [n, 4].
cudaError_t launch_philox4x32_10_cuda(const int64_t* counters, int64_t* out, int64_t n, uint32_t k0, uint32_t k1,
                                      cudaStream_t stream);

}  // namespace evolver_kernels
