// CPU radix histograms of |x - base| in fp32 (the bits the fused merge's task vectors have), threaded with
// ATen's pool. Each thread counts its range into its own 32-bit histogram (256 KiB: it stays in L2), then adds
// it into the shared 64-bit counts under a lock: integer counts, the same whatever the threads or their order.
#include "select_cpu.h"

#include <ATen/Parallel.h>

#include <mutex>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int64_t kBuckets = 1 << 16;
constexpr int64_t kGrain = 1 << 16;

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
        const float v = kBase ? Codec::load(x[i]) - Codec::load(base[i]) : Codec::load(x[i]);
        const uint32_t bits = float_to_bits(v) & 0x7fffffffu;  // |v|: non-negative floats order as their bits
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

}  // namespace

void magnitude_histogram_cpu(const HistogramParams& p) {
  switch (p.type) {
    case ElementType::kFloat32:
      return dispatch<Float32Codec>(p);
    case ElementType::kBFloat16:
      return dispatch<BFloat16Codec>(p);
    case ElementType::kFloat16:
      return dispatch<Float16Codec>(p);
  }
}

}  // namespace evolver_kernels
