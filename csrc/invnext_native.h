/* The C API of invnext's CUDA token kernels.
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
