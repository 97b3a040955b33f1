// at::vec overloads of the functions the shared math headers call unqualified. Include this
// before those headers so that their templates see the overloads at definition.
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace kxops {

template <typename T>
at::vec::Vectorized<T> square_root(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}

template <typename T>
at::vec::Vectorized<T> exponential(const at::vec::Vectorized<T>& x) {
  return x.exp_u20();  // 20-ULP Sleef-free exp: ample for a sigmoid in fp32
}

}  // namespace kxops
