"""Checkpoints: no pickle, atomic writes, pruning, and an exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from invnext.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]

# One model block for both stages, so stage 2 always gets the encoder shape stage 1 saved.
_MODEL = """\
model:
  preset: tiny
  overrides:
    encoder: {depth: 2, num_frames: 2, img_size: 32, width: 32, heads: 2, pool_heads: 2}
    predictor: {depth: 1, width: 32, heads: 2, mlp_hidden: 32}
"""
_RUN = """\
data: {source: synthetic, workers: 0, synthetic_clips: 16}
schedule: {steps: 4, warmup_steps: 1}
batch: {global_size: 4, per_device: 2}
save_every: 2
log_every: 1
progress: false
tensorboard: false
threads: 1
"""
STAGE1 = "stage: 1\n" + _MODEL + """\
    decoder: {depth: 1, width: 32}
    teacher: {img_size: 32, depth: 2, layers: [0, 1], width: 16, heads: 1, pooled_dim: 16}
teacher: random
""" + _RUN
STAGE2 = "stage: 2\n" + _MODEL + """\
    views: [{num_blocks: 8}, {num_blocks: 2, spatial_scale: [0.7, 0.7]}]  # one token step: no future view
""" + _RUN


def write_configs(folder: Path) -> list[str]:
    (folder / "s1.yaml").write_text(STAGE1)
    (folder / "s2.yaml").write_text(STAGE2)
    return ["--config", str(folder / "s1.yaml"), "--config", str(folder / "s2.yaml")]


def run_cli(args: list[str], env_extra: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVNEXT_TEST_")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, *(launcher or []), "-m", "invnext", "pretrain", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)


def losses(run: Path, stage: int) -> dict[int, float]:
    lines = (run / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


# --------------------------------------------------------------------------- pieces


def test_optimizer_state_roundtrip_without_pickle():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
        groups = [{"params": [model[0].weight], "weight_decay": 0.05}, {"params": [model[0].bias, *model[1].parameters()], "weight_decay": 0.0}]
        return model, torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98))

    def step(model, opt, seed):
        model(torch.randn(7, 3, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        opt.step()
        opt.zero_grad()

    model, opt = build()
    step(model, opt, 1)
    osd = ckpt.named_optimizer_state(model, opt)
    tensors, index = ckpt.flatten_optimizer_state(osd)
    tensors = safetensors_load(safetensors_save(tensors))  # through the bytes, as on disk
    index = json.loads(json.dumps(index))  # the index is plain JSON
    assert set(tensors) == {f"state/{n}/{k}" for n in ("0.weight", "0.bias", "1.weight", "1.bias") for k in ("step", "exp_avg", "exp_avg_sq")}
    back = ckpt.unflatten_optimizer_state(tensors, index)
    assert back["param_groups"][0]["betas"] == (0.9, 0.98) and back["param_groups"][1]["params"] == ["0.bias", "1.weight", "1.bias"]
    model2, opt2 = build()
    model2.load_state_dict(model.state_dict())
    ckpt.load_named_optimizer_state(model2, opt2, back)
    step(model, opt, 2)
    step(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b), "a restored optimizer continues exactly"
    with pytest.raises(ValueError, match="missing"):
        ckpt.unflatten_optimizer_state({}, index)


def test_writer_is_atomic_and_keeps_last(tmp_path):
    root = tmp_path / "ck"
    crashes = []

    def crash(where):
        if crashes and crashes[0] == where:
            raise KeyboardInterrupt(where)  # stands in for a kill at that point

    w = ckpt.CheckpointWriter(root, keep_last=2, crash_hook=crash)
    model = {"w": torch.arange(6.0).view(2, 3)}
    optim = {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 3)}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    rng_t, rng_meta = ckpt.rng_state(0)

    def save(step):
        return w.commit(w.begin(step), step, model, optim, {"note": step}, rng_t, {"rank0": rng_meta})

    for step in (1, 2, 3):
        save(step)
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    for where in ("after_model", "before_rename"):
        crashes[:] = [where]
        with pytest.raises(KeyboardInterrupt):
            save(4)
        assert (root / f".tmp-step_00000004-{os.getpid()}").is_dir(), "the partial write stays in its temp folder"
        assert ckpt.latest_checkpoint(root).name == "step_00000003"
        assert (root / "latest").read_text().strip() == "step_00000003"
    crashes.clear()
    assert [p.name for p in ckpt.clean_partial(root)] == [f".tmp-step_00000004-{os.getpid()}"]
    got = ckpt.read_checkpoint(save(4))
    assert got["state"]["step"] == 4 and got["state"]["note"] == 4 and torch.equal(got["model"]["w"], model["w"])
    assert torch.equal(got["optim"]["state"]["w"]["exp_avg"], torch.ones(2, 3))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert ckpt.resolve_weights(root) == root / "step_00000004" / "model.safetensors"


def test_rng_state_roundtrip():
    import random

    import numpy as np

    tensors, meta = ckpt.rng_state(0)
    meta = json.loads(json.dumps(meta))
    a = (torch.rand(3), np.random.rand(), random.random())
    torch.rand(5), np.random.rand(4), random.random()
    assert ckpt.restore_rng_state(0, tensors, meta)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert not ckpt.restore_rng_state(1, tensors, meta)


# --------------------------------------------------------------------------- kill and resume


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfgs = write_configs(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_cli(["--stage", "both", *cfgs, "--out", str(ref)])
    assert done.returncode == 0, done.stderr

    # Killed in the middle of writing Stage 1's step-4 checkpoint (weights written, nothing else).
    p = run_cli(["--stage", "both", *cfgs, "--out", str(run)], {"INVNEXT_TEST_KILL_IN_SAVE": "1:4"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    root = run / "stage1" / "checkpoints"
    (partial,) = root.glob(".tmp-step_00000004-*")  # named after the killed writer's pid
    assert (partial / "model.safetensors").is_file() and not (partial / "state.json").exists()
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert ckpt.latest_checkpoint(root).name == "step_00000002"
    assert not (run / "stage1" / "model.safetensors").exists()

    # Resumed, then killed again after Stage 2's step 3 (its last checkpoint is step 2).
    p = run_cli(["--stage", "both", *cfgs, "--out", str(run), "--resume"], {"INVNEXT_TEST_KILL_AFTER_STEP": "2:3"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resuming from" in p.stdout and "removed 1 unfinished checkpoint write" in p.stdout
    assert not partial.exists()
    assert ckpt.latest_checkpoint(run / "stage2" / "checkpoints").name == "step_00000002"

    p = run_cli(["--stage", "both", *cfgs, "--out", str(run), "--resume"])
    assert p.returncode == 0, p.stderr
    assert "stage 1: already finished" in p.stdout and "stage 2: resuming from" in p.stdout
    for stage in (1, 2):
        want, got = losses(ref, stage), losses(run, stage)
        assert sorted(got) == [1, 2, 3, 4]
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (stage, step)
        assert (run / f"stage{stage}" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(ref / "stage2" / "checkpoints"))
    b = ckpt.read_checkpoint(ckpt.latest_checkpoint(run / "stage2" / "checkpoints"))
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-6, atol=1e-7)


def test_resume_refuses_changed_settings_and_existing_runs(tmp_path):
    from invnext.train.config import load_train_config
    from invnext.train.distributed import DistInfo
    from invnext.train.loop import RunExistsError, UsageError, train_stage

    write_configs(tmp_path)
    cpu = DistInfo(0, 1, 0, torch.device("cpu"), None)
    threads = torch.get_num_threads()
    try:
        cfg = load_train_config(1, tmp_path / "s1.yaml", sets=["schedule.steps=2"])
        train_stage(cfg, tmp_path / "run", cpu)
        changed = load_train_config(1, tmp_path / "s1.yaml", sets=["batch.per_device=4"])
        with pytest.raises(UsageError, match="different batch.per_device"):
            train_stage(changed, tmp_path / "run", cpu, resume=True)
        with pytest.raises(RunExistsError, match="pass --resume"):
            train_stage(cfg, tmp_path / "run", cpu)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- failures


def _cpu():
    from invnext.train.distributed import DistInfo

    return DistInfo(0, 1, 0, torch.device("cpu"), None)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_run_on_one_out_is_refused_and_never_touches_the_others_writes(tmp_path):
    from invnext.train.config import load_train_config
    from invnext.train.loop import train_stage

    write_configs(tmp_path)
    cfg = load_train_config(1, tmp_path / "s1.yaml", sets=["schedule.steps=2"])
    out = tmp_path / "run" / "stage1"
    threads = torch.get_num_threads()
    try:
        with ckpt.OutputLock(out):  # a live run holds the folder
            with pytest.raises(ckpt.OutputLockedError, match=rf"in use by another run \(pid and host: {os.getpid()} .*another --out"):
                train_stage(cfg, out, _cpu())
            with pytest.raises(ckpt.OutputLockedError):
                train_stage(cfg, out, _cpu(), resume=True)
        assert not (out / "checkpoints").exists()
        (out / ".lock").write_text(f"{_dead_pid()} somehost\n")  # left by a run that died
        train_stage(cfg, out, _cpu())
    finally:
        torch.set_num_threads(threads)
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000002"

    # Temp folders carry their writer's pid: a write never deletes a live writer's folder.
    root = out / "checkpoints"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs, dead = root / f".tmp-step_00000009-{live.pid}", root / f".tmp-step_00000009-{_dead_pid()}"
        theirs.mkdir()
        dead.mkdir()
        tmp = ckpt.CheckpointWriter(root, keep_last=2).begin(3)
        assert tmp.name == f".tmp-step_00000003-{os.getpid()}" and theirs.is_dir() and not dead.exists()
    finally:
        live.kill()
        live.wait()


def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path, capsys):
    from invnext.train.config import load_train_config
    from invnext.train.loop import UsageError, train_stage

    write_configs(tmp_path)
    cfg = load_train_config(1, tmp_path / "s1.yaml")  # 4 steps, checkpoints at 2 and 4
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        train_stage(cfg, out, _cpu())
        bad = out / "checkpoints" / "step_00000004" / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[:100])  # cut short, as by a full disk or a bad copy
        capsys.readouterr()
        res = train_stage(cfg, out, _cpu(), resume=True)
        text = capsys.readouterr().out
        assert f"{bad} is damaged" in text and "falling back" in text
        assert "resuming from" in text and "step_00000002 (step 2 of 4)" in text
        assert res.steps == 4 and ckpt.read_checkpoint(out / "checkpoints" / "step_00000004")["state"]["step"] == 4
        for step in (2, 4):  # every checkpoint damaged: a clear error naming the files, not a fresh start
            (out / "checkpoints" / f"step_{step:08d}" / "optim.safetensors").write_bytes(b"\0" * 8)
        with pytest.raises(UsageError, match=r"--resume: no checkpoint under .* can be read.*step_00000004/optim\.safetensors"):
            train_stage(cfg, out, _cpu(), resume=True)
    finally:
        torch.set_num_threads(threads)


def test_failed_write_removes_its_temp_folder(tmp_path):
    import errno

    def disk_full(where):
        if where == "after_model":
            raise OSError(errno.ENOSPC, "No space left on device")

    root = tmp_path / "ck"
    w = ckpt.CheckpointWriter(root, keep_last=2, crash_hook=disk_full)
    rng_t, rng_meta = ckpt.rng_state(0)
    optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    with pytest.raises(ckpt.CheckpointWriteError, match=r"step_00000001 .*No space left.*was removed"):
        w.commit(w.begin(1), 1, {"w": torch.ones(2)}, optim, {}, rng_t, {"rank0": rng_meta})
    assert list(root.iterdir()) == [] and ckpt.latest_checkpoint(root) is None
    w.crash_hook = lambda where: None  # a non-OSError failure (a state JSON cannot hold) cleans up too
    with pytest.raises(ValueError, match="Out of range float"):
        w.commit(w.begin(1), 1, {"w": torch.ones(2)}, optim, {"x": float("inf")}, rng_t, {"rank0": rng_meta})
    assert list(root.iterdir()) == []
