// Fixed-size packs of elements for 16-byte (or smaller) vector loads and stores.
#pragma once

#include <cstdint>

namespace kxops {

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename P>
__device__ __forceinline__ bool is_aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % alignof(P) == 0;
}

}  // namespace kxops
