// Host-side launch logic of the token kernels, shared by the per-dtype translation units
// (token_ops_<dtype>.cu instantiate Launch<T>) and the C API (token_ops.cu dispatches on dtype).
//
// Each launcher picks the 16-byte vector kernels when the row size in bytes and every pointer
// allow it (the scalar kernels otherwise), sizes a row-parallel grid and enqueues on the
// caller's stream. invnext/native/_cupy.py mirrors these choices for the NVRTC path: change
// both together.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "token_kernels.cuh"

namespace invnext_host {

using i64 = long long;
template <typename T> using AccT = typename invnext_tokens::Acc<T>::type;

constexpr i64 kThreads = 256;          // every block; matches __launch_bounds__(256)
constexpr i64 kMaxBlocks = 1LL << 24;  // grid-stride loops cover anything beyond
constexpr int kOk = static_cast<int>(cudaSuccess);

// The kernels of one dtype and one access width (token_kernels.cuh names them).
template <typename T> struct Kernels {
  void (*gather_visible_fwd)(T*, const T*, const i64*, const int*, const T*, const T*, i64, i64, i64, i64, i64, i64,
                             i64);
  void (*expand_rows)(T*, const int*, const T*, const T*, const T*, i64, i64, i64, i64, i64);
  void (*gather_rows)(T*, const T*, const i64*, i64, i64, i64);
  void (*prefix_grad)(T*, const T*, const int*, i64, i64, i64, i64, i64);
  void (*sum_batch)(T*, const T*, i64, i64, i64);
  void (*masked_colsum)(AccT<T>*, const T*, const int*, i64, i64, i64, i64);
  i64 vec;
};

// Defined beside the kernels of T (token_ops_<dtype>.cu): the 16-byte set or the scalar set.
template <typename T> Kernels<T> kernels(bool vector);

// The 16-byte path needs every row to start on a 16-byte boundary: the row size in bytes a
// multiple of 16 and every base pointer aligned (NULL counts as aligned).
template <typename T> inline bool vector_ok(i64 C, std::initializer_list<const void*> ptrs) {
  if ((C * static_cast<i64>(sizeof(T))) % 16 != 0) return false;
  for (const void* p : ptrs)
    if ((reinterpret_cast<std::uintptr_t>(p) & 15u) != 0) return false;
  return true;
}

// threadIdx.x over the pieces of a row (a multiple of 32, at most 256), threadIdx.y over rows,
// each thread taking rows_per_thread rows.
struct RowLaunch {
  dim3 grid, block;
};
inline RowLaunch row_launch(i64 rows, i64 pieces, i64 rows_per_thread = 1) {
  i64 bx = (pieces + 31) / 32 * 32;
  if (bx > kThreads) bx = kThreads;
  if (bx < 32) bx = 32;
  const i64 by = kThreads / bx;
  i64 blocks = (rows + by * rows_per_thread - 1) / (by * rows_per_thread);
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return {dim3(static_cast<unsigned>(blocks)), dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by))};
}

inline int last_error() { return static_cast<int>(cudaGetLastError()); }

// Fill inv[BN] with -1, then inv[index[r]] = r for the non-prefix rows (token_ops.cu).
int build_inverse(int32_t* inv, const int64_t* index, const int32_t* cu, i64 total, i64 B, i64 BN, i64 P,
                  cudaStream_t stream);

// The launchers of one dtype; arguments are checked by the C API before these run.
template <typename T> struct Launch {
  static int gather_visible_forward(void* out, const void* x, const int64_t* index, const int32_t* cu,
                                    const void* pos, const void* prefix, i64 total, i64 B, i64 N, i64 C, i64 Bp,
                                    i64 Bq, i64 P, cudaStream_t stream);
  static int gather_visible_backward(void* dx, int32_t* inv, void* dprefix, const void* grad, const int64_t* index,
                                     const int32_t* cu, i64 total, i64 B, i64 N, i64 C, i64 Bq, i64 P,
                                     cudaStream_t stream);
  static int scatter_tokens_forward(void* out, int32_t* inv, const void* packed, const int64_t* index,
                                    const void* mask_token, const void* pos, i64 total, i64 B, i64 N, i64 C, i64 Bp,
                                    cudaStream_t stream);
  static int scatter_tokens_backward(void* dpacked, void* partial, const void* grad, const int64_t* index,
                                     const int32_t* inv, i64 total, i64 B, i64 N, i64 C, i64 chunk_rows,
                                     cudaStream_t stream);
  static int sum_batch(void* out, const void* in, i64 B, i64 M, i64 C, cudaStream_t stream);
};

template <typename T>
int Launch<T>::gather_visible_forward(void* out, const void* x, const int64_t* index, const int32_t* cu,
                                      const void* pos, const void* prefix, i64 total, i64 B, i64 N, i64 C, i64 Bp,
                                      i64 Bq, i64 P, cudaStream_t stream) {
  if (total == 0 || C == 0) return kOk;
  const Kernels<T> k = kernels<T>(vector_ok<T>(C, {out, x, pos, prefix}));
  const RowLaunch l = row_launch(total, C / k.vec, invnext_tokens::kGatherRows);
  k.gather_visible_fwd<<<l.grid, l.block, 0, stream>>>(
      static_cast<T*>(out), static_cast<const T*>(x), reinterpret_cast<const i64*>(index), cu,
      static_cast<const T*>(pos), static_cast<const T*>(prefix), total, B, N, C, pos ? Bp : 1, P > 0 ? Bq : 1, P);
  return last_error();
}

template <typename T>
int Launch<T>::gather_visible_backward(void* dx, int32_t* inv, void* dprefix, const void* grad, const int64_t* index,
                                       const int32_t* cu, i64 total, i64 B, i64 N, i64 C, i64 Bq, i64 P,
                                       cudaStream_t stream) {
  const i64 BN = B * N;
  if (C == 0) return kOk;
  if (dx != nullptr) {
    // d x: one dense pass over the grid through the inverse map (zeros where no row landed).
    int err = build_inverse(inv, index, cu, total, B, BN, P, stream);
    if (err != kOk) return err;
    const Kernels<T> k = kernels<T>(vector_ok<T>(C, {dx, grad}));
    const RowLaunch l = row_launch(BN, C / k.vec);
    k.expand_rows<<<l.grid, l.block, 0, stream>>>(static_cast<T*>(dx), inv, static_cast<const T*>(grad), nullptr,
                                                  nullptr, total, BN, N, C, 1);
    err = last_error();
    if (err != kOk) return err;
  }
  if (dprefix != nullptr && P > 0) {
    const Kernels<T> k = kernels<T>(vector_ok<T>(C, {dprefix, grad}));
    const RowLaunch l = row_launch(Bq * P, C / k.vec);
    k.prefix_grad<<<l.grid, l.block, 0, stream>>>(static_cast<T*>(dprefix), static_cast<const T*>(grad), cu, total,
                                                  B, P, Bq, C);
    return last_error();
  }
  return kOk;
}

template <typename T>
int Launch<T>::scatter_tokens_forward(void* out, int32_t* inv, const void* packed, const int64_t* index,
                                      const void* mask_token, const void* pos, i64 total, i64 B, i64 N, i64 C, i64 Bp,
                                      cudaStream_t stream) {
  const i64 BN = B * N;
  // One write of every output row: the inverse map says which packed row (if any) lands there.
  int err = build_inverse(inv, index, nullptr, total, B, BN, 0, stream);
  if (err != kOk || C == 0) return err;
  const Kernels<T> k = kernels<T>(vector_ok<T>(C, {out, packed, mask_token, pos}));
  const RowLaunch l = row_launch(BN, C / k.vec);
  k.expand_rows<<<l.grid, l.block, 0, stream>>>(static_cast<T*>(out), inv, static_cast<const T*>(packed),
                                                static_cast<const T*>(mask_token), static_cast<const T*>(pos), total,
                                                BN, N, C, pos ? Bp : 1);
  return last_error();
}

template <typename T>
int Launch<T>::scatter_tokens_backward(void* dpacked, void* partial, const void* grad, const int64_t* index,
                                       const int32_t* inv, i64 total, i64 B, i64 N, i64 C, i64 chunk_rows,
                                       cudaStream_t stream) {
  const i64 BN = B * N;
  if (C == 0) return kOk;
  if (dpacked != nullptr && total > 0) {
    const Kernels<T> k = kernels<T>(vector_ok<T>(C, {dpacked, grad}));
    const RowLaunch l = row_launch(total, C / k.vec);
    k.gather_rows<<<l.grid, l.block, 0, stream>>>(static_cast<T*>(dpacked), static_cast<const T*>(grad),
                                                  reinterpret_cast<const i64*>(index), total, BN, C);
    const int err = last_error();
    if (err != kOk) return err;
  }
  if (partial != nullptr) {
    // Blocks of columns (x) times chunks of places (y); each thread sums its column over a chunk.
    const Kernels<T> k = kernels<T>(vector_ok<T>(C, {grad}));
    const i64 pieces = C / k.vec;
    i64 bx = (pieces + 31) / 32 * 32;
    if (bx > kThreads) bx = kThreads;
    const i64 chunks = (BN + chunk_rows - 1) / chunk_rows;
    const dim3 grid(static_cast<unsigned>((pieces + bx - 1) / bx),
                    static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
    k.masked_colsum<<<grid, dim3(static_cast<unsigned>(bx)), 0, stream>>>(
        static_cast<AccT<T>*>(partial), static_cast<const T*>(grad), inv, BN, total, C, chunk_rows);
    return last_error();
  }
  return kOk;
}

template <typename T> int Launch<T>::sum_batch(void* out, const void* in, i64 B, i64 M, i64 C, cudaStream_t stream) {
  if (M == 0 || C == 0) return kOk;
  const Kernels<T> k = kernels<T>(vector_ok<T>(C, {out, in}));
  const RowLaunch l = row_launch(M, C / k.vec);
  k.sum_batch<<<l.grid, l.block, 0, stream>>>(static_cast<T*>(out), static_cast<const T*>(in), B, M, C);
  return last_error();
}

}  // namespace invnext_host

// Names the kernels of one dtype for kernels<T>() (used once per token_ops_<dtype>.cu).
#define INVNEXT_KERNEL_SET(T, SUFFIX, VEC)                                                                   \
  invnext_host::Kernels<T> {                                                                                 \
    invnext_gather_visible_fwd_##SUFFIX, invnext_expand_rows_##SUFFIX, invnext_gather_rows_##SUFFIX,       \
        invnext_prefix_grad_##SUFFIX, invnext_sum_batch_##SUFFIX, invnext_masked_colsum_##SUFFIX, VEC       \
  }

#define INVNEXT_INSTANTIATE_LAUNCH(T, VEC_SUFFIX, VEC, SCALAR_SUFFIX)                                         \
  namespace invnext_host {                                                                                   \
  template <> Kernels<T> kernels<T>(bool vector) {                                                           \
    return vector ? INVNEXT_KERNEL_SET(T, VEC_SUFFIX, VEC) : INVNEXT_KERNEL_SET(T, SCALAR_SUFFIX, 1);        \
  }                                                                                                          \
  template struct Launch<T>;                                                                                 \
  }
