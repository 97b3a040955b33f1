// A row's nonzeros, read a vector at a time (zero vectors skipped whole): shared by the sparse
// gradient products (cpu/sparse_grad.cpp) and the sparse ZLPR kernel's sparse gradient output
// (cpu/zlpr.cpp). A NaN counts as nonzero: it must reach the products.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace kxops::sparse_grad {

template <typename T>
int64_t count_nonzeros(const T* row, int64_t m) {
  using Vec = at::vec::Vectorized<T>;
  int64_t count = 0, j = 0;
  for (; j + Vec::size() <= m; j += Vec::size()) {
    count +=
        Vec::size() - __builtin_popcount(static_cast<unsigned>(Vec::loadu(row + j).zero_mask()));
  }
  for (; j < m; ++j) count += row[j] != T(0);
  return count;
}

// Writes the row's nonzeros (column, value) in column order.
template <typename T>
void take_nonzeros(const T* row, int64_t m, int64_t* col, T* value) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int kAllZero = (1 << Vec::size()) - 1;
  int64_t j = 0;
  for (; j + Vec::size() <= m; j += Vec::size()) {
    if (Vec::loadu(row + j).zero_mask() == kAllZero) continue;
    for (int64_t k = j; k < j + Vec::size(); ++k) {
      if (row[k] != T(0)) *col++ = k, *value++ = row[k];
    }
  }
  for (; j < m; ++j) {
    if (row[j] != T(0)) *col++ = j, *value++ = row[j];
  }
}

}  // namespace kxops::sparse_grad
