// kxops::global_pointer_zlpr on CPU: the shared host driver (GEMMs + the CPU sparse_zlpr kernel).
#include <torch/library.h>

#include "global_pointer_zlpr_host.h"

TORCH_LIBRARY_IMPL(kxops, CPU, m) { kxops::global_pointer_zlpr::register_ops(m); }
