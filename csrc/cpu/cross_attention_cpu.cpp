// CPU implementation of the cross-attention aggregation (SPEC.md op 1; the oracle is
// cross_attention_aggregate in spguard/ops/reference.py):
//   A[b, l] = mean_h sum_{k masked} softmax_k(q[b,h,l] . k[b,h,k] / sqrt(d))
// computed one query row at a time, so the (B, heads, L, K) probabilities never exist in memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "convert.h"

namespace spguard {
namespace {

// Query rows per task: each task converts and scales every head's keys once, so this amortises that.
constexpr int64_t kRowsPerTask = 256;
// Query rows computed together, one per vector lane: the scores of kRowBlock rows against kKeyBlock keys
// stay in registers while the head dimension is reduced, and softmax runs lane-wise over the keys.
constexpr int64_t kRowBlock = 16;
constexpr int64_t kKeyBlock = 4;

// exp(x) for x <= 0 (scores minus their row maximum), Cephes' expf: x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 polynomial, 2^n by writing the exponent bits. Written with plain arithmetic so
// the compiler vectorises it (std::exp does not vectorise without -ffast-math); about 2 ulp.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMinArg = -87.3f;  // below this exp underflows fp32's normal range: return 0
  constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                  kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
  constexpr int kExponentBias = 127, kMantissaBits = 23;
  const float keep = static_cast<float>(!(x < kMinArg));  // 0 where exp underflows; NaN passes through
  const float xc = x < kMinArg ? kMinArg : x;
  const float n = std::floor(xc * kLog2e + 0.5f);
  const float r = xc - n * kLn2Hi - n * kLn2Lo;
  float poly = kP0;
  poly = poly * r + kP1;
  poly = poly * r + kP2;
  poly = poly * r + kP3;
  poly = poly * r + kP4;
  poly = poly * r + kP5;
  const float er = poly * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + kExponentBias) << kMantissaBits;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return er * two_n * keep;
}

// S: the storage type of the inputs (float, _Float16, or bf16 bits; see convert.h).
template <typename S>
void aggregate_kernel(const S* q, const S* k, const float* mask, float* out, int64_t B, int64_t heads,
                      int64_t L, int64_t K, int64_t d) {
  const int64_t Kp = (K + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  const int64_t tasks_per_sample = (L + kRowsPerTask - 1) / kRowsPerTask;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, B * tasks_per_sample, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> keys(static_cast<size_t>(heads * Kp * d));    // (heads, Kp, d), scaled, zero-padded
    std::vector<float> rows_t(static_cast<size_t>(d * kRowBlock));   // (d, kRowBlock): lanes are rows
    std::vector<float> scores(static_cast<size_t>(Kp * kRowBlock));  // (Kp, kRowBlock)
    int64_t loaded_sample = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_sample;
      const int64_t l_end = std::min(L, (task % tasks_per_sample + 1) * kRowsPerTask);
      if (b != loaded_sample) {
        std::fill(keys.begin(), keys.end(), 0.f);
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t t = 0; t < K; ++t)
            for (int64_t i = 0; i < d; ++i)
              keys[(h * Kp + t) * d + i] = load_f32(k[((b * heads + h) * K + t) * d + i]) * scale;
        loaded_sample = b;
      }
      const float* mb = mask + b * K;
      for (int64_t l0 = (task % tasks_per_sample) * kRowsPerTask; l0 < l_end; l0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, l_end - l0);
        float total[kRowBlock] = {0.f};
        for (int64_t h = 0; h < heads; ++h) {
          const S* qh = q + ((b * heads + h) * L + l0) * d;
          std::fill(rows_t.begin(), rows_t.end(), 0.f);
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < d; ++i) rows_t[i * kRowBlock + r] = load_f32(qh[r * d + i]);
          const float* kh = keys.data() + h * Kp * d;
          for (int64_t t = 0; t < Kp; t += kKeyBlock) {
            float acc[kKeyBlock][kRowBlock] = {{0.f}};
            for (int64_t i = 0; i < d; ++i) {
              const float* qi = rows_t.data() + i * kRowBlock;
              for (int64_t j = 0; j < kKeyBlock; ++j) {
                const float kj = kh[(t + j) * d + i];
#pragma omp simd
                for (int64_t r = 0; r < kRowBlock; ++r) acc[j][r] += qi[r] * kj;
              }
            }
            for (int64_t j = 0; j < kKeyBlock; ++j)
              std::copy_n(acc[j], kRowBlock, scores.data() + (t + j) * kRowBlock);
          }
          float peak[kRowBlock], sum[kRowBlock] = {0.f}, masked[kRowBlock] = {0.f};
          std::copy_n(scores.data(), kRowBlock, peak);
          for (int64_t t = 1; t < K; ++t) {
            const float* st = scores.data() + t * kRowBlock;
#pragma omp simd
            for (int64_t r = 0; r < kRowBlock; ++r) peak[r] = st[r] > peak[r] ? st[r] : peak[r];
          }
          for (int64_t t = 0; t < K; ++t) {
            const float* st = scores.data() + t * kRowBlock;
            const float mt = mb[t];
#pragma omp simd
            for (int64_t r = 0; r < kRowBlock; ++r) {
              const float e = exp_nonpositive(st[r] - peak[r]);
              sum[r] += e;
              masked[r] += e * mt;
            }
          }
#pragma omp simd
          for (int64_t r = 0; r < kRowBlock; ++r) total[r] += masked[r] / sum[r];
        }
        for (int64_t r = 0; r < rows; ++r) out[b * L + l0 + r] = total[r] / static_cast<float>(heads);
      }
    }
  });
}

at::Tensor cross_attention_aggregate_cpu(const at::Tensor& q, const at::Tensor& k,
                                         const at::Tensor& token_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "spguard: q and k must be (B, heads, L|K, d)");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "spguard: q ",
              q.sizes(), " and k ", k.sizes(), " disagree");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "spguard: q and k dtypes differ");
  const int64_t B = q.size(0), heads = q.size(1), L = q.size(2), K = k.size(2), d = q.size(3);
  TORCH_CHECK(token_mask.dim() == 2 && token_mask.size(0) == B && token_mask.size(1) == K,
              "spguard: token_mask must be (B, K)");
  const auto mask = token_mask.to(at::kFloat).contiguous();
  const auto qc = q.contiguous(), kc = k.contiguous();
  auto out = at::empty({B, L}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "spguard_cross_attention", [&] {
    aggregate_kernel(storage_ptr(qc.const_data_ptr<scalar_t>()), storage_ptr(kc.const_data_ptr<scalar_t>()),
                     mask.const_data_ptr<float>(), out.mutable_data_ptr<float>(), B, heads, L, K, d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spguard, CPU, m) { m.impl("cross_attention_aggregate", &cross_attention_aggregate_cpu); }

}  // namespace spguard
