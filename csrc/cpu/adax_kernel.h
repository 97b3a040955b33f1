// AdaX / AdaX-W step on CPU: every tensor split into fixed-size slices, the slices of all
// tensors spread over threads with one parallel_for; each slice updated with at::vec in the
// math type (fp16/bf16 params and grads staged through fp32 tiles). Compact state (bf16 or
// 8-bit moments, adax_math.h) of fp32 params is decoded, updated and encoded in registers in
// one pass (8-bit: per block); with fp16/bf16 params it is decoded into fp32 tiles, updated as
// fp32 state is, and encoded back, the random words of stochastic rounding drawn per tile.
//
// The kernel body: every file that includes it compiles one copy, for the CPU capability its
// CPU_CAPABILITY macros name (adax.cpp: the build's baseline, adax_avx512.cpp: AVX-512, where
// at::vec::Vectorized<float> has 16 lanes), as kxops::adax::<capability>::step; the rest has
// internal linkage, so that no copy's code stands in for another's. adax.cpp picks the copy
// at run time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "adax_host.h"
#include "adax_math.h"
#include "cpu/vec_math.h"

namespace kxops::adax {
namespace {

using at::vec::Vectorized;

constexpr int64_t kSlice = 16384;  // elements per parallel work item
constexpr int64_t kTile = 512;     // fp32 staging tile for fp16/bf16 params

// Software prefetch of every stream this many elements ahead: with four to six streams per
// thread the hardware prefetchers alone leave the step well short of the cache's bandwidth
// (bench_adax.py measures the step). The address is formed as an integer: it may lie past
// the end of the tensor, where a prefetch is a no-op but a pointer would be undefined.
constexpr int64_t kPrefetchElements = 1024;

template <typename... Element>
[[gnu::always_inline]] inline void prefetch_ahead(int64_t j, const Element*... streams) {
  (__builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(streams + j) +
                                                    kPrefetchElements * sizeof(Element))),
   ...);
}

// Updates n elements whose params and grads are already in the math type T.
template <typename T>
void update_span(T* p, const T* g, T* m, T* v, int64_t n, const Constants<T>& c, bool l2) {
  using Vec = Vectorized<T>;
  const auto cv = Constants<Vec>::broadcast(c);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    prefetch_ahead(j, p, g, m, v);
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

// Random words of n consecutive elements from index `first` (no slice crosses 2^32).
void fill_random(uint32_t* out, int64_t n, uint64_t seed, uint32_t step, uint32_t stream,
                 int64_t first) {
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
void store_stochastic_bfloat16(const float* __restrict in, uint16_t* __restrict out, int64_t n,
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

// The largest of acc's lanes and the magnitudes of n more values, NaN if any is NaN.
float finish_absmax(const Vectorized<float>& acc, const float* rest, int64_t n) {
  float lanes[Vectorized<float>::size()];
  acc.store(lanes);
  float out = 0.0f;
  const auto take = [&out](float x) { out = x != x || x > out ? x : out; };
  for (float x : lanes) take(x);
  for (int64_t j = 0; j < n; ++j) take(std::fabs(rest[j]));
  return out;
}

// The largest magnitude of n values, NaN if any is NaN (as torch.amax in the reference).
float block_absmax(const float* in, int64_t n) {
  using Vec = Vectorized<float>;
  Vec acc(0.0f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    acc = at::vec::maximum(acc, Vec::loadu(in + j).abs());
  }
  return finish_absmax(acc, in + j, n - j);
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

// ---------------------------------------------------------------------------------------------
// fp32 params with compact moments: one pass over memory, each vector of elements decoded,
// updated and encoded in registers (8-bit: per 128-element block, the new moments parked in
// L1 until the block's scale is known). The integer side of at::vec's float lanes is written
// with GCC/Clang vector types: they have the logical shifts, unsigned compares and per-lane
// shift counts of the formats' scalar code (adax_math.h), which these lanes compute bit for
// bit. Which elements take the vector update and the vector bf16 conversion is as in the
// tiled path above (both round alike, but the lanes are kept where they were).

constexpr int kLanes = Vectorized<float>::size();
using Vec = Vectorized<float>;
typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef uint16_t HalfWords __attribute__((vector_size(2 * kLanes)));
typedef uint8_t Bytes __attribute__((vector_size(kLanes)));

template <typename To, typename From>
To bit_cast_lanes(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  if constexpr (std::is_same_v<To, Vec>) {
    return Vec::loadu(&from);
  } else if constexpr (std::is_same_v<From, Vec>) {
    To to;
    from.store(&to);
    return to;
  } else {
    To to;
    std::memcpy(&to, &from, sizeof to);
    return to;
  }
}

template <typename Lanes, typename Element>
Lanes load_lanes(const Element* in) {
  static_assert(sizeof(Lanes) == kLanes * sizeof(Element));
  Lanes out;
  std::memcpy(&out, in, sizeof out);
  return out;
}

template <typename Lanes, typename Element>
void store_lanes(const Lanes& lanes, Element* out) {
  static_assert(sizeof(Lanes) == kLanes * sizeof(Element));
  std::memcpy(out, &lanes, sizeof lanes);
}

// kLanes codes widened to words and back. GCC scalarises these conversions of 8-byte vectors:
// with AVX2 (8 lanes) a zero-extending load and two saturating packs (codes are <= 255); with
// AVX-512 (16 lanes) one widening load and one narrowing store.
Words load_code_lanes(const uint8_t* in) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kLanes == 16) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
    return bit_cast_lanes<Words>(_mm512_cvtepu8_epi32(bytes));
  }
#elif defined(__AVX2__)
  if constexpr (kLanes == 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
    return bit_cast_lanes<Words>(_mm256_cvtepu8_epi32(bytes));
  }
#endif
  return __builtin_convertvector(load_lanes<Bytes>(in), Words);
}

void store_code_lanes(Words codes, uint8_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kLanes == 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm512_cvtepi32_epi8(bit_cast_lanes<__m512i>(codes)));
    return;
  }
#elif defined(__AVX2__)
  if constexpr (kLanes == 8) {
    const auto words = bit_cast_lanes<__m256i>(codes);
    const __m128i halves =
        _mm_packus_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(halves, halves));
    return;
  }
#endif
  store_lanes(__builtin_convertvector(codes, Bytes), out);
}

// The element indices 0, 1, ..., kLanes - 1, added to a vector's first index.
template <size_t... k>
constexpr Words lane_offsets(std::index_sequence<k...>) {
  return Words{static_cast<uint32_t>(k)...};
}
constexpr Words kLaneOffsets = lane_offsets(std::make_index_sequence<kLanes>());

// The random words (random_bits) of consecutive vectors of elements from index `first`: the
// indices' products with kIndexMultiplier carried from vector to vector by one addition.
class RandomLanes {
 public:
  RandomLanes(uint32_t key, uint32_t first)
      : key_(key), spread_((first + kLaneOffsets) * kIndexMultiplier) {}

  [[gnu::always_inline]] Words next() {
    const Words word = mix32(key_ ^ spread_);
    spread_ += static_cast<uint32_t>(kLanes) * kIndexMultiplier;
    return word;
  }

 private:
  uint32_t key_;
  Words spread_;
};

Vec load_bfloat16_lanes(const at::BFloat16* in) {
  const Words bits = __builtin_convertvector(load_lanes<HalfWords>(in), Words) << 16;
  return bit_cast_lanes<Vec>(bits);
}

// stochastic_bfloat16 of each lane, stored as bf16 bits.
void store_stochastic_bfloat16_lanes(const Vec& x, Words random, at::BFloat16* out) {
  const Words bits = bit_cast_lanes<Words>(x);
  const Words rounded = (bits + (random >> 16)) & 0xffff0000U;  // round_mantissa(bits, 7, ...)
  const Words kept = (bits & 0x7fffffffU) > 0x7f800000U ? bits : rounded;  // NaN stays NaN
  store_lanes(__builtin_convertvector(kept >> 16, HalfWords), out);
}

// bf16 moments of n elements of an fp32 param, from element index `first` of its tensor.
template <bool kStochastic, bool kL2>
void update_bfloat16_state(float* p, const float* g, at::BFloat16* m, at::BFloat16* v, int64_t n,
                           const Constants<float>& c, uint32_t key, uint32_t first) {
  const auto cv = Constants<Vec>::broadcast(c);
  const auto step_lanes = [&](int64_t j, Vec& mv, Vec& vv) {
    prefetch_ahead(j, p, g, m, v);
    Vec pv = Vec::loadu(p + j);
    mv = load_bfloat16_lanes(m + j);
    vv = load_bfloat16_lanes(v + j);
    update(pv, Vec::loadu(g + j), mv, vv, cv, kL2);
    pv.store(p + j);
  };
  int64_t j = 0;
  Vec m0, v0, m1, v1;
  if constexpr (kStochastic) {
    RandomLanes random(key, first);
    for (; j + kLanes <= n; j += kLanes) {
      step_lanes(j, m0, v0);
      const Words word = random.next();
      store_stochastic_bfloat16_lanes(m0, mean_random(word), m + j);
      store_stochastic_bfloat16_lanes(v0, square_random(word), v + j);
    }
  } else {
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) {  // at::vec's bf16 width: two float vectors
      step_lanes(j, m0, v0);
      step_lanes(j + kLanes, m1, v1);
      at::vec::convert_float_bfloat16(m0, m1).store(m + j);
      at::vec::convert_float_bfloat16(v0, v1).store(v + j);
    }
    for (; j + kLanes <= n; j += kLanes) {
      float m_lanes[kLanes], v_lanes[kLanes];
      step_lanes(j, m0, v0);
      m0.store(m_lanes);
      v0.store(v_lanes);
      for (int k = 0; k < kLanes; ++k) {
        m[j + k] = m_lanes[k];
        v[j + k] = v_lanes[k];
      }
    }
  }
  for (; j < n; ++j) {
    float mj = m[j], vj = v[j];
    update(p[j], g[j], mj, vj, c, kL2);
    if constexpr (kStochastic) {
      const uint32_t word = random_bits(key, first + static_cast<uint32_t>(j));
      mj = stochastic_bfloat16(mj, mean_random(word));
      vj = stochastic_bfloat16(vj, square_random(word));
    }
    m[j] = mj;
    v[j] = vj;
  }
}

// decode_magnitude of kLanes codes at a block's scale exponent, bit for bit, from each code's
// value as a float: its exponent field is floor(log2(code)) + 127 and its mantissa the code's
// bits below the leading 1, i.e. the octave's two bits and then the kept mantissa. Shifted
// left by two, the exponent field holds 4 floor(log2(code)) + the two bits (the octave, up
// to a constant) and the mantissa field the kept bits in place; one addition (mod 2^32, as
// decode_magnitude's unsigned arithmetic) moves the exponent to the block's scale. Codes
// 0..3 decode to 0.
template <int kWidth>
[[gnu::always_inline]] inline Words decode_magnitude_lanes(Words code, uint32_t scale_exp) {
  const Words as_float =
      bit_cast_lanes<Words>(__builtin_convertvector(bit_cast_lanes<Ints>(code), Floats));
  // (scale_exp - 1 - octave) << 23 with octave = 4 (kWidth - 3) + 3 + 516 - (as_float >> 21).
  const uint32_t offset = (scale_exp - 520U - 4U * (kWidth - 3)) << 23;
  return code < 4U ? Words{} : (as_float << 2) + offset;
}

// The values of kLanes codes of m (sign bit and 7 magnitude bits) or v_hat (8 bits).
template <bool kSquare>
[[gnu::always_inline]] inline Vec decode_lanes(const uint8_t* in, uint32_t scale_exp) {
  const Words code = load_code_lanes(in);
  if constexpr (kSquare) {
    return bit_cast_lanes<Vec>(decode_magnitude_lanes<kSquareWidth>(code, scale_exp));
  } else {
    const Words magnitude = decode_magnitude_lanes<kMeanWidth>(code & 0x7fU, scale_exp);
    // decode_mean negates: the sign bit flipped, also where an exponent outside the
    // format's (a scale the optimizer never writes) wrapped into it.
    return bit_cast_lanes<Vec>(magnitude ^ ((code & 0x80U) << 24));
  }
}

// The magnitudes' bits, of which the largest (as unsigned integers) is the largest magnitude,
// or a NaN if any lane is NaN (NaN's bits lie above inf's): what scale_exponent needs of a
// block's torch.amax.
[[gnu::always_inline]] inline Words magnitude_bits(const Vec& x) {
  return bit_cast_lanes<Words>(x) & 0x7fffffffU;
}

float largest_magnitude(Words acc, const float* rest, int64_t n) {
  uint32_t out = 0U;
  for (int k = 0; k < kLanes; ++k) out = std::max(out, acc[k]);
  for (int64_t j = 0; j < n; ++j) out = std::max(out, float_bits(rest[j]) & 0x7fffffffU);
  return bits_float(out);
}

// What encode_magnitude derives from an octave below the scale (0 .. octaves_of(width) - 1):
// the mantissa bits dropped (23 - kept) and the code's leading bits (1 and the octave's two
// low bits inverted) placed above the kept mantissa. With AVX-512 a table indexed by the
// octave's low 5 bits, one two-register permute per lookup; with AVX2 (8-lane permutes only,
// gathers that cost more than the formulas) the formulas on the clamped octave. Outside
// 0 .. octaves_of(width) - 1 the two differ, where encode_magnitude_lanes discards the result.
struct CodeTable {
  uint32_t drop[32], lead[32];
};

template <int kWidth>
constexpr CodeTable code_table() {
  CodeTable t{};
  for (int i = 0; i < 32; ++i) {
    const int octave = i < octaves_of(kWidth) ? i : octaves_of(kWidth) - 1;
    const int keep = kWidth - 3 - (octave >> 2);
    t.drop[i] = static_cast<uint32_t>(23 - keep);
    t.lead[i] = (7U - static_cast<uint32_t>(octave & 3)) << keep;
  }
  return t;
}

#if defined(CPU_CAPABILITY_AVX512)
[[gnu::always_inline]] inline Words lookup_lanes(const uint32_t (&table)[32], Ints octave) {
  static_assert(kLanes == 16);
  return bit_cast_lanes<Words>(_mm512_permutex2var_epi32(
      _mm512_loadu_si512(table), bit_cast_lanes<__m512i>(octave), _mm512_loadu_si512(table + 16)));
}
#endif

// The dropped bits and the code's leading bits (CodeTable) of each lane's octave.
struct OctaveBits {
  Words drop, lead;
};

template <int kWidth>
[[gnu::always_inline]] inline OctaveBits octave_bits_lanes(Ints octave) {
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr CodeTable table = code_table<kWidth>();
  return {lookup_lanes(table.drop, octave), lookup_lanes(table.lead, octave)};
#else
  const Ints low = octave < 0 ? 0 : octave;
  const Ints clamped = low >= octaves_of(kWidth) ? octaves_of(kWidth) - 1 : low;
  const Words keep = bit_cast_lanes<Words>(kWidth - 3 - (clamped >> 2));
  return {23U - keep, (7U - bit_cast_lanes<Words>(octave & 3)) << keep};
#endif
}

// encode_magnitude of each lane's magnitude bits, bit for bit (see there for the why of each
// step). Only octaves 0 .. octaves_of(kWidth) - 1 need their rounding: an octave past the
// last gives the `below` code and one above the scale (inf, NaN, or v_hat's sign bit set)
// `largest`, whatever was rounded.
template <int kWidth, bool kStochastic, bool kKeepNonzero>
[[gnu::always_inline]] inline Words encode_magnitude_lanes(Words bits, uint32_t scale_exp,
                                                           Words random) {
  const int top = static_cast<int>(scale_exp) - 1;
  const Ints octave = top - bit_cast_lanes<Ints>(bits >> 23);
  const Words drop = octave_bits_lanes<kWidth>(octave).drop;
  const Words kept = (Words{} + 0xffffffffU) << drop;
  Words add;
  if constexpr (kStochastic) {
    add = random >> (32U - drop);
  } else {
    add = (~kept >> 1) + ((bits >> drop) & 1U);
  }
  const Words rounded = (bits + add) & kept;
  const Ints rounded_octave = top - bit_cast_lanes<Ints>(rounded >> 23);
  const OctaveBits rounded_bits = octave_bits_lanes<kWidth>(rounded_octave);
  const Words code = rounded_bits.lead | ((rounded & 0x7fffffU) >> rounded_bits.drop);
  const float unit =
      bits_float((254U - scale_exp + static_cast<uint32_t>(octaves_of(kWidth))) << 23);
  const Words ratio = bit_cast_lanes<Words>(bit_cast_lanes<Floats>(bits) * unit);
  Words threshold = Words{} + float_bits(0.5f);
  if constexpr (kStochastic) {
    const Floats fraction = __builtin_convertvector(bit_cast_lanes<Ints>(random >> 8), Floats);
    threshold = bit_cast_lanes<Words>(fraction * (1.0f / 16777216.0f));
  }
  // A zero's ratio (0) is above no threshold (>= 0): the scalar's `bits != 0` test is implied.
  const Ints below = kKeepNonzero ? (bits != 0U) : (ratio > threshold);
  const Words largest = Words{} + ((1U << kWidth) - 1U);
  const Words in_range = rounded_octave < 0 ? largest : code;
  const Words inside = octave < 0 ? largest : in_range;
  return octave >= octaves_of(kWidth) ? (below != 0 ? Words{} + 4U : Words{}) : inside;
}

// One block's codes from its new fp32 moments (encode_mean / encode_square of each element).
template <bool kStochastic>
[[gnu::always_inline]] inline void encode_block_lanes(const float* m_in, const float* v_in,
                                                      uint8_t* m_out, uint8_t* v_out, int64_t n,
                                                      uint32_t m_exp, uint32_t v_exp, uint32_t key,
                                                      uint32_t first) {
  int64_t j = 0;
  RandomLanes random(key, first);
  for (; j + kLanes <= n; j += kLanes) {
    const Words word = kStochastic ? random.next() : Words{};
    const Words m_bits = load_lanes<Words>(m_in + j);
    const Words m_magnitude = encode_magnitude_lanes<kMeanWidth, kStochastic, false>(
        m_bits & 0x7fffffffU, m_exp, mean_random(word));
    const Words m_code = m_magnitude != 0U ? m_magnitude | ((m_bits >> 31) << 7) : m_magnitude;
    const Words v_code = encode_magnitude_lanes<kSquareWidth, kStochastic, true>(
        load_lanes<Words>(v_in + j), v_exp, square_random(word));
    store_code_lanes(m_code, m_out + j);
    store_code_lanes(v_code, v_out + j);
  }
  for (; j < n; ++j) {
    const uint32_t word = kStochastic ? random_bits(key, first + static_cast<uint32_t>(j)) : 0U;
    m_out[j] = encode_mean(m_in[j], m_exp, mean_random(word), kStochastic);
    v_out[j] = encode_square(v_in[j], v_exp, square_random(word), kStochastic);
  }
}

// 8-bit moments of a slice of an fp32 param, block by block: decode and update in one pass
// (the new moments into L1 buffers), then the block's scales and codes.
template <bool kStochastic, bool kL2>
void update_eight_bit_state(const CompactSlice<float, uint8_t>& s, const Constants<float>& c,
                            uint32_t key) {
  const auto cv = Constants<Vec>::broadcast(c);
  float m_new[kBlock], v_new[kBlock];
  for (int64_t b = 0; b < s.n; b += kBlock) {
    const int64_t n = std::min(kBlock, s.n - b);
    float* p = s.p + b;
    const float* g = s.g + b;
    const uint8_t* m = s.m + b;
    const uint8_t* v = s.v + b;
    const uint32_t m_exp_in = stored_scale_exponent(s.m_scales[b / kBlock]);
    const uint32_t v_exp_in = stored_scale_exponent(s.v_scales[b / kBlock]);
    int64_t j = 0;
    Words m_max{}, v_max{};  // the block's largest magnitudes (magnitude_bits), in one pass
    for (; j + kLanes <= n; j += kLanes) {
      prefetch_ahead(j, p, g, m, v);
      Vec pv = Vec::loadu(p + j), mv = decode_lanes<false>(m + j, m_exp_in);
      Vec vv = decode_lanes<true>(v + j, v_exp_in);
      update(pv, Vec::loadu(g + j), mv, vv, cv, kL2);
      pv.store(p + j);
      mv.store(m_new + j);
      vv.store(v_new + j);
      m_max = m_max > magnitude_bits(mv) ? m_max : magnitude_bits(mv);
      v_max = v_max > magnitude_bits(vv) ? v_max : magnitude_bits(vv);
    }
    const int64_t vector_end = j;
    for (; j < n; ++j) {
      m_new[j] = decode_mean(m[j], m_exp_in);
      v_new[j] = decode_square(v[j], v_exp_in);
      update(p[j], g[j], m_new[j], v_new[j], c, kL2);
    }
    const uint32_t m_scale =
        scale_exponent(largest_magnitude(m_max, m_new + vector_end, n - vector_end), kMeanWidth);
    const uint32_t v_scale =
        scale_exponent(largest_magnitude(v_max, v_new + vector_end, n - vector_end), kSquareWidth);
    s.m_scales[b / kBlock] = scale_value(m_scale);
    s.v_scales[b / kBlock] = scale_value(v_scale);
    encode_block_lanes<kStochastic>(m_new, v_new, s.m + b, s.v + b, n, m_scale, v_scale, key,
                                    static_cast<uint32_t>(s.begin + b));
  }
}

// fp32 params with bf16 or 8-bit moments: the one-pass kernels above. No slice crosses 2^32.
template <typename state_t>
void update_fp32_param_slice(const CompactSlice<float, state_t>& s, const Constants<float>& c,
                             bool l2, const Rounding& rounding) {
  const uint32_t key = rounding.moments ? rounding_key(rounding.seed, rounding.step, 0,
                                                       static_cast<uint32_t>(s.begin >> 32))
                                        : 0U;
  const auto first = static_cast<uint32_t>(s.begin);
  // The rounding and the L2 term as template arguments: loops without branches, and the
  // update's multiply-adds formed as in the tiled path (which the compiler unswitches on l2).
  const auto run = [&](auto stochastic, auto with_l2) {
    if constexpr (std::is_same_v<state_t, at::BFloat16>) {
      update_bfloat16_state<stochastic(), with_l2()>(s.p, s.g, s.m, s.v, s.n, c, key, first);
    } else {
      update_eight_bit_state<stochastic(), with_l2()>(s, c, key);
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (rounding.moments) {
    l2 ? run(Yes{}, Yes{}) : run(Yes{}, No{});
  } else {
    l2 ? run(No{}, Yes{}) : run(No{}, No{});
  }
}

// Updates a slice of an fp16/bf16 param with compact state (or rounded stochastically), tile by
// tile in fp32.
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
      if constexpr (std::is_same_v<scalar_t, float> && !std::is_same_v<state_t, float>) {
        update_fp32_param_slice(s, constants[i], l2, rounding);
      } else {
        update_compact_slice(s, constants[i], l2, rounding);
      }
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

}  // namespace

namespace CPU_CAPABILITY {

void step(const TensorLists& lists, const std::optional<at::Tensor>& lr_tensor, const Hyper& hyper,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
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

}  // namespace CPU_CAPABILITY

}  // namespace kxops::adax
