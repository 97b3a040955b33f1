// The CUDA helpers every kxops kernel uses: fixed-size packs for 16-byte (or smaller) vector
// loads and stores, the vector width of a type, and the alignment test (on the host, where a
// launch picks its vector path, and on the device).
#pragma once

#include <cstdint>

namespace kxops {

template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

// Elements of T in one 16-byte vector load or store.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

template <typename T>
using VecPack = Pack<T, kVecWidth<T>>;

template <typename P>
__host__ __device__ __forceinline__ bool is_aligned(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % alignof(P) == 0;
}

}  // namespace kxops
