// CPU kernel of the fused merge: out = base + scale * combine_k(weight_k * select(band_k(dare_k(x_k - base)))),
// element by element as evolver_kernels.reference.merge_reference defines it, threaded with ATen's pool.
//
// Work is cut into blocks of 4 * kGroups elements aligned to global Philox groups (DARE's words depend only
// on the element's global index and the model's stream). Per block, each model's elements are read once in a
// contiguous (vectorised) loop into fp32 accumulators on the stack. TIES and sce's variance selection keep the
// block's task vectors (n_inputs * 256 floats per thread) for their further passes instead of reading the
// models again. The band and the selection are runtime flags, tested once per loop (the compiler unswitches).
#include "merge_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int kBlock = 4 * kGroups;
constexpr int64_t kGrainBlocks = 16;

constexpr int64_t kStage = 16 * kBlock;  // TIES' window records a thread stages before it copies them out

// Reserves `count` places at *total with one atomic add (the threads' records land in any order: their set is
// what counts) and copies the items that fit below `capacity` there; *total grows by all of them, so that the
// caller sees an overflow.
template <typename T>
void copy_out(const T* items, int64_t count, int64_t* total, T* dst, int64_t capacity) {
  if (count == 0) return;
  const int64_t at = __atomic_fetch_add(total, count, __ATOMIC_RELAXED);
  const int64_t room = std::max<int64_t>(0, std::min<int64_t>(capacity - at, count));
  std::copy(items, items + room, dst + at);
}

// One thread's TIES windows (MergeWindows): what it gathers and records, staged in buffers of kStage entries and
// copied out when one fills and at the end (no growth, no lock).
template <typename Bits>
struct WindowRecords {
  int n;
  std::vector<int32_t> inside;  // n rows of kStage: the magnitudes' bits in model k's window
  std::vector<int64_t> inside_len, above;
  std::vector<int64_t> index;  // kStage: the elements in some window
  std::vector<Bits> values;    // n + 1 rows of kStage: their x_k, then their base
  int64_t staged = 0;

  explicit WindowRecords(int n)
      : n(n),
        inside(static_cast<size_t>(n) * kStage),
        inside_len(n, 0),
        above(n, 0),
        index(kStage),
        values(static_cast<size_t>(n + 1) * kStage) {}

  // A block's staged task vectors (taus: n rows of kBlock, trimmed below each window's lo), elements [0, len) of
  // the call's elements [at, at + len). The counts branch-free; the few elements in a window found 8 flags at a
  // time (an element in a window is a coin toss to the branch predictor, and most groups of 8 hold none).
  __attribute__((noinline)) void collect(const MergeWindows& w, const MergeParams& p, const float* taus, int64_t len,
                                         int64_t at) {
    alignas(64) uint8_t open[kBlock], in[kBlock];
    alignas(64) uint32_t mag[kBlock];
    alignas(64) uint16_t place[kBlock];
    const int64_t padded = (len + 7) & ~int64_t{7};
    for (int64_t i = 0; i < kBlock; ++i) open[i] = in[i] = 0;
    for (int k = 0; k < n; ++k) {
      const float* tau = taus + static_cast<size_t>(k) * kBlock;
      const uint32_t lo = w.lo[k], hi = w.hi[k], span = hi - lo;
      uint32_t in_window = 0, higher = 0;
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t m = float_to_bits(tau[i]) & 0x7fffffffu;
        const uint8_t inside_it = m - lo <= span;  // wraps around below the window: not in it
        mag[i] = m;
        in[i] = inside_it;
        in_window += inside_it;
        higher += m > hi;
        open[i] |= inside_it;
      }
      above[k] += higher;
      if (in_window == 0) continue;
      if (inside_len[k] + len > kStage) flush_inside(w, k);
      int32_t* dst = inside.data() + static_cast<size_t>(k) * kStage + inside_len[k];
      int64_t c = 0;
      for (int64_t j = 0; j < padded; j += 8) {
        uint64_t flags;
        std::memcpy(&flags, in + j, 8);
        for (; flags; flags &= flags - 1) dst[c++] = static_cast<int32_t>(mag[j + (__builtin_ctzll(flags) >> 3)]);
      }
      inside_len[k] += c;
    }
    int64_t c = 0;
    for (int64_t j = 0; j < padded; j += 8) {
      uint64_t flags;
      std::memcpy(&flags, open + j, 8);
      for (; flags; flags &= flags - 1) place[c++] = static_cast<uint16_t>(j + (__builtin_ctzll(flags) >> 3));
    }
    if (c == 0) return;
    if (staged + c > kStage) flush_records(w);
    for (int64_t q = 0; q < c; ++q) index[staged + q] = w.index_base + at + place[q];
    for (int k = 0; k <= n; ++k) {
      const Bits* src = static_cast<const Bits*>(k < n ? p.x[k] : p.base) + at;
      Bits* row = values.data() + static_cast<size_t>(k) * kStage + staged;
      for (int64_t q = 0; q < c; ++q) row[q] = src[place[q]];
    }
    staged += c;
  }

  void flush_inside(const MergeWindows& w, int k) {
    copy_out(inside.data() + static_cast<size_t>(k) * kStage, inside_len[k], w.counts + 2 * k + 1, w.gathered[k],
             w.capacity[k]);
    inside_len[k] = 0;
  }

  void flush_records(const MergeWindows& w) {
    if (staged == 0) return;
    const int64_t at = __atomic_fetch_add(w.fix_count, staged, __ATOMIC_RELAXED);
    const int64_t room = std::max<int64_t>(0, std::min<int64_t>(w.fix_capacity - at, staged));
    std::copy(index.data(), index.data() + room, w.fix_index + at);
    for (int k = 0; k <= n; ++k) {
      const Bits* row = values.data() + static_cast<size_t>(k) * kStage;
      std::copy(row, row + room, static_cast<Bits*>(w.fix_values) + static_cast<size_t>(k) * w.fix_capacity + at);
    }
    staged = 0;
  }

  void flush(const MergeWindows& w) {
    for (int k = 0; k < n; ++k) {
      __atomic_fetch_add(w.counts + 2 * k, above[k], __ATOMIC_RELAXED);
      flush_inside(w, k);
    }
    flush_records(w);
  }
};

// No windows: what the merge kernels without them hold in their place (nothing).
struct NoRecords {
  explicit NoRecords(int) {}
};

// kWindows: TIES' windows (with kTies and kBase, without kDrop) collected; a template parameter, so that the
// kernels without them are compiled as if they did not exist (a runtime test in the block loop stopped the
// compiler from vectorising the others: TIES' merge ran 12x slower).
template <typename Codec, bool kBase, bool kDrop, bool kTies, bool kWindows = false>
void merge_kernel(const MergeParams& p, const MergeWindows* windows) {
  using Bits = typename Codec::Bits;
  const Bits* base = static_cast<const Bits*>(p.base);
  Bits* out = static_cast<Bits*>(p.out);
  const Threshold dropped(p.drop_threshold);
  const uint64_t first_group = p.offset >> 2;
  const uint64_t end_group = (p.offset + static_cast<uint64_t>(p.numel) + 3) >> 2;
  const int64_t nblocks = static_cast<int64_t>((end_group - first_group + kGroups - 1) / kGroups);
  const int n = p.n_inputs;
  const bool staged = kTies || p.select_on;  // task vectors kept for a second pass
  static_assert(!kWindows || (kTies && kBase && !kDrop), "TIES' windows: a base, no drops");
  const MergeWindows* win = windows;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[kBlock];
    alignas(64) float b[kBlock], acc[kBlock], den[kBlock], tau[kBlock];
    std::vector<float> taus(staged ? static_cast<size_t>(n) * kBlock : 0);
    std::conditional_t<kWindows, WindowRecords<Bits>, NoRecords> records(n);
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint64_t g = first_group + static_cast<uint64_t>(blk) * kGroups;
      const int64_t delta = static_cast<int64_t>(p.offset - 4 * g);  // local index i has word i + delta
      const int64_t lo = std::max<int64_t>(-delta, 0);
      const int64_t hi = std::min<int64_t>(kBlock - delta, p.numel);
      const int64_t len = hi - lo;
      if (kBase) {
        for (int64_t i = 0; i < len; ++i) b[i] = Codec::load(base[lo + i]);
      }
      for (int64_t i = 0; i < len; ++i) acc[i] = den[i] = 0.0f;
      for (int k = 0; k < n; ++k) {
        const Bits* x = static_cast<const Bits*>(p.x[k]) + lo;
        const float* fisher = p.fisher[k] ? p.fisher[k] + lo : nullptr;
        const float w = p.weight[k], trim = p.trim[k], top = p.top[k], rescale = p.rescale;
        const bool band = p.band, has_top = p.has_top;
        const int64_t* thr = kDrop && p.drop_thr[k] ? p.drop_thr[k] + lo : nullptr;  // della's, per element
        const bool global_drop = kDrop && !thr && p.drop_threshold > 0;
        const float drop_rescale = p.drop_rescale[k];
        if (thr || global_drop) block_words(g, p.seed, p.stream + static_cast<uint64_t>(k), words);
        const uint32_t* word = words + lo + delta;
        // One simple loop per step (each vectorises; one loop with all the branches did not), the same
        // operations in the same order per element as before.
        if (!thr && !global_drop && !band && !staged && !fisher) {  // linear: one loop, at memory speed
          for (int64_t i = 0; i < len; ++i) {
            float u = Codec::load(x[i]);
            if (kBase) u = u - b[i];
            acc[i] = acc[i] + w * u;
            den[i] = den[i] + w;
          }
          continue;
        }
        float* v = staged ? taus.data() + static_cast<size_t>(k) * kBlock : tau;
        if (!thr && !global_drop) {  // TIES, breadcrumbs: the band in the loading loop
          for (int64_t i = 0; i < len; ++i) {
            float u = Codec::load(x[i]);
            if (kBase) u = u - b[i];
            if (band) {
              const float a = std::fabs(u);
              u = (a < trim || (has_top && a >= top)) ? 0.0f : u;
            }
            v[i] = u;
          }
        } else {
          if (kBase) {
            for (int64_t i = 0; i < len; ++i) v[i] = Codec::load(x[i]) - b[i];
          } else {
            for (int64_t i = 0; i < len; ++i) v[i] = Codec::load(x[i]);
          }
          if (thr) {
            for (int64_t i = 0; i < len; ++i) {
              v[i] = static_cast<int64_t>(word[i]) < thr[i] ? 0.0f : v[i] * drop_rescale;
            }
          } else if (dropped.all) {
            for (int64_t i = 0; i < len; ++i) v[i] = 0.0f;
          } else {
            const uint32_t bound = dropped.bound;
            for (int64_t i = 0; i < len; ++i) v[i] = word[i] < bound ? 0.0f : v[i] * rescale;
          }
          if (band) {
            for (int64_t i = 0; i < len; ++i) {
              const float a = std::fabs(v[i]);
              v[i] = (a < trim || (has_top && a >= top)) ? 0.0f : v[i];
            }
          }
        }
        if (staged) continue;
        if (fisher) {
          for (int64_t i = 0; i < len; ++i) {
            const float c = w * fisher[i];
            acc[i] = acc[i] + c * v[i];
            den[i] = den[i] + c;
          }
        } else {
          for (int64_t i = 0; i < len; ++i) {
            acc[i] = acc[i] + w * v[i];
            den[i] = den[i] + w;
          }
        }
      }
      if (p.select_on) {
        // sce: the population variance over the models, as reference.variance_reference computes it.
        alignas(64) float mean[kBlock], var[kBlock];
        block_variance(taus.data(), n, kBlock, len, mean, var);
        const float select = p.select;
        for (int k = 0; k < n; ++k) {
          float* tau_k = taus.data() + static_cast<size_t>(k) * kBlock;
          for (int64_t i = 0; i < len; ++i) tau_k[i] = var[i] >= select ? tau_k[i] : 0.0f;
        }
        if (!kTies) {
          for (int k = 0; k < n; ++k) {
            const float* tau_k = taus.data() + static_cast<size_t>(k) * kBlock;
            const float* fisher = p.fisher[k] ? p.fisher[k] + lo : nullptr;
            const float w = p.weight[k];
            for (int64_t i = 0; i < len; ++i) {
              const float c = fisher ? w * fisher[i] : w;
              acc[i] = acc[i] + c * tau_k[i];
              den[i] = den[i] + c;
            }
          }
        }
      }
      if (kTies) {
        // The elected sign's total, then the disjoint sum over the models that agree with it.
        for (int k = 0; k < n; ++k) {
          const float* tau_k = taus.data() + static_cast<size_t>(k) * kBlock;
          const float e = p.elect_weight[k];
          for (int64_t i = 0; i < len; ++i) acc[i] = acc[i] + e * tau_k[i];
        }
        alignas(64) float total[kBlock];
        for (int64_t i = 0; i < len; ++i) total[i] = 0.0f;
        for (int k = 0; k < n; ++k) {
          const float* tau_k = taus.data() + static_cast<size_t>(k) * kBlock;
          const float w = p.weight[k], e = p.elect_weight[k];
          for (int64_t i = 0; i < len; ++i) {
            const float s = e * tau_k[i];
            const bool agree = acc[i] >= 0.0f ? s > 0.0f : s < 0.0f;
            total[i] = agree ? total[i] + w * tau_k[i] : total[i];
            den[i] = agree ? den[i] + w : den[i];
          }
        }
        for (int64_t i = 0; i < len; ++i) acc[i] = total[i];
      }
      const float scale = p.scale, min_den = p.min_den;
      for (int64_t i = 0; i < len; ++i) {
        float y = acc[i];
        if (p.normalize) {
          if (min_den > 0.0f) {
            y = y / (den[i] < min_den ? min_den : den[i]);
          } else {
            y = den[i] != 0.0f ? y / den[i] : 0.0f;
          }
        }
        const float r = kBase ? b[i] + scale * y : scale * y;
        out[lo + i] = Codec::store(r);
      }
      if constexpr (kWindows) records.collect(*win, p, taus.data(), len, lo);
    }
    if constexpr (kWindows) records.flush(*win);
  });
}

// mergekit's nearswap of x[0] into the base, as reference.nearswap_reference defines it.
template <typename Codec>
void nearswap_kernel(const MergeParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* x = static_cast<const Bits*>(p.x[0]);
  const Bits* base = static_cast<const Bits*>(p.base);
  Bits* out = static_cast<Bits*>(p.out);
  const float t = p.nearswap_t;
  at::parallel_for(0, p.numel, kGrainBlocks * kBlock, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = Codec::load(x[i]), b = Codec::load(base[i]);
      const float diff = std::fabs(b - v);
      float w = t / (diff < kNearswapDiffMin ? kNearswapDiffMin : diff);
      w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
      out[i] = Codec::store(w * v + (1.0f - w) * b);
    }
  });
}

template <typename Codec, bool kBase, bool kDrop>
void dispatch_ties(const MergeParams& p, const MergeWindows* w) {
  if constexpr (kBase && !kDrop) {
    if (w != nullptr && p.ties && !p.select_on) return merge_kernel<Codec, true, false, true, true>(p, w);
  }
  if (p.ties) {
    merge_kernel<Codec, kBase, kDrop, true>(p, nullptr);
  } else {
    merge_kernel<Codec, kBase, kDrop, false>(p, nullptr);
  }
}

template <typename Codec>
void dispatch(const MergeParams& p, const MergeWindows* w) {
  if (p.nearswap) return nearswap_kernel<Codec>(p);
  const bool drop = p.drop_threshold > 0 || p.table_drop;
  if (p.base != nullptr) {
    drop ? dispatch_ties<Codec, true, true>(p, w) : dispatch_ties<Codec, true, false>(p, w);
  } else {
    drop ? dispatch_ties<Codec, false, true>(p, w) : dispatch_ties<Codec, false, false>(p, w);
  }
}

}  // namespace

void merge_cpu(const MergeParams& p, const MergeWindows* windows) {
  if (p.numel <= 0) return;
  with_codec(p.dtype, [&](auto codec) { dispatch<decltype(codec)>(p, windows); });
}

}  // namespace evolver_kernels
