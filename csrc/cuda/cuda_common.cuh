// Pieces shared by the CUDA kernels: launch geometry, alignment, element codecs (bits <-> fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../bf16_bits.h"

namespace evolver_kernels {

// Internal linkage: the CPU and CUDA extensions each define their own codecs.
namespace {

constexpr int kThreads = 256;

struct Float32Codec {
  using Bits = uint32_t;
  static __device__ __forceinline__ float load(Bits v) { return __uint_as_float(v); }
  static __device__ __forceinline__ Bits store(float f) { return __float_as_uint(f); }
};

struct BFloat16Codec {
  using Bits = uint16_t;
  static __device__ __forceinline__ float load(Bits v) { return bf16_bits_to_float(v); }
  static __device__ __forceinline__ Bits store(float f) { return float_to_bf16_bits(f); }
};

struct Float16Codec {
  using Bits = uint16_t;
  static __device__ __forceinline__ float load(Bits v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ Bits store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// Enough blocks to fill the device several times over; grid-stride loops cover the rest.
inline unsigned int grid_for(int64_t work_items) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * 16;
  return static_cast<unsigned int>(wanted < 1 ? 1 : (wanted < cap ? wanted : cap));
}

inline bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace
}  // namespace evolver_kernels
