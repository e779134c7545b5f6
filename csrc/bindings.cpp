// invnext.native._C: the C API of invnext_native.h for Python, with pointers and streams as
// plain ints (torch's Tensor.data_ptr() and Stream.cuda_stream). pybind11 only, no torch, so
// the module does not depend on the torch version it is used with.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "invnext_native.h"

namespace py = pybind11;

namespace {

template <typename T> T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "invnext's CUDA token kernels and mask samplers (C API bindings; pointers and streams are ints, results are "
      "cudaError_t codes)";
  m.attr("ABI") = INVNEXT_NATIVE_ABI;
  m.attr("F32") = static_cast<int>(INVNEXT_F32);
  m.attr("F16") = static_cast<int>(INVNEXT_F16);
  m.attr("BF16") = static_cast<int>(INVNEXT_BF16);
  m.attr("F64") = static_cast<int>(INVNEXT_F64);
  auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "gather_visible_forward",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t index, std::uintptr_t cu_seqlens, std::uintptr_t pos,
         std::uintptr_t prefix, int64_t total, int64_t B, int64_t N, int64_t C, int64_t Bp, int64_t Bq, int64_t P,
         int dtype, std::uintptr_t stream) {
        return invnext_gather_visible_forward(ptr<void>(out), ptr<const void>(x), ptr<const int64_t>(index),
                                              ptr<const int32_t>(cu_seqlens), ptr<const void>(pos),
                                              ptr<const void>(prefix), total, B, N, C, Bp, Bq, P, dtype, stream);
      },
      py::arg("out"), py::arg("x"), py::arg("index"), py::arg("cu_seqlens"), py::arg("pos"), py::arg("prefix"),
      py::arg("total"), py::arg("B"), py::arg("N"), py::arg("C"), py::arg("Bp"), py::arg("Bq"), py::arg("P"),
      py::arg("dtype"), py::arg("stream"), nogil);

  m.def(
      "gather_visible_backward",
      [](std::uintptr_t dx, std::uintptr_t inv, std::uintptr_t dprefix, std::uintptr_t grad, std::uintptr_t index,
         std::uintptr_t cu_seqlens, int64_t total, int64_t B, int64_t N, int64_t C, int64_t Bq, int64_t P, int dtype,
         std::uintptr_t stream) {
        return invnext_gather_visible_backward(ptr<void>(dx), ptr<int32_t>(inv), ptr<void>(dprefix),
                                               ptr<const void>(grad), ptr<const int64_t>(index),
                                               ptr<const int32_t>(cu_seqlens), total, B, N, C, Bq, P, dtype, stream);
      },
      py::arg("dx"), py::arg("inv"), py::arg("dprefix"), py::arg("grad"), py::arg("index"), py::arg("cu_seqlens"),
      py::arg("total"), py::arg("B"), py::arg("N"), py::arg("C"), py::arg("Bq"), py::arg("P"), py::arg("dtype"),
      py::arg("stream"), nogil);

  m.def(
      "scatter_tokens_forward",
      [](std::uintptr_t out, std::uintptr_t inv, std::uintptr_t packed, std::uintptr_t index, std::uintptr_t mask_token,
         std::uintptr_t pos, int64_t total, int64_t B, int64_t N, int64_t C, int64_t Bp, int dtype,
         std::uintptr_t stream) {
        return invnext_scatter_tokens_forward(ptr<void>(out), ptr<int32_t>(inv), ptr<const void>(packed),
                                              ptr<const int64_t>(index), ptr<const void>(mask_token),
                                              ptr<const void>(pos), total, B, N, C, Bp, dtype, stream);
      },
      py::arg("out"), py::arg("inv"), py::arg("packed"), py::arg("index"), py::arg("mask_token"), py::arg("pos"),
      py::arg("total"), py::arg("B"), py::arg("N"), py::arg("C"), py::arg("Bp"), py::arg("dtype"), py::arg("stream"),
      nogil);

  m.def(
      "scatter_tokens_backward",
      [](std::uintptr_t dpacked, std::uintptr_t partial, std::uintptr_t grad, std::uintptr_t index, std::uintptr_t inv,
         int64_t total, int64_t B, int64_t N, int64_t C, int64_t chunk_rows, int dtype, std::uintptr_t stream) {
        return invnext_scatter_tokens_backward(ptr<void>(dpacked), ptr<void>(partial), ptr<const void>(grad),
                                               ptr<const int64_t>(index), ptr<const int32_t>(inv), total, B, N, C,
                                               chunk_rows, dtype, stream);
      },
      py::arg("dpacked"), py::arg("partial"), py::arg("grad"), py::arg("index"), py::arg("inv"), py::arg("total"),
      py::arg("B"), py::arg("N"), py::arg("C"), py::arg("chunk_rows"), py::arg("dtype"), py::arg("stream"), nogil);

  m.def(
      "sum_batch",
      [](std::uintptr_t out, std::uintptr_t in, int64_t B, int64_t M, int64_t C, int dtype, std::uintptr_t stream) {
        return invnext_sum_batch(ptr<void>(out), ptr<const void>(in), B, M, C, dtype, stream);
      },
      py::arg("out"), py::arg("inp"), py::arg("B"), py::arg("M"), py::arg("C"), py::arg("dtype"), py::arg("stream"),
      nogil);

  m.attr("MASK_THREADS") = INVNEXT_MASK_THREADS;
  m.attr("MASK_KEY_BYTES") = INVNEXT_MASK_KEY_BYTES;
  m.attr("MASK_MAX_BLOCKS") = INVNEXT_MASK_MAX_BLOCKS;

  m.def(
      "tube_mask",
      [](std::uintptr_t hidden, std::uintptr_t cu_seqlens, int64_t B, int64_t T, int64_t H, int64_t W,
         int64_t num_hidden, uint64_t seed, int64_t P, std::uintptr_t stream) {
        return invnext_tube_mask(ptr<uint8_t>(hidden), ptr<int32_t>(cu_seqlens), B, T, H, W, num_hidden, seed, P,
                                 stream);
      },
      py::arg("hidden"), py::arg("cu_seqlens"), py::arg("B"), py::arg("T"), py::arg("H"), py::arg("W"),
      py::arg("num_hidden"), py::arg("seed"), py::arg("P"), py::arg("stream"), nogil);

  m.def(
      "multiblock_mask",
      [](std::uintptr_t hidden, std::uintptr_t cu_seqlens, std::uintptr_t boxes, int64_t B, int64_t T, int64_t H,
         int64_t W, int64_t num_blocks, int64_t P, std::uintptr_t stream) {
        return invnext_multiblock_mask(ptr<uint8_t>(hidden), ptr<int32_t>(cu_seqlens), ptr<const int32_t>(boxes), B,
                                       T, H, W, num_blocks, P, stream);
      },
      py::arg("hidden"), py::arg("cu_seqlens"), py::arg("boxes"), py::arg("B"), py::arg("T"), py::arg("H"),
      py::arg("W"), py::arg("num_blocks"), py::arg("P"), py::arg("stream"), nogil);

  m.def(
      "semantic_mask",
      [](std::uintptr_t hidden, std::uintptr_t cu_seqlens, std::uintptr_t attn, int64_t B, int64_t T, int64_t S,
         int64_t keep, int mode, int dtype, uint64_t seed, int64_t P, std::uintptr_t stream) {
        return invnext_semantic_mask(ptr<uint8_t>(hidden), ptr<int32_t>(cu_seqlens), ptr<const void>(attn), B, T, S,
                                     keep, mode, dtype, seed, P, stream);
      },
      py::arg("hidden"), py::arg("cu_seqlens"), py::arg("attn"), py::arg("B"), py::arg("T"), py::arg("S"),
      py::arg("keep"), py::arg("mode"), py::arg("dtype"), py::arg("seed"), py::arg("P"), py::arg("stream"), nogil);

  m.def("error_string", [](int code) { return std::string(invnext_error_string(code)); }, py::arg("code"));

  m.def("runtime_info", []() {
    int runtime = 0, driver = 0, devices = 0;
    const int err = invnext_runtime_info(&runtime, &driver, &devices);
    return std::make_tuple(err, runtime, driver, devices);
  }, "(error code, CUDA runtime version built with, driver version, visible device count)");

  m.def("abi_version", &invnext_abi_version);
}
