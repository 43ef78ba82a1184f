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
#include <mutex>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int kBlock = 4 * kGroups;
constexpr int64_t kGrainBlocks = 16;

// Appends the first of `got` to dst at *at while room is left (capacity in all); *at += all of them.
template <typename T>
void append_bounded(const std::vector<T>& got, T* dst, int64_t* at, int64_t capacity) {
  const int64_t room = std::max<int64_t>(0, std::min<int64_t>(capacity - *at, static_cast<int64_t>(got.size())));
  std::copy(got.begin(), got.begin() + room, dst + *at);
  *at += static_cast<int64_t>(got.size());
}

// One thread's share of TIES' windows (MergeWindows): what it gathered and recorded, flushed once under a lock.
template <typename Bits>
struct WindowRecords {
  std::vector<std::vector<int32_t>> inside;
  std::vector<int64_t> above, index;
  std::vector<std::vector<Bits>> values;  // per model, then the base

  explicit WindowRecords(int n) : inside(n), above(n, 0), values(n > 0 ? n + 1 : 0) {}

  // A block's staged task vectors (taus: n rows of kBlock, trimmed below each window's lo), elements [0, len) of
  // the call's elements [at, at + len).
  void collect(const MergeWindows& w, const MergeParams& p, const float* taus, int64_t len, int64_t at) {
    const int n = p.n_inputs;
    alignas(64) uint8_t open[kBlock];
    for (int64_t i = 0; i < len; ++i) open[i] = 0;
    for (int k = 0; k < n; ++k) {
      const float* tau = taus + static_cast<size_t>(k) * kBlock;
      const uint32_t lo = w.lo[k], hi = w.hi[k], span = hi - lo;
      uint32_t in_window = 0, higher = 0;
      for (int64_t i = 0; i < len; ++i) {  // branch-free, as the gather counts (csrc/cpu/select_cpu.cpp)
        const uint32_t m = float_to_bits(tau[i]) & 0x7fffffffu;
        const uint32_t in = m - lo <= span;  // wraps around below the window: not in it
        in_window += in;
        higher += m > hi;
        open[i] |= static_cast<uint8_t>(in);
      }
      above[k] += higher;
      if (in_window == 0) continue;
      for (int64_t i = 0; i < len; ++i) {
        const uint32_t m = float_to_bits(tau[i]) & 0x7fffffffu;
        if (m - lo <= span) inside[k].push_back(static_cast<int32_t>(m));
      }
    }
    const Bits* base = static_cast<const Bits*>(p.base);
    for (int64_t i = 0; i < len; ++i) {
      if (!open[i]) continue;
      index.push_back(w.index_base + at + i);
      for (int k = 0; k < n; ++k) values[k].push_back(static_cast<const Bits*>(p.x[k])[at + i]);
      values[n].push_back(base[at + i]);
    }
  }

  void flush(const MergeWindows& w, int n) {
    for (int k = 0; k < n; ++k) {
      w.counts[2 * k] += above[k];
      append_bounded(inside[k], w.gathered[k], w.counts + 2 * k + 1, w.capacity[k]);
    }
    const int64_t at = *w.fix_count;
    for (int k = 0; k <= n; ++k) {
      int64_t row_at = at;
      append_bounded(values[k], static_cast<Bits*>(w.fix_values) + static_cast<size_t>(k) * w.fix_capacity, &row_at,
                     w.fix_capacity);
    }
    append_bounded(index, w.fix_index, w.fix_count, w.fix_capacity);
  }
};

template <typename Codec, bool kBase, bool kDrop, bool kTies>
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
  const MergeWindows* win = kTies && kBase && !kDrop && !p.select_on ? windows : nullptr;
  std::mutex lock;
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[kBlock];
    alignas(64) float b[kBlock], acc[kBlock], den[kBlock], tau[kBlock];
    std::vector<float> taus(staged ? static_cast<size_t>(n) * kBlock : 0);
    WindowRecords<Bits> records(win ? n : 0);
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
      if (win) records.collect(*win, p, taus.data(), len, lo);
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
    }
    if (win) {
      std::lock_guard<std::mutex> guard(lock);
      records.flush(*win, n);
    }
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
  if (p.ties) {
    merge_kernel<Codec, kBase, kDrop, true>(p, w);
  } else {
    merge_kernel<Codec, kBase, kDrop, false>(p, w);
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
