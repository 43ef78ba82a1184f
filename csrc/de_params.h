// Arguments of the fused mutation + crossover kernels, shared by the CPU and CUDA backends.
// Plain C++ (no torch headers) so that .cu files can include it cheaply.
#pragma once

#include <cstdint>

namespace evolver_kernels {

// Which storage format the raw bits hold; arithmetic is always fp32.
enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct DEParams {
  const void* x;     // parent, copied bit for bit where the mask is 0
  const void* base;  // null: base is x (evolver strategy reads only x and a)
  const void* a;
  const void* b;     // null: b is x
  void* out;         // may equal x
  int64_t numel;
  float F;
  int64_t threshold;  // floor(CR * 2**32), in [0, 2**32]
  uint64_t seed;
  uint64_t stream;
  uint64_t offset;  // global index of element 0
  ElementType dtype;
};

struct MaskParams {
  bool* out;
  int64_t numel;
  int64_t threshold;
  uint64_t seed;
  uint64_t stream;
  uint64_t offset;
};

}  // namespace evolver_kernels
