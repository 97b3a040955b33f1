// Host side of kxops::gated_conv(_backward), shared by CPU and CUDA: the convolution runs on the
// channels-last view of [B, T, C] (no layout copies) through at::convolution (oneDNN / cuDNN),
// the 1x1 projection through a GEMM, and everything elementwise in one fused epilogue kernel
// per direction, supplied by the device file as Epilogue::forward / Epilogue::backward.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace kxops::gated_conv {

struct EpilogueArgs {
  at::Tensor z;     // [B, T, 2 out] conv output (bias included), contiguous
  at::Tensor r;     // [B, T, out] residual branch (x or its projection); undefined if !residual
  at::Tensor mask;  // [B, T] in x's dtype; undefined: all ones
  at::Tensor keep;  // [B, T, out] bool gate-dropout keep mask; undefined: no dropout
  double keep_scale;
  bool residual;
  int64_t rows, out;
};

inline void check_inputs(const at::Tensor& x, const at::Tensor& weight, int64_t dilation) {
  TORCH_CHECK(x.dim() == 3, "kxops gated_conv: x must be [batch, time, channels], got ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) % 2 == 0 && weight.size(1) == x.size(2),
              "kxops gated_conv: weight must be [2*out, in=", x.size(2), ", k], got ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1, "kxops gated_conv: kernel size must be odd, got ",
              weight.size(2));
  TORCH_CHECK(dilation >= 1, "kxops gated_conv: dilation must be >= 1, got ", dilation);
}

inline at::IntArrayRef::value_type same_padding(const at::Tensor& weight, int64_t dilation) {
  return dilation * (weight.size(2) - 1) / 2;
}

// [B, T, C] -> the [B, C, 1, T] channels-last view a 2-D convolution takes, and back.
inline at::Tensor as_conv_input(const at::Tensor& t) { return t.transpose(1, 2).unsqueeze(2); }
inline at::Tensor from_conv_output(const at::Tensor& t) { return t.squeeze(2).transpose(1, 2); }

inline at::Tensor masked(const at::Tensor& x, const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? x * mask->unsqueeze(-1) : x;
}

inline EpilogueArgs epilogue_args(const at::Tensor& x, at::Tensor z,
                                  const std::optional<at::Tensor>& mask,
                                  const std::optional<at::Tensor>& keep,
                                  const std::optional<at::Tensor>& residual_weight,
                                  const std::optional<at::Tensor>& residual_bias,
                                  double drop_gate, bool residual) {
  EpilogueArgs args;
  args.out = z.size(2) / 2;
  args.rows = x.size(0) * x.size(1);
  args.z = std::move(z);
  if (residual) {
    args.r = residual_weight.has_value()
                 ? at::linear(x, residual_weight->squeeze(-1), residual_bias).contiguous()
                 : x;
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == x.sizes().slice(0, 2) && mask->scalar_type() == x.scalar_type(),
                "kxops gated_conv: mask must be [batch, time] in x's dtype");
    args.mask = mask->contiguous();
  }
  if (keep.has_value()) {
    TORCH_CHECK(keep->scalar_type() == at::kBool && keep->dim() == 3 &&
                    keep->size(2) == args.out && keep->size(0) == x.size(0) &&
                    keep->size(1) == x.size(1),
                "kxops gated_conv: gate_keep must be a bool [batch, time, out] mask");
    args.keep = keep->contiguous();
  }
  args.keep_scale = keep.has_value() ? (drop_gate >= 1.0 ? 0.0 : 1.0 / (1.0 - drop_gate)) : 1.0;
  args.residual = residual;
  return args;
}

template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor> gated_conv_forward(
    const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& gate_keep,
    const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias, int64_t dilation, double drop_gate,
    bool residual) {
  check_inputs(x_in, weight, dilation);
  const auto x = x_in.contiguous();
  const int64_t pad = same_padding(weight, dilation);
  auto z = from_conv_output(at::convolution(as_conv_input(masked(x, mask)), weight.unsqueeze(2),
                                            bias, {1, 1}, {0, pad}, {1, dilation}, false,
                                            {0, 0}, 1))
               .contiguous();
  auto args = epilogue_args(x, z, mask, gate_keep, residual_weight, residual_bias, drop_gate,
                            residual);
  auto y = at::empty({x.size(0), x.size(1), args.out}, x.options());
  Epilogue::forward(args, y);
  return {y, z};
}

template <typename Epilogue>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_conv_backward(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& z,
    const at::Tensor& weight, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& gate_keep, const std::optional<at::Tensor>& residual_weight,
    const std::optional<at::Tensor>& residual_bias, bool has_bias, int64_t dilation,
    double drop_gate, bool residual) {
  check_inputs(x_in, weight, dilation);
  const auto x = x_in.contiguous();
  auto args = epilogue_args(x, z.contiguous(), mask, gate_keep, residual_weight, residual_bias,
                            drop_gate, residual);
  auto dz = at::empty_like(args.z);
  at::Tensor dr = residual ? at::empty({x.size(0), x.size(1), args.out}, x.options())
                           : at::Tensor();
  Epilogue::backward(args, grad_y.contiguous(), dz, dr);

  const int64_t pad = same_padding(weight, dilation);
  const std::optional<at::IntArrayRef> bias_sizes =
      has_bias ? std::optional<at::IntArrayRef>(weight.sizes().slice(0, 1)) : std::nullopt;
  auto [grad_input, grad_weight, grad_bias] = at::convolution_backward(
      as_conv_input(dz), as_conv_input(masked(x, mask)), weight.unsqueeze(2), bias_sizes,
      {1, 1}, {0, pad}, {1, dilation}, false, {0, 0}, 1, {true, true, has_bias});
  const auto empty = weight.new_empty({0});
  at::Tensor grad_rw = empty, grad_rb = empty;
  // grad_x = (residual branch's gradient) + d(conv input) * m, the second term added in place
  // into the first (a fresh tensor) in one pass.
  at::Tensor grad_x;
  if (residual_weight.has_value()) {
    if (residual) {
      const auto dr_rows = dr.view({args.rows, args.out});
      grad_x = at::matmul(dr, residual_weight->squeeze(-1));
      grad_rw = at::mm(dr_rows.t(), x.view({args.rows, x.size(2)})).unsqueeze(-1);
      if (residual_bias.has_value()) grad_rb = dr_rows.sum(0);
    } else {  // the projection is unused without the residual branch
      grad_rw = at::zeros_like(*residual_weight);
      if (residual_bias.has_value()) grad_rb = at::zeros_like(*residual_bias);
    }
  } else if (residual) {
    grad_x = dr;
  }
  const auto grad_conv_input = from_conv_output(grad_input);
  if (!grad_x.defined()) {
    grad_x = masked(grad_conv_input, mask);
  } else if (mask.has_value()) {
    grad_x.addcmul_(grad_conv_input, mask->unsqueeze(-1));
  } else {
    grad_x.add_(grad_conv_input);
  }
  return {grad_x.contiguous(), grad_weight.squeeze(2).contiguous(), has_bias ? grad_bias : empty, grad_rw,
          grad_rb};
}

}  // namespace kxops::gated_conv
