// Sparse gradient products on CPU (see sparse_grad_host.h): at::parallel_for over rows or
// columns, each a Vectorized axpy per nonzero.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "cpu/nonzeros.h"
#include "sparse_grad_host.h"

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
  if (static_cast<double>(nnz) > max_density() * static_cast<double>(n) * static_cast<double>(m)) {
    return std::nullopt;
  }
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

template <typename T>
void rows_product_impl(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                       T scale) {
  const int64_t n = out.size(0), d = out.size(1);
  const int64_t* start = g.row_start.const_data_ptr<int64_t>();
  const int64_t* col = g.col.const_data_ptr<int64_t>();
  const T* value = g.value.const_data_ptr<T>();
  const T* b = operand.const_data_ptr<T>();
  T* y = out.mutable_data_ptr<T>();
  const int64_t b_stride = operand.stride(0), y_stride = out.stride(0);
  at::parallel_for(0, n, grain_for(n, g.value.numel(), d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T* row = y + i * y_stride;
      std::fill(row, row + d, T(0));
      for (int64_t k = start[i]; k < start[i + 1]; ++k) {
        axpy(scale * value[k], b + col[k] * b_stride, row, d);
      }
    }
  });
}

template <typename T>
void cols_product_impl(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                       const at::Tensor& col_sums, T scale, bool overwrite) {
  const int64_t n = g.row_start.numel() - 1, m = g.cols, nnz = g.value.numel();
  const int64_t* start = g.row_start.const_data_ptr<int64_t>();
  const int64_t* col = g.col.const_data_ptr<int64_t>();
  const T* value = g.value.const_data_ptr<T>();
  // Counting sort by column; rows stay in ascending order within a column.
  std::vector<int64_t> col_start(m + 1, 0), row_of(nnz);
  std::vector<T> value_of(nnz);
  for (int64_t k = 0; k < nnz; ++k) ++col_start[col[k] + 1];
  for (int64_t j = 0; j < m; ++j) col_start[j + 1] += col_start[j];
  std::vector<int64_t> next(col_start.begin(), col_start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = start[i]; k < start[i + 1]; ++k) {
      const int64_t slot = next[col[k]]++;
      row_of[slot] = i;
      value_of[slot] = scale * value[k];
    }
  }
  const int64_t d = out.defined() ? out.size(1) : 1;
  T* y = out.defined() ? out.mutable_data_ptr<T>() : nullptr;
  T* sums = col_sums.defined() ? col_sums.mutable_data_ptr<T>() : nullptr;
  const T* b = y != nullptr ? operand.const_data_ptr<T>() : nullptr;
  const int64_t b_stride = y != nullptr ? operand.stride(0) : 0;
  const int64_t y_stride = y != nullptr ? out.stride(0) : 0;
  at::parallel_for(0, m, grain_for(m, nnz, d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (overwrite && y != nullptr) std::fill(y + j * y_stride, y + j * y_stride + d, T(0));
      for (int64_t k = col_start[j]; k < col_start[j + 1]; ++k) {
        if (y != nullptr) axpy(value_of[k], b + row_of[k] * b_stride, y + j * y_stride, d);
        if (sums != nullptr) sums[j] += value_of[k];
      }
    }
  });
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

std::optional<SparseRows> sparse_rows(const at::Tensor& g,
                                      std::initializer_list<at::Tensor> operands) {
  const auto type = g.scalar_type();
  if (!g.is_cpu() || (type != at::kFloat && type != at::kDouble) || !takes(g, g)) {
    return std::nullopt;
  }
  for (const auto& t : operands) {
    if (t.defined() && t.dim() == 2 && !takes(t, g)) return std::nullopt;
    if (t.defined() && t.dim() == 1 && (t.scalar_type() != type || t.stride(0) != 1)) {
      return std::nullopt;
    }
  }
  return AT_DISPATCH_FLOATING_TYPES(type, "sparse_rows",
                                    [&] { return to_sparse_rows<scalar_t>(g); });
}

void rows_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                  double scale) {
  AT_DISPATCH_FLOATING_TYPES(g.value.scalar_type(), "rows_product", [&] {
    rows_product_impl<scalar_t>(g, operand, out, static_cast<scalar_t>(scale));
  });
}

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
      const double limit =
          density * static_cast<double>(block.rows) * static_cast<double>(block.width);
      if (static_cast<double>(k - first) > limit) return false;
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

void cols_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                  const at::Tensor& col_sums, double scale, bool overwrite) {
  if (!out.defined() && !col_sums.defined()) return;
  AT_DISPATCH_FLOATING_TYPES(g.value.scalar_type(), "cols_product", [&] {
    cols_product_impl<scalar_t>(g, operand, out, col_sums, static_cast<scalar_t>(scale), overwrite);
  });
}

}  // namespace kxops::sparse_grad
