// The GEMMs of the host drivers shared by CPU and CUDA (the gated conv's taps, both fused
// heads' three products), routed to one CPU engine per process:
//   mkl     torch's own at::mm/addmm/bmm (MKL in torch's x86 builds);
//   onednn  oneDNN's matmul primitive, through at::native::mkldnn_matmul (the routine torch's
//           own addmm/bmm use for bf16), exact fp32 (no bf16/tf32 math mode is set).
// On AMD CPUs MKL runs its AVX2 code while oneDNN runs AVX-512, so the engine is chosen from
// the CPU vendor: oneDNN off Intel where torch's oneDNN fp32 matmul runs on the CPU, MKL on
// Intel (and wherever oneDNN is not usable). KXOPS_CPU_GEMM=auto|mkl|onednn overrides the choice
// (read once per process, so every call of a process computes the same bits); `python -m
// kxops` reports it. fp64 (which oneDNN lacks) and fp16/bf16 (which torch's addmm already routes
// to oneDNN where it helps) always take torch's route, as do CUDA tensors (cuBLAS).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

#include <cstring>
#endif

// Exported by libtorch_cpu (declared in ATen/native/mkldnn/Matmul.h, which torch's wheels do
// not ship): result = beta * result + alpha * mat1 @ mat2, 2-D or batched 3-D, any plain or
// transposed layout. Weak, so that a torch without it leaves the address null (oneDNN is then
// unavailable) instead of failing to load the extension.
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2,
                             const at::Tensor& result, float beta, float alpha)
    __attribute__((weak));
}  // namespace at::native

namespace kxops::gemm {

enum class Engine : int { mkl = 0, onednn = 1 };

inline const char* engine_name(Engine engine) {
  return engine == Engine::onednn ? "onednn" : "mkl";
}

// CPUID's vendor string ("GenuineIntel", "AuthenticAMD", ...); empty off x86.
inline std::string cpu_vendor() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int max_leaf = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &max_leaf, &ebx, &ecx, &edx) == 0) return "";
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return vendor;
#else
  return "";
#endif
}

// Whether torch's oneDNN fp32 matmul runs here: the symbol is present and a small product
// matches at::mm (it refuses CPUs without AVX-512 BW/VL/DQ or AVX-NE-CONVERT, and builds
// without oneDNN).
inline bool onednn_available() {
  if (&at::native::mkldnn_matmul == nullptr) return false;
  try {
    const auto a = at::arange(12, at::kFloat).view({3, 4});
    const auto b = at::arange(8, at::kFloat).view({4, 2});
    auto result = at::empty({3, 2}, a.options());
    at::native::mkldnn_matmul(a, b, result, 0.0f, 1.0f);
    return result.equal(at::mm(a, b));
  } catch (const c10::Error&) {
    return false;
  }
}

// The engine and why, resolved once (see the top of the file).
struct Choice {
  Engine engine;
  std::string reason;
};

inline Choice resolve_choice() {
  const char* env = std::getenv("KXOPS_CPU_GEMM");
  const std::string requested = env != nullptr ? env : "";
  TORCH_CHECK_VALUE(
      requested.empty() || requested == "auto" || requested == "mkl" || requested == "onednn",
      "kxops: KXOPS_CPU_GEMM must be 'auto', 'mkl' or 'onednn', got '", requested, "'");
  const bool onednn = onednn_available();
  if (requested == "mkl") return {Engine::mkl, "KXOPS_CPU_GEMM=mkl"};
  if (requested == "onednn") {
    TORCH_CHECK_VALUE(onednn,
                      "kxops: KXOPS_CPU_GEMM=onednn, but this torch's oneDNN fp32 matmul does not "
                      "run on this CPU (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT and a torch "
                      "built with oneDNN); use 'mkl' or 'auto'");
    return {Engine::onednn, "KXOPS_CPU_GEMM=onednn"};
  }
  const std::string vendor = cpu_vendor();
  const std::string cpu = "auto, " + (vendor.empty() ? std::string("non-x86 CPU") : vendor);
  if (!onednn) return {Engine::mkl, cpu + ", oneDNN fp32 matmul not available"};
  if (vendor == "GenuineIntel") return {Engine::mkl, cpu};
  return {Engine::onednn, cpu};
}

// The process's choice; set_engine replaces it (the tests run both engines in one process).
inline Choice& choice_slot() {
  static Choice choice = resolve_choice();
  return choice;
}

inline std::mutex& choice_mutex() {
  static std::mutex mutex;
  return mutex;
}

inline std::atomic<int>& engine_slot() {
  static std::atomic<int> engine{static_cast<int>(choice_slot().engine)};
  return engine;
}

inline Engine cpu_engine() { return static_cast<Engine>(engine_slot().load()); }

// "engine;reason", for kxops.info() (the op kxops::_cpu_gemm_engine).
inline std::string describe_engine() {
  std::lock_guard<std::mutex> lock(choice_mutex());
  const Engine engine = cpu_engine();
  return std::string(engine_name(engine)) + ";" + choice_slot().reason;
}

// For tests (the op kxops::_set_cpu_gemm_engine): "mkl", "onednn" or "auto" (the choice
// KXOPS_CPU_GEMM and the CPU make).
inline void set_engine(const std::string& name) {
  TORCH_CHECK_VALUE(name == "mkl" || name == "onednn" || name == "auto",
                    "kxops._set_cpu_gemm_engine: engine must be 'auto', 'mkl' or 'onednn', got '",
                    name, "'");
  std::lock_guard<std::mutex> lock(choice_mutex());
  Choice& choice = choice_slot();
  if (name == "auto") {
    choice = resolve_choice();
  } else {
    TORCH_CHECK_VALUE(name == "mkl" || onednn_available(),
                      "kxops._set_cpu_gemm_engine: oneDNN's fp32 matmul does not run here");
    choice = {name == "mkl" ? Engine::mkl : Engine::onednn, "set by kxops._set_cpu_gemm_engine"};
  }
  engine_slot().store(static_cast<int>(choice.engine));
}

// Whether oneDNN reads t where it lies: torch's wrapper copies any other layout (a copy that
// costs more than the engines differ for the small batched products of the GlobalPointer).
// Contiguous, or (its last two dims) transposed-contiguous.
inline bool read_in_place(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  const int64_t rows = t.size(-2), cols = t.size(-1);
  const bool transposed = t.stride(-2) == 1 && t.stride(-1) == rows;
  return transposed && (t.dim() == 2 || t.stride(0) == rows * cols);
}

// Whether oneDNN takes a b: CPU fp32 under the oneDNN engine, non-empty, operands read in
// place. Empty products and alpha 0 (which oneDNN's wrapper skips without writing) stay with
// torch; alpha is tested as the float oneDNN gets (a tiny double alpha rounds to 0 there, and
// the wrapper would then return without writing, not even beta * out).
inline bool onednn_takes(const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (!a.is_cpu() || cpu_engine() != Engine::onednn) return false;
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat ||
      static_cast<float>(alpha) == 0.0f) {
    return false;
  }
  return a.numel() > 0 && b.numel() > 0 && read_in_place(a) && read_in_place(b);
}

// ... into result: fp32, written in place (rows contiguous), overlapping no operand.
inline bool onednn_takes(const at::Tensor& result, const at::Tensor& a, const at::Tensor& b,
                         double alpha) {
  return onednn_takes(a, b, alpha) && result.is_cpu() && result.scalar_type() == at::kFloat &&
         result.stride(-1) == 1 && !result.is_alias_of(a) && !result.is_alias_of(b);
}

// out = beta self + alpha a b (a, b 2-D: addmm; 3-D: baddbmm), as at::addmm_out /
// at::baddbmm_out: beta 0 ignores self, NaN included; self broadcasts to out.
inline at::Tensor& addmm_out(at::Tensor& out, const at::Tensor& self, const at::Tensor& a,
                             const at::Tensor& b, double beta = 1.0, double alpha = 1.0) {
  if (!onednn_takes(out, a, b, alpha)) {
    return a.dim() == 3 ? at::baddbmm_out(out, self, a, b, beta, alpha)
                        : at::addmm_out(out, self, a, b, beta, alpha);
  }
  if (beta != 0.0 && !self.is_same(out)) out.copy_(self.expand_as(out));
  at::native::mkldnn_matmul(a, b, out, static_cast<float>(beta), static_cast<float>(alpha));
  return out;
}

// out = a b (2-D or 3-D).
inline at::Tensor& mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!onednn_takes(out, a, b, 1.0)) {
    return a.dim() == 3 ? at::bmm_out(out, a, b) : at::mm_out(out, a, b);
  }
  return gemm::addmm_out(out, out, a, b, 0.0, 1.0);
}

// self = beta self + alpha a b in place (self.addmm_ / self.baddbmm_).
inline at::Tensor& addmm_(at::Tensor& self, const at::Tensor& a, const at::Tensor& b,
                          double beta = 1.0, double alpha = 1.0) {
  return gemm::addmm_out(self, self, a, b, beta, alpha);
}

// The products run in their operands' dtype under either engine: the functional at::mm/addmm/
// bmm/baddbmm would otherwise take autocast's casts (fp32 operands multiplied in bf16, a bf16
// result) where the call site holds autocast (a backward run inside an autocast region), and
// oneDNN's matmul never does. (The _out variants have no autocast kernels.)
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// A fresh result for a b.
inline at::Tensor product_like(const at::Tensor& a, const at::Tensor& b) {
  auto sizes = a.sizes().vec();
  sizes.back() = b.size(-1);
  return at::empty(sizes, a.options());
}

// a b (at::mm / at::bmm).
inline at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  const NoAutocast no_autocast;
  if (!onednn_takes(a, b, 1.0)) return a.dim() == 3 ? at::bmm(a, b) : at::mm(a, b);
  auto out = product_like(a, b);
  return gemm::addmm_out(out, out, a, b, 0.0, 1.0);
}

// self + a b, self broadcast (at::addmm / at::baddbmm).
inline at::Tensor addmm(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b) {
  const NoAutocast no_autocast;
  if (!onednn_takes(a, b, 1.0)) {
    return a.dim() == 3 ? at::baddbmm(self, a, b) : at::addmm(self, a, b);
  }
  auto out = product_like(a, b);
  return gemm::addmm_out(out, self, a, b);
}

}  // namespace kxops::gemm
