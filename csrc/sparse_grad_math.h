// The inner sums of the sparse gradient products (sparse_grad_host.h), shared by the CPU
// products (cpu/sparse_grad.cpp, on vectors of an output row) and the CUDA kernel
// (cuda/sparse_grad.cu, one element of an output row per thread): both add an output row's
// nonzeros in the same order with the same roundings, so the CPU tests run the math the GPU
// runs.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace kxops::sparse_grad {

// a * b + c with one rounding, as the CPU's vector fmadd does (the CPU products pass their own
// vector type, whose overload sits beside it).
KXOPS_HOST_DEVICE float multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
KXOPS_HOST_DEVICE double multiply_add(double a, double b, double c) { return fma(a, b, c); }

// One output row's sum over its nonzeros [begin, end) of a CSR (index: the operand row each
// nonzero multiplies), in order: acc <- (scale * value[k]) * load(index[k]) + acc. Acc is the
// part of the output row that one caller holds (a CUDA thread's element, a CPU thread's
// vectors), load(r) the same part of operand row r. scale * value[k] is rounded to T, then
// multiplies in one fused multiply-add: the same bits on every device.
template <typename T, typename Acc, typename Load>
KXOPS_HOST_DEVICE Acc sparse_dot(int64_t begin, int64_t end, const int64_t* index, const T* value,
                                 T scale, Acc acc, const Load& load) {
  for (int64_t k = begin; k < end; ++k) {
    const T weight = scale * value[k];
    acc = multiply_add(Acc(weight), load(index[k]), acc);
  }
  return acc;
}

// An output row's column sum (grad_bias) over the same nonzeros, in order: sum + value[k]
// (values already scaled: no product to fuse).
template <typename T>
KXOPS_HOST_DEVICE T sparse_sum(int64_t begin, int64_t end, const T* value, T sum) {
  for (int64_t k = begin; k < end; ++k) sum += value[k];
  return sum;
}

}  // namespace kxops::sparse_grad
