// fp16/bf16 <-> fp32 conversions written so that loops over them vectorise.
//
// Kernels take their data as `storage_t<scalar_t>`: c10::Half and c10::BFloat16 convert one value at a
// time through a struct (a scalar F16C instruction, or bit twiddling with branches), which keeps GCC
// from vectorising the loop; the compiler's own _Float16 converts whole vectors (vcvtph2ps with F16C),
// and bf16 is the top half of an fp32, kept as its raw uint16_t bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace spguard {

template <typename T>
struct Storage {
  using type = T;
};
#if defined(__FLT16_MAX__)
template <>
struct Storage<c10::Half> {
  using type = _Float16;
};
#endif
template <>
struct Storage<c10::BFloat16> {
  using type = uint16_t;
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

template <>
inline float load_f32<uint16_t>(uint16_t bf16_bits) {
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
inline uint16_t store_as<uint16_t>(float f) {
  constexpr uint32_t kRoundingBias = 0x7fffu;
  constexpr uint32_t kQuietNaN = 0x7fc0u;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = (bits + kRoundingBias + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? kQuietNaN : rounded);
}

}  // namespace spguard
