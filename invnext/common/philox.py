"""Philox-4x32-10: the counter-based RNG behind every mask in ``invnext.ops``.

A Philox output depends only on ``(key, counter)``; there is no state to carry between
calls. Every mask sampler draws all of its random numbers as
``philox_uniform(seed, stream, counter)`` with a counter computed from the sample, block
and token index, so one seed gives the *same mask* on the CPU, in a Triton or CUDA kernel,
in any dataloader worker and in any order of evaluation.

The block function (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11;
bit-exact with Random123's ``philox4x32_R``), on 32-bit words, with
``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``, ``W0 = 0x9E3779B9``, ``W1 = 0xBB67AE85``::

    round(c, k):  hi0:lo0 = M0 * c0 ;  hi1:lo1 = M1 * c2        (32x32 -> 64-bit products)
                  c = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)
    philox4x32_R(c, k):  c = round(c, k);  repeat R-1 times { k += (W0, W1) mod 2^32; c = round(c, k) }

The mapping used by :func:`philox_uniform` (reproduce exactly in a kernel)::

    key     = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)          seed taken mod 2^64
    counter = (ctr & 0xFFFFFFFF, (ctr >> 32) & 0xFFFFFFFF,             ctr: int64 >= 0
               stream & 0xFFFFFFFF, (stream >> 32) & 0xFFFFFFFF)       stream taken mod 2^64
    u       = float32((out[0] >> 8) * 2^-24)                          in [0, 1), exact in float32

Only output word 0 is used: one counter per uniform keeps the counter arithmetic of a
kernel trivial (element i of anything reads counter ``base + i``).
"""
from __future__ import annotations

import numpy as np
import torch

_M0 = 0xD2511F53
_M1 = 0xCD9E8D57
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``m * x`` for a constant ``m`` < 2^32 and int64 ``x`` in [0, 2^32).

    ``x`` is split into 16-bit halves so every intermediate stays below 2^49: the result
    never relies on signed int64 overflow (undefined in C++, and not guaranteed by every
    torch backend), and it is exact on any device.
    """
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    p_lo = x_lo * m  # < 2^48
    p_hi = x_hi * m  # < 2^48; the product is p_hi * 2^16 + p_lo
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK32
    hi = (p_hi >> 16) + (mid >> 32)
    return hi, lo


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = 10) -> torch.Tensor:
    """Philox-4x32-R block function (Random123 ``philox4x32_R``), vectorised.

    Args:
        counter: int64 ``[..., 4]``, each entry a uint32 value in ``[0, 2^32)``
            (counter words c0..c3, Random123 order).
        key: two uint32 ints ``(k0, k1)``.
        rounds: number of rounds; 10 is the standard (and the one every mask uses).

    Returns:
        int64 ``[..., 4]`` of uint32 values, on ``counter``'s device.
    """
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64:
        raise TypeError(f"philox4x32: counter must be an int64 tensor, got {getattr(counter, 'dtype', type(counter))}")
    if counter.dim() < 1 or counter.shape[-1] != 4:
        raise ValueError(f"philox4x32: counter must have shape [..., 4], got {list(counter.shape)}")
    if not (isinstance(key, (tuple, list)) and len(key) == 2 and all(isinstance(k, int) for k in key)):
        raise TypeError(f"philox4x32: key must be a pair of ints, got {key!r}")
    if not all(0 <= k <= _MASK32 for k in key):
        raise ValueError(f"philox4x32: key words must lie in [0, 2^32), got {tuple(key)}")
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"philox4x32: rounds must be an int >= 1, got {rounds!r}")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_bits(seed: int, stream: int, counter: torch.Tensor) -> torch.Tensor:
    """Output word 0 of Philox-4x32-10 under the module's (seed, stream, counter) mapping.

    Args:
        seed: int, taken mod 2^64 (the key).
        stream: int, taken mod 2^64 (counter words 2, 3); separates independent draws.
        counter: int64 tensor of any shape, values >= 0 (counter words 0, 1).

    Returns:
        int64 tensor of ``counter``'s shape and device holding uint32 values.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"philox: seed must be an int, got {type(seed).__name__}")
    if not isinstance(stream, int) or isinstance(stream, bool):
        raise TypeError(f"philox: stream must be an int, got {type(stream).__name__}")
    if not isinstance(counter, torch.Tensor) or counter.dtype != torch.int64:
        raise TypeError(f"philox: counter must be an int64 tensor, got {getattr(counter, 'dtype', type(counter))}")
    seed &= _MASK64
    stream &= _MASK64
    words = torch.stack(
        (
            counter & _MASK32,
            (counter >> 32) & _MASK32,
            torch.full_like(counter, stream & _MASK32),
            torch.full_like(counter, stream >> 32),
        ),
        dim=-1,
    )
    return philox4x32(words, (seed & _MASK32, seed >> 32))[..., 0]


def philox_uniform(
    seed: int, stream: int, counter: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Uniform float32 in ``[0, 1)``: ``u = (philox_bits(seed, stream, counter) >> 8) * 2^-24``.

    Args:
        seed: int, taken mod 2^64.
        stream: int, taken mod 2^64.
        counter: int64 tensor of any shape, values >= 0; moved to ``device`` when given.
        device: where to compute (default: ``counter``'s device).

    Returns:
        float32 tensor of ``counter``'s shape; every value is a multiple of 2^-24, so it is
        exactly representable and identical on every device.
    """
    if device is not None and isinstance(counter, torch.Tensor):
        counter = counter.to(device)
    bits = philox_bits(seed, stream, counter)
    # 24 bits fit a float32 significand: the conversion and the power-of-two scale are exact.
    return (bits >> 8).to(torch.float32) * (2.0**-24)


def philox_uniform_host(seed: int, stream: int, counter: np.ndarray) -> np.ndarray:
    """:func:`philox_uniform` on the host, in numpy: the same float32 values, bit for bit.

    For the few hundred draws a sampler makes on the host (the multi-block boxes), torch's
    per-op overhead dominates: the 16-bit split of :func:`_mulhilo` costs about 200 small
    torch calls. numpy's uint64 products of two 32-bit words are exact (they wrap only above
    2^64), so a round is a handful of vector ops (0.3 ms for 672 draws, against 2.5 ms).

    Args:
        seed: int, taken mod 2^64.
        stream: int, taken mod 2^64.
        counter: integer array of any shape, values in ``[0, 2^63)``.

    Returns:
        float32 array of ``counter``'s shape.
    """
    counter = np.asarray(counter)
    if counter.dtype.kind not in "iu":
        raise TypeError(f"philox: counter must be an integer array, got {counter.dtype}")
    if counter.size and counter.min() < 0:
        raise ValueError("philox: counter values must be >= 0")
    seed &= _MASK64
    stream &= _MASK64
    c = counter.astype(np.uint64)
    low, shift = np.uint64(_MASK32), np.uint64(32)
    c0, c1 = c & low, c >> shift
    c2 = np.full_like(c, stream & _MASK32)
    c3 = np.full_like(c, stream >> 32)
    k0, k1 = seed & _MASK32, seed >> 32
    m0, m1 = np.uint64(_M0), np.uint64(_M1)
    for r in range(10):
        if r:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        p0, p1 = c0 * m0, c2 * m1  # < 2^64: exact
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ np.uint64(k0), p1 & low, (p0 >> shift) ^ c3 ^ np.uint64(k1), p0 & low
    return (c0 >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)


@torch.compiler.disable  # host RNG and int math: one graph break, not a trace of each step
def seed_from(generator: torch.Generator | None = None, seed: int | None = None) -> int:
    """The mask seed: ``seed`` when given, else 64 bits drawn from a CPU ``generator``.

    With neither, the bits come from torch's default CPU generator, so ``torch.manual_seed``
    makes masks reproducible. Only CPU generators are accepted: drawing from a CUDA
    generator would need a host read of device memory (a sync).

    Returns:
        int in ``[0, 2^64)``.
    """
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        return seed & _MASK64
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != "cpu":
            raise ValueError(
                f"generator must be a CPU torch.Generator (got one on {generator.device}); "
                "drawing a seed from a device generator would synchronise with the GPU"
            )
    halves = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, generator=generator)
    return int(halves[0]) | (int(halves[1]) << 32)
