// The fused linear + sparse ZLPR head on CUDA: the shared host driver (cuBLAS GEMMs over blocks
// of rows, the CUDA kxops::sparse_zlpr row kernel and, for a filtered gradient, the sparse
// products of cuda/sparse_grad.cu, all on the current stream); no kernel of its own. Every
// at:: call and kernel launcher guards the tensors' device itself.
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { kxops::linear_sparse_zlpr::register_ops(m); }
