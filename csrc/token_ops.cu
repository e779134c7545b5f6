// The C API of invnext_native.h: argument checks and the dtype switch. The kernels and their
// launchers live in token_ops_<dtype>.cu (token_launch.cuh); this unit adds the index kernel
// that builds the inverse map.
#define INVNEXT_SELECT_KERNELS
#define INVNEXT_KERNELS_INDEX

#include "invnext_native.h"
#include "token_launch.cuh"

namespace invnext_host {

extern template struct Launch<float>;
extern template struct Launch<__half>;
extern template struct Launch<__nv_bfloat16>;
extern template struct Launch<double>;

int build_inverse(int32_t* inv, const int64_t* index, const int32_t* cu, i64 total, i64 B, i64 BN, i64 P,
                  cudaStream_t stream) {
  const cudaError_t err = cudaMemsetAsync(inv, 0xFF, static_cast<size_t>(BN) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (total == 0) return kOk;
  i64 blocks = (total + kThreads - 1) / kThreads;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  invnext_build_inverse<<<static_cast<unsigned>(blocks), static_cast<unsigned>(kThreads), 0, stream>>>(
      inv, reinterpret_cast<const i64*>(index), cu, total, B, BN, P);
  return last_error();
}

}  // namespace invnext_host

namespace {

using invnext_host::Launch;
using i64 = long long;

constexpr i64 kMaxInt32 = 2147483647;
constexpr int kBadArg = static_cast<int>(cudaErrorInvalidValue);

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// B samples of N places with every place and packed row representable in the int32 inverse map.
bool sizes_ok(i64 total, i64 B, i64 N, i64 C) {
  return total >= 0 && B >= 1 && N >= 1 && C >= 0 && total <= kMaxInt32 && B <= kMaxInt32 && N <= kMaxInt32 / B;
}
// Optional tables (pos, prefix) have batch 1 or B.
bool batch_ok(i64 batch, i64 B) { return batch == 1 || batch == B; }

}  // namespace

#define INVNEXT_DISPATCH(dtype, FN, ...)                              \
  switch (dtype) {                                                    \
    case INVNEXT_F32: return Launch<float>::FN(__VA_ARGS__);          \
    case INVNEXT_F16: return Launch<__half>::FN(__VA_ARGS__);         \
    case INVNEXT_BF16: return Launch<__nv_bfloat16>::FN(__VA_ARGS__); \
    case INVNEXT_F64: return Launch<double>::FN(__VA_ARGS__);         \
    default: return kBadArg;                                          \
  }

extern "C" {

int invnext_gather_visible_forward(void* out, const void* x, const int64_t* index, const int32_t* cu_seqlens,
                                   const void* pos, const void* prefix, int64_t total, int64_t B, int64_t N,
                                   int64_t C, int64_t Bp, int64_t Bq, int64_t P, int dtype, uintptr_t stream) {
  if (!sizes_ok(total, B, N, C) || P < 0 || (P > 0 && (prefix == nullptr || !batch_ok(Bq, B))) ||
      (pos != nullptr && !batch_ok(Bp, B)) ||
      (total > 0 && C > 0 && (out == nullptr || x == nullptr || index == nullptr || cu_seqlens == nullptr)))
    return kBadArg;
  INVNEXT_DISPATCH(dtype, gather_visible_forward, out, x, index, cu_seqlens, pos, prefix, total, B, N, C, Bp, Bq, P,
                   as_stream(stream))
}

int invnext_gather_visible_backward(void* dx, int32_t* inv, void* dprefix, const void* grad, const int64_t* index,
                                    const int32_t* cu_seqlens, int64_t total, int64_t B, int64_t N, int64_t C,
                                    int64_t Bq, int64_t P, int dtype, uintptr_t stream) {
  if (!sizes_ok(total, B, N, C) || P < 0 || (dprefix != nullptr && P > 0 && !batch_ok(Bq, B)) ||
      (dx != nullptr && inv == nullptr) ||
      (total > 0 && C > 0 && (grad == nullptr || index == nullptr || cu_seqlens == nullptr)))
    return kBadArg;
  INVNEXT_DISPATCH(dtype, gather_visible_backward, dx, inv, dprefix, grad, index, cu_seqlens, total, B, N, C, Bq, P,
                   as_stream(stream))
}

int invnext_scatter_tokens_forward(void* out, int32_t* inv, const void* packed, const int64_t* index,
                                   const void* mask_token, const void* pos, int64_t total, int64_t B, int64_t N,
                                   int64_t C, int64_t Bp, int dtype, uintptr_t stream) {
  if (!sizes_ok(total, B, N, C) || inv == nullptr || (pos != nullptr && !batch_ok(Bp, B)) ||
      (C > 0 && (out == nullptr || mask_token == nullptr)) || (total > 0 && (index == nullptr || packed == nullptr)))
    return kBadArg;
  INVNEXT_DISPATCH(dtype, scatter_tokens_forward, out, inv, packed, index, mask_token, pos, total, B, N, C, Bp,
                   as_stream(stream))
}

int invnext_scatter_tokens_backward(void* dpacked, void* partial, const void* grad, const int64_t* index,
                                    const int32_t* inv, int64_t total, int64_t B, int64_t N, int64_t C,
                                    int64_t chunk_rows, int dtype, uintptr_t stream) {
  if (!sizes_ok(total, B, N, C) || (C > 0 && grad == nullptr) ||
      (dpacked != nullptr && total > 0 && index == nullptr) ||
      (partial != nullptr && (inv == nullptr || chunk_rows < 1)))
    return kBadArg;
  INVNEXT_DISPATCH(dtype, scatter_tokens_backward, dpacked, partial, grad, index, inv, total, B, N, C, chunk_rows,
                   as_stream(stream))
}

int invnext_sum_batch(void* out, const void* in, int64_t B, int64_t M, int64_t C, int dtype, uintptr_t stream) {
  if (B < 1 || M < 0 || C < 0 || (M > 0 && C > 0 && (out == nullptr || in == nullptr))) return kBadArg;
  INVNEXT_DISPATCH(dtype, sum_batch, out, in, B, M, C, as_stream(stream))
}

const char* invnext_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int invnext_runtime_info(int* runtime_version, int* driver_version, int* device_count) {
  *runtime_version = 0;
  *driver_version = 0;
  *device_count = 0;
  cudaError_t err = cudaRuntimeGetVersion(runtime_version);
  if (err == cudaSuccess) err = cudaDriverGetVersion(driver_version);
  if (err == cudaSuccess) err = cudaGetDeviceCount(device_count);
  if (err != cudaSuccess) cudaGetLastError();  // clear the non-sticky error for later calls
  return static_cast<int>(err);
}

int invnext_abi_version(void) { return INVNEXT_NATIVE_ABI; }

}  // extern "C"
