// Sparse gradient products for the fused heads' filtered gradients (grad_filter > 0): a block
// gradient g [n, m] that is mostly zeros is turned into CSR (each row's nonzeros, in column
// order) and the two products a head needs are computed from it, touching only the nonzeros:
//   rows_product:  out [n, d]  = scale * g @ operand     (operand [m, d])
//   cols_product:  out [m, d] += scale * g^T @ operand   (operand [n, d]), col_sums [m] += ...
// Deterministic, without atomics: a row of out is one task's sum over its row's nonzeros in
// column order; a column of out one task's sum over its column's nonzeros in row order (a
// counting sort keeps that order), each added straight into the accumulator. Both are then
// independent of the thread count, and cols_product of the block split of the rows: blocks run
// in row order, so the accumulator sees the same additions in the same order whatever the
// blocks.
//
// CPU, fp32/fp64, row-major operands and outputs (unit stride along d). sparse_rows returns
// nothing where those do not hold or where more than kMaxDensity of g is nonzero: the caller
// then runs its dense GEMMs (exact either way; they differ only in rounding).
#pragma once

#include <ATen/ATen.h>

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

// g's nonzeros: row_start [n + 1] (int64), col [nnz] (int64), value [nnz] (g's dtype).
struct SparseRows {
  at::Tensor row_start, col, value;
  int64_t cols = 0;
};

// g in CSR, or nothing (see above). `operands`: every tensor the products will read or write
// (undefined ones are skipped), checked for dtype, device and layout.
std::optional<SparseRows> sparse_rows(const at::Tensor& g,
                                      std::initializer_list<at::Tensor> operands);

// CPU, fp32/fp64 logits [rows, m]: kxops::sparse_zlpr's row losses (reduction "none") and its
// gradient filtered by grad_filter > 0 straight into sparse form, the dense gradient never
// written; the gradient is nothing (and the losses unfinished) where more than max_density() of
// it survives: the caller then runs the op.
std::tuple<at::Tensor, std::optional<SparseRows>> sparse_zlpr_with_sparse_grad(
    const at::Tensor& logits, const at::Tensor& positives, int64_t ignore_index,
    double grad_filter);

void rows_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                  double scale);

// A row of g packing blocks one after the other (the GlobalPointer's spans): the block's
// entries [offset, offset + rows * width) of the row, row-major, stand for the products' rows
// row0.. and columns col0...
struct PackedBlock {
  int64_t offset, rows, width, row0, col0;
};

// Whether no block of any row of g holds more than max_density() of its entries: the rule
// sparse_rows applies to each block on its own.
bool blocks_sparse_enough(const SparseRows& g, const std::vector<PackedBlock>& blocks);

// For each row h of g (a head) and each of its entries v at (block row i, block column j):
//   rows_out[h][i] += v * rows_operand[h][j],   cols_out[h][j] += v * cols_operand[h][i],
// in the row's order: each output row sees the additions rows_product (a row of out) and
// cols_product (a column of out) make block by block, so the same bits. The operands
// [heads, steps, d] with unit stride along d; out zeroed by the caller.
void packed_products(const SparseRows& g, const std::vector<PackedBlock>& blocks,
                     const at::Tensor& rows_operand, const at::Tensor& cols_operand,
                     const at::Tensor& rows_out, const at::Tensor& cols_out);

// out and col_sums are each optional (an undefined tensor: not computed). overwrite: out's
// content is ignored (each row zeroed by the task that sums into it; col_sums still adds).
void cols_product(const SparseRows& g, const at::Tensor& operand, const at::Tensor& out,
                  const at::Tensor& col_sums, double scale, bool overwrite = false);

}  // namespace kxops::sparse_grad
