// CUDA phase-1 step (docs/design.md, "The fused operations", op 2; oracle: spguard/ops/reference.py phase1_step).
// One block per (chunk, sample) writes eps (Eq. 1) and its chunk's partial dot(d_p, d_s[j]), |d_p|^2 and
// |d_s[j]|^2 (Eq. 6), reading each input once; a second kernel sums the partials in chunk order
// (deterministic, no atomics, no host synchronisation).
#include "common.cuh"
#include "launchers.h"

namespace spguard::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 8;
constexpr int64_t kChunk = kThreads * kItemsPerThread;
constexpr int kFinishThreads = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    phase1_kernel(const T* __restrict__ u, const T* __restrict__ p, const T* __restrict__ s, T* __restrict__ eps,
                  float* __restrict__ partials, int64_t n, int64_t N, int64_t chunks, float scale) {
  __shared__ float shared[kThreads / kWarp];
  const int64_t b = blockIdx.y, chunk = blockIdx.x;
  const int64_t lo = chunk * kChunk, hi = min(n, lo + kChunk);
  const T* ub = u + b * n;
  const T* pb = p + b * n;
  float sq_p = 0.f, dot0 = 0.f, sq_s0 = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
    const float uf = to_f32(ub[i]);
    const float dp = to_f32(pb[i]) - uf;  // Eq. 5
    const float ds = to_f32(s[b * N * n + i]) - uf;
    eps[b * n + i] = from_f32<T>(uf + scale * dp);  // Eq. 1
    sq_p += dp * dp;
    dot0 += dp * ds;
    sq_s0 += ds * ds;
  }
  const int64_t stats = 2 * N + 1;  // dot[j], |d_s[j]|^2, then |d_p|^2
  float* out = partials + (b * chunks + chunk) * stats;
  sq_p = block_sum(sq_p, shared);
  if (threadIdx.x == 0) out[2 * N] = sq_p;
  dot0 = block_sum(dot0, shared);
  if (threadIdx.x == 0) out[0] = dot0;
  sq_s0 = block_sum(sq_s0, shared);
  if (threadIdx.x == 0) out[N] = sq_s0;
  for (int64_t j = 1; j < N; ++j) {
    const T* sb = s + (b * N + j) * n;
    float dot = 0.f, sq_s = 0.f;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const float uf = to_f32(ub[i]);
      const float dp = to_f32(pb[i]) - uf;
      const float ds = to_f32(sb[i]) - uf;
      dot += dp * ds;
      sq_s += ds * ds;
    }
    dot = block_sum(dot, shared);
    if (threadIdx.x == 0) out[j] = dot;
    sq_s = block_sum(sq_s, shared);
    if (threadIdx.x == 0) out[N + j] = sq_s;
  }
}

// One block per sample; thread t sums statistic t over the chunks, in chunk order.
__global__ void finish_kernel(const float* __restrict__ partials, float* __restrict__ dot, float* __restrict__ sq_p,
                              float* __restrict__ sq_s, int64_t N, int64_t chunks) {
  const int64_t b = blockIdx.x, stats = 2 * N + 1;
  for (int64_t t = threadIdx.x; t < stats; t += blockDim.x) {
    float total = 0.f;
    for (int64_t c = 0; c < chunks; ++c) total += partials[(b * chunks + c) * stats + t];
    if (t < N)
      dot[b * N + t] = total;
    else if (t < 2 * N)
      sq_s[b * N + t - N] = total;
    else
      sq_p[b] = total;
  }
}

template <typename T>
void launch(const void* e_u, const void* e_p, const void* e_s, void* eps, float* partials, float* dot,
            float* sq_p, float* sq_s, int64_t B, int64_t N, int64_t n, float scale, cudaStream_t stream) {
  if (B == 0 || n == 0) return;
  const int64_t chunks = phase1_chunks(n);
  phase1_kernel<T><<<dim3(chunks, B), kThreads, 0, stream>>>(
      static_cast<const T*>(e_u), static_cast<const T*>(e_p), static_cast<const T*>(e_s), static_cast<T*>(eps),
      partials, n, N, chunks, scale);
  finish_kernel<<<B, kFinishThreads, 0, stream>>>(partials, dot, sq_p, sq_s, N, chunks);
}

}  // namespace

int64_t phase1_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

#define SPGUARD_PHASE1_LAUNCHER(suffix, T)                                                                      \
  void phase1_step_##suffix(const void* e_u, const void* e_p, const void* e_s, void* eps, float* partials,       \
                            float* dot, float* sq_p, float* sq_s, int64_t batch, int64_t concepts, int64_t numel, \
                            float guidance_scale, cudaStream_t stream) {                                           \
    launch<T>(e_u, e_p, e_s, eps, partials, dot, sq_p, sq_s, batch, concepts, numel, guidance_scale, stream);     \
  }
SPGUARD_PHASE1_LAUNCHER(f32, float)
SPGUARD_PHASE1_LAUNCHER(f16, __half)
SPGUARD_PHASE1_LAUNCHER(bf16, __nv_bfloat16)
#undef SPGUARD_PHASE1_LAUNCHER

}  // namespace spguard::cuda
