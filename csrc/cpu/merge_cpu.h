// CPU backend entry point of the fused merge (no torch types: the op layer builds MergeParams).
#pragma once

#include <cstdint>

#include "../merge_params.h"

namespace evolver_kernels {

// TIES' trims found in the merge's own pass (the ties_window_merge_ op; methods/task_vectors.py): per model a
// window of |tau_k|'s fp32 bits that a sample narrowed its threshold to. The merge trims below each lo (whatever
// the threshold in the window, an element above hi is kept and one below lo dropped), gathers what lies in a window,
// counts what lies above it, and records every element that lies in some model's window (its index and inputs), to
// be merged again once the thresholds are known: the models and the base read once, not once more to select.
struct MergeWindows {
  uint32_t lo[kMaxMergeInputs];
  uint32_t hi[kMaxMergeInputs];
  int32_t* gathered[kMaxMergeInputs];  // model k's magnitudes in its window (their fp32 bits), capacity[k] at most
  int64_t capacity[kMaxMergeInputs];
  int64_t* counts;      // [n_inputs][2]: += the magnitudes above hi, += those in the window (gathered or not)
  int64_t index_base;   // the index recorded for this call's element 0
  int64_t* fix_index;   // [fix_capacity]: the indices of the elements in some window
  void* fix_values;     // [n_inputs + 1][fix_capacity] of the merge's dtype: their x_k, then their base
  int64_t fix_capacity;
  int64_t* fix_count;   // [1]: += how many such elements (recorded or not)
};

// windows: TIES with a base and no drops only (params.ties, params.band), else nullptr.
void merge_cpu(const MergeParams& params, const MergeWindows* windows = nullptr);

}  // namespace evolver_kernels
