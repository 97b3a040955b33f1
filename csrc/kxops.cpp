// The one list of kxops op schemas. Kernels register against these names from csrc/cpu and
// csrc/cuda with TORCH_LIBRARY_IMPL; Python adds fake kernels and autograd only.
#include <Python.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <string>

#include "adax_cpu.h"
#include "build_info.h"
#include "checks.h"
#include "gemm.h"

extern "C" {
// Importing kxops._C runs the static registrations below; the ops need no Python bindings
// (the dispatcher exposes them as torch.ops.kxops.*), so the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace kxops {

std::string build_info() {
  std::string info = "debug=";
#ifdef KXOPS_DEBUG
  info += "1";
#else
  info += "0";
#endif
  info += ";compiler=";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#endif
  // The CPU kernels' at::parallel_for runs on one thread unless built with OpenMP.
  info += ";openmp=";
#ifdef _OPENMP
  info += std::to_string(_OPENMP);
#else
  info += "0";
#endif
#ifdef KXOPS_WITH_CUDA
  info += ";" + cuda_build_info();
#endif
  return info;
}

TORCH_LIBRARY(kxops, m) {
  // Dilated gated convolution. Returns (y, z): z = conv output kept for backward, [B, T + gap,
  // 2*out] in the kernels' gapped layout (csrc/gated_conv_host.h).
  // gate_keep: bool [B, T, out] dropout keep-mask of the gate (None: no dropout).
  m.def(
      "gated_conv(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? gate_keep, "
      "Tensor? residual_weight, Tensor? residual_bias, int dilation, float drop_gate, "
      "bool residual) -> (Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_residual_weight, grad_residual_bias), those
  // asked for by grad_mask (x, weight, bias, residual_weight, residual_bias); a gradient not
  // asked for, or of an input that was None, is an empty tensor. residual_bias is needed to
  // recompute the projected residual.
  m.def(
      "gated_conv_backward(Tensor grad_y, Tensor x, Tensor z, Tensor weight, Tensor? mask, "
      "Tensor? gate_keep, Tensor? residual_weight, Tensor? residual_bias, bool[5] grad_mask, "
      "int dilation, float drop_gate, bool residual) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ZLPR loss. Returns (the loss in fp32/fp64: per row for reduction "none", else 0-dim, the
  // rows' mean or sum; d loss / d logits, or an empty tensor where grad_mask (logits) is
  // false): the gradient comes out of the same pass as the loss.
  m.def(
      "zlpr(Tensor logits, Tensor labels, bool[1] grad_mask, str reduction='none') "
      "-> (Tensor, Tensor)");
  m.def(
      "sparse_zlpr(Tensor logits, Tensor positives, int ignore_index, bool[1] grad_mask, "
      "str reduction='none', float grad_filter=0.) -> (Tensor, Tensor)");
  // Scales a per-row gradient by grad_loss (shape logits.shape[:-1]).
  m.def("zlpr_backward(Tensor grad_loss, Tensor grad) -> Tensor");

  // Fused linear + sparse ZLPR head: the loss of sparse_zlpr(input @ weight.T + bias) without
  // the [N, C] logits. Returns (loss reduced by "mean", "sum" or "none", grad_input,
  // grad_weight, grad_bias): the gradients of the mean (for "mean") or of the sum of the row
  // losses, empty where grad_mask (input, weight, bias) is false. block_rows: rows of logits
  // per block, 0 = chosen from the sizes.
  m.def(
      "linear_sparse_zlpr(Tensor input, Tensor weight, Tensor? bias, Tensor positives, "
      "int ignore_index, str reduction, bool[3] grad_mask, int block_rows, "
      "float grad_filter=0.) -> (Tensor, Tensor, Tensor, Tensor)");
  // Reduction "none"'s backward: the gradients of sum(grad_loss * row loss), logits recomputed.
  m.def(
      "linear_sparse_zlpr_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, "
      "Tensor positives, int ignore_index, bool[3] grad_mask, int block_rows, "
      "float grad_filter=0.) -> (Tensor, Tensor, Tensor)");
  // Label parallel: per-row [..., 2] log-sums of the negatives' e^s and the positives' e^-s
  // over the weight's classes, [class_offset, class_offset + C) of num_classes (positives hold
  // global ids) ...
  m.def(
      "linear_sparse_zlpr_partials(Tensor input, Tensor weight, Tensor? bias, Tensor positives, "
      "int ignore_index, int class_offset, int num_classes, int block_rows) -> Tensor");
  // ... and the gradients of sum(grad_loss * row loss) given log_z = log(1 + the merged sums).
  m.def(
      "linear_sparse_zlpr_partials_backward(Tensor grad_loss, Tensor log_z, Tensor input, "
      "Tensor weight, Tensor? bias, Tensor positives, int ignore_index, int class_offset, "
      "int num_classes, bool[3] grad_mask, int block_rows, float grad_filter=0.) "
      "-> (Tensor, Tensor, Tensor)");
  // The rows of logits per block that linear_sparse_zlpr picks for block_rows 0 (from weight's
  // shape and dtype only; LinearZLPR.predict's blocks).
  m.def("linear_sparse_zlpr_block_rows(Tensor weight, int rows) -> int");
  // GlobalPointer span grid + sparse ZLPR without the grid. Returns (loss over the (batch, head)
  // rows reduced by "mean", "sum" or "none" ([batch, heads]) in fp32/fp64, grad q, grad k,
  // grad start_bias, grad end_bias): the gradients of that loss (for "none", of the rows' sum),
  // computed in the forward, empty where grad_mask (q, k, start_bias, end_bias) is false or the
  // bias is None. block_bytes: budget of the packed logits and their gradient (None: the
  // default).
  m.def(
      "global_pointer_zlpr(Tensor q, Tensor k, Tensor positives, Tensor? mask, "
      "Tensor? start_bias, Tensor? end_bias, bool tril, int ignore_index, str reduction, "
      "bool[4] grad_mask, int? block_bytes=None, float grad_filter=0.) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // One AdaX / AdaX-W step over lists of tensors; increments state_steps unless found_inf.
  // bf16 or uint8 exp_avgs/exp_avg_sqs are compact state (uint8: with one fp32 scale per 128
  // elements in the scale lists); stochastic_rounding rounds with the tensors' seeds.
  m.def(
      "adax_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, *, float lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool decoupled, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(e!)[]? exp_avg_scales=None, "
      "Tensor(f!)[]? exp_avg_sq_scales=None, int[] seeds=[], "
      "bool stochastic_rounding=False) -> ()");
  m.def(
      "adax_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, *, Tensor lr, float beta1, "
      "float beta2, float weight_decay, float eps, bool decoupled, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor(e!)[]? exp_avg_scales=None, "
      "Tensor(f!)[]? exp_avg_sq_scales=None, int[] seeds=[], "
      "bool stochastic_rounding=False) -> ()");
  // The copy of the AdaX CPU kernel in use ("AVX512", "AVX2", csrc/adax_cpu.h), and its test
  // switch.
  m.def("_adax_cpu_kernel() -> str", &adax::cpu_kernel);
  m.def("_set_adax_cpu_kernel(str kernel) -> ()",
        [](c10::string_view kernel) { adax::set_cpu_kernel(std::string(kernel)); });

  // How this binary was built ("key=value;..."), for kxops.info().
  m.def("_build_info() -> str", &build_info);
  // The CPU GEMM engine of the fused ops ("engine;reason", csrc/gemm.h), and its test switch.
  m.def("_cpu_gemm_engine() -> str", &gemm::describe_engine);
  m.def("_set_cpu_gemm_engine(str engine) -> ()",
        [](c10::string_view engine) { gemm::set_engine(std::string(engine)); });
}

// A sparse, sparse-compressed, nested, quantized or mkldnn tensor dispatches to a key that has no
// kxops kernel, where the dispatcher would raise its own "Could not run" error. This kernel,
// registered for those keys for every kxops op with tensor arguments, refuses it by the op's and
// the argument's names instead, as every op's own checks do for the tensors they reach.
void refuse_non_strided(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const auto values = torch::jit::last(*stack, arguments.size());
  const std::string name = op.schema().name().substr(std::string("kxops::").size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    const std::string& argument = arguments[i].name();
    if (values[i].isTensor()) check_tensor(name.c_str(), argument.c_str(), values[i].toTensor());
    if (!values[i].isTensorList()) continue;
    const auto tensors = values[i].toTensorList();
    for (size_t j = 0; j < tensors.size(); ++j) {
      const std::string element = argument + "[" + std::to_string(j) + "]";
      check_tensor(name.c_str(), element.c_str(), tensors[j]);
    }
  }
  TORCH_CHECK_TYPE(false, "kxops.", name,
                   ": every tensor argument must be a dense (strided) tensor");
}

// Every kxops op that takes a tensor (the underscore ops take none), with its overload name.
void register_non_strided_refusals(torch::Library& m) {
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("kxops::", 0) != 0 || op.name.rfind("kxops::_", 0) == 0) continue;
    std::string name = op.name.substr(std::string("kxops::").size());
    if (!op.overload_name.empty()) name += "." + op.overload_name;
    m.impl(name.c_str(), torch::CppFunction::makeFromBoxedFunction<&refuse_non_strided>());
  }
}

// After TORCH_LIBRARY above in this file, so that every op is defined when these run.
TORCH_LIBRARY_IMPL(kxops, SparseCPU, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, SparseCUDA, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, SparseCsrCPU, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, SparseCsrCUDA, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, NestedTensorCPU, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, NestedTensorCUDA, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, MkldnnCPU, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, QuantizedCPU, m) { register_non_strided_refusals(m); }
TORCH_LIBRARY_IMPL(kxops, QuantizedCUDA, m) { register_non_strided_refusals(m); }
// Nested tensors meet autograd first; an op without an autograd formula (adax_) has no kernel
// there, so the refusal stands there too.
TORCH_LIBRARY_IMPL(kxops, AutogradNestedTensor, m) { register_non_strided_refusals(m); }

}  // namespace kxops
