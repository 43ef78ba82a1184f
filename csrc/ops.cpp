// The one place the operators are declared (TORCH_LIBRARY) and the CPU backend is registered.
// The CUDA extension (csrc/cuda/bind_cuda.cpp) adds CUDA implementations of the same schemas;
// evolver_kernels/ops.py registers the fake (meta) implementations.
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "bf16_bits.h"
#include "cpu/de_cpu.h"
#include "cpu/gram_cpu.h"
#include "cpu/merge_cpu.h"
#include "cpu/rescale_cpu.h"
#include "cpu/select_cpu.h"
#include "module.h"
#include "philox.h"
#include "tensor_params.h"

namespace evolver_kernels {
namespace {

void de_mutate_crossover_cpu_op(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& base,
                                const c10::optional<at::Tensor>& b, double F, int64_t threshold, int64_t seed,
                                int64_t stream, int64_t offset, const at::Tensor& out) {
  de_mutate_crossover_cpu(make_de_params(x, a, base, b, F, threshold, seed, stream, offset, out));
}

// Test hook: Philox4x32-10 of each row of an int64 [n, 4] tensor of 32-bit counters, for the known answers.
at::Tensor philox4x32_10_cpu_op(const at::Tensor& counters, int64_t k0, int64_t k1) {
  TORCH_CHECK(counters.scalar_type() == at::kLong && counters.dim() == 2 && counters.size(1) == 4,
              "evolver_kernels: counters must be an int64 [n, 4] tensor");
  const at::Tensor in = counters.contiguous();
  at::Tensor out = at::empty_like(in);
  const int64_t* src = in.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.size(0); ++i) {
    uint32_t c[4];
    for (int k = 0; k < 4; ++k) c[k] = static_cast<uint32_t>(src[4 * i + k]);
    philox4x32_10(c[0], c[1], c[2], c[3], static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
    for (int k = 0; k < 4; ++k) dst[4 * i + k] = c[k];
  }
  return out;
}

void crossover_mask_cpu_op(const at::Tensor& out, int64_t threshold, int64_t seed, int64_t stream, int64_t offset) {
  crossover_mask_cpu(make_mask_params(out, threshold, seed, stream, offset));
}

void run_merge_cpu(const MergeParams& params, const at::Tensor&) { merge_cpu(params); }

// TIES with each model's trim narrowed to a window by a sample (MergeWindows, csrc/cpu/merge_cpu.h): the fused
// merge trimming below each window's lo, gathering and recording what the windows hold.
void ties_window_merge_cpu_op(at::TensorList xs, const at::Tensor& base, c10::ArrayRef<double> weights,
                              c10::ArrayRef<double> elect_weights, double scale, bool normalize, at::IntArrayRef lo,
                              at::IntArrayRef hi, int64_t index_base, at::TensorList gathered, const at::Tensor& counts,
                              const at::Tensor& fix_index, const at::Tensor& fix_values, const at::Tensor& fix_count,
                              const at::Tensor& out) {
  const size_t n = xs.size();
  TORCH_CHECK(lo.size() == n && hi.size() == n && gathered.size() == n,
              "evolver_kernels: lo, hi and gathered need one entry per input (", n, ")");
  std::vector<double> trim(n), top(n, 0.0);
  MergeWindows w{};
  for (size_t k = 0; k < n; ++k) {
    TORCH_CHECK(0 <= lo[k] && lo[k] <= hi[k] && hi[k] <= 0x7fffffff, "evolver_kernels: window ", k, " [", lo[k],
                ", ", hi[k], "] is not a range of non-negative fp32 bits");
    TORCH_CHECK(gathered[k].scalar_type() == at::kInt && gathered[k].is_contiguous(),
                "evolver_kernels: gathered must hold contiguous int32 tensors");
    w.lo[k] = static_cast<uint32_t>(lo[k]);
    w.hi[k] = static_cast<uint32_t>(hi[k]);
    trim[k] = bits_to_float(w.lo[k]);
    w.gathered[k] = gathered[k].data_ptr<int32_t>();
    w.capacity[k] = gathered[k].numel();
  }
  MergeParams p = make_merge_params(xs, base, {}, weights, trim, top, elect_weights, scale, 1.0, 0,
                                    c10::List<c10::optional<at::Tensor>>(), {}, true, false, true, c10::nullopt,
                                    normalize, 0.0, c10::nullopt, 0, 0, 0, out);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.numel() == 2 * static_cast<int64_t>(n),
              "evolver_kernels: counts must be a contiguous int64 tensor of 2 per input");
  TORCH_CHECK(fix_index.scalar_type() == at::kLong && fix_index.is_contiguous(),
              "evolver_kernels: fix_index must be a contiguous int64 tensor");
  TORCH_CHECK(fix_values.scalar_type() == out.scalar_type() && fix_values.is_contiguous() &&
                  fix_values.numel() == static_cast<int64_t>(n + 1) * fix_index.numel(),
              "evolver_kernels: fix_values must be a contiguous tensor of out's dtype, (inputs + 1) x fix_index");
  TORCH_CHECK(fix_count.scalar_type() == at::kLong && fix_count.numel() == 1,
              "evolver_kernels: fix_count must be an int64 tensor of one element");
  w.counts = counts.data_ptr<int64_t>();
  w.index_base = index_base;
  w.fix_index = fix_index.data_ptr<int64_t>();
  w.fix_values = fix_values.data_ptr();
  w.fix_capacity = fix_index.numel();
  w.fix_count = fix_count.data_ptr<int64_t>();
  merge_cpu(p, &w);
}

// The magnitudes' inputs of both selection passes: x a contiguous 1-D float tensor, base (if any) its like.
ElementType check_magnitude_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "evolver_kernels: x must be a contiguous 1-D tensor");
  if (base) {
    TORCH_CHECK(base->scalar_type() == x.scalar_type() && base->is_contiguous() && base->numel() == x.numel(),
                "evolver_kernels: base must be a contiguous tensor of x's dtype and size");
  }
  return element_type_of(x);
}

// The models' inputs of the per-element statistics (variance, Gram matrix, squares): at least one, each like xs[0]
// (contiguous, one dtype and size), base (if any) like them.
ElementType check_model_inputs(at::TensorList xs, const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(!xs.empty(), "evolver_kernels: xs must hold at least one tensor");
  const ElementType type = check_magnitude_inputs(xs[0], base);
  for (const at::Tensor& x : xs) {
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type() && x.is_contiguous() && x.numel() == xs[0].numel(),
                "evolver_kernels: xs must be contiguous tensors of one dtype and size");
  }
  return type;
}

std::vector<const void*> data_pointers(at::TensorList xs) {
  std::vector<const void*> ptrs;
  for (const at::Tensor& x : xs) ptrs.push_back(x.data_ptr());
  return ptrs;
}

void magnitude_histogram_cpu_op(const at::Tensor& x, const c10::optional<at::Tensor>& base,
                                const c10::optional<at::Tensor>& slots, const at::Tensor& counts) {
  const ElementType type = check_magnitude_inputs(x, base);
  if (slots) {
    TORCH_CHECK(slots->scalar_type() == at::kInt && slots->is_contiguous() && slots->numel() == 65536,
                "evolver_kernels: slots must be a contiguous int32 tensor of 65536 elements");
  }
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.numel() > 0 &&
                  counts.numel() % 65536 == 0 && (slots || counts.numel() == 65536),
              "evolver_kernels: counts must be a contiguous int64 tensor of 65536 (times the slots) elements");
  HistogramParams p{x.data_ptr(),
                    base ? base->data_ptr() : nullptr,
                    x.numel(),
                    type,
                    slots ? slots->data_ptr<int32_t>() : nullptr,
                    counts.data_ptr<int64_t>(),
                    counts.numel()};
  magnitude_histogram_cpu(p);
}

void magnitude_gather_cpu_op(at::TensorList xs, const c10::optional<at::Tensor>& base, at::IntArrayRef inputs,
                             at::IntArrayRef lo, at::IntArrayRef hi, at::TensorList out, const at::Tensor& counts) {
  const ElementType type = check_model_inputs(xs, base);
  const std::vector<const void*> ptrs = data_pointers(xs);
  const size_t n_windows = inputs.size();
  TORCH_CHECK(n_windows > 0 && lo.size() == n_windows && hi.size() == n_windows && out.size() == n_windows,
              "evolver_kernels: inputs, lo, hi and out must give the same number of windows (at least one)");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() &&
                  counts.numel() == 2 * static_cast<int64_t>(n_windows),
              "evolver_kernels: counts must be a contiguous int64 tensor of 2 elements per window");
  std::vector<GatherWindow> windows;
  for (size_t w = 0; w < n_windows; ++w) {
    TORCH_CHECK(0 <= inputs[w] && inputs[w] < static_cast<int64_t>(xs.size()),
                "evolver_kernels: a window's input must index xs");
    TORCH_CHECK(0 <= lo[w] && lo[w] <= hi[w] && hi[w] <= 0x7fffffffLL,
                "evolver_kernels: the window [lo, hi] must lie within the non-negative fp32 bit patterns");
    TORCH_CHECK(out[w].scalar_type() == at::kInt && out[w].is_contiguous(),
                "evolver_kernels: out must be contiguous int32");
    windows.push_back({static_cast<int32_t>(inputs[w]), static_cast<uint32_t>(lo[w]), static_cast<uint32_t>(hi[w]),
                       out[w].data_ptr<int32_t>(), out[w].numel(), counts.data_ptr<int64_t>() + 2 * w});
  }
  GatherParams p{ptrs.data(),      static_cast<int>(xs.size()), base ? base->data_ptr() : nullptr, xs[0].numel(),
                 type,             windows.data(),              static_cast<int>(n_windows)};
  magnitude_gather_cpu(p);
}

void magnitude_rank_drops_cpu_op(const at::Tensor& x, const c10::optional<at::Tensor>& base, const at::Tensor& table,
                                 int64_t seed, int64_t stream, int64_t offset, const at::Tensor& out) {
  const ElementType type = check_magnitude_inputs(x, base);
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 1 && table.is_contiguous() && table.numel() > 0,
              "evolver_kernels: table must be a contiguous int64 1-D tensor of the row length");
  const int64_t cols = table.numel();
  TORCH_CHECK(x.numel() % cols == 0 && cols < (int64_t{1} << 32),
              "evolver_kernels: x must be whole rows of table's length (below 2^32)");
  const at::Tensor steps = table.slice(0, 1).sub(table.slice(0, 0, cols - 1));
  TORCH_CHECK(cols == 1 || steps.max().item<int64_t>() <= 0, "evolver_kernels: table must be non-increasing");
  const bool packed = out.scalar_type() == at::kByte;
  TORCH_CHECK(out.is_contiguous() && (packed ? out.numel() == (x.numel() + 7) / 8
                                             : out.scalar_type() == at::kLong && out.numel() == x.numel()),
              "evolver_kernels: out must be a contiguous int64 tensor of x's size or uint8 of ceil(its size / 8)");
  RankDropParams p{};
  p.x = x.data_ptr();
  p.base = base ? base->data_ptr() : nullptr;
  p.rows = x.numel() / cols;
  p.cols = cols;
  p.type = type;
  p.table = table.data_ptr<int64_t>();
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.offset = static_cast<uint64_t>(offset);
  p.out = packed ? nullptr : out.data_ptr<int64_t>();
  p.packed = packed ? out.data_ptr<uint8_t>() : nullptr;
  if (packed) out.zero_();
  magnitude_rank_drops_cpu(p);
}

void task_vector_variance_cpu_op(at::TensorList xs, const c10::optional<at::Tensor>& base, const at::Tensor& out) {
  const ElementType type = check_model_inputs(xs, base);
  const std::vector<const void*> ptrs = data_pointers(xs);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.numel() == xs[0].numel(),
              "evolver_kernels: out must be a contiguous float32 tensor of the inputs' size");
  VarianceParams p{};
  p.x = ptrs.data();
  p.n_inputs = static_cast<int>(xs.size());
  p.base = base ? base->data_ptr() : nullptr;
  p.n = xs[0].numel();
  p.type = type;
  p.out = out.data_ptr<float>();
  task_vector_variance_cpu(p);
}

void dropped_l1_cpu_op(const at::Tensor& x, const c10::optional<at::Tensor>& base, const at::Tensor& thresholds,
                       int64_t seed, int64_t stream, int64_t offset, const at::Tensor& sums,
                       const c10::optional<at::Tensor>& packed) {
  const ElementType type = check_magnitude_inputs(x, base);
  const bool decided = thresholds.scalar_type() == at::kByte;  // the drops as bits
  TORCH_CHECK(thresholds.is_contiguous() &&
                  (decided ? thresholds.numel() == (x.numel() + 7) / 8
                           : thresholds.scalar_type() == at::kLong &&
                                 (thresholds.numel() == 1 || thresholds.numel() == x.numel())),
              "evolver_kernels: thresholds must be a contiguous int64 tensor of one element or of x's size, or "
              "uint8 bits of ceil(x's size / 8)");
  TORCH_CHECK(offset >= 0, "evolver_kernels: offset must be non-negative, got ", offset);
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.numel() == 2,
              "evolver_kernels: sums must be a contiguous float64 tensor of 2 elements");
  if (packed) {
    TORCH_CHECK(packed->scalar_type() == at::kByte && packed->is_contiguous() &&
                    packed->numel() == (x.numel() + 7) / 8,
                "evolver_kernels: packed must be a contiguous uint8 tensor of ceil(x's size / 8) elements");
  }
  DropL1Params p{};
  p.x = x.data_ptr();
  p.base = base ? base->data_ptr() : nullptr;
  p.n = x.numel();
  p.type = type;
  p.thresholds = decided ? nullptr : thresholds.data_ptr<int64_t>();
  p.n_thresholds = decided ? 0 : thresholds.numel();
  p.drops = decided ? thresholds.data_ptr<uint8_t>() : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.stream = static_cast<uint64_t>(stream);
  p.offset = static_cast<uint64_t>(offset);
  p.sums = sums.data_ptr<double>();
  p.packed = packed ? packed->data_ptr<uint8_t>() : nullptr;
  dropped_l1_cpu(p);
}

void expand_drops_cpu_op(const at::Tensor& packed, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kLong && out.is_contiguous(), "evolver_kernels: out must be contiguous int64");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() == (out.numel() + 7) / 8,
              "evolver_kernels: packed must be a contiguous uint8 tensor of ceil(out's size / 8) elements");
  expand_drops_cpu(packed.data_ptr<uint8_t>(), out.numel(), out.data_ptr<int64_t>());
}

void task_vector_gram_cpu_op(at::TensorList xs, const c10::optional<at::Tensor>& base, const at::Tensor& out) {
  const ElementType type = check_model_inputs(xs, base);
  const std::vector<const void*> ptrs = data_pointers(xs);
  const int64_t n = static_cast<int64_t>(xs.size());
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == n * n,
              "evolver_kernels: out must be a contiguous float64 tensor of len(xs) ** 2 elements");
  GramParams p{};
  p.x = ptrs.data();
  p.n_inputs = static_cast<int>(n);
  p.base = base ? base->data_ptr() : nullptr;
  p.n = xs[0].numel();
  p.type = type;
  p.out = out.data_ptr<double>();
  task_vector_gram_cpu(p);
}

void task_vector_squares_cpu_op(at::TensorList xs, const c10::optional<at::Tensor>& base, c10::optional<double> select,
                                const at::Tensor& out) {
  const ElementType type = check_model_inputs(xs, base);
  const std::vector<const void*> ptrs = data_pointers(xs);
  TORCH_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.numel() == static_cast<int64_t>(xs.size()),
              "evolver_kernels: out must be a contiguous float64 tensor of len(xs) elements");
  SquaresParams p{};
  p.x = ptrs.data();
  p.n_inputs = static_cast<int>(xs.size());
  p.base = base ? base->data_ptr() : nullptr;
  p.n = xs[0].numel();
  p.type = type;
  p.select_on = select.has_value();
  p.select = select ? static_cast<float>(*select) : 0.0f;
  p.out = out.data_ptr<double>();
  task_vector_squares_cpu(p);
}

}  // namespace
}  // namespace evolver_kernels

TORCH_LIBRARY(evolver_kernels, m) {
  // base and b default to x (the evolver strategy); out may be x.
  m.def(
      "de_mutate_crossover_(Tensor x, Tensor a, Tensor? base, Tensor? b, float F, int threshold, int seed, "
      "int stream, int offset, Tensor(a!) out) -> ()");
  m.def("crossover_mask_(Tensor(a!) out, int threshold, int seed, int stream, int offset) -> ()");
  m.def("philox4x32_10(Tensor counters, int k0, int k1) -> Tensor");
  // Fused merge (evolver_kernels.reference.merge_reference); fisher empty = none; out may be an input.
  m.def(
      "merge_(Tensor[] xs, Tensor? base, Tensor[] fisher, float[] weights, float[] trim, float[] top, "
      "float[] elect_weights, float scale, float rescale, int drop_threshold, Tensor?[] drop_thresholds, "
      "float[] drop_rescales, bool band, bool has_top, bool ties, "
      "float? select, bool normalize, float min_den, float? nearswap_t, int seed, int stream, int offset, "
      "Tensor(a!) out) -> ()");
  // TIES' merge with each model's trim narrowed by a sample to the window [lo[k], hi[k]] of fp32 bits of |x_k - base|
  // (csrc/cpu/merge_cpu.h MergeWindows): out as merge_ with trim[k] the float of lo[k], except where an element lies
  // in some window: then its index (index_base + its place) and inputs are recorded into fix_index and the rows of
  // fix_values at fix_count while there is room, fix_count += how many; per model counts[k] as magnitude_gather_'s.
  m.def("ties_window_merge_(Tensor[] xs, Tensor base, float[] weights, float[] elect_weights, float scale, "
        "bool normalize, int[] lo, int[] hi, int index_base, Tensor(a!)[] gathered, Tensor(b!) counts, "
        "Tensor(c!) fix_index, Tensor(d!) fix_values, Tensor(e!) fix_count, Tensor(f!) out) -> ()");
  // counts += the radix histogram of |x - base| in fp32 (task_vectors.kth_largest_magnitudes' passes): by the top
  // 16 bits, or with slots by the low 16 bits of the elements whose top 16 bits have a slot (>= 0).
  m.def("magnitude_histogram_(Tensor x, Tensor? base, Tensor? slots, Tensor(a!) counts) -> ()");
  // Per window w (of xs[inputs[w]]): counts[w, 0] += the magnitudes (as above) whose fp32 bits are above hi[w];
  // those in [lo[w], hi[w]] appended to out[w] at counts[w, 1] while it has room, counts[w, 1] += how many: one pass
  // of selections a sample narrowed, every input read once.
  m.def("magnitude_gather_(Tensor[] xs, Tensor? base, int[] inputs, int[] lo, int[] hi, Tensor(a!)[] out, "
        "Tensor(b!) counts) -> ()");
  // out = the population variance over k of xs[k] - base in fp32 (reference.variance_reference): sce's statistic.
  m.def("task_vector_variance_(Tensor[] xs, Tensor? base, Tensor(a!) out) -> ()");
  // della's drops in rows of table's length: out[r, j] = 2^32 (dropped) where element j's Philox word is below
  // table[rank of its magnitude (as above) in row r], else 0 (ranks ascending, ties by index); out uint8: the
  // drops as bits (bit j % 8 of byte j / 8), as dropped_l1_ records them.
  m.def("magnitude_rank_drops_(Tensor x, Tensor? base, Tensor table, int seed, int stream, int offset, "
        "Tensor(a!) out) -> ()");
  // della's rescale: sums[0] += sum |x - base| (fp32 magnitudes, fp64 sums), sums[1] += the same over the elements
  // whose Philox word is at or above their threshold (thresholds: one per element, or one for all; or uint8: the
  // drops decided, as bits); the drops as bits into packed (zeroed; bit j % 8 of byte j / 8) when given.
  m.def("dropped_l1_(Tensor x, Tensor? base, Tensor thresholds, int seed, int stream, int offset, "
        "Tensor(a!) sums, Tensor(b!)? packed) -> ()");
  // out[j] = 2^32 where bit j of packed is set, else 0: drops recorded by dropped_l1_ as the merge's thresholds.
  m.def("expand_drops_(Tensor packed, Tensor(a!) out) -> ()");
  // out[i, j] += <xs[i] - base, xs[j] - base>: each product in fp32, the sums in fp64 (geometry.gram's matrix).
  m.def("task_vector_gram_(Tensor[] xs, Tensor? base, Tensor(a!) out) -> ()");
  // out[k] += sum (xs[k] - base)^2 (fp32 squares, fp64 sums) over the elements whose variance over k (as above) is
  // at least select (all without it): sce's mean squares.
  m.def("task_vector_squares_(Tensor[] xs, Tensor? base, float? select, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(evolver_kernels, CPU, m) {
  m.impl("de_mutate_crossover_", &evolver_kernels::de_mutate_crossover_cpu_op);
  m.impl("crossover_mask_", &evolver_kernels::crossover_mask_cpu_op);
  m.impl("philox4x32_10", &evolver_kernels::philox4x32_10_cpu_op);
  m.impl("merge_", &evolver_kernels::merge_op<evolver_kernels::run_merge_cpu>);
  m.impl("ties_window_merge_", &evolver_kernels::ties_window_merge_cpu_op);
  m.impl("magnitude_histogram_", &evolver_kernels::magnitude_histogram_cpu_op);
  m.impl("magnitude_gather_", &evolver_kernels::magnitude_gather_cpu_op);
  m.impl("magnitude_rank_drops_", &evolver_kernels::magnitude_rank_drops_cpu_op);
  m.impl("task_vector_variance_", &evolver_kernels::task_vector_variance_cpu_op);
  m.impl("dropped_l1_", &evolver_kernels::dropped_l1_cpu_op);
  m.impl("expand_drops_", &evolver_kernels::expand_drops_cpu_op);
  m.impl("task_vector_gram_", &evolver_kernels::task_vector_gram_cpu_op);
  m.impl("task_vector_squares_", &evolver_kernels::task_vector_squares_cpu_op);
}

// Importing the module runs the registrations above; the module reports its build (module.h).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { evolver_kernels::describe_build(m); }
