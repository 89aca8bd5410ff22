// Host API of the CUDA kernels: checks, allocation on the current stream's allocator, dispatch to the
// per-dtype launchers in the .cu files. Nothing here synchronises with the host.
#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "launchers.h"

// `import spguard._C_cuda` loads this library, which adds the CUDA kernels to the ops of spguard._C.
extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace spguard::cuda {
namespace {

#define SPGUARD_BY_DTYPE(dtype, name, ...)                                                       \
  switch (dtype) {                                                                              \
    case at::kFloat:                                                                            \
      name##_f32(__VA_ARGS__);                                                                  \
      break;                                                                                    \
    case at::kHalf:                                                                             \
      name##_f16(__VA_ARGS__);                                                                  \
      break;                                                                                    \
    case at::kBFloat16:                                                                         \
      name##_bf16(__VA_ARGS__);                                                                 \
      break;                                                                                    \
    default:                                                                                    \
      TORCH_CHECK(false, "spguard CUDA kernels take float32, float16 or bfloat16, not ", dtype); \
  }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> phase1_step_cuda(const at::Tensor& e_u,
                                                                            const at::Tensor& e_p,
                                                                            const at::Tensor& e_s,
                                                                            double guidance_scale) {
  TORCH_CHECK(e_u.dim() == 4 && e_p.sizes() == e_u.sizes(), "spguard: e_u, e_p must be (B, C, H, W)");
  TORCH_CHECK(e_s.dim() == 5 && e_s.size(0) == e_u.size(0) && e_s.sizes().slice(2) == e_u.sizes().slice(1),
              "spguard: e_s must be (B, N, C, H, W) matching e_u");
  TORCH_CHECK(e_p.scalar_type() == e_u.scalar_type() && e_s.scalar_type() == e_u.scalar_type(),
              "spguard: e_u, e_p, e_s dtypes differ");
  c10::cuda::CUDAGuard guard(e_u.device());
  const auto u = e_u.contiguous(), p = e_p.contiguous(), s = e_s.contiguous();
  const int64_t B = u.size(0), N = s.size(1), n = B ? u.numel() / B : 0;
  const auto f32 = u.options().dtype(at::kFloat);
  auto eps = at::empty_like(u);
  auto partials = at::empty({B, phase1_chunks(n), 2 * N + 1}, f32);
  auto dot = at::empty({B, N}, f32), sq_p = at::empty({B}, f32), sq_s = at::empty({B, N}, f32);
  SPGUARD_BY_DTYPE(u.scalar_type(), phase1_step, u.const_data_ptr(), p.const_data_ptr(), s.const_data_ptr(),
                   eps.mutable_data_ptr(), partials.mutable_data_ptr<float>(), dot.mutable_data_ptr<float>(),
                   sq_p.mutable_data_ptr<float>(), sq_s.mutable_data_ptr<float>(), B, N, n,
                   static_cast<float>(guidance_scale), current_stream());
  return {eps, dot, sq_p, sq_s};
}

std::tuple<at::Tensor, at::Tensor> phase2_step_cuda(const at::Tensor& e_u, const at::Tensor& e_p,
                                                    const at::Tensor& e_s, const at::Tensor& strength,
                                                    double guidance_scale, double q,
                                                    const std::optional<at::Tensor>& attention) {
  TORCH_CHECK(e_u.dim() == 4 && e_p.sizes() == e_u.sizes() && e_s.sizes() == e_u.sizes(),
              "spguard: e_u, e_p, e_s must be (B, C, H, W)");
  TORCH_CHECK(e_p.scalar_type() == e_u.scalar_type() && e_s.scalar_type() == e_u.scalar_type(),
              "spguard: e_u, e_p, e_s dtypes differ");
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "spguard: q must be in [0, 1], got ", q);
  c10::cuda::CUDAGuard guard(e_u.device());
  const int64_t B = e_u.size(0), C = e_u.size(1), hw = e_u.size(2) * e_u.size(3);
  TORCH_CHECK(strength.numel() == B, "spguard: strength must have one value per sample");
  const auto u = e_u.contiguous(), p = e_p.contiguous(), s = e_s.contiguous();
  const auto strength32 = strength.to(at::kFloat).contiguous();
  at::Tensor attn32;
  if (attention.has_value()) {
    TORCH_CHECK(attention->numel() == B * hw, "spguard: pixel_scores must be (B, H*W)");
    attn32 = attention->to(at::kFloat).contiguous();
  }
  const int64_t n = attention.has_value() ? hw : C * hw;  // values the quantile is taken over
  const auto rank = static_cast<int64_t>(std::floor(q * static_cast<double>(n - 1)));
  const auto i32 = u.options().dtype(at::kInt);
  auto keys = at::empty({B * n}, i32);
  auto histogram = at::zeros({phase2_histogram_words(B)}, i32);
  auto state = at::empty({phase2_state_words(B)}, i32);
  auto eps = at::empty_like(u);
  auto weight = at::empty(u.sizes(), u.options().dtype(at::kFloat));
  auto words = [](at::Tensor& t) { return reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>()); };
  SPGUARD_BY_DTYPE(u.scalar_type(), phase2_step, u.const_data_ptr(), p.const_data_ptr(), s.const_data_ptr(),
                   strength32.const_data_ptr<float>(),
                   attention.has_value() ? attn32.const_data_ptr<float>() : nullptr, eps.mutable_data_ptr(),
                   weight.mutable_data_ptr<float>(), words(keys), words(histogram), words(state), B, C, hw, rank,
                   static_cast<float>(guidance_scale), current_stream());
  return {eps, weight};
}

at::Tensor cross_attention_aggregate_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& token_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              "spguard: q (B, heads, L, d) and k (B, heads, K, d) disagree");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "spguard: q and k dtypes differ");
  const int64_t B = q.size(0), heads = q.size(1), L = q.size(2), K = k.size(2), d = q.size(3);
  TORCH_CHECK(token_mask.dim() == 2 && token_mask.size(0) == B && token_mask.size(1) == K,
              "spguard: token_mask must be (B, K)");
  TORCH_CHECK(heads > 0 && K > 0 && d > 0, "spguard: cross_attention_aggregate needs at least one head, token and "
              "head dimension, got q ", q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(d <= cross_attention_max_head_dim(), "spguard: head_dim ", d, " exceeds the CUDA kernel's ",
              cross_attention_max_head_dim());
  c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous();
  const auto mask = token_mask.to(at::kFloat).contiguous();
  auto out = at::empty({B, L}, q.options().dtype(at::kFloat));
  SPGUARD_BY_DTYPE(qc.scalar_type(), cross_attention_aggregate, qc.const_data_ptr(), kc.const_data_ptr(),
                   mask.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, heads, L, K, d,
                   current_stream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spguard, CUDA, m) {
  m.impl("phase1_step", &phase1_step_cuda);
  m.impl("phase2_step", &phase2_step_cuda);
  m.impl("cross_attention_aggregate", &cross_attention_aggregate_cuda);
}

}  // namespace spguard::cuda
