"""``invnext doctor --selftest``: it runs every kernel available here against its reference and
reports a kernel that disagrees (CPU interpreter here)."""
from __future__ import annotations

import pytest

from invnext.cli import main
from invnext.ops import _dispatch
from invnext.selftest import run_selftest

pytestmark = pytest.mark.triton


def test_every_triton_kernel_agrees_with_its_reference(triton_device):
    if triton_device.type != "cpu":
        pytest.skip("on a GPU the GPU check runs `invnext doctor --selftest` itself")
    results = run_selftest("cpu")
    with_triton = {op for op in _dispatch.ops() if "triton" in _dispatch._ACCELERATED[op]}
    assert {r.op for r in results} == with_triton and {r.backend for r in results} == {"triton"}
    assert all(r.ok for r in results), [r for r in results if not r.ok]


def test_a_wrong_kernel_fails_and_sets_the_exit_status(monkeypatch, capsys, triton_device):
    if triton_device.type != "cpu":
        pytest.skip("interpreter check")
    real = _dispatch.resolve

    def broken(op, backend, device):
        name, impl = real(op, backend, device)
        if op == "gather_visible" and name == "triton":
            return name, lambda *a: impl(*a) + 1e-3  # one ulp-sized slip in a copy
        return name, impl

    monkeypatch.setattr(_dispatch, "resolve", broken)
    assert main(["doctor", "--device", "cpu", "--selftest"]) == 1
    out = capsys.readouterr().out
    assert "gather_visible    triton  FAIL  differs from the reference (must be identical)" in out
    assert "selftest: 10 ok, 1 failed" in out


def test_nothing_to_compare_without_a_kernel(monkeypatch, capsys):
    monkeypatch.setattr(_dispatch, "availability", lambda op, b, d: (b == "torch", "test"))
    assert main(["doctor", "--device", "cpu", "--selftest"]) == 0
    assert "no accelerated backend can run here" in capsys.readouterr().out
