// CUDA backend entry point of the fused merge. Plain C++ (no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include "../merge_params.h"

namespace evolver_kernels {

// Enqueues on `stream` and returns the launch status.
cudaError_t launch_merge_cuda(const MergeParams& params, cudaStream_t stream);

}  // namespace evolver_kernels
