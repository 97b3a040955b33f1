// AdaX / AdaX-W on CPU: the baseline copy of the kernel (cpu/adax_kernel.h, compiled with the
// build's flags), the choice between it and the AVX-512 copy (adax_avx512.cpp), and the
// registration of the op.
#include <ATen/Version.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "adax_cpu.h"
#include "adax_host.h"
#include "cpu/adax_kernel.h"

#define KXOPS_STRINGIFY_NAME(x) #x
#define KXOPS_STRINGIFY(x) KXOPS_STRINGIFY_NAME(x)

namespace kxops::adax {

// The AVX-512 copy; null where the compiler could not build it (adax_avx512.cpp).
extern const Impl avx512_step;

namespace {

const char* const kBaselineName = KXOPS_STRINGIFY(CPU_CAPABILITY);

// Whether this CPU (and its OS) runs the AVX-512 copy: the instruction sets its file is
// compiled for. Independent of ATEN_CPU_CAPABILITY, which can only lower the choice.
bool cpu_runs_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// The best copy that the CPU runs and torch's capability (ATEN_CPU_CAPABILITY lowers it, as it
// does for torch's own kernels) allows.
Impl automatic_choice() {
  const bool allowed = at::get_cpu_capability().rfind("AVX512", 0) == 0;
  return avx512_step != nullptr && allowed && cpu_runs_avx512() ? avx512_step
                                                                : &CPU_CAPABILITY::step;
}

std::atomic<Impl>& chosen() {
  static std::atomic<Impl> impl{automatic_choice()};
  return impl;
}

void adax_cpu_impl(const TensorLists& lists, const std::optional<at::Tensor>& lr,
                   const Hyper& hyper, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  chosen().load(std::memory_order_relaxed)(lists, lr, hyper, grad_scale, found_inf);
}

}  // namespace

std::string cpu_kernel() {
  const Impl impl = chosen().load();
  return impl == avx512_step ? "AVX512" : kBaselineName;
}

void set_cpu_kernel(const std::string& name) {
  Impl impl = nullptr;
  if (name == "auto") {
    impl = automatic_choice();
  } else if (name == kBaselineName) {
    impl = &CPU_CAPABILITY::step;
  } else if (name == "AVX512") {
    TORCH_CHECK_VALUE(avx512_step != nullptr,
                      "kxops._set_adax_cpu_kernel: this build has no AVX512 kernel");
    TORCH_CHECK_VALUE(cpu_runs_avx512(),
                      "kxops._set_adax_cpu_kernel: this CPU does not run the AVX512 kernel");
    impl = avx512_step;
  }
  TORCH_CHECK_VALUE(impl != nullptr, "kxops._set_adax_cpu_kernel: kernel must be 'auto', '",
                    kBaselineName, "' or 'AVX512', got '", name, "'");
  chosen().store(impl);
}

TORCH_LIBRARY_IMPL(kxops, CPU, m) { register_ops<at::kCPU, &adax_cpu_impl>(m); }

}  // namespace kxops::adax
