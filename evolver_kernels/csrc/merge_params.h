// Arguments of the fused merge kernels, shared by the CPU and CUDA backends. Plain C++ (no torch headers).
// The arithmetic contract, element by element, is evolver_kernels.reference.merge_reference.
#pragma once

#include <cstdint>

#include "de_params.h"

namespace evolver_kernels {

// Inputs per call. Passed by value to the CUDA kernel (about 1.6 KB of its 4 KB parameter space).
constexpr int kMaxMergeInputs = 64;

struct MergeParams {
  const void* x[kMaxMergeInputs];        // the models' tensors, all of `dtype`
  const float* fisher[kMaxMergeInputs];  // fp32 elementwise weights (Fisher merging), or all null
  float weight[kMaxMergeInputs];         // per-model weights
  float trim[kMaxMergeInputs];           // TIES: |tau| below this is trimmed to 0 (0: keep all)
  const void* base;                      // null: no base model (tau_k = x_k)
  void* out;                             // may equal one input (each element is read before it is written)
  int n_inputs;
  int64_t numel;
  float scale;
  float rescale;           // DARE: survivors times fp32(1 / (1 - p))
  int64_t drop_threshold;  // DARE: element of model k dropped when its word (stream + k) < this; 0: no drop
  bool ties;
  bool normalize;
  uint64_t seed;
  uint64_t stream;  // model k draws from stream + k
  uint64_t offset;  // global index of element 0
  ElementType dtype;
};

}  // namespace evolver_kernels
