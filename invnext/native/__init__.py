"""Placeholder until the native chain lands: reports the CUDA kernels as not built."""


def unavailable_reason() -> str | None:
    return "the native CUDA extension is not built"
