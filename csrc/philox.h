// The one Philox4x32-10 definition of the package (Random123: Salmon et al., SC'11), usable from host
// and device code, and the counter layout of the random-stream contract (shared/DESIGN.md section 3).
//
// Element j (64-bit global index) takes word (j & 3) of philox(counter, key) with
//   counter = (q lo, q hi, stream lo, stream hi), q = j >> 2,   key = (seed lo, seed hi).
// It is selected for crossover when word < threshold, threshold = floor(CR * 2**32) in [0, 2**32],
// compared in 64-bit integers.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define EK_HOST_DEVICE inline
#endif

namespace evolver_kernels {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

EK_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, b);
  lo = a * b;
#else
  // One 32x32->64 multiply: compilers turn a lane-wise loop of these into pmuludq.
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// One round in place on (c0, c1, c2, c3) with key (k0, k1).
EK_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                 uint32_t k1) {
  uint32_t hi0, lo0, hi1, lo1;
  mul_hi_lo(kPhiloxM0, c0, hi0, lo0);
  mul_hi_lo(kPhiloxM1, c2, hi1, lo1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Ten rounds in place, the key bumped between rounds.
EK_HOST_DEVICE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0,
                                  uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

#if !defined(__CUDA_ARCH__)
// The same ten rounds over L independent counters, lanes innermost so that the host compiler vectorises
// across lanes (the scalar form above keeps a serial dependency chain per counter).
template <int L>
inline void philox4x32_10_lanes(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0,
                                uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < L; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}
#endif

// The four words of group q = j >> 2 for (seed, stream).
EK_HOST_DEVICE void philox_group(uint64_t q, uint64_t seed, uint64_t stream, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(q), c1 = static_cast<uint32_t>(q >> 32);
  uint32_t c2 = static_cast<uint32_t>(stream), c3 = static_cast<uint32_t>(stream >> 32);
  philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The crossover decision of the contract, word < threshold compared in 64-bit integers, so threshold 0
// selects nothing and 2**32 selects everything. Held as a flag plus a 32-bit bound so that vectorised
// loops compare 32-bit lanes.
struct Threshold {
  bool all;
  uint32_t bound;
  EK_HOST_DEVICE explicit Threshold(int64_t threshold)
      : all(threshold > 0xffffffffLL), bound(threshold > 0xffffffffLL ? 0u : static_cast<uint32_t>(threshold)) {}
  EK_HOST_DEVICE bool selects(uint32_t word) const { return all || word < bound; }
};

}  // namespace evolver_kernels
