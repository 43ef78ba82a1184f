// Arguments of the fused merge kernels, shared by the CPU and CUDA backends. Plain C++ (no torch headers).
// The arithmetic contract, element by element, is evolver_kernels.reference.merge_reference.
#pragma once

#include <cstdint>

#include "de_params.h"

namespace evolver_kernels {

// NEARSWAP_DIFF_MIN of evolver_kernels.reference: the floor of |base - x| in nearswap's weight.
constexpr float kNearswapDiffMin = 1e-6f;

// Inputs per call. Passed by value to the CUDA kernel (about 2.9 KB of its 4 KB parameter space).
constexpr int kMaxMergeInputs = 64;

struct MergeParams {
  const void* x[kMaxMergeInputs];        // the models' tensors, all of `dtype`
  const float* fisher[kMaxMergeInputs];  // fp32 elementwise weights (Fisher merging), or all null
  float weight[kMaxMergeInputs];         // per-model weights
  float trim[kMaxMergeInputs];           // band: |tau| below this is zeroed (0: keep all)
  float top[kMaxMergeInputs];            // band with has_top: |tau| at or above this is zeroed (breadcrumbs)
  float elect_weight[kMaxMergeInputs];   // TIES: the sign is elected on sum_k elect_weight[k] * tau_k
  const void* base;                      // null: no base model (tau_k = x_k)
  void* out;                             // may equal one input (each element is read before it is written)
  int n_inputs;
  int64_t numel;
  float scale;
  float rescale;           // DARE: survivors times fp32(1 / (1 - p))
  int64_t drop_threshold;  // DARE: element of model k dropped when its word (stream + k) < this; 0: no drop
  // della: per-element thresholds of model k (int64, in [0, 2**32]; null: the global threshold above) and the
  // factor of its survivors
  const int64_t* drop_thr[kMaxMergeInputs];
  float drop_rescale[kMaxMergeInputs];
  bool table_drop;  // some drop_thr is set
  bool band;     // trim (and top) apply
  bool has_top;  // top applies
  bool ties;
  bool select_on;  // sce: every tau_k zeroed where their variance over the models is below `select`
  float select;
  bool normalize;
  float min_den;  // > 0: normalize divides by max(den, min_den) (den < min_den: min_den) instead of 0 at den 0
  bool nearswap;  // mergekit's nearswap of x[0] into base instead (nothing else applies)
  float nearswap_t;
  uint64_t seed;
  uint64_t stream;  // model k draws from stream + k
  uint64_t offset;  // global index of element 0
  ElementType dtype;
};

}  // namespace evolver_kernels
