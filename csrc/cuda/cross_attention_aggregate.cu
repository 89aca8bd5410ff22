// CUDA cross-attention aggregation (docs/design.md, "The fused operations", op 1;
// oracle: spguard/ops/reference.py cross_attention_aggregate).
// A[b, l] = mean_h sum_{k masked} softmax_k(q[b,h,l] . k[b,h,k] / sqrt(d)). One thread per query row, one
// block per (row block, sample); each head's keys are staged in shared memory, and the softmax runs online
// (running max, total and masked total), so the (B, heads, L, K) probabilities are never stored. Heads are
// summed in order inside the thread: deterministic, no atomics.
#include "common.cuh"
#include "launchers.h"

namespace spguard::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxKeyElements = 12288;  // tokens * head_dim staged per head: 48 KiB of fp32

template <typename T>
__global__ void __launch_bounds__(kThreads)
    aggregate_kernel(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ token_mask,
                     float* __restrict__ out, int64_t heads, int64_t L, int64_t K, int64_t d, float scale) {
  extern __shared__ float keys[];  // (K, d) of the current head, pre-scaled by 1/sqrt(d)
  const int64_t b = blockIdx.y;
  const int64_t row = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  float total = 0.f;
  for (int64_t h = 0; h < heads; ++h) {
    const T* kh = k + (b * heads + h) * K * d;
    __syncthreads();  // the previous head's keys are no longer read
    for (int64_t i = threadIdx.x; i < K * d; i += kThreads) keys[i] = to_f32(kh[i]) * scale;
    __syncthreads();
    if (row < L) {
      const T* qr = q + ((b * heads + h) * L + row) * d;
      float peak = -INFINITY, sum = 0.f, masked = 0.f;
      for (int64_t t = 0; t < K; ++t) {
        float score = 0.f;
        for (int64_t i = 0; i < d; ++i) score += to_f32(qr[i]) * keys[t * d + i];
        // Online softmax: rescale the running sums when the maximum grows.
        if (score > peak) {
          const float rescale = __expf(peak - score);
          sum *= rescale;
          masked *= rescale;
          peak = score;
        }
        const float e = __expf(score - peak);
        sum += e;
        masked += e * token_mask[b * K + t];
      }
      total += masked / sum;
    }
  }
  if (row < L) out[b * L + row] = total / static_cast<float>(heads);
}

template <typename T>
void launch(const void* q, const void* k, const float* token_mask, float* out, int64_t B, int64_t heads, int64_t L,
            int64_t K, int64_t d, cudaStream_t stream) {
  if (B == 0 || L == 0) return;
  const size_t shared = static_cast<size_t>(K * d) * sizeof(float);
  aggregate_kernel<T><<<dim3((L + kThreads - 1) / kThreads, B), kThreads, shared, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), token_mask, out, heads, L, K, d,
      rsqrtf(static_cast<float>(d)));
}

}  // namespace

int64_t cross_attention_max_key_elements() { return kMaxKeyElements; }

#define SPGUARD_AGGREGATE_LAUNCHER(suffix, T)                                                                    \
  void cross_attention_aggregate_##suffix(const void* q, const void* k, const float* token_mask, float* out,     \
                                          int64_t batch, int64_t heads, int64_t queries, int64_t tokens,         \
                                          int64_t head_dim, cudaStream_t stream) {                               \
    launch<T>(q, k, token_mask, out, batch, heads, queries, tokens, head_dim, stream);                          \
  }
SPGUARD_AGGREGATE_LAUNCHER(f32, float)
SPGUARD_AGGREGATE_LAUNCHER(f16, __half)
SPGUARD_AGGREGATE_LAUNCHER(bf16, __nv_bfloat16)
#undef SPGUARD_AGGREGATE_LAUNCHER

}  // namespace spguard::cuda
