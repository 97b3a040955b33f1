// AdaX / AdaX-W step on CPU: every tensor split into fixed-size slices, the slices of all
// tensors spread over threads with one parallel_for; each slice updated with at::vec in the
// math type (fp16/bf16 params and grads staged through fp32 tiles). Compact state (bf16 or
// 8-bit moments) is decoded into fp32 tiles, updated as fp32 state is, and encoded back in the
// same pass (adax_math.h); the random words of stochastic rounding are drawn per tile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "adax_host.h"
#include "adax_math.h"
#include "cpu/vec_math.h"

namespace kxops::adax {
namespace {

using at::vec::Vectorized;

constexpr int64_t kSlice = 16384;  // elements per parallel work item
constexpr int64_t kTile = 512;     // fp32 staging tile for fp16/bf16 params

// Updates n elements whose params and grads are already in the math type T.
template <typename T>
void update_span(T* p, const T* g, T* m, T* v, int64_t n, const Constants<T>& c, bool l2) {
  using Vec = Vectorized<T>;
  const auto cv = Constants<Vec>::broadcast(c);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec pv = Vec::loadu(p + j), mv = Vec::loadu(m + j), vv = Vec::loadu(v + j);
    update(pv, Vec::loadu(g + j), mv, vv, cv, l2);
    pv.store(p + j);
    mv.store(m + j);
    vv.store(v + j);
  }
  for (; j < n; ++j) update(p[j], g[j], m[j], v[j], c, l2);
}

template <typename scalar_t>
void update_slice(scalar_t* p, const scalar_t* g, at::opmath_type<scalar_t>* m,
                  at::opmath_type<scalar_t>* v, int64_t n,
                  const Constants<at::opmath_type<scalar_t>>& c, bool l2) {
  using T = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, T>) {
    update_span(p, g, m, v, n, c, l2);
  } else {
    T p_tile[kTile], g_tile[kTile];
    for (int64_t begin = 0; begin < n; begin += kTile) {
      const int64_t len = std::min(kTile, n - begin);
      at::vec::convert(p + begin, p_tile, len);
      at::vec::convert(g + begin, g_tile, len);
      update_span(p_tile, g_tile, m + begin, v + begin, len, c, l2);
      at::vec::convert(p_tile, p + begin, len);
    }
  }
}

// The integer loops of the compact formats (adax_math.h) are plain loops that GCC vectorises.
// The generator's and bf16's are compiled twice, for AVX-512 and for the build's baseline,
// picked at load time by the CPU (GCC vectorises the 8-bit codecs for AVX2 only).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define KXOPS_CPU_CLONES __attribute__((target_clones("arch=skylake-avx512", "default")))
#else
#define KXOPS_CPU_CLONES
#endif

// Random words of n consecutive elements from index `first` (no slice crosses 2^32).
KXOPS_CPU_CLONES void fill_random(uint32_t* out, int64_t n, uint64_t seed, uint32_t step,
                                  uint32_t stream, int64_t first) {
  const uint32_t key = rounding_key(seed, step, stream, static_cast<uint32_t>(first >> 32));
  const auto low = static_cast<uint32_t>(first);
  for (int64_t j = 0; j < n; ++j) out[j] = random_bits(key, low + static_cast<uint32_t>(j));
}

// What one tensor's compact update needs besides its data pointers.
struct Rounding {
  uint64_t seed;
  uint32_t step;
  bool moments, param;  // stochastic for the moments, for a low-precision param
};

// Moments in bf16: decode into fp32 tiles, encode back.
void load_moment(const at::BFloat16* in, float* out, int64_t n, const float*, bool) {
  at::vec::convert(in, out, n);
}

// bf16 values stochastically rounded, written as their bits (the high half of the fp32 bits).
template <bool kSquare>
KXOPS_CPU_CLONES void store_stochastic_bfloat16(const float* __restrict in,
                                                uint16_t* __restrict out, int64_t n,
                                                const uint32_t* __restrict random) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t r = kSquare ? square_random(random[j]) : mean_random(random[j]);
    out[j] = static_cast<uint16_t>(float_bits(stochastic_bfloat16(in[j], r)) >> 16);
  }
}

void store_moment(const float* in, at::BFloat16* out, int64_t n, float*, const uint32_t* random,
                  bool stochastic, bool square) {
  if (!stochastic) {
    at::vec::convert(in, out, n);
    return;
  }
  auto* bits = reinterpret_cast<uint16_t*>(out);
  if (square) {
    store_stochastic_bfloat16<true>(in, bits, n, random);
  } else {
    store_stochastic_bfloat16<false>(in, bits, n, random);
  }
}

// Moments in 8 bits: one scale per kBlock elements (the tile starts on a block).
void load_moment(const uint8_t* in, float* out, int64_t n, const float* scales, bool square) {
  for (int64_t b = 0; b < n; b += kBlock) {
    const uint32_t e = stored_scale_exponent(scales[b / kBlock]);
    const int64_t end = std::min(n, b + kBlock);
    if (square) {
      for (int64_t j = b; j < end; ++j) out[j] = decode_square(in[j], e);
    } else {
      for (int64_t j = b; j < end; ++j) out[j] = decode_mean(in[j], e);
    }
  }
}

// The largest magnitude of n values, NaN if any is NaN (as torch.amax in the reference).
float block_absmax(const float* in, int64_t n) {
  using Vec = Vectorized<float>;
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    acc = at::vec::maximum(acc, Vec::loadu(in + j).abs());
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  float out = 0.0f;
  const auto take = [&out](float x) { out = x != x || x > out ? x : out; };
  for (float x : lanes) take(x);
  for (; j < n; ++j) take(std::fabs(in[j]));
  return out;
}

// One block's codes; the rounding mode a compile-time constant, so that the loops vectorise.
template <bool kStochastic>
void encode_block(const float* __restrict in, uint8_t* __restrict out, int64_t n, uint32_t e,
                  const uint32_t* __restrict random, bool square) {
  if (square) {
    for (int64_t j = 0; j < n; ++j) {
      out[j] = encode_square(in[j], e, square_random(random[j]), kStochastic);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      out[j] = encode_mean(in[j], e, mean_random(random[j]), kStochastic);
    }
  }
}

void store_moment(const float* in, uint8_t* out, int64_t n, float* scales, const uint32_t* random,
                  bool stochastic, bool square) {
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(n - b, kBlock);
    const uint32_t e =
        scale_exponent(block_absmax(in + b, len), square ? kSquareWidth : kMeanWidth);
    scales[b / kBlock] = scale_value(e);
    if (stochastic) {
      encode_block<true>(in + b, out + b, len, e, random + b, square);
    } else {
      encode_block<false>(in + b, out + b, len, e, random + b, square);
    }
  }
}

// Low-precision params with fp32 state that round stochastically: the compact path with
// the moments stored as they are.
void load_moment(const float* in, float* out, int64_t n, const float*, bool) {
  std::copy_n(in, n, out);
}

void store_moment(const float* in, float* out, int64_t n, float*, const uint32_t*, bool, bool) {
  std::copy_n(in, n, out);
}

// A low-precision param from the fp32 tile: to nearest, or stochastically.
template <typename scalar_t>
void store_param(const float* in, scalar_t* out, int64_t n, const uint32_t* random,
                 bool stochastic) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (stochastic) {
      float rounded[kTile];
      for (int64_t j = 0; j < n; ++j) {
        rounded[j] = std::is_same_v<scalar_t, at::BFloat16> ? stochastic_bfloat16(in[j], random[j])
                                                            : stochastic_float16(in[j], random[j]);
      }
      at::vec::convert(rounded, out, n);
      return;
    }
  }
  at::vec::convert(in, out, n);
}

// The data of one compact slice, from element `begin` of its tensor.
template <typename scalar_t, typename state_t>
struct CompactSlice {
  scalar_t* p;
  const scalar_t* g;
  state_t *m, *v;
  float *m_scales, *v_scales;  // 8-bit state: the scales of the slice's first block
  int64_t begin, n;
};

// Updates a slice of a tensor with compact state (bf16 or 8-bit), tile by tile in fp32.
template <typename scalar_t, typename state_t>
void update_compact_slice(const CompactSlice<scalar_t, state_t>& s, const Constants<float>& c,
                          bool l2, const Rounding& rounding) {
  float p_tile[kTile], g_tile[kTile], m_tile[kTile], v_tile[kTile];
  uint32_t moment_random[kTile], param_random[kTile];
  for (int64_t t = 0; t < s.n; t += kTile) {
    const int64_t len = std::min(kTile, s.n - t);
    const int64_t first_block = t / kBlock;
    float* p = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(s.p + t) : p_tile;
    if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(s.p + t, p_tile, len);
    const float* g = g_tile;
    if constexpr (std::is_same_v<scalar_t, float>) {
      g = s.g + t;
    } else {
      at::vec::convert(s.g + t, g_tile, len);
    }
    load_moment(s.m + t, m_tile, len, s.m_scales + first_block, false);
    load_moment(s.v + t, v_tile, len, s.v_scales + first_block, true);
    update_span(p, g, m_tile, v_tile, len, c, l2);
    if (rounding.moments) {
      fill_random(moment_random, len, rounding.seed, rounding.step, 0, s.begin + t);
    }
    store_moment(m_tile, s.m + t, len, s.m_scales + first_block, moment_random, rounding.moments,
                 false);
    store_moment(v_tile, s.v + t, len, s.v_scales + first_block, moment_random, rounding.moments,
                 true);
    if (rounding.param)
      fill_random(param_random, len, rounding.seed, rounding.step, 1, s.begin + t);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      store_param(p_tile, s.p + t, len, param_random, rounding.param);
    }
  }
}

double scalar_value(const std::optional<at::Tensor>& t, double otherwise) {
  return t.has_value() ? t->item<double>() : otherwise;
}

struct Slice {
  size_t tensor;
  int64_t begin, end;
};

// Every tensor of a group split into slices; each tensor's step incremented and its constants.
template <typename T>
std::vector<Slice> prepare(const TensorLists& lists, const std::vector<size_t>& indices,
                           const Hyper& hyper, double lr, double inv_grad_scale,
                           std::vector<Constants<T>>& constants) {
  std::vector<Slice> slices;
  for (size_t i : indices) {
    // Plain stores, not add_/item: a dispatcher call per tensor would cost more than the
    // update of a small tensor.
    float* step = lists.steps[i].data_ptr<float>();
    *step += 1.0f;
    constants[i] = math_constants<T>(make_constants(hyper, lr, inv_grad_scale, *step));
    const int64_t numel = lists.params[i].numel();
    for (int64_t begin = 0; begin < numel; begin += kSlice) {
      slices.push_back({i, begin, std::min(numel, begin + kSlice)});
    }
  }
  return slices;
}

// A group whose state is in the math type: today's update.
template <typename scalar_t>
void run_full_state(const TensorLists& lists, const std::vector<size_t>& indices,
                    const Hyper& hyper, double lr, double inv_grad_scale, bool l2) {
  using T = at::opmath_type<scalar_t>;
  std::vector<Constants<T>> constants(lists.params.size());
  const std::vector<Slice> slices = prepare(lists, indices, hyper, lr, inv_grad_scale, constants);
  at::parallel_for(0, static_cast<int64_t>(slices.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const auto& s = slices[k];
      const int64_t b = s.begin;
      update_slice(lists.params[s.tensor].data_ptr<scalar_t>() + b,
                   lists.grads[s.tensor].const_data_ptr<scalar_t>() + b,
                   lists.exp_avgs[s.tensor].data_ptr<T>() + b,
                   lists.exp_avg_sqs[s.tensor].data_ptr<T>() + b, s.end - b, constants[s.tensor],
                   l2);
    }
  });
}

float* scales_at(const at::Tensor& scales, int64_t begin) {
  return scales.defined() ? scales.data_ptr<float>() + begin / kBlock : nullptr;
}

// A group with bf16 (state_t = at::BFloat16) or 8-bit (uint8_t) state.
template <typename scalar_t, typename state_t>
void run_compact_state(const TensorLists& lists, const std::vector<size_t>& indices,
                       const Hyper& hyper, double lr, double inv_grad_scale, bool l2) {
  std::vector<Constants<float>> constants(lists.params.size());
  const std::vector<Slice> slices = prepare(lists, indices, hyper, lr, inv_grad_scale, constants);
  const bool param_rounds = !std::is_same_v<scalar_t, float>;
  at::parallel_for(0, static_cast<int64_t>(slices.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const auto& sl = slices[k];
      const size_t i = sl.tensor;
      const int64_t b = sl.begin;
      const CompactSlice<scalar_t, state_t> s{
          lists.params[i].data_ptr<scalar_t>() + b,
          lists.grads[i].const_data_ptr<scalar_t>() + b,
          static_cast<state_t*>(lists.exp_avgs[i].data_ptr()) + b,
          static_cast<state_t*>(lists.exp_avg_sqs[i].data_ptr()) + b,
          scales_at(lists.exp_avg_scales[i], b),
          scales_at(lists.exp_avg_sq_scales[i], b),
          b,
          sl.end - b};
      const Rounding rounding{lists.seeds[i],
                              static_cast<uint32_t>(*lists.steps[i].data_ptr<float>()),
                              hyper.stochastic, hyper.stochastic && param_rounds};
      update_compact_slice(s, constants[i], l2, rounding);
    }
  });
}

template <typename scalar_t>
void run_group(const TensorLists& lists, at::ScalarType state, const std::vector<size_t>& indices,
               const Hyper& hyper, double lr, double inv_grad_scale, bool l2) {
  constexpr bool low_precision =
      std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
  if constexpr (std::is_same_v<scalar_t, double>) {
    run_full_state<scalar_t>(lists, indices, hyper, lr, inv_grad_scale, l2);
  } else if (state == at::kBFloat16) {
    run_compact_state<scalar_t, at::BFloat16>(lists, indices, hyper, lr, inv_grad_scale, l2);
  } else if (state == at::kByte) {
    run_compact_state<scalar_t, uint8_t>(lists, indices, hyper, lr, inv_grad_scale, l2);
  } else if (low_precision && hyper.stochastic) {
    run_compact_state<scalar_t, float>(lists, indices, hyper, lr, inv_grad_scale, l2);
  } else {
    run_full_state<scalar_t>(lists, indices, hyper, lr, inv_grad_scale, l2);
  }
}

void adax_cpu_impl(const TensorLists& lists, const std::optional<at::Tensor>& lr_tensor,
                   const Hyper& hyper, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  // GradScaler found an inf/NaN: skip the step, step counts included.
  if (scalar_value(found_inf, 0.0) != 0.0) return;
  const double lr = scalar_value(lr_tensor, hyper.lr);
  const double inv_grad_scale = 1.0 / scalar_value(grad_scale, 1.0);
  const bool l2 = !hyper.decoupled && hyper.weight_decay != 0.0;
  for (const auto& [types, indices] : group_by_dtype(lists)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, types.first, "adax_cpu", [&] {
      run_group<scalar_t>(lists, types.second, indices, hyper, lr, inv_grad_scale, l2);
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("adax_", &Overloads<at::kCPU, &adax_cpu_impl>::scalar_lr);
  m.impl("adax_.tensor_lr", &Overloads<at::kCPU, &adax_cpu_impl>::tensor_lr);
}

}  // namespace kxops::adax
