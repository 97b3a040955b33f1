// What the CPU kernels share: the at::vec overloads of the primitives that the shared math
// headers call unqualified (host_device.h includes this file in CPU builds, so that the
// headers' templates see these overloads whatever the include order), and how rows are split
// into at::parallel_for tasks.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace kxops {

// Rows per at::parallel_for task: enough elements per task that thread start-up is paid for.
inline int64_t rows_per_task(int64_t row_elements) {
  constexpr int64_t kGrainElements = 32768;
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(row_elements, 1));
}

template <typename T>
at::vec::Vectorized<T> square_root(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}

// 20-ULP Sleef-free exp: ample for a sigmoid or a loss in fp32. It clamps its argument, so a
// NaN comes out finite: callers that must carry NaN do so themselves.
template <typename T>
at::vec::Vectorized<T> exponential(const at::vec::Vectorized<T>& x) {
  return x.exp_u20();
}

// The lane masks of at::vec comparisons: all bits set, or none.
template <typename T>
at::vec::Vectorized<T> select(const at::vec::Vectorized<T>& mask,
                              const at::vec::Vectorized<T>& if_true,
                              const at::vec::Vectorized<T>& if_false) {
  return at::vec::Vectorized<T>::blendv(if_false, if_true, mask);
}

template <typename T>
at::vec::Vectorized<T> nan_or(const at::vec::Vectorized<T>& x,
                              const at::vec::Vectorized<T>& value) {
  return at::vec::Vectorized<T>::blendv(value, x, x.isnan());
}

template <typename T>
bool all_lanes(const at::vec::Vectorized<T>& mask) {
  return mask.zero_mask() == 0;
}

}  // namespace kxops
