// CPU kernels of the task vectors' Gram matrix and of sce's mean squares (gram_cpu.h), threaded with ATen's pool over blocks of elements.
#include "gram_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_common.h"

namespace evolver_kernels {
namespace {

constexpr int64_t kStep = 512;  // elements per block: n_inputs * kStep floats of task vectors per thread
constexpr int kLanes = 8;       // independent fp64 partial sums per pair: the loop vectorises
constexpr int64_t kGrainBlocks = 32;

template <typename Codec, bool kBase>
void gram_kernel(const GramParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* base = static_cast<const Bits*>(p.base);
  const int n = p.n_inputs;
  const int64_t pairs = static_cast<int64_t>(n) * (n + 1) / 2;
  const int64_t nblocks = (p.n + kStep - 1) / kStep;
  std::vector<double> partial(static_cast<size_t>(nblocks * pairs));
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    std::vector<float> taus(static_cast<size_t>(n) * kStep);
    alignas(64) float b[kStep];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t at = blk * kStep, len = std::min(kStep, p.n - at);
      load_task_vectors<Codec, kBase>(p.x, n, base, at, len, kStep, b, taus.data());
      for (int k = 0; k < n; ++k) {  // a partial block's tail adds nothing
        std::fill(taus.data() + static_cast<size_t>(k) * kStep + len, taus.data() + static_cast<size_t>(k + 1) * kStep, 0.0f);
      }
      double* out = partial.data() + blk * pairs;
      for (int i = 0; i < n; ++i) {
        const float* ti = taus.data() + static_cast<size_t>(i) * kStep;
        for (int j = i; j < n; ++j) {
          const float* tj = taus.data() + static_cast<size_t>(j) * kStep;
          double acc[kLanes] = {};
          for (int64_t q = 0; q < kStep; q += kLanes) {
            for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(ti[q + l] * tj[q + l]);
          }
          double s = 0.0;
          for (int l = 0; l < kLanes; ++l) s += acc[l];
          *out++ = s;
        }
      }
    }
  });
  std::vector<double> total(static_cast<size_t>(pairs), 0.0);
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    for (int64_t q = 0; q < pairs; ++q) total[q] += partial[blk * pairs + q];
  }
  int64_t q = 0;
  for (int i = 0; i < n; ++i) {
    for (int j = i; j < n; ++j, ++q) {
      p.out[i * n + j] += total[q];
      if (j != i) p.out[j * n + i] += total[q];
    }
  }
}

template <typename Codec, bool kBase>
void squares_kernel(const SquaresParams& p) {
  using Bits = typename Codec::Bits;
  const Bits* base = static_cast<const Bits*>(p.base);
  const int n = p.n_inputs;
  const int64_t nblocks = (p.n + kStep - 1) / kStep;
  std::vector<double> partial(static_cast<size_t>(nblocks * n));
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    std::vector<float> taus(static_cast<size_t>(n) * kStep);
    alignas(64) float b[kStep], mean[kStep], var[kStep];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t at = blk * kStep, len = std::min(kStep, p.n - at);
      load_task_vectors<Codec, kBase>(p.x, n, base, at, len, kStep, b, taus.data());
      if (p.select_on) {
        block_variance(taus.data(), n, kStep, len, mean, var);
        const float select = p.select;
        for (int k = 0; k < n; ++k) {
          float* tau = taus.data() + static_cast<size_t>(k) * kStep;
          for (int64_t i = 0; i < len; ++i) tau[i] = var[i] >= select ? tau[i] : 0.0f;
        }
      }
      for (int k = 0; k < n; ++k) {
        float* tau = taus.data() + static_cast<size_t>(k) * kStep;
        for (int64_t i = len; i < kStep; ++i) tau[i] = 0.0f;  // a partial block's tail adds nothing
        double acc[kLanes] = {};
        for (int64_t q = 0; q < kStep; q += kLanes) {
          for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(tau[q + l] * tau[q + l]);
        }
        double sum = 0.0;
        for (int l = 0; l < kLanes; ++l) sum += acc[l];
        partial[blk * n + k] = sum;
      }
    }
  });
  for (int k = 0; k < n; ++k) {
    double total = 0.0;
    for (int64_t blk = 0; blk < nblocks; ++blk) total += partial[blk * n + k];
    p.out[k] += total;
  }
}

}  // namespace

void task_vector_squares_cpu(const SquaresParams& p) {
  if (p.n <= 0) return;
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { squares_kernel<decltype(codec), decltype(base)::value>(p); });
}

void task_vector_gram_cpu(const GramParams& p) {
  if (p.n <= 0) return;
  with_codec_base(p.type, p.base != nullptr,
                  [&](auto codec, auto base) { gram_kernel<decltype(codec), decltype(base)::value>(p); });
}

}  // namespace evolver_kernels
