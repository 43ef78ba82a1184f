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

struct SquaresParams {
  const void* const* x;  // n_inputs pointers to n elements each
  int n_inputs;
  const void* base;      // n elements of the same type, or nullptr
  int64_t n;
  ElementType type;
  bool select_on;        // keep only the elements whose variance over the models is at least `select` (sce)
  float select;
  double* out;           // [n_inputs]: += sum_e v_k[e]^2 over the kept elements, v_k = x_k - base in fp32
};

// sce's mean squares: the selection exactly as the fused merge makes it (block_variance), each square rounded in
// fp32, the sums in fp64 per block, the blocks' sums added in index order.
void task_vector_squares_cpu(const SquaresParams& p);

}  // namespace evolver_kernels
