// The fused linear + sparse ZLPR head on CPU: the shared host driver (oneDNN/MKL GEMMs over
// blocks of rows and the CPU kxops::sparse_zlpr row kernel), nothing device-specific.
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

namespace kxops::linear_sparse_zlpr {

TORCH_LIBRARY_IMPL(kxops, CPU, m) { impl_ops(m); }

}  // namespace kxops::linear_sparse_zlpr
