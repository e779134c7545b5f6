/* The C API of invnext's CUDA token kernels and mask samplers.
 *
 * Plain C, no CUDA or torch headers: callers pass device pointers, sizes, a dtype code and a
 * CUDA stream as integers, so one binary serves every torch version (the Python layer takes
 * the pointers from torch tensors). Every launcher enqueues work on `stream` and returns at
 * once with a cudaError_t value: 0 on success, cudaErrorInvalidValue (1) for bad arguments;
 * invnext_error_string() gives its text. No launcher synchronises with the host.
 *
 * Layout: row-major, contiguous. `total` packed rows, B samples of N places, C channels;
 * index is int64, cu_seqlens int32[B+1], the inverse map int32[B*N]. Batch sizes Bp (pos) and
 * Bq (prefix) are 1 or B; P = prefix rows per sample (0 = no prefix).
 */
#ifndef INVNEXT_NATIVE_H_
#define INVNEXT_NATIVE_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INVNEXT_NATIVE_ABI 1

enum invnext_dtype { INVNEXT_F32 = 0, INVNEXT_F16 = 1, INVNEXT_BF16 = 2, INVNEXT_F64 = 3 };

/* out[total, C] = prefix row or x[index[r]] + pos (docs/ops_contract.md, gather_visible).
 * pos and prefix may be NULL (then Bp / P are ignored / must be 0). */
int invnext_gather_visible_forward(void* out, const void* x, const int64_t* index, const int32_t* cu_seqlens,
                                   const void* pos, const void* prefix, int64_t total, int64_t B, int64_t N,
                                   int64_t C, int64_t Bp, int64_t Bq, int64_t P, int dtype, uintptr_t stream);

/* Backward of gather_visible for x and prefix. dx[B*N, C]: grad rows at their index, zeros
 * elsewhere (built through the inverse map `inv`, a B*N int32 workspace this call fills).
 * dprefix[Bq, P, C] (NULL to skip): the prefix rows' grads, summed over samples when Bq = 1.
 * d pos is dx itself (Bp = B) or invnext_sum_batch(dx) (Bp = 1). */
int invnext_gather_visible_backward(void* dx, int32_t* inv, void* dprefix, const void* grad, const int64_t* index,
                                    const int32_t* cu_seqlens, int64_t total, int64_t B, int64_t N, int64_t C,
                                    int64_t Bq, int64_t P, int dtype, uintptr_t stream);

/* out[B, N, C] = mask_token + pos everywhere, packed[r] + pos at index[r] (index -1 or out of
 * range: row ignored). Fills inv[B*N] (int32, the packed row at each place or -1); keep it for
 * the backward. pos may be NULL. */
int invnext_scatter_tokens_forward(void* out, int32_t* inv, const void* packed, const int64_t* index,
                                   const void* mask_token, const void* pos, int64_t total, int64_t B, int64_t N,
                                   int64_t C, int64_t Bp, int dtype, uintptr_t stream);

/* Backward of scatter_tokens. dpacked[total, C] (NULL to skip) = grad[index[r]] (zeros for
 * ignored rows). partial (NULL to skip): float32 (float64 for F64) [ceil(B*N / chunk_rows), C],
 * per-chunk sums of grad over the places no row fills; their sum over chunks is d mask_token.
 * d pos is grad itself (Bp = B) or invnext_sum_batch(grad) (Bp = 1). */
int invnext_scatter_tokens_backward(void* dpacked, void* partial, const void* grad, const int64_t* index,
                                    const int32_t* inv, int64_t total, int64_t B, int64_t N, int64_t C,
                                    int64_t chunk_rows, int dtype, uintptr_t stream);

/* out[M, C] = sum over b of in[b, M, C], accumulated in fp32 (fp64 for F64) in batch order. */
int invnext_sum_batch(void* out, const void* in, int64_t B, int64_t M, int64_t C, int dtype, uintptr_t stream);

/* ---- Mask samplers (invnext/ops/masks.py, bit for bit for one seed) ----
 * hidden: uint8 (torch.bool) [B, N], N = T*H*W (semantic: T*S), 1 = hidden. cu_seqlens (NULL to
 * skip): int32[B+1] of the packed visible tokens with P prefix rows per sample, written on the
 * device by the sampler (no host read): the input gather_visible and varlen attention need.
 * Sizes: one sample's N + P and, with cu_seqlens, B*(N + P) fit int32. */

#define INVNEXT_MASK_THREADS 512       /* threads per block of the mask kernels */
#define INVNEXT_MASK_KEY_BYTES 45056   /* shared-memory sort keys per frame: S*4 (tube, topk < fp64) or S*8 */
#define INVNEXT_MASK_MAX_BLOCKS 1024   /* num_blocks limit of multiblock_mask */

enum invnext_mask_mode { INVNEXT_MASK_TOPK = 0, INVNEXT_MASK_SAMPLE = 1 };

/* tube_mask: per sample the num_hidden (0..H*W) frame positions with the smallest
 * philox_bits(seed, 1, b*H*W + p), ties to the lower p, hidden in every frame. Requires
 * H*W*4 <= INVNEXT_MASK_KEY_BYTES. */
int invnext_tube_mask(uint8_t* hidden, int32_t* cu_seqlens, int64_t B, int64_t T, int64_t H, int64_t W,
                      int64_t num_hidden, uint64_t seed, int64_t P, uintptr_t stream);

/* multiblock_mask: per sample the union of num_blocks (1..INVNEXT_MASK_MAX_BLOCKS) boxes.
 * boxes: int32[B, num_blocks, 6] on the device, (start, length, top, height, left, width) as
 * multiblock_boxes draws them on the host, each inside the (T, H, W) grid (not checked). */
int invnext_multiblock_mask(uint8_t* hidden, int32_t* cu_seqlens, const int32_t* boxes, int64_t B, int64_t T,
                            int64_t H, int64_t W, int64_t num_blocks, int64_t P, uintptr_t stream);

/* semantic_mask: attn [B, T, S] of `dtype`, contiguous; per frame the keep (1..S) largest
 * scores stay visible, ties to the lower index. mode INVNEXT_MASK_TOPK ranks attn (seed unused),
 * INVNEXT_MASK_SAMPLE ranks log(attn) + Gumbel noise in fp64. Requires S*4 (topk of a 16/32-bit
 * dtype) or S*8 (fp64, sample) <= INVNEXT_MASK_KEY_BYTES. */
int invnext_semantic_mask(uint8_t* hidden, int32_t* cu_seqlens, const void* attn, int64_t B, int64_t T, int64_t S,
                          int64_t keep, int mode, int dtype, uint64_t seed, int64_t P, uintptr_t stream);

/* cudaGetErrorString of a code returned above. */
const char* invnext_error_string(int code);

/* The CUDA runtime version this library was built with, the driver's version, and the number
 * of visible devices (0 with the error code when the driver cannot be reached). */
int invnext_runtime_info(int* runtime_version, int* driver_version, int* device_count);

int invnext_abi_version(void);

#ifdef __cplusplus
}
#endif

#endif /* INVNEXT_NATIVE_H_ */
