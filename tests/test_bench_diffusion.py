"""The diffusion benchmarks' wiring (bench_q_sample, ..., bench_p_sample_loop, bench_decoder_train_step:
benchmarks/cases_diffusion.py), dry-run on the CPU interpreter with tiny shapes.

The benchmark needs a GPU for its numbers; this runs every function it has (element ops in
both dtypes, the paired / row-tile comparison, the decoder train step, the sampler, the tile
sweep) once per timed callable, so a GPU run does not find a wiring error, and checks the
rows they produce.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases_diffusion as bd

pytestmark = pytest.mark.triton


@pytest.fixture
def dry(monkeypatch, triton_device, bench_wiring):
    monkeypatch.setattr(bd, "DEVICE", str(triton_device))
    for name, value in {"ROWS": 5, "WIDTH": 32, "DEPTH": 1, "COND": 16, "SAMPLER_TOKENS": 3}.items():
        monkeypatch.setattr(bd, name, value)
    monkeypatch.setattr(bd, "SAMPLER_STEPS", (2,))
    return bench_wiring(bd, "_bench", "_time_calls")


def test_every_benchmark_function_runs(dry):
    assert dry == []
    rows = bd.bench_ops(torch.bfloat16, True, 1000.0) + bd.bench_ops(torch.float32, True, 1000.0)
    ops = {(r.bench, r.mode, r.dtype) for r in rows}
    assert {("q_sample", "fwd", "bfloat16"), ("diffusion_loss", "fwd+bwd", "float32"),
            ("p_sample_step", "step", "bfloat16"), ("adaln_modulate", "bwd", "float32")} <= ops  # fmt: skip
    # C = 588 in bf16 is 8 bytes off alignment every other row: the row-tile comparison is timed
    row_tiles = {r.bench for r in rows if r.impl == bd.ROW_TILES}
    assert row_tiles == {"q_sample", "p_sample_step"}
    assert all(r.dtype == "bfloat16" for r in rows if r.impl == bd.ROW_TILES)
    assert all(r.speedup_vs_baseline is not None for r in rows if r.impl.startswith("invnext"))

    step = bd.bench_train_step(True)
    assert [r.impl for r in step] == ["eager torch", "invnext fused (triton adaln + loss)"]
    sampler = bd.bench_sampler(True)
    assert len(sampler) == 3 and {r.mode for r in sampler} == {"2 steps"}
    sweep = bd.bench_sweep(True, 1000.0)
    assert len(sweep) == sum(len(v) for v in bd.SWEEP.values()) and not bd._kernels()[0].TUNE


def test_each_op_benchmark_times_its_op_alone(dry):
    # bench_<op>.py calls main(op), which passes (op,): only that op's rows
    for op in bd.ELEMENT_OPS:
        assert {r.bench for r in bd.bench_ops(torch.float32, True, 1000.0, (op,))} == {op}
    assert {r.bench for r in bd.bench_sweep(True, 1000.0, kinds=bd.SWEEP_KINDS["diffusion_loss"])} == {
        "diffusion_loss fwd", "diffusion_loss bwd"}  # fmt: skip
