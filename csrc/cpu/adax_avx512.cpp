// The AVX-512 copy of the AdaX CPU kernel (cpu/adax_kernel.h), run where adax.cpp finds the CPU
// able to. The whole file is compiled for AVX-512 by the pragma below (the build's flags are
// one set for all files) with ATen's AVX-512 capability macros, so that at::vec picks its
// 16-lane implementation, and with the macros that GCC's -mavx512f -mavx512bw -mavx512vl
// -mavx512dq define (its C++ front end reads the whole file before the pragma takes effect, so
// the pragma alone leaves them undefined, and headers such as Sleef's test them). Inline functions
// that this file shares with other files (torch's, the standard library's, adax_math.h's) may be
// compiled here with AVX-512 instructions: setup.py links this file last, and the linker keeps the
// first copy it meets, so that code outside the AVX-512 kernel never runs this file's copies. A
// compiler that cannot target AVX-512 (or one that is not GCC, whose pragma this is) builds no copy
// here.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 9
#define KXOPS_ADAX_AVX512 1
// Declared before the pragma, so compiled for the baseline: the library code whose copies only
// this file would otherwise emit (no other file instantiates them).
#include <c10/util/Backtrace.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// GCC 12's own AVX-512 headers warn of their deliberately undefined registers.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/adax_kernel.h"
#else
#include "adax_host.h"
#endif

namespace kxops::adax {

#if defined(KXOPS_ADAX_AVX512)
extern const Impl avx512_step = &AVX512::step;
#else
extern const Impl avx512_step = nullptr;
#endif

}  // namespace kxops::adax
