// KXOPS_HOST_DEVICE marks the math that the CPU and CUDA kernels share.
#pragma once

#if defined(__CUDACC__)
#define KXOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KXOPS_HOST_DEVICE inline
#endif
