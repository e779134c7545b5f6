"""Whether Triton kernels run on the CPU interpreter: dispatch offers them for CPU tensors then,
and the kernels round bf16 by hand there (the interpreter truncates where a GPU rounds)."""
from __future__ import annotations

import os


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
