// The fused linear + sparse ZLPR head on CPU: the shared host driver (oneDNN/MKL GEMMs over
// blocks of rows and the CPU kxops::sparse_zlpr row kernel), nothing device-specific.
#include <torch/library.h>

#include "linear_sparse_zlpr_host.h"

TORCH_LIBRARY_IMPL(kxops, CPU, m) { kxops::linear_sparse_zlpr::register_ops(m); }
