// CPU kernel of della's rescale norms (rescale_cpu.h), threaded with ATen's pool over blocks of 256 elements.
#include "rescale_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int kBlock = 4 * kGroups;
constexpr int kLanes = 8;  // independent fp64 partial sums per block: the loop vectorises
constexpr int64_t kGrainBlocks = 64;

template <typename Codec, bool kBase>
void dropped_l1_kernel(const DropL1Params& p) {
  using Bits = typename Codec::Bits;
  const Bits* x_all = static_cast<const Bits*>(p.x);
  const Bits* base_all = static_cast<const Bits*>(p.base);
  const bool constant = p.n_thresholds == 1;
  const uint64_t first_group = p.offset >> 2;
  const uint64_t end_group = (p.offset + static_cast<uint64_t>(p.n) + 3) >> 2;
  const int64_t nblocks = static_cast<int64_t>((end_group - first_group + kGroups - 1) / kGroups);
  std::vector<double> partial(static_cast<size_t>(nblocks) * 2);
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[kBlock];
    alignas(64) float mag[kBlock], kept[kBlock];
    alignas(64) uint8_t dropped[kBlock];
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint64_t g = first_group + static_cast<uint64_t>(blk) * kGroups;
      const int64_t delta = static_cast<int64_t>(p.offset - 4 * g);  // local index i has word i + delta
      const int64_t lo = std::max<int64_t>(-delta, 0);
      const int64_t hi = std::min<int64_t>(kBlock - delta, p.n);
      const int64_t len = hi - lo;
      const Bits* x = x_all + lo;
      for (int64_t i = 0; i < len; ++i) {
        const float v = kBase ? Codec::load(x[i]) - Codec::load(base_all[lo + i]) : Codec::load(x[i]);
        mag[i] = std::fabs(v);
      }
      if (p.drops) {  // decided already: no words
        for (int64_t i = 0; i < len; ++i) dropped[i] = (p.drops[(lo + i) >> 3] >> ((lo + i) & 7)) & 1;
      } else {
        block_words(g, p.seed, p.stream, words);
        const uint32_t* word = words + lo + delta;
        if (constant) {
          const int64_t t = p.thresholds[0];
          for (int64_t i = 0; i < len; ++i) dropped[i] = static_cast<int64_t>(word[i]) < t;
        } else {
          const int64_t* thr = p.thresholds + lo;
          for (int64_t i = 0; i < len; ++i) dropped[i] = static_cast<int64_t>(word[i]) < thr[i];
        }
      }
      for (int64_t i = 0; i < len; ++i) kept[i] = dropped[i] ? 0.0f : mag[i];
      if (p.packed) pack_bits(dropped, lo, hi, p.packed);
      for (int64_t i = len; i < kBlock; ++i) mag[i] = kept[i] = 0.0f;  // a partial block's tail adds nothing
      double all[kLanes] = {}, kept_sum[kLanes] = {};
      for (int64_t i = 0; i < kBlock; i += kLanes) {
        for (int l = 0; l < kLanes; ++l) {
          all[l] += static_cast<double>(mag[i + l]);
          kept_sum[l] += static_cast<double>(kept[i + l]);
        }
      }
      double a = 0.0, k = 0.0;
      for (int l = 0; l < kLanes; ++l) {
        a += all[l];
        k += kept_sum[l];
      }
      partial[2 * blk] = a;
      partial[2 * blk + 1] = k;
    }
  });
  double a = 0.0, k = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    a += partial[2 * blk];
    k += partial[2 * blk + 1];
  }
  p.sums[0] += a;
  p.sums[1] += k;
}

}  // namespace

void dropped_l1_cpu(const DropL1Params& p) {
  if (p.n <= 0) return;
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { dropped_l1_kernel<decltype(codec), decltype(base)::value>(p); });
}

void expand_drops_cpu(const uint8_t* packed, int64_t n, int64_t* out) {
  at::parallel_for(0, (n + 7) / 8, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      const uint32_t bits = packed[byte];
      const int64_t j0 = byte * 8, len = std::min<int64_t>(8, n - j0);
      for (int64_t q = 0; q < len; ++q) out[j0 + q] = static_cast<int64_t>((bits >> q) & 1u) << 32;
    }
  });
}

}  // namespace evolver_kernels
