// The mask samplers of the C API (invnext_native.h): argument checks, launch shapes, and the
// cu_seqlens pass. The kernels live in mask_kernels.cuh; invnext/native/_cupy.py mirrors the
// launch choices made here for the NVRTC path: change both together.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "invnext_native.h"
#include "mask_kernels.cuh"

static_assert(invnext_masks::kThreads == INVNEXT_MASK_THREADS, "mask_kernels.cuh and invnext_native.h disagree");

namespace {

using i64 = long long;

constexpr i64 kMaxInt32 = 2147483647;
constexpr int kOk = static_cast<int>(cudaSuccess);
constexpr int kBadArg = static_cast<int>(cudaErrorInvalidValue);

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
int last_error() { return static_cast<int>(cudaGetLastError()); }

// Threads of a block that owns `n` positions: a multiple of 32 (the kernels ballot by warp).
unsigned block_threads(i64 n) {
  i64 t = (n + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > INVNEXT_MASK_THREADS) t = INVNEXT_MASK_THREADS;
  return static_cast<unsigned>(t);
}

// B samples of T*H*W tokens: every size positive, one sample's tokens (and, with cu_seqlens,
// the whole packed batch including P prefix rows per sample) countable in int32.
bool grid_ok(i64 B, i64 T, i64 H, i64 W, const int32_t* cu_seqlens, i64 P) {
  if (B < 1 || T < 1 || H < 1 || W < 1 || P < 0 || B > kMaxInt32) return false;
  if (H > kMaxInt32 / W || T > kMaxInt32 / (H * W)) return false;
  const i64 N = T * H * W;
  return cu_seqlens == nullptr || N + P <= kMaxInt32 / B;
}

int fill_cu_seqlens(int32_t* cu, i64 B, i64 fixed, i64 P, cudaStream_t stream) {
  if (cu == nullptr) return kOk;
  invnext_mask_cu_seqlens<<<1, 32, 0, stream>>>(cu, B, fixed, P);
  return last_error();
}

}  // namespace

extern "C" {

int invnext_tube_mask(uint8_t* hidden, int32_t* cu_seqlens, int64_t B, int64_t T, int64_t H, int64_t W,
                      int64_t num_hidden, uint64_t seed, int64_t P, uintptr_t stream) {
  if (hidden == nullptr || !grid_ok(B, T, H, W, cu_seqlens, P)) return kBadArg;
  const i64 S = H * W;
  if (S > INVNEXT_MASK_KEY_BYTES / 4 || num_hidden < 0 || num_hidden > S) return kBadArg;
  cudaStream_t s = as_stream(stream);
  invnext_tube_mask_kernel<<<static_cast<unsigned>(B), block_threads(S), static_cast<size_t>(S) * 4, s>>>(
      hidden, T, static_cast<int>(S), static_cast<int>(num_hidden), seed);
  const int err = last_error();
  if (err != kOk) return err;
  return fill_cu_seqlens(cu_seqlens, B, T * (S - num_hidden), P, s);
}

int invnext_multiblock_mask(uint8_t* hidden, int32_t* cu_seqlens, const int32_t* boxes, int64_t B, int64_t T,
                            int64_t H, int64_t W, int64_t num_blocks, int64_t P, uintptr_t stream) {
  if (hidden == nullptr || boxes == nullptr || !grid_ok(B, T, H, W, cu_seqlens, P) || num_blocks < 1 ||
      num_blocks > INVNEXT_MASK_MAX_BLOCKS)
    return kBadArg;
  const i64 N = T * H * W;
  cudaStream_t s = as_stream(stream);
  const size_t smem = static_cast<size_t>(num_blocks) * sizeof(invnext_masks::Box);
  invnext_multiblock_mask_kernel<<<static_cast<unsigned>(B), block_threads(N), smem, s>>>(
      hidden, cu_seqlens == nullptr ? nullptr : cu_seqlens + 1, boxes, static_cast<int>(T), static_cast<int>(H),
      static_cast<int>(W), static_cast<int>(num_blocks));
  const int err = last_error();
  if (err != kOk) return err;
  return fill_cu_seqlens(cu_seqlens, B, -1, P, s);
}

int invnext_semantic_mask(uint8_t* hidden, int32_t* cu_seqlens, const void* attn, int64_t B, int64_t T, int64_t S,
                          int64_t keep, int mode, int dtype, uint64_t seed, int64_t P, uintptr_t stream) {
  if (hidden == nullptr || attn == nullptr || !grid_ok(B, T, 1, S, cu_seqlens, P) || B > kMaxInt32 / T) return kBadArg;
  if (keep < 1 || keep > S || (mode != INVNEXT_MASK_TOPK && mode != INVNEXT_MASK_SAMPLE)) return kBadArg;
  const bool wide = mode == INVNEXT_MASK_SAMPLE || dtype == INVNEXT_F64;  // 64-bit sort keys
  if (S > INVNEXT_MASK_KEY_BYTES / (wide ? 8 : 4)) return kBadArg;
  cudaStream_t s = as_stream(stream);
  const dim3 grid(static_cast<unsigned>(B * T)), block(block_threads(S));
  const size_t smem = static_cast<size_t>(S) * (wide ? 8 : 4);
  unsigned char* out = hidden;
  const int n = static_cast<int>(S), k = static_cast<int>(keep);
  const bool sample = mode == INVNEXT_MASK_SAMPLE;
  switch (dtype) {
    case INVNEXT_F32: {
      const float* a = static_cast<const float*>(attn);
      if (sample) invnext_semantic_mask_sample_f32<<<grid, block, smem, s>>>(out, a, n, k, seed);
      else invnext_semantic_mask_topk_f32<<<grid, block, smem, s>>>(out, a, n, k, seed);
      break;
    }
    case INVNEXT_F16: {
      const __half* a = static_cast<const __half*>(attn);
      if (sample) invnext_semantic_mask_sample_f16<<<grid, block, smem, s>>>(out, a, n, k, seed);
      else invnext_semantic_mask_topk_f16<<<grid, block, smem, s>>>(out, a, n, k, seed);
      break;
    }
    case INVNEXT_BF16: {
      const __nv_bfloat16* a = static_cast<const __nv_bfloat16*>(attn);
      if (sample) invnext_semantic_mask_sample_bf16<<<grid, block, smem, s>>>(out, a, n, k, seed);
      else invnext_semantic_mask_topk_bf16<<<grid, block, smem, s>>>(out, a, n, k, seed);
      break;
    }
    case INVNEXT_F64: {
      const double* a = static_cast<const double*>(attn);
      if (sample) invnext_semantic_mask_sample_f64<<<grid, block, smem, s>>>(out, a, n, k, seed);
      else invnext_semantic_mask_topk_f64<<<grid, block, smem, s>>>(out, a, n, k, seed);
      break;
    }
    default:
      return kBadArg;
  }
  const int err = last_error();
  if (err != kOk) return err;
  return fill_cu_seqlens(cu_seqlens, B, T * keep, P, s);
}

}  // extern "C"
