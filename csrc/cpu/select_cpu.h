// CPU radix histograms of task-vector magnitudes: the two passes of an exact k-th-largest selection
// (evolver_kernels/methods/task_vectors.py: kth_largest_magnitudes), without a sort and without a tensor of |x - base|.
#pragma once

#include <cstdint>

#include "../de_params.h"  // ElementType

namespace evolver_kernels {

struct HistogramParams {
  const void* x;      // n elements
  const void* base;   // n elements of the same type, or nullptr (the magnitudes of x)
  int64_t n;
  ElementType type;
  const int32_t* slots;  // nullptr: pass 1; else 65536 slots (-1: not selected) of the top 16 bits
  int64_t* counts;       // pass 1: [65536] by the top 16 bits; pass 2: [slots used][65536] by the low 16 bits
  int64_t n_counts;      // elements of counts
};

void magnitude_histogram_cpu(const HistogramParams& p);

struct GatherWindow {
  int32_t input;     // the x it selects from
  uint32_t lo, hi;   // the window: magnitudes whose fp32 bits are in [lo, hi]
  int32_t* out;      // the window's bits, appended at counts[1] while room is left (capacity elements)
  int64_t capacity;
  int64_t* counts;   // [2]: += the magnitudes above hi, += those in the window (gathered or not)
};

struct GatherParams {
  const void* const* x;  // n_inputs pointers to n elements each
  int n_inputs;
  const void* base;      // n elements of the same type, or nullptr
  int64_t n;
  ElementType type;
  const GatherWindow* windows;
  int n_windows;
};

// One pass of exact selections that a sample narrowed to windows: per window, what lies above it counted, what lies
// in it gathered (its k-th is then found among few). Every x and the base read once, whatever the windows: TIES
// selects each model's threshold in the same pass.
void magnitude_gather_cpu(const GatherParams& p);

struct RankDropParams {
  const void* x;         // rows * cols elements, row-major
  const void* base;      // the same, or nullptr
  int64_t rows, cols;
  ElementType type;
  const int64_t* table;  // [cols], non-increasing: the drop threshold of each rank
  uint64_t seed, stream, offset;  // the Philox words: element j of the span has global index offset + j
  int64_t* out;          // rows * cols: kDropAll where the element is dropped, else 0 (when packed is nullptr)
  uint8_t* packed;       // or ceil(rows * cols / 8) bytes, zeroed: bit j % 8 of byte j / 8 set where j is dropped
};

// The drop threshold that drops everything: every 32-bit word is below it.
constexpr int64_t kDropAll = int64_t{1} << 32;

// della's drops: element j of row r is dropped where its Philox word (seed, stream, offset + r * cols + j) is below
// table[its rank], the rank of its magnitude among row r's (ascending, ties by index: a stable sort's order; all
// NaNs equal and above infinity, as torch.argsort orders them). Written as thresholds the fused merge compares
// the same words with: kDropAll (dropped) or 0 (kept); or as bits (packed), which the rescale reads and which
// expand into those thresholds for the merge.
void magnitude_rank_drops_cpu(const RankDropParams& p);

struct VarianceParams {
  const void* const* x;  // n_inputs pointers to n elements each
  int n_inputs;
  const void* base;      // n elements of the same type, or nullptr
  int64_t n;
  ElementType type;
  float* out;            // n: the population variance over the inputs of x_k - base, in fp32
};

// sce's selection statistic as the fused merge forms it (reference.variance_reference): m = (sum_k v_k) / N, then
// (sum_k (v_k - m)^2) / N, v_k = x_k - base in fp32, sums in slot order, each operation rounded.
void task_vector_variance_cpu(const VarianceParams& p);

}  // namespace evolver_kernels
