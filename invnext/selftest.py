"""``invnext doctor --selftest``: every kernel available here against its reference, in seconds.

For each op and each accelerated backend that can run on the device, the op runs on small
random inputs of awkward sizes, once on that backend and once on the pure-PyTorch reference
(``backend="torch"``) with the same inputs, forward and every gradient. The mask samplers
must agree bit for bit (one seed, one mask), and so must the token moves' outputs (copies);
other outputs and every gradient within a tolerance of the reference's scale (fp32 inputs:
``1e-4`` relative, since a fused kernel sums in another order). The point is an installed
wheel on a new card: "do the kernels work here", without the test suite. ``pytest`` remains
the thorough check.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from invnext import ops
from invnext.ops import _dispatch

_RTOL = 1e-4


@dataclass
class Result:
    op: str
    backend: str
    ok: bool
    detail: str
    seconds: float


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "tokens"):  # PackedTokens
        return [out.tokens, out.cu_seqlens, out.index]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _run(fn: Callable, inputs: list[torch.Tensor], backend: str, seed: int = 0) -> tuple[list, list]:
    """(outputs, gradients of a fixed random projection of the float outputs w.r.t. ``inputs``)."""
    torch.manual_seed(seed)
    outs = _outputs(fn(backend, *inputs))
    floats = [o for o in outs if o.is_floating_point() and o.requires_grad]
    grads: list[torch.Tensor] = []
    if floats and inputs:
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        weights = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in floats]
        total = sum((o * w).sum() for o, w in zip(floats, weights))
        grads = [g if g is not None else torch.zeros_like(x) for g, x in
                 zip(torch.autograd.grad(total, inputs, allow_unused=True), inputs)]  # fmt: skip
    return [o.detach() for o in outs], grads


def _compare(got: tuple[list, list], want: tuple[list, list], exact: bool) -> tuple[bool, str]:
    """Outputs bit for bit when ``exact`` (copies, masks), else and for every gradient (sums in
    another order) within ``_RTOL`` of the reference's scale."""
    if [len(x) for x in got] != [len(x) for x in want]:
        return False, f"{len(got[0])} outputs, {len(got[1])} grads; the reference has {len(want[0])}, {len(want[1])}"
    worst = 0.0
    pairs = [(g, w, exact) for g, w in zip(got[0], want[0])] + [(g, w, False) for g, w in zip(got[1], want[1])]
    for g, w, exact in pairs:
        if g.shape != w.shape or g.dtype != w.dtype:
            return False, f"shape/dtype {tuple(g.shape)} {g.dtype} vs reference {tuple(w.shape)} {w.dtype}"
        if exact or not w.is_floating_point():
            if not torch.equal(g.cpu(), w.cpu()):
                return False, "differs from the reference (must be identical)"
            continue
        scale = float(w.abs().max()) if w.numel() else 0.0
        err = float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        if not err <= _RTOL * max(scale, 1e-6):
            return False, f"max error {err:.3g} > {_RTOL:g} x reference scale {scale:.3g}"
        worst = max(worst, err / max(scale, 1e-6))
    return True, f"max error {worst:.1e} of the reference's scale" if worst else "identical"


def _cases(device: torch.device) -> list[tuple[str, Callable, list[torch.Tensor], bool]]:
    """(op, fn(backend, *inputs), inputs, exact)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype)

    cases = []
    # attention: two ragged samples (37, 23 tokens) of 2 heads x 64, 1 prefix token, 3D RoPE, a window
    lengths, P = [37, 23], 1
    cu = torch.tensor([0, 37, 60], dtype=torch.int32, device=device)
    coords = torch.stack(
        [torch.arange(60) % 3, (torch.arange(60) // 3) % 4, torch.arange(60) // 12], -1
    ).to(device, torch.int32)  # fmt: skip
    q, k, v = (randn(60, 2, 64) for _ in range(3))

    def attention(b, q, k, v):
        return ops.masked_attention(q, k, v, cu, max(lengths), coords=coords, rope=(100.0, (16, 24, 24)),
                                    window=(3, 3, 5), num_prefix=P, backend=b)  # fmt: skip

    cases.append(("masked_attention", attention, _leaves(q, k, v), False))
    # varlen: 4 query heads on 2 kv heads, q/k lengths (37, 5) / (40, 20), causal with a left window of 9
    # (every row sees a key: an lse of -inf would make the projected comparison NaN)
    cq = torch.tensor([0, 37, 42], dtype=torch.int32, device=device)
    ck = torch.tensor([0, 40, 60], dtype=torch.int64, device=device)
    # (its own generator: the draws of the cases below stay those their tolerances were set on)
    gv = torch.Generator(device="cpu").manual_seed(1)
    qv, kv, vv = (torch.randn(n, h, 64, generator=gv).to(device) for n, h in ((42, 4), (60, 2), (60, 2)))
    # RoPE tables over 48 of the 64 channels (angles of positions 0..59, interleaved pairs)
    angles = torch.arange(60)[:, None] * 100.0 ** (-torch.arange(24) / 24.0)
    cos_t, sin_t = (f(angles).repeat_interleave(2, -1).to(device) for f in (torch.cos, torch.sin))

    def varlen(b, q, k, v):
        return ops.varlen_attention(q, k, v, cq, ck, 37, 40, causal=True, window_size=(9, -1), return_lse=True,
                                    rope=(cos_t[:42], sin_t[:42]), rope_k=(cos_t, sin_t), rope_pairing="interleaved",
                                    backend=b)

    cases.append(("varlen_attention", varlen, _leaves(qv, kv, vv), False))
    # tokens: 3 clips of 40 tokens x 64, one with nothing visible, 2 prefix tokens, a shared position table
    B, N, C = 3, 40, 64
    hidden = torch.rand(B, N, generator=g) < 0.6
    hidden[1] = True
    hidden = hidden.to(device)
    x, pos, prefix, mask_token = randn(B, N, C), randn(1, N, C), randn(1, 2, C), randn(C)
    packed = ops.gather_visible(x, hidden, pos, prefix, backend="torch")
    cases.append(("gather_visible", lambda b, x, pos, pre: ops.gather_visible(x, hidden, pos, pre, backend=b),
                  _leaves(x, pos, prefix), True))  # fmt: skip
    cases.append(("scatter_tokens",
                  lambda b, t, m, pos: ops.scatter_tokens(t, packed.index, m, pos=pos, N=N, batch_size=B, backend=b),
                  _leaves(packed.tokens, mask_token, pos), True))  # fmt: skip
    # diffusion: 37 rows of 48 channels over a 50-step cosine schedule, t = 0 and the last step included
    sched = ops.make_schedule(1000, "cosine", respace=50, device=device)
    M, D = 37, 48
    x0, noise, x_t, model_out = randn(M, D), randn(M, D), randn(M, D), randn(M, 2 * D)
    t = torch.randint(0, sched.num_steps, (M,), generator=g).to(device)
    t[0], t[1] = 0, sched.num_steps - 1
    cases += [
        ("q_sample", lambda b, x0, n: ops.q_sample(x0, n, t, sched, backend=b), _leaves(x0, noise), False),
        ("diffusion_loss", lambda b, mo: ops.diffusion_loss(mo, x0, x_t, noise, t, sched, reduction="none", backend=b),
         _leaves(model_out), False),
        ("p_sample_step", lambda b: ops.p_sample_step(model_out, x_t, t, sched, noise, backend=b), [], False),
        ("ddim_step", lambda b: ops.ddim_step(model_out, x_t, t, sched, noise, eta=0.5, backend=b), [], False),
        ("adaln_modulate", lambda b, h, sh, sc: ops.adaln_modulate(h, sh, sc, backend=b),
         _leaves(randn(M, 96), randn(M, 96), 0.1 * randn(96)), False),
    ]  # fmt: skip
    weight = 0.1 * randn(2 * D, 2 * D)
    cond = randn(M, D)

    def denoise(x, t_model, c):
        return torch.tanh(torch.cat([x, c], -1) @ weight)

    short = ops.make_schedule(1000, "cosine", respace=10, device=device)
    step_noise = randn(short.num_steps, M, D)
    for name, fn in (("p_sample_loop", ops.p_sample_loop), ("ddim_sample_loop", ops.ddim_sample_loop)):
        cases.append((name, lambda b, fn=fn: fn(denoise, cond, short, channels=D, noise=x_t, step_noise=step_noise,
                                                backend=b), [], False))  # fmt: skip
    # masks: one seed, one mask on every backend
    attn = torch.rand(2, 3, 100, generator=g).to(device)
    cases += [
        ("tube_mask", lambda b: ops.tube_mask(3, (2, 5, 7), 0.6, seed=3, device=device, backend=b), [], True),
        ("multiblock_mask", lambda b: ops.multiblock_mask(3, (4, 6, 6), 4, (0.1, 0.3), (0.5, 2.0), seed=3,
                                                          device=device, backend=b), [], True),  # fmt: skip
        ("semantic_mask", lambda b: ops.semantic_mask(attn, 17, "sample", seed=3, backend=b), [], True),
    ]
    return cases


def run_selftest(device: torch.device | str) -> list[Result]:
    """A :class:`Result` per (op, accelerated backend) that can run on ``device``."""
    device = torch.device(device)
    ops.load_all()
    results = []
    with warnings.catch_warnings():  # the CPU interpreter's exp2(-inf) in masked softmax rows
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
        for op, fn, inputs, exact in _cases(device):
            results += _check_op(op, fn, inputs, exact, device)
    return results


def _check_op(op: str, fn: Callable, inputs: list, exact: bool, device: torch.device) -> list[Result]:
    """One :class:`Result` per accelerated backend of ``op`` that can run on ``device``."""
    assert op in _dispatch.ops(), op
    backends = [b for b in _dispatch.BACKENDS if b != "torch" and _dispatch.availability(op, b, device)[0]]
    if not backends:
        return []
    want = _run(fn, inputs, "torch")
    results = []
    for backend in backends:
        t0 = time.perf_counter()
        try:
            got = _run(fn, inputs, backend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ok, detail = _compare(got, want, exact)
        except Exception as exc:  # noqa: BLE001 - a failing kernel is the finding
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        results.append(Result(op, backend, ok, detail, time.perf_counter() - t0))
    return results


def print_selftest(device: torch.device | str) -> int:
    """Print the self-test table; 0 when every backend agrees with the reference, else 1."""
    results = run_selftest(device)
    if not results:
        print(f"\nselftest on {device}: no accelerated backend can run here (only the references); nothing to compare")
        return 0
    print(f"\nselftest on {device}: every available kernel against its reference (small random inputs)")
    width = max(len(r.op) for r in results)
    for r in results:
        verdict = "ok  " if r.ok else "FAIL"
        print(f"  {r.op.ljust(width)}  {r.backend.ljust(6)}  {verdict}  {r.detail}  ({r.seconds:.2f} s)")
    failed = [r for r in results if not r.ok]
    print(f"selftest: {len(results) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0
