// What the CPU kernels share: the at::vec overloads of the functions the shared math headers
// call unqualified (include this before those headers so that their templates see the
// overloads at definition), and how rows are split into at::parallel_for tasks.
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

template <typename T>
at::vec::Vectorized<T> exponential(const at::vec::Vectorized<T>& x) {
  return x.exp_u20();  // 20-ULP Sleef-free exp: ample for a sigmoid in fp32
}

}  // namespace kxops
