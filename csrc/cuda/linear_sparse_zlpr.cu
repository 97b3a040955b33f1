// The fused linear + sparse ZLPR head on CUDA: the shared host driver (cuBLAS GEMMs over blocks
// of rows and the CUDA kxops::sparse_zlpr row kernel, all on the current stream); no kernel of
// its own. Every at:: call and the row kernel guard the tensors' device themselves.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

namespace kxops::linear_sparse_zlpr {

TORCH_LIBRARY_IMPL(kxops, CUDA, m) {
  m.impl("linear_sparse_zlpr", &linear_sparse_zlpr);
  m.impl("linear_sparse_zlpr_backward", &linear_sparse_zlpr_backward);
  m.impl("linear_sparse_zlpr_partials", &linear_sparse_zlpr_partials);
  m.impl("linear_sparse_zlpr_partials_backward", &linear_sparse_zlpr_partials_backward);
}

}  // namespace kxops::linear_sparse_zlpr
