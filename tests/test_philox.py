"""Philox-4x32 against Random123's known answers and an arbitrary-precision scalar model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invnext.common.philox import _mulhilo, philox4x32, philox_bits, philox_uniform, philox_uniform_host, seed_from

# Random123 tests/kat_vectors: rounds, counter[4], key[2] -> output[4].
KAT = [
    (7, [0, 0, 0, 0], [0, 0], [0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48]),
    (7, [0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]),
    (
        7,
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A],
    ),
    (10, [0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (10, [0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        10,
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]

M32 = 0xFFFFFFFF


def philox_scalar(ctr: list[int], key: list[int], rounds: int = 10) -> list[int]:
    """Philox4x32-R on Python ints (exact products, no word splitting)."""
    c, (k0, k1) = list(ctr), key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & M32, (p0 >> 32) ^ c[3] ^ k1, p0 & M32]
    return c


@pytest.mark.parametrize("rounds,ctr,key,want", KAT)
def test_known_answers(rounds, ctr, key, want):
    out = philox4x32(torch.tensor(ctr, dtype=torch.int64), tuple(key), rounds=rounds)
    assert out.tolist() == want
    assert philox_scalar(ctr, key, rounds) == want


def test_known_answers_batched():
    # All three 10-round vectors in one [3, 1, 4] call: leading dims broadcast elementwise.
    ten = [k for k in KAT if k[0] == 10]
    ctr = torch.tensor([[k[1]] for k in ten], dtype=torch.int64)
    for i, (_, _, key, want) in enumerate(ten):
        assert philox4x32(ctr, tuple(key))[i, 0].tolist() == want


def test_mulhilo_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 1 << 32, (4096,), dtype=torch.int64, generator=g)
    x = torch.cat((x, torch.tensor([0, 1, 0xFFFF, 0x10000, M32 - 1, M32])))
    for m in (0xD2511F53, 0xCD9E8D57, M32):
        hi, lo = _mulhilo(m, x)
        prod = [m * v for v in x.tolist()]
        assert hi.tolist() == [p >> 32 for p in prod]
        assert lo.tolist() == [p & M32 for p in prod]


def test_matches_scalar_model_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    ctr = torch.randint(0, 1 << 32, (64, 4), dtype=torch.int64, generator=g)
    keys = torch.randint(0, 1 << 32, (4, 2), dtype=torch.int64, generator=g).tolist()
    for key in keys:
        out = philox4x32(ctr, tuple(key)).tolist()
        assert out == [philox_scalar(c, key) for c in ctr.tolist()]


def test_uniform_mapping_documented():
    # key = seed lo/hi, counter = (ctr lo, ctr hi, stream lo, stream hi), u = (word0 >> 8) * 2^-24.
    seed, stream = 0x0123456789ABCDEF, (1 << 40) + 5
    ctr = [0, 1, M32, (1 << 33) + 7, (1 << 62) + 12345]
    u = philox_uniform(seed, stream, torch.tensor(ctr))
    assert u.dtype == torch.float32
    key = [seed & M32, seed >> 32]
    for c, got in zip(ctr, u.tolist()):
        word = philox_scalar([c & M32, c >> 32, stream & M32, stream >> 32], key)[0]
        assert got == (word >> 8) * 2.0**-24
    bits = philox_bits(seed, stream, torch.tensor(ctr))
    assert torch.equal((bits >> 8).to(torch.float32) * 2.0**-24, u)
    # Seeds and streams are taken mod 2^64.
    assert torch.equal(philox_uniform(seed - (1 << 64), stream + (1 << 64), torch.tensor(ctr)), u)


def test_uniform_range_mean_and_histogram():
    n = 1 << 18
    u = philox_uniform(7, 3, torch.arange(n))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2**24, torch.floor(u * 2**24))  # multiples of 2^-24
    # Mean of n iid U[0,1): sd sqrt(1/(12 n)); 5 sd.
    u64 = u.double()
    assert abs(float(u64.mean()) - 0.5) < 5 * math.sqrt(1 / (12 * n))
    # Variance 1/12; the sample variance of U[0,1) has sd sqrt((1/80 - 1/144) / n).
    assert abs(float(u64.var()) - 1 / 12) < 5 * math.sqrt((1 / 80 - 1 / 144) / n)
    # 64-bin chi-square, df = 63; threshold: Wilson-Hilferty 1 - 3.4e-6 quantile (z = 4.5).
    bins = 64
    counts = torch.bincount((u64 * bins).long(), minlength=bins).double()
    chi2 = float(((counts - n / bins) ** 2 / (n / bins)).sum())
    df = bins - 1
    limit = df * (1 - 2 / (9 * df) + 4.5 * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < limit


def test_uniform_counter_based():
    ctr = torch.arange(1000)
    u = philox_uniform(11, 0, ctr)
    perm = torch.randperm(1000)
    assert torch.equal(philox_uniform(11, 0, ctr[perm]), u[perm])  # order of evaluation is irrelevant
    assert torch.equal(philox_uniform(11, 0, ctr.view(10, 100)), u.view(10, 100))
    assert torch.equal(philox_uniform(11, 0, ctr, device="cpu"), u)
    assert not torch.equal(philox_uniform(11, 1, ctr), u)  # streams differ
    assert not torch.equal(philox_uniform(12, 0, ctr), u)  # seeds differ
    # Different streams / seeds are uncorrelated: |corr| within 5 sd of 0 (sd 1/sqrt(n)).
    v = philox_uniform(11, 1, ctr).double()
    corr = torch.corrcoef(torch.stack((u.double(), v)))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(1000)


def test_seed_from_explicit_wins_and_consumes_nothing():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    assert seed_from(g, 42) == 42
    assert seed_from(None, -1) == (1 << 64) - 1
    assert torch.equal(g.get_state(), state)


def test_seed_from_generator_reproducible():
    a = seed_from(torch.Generator().manual_seed(5))
    b = seed_from(torch.Generator().manual_seed(5))
    c = seed_from(torch.Generator().manual_seed(6))
    assert a == b and a != c
    assert 0 <= a < (1 << 64)
    g = torch.Generator().manual_seed(5)
    assert seed_from(g) == a and seed_from(g) != a  # the generator advances
    torch.manual_seed(9)
    d = seed_from()
    torch.manual_seed(9)
    assert seed_from() == d


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((None, True), TypeError, "seed"),
        ((None, 1.5), TypeError, "seed"),
        (("gen", None), TypeError, "generator"),
    ],
)
def test_seed_from_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        seed_from(*args)


@pytest.mark.requires_cuda
def test_seed_from_rejects_cuda_generator():
    with pytest.raises(ValueError, match="CPU"):
        seed_from(torch.Generator(device="cuda"))


def test_philox_bad_input():
    with pytest.raises(TypeError, match="int64"):
        philox4x32(torch.zeros(4, dtype=torch.int32), (0, 0))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        philox4x32(torch.zeros(3, dtype=torch.int64), (0, 0))
    with pytest.raises(ValueError, match="key"):
        philox4x32(torch.zeros(4, dtype=torch.int64), (0, 1 << 32))
    with pytest.raises(TypeError, match="key"):
        philox4x32(torch.zeros(4, dtype=torch.int64), (0,))
    with pytest.raises(TypeError, match="counter"):
        philox_uniform(0, 0, torch.zeros(4))
    with pytest.raises(TypeError, match="seed"):
        philox_uniform(0.5, 0, torch.zeros(4, dtype=torch.int64))


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 0xDEADBEEFCAFEBABE, 2**64 - 1, 2**70 + 5, -3])
@pytest.mark.parametrize("stream", [0, 2, 2**33 + 1, 2**64 - 1])
def test_host_uniform_equals_torch_bit_for_bit(seed, stream):
    gen = np.random.default_rng(seed % 1000 + stream % 7)
    counter = np.concatenate([np.arange(300), gen.integers(0, 2**63, 300), [2**32 - 1, 2**32, 2**63 - 1]])
    host = philox_uniform_host(seed, stream, counter.reshape(-1, 3))
    want = philox_uniform(seed, stream, torch.from_numpy(counter.reshape(-1, 3)))
    assert host.dtype == np.float32 and host.shape == (201, 3)
    assert np.array_equal(host, want.numpy())


def test_host_uniform_bad_input():
    with pytest.raises(TypeError, match="counter must be an integer array"):
        philox_uniform_host(0, 0, np.zeros(3))
    with pytest.raises(ValueError, match="counter values must be >= 0"):
        philox_uniform_host(0, 0, np.array([1, -1]))
