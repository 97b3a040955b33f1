// AdaX / AdaX-W math shared by the CPU and CUDA kernels (docs/design.md §2).
//
// The state keeps v_hat = v / B_t with B_t = (1 + beta2)^t - 1, so per step
//   v_hat = (1 - beta2 / B_t) v_hat + (beta2 / B_t) g^2,   p -= lr m / (sqrt(v_hat) + eps /
//   sqrt(B_t))
// which is the authors' update without v's overflow. Only 1 / B_t is formed, in double: B_t
// itself overflows double near t = 7e6 for beta2 = 1e-4.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace kxops::adax {

// 1 / B_t = e^{-x} / (1 - e^{-x}) with x = t log1p(beta2): accurate for tiny beta2, any t.
KXOPS_HOST_DEVICE double inverse_bias_correction(double step, double beta2) {
  const double neg_x = -step * log1p(beta2);
  return exp(neg_x) / -expm1(neg_x);
}

// Everything one tensor's update needs besides its data, in the math type T (or a vector of
// it). g_scale folds maximize and GradScaler's 1/scale, g_divisor maximize and the scale: the
// other paths divide by the scale, which the multiply matches only where 1/scale is exact (a
// power of two, as GradScaler's own scales are), else divide_grad; p_decay is AdaX-W's 1 - lr wd (1
// for AdaX); l2_wd is AdaX's weight decay added to the gradient (0 for AdaX-W). m moves toward g as
// torch.lerp(m, g, 1 - beta1) does (math_constants): from g where mean_from_grad, with mean_weight
// the weight or the weight - 1.
template <typename T>
struct Constants {
  T lr, mean_weight, g_scale, g_divisor, l2_wd, p_decay, v_decay, v_weight, eps_term;
  bool mean_from_grad, divide_grad;

  template <typename U>
  KXOPS_HOST_DEVICE static Constants broadcast(const Constants<U>& c) {
    return {T(c.lr),       T(c.mean_weight), T(c.g_scale), T(c.g_divisor),
            T(c.l2_wd),    T(c.p_decay),     T(c.v_decay), T(c.v_weight),
            T(c.eps_term), c.mean_from_grad, c.divide_grad};
  }
};

struct Hyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool decoupled, maximize;
  bool stochastic;  // round every value stored in fewer bits than fp32 stochastically
};

// The constants of a tensor whose step count is `step` after the increment.
KXOPS_HOST_DEVICE Constants<double> make_constants(const Hyper& h, double lr, double inv_grad_scale,
                                                   double step) {
  const double inv_bc = inverse_bias_correction(step, h.beta2);
  Constants<double> c;
  c.lr = lr;
  c.mean_weight = 1.0 - h.beta1;  // math_constants picks torch.lerp's formula in T
  c.mean_from_grad = false;
  c.g_scale = h.maximize ? -inv_grad_scale : inv_grad_scale;
  c.g_divisor = 1.0 / c.g_scale;  // the scale itself: 1/(1/s) is within 2^-52 of s
  c.divide_grad = false;
  c.l2_wd = h.decoupled ? 0.0 : h.weight_decay;
  c.p_decay = h.decoupled ? 1.0 - lr * h.weight_decay : 1.0;
  c.v_decay = 1.0 - h.beta2 * inv_bc;
  c.v_weight = h.beta2 * inv_bc;
  c.eps_term = h.eps * sqrt(inv_bc);
  return c;
}

// The constants in the math type T (float or double). eps / sqrt(B_t) underflows as t grows
// (to 0 in float32 past ~1.5M steps at beta2 = 1e-4, in double past ~7e6): an element whose
// gradient has always been 0 would then get 0/0. The term is kept at least T's smallest normal
// number, so that element keeps the authors' zero update (0/eps); next to any non-zero
// sqrt(v_hat) (at least ~4e-23 in float32) the floor is far below rounding.
template <typename T>
KXOPS_HOST_DEVICE Constants<T> math_constants(const Constants<double>& c) {
  auto out = Constants<T>::broadcast(c);
  const T tiny = T(sizeof(T) == sizeof(float) ? FLT_MIN : DBL_MIN);
  if (out.eps_term < tiny) out.eps_term = tiny;  // a NaN eps stays NaN
  // torch.lerp(m, g, w) with w in T: m + w (g - m) for |w| < 0.5, else g + (w - 1)(g - m) (w -
  // 1 exact there): the formula of the reference and foreach paths, so that the stored moments
  // agree bit for bit for every beta1 (one formula for all differs in the last bit, and for
  // beta1 = 0 loses a g far below m: m + (g - m) = 0).
  out.mean_from_grad = !(out.mean_weight < T(0.5) && out.mean_weight > T(-0.5));
  if (out.mean_from_grad) out.mean_weight = out.mean_weight - T(1);
  int exponent;
  out.divide_grad = fabs(frexp(static_cast<double>(out.g_divisor), &exponent)) != 0.5;
  return out;
}

// a b + c rounded once, as torch's lerp and add(alpha=) form m and AdaX's L2 term in the other
// paths (CPU vectors: at::vec::fmadd, found by argument-dependent lookup). Spelled out, not
// left to floating-point contraction, which may fuse the gradient's scaling instead.
KXOPS_HOST_DEVICE float fmadd(float a, float b, float c) { return fmaf(a, b, c); }
KXOPS_HOST_DEVICE double fmadd(double a, double b, double c) { return fma(a, b, c); }

// One element (T = float/double) or one CPU vector (T = at::vec::Vectorized<...>, see
// cpu/vec_math.h). l2 is whether AdaX's weight decay term is added.
template <typename T>
KXOPS_HOST_DEVICE void update(T& p, T g, T& m, T& v, const Constants<T>& c, bool l2) {
  g = c.divide_grad ? g / c.g_divisor : g * c.g_scale;
  if (l2) g = fmadd(c.l2_wd, p, g);
  p = p * c.p_decay;
  m = fmadd(c.mean_weight, g - m, c.mean_from_grad ? g : m);
  v = v * c.v_decay + c.v_weight * g * g;  // (w g) g, as the loop's addcmul: g * g may overflow
  p = p - m / (square_root(v) + c.eps_term) * c.lr;
}

// ---------------------------------------------------------------------------------------------
// Compact state (docs/design.md §2, "AdaX state formats"). The math stays fp32; what is stored
// is rounded from it, to nearest (ties to even) or stochastically (unbiased: up with the
// probability of the remainder), with random bits from a counter-based generator keyed by
// (seed, step, element index): no generator state, so any thread, device or the plain-torch
// reference draws the same bits for an element.

// Elements per 8-bit block (one fp32 scale per block per moment): 2 + 8/128 bytes per param.
constexpr int64_t kBlock = 128;
// Magnitude bits of the 8-bit codes: v_hat is unsigned (8 bits), m signed (sign + 7 bits).
constexpr int kSquareWidth = 8;
constexpr int kMeanWidth = 7;

KXOPS_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

KXOPS_HOST_DEVICE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// Chris Wellons' "lowbias32" integer hash: a bijection of 32-bit words with low bias, five
// cheap vector operations per round (two multiplies, three shift-xors). Word: uint32_t, or a
// vector of them (the CPU kernel's lanes).
template <typename Word>
KXOPS_HOST_DEVICE Word mix32(Word x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The key of one tensor's step: seed (64 bits), step count, the stream (0: moments, 1: the
// param) and the high 32 bits of the element index. Formed once per tensor (or slice).
KXOPS_HOST_DEVICE uint32_t rounding_key(uint64_t seed, uint32_t step, uint32_t stream,
                                        uint32_t index_high) {
  uint32_t k = mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(seed >> 32)));
  k = mix32(k ^ step);
  k = mix32(k ^ stream);
  return mix32(k ^ index_high);
}

// The odd constant (2^32 / golden ratio) that spreads consecutive indices before the hash.
constexpr uint32_t kIndexMultiplier = 0x9e3779b9U;

// 32 random bits of the element with index (low 32 bits) under key (Word as in mix32).
template <typename Word>
KXOPS_HOST_DEVICE Word random_bits(uint32_t key, Word index) {
  return mix32<Word>(key ^ (index * kIndexMultiplier));
}

// The two moments share one random word: m takes its low half, v_hat its high half, each
// placed in the high bits of a 32-bit word (round_mantissa takes random bits from the top).
template <typename Word>
KXOPS_HOST_DEVICE Word mean_random(Word word) {
  return word << 16;
}
template <typename Word>
KXOPS_HOST_DEVICE Word square_random(Word word) {
  return word & 0xffff0000U;
}

// fp32 bits rounded to `keep` (0..22) mantissa bits: the dropped bits become 0 after adding
// either the top 23 - keep bits of `random` (stochastic: up with the probability of the
// remainder, exact to 2^-16 of a step when 16 random bits are given) or half a step (to
// nearest, ties to even). A carry moves into the exponent, as it should. Not for NaN.
KXOPS_HOST_DEVICE uint32_t round_mantissa(uint32_t bits, int keep, uint32_t random,
                                          bool stochastic) {
  const int drop = 23 - keep;
  const uint32_t mask = (1U << drop) - 1U;
  const uint32_t add = stochastic ? random >> (32 - drop) : (mask >> 1) + ((bits >> drop) & 1U);
  return (bits + add) & ~mask;
}

KXOPS_HOST_DEVICE bool is_nan_bits(uint32_t bits) { return (bits & 0x7fffffffU) > 0x7f800000U; }

// x rounded stochastically to bfloat16, as the fp32 value of the result (exactly
// representable: the conversion that stores it is exact). NaN stays NaN.
KXOPS_HOST_DEVICE float stochastic_bfloat16(float x, uint32_t random) {
  const uint32_t bits = float_bits(x);
  return is_nan_bits(bits) ? x : bits_float(round_mantissa(bits, 7, random, true));
}

// x rounded stochastically to float16 (as an fp32 value fp16 holds exactly, or one whose
// conversion overflows to inf as round-to-nearest would): 10 mantissa bits down to 2^-14,
// then a fixed step of 2^-24 (fp16's subnormals); below 2^-24, 0 or 2^-24.
KXOPS_HOST_DEVICE float stochastic_float16(float x, uint32_t random) {
  const uint32_t bits = float_bits(x);
  const int exponent = static_cast<int>((bits >> 23) & 0xffU) - 127;
  const int keep = exponent >= -14 ? 10 : 24 + exponent;
  const float rounded = bits_float(round_mantissa(bits, keep < 0 ? 0 : keep, random, true));
  const float magnitude = fabsf(x) * 16777216.0f;  // in units of 2^-24, < 1 where keep < 0
  const float fraction =
      static_cast<float>(static_cast<int32_t>(random >> 8)) * (1.0f / 16777216.0f);
  const uint32_t up = float_bits(fraction) < float_bits(magnitude) ? 0x33800000U : 0U;  // 2^-24
  const float tiny = bits_float(up | (bits & 0x80000000U));
  return is_nan_bits(bits) ? x : (keep < 0 ? tiny : rounded);
}

// The 8-bit code maps. A block's scale is a power of two above its largest magnitude (at
// least 2^-100, so that every decoded value is a normal float); magnitudes are a float format
// relative to it whose precision falls with the distance from the top: octaves in groups of
// four, the first group (just below the scale) with width - 3 mantissa bits, each next group
// one bit fewer, down to 0 bits. v_hat (width 8): 32 levels per octave over the top 4
// octaves, 24 octaves in all; m (width 7, plus a sign bit): 16 levels per octave at the top,
// 20 octaves. Code 0 is 0; codes 1..3 are unused.
KXOPS_HOST_DEVICE uint32_t scale_exponent(float absmax, int width) {
  const uint32_t bits = float_bits(absmax);
  const uint32_t e = (bits >> 23) & 0xffU;  // NaN/inf: 255
  // From the largest code up (2 - 2^-top_bits times 2^(e-127)), the next power: so that no
  // value of the block rounds up past the largest code, which would have to be clamped (a
  // bias that stops a growing block at its scale).
  const uint32_t top_mantissa = ((1U << (width - 3)) - 1U) << (23 - (width - 3));
  const uint32_t k = e + 1U + ((bits & 0x7fffffU) >= top_mantissa ? 1U : 0U);
  return k < 27U ? 27U : (k > 254U ? 254U : k);
}

KXOPS_HOST_DEVICE float scale_value(uint32_t scale_exp) { return bits_float(scale_exp << 23); }

// The scale's biased exponent from a stored scale (0 for a block never written: all codes 0).
KXOPS_HOST_DEVICE uint32_t stored_scale_exponent(float scale) {
  return (float_bits(scale) >> 23) & 0xffU;
}

KXOPS_HOST_DEVICE constexpr int octaves_of(int width) { return 4 * (width - 2); }

KXOPS_HOST_DEVICE uint32_t select_bits(bool condition, uint32_t if_true, uint32_t if_false) {
  const uint32_t mask = 0U - static_cast<uint32_t>(condition);
  return (if_true & mask) | (if_false & ~mask);
}

KXOPS_HOST_DEVICE int clamp_octave(int octave, int width) {
  return octave < 0 ? 0 : (octave >= octaves_of(width) ? octaves_of(width) - 1 : octave);
}

// The code of a magnitude a >= 0 (not NaN). Below the smallest level (2^-octaves of the
// scale), keep_nonzero (v_hat) gives the smallest code, so that a non-zero v_hat never
// becomes 0; otherwise (m) 0 or the smallest level, stochastically or to nearest. Branch-free
// (selects only), so that the CPU loops vectorise.
KXOPS_HOST_DEVICE uint32_t encode_magnitude(float a, uint32_t scale_exp, int width, uint32_t random,
                                            bool stochastic, bool keep_nonzero) {
  const int top_bits = width - 3;
  const int top = static_cast<int>(scale_exp) - 1;
  const uint32_t bits = float_bits(a);
  const int octave = top - static_cast<int>(bits >> 23);
  const uint32_t rounded =
      round_mantissa(bits, top_bits - (clamp_octave(octave, width) >> 2), random, stochastic);
  const int rounded_octave = top - static_cast<int>(rounded >> 23);
  const int keep = top_bits - (clamp_octave(rounded_octave, width) >> 2);
  const uint32_t code =
      ((7U - static_cast<uint32_t>(clamp_octave(rounded_octave, width) & 3)) << keep) |
      ((rounded & 0x7fffffU) >> (23 - keep));
  // a relative to the smallest level, exact (a power-of-two multiply), < 1 where used.
  const float ratio =
      a * bits_float((254U - scale_exp + static_cast<uint32_t>(octaves_of(width))) << 23);
  const float threshold =
      stochastic ? static_cast<float>(static_cast<int32_t>(random >> 8)) * (1.0f / 16777216.0f)
                 : 0.5f;
  // Non-negative floats order as their bits: integer compares keep the loop branch-free.
  const uint32_t below =
      (bits != 0U) & (keep_nonzero | (float_bits(ratio) > float_bits(threshold))) ? 4U : 0U;
  const uint32_t largest = (1U << width) - 1U;  // a >= scale, or rounded up to it
  const uint32_t in_range = rounded_octave < 0 ? largest : code;
  // A mask, not ?:, so that the float work of `below` is not moved under a branch (which
  // GCC cannot vectorise while float exceptions may trap).
  return select_bits(octave >= octaves_of(width), below, octave < 0 ? largest : in_range);
}

KXOPS_HOST_DEVICE float decode_magnitude(uint32_t stored, uint32_t scale_exp, int width) {
  uint32_t code = stored;
  const int top_bits = width - 3;
  code = code < 4U ? 4U : code;  // codes 0..3 decode to 0 (below); keeps the shifts defined
  // floor(log2(code)) - 2 for codes 4..255, by comparisons (vectorises, unlike clz).
  const int keep = (code >= 8U) + (code >= 16U) + (code >= 32U) + (code >= 64U) + (code >= 128U);
  const int octave = 4 * (top_bits - keep) + 3 - static_cast<int>((code >> keep) & 3U);
  const uint32_t mantissa = (code & ((1U << keep) - 1U)) << (23 - keep);
  const uint32_t bits = ((scale_exp - 1U - static_cast<uint32_t>(octave)) << 23) | mantissa;
  return stored < 4U ? 0.0f : bits_float(bits);
}

// m's byte: sign bit and 7 magnitude bits; a zero magnitude without its sign, so that a -0
// (which the paths' different update formulas may or may not produce) and +0 store alike.
KXOPS_HOST_DEVICE uint8_t encode_mean(float x, uint32_t scale_exp, uint32_t random,
                                      bool stochastic) {
  const uint32_t magnitude =
      encode_magnitude(fabsf(x), scale_exp, kMeanWidth, random, stochastic, false);
  const uint32_t sign = (float_bits(x) >> 31) << 7;
  return static_cast<uint8_t>(magnitude | select_bits(magnitude != 0U, sign, 0U));
}

KXOPS_HOST_DEVICE float decode_mean(uint8_t code, uint32_t scale_exp) {
  const float a = decode_magnitude(code & 0x7fU, scale_exp, kMeanWidth);
  return (code & 0x80U) != 0 ? -a : a;
}

KXOPS_HOST_DEVICE uint8_t encode_square(float x, uint32_t scale_exp, uint32_t random,
                                        bool stochastic) {
  return static_cast<uint8_t>(
      encode_magnitude(x, scale_exp, kSquareWidth, random, stochastic, true));
}

KXOPS_HOST_DEVICE float decode_square(uint8_t code, uint32_t scale_exp) {
  return decode_magnitude(code, scale_exp, kSquareWidth);
}

}  // namespace kxops::adax
