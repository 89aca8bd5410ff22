// Order-preserving map between fp32 values and uint32 keys, shared by the CPU and CUDA selections.
//
// The per-sample quantile of docs/design.md, "The quantile" (value at index floor(q * (n - 1))
// of the ascending sort) is found by a radix select on these keys: comparing keys as unsigned
// integers orders the floats exactly as an ascending sort does (-inf < ... < -0 < +0 < ... < +inf < NaN for positive NaN),
// so a histogram of the key's top bits tells which bucket holds the k-th value without sorting.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SPGUARD_HD __host__ __device__ __forceinline__
#else
#define SPGUARD_HD inline
#endif

namespace spguard {

constexpr uint32_t kSignBit = 0x80000000u;

// Bits of the key that the first radix round histograms: sign, exponent and 2 mantissa bits, so
// one round splits every octave into 4 buckets.
constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;
constexpr int kKeyBits = 32;

SPGUARD_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

SPGUARD_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
#endif
}

// Negative floats: flip every bit (larger magnitude sorts lower); others: set the sign bit.
SPGUARD_HD uint32_t ordered_key(float x) {
  const uint32_t b = float_bits(x);
  return (b & kSignBit) ? ~b : (b | kSignBit);
}

SPGUARD_HD float key_value(uint32_t key) { return bits_float((key & kSignBit) ? (key & ~kSignBit) : ~key); }

}  // namespace spguard
