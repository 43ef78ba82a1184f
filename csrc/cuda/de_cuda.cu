// CUDA kernels: fused DE mutation + binomial crossover, and the debug mask.
//
// Fast path (offset a multiple of 4 and every pointer 16-byte aligned): grid-stride over 16-byte vectors,
// each thread drawing the Philox groups its vector covers (4 fp32 or 8 half-width elements: 1 or 2
// groups), so one Philox call serves four elements. Everything else, and the tail of the fast path, goes
// through a per-group kernel with scalar loads. Indexing is 64-bit throughout.
// Arithmetic uses __f*_rn intrinsics, which the compiler never contracts into FMAs, so results round
// exactly as the reference's separate fp32 operations do.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../philox.h"
#include "cuda_common.cuh"
#include "de_cuda.h"

namespace evolver_kernels {
namespace {

template <typename Codec, bool kTwoInputs>
__device__ __forceinline__ typename Codec::Bits de_element(typename Codec::Bits xb, typename Codec::Bits ab,
                                                           typename Codec::Bits baseb, typename Codec::Bits bb,
                                                           float F, bool take) {
  if (!take) return xb;
  const float xf = Codec::load(xb);
  const float base = kTwoInputs ? xf : Codec::load(baseb);
  const float b = kTwoInputs ? xf : Codec::load(bb);
  return Codec::store(__fadd_rn(base, __fmul_rn(F, __fsub_rn(Codec::load(ab), b))));
}

template <typename Bits>
union Vec16 {
  uint4 raw;
  Bits e[16 / sizeof(Bits)];
};

template <typename Codec, bool kTwoInputs>
__global__ void __launch_bounds__(kThreads) de_vec_kernel(DEParams p, int64_t nvec) {
  using Bits = typename Codec::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  const uint4* x = static_cast<const uint4*>(p.x);
  const uint4* a = static_cast<const uint4*>(p.a);
  const uint4* base = static_cast<const uint4*>(p.base);
  const uint4* b = static_cast<const uint4*>(p.b);
  uint4* out = static_cast<uint4*>(p.out);
  const Threshold threshold(p.threshold);
  const uint64_t first_group = p.offset >> 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; v < nvec; v += stride) {
    Vec16<Bits> xv, av, basev, bv, ov;
    xv.raw = x[v];
    av.raw = a[v];
    if (!kTwoInputs) {
      basev.raw = base[v];
      bv.raw = b[v];
    }
#pragma unroll
    for (int g = 0; g < kVec / 4; ++g) {
      uint32_t w[4];
      philox_group(first_group + static_cast<uint64_t>(v) * (kVec / 4) + g, p.seed, p.stream, w);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int e = 4 * g + k;
        ov.e[e] = de_element<Codec, kTwoInputs>(xv.e[e], av.e[e], kTwoInputs ? Bits{} : basev.e[e],
                                                kTwoInputs ? Bits{} : bv.e[e], p.F, threshold.selects(w[k]));
      }
    }
    out[v] = ov.raw;
  }
}

// Grid-stride over Philox groups [first_group, end_group): fn(q, words) for each, words computed once.
template <typename Fn>
__device__ __forceinline__ void for_each_group(uint64_t first_group, uint64_t end_group, uint64_t seed,
                                               uint64_t stream, const Fn& fn) {
  const int64_t ngroups = static_cast<int64_t>(end_group - first_group);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < ngroups; i += stride) {
    const uint64_t q = first_group + i;
    uint32_t w[4];
    philox_group(q, seed, stream, w);
    fn(q, w);
  }
}

// One thread per Philox group, for local elements [start, numel).
template <typename Codec, bool kTwoInputs>
__global__ void __launch_bounds__(kThreads) de_group_kernel(DEParams p, int64_t start) {
  using Bits = typename Codec::Bits;
  const Bits* x = static_cast<const Bits*>(p.x);
  const Bits* a = static_cast<const Bits*>(p.a);
  const Bits* base = static_cast<const Bits*>(p.base);
  const Bits* b = static_cast<const Bits*>(p.b);
  Bits* out = static_cast<Bits*>(p.out);
  const Threshold threshold(p.threshold);
  for_each_group((p.offset + start) >> 2, (p.offset + p.numel + 3) >> 2, p.seed, p.stream,
                 [&](uint64_t q, const uint32_t* w) {
#pragma unroll
                   for (int k = 0; k < 4; ++k) {
                     const int64_t local = static_cast<int64_t>(4 * q + k - p.offset);
                     if (local < start || local >= p.numel) continue;
                     out[local] = de_element<Codec, kTwoInputs>(x[local], a[local], kTwoInputs ? Bits{} : base[local],
                                                                kTwoInputs ? Bits{} : b[local], p.F,
                                                                threshold.selects(w[k]));
                   }
                 });
}

__global__ void __launch_bounds__(kThreads) mask_group_kernel(MaskParams p) {
  const Threshold threshold(p.threshold);
  for_each_group(p.offset >> 2, (p.offset + p.numel + 3) >> 2, p.seed, p.stream, [&](uint64_t q, const uint32_t* w) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t local = static_cast<int64_t>(4 * q + k - p.offset);
      if (local >= 0 && local < p.numel) p.out[local] = threshold.selects(w[k]);
    }
  });
}

__global__ void philox_test_kernel(const int64_t* counters, int64_t* out, int64_t n, uint32_t k0, uint32_t k1) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  uint32_t c0 = static_cast<uint32_t>(counters[4 * i]), c1 = static_cast<uint32_t>(counters[4 * i + 1]);
  uint32_t c2 = static_cast<uint32_t>(counters[4 * i + 2]), c3 = static_cast<uint32_t>(counters[4 * i + 3]);
  philox4x32_10(c0, c1, c2, c3, k0, k1);
  out[4 * i] = c0;
  out[4 * i + 1] = c1;
  out[4 * i + 2] = c2;
  out[4 * i + 3] = c3;
}

template <typename Codec, bool kTwoInputs>
cudaError_t launch_typed(const DEParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(typename Codec::Bits);
  int64_t start = 0;
  const bool vectorisable =
      (p.offset & 3u) == 0 && aligned16(p.x) && aligned16(p.a) && aligned16(p.base) && aligned16(p.b) && aligned16(p.out);
  if (vectorisable) {
    const int64_t nvec = p.numel / kVec;
    if (nvec > 0) de_vec_kernel<Codec, kTwoInputs><<<grid_for(nvec), kThreads, 0, stream>>>(p, nvec);
    start = nvec * kVec;
  }
  if (start < p.numel) {
    const int64_t groups = (p.numel - start) / 4 + 2;
    de_group_kernel<Codec, kTwoInputs><<<grid_for(groups), kThreads, 0, stream>>>(p, start);
  }
  return cudaGetLastError();
}

template <typename Codec>
cudaError_t launch_inputs(const DEParams& p, cudaStream_t stream) {
  if (p.base == nullptr && p.b == nullptr) return launch_typed<Codec, true>(p, stream);
  DEParams q = p;  // general path reads four tensors; a missing one is x
  if (q.base == nullptr) q.base = q.x;
  if (q.b == nullptr) q.b = q.x;
  return launch_typed<Codec, false>(q, stream);
}

}  // namespace

cudaError_t launch_de_mutate_crossover_cuda(const DEParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  switch (p.dtype) {
    case ElementType::kFloat32:
      return launch_inputs<Float32Codec>(p, stream);
    case ElementType::kBFloat16:
      return launch_inputs<BFloat16Codec>(p, stream);
    case ElementType::kFloat16:
      return launch_inputs<Float16Codec>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_crossover_mask_cuda(const MaskParams& p, cudaStream_t stream) {
  if (p.numel <= 0) return cudaSuccess;
  mask_group_kernel<<<grid_for(p.numel / 4 + 2), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_philox4x32_10_cuda(const int64_t* counters, int64_t* out, int64_t n, uint32_t k0, uint32_t k1,
                                      cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  philox_test_kernel<<<static_cast<unsigned int>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(counters, out,
                                                                                                        n, k0, k1);
  return cudaGetLastError();
}

}  // namespace evolver_kernels
