// DGCNN block on CPU: the shared host code (the convolution as shifted GEMMs) plus the fused
// epilogues here: one parallel pass over the rows [B*T] per direction, each row staged in
// fp32/fp64 and updated with at::vec.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "gated_conv_host.h"
#include "gated_conv_math.h"

namespace kxops::gated_conv {
namespace {

using at::vec::Vectorized;

// Per-thread fp32/fp64 copies of one row's inputs.
template <typename T>
struct RowBuffers {
  std::vector<T> h, g, r, keep_scale, dy;
  explicit RowBuffers(int64_t out) : h(out), g(out), r(out), keep_scale(out), dy(out) {}
};

template <typename scalar_t, typename T>
void load_row(const EpilogueArgs& a, int64_t row, RowBuffers<T>& b, const scalar_t* z,
              const scalar_t* r, const bool* keep) {
  const int64_t out = a.out;
  const scalar_t* z_of_row = z + gapped_row(row, a.time, a.gap) * 2 * out;
  at::vec::convert(z_of_row, b.h.data(), out);
  at::vec::convert(z_of_row + out, b.g.data(), out);
  if (r != nullptr) at::vec::convert(r + row * out, b.r.data(), out);
  if (keep != nullptr) {
    for (int64_t c = 0; c < out; ++c) b.keep_scale[c] = keep[row * out + c] ? a.keep_scale : 0;
  }
}

// Loads and stores of one lane group: a Vectorized<T> of channels, or one channel (the tail).
template <typename T>
struct VectorLanes {
  using type = Vectorized<T>;
  static constexpr int64_t size = Vectorized<T>::size();
  static type load(const T* p) { return type::loadu(p); }
  static void store(const type& value, T* p) { value.store(p); }
};

template <typename T>
struct ScalarLanes {
  using type = T;
  static constexpr int64_t size = 1;
  static type load(const T* p) { return *p; }
  static void store(const type& value, T* p) { *p = value; }
};

// Calls body(c, lanes) over channels [0, n): whole vectors, then the tail one channel at a time;
// body reads and writes through decltype(lanes).
template <typename T, typename Body>
void for_each_lane(int64_t n, Body body) {
  int64_t c = 0;
  for (; c + VectorLanes<T>::size <= n; c += VectorLanes<T>::size) body(c, VectorLanes<T>{});
  for (; c < n; ++c) body(c, ScalarLanes<T>{});
}

// Runs body(row, buffers, mask value) over all rows in parallel.
template <typename scalar_t, typename Body>
void for_each_row(const EpilogueArgs& a, Body body) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* z = a.z.const_data_ptr<scalar_t>();
  const scalar_t* r = a.residual ? a.r.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* mask = a.mask.defined() ? a.mask.const_data_ptr<scalar_t>() : nullptr;
  const bool* keep = a.keep.defined() ? a.keep.const_data_ptr<bool>() : nullptr;
  const int64_t grain = rows_per_task(a.out);
  at::parallel_for(0, a.rows, grain, [&](int64_t begin, int64_t end) {
    RowBuffers<T> b(a.out);
    std::fill(b.keep_scale.begin(), b.keep_scale.end(), T(1));
    for (int64_t row = begin; row < end; ++row) {
      load_row(a, row, b, z, r, keep);
      body(row, b, mask != nullptr ? static_cast<T>(mask[row]) : T(1));
    }
  });
}

struct CpuEpilogue {
  static void forward(const EpilogueArgs& a, at::Tensor& y) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.z.scalar_type(), "gated_conv_cpu", [&] {
          using T = at::opmath_type<scalar_t>;
          scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
          for_each_row<scalar_t>(a, [&](int64_t row, RowBuffers<T>& b, T m) {
            const int64_t out = a.out;
            T* y_row = b.dy.data();  // scratch for the output row
            for_each_lane<T>(out, [&](int64_t c, auto lanes) {
              using L = decltype(lanes);
              L::store(gate_forward(L::load(&b.h[c]), L::load(&b.g[c]), L::load(&b.r[c]),
                                    typename L::type(m), L::load(&b.keep_scale[c]), a.residual),
                       y_row + c);
            });
            at::vec::convert(y_row, y_data + row * out, out);
          });
        });
  }

  static void backward(const EpilogueArgs& a, const at::Tensor& dy, at::Tensor& dz,
                       at::Tensor& dr) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, a.z.scalar_type(), "gated_conv_backward_cpu", [&] {
          using T = at::opmath_type<scalar_t>;
          const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
          scalar_t* dz_data = dz.mutable_data_ptr<scalar_t>();
          scalar_t* dr_data = dr.defined() ? dr.mutable_data_ptr<scalar_t>() : nullptr;
          for_each_row<scalar_t>(a, [&](int64_t row, RowBuffers<T>& b, T m) {
            const int64_t out = a.out;
            at::vec::convert(dy_data + row * out, b.dy.data(), out);
            // Results overwrite the row's inputs in place: h <- dh, g <- dg, r <- dr.
            for_each_lane<T>(out, [&](int64_t c, auto lanes) {
              using L = decltype(lanes);
              const auto grads = gate_backward(
                  L::load(&b.dy[c]), L::load(&b.h[c]), L::load(&b.g[c]), L::load(&b.r[c]),
                  typename L::type(m), L::load(&b.keep_scale[c]), a.residual);
              L::store(grads.h, &b.h[c]);
              L::store(grads.g, &b.g[c]);
              L::store(grads.r, &b.r[c]);
            });
            scalar_t* dz_of_row = dz_data + gapped_row(row, a.time, a.gap) * 2 * out;
            at::vec::convert(b.h.data(), dz_of_row, out);
            at::vec::convert(b.g.data(), dz_of_row + out, out);
            if (dr_data != nullptr) at::vec::convert(b.r.data(), dr_data + row * out, out);
          });
        });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(kxops, CPU, m) { register_ops<CpuEpilogue>(m); }

}  // namespace kxops::gated_conv
