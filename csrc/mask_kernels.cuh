// Mask-sampling kernels of invnext: device code only, bit-exact with invnext/ops/masks.py.
//
// Like token_kernels.cuh this header is compiled by nvcc into the extension (csrc/mask_ops.cu)
// and at first use by NVRTC through CuPy (invnext/native/_cupy.py pastes philox.cuh in place
// of its #include), so it holds no host code and includes only philox.cuh and the fp16/bf16
// headers NVRTC ships. Kernels are `extern "C"`:
//
//     invnext_tube_mask_kernel, invnext_multiblock_mask_kernel, invnext_mask_cu_seqlens,
//     invnext_semantic_mask_<topk|sample>_<f32|f16|bf16|f64>
//
// Exactness: every random number is the reference's philox draw at the reference's counter.
// Multi-block boxes are drawn on the host (a few numbers per sample, ops.masks.multiblock_boxes)
// and passed in, so the device does no floating-point box arithmetic that could round
// differently from the host's, and the host knows every sample's count. A stable sort's
// "first k" is reproduced by an exact radix select on (key, index): ties go to the lower index.
//
// INVNEXT_MASK_MATH_ONLY leaves out the kernels: the CPU tests compile Philox as host code and
// compare it with the torch reference.
#pragma once

#include "philox.cuh"

namespace invnext_masks {

typedef unsigned int u32;
typedef unsigned long long u64;

// Philox streams and slots of invnext/ops/masks.py.
constexpr u64 kStreamTube = 1;
constexpr u64 kStreamMultiblock = 2;
constexpr u64 kStreamSemantic = 3;
constexpr u64 kMultiblockSlots = 8;

// A multi-block box, as multiblock_boxes draws it on the host: frames [start, start + length),
// rows [top, top + height), columns [left, left + width). int32[6] in this order.
struct Box {
  int start, length, top, height, left, width;
};

}  // namespace invnext_masks

#ifndef INVNEXT_MASK_MATH_ONLY

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace invnext_masks {

constexpr u32 kFull = 0xffffffffu;
constexpr int kThreads = 512;  // the largest block (INVNEXT_MASK_THREADS); launchers use multiples of 32

// Sum of v over the block (every thread gets it). blockDim.x is a multiple of 32.
__device__ __forceinline__ u32 block_sum(u32 v) {
  __shared__ u32 warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(kFull, v, d);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  u32 total = 0;
  for (int w = 0; w < warps; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be reused
  return total;
}

// Block-wide exact selection: of the n keys in shared memory, mark the k smallest under the
// order (key, index), i.e. the first k of a stable ascending sort. On return key[i] is 1 for
// a selected position and 0 otherwise (the keys are consumed). blockDim.x: a multiple of 32.
//
// Radix select, 8 bits per pass from the top: a pass counts the candidates (keys that agree
// with the digits fixed so far) per next digit and keeps the digit holding the rank-th
// smallest candidate. After the last pass v is the k-th smallest key; every key < v is
// selected, and of the keys equal to v the first `rank` in index order (a block-wide count of
// equal keys at lower indices; skipped when every equal key is taken).
template <typename K>
__device__ void select_smallest(K* key, int n, int k) {
  constexpr int kBits = 8 * static_cast<int>(sizeof(K));
  __shared__ u32 hist[256];
  __shared__ u32 warp_count[32];
  __shared__ u32 s_digit, s_rank, s_equal;
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  if (k <= 0 || k >= n) {  // uniform over the block
    const K all = k >= n ? K(1) : K(0);
    for (int i = tid; i < n; i += nt) key[i] = all;
    __syncthreads();
    return;
  }
  K prefix = 0, fixed = 0;
  u32 rank = static_cast<u32>(k);  // 1-based rank of the wanted key among the candidates
  u32 equal = 0;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nt) hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += nt) {
      const K x = key[i];
      if ((x & fixed) == prefix) atomicAdd(&hist[static_cast<u32>(x >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (warp == 0) {  // lane L scans digits 8L .. 8L+7
      u32 c[8], own = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[j] = hist[lane * 8 + j];
        own += c[j];
      }
      u32 incl = own;
#pragma unroll
      for (int d = 1; d < 32; d <<= 1) {
        const u32 up = __shfl_up_sync(kFull, incl, d);
        if (lane >= d) incl += up;
      }
      const u32 excl = incl - own;
      if (excl < rank && rank <= incl) {  // exactly one lane: candidates >= rank >= 1
        u32 r = rank - excl;
        int digit = -1;
        u32 count = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (digit < 0) {
            if (r <= c[j]) {
              digit = lane * 8 + j;
              count = c[j];
            } else {
              r -= c[j];
            }
          }
        }
        s_digit = static_cast<u32>(digit);
        s_rank = r;
        s_equal = count;
      }
    }
    __syncthreads();
    prefix |= static_cast<K>(s_digit) << shift;
    fixed |= static_cast<K>(255u) << shift;
    rank = s_rank;
    equal = s_equal;
  }
  const K v = prefix;
  if (equal == rank) {
    for (int i = tid; i < n; i += nt) key[i] = key[i] <= v ? K(1) : K(0);
  } else {
    // Ties at v: select the first `rank` of them in index order. Chunks of blockDim.x
    // positions; inside a chunk warp ballots count the equal keys at lower indices.
    const int warps = nt >> 5;
    u32 before_chunk = 0;
    for (int base = 0; base < n; base += nt) {  // uniform trip count: every lane ballots
      const int i = base + tid;
      const K x = i < n ? key[i] : K(0);
      const bool eq = i < n && x == v;
      const u32 ballot = __ballot_sync(kFull, eq);
      if (lane == 0) warp_count[warp] = static_cast<u32>(__popc(ballot));
      __syncthreads();
      u32 before = before_chunk + static_cast<u32>(__popc(ballot & ((1u << lane) - 1u))), chunk = 0;
      for (int w = 0; w < warps; ++w) {
        const u32 c = warp_count[w];
        if (w < warp) before += c;
        chunk += c;
      }
      if (i < n) key[i] = (x < v || (eq && before < rank)) ? K(1) : K(0);
      before_chunk += chunk;
      __syncthreads();
    }
  }
  __syncthreads();
}

// Ascending keys of a descending order: larger score -> smaller key. -0 equals +0 and every
// NaN is one (positive) NaN, ranked above +inf, as torch's sort ranks them.
__device__ __forceinline__ u32 descending_key(float x) {
  u32 b = x == 0.0f ? 0u : __float_as_uint(x);
  if (x != x) b = 0x7fc00000u;
  const u32 ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return ~ordered;
}
__device__ __forceinline__ u64 descending_key(double x) {
  u64 b = x == 0.0 ? 0ull : static_cast<u64>(__double_as_longlong(x));
  if (x != x) b = 0x7ff8000000000000ull;
  const u64 ordered = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return ~ordered;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
template <typename In> __device__ __forceinline__ double to_double(In v) { return static_cast<double>(to_float(v)); }

// Sort keys of semantic_mask_reference: topk ranks attn in its own dtype (every dtype but
// fp64 widens exactly to fp32), sample ranks log(attn) + Gumbel noise in fp64.
template <typename K, typename In, bool kSample> struct SemanticKey;
template <typename In> struct SemanticKey<u32, In, false> {
  static __device__ __forceinline__ u32 of(In a, u64, u64) { return descending_key(to_float(a)); }
};
template <> struct SemanticKey<u64, double, false> {
  static __device__ __forceinline__ u64 of(double a, u64, u64) { return descending_key(a); }
};
template <typename In> struct SemanticKey<u64, In, true> {
  // score = log(attn) - log(-log(u + 2^-25)), u = philox_uniform(seed, STREAM_SEMANTIC, counter)
  static __device__ __forceinline__ u64 of(In a, u64 seed, u64 counter) {
    const double v = static_cast<double>(invnext_philox::uniform(seed, kStreamSemantic, counter)) + 0x1p-25;
    return descending_key(::log(to_double(a)) - ::log(-::log(v)));
  }
};

// One block per frame row (b, t): hidden = not among the `keep` largest scores.
template <typename K, typename In, bool kSample>
__device__ __forceinline__ void semantic_row(unsigned char* __restrict__ hidden, const In* __restrict__ attn, int S,
                                             int keep, u64 seed) {
  extern __shared__ __align__(16) unsigned char smem[];
  K* key = reinterpret_cast<K*>(smem);
  const long long row = blockIdx.x;
  const In* a = attn + row * S;
  for (int s = threadIdx.x; s < S; s += blockDim.x)
    key[s] = SemanticKey<K, In, kSample>::of(a[s], seed, static_cast<u64>(row * S + s));
  __syncthreads();
  select_smallest<K>(key, S, keep);
  unsigned char* out = hidden + row * S;
  for (int s = threadIdx.x; s < S; s += blockDim.x) out[s] = key[s] == K(0);
}

}  // namespace invnext_masks

// tube_mask: one block per sample; hidden = the k smallest philox_bits(seed, 1, b*S + p)
// of the frame (ties to the lower p), repeated through the T frames.
extern "C" __global__ void __launch_bounds__(invnext_masks::kThreads)
    invnext_tube_mask_kernel(unsigned char* hidden, long long T, int S, int k, unsigned long long seed) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned int* key = reinterpret_cast<unsigned int*>(smem);
  const long long b = blockIdx.x;
  for (int p = threadIdx.x; p < S; p += blockDim.x)
    key[p] = invnext_philox::bits(seed, invnext_masks::kStreamTube, static_cast<unsigned long long>(b * S + p));
  __syncthreads();
  invnext_masks::select_smallest<unsigned int>(key, S, k);
  unsigned char* out = hidden + b * T * S;
  for (long long t = 0; t < T; ++t)
    for (int p = threadIdx.x; p < S; p += blockDim.x) out[t * S + p] = key[p] != 0u;
}

// multiblock_mask: one block per sample. boxes: int32[B, J, 6] (Box), drawn by the host. The
// block stages its sample's boxes in shared memory, then every token tests them. visible (NULL
// to skip): int32[B], the sample's visible count (the mask sampler's contribution to cu_seqlens).
extern "C" __global__ void __launch_bounds__(invnext_masks::kThreads) invnext_multiblock_mask_kernel(
    unsigned char* hidden, int* visible, const int* __restrict__ boxes_in, int T, int H, int W, int J) {
  extern __shared__ __align__(16) unsigned char smem[];
  invnext_masks::Box* boxes = reinterpret_cast<invnext_masks::Box*>(smem);
  const long long b = blockIdx.x;
  const int* mine = boxes_in + b * J * 6;
  for (int j = threadIdx.x; j < J; j += blockDim.x) {
    const int* q = mine + j * 6;
    boxes[j] = invnext_masks::Box{q[0], q[1], q[2], q[3], q[4], q[5]};
  }
  __syncthreads();
  const unsigned S = static_cast<unsigned>(H) * W, N = S * T;
  unsigned char* out = hidden + b * N;
  unsigned shown = 0;
  for (unsigned n = threadIdx.x; n < N; n += blockDim.x) {
    const int t = static_cast<int>(n / S), r = static_cast<int>(n % S), y = r / W, x = r % W;
    bool hid = false;
    for (int j = 0; j < J && !hid; ++j) {
      const invnext_masks::Box q = boxes[j];
      hid = t >= q.start && t < q.start + q.length && y >= q.top && y < q.top + q.height && x >= q.left &&
            x < q.left + q.width;
    }
    out[n] = hid;
    shown += hid ? 0u : 1u;
  }
  if (visible != nullptr) {  // uniform over the block
    const unsigned total = invnext_masks::block_sum(shown);
    if (threadIdx.x == 0) visible[b] = static_cast<int>(total);
  }
}

// cu_seqlens[0] = 0, cu_seqlens[b+1] = sum over b' <= b of (P + visible_b'), where visible_b =
// `fixed` for every sample (fixed >= 0: tube and semantic masks) or cu_seqlens[b+1] as the mask
// kernel left it (fixed < 0). One warp, 32 samples per step.
extern "C" __global__ void __launch_bounds__(32) invnext_mask_cu_seqlens(int* cu, long long B, long long fixed,
                                                                         long long P) {
  const int lane = threadIdx.x;
  if (lane == 0) cu[0] = 0;
  int carry = 0;
  for (long long base = 0; base < B; base += 32) {
    const long long b = base + lane;
    int v = 0;
    if (b < B) v = static_cast<int>(P + (fixed >= 0 ? fixed : cu[b + 1]));
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, v, d);
      if (lane >= d) v += up;
    }
    if (b < B) cu[b + 1] = carry + v;
    carry += __shfl_sync(0xffffffffu, v, 31);
  }
}

#define INVNEXT_SEMANTIC_KERNEL(MODE, SAMPLE, SUFFIX, IN, KEY)                                      \
  extern "C" __global__ void __launch_bounds__(invnext_masks::kThreads)                             \
      invnext_semantic_mask_##MODE##_##SUFFIX(unsigned char* hidden, const IN* attn, int S, int keep, \
                                              unsigned long long seed) {                            \
    invnext_masks::semantic_row<KEY, IN, SAMPLE>(hidden, attn, S, keep, seed);                      \
  }

INVNEXT_SEMANTIC_KERNEL(topk, false, f32, float, unsigned int)
INVNEXT_SEMANTIC_KERNEL(topk, false, f16, __half, unsigned int)
INVNEXT_SEMANTIC_KERNEL(topk, false, bf16, __nv_bfloat16, unsigned int)
INVNEXT_SEMANTIC_KERNEL(topk, false, f64, double, unsigned long long)
INVNEXT_SEMANTIC_KERNEL(sample, true, f32, float, unsigned long long)
INVNEXT_SEMANTIC_KERNEL(sample, true, f16, __half, unsigned long long)
INVNEXT_SEMANTIC_KERNEL(sample, true, bf16, __nv_bfloat16, unsigned long long)
INVNEXT_SEMANTIC_KERNEL(sample, true, f64, double, unsigned long long)

#endif  // INVNEXT_MASK_MATH_ONLY
