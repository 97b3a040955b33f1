// kxops::global_pointer_zlpr on CUDA: the shared host driver (cuBLAS GEMMs + the CUDA
// sparse_zlpr kernel); no kernel of its own.
#include <torch/library.h>

#include "global_pointer_zlpr_host.h"

TORCH_LIBRARY_IMPL(kxops, CUDA, m) { kxops::global_pointer_zlpr::register_ops(m); }
