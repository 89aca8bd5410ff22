// CUDA phase-2 step (docs/design.md, "The fused operations", op 3; oracle: spguard/ops/reference.py phase2_step).
//
// Passes over the latents: two with the noise mask, one with a per-pixel score map (the attention or
// the aligned mask). eta, the per-sample q-quantile of |d_s| over C*H*W, is an order statistic, so no
// element's membership is known before all elements are seen: pass 1 reads e_u and e_s and writes the
// order-preserving keys of |d_s| (4 bytes per element; L2-resident at SD-1.5 sizes); a radix select on
// those keys finds eta exactly, in three histogram rounds of 11, 11 and 10 bits (each reads only the keys,
// keeps its state on the device: no host synchronisation); pass 2 reads the three inputs, forms psi per
// pixel over the channels (Eq. 8), M, mu (Eq. 7) and eps (Eq. 2, 3). With a score map the keys come from
// the (B, H*W) map.
#include <algorithm>

#include "../ordered_key.h"
#include "common.cuh"
#include "launchers.h"

namespace spguard::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kKeysPerBlock = kThreads * 16;  // keys histogrammed by one block of a select round
constexpr int kRounds = 3;
constexpr int kRoundShift[kRounds] = {kKeyBits - kRadixBits, kKeyBits - 2 * kRadixBits, 0};
constexpr int kRoundBits[kRounds] = {kRadixBits, kRadixBits, kKeyBits - 2 * kRadixBits};
// Per-sample select state: the key prefix fixed so far, the mask of its bits, and the rank still sought
// among the keys that share the prefix.
enum StateWord { kPrefix = 0, kPrefixMask = 1, kRank = 2, kStateWords = 3 };

template <typename T>
__global__ void magnitude_keys_kernel(const T* __restrict__ u, const T* __restrict__ s, uint32_t* __restrict__ keys,
                                      int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    keys[i] = ordered_key(fabsf(to_f32(s[i]) - to_f32(u[i])));
}

__global__ void attention_keys_kernel(const float* __restrict__ attention, uint32_t* __restrict__ keys, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    keys[i] = ordered_key(attention[i]);
}

__global__ void init_state_kernel(uint32_t* state, int64_t rank) {
  uint32_t* st = state + blockIdx.x * kStateWords;
  st[kPrefix] = 0u;
  st[kPrefixMask] = 0u;
  st[kRank] = static_cast<uint32_t>(rank);
}

// Histogram of the round's digit over the keys that match the sample's prefix. Grid (blocks, B).
__global__ void histogram_kernel(const uint32_t* __restrict__ keys, const uint32_t* __restrict__ state,
                                 uint32_t* __restrict__ histogram, int64_t n, int shift, int bits) {
  __shared__ uint32_t local[kRadixBins];
  const int64_t b = blockIdx.y;
  const int bins = 1 << bits;
  for (int i = threadIdx.x; i < bins; i += blockDim.x) local[i] = 0u;
  __syncthreads();
  const uint32_t prefix = state[b * kStateWords + kPrefix], mask = state[b * kStateWords + kPrefixMask];
  const uint32_t* kb = keys + b * n;
  const int64_t lo = blockIdx.x * int64_t(kKeysPerBlock), hi = min(n, lo + kKeysPerBlock);
  for (int64_t i = lo + threadIdx.x; i < hi; i += blockDim.x) {
    const uint32_t key = kb[i];
    if ((key & mask) == prefix) atomicAdd(&local[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < bins; i += blockDim.x)
    if (local[i]) atomicAdd(&histogram[b * kRadixBins + i], local[i]);
}

// One thread per sample: the bucket that holds the sought rank extends the prefix.
__global__ void choose_bucket_kernel(uint32_t* __restrict__ histogram, uint32_t* __restrict__ state, int64_t batch,
                                     int shift, int bits) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  uint32_t* st = state + b * kStateWords;
  uint32_t* hist = histogram + b * kRadixBins;
  uint32_t rank = st[kRank], bucket = 0;
  while (hist[bucket] <= rank) rank -= hist[bucket++];
  st[kPrefix] |= bucket << shift;
  st[kPrefixMask] |= ((1u << bits) - 1u) << shift;
  st[kRank] = rank;
  for (int i = 0; i < kRadixBins; ++i) hist[i] = 0u;  // ready for the next round
}

template <typename T>
__global__ void guidance_kernel(const T* __restrict__ u, const T* __restrict__ p, const T* __restrict__ s,
                                const float* __restrict__ strength, const uint32_t* __restrict__ state,
                                const float* __restrict__ attention, T* __restrict__ eps, float* __restrict__ weight,
                                int64_t C, int64_t hw, float scale) {
  const int64_t b = blockIdx.y;
  const int64_t pix = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (pix >= hw) return;
  const int64_t base = b * C * hw + pix;
  float dot = 0.f, sq_p = 0.f, sq_s = 0.f;
  for (int64_t c = 0; c < C; ++c) {
    const float uf = to_f32(u[base + c * hw]);
    const float dp = to_f32(p[base + c * hw]) - uf;  // Eq. 5
    const float ds = to_f32(s[base + c * hw]) - uf;
    dot += dp * ds;
    sq_p += dp * dp;
    sq_s += ds * ds;
  }
  // psi: per-pixel cosine over channels, 0 where a norm is 0 (Eq. 8); M = R * (1 + |psi|).
  const float denom = sqrtf(sq_p * sq_s);
  const float bonus = 1.f + fabsf(denom > 0.f ? dot / denom : 0.f);
  const float eta = key_value(state[b * kStateWords + kPrefix]);
  const float strength_b = strength[b];
  for (int64_t c = 0; c < C; ++c) {
    const float uf = to_f32(u[base + c * hw]);
    const float dp = to_f32(p[base + c * hw]) - uf;
    const float ds = to_f32(s[base + c * hw]) - uf;
    const float score = attention ? attention[b * hw + pix] : fabsf(ds);
    const float w = static_cast<float>(score > eta) * bonus;
    weight[base + c * hw] = w;
    eps[base + c * hw] = from_f32<T>(uf + scale * (dp - strength_b * w * ds));  // Eq. 7, 2, 3
  }
}

constexpr int kElementwiseBlocks = 1024;  // grid-stride cap for the key kernels

template <typename T>
void launch(const void* e_u, const void* e_p, const void* e_s, const float* strength, const float* attention,
            void* eps, float* weight, uint32_t* keys, uint32_t* histogram, uint32_t* state, int64_t B, int64_t C,
            int64_t hw, int64_t rank, float scale, cudaStream_t stream) {
  if (B == 0 || C * hw == 0) return;
  const T* u = static_cast<const T*>(e_u);
  const int64_t n = attention ? hw : C * hw;  // values the quantile is taken over, per sample
  const int64_t total = B * n;
  const int key_blocks = static_cast<int>(std::min<int64_t>(kElementwiseBlocks, (total + kThreads - 1) / kThreads));
  if (attention)
    attention_keys_kernel<<<key_blocks, kThreads, 0, stream>>>(attention, keys, total);
  else
    magnitude_keys_kernel<T><<<key_blocks, kThreads, 0, stream>>>(u, static_cast<const T*>(e_s), keys, total);
  init_state_kernel<<<B, 1, 0, stream>>>(state, rank);
  const dim3 hist_grid((n + kKeysPerBlock - 1) / kKeysPerBlock, B);
  for (int r = 0; r < kRounds; ++r) {
    histogram_kernel<<<hist_grid, kThreads, 0, stream>>>(keys, state, histogram, n, kRoundShift[r], kRoundBits[r]);
    choose_bucket_kernel<<<(B + kWarp - 1) / kWarp, kWarp, 0, stream>>>(histogram, state, B, kRoundShift[r],
                                                                       kRoundBits[r]);
  }
  guidance_kernel<T><<<dim3((hw + kThreads - 1) / kThreads, B), kThreads, 0, stream>>>(
      u, static_cast<const T*>(e_p), static_cast<const T*>(e_s), strength, state, attention, static_cast<T*>(eps),
      weight, C, hw, scale);
}

}  // namespace

int64_t phase2_histogram_words(int64_t batch) { return batch * kRadixBins; }
int64_t phase2_state_words(int64_t batch) { return batch * kStateWords; }

#define SPGUARD_PHASE2_LAUNCHER(suffix, T)                                                                      \
  void phase2_step_##suffix(const void* e_u, const void* e_p, const void* e_s, const float* strength,          \
                            const float* attention, void* eps, float* weight, uint32_t* keys, uint32_t* histogram, \
                            uint32_t* state, int64_t batch, int64_t channels, int64_t pixels, int64_t quantile_rank, \
                            float guidance_scale, cudaStream_t stream) {                                           \
    launch<T>(e_u, e_p, e_s, strength, attention, eps, weight, keys, histogram, state, batch, channels, pixels,    \
              quantile_rank, guidance_scale, stream);                                                              \
  }
SPGUARD_PHASE2_LAUNCHER(f32, float)
SPGUARD_PHASE2_LAUNCHER(f16, __half)
SPGUARD_PHASE2_LAUNCHER(bf16, __nv_bfloat16)
#undef SPGUARD_PHASE2_LAUNCHER

}  // namespace spguard::cuda
