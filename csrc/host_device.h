// KXOPS_HOST_DEVICE marks the math that the CPU and CUDA kernels share, and the scalar
// functions that math calls unqualified (csrc/cpu/vec_math.h adds their at::vec overloads).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define KXOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KXOPS_HOST_DEVICE inline
#endif

namespace kxops {

KXOPS_HOST_DEVICE float square_root(float x) { return sqrtf(x); }
KXOPS_HOST_DEVICE double square_root(double x) { return sqrt(x); }
KXOPS_HOST_DEVICE float exponential(float x) { return expf(x); }
KXOPS_HOST_DEVICE double exponential(double x) { return exp(x); }

}  // namespace kxops
