// Launchers of the CUDA kernels: raw pointers and sizes in, one function per dtype (f32, f16, bf16),
// all asynchronous on `stream`. The host API (api.cpp) allocates every buffer they use.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace spguard::cuda {

// Sizes of the scratch buffers that phase2_step needs, in 32-bit words.
int64_t phase2_histogram_words(int64_t batch);  // zero-initialised by the caller
int64_t phase2_state_words(int64_t batch);      // zero-initialised by the caller

#define SPGUARD_DECLARE_LAUNCHERS(suffix)                                                                  \
  void phase1_step_##suffix(const void* e_u, const void* e_p, const void* e_s, void* eps, float* partials,  \
                            float* dot, float* sq_p, float* sq_s, int64_t batch, int64_t concepts,            \
                            int64_t numel, float guidance_scale, cudaStream_t stream);                        \
  void phase2_step_##suffix(const void* e_u, const void* e_p, const void* e_s, const float* strength,       \
                            const float* attention, void* eps, float* weight, uint32_t* keys,                 \
                            uint32_t* histogram, uint32_t* state, int64_t batch, int64_t channels,            \
                            int64_t pixels, int64_t quantile_rank, float guidance_scale, cudaStream_t stream); \
  void cross_attention_aggregate_##suffix(const void* q, const void* k, const float* token_mask, float* out,  \
                                          int64_t batch, int64_t heads, int64_t queries, int64_t tokens,      \
                                          int64_t head_dim, cudaStream_t stream);

SPGUARD_DECLARE_LAUNCHERS(f32)
SPGUARD_DECLARE_LAUNCHERS(f16)
SPGUARD_DECLARE_LAUNCHERS(bf16)
#undef SPGUARD_DECLARE_LAUNCHERS

// phase1_step writes (2 * concepts + 1) partial sums per block of this many elements.
int64_t phase1_chunks(int64_t numel);
// Largest head_dim the cross-attention kernel takes (one token of keys per shared-memory tile); any token count.
int64_t cross_attention_max_head_dim();

}  // namespace spguard::cuda
