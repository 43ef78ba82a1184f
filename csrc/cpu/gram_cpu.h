// CPU Gram matrix of task vectors (model_stock's and the spherical methods' angles), in one pass over the models
// and the base, without a tensor of any task vector or product.
#pragma once

#include <cstdint>

#include "../de_params.h"  // ElementType

namespace evolver_kernels {

struct GramParams {
  const void* const* x;  // n_inputs pointers to n elements each
  int n_inputs;
  const void* base;      // n elements of the same type, or nullptr (the Gram matrix of the x_k)
  int64_t n;
  ElementType type;
  double* out;           // [n_inputs, n_inputs]: += <v_i, v_j>, v_k = x_k - base in fp32
};

// Each product v_i[e] * v_j[e] rounded in fp32 (as torch forms vs[i] * vs[j]), summed in fp64 per block of elements
// and the blocks' sums added in index order: the same matrix whatever the threads.
void task_vector_gram_cpu(const GramParams& p);

}  // namespace evolver_kernels
