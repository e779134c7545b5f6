"""The benchmark suite's harness (benchmarks/run.py, bench_step.py, report.py) and the analytic FLOP count.

The FLOP count (invnext/train/flops.py) is checked against torch's FlopCounterMode on a real
tiny training step (forward and backward). FlopCounterMode counts matmul-family aten ops
(mm, addmm, bmm, convolution, and the fused SDPA kernels of CUDA only), so the step runs with
``F.scaled_dot_product_attention`` replaced by its two explicit matmuls, and with the
predictor's local window widened past the sequence (a dense SDPA over a masked window does
the full square of work; the window arithmetic is checked separately against the op's own
dense mask). The one term FlopCounterMode cannot see is the encoder's attention pool, which
the model writes as elementwise products and sums (one query per sample: ``4 R W``); with
it subtracted the counts agree exactly.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import Row
from benchmarks.run import Entry, run_suite
from invnext.config import get_preset, override
from invnext.ops.attention import dense_attention_mask
from invnext.train.flops import mfu, stage1_step_flops, stage2_step_flops, window_pairs, window_pairs_1d


def _explicit_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    s = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return torch.matmul(torch.softmax(s, dim=-1), v)


# The tiny preset, shallower (the count's structure is per block, so depth only multiplies it):
# 2 encoder blocks aligned with 2 teacher blocks, 3 predictor layers (layer 0 global, 1-2 local),
# 1 decoder block; and the predictor's local window past its 196 tokens (module docstring).
# a window wider than the clip: the counted (explicit, dense) attention is exact
SMALL = {"encoder": {"depth": 2}, "predictor": {"depth": 3, "local_window": 1024, "local_window_3d": None}}
SMALL1 = {**SMALL, "decoder": {"depth": 1}, "teacher": {"depth": 2, "layers": [0, 1]}}
# The paper's two multi-block views (the tiny preset's Stage 2 has one future view): counts per view vary
PAPER_VIEWS = {"views": [{"num_blocks": 8}, {"num_blocks": 2, "spatial_scale": [0.7, 0.7]}]}


def _counted_step(model, video, **kwargs) -> int:
    with FlopCounterMode(display=False) as counter:
        model(video, **kwargs)["loss"].backward()
    return counter.get_total_flops()


@pytest.fixture
def explicit_attention(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", _explicit_sdpa)


def _video(model, batch):
    enc = model.encoder.cfg
    frames = torch.randint(0, 256, (batch, enc.num_frames, enc.img_size, enc.img_size, 3), dtype=torch.uint8)
    return model.encoder.preprocess(frames)


def test_stage1_flops_match_flop_counter(explicit_attention):
    from invnext.models import Stage1Model

    cfg = override(get_preset("tiny").stage1, SMALL1)
    model = Stage1Model(cfg).train()
    B = 2
    counted = _counted_step(model, _video(model, B))
    ours = stage1_step_flops(cfg, B)
    pool_f, pool_b = ours.terms["encoder/pool.attention"]
    R = B * (cfg.encoder.num_class_tokens + 4 * 10)  # 10 of 49 tokens kept per frame at ratio 0.8
    assert pool_f == 4 * R * cfg.encoder.width and pool_b == 2 * pool_f
    assert counted == ours.total - pool_f - pool_b
    # The frozen teacher has no backward; the decoder's first Linears have weight gradients only.
    assert all(b == 0 for k, (_, b) in ours.terms.items() if k.startswith("teacher/"))
    f, b = ours.terms["decoder/input_proj"]
    assert b == f


def test_stage2_flops_match_flop_counter(explicit_attention):
    from invnext.models import Stage2Model

    cfg = override(get_preset("tiny").stage2, {**SMALL, **PAPER_VIEWS})
    model = Stage2Model(cfg).train()
    B, N = 2, 196
    gen = torch.Generator().manual_seed(3)
    masks = []
    for count in (151, 37):  # one count per view, the same for every sample (no padding in any attention path)
        hidden = torch.zeros(B, N, dtype=torch.bool)
        for b in range(B):
            hidden[b, torch.randperm(N, generator=gen)[:count]] = True
        masks.append(hidden)
    counted = _counted_step(model, _video(model, B), masks=masks)
    ours = stage2_step_flops(cfg, [m.sum(1).tolist() for m in masks])
    assert counted == ours.total
    assert ours.by_component()["decoder"] == 0
    assert all(b == 0 for k, (_, b) in ours.terms.items() if k.startswith("teacher/"))


@pytest.mark.parametrize("n", [1, 7, 113])
@pytest.mark.parametrize("w", [1, 2, 5, 32, 300])
def test_window_pairs_1d_match_dense_mask(n, w):
    cu = torch.tensor([0, n], dtype=torch.int32)
    assert window_pairs(n, w) == int(dense_attention_mask(cu, n, window=w).sum())
    assert window_pairs_1d(n, None) == n * n


@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 7, 5), (4, 7, 7)])
@pytest.mark.parametrize("window", [(1, 1, 1), (2, 3, 4), (4, 8, 8), (9, 9, 9)])
def test_window_pairs_3d_match_dense_mask(grid, window):
    T, H, W = grid
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    coords = torch.stack([t.flatten(), h.flatten(), w.flatten()], 1).to(torch.int32)
    n = T * H * W
    cu = torch.tensor([0, n], dtype=torch.int32)
    assert window_pairs(grid, window) == int(dense_attention_mask(cu, n, coords, window).sum())


def test_stage2_flops_ragged_batch_is_the_sum_of_its_samples():
    # Every term is a sum over samples (attention over each sample's own length squared, not
    # the batch's longest), except the mask token's embedding: one row per predictor call.
    cfg = override(get_preset("tiny").stage2, PAPER_VIEWS)
    both = stage2_step_flops(cfg, [[150, 90], [180, 20]])
    one = stage2_step_flops(cfg, [[150], [180]])
    two = stage2_step_flops(cfg, [[90], [20]])
    mask_row = 3 * 2 * (96 * 128 + 128 * 128)  # embed MLP on one row, forward + backward, per view
    assert both.total == one.total + two.total - 2 * mask_row


def test_flops_validation():
    cfg2 = override(get_preset("tiny").stage2, PAPER_VIEWS)
    with pytest.raises(ValueError, match="2 views"):
        stage2_step_flops(cfg2, [[10, 10]])
    with pytest.raises(ValueError, match="grid tokens"):
        stage2_step_flops(cfg2, [[10], [197]])
    with pytest.raises(ValueError, match="batch_size"):
        stage1_step_flops(get_preset("tiny").stage1, 0)
    with pytest.raises(TypeError, match="batch_size"):
        stage1_step_flops(get_preset("tiny").stage1, 2.0)


def test_mfu():
    assert mfu(3e15, 4.0, 1e15) == pytest.approx(0.75, rel=0, abs=1e-15)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1e15)
    with pytest.raises(ValueError, match="peak_flops"):
        mfu(1.0, 1.0, -1.0)
    with pytest.raises(TypeError, match="flops"):
        mfu(True, 1.0, 1.0)


def test_breakdown_attributes_backward_to_regions():
    from torch.profiler import ProfilerActivity, profile, record_function

    from benchmarks.bench_step import attribute_events

    torch.manual_seed(0)
    frozen, enc, head = torch.nn.Linear(16, 16), torch.nn.Linear(16, 64), torch.nn.Linear(64, 1)
    frozen.requires_grad_(False)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()])
    x = torch.randn(256, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("teacher"), torch.no_grad():
            t = frozen(x)
        with record_function("encoder"):
            h = torch.relu(enc(x + t))
        with record_function("loss"):
            loss = head(h).square().mean()
        loss.backward()
        with record_function("optimizer"):
            opt.step()
    per = attribute_events(prof.events(), use_device_time=False)
    assert per["teacher"].get("fwd", 0) > 0 and per["teacher"].get("bwd", 0) == 0
    assert per["encoder"]["fwd"] > 0 and per["encoder"]["bwd"] > 0
    assert per["loss"]["fwd"] > 0 and per["loss"]["bwd"] > 0
    assert per["optimizer"]["opt"] > 0
    total = sum(e.self_cpu_time_total for e in prof.events())
    assert sum(sum(p.values()) for p in per.values()) == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("fits_up_to", [0, 1, 5, 16, 37, 100, 1024])
@pytest.mark.parametrize("start", [1, 16])
def test_find_max_batch_bisects_to_the_largest_fitting_batch(fits_up_to, start):
    from benchmarks.bench_step import find_max_batch

    tried, cleaned = [], []

    class Fake:
        device = torch.device("cpu")

        def __init__(self, b):
            self.b = b

        def step(self):
            tried.append(self.b)
            if self.b > fits_up_to:
                raise torch.cuda.OutOfMemoryError("fake: out of memory")

    assert find_max_batch(Fake, start, limit=100, cleanup=lambda: cleaned.append(1)) == min(fits_up_to, 100)
    assert len(cleaned) == len(tried) and len(tried) == len(set(tried)) and len(tried) <= 16


ROW_FIELDS = {f.name for f in fields(Row)}


def _load_rows(path):
    data = json.loads(path.read_text())
    assert set(data["meta"]) >= {"gpu", "date", "torch", "peaks", "notes"}
    for r in data["rows"]:
        assert set(r) == ROW_FIELDS
        assert isinstance(r["ms_median"], float) and math.isfinite(r["ms_median"]) and r["ms_median"] >= 0
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
    return data["rows"]


def test_suite_runs_step_benchmark_and_writes_report(tmp_path):
    step = Entry("step", "benchmarks.bench_step", "any", (300, 300), max_seconds=True,
                 args=("--presets", "tiny", "--stages", "1", "--compile", "off", "--batch", "1", "--warmup", "1",
                       "--steps", "1", "--profile-steps", "1"))
    statuses, report = run_suite([step], quick=True, out=tmp_path)
    assert [(s.name, s.status) for s in statuses] == [("step", "ok")], (tmp_path / "run_step.log").read_text()[-3000:]
    files = sorted(tmp_path.glob("bench_step_*.json"))
    assert len(files) == 1 and files[0].name in statuses[0].files
    rows = _load_rows(files[0])
    gpu = torch.cuda.is_available()
    steps = [r for r in rows if r["bench"] == "train_step"]
    assert {(r["extra"]["stage"], r["extra"]["preset"], r["extra"]["batch"]) for r in steps} == {(1, "tiny", 1)}
    cfg = get_preset("tiny").stage1
    for r in steps:
        e = r["extra"]
        assert r["unit"] == "clips/s" and r["throughput"] == pytest.approx(1 / (r["ms_median"] / 1e3))
        assert e["tokens_per_s"] == pytest.approx(r["throughput"] * 4 * 7 * 7)
        assert e["flops_per_step"] == stage1_step_flops(cfg, 1).total and e["steps_timed"] == 1
        assert e["ops_backend"] == "torch" and e["teacher_ops_backend"] == "auto"  # the teacher: same in every path
        if gpu:
            assert 0 < e["mfu"] < 1 and e["peak_mem_gib"] > 0
        else:
            assert e["mfu"] is None and r["frac_of_peak"] is None and e["peak_mem_gib"] is None
    bd = {r["mode"]: r for r in rows if r["bench"] == "train_step_breakdown" and r["impl"].startswith("torch")}
    assert {"teacher", "masks", "encoder", "predictor", "decoder", "loss", "optimizer", "other"} <= set(bd)
    assert bd["teacher"]["extra"]["bwd_ms"] == 0  # frozen: no backward
    for region in ("encoder", "predictor", "decoder", "loss"):
        assert bd[region]["extra"]["fwd_ms"] > 0 and bd[region]["extra"]["bwd_ms"] > 0, region
    assert bd["optimizer"]["extra"]["opt_ms"] > 0
    assert sum(r["extra"]["fraction"] for r in bd.values()) == pytest.approx(1.0)
    assert report is not None and report.is_file()
    text = report.read_text()
    assert "## End-to-end training step" in text and "| step | ok |" in text
    assert "| stage1 tiny B=1 (4x7x7 grid) | torch (ops_backend=torch) |" in text  # the breakdown table
    assert (tmp_path / report.name.replace(".md", "_breakdown.png")).stat().st_size > 0


def test_stage2_runner_same_masks_every_path_and_exact_flops():
    from benchmarks.bench_step import StepRunner, build_model
    from invnext.models.stage2 import step_mask
    from invnext.models.switches import set_ops_backend

    dev = torch.device("cpu")
    model, cfg = build_model(2, "tiny", dev)
    set_ops_backend(model, "torch")
    a = StepRunner(model, cfg, 2, 2, dev)
    set_ops_backend(model, "auto")
    b = StepRunner(model, cfg, 2, 2, dev)
    assert len(a.masks) == len(cfg.views) and all(torch.equal(x[0], y[0]) for x, y in zip(a.masks, b.masks))
    assert all(torch.equal(m.sum(1), n) for m, n in a.masks)  # the host counts are the masks'
    # the preset's first view hides whole token steps of every clip
    view = cfg.views[0]
    assert torch.equal(a.masks[0][0], step_mask(2, cfg.encoder.grid, view.hide_first, view.hide_last, "cpu")[0])
    assert a.flops().total == stage2_step_flops(cfg, [m.sum(1).tolist() for m, _ in a.masks]).total


def test_failing_module_is_reported_and_suite_goes_on(tmp_path, monkeypatch):
    pkg = tmp_path / "mods"
    pkg.mkdir()
    (pkg / "bench_boom.py").write_text("raise RuntimeError('boom: this benchmark is broken')\n")
    (pkg / "bench_hang.py").write_text("import time\ntime.sleep(60)\n")
    (pkg / "bench_fine.py").write_text(textwrap.dedent("""
        from benchmarks.common import Row, write_results
        write_results("fine", [Row("fine_op", "invnext", "fwd", "s", "bf16", 1.0, 0.9, 1.1,
                                   baseline="eager", speedup_vs_baseline=2.0)])
        print("fine done")
    """))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", str(pkg))
    registry = [
        Entry("boom", "bench_boom", "any", (60, 60)),
        Entry("missing", "bench_not_written_yet", "any", (60, 60)),
        Entry("hang", "bench_hang", "any", (1, 1)),
        Entry("fine", "bench_fine", "any", (120, 120)),
    ]
    statuses, report = run_suite(registry, quick=True, out=tmp_path / "out")
    got = {s.name: s for s in statuses}
    assert [s.name for s in statuses] == ["boom", "missing", "hang", "fine"]
    assert got["boom"].status == "failed" and "boom: this benchmark is broken" in got["boom"].detail
    assert got["missing"].status == "skipped" and "bench_not_written_yet.py not found" in got["missing"].detail
    assert got["hang"].status == "timed out"
    assert got["fine"].status == "ok", (tmp_path / "out" / "run_fine.log").read_text()
    assert any(f.startswith("fine_") for f in got["fine"].files)
    text = report.read_text()
    assert "| boom | failed |" in text and "| hang | timed out |" in text and "| missing | skipped |" in text
    assert "| fine_op | fwd | s | invnext | bf16 | 1.0000 |" in text and "2.00x" in text


def test_unknown_name_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        run_suite(quick=True, out=tmp_path, only=["nope"], render=False)


def test_cpu_micro_benchmarks_not_collected_by_default():
    from pathlib import Path

    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    assert cfg["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]  # benchmarks/test_cpu_micro.py stays out


def test_bench_masks_cases_run_on_the_reference():
    """Every case of the mask benchmarks (benchmarks/cases_masks.py) builds and its reference call
    runs (on the CPU here), so a GPU run does not discover a wiring error; the Stage-2 batch returns
    the host counts training uses."""
    from benchmarks.cases_masks import _cases, _same

    cpu = torch.device("cpu")
    cases = _cases([torch.float32], cpu)
    assert {c.op for c in cases} == {"tube_mask", "semantic_mask", "multiblock_mask"}
    for case in cases:
        out = case.call("torch", cpu)
        masks = out if isinstance(out, tuple) else (out,)
        if case.name.startswith("stage2 batch"):
            assert len(masks) == 2 and all(torch.equal(h.sum(1), n) for h, n in masks)
            masks = tuple(h for h, _ in masks)
        assert all(m.dtype == torch.bool and m.shape == (case.B, case.tokens // case.views // case.B) for m in masks)
        assert _same(out, case.call("torch", cpu)), case.name  # seeded
        assert (case.device_share is not None) == (case.op == "multiblock_mask"), case.name


GPU_BENCHMARKS = [
    "bench_masked_attention", "bench_varlen_attention", "bench_gather_visible", "bench_scatter_tokens", "bench_q_sample", "bench_diffusion_loss",
    "bench_p_sample_step", "bench_adaln_modulate", "bench_p_sample_loop", "bench_decoder_train_step",
    "bench_tube_mask", "bench_semantic_mask", "bench_multiblock_mask",
]  # fmt: skip


def test_every_gpu_benchmark_is_named_by_what_it_times():
    # One module per op (and the decoder step): the suite's name, the file and the op main() times agree.
    from benchmarks.run import REGISTRY

    root = Path(__file__).resolve().parent.parent
    gpu = [e for e in REGISTRY if e.where == "gpu"]
    assert [e.name for e in gpu] == [e.target.removeprefix("benchmarks.bench_") for e in gpu]
    for e in gpu:
        if e.name not in ("masked_attention", "varlen_attention"):  # standalone, no shared case module
            assert f'main("{e.name}")' in (root / "benchmarks" / f"bench_{e.name}.py").read_text(), e.name
    assert sorted(p.stem for p in (root / "benchmarks").glob("bench_*.py")) == sorted(["bench_step", *GPU_BENCHMARKS])


@pytest.mark.parametrize("script", GPU_BENCHMARKS)
def test_gpu_benchmarks_run_by_path_and_say_they_need_a_gpu(script):
    # The issue names them as files (`benchmarks/bench_masked_attention.py`), so a user runs them by
    # path from the repo root: that must import and exit cleanly on a CPU, not die on `benchmarks`.
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr
    assert "needs a CUDA GPU" in res.stdout + res.stderr


def test_run_shapes_writes_after_each_shape_and_stops_at_the_time_limit(tmp_path, monkeypatch, capsys):
    """The attention benchmarks' shared loop: results are written after every shape (a crash
    keeps the earlier rows), and no shape starts once --max-seconds has passed."""
    from types import SimpleNamespace

    from benchmarks.common import RESULTS_ENV, Row, run_shapes

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    seen = []

    def run_one(p, rows, notes):
        seen.append(p.label)
        rows.append(Row("loop", "invnext", "fwd", p.label, "bf16", 1.0, 0.9, 1.1))
        if p.label == "b":
            time.sleep(0.05)

    shapes = [SimpleNamespace(label=x) for x in "abc"]
    path = run_shapes("loop", shapes, run_one, max_seconds=0.01)
    assert seen == ["a", "b"]
    saved = json.loads(path.read_text())
    assert [r["shape"] for r in saved["rows"]] == ["a", "b"] and "stopped before c" in saved["meta"]["notes"]
    assert f"wrote {path}" in capsys.readouterr().out
    assert run_shapes("loop", [], run_one) is None
