// The CUDA helpers every kxops kernel uses: fixed-size packs for 16-byte (or smaller) vector
// loads and stores, the vector width of a type, the alignment test (on the host, where a
// launch picks its vector path, and on the device) and the host's switch between the widths.
#pragma once

#include <cstdint>
#include <type_traits>

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

// The switch of a launch whose alignment is known on the host: calls launch(width), width a
// std::integral_constant of kVecWidth<T> (16-byte packs) when `vectorised`, else of 1, so that
// the kernel is a template on its width instantiated for both. (A kernel whose tensors' alignment
// varies block by block takes kVecWidth<T> and tests is_aligned on the device instead.)
template <typename T, typename Launch>
void with_vec_width(bool vectorised, Launch&& launch) {
  if (vectorised) {
    launch(std::integral_constant<int, kVecWidth<T>>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace kxops
