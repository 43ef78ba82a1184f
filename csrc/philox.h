// The one Philox4x32-10 definition of the package (Random123: Salmon et al., SC'11), usable from host
// and device code, and the counter layout of the random-stream contract (docs/ARCHITECTURE.md §2).
//
// Element j (64-bit global index) takes word (j & 3) of philox(counter, key) with
//   counter = (q lo, q hi, stream lo, stream hi), q = j >> 2,   key = (seed lo, seed hi).
// It is selected for crossover when word < threshold, threshold = floor(CR * 2**32) in [0, 2**32],
// compared in 64-bit integers.
#pragma once

#include <cstdint>

#if !defined(__CUDACC__) && (defined(__AVX512F__) || defined(__AVX2__))
#include <immintrin.h>
#endif

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

#if !defined(__CUDACC__)
// The same ten rounds over L independent counters (arrays of L words each), for the CPU backend.
// With AVX-512 or AVX2 the lanes run in registers, 16 or 8 at a time, with the 32x32->64 multiply done by
// vpmuludq on even and odd lanes (compilers vectorise the portable loop with 64-bit multiplies instead,
// which costs several times more). The portable loop is the fallback and handles the remainder.
#if defined(__AVX512F__)
inline void philox_mul_hi_lo_avx512(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}
#elif defined(__AVX2__)
inline void philox_mul_hi_lo_avx2(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

template <int L>
inline void philox4x32_10_lanes(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0,
                                uint32_t k1) {
  int done = 0;
#if defined(__AVX512F__)
  // Four vectors of 16 lanes per pass: four independent dependency chains keep the multipliers busy
  // (one chain is bound by the multiply-blend-xor latency of each round).
  constexpr int kV = 4, kW = 16;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  for (; done + kV * kW <= L; done += kV * kW) {
    __m512i x0[kV], x1[kV], x2[kV], x3[kV];
    for (int v = 0; v < kV; ++v) {
      x0[v] = _mm512_loadu_si512(c0 + done + v * kW);
      x1[v] = _mm512_loadu_si512(c1 + done + v * kW);
      x2[v] = _mm512_loadu_si512(c2 + done + v * kW);
      x3[v] = _mm512_loadu_si512(c3 + done + v * kW);
    }
    uint32_t r0 = k0, r1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m512i key0 = _mm512_set1_epi32(static_cast<int>(r0)), key1 = _mm512_set1_epi32(static_cast<int>(r1));
      for (int v = 0; v < kV; ++v) {
        __m512i hi0, lo0, hi1, lo1;
        philox_mul_hi_lo_avx512(x0[v], m0, hi0, lo0);
        philox_mul_hi_lo_avx512(x2[v], m1, hi1, lo1);
        x0[v] = _mm512_ternarylogic_epi32(hi1, x1[v], key0, 0x96);  // three-way xor
        x1[v] = lo1;
        x2[v] = _mm512_ternarylogic_epi32(hi0, x3[v], key1, 0x96);
        x3[v] = lo0;
      }
      r0 += kPhiloxW0;
      r1 += kPhiloxW1;
    }
    for (int v = 0; v < kV; ++v) {
      _mm512_storeu_si512(c0 + done + v * kW, x0[v]);
      _mm512_storeu_si512(c1 + done + v * kW, x1[v]);
      _mm512_storeu_si512(c2 + done + v * kW, x2[v]);
      _mm512_storeu_si512(c3 + done + v * kW, x3[v]);
    }
  }
#elif defined(__AVX2__)
  constexpr int kV = 4, kW = 8;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (; done + kV * kW <= L; done += kV * kW) {
    __m256i x0[kV], x1[kV], x2[kV], x3[kV];
    for (int v = 0; v < kV; ++v) {
      x0[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + done + v * kW));
      x1[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + done + v * kW));
      x2[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c2 + done + v * kW));
      x3[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c3 + done + v * kW));
    }
    uint32_t r0 = k0, r1 = k1;
    for (int round = 0; round < 10; ++round) {
      const __m256i key0 = _mm256_set1_epi32(static_cast<int>(r0)), key1 = _mm256_set1_epi32(static_cast<int>(r1));
      for (int v = 0; v < kV; ++v) {
        __m256i hi0, lo0, hi1, lo1;
        philox_mul_hi_lo_avx2(x0[v], m0, hi0, lo0);
        philox_mul_hi_lo_avx2(x2[v], m1, hi1, lo1);
        x0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[v]), key0);
        x1[v] = lo1;
        x2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[v]), key1);
        x3[v] = lo0;
      }
      r0 += kPhiloxW0;
      r1 += kPhiloxW1;
    }
    for (int v = 0; v < kV; ++v) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c0 + done + v * kW), x0[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c1 + done + v * kW), x1[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c2 + done + v * kW), x2[v]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c3 + done + v * kW), x3[v]);
    }
  }
#endif
  for (int l = done; l < L; ++l) philox4x32_10(c0[l], c1[l], c2[l], c3[l], k0, k1);
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
