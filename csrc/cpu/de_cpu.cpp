// CPU kernels: fused DE mutation + binomial crossover and the debug mask, threaded with ATen's OpenMP pool.
//
// Work is cut into blocks of kGroups Philox groups (4 * kGroups elements, aligned to the global index so a
// block's random words never depend on how the caller chunked the tensor). Per block: Philox over the
// groups lane-wise (vectorised), then one contiguous element loop (vectorised) that reads each input once
// and writes the output once. No allocation beyond a few hundred bytes of stack per thread.
#include "de_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int64_t kGrainBlocks = 64;  // blocks per parallel task: 16K elements

// Calls body(words, delta, p_lo, p_hi) for every block: the element at local index p in [p_lo, p_hi)
// has global index offset + p and its random word is words[p + delta]. prefetch(p_lo, p_hi) is called
// for a block kPrefetchBlocks ahead before each block's Philox, so that memory traffic continues while
// the random words are computed (the element loop alone would leave the memory system idle meanwhile).
constexpr int kPrefetchBlocks = 4;

template <typename Body, typename Prefetch>
void for_each_block(int64_t numel, uint64_t seed, uint64_t stream, uint64_t offset, const Body& body,
                    const Prefetch& prefetch) {
  if (numel <= 0) return;
  const uint64_t first_group = offset >> 2;
  const uint64_t end_group = (offset + static_cast<uint64_t>(numel) + 3) >> 2;
  const int64_t nblocks = static_cast<int64_t>((end_group - first_group + kGroups - 1) / kGroups);
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[4 * kGroups];
    for (int64_t blk = begin; blk < end; ++blk) {
      if (blk + kPrefetchBlocks < end) {
        const int64_t ahead = static_cast<int64_t>(4 * (first_group + static_cast<uint64_t>(blk + kPrefetchBlocks) * kGroups) - offset);
        prefetch(std::max<int64_t>(ahead, 0), std::min<int64_t>(ahead + 4 * kGroups, numel));
      }
      const uint64_t g = first_group + static_cast<uint64_t>(blk) * kGroups;
      block_words(g, seed, stream, words);
      const int64_t delta = static_cast<int64_t>(offset - 4 * g);  // in (-2**63, 3]
      const int64_t p_lo = std::max<int64_t>(-delta, 0);
      const int64_t p_hi = std::min<int64_t>(4 * kGroups - delta, numel);
      body(words, delta, p_lo, p_hi);
    }
  });
}

template <typename Codec, bool kTwoInputs>
void de_kernel(const DEParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* __restrict__ x = static_cast<const Bits*>(p.x);
  const Bits* __restrict__ a = static_cast<const Bits*>(p.a);
  const Bits* __restrict__ base = static_cast<const Bits*>(p.base ? p.base : p.x);
  const Bits* __restrict__ b = static_cast<const Bits*>(p.b ? p.b : p.x);
  Bits* out = static_cast<Bits*>(p.out);  // may equal x: each element is read before it is written
  const float F = p.F;
  const Threshold threshold(p.threshold);
  const bool streaming = p.numel * static_cast<int64_t>(sizeof(Bits)) >= kStreamBytes;
  for_each_block(p.numel, p.seed, p.stream, p.offset,
                 [&](const uint32_t* words, int64_t delta, int64_t p_lo, int64_t p_hi) {
                   alignas(64) Bits block[4 * kGroups];
                   Bits* dst = streaming ? block - p_lo : out;  // the block's results, then streamed out
                   for (int64_t i = p_lo; i < p_hi; ++i) {
                     const Bits xb = x[i];
                     float r;
                     if (kTwoInputs) {
                       const float xf = Codec::load(xb);
                       r = xf + F * (Codec::load(a[i]) - xf);
                     } else {
                       r = Codec::load(base[i]) + F * (Codec::load(a[i]) - Codec::load(b[i]));
                     }
                     dst[i] = threshold.selects(words[i + delta]) ? Codec::store(r) : xb;
                   }
                   if (streaming) stream_store(out + p_lo, block, p_hi - p_lo);
                 },
                 [&](int64_t p_lo, int64_t p_hi) {
                   constexpr int64_t kLine = 64 / sizeof(Bits);
                   for (int64_t i = p_lo; i < p_hi; i += kLine) {
                     __builtin_prefetch(x + i);
                     __builtin_prefetch(a + i);
                     if (!kTwoInputs) {
                       __builtin_prefetch(base + i);
                       __builtin_prefetch(b + i);
                     }
                     if (!streaming) __builtin_prefetch(out + i, 1);
                   }
                 });
  if (streaming) stream_fence();
}

template <typename Codec>
void de_dispatch_inputs(const DEParams& p) {
  if (p.base == nullptr && p.b == nullptr) {
    de_kernel<Codec, true>(p);
  } else {
    de_kernel<Codec, false>(p);
  }
}

}  // namespace

void de_mutate_crossover_cpu(const DEParams& p) {
  with_codec(p.dtype, [&](auto codec) { de_dispatch_inputs<decltype(codec)>(p); });
}

void crossover_mask_cpu(const MaskParams& p) {
  bool* out = p.out;
  const Threshold threshold(p.threshold);
  for_each_block(p.numel, p.seed, p.stream, p.offset,
                 [&](const uint32_t* words, int64_t delta, int64_t p_lo, int64_t p_hi) {
                   for (int64_t i = p_lo; i < p_hi; ++i) out[i] = threshold.selects(words[i + delta]);
                 },
                 [](int64_t, int64_t) {});
}

}  // namespace evolver_kernels
