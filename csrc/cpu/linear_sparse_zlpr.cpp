// The fused linear + sparse ZLPR head on CPU: the shared host driver (oneDNN/MKL GEMMs over
// blocks of rows and the CPU kxops::sparse_zlpr row kernel), nothing device-specific.
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

namespace kxops::linear_sparse_zlpr {

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("linear_sparse_zlpr", &linear_sparse_zlpr);
  m.impl("linear_sparse_zlpr_backward", &linear_sparse_zlpr_backward);
  m.impl("linear_sparse_zlpr_partials", &linear_sparse_zlpr_partials);
  m.impl("linear_sparse_zlpr_partials_backward", &linear_sparse_zlpr_partials_backward);
}

}  // namespace kxops::linear_sparse_zlpr
