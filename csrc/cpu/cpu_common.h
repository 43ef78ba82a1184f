// Pieces shared by the CPU kernels: element codecs (bits <-> fp32) and the Philox words of one block.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>

#include "../bf16_bits.h"
#include "../philox.h"

namespace evolver_kernels {

// Internal linkage: the CPU and CUDA extensions each define their own codecs.
namespace {

// Philox groups per block: 256 elements. Blocks are aligned to global groups, so a block's random words
// never depend on how the caller chunked the tensor.
constexpr int kGroups = 64;

struct Float32Codec {
  using Bits = uint32_t;
  static float load(Bits v) { return bits_to_float(v); }
  static Bits store(float f) { return float_to_bits(f); }
};

struct BFloat16Codec {
  using Bits = uint16_t;
  static float load(Bits v) { return bf16_bits_to_float(v); }
  static Bits store(float f) { return float_to_bf16_bits(f); }
};

struct Float16Codec {
  using Bits = uint16_t;
  static float load(Bits v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  static Bits store(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
};

// words[4 * l + w] = word w of group g + l, for l < kGroups, under (seed, stream); lane-wise (vectorised).
inline void block_words(uint64_t g, uint64_t seed, uint64_t stream, uint32_t* words) {
  alignas(64) uint32_t c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  const uint32_t s0 = static_cast<uint32_t>(stream), s1 = static_cast<uint32_t>(stream >> 32);
  for (int l = 0; l < kGroups; ++l) {
    const uint64_t q = g + l;
    c0[l] = static_cast<uint32_t>(q);
    c1[l] = static_cast<uint32_t>(q >> 32);
    c2[l] = s0;
    c3[l] = s1;
  }
  philox4x32_10_lanes<kGroups>(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int l = 0; l < kGroups; ++l) {
    words[4 * l] = c0[l];
    words[4 * l + 1] = c1[l];
    words[4 * l + 2] = c2[l];
    words[4 * l + 3] = c3[l];
  }
}

// var[i] = the population variance over the n task vectors taus[k * stride + i] (i < len), as
// reference.variance_reference computes it: the mean first, then the mean of the squared deviations, sums in slot
// order, each operation rounded (sce's statistic, for the merge's selection and for its threshold).
inline void block_variance(const float* taus, int n, int64_t stride, int64_t len, float* mean, float* var) {
  const float count = static_cast<float>(n);
  for (int64_t i = 0; i < len; ++i) mean[i] = var[i] = 0.0f;
  for (int k = 0; k < n; ++k) {
    const float* tau = taus + k * stride;
    for (int64_t i = 0; i < len; ++i) mean[i] = mean[i] + tau[i];
  }
  for (int64_t i = 0; i < len; ++i) mean[i] = mean[i] / count;
  for (int k = 0; k < n; ++k) {
    const float* tau = taus + k * stride;
    for (int64_t i = 0; i < len; ++i) {
      const float t = tau[i] - mean[i];
      var[i] = var[i] + t * t;
    }
  }
  for (int64_t i = 0; i < len; ++i) var[i] = var[i] / count;
}

}  // namespace
}  // namespace evolver_kernels
