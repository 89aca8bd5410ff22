// CPU implementation of the phase-1 and phase-2 guidance steps (docs/design.md, "The fused operations",
// ops 2 and 3; the oracle is spguard/ops/reference.py). Inputs fp32/fp16/bf16, math and accumulation in fp32.
//
// Work is split into fixed-size chunks of one sample, independent of the thread count, and per-chunk
// partial sums are combined in chunk order, so results do not depend on how many threads ran.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../ordered_key.h"
#include "convert.h"

namespace spguard {
namespace {

// Elements of one sample that one task handles: big enough to amortise scheduling, small enough that
// a single SD-1.5 latent (16384 elements) still spreads over several threads.
constexpr int64_t kChunk = 4096;
// Below this many elements a pass runs on the calling thread, as ATen's own elementwise ops do
// (at::internal::GRAIN_SIZE): waking a thread team costs more than it saves, much more on a busy machine.
constexpr int64_t kParallelElements = at::internal::GRAIN_SIZE;
// Pixels whose channel statistics (for psi) are held at once in phase 2: fits in L1 with all channels'
// loads staying in cache between the statistics loop and the output loop.
constexpr int64_t kPixelTile = 256;
// Elements per fp32 staging block of the fp16 phase-1 loop: its 4 buffers (one concept) fit in L1.
constexpr int64_t kStageBlock = 512;
// Interleaved histogram copies in the quantile select (see select_kth).
constexpr int kHistogramCopies = 4;

void check_latents(const at::Tensor& e_u, const at::Tensor& e_p) {
  TORCH_CHECK(e_u.dim() == 4, "spguard: e_u must be (B, C, H, W), got ", e_u.sizes());
  TORCH_CHECK(e_p.sizes() == e_u.sizes(), "spguard: e_p must have e_u's shape");
  TORCH_CHECK(e_p.scalar_type() == e_u.scalar_type(), "spguard: e_u and e_p dtypes differ");
}

// One chunk of one sample: eps = u + scale * d_p, and the chunk's dot(d_p, d_s[j]), |d_s[j]|^2 (concept j
// at s + j * concept_stride) and |d_p|^2 into out[0..2N]. S: the storage type (float, or fp16/bf16 bits;
// see convert.h).
template <typename S>
void phase1_chunk(const S* ub, const S* pb, const S* s, int64_t concept_stride, int64_t N, S* eb, int64_t len,
                  float scale, float* out) {
  // Concept 0 shares the loop that writes eps, so with one concept each input is read once.
  float sq_p = 0.f, dot0 = 0.f, sq_s0 = 0.f;
#pragma omp simd reduction(+ : sq_p, dot0, sq_s0)
  for (int64_t i = 0; i < len; ++i) {
    const float uf = load_f32(ub[i]);
    const float dp = load_f32(pb[i]) - uf;  // Eq. 5
    const float ds = load_f32(s[i]) - uf;
    eb[i] = store_as<S>(uf + scale * dp);  // Eq. 1
    sq_p += dp * dp;
    dot0 += dp * ds;
    sq_s0 += ds * ds;
  }
  out[0] = dot0;
  out[N] = sq_s0;
  out[2 * N] = sq_p;
  for (int64_t j = 1; j < N; ++j) {
    const S* sb = s + j * concept_stride;
    float dot = 0.f, sq_s = 0.f;
#pragma omp simd reduction(+ : dot, sq_s)
    for (int64_t i = 0; i < len; ++i) {
      const float uf = load_f32(ub[i]);
      const float dp = load_f32(pb[i]) - uf;
      const float ds = load_f32(sb[i]) - uf;
      dot += dp * ds;
      sq_s += ds * ds;
    }
    out[j] = dot;
    out[N + j] = sq_s;
  }
}

template <typename S>
void phase1_kernel(const S* u, const S* p, const S* s, S* eps, float* partials, int64_t B, int64_t N,
                   int64_t n, float scale) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t stats = 2 * N + 1;  // dot[j], |d_s[j]|^2, then |d_p|^2
  at::parallel_for(0, B * chunks, std::max<int64_t>(1, kParallelElements / kChunk), [=](int64_t begin, int64_t end) {
    // fp16 with F16C: convert L1-sized blocks of the chunk to fp32 buffers (8 values per instruction), run
    // the fp32 loop on them and add up the blocks' sums.
    std::unique_ptr<float[]> staged(kStaged<S> ? new float[(3 + N) * kStageBlock + stats] : nullptr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks;
      const int64_t lo = (task % chunks) * kChunk;
      const int64_t len = std::min(kChunk, n - lo);
      const S *ub = u + b * n + lo, *pb = p + b * n + lo, *sb = s + b * N * n + lo;
      S* eb = eps + b * n + lo;
      float* out = partials + task * stats;
      if constexpr (kStaged<S>) {
        float *fu = staged.get(), *fp = fu + kStageBlock, *fe = fp + kStageBlock, *fs = fe + kStageBlock;
        float* block_sums = fs + N * kStageBlock;
        std::fill_n(out, stats, 0.f);
        for (int64_t first = 0; first < len; first += kStageBlock) {
          const int64_t m = std::min(kStageBlock, len - first);
          load_run(ub + first, fu, m);
          load_run(pb + first, fp, m);
          for (int64_t j = 0; j < N; ++j) load_run(sb + j * n + first, fs + j * kStageBlock, m);
          phase1_chunk(fu, fp, fs, kStageBlock, N, fe, m, scale, block_sums);
          store_run(fe, eb + first, m);
          for (int64_t k = 0; k < stats; ++k) out[k] += block_sums[k];
        }
      } else {
        phase1_chunk(ub, pb, sb, n, N, eb, len, scale, out);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> phase1_step_cpu(const at::Tensor& e_u,
                                                                           const at::Tensor& e_p,
                                                                           const at::Tensor& e_s,
                                                                           double guidance_scale) {
  check_latents(e_u, e_p);
  TORCH_CHECK(e_s.dim() == 5 && e_s.size(0) == e_u.size(0) && e_s.sizes().slice(2) == e_u.sizes().slice(1),
              "spguard: e_s must be (B, N, C, H, W) matching e_u, got ", e_s.sizes());
  TORCH_CHECK(e_s.scalar_type() == e_u.scalar_type(), "spguard: e_u and e_s dtypes differ");
  const auto u = e_u.contiguous(), p = e_p.contiguous(), s = e_s.contiguous();
  const int64_t B = u.size(0), N = s.size(1), n = u.numel() / std::max<int64_t>(B, 1);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto eps = at::empty_like(u);
  const int64_t stats = 2 * N + 1;
  std::unique_ptr<float[]> partials(new float[B * chunks * stats]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "spguard_phase1_step", [&] {
    phase1_kernel(storage_ptr(u.const_data_ptr<scalar_t>()), storage_ptr(p.const_data_ptr<scalar_t>()),
                  storage_ptr(s.const_data_ptr<scalar_t>()), storage_ptr(eps.mutable_data_ptr<scalar_t>()),
                  partials.get(), B, N, n, static_cast<float>(guidance_scale));
  });
  // Chunk partials are few (4 per SD-1.5 sample); summing them in order keeps the result deterministic.
  const auto f32 = u.options().dtype(at::kFloat);
  auto dot = at::empty({B, N}, f32), sq_p = at::empty({B}, f32), sq_s = at::empty({B, N}, f32);
  float *dot_out = dot.mutable_data_ptr<float>(), *sq_p_out = sq_p.mutable_data_ptr<float>(),
        *sq_s_out = sq_s.mutable_data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    float total_p = 0.f;
    for (int64_t j = 0; j < N; ++j) dot_out[b * N + j] = sq_s_out[b * N + j] = 0.f;
    for (int64_t c = 0; c < chunks; ++c) {
      const float* part = partials.get() + (b * chunks + c) * stats;
      for (int64_t j = 0; j < N; ++j) {
        dot_out[b * N + j] += part[j];
        sq_s_out[b * N + j] += part[N + j];
      }
      total_p += part[2 * N];
    }
    sq_p_out[b] = total_p;
  }
  return {eps, dot, sq_p, sq_s};
}

#if defined(__AVX2__)
// Lane-index vectors that move the lanes an 8-bit mask selects to the front, in order (left-packing).
struct PackTable {
  alignas(32) uint32_t lanes[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int out = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask >> lane & 1) lanes[mask][out++] = lane;
      for (; out < 8; ++out) lanes[mask][out] = 0;
    }
  }
};
const PackTable kPackTable;
#endif

// Copies the keys of keys[0..n) whose top kRadixBits equal `bucket` to out[0..found), in order; returns
// found. out needs room for n keys.
int64_t gather_bucket(const uint32_t* keys, int64_t n, uint32_t bucket, uint32_t* out) {
  constexpr int kShift = kKeyBits - kRadixBits;
  int64_t found = 0, j = 0;
#if defined(__AVX2__)
  // Eight keys at a time: compare, then store all eight left-packed and advance by the match count
  // (measured: the whole select of 16384 keys took 16.5 us with the scalar loop below, 9.2 us with this).
  const __m256i want = _mm256_set1_epi32(static_cast<int>(bucket));
  for (; j + 8 <= n; j += 8) {
    const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + j));
    const __m256i hit = _mm256_cmpeq_epi32(_mm256_srli_epi32(k, kShift), want);
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(hit));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPackTable.lanes[mask]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + found), _mm256_permutevar8x32_epi32(k, lanes));
    found += __builtin_popcount(static_cast<unsigned>(mask));
  }
#endif
  // Branch-free: always write, advance only on a match.
  for (; j < n; ++j) {
    out[found] = keys[j];
    found += (keys[j] >> kShift) == bucket;
  }
  return found;
}

// k-th smallest (0-based) of keys[0..n): one histogram of the top kRadixBits, then an exact
// nth_element over the few candidates in the bucket that holds rank k. `scratch` holds n keys.
float select_kth(const uint32_t* keys, int64_t n, int64_t k, std::vector<uint32_t>& scratch) {
  constexpr int kShift = kKeyBits - kRadixBits;
  // Keys of nearby elements often share a bucket: counting into interleaved copies of the histogram
  // keeps consecutive increments independent instead of serialising on one counter.
  uint32_t counts[kHistogramCopies][kRadixBins] = {{0}};
  int64_t i = 0;
  for (; i + kHistogramCopies <= n; i += kHistogramCopies)
    for (int c = 0; c < kHistogramCopies; ++c) ++counts[c][keys[i + c] >> kShift];
  for (; i < n; ++i) ++counts[0][keys[i] >> kShift];
  auto bucket_count = [&](uint32_t bucket) {
    int64_t total = 0;
    for (int c = 0; c < kHistogramCopies; ++c) total += counts[c][bucket];
    return total;
  };
  // Walk the buckets from the end nearer to rank k (the quantiles used are high: q = 0.9).
  uint32_t bucket;
  int64_t below;
  if (2 * k >= n) {
    int64_t at_or_above = 0;
    for (bucket = kRadixBins - 1;; --bucket) {
      at_or_above += bucket_count(bucket);
      if (n - at_or_above <= k) break;
    }
    below = n - at_or_above;
  } else {
    below = 0;
    for (bucket = 0;; ++bucket) {
      const int64_t in_bucket = bucket_count(bucket);
      if (below + in_bucket > k) break;
      below += in_bucket;
    }
  }
  scratch.resize(static_cast<size_t>(n));
  const int64_t found = gather_bucket(keys, n, bucket, scratch.data());
  auto kth = scratch.begin() + (k - below);
  std::nth_element(scratch.begin(), kth, scratch.begin() + found);
  return key_value(*kth);
}

// One tile of `len` pixels of one sample: channel c of the inputs at u + c * stride (and p, s), of the
// outputs at eps + c * stride and weight + c * weight_stride.
template <bool kAttention, typename S>
void phase2_tile(const S* u, const S* p, const S* s, int64_t stride, const float* attn, S* eps, float* weight,
                 int64_t weight_stride, int64_t C, int64_t len, float strength, float eta, float scale) {
  float dot[kPixelTile], sq_p[kPixelTile], sq_s[kPixelTile], bonus[kPixelTile];
  std::fill_n(dot, len, 0.f);
  std::fill_n(sq_p, len, 0.f);
  std::fill_n(sq_s, len, 0.f);
  for (int64_t c = 0; c < C; ++c) {
    const S *uc = u + c * stride, *pc = p + c * stride, *sc = s + c * stride;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float uf = load_f32(uc[i]);
      const float dp = load_f32(pc[i]) - uf;  // Eq. 5
      const float ds = load_f32(sc[i]) - uf;
      dot[i] += dp * ds;
      sq_p[i] += dp * dp;
      sq_s[i] += ds * ds;
    }
  }
  // psi: per-pixel cosine over channels, 0 where a norm is 0 (Eq. 8); M = R * (1 + |psi|).
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float denom = std::sqrt(sq_p[i] * sq_s[i]);
    bonus[i] = 1.f + std::fabs(denom > 0.f ? dot[i] / denom : 0.f);
  }
  for (int64_t c = 0; c < C; ++c) {
    const S *uc = u + c * stride, *pc = p + c * stride, *sc = s + c * stride;
    S* ec = eps + c * stride;
    float* wc = weight + c * weight_stride;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const float uf = load_f32(uc[i]);
      const float dp = load_f32(pc[i]) - uf;
      const float ds = load_f32(sc[i]) - uf;
      const float score = kAttention ? attn[i] : std::fabs(ds);
      const float w = static_cast<float>(score > eta) * bonus[i];
      wc[i] = w;
      ec[i] = store_as<S>(uf + scale * (dp - strength * w * ds));  // Eq. 7, 2, 3
    }
  }
}

// Phase 2 makes two passes over the latents with the noise mask and one with a per-pixel score map
// (the attention or the aligned mask).
// The threshold eta is an order statistic of all C*H*W values of |d_s|, so no element's membership is
// known before every element has been seen: pass 1 reads e_u and e_s and writes the order-preserving
// keys of |d_s| (4 bytes/element, cache-resident at SD-1.5 sizes); a histogram radix select on them
// finds eta; pass 2 reads the three inputs and writes eps and M. With a score map, eta comes
// from the (B, H*W) map alone, so the latents are read once.
template <bool kAttention, typename S>
void phase2_kernel(const S* u, const S* p, const S* s, const float* strength, const float* eta,
                   const float* attention, S* eps, float* weight, int64_t B, int64_t C, int64_t hw,
                   float scale) {
  const int64_t tiles = (hw + kPixelTile - 1) / kPixelTile;
  const int64_t grain = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, kPixelTile * C));
  at::parallel_for(0, B * tiles, grain, [=](int64_t begin, int64_t end) {
    // fp16 with F16C: each tile's channels go through fp32 buffers (kPixelTile apart), as in phase 1.
    std::unique_ptr<float[]> staged(kStaged<S> ? new float[4 * C * kPixelTile] : nullptr);  // uninitialised
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles;
      const int64_t lo = (task % tiles) * kPixelTile;
      const int64_t len = std::min(kPixelTile, hw - lo);
      const int64_t base = b * C * hw + lo;
      const float* attn = kAttention ? attention + b * hw + lo : nullptr;
      if constexpr (kStaged<S>) {
        float *fu = staged.get(), *fp = fu + C * kPixelTile, *fs = fp + C * kPixelTile, *fe = fs + C * kPixelTile;
        for (int64_t c = 0; c < C; ++c) {
          load_run(u + base + c * hw, fu + c * kPixelTile, len);
          load_run(p + base + c * hw, fp + c * kPixelTile, len);
          load_run(s + base + c * hw, fs + c * kPixelTile, len);
        }
        phase2_tile<kAttention>(fu, fp, fs, kPixelTile, attn, fe, weight + base, hw, C, len, strength[b], eta[b],
                                scale);
        for (int64_t c = 0; c < C; ++c) store_run(fe + c * kPixelTile, eps + base + c * hw, len);
      } else {
        phase2_tile<kAttention>(u + base, p + base, s + base, hw, attn, eps + base, weight + base, hw, C, len,
                                strength[b], eta[b], scale);
      }
    }
  });
}

template <typename S>
void magnitude_keys(const S* u, const S* s, uint32_t* keys, int64_t total) {
  at::parallel_for(0, total, kParallelElements, [=](int64_t begin, int64_t end) {
    if constexpr (kStaged<S>) {
      float fu[kPixelTile], fs[kPixelTile];
      for (int64_t lo = begin; lo < end; lo += kPixelTile) {
        const int64_t len = std::min(kPixelTile, end - lo);
        load_run(u + lo, fu, len);
        load_run(s + lo, fs, len);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) keys[lo + i] = ordered_key(std::fabs(fs[i] - fu[i]));
      }
    } else {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) keys[i] = ordered_key(std::fabs(load_f32(s[i]) - load_f32(u[i])));
    }
  });
}

// eta[b] = value at index quantile_index(q, n) of the ascending sort of row b of keys (B, n).
void select_thresholds(const uint32_t* keys, float* eta, int64_t B, int64_t n, double q) {
  const auto k = static_cast<int64_t>(std::floor(q * static_cast<double>(n - 1)));
  at::parallel_for(0, B, 1, [=](int64_t begin, int64_t end) {
    std::vector<uint32_t> scratch;
    scratch.reserve(n);
    for (int64_t b = begin; b < end; ++b) eta[b] = select_kth(keys + b * n, n, k, scratch);
  });
}

std::tuple<at::Tensor, at::Tensor> phase2_step_cpu(const at::Tensor& e_u, const at::Tensor& e_p,
                                                   const at::Tensor& e_s, const at::Tensor& strength,
                                                   double guidance_scale, double q,
                                                   const std::optional<at::Tensor>& attention) {
  check_latents(e_u, e_p);
  TORCH_CHECK(e_s.sizes() == e_u.sizes() && e_s.scalar_type() == e_u.scalar_type(),
              "spguard: e_s must match e_u in shape and dtype");
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "spguard: q must be in [0, 1], got ", q);
  const int64_t B = e_u.size(0), C = e_u.size(1), hw = e_u.size(2) * e_u.size(3);
  TORCH_CHECK(strength.numel() == B, "spguard: strength must have one value per sample");
  const auto u = e_u.contiguous(), p = e_p.contiguous(), s = e_s.contiguous();
  const auto strength32 = strength.to(at::kFloat).contiguous();
  auto eps = at::empty_like(u);
  auto weight = at::empty(u.sizes(), u.options().dtype(at::kFloat));
  auto eta = at::empty({B}, u.options().dtype(at::kFloat));
  at::Tensor attn32;
  if (attention.has_value()) {
    TORCH_CHECK(attention->numel() == B * hw, "spguard: pixel_scores must be (B, H*W)");
    attn32 = attention->to(at::kFloat).contiguous();
    // The score map's own bits serve as keys: the select reads them through ordered_key.
    std::unique_ptr<uint32_t[]> keys(new uint32_t[B * hw]);
    const float* a = attn32.const_data_ptr<float>();
    for (int64_t i = 0; i < B * hw; ++i) keys[i] = ordered_key(a[i]);
    select_thresholds(keys.get(), eta.mutable_data_ptr<float>(), B, hw, q);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "spguard_phase2_step", [&] {
    const auto *up = storage_ptr(u.const_data_ptr<scalar_t>()),
               *pp = storage_ptr(p.const_data_ptr<scalar_t>()),
               *sp = storage_ptr(s.const_data_ptr<scalar_t>());
    if (!attention.has_value()) {
      std::unique_ptr<uint32_t[]> keys(new uint32_t[u.numel()]);  // uninitialised: pass 1 fills it
      magnitude_keys(up, sp, keys.get(), u.numel());
      select_thresholds(keys.get(), eta.mutable_data_ptr<float>(), B, C * hw, q);
    }
    auto* eps_out = storage_ptr(eps.mutable_data_ptr<scalar_t>());
    const float scale = static_cast<float>(guidance_scale);
    if (attention.has_value())
      phase2_kernel<true>(up, pp, sp, strength32.const_data_ptr<float>(), eta.const_data_ptr<float>(),
                          attn32.const_data_ptr<float>(), eps_out, weight.mutable_data_ptr<float>(), B, C, hw,
                          scale);
    else
      phase2_kernel<false>(up, pp, sp, strength32.const_data_ptr<float>(), eta.const_data_ptr<float>(),
                           nullptr, eps_out, weight.mutable_data_ptr<float>(), B, C, hw, scale);
  });
  return {eps, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(spguard, CPU, m) {
  m.impl("phase1_step", &phase1_step_cpu);
  m.impl("phase2_step", &phase2_step_cpu);
}

}  // namespace spguard
