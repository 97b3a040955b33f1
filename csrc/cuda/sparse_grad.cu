// Sparse gradient products on CUDA (see sparse_grad_host.h, which converts and transposes
// with at:: ops): one thread block per output row, each thread summing its elements of the row
// over the row's nonzeros in order (sparse_grad_math.h, as the CPU does), so every output
// element is one thread's sum in a fixed order: no atomics, no reduction across threads, the
// same bits whatever the launch. fp32/fp64 in their own precision; 64-bit offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "sparse_grad_host.h"
#include "sparse_grad_math.h"

namespace kxops::sparse_grad::cuda {
namespace {

constexpr int kMaxThreads = 256;

// Output row blockIdx.x; its d elements strided over the threads, so that a warp reads 32
// consecutive elements of each operand row it visits. out is null (and d 0) for the sums alone.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_product_kernel(const int64_t* __restrict__ start, const int64_t* __restrict__ index,
                          const T* __restrict__ value, T scale, const T* __restrict__ operand,
                          int64_t operand_stride, T* __restrict__ out, int64_t out_stride,
                          int64_t d, T* __restrict__ sums, bool zero_init) {
  const int64_t r = blockIdx.x;
  const int64_t begin = start[r], end = start[r + 1];
  T* row = out + r * out_stride;
  for (int64_t e = threadIdx.x; e < d; e += blockDim.x) {
    const T* column = operand + e;
    const auto load = [&](int64_t i) { return column[i * operand_stride]; };
    row[e] = sparse_dot(begin, end, index, value, scale, zero_init ? T(0) : row[e], load);
  }
  if (sums != nullptr && threadIdx.x == 0) sums[r] = sparse_sum(begin, end, value, sums[r]);
}

}  // namespace

void sparse_product(const at::Tensor& start, const at::Tensor& index, const at::Tensor& value,
                    double scale, const at::Tensor& operand, const at::Tensor& out,
                    const at::Tensor& sums, bool zero_init) {
  const int64_t rows = start.numel() - 1;
  if (rows <= 0) return;
  TORCH_CHECK(rows <= std::numeric_limits<int>::max(), "kxops: too many rows (", rows,
              ") for one sparse product launch");
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t d = out.defined() ? out.size(1) : 0;
  // A warp at least; one element per thread up to kMaxThreads, strided beyond.
  const int threads = static_cast<int>(std::clamp<int64_t>((d + 31) / 32 * 32, 32, kMaxThreads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "sparse_product_cuda", [&] {
    sparse_product_kernel<scalar_t><<<static_cast<unsigned int>(rows), threads, 0, stream>>>(
        start.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(),
        value.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
        d > 0 ? operand.const_data_ptr<scalar_t>() : nullptr, d > 0 ? operand.stride(0) : 0,
        out.defined() ? out.mutable_data_ptr<scalar_t>() : nullptr,
        out.defined() ? out.stride(0) : 0, d,
        sums.defined() ? sums.mutable_data_ptr<scalar_t>() : nullptr, zero_init);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace kxops::sparse_grad::cuda
