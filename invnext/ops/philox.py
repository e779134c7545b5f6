"""Philox-4x32-10, the RNG of every mask: defined in :mod:`invnext.common.philox`, below the ops,
because the CUDA mask samplers draw the same numbers on the host."""
from invnext.common.philox import philox4x32, philox_bits, philox_uniform, philox_uniform_host, seed_from

__all__ = ["philox4x32", "philox_bits", "philox_uniform", "philox_uniform_host", "seed_from"]
