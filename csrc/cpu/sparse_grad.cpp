// Sparse gradient products on CPU (see sparse_grad_host.h): at::parallel_for over output rows,
// each row's sum over its nonzeros (sparse_grad_math.h) taken a few vectors of the row at a
// time; the CPU's own CSR scan and counting-sort transpose.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "cpu/nonzeros.h"
#include "sparse_grad_host.h"
#include "sparse_grad_math.h"

namespace kxops::sparse_grad {
namespace {

using at::vec::Vectorized;

// Grain of the parallel loops: enough nonzeros per task to outweigh its start.
constexpr int64_t kGrainNonzeros = 4096;

// y += a x over d values.
template <typename T>
void axpy(T a, const T* x, T* y, int64_t d) {
  using Vec = Vectorized<T>;
  const Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= d; j += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + j), Vec::loadu(y + j)).store(y + j);
  }
  if (j < d)
    at::vec::fmadd(va, Vec::loadu(x + j, d - j), Vec::loadu(y + j, d - j)).store(y + j, d - j);
}

}  // namespace

double max_density() {
  const char* value = std::getenv("KXOPS_SPARSE_GRAD_MAX_DENSITY");
  if (value == nullptr || *value == '\0') return kMaxDensity;
  char* end = nullptr;
  const double density = std::strtod(value, &end);
  TORCH_CHECK_VALUE(*end == '\0' && density >= 0 && density <= 1,
                    "kxops: KXOPS_SPARSE_GRAD_MAX_DENSITY must be a number in [0, 1], got '", value,
                    "'");
  return density;
}

bool portable_on_cpu() {
  const char* value = std::getenv("KXOPS_SPARSE_GRAD_PORTABLE");
  return value != nullptr && value[0] == '1' && value[1] == '\0';
}

namespace {

template <typename T>
std::optional<SparseRows> to_sparse_rows(const at::Tensor& g) {
  const int64_t n = g.size(0), m = g.size(1), stride = g.stride(0);
  const T* data = g.const_data_ptr<T>();
  at::Tensor row_start = at::empty({n + 1}, g.options().dtype(at::kLong));
  int64_t* start = row_start.mutable_data_ptr<int64_t>();
  start[0] = 0;
  const int64_t grain = std::max<int64_t>(1, kGrainNonzeros * 16 / std::max<int64_t>(m, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) start[i + 1] = count_nonzeros(data + i * stride, m);
  });
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  const int64_t nnz = start[n];
  if (!sparse_enough(nnz, n, m)) return std::nullopt;
  SparseRows out{row_start, at::empty({nnz}, row_start.options()), at::empty({nnz}, g.options()),
                 m};
  int64_t* col = out.col.mutable_data_ptr<int64_t>();
  T* value = out.value.mutable_data_ptr<T>();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      take_nonzeros(data + i * stride, m, col + start[i], value + start[i]);
    }
  });
  return out;
}

// Tasks over [0, items) whose nonzeros (offsets[item] .. offsets[item + 1]) total about
// kGrainNonzeros * per_nonzero_cost / d each.
int64_t grain_for(int64_t items, int64_t nnz, int64_t d) {
  const int64_t per_item =
      std::max<int64_t>(1, nnz / std::max<int64_t>(items, 1)) * std::max<int64_t>(d, 1);
  return std::max<int64_t>(1, kGrainNonzeros * 64 / per_item);
}

// kLanes vectors of an output row, the CPU's Acc of sparse_dot: kLanes independent fused
// multiply-add chains. kLanes 1 takes the row's last vectors, the final one partial (count
// elements).
template <typename T, int kLanes>
struct VecLanes {
  using Vec = Vectorized<T>;
  Vec v[kLanes];
  VecLanes() = default;
  explicit VecLanes(T a) {
    for (int i = 0; i < kLanes; ++i) v[i] = Vec(a);
  }
  static VecLanes load(const T* p, int64_t count) {
    VecLanes out;
    if constexpr (kLanes == 1) {
      out.v[0] = Vec::loadu(p, count);
    } else {
      for (int i = 0; i < kLanes; ++i) out.v[i] = Vec::loadu(p + i * Vec::size());
    }
    return out;
  }
  void store(T* p, int64_t count) const {
    if constexpr (kLanes == 1) {
      v[0].store(p, count);
    } else {
      for (int i = 0; i < kLanes; ++i) v[i].store(p + i * Vec::size());
    }
  }
};

template <typename T, int kLanes>
VecLanes<T, kLanes> multiply_add(const VecLanes<T, kLanes>& a, const VecLanes<T, kLanes>& b,
                                 const VecLanes<T, kLanes>& c) {
  VecLanes<T, kLanes> out;
  for (int i = 0; i < kLanes; ++i) out.v[i] = at::vec::fmadd(a.v[i], b.v[i], c.v[i]);
  return out;
}

// The CSR of a product and its operands, as sparse_product takes them.
template <typename T>
struct Product {
  const int64_t *start, *index;
  const T* value;
  T scale;
  const T* operand;
  int64_t operand_stride;
  bool zero_init;

  // Elements [j, j + count) of output row r.
  template <int kLanes>
  void sum_lanes(int64_t r, T* row, int64_t j, int64_t count) const {
    using Lanes = VecLanes<T, kLanes>;
    const Lanes init = zero_init ? Lanes(T(0)) : Lanes::load(row + j, count);
    const T* column = operand + j;
    const auto load = [&](int64_t i) { return Lanes::load(column + i * operand_stride, count); };
    sparse_dot(start[r], start[r + 1], index, value, scale, init, load).store(row + j, count);
  }

  // The whole output row r of d elements.
  void sum_row(int64_t r, T* row, int64_t d) const {
    constexpr int kLanes = 4;
    constexpr int64_t kWidth = Vectorized<T>::size();
    int64_t j = 0;
    for (; j + kLanes * kWidth <= d; j += kLanes * kWidth) {
      sum_lanes<kLanes>(r, row, j, kLanes * kWidth);
    }
    for (; j < d; j += kWidth) sum_lanes<1>(r, row, j, std::min(kWidth, d - j));
  }
};

template <typename T>
void sparse_product_impl(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                         T scale, const at::Tensor& operand, const at::Tensor& out,
                         const at::Tensor& sums, bool zero_init) {
  const int64_t rows = start.numel() - 1, d = out.defined() ? out.size(1) : 0;
  const Product<T> product{start.const_data_ptr<int64_t>(),
                           index.const_data_ptr<int64_t>(),
                           value.const_data_ptr<T>(),
                           scale,
                           d > 0 ? operand.const_data_ptr<T>() : nullptr,
                           d > 0 ? operand.stride(0) : 0,
                           zero_init};
  T* y = out.defined() ? out.mutable_data_ptr<T>() : nullptr;
  const int64_t y_stride = out.defined() ? out.stride(0) : 0;
  T* sum = sums.defined() ? sums.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, rows, grain_for(rows, value.numel(), std::max<int64_t>(d, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       product.sum_row(r, y + r * y_stride, d);
                       if (sum != nullptr) {
                         sum[r] = sparse_sum(product.start[r], product.start[r + 1], product.value,
                                             sum[r]);
                       }
                     }
                   });
}

template <typename T>
SparseCols transpose_impl(const SparseRows& g, T scale) {
  const int64_t n = g.row_start.numel() - 1, m = g.cols, nnz = g.value.numel();
  const int64_t* start = g.row_start.const_data_ptr<int64_t>();
  const int64_t* col = g.col.const_data_ptr<int64_t>();
  const T* value = g.value.const_data_ptr<T>();
  SparseCols out{at::zeros({m + 1}, g.row_start.options()), at::empty({nnz}, g.col.options()),
                 at::empty({nnz}, g.value.options())};
  int64_t* col_start = out.col_start.mutable_data_ptr<int64_t>();
  int64_t* row_of = out.row.mutable_data_ptr<int64_t>();
  T* value_of = out.value.mutable_data_ptr<T>();
  for (int64_t k = 0; k < nnz; ++k) ++col_start[col[k] + 1];
  for (int64_t j = 0; j < m; ++j) col_start[j + 1] += col_start[j];
  std::vector<int64_t> next(col_start, col_start + m);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = start[i]; k < start[i + 1]; ++k) {
      const int64_t slot = next[col[k]]++;
      row_of[slot] = i;
      value_of[slot] = scale * value[k];
    }
  }
  return out;
}

template <typename T>
void packed_products_impl(const SparseRows& g, const std::vector<PackedBlock>& blocks,
                          const at::Tensor& rows_operand, const at::Tensor& cols_operand,
                          const at::Tensor& rows_out, const at::Tensor& cols_out) {
  const int64_t heads = g.row_start.numel() - 1, d = rows_out.size(2);
  const int64_t* start = g.row_start.const_data_ptr<int64_t>();
  const int64_t* col = g.col.const_data_ptr<int64_t>();
  const T* value = g.value.const_data_ptr<T>();
  const auto row_of = [](const at::Tensor& t, auto* data, int64_t h, int64_t i) {
    return data + h * t.stride(0) + i * t.stride(1);
  };
  const T* rows_in = rows_operand.const_data_ptr<T>();
  const T* cols_in = cols_operand.const_data_ptr<T>();
  T* rows_data = rows_out.mutable_data_ptr<T>();
  T* cols_data = cols_out.mutable_data_ptr<T>();
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h) {
      size_t t = 0;
      for (int64_t k = start[h]; k < start[h + 1]; ++k) {
        while (col[k] >= blocks[t].offset + blocks[t].rows * blocks[t].width) ++t;
        const PackedBlock& block = blocks[t];
        const int64_t local = col[k] - block.offset;
        const int64_t i = block.row0 + local / block.width, j = block.col0 + local % block.width;
        axpy(value[k], row_of(rows_operand, rows_in, h, j), row_of(rows_out, rows_data, h, i), d);
        axpy(value[k], row_of(cols_operand, cols_in, h, i), row_of(cols_out, cols_data, h, j), d);
      }
    }
  });
}

bool takes(const at::Tensor& t, const at::Tensor& g) {
  return t.dim() == 2 && t.device() == g.device() && t.scalar_type() == g.scalar_type() &&
         (t.stride(1) == 1 || t.size(1) <= 1) && t.stride(0) >= 0;
}

}  // namespace

bool takes_operands(const at::Tensor& g, std::initializer_list<at::Tensor> operands) {
  const auto type = g.scalar_type();
#ifdef KXOPS_WITH_CUDA
  const bool device = g.is_cpu() || g.is_cuda();
#else
  const bool device = g.is_cpu();
#endif
  if (!device || (type != at::kFloat && type != at::kDouble) || !takes(g, g)) return false;
  for (const auto& t : operands) {
    if (t.defined() && t.dim() == 2 && !takes(t, g)) return false;
    if (t.defined() && t.dim() == 1 &&
        (t.scalar_type() != type || t.device() != g.device() || t.stride(0) != 1)) {
      return false;
    }
  }
  return true;
}

namespace cpu {

std::optional<SparseRows> sparse_rows(const at::Tensor& g) {
  return AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_rows",
                                    [&] { return to_sparse_rows<scalar_t>(g); });
}

SparseCols transpose(const SparseRows& g, double scale) {
  return AT_DISPATCH_FLOATING_TYPES(g.value.scalar_type(), "sparse_grad_transpose", [&] {
    return transpose_impl<scalar_t>(g, static_cast<scalar_t>(scale));
  });
}

void sparse_product(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                    double scale, const at::Tensor& operand, const at::Tensor& out,
                    const at::Tensor& sums, bool zero_init) {
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "sparse_product", [&] {
    sparse_product_impl<scalar_t>(start, index, value, static_cast<scalar_t>(scale), operand, out,
                                  sums, zero_init);
  });
}

}  // namespace cpu

bool blocks_sparse_enough(const SparseRows& g, const std::vector<PackedBlock>& blocks) {
  const double density = max_density();
  const int64_t rows = g.row_start.numel() - 1;
  const int64_t* start = g.row_start.const_data_ptr<int64_t>();
  const int64_t* col = g.col.const_data_ptr<int64_t>();
  for (int64_t h = 0; h < rows; ++h) {
    int64_t k = start[h];
    for (const PackedBlock& block : blocks) {
      const int64_t first = k, block_end = block.offset + block.rows * block.width;
      while (k < start[h + 1] && col[k] < block_end) ++k;
      if (!block_sparse_enough(k - first, block, density)) return false;
    }
  }
  return true;
}

void packed_products(const SparseRows& g, const std::vector<PackedBlock>& blocks,
                     const at::Tensor& rows_operand, const at::Tensor& cols_operand,
                     const at::Tensor& rows_out, const at::Tensor& cols_out) {
  AT_DISPATCH_FLOATING_TYPES(g.value.scalar_type(), "packed_products", [&] {
    packed_products_impl<scalar_t>(g, blocks, rows_operand, cols_operand, rows_out, cols_out);
  });
}

}  // namespace kxops::sparse_grad
