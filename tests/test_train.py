"""The trainer on the CPU: configs, optimizer rules, schedule, sharding, monitors, NaN handling, the default pipeline."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from invnext.cli import main
from invnext.config import ConfigError, get_preset
from invnext.models import Stage1Model, Stage2Model
from invnext.train.batches import StepSampler, micro_range, micro_seed
from invnext.train.config import load_train_config, parse_set, steps_for
from invnext.train.config_files import SHIPPED, check_config_files, render_config_file, write_config_files
from invnext.train.config_files import main as config_files_main
from invnext.train.distributed import DistInfo
from invnext.train.loop import FaultHooks, NonFiniteLossError, train_stage
from invnext.train.monitors import CollapseMonitor, collapse_stats
from invnext.train.optim import build_optimizer, lr_at, no_decay_names

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)

# A model small enough for a step in tens of milliseconds (head dims 16: the attention op's minimum).
SMALL_SETS = [
    "model.overrides.encoder={depth: 2, num_frames: 2, img_size: 32, width: 32, heads: 2, pool_heads: 2}",
    "model.overrides.predictor={depth: 1, width: 32, heads: 2, mlp_hidden: 32}",
    "stage1.model.overrides.decoder={depth: 1, width: 32}",
    "stage1.model.overrides.teacher={img_size: 32, depth: 2, layers: [0, 1], width: 16, heads: 1, pooled_dim: 16}",
    "stage1.teacher=random",
    "stage2.init=random",
    # the paper's multi-block views: the tiny preset's future views need more than this clip's one token step
    "stage2.model.overrides.views=[{num_blocks: 8}, {num_blocks: 2, spatial_scale: [0.7, 0.7]}]",
    "data={source: synthetic, workers: 0, synthetic_clips: 16}",
    "schedule={steps: 4, warmup_steps: 1}",
    "batch={global_size: 4, per_device: 2}",
    "save_every=1",
    "keep_last=5",
    "log_every=1",
    "progress=false",
    "tensorboard=false",
    "threads=1",
]


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- configs


def test_shipped_configs_are_the_presets():
    for stage in (1, 2):
        for preset in ("tiny", "base", "large"):
            from_file = load_train_config(stage, REPO / "configs" / f"stage{stage}_{preset}.yaml")
            assert from_file == load_train_config(stage, preset=preset), (stage, preset)


def test_shipped_configs_are_rendered_from_the_python_defaults(tmp_path):
    """configs/*.yaml are written from invnext/train/config.py; a value edited in one place only fails here."""
    stale = check_config_files(REPO / "configs")
    assert not stale, f"{stale} differ from the defaults: run python -m invnext.train.config_files"
    assert write_config_files(tmp_path) == [tmp_path / f"stage{s}_{p}.yaml" for s, p in SHIPPED]
    assert config_files_main(["--check", "--folder", str(tmp_path)]) == 0
    (tmp_path / "stage2_tiny.yaml").write_text(render_config_file(2, "tiny") + "# a hand edit\n")
    assert check_config_files(tmp_path) == [tmp_path / "stage2_tiny.yaml"]
    assert config_files_main(["--check", "--folder", str(tmp_path)]) == 1


def test_set_overrides_and_stage_prefix():
    sets = ["optim.lr=1e-4", "stage2.seed=7", "schedule.epochs=3", "model.overrides.encoder.drop_path=0.0"]
    c1, c2 = load_train_config(1, preset="tiny", sets=sets), load_train_config(2, preset="tiny", sets=sets)
    assert c1.optim.lr == 1e-4 and isinstance(c1.optim.lr, float)
    assert (c1.seed, c2.seed) == (0, 7)
    assert c1.schedule.steps is None and c1.schedule.epochs == 3.0  # epochs replaces the preset's steps
    assert c1.model_config().encoder.drop_path == 0.0
    assert steps_for(c1, 10) == (8, 8)  # ceil(3 epochs * 10 clips / 4 per step); warmup capped at the total
    assert steps_for(load_train_config(1, preset="base", sets=["batch.global_size=32"]), 100) == (157, 16)
    assert parse_set("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set("optim.lr")


_BAD = (ConfigError, TypeError, ValueError)


@pytest.mark.parametrize(
    "sets, error, match",
    [
        (["optim.lrr=1e-4"], _BAD, r"TrainConfig\.optim: unknown key 'lrr' for OptimConfig \(did you mean 'lr'\?\)"),
        (["model.overrides.encoder.widht=8"], _BAD,
         r"model\.overrides: Stage1Config\.encoder: unknown key 'widht'.*'width'"),
        (["batch.global_size=6"], _BAD, r"global_size: must be a multiple of per_device=4"),
        (["schedule.steps=ten"], _BAD, r"schedule\.steps: expected int"),
        (["optim.grad_clip=.inf"], ValueError, r"optim.*OptimConfig\.grad_clip: must be a finite number, got inf"),
        (["schedule.min_lr=.inf"], ValueError, r"ScheduleConfig\.min_lr: must be a finite number, got inf"),
        (["optim.lr=.inf"], ValueError, r"OptimConfig\.lr: must be a finite number, got inf"),
        (["schedule.epochs=.inf"], ValueError, r"ScheduleConfig\.epochs: must be a finite number"),
        (["optim.lr=1e-4", "schedule.min_lr=1e-3"], ValueError,
         r"schedule\.min_lr: must be <= optim\.lr=0\.0001.*got 0\.001"),
    ],
)
def test_bad_settings_name_the_key(sets, error, match):
    with pytest.raises(error, match=match):
        load_train_config(1, preset="tiny", sets=sets)


def test_misspelt_key_in_stage2_file_fails_before_any_training(tmp_path, capsys):
    s1 = tmp_path / "s1.yaml"
    s1.write_text("stage: 1\nmodel: {preset: tiny}\n")
    s2 = tmp_path / "s2.toml"
    s2.write_text('stage = 2\n[optim]\nlr = 1e-4\nweight_decy = 0.1\n')
    out = tmp_path / "run"
    rc = main(["pretrain", "--stage", "both", "--config", str(s1), "--config", str(s2), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown key 'weight_decy'" in err and "did you mean 'weight_decay'" in err and str(s2) in err
    assert not out.exists(), "nothing may run (not even Stage 1) when any stage's config is wrong"


def test_config_needs_its_stage(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {preset: tiny}\n")
    with pytest.raises(ConfigError, match="must say which stage"):
        load_train_config(1, f)


# --------------------------------------------------------------------------- optimizer and schedule


def test_weight_decay_exclusions_by_name_and_ndim():
    p = get_preset("tiny")
    m1 = Stage1Model(p.stage1)
    skip = no_decay_names(m1)
    for name, param in m1.named_parameters():
        if not param.requires_grad:
            assert name not in skip
        elif param.ndim < 2 or name in ("encoder.cls_tokens", "encoder.pos_embed.weight", "align_pos.weight", "predictor.pos_embed.weight"):
            assert name in skip, name
        else:
            assert name not in skip, name
    opt = build_optimizer(m1, load_train_config(1, preset="tiny").optim)
    decay = {id(q) for g in opt.param_groups if g["weight_decay"] > 0 for q in g["params"]}
    assert id(m1.encoder.blocks[0].attn.qkv.weight) in decay
    assert id(m1.encoder.blocks[0].ls1.gamma) not in decay and id(m1.predictor.mask_token) not in decay
    frozen = {id(q) for q in m1.parameters() if not q.requires_grad}
    assert frozen and not frozen & {id(q) for g in opt.param_groups for q in g["params"]}
    assert {g["group"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.05, "no_decay": 0.0}
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    m2 = Stage2Model(p.stage2)
    trained = {id(q) for g in build_optimizer(m2, load_train_config(2, preset="tiny").optim).param_groups for q in g["params"]}
    assert not any(id(q) in trained for q in m2.target.parameters()) and not any(id(q) in trained for q in m2.encoder.pool.parameters())


def test_lr_schedule_warmup_then_cosine():
    total, warmup, lr, lo = 11, 3, 1e-3, 1e-5
    got = [lr_at(s, total, warmup, lr, lo) for s in range(total)]
    assert got[:3] == pytest.approx([lr / 3, 2 * lr / 3, lr], rel=1e-12)
    for s in range(3, total):
        p = (s - 3) / 8
        assert got[s] == pytest.approx(lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)
    assert lr_at(total - 1, total, 0, lr, lo) > lo and lr_at(total, total, 0, lr, lo) == pytest.approx(lo)


# --------------------------------------------------------------------------- sharding


def test_global_batch_is_the_same_on_any_number_of_devices():
    L, G, m, steps = 7, 4, 1, 5  # 7 clips: epochs end mid-batch
    one = StepSampler(L, G, m, rank=0, accumulation=4, seed=3, start_step=0, total_steps=steps)
    single = list(one)
    for world in (2, 4):
        A = G // (m * world)
        ranks = [list(StepSampler(L, G, m, r, A, seed=3, start_step=0, total_steps=steps)) for r in range(world)]
        for s in range(steps):
            merged = [mb for r in range(world) for mb in ranks[r][s * A:(s + 1) * A]]
            assert merged == single[s * 4:(s + 1) * 4]
            assert [j for r in range(world) for j in micro_range(r, A)] == list(range(4))
    flat = [clip for mb in single for clip in mb]
    for e in range(2):  # every epoch visits every clip once, in its own order
        assert sorted(i for i, ep in flat if ep == e) == list(range(L))
    assert [i for i, e in flat if e == 0] != [i for i, e in flat if e == 1]
    resumed = list(StepSampler(L, G, m, 0, 4, seed=3, start_step=2, total_steps=steps))
    assert resumed == single[8:]
    assert micro_seed(0, 1, 2) != micro_seed(0, 2, 1) and micro_seed(0, 1, 2) == micro_seed(0, 1, 2)


# --------------------------------------------------------------------------- monitors


def _reference_stats(z: torch.Tensor) -> tuple[float, float]:
    zn = z.double() / z.double().norm(dim=1, keepdim=True)
    mean = zn.mean(0)
    std = ((zn - mean) ** 2).mean(0).sqrt().mean().item()
    gram = zn @ zn.T if zn.shape[0] <= zn.shape[1] else zn.T @ zn  # the smaller Gram matrix: no spurious zeros
    ev = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # its eigenvalues are the squared singular values
    p = ev[ev > 1e-12] / ev.sum()
    return std, math.exp(-(p * p.log()).sum().item())


def test_collapse_stats_against_float64_reference():
    g = torch.Generator().manual_seed(0)
    for shape in ((13, 7), (5, 31), (1, 4)):
        z = torch.randn(shape, generator=g)
        std, erank = collapse_stats(z)
        ref_std, ref_rank = _reference_stats(z)
        assert std == pytest.approx(ref_std, rel=1e-9) and erank == pytest.approx(ref_rank, rel=1e-9)
        assert 1.0 - 1e-9 <= erank <= min(shape) + 1e-9
    same = torch.randn(1, 9, generator=g).repeat(17, 1) * torch.rand(17, 1, generator=g)  # one direction, any scale
    std, erank = collapse_stats(same)
    assert std < 1e-7 and erank == pytest.approx(1.0, abs=1e-6)


def test_collapse_monitor_captures_the_training_pass_and_warns():
    torch.manual_seed(0)
    cfg = load_train_config(2, preset="tiny", sets=SMALL_SETS).model_config()
    model = Stage2Model(cfg).train()
    mon = CollapseMonitor(model.encoder, min_std=0.05, min_erank_frac=0.02)
    video = torch.randn(3, 3, 2, 32, 32)
    mon.arm()
    out = model(video, generator=torch.Generator().manual_seed(1))
    stats, msgs = mon.compute(out["hidden0"])
    assert set(stats) == {"token_std", "token_erank", "clip_std", "clip_erank"} and not msgs
    assert 1.0 <= stats["clip_erank"] <= 3.0 + 1e-9
    assert mon.compute(out["hidden0"]) == ({}, [])  # captured once per arm
    with torch.no_grad():
        for block in model.encoder.blocks:  # every block now outputs the same vector for every token
            block.ls1.gamma.zero_()
            block.ls2.gamma.zero_()
        model.encoder.patch_embed.proj.weight.zero_()
        model.encoder.pos_embed.weight.zero_()
        model.encoder.cls_tokens.zero_()
    mon.arm()
    out = model(video, generator=torch.Generator().manual_seed(1))
    stats, msgs = mon.compute(out["hidden0"])
    assert stats["token_std"] < 1e-6 and any("collapsing" in m for m in msgs)
    mon.close()


# --------------------------------------------------------------------------- non-finite steps


def test_nan_step_is_skipped_and_counted(tmp_path):
    cfg = load_train_config(1, preset="tiny", sets=SMALL_SETS)
    out = tmp_path / "s1"
    res = train_stage(cfg, out, CPU, hooks=FaultHooks(nan_steps=frozenset({(0, 2)})))
    rec = {r["step"]: r for r in _metrics(out / "metrics.jsonl")}
    assert rec[2]["skipped"] is True and rec[2]["loss"] is None and rec[2]["skipped_total"] == 1
    assert rec[1]["skipped"] is False and rec[3]["skipped"] is False and rec[4]["skipped_total"] == 1
    assert math.isfinite(rec[3]["loss"]) and res.summary["skipped"] == 1
    ck = out / "checkpoints"
    w1, w2, w3 = (load_file(ck / f"step_0000000{i}" / "model.safetensors") for i in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "a skipped step must not change the weights"
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)
    o1, o2 = (load_file(ck / f"step_0000000{i}" / "optim.safetensors") for i in (1, 2))
    assert all(torch.equal(o1[k], o2[k]) for k in o1), "nor the optimizer state"
    state = json.loads((ck / "step_00000004" / "state.json").read_text())
    assert state["skipped_total"] == 1 and state["consecutive_skipped"] == 0


def test_run_stops_after_too_many_nonfinite_steps(tmp_path):
    cfg = load_train_config(1, preset="tiny", sets=[*SMALL_SETS, "max_skipped_steps=1"])
    hooks = FaultHooks(nan_steps=frozenset({(1, 2), (1, 3)}))
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps \(up to step 3\).*max_skipped_steps=1.*lower optim\.lr"):
        train_stage(cfg, tmp_path / "s1", CPU, hooks=hooks)


# --------------------------------------------------------------------------- the default pipeline


def test_default_pipeline_both_stages_on_bundled_data(tmp_path, capsys, monkeypatch):
    """`invnext pretrain --stage both --preset tiny` on a small variant of the bundled dataset."""
    monkeypatch.setenv("INVNEXT_CACHE", str(tmp_path / "cache"))  # the evaluation's feature cache, and proof
    # that nothing reads the user's default dataset or teacher: the run uses its own variant
    out = tmp_path / "runs"
    args = [
        "pretrain", "--stage", "both", "--preset", "tiny", "--out", str(out),
        "--set", f"data.default_root={tmp_path / 'data'}", "--set", "data.default_clips=6",
        "--set", "data.default_teacher_steps=2", "--set", "data.workers=0", "--set", "schedule.steps=2",
        "--set", "schedule.warmup_steps=1", "--set", "batch={global_size: 2, per_device: 2}",
        "--set", "save_every=1", "--set", "log_every=1", "--set", "progress=false", "--set", "threads=1",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for stage in (1, 2):
        d = out / f"stage{stage}"
        assert f"stage {stage}: 2 steps in" in printed and str(d / "model.safetensors") in printed
        recs = _metrics(d / "metrics.jsonl")
        assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
        assert "collapse/token_erank" in recs[0] and recs[0]["clips_per_s"] > 0
        assert (d / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step_00000001", "step_00000002"]
        assert (d / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        summary = json.loads((d / "summary.json").read_text())
        assert summary["finished"] and summary["steps"] == 2 and summary["final_losses"]["loss"] > 0
    assert "loss/diffusion" in _metrics(out / "stage1" / "metrics.jsonl")[0]
    views = [k for k in _metrics(out / "stage2" / "metrics.jsonl")[0] if k.startswith("loss/view")]
    assert views == [f"loss/view{i}" for i in range(len(get_preset("tiny").stage2.views))]
    assert f"results in {out}" in printed
    # Stage 2 started from Stage 1's final encoder: its frozen target equals it.
    s1, s2 = load_file(out / "stage1" / "model.safetensors"), load_file(out / "stage2" / "model.safetensors")
    assert torch.equal(s2["target.blocks.0.attn.qkv.weight"], s1["encoder.blocks.0.attn.qkv.weight"])
    assert not any(k.startswith("teacher.") for k in s1), "the frozen teacher stays out of checkpoints"
    from invnext.loading import load_encoder

    enc = load_encoder(out / "stage2" / "model.safetensors")
    assert enc.cfg == get_preset("tiny").stage2.encoder
    # The run ends with the evaluation table (four feature sources x two labels) and a reconstruction.
    table = json.loads((out / "eval" / "table.json").read_text())
    assert [r["name"] for r in table["rows"]] == [
        "random encoder", "image teacher, frames averaged", "Stage 1 encoder", "Stage 2 encoder"
    ]
    assert all(0.0 <= r[k] <= 1.0 for r in table["rows"] for k in ("appearance", "dynamics"))
    assert "| Stage 2 encoder |" in printed and (out / "eval" / "table.md").is_file()
    assert (out / "eval" / "reconstruction.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "cache" / "default_data").exists()
    assert main(["data", "check", str(tmp_path / "data" / "val.csv")]) == 0  # the bundled clips all decode
    # `invnext evaluate` redoes the table with other probe settings, and --curve probes the Stage-1
    # start (step 0) and each kept Stage-2 checkpoint with those settings.
    ev = tmp_path / "ev"
    evaluate = ["evaluate", str(out), "--data-root", str(tmp_path / "data"), "--lr", "3e-3", "--out", str(ev)]
    from invnext.eval import probe as probe_module

    trained, real_run_probe = [], probe_module.run_probe
    monkeypatch.setattr(probe_module, "run_probe", lambda *a, **k: trained.append(a[0]) or real_run_probe(*a, **k))
    assert main([*evaluate, "--curve"]) == 0
    # 4 rows x 2 protocols for the table, then only the checkpoint the table did not already probe
    assert len(trained) == 8 + 1
    again = json.loads((ev / "table.json").read_text())
    assert [r["name"] for r in again["rows"]][2:] == ["Stage 1 encoder", "Stage 2 encoder"]
    assert again["probe"]["attentive"]["lr"] == 3e-3 and table["probe"]["attentive"]["lr"] == 1e-3
    curve = json.loads((ev / "curve.json").read_text())
    assert [p["step"] for p in curve["points"]] == [0, 1, 2] and curve["probe"]["lr"] == 3e-3
    assert [p["reused"] for p in curve["points"]] == [True, False, True]  # Stage-1 start, final Stage-2 weights
    for p in curve["points"]:
        assert p["val_clips"] > 0 and math.isclose(p["dynamics_se"], math.sqrt(p["dynamics"] * (1 - p["dynamics"]) / p["val_clips"]))
    start = next(r for r in again["rows"] if r["name"] == "Stage 1 encoder")
    assert curve["points"][0]["dynamics"] == start["dynamics"]
    final = next(r for r in again["rows"] if r["name"] == "Stage 2 encoder")
    assert curve["points"][2]["dynamics"] == final["dynamics"]
    assert set(curve["baselines"]) == {"random encoder", "image teacher, frames averaged"}
    assert (ev / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", str(tmp_path / "no_run")]) == 2
    assert "RUN " in capsys.readouterr().err
    # Without --resume the same folder is refused; with it, finished stages are skipped.
    assert main(args) == 1
    assert main([*args, "--resume", "--eval", "off"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_data_check_command(tmp_path, capsys):
    folder = tmp_path / "videos"
    folder.mkdir()
    (folder / "broken.mp4").write_bytes(b"not a video")
    assert main(["data", "check", str(folder)]) == 1
    assert "BAD" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "missing.csv")]) == 2


def test_divergence_stops_through_max_skipped_steps_not_a_monitor_crash(tmp_path):
    # lr=1e30 blows the weights up at step 1; the collapse monitor then saw non-finite features and
    # its SVD raised before the finite check, so max_skipped_steps never acted and nothing was saved.
    assert all(math.isnan(v) for v in collapse_stats(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])))
    cfg = load_train_config(1, preset="tiny", sets=[*SMALL_SETS, "optim.lr=1e30", "schedule.warmup_steps=0",
                                                    "schedule.min_lr=0", "max_skipped_steps=1"])
    with pytest.raises(NonFiniteLossError, match=r"consecutive steps.*max_skipped_steps=1.*last good checkpoint"):
        train_stage(cfg, tmp_path / "s1", CPU)
    assert (tmp_path / "s1" / "checkpoints" / "step_00000001" / "model.safetensors").is_file()
