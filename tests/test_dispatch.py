"""Backend selection: auto on CPU is the reference; unavailable backends say why; doctor lists every op."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from invnext.ops import _dispatch
from invnext.ops._dispatch import BackendUnavailableError, availability, resolve

KERNELS_MD_OPS = {
    "tube_mask",
    "semantic_mask",
    "motion_mask",
    "multiblock_mask",
    "gather_visible",
    "scatter_tokens",
    "masked_attention",
    "varlen_attention",  # issue 18 (flash-attn's varlen interface); not yet in the design notes' kernels.md
    "q_sample",
    "diffusion_loss",
    "p_sample_step",
    "ddim_step",
    "adaln_modulate",
    "p_sample_loop",
    "ddim_sample_loop",
}


def test_every_kernels_md_op_is_declared_and_has_a_reference():
    import invnext.ops as ops

    ops.load_all()
    assert set(_dispatch.ops()) == KERNELS_MD_OPS
    assert set(_dispatch._REFERENCE) == KERNELS_MD_OPS


def test_auto_on_cpu_is_the_reference():
    import invnext.ops as ops

    ops.load_all()
    for op in KERNELS_MD_OPS:
        name, fn = resolve(op, "auto", torch.device("cpu"))
        assert name == "torch" and fn is _dispatch._REFERENCE[op]


def test_reasons_name_the_cause(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = availability("masked_attention", "triton", "cpu")
    assert not ok and "CUDA tensors" in why
    ok, why = availability("gather_visible", "cuda", "cpu")
    assert not ok and "CUDA tensors" in why
    ok, why = availability("masked_attention", "cuda", "cpu")
    assert not ok and "no cuda implementation" in why
    with pytest.raises(BackendUnavailableError, match="masked_attention: backend 'triton' is unavailable"):
        resolve("masked_attention", "triton", "cpu")


def test_missing_triton_is_reported(monkeypatch):
    monkeypatch.setattr(_dispatch, "_triton_import_error", lambda: "triton is not installed (pip install triton; Linux only)")
    ok, why = availability("masked_attention", "triton", "cuda")
    assert not ok and "triton is not installed" in why


def test_missing_implementation_module_is_reported(monkeypatch):
    from invnext.common import registry

    monkeypatch.setitem(_dispatch._BACKEND_MODULES, "triton", ("invnext_kernels.no_such_module",))
    monkeypatch.setitem(registry._IMPLEMENTATIONS, "q_sample", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _dispatch._import_failures.cache_clear()
    try:
        ok, why = availability("q_sample", "triton", "cpu")
    finally:
        _dispatch._import_failures.cache_clear()
    assert not ok and "invnext_kernels.no_such_module is not present" in why


def test_declared_backends_are_the_registered_ones(monkeypatch):
    """What dispatch declares per op (known without importing a backend) is what the backends'
    modules register when imported."""
    from invnext.common import registry

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _dispatch._import_failures("triton") == ()
    pytest.importorskip("invnext.native.ops")
    assert _dispatch._import_failures("cuda") == ()
    registered = {(op, b) for op, impls in registry._IMPLEMENTATIONS.items() for b in impls}
    declared = {(op, b) for op, backends in _dispatch._ACCELERATED.items() for b in backends}
    assert registered == declared


def test_unknown_op_and_backend():
    with pytest.raises(KeyError, match="unknown op"):
        availability("flash", "torch", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        availability("q_sample", "tpu", "cpu")


def test_doctor_lists_every_op_with_torch_available():
    env = {**os.environ, "TRITON_INTERPRET": "0", "INVNEXT_ATTN_ROPE": "inline"}
    env.pop("INVNEXT_CHECK_VALUES", None)
    out = subprocess.run([sys.executable, "-m", "invnext", "doctor"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for op in KERNELS_MD_OPS:
        row = next(line for line in lines if line.startswith(op + " "))
        assert row.split()[1] == "yes", row
    assert "why a backend is missing" in out.stdout
    assert "  INVNEXT_ATTN_ROPE=inline (set): attention RoPE" in out.stdout
    assert "  INVNEXT_CHECK_VALUES=0 (default)" in out.stdout
    if not torch.cuda.is_available():
        assert "need CUDA tensors" in out.stdout


def test_import_touches_no_gpu_or_triton():
    code = (
        "import sys, invnext, invnext.ops; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'invnext_kernels' not in sys.modules; "
        "import torch; assert not torch.cuda.is_initialized()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_auto_passes_over_an_implementation_that_declines_the_inputs(monkeypatch):
    calls = []

    def fast(x):
        calls.append("fast")
        return "fast"

    fast.unsupported = lambda x: "float64 not supported" if x.dtype == torch.float64 else None

    def reference(x):
        calls.append("torch")
        return "torch"

    monkeypatch.setattr(_dispatch, "_candidates", lambda op, device: iter([("triton", fast), ("torch", reference)]))
    assert _dispatch.dispatch("q_sample", "auto", "cuda", torch.zeros(1)) == "fast"
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="q_sample: backend='auto' on cuda runs the pure-PyTorch reference"):
        assert _dispatch.dispatch("q_sample", "auto", "cuda", torch.zeros(1, dtype=torch.float64)) == "torch"
    monkeypatch.setattr(_dispatch, "resolve", lambda op, backend, device: ("triton", fast))
    with pytest.raises(BackendUnavailableError, match="cannot run these inputs: float64 not supported"):
        _dispatch.dispatch("q_sample", "triton", "cuda", torch.zeros(1, dtype=torch.float64))
    assert calls == ["fast", "torch"]


# --------------------------------------------------------------------------- saying what runs (issue 18)


def test_dir_of_ops_lists_every_op():
    import invnext.ops as ops

    listed = dir(ops)
    missing = [name for name in [*_dispatch.ops(), *ops.__all__] if name not in listed]
    assert not missing, f"dir(invnext.ops) misses {missing}"
    assert {"explain", "token_coords", "masked_attention", "gather_visible"} <= set(listed)


def test_explain_on_cpu_names_the_reference_and_why_the_others_decline(monkeypatch):
    import invnext.ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 6, 4)
    hidden = torch.rand(2, 6) < 0.5
    report = ops.explain("gather_visible", x, hidden)
    assert report.op == "gather_visible" and report.chosen == "torch" and report.device == torch.device("cpu")
    assert report.verdicts["cuda"] == (False, "auto runs the reference for cpu tensors")
    assert not report.verdicts["triton"][0]
    text = str(report)
    assert text.startswith("invnext.ops.gather_visible on cpu: backend='auto' runs 'torch'")
    assert "cuda   declines: auto runs the reference for cpu tensors" in text
    assert "torch  runs: pure-PyTorch reference invnext.ops.tokens.gather_visible_reference" in text
    # The function itself works as the op argument; an explicit backend is reported with the verdict.
    again = ops.explain(ops.gather_visible, x, keep_ids=[[0, 1], [2]], backend="cuda")
    assert again.requested == "cuda" and "it raises BackendUnavailableError" in str(again)
    assert ops.explain("motion_mask", torch.randn(1, 2, 3, 4), 0.5).verdicts["triton"] == (
        False, "no triton implementation of this op exists")


def test_explain_runs_the_argument_checks_and_no_implementation(monkeypatch):
    import invnext.ops as ops

    called = []
    monkeypatch.setitem(_dispatch._REFERENCE, "tube_mask", lambda *a: called.append(a))
    ops.explain("tube_mask", 2, (1, 4, 4), [0.5, 0.25], seed=3)
    assert called == []
    with pytest.raises(ValueError, match=r"tube_mask: ratio\[1\] must lie in \[0, 1\)"):
        ops.explain("tube_mask", 2, (1, 4, 4), [0.5, 1.5], seed=3)
    with pytest.raises(ValueError, match="explain: op must be one of the dispatched ops"):
        ops.explain("mask_counts", torch.zeros(1, 2, dtype=torch.bool))
    assert _dispatch._capture is None
    ops.tube_mask(1, (1, 2, 2), 0.5, seed=0)  # dispatch runs normally afterwards
    assert len(called) == 1


def test_explain_sees_a_kernel_that_declines_on_a_gpu(monkeypatch):
    # A GPU faked from the device check alone: the Triton attention (under the interpreter) is
    # available but declines a head dim above its limit; auto then runs the reference.
    import invnext.ops as ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "_on_gpu", lambda dev: True)
    q = torch.randn(5, 1, 256)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    report = ops.explain(ops.masked_attention, q, q, q, cu, 5)
    assert report.chosen == "torch"
    ok, why = report.verdicts["triton"]
    assert not ok and why.startswith("declines these inputs:") and "256" in why
    small = ops.explain(ops.masked_attention, q[..., :64], q[..., :64], q[..., :64], cu, 5)
    assert small.chosen == "triton"


def test_auto_falling_back_to_the_reference_on_a_gpu_warns_once(monkeypatch):
    import warnings

    import invnext.ops as ops

    monkeypatch.setattr(_dispatch, "_on_gpu", lambda dev: True)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"invnext.ops.tube_mask: backend='auto' on cpu runs the pure-PyTorch "
                                            r"reference \(cuda: the CUDA kernels need CUDA tensors"):
        ops.tube_mask(2, (1, 4, 4), 0.5, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.tube_mask(2, (1, 4, 4), 0.5, seed=0)  # once per op
        ops.motion_mask(torch.randn(1, 2, 3, 4), 0.5)  # no accelerated backend: nothing to report
    monkeypatch.setattr(_dispatch, "_on_gpu", lambda dev: False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.tube_mask(2, (1, 4, 4), 0.5, seed=0)  # the CPU's reference is the plan, not a fallback
