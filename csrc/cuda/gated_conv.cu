// DGCNN block on CUDA: the shared host code (the convolution as shifted cuBLAS GEMMs, one more
// for the projection) plus the fused epilogues here. Each thread takes kVec consecutive
// channels of one row (16-byte loads when the channel count and pointers allow, else one
// channel), fp32 math for fp16/bf16, 64-bit indexing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "cuda/toolbox.cuh"
#include "gated_conv_host.h"
#include "gated_conv_math.h"

namespace kxops::gated_conv {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

struct Pointers {
  const void* z;     // gapped: row b * T + t at gapped_row(row, time, gap)
  const void* r;     // null without the residual branch
  const void* mask;  // null: all ones
  const bool* keep;  // null: no dropout
  int64_t time, gap;
};

// Loads the inputs of channels [c, c + kVec) of one row in the math type.
template <typename scalar_t, int kVec>
struct RowSlice {
  using T = at::opmath_type<scalar_t>;
  T h[kVec], g[kVec], r[kVec], keep_scale[kVec], m;

  __device__ __forceinline__ RowSlice(const Pointers& p, double keep_scale_value, int64_t row,
                                      int64_t out, int64_t c) {
    const auto* z = static_cast<const scalar_t*>(p.z) + gapped_row(row, p.time, p.gap) * 2 * out;
    const auto hp = load<scalar_t, kVec>(z + c);
    const auto gp = load<scalar_t, kVec>(z + out + c);
    Pack<scalar_t, kVec> rp{};
    if (p.r != nullptr)
      rp = load<scalar_t, kVec>(static_cast<const scalar_t*>(p.r) + row * out + c);
    m = p.mask != nullptr ? static_cast<T>(static_cast<const scalar_t*>(p.mask)[row]) : T(1);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      h[k] = static_cast<T>(hp.v[k]);
      g[k] = static_cast<T>(gp.v[k]);
      r[k] = static_cast<T>(rp.v[k]);
      keep_scale[k] = p.keep == nullptr           ? T(1)
                      : p.keep[row * out + c + k] ? static_cast<T>(keep_scale_value)
                                                  : T(0);
    }
  }
};

// Calls body(row, c) for every slice of kVec channels, grid-stride.
template <int kVec, typename Body>
__device__ __forceinline__ void for_each_slice(int64_t rows, int64_t out, Body body) {
  const int64_t slices_per_row = out / kVec;
  const int64_t total = rows * slices_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    body(i / slices_per_row, (i % slices_per_row) * kVec);
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    gate_forward_kernel(Pointers p, double keep_scale, bool residual, int64_t rows, int64_t out,
                        scalar_t* __restrict__ y) {
  for_each_slice<kVec>(rows, out, [&](int64_t row, int64_t c) {
    const RowSlice<scalar_t, kVec> s(p, keep_scale, row, out, c);
    Pack<scalar_t, kVec> result;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      result.v[k] = static_cast<scalar_t>(
          gate_forward(s.h[k], s.g[k], s.r[k], s.m, s.keep_scale[k], residual));
    }
    store(y + row * out + c, result);
  });
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    gate_backward_kernel(Pointers p, double keep_scale, bool residual, int64_t rows, int64_t out,
                         const scalar_t* __restrict__ dy, scalar_t* __restrict__ dz,
                         scalar_t* __restrict__ dr) {
  using T = at::opmath_type<scalar_t>;
  for_each_slice<kVec>(rows, out, [&](int64_t row, int64_t c) {
    const RowSlice<scalar_t, kVec> s(p, keep_scale, row, out, c);
    const auto dyp = load<scalar_t, kVec>(dy + row * out + c);
    Pack<scalar_t, kVec> dh, dg, drp;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const auto grads = gate_backward(static_cast<T>(dyp.v[k]), s.h[k], s.g[k], s.r[k], s.m,
                                       s.keep_scale[k], residual);
      dh.v[k] = static_cast<scalar_t>(grads.h);
      dg.v[k] = static_cast<scalar_t>(grads.g);
      drp.v[k] = static_cast<scalar_t>(grads.r);
    }
    scalar_t* dz_of_row = dz + gapped_row(row, p.time, p.gap) * 2 * out;
    store(dz_of_row + c, dh);
    store(dz_of_row + out + c, dg);
    if (dr != nullptr) store(dr + row * out + c, drp);
  });
}

Pointers pointers(const EpilogueArgs& a) {
  return {a.z.const_data_ptr(),
          a.residual ? a.r.const_data_ptr() : nullptr,
          a.mask.defined() ? a.mask.const_data_ptr() : nullptr,
          a.keep.defined() ? a.keep.const_data_ptr<bool>() : nullptr,
          a.time,
          a.gap};
}

// Calls launch(width, blocks) at toolbox's vector width: 16-byte packs when every row's channel
// slices stay aligned (out a multiple of the pack and all base pointers aligned), else one
// channel.
template <typename scalar_t, typename Launch>
void with_vector_width(const EpilogueArgs& a, std::initializer_list<const void*> outputs,
                       Launch launch) {
  using P = VecPack<scalar_t>;
  bool vectorised = a.out % kVecWidth<scalar_t> == 0 && is_aligned<P>(a.z.const_data_ptr()) &&
                    (!a.residual || is_aligned<P>(a.r.const_data_ptr()));
  for (const void* ptr : outputs) vectorised = vectorised && (ptr == nullptr || is_aligned<P>(ptr));
  with_vec_width<scalar_t>(vectorised, [&](auto width) {
    const int64_t work = a.rows * (a.out / decltype(width)::value);
    const int64_t max_blocks = 65535LL * 8;  // grid-stride beyond this
    launch(width, static_cast<unsigned int>(std::max<int64_t>(
                      1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks))));
  });
}

struct CudaEpilogue {
  static void forward(const EpilogueArgs& a, at::Tensor& y) {
    if (a.rows == 0 || a.out == 0) return;
    const c10::cuda::CUDAGuard guard(y.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.z.scalar_type(), "gated_conv_cuda", [&] {
          scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
          with_vector_width<scalar_t>(a, {y_data}, [&](auto width, unsigned int blocks) {
            gate_forward_kernel<scalar_t, decltype(width)::value><<<blocks, kThreads, 0, stream>>>(
                pointers(a), a.keep_scale, a.residual, a.rows, a.out, y_data);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
  }

  static void backward(const EpilogueArgs& a, const at::Tensor& dy, at::Tensor& dz,
                       at::Tensor& dr) {
    if (a.rows == 0 || a.out == 0) return;
    const c10::cuda::CUDAGuard guard(dz.device());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.z.scalar_type(), "gated_conv_backward_cuda", [&] {
          const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
          scalar_t* dz_data = dz.mutable_data_ptr<scalar_t>();
          scalar_t* dr_data = dr.defined() ? dr.mutable_data_ptr<scalar_t>() : nullptr;
          with_vector_width<scalar_t>(
              a, {dy_data, dz_data, dr_data}, [&](auto width, unsigned int blocks) {
                gate_backward_kernel<scalar_t, decltype(width)::value>
                    <<<blocks, kThreads, 0, stream>>>(pointers(a), a.keep_scale, a.residual, a.rows,
                                                      a.out, dy_data, dz_data, dr_data);
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              });
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { register_ops<CudaEpilogue>(m); }

}  // namespace kxops::gated_conv
