// Philox-4x32-10 for invnext's mask kernels: bit-exact with invnext/ops/philox.py.
//
// Compiled by nvcc (the extension, and host code in the CPU tests) and by NVRTC (CuPy), so it
// includes nothing and every function is __host__ __device__. The mapping (philox.py):
//
//     key     = (seed lo, seed hi)                 seed mod 2^64
//     counter = (ctr lo, ctr hi, stream lo, stream hi)
//     bits    = word 0 of philox4x32_10(counter, key)
//     u       = float32(bits >> 8) * 2^-24         exact: 24 bits fit the significand
#pragma once

#define INVNEXT_HD __host__ __device__ __forceinline__

namespace invnext_philox {

typedef unsigned int u32;
typedef unsigned long long u64;

constexpr u32 kM0 = 0xD2511F53u;
constexpr u32 kM1 = 0xCD9E8D57u;
constexpr u32 kW0 = 0x9E3779B9u;
constexpr u32 kW1 = 0xBB67AE85u;

INVNEXT_HD u32 mulhi(u32 a, u32 b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<u32>((static_cast<u64>(a) * b) >> 32);
#endif
}

// Output word 0 of Philox-4x32-10 at (seed, stream, counter); the other three words are
// computed by the rounds anyway but never used (one counter per random number).
INVNEXT_HD u32 bits(u64 seed, u64 stream, u64 counter) {
  u32 c0 = static_cast<u32>(counter), c1 = static_cast<u32>(counter >> 32);
  u32 c2 = static_cast<u32>(stream), c3 = static_cast<u32>(stream >> 32);
  u32 k0 = static_cast<u32>(seed), k1 = static_cast<u32>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const u32 hi0 = mulhi(kM0, c0), lo0 = kM0 * c0;
    const u32 hi1 = mulhi(kM1, c2), lo1 = kM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return c0;
}

// Uniform in [0, 1), a multiple of 2^-24 (philox_uniform).
INVNEXT_HD float uniform(u64 seed, u64 stream, u64 counter) {
  return static_cast<float>(bits(seed, stream, counter) >> 8) * 5.9604644775390625e-08f;
}

}  // namespace invnext_philox
