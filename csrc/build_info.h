#pragma once
#include <string>

namespace kxops {
// "cuda_runtime=<CUDART_VERSION>;cuda_archs=<archs compiled>", defined by the CUDA build.
std::string cuda_build_info();
}  // namespace kxops
