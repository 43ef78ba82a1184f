// Pieces shared by the CPU kernels: element codecs (bits <-> fp32) and the one switch over them, the Philox words
// of one block, streaming stores of large outputs, and the variance of a block's task vectors.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#include "../bf16_bits.h"
#include "../de_params.h"  // ElementType
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

// run(codec) with the codec of `type`: the kernels' one switch over the element types.
template <typename Run>
inline void with_codec(ElementType type, Run&& run) {
  switch (type) {
    case ElementType::kFloat32:
      return run(Float32Codec{});
    case ElementType::kBFloat16:
      return run(BFloat16Codec{});
    case ElementType::kFloat16:
      return run(Float16Codec{});
  }
}

// run(codec, kBase) with the codec of `type` and kBase (std::true_type or std::false_type) whether a base is given:
// the kernels over task vectors x - base (x alone without a base).
template <typename Run>
inline void with_codec_base(ElementType type, bool base, Run&& run) {
  with_codec(type, [&](auto codec) { base ? run(codec, std::true_type{}) : run(codec, std::false_type{}); });
}

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

// Bits lo .. hi - 1 of `packed` from flags[0 .. hi - lo): whole bytes stored, a byte shared with a neighbouring
// range (another thread's: ranges need not start or end on a byte) or-ed in atomically.
inline void pack_bits(const uint8_t* flags, int64_t lo, int64_t hi, uint8_t* packed) {
  for (int64_t j = lo; j < hi;) {
    const int64_t byte = j >> 3, end = std::min(hi, (byte + 1) * 8);
    uint8_t bits = 0;
    for (int64_t q = j; q < end; ++q) bits |= static_cast<uint8_t>(flags[q - lo] << (q & 7));
    if ((j & 7) == 0 && end == (byte + 1) * 8) {
      packed[byte] = bits;
    } else {
      __atomic_fetch_or(packed + byte, bits, __ATOMIC_RELAXED);
    }
    j = end;
  }
}

// Outputs at least this large bypass the caches (streaming stores, as memcpy writes large copies): a store that
// misses the cache otherwise reads the line first, one more stream than the op needs, and the output would only
// evict the inputs.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Stores vals[0 .. len) at dst: the 64-byte-aligned lines in between with streaming stores where the CPU has them
// (AVX-512 or AVX), the ends with plain ones. The caller calls stream_fence() once its threads are done.
template <typename Bits>
inline void stream_store(Bits* dst, const Bits* vals, int64_t len) {
#if defined(__AVX512F__) || defined(__AVX__)
  constexpr int64_t kLine = 64 / sizeof(Bits);
  int64_t head = static_cast<int64_t>((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64);
  if (head % sizeof(Bits)) {  // not element-aligned to a line: plain stores
    for (int64_t i = 0; i < len; ++i) dst[i] = vals[i];
    return;
  }
  head = std::min<int64_t>(head / static_cast<int64_t>(sizeof(Bits)), len);
  for (int64_t i = 0; i < head; ++i) dst[i] = vals[i];
  int64_t i = head;
  for (; i + kLine <= len; i += kLine) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), _mm512_loadu_si512(vals + i));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + i)));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i) + 1,
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vals + i) + 1));
#endif
  }
  for (; i < len; ++i) dst[i] = vals[i];
#else
  for (int64_t i = 0; i < len; ++i) dst[i] = vals[i];
#endif
}

// Makes the streaming stores visible before the op returns (after its parallel region).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

// taus[k * stride + i] = x_k[at + i] - base[at + i] in fp32 (x_k without a base) for i < len: the task vectors of
// one block of elements, as the fused merge forms them (b: len floats of scratch for the base).
template <typename Codec, bool kBase>
inline void load_task_vectors(const void* const* x, int n, const typename Codec::Bits* base, int64_t at, int64_t len,
                              int64_t stride, float* b, float* taus) {
  using Bits = typename Codec::Bits;
  if (kBase) {
    for (int64_t i = 0; i < len; ++i) b[i] = Codec::load(base[at + i]);
  }
  for (int k = 0; k < n; ++k) {
    const Bits* xk = static_cast<const Bits*>(x[k]) + at;
    float* tau = taus + k * stride;
    if (kBase) {
      for (int64_t i = 0; i < len; ++i) tau[i] = Codec::load(xk[i]) - b[i];
    } else {
      for (int64_t i = 0; i < len; ++i) tau[i] = Codec::load(xk[i]);
    }
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
