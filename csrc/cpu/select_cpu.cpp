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

// Per window, the magnitudes of its x in [lo, hi] gathered into out (their fp32 bits), those above hi counted.
// Most elements fall outside a narrow window, so each block of 256 is formed into bits (every x's, the base's
// elements read once for all of them) and counted without a branch (the count above hi would be a coin toss to the
// branch predictor), and only a block holding some of a window is looked at element by element.
template <typename Codec, bool kBase>
void gather_kernel(const GatherParams& p) {
  using Bits = typename Codec::Bits;
  constexpr int64_t kStep = 256;
  const Bits* base = static_cast<const Bits*>(p.base);
  std::mutex lock;
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<std::vector<uint32_t>> inside(static_cast<size_t>(p.n_windows));
    std::vector<int64_t> above(static_cast<size_t>(p.n_windows), 0);
    std::vector<uint32_t> bits(static_cast<size_t>(p.n_inputs * kStep));
    for (int64_t at = begin; at < end; at += kStep) {
      const int64_t len = std::min(kStep, end - at);
      for (int j = 0; j < p.n_inputs; ++j) {
        const Bits* x = static_cast<const Bits*>(p.x[j]);
        uint32_t* row = bits.data() + j * kStep;
        for (int64_t i = 0; i < len; ++i) row[i] = magnitude_bits<Codec, kBase>(x, base, at + i);
      }
      for (int w = 0; w < p.n_windows; ++w) {
        const GatherWindow& win = p.windows[w];
        const uint32_t* row = bits.data() + win.input * kStep;
        const uint32_t lo = win.lo, hi = win.hi, span = win.hi - win.lo;
        uint32_t in_window = 0, higher = 0;
        for (int64_t i = 0; i < len; ++i) {
          in_window += (row[i] - lo <= span);  // wraps around below the window: not in it
          higher += (row[i] > hi);
        }
        above[w] += higher;
        if (in_window == 0) continue;
        for (int64_t i = 0; i < len; ++i) {
          if (row[i] - lo <= span) inside[w].push_back(row[i]);
        }
      }
    }
    std::lock_guard<std::mutex> guard(lock);
    for (int w = 0; w < p.n_windows; ++w) {
      const GatherWindow& win = p.windows[w];
      const std::vector<uint32_t>& got = inside[w];
      win.counts[0] += above[w];
      const int64_t at = win.counts[1];
      const int64_t room = std::max<int64_t>(0, std::min<int64_t>(win.capacity - at, static_cast<int64_t>(got.size())));
      std::copy(got.begin(), got.begin() + room, win.out + at);
      win.counts[1] += static_cast<int64_t>(got.size());  // counted beyond the capacity too: the caller sees it
    }
  });
}

// Element j of a row is dropped where its Philox word < table[its rank]; the table is non-increasing, so a coarse
// rank settles almost every element. Per row: the magnitudes' fp32 bits cut into buckets. A bucket of one magnitude
// (bf16 task vectors tie often) ranks its members exactly in index order, from its first rank on; in another, a
// rank lies in the bucket's range [lo, hi], so that an element with word < table[hi] is dropped and one with word
// >= table[lo] kept, and only the few others are ranked exactly: by counting the row's smaller keys (bits, index: a
// stable sort's order) in a vectorised pass over the row each, or, where more are open, by sorting the members of
// their buckets. All without a branch per element and with no sort of the row. Rows run in parallel, each with its
// own buffers.
template <typename Codec, bool kBase>
void rank_drop_kernel(const RankDropParams& p) {
  using Bits = typename Codec::Bits;
  const int64_t cols = p.cols;
  // About four elements per bucket of a row's range of magnitudes (at most 2^12 buckets).
  const int bucket_bits = std::clamp(64 - __builtin_clzll(static_cast<uint64_t>(cols)) - 2, 1, 12);
  const int64_t buckets = (int64_t{1} << bucket_bits) + 2;  // the zeros' bucket, then up to 2^bits + 1 others
  constexpr uint32_t kSpan = uint32_t{16} << 23;                 // 16 binades of fp32 bits
  constexpr int64_t kScans = 8;  // open elements ranked by a pass over the row each; more: their buckets sorted
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    const int64_t* table = p.table;  // locals: stores through out must not reload them
    std::vector<uint32_t> bits(static_cast<size_t>(cols)), words(static_cast<size_t>(cols) + 8 * kGroups);
    std::vector<uint32_t> start(static_cast<size_t>(buckets) + 1);  // counts at v + 1, then first ranks at v
    std::vector<uint16_t> slot(static_cast<size_t>(cols));
    std::vector<int64_t> first_thr(static_cast<size_t>(buckets)), last_thr(static_cast<size_t>(buckets));
    std::vector<uint32_t> one(static_cast<size_t>(buckets)), cursor(static_cast<size_t>(buckets));
    std::vector<uint8_t> mixed(static_cast<size_t>(buckets));
    std::vector<uint8_t> flag(static_cast<size_t>(cols));
    std::vector<uint32_t> open(static_cast<size_t>(cols));  // the unsettled elements
    std::vector<uint8_t> unsettled(static_cast<size_t>(buckets));
    std::vector<uint32_t> groups, group_of(static_cast<size_t>(buckets)), fill;
    std::vector<uint64_t> keys;
    for (int64_t r = begin; r < end; ++r) {
      const Bits* x = static_cast<const Bits*>(p.x) + r * cols;
      const Bits* base = kBase ? static_cast<const Bits*>(p.base) + r * cols : nullptr;
      uint32_t low = 0xffffffffu, high = 0;  // the smallest non-zero magnitude's bits, the largest's
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t m = magnitude_bits<Codec, kBase>(x, base, j);
        bits[j] = m > 0x7f800000u ? 0x7fc00000u : m;  // every NaN the same
      }
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t m = bits[j];
        low = std::min(low, m - 1);  // zero wraps to the top: the smallest non-zero, minus one
        high = std::max(high, m);
      }
      low += 1;
      // Bucket 0 holds the zeros; the others cut [bottom, high] evenly in bits (which grow as the logarithm), bottom
      // at most 16 binades below the largest magnitude, smaller ones with it in bucket 1: the buckets stay small
      // where the magnitudes are, whatever the row's few smallest.
      const uint32_t bottom = std::max(std::min(low, high), high > kSpan ? high - kSpan : 0u);
      const uint32_t range = high - bottom;
      const int shift = std::max(0, (range == 0 ? 0 : 32 - __builtin_clz(range)) - bucket_bits);
      std::fill(start.begin(), start.end(), 0u);
      std::fill(mixed.begin(), mixed.end(), uint8_t{0});
      for (int64_t j = 0; j < cols; ++j) {
        const uint32_t m = bits[j];
        const uint32_t v = m == 0 ? 0u : 1u + ((std::max(m, bottom) - bottom) >> shift);
        slot[j] = static_cast<uint16_t>(v);
        const uint32_t c = start[v + 1];
        mixed[v] |= static_cast<uint8_t>((c != 0) & (one[v] != m));
        one[v] = m;
        start[v + 1] = c + 1;
      }
      for (int64_t v = 0; v + 1 < buckets; ++v) start[v + 1] += start[v];  // start[v]: the first rank of bucket v
      for (int64_t v = 0; v + 1 < buckets; ++v) {
        // A bucket of one magnitude ranks its members in index order (their cursor); another only bounds them by
        // the thresholds of its first and last rank.
        const bool bounded = mixed[v] && start[v + 1] > start[v];
        cursor[v] = start[v];
        first_thr[v] = bounded ? table[start[v]] : 0;
        last_thr[v] = bounded ? table[start[v + 1] - 1] : 0;
      }
      // The row's Philox words: groups aligned to the global index, as the merge draws them.
      const uint64_t row_start = p.offset + static_cast<uint64_t>(r * cols);
      const uint64_t group = row_start >> 2;
      const int64_t delta = static_cast<int64_t>(row_start - 4 * group);
      for (int64_t at = 0; at < delta + cols; at += 4 * kGroups) {
        block_words(group + static_cast<uint64_t>(at / 4), p.seed, p.stream, words.data() + at);
      }
      const uint32_t* word = words.data() + delta;
      int64_t n_open = 0;
      for (int64_t j = 0; j < cols; ++j) {  // branch-free: a drop is a coin toss to the branch predictor
        const uint32_t v = slot[j];
        const int64_t w = word[j];
        const uint32_t rank = cursor[v]++;  // exact where the bucket holds one magnitude
        const uint32_t single = 1u ^ mixed[v];
        const uint32_t dropped = w < last_thr[v], kept = w >= first_thr[v];  // never, always where single
        flag[j] = static_cast<uint8_t>(dropped | (single & (w < table[rank])));
        open[n_open] = static_cast<uint32_t>(j);
        n_open += 1u ^ (dropped | kept);
      }
      if (n_open <= kScans) {
        for (int64_t q = 0; q < n_open; ++q) {
          // rank of j = #{i < j : bits[i] <= bits[j]} + #{i > j : bits[i] < bits[j]}: its key (bits, index) among
          // the row's, counted without a branch (vectorised).
          const uint32_t j = open[q], b = bits[j];
          uint32_t below = 0;
          for (uint32_t i = 0; i < j; ++i) below += bits[i] <= b;
          for (int64_t i = j + 1; i < cols; ++i) below += bits[i] < b;
          flag[j] = static_cast<int64_t>(word[j]) < table[below];
        }
      } else {
        // Many: the buckets holding them ranked whole, their members gathered in index order (a counting sort over
        // those buckets) and sorted by (bits, index), so that the row costs O(cols log) however many are open.
        std::fill(unsettled.begin(), unsettled.end(), uint8_t{0});
        for (int64_t q = 0; q < n_open; ++q) unsettled[slot[open[q]]] = 1;
        groups.clear();
        for (int64_t v = 0; v + 1 < buckets; ++v) {
          if (unsettled[v]) {
            group_of[v] = static_cast<uint32_t>(groups.size());
            groups.push_back(static_cast<uint32_t>(v));
          }
        }
        fill.assign(groups.size() + 1, 0u);
        for (size_t g = 0; g < groups.size(); ++g) fill[g + 1] = fill[g] + start[groups[g] + 1] - start[groups[g]];
        keys.resize(fill.back());
        for (int64_t j = 0; j < cols; ++j) {
          const uint32_t v = slot[j];
          if (unsettled[v]) keys[fill[group_of[v]]++] = static_cast<uint64_t>(bits[j]) << 32 | static_cast<uint64_t>(j);
        }
        uint64_t* member = keys.data();
        for (size_t g = 0; g < groups.size(); ++g) {
          const uint32_t v = groups[g];
          const int64_t size = start[v + 1] - start[v];
          std::sort(member, member + size);  // (bits, index): a stable sort's order
          for (int64_t q = 0; q < size; ++q) {
            const int64_t j = static_cast<int64_t>(member[q] & 0xffffffffu);
            flag[j] = static_cast<int64_t>(word[j]) < table[start[v] + q];
          }
          member += size;
        }
      }
      const int64_t at = r * cols;
      if (p.packed) {
        pack_bits(flag.data(), at, at + cols, p.packed);
      } else {
        int64_t* out = p.out + at;
        for (int64_t j = 0; j < cols; ++j) out[j] = static_cast<int64_t>(flag[j]) << 32;  // kDropAll or 0
      }
    }
  });
}

template <typename Codec, bool kBase>
void variance_kernel(const VarianceParams& p) {
  using Bits = typename Codec::Bits;
  constexpr int64_t kStep = 256;
  const Bits* base = static_cast<const Bits*>(p.base);
  const int n = p.n_inputs;
  at::parallel_for(0, p.n, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> taus(static_cast<size_t>(n) * kStep);
    alignas(64) float b[kStep], mean[kStep];
    for (int64_t at = begin; at < end; at += kStep) {
      const int64_t len = std::min(kStep, end - at);
      load_task_vectors<Codec, kBase>(p.x, n, base, at, len, kStep, b, taus.data());
      block_variance(taus.data(), n, kStep, len, mean, p.out + at);
    }
  });
}

}  // namespace

void task_vector_variance_cpu(const VarianceParams& p) {
  if (p.n <= 0) return;
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { variance_kernel<decltype(codec), decltype(base)::value>(p); });
}

void magnitude_rank_drops_cpu(const RankDropParams& p) {
  if (p.rows <= 0 || p.cols <= 0) return;
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { rank_drop_kernel<decltype(codec), decltype(base)::value>(p); });
}

void magnitude_histogram_cpu(const HistogramParams& p) {
  with_codec(p.type, [&](auto codec) { dispatch<decltype(codec)>(p); });
}

void magnitude_gather_cpu(const GatherParams& p) {
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { gather_kernel<decltype(codec), decltype(base)::value>(p); });
}

}  // namespace evolver_kernels
