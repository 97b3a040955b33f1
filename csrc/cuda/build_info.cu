// What the CUDA part of this binary was compiled for, read from nvcc's own macros so that
// kxops.info() reports the archs actually in the fatbinary, not the ones requested.
#include <cuda_runtime_api.h>

#include "build_info.h"

#define KXOPS_STRINGIFY_(...) #__VA_ARGS__
#define KXOPS_STRINGIFY(...) KXOPS_STRINGIFY_(__VA_ARGS__)

namespace kxops {

std::string cuda_build_info() {
  std::string info = "cuda_runtime=" + std::to_string(CUDART_VERSION);
#ifdef __CUDA_ARCH_LIST__
  info += ";cuda_archs=" KXOPS_STRINGIFY(__CUDA_ARCH_LIST__);
#endif
  return info;
}

}  // namespace kxops
