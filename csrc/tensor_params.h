// Turns the op's tensor arguments into DEParams / MaskParams, checking what the kernels rely on.
// The Python layer (evolver_kernels/ops.py) gives the user-facing errors; these checks guard direct
// torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "de_params.h"
#include "merge_params.h"

namespace evolver_kernels {

inline ElementType element_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kHalf:
      return ElementType::kFloat16;
    default:
      TORCH_CHECK(false, "evolver_kernels: dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "evolver_kernels: ", name, " has dtype ", t.scalar_type(),
              ", x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "evolver_kernels: ", name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.numel() == x.numel(), "evolver_kernels: ", name, " has ", t.numel(), " elements, x has ", x.numel());
  TORCH_CHECK(t.is_contiguous(), "evolver_kernels: ", name, " must be contiguous");
}

inline void check_stream_args(int64_t threshold, int64_t offset) {
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 32), "evolver_kernels: threshold ", threshold,
              " outside [0, 2**32]");
  TORCH_CHECK(offset >= 0, "evolver_kernels: offset must be non-negative, got ", offset);
}

// seed and stream travel through the schema as int64; the contract reads them as uint64.
inline DEParams make_de_params(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& base,
                               const c10::optional<at::Tensor>& b, double F, int64_t threshold, int64_t seed,
                               int64_t stream, int64_t offset, const at::Tensor& out) {
  const ElementType dtype = element_type_of(x);
  TORCH_CHECK(x.is_contiguous(), "evolver_kernels: x must be contiguous");
  check_like(a, x, "a");
  check_like(out, x, "out");
  if (base) check_like(*base, x, "base");
  if (b) check_like(*b, x, "b");
  check_stream_args(threshold, offset);
  DEParams p;
  p.x = x.data_ptr();
  p.a = a.data_ptr();
  p.base = base ? base->data_ptr() : nullptr;
  p.b = b ? b->data_ptr() : nullptr;
  if (p.base == p.x && p.b == p.x) p.base = p.b = nullptr;  // evolver strategy: read two tensors, not four
  p.out = out.data_ptr();
  p.numel = x.numel();
  p.F = static_cast<float>(F);
  p.threshold = threshold;
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.offset = static_cast<uint64_t>(offset);
  p.dtype = dtype;
  return p;
}

inline MaskParams make_mask_params(const at::Tensor& out, int64_t threshold, int64_t seed, int64_t stream,
                                   int64_t offset) {
  TORCH_CHECK(out.scalar_type() == at::kBool, "evolver_kernels: mask out must be bool, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "evolver_kernels: mask out must be contiguous");
  check_stream_args(threshold, offset);
  MaskParams p;
  p.out = out.data_ptr<bool>();
  p.numel = out.numel();
  p.threshold = threshold;
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.offset = static_cast<uint64_t>(offset);
  return p;
}

inline MergeParams make_merge_params(at::TensorList xs, const c10::optional<at::Tensor>& base, at::TensorList fisher,
                                     c10::ArrayRef<double> weights, c10::ArrayRef<double> trim,
                                     c10::ArrayRef<double> top, c10::ArrayRef<double> elect_weights, double scale,
                                     double rescale, int64_t drop_threshold,
                                     const c10::List<c10::optional<at::Tensor>>& drop_thresholds,
                                     c10::ArrayRef<double> drop_rescales, bool band, bool has_top, bool ties,
                                     c10::optional<double> select, bool normalize, double min_den,
                                     c10::optional<double> nearswap_t, int64_t seed,
                                     int64_t stream, int64_t offset, const at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(xs.size());
  TORCH_CHECK(n >= 1 && n <= kMaxMergeInputs, "evolver_kernels: merge takes 1 to ", kMaxMergeInputs, " inputs, got ", n);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n, "evolver_kernels: ", weights.size(), " weights for ", n, " inputs");
  TORCH_CHECK(static_cast<int64_t>(trim.size()) == n && static_cast<int64_t>(top.size()) == n &&
                  static_cast<int64_t>(elect_weights.size()) == n,
              "evolver_kernels: trim, top and elect_weights need one value per input (", n, ")");
  TORCH_CHECK(fisher.empty() || static_cast<int64_t>(fisher.size()) == n, "evolver_kernels: ", fisher.size(),
              " fisher tensors for ", n, " inputs");
  TORCH_CHECK(out.is_contiguous(), "evolver_kernels: out must be contiguous");
  check_stream_args(drop_threshold, offset);
  MergeParams p{};
  p.dtype = element_type_of(out);
  for (int64_t k = 0; k < n; ++k) {
    check_like(xs[k], out, "an input");
    p.x[k] = xs[k].data_ptr();
    p.weight[k] = static_cast<float>(weights[k]);
    p.trim[k] = static_cast<float>(trim[k]);
    p.top[k] = static_cast<float>(top[k]);
    p.elect_weight[k] = static_cast<float>(elect_weights[k]);
    if (!fisher.empty()) {
      const at::Tensor& f = fisher[k];
      TORCH_CHECK(f.scalar_type() == at::kFloat && f.is_contiguous() && f.numel() == out.numel() &&
                      f.device() == out.device(),
                  "evolver_kernels: fisher tensors must be contiguous float32 like out");
      p.fisher[k] = f.data_ptr<float>();
    }
  }
  TORCH_CHECK(drop_thresholds.empty() || (static_cast<int64_t>(drop_thresholds.size()) == n &&
                                           static_cast<int64_t>(drop_rescales.size()) == n),
              "evolver_kernels: drop_thresholds and drop_rescales need one entry per input (", n, ")");
  for (int64_t k = 0; k < static_cast<int64_t>(drop_thresholds.size()); ++k) {
    const c10::optional<at::Tensor> t = drop_thresholds.get(k);
    p.drop_rescale[k] = static_cast<float>(drop_rescales[k]);
    if (!t.has_value()) continue;
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == out.numel() &&
                    t->device() == out.device(),
                "evolver_kernels: drop_thresholds must be contiguous int64 tensors like out");
    p.drop_thr[k] = t->data_ptr<int64_t>();
    p.table_drop = true;
  }
  if (base) check_like(*base, out, "base");
  p.base = base ? base->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.n_inputs = static_cast<int>(n);
  p.numel = out.numel();
  p.scale = static_cast<float>(scale);
  p.rescale = static_cast<float>(rescale);
  p.drop_threshold = drop_threshold;
  p.band = band;
  p.has_top = has_top;
  p.ties = ties;
  p.select_on = select.has_value();
  p.select = select.has_value() ? static_cast<float>(*select) : 0.0f;
  p.normalize = normalize;
  p.min_den = static_cast<float>(min_den);
  p.nearswap = nearswap_t.has_value();
  p.nearswap_t = nearswap_t.has_value() ? static_cast<float>(*nearswap_t) : 0.0f;
  TORCH_CHECK(!p.nearswap || (n == 1 && base), "evolver_kernels: nearswap merges one input into a base");
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.offset = static_cast<uint64_t>(offset);
  return p;
}

// The merge_ op's implementation for every backend, its argument list written once beside make_merge_params (the
// schema is in ops.cpp; Python passes the arguments by these names: kernels/merge_params.py op_arguments).
// Run(params, out) launches the backend's kernel.
template <void (*Run)(const MergeParams&, const at::Tensor&)>
void merge_op(at::TensorList xs, const c10::optional<at::Tensor>& base, at::TensorList fisher,
              c10::ArrayRef<double> weights, c10::ArrayRef<double> trim, c10::ArrayRef<double> top,
              c10::ArrayRef<double> elect_weights, double scale, double rescale, int64_t drop_threshold,
              const c10::List<c10::optional<at::Tensor>>& drop_thresholds, c10::ArrayRef<double> drop_rescales,
              bool band, bool has_top, bool ties, c10::optional<double> select, bool normalize, double min_den,
              c10::optional<double> nearswap_t, int64_t seed, int64_t stream, int64_t offset, const at::Tensor& out) {
  Run(make_merge_params(xs, base, fisher, weights, trim, top, elect_weights, scale, rescale, drop_threshold,
                        drop_thresholds, drop_rescales, band, has_top, ties, select, normalize, min_den, nearswap_t,
                        seed, stream, offset, out),
      out);
}

}  // namespace evolver_kernels
