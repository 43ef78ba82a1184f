// CPU L1 norms of a task vector before and after della's drops (mergekit's rescale: the survivors scaled back to
// the tensor's L1 norm), in one pass over x and base without a tensor of x - base or of the survivors; the drops
// optionally kept as bits, so that the merge's pass need not decide them again.
#pragma once

#include <cstdint>

#include "../de_params.h"  // ElementType

namespace evolver_kernels {

struct DropL1Params {
  const void* x;                 // n elements
  const void* base;              // n elements of the same type, or nullptr (the norms of x)
  int64_t n;
  ElementType type;
  const int64_t* thresholds;     // n thresholds, or one for every element (n_thresholds == 1)
  int64_t n_thresholds;
  const uint8_t* drops;          // or nullptr: the drops decided already, as bits (as packed); no words drawn
  uint64_t seed, stream, offset;  // the Philox words: element j has global index offset + j
  double* sums;                  // [2]: += sum_j |x_j - base_j| in fp64, += the same over the kept elements
  uint8_t* packed;               // ceil(n / 8) bytes, zeroed, or nullptr: bit j % 8 of byte j / 8 set where j drops
};

// Element j is dropped where its Philox word is below its threshold, as in the fused merge's drop_thresholds, or
// where bit j of drops is set. The magnitudes are fp32 (how the merge forms a task vector), summed in fp64 per
// block of 256 elements aligned to global Philox groups, the blocks' sums added in index order: the same sums
// whatever the threads.
void dropped_l1_cpu(const DropL1Params& p);

// The drops `packed` records as the fused merge's thresholds: out[j] = 2^32 where bit j is set (dropped), else 0.
void expand_drops_cpu(const uint8_t* packed, int64_t n, int64_t* out);

}  // namespace evolver_kernels
