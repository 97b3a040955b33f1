// Which copy of the AdaX CPU kernel adax_ runs (csrc/cpu/adax.cpp): one is compiled for each
// CPU capability the build supports, one is picked at run time.
#pragma once

#include <string>

namespace kxops::adax {

// The copy in use: "AVX512", or the build's baseline ("AVX2" on x86-64), as torch names
// capabilities (the op kxops::_adax_cpu_kernel, for kxops.info and the benchmark).
std::string cpu_kernel();

// For tests (the op kxops::_set_adax_cpu_kernel): "auto" (the best copy that this CPU runs and
// torch's ATEN_CPU_CAPABILITY allows), or a copy by name, which this CPU must be able to run.
void set_cpu_kernel(const std::string& name);

}  // namespace kxops::adax
