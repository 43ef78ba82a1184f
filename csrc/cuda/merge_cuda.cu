// CUDA kernel of the fused merge, element by element as evolver_kernels.reference.merge_reference defines it.
//
// One thread per Philox group (4 elements, aligned to the global index), grid-stride, 64-bit indices. A group
// loads 4 elements of each model with one 8- or 16-byte load when the call is aligned (offset a multiple of 4,
// every pointer aligned to 4 elements: arena chunks are), else element by element. DARE draws one Philox
// call per group and model (stream + k). TIES and sce's variance selection recompute each model's task vector
// in their further passes (the reloads hit L1/L2) rather than holding n_inputs x 4 values per thread. The band
// and the selection are runtime flags, uniform over the launch. The parameters are read in place
// (__grid_constant__), so indexing them by model does not copy them to local memory. __f*_rn intrinsics:
// no FMA contraction, every operation rounded as in the reference.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../merge_params.h"
#include "../philox.h"
#include "cuda_common.cuh"
#include "merge_cuda.h"

namespace evolver_kernels {
namespace {

template <typename Bits>
struct Raw4;
template <>
struct Raw4<uint32_t> {
  using T = uint4;
};
template <>
struct Raw4<uint16_t> {
  using T = uint2;
};
template <typename Bits>
union Vec4 {
  typename Raw4<Bits>::T raw;
  Bits e[4];
};

// v[e] = element l0 + e as fp32 (0 outside [0, numel)); `full`: all four in range and aligned.
template <typename Codec>
__device__ __forceinline__ void load_group(const void* ptr, int64_t l0, int64_t numel, bool full, float v[4]) {
  using Bits = typename Codec::Bits;
  const Bits* p = static_cast<const Bits*>(ptr);
  if (full) {
    Vec4<Bits> q;
    q.raw = *reinterpret_cast<const typename Raw4<Bits>::T*>(p + l0);
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = Codec::load(q.e[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = (l0 + e >= 0 && l0 + e < numel) ? Codec::load(p[l0 + e]) : 0.0f;
  }
}

__device__ __forceinline__ void load_fp32_group(const float* p, int64_t l0, int64_t numel, bool full, float v[4]) {
  if (full) {
    const float4 q = *reinterpret_cast<const float4*>(p + l0);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = (l0 + e >= 0 && l0 + e < numel) ? p[l0 + e] : 0.0f;
  }
}

// Model k's task vector v[e] on group q: x - base, DARE's (or della's per-element) drop and rescale, the
// magnitude band.
template <typename Codec, bool kBase, bool kDrop>
__device__ __forceinline__ void task_group(const MergeParams& p, int k, uint64_t q, int64_t l0, bool full,
                                           const float b[4], float v[4]) {
  load_group<Codec>(p.x[k], l0, p.numel, full, v);
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  const int64_t* thr = kDrop ? p.drop_thr[k] : nullptr;  // della's thresholds, per element
  const bool global_drop = kDrop && !thr && p.drop_threshold > 0;
  if (thr || global_drop) philox_group(q, p.seed, p.stream + static_cast<uint64_t>(k), w);
  const Threshold dropped(p.drop_threshold);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float x = v[e];
    if (kBase) x = __fsub_rn(x, b[e]);
    if (thr) {
      const bool in = l0 + e >= 0 && l0 + e < p.numel;
      x = (in && static_cast<int64_t>(w[e]) < thr[l0 + e]) ? 0.0f : __fmul_rn(x, p.drop_rescale[k]);
    } else if (global_drop) {
      x = dropped.selects(w[e]) ? 0.0f : __fmul_rn(x, p.rescale);
    }
    if (p.band) {
      const float a = fabsf(x);
      x = (a < p.trim[k] || (p.has_top && a >= p.top[k])) ? 0.0f : x;
    }
    v[e] = x;
  }
}

template <typename Codec, bool kBase, bool kDrop, bool kTies>
__global__ void __launch_bounds__(kThreads) merge_kernel(const __grid_constant__ MergeParams p, bool aligned) {
  using Bits = typename Codec::Bits;
  const uint64_t first_group = p.offset >> 2;
  const int64_t ngroups = static_cast<int64_t>(((p.offset + static_cast<uint64_t>(p.numel) + 3) >> 2) - first_group);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float count = static_cast<float>(p.n_inputs);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < ngroups; i += stride) {
    const uint64_t q = first_group + static_cast<uint64_t>(i);
    const int64_t l0 = static_cast<int64_t>(4 * q - p.offset);  // local index of the group's first element
    const bool full = aligned && l0 >= 0 && l0 + 4 <= p.numel;
    float b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (kBase) load_group<Codec>(p.base, l0, p.numel, full, b);
    bool keep[4] = {true, true, true, true};
    if (p.select_on) {
      // sce: the population variance over the models, as reference.variance_reference computes it.
      float mean[4] = {0.0f, 0.0f, 0.0f, 0.0f}, var[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < p.n_inputs; ++k) {
        float v[4];
        task_group<Codec, kBase, kDrop>(p, k, q, l0, full, b, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) mean[e] = __fadd_rn(mean[e], v[e]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) mean[e] = __fdiv_rn(mean[e], count);
      for (int k = 0; k < p.n_inputs; ++k) {
        float v[4];
        task_group<Codec, kBase, kDrop>(p, k, q, l0, full, b, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float t = __fsub_rn(v[e], mean[e]);
          var[e] = __fadd_rn(var[e], __fmul_rn(t, t));
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) keep[e] = __fdiv_rn(var[e], count) >= p.select;
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, den[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k = 0; k < p.n_inputs; ++k) {
      float v[4];
      task_group<Codec, kBase, kDrop>(p, k, q, l0, full, b, v);
      float f[4] = {1.0f, 1.0f, 1.0f, 1.0f};
      const bool fisher = !kTies && p.fisher[k] != nullptr;
      if (fisher) load_fp32_group(p.fisher[k], l0, p.numel, full, f);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = keep[e] ? v[e] : 0.0f;
        if (kTies) {
          acc[e] = __fadd_rn(acc[e], __fmul_rn(p.elect_weight[k], x));  // the election's total
        } else {
          const float c = fisher ? __fmul_rn(p.weight[k], f[e]) : p.weight[k];
          acc[e] = __fadd_rn(acc[e], __fmul_rn(c, x));
          den[e] = __fadd_rn(den[e], c);
        }
      }
    }
    if (kTies) {
      float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < p.n_inputs; ++k) {
        float v[4];
        task_group<Codec, kBase, kDrop>(p, k, q, l0, full, b, v);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = keep[e] ? v[e] : 0.0f;
          const float s = __fmul_rn(p.elect_weight[k], x);
          const bool agree = acc[e] >= 0.0f ? s > 0.0f : s < 0.0f;
          total[e] = agree ? __fadd_rn(total[e], __fmul_rn(p.weight[k], x)) : total[e];
          den[e] = agree ? __fadd_rn(den[e], p.weight[k]) : den[e];
        }
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[e] = total[e];
    }
    Vec4<Bits> o;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float y = acc[e];
      if (p.normalize) {
        if (p.min_den > 0.0f) {
          y = __fdiv_rn(y, den[e] < p.min_den ? p.min_den : den[e]);
        } else {
          y = den[e] != 0.0f ? __fdiv_rn(y, den[e]) : 0.0f;
        }
      }
      const float r = kBase ? __fadd_rn(b[e], __fmul_rn(p.scale, y)) : __fmul_rn(p.scale, y);
      o.e[e] = Codec::store(r);
    }
    Bits* out = static_cast<Bits*>(p.out);
    if (full) {
      *reinterpret_cast<typename Raw4<Bits>::T*>(out + l0) = o.raw;
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (l0 + e >= 0 && l0 + e < p.numel) out[l0 + e] = o.e[e];
      }
    }
  }
}

// mergekit's nearswap of x[0] into the base, as reference.nearswap_reference defines it; element-wise,
// grid-stride.
template <typename Codec>
__global__ void __launch_bounds__(kThreads) nearswap_kernel(const __grid_constant__ MergeParams p) {
  using Bits = typename Codec::Bits;
  const Bits* x = static_cast<const Bits*>(p.x[0]);
  const Bits* base = static_cast<const Bits*>(p.base);
  Bits* out = static_cast<Bits*>(p.out);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.numel; i += stride) {
    const float v = Codec::load(x[i]), b = Codec::load(base[i]);
    const float diff = fabsf(__fsub_rn(b, v));
    float w = __fdiv_rn(p.nearswap_t, diff < kNearswapDiffMin ? kNearswapDiffMin : diff);
    w = w < 0.0f ? 0.0f : (w > 1.0f ? 1.0f : w);
    out[i] = Codec::store(__fadd_rn(__fmul_rn(w, v), __fmul_rn(__fsub_rn(1.0f, w), b)));
  }
}

template <typename Codec, bool kBase, bool kDrop>
cudaError_t launch_ties(const MergeParams& p, bool aligned, cudaStream_t stream) {
  const unsigned int grid = grid_for(p.numel / 4 + 2);
  if (p.ties) {
    merge_kernel<Codec, kBase, kDrop, true><<<grid, kThreads, 0, stream>>>(p, aligned);
  } else {
    merge_kernel<Codec, kBase, kDrop, false><<<grid, kThreads, 0, stream>>>(p, aligned);
  }
  return cudaGetLastError();
}

bool aligned_to(const void* ptr, uintptr_t bytes) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

template <typename Codec>
cudaError_t launch_typed(const MergeParams& p, cudaStream_t stream) {
  if (p.nearswap) {
    nearswap_kernel<Codec><<<grid_for(p.numel), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const uintptr_t group_bytes = 4 * sizeof(typename Codec::Bits);
  bool aligned = (p.offset & 3u) == 0 && aligned_to(p.base, group_bytes) && aligned_to(p.out, group_bytes);
  for (int k = 0; k < p.n_inputs; ++k) aligned = aligned && aligned_to(p.x[k], group_bytes) && aligned_to(p.fisher[k], 16);
  const bool drop = p.drop_threshold > 0 || p.table_drop;
  if (p.base != nullptr) {
    return drop ? launch_ties<Codec, true, true>(p, aligned, stream) : launch_ties<Codec, true, false>(p, aligned, stream);
  }
  return drop ? launch_ties<Codec, false, true>(p, aligned, stream) : launch_ties<Codec, false, false>(p, aligned, stream);
}

}  // namespace

cudaError_t launch_merge_cuda(const MergeParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  switch (p.dtype) {
    case ElementType::kFloat32:
      return launch_typed<Float32Codec>(p, stream);
    case ElementType::kBFloat16:
      return launch_typed<BFloat16Codec>(p, stream);
    case ElementType::kFloat16:
      return launch_typed<Float16Codec>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace evolver_kernels
