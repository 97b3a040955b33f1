// KXOPS_HOST_DEVICE marks the math that the CPU and CUDA kernels share, and the scalar
// primitives that math calls unqualified. In a CPU build cpu/vec_math.h, included below, adds
// their at::vec overloads, so that the shared templates also run on CPU vectors, whatever the
// order in which a file includes its headers.
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

// if_true where mask is set, else if_false; all_lanes: whether mask is set in every lane (a
// scalar has one).
template <typename T>
KXOPS_HOST_DEVICE T select(bool mask, T if_true, T if_false) {
  return mask ? if_true : if_false;
}
KXOPS_HOST_DEVICE bool all_lanes(bool mask) { return mask; }

// x if it is NaN, else value. The CPU vector exponential clamps its argument (a NaN becomes a
// finite number), so math that must carry a NaN past it does so with this. (x != x: true for
// NaN only, as no kxops build uses fast math.)
KXOPS_HOST_DEVICE float nan_or(float x, float value) { return x != x ? x : value; }
KXOPS_HOST_DEVICE double nan_or(double x, double value) { return x != x ? x : value; }

}  // namespace kxops

#if !defined(__CUDACC__)
#include "cpu/vec_math.h"
#endif
