// Token gather/scatter kernels of invnext: device code only.
//
// This header is compiled twice from the same text: by nvcc into the prebuilt extension
// (csrc/token_ops*.cu include it through token_launch.cuh, the host launchers), and at first
// use by NVRTC through CuPy when no prebuilt extension is installed (invnext/native/_cupy.py).
// So it holds no host code and includes nothing but the fp16/bf16 headers NVRTC ships; every
// kernel is `extern "C"` so both callers find it by a plain name:
//
//     invnext_<kernel>_<dtype>_v<VEC>     dtype in f32, f16, bf16, f64
//
// VEC = 16 / sizeof(T) is the 16-byte path (rows and every pointer 16-byte aligned), VEC = 1
// the scalar path. Row kernels use a 2D block: threadIdx.x walks the VEC-wide pieces of a row,
// threadIdx.y picks the row (kGatherRows rows per thread in gather_visible_fwd), and the grid
// strides over rows.
//
// Arithmetic: adds and sums happen in fp32 (fp64 for fp64 tensors) and are rounded to the
// tensor dtype once, so `x + pos` equals torch's (x.float() + pos.float()).to(dtype) bit for bit.
// Every index read from memory is range-checked before it addresses anything; a row whose
// source index is out of range is written as zeros (gather) or as the fill row (expand).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace invnext_tokens {

typedef long long i64;

// fp32 accumulators for fp32/fp16/bf16, fp64 for fp64.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double widen(double v) { return v; }

template <typename T> __device__ __forceinline__ T narrow(typename Acc<T>::type v);
template <> __device__ __forceinline__ float narrow<float>(float v) { return v; }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ double narrow<double>(double v) { return v; }

// VEC elements moved by one load/store: 16 bytes on the vector path.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load(const T* row, i64 piece) {
  return reinterpret_cast<const Pack<T, VEC>*>(row)[piece];
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* row, i64 piece, const Pack<T, VEC>& p) {
  reinterpret_cast<Pack<T, VEC>*>(row)[piece] = p;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zeros() {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = narrow<T>(0);
  return p;
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> add(const Pack<T, VEC>& a, const Pack<T, VEC>& b) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.v[k] = narrow<T>(widen(a.v[k]) + widen(b.v[k]));
  return p;
}

template <typename T, int VEC>
__device__ __forceinline__ void accumulate(typename Acc<T>::type (&acc)[VEC], const Pack<T, VEC>& p) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) acc[k] += widen(p.v[k]);
}

// The sample of packed row r: the last b in [0, B) with cu[b] <= r. Equals torch's
// searchsorted(cu[1:], r, right=True) for valid cu_seqlens (empty samples included) and stays
// in [0, B) for any cu_seqlens, so it is always a safe index.
__device__ __forceinline__ i64 sample_of_row(const int* __restrict__ cu, i64 B, i64 r) {
  i64 lo = 0, hi = B - 1;
  while (lo < hi) {
    const i64 mid = (lo + hi + 1) >> 1;
    if (static_cast<i64>(cu[mid]) <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// True when packed row r is one of the first P rows of its sample (a prefix row).
__device__ __forceinline__ bool is_prefix_row(const int* __restrict__ cu, i64 B, i64 P, i64 r, i64* sample,
                                              i64* local) {
  if (P <= 0) return false;
  const i64 b = sample_of_row(cu, B, r);
  const i64 j = r - static_cast<i64>(cu[b]);
  *sample = b;
  *local = j;
  return j >= 0 && j < P;
}

__device__ __forceinline__ i64 first_row() { return static_cast<i64>(blockIdx.x) * blockDim.y + threadIdx.y; }
__device__ __forceinline__ i64 row_stride() { return static_cast<i64>(gridDim.x) * blockDim.y; }

constexpr int kCuCache = 1024;  // cu_seqlens entries a block caches in shared memory (B < 1024)
constexpr int kGatherRows = 4;  // packed rows each thread has in flight (gather_visible_fwd)

// gather_visible forward:
//   out[r] = prefix[b or 0, j]                            if j = r - cu[b] < P
//          = x[index[r]] + pos[index[r] or index[r] % N]  otherwise (0 if index[r] is out of range)
// The pos row is index[r] itself when pos has batch B: that is row (b, n) of pos, because the
// token index[r] = b*N + n of sample b lies in that sample's block of x.
// Latency, not bandwidth, limits a gather: each row's source is known only after loading
// index[r] (and searching cu_seqlens). So the block caches cu_seqlens in shared memory, loads
// index[r] while it searches, and each thread carries kGatherRows rows (block rows
// threadIdx.y + u * blockDim.y) so their loads overlap.
template <typename T, int VEC>
__device__ __forceinline__ void gather_visible_fwd(
    T* __restrict__ out, const T* __restrict__ x, const i64* __restrict__ index, const int* __restrict__ cu,
    const T* __restrict__ pos, const T* __restrict__ prefix, i64 total, i64 B, i64 N, i64 C, i64 Bp, i64 Bq, i64 P) {
  __shared__ int cu_cache[kCuCache];
  const int* cu_seq = cu;
  if (P > 0 && B < kCuCache) {  // uniform over the block, so the barrier is safe
    const int threads = blockDim.x * blockDim.y;
    for (int i = threadIdx.y * blockDim.x + threadIdx.x; i <= B; i += threads) cu_cache[i] = cu[i];
    __syncthreads();
    cu_seq = cu_cache;
  }
  const i64 pieces = C / VEC;
  const i64 BN = B * N;
  const i64 block_rows = static_cast<i64>(blockDim.y) * kGatherRows;
  for (i64 base = static_cast<i64>(blockIdx.x) * block_rows + threadIdx.y; base < total;
       base += static_cast<i64>(gridDim.x) * block_rows) {
    const T* src[kGatherRows];
    const T* add_row[kGatherRows];
#pragma unroll
    for (int u = 0; u < kGatherRows; ++u) {
      const i64 r = base + static_cast<i64>(u) * blockDim.y;
      src[u] = nullptr;
      add_row[u] = nullptr;
      if (r < total) {
        const i64 idx = index[r];  // loaded before the prefix test so the two overlap
        i64 b = 0, j = 0;
        if (is_prefix_row(cu_seq, B, P, r, &b, &j)) {
          src[u] = prefix + ((Bq > 1 ? b : 0) * P + j) * C;
        } else if (idx >= 0 && idx < BN) {
          src[u] = x + idx * C;
          if (pos != nullptr) add_row[u] = pos + (Bp > 1 ? idx : idx % N) * C;
        }
      }
    }
    for (i64 k = threadIdx.x; k < pieces; k += blockDim.x) {
      Pack<T, VEC> v[kGatherRows];
#pragma unroll
      for (int u = 0; u < kGatherRows; ++u) v[u] = src[u] != nullptr ? load<T, VEC>(src[u], k) : zeros<T, VEC>();
#pragma unroll
      for (int u = 0; u < kGatherRows; ++u)
        if (add_row[u] != nullptr) v[u] = add(v[u], load<T, VEC>(add_row[u], k));
#pragma unroll
      for (int u = 0; u < kGatherRows; ++u) {
        const i64 r = base + static_cast<i64>(u) * blockDim.y;
        if (r < total) store(out + r * C, k, v[u]);
      }
    }
  }
}

// Dense rows over the B*N grid from an inverse map (inv[p] = the packed row placed at p, or -1):
//   out[p] = (inv[p] in [0, total) ? src[inv[p]] : fill) + pos[p or p % N]
// fill == nullptr means zeros, pos == nullptr means no add. scatter_tokens forward uses it with
// fill = mask_token; gather_visible backward (d x) with no fill and no pos.
template <typename T, int VEC>
__device__ __forceinline__ void expand_rows(
    T* __restrict__ out, const int* __restrict__ inv, const T* __restrict__ src, const T* __restrict__ fill,
    const T* __restrict__ pos, i64 total, i64 BN, i64 N, i64 C, i64 Bp) {
  const i64 pieces = C / VEC;
  for (i64 p = first_row(); p < BN; p += row_stride()) {
    const i64 r = inv[p];
    const T* a = (r >= 0 && r < total) ? src + r * C : fill;
    const T* b = pos != nullptr ? pos + (Bp > 1 ? p : p % N) * C : nullptr;
    T* dst = out + p * C;
    for (i64 k = threadIdx.x; k < pieces; k += blockDim.x) {
      Pack<T, VEC> v = a != nullptr ? load<T, VEC>(a, k) : zeros<T, VEC>();
      if (b != nullptr) v = add(v, load<T, VEC>(b, k));
      store(dst, k, v);
    }
  }
}

// out[r] = src[index[r]] when index[r] in [0, src_rows), else zeros (scatter_tokens backward, d packed).
template <typename T, int VEC>
__device__ __forceinline__ void gather_rows(
    T* __restrict__ out, const T* __restrict__ src, const i64* __restrict__ index, i64 rows, i64 src_rows, i64 C) {
  const i64 pieces = C / VEC;
  for (i64 r = first_row(); r < rows; r += row_stride()) {
    const i64 idx = index[r];
    const T* a = (idx >= 0 && idx < src_rows) ? src + idx * C : nullptr;
    T* dst = out + r * C;
    for (i64 k = threadIdx.x; k < pieces; k += blockDim.x)
      store(dst, k, a != nullptr ? load<T, VEC>(a, k) : zeros<T, VEC>());
  }
}

// gather_visible backward, d prefix[q, j] = sum over samples b mapped to q of grad[cu[b] + j],
// for the samples long enough to hold prefix row j. q = b when prefix has batch B; with batch 1
// every sample adds into q = 0, in sample order (deterministic), accumulated in fp32.
template <typename T, int VEC>
__device__ __forceinline__ void prefix_grad(
    T* __restrict__ dprefix, const T* __restrict__ grad, const int* __restrict__ cu, i64 total, i64 B, i64 P, i64 Bq,
    i64 C) {
  typedef typename Acc<T>::type A;
  const i64 pieces = C / VEC;
  for (i64 row = first_row(); row < Bq * P; row += row_stride()) {
    const i64 q = row / P, j = row % P;
    const i64 b0 = Bq > 1 ? q : 0, b1 = Bq > 1 ? q + 1 : B;
    T* dst = dprefix + row * C;
    for (i64 k = threadIdx.x; k < pieces; k += blockDim.x) {
      A acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0;
      for (i64 b = b0; b < b1; ++b) {
        const i64 start = cu[b], end = cu[b + 1], r = start + j;
        if (start >= 0 && r < end && r < total) accumulate<T, VEC>(acc, load<T, VEC>(grad + r * C, k));
      }
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = narrow<T>(acc[e]);
      store(dst, k, o);
    }
  }
}

// out[m] = sum_b in[b, m] over a [B, M, C] tensor, fp32 accumulation in batch order (d pos for a
// position table of batch 1).
template <typename T, int VEC>
__device__ __forceinline__ void sum_batch(T* __restrict__ out, const T* __restrict__ in, i64 B, i64 M, i64 C) {
  typedef typename Acc<T>::type A;
  const i64 pieces = C / VEC;
  for (i64 m = first_row(); m < M; m += row_stride()) {
    for (i64 k = threadIdx.x; k < pieces; k += blockDim.x) {
      A acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0;
      for (i64 b = 0; b < B; ++b) accumulate<T, VEC>(acc, load<T, VEC>(in + (b * M + m) * C, k));
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = narrow<T>(acc[e]);
      store(out + m * C, k, o);
    }
  }
}

// Column sums of grad[BN, C] over the places no packed row fills (inv[p] outside [0, total)),
// one partial row per chunk of chunk_rows places: partial[chunk, c] (fp32, fp64 for fp64).
// The caller adds the partial rows (scatter_tokens backward, d mask_token). 1D blocks over the
// pieces of a row (blockIdx.x), chunks on blockIdx.y with a stride.
template <typename T, int VEC>
__device__ __forceinline__ void masked_colsum(
    typename Acc<T>::type* __restrict__ partial, const T* __restrict__ grad, const int* __restrict__ inv, i64 BN,
    i64 total, i64 C, i64 chunk_rows) {
  typedef typename Acc<T>::type A;
  const i64 pieces = C / VEC;
  const i64 k = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= pieces) return;
  const i64 chunks = (BN + chunk_rows - 1) / chunk_rows;
  for (i64 chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    const i64 p0 = chunk * chunk_rows;
    const i64 p1 = p0 + chunk_rows < BN ? p0 + chunk_rows : BN;
    A acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0;
#pragma unroll 4
    for (i64 p = p0; p < p1; ++p) {
      const i64 r = inv[p];
      if (r < 0 || r >= total) accumulate<T, VEC>(acc, load<T, VEC>(grad + p * C, k));
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) partial[chunk * C + k * VEC + e] = acc[e];
  }
}

// inv[index[r]] = r for every packed row r that is not a prefix row (P > 0: the first P rows
// of each sample) and whose index lies in [0, BN). The caller fills inv with -1 first. Indices
// must be distinct (as gather_visible produces them); for a repeated one some row wins.
__device__ __forceinline__ void build_inverse(
    int* __restrict__ inv, const i64* __restrict__ index, const int* __restrict__ cu, i64 total, i64 B, i64 BN, i64 P) {
  const i64 stride = static_cast<i64>(gridDim.x) * blockDim.x;
  for (i64 r = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; r < total; r += stride) {
    i64 b = 0, j = 0;
    if (is_prefix_row(cu, B, P, r, &b, &j)) continue;
    const i64 idx = index[r];
    if (idx >= 0 && idx < BN) inv[idx] = static_cast<int>(r);
  }
}

}  // namespace invnext_tokens

#define INVNEXT_TOKEN_KERNELS(SUFFIX, T, VEC)                                                                      \
  extern "C" __global__ void __launch_bounds__(256) invnext_gather_visible_fwd_##SUFFIX(                          \
      T* out, const T* x, const long long* index, const int* cu, const T* pos, const T* prefix, long long total,   \
      long long B, long long N, long long C, long long Bp, long long Bq, long long P) {                             \
    invnext_tokens::gather_visible_fwd<T, VEC>(out, x, index, cu, pos, prefix, total, B, N, C, Bp, Bq, P);         \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) invnext_expand_rows_##SUFFIX(                                 \
      T* out, const int* inv, const T* src, const T* fill, const T* pos, long long total, long long BN,           \
      long long N, long long C, long long Bp) {                                                                    \
    invnext_tokens::expand_rows<T, VEC>(out, inv, src, fill, pos, total, BN, N, C, Bp);                           \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) invnext_gather_rows_##SUFFIX(                                 \
      T* out, const T* src, const long long* index, long long rows, long long src_rows, long long C) {             \
    invnext_tokens::gather_rows<T, VEC>(out, src, index, rows, src_rows, C);                                       \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) invnext_prefix_grad_##SUFFIX(                                 \
      T* dprefix, const T* grad, const int* cu, long long total, long long B, long long P, long long Bq,          \
      long long C) {                                                                                               \
    invnext_tokens::prefix_grad<T, VEC>(dprefix, grad, cu, total, B, P, Bq, C);                                    \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) invnext_sum_batch_##SUFFIX(                                   \
      T* out, const T* in, long long B, long long M, long long C) {                                                \
    invnext_tokens::sum_batch<T, VEC>(out, in, B, M, C);                                                           \
  }                                                                                                                \
  extern "C" __global__ void __launch_bounds__(256) invnext_masked_colsum_##SUFFIX(                               \
      invnext_tokens::Acc<T>::type* partial, const T* grad, const int* inv, long long BN, long long total,        \
      long long C, long long chunk_rows) {                                                                         \
    invnext_tokens::masked_colsum<T, VEC>(partial, grad, inv, BN, total, C, chunk_rows);                           \
  }

// Every kernel by default (NVRTC). The nvcc build compiles one dtype per translation unit for
// a parallel build: it defines INVNEXT_SELECT_KERNELS and then the INVNEXT_KERNELS_* it wants.
#ifndef INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_F32 1
#define INVNEXT_KERNELS_F16 1
#define INVNEXT_KERNELS_BF16 1
#define INVNEXT_KERNELS_F64 1
#define INVNEXT_KERNELS_INDEX 1
#endif

#if defined(INVNEXT_KERNELS_F32)
INVNEXT_TOKEN_KERNELS(f32_v4, float, 4)
INVNEXT_TOKEN_KERNELS(f32_v1, float, 1)
#endif
#if defined(INVNEXT_KERNELS_F16)
INVNEXT_TOKEN_KERNELS(f16_v8, __half, 8)
INVNEXT_TOKEN_KERNELS(f16_v1, __half, 1)
#endif
#if defined(INVNEXT_KERNELS_BF16)
INVNEXT_TOKEN_KERNELS(bf16_v8, __nv_bfloat16, 8)
INVNEXT_TOKEN_KERNELS(bf16_v1, __nv_bfloat16, 1)
#endif
#if defined(INVNEXT_KERNELS_F64)
INVNEXT_TOKEN_KERNELS(f64_v2, double, 2)
INVNEXT_TOKEN_KERNELS(f64_v1, double, 1)
#endif
#if defined(INVNEXT_KERNELS_INDEX)
extern "C" __global__ void __launch_bounds__(256) invnext_build_inverse(
    int* inv, const long long* index, const int* cu, long long total, long long B, long long BN, long long P) {
  invnext_tokens::build_inverse(inv, index, cu, total, B, BN, P);
}
#endif
