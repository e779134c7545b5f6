"""3D rotary position embedding (RoPE) over (t, h, w) token coordinates.

The head dim ``D`` is cut into ``[sec_t | sec_h | sec_w | rest]``; section ``a`` (axis
``a`` of the coordinates) starts at ``off_a = sum(sections[:a])`` and has ``s_a`` channels
(even). Within a section the rotate-half pairing couples channel ``off + j`` with
``off + s/2 + j``::

    inv_freq[a, j] = theta ** (-2 j / s_a)            j in [0, s_a / 2)
    angle          = coord_a * inv_freq[a, j]
    y[off + j]         = x[off + j] cos(angle) - x[off + s/2 + j] sin(angle)
    y[off + s/2 + j]   = x[off + s/2 + j] cos(angle) + x[off + j] sin(angle)

and channels ``>= sum(sections)`` pass through. Rotating q and k of a token by the same
angles makes ``q_i . k_j`` depend only on ``coords_i - coords_j``.

Precision: ``inv_freq`` is evaluated in float64 on the host and rounded once to the compute
dtype; angles, cos/sin and the rotation run in float32 (float64 for float64 inputs). A
token whose coordinates are zeroed (prefix tokens) gets angle 0, i.e. exactly the identity.
"""
from __future__ import annotations

from typing import Sequence

import torch

from invnext.common.validate import FLOAT_DTYPES, check_shape, check_tensor

COORD_DTYPES = (torch.int32, torch.int64)


def check_rope(op: str, rope: object, head_dim: int | None) -> tuple[float, tuple[int, int, int]]:
    """Validate ``rope = (theta, (st, sh, sw))`` and return it as ``(float, tuple of 3 ints)``.

    ``head_dim=None`` skips the ``sum(sections) <= D`` check (no tensor to check against).
    """
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        raise TypeError(f"{op}: rope must be a pair (theta, (st, sh, sw)), got {rope!r}")
    theta, sections = rope
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise TypeError(f"{op}: rope theta must be a real number, got {theta!r}")
    theta = float(theta)
    if not (theta > 0.0 and theta != float("inf")):
        raise ValueError(f"{op}: rope theta must be finite and > 0, got {theta}")
    if not (
        isinstance(sections, (tuple, list))
        and len(sections) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) for s in sections)
    ):
        raise TypeError(f"{op}: rope sections must be three ints (st, sh, sw), got {sections!r}")
    if any(s < 0 or s % 2 for s in sections):
        raise ValueError(
            f"{op}: rope sections must be even and >= 0 (channels come in rotate-half pairs), got {tuple(sections)}"
        )
    if head_dim is not None and sum(sections) > head_dim:
        raise ValueError(f"{op}: rope sections {tuple(sections)} sum to {sum(sections)} > head dim {head_dim}")
    return theta, tuple(sections)  # type: ignore[return-value]


def _inv_freq_table(
    theta: float, sections: Sequence[int], dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rotated pair ``c`` (``c = off_a / 2 + j``): its axis (int64) and inv_freq (dtype)."""
    axis, freq = [], []
    for a, s in enumerate(sections):
        for j in range(s // 2):
            axis.append(a)
            freq.append(theta ** (-2.0 * j / s))
    axis_t = torch.tensor(axis, dtype=torch.int64, device=device)
    freq_t = torch.tensor(freq, dtype=torch.float64, device=device).to(dtype)
    return axis_t, freq_t


def rope_cos_sin(
    coords: torch.Tensor, theta: float, sections: Sequence[int], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every rotation angle.

    Args:
        coords: int32/int64 ``[total, 3]``, (t, h, w) of each token.
        theta: RoPE base (> 0).
        sections: channels per axis ``(st, sh, sw)``, each even.
        dtype: float32 or float64, the dtype of the angles and the results.

    Returns:
        ``(cos, sin)``, each ``dtype[total, sum(sections) // 2]``; column ``off_a / 2 + j``
        belongs to pair ``j`` of axis ``a`` (the layout of the rotated channels, halved).
    """
    check_tensor("rope_cos_sin", "coords", coords, ndim=2, dtypes=COORD_DTYPES)
    check_shape("rope_cos_sin", "coords", coords, (None, 3))
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rope_cos_sin: dtype must be float32 or float64, got {dtype}")
    theta, sections = check_rope("rope_cos_sin", (theta, sections), None)
    axis, inv_freq = _inv_freq_table(theta, sections, dtype, coords.device)
    angle = coords.to(dtype)[:, axis] * inv_freq
    return angle.cos(), angle.sin()


def apply_rope_3d(
    x: torch.Tensor,
    coords: torch.Tensor,
    theta: float,
    sections: Sequence[int],
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate every head of every token by its (t, h, w) angles.

    Args:
        x: ``[total, H, D]``, any float dtype (the math runs in float32, or float64 for float64).
        coords: int32/int64 ``[total, 3]``; rows under ``prefix_mask`` are ignored.
        theta, sections: as in :func:`rope_cos_sin`; ``sum(sections) <= D``.
        prefix_mask: optional ``bool[total]``, True = a prefix (class) token, left unrotated.

    Returns:
        ``[total, H, D]`` in ``x``'s dtype. Differentiable in ``x``.
    """
    op = "apply_rope_3d"
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(op, "coords", coords, ndim=2, dtypes=COORD_DTYPES, device=x.device)
    check_shape(op, "coords", coords, (x.shape[0], 3))
    theta, sections = check_rope(op, (theta, sections), x.shape[-1])
    if prefix_mask is not None:
        check_tensor(op, "prefix_mask", prefix_mask, ndim=1, dtypes=(torch.bool,), device=x.device)
        check_shape(op, "prefix_mask", prefix_mask, (x.shape[0],))
        # Angle 0 rotates by exactly the identity (cos 0 = 1, sin 0 = 0), so zeroing the
        # prefix rows' coordinates leaves them bit-identical without a separate select.
        coords = coords.masked_fill(prefix_mask[:, None], 0)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = rope_cos_sin(coords, theta, sections, cdt)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    xc = x.to(cdt)
    pieces, off = [], 0
    for s in sections:
        h = s // 2
        c, sn = cos[..., off // 2 : off // 2 + h], sin[..., off // 2 : off // 2 + h]
        x1, x2 = xc[..., off : off + h], xc[..., off + h : off + s]
        pieces += [x1 * c - x2 * sn, x2 * c + x1 * sn]
        off += s
    pieces.append(xc[..., off:])
    return torch.cat(pieces, dim=-1).to(x.dtype)


# --------------------------------------------------------------------------- RoPE from tables

ROPE_PAIRINGS = ("rotate_half", "interleaved")


def check_rope_tables(op: str, name: str, tables: object, total: int, head_dim: int, device) -> tuple:
    """``tables = (cos, sin)``: float tensors ``[total, R]``, ``R`` even, ``2 <= R <= head_dim``."""
    if not (isinstance(tables, (tuple, list)) and len(tables) == 2):
        raise TypeError(f"{op}: {name} must be a pair (cos, sin) of [total, R] tensors, got {type(tables).__name__}")
    cos, sin = tables
    for part, t in (("cos", cos), ("sin", sin)):
        check_tensor(op, f"{name} {part}", t, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if cos.shape != sin.shape:
        raise ValueError(f"{op}: {name} cos has shape {list(cos.shape)} but sin has {list(sin.shape)}")
    rows, width = cos.shape
    if rows != total:
        raise ValueError(f"{op}: {name} tables have {rows} rows but the tokens they rotate number {total}")
    if width % 2 or not 2 <= width <= head_dim:
        raise ValueError(f"{op}: {name} tables' width R={width} must be even and in [2, head dim {head_dim}]")
    return cos, sin


def rope_pairs(width: int, pairing: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partner int64[R], sign[R])``: channel ``c`` of the rotated width pairs with ``partner[c]``
    and takes ``sign[c] * x[partner[c]] * sin[c]`` (-1 on the pair's first channel, +1 on its second).

    ``rotate_half`` (Llama, GPT-NeoX, Qwen, most of transformers): ``c`` pairs with ``c +- R/2``.
    ``interleaved`` (GPT-J, Cohere, the original RoFormer): ``2j`` pairs with ``2j + 1``.
    """
    c = torch.arange(width, device=device)
    if pairing == "rotate_half":
        half = width // 2
        first = c < half
        partner = torch.where(first, c + half, c - half)
    elif pairing == "interleaved":
        first = c % 2 == 0
        partner = c ^ 1
    else:
        raise ValueError(f"rope pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    return partner, torch.where(first, -1.0, 1.0)


def apply_rope_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "rotate_half") -> torch.Tensor:
    """Rotate every head of every token by its precomputed ``cos``/``sin`` row (any convention).

    For the first ``R`` channels (the tables' width; the rest pass through)::

        y[c] = x[c] cos[c] + sign[c] x[partner[c]] sin[c]

    with the pairing of :func:`rope_pairs`. This is transformers' ``q * cos + rotate_half(q) * sin``
    for ``rotate_half`` (cos/sin as ``LlamaRotaryEmbedding`` returns them, one row per token) and
    the ``rotate_every_two`` form for ``interleaved``, with partial rotary when ``R < D``.

    Args:
        x: ``[total, H, D]``, any float dtype (the math runs in float32, float64 for float64).
        cos, sin: ``[total, R]`` float, one row per token of ``x``; ``R`` even, ``<= D``.
        pairing: ``"rotate_half"`` or ``"interleaved"``.

    Returns:
        ``[total, H, D]`` in ``x``'s dtype. Differentiable in ``x`` (and in the tables).
    """
    op = "apply_rope_tables"
    check_tensor(op, "x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_rope_tables(op, "(cos, sin)", (cos, sin), x.shape[0], x.shape[-1], x.device)
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"{op}: pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    width = cos.shape[-1]
    partner, sign = rope_pairs(width, pairing, x.device)
    xc = x.to(cdt)
    xr = xc[..., :width]
    y = xr * cos.to(cdt)[:, None, :] + sign.to(cdt) * xr[..., partner] * sin.to(cdt)[:, None, :]
    return torch.cat([y, xc[..., width:]], dim=-1).to(x.dtype)
