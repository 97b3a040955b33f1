// The gate of the DGCNN block, shared by the CPU and CUDA epilogue kernels (docs/design.md §2):
//   s = sigmoid(g * keep_scale),  y = (r (1 - s) + h s) m  (residual)  or  h s m,
// keep_scale being the gate-dropout factor (0, or 1 / (1 - p) for a kept unit; 1 without
// dropout). T is float/double, or a CPU vector type (see cpu/vec_math.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace kxops::gated_conv {

// The row of a gapped buffer (each sequence followed by `gap` rows; see gated_conv_host.h) that
// holds row b * time + t of a [B, T, C] tensor.
KXOPS_HOST_DEVICE int64_t gapped_row(int64_t row, int64_t time, int64_t gap) {
  return row + row / time * gap;
}

template <typename T>
KXOPS_HOST_DEVICE T sigmoid(T x) {
  return nan_or(x, T(1) / (T(1) + exponential(T(0) - x)));
}

template <typename T>
KXOPS_HOST_DEVICE T gate_forward(T h, T g, T r, T m, T keep_scale, bool residual) {
  const T s = sigmoid(g * keep_scale);
  return (residual ? r * (T(1) - s) + h * s : h * s) * m;
}

template <typename T>
struct GateGrads {
  T h, g, r;  // d loss / d h, d loss / d g (before dropout), d loss / d r
};

template <typename T>
KXOPS_HOST_DEVICE GateGrads<T> gate_backward(T dy, T h, T g, T r, T m, T keep_scale,
                                             bool residual) {
  const T s = sigmoid(g * keep_scale);
  const T dy_m = dy * m;
  const T ds = dy_m * (residual ? h - r : h);
  return {dy_m * s, ds * s * (T(1) - s) * keep_scale, residual ? dy_m * (T(1) - s) : T(0)};
}

}  // namespace kxops::gated_conv
