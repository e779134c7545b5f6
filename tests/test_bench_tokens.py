"""The token benchmarks' wiring (bench_gather_visible, bench_scatter_tokens: benchmarks/cases_tokens.py),
dry-run on the CPU interpreter with a tiny case.

The benchmark needs a GPU for its numbers; this runs its agreement check and every timed
implementation of one case once (gather and scatter, forward and backward, the invnext
kernels, the public op and the eager formulations), and checks the rows it produces.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases_tokens as bg

pytestmark = pytest.mark.triton


def test_every_benchmark_function_runs(monkeypatch, triton_device, bench_wiring):
    ran = bench_wiring(bg, "_bench", "_bench_graph")
    monkeypatch.setattr(bg, "C", 16)
    B, grid = 3, (1, 2, 4)
    hidden = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1] * 8, [0] * 8], dtype=torch.bool)  # ragged, empty, full
    case = bg.Case("tiny", B, grid, hidden.to(triton_device))
    bg._check_agreement(case)
    rows = bg.bench_case(case, torch.bfloat16, True, 1000.0)
    kinds = {(r.bench, r.mode) for r in rows}
    assert {("gather_visible", "fwd"), ("gather_visible", "bwd"), ("scatter_tokens", "fwd"),
            ("scatter_tokens", "bwd")} <= kinds  # fmt: skip
    ours = [r for r in rows if r.impl.startswith("invnext-triton")]
    assert ours and all(r.speedup_vs_baseline is not None for r in ours)
    assert any(r.impl == "invnext-triton public op (mask given, num_visible)" for r in rows)
    assert len(ran) >= len(rows) // 2
    # every pass is measured beside a plain copy of its own byte count, and our rows say how close
    copies = [r for r in rows if r.impl == bg.SAME_BYTES_COPY]
    assert {(r.bench, r.mode) for r in copies} >= {(b, m) for b, m in kinds if not m.endswith("graph")}
    assert all(r.extra["of_same_bytes_copy"] == 1.0 for r in ours)
    # bench_scatter_tokens.py calls main("scatter_tokens"), which passes ("scatter_tokens",): its rows alone
    assert {r.bench for r in bg.bench_case(case, torch.bfloat16, True, 1000.0, ("scatter_tokens",))} == {"scatter_tokens"}
