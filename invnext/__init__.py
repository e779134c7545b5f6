"""invnext: fast, dependable pretraining and use of InternVideo-Next video encoders.

``invnext.ops`` holds the fused ops (masks, token gather/scatter, masked attention,
diffusion-decoder steps), each with a pure-PyTorch reference and Triton / CUDA backends.
Importing invnext touches no GPU and compiles nothing.

``invnext.load_encoder(source, device=None)`` (imported on first use) returns a ready video
encoder from a preset name, one of our checkpoints, or the authors' released weights.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import invnext` stays cheap (no torch models, no transformers).
    if name == "load_encoder":
        from invnext.loading import load_encoder

        return load_encoder
    raise AttributeError(f"module 'invnext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load_encoder"])
