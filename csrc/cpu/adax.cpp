// AdaX / AdaX-W step on CPU: every tensor split into fixed-size slices, the slices of all
// tensors spread over threads with one parallel_for; each slice updated with at::vec in the
// math type (fp16/bf16 params and grads staged through fp32 tiles).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "adax_host.h"
#include "adax_math.h"
#include "cpu/vec_math.h"

namespace kxops::adax {
namespace {

using at::vec::Vectorized;

constexpr int64_t kSlice = 16384;  // elements per parallel work item
constexpr int64_t kTile = 512;     // fp32 staging tile for fp16/bf16 params

// Updates n elements whose params and grads are already in the math type T.
template <typename T>
void update_span(T* p, const T* g, T* m, T* v, int64_t n, const Constants<T>& c, bool l2) {
  using Vec = Vectorized<T>;
  const auto cv = Constants<Vec>::broadcast(c);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec pv = Vec::loadu(p + j), mv = Vec::loadu(m + j), vv = Vec::loadu(v + j);
    update(pv, Vec::loadu(g + j), mv, vv, cv, l2);
    pv.store(p + j);
    mv.store(m + j);
    vv.store(v + j);
  }
  for (; j < n; ++j) update(p[j], g[j], m[j], v[j], c, l2);
}

template <typename scalar_t>
void update_slice(scalar_t* p, const scalar_t* g, at::opmath_type<scalar_t>* m,
                  at::opmath_type<scalar_t>* v, int64_t n,
                  const Constants<at::opmath_type<scalar_t>>& c, bool l2) {
  using T = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, T>) {
    update_span(p, g, m, v, n, c, l2);
  } else {
    T p_tile[kTile], g_tile[kTile];
    for (int64_t begin = 0; begin < n; begin += kTile) {
      const int64_t len = std::min(kTile, n - begin);
      at::vec::convert(p + begin, p_tile, len);
      at::vec::convert(g + begin, g_tile, len);
      update_span(p_tile, g_tile, m + begin, v + begin, len, c, l2);
      at::vec::convert(p_tile, p + begin, len);
    }
  }
}

double scalar_value(const std::optional<at::Tensor>& t, double otherwise) {
  return t.has_value() ? t->item<double>() : otherwise;
}

void adax_cpu_impl(const TensorLists& lists, const std::optional<at::Tensor>& lr_tensor,
                   const Hyper& hyper, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  // GradScaler found an inf/NaN: skip the step, step counts included.
  if (scalar_value(found_inf, 0.0) != 0.0) return;
  const double lr = scalar_value(lr_tensor, hyper.lr);
  const double inv_grad_scale = 1.0 / scalar_value(grad_scale, 1.0);
  const bool l2 = !hyper.decoupled && hyper.weight_decay != 0.0;

  for (const auto& [type, indices] : group_by_dtype(lists)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "adax_cpu", [&] {
      using T = at::opmath_type<scalar_t>;
      struct Slice {
        size_t tensor;
        int64_t begin, end;
      };
      std::vector<Slice> slices;
      std::vector<Constants<T>> constants(lists.params.size());
      for (size_t i : indices) {
        // Plain stores, not add_/item: a dispatcher call per tensor would cost more than the
        // update of a small tensor.
        float* step = lists.steps[i].data_ptr<float>();
        *step += 1.0f;
        constants[i] = math_constants<T>(make_constants(hyper, lr, inv_grad_scale, *step));
        const int64_t numel = lists.params[i].numel();
        for (int64_t begin = 0; begin < numel; begin += kSlice) {
          slices.push_back({i, begin, std::min(numel, begin + kSlice)});
        }
      }
      at::parallel_for(0, static_cast<int64_t>(slices.size()), 1, [&](int64_t first, int64_t last) {
        for (int64_t k = first; k < last; ++k) {
          const auto& s = slices[k];
          const int64_t b = s.begin;
          update_slice(lists.params[s.tensor].data_ptr<scalar_t>() + b,
                       lists.grads[s.tensor].const_data_ptr<scalar_t>() + b,
                       lists.exp_avgs[s.tensor].data_ptr<T>() + b,
                       lists.exp_avg_sqs[s.tensor].data_ptr<T>() + b, s.end - b,
                       constants[s.tensor], l2);
        }
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) {
  m.impl("adax_", &Overloads<at::kCPU, &adax_cpu_impl>::scalar_lr);
  m.impl("adax_.tensor_lr", &Overloads<at::kCPU, &adax_cpu_impl>::tensor_lr);
}

}  // namespace kxops::adax
