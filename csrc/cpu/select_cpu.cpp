// CPU passes of the exact magnitude selections over |x - base| in fp32 (the bits the fused merge's task vectors
// have), threaded with ATen's pool: radix histograms (each thread counts into its own 32-bit histogram, 256 KiB,
// then adds it into the shared 64-bit counts under a lock: the same counts whatever the threads or their order)
// and the gather of a sampled window (what lies above it counted, what lies in it collected).
#include "select_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int64_t kBuckets = 1 << 16;
constexpr int64_t kGrain = 1 << 16;

// |x[i] - base[i]| (|x[i]| without a base) in fp32, as its bits: non-negative floats order as their bits.
template <typename Codec, bool kBase>
inline uint32_t magnitude_bits(const typename Codec::Bits* x, const typename Codec::Bits* base, int64_t i) {
  const float v = kBase ? Codec::load(x[i]) - Codec::load(base[i]) : Codec::load(x[i]);
  return float_to_bits(v) & 0x7fffffffu;
}

// run(codec) with the codec of `type`.
template <typename Run>
void with_codec(ElementType type, Run&& run) {
  switch (type) {
    case ElementType::kFloat32:
      return run(Float32Codec{});
    case ElementType::kBFloat16:
      return run(BFloat16Codec{});
    case ElementType::kFloat16:
      return run(Float16Codec{});
  }
}

template <typename Codec, bool kBase, bool kSelect>
void histogram_kernel(const HistogramParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* base = static_cast<const Bits*>(p.base);
  std::mutex lock;
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> local(static_cast<size_t>(p.n_counts), 0u);
    constexpr int64_t kStep = 1 << 20;  // 32-bit counts never overflow: flushed every 2^20 elements at most
    for (int64_t lo = begin; lo < end; lo += kStep) {
      const int64_t hi = std::min(end, lo + kStep);
      for (int64_t i = lo; i < hi; ++i) {
        const uint32_t bits = magnitude_bits<Codec, kBase>(x, base, i);
        if (kSelect) {
          const int32_t slot = p.slots[bits >> 16];
          if (slot >= 0) ++local[static_cast<size_t>(slot) * kBuckets + (bits & 0xffffu)];
        } else {
          ++local[bits >> 16];
        }
      }
      std::lock_guard<std::mutex> guard(lock);
      for (int64_t j = 0; j < p.n_counts; ++j) {
        p.counts[j] += local[j];
        local[j] = 0;
      }
    }
  });
}

template <typename Codec>
void dispatch(const HistogramParams& p) {
  const bool base = p.base != nullptr, select = p.slots != nullptr;
  if (base && select) return histogram_kernel<Codec, true, true>(p);
  if (base) return histogram_kernel<Codec, true, false>(p);
  if (select) return histogram_kernel<Codec, false, true>(p);
  histogram_kernel<Codec, false, false>(p);
}

// The magnitudes in the window [lo, hi] gathered into out (their fp32 bits), those above hi counted: most elements
// fall outside a narrow window, so the loop is loads, a subtraction and two predictable compares.
template <typename Codec, bool kBase>
void gather_kernel(const GatherParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* base = static_cast<const Bits*>(p.base);
  const uint32_t lo = p.lo, span = p.hi - p.lo;
  std::mutex lock;
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> inside;
    int64_t above = 0;
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t bits = magnitude_bits<Codec, kBase>(x, base, i);
      if (bits - lo <= span) {  // wraps around below the window: not gathered
        inside.push_back(bits);
      } else if (bits > lo) {
        ++above;
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    p.counts[0] += above;
    const int64_t at = p.counts[1];
    const int64_t room = std::max<int64_t>(0, std::min<int64_t>(p.capacity - at, static_cast<int64_t>(inside.size())));
    std::copy(inside.begin(), inside.begin() + room, p.out + at);
    p.counts[1] += static_cast<int64_t>(inside.size());  // counted beyond the capacity too: the caller sees it
  });
}

}  // namespace

void magnitude_histogram_cpu(const HistogramParams& p) {
  with_codec(p.type, [&](auto codec) { dispatch<decltype(codec)>(p); });
}

void magnitude_gather_cpu(const GatherParams& p) {
  with_codec(p.type, [&](auto codec) {
    using Codec = decltype(codec);
    p.base != nullptr ? gather_kernel<Codec, true>(p) : gather_kernel<Codec, false>(p);
  });
}

}  // namespace evolver_kernels
