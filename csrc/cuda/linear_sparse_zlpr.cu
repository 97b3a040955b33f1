// The fused linear + sparse ZLPR head on CUDA: the shared host driver (cuBLAS GEMMs over blocks
// of rows and the CUDA kxops::sparse_zlpr row kernel, all on the current stream); no kernel of
// its own. Every at:: call and the row kernel guard the tensors' device themselves.
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { kxops::linear_sparse_zlpr::register_ops(m); }
