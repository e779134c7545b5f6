"""invnext's functional ops: one public function per op, dispatched to a backend.

Every op takes ``backend="auto" | "torch" | "triton" | "cuda"``. ``auto`` picks the fastest
implementation available for the device of its tensors (the pure-PyTorch reference on the
CPU); an explicit backend that cannot run raises :class:`BackendUnavailableError` saying why.
``invnext doctor`` prints the table of what is available here.

Submodules load on first attribute access, so ``import invnext.ops`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from invnext.common.lazy import lazy_exports

from ._dispatch import BackendUnavailableError, Explanation, availability, explain, ops

_EXPORTS = {
    "attention": ("masked_attention", "dense_attention_mask", "prefix_mask", "static_structure"),
    "rope": ("apply_rope_3d",),
    "varlen": ("varlen_attention",),
    "diffusion": (
        "DiffusionSchedule",
        "make_schedule",
        "space_timesteps",
        "q_sample",
        "diffusion_loss",
        "p_sample_step",
        "ddim_step",
        "adaln_modulate",
        "p_sample_loop",
        "ddim_sample_loop",
        "timestep_embedding",
    ),
    "masks": ("tube_mask", "multiblock_mask", "semantic_mask", "motion_mask", "mask_counts"),
    "philox": ("philox_uniform", "philox4x32", "seed_from"),
    "tokens": ("PackedTokens", "gather_visible", "scatter_tokens", "packed_structure", "keep_structure", "token_coords"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = ["BackendUnavailableError", "Explanation", "availability", "explain", "ops", "load_all", *sorted(sum(_EXPORTS.values(), ()))]


def load_all() -> None:
    """Import every op module, so every reference is registered (doctor and dispatch need it)."""
    for module in _EXPORTS:
        importlib.import_module(f"{__name__}.{module}")


if TYPE_CHECKING:  # pragma: no cover
    from .attention import dense_attention_mask, masked_attention, prefix_mask, static_structure  # noqa: F401
    from .diffusion import (  # noqa: F401
        DiffusionSchedule,
        adaln_modulate,
        ddim_sample_loop,
        ddim_step,
        diffusion_loss,
        make_schedule,
        p_sample_loop,
        p_sample_step,
        q_sample,
        space_timesteps,
        timestep_embedding,
    )
    from .masks import mask_counts, motion_mask, multiblock_mask, semantic_mask, tube_mask  # noqa: F401
    from .philox import philox4x32, philox_uniform, seed_from  # noqa: F401
    from .rope import apply_rope_3d  # noqa: F401
    from .tokens import (  # noqa: F401
        PackedTokens,
        gather_visible,
        keep_structure,
        packed_structure,
        scatter_tokens,
        token_coords,
    )
    from .varlen import varlen_attention  # noqa: F401
