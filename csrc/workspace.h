// Large CPU buffers of the host drivers (a fused head's block of logits, its weight gradient):
// allocated with a hint that they be backed by transparent huge pages. Such a buffer is
// allocated afresh by each call (glibc maps it, and unmaps it when freed), so each call faults
// in every page of it again; at 2 MiB a page that is a few hundred faults instead of a few
// hundred thousand. Only a hint (Linux, THP "madvise" or "always"; otherwise a no-op), given
// before anything touches the buffer; its contents and every result are the same either way.
// KXOPS_CPU_HUGE_PAGES=0 turns it off (where the kernel's huge-page compaction stalls cost
// more than the faults), read once per process.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kxops {

// Buffers from this size on: glibc always maps them on their own (its largest mmap threshold),
// so the hint reaches no memory that other allocations share.
constexpr int64_t kHugePageBufferBytes = int64_t{32} << 20;

inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* env = std::getenv("KXOPS_CPU_HUGE_PAGES");
    const std::string value = env != nullptr ? env : "";
    TORCH_CHECK_VALUE(value.empty() || value == "0" || value == "1",
                      "kxops: KXOPS_CPU_HUGE_PAGES must be '0' or '1', got '", value, "'");
    return value != "0";
  }();
  return wanted;
}

// at::empty(sizes, options), hinted as above where it is a CPU buffer of kHugePageBufferBytes
// or more.
inline at::Tensor empty_workspace(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (out.is_cpu() && static_cast<int64_t>(out.nbytes()) >= kHugePageBufferBytes &&
      huge_pages_wanted()) {
    constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
    const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
    const uintptr_t last = (begin + out.nbytes()) & ~(kHugePage - 1);
    // A refusal (THP off, an old kernel) leaves ordinary pages: nothing to report.
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

}  // namespace kxops
