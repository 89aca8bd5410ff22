// CUDA cross-attention aggregation (docs/design.md, "The fused operations", op 1; oracle:
// spguard/ops/reference.py cross_attention_aggregate).
// A[b, l] = mean_h sum_{k masked} softmax_k(q[b,h,l] . k[b,h,k] / sqrt(d)). One thread per query row, one
// block per (row block, sample). Each head's keys are staged in shared memory one tile of tokens at a time,
// and the softmax runs online (running max, total and masked total) across the tiles, so any token count and
// any head size fit the same 48 KiB, and the (B, heads, L, K) probabilities are never stored. Heads are
// summed in order inside the thread: deterministic, no atomics. Nothing here synchronises with the host.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace spguard::cuda {
namespace {

constexpr int kThreads = 128;
// Floats of shared memory per tile: the 48 KiB that every CUDA device gives a block without opting in.
// A tile holds `tile_tokens` keys of head_dim values plus their mask values; SD 1.5's largest head
// (160 dims) gets 76 tokens per tile, so CLIP's 77 tokens take two tiles there and one for the smaller heads.
constexpr int64_t kTileFloats = 12288;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    aggregate_kernel(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ token_mask,
                     float* __restrict__ out, int64_t heads, int64_t L, int64_t K, int64_t d, int64_t tile_tokens,
                     float scale) {
  extern __shared__ float tile[];          // keys (tile_tokens, d), pre-scaled by 1/sqrt(d), then their mask
  float* tile_mask = tile + tile_tokens * d;
  const int64_t b = blockIdx.y;
  const int64_t row = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  float total = 0.f;
  for (int64_t h = 0; h < heads; ++h) {
    const T* kh = k + (b * heads + h) * K * d;
    const T* qr = q + ((b * heads + h) * L + (row < L ? row : 0)) * d;
    float peak = -INFINITY, sum = 0.f, masked = 0.f;
    for (int64_t first = 0; first < K; first += tile_tokens) {
      const int64_t n = K - first < tile_tokens ? K - first : tile_tokens;
      __syncthreads();  // the previous tile is no longer read
      for (int64_t i = threadIdx.x; i < n * d; i += kThreads) tile[i] = to_f32(kh[first * d + i]) * scale;
      for (int64_t t = threadIdx.x; t < n; t += kThreads) tile_mask[t] = token_mask[b * K + first + t];
      __syncthreads();
      if (row < L) {
        for (int64_t t = 0; t < n; ++t) {
          float score = 0.f;
          for (int64_t i = 0; i < d; ++i) score += to_f32(qr[i]) * tile[t * d + i];
          // Online softmax: rescale the running sums when the maximum grows.
          if (score > peak) {
            const float rescale = __expf(peak - score);
            sum *= rescale;
            masked *= rescale;
            peak = score;
          }
          const float e = __expf(score - peak);
          sum += e;
          masked += e * tile_mask[t];
        }
      }
    }
    total += masked / sum;
  }
  if (row < L) out[b * L + row] = total / static_cast<float>(heads);
}

template <typename T>
void launch(const void* q, const void* k, const float* token_mask, float* out, int64_t B, int64_t heads, int64_t L,
            int64_t K, int64_t d, cudaStream_t stream) {
  if (B == 0 || L == 0) return;
  const int64_t tile_tokens = std::min(K, kTileFloats / (d + 1));
  const size_t shared = static_cast<size_t>(tile_tokens * (d + 1)) * sizeof(float);
  aggregate_kernel<T><<<dim3((L + kThreads - 1) / kThreads, B), kThreads, shared, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), token_mask, out, heads, L, K, d, tile_tokens,
      rsqrtf(static_cast<float>(d)));
}

}  // namespace

int64_t cross_attention_max_head_dim() { return kTileFloats - 1; }

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
