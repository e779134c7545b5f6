"""Data parallelism: two CPU processes under torchrun (gloo) reproduce one process at the same global batch.

Every micro-batch draws its random numbers from (seed, step, global micro-batch index), so two
ranks with one micro-batch each compute what one process computes with two accumulated ones.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import run_cli, write_configs  # the same tiny two-stage run

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _records(run: Path, stage: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_reproduce_one_process(tmp_path):
    """DDP (what the tiny / base presets use) and FSDP2 (large / 1b), each against one process."""
    cfgs = write_configs(tmp_path)  # global batch 4 of 2 clips per forward: 2 micro-batches per step
    single = tmp_path / "single"
    p = run_cli(["--stage", "both", *cfgs, "--out", str(single)])
    assert p.returncode == 0, p.stderr
    assert "2 per forward x 2 accumulation x 1 device(s)" in p.stdout
    w1 = load_file(single / "stage2" / "model.safetensors")
    for strategy in ("ddp", "fsdp"):
        multi = tmp_path / strategy
        p = run_cli(["--stage", "both", *cfgs, "--out", str(multi), "--set", f"strategy={strategy}"], launcher=TORCHRUN)
        assert p.returncode == 0, p.stderr + p.stdout
        assert "2 per forward x 1 accumulation x 2 device(s)" in p.stdout
        assert p.stdout.count("stage 1: 4 steps in") == 1, "only rank 0 reports"
        for stage in (1, 2):
            one, two = _records(single, stage), _records(multi, stage)
            assert [r["step"] for r in two] == [1, 2, 3, 4]
            for a, b in zip(one, two):
                terms = [k for k in a if k == "loss" or k.startswith("loss/")]
                assert len(terms) >= 3
                for k in terms:
                    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=0), (strategy, stage, a["step"], k)
                assert b["lr"] == a["lr"]
        w2 = load_file(multi / "stage2" / "model.safetensors")
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=f"{strategy} {k}")
