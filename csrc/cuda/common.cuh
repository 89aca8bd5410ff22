// Device helpers shared by the kernels: dtype conversion and block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace spguard::cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `shared` holds one float per warp. Fixed reduction order, so the result is deterministic.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = 0.f;
  if (warp == 0) {
    if (lane < blockDim.x / kWarp) v = shared[lane];
    for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

}  // namespace spguard::cuda
