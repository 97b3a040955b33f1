// Host side of kxops::gated_conv(_backward), shared by CPU and CUDA. The k-tap dilated
// convolution is k GEMMs over shifted row ranges of one "gapped" copy of x*m (no im2col):
//   [pad zero rows][x_0: T rows][pad zero rows][x_1] ... [x_{B-1}][pad zero rows][pad spare]
// so that output row q = b*(T+pad) + t reads input row q + j*dilation for tap j: for every
// output row at once, tap j's input is one contiguous row slice, and each tap is one plain 2-D
// GEMM over all output rows (gemm.h routes it to the CPU's faster engine). The forward writes z
// [B, T + pad, 2 out] in the same layout (its gap rows hold products the epilogues never read;
// z is kept for backward); the backward writes dz so too, with zero gap rows, so that the
// weight gradient of tap j is one GEMM over all rows and the input gradient k GEMMs added into
// shifted slices. The 1x1 projection is one more GEMM, and everything elementwise is one fused
// epilogue kernel per direction, supplied by the device file as Epilogue::forward / ::backward.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "checks.h"
#include "gated_conv_math.h"
#include "gemm.h"

namespace kxops::gated_conv {

struct EpilogueArgs {
  at::Tensor z;     // [B, T + gap, 2 out] conv output (bias included), contiguous
  at::Tensor r;     // [B, T, out] residual branch (x or its projection); undefined if !residual
  at::Tensor mask;  // [B, T] in x's dtype; undefined: all ones
  at::Tensor keep;  // [B, T, out] bool gate-dropout keep mask; undefined: no dropout
  double keep_scale;
  bool residual;
  int64_t rows, out;  // rows = B * T
  int64_t time, gap;  // z's (and dz's) row of row b * T + t is gapped_row(row, time, gap)
};

// The ops are public (torch.ops.kxops.*), so every argument is checked here before any memory
// is touched, with the shared checks of checks.h and in the words and error types of
// kxops/_checks.py (its gated_conv section), in the same order; `op` is the registered op's
// name, gated_conv or gated_conv_backward.

inline void check_x_and_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  check_kernel_float(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 3, "kxops.", op, ": x must be [batch, time, channels], got shape ",
                    py(x.sizes()));
  check_like(op, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.dim() == 3, "kxops.", op,
                    ": weight must be [2*out_channels, in_channels, kernel_size] (the nn.Conv1d "
                    "layout), got shape ",
                    py(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(1) == x.size(2), "kxops.", op, ": channel mismatch: x has ",
                    x.size(2), " channels but weight expects ", weight.size(1), " (weight shape ",
                    py(weight.sizes()), ")");
  const int64_t two_out = weight.size(0);
  TORCH_CHECK_VALUE(two_out > 0 && two_out % 2 == 0, "kxops.", op,
                    ": weight.shape[0] must be 2*out_channels (value and gate halves), got ",
                    two_out);
  TORCH_CHECK_VALUE(weight.size(2) % 2 == 1, "kxops.", op,
                    ": kernel_size must be odd for a 'same' convolution, got ", weight.size(2));
}

// An optional operand of x's dtype and device, of the given shape.
inline void check_optional_like_x(const char* op, const char* name,
                                  const std::optional<at::Tensor>& t, const at::Tensor& x,
                                  at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_like(op, name, *t, "x", x);
  check_shape(op, name, *t, shape);
}

inline void check_mask_and_keep(const char* op, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& gate_keep, const at::Tensor& x,
                                int64_t out) {
  const int64_t batch = x.size(0), time = x.size(1);
  if (mask.has_value()) {
    check_like(op, "mask", *mask, "x", x);
    TORCH_CHECK_VALUE(mask->sizes() == x.sizes().slice(0, 2), "kxops.", op,
                      ": mask must be [batch, time] = ", py({batch, time}), ", got ",
                      py(mask->sizes()));
  }
  if (gate_keep.has_value()) {
    check_tensor(op, "gate_keep", *gate_keep);
    check_same_device(op, "gate_keep", *gate_keep, "x", x);
    TORCH_CHECK_TYPE(gate_keep->scalar_type() == at::kBool, "kxops.", op,
                     ": gate_keep must be a bool tensor, got ", py(gate_keep->scalar_type()));
    TORCH_CHECK_VALUE(gate_keep->sizes() == at::IntArrayRef({batch, time, out}), "kxops.", op,
                      ": gate_keep must be [batch, time, out_channels] = ", py({batch, time, out}),
                      ", got ", py(gate_keep->sizes()));
  }
}

inline void check_residual(const char* op, const std::optional<at::Tensor>& residual_weight,
                           const std::optional<at::Tensor>& residual_bias, bool residual,
                           const at::Tensor& x, int64_t out) {
  const int64_t in = x.size(2);
  if (residual_weight.has_value()) {
    TORCH_CHECK_VALUE(residual, "kxops.", op,
                      ": residual_weight is given but residual=False: the projection belongs to "
                      "the residual branch (drop it, or set residual=True)");
  } else {
    TORCH_CHECK_VALUE(!residual_bias.has_value(), "kxops.", op,
                      ": residual_bias needs residual_weight (the 1x1 projection)");
    TORCH_CHECK_VALUE(!residual || out == in, "kxops.", op,
                      ": residual=True with out_channels=", out, " != in_channels=", in,
                      " needs residual_weight [out_channels, in_channels, 1] (a 1x1 projection "
                      "of x)");
  }
  check_optional_like_x(op, "residual_weight", residual_weight, x, {out, in, 1});
  check_optional_like_x(op, "residual_bias", residual_bias, x, {out});
}

// The arguments both ops share (the backward has no bias: std::nullopt).
inline void check_arguments(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& mask,
                            const std::optional<at::Tensor>& gate_keep,
                            const std::optional<at::Tensor>& residual_weight,
                            const std::optional<at::Tensor>& residual_bias, int64_t dilation,
                            double drop_gate, bool residual) {
  check_x_and_weight(op, x, weight);
  TORCH_CHECK_VALUE(dilation >= 1, "kxops.", op, ": dilation must be an int >= 1, got ", dilation);
  TORCH_CHECK_VALUE(drop_gate >= 0.0 && drop_gate <= 1.0, "kxops.", op,
                    ": drop_gate must be in [0, 1], got ", drop_gate);
  const int64_t out = weight.size(0) / 2;
  check_optional_like_x(op, "bias", bias, x, {2 * out});
  check_mask_and_keep(op, mask, gate_keep, x, out);
  check_residual(op, residual_weight, residual_bias, residual, x, out);
}

// The backward's own arguments: the upstream gradient [B, T, out] and the forward's z
// [B, T + gap, 2 out] (gap: Gapped::pad).
inline void check_backward_arguments(const at::Tensor& grad_y, const at::Tensor& x,
                                     const at::Tensor& z, const at::Tensor& weight, int64_t gap) {
  constexpr const char* op = "gated_conv_backward";
  const int64_t batch = x.size(0), time = x.size(1), two_out = weight.size(0);
  check_like(op, "grad_y", grad_y, "x", x);
  check_shape(op, "grad_y", grad_y, {batch, time, two_out / 2});
  check_like(op, "z", z, "x", x);
  check_shape(op, "z", z, {batch, time + gap, two_out});
}

// The row arithmetic of the gapped layout. Only the taps that can reach a real step are
// applied: a tap with |j - k/2| * dilation >= T reads padding alone (its weight gradient is
// zero), so any dilation costs at most about twice the memory of x. kxops/gated_conv.py
// repeats the gap (pad) for z's shape in the fake kernels.
struct Gapped {
  int64_t batch, time, dilation, first, taps, pad;  // taps [first, first + taps) of the k
  Gapped(const at::Tensor& x, const at::Tensor& weight, int64_t dilation)
      : batch(x.size(0)), time(x.size(1)), dilation(dilation) {
    const int64_t half = weight.size(2) / 2;
    const int64_t reach = time > 0 ? std::min(half, (time - 1) / dilation) : 0;
    first = half - reach;
    taps = 2 * reach + 1;
    pad = reach * dilation;  // < time: no overflow
  }
  // Output rows q = b * (T + pad) + t: one per row of z.
  int64_t out_rows() const { return batch * (time + pad); }
  // Input rows: the leading pad, then the output rows shifted by pad, then the spare pad that
  // the last output rows' taps may read.
  int64_t in_rows() const { return out_rows() + 2 * pad; }
  // Input rows read by tap j for all output rows.
  at::Tensor tap(const at::Tensor& gapped, int64_t j) const {
    return gapped.narrow(0, j * dilation, out_rows());
  }
  // The same rows as [B, T + pad, C] sequences, each followed by its gap...
  at::Tensor tap_with_gaps(const at::Tensor& gapped, int64_t j) const {
    return tap(gapped, j).view({batch, time + pad, gapped.size(1)});
  }
  // ... and as [B, T, C] sequences without the gaps.
  at::Tensor tap_sequences(const at::Tensor& gapped, int64_t j) const {
    return tap_with_gaps(gapped, j).narrow(1, 0, time);
  }
  int64_t centre() const { return taps / 2; }  // reads each real row itself
  // Zeroes every row of a gapped buffer that is not a real row.
  void zero_gaps(const at::Tensor& gapped) const {
    gapped.narrow(0, 0, pad).zero_();
    tap_with_gaps(gapped, centre()).narrow(1, time, pad).zero_();
    gapped.narrow(0, pad + out_rows(), pad).zero_();
  }
  // x * m in the gapped layout.
  at::Tensor input(const at::Tensor& x, const std::optional<at::Tensor>& mask) const {
    auto gapped = x.new_empty({in_rows(), x.size(2)});
    zero_gaps(gapped);
    auto real = tap_sequences(gapped, centre());
    if (mask.has_value()) {
      at::mul_out(real, x, mask->unsqueeze(-1));
    } else {
      real.copy_(x);
    }
    return gapped;
  }
};

// The applied taps of weight [2 out, in, k] as [taps, 2 out, in]: one contiguous matrix each.
inline at::Tensor taps_first(const at::Tensor& weight, const Gapped& geometry) {
  return weight.narrow(2, geometry.first, geometry.taps).permute({2, 0, 1}).contiguous();
}

// x [B, T, C] (contiguous) as rows [B T, C]; explicit: a view of -1 rows fails for 0 channels.
inline at::Tensor as_rows(const at::Tensor& t) {
  return t.view({t.size(0) * t.size(1), t.size(2)});
}

// The residual branch r: x itself or its 1x1 projection (one GEMM); undefined without it.
inline at::Tensor residual_branch(const at::Tensor& x,
                                  const std::optional<at::Tensor>& residual_weight,
                                  const std::optional<at::Tensor>& residual_bias, bool residual) {
  if (!residual) return at::Tensor();
  if (!residual_weight.has_value()) return x;
  const auto projection = residual_weight->squeeze(-1).t();
  const auto r = residual_bias.has_value() ? gemm::addmm(*residual_bias, as_rows(x), projection)
                                           : gemm::mm(as_rows(x), projection);
  return r.view({x.size(0), x.size(1), r.size(1)});
}

// The epilogue's arguments, packed (dense) from checked inputs and the residual branch.
inline EpilogueArgs epilogue_args(const at::Tensor& z, at::Tensor r, const Gapped& geometry,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& keep, double drop_gate,
                                  bool residual) {
  EpilogueArgs args;
  args.z = z.contiguous();
  args.r = std::move(r);
  if (mask.has_value()) args.mask = mask->contiguous();
  if (keep.has_value()) args.keep = keep->contiguous();
  // A kept unit's gate is scaled by 1 / (1 - p); p = 1 keeps none.
  args.keep_scale = keep.has_value() ? (drop_gate >= 1.0 ? 0.0 : 1.0 / (1.0 - drop_gate)) : 1.0;
  args.residual = residual;
  args.rows = geometry.batch * geometry.time;
  args.out = z.size(2) / 2;
  args.time = geometry.time;
  args.gap = geometry.pad;
  return args;
}

// z = conv(x * m) + bias [B, T + pad, 2 out] in the gapped layout: one GEMM per applied tap
// over all output rows, its input rows shifted.
inline at::Tensor conv_forward(const at::Tensor& x_gapped, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const Gapped& geometry) {
  const auto w = taps_first(weight, geometry);
  auto z = x_gapped.new_empty({geometry.batch, geometry.time + geometry.pad, weight.size(0)});
  auto z_rows = z.view({geometry.out_rows(), weight.size(0)});
  for (int64_t j = 0; j < geometry.taps; ++j) {
    const auto tap_input = geometry.tap(x_gapped, j);
    if (j > 0) {
      gemm::addmm_(z_rows, tap_input, w[j].t());
    } else if (bias.has_value()) {
      gemm::addmm_out(z_rows, *bias, tap_input, w[j].t());
    } else {
      gemm::mm_out(z_rows, tap_input, w[j].t());
    }
  }
  return z;
}

template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor> gated_conv_forward(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate_keep,
    const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias, int64_t dilation, double drop_gate,
    bool residual) {
  // The ops run in the dtypes they are given, whatever autocast the caller holds (the wrapper
  // has applied it already); see gemm::NoAutocast.
  const gemm::NoAutocast no_autocast;
  check_arguments("gated_conv", x_in, weight, bias, mask, gate_keep, residual_weight, residual_bias,
                  dilation, drop_gate, residual);
  const auto x = x_in.contiguous();
  const Gapped geometry(x, weight, dilation);
  const auto z = conv_forward(geometry.input(x, mask), weight, bias, geometry);
  const auto args = epilogue_args(z, residual_branch(x, residual_weight, residual_bias, residual),
                                  geometry, mask, gate_keep, drop_gate, residual);
  auto y = at::empty({x.size(0), x.size(1), args.out}, x.options());
  Epilogue::forward(args, y);
  return {y, z};
}

// The epilogue's gradients: dz in the gapped layout with zero gap rows (so that the GEMMs of
// the convolution's backward may run over all rows), and dr when with_dr (undefined otherwise).
template <typename Epilogue>
std::pair<at::Tensor, at::Tensor> gate_grads(const EpilogueArgs& args, const at::Tensor& grad_y,
                                             const Gapped& geometry, bool with_dr) {
  auto dz = grad_y.new_empty({geometry.batch, geometry.time + geometry.pad, 2 * args.out});
  dz.narrow(1, geometry.time, geometry.pad).zero_();
  at::Tensor dr =
      with_dr ? grad_y.new_empty({geometry.batch, geometry.time, args.out}) : at::Tensor();
  Epilogue::backward(args, grad_y.contiguous(), dz, dr);
  return {dz.view({geometry.out_rows(), 2 * args.out}), dr};
}

// Tap j's weight gradient is dz^T (the input rows of tap j): one GEMM per applied tap; the
// taps that are not applied get zero. Returns [2 out, in, k].
inline at::Tensor conv_weight_grad(const at::Tensor& dz_rows, const at::Tensor& x_gapped,
                                   const at::Tensor& weight, const Gapped& geometry) {
  auto grad_w = weight.new_empty({weight.size(2), weight.size(0), weight.size(1)});
  grad_w.narrow(0, 0, geometry.first).zero_();
  grad_w.narrow(0, geometry.first + geometry.taps, geometry.first).zero_();
  for (int64_t j = 0; j < geometry.taps; ++j) {
    auto grad_w_tap = grad_w[geometry.first + j];
    gemm::mm_out(grad_w_tap, dz_rows.t(), geometry.tap(x_gapped, j));
  }
  return grad_w.permute({1, 2, 0}).contiguous();
}

// The gradient of the convolution's input x * m, gapped: tap j adds dz w_j into its input rows.
// The centre tap covers every real row, so it initialises them.
inline at::Tensor conv_input_grad(const at::Tensor& dz_rows, const at::Tensor& weight,
                                  const Gapped& geometry) {
  const auto w = taps_first(weight, geometry);
  auto grad_gapped = dz_rows.new_empty({geometry.in_rows(), weight.size(1)});
  geometry.zero_gaps(grad_gapped);
  const int64_t centre = geometry.centre();
  auto grad_centre = geometry.tap(grad_gapped, centre);
  gemm::mm_out(grad_centre, dz_rows, w[centre]);
  for (int64_t j = 0; j < geometry.taps; ++j) {
    if (j == centre) continue;
    auto grad_tap = geometry.tap(grad_gapped, j);
    gemm::addmm_(grad_tap, dz_rows, w[j]);
  }
  return grad_gapped;
}

// A fresh empty tensor for each gradient that is not computed: the op's outputs must not alias
// one another (its schema says they are all new tensors; opcheck's test_schema).
inline at::Tensor no_grad_for(const at::Tensor& weight) { return weight.new_empty({0}); }

// Which gradients the backward computes: those asked for (grad_mask: x, weight, bias,
// residual_weight, residual_bias) of inputs that were given.
struct Wanted {
  bool x, weight, bias, residual_weight, residual_bias;
  Wanted(std::array<bool, 5> grad_mask, const std::optional<at::Tensor>& residual_weight_in,
         const std::optional<at::Tensor>& residual_bias_in)
      : x(grad_mask[0]),
        weight(grad_mask[1]),
        bias(grad_mask[2]),
        residual_weight(grad_mask[3] && residual_weight_in.has_value()),
        residual_bias(grad_mask[4] && residual_bias_in.has_value()) {}
  // dr, the residual branch's gradient, feeds x's and the projection's gradients.
  bool dr(bool residual) const { return residual && (x || residual_weight || residual_bias); }
};

// The residual branch's gradients (x's, the projection's weight and bias) from dr, each
// computed when wanted; x's is undefined without the residual (or when not wanted), the
// projection's empty without a projection (or when not wanted).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_grads(
    const at::Tensor& dr, const at::Tensor& x, const std::optional<at::Tensor>& residual_weight,
    const Wanted& wanted, const at::Tensor& weight) {
  if (!residual_weight.has_value() || !dr.defined()) {  // dr: x itself, or not computed
    return {wanted.x ? dr : at::Tensor(), no_grad_for(weight), no_grad_for(weight)};
  }
  const auto dr_rows = as_rows(dr);
  return {wanted.x ? gemm::mm(dr_rows, residual_weight->squeeze(-1)).view(x.sizes()) : at::Tensor(),
          wanted.residual_weight ? gemm::mm(dr_rows.t(), as_rows(x)).unsqueeze(-1)
                                 : no_grad_for(weight),
          wanted.residual_bias ? dr_rows.sum(0) : no_grad_for(weight)};
}

// grad_x = (the residual branch's gradient) + d(conv input) * m, the second term added in
// place into the first (a fresh tensor) in one pass.
inline at::Tensor input_grad(at::Tensor grad_residual, const at::Tensor& grad_conv_input,
                             const std::optional<at::Tensor>& mask) {
  if (!grad_residual.defined()) {
    return mask.has_value() ? grad_conv_input * mask->unsqueeze(-1) : grad_conv_input.contiguous();
  }
  if (mask.has_value()) {
    grad_residual.addcmul_(grad_conv_input, mask->unsqueeze(-1));
  } else {
    grad_residual.add_(grad_conv_input);
  }
  return grad_residual.contiguous();
}

template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& z, const at::Tensor& weight,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate_keep,
    const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias, const c10::List<bool>& grad_mask,
    int64_t dilation, double drop_gate, bool residual) {
  // A backward run inside an autocast region multiplies and sums (CUDA autocast runs sum in
  // fp32) in the forward's dtypes, as autograd expects of the gradients.
  const gemm::NoAutocast no_autocast;
  check_arguments("gated_conv_backward", x_in, weight, std::nullopt, mask, gate_keep,
                  residual_weight, residual_bias, dilation, drop_gate, residual);
  const Gapped geometry(x_in, weight, dilation);
  check_backward_arguments(grad_y, x_in, z, weight, geometry.pad);
  const Wanted wanted(check_grad_mask<5>("gated_conv_backward", grad_mask,
                                         "x, weight, bias, residual_weight, residual_bias"),
                      residual_weight, residual_bias);
  const auto x = x_in.contiguous();
  const auto args = epilogue_args(z, residual_branch(x, residual_weight, residual_bias, residual),
                                  geometry, mask, gate_keep, drop_gate, residual);
  const auto [dz_rows, dr] = gate_grads<Epilogue>(args, grad_y, geometry, wanted.dr(residual));
  // x * m is rebuilt, not saved: the forward keeps x itself (the residual needs it unmasked,
  // and a soft mask cannot be divided back out), and x * m costs one pass.
  const auto grad_w = wanted.weight
                          ? conv_weight_grad(dz_rows, geometry.input(x, mask), weight, geometry)
                          : no_grad_for(weight);
  auto [grad_residual, grad_rw, grad_rb] = residual_grads(dr, x, residual_weight, wanted, weight);
  const auto grad_x =
      wanted.x ? input_grad(std::move(grad_residual),
                            geometry.tap_sequences(conv_input_grad(dz_rows, weight, geometry),
                                                   geometry.centre()),
                            mask)
               : no_grad_for(weight);
  return {grad_x, grad_w, wanted.bias ? dz_rows.sum(0) : no_grad_for(weight), grad_rw, grad_rb};
}

// Registers both ops' checked host drivers with the device's fused epilogues (Epilogue::forward
// and ::backward); each device file calls it once.
template <typename Epilogue>
void register_ops(torch::Library& m) {
  m.impl("gated_conv", &gated_conv_forward<Epilogue>);
  m.impl("gated_conv_backward", &gated_conv_backward<Epilogue>);
}

}  // namespace kxops::gated_conv
