// Host driver of kxops::global_pointer_zlpr, shared by CPU and CUDA: the sparse ZLPR loss of
// every (batch, head) row of the GlobalPointer span grid s_ij = q_i . k_j + start_i + end_j
// without ever holding the [B, heads, L, L] grid.
//
// A row's loss only needs its unmasked spans, not their grid positions. Per batch, the valid
// steps (mask != 0, anywhere in the sequence) are gathered ("compressed", Lv of them); the
// compressed rows are cut into blocks of rows i in [i0, i1), each against the columns
// j in [col0, Lv) with col0 = i0 under tril (a trapezoid: the masked half is never computed,
// only the small triangle inside each diagonal block is set to -inf) and col0 = 0 otherwise.
// The blocks of one (batch, head) are packed one after the other into one flat row, a few
// heads at a time within a byte budget, and the existing row kernel kxops::sparse_zlpr runs
// once on [heads, packed]: exact normalisers in one pass, no online rescaling. The positives
// are remapped to packed ids (masked spans and i > j under tril to "ignored").
//
// The biases ride in the GEMMs: q~ = [q | start | 1], k~ = [k | 1 | end] give
// q~_i . k~_j = s_ij, so one GEMM per block writes the logits, and the two gradient GEMMs
// G k~ (grad of q~: grad q and, in the "start" column, the row sums = grad start) and G^T q~
// (grad of k~: grad k and the column sums = grad end) give the bias gradients too. A row's
// gradient touches only its own (batch, head) slice of q and k, so the forward computes it when
// asked (3 GEMMs per block, no recomputation) and the backward only scales each slice.
//
// The same per-chunk work runs on every device; a multi-thread CPU splits the (batch, head)
// rows among its threads, each running that work single-threaded (see the end of forward).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "checks.h"
#include "gemm.h"
#include "sparse_grad_host.h"
#include "zlpr_host.h"

namespace kxops::global_pointer_zlpr {

// (loss in fp32/fp64: [B, heads] for reduction "none", else 0-dim; grad q, grad k, grad
// start_bias, grad end_bias): empty tensors where grad_mask is false or the bias is None.
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Rows per block: a multiple of kRowQuantum giving at most about kMaxBlocks blocks per batch.
// Few blocks mean few, large GEMMs (each call is a parallel region: on a busy CPU every one
// can wait for a time slice); under tril the -inf triangles inside the diagonal blocks then
// cost about 1 / kMaxBlocks of the spans computed.
constexpr int64_t kRowQuantum = 64;
constexpr int64_t kMaxBlocks = 8;
// The default budget of the packed logits and their gradient: a quarter of the materialised
// grid, at most this many bytes (the grid itself is never allocated).
constexpr int64_t kMaxDefaultBudget = int64_t(32) << 20;
// ... and at least this much, so that a small problem runs in one call per batch.
constexpr int64_t kMinDefaultBudget = int64_t(8) << 20;
// L * L (the number of span ids) must fit in int64.
constexpr int64_t kMaxLength = 3037000499;

constexpr const char* kOp = "global_pointer_zlpr";

// q, k and the biases: the GEMMs' operands, all of q's dtype and device.
inline void check_operands(const at::Tensor& q, const at::Tensor& k,
                           const std::optional<at::Tensor>& start_bias,
                           const std::optional<at::Tensor>& end_bias) {
  check_kernel_float(kOp, "q", q);
  TORCH_CHECK_VALUE(q.dim() == 4, "kxops.global_pointer_zlpr: q must be [batch, heads, L, D] ",
                    "(4 dims), got shape ", py(q.sizes()));
  const int64_t length = q.size(2);
  TORCH_CHECK_VALUE(length <= kMaxLength, "kxops.global_pointer_zlpr: L = ", length,
                    " is too long (L * L span ids must fit in int64)");
  check_like(kOp, "k", k, "q", q);
  check_shape(kOp, "k", k, q.sizes());
  auto check_bias = [&](const char* name, const std::optional<at::Tensor>& bias) {
    if (!bias.has_value()) return;
    check_like(kOp, name, *bias, "q", q);
    check_shape(kOp, name, *bias, {q.size(0), q.size(1), length});
  };
  check_bias("start_bias", start_bias);
  check_bias("end_bias", end_bias);
}

// positives [batch, heads, P] of span ids; mask [batch, L] of any real values.
inline void check_positives_and_mask(const at::Tensor& q, const at::Tensor& positives,
                                     const std::optional<at::Tensor>& mask) {
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2);
  check_ids(kOp, "positives", positives);
  TORCH_CHECK_VALUE(
      positives.dim() == 3 && positives.size(0) == batch && positives.size(1) == heads,
      "kxops.global_pointer_zlpr: positives must be [batch, heads, P] = ", py({batch, heads}),
      " + (P,), got shape ", py(positives.sizes()));
  check_same_device(kOp, "positives", positives, "q", q);
  if (!mask.has_value()) return;
  check_real_values(kOp, "mask", *mask);
  check_shape(kOp, "mask", *mask, {batch, length});
  check_same_device(kOp, "mask", *mask, "q", q);
}

// Every argument, before any memory is touched.
inline void check_arguments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positives,
                            const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& start_bias,
                            const std::optional<at::Tensor>& end_bias, c10::string_view reduction,
                            std::optional<int64_t> block_bytes, double grad_filter) {
  check_operands(q, k, start_bias, end_bias);
  check_positives_and_mask(q, positives, mask);
  check_reduction(kOp, reduction);
  TORCH_CHECK_VALUE(!block_bytes.has_value() || *block_bytes > 0,
                    "kxops.global_pointer_zlpr: block_bytes must be positive, got ",
                    block_bytes.value_or(0));
  check_grad_filter(kOp, grad_filter);
}

// Span ids out of [0, L*L) that are not ignore_index: IndexError on CPU. On CUDA (where a check
// would synchronise) they are remapped to an out-of-range packed id, for sparse_zlpr's
// device-side assert.
inline at::Tensor out_of_range(const at::Tensor& positives, int64_t ignore_index, int64_t spans) {
  const auto bad =
      positives.ne(ignore_index).logical_and_(positives.lt(0).logical_or_(positives.ge(spans)));
  if (positives.is_cpu() && bad.any().item<bool>()) {
    const int64_t value = positives.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK_INDEX(false, "kxops.global_pointer_zlpr: positives holds span id ", value,
                      ", out of range for L * L = ", spans, " spans (valid: 0..", spans - 1,
                      ", or ignore_index=", ignore_index, " for padding)");
  }
  return bad;
}

// The row blocks of one batch with Lv valid steps, packed one after the other.
struct Packing {
  int64_t valid, block_rows, packed = 0;
  bool tril;
  struct Block {
    int64_t row0, rows, col0, width, offset;
  };
  std::vector<Block> blocks;

  Packing(int64_t valid, bool tril)
      : valid(valid),
        block_rows(std::max<int64_t>(
                       1, (valid + kMaxBlocks * kRowQuantum - 1) / (kMaxBlocks * kRowQuantum)) *
                   kRowQuantum),
        tril(tril) {
    for (int64_t row0 = 0; row0 < valid; row0 += block_rows) {
      const int64_t rows = std::min(block_rows, valid - row0);
      const int64_t col0 = tril ? row0 : 0;
      blocks.push_back({row0, rows, col0, valid - col0, packed});
      packed += rows * (valid - col0);
    }
  }

  // Packed id of the span (ci, cj) of compressed steps (int64 tensors, ci <= cj under tril):
  // every block before ci's is a full one, so its offset has a closed form.
  at::Tensor packed_id(const at::Tensor& ci, const at::Tensor& cj) const {
    if (!tril) return ci * valid + cj;
    const auto block = ci.div(block_rows, "floor");
    const auto row0 = block * block_rows;
    // sum over earlier blocks t of R (Lv - t R) = R Lv b - R^2 b (b - 1) / 2
    const auto offset =
        block * (block_rows * valid) - block * (block - 1) * (block_rows * block_rows / 2);
    return offset + (ci - row0) * (valid - row0) + (cj - row0);
  }
};

inline int64_t byte_budget(std::optional<int64_t> block_bytes, const at::Tensor& q) {
  if (block_bytes.has_value()) return *block_bytes;
  const int64_t length = q.size(2);
  // Saturating: the grid's size may exceed int64 bytes only in theory, but never overflow.
  const double grid =
      static_cast<double>(q.size(0)) * q.size(1) * length * length * q.element_size();
  return static_cast<int64_t>(
      std::min<double>(kMaxDefaultBudget, std::max<double>(kMinDefaultBudget, grid / 4)));
}

// [rows, L, D] of the batch's valid steps (all of them when idx is undefined), with the bias
// columns appended: q~ = [q | start | 1], k~ = [k | 1 | end] (each pair only for a given bias).
inline at::Tensor augmented(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& own_bias,
                            bool start_side, bool has_start, bool has_end) {
  auto steps = [&](const at::Tensor& t) { return idx.defined() ? t.index_select(1, idx) : t; };
  if (!has_start && !has_end) return steps(x);
  std::vector<at::Tensor> parts{steps(x)};
  const auto ones = [&] {
    return at::ones({x.size(0), idx.defined() ? idx.size(0) : x.size(1), 1}, x.options());
  };
  if (has_start) parts.push_back(start_side ? steps(own_bias).unsqueeze(-1) : ones());
  if (has_end) parts.push_back(start_side ? ones() : steps(own_bias).unsqueeze(-1));
  return at::cat(parts, 2);
}

// A block's filtered gradient products head by head, from each head's sparse form (see
// sparse_grad_host.h): grad_rows = g k_cols, grad_cols += g^T q_rows. False, nothing written,
// unless every head is sparse enough (the caller then runs the batched dense GEMMs). The CPU's
// own route; the portable one (CUDA's) takes the whole chunk at once (dense_products).
inline bool sparse_head_products(const at::Tensor& g, const at::Tensor& k_cols,
                                 const at::Tensor& q_rows, const at::Tensor& grad_rows,
                                 const at::Tensor& grad_cols) {
  std::vector<sparse_grad::SparseRows> heads;
  for (int64_t h = 0; h < g.size(0); ++h) {
    auto sparse =
        sparse_grad::sparse_rows(g[h], {k_cols[h], q_rows[h], grad_rows[h], grad_cols[h]});
    if (!sparse.has_value()) return false;
    heads.push_back(std::move(*sparse));
  }
  for (int64_t h = 0; h < g.size(0); ++h) {
    sparse_grad::rows_product(heads[h], k_cols[h], grad_rows[h], 1.0);
    sparse_grad::cols_product(heads[h], q_rows[h], grad_cols[h], at::Tensor(), 1.0);
  }
  return true;
}

// The packing's blocks as sparse_grad sees them (the products' rows are q~'s, columns k~'s).
inline std::vector<sparse_grad::PackedBlock> packed_blocks(const Packing& packing) {
  std::vector<sparse_grad::PackedBlock> blocks;
  for (const auto& blk : packing.blocks) {
    blocks.push_back({blk.offset, blk.rows, blk.width, blk.row0, blk.col0});
  }
  return blocks;
}

// The filtered gradient of packed rows straight in sparse form (CPU, fp32/fp64, contiguous
// logits [rows, n], int64 packed positives, -1 ignored): the row kernel's loss and the nonzero
// entries of its gradient filtered by grad_filter > 0, bit for bit, the dense gradient never
// formed. maxima [rows] (logits' dtype): each row's negatives' maximum, at least 0 (see
// update_negative_maxima). Per row it reads the logits once more for their terms, summed as the
// row kernel sums them, then only the few vectors where a term reaches the filter, recomputed
// through its rule; it never writes them. kNonFinite: a row needs the row kernel's exact path
// (a sum or a positive not finite); kTooDense: more than max_density() of the entries survive.
struct FilteredGrad {
  at::Tensor row_loss;
  std::optional<sparse_grad::SparseRows> grad;
  enum Status { kSparse, kNonFinite, kTooDense } status;
};
FilteredGrad filtered_sparse_grad(const at::Tensor& logits, const at::Tensor& positives,
                                  const at::Tensor& maxima, double grad_filter);

// maxima[r] = max(maxima[r], the largest of row r's logits in [begin, end) that is not at a
// positive): the row kernel's negatives' maximum taken block by block (exact in any grouping;
// maxima starts at 0, the row kernel's floor), each block while the GEMM's output of it is still
// in cache (CPU, fp32/fp64 contiguous logits, int64 packed positives).
void update_negative_maxima(const at::Tensor& logits, int64_t begin, int64_t end,
                            const at::Tensor& positives, const at::Tensor& maxima);

// Sets the spans i > j of a diagonal block [heads, rows, width >= rows] of packed logits to
// -inf (CPU; the same as masked_fill_ with the block's lower triangle, without the mask).
void fill_lower_triangles(const at::Tensor& block);

// Whether the filtered gradient can come straight from the CPU kernel in sparse form: fp32/fp64
// on CPU, operands with unit stride along D; not under KXOPS_SPARSE_GRAD_PORTABLE=1, where the
// CPU takes CUDA's route (the dense gradient, converted).
inline bool sparse_kernel_output(const at::Tensor& qa, const at::Tensor& ka, double grad_filter) {
  const auto type = qa.scalar_type();
  return grad_filter > 0 && qa.is_cpu() && (type == at::kFloat || type == at::kDouble) &&
         qa.stride(2) == 1 && ka.stride(2) == 1 && !sparse_grad::portable_on_cpu();
}

// Per batch: its packing, its valid steps (undefined without a mask) and its positives as
// packed ids.
struct Plan {
  Packing packing;
  at::Tensor idx, positives, lower;
  std::vector<sparse_grad::PackedBlock> blocks;
};

// The positives of one batch as packed ids: -1 ("ignored") for ignore_index, a masked span or
// i > j under tril; past the end for an out-of-range id.
inline at::Tensor packed_positives(const Packing& packing, const at::Tensor& pos,
                                   const at::Tensor& bad, const at::Tensor& compressed,
                                   int64_t length, int64_t ignore_index) {
  if (packing.valid == 0) return at::full_like(pos, -1).masked_fill_(bad, 0);  // no span at all
  const auto skip = pos.eq(ignore_index).logical_or_(bad);
  const auto safe = at::where(skip, 0, pos);
  const auto i = safe.div(length, "floor"), j = safe.remainder(length);
  at::Tensor ci = i, cj = j;
  if (compressed.defined()) {
    ci = compressed.index_select(0, i.flatten()).view_as(i);
    cj = compressed.index_select(0, j.flatten()).view_as(j);
  }
  auto keep = skip.logical_not().logical_and_(ci.ge(0)).logical_and_(cj.ge(0));
  if (packing.tril) keep.logical_and_(ci.le(cj));
  return at::where(keep, packing.packed_id(ci.clamp_min(0), cj.clamp_min(0)), -1)
      .masked_fill_(bad, packing.packed);
}

// Every batch's plan. The one host synchronisation is here: the buffer sizes depend on the
// counts of valid steps.
inline std::vector<Plan> make_plans(const at::Tensor& q, const at::Tensor& positives,
                                    const std::optional<at::Tensor>& mask, bool tril,
                                    int64_t ignore_index) {
  const int64_t batch = q.size(0), length = q.size(2);
  const auto bad = out_of_range(positives, ignore_index, length * length);
  // Each batch's valid steps in order (a stable sort puts the kept ones first), and each
  // step's compressed index (-1 at a padded step).
  at::Tensor order, compressed;
  std::vector<int64_t> valid(batch, length);
  if (mask.has_value()) {
    const auto keep = mask->ne(0);
    order = std::get<1>(keep.to(at::kByte).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
    compressed = at::where(keep, keep.cumsum(1, at::kLong) - 1, -1);
    const auto counts = keep.sum(1).cpu();
    std::copy_n(counts.const_data_ptr<int64_t>(), batch, valid.begin());
  }
  std::vector<Plan> plans;
  plans.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    Plan plan{Packing(valid[b], tril), at::Tensor(), at::Tensor(), at::Tensor(), {}};
    plan.blocks = packed_blocks(plan.packing);
    if (mask.has_value()) plan.idx = order[b].narrow(0, 0, valid[b]);
    if (tril && !q.is_cpu()) {  // the CPU fills the triangles without a mask
      const int64_t n = plan.packing.block_rows;
      plan.lower = at::ones({n, n}, q.options().dtype(at::kBool)).tril(-1);
    }
    plan.positives =
        packed_positives(plan.packing, positives[b], bad[b],
                         mask.has_value() ? compressed[b] : at::Tensor(), length, ignore_index);
    plans.push_back(std::move(plan));
  }
  return plans;
}

// The forward's outputs, filled chunk of heads by chunk of heads: gradients accumulate in fp32
// (fp64 for fp64 inputs) and are zero at padded steps; each chunk writes its own slices whole,
// on the thread that computed them. Only the gradients asked for (grad_mask: q, k, start_bias,
// end_bias; never a None bias's) are allocated.
struct Results {
  at::Tensor row_loss, grad_q, grad_k, grad_start, grad_end;
  // The gradients' factor for reduction "mean": 1 / rows, divided in the accumulation type (as
  // torch's mean divides) and applied there, before the one rounding to q's dtype.
  std::optional<at::Scalar> mean_scale;

  Results(const at::Tensor& q, c10::string_view reduction, std::array<bool, 4> grad_mask,
          bool has_start, bool has_end) {
    const auto acc = q.options().dtype(at::toOpMathType(q.scalar_type()));
    const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2);
    const int64_t rows = batch * heads;
    if (reduction == "mean" && rows > 0) {
      mean_scale = acc.dtype() == at::kDouble ? at::Scalar(1.0 / static_cast<double>(rows))
                                              : at::Scalar(1.0f / static_cast<float>(rows));
    }
    row_loss = at::zeros({batch, heads}, acc);
    if (grad_mask[0]) grad_q = at::empty(q.sizes(), acc);
    if (grad_mask[1]) grad_k = at::empty(q.sizes(), acc);
    if (grad_mask[2] && has_start) grad_start = at::empty({batch, heads, length}, acc);
    if (grad_mask[3] && has_end) grad_end = at::empty({batch, heads, length}, acc);
  }

  bool any_grad() const {
    return grad_q.defined() || grad_k.defined() || grad_start.defined() || grad_end.defined();
  }

  // The loss reduced by `reduction` (checked) and its gradients in q's dtype; distinct empty
  // tensors where not asked for (outputs must not alias).
  Outputs finish(const at::Tensor& q, c10::string_view reduction) const {
    auto out = [&](const at::Tensor& grad) {
      return grad.defined() ? grad.to(q.scalar_type()) : at::empty({0}, q.options());
    };
    return {zlpr::reduce_rows(row_loss, reduction), out(grad_q), out(grad_k), out(grad_start),
            out(grad_end)};
  }
};

// The work of heads [h0, h0 + hc) of batch b, the same on every device: the packed logits (one
// batched GEMM per block), the row kernel once, then the gradient products.
struct ChunkRunner {
  const at::Tensor &q, &k;
  const std::optional<at::Tensor>&start_bias, &end_bias;
  const std::vector<Plan>& plans;
  Results& results;
  bool tril;
  double grad_filter;
  // Set once a chunk's filtered gradient is too dense for the sparse form: the chunks after it
  // go straight to the dense route (a speed hint only: both routes give the same bits).
  std::atomic<bool> dense_seen{false};

  at::TensorOptions acc_options() const {
    return q.options().dtype(at::toOpMathType(q.scalar_type()));
  }

  // The augmented operands q~, k~ of the chunk's heads over the batch's valid steps.
  std::pair<at::Tensor, at::Tensor> operands(int64_t b, int64_t h0, int64_t hc) const {
    const bool has_start = start_bias.has_value(), has_end = end_bias.has_value();
    auto slice = [&](const at::Tensor& t) { return t[b].narrow(0, h0, hc); };
    const auto& idx = plans[b].idx;
    return {augmented(slice(q), idx, has_start ? slice(*start_bias) : at::Tensor(), true, has_start,
                      has_end),
            augmented(slice(k), idx, has_end ? slice(*end_bias) : at::Tensor(), false, has_start,
                      has_end)};
  }

  // The packed logits; where maxima is defined, each row's negatives' maxima too (see
  // update_negative_maxima).
  at::Tensor packed_logits(const Plan& plan, const at::Tensor& qa, const at::Tensor& ka,
                           const at::Tensor& positives, const at::Tensor& maxima) const {
    const int64_t hc = qa.size(0);
    auto logits = at::empty({hc, plan.packing.packed}, q.options());
    const auto neg_inf = at::Scalar(-std::numeric_limits<double>::infinity());
    for (const auto& blk : plan.packing.blocks) {
      auto out = logits.narrow(1, blk.offset, blk.rows * blk.width).view({hc, blk.rows, blk.width});
      gemm::mm_out(out, qa.narrow(1, blk.row0, blk.rows),
                   ka.narrow(1, blk.col0, blk.width).transpose(1, 2));
      if (tril && out.is_cpu()) {
        fill_lower_triangles(out);
      } else if (tril) {
        out.narrow(2, 0, blk.rows)
            .masked_fill_(plan.lower.narrow(0, 0, blk.rows).narrow(1, 0, blk.rows), neg_inf);
      }
      if (maxima.defined()) {
        update_negative_maxima(logits, blk.offset, blk.offset + blk.rows * blk.width, positives,
                               maxima);
      }
    }
    return logits;
  }

  // The gradients of q~ and k~ (the chunk's own buffers) into the outputs' slices of the
  // chunk's heads, times the mean's factor.
  void scatter(int64_t b, int64_t h0, const at::Tensor& grad_qa, const at::Tensor& grad_ka) {
    const int64_t dim = q.size(3), length = q.size(2);
    const auto& idx = plans[b].idx;
    auto put = [&](const at::Tensor& dst, const at::Tensor& src) {
      if (!dst.defined()) return;  // not asked for
      if (results.mean_scale.has_value()) src.mul_(*results.mean_scale);
      auto rows = dst[b].narrow(0, h0, src.size(0));
      if (!idx.defined()) return void(rows.copy_(src));
      if (idx.size(0) < length) rows.zero_();  // the padded steps
      rows.index_copy_(1, idx, src);
    };
    put(results.grad_q, grad_qa.narrow(2, 0, dim));
    put(results.grad_k, grad_ka.narrow(2, 0, dim));
    if (start_bias.has_value()) put(results.grad_start, grad_qa.select(2, dim));
    if (end_bias.has_value()) {
      put(results.grad_end, grad_ka.select(2, dim + (start_bias.has_value() ? 1 : 0)));
    }
  }

  // Whether a chunk may take the sparse route (it then gathers its rows' maxima with its GEMMs).
  bool sparse_route_open(const Plan& plan, const at::Tensor& qa, const at::Tensor& ka) const {
    return results.any_grad() && plan.packing.packed > 0 && !dense_seen.load() &&
           sparse_kernel_output(qa, ka, grad_filter);
  }

  // The filtered gradient straight from the CPU kernel in sparse form, its products taken from
  // there when every block is sparse enough (as the dense route would find them). False (and
  // nothing written) otherwise: the caller takes the dense route. maxima: the rows' negatives'
  // maxima where sparse_route_open, else undefined.
  bool sparse_route(int64_t b, int64_t h0, at::Tensor& logits, const at::Tensor& positives,
                    const at::Tensor& maxima, const at::Tensor& qa, const at::Tensor& ka) {
    const auto& plan = plans[b];
    if (!maxima.defined()) return false;
    auto [loss, sparse, status] = filtered_sparse_grad(logits, positives, maxima, grad_filter);
    if (status == FilteredGrad::kNonFinite) {
      std::tie(loss, sparse) =
          sparse_grad::sparse_zlpr_with_sparse_grad(logits, positives, -1, grad_filter);
    }
    if (!sparse.has_value() || !sparse_grad::blocks_sparse_enough(*sparse, plan.blocks)) {
      if (!sparse.has_value()) dense_seen.store(true);
      return false;
    }
    results.row_loss[b].narrow(0, h0, qa.size(0)).copy_(loss);
    logits.reset();
    auto grad_qa = at::zeros(qa.sizes(), acc_options());
    auto grad_ka = at::zeros(ka.sizes(), acc_options());
    sparse_grad::packed_products(*sparse, plan.blocks, ka, qa, grad_qa, grad_ka);
    scatter(b, h0, grad_qa, grad_ka);
    return true;
  }

  // The gradient products block by block: every span of row i lies in i's block, so grad q~
  // is written once per block and grad k~ gathers every block that reaches its columns.
  // Filtered, a block whose every head is sparse enough takes the sparse products: on the CPU
  // head by head (sparse_head_products), elsewhere (and under KXOPS_SPARSE_GRAD_PORTABLE=1) the
  // whole chunk's at once (sparse_grad::PackedSparse, one device sync), grad q~ first and
  // grad k~ run by run in block order, so the same bits. fp16/bf16 products go through a
  // temporary into the fp32 accumulators.
  void dense_products(const Plan& plan, const at::Tensor& grad, const at::Tensor& qa,
                      const at::Tensor& ka, const at::Tensor& grad_qa,
                      const at::Tensor& grad_ka) const {
    const int64_t hc = qa.size(0);
    const bool full_precision = at::toOpMathType(q.scalar_type()) == q.scalar_type();
    const bool by_head = grad_filter > 0 && grad.is_cpu() && !sparse_grad::portable_on_cpu();
    std::optional<sparse_grad::PackedSparse> packed;
    if (grad_filter > 0 && !by_head) {
      packed = sparse_grad::portable_packed_sparse(grad, plan.blocks, qa.size(1),
                                                   {qa[0], ka[0], grad_qa[0], grad_ka[0]});
    }
    if (packed.has_value()) sparse_grad::packed_rows_product(*packed, ka, grad_qa);
    int64_t runs_done = 0;
    for (size_t t = 0; t < plan.packing.blocks.size(); ++t) {
      const auto& blk = plan.packing.blocks[t];
      if (packed.has_value() && packed->run[t] >= 0) {
        if (packed->run[t] == runs_done) {
          sparse_grad::packed_cols_product(*packed, runs_done++, qa, grad_ka);
        }
        continue;
      }
      const auto g =
          grad.narrow(1, blk.offset, blk.rows * blk.width).view({hc, blk.rows, blk.width});
      const auto q_rows = qa.narrow(1, blk.row0, blk.rows);
      const auto k_cols = ka.narrow(1, blk.col0, blk.width);
      auto grad_rows = grad_qa.narrow(1, blk.row0, blk.rows);
      auto grad_cols = grad_ka.narrow(1, blk.col0, blk.width);
      if (by_head && sparse_head_products(g, k_cols, q_rows, grad_rows, grad_cols)) continue;
      if (full_precision) {
        gemm::mm_out(grad_rows, g, k_cols);
        gemm::addmm_(grad_cols, g.transpose(1, 2), q_rows);
      } else {
        grad_rows.copy_(at::bmm(g, k_cols));
        grad_cols.add_(at::bmm(g.transpose(1, 2), q_rows));
      }
    }
  }

  void operator()(int64_t b, int64_t h0, int64_t hc) {
    const auto& plan = plans[b];
    const auto [qa, ka] = operands(b, h0, hc);
    const auto positives = plan.positives.narrow(0, h0, hc);
    const auto maxima =
        sparse_route_open(plan, qa, ka) ? at::zeros({hc}, q.options()) : at::Tensor();
    auto logits = packed_logits(plan, qa, ka, positives, maxima);
    if (sparse_route(b, h0, logits, positives, maxima, qa, ka)) return;
    const bool compute_grad = results.any_grad();
    auto [loss, grad] =
        zlpr::sparse_zlpr_rows_over_logits(logits, positives, -1, compute_grad, grad_filter);
    results.row_loss[b].narrow(0, h0, hc).copy_(loss);
    if (!compute_grad) return;
    logits.reset();
    auto grad_qa = at::empty(qa.sizes(), acc_options());
    auto grad_ka = at::zeros(ka.sizes(), acc_options());
    dense_products(plan, grad, qa, ka, grad_qa, grad_ka);
    scatter(b, h0, grad_qa, grad_ka);
  }
};

// Runs every (batch, head) row in chunks of heads whose packed logits and gradient fit the
// byte budget. A multi-thread CPU splits the rows among its threads, each running chunks
// single-threaded within its share of the budget: one parallel region per call instead of one
// per GEMM, which on a busy CPU each wait for a time slice.
inline void schedule(ChunkRunner& run, int64_t budget) {
  const auto& q = run.q;
  const int64_t batch = q.size(0), heads = q.size(1), rows = batch * heads;
  auto heads_within = [&](int64_t b, int64_t bytes) {
    const int64_t row_bytes = std::max<int64_t>(
        1, run.plans[b].packing.packed * q.element_size() * (run.results.any_grad() ? 2 : 1));
    return std::clamp<int64_t>(bytes / row_bytes, 1, heads);
  };
  const int64_t threads = q.is_cpu() ? at::get_num_threads() : 1;
  if (threads <= 1 || rows < threads) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t chunk = heads_within(b, budget);
      for (int64_t h0 = 0; h0 < heads; h0 += chunk) run(b, h0, std::min(chunk, heads - h0));
    }
    return;
  }
  // Each thread's share cut into calls of a few heads of one batch, as a static split gives
  // them: an equal share of every batch's heads where there are enough heads (the batches'
  // valid lengths, and so their work, differ), else an equal run of the rows (as
  // at::parallel_for cuts [0, rows)).
  std::vector<std::array<int64_t, 3>> calls;  // (b, h0, hc)
  auto add_rows = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t b = row / heads, h0 = row % heads;
      const int64_t hc = std::min({heads_within(b, budget / threads), heads - h0, end - row});
      calls.push_back({b, h0, hc});
      row += hc;
    }
  };
  const int64_t share = (rows + threads - 1) / threads;
  for (int64_t t = 0; t < threads; ++t) {
    if (heads < threads) {
      add_rows(std::min(rows, t * share), std::min(rows, (t + 1) * share));
      continue;
    }
    for (int64_t b = 0; b < batch; ++b) {
      add_rows(b * heads + heads * t / threads, b * heads + heads * (t + 1) / threads);
    }
  }
  // The threads take the calls in turn from a shared counter: one the OS delays (a busy CPU)
  // leaves its calls to the others. Each call's work is the same whichever thread runs it.
  std::atomic<size_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (size_t i = next++; i < calls.size(); i = next++) {
      run(calls[i][0], calls[i][1], calls[i][2]);
    }
  });
}

// kxops::global_pointer_zlpr: the loss reduced by `reduction` over the (batch, head) rows and
// the gradients of that loss (for "none", of the rows' sum) asked for by grad_mask.
inline Outputs forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positives,
                       const std::optional<at::Tensor>& mask,
                       const std::optional<at::Tensor>& start_bias,
                       const std::optional<at::Tensor>& end_bias, bool tril, int64_t ignore_index,
                       c10::string_view reduction, const c10::List<bool>& grad_mask,
                       std::optional<int64_t> block_bytes, double grad_filter) {
  check_arguments(q, k, positives, mask, start_bias, end_bias, reduction, block_bytes, grad_filter);
  const c10::OptionalDeviceGuard guard(q.device());
  const auto wanted =
      check_grad_mask<4>("global_pointer_zlpr", grad_mask, "q, k, start_bias, end_bias");
  Results results(q, reduction, wanted, start_bias.has_value(), end_bias.has_value());
  if (q.size(0) * q.size(1) > 0) {
    const auto plans = make_plans(q, positives.to(at::kLong), mask, tril, ignore_index);
    ChunkRunner run{q, k, start_bias, end_bias, plans, results, tril, grad_filter};
    schedule(run, byte_budget(block_bytes, q));
  }
  return results.finish(q, reduction);
}

// Both devices register the same checked driver (the device's own kernels are reached through
// the dispatcher: the GEMMs and kxops::sparse_zlpr's row kernel).
inline void register_ops(torch::Library& m) { m.impl("global_pointer_zlpr", &forward); }

}  // namespace kxops::global_pointer_zlpr
