// ZLPR loss on CUDA: a warp per row for up to 2048 classes, a block per row above. The first
// read accumulates both exponential sums online (max + rescaled sum, merged across threads
// with CUB); the second read writes the gradient. 16-byte loads after a scalar head that
// reaches alignment; fp32 (fp64) math; 64-bit offsets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

#include <cstdint>
#include <limits>

#include "cuda/toolbox.cuh"
#include "zlpr_host.h"
#include "zlpr_math.h"

namespace kxops::zlpr {
namespace {

constexpr int64_t kMaxWarpRowClasses = 2048;
constexpr int kWarpRowsPerBlock = 8;
constexpr int kBlockRowThreads = 512;
// Shared memory for the sparse kernel's bitmap of positives (one bit per class): a launch may
// use 48 KiB in all without opting in, and the static reduction storage (under 1 KiB) counts
// towards it, so the bitmap stops at 40 KiB (327,680 classes).
constexpr int64_t kMaxBitmapBytes = 40 * 1024;

// A row reduction over a logical warp (kThreads <= 32) or the whole block.
template <typename T, int kThreads, bool kWarp = (kThreads <= 32)>
struct RowReducer {
  using Reduce = cub::WarpReduce<T, kThreads>;
  static __device__ __forceinline__ void sync() { __syncwarp(); }
};

template <typename T, int kThreads>
struct RowReducer<T, kThreads, false> {
  using Reduce = cub::BlockReduce<T, kThreads>;
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};

struct MergeSums {
  template <typename T>
  __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return merge(a, b);
  }
};

// How visit_row reads the targets: the derived type gives raw(j), class j's target as stored,
// and aligned(j), whether a pack of kVec targets can be read from j; load reads that pack, one
// target at a time unless the derived type reads it whole.
template <typename Derived, int kVec>
struct Targets {
  template <typename acc_t>
  __device__ __forceinline__ acc_t at(int64_t j) const {
    return static_cast<acc_t>(static_cast<const Derived*>(this)->raw(j));
  }
  template <typename acc_t>
  __device__ __forceinline__ void load(int64_t j, acc_t (&out)[kVec]) const {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = at<acc_t>(j + k);
  }
};

// Targets read from a dense label tensor, in packs of 16 bytes.
template <typename label_t, int kVec>
struct DenseTargets : Targets<DenseTargets<label_t, kVec>, kVec> {
  const label_t* row;

  __device__ __forceinline__ DenseTargets(const label_t* row) : row(row) {}
  __device__ __forceinline__ label_t raw(int64_t j) const { return row[j]; }
  __device__ __forceinline__ bool aligned(int64_t j) const {
    return is_aligned<Pack<label_t, kVec>>(row + j);
  }
  template <typename acc_t>
  __device__ __forceinline__ void load(int64_t j, acc_t (&out)[kVec]) const {
    const auto pack = *reinterpret_cast<const Pack<label_t, kVec>*>(row + j);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = static_cast<acc_t>(pack.v[k]);
  }
};

// Targets read from a bitmap of positive classes in shared memory.
template <int kVec>
struct BitmapTargets : Targets<BitmapTargets<kVec>, kVec> {
  const uint32_t* bits;

  __device__ __forceinline__ BitmapTargets(const uint32_t* bits) : bits(bits) {}
  __device__ __forceinline__ uint32_t raw(int64_t j) const {
    return (bits[j >> 5] >> (j & 31)) & 1u;
  }
  __device__ __forceinline__ bool aligned(int64_t) const { return true; }
};

// Calls value = visit(s_j, t_j) for the classes of this thread and, when out is not null,
// stores value into out[j]. Packs of 16 bytes once the pointers are aligned.
template <int kThreads, typename scalar_t, typename Targets, typename Visit>
__device__ __forceinline__ void visit_row(const scalar_t* logits, const Targets& targets,
                                          scalar_t* out, int64_t n, int lane, Visit visit) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecWidth<scalar_t>;
  using SPack = Pack<scalar_t, kVec>;
  const int64_t misalignment =
      static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(logits) % sizeof(SPack)) /
      static_cast<int64_t>(sizeof(scalar_t));
  int64_t head = misalignment == 0 ? 0 : kVec - misalignment;
  if (head > n || !targets.aligned(head) || (out != nullptr && !is_aligned<SPack>(out + head))) {
    head = n;  // the other pointers never align with the logits: scalar loads only
  }
  const int64_t body_end = head + (n - head) / kVec * kVec;
  auto scalar = [&](int64_t j) {
    const acc_t value = visit(static_cast<acc_t>(logits[j]), targets.template at<acc_t>(j));
    if (out != nullptr) out[j] = static_cast<scalar_t>(value);
  };
  for (int64_t j = lane; j < head; j += kThreads) scalar(j);
  for (int64_t j = head + static_cast<int64_t>(lane) * kVec; j < body_end;
       j += static_cast<int64_t>(kThreads) * kVec) {
    const SPack s = *reinterpret_cast<const SPack*>(logits + j);
    acc_t t[kVec];
    targets.load(j, t);
    SPack result;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      result.v[k] = static_cast<scalar_t>(visit(static_cast<acc_t>(s.v[k]), t[k]));
    }
    if (out != nullptr) *reinterpret_cast<SPack*>(out + j) = result;
  }
  for (int64_t j = body_end + lane; j < n; j += kThreads) scalar(j);
}

// A row's shared memory: the reduction's storage and the reduced sums.
template <typename acc_t, int kThreads>
struct RowShared {
  typename RowReducer<RowSums<acc_t>, kThreads>::Reduce::TempStorage reduce;
  acc_t sums[4];  // neg.max, neg.sum, pos.max, pos.sum
};

// The thread's row (one of the kRows rows of its block) and its lane in that row.
template <int kThreads, int kRows>
struct RowPlace {
  int local_row = threadIdx.x / kThreads;
  int lane = threadIdx.x % kThreads;
  int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + local_row;
};

// The loss of one row and, when grad is not null, its gradient times grad_scale, negatives
// below grad_filter dropped (RowGrad). All kThreads threads of the row call this together.
template <int kThreads, typename scalar_t, typename Targets, typename acc_t>
__device__ __forceinline__ void zlpr_row(const scalar_t* logits, const Targets& targets,
                                         scalar_t* grad, acc_t grad_scale, acc_t grad_filter,
                                         int64_t n, int lane, RowShared<acc_t, kThreads>& shared,
                                         acc_t* loss) {
  using Reducer = RowReducer<RowSums<acc_t>, kThreads>;
  RowSums<acc_t> sums;
  visit_row<kThreads>(logits, targets, static_cast<scalar_t*>(nullptr), n, lane,
                      [&](acc_t s, acc_t t) {
                        sums.add(s, t);
                        return acc_t(0);
                      });
  sums = typename Reducer::Reduce(shared.reduce).Reduce(sums, MergeSums());
  if (lane == 0) {  // the reduced value is valid in the row's first thread only
    shared.sums[0] = sums.neg.max;
    shared.sums[1] = sums.neg.sum;
    shared.sums[2] = sums.pos.max;
    shared.sums[3] = sums.pos.sum;
    *loss = sums.loss();
  }
  if (grad == nullptr) return;
  Reducer::sync();
  sums.neg = {shared.sums[0], shared.sums[1]};
  sums.pos = {shared.sums[2], shared.sums[3]};
  const RowGrad<acc_t> finish(sums, grad_scale, grad_filter);
  visit_row<kThreads>(logits, targets, grad, n, lane, finish);
}

template <typename scalar_t, typename label_t, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows)
    zlpr_kernel(const scalar_t* __restrict__ logits, const label_t* __restrict__ labels,
                at::opmath_type<scalar_t>* __restrict__ row_loss, scalar_t* __restrict__ grad,
                at::opmath_type<scalar_t> grad_scale, at::opmath_type<scalar_t> grad_filter,
                int64_t rows, int64_t n) {
  __shared__ RowShared<at::opmath_type<scalar_t>, kThreads> shared[kRows];
  const RowPlace<kThreads, kRows> place;
  // Whole rows only: a warp row, or a block row that always exists.
  if (place.row >= rows) return;
  const int64_t offset = place.row * n;
  zlpr_row<kThreads>(logits + offset, DenseTargets<label_t, kVecWidth<scalar_t>>{labels + offset},
                     grad == nullptr ? nullptr : grad + offset, grad_scale, grad_filter, n,
                     place.lane, shared[place.local_row], row_loss + place.row);
}

// Sets bit j of bits (words words, shared memory) for each positive class j of the row. All
// threads of the row call this together; Reducer::sync orders the clearing, the setting and the
// reads that follow.
template <typename Reducer, typename index_t>
__device__ __forceinline__ void build_bitmap(const index_t* row_positives, int64_t per_row,
                                             int64_t ignore_index, int64_t n, int64_t words,
                                             int lane, int threads, uint32_t* bits) {
  for (int64_t w = lane; w < words; w += threads) bits[w] = 0;
  Reducer::sync();
  // Setting a bit twice is harmless: duplicates count once.
  for (int64_t k = lane; k < per_row; k += threads) {
    const int64_t index = row_positives[k];
    if (index == ignore_index) continue;
    CUDA_KERNEL_ASSERT(index >= 0 && index < n &&
                       "kxops.sparse_zlpr: positives index out of range");
    atomicOr(bits + (index >> 5), 1u << (index & 31));
  }
  Reducer::sync();
}

template <typename scalar_t, typename index_t, int kThreads, int kRows>
__global__ void __launch_bounds__(kThreads* kRows)
    sparse_zlpr_kernel(const scalar_t* __restrict__ logits, const index_t* __restrict__ positives,
                       int64_t per_row, int64_t ignore_index,
                       at::opmath_type<scalar_t>* __restrict__ row_loss,
                       scalar_t* __restrict__ grad, at::opmath_type<scalar_t> grad_scale,
                       at::opmath_type<scalar_t> grad_filter, int64_t rows, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ RowShared<acc_t, kThreads> shared[kRows];
  extern __shared__ uint32_t bitmaps[];
  const RowPlace<kThreads, kRows> place;
  if (place.row >= rows) return;
  const int64_t words = (n + 31) / 32;
  uint32_t* bits = bitmaps + place.local_row * words;
  build_bitmap<RowReducer<RowSums<acc_t>, kThreads>>(
      positives + place.row * per_row, per_row, ignore_index, n, words, place.lane, kThreads, bits);
  const int64_t offset = place.row * n;
  zlpr_row<kThreads>(logits + offset, BitmapTargets<kVecWidth<scalar_t>>{bits},
                     grad == nullptr ? nullptr : grad + offset, grad_scale, grad_filter, n,
                     place.lane, shared[place.local_row], row_loss + place.row);
}

// A launch's shape: kThreads threads per row, kRows rows per block.
template <int kThreadsPerRow, int kRowsPerBlock>
struct RowShape {
  static constexpr int kThreads = kThreadsPerRow;
  static constexpr int kRows = kRowsPerBlock;
  static constexpr int kBlockThreads = kThreads * kRows;
};

// Calls launch(RowShape<...>{}) with the shape for rows of n classes.
template <typename Launch>
void with_row_shape(int64_t n, Launch launch) {
  if (n <= kMaxWarpRowClasses) {
    launch(RowShape<32, kWarpRowsPerBlock>{});
  } else {
    launch(RowShape<kBlockRowThreads, 1>{});
  }
}

unsigned int grid_size(int64_t rows, int rows_per_block) {
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "kxops.zlpr: too many rows (", rows,
              ") for one launch");
  return static_cast<unsigned int>(blocks);
}

// Labels as one of the types the kernel is built for: bool/uint8 (read as bytes), int64,
// float32, or the logits' own type; any other type is converted to float32 first.
at::Tensor kernel_labels(const at::Tensor& labels, at::ScalarType logits_type) {
  const auto type = labels.scalar_type();
  if (type == at::kBool || type == at::kByte || type == at::kLong || type == at::kFloat ||
      type == logits_type) {
    return labels.contiguous();
  }
  return labels.to(at::kFloat).contiguous();
}

template <typename scalar_t, typename label_t>
void launch_dense(const at::Tensor& logits, const label_t* labels, at::Tensor& row_loss,
                  scalar_t* grad, at::opmath_type<scalar_t> grad_scale,
                  at::opmath_type<scalar_t> grad_filter, int64_t rows, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_row_shape(n, [&](auto shape) {
    using Shape = decltype(shape);
    zlpr_kernel<scalar_t, label_t, Shape::kThreads, Shape::kRows>
        <<<grid_size(rows, Shape::kRows), Shape::kBlockThreads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), labels, row_loss.mutable_data_ptr<acc_t>(), grad,
            grad_scale, grad_filter, rows, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// grad_filter: RowGrad's (the sparse op's dense-label route; 0 for kxops::zlpr).
std::tuple<at::Tensor, at::Tensor> filtered_zlpr_cuda(const at::Tensor& logits_in,
                                                      const at::Tensor& labels_in,
                                                      bool compute_grad, c10::string_view reduction,
                                                      double grad_filter) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const auto logits = logits_in.contiguous();
  const auto labels = kernel_labels(labels_in, logits.scalar_type());
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad);
  const int64_t n = logits.size(-1);
  const int64_t rows = row_loss.numel();
  if (rows == 0) return {row_loss, grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "zlpr_cuda", [&] {
    scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    using acc_t = at::opmath_type<scalar_t>;
    const auto scale = grad_scale<acc_t>(logits, reduction);
    const auto filter = static_cast<acc_t>(grad_filter);
    const auto type = labels.scalar_type();
    if (type == at::kBool || type == at::kByte) {
      launch_dense(logits, static_cast<const uint8_t*>(labels.const_data_ptr()), row_loss,
                   grad_data, scale, filter, rows, n);
    } else if (type == at::kLong) {
      launch_dense(logits, labels.const_data_ptr<int64_t>(), row_loss, grad_data, scale, filter,
                   rows, n);
    } else if (type == at::kFloat) {
      launch_dense(logits, labels.const_data_ptr<float>(), row_loss, grad_data, scale, filter, rows,
                   n);
    } else {
      launch_dense(logits, labels.const_data_ptr<scalar_t>(), row_loss, grad_data, scale, filter,
                   rows, n);
    }
  });
  return {row_loss, grad};
}

std::tuple<at::Tensor, at::Tensor> zlpr_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                             bool compute_grad, c10::string_view reduction) {
  return filtered_zlpr_cuda(logits, labels, compute_grad, reduction, /*grad_filter=*/0);
}

// Dense uint8 labels from the positives, for rows with too many classes for a bitmap in shared
// memory; written once on the device (scatter asserts on an out-of-range index as the sparse
// kernel does). Padding puts 0 on class 0 under amax, which changes nothing; duplicates stay 1.
// The indices are compared as int64: an int32 comparison would wrap an ignore_index past
// int32's range.
at::Tensor dense_labels(const at::Tensor& positives, int64_t ignore_index,
                        const at::Tensor& logits) {
  const auto index = positives.to(at::kLong);
  const auto padding = index == ignore_index;
  return at::zeros(logits.sizes(), logits.options().dtype(at::kByte))
      .scatter_reduce_(-1, index.masked_fill(padding, 0), padding.logical_not().to(at::kByte),
                       "amax");
}

std::tuple<at::Tensor, at::Tensor> sparse_zlpr_cuda(const at::Tensor& logits_in,
                                                    const at::Tensor& positives_in,
                                                    int64_t ignore_index, bool compute_grad,
                                                    c10::string_view reduction,
                                                    double grad_filter) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t n = logits_in.size(-1);
  const int64_t rows_per_block = n <= kMaxWarpRowClasses ? kWarpRowsPerBlock : 1;
  const int64_t bitmap_bytes = rows_per_block * ((n + 31) / 32) * 4;
  if (bitmap_bytes > kMaxBitmapBytes) {
    return filtered_zlpr_cuda(logits_in, dense_labels(positives_in, ignore_index, logits_in),
                              compute_grad, reduction, grad_filter);
  }
  const auto logits = logits_in.contiguous();
  const auto positives = positives_in.contiguous();
  auto [row_loss, grad] = allocate_outputs(logits, compute_grad);
  const int64_t rows = row_loss.numel();
  const int64_t per_row = positives.size(-1);
  if (rows == 0) return {row_loss, grad};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "sparse_zlpr_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        scalar_t* grad_data = compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
        const acc_t scale = grad_scale<acc_t>(logits, reduction);
        const auto filter = static_cast<acc_t>(grad_filter);
        AT_DISPATCH_INDEX_TYPES(positives.scalar_type(), "sparse_zlpr_cuda_index", [&] {
          with_row_shape(n, [&](auto shape) {
            using Shape = decltype(shape);
            sparse_zlpr_kernel<scalar_t, index_t, Shape::kThreads, Shape::kRows>
                <<<grid_size(rows, Shape::kRows), Shape::kBlockThreads, bitmap_bytes, stream>>>(
                    logits.const_data_ptr<scalar_t>(), positives.const_data_ptr<index_t>(), per_row,
                    ignore_index, row_loss.mutable_data_ptr<acc_t>(), grad_data, scale, filter,
                    rows, n);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        });
      });
  return {row_loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { register_ops<&zlpr_cuda, &sparse_zlpr_cuda>(m); }

}  // namespace kxops::zlpr
