"""``invnext doctor``: what this machine can run, and why a backend is missing."""
from __future__ import annotations

import os

import platform
import shutil
import subprocess

import torch

from invnext.ops import _dispatch


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{nvcc} (failed to run: {exc})"
    last = [line for line in out.splitlines() if line.strip()]
    return f"{nvcc}: {last[-1].strip() if last else '?'}"


def report(device: str | None = None) -> tuple[list[str], list[tuple[str, dict[str, tuple[bool, str]]]]]:
    """(header lines, [(op, {backend: (available, reason)})])."""
    import invnext

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        triton_version = f"unavailable ({exc.__class__.__name__}: {exc})"
    cuda_visible = torch.cuda.is_available()
    dev = torch.device(device) if device else torch.device("cuda" if cuda_visible else "cpu")
    lines = [
        f"invnext {invnext.__version__}  python {platform.python_version()}  ({platform.machine()})",
        f"torch {torch.__version__}  (built with CUDA {torch.version.cuda or 'none'})",
        f"triton {triton_version}{'  [TRITON_INTERPRET=1: kernels run on the CPU interpreter]' if _dispatch.triton_interpreter() else ''}",
        f"nvcc {_nvcc_version()}",
    ]
    if cuda_visible:
        props = torch.cuda.get_device_properties(dev if dev.type == "cuda" else 0)
        lines.append(f"device {dev}: {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append(f"device {dev}: no CUDA GPU visible to torch")
    from invnext import native

    why = native.unavailable_reason()
    src = native.source() if hasattr(native, "source") else None
    lines.append(f"native CUDA kernels: {'in use via ' + str(src) if why is None else 'unavailable: ' + why}")
    table = []
    for op in _dispatch.ops():
        table.append((op, {b: _dispatch.availability(op, b, dev) for b in _dispatch.BACKENDS}))
    return lines, table


# Environment settings that change what runs (name, default, meaning).
SETTINGS = (
    ("INVNEXT_ATTN_ROPE", "prepass", "attention RoPE: prepass (rotate q, k once) or inline (in the tile loops)"),
    ("INVNEXT_ATTN_AUTOTUNE", "1", "autotune the attention kernels (0: first config)"),
    ("INVNEXT_CHECK_VALUES", "0", "check index / cu_seqlens values on the GPU too (host reads; CPU: always)"),
    ("INVNEXT_SKIP_CUDA_BUILD", "0", "pip install without building csrc/"),
    ("INVNEXT_CACHE", "$XDG_CACHE_HOME/invnext or ~/.cache/invnext", "bundled data, teacher and feature caches"),
    ("TRITON_INTERPRET", "0", "run Triton kernels on the CPU interpreter"),
)


def settings_lines() -> list[str]:
    out = []
    for name, default, meaning in SETTINGS:
        value = os.environ.get(name)
        shown = f"{value} (set)" if value is not None else f"{default} (default)"
        out.append(f"  {name}={shown}: {meaning}")
    return out


def run_doctor(device: str | None = None) -> int:
    lines, table = report(device)
    print("\n".join(lines))
    print()
    width = max(len(op) for op, _ in table)
    print(f"{'op'.ljust(width)}  torch  triton  cuda")
    reasons: dict[str, list[str]] = {}
    for op, row in table:
        marks = []
        for b, w in (("torch", 5), ("triton", 6), ("cuda", 4)):
            ok, why = row[b]
            marks.append(("yes" if ok else "no").ljust(w))
            if not ok:
                reasons.setdefault(why, []).append(f"{op}/{b}")
        print(f"{op.ljust(width)}  " + "  ".join(marks))
    if reasons:
        print("\nwhy a backend is missing:")
        for why, where in reasons.items():
            print(f"- {why}: {', '.join(where)}")
    print("\nsettings:")
    print("\n".join(settings_lines()))
    return 0
