// fp16/bf16 <-> fp32 conversions written so that loops over them vectorise.
//
// Kernels take their data as `storage_t<scalar_t>`: c10::Half and c10::BFloat16 convert one value at a
// time through a struct (a scalar F16C instruction, or bit twiddling with branches), which keeps GCC
// from vectorising the loop. Here both are raw 16-bit patterns converted with branch-free integer and
// float arithmetic that vectorises on any SIMD ISA: bf16 is the top half of an fp32; fp16 is rebiased.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace spguard {

// Bit patterns of the 16-bit formats: distinct types, so that load_f32/store_as overload on them.
using Bf16Bits = uint16_t;
using Fp16Bits = char16_t;

template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<c10::Half> {
  using type = Fp16Bits;
};
template <>
struct Storage<c10::BFloat16> {
  using type = Bf16Bits;
};
template <typename T>
using storage_t = typename Storage<T>::type;

template <typename T>
inline const storage_t<T>* storage_ptr(const T* p) {
  return reinterpret_cast<const storage_t<T>*>(p);
}
template <typename T>
inline storage_t<T>* storage_ptr(T* p) {
  return reinterpret_cast<storage_t<T>*>(p);
}

template <typename S>
inline float load_f32(S x) {
  return static_cast<float>(x);
}

inline float bits_to_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// fp16 -> fp32, exact: shifting exponent and mantissa into fp32's places and multiplying by 2^(127-15)
// rebiases normals and subnormals alike; Inf/NaN (exponent all ones) get fp32's all-ones exponent.
template <>
inline float load_f32<Fp16Bits>(Fp16Bits fp16_bits) {
  constexpr uint32_t kSign = 0x8000u, kExpMantissa = 0x7fffu, kInfNaN = 0x7c00u;
  constexpr uint32_t kF32ExpAllOnes = 0x7f800000u;
  constexpr float kRebias = 0x1p112f;  // 2^(127 - 15)
  const uint32_t h = fp16_bits;
  const uint32_t shifted = (h & kExpMantissa) << 13;
  const uint32_t finite = f32_to_bits(bits_to_f32(shifted) * kRebias);
  const uint32_t magnitude = (h & kExpMantissa) >= kInfNaN ? (shifted | kF32ExpAllOnes) : finite;
  return bits_to_f32(magnitude | ((h & kSign) << 16));
}

template <>
inline float load_f32<Bf16Bits>(Bf16Bits bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename S>
inline S store_as(float f) {
  return static_cast<S>(f);
}

// bf16: round to nearest even, as c10::BFloat16(float) does; NaN stays a quiet NaN.
template <>
inline Bf16Bits store_as<Bf16Bits>(float f) {
  constexpr uint32_t kRoundingBias = 0x7fffu;
  constexpr uint32_t kQuietNaN = 0x7fc0u;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + kRoundingBias + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? kQuietNaN : rounded);
}

// fp16: round to nearest even, as c10::Half(float) does, branch-free (F. Giesen's float_to_half_fast3_rtne):
// overflow gives Inf and NaN a quiet NaN; subnormal results come from adding a magic number that makes the
// FPU round the mantissa; normal results rebias the exponent and round by adding half an ulp (+1 if odd).
template <>
inline Fp16Bits store_as<Fp16Bits>(float f) {
  constexpr uint32_t kSign = 0x80000000u, kF32Inf = 255u << 23, kF16Overflow = (127u + 16u) << 23;
  constexpr uint32_t kF16MinNormal = 113u << 23;  // 2^-14 as fp32 bits
  constexpr uint32_t kSubnormalMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  constexpr uint32_t kRebias = static_cast<uint32_t>(15 - 127) << 23, kHalfUlpMinus1 = 0xfffu;
  constexpr uint32_t kF16Inf = 0x7c00u, kF16QuietNaN = 0x7e00u;
  uint32_t bits = f32_to_bits(f);
  const uint32_t sign = bits & kSign;
  bits ^= sign;
  const uint32_t special = bits > kF32Inf ? kF16QuietNaN : kF16Inf;
  const uint32_t subnormal = f32_to_bits(bits_to_f32(bits) + bits_to_f32(kSubnormalMagic)) - kSubnormalMagic;
  const uint32_t normal = (bits + kRebias + kHalfUlpMinus1 + ((bits >> 13) & 1u)) >> 13;
  const uint32_t magnitude = bits >= kF16Overflow ? special : (bits < kF16MinNormal ? subnormal : normal);
  return static_cast<Fp16Bits>(magnitude | (sign >> 16));
}

// Runs of values between storage and fp32 buffers. The arithmetic fp16 conversions above cost about a
// dozen vector instructions per 8 values; F16C converts 8 in one, so with F16C the fp16 kernels stage
// their tiles through fp32 buffers (kStaged) instead of converting inside their loops.
#if defined(__F16C__)
template <typename S>
constexpr bool kStaged = std::is_same_v<S, Fp16Bits>;
#else
template <typename S>
constexpr bool kStaged = false;
#endif

template <typename S>
inline void load_run(const S* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<S, Fp16Bits>)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < n; ++i) out[i] = load_f32(in[i]);
}

template <typename S>
inline void store_run(const float* in, S* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  if constexpr (std::is_same_v<S, Fp16Bits>)
    for (; i + 8 <= n; i += 8)  // round to nearest even, as store_as does
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) out[i] = store_as<S>(in[i]);
}

}  // namespace spguard
