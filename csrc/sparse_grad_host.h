// Sparse gradient products for the fused heads' filtered gradients (grad_filter > 0): a block
// gradient g [n, m] that is mostly zeros is turned into CSR (each row's nonzeros, in column
// order) and the two products a head needs are computed from it, touching only the nonzeros:
//   rows_product:  out [n, d]  = scale * g @ operand     (operand [m, d])
//   cols_product:  out [m, d] += scale * g^T @ operand   (operand [n, d]), col_sums [m] += ...
// Deterministic, without atomics: a row of out is one task's sum over its row's nonzeros in
// column order; a column of out one task's sum over its column's nonzeros in row order (a
// stable sort by column keeps that order), each added straight into the accumulator. Both are
// then independent of the thread count, and cols_product of the block split of the rows: blocks
// run in row order, so the accumulator sees the same additions in the same order whatever the
// blocks. The sums themselves are sparse_grad_math.h's, shared by both devices.
//
// One driver for both devices: the CPU converts and transposes with its own loops
// (cpu/sparse_grad.cpp); CUDA with at:: ops (the portable route below, which the CPU also runs
// under KXOPS_SPARSE_GRAD_PORTABLE=1 so that the tests check it), its products one CUDA kernel
// (cuda/sparse_grad.cu). fp32/fp64, row-major operands and outputs (unit stride along d).
// sparse_rows returns nothing where those do not hold or where more than max_density() of g is
// nonzero: the caller then runs its dense GEMMs (exact either way; they differ only in
// rounding).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace kxops::sparse_grad {

// The density above which a block's dense GEMMs beat the sparse products (measured by
// `python -m benchmarks.bench_linear_sparse_zlpr --crossover`; see docs/design.md). The
// environment variable KXOPS_SPARSE_GRAD_MAX_DENSITY overrides it (0: always the GEMMs, 1:
// always the sparse products), read at each call.
constexpr double kMaxDensity = 0.05;

double max_density();

// Whether nnz nonzeros of an [n, m] block are few enough for the sparse products.
inline bool sparse_enough(int64_t nnz, int64_t n, int64_t m) {
  return static_cast<double>(nnz) <=
         max_density() * static_cast<double>(n) * static_cast<double>(m);
}

// Whether the CPU converts and transposes through the portable route too
// (KXOPS_SPARSE_GRAD_PORTABLE=1, read at each call; for the tests: the same bits either way).
bool portable_on_cpu();

// g's nonzeros: row_start [n + 1] (int64), col [nnz] (int64), value [nnz] (g's dtype).
struct SparseRows {
  at::Tensor row_start, col, value;
  int64_t cols = 0;
};

// g^T's: each column's nonzeros in row order, col_start [m + 1], row [nnz] (int64), value
// [nnz] already times the product's scale.
struct SparseCols {
  at::Tensor col_start, row, value;
};

// Whether g and the products' operands (undefined ones skipped; 1-D: col_sums) are what the
// sparse products take: fp32/fp64, one device (CPU, or CUDA in a CUDA build), unit stride along
// d.
bool takes_operands(const at::Tensor& g, std::initializer_list<at::Tensor> operands);

namespace cpu {
// g [n, m] in CSR (vector scans over each row), or nothing where max_density() is passed.
std::optional<SparseRows> sparse_rows(const at::Tensor& g);
// A counting sort by column (rows stay in order), values times scale.
SparseCols transpose(const SparseRows& g, double scale);

// Nonzeros gathered by a CPU kernel's task, in column order within each row.
template <typename T>
struct Entries {
  std::vector<int64_t> cols;
  std::vector<T> values;
};

// The CSR of rows whose nonzeros were gathered in pieces: row_start [rows + 1] holds each row's
// count at r + 1 on entry (made the offsets here); pieces[r] goes at row r's offset, and may hold
// the rows after r too (a task's buffer at its first row, the next pieces empty).
template <typename T>
SparseRows join_rows(const at::Tensor& row_start, const std::vector<Entries<T>>& pieces,
                     int64_t cols, const at::TensorOptions& value_options) {
  int64_t* start = row_start.mutable_data_ptr<int64_t>();
  const int64_t rows = row_start.numel() - 1;
  start[0] = 0;
  for (int64_t row = 0; row < rows; ++row) start[row + 1] += start[row];
  SparseRows out{row_start, at::empty({start[rows]}, row_start.options()),
                 at::empty({start[rows]}, value_options), cols};
  for (int64_t row = 0; row < rows; ++row) {
    const auto& piece = pieces[row];
    std::copy(piece.cols.begin(), piece.cols.end(),
              out.col.mutable_data_ptr<int64_t>() + start[row]);
    std::copy(piece.values.begin(), piece.values.end(),
              out.value.mutable_data_ptr<T>() + start[row]);
  }
  return out;
}

// The products' kernel on each device: for each output row r of a CSR (start [R + 1], index,
// value), out[r] = (zero_init ? 0 : out[r]) + sum_k (scale * value[k]) * operand[index[k]] over
// r's nonzeros in order (sparse_grad_math.h's sparse_dot), and sums[r] += value[k] in order
// where sums is defined. out undefined: the sums alone.
void sparse_product(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                    double scale, const at::Tensor& operand, const at::Tensor& out,
                    const at::Tensor& sums, bool zero_init);
}  // namespace cpu
#ifdef KXOPS_WITH_CUDA
namespace cuda {
void sparse_product(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                    double scale, const at::Tensor& operand, const at::Tensor& out,
                    const at::Tensor& sums, bool zero_init);
}  // namespace cuda
#endif

// The portable route (the CUDA one): g's CSR through at:: ops, in the same order as the CPU's
// scan (nonzero_static walks g row-major; a NaN counts as nonzero: it must reach the products).
// The density rule needs the count on the host: one read of it per block (a device sync on
// CUDA, the only one of the sparse products), which nonzero_static then takes as its size,
// without a second.
inline std::optional<SparseRows> portable_sparse_rows(const at::Tensor& g) {
  const int64_t n = g.size(0), m = g.size(1);
  const at::Tensor nonzero = g.ne(0);
  at::Tensor row_start = at::zeros({n + 1}, g.options().dtype(at::kLong));
  row_start.narrow(0, 1, n).copy_(nonzero.sum(1).cumsum(0));
  const int64_t nnz = row_start[n].item<int64_t>();
  if (!sparse_enough(nnz, n, m)) return std::nullopt;
  const at::Tensor where = at::nonzero_static(nonzero, nnz);
  const at::Tensor rows = where.select(1, 0), cols = where.select(1, 1);
  c10::List<std::optional<at::Tensor>> index;
  index.push_back(rows);
  index.push_back(cols);
  return SparseRows{row_start, cols.contiguous(), at::index(g, index), m};
}

// g^T's CSR through at:: ops: a stable sort by column keeps each column's rows in order, as the
// CPU's counting sort does; the values scaled by one multiply each, as there.
inline SparseCols portable_transpose(const SparseRows& g, double scale) {
  const int64_t nnz = g.value.numel();
  const auto [sorted_col, order] = at::sort(g.col, /*stable=*/std::optional<bool>(true), /*dim=*/0);
  const at::Tensor row = at::repeat_interleave(g.row_start.diff(), std::optional<int64_t>(nnz));
  return {at::_convert_indices_from_coo_to_csr(sorted_col, g.cols),
          row.index_select(0, order).contiguous(), g.value.index_select(0, order).mul_(scale)};
}

inline void sparse_product(const at::Tensor& start, const at::Tensor& index,
                           const at::Tensor& value, double scale, const at::Tensor& operand,
                           const at::Tensor& out, const at::Tensor& sums, bool zero_init) {
#ifdef KXOPS_WITH_CUDA
  if (value.is_cuda()) {
    cuda::sparse_product(start, index, value, scale, operand, out, sums, zero_init);
    return;
  }
#endif
  cpu::sparse_product(start, index, value, scale, operand, out, sums, zero_init);
}

// g in CSR, or nothing (see above). `operands`: every tensor the products will read or write
// (undefined ones are skipped), checked for dtype, device and layout.
inline std::optional<SparseRows> sparse_rows(const at::Tensor& g,
                                             std::initializer_list<at::Tensor> operands) {
  if (!takes_operands(g, operands)) return std::nullopt;
  if (g.is_cpu() && !portable_on_cpu()) return cpu::sparse_rows(g);
  return portable_sparse_rows(g);
}

// CPU, fp32/fp64 logits [rows, m]: kxops::sparse_zlpr's row losses (reduction "none") and its
// gradient filtered by grad_filter > 0 straight into sparse form, the dense gradient never
// written; the gradient is nothing (and the losses unfinished) where more than max_density() of
// it survives: the caller then runs the op.
std::tuple<at::Tensor, std::optional<SparseRows>> sparse_zlpr_with_sparse_grad(
    const at::Tensor& logits, const at::Tensor& positives, int64_t ignore_index,
    double grad_filter);

inline void rows_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                         double scale) {
  sparse_product(g.row_start, g.col, g.value, scale, operand, out, at::Tensor(),
                 /*zero_init=*/true);
}

// out and col_sums are each optional (an undefined tensor: not computed). overwrite: out's
// content is ignored (each row zeroed by the task that sums into it; col_sums still adds).
inline void cols_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                         const at::Tensor& col_sums, double scale, bool overwrite = false) {
  if (!out.defined() && !col_sums.defined()) return;
  const SparseCols t = g.value.is_cpu() && !portable_on_cpu() ? cpu::transpose(g, scale)
                                                              : portable_transpose(g, scale);
  sparse_product(t.col_start, t.row, t.value, 1.0, operand, out, col_sums, overwrite);
}

// A row of g packing blocks one after the other (the GlobalPointer's spans): the block's
// entries [offset, offset + rows * width) of the row, row-major, stand for the products' rows
// row0.. and columns col0...
struct PackedBlock {
  int64_t offset, rows, width, row0, col0;
};

// Whether count entries of one row's block are few enough for the sparse products: the rule
// sparse_rows applies to each block on its own, for every packed route.
inline bool block_sparse_enough(int64_t count, const PackedBlock& block, double density) {
  return static_cast<double>(count) <=
         density * static_cast<double>(block.rows) * static_cast<double>(block.width);
}

// Whether no block of any row of g holds more than max_density() of its entries.
bool blocks_sparse_enough(const SparseRows& g, const std::vector<PackedBlock>& blocks);

// For each row h of g (a head) and each of its entries v at (block row i, block column j):
//   rows_out[h][i] += v * rows_operand[h][j],   cols_out[h][j] += v * cols_operand[h][i],
// in the row's order: each output row sees the additions rows_product (a row of out) and
// cols_product (a column of out) make block by block, so the same bits. The operands
// [heads, steps, d] with unit stride along d; out zeroed by the caller.
void packed_products(const SparseRows& g, const std::vector<PackedBlock>& blocks,
                     const at::Tensor& rows_operand, const at::Tensor& cols_operand,
                     const at::Tensor& rows_out, const at::Tensor& cols_out);

// The packed products of the portable route (CUDA's; the CPU's under
// KXOPS_SPARSE_GRAD_PORTABLE=1), from a dense packed gradient g [heads, packed]: the entries of
// its sparse blocks (those where every head passes block_sparse_enough; the caller runs its
// dense products for the others) keyed twice for the product kernel, by (head, block row i) for
// grad q~ and by (run, head, block column j) for grad k~, where a run is a stretch of
// consecutive sparse blocks. The entries are taken block by block, row-major within each, and
// stably sorted by those keys, so that each output row sums its entries in the order the
// per-block products (and packed_products) add them: a row i in column order (its entries all
// lie in one block), a column j block by block in row order; the caller adds its dense blocks'
// products into grad k~ between the runs, in block order.
struct PackedSparse {
  // Per block: the index of its run, or -1 where some head holds too many of its entries.
  std::vector<int64_t> run;
  int64_t rows = 0;  // heads * steps: the output rows of each product
  // By (head, i): CSR start [rows + 1], the k~ row (head * steps + j) each entry multiplies.
  at::Tensor row_start, row_operand, row_value;
  // By (run, head, j): CSR start [runs * rows + 1], the q~ row (head * steps + i).
  at::Tensor col_start, col_operand, col_value;
};

// The entries of g's sparse blocks (run[t] >= 0, sizes[t] entries in all heads) as (q~ row,
// k~ row, value, run) over the flattened [heads * steps] rows, block after block, row-major
// within each.
inline std::array<at::Tensor, 4> portable_packed_entries(
    const at::Tensor& g, const at::Tensor& nonzero, const std::vector<PackedBlock>& blocks,
    const std::vector<int64_t>& run, const std::vector<int64_t>& sizes, int64_t steps) {
  std::vector<at::Tensor> q_row, k_row, value, block_run;
  for (size_t t = 0; t < blocks.size(); ++t) {
    if (run[t] < 0) continue;
    const PackedBlock& block = blocks[t];
    const auto in_block = [&](const at::Tensor& x) {
      return x.narrow(1, block.offset, block.rows * block.width)
          .view({x.size(0), block.rows, block.width});
    };
    const at::Tensor where = at::nonzero_static(in_block(nonzero), sizes[t]);
    const at::Tensor head = where.select(1, 0), i = where.select(1, 1), j = where.select(1, 2);
    const at::Tensor head_row0 = head * steps;
    q_row.push_back(head_row0 + (i + block.row0));
    k_row.push_back(head_row0 + (j + block.col0));
    c10::List<std::optional<at::Tensor>> index;
    for (const auto& x : {head, i, j}) index.push_back(x);
    value.push_back(at::index(in_block(g), index));
    block_run.push_back(at::full_like(i, run[t]));
  }
  return {at::cat(q_row), at::cat(k_row), at::cat(value), at::cat(block_run)};
}

// g's PackedSparse, or nothing where the operands (undefined ones skipped) are not what the
// products take or no block is sparse enough. The density rule reads the (head, block) counts
// on the host: the one device sync (CUDA) of the chunk.
inline std::optional<PackedSparse> portable_packed_sparse(
    const at::Tensor& g, const std::vector<PackedBlock>& blocks, int64_t steps,
    std::initializer_list<at::Tensor> operands) {
  if (blocks.empty() || !takes_operands(g, operands)) return std::nullopt;
  const int64_t heads = g.size(0);
  const at::Tensor nonzero = g.ne(0);  // a NaN counts: it must reach the products
  std::vector<at::Tensor> per_block;
  for (const PackedBlock& block : blocks) {
    per_block.push_back(nonzero.narrow(1, block.offset, block.rows * block.width).sum(1));
  }
  const at::Tensor counts = at::stack(per_block).cpu();
  const auto count = counts.accessor<int64_t, 2>();
  const double density = max_density();
  PackedSparse out{std::vector<int64_t>(blocks.size(), -1), heads * steps};
  std::vector<int64_t> sizes(blocks.size(), 0);
  int64_t runs = 0;
  for (size_t t = 0; t < blocks.size(); ++t) {
    bool sparse = true;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t n = count[static_cast<int64_t>(t)][h];
      sparse = sparse && block_sparse_enough(n, blocks[t], density);
      sizes[t] += n;
    }
    if (sparse) out.run[t] = t > 0 && out.run[t - 1] >= 0 ? out.run[t - 1] : runs++;
  }
  if (runs == 0) return std::nullopt;
  const auto [q_row, k_row, value, run] =
      portable_packed_entries(g, nonzero, blocks, out.run, sizes, steps);
  const std::optional<bool> stable(true);
  const auto [row_key, row_order] = at::sort(q_row, stable, /*dim=*/0);
  out.row_start = at::_convert_indices_from_coo_to_csr(row_key, out.rows);
  out.row_operand = k_row.index_select(0, row_order);
  out.row_value = value.index_select(0, row_order);
  const auto [col_key, col_order] = at::sort(run * out.rows + k_row, stable, /*dim=*/0);
  out.col_start = at::_convert_indices_from_coo_to_csr(col_key, runs * out.rows);
  out.col_operand = q_row.index_select(0, col_order);
  out.col_value = value.index_select(0, col_order);
  return out;
}

// grad q~: rows_out [heads, steps, d] (contiguous) = the sparse blocks' entries times
// rows_operand's rows [heads, steps, d]; each row is zeroed first (a dense block's rows are left
// 0 for the caller's dense products to overwrite).
inline void packed_rows_product(const PackedSparse& g, const at::Tensor& rows_operand,
                                const at::Tensor& rows_out) {
  sparse_product(g.row_start, g.row_operand, g.row_value, 1.0,
                 rows_operand.reshape({g.rows, rows_operand.size(2)}),
                 rows_out.view({g.rows, rows_out.size(2)}), at::Tensor(), /*zero_init=*/true);
}

// grad k~: cols_out [heads, steps, d] (contiguous) += run `run`'s entries times cols_operand's
// rows.
inline void packed_cols_product(const PackedSparse& g, int64_t run, const at::Tensor& cols_operand,
                                const at::Tensor& cols_out) {
  sparse_product(g.col_start.narrow(0, run * g.rows, g.rows + 1), g.col_operand, g.col_value, 1.0,
                 cols_operand.reshape({g.rows, cols_operand.size(2)}),
                 cols_out.view({g.rows, cols_out.size(2)}), at::Tensor(), /*zero_init=*/false);
}

}  // namespace kxops::sparse_grad
