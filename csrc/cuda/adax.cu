// AdaX / AdaX-W step on CUDA: one launch per param dtype for any number of tensors.
//
// The per-tensor metadata lives in device memory (not in kernel arguments, whose 4 KB cap
// limits PyTorch's fused Adam to a few dozen tensors per launch). Small "fill" launches write
// it from argument batches and, per tensor, increment the step and compute the bias-correction
// constants in double from the device step, lr, grad_scale and found_inf: no host sync, so the
// whole step can be captured in a CUDA graph. The fill launches also write the block -> tensor
// table, so that each block of the update kernel reads which chunk of which tensor it owns
// (no search), and updates it with 16-byte loads when every pointer of the chunk is aligned,
// in fp32 (fp64) math. Compact state (bf16 or 8-bit moments, or a low-precision param rounded
// stochastically) has a kernel of its own: each warp steps 128-element blocks, 4 elements a
// lane, reduces the block's largest magnitude for the 8-bit scales (cub::WarpReduce) and
// rounds with adax_math.h's counter-based generator, as the CPU kernel does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cub/warp/warp_reduce.cuh>
#include <limits>
#include <vector>

#include "adax_host.h"
#include "adax_math.h"
#include "cuda/toolbox.cuh"

namespace kxops::adax {
namespace {

constexpr int64_t kChunk = 16384;  // elements per block
constexpr int kThreads = 256;
constexpr int kArgsPerFill = 40;  // keeps FillBatch under the portable 4 KB argument limit

// Chunks are numbered across all dtype groups: chunk c is row c of the block -> tensor table.
struct TensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* step;
  int64_t numel;
  int64_t chunk_begin;    // first chunk of this tensor
  float* exp_avg_scales;  // 8-bit state: one scale per kBlock elements; else null
  float* exp_avg_sq_scales;
  uint64_t seed;
};

// What the update kernel reads of a tensor: its arguments and the constants of its step.
struct TensorJob {
  TensorArgs tensor;
  Constants<double> constants;
  int skip;
};

struct FillBatch {
  TensorArgs args[kArgsPerFill];
  int count;
  int64_t first;
};

struct StepScalars {
  Hyper hyper;
  const double* lr;  // null: hyper.lr
  const float* grad_scale;
  const float* found_inf;
};

static_assert(sizeof(FillBatch) + sizeof(StepScalars) + 2 * sizeof(void*) < 4000,
              "fill kernel arguments must stay under 4 KB");

// One block per tensor of the batch: its threads write the tensor's rows of the block table,
// thread 0 its job.
__global__ void fill_jobs(FillBatch batch, StepScalars scalars, TensorJob* jobs, int* block_table) {
  const int k = blockIdx.x;
  const TensorArgs& args = batch.args[k];
  const int64_t job_index = batch.first + k;
  const int64_t chunks = (args.numel + kChunk - 1) / kChunk;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    block_table[args.chunk_begin + c] = static_cast<int>(job_index);
  }
  if (threadIdx.x != 0) return;
  TensorJob& job = jobs[job_index];
  job.tensor = args;
  // GradScaler found an inf/NaN: skip the step, step counts included.
  job.skip = scalars.found_inf != nullptr && *scalars.found_inf != 0.0f;
  if (job.skip) return;
  const float step = *args.step + 1.0f;
  *args.step = step;
  const double lr = scalars.lr != nullptr ? *scalars.lr : scalars.hyper.lr;
  const double inv_grad_scale =
      scalars.grad_scale != nullptr ? 1.0 / static_cast<double>(*scalars.grad_scale) : 1.0;
  job.constants = make_constants(scalars.hyper, lr, inv_grad_scale, step);
}

// Block b updates chunk first_chunk + b (this dtype group's chunks start at first_chunk).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    adax_kernel(const TensorJob* __restrict__ jobs, const int* __restrict__ block_table,
                int64_t first_chunk, bool l2) {
  using T = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecWidth<scalar_t>;
  const int64_t chunk = first_chunk + blockIdx.x;
  const TensorJob& job = jobs[block_table[chunk]];
  if (job.skip) return;
  const TensorArgs& t = job.tensor;
  const int64_t offset = (chunk - t.chunk_begin) * kChunk;
  const int64_t remaining = t.numel - offset;
  const int64_t n = remaining < kChunk ? remaining : kChunk;  // std::min would odr-use kChunk
  scalar_t* p = static_cast<scalar_t*>(t.param) + offset;
  const scalar_t* g = static_cast<const scalar_t*>(t.grad) + offset;
  T* m = static_cast<T*>(t.exp_avg) + offset;
  T* v = static_cast<T*>(t.exp_avg_sq) + offset;
  const auto c = math_constants<T>(job.constants);

  using ParamPack = Pack<scalar_t, kVec>;
  using StatePack = Pack<T, kVec>;
  const bool aligned = is_aligned<ParamPack>(p) && is_aligned<ParamPack>(g) &&
                       is_aligned<StatePack>(m) && is_aligned<StatePack>(v);
  const int64_t vec_end = aligned ? n - n % kVec : 0;
  for (int64_t j = static_cast<int64_t>(threadIdx.x) * kVec; j < vec_end;
       j += static_cast<int64_t>(kThreads) * kVec) {
    ParamPack pp = *reinterpret_cast<const ParamPack*>(p + j);
    const ParamPack gp = *reinterpret_cast<const ParamPack*>(g + j);
    StatePack mp = *reinterpret_cast<const StatePack*>(m + j);
    StatePack vp = *reinterpret_cast<const StatePack*>(v + j);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      T pk = static_cast<T>(pp.v[k]);
      update(pk, static_cast<T>(gp.v[k]), mp.v[k], vp.v[k], c, l2);
      pp.v[k] = static_cast<scalar_t>(pk);
    }
    *reinterpret_cast<ParamPack*>(p + j) = pp;
    *reinterpret_cast<StatePack*>(m + j) = mp;
    *reinterpret_cast<StatePack*>(v + j) = vp;
  }
  for (int64_t j = vec_end + threadIdx.x; j < n; j += kThreads) {
    T pj = static_cast<T>(p[j]);
    update(pj, static_cast<T>(g[j]), m[j], v[j], c, l2);
    p[j] = static_cast<scalar_t>(pj);
  }
}

// The largest magnitude, NaN if any is NaN (as the CPU kernel and torch.amax).
struct MaxMagnitude {
  __device__ __forceinline__ float operator()(float a, float b) const {
    return a != a || a > b ? a : b;
  }
};

// The moments of one element in fp32 from their storage (`e`: the block's scale exponent).
__device__ __forceinline__ float load_moment(const float* s, int64_t j, uint32_t, bool) {
  return s[j];
}
__device__ __forceinline__ float load_moment(const at::BFloat16* s, int64_t j, uint32_t, bool) {
  return static_cast<float>(s[j]);
}
__device__ __forceinline__ float load_moment(const uint8_t* s, int64_t j, uint32_t e, bool square) {
  return square ? decode_square(s[j], e) : decode_mean(s[j], e);
}

__device__ __forceinline__ void store_moment(float* s, int64_t j, float x, uint32_t, uint32_t, bool,
                                             bool) {
  s[j] = x;
}
__device__ __forceinline__ void store_moment(at::BFloat16* s, int64_t j, float x, uint32_t,
                                             uint32_t word, bool stochastic, bool square) {
  const uint32_t r = square ? square_random(word) : mean_random(word);
  s[j] = static_cast<at::BFloat16>(stochastic ? stochastic_bfloat16(x, r) : x);
}
__device__ __forceinline__ void store_moment(uint8_t* s, int64_t j, float x, uint32_t e,
                                             uint32_t word, bool stochastic, bool square) {
  s[j] = square ? encode_square(x, e, square_random(word), stochastic)
                : encode_mean(x, e, mean_random(word), stochastic);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t store_param(float x, uint32_t word, bool stochastic) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return static_cast<scalar_t>(stochastic ? stochastic_bfloat16(x, word) : x);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return static_cast<scalar_t>(stochastic ? stochastic_float16(x, word) : x);
  } else {
    return x;
  }
}

constexpr int kWarps = kThreads / 32;
constexpr int kPerLane = static_cast<int>(kBlock) / 32;

// The scale exponent of a block's moment after the update: the warp's largest magnitude.
template <typename state_t>
__device__ __forceinline__ uint32_t
new_scale_exponent(const float (&x)[kPerLane], float* scale, int width,
                   typename cub::WarpReduce<float>::TempStorage& temp) {
  if constexpr (!std::is_same_v<state_t, uint8_t>) {
    return 0;
  } else {
    float local = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) local = MaxMagnitude{}(fabsf(x[k]), local);
    const float absmax = cub::WarpReduce<float>(temp).Reduce(local, MaxMagnitude{});
    const uint32_t e = scale_exponent(__shfl_sync(0xffffffffU, absmax, 0), width);
    if (threadIdx.x % 32 == 0) *scale = scale_value(e);
    return e;
  }
}

// Block b updates chunk first_chunk + b; warp w its 128-element blocks w, w + kWarps, ...
template <typename scalar_t, typename state_t>
__global__ void __launch_bounds__(kThreads)
    compact_kernel(const TensorJob* __restrict__ jobs, const int* __restrict__ block_table,
                   int64_t first_chunk, bool l2, bool stochastic) {
  __shared__ typename cub::WarpReduce<float>::TempStorage temp[kWarps];
  const int64_t chunk = first_chunk + blockIdx.x;
  const TensorJob& job = jobs[block_table[chunk]];
  if (job.skip) return;
  const TensorArgs& t = job.tensor;
  const int64_t chunk_offset = (chunk - t.chunk_begin) * kChunk;
  const int64_t end = min(t.numel, chunk_offset + kChunk);
  auto* p = static_cast<scalar_t*>(t.param);
  const auto* g = static_cast<const scalar_t*>(t.grad);
  auto* m = static_cast<state_t*>(t.exp_avg);
  auto* v = static_cast<state_t*>(t.exp_avg_sq);
  const auto c = math_constants<float>(job.constants);
  const auto step = static_cast<uint32_t>(*t.step);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t b = chunk_offset + warp * kBlock; b < end; b += kWarps * kBlock) {
    const int64_t block = b / kBlock;
    const bool byte_state = std::is_same_v<state_t, uint8_t>;
    const uint32_t m_e = byte_state ? stored_scale_exponent(t.exp_avg_scales[block]) : 0U;
    const uint32_t v_e = byte_state ? stored_scale_exponent(t.exp_avg_sq_scales[block]) : 0U;
    const uint32_t high = static_cast<uint32_t>(b >> 32);
    const uint32_t moment_key = rounding_key(t.seed, step, 0, high);
    const uint32_t param_key = rounding_key(t.seed, step, 1, high);
    float mk[kPerLane], vk[kPerLane], pk[kPerLane];
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t j = b + lane + 32 * k;
      if (j >= end) {
        mk[k] = vk[k] = pk[k] = 0.0f;
        continue;
      }
      pk[k] = static_cast<float>(p[j]);
      mk[k] = load_moment(m, j, m_e, false);
      vk[k] = load_moment(v, j, v_e, true);
      update(pk[k], static_cast<float>(g[j]), mk[k], vk[k], c, l2);
    }
    const uint32_t m_new =
        new_scale_exponent<state_t>(mk, t.exp_avg_scales + block, kMeanWidth, temp[warp]);
    const uint32_t v_new =
        new_scale_exponent<state_t>(vk, t.exp_avg_sq_scales + block, kSquareWidth, temp[warp]);
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      const int64_t j = b + lane + 32 * k;
      if (j >= end) continue;
      const auto low = static_cast<uint32_t>(j);
      const bool moments_round = stochastic && !std::is_same_v<state_t, float>;
      const uint32_t word = moments_round ? random_bits(moment_key, low) : 0U;
      store_moment(m, j, mk[k], m_new, word, moments_round, false);
      store_moment(v, j, vk[k], v_new, word, moments_round, true);
      p[j] =
          store_param<scalar_t>(pk[k], stochastic ? random_bits(param_key, low) : 0U, stochastic);
    }
  }
}

// The device scalars in the types fill_jobs reads (a cast kernel at most: graph-safe); they
// own the memory that pointers() hands the kernel.
struct DeviceScalars {
  std::optional<at::Tensor> lr, grad_scale, found_inf;

  DeviceScalars(const std::optional<at::Tensor>& lr_in,
                const std::optional<at::Tensor>& grad_scale_in,
                const std::optional<at::Tensor>& found_inf_in)
      : lr(cast(lr_in, at::kDouble)),
        grad_scale(cast(grad_scale_in, at::kFloat)),
        found_inf(cast(found_inf_in, at::kFloat)) {}

  StepScalars pointers(const Hyper& hyper) const {
    return {hyper, data<double>(lr), data<float>(grad_scale), data<float>(found_inf)};
  }

 private:
  static std::optional<at::Tensor> cast(const std::optional<at::Tensor>& t, at::ScalarType type) {
    return t.has_value() ? std::optional(t->to(type)) : std::nullopt;
  }
  template <typename T>
  static const T* data(const std::optional<at::Tensor>& t) {
    return t.has_value() ? t->const_data_ptr<T>() : nullptr;
  }
};

// One update launch: the chunks of one (param dtype, state dtype) group.
struct Launch {
  at::ScalarType type, state;
  int64_t first_chunk, num_chunks;
};

// The tensors in dtype-group order, their chunks numbered on across the groups, and the
// launches that update them.
struct Plan {
  std::vector<TensorArgs> args;
  std::vector<Launch> launches;
  int64_t chunks = 0;
};

Plan plan(const TensorLists& lists) {
  Plan out;
  for (const auto& [types, indices] : group_by_dtype(lists)) {
    const int64_t first_chunk = out.chunks;
    for (size_t i : indices) {
      const int64_t numel = lists.params[i].numel();
      const auto scales = [](const at::Tensor& t) {
        return t.defined() ? t.data_ptr<float>() : nullptr;
      };
      out.args.push_back({lists.params[i].data_ptr(), lists.grads[i].const_data_ptr(),
                          lists.exp_avgs[i].data_ptr(), lists.exp_avg_sqs[i].data_ptr(),
                          lists.steps[i].data_ptr<float>(), numel, out.chunks,
                          scales(lists.exp_avg_scales[i]), scales(lists.exp_avg_sq_scales[i]),
                          lists.seeds[i]});
      out.chunks += (numel + kChunk - 1) / kChunk;
    }
    TORCH_CHECK(out.chunks - first_chunk <= std::numeric_limits<int>::max(),
                "kxops.adax_: too many elements (", out.chunks - first_chunk, " chunks of ", kChunk,
                ") for one launch");
    out.launches.push_back({types.first, types.second, first_chunk, out.chunks - first_chunk});
  }
  TORCH_CHECK(static_cast<int64_t>(out.args.size()) <= std::numeric_limits<int>::max(),
              "kxops.adax_: too many tensors (", out.args.size(), ") for one call");
  return out;
}

// One device buffer: the jobs, then the block table (TensorJob's alignment covers the ints).
struct Workspace {
  at::Tensor buffer;
  TensorJob* jobs;
  int* block_table;

  Workspace(const Plan& plan, const at::TensorOptions& options) {
    const int64_t jobs_bytes = static_cast<int64_t>(plan.args.size() * sizeof(TensorJob));
    buffer = at::empty({jobs_bytes + plan.chunks * static_cast<int64_t>(sizeof(int))},
                       options.dtype(at::kByte));
    jobs = reinterpret_cast<TensorJob*>(buffer.mutable_data_ptr());
    block_table =
        reinterpret_cast<int*>(static_cast<char*>(buffer.mutable_data_ptr()) + jobs_bytes);
  }
};

// The fill launches: every tensor's job (its step incremented) and rows of the block table.
void fill(const Plan& plan, const StepScalars& scalars, const Workspace& work,
          cudaStream_t stream) {
  const auto& args = plan.args;
  for (size_t first = 0; first < args.size(); first += kArgsPerFill) {
    FillBatch batch{};
    batch.count = static_cast<int>(std::min<size_t>(kArgsPerFill, args.size() - first));
    batch.first = static_cast<int64_t>(first);
    std::copy_n(args.begin() + first, batch.count, batch.args);
    fill_jobs<<<batch.count, kThreads, 0, stream>>>(batch, scalars, work.jobs, work.block_table);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t, typename state_t>
void launch_compact(const Launch& launch, const Workspace& work, bool l2, bool stochastic,
                    cudaStream_t stream) {
  compact_kernel<scalar_t, state_t>
      <<<static_cast<unsigned int>(launch.num_chunks), kThreads, 0, stream>>>(
          work.jobs, work.block_table, launch.first_chunk, l2, stochastic);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The update launches, one per (param dtype, state dtype) group.
void update(const Plan& plan, const Workspace& work, const Hyper& hyper, cudaStream_t stream) {
  const bool l2 = !hyper.decoupled && hyper.weight_decay != 0.0;
  for (const auto& launch : plan.launches) {
    if (launch.num_chunks == 0) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, launch.type, "adax_cuda", [&] {
      constexpr bool low_precision =
          std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (launch.state == at::kBFloat16) {
          return launch_compact<scalar_t, at::BFloat16>(launch, work, l2, hyper.stochastic, stream);
        }
        if (launch.state == at::kByte) {
          return launch_compact<scalar_t, uint8_t>(launch, work, l2, hyper.stochastic, stream);
        }
        if (low_precision && hyper.stochastic) {
          return launch_compact<scalar_t, float>(launch, work, l2, true, stream);
        }
      }
      adax_kernel<scalar_t><<<static_cast<unsigned int>(launch.num_chunks), kThreads, 0, stream>>>(
          work.jobs, work.block_table, launch.first_chunk, l2);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void adax_cuda_impl(const TensorLists& lists, const std::optional<at::Tensor>& lr,
                    const Hyper& hyper, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  if (lists.params.empty()) return;
  const c10::cuda::CUDAGuard guard(lists.params[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const DeviceScalars scalars(lr, grad_scale, found_inf);
  const auto launches = plan(lists);
  const Workspace work(launches, lists.params[0].options());
  fill(launches, scalars.pointers(hyper), work, stream);
  update(launches, work, hyper, stream);
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { register_ops<at::kCUDA, &adax_cuda_impl>(m); }

}  // namespace kxops::adax
