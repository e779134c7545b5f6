"""Model-wide switches (ops backend, activation checkpointing), profiler regions, and the trainer keys
``ops_backend`` / ``grad_checkpointing`` / ``compile`` on the CPU."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from invnext import ops
from invnext.config import ConfigError
from invnext.nn import FusedOp
from invnext.models import Stage1Model, Stage2Model, set_grad_checkpointing, set_ops_backend, switches
from invnext.models.switches import op_backend
from invnext.ops import attention, diffusion, masks, tokens
from invnext.train.config import load_train_config
from invnext.train.loop import train_stage
from test_train import CPU, SMALL_SETS

# test_train's small model and run, with drop path on, so checkpointing must replay the RNG, two
# blocks per stack, and a shorter run.
SETS = [
    *SMALL_SETS,
    "model.overrides.encoder.drop_path=0.3",
    "model.overrides.predictor.depth=2",
    "stage1.model.overrides.decoder.depth=2",
    "data.synthetic_clips=8",
    "schedule.steps=2",
    "save_every=2",
    "keep_last=1",
]
# The compile run: one block per stack (dynamo's tracing time grows with every graph break of the
# CPU ops' value checks, about a minute per stack of blocks on a busy 2-core CPU).
MINI = [
    "model.overrides.encoder.depth=1",
    "model.overrides.predictor.depth=1",
    "stage1.model.overrides.decoder.depth=1",
    "stage1.model.overrides.teacher={depth: 1, layers: [0]}",
]
STAGE1_REGIONS = {"teacher", "masks", "encoder", "predictor", "decoder", "loss"}
STAGE2_REGIONS = {"teacher", "masks", "encoder", "predictor", "loss"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(stage: int, *extra: str) -> torch.nn.Module:
    cfg = load_train_config(stage, preset="tiny", sets=[*SETS, *extra]).model_config()
    torch.manual_seed(0)
    model = Stage1Model(cfg) if stage == 1 else Stage2Model(cfg)
    if stage == 1:  # the zero-initialised decoder outputs pass no gradient upstream: give them values
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for block in model.decoder.blocks:
                block.modulation[1].weight.copy_(0.05 * torch.randn(block.modulation[1].weight.shape, generator=g))
            for lin in (model.decoder.final.modulation[1], model.decoder.final.linear):
                lin.weight.copy_(0.05 * torch.randn(lin.weight.shape, generator=g))
    return model.train()


def _video(B: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, 2, 32, 32, generator=torch.Generator().manual_seed(seed))


def _step(model: torch.nn.Module, video: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward with the trainer's seeding (global RNG: drop path; generator: masks, noise)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(video, generator=torch.Generator().manual_seed(seed + 1))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def dispatch_log(monkeypatch) -> list[tuple[str, str]]:
    """Every ``(op, backend)`` the ops hand to the dispatcher."""
    calls: list[tuple[str, str]] = []
    for module in (attention, diffusion, masks, tokens):
        real = module.dispatch

        def record(op, backend, device, *args, _real=real):
            calls.append((op, backend))
            return _real(op, backend, device, *args)

        monkeypatch.setattr(module, "dispatch", record)
    return calls


# --------------------------------------------------------------------------- ops backend


def test_ops_backend_reaches_every_op_call(dispatch_log):
    s1 = set_ops_backend(_model(1), "torch")
    fused = [m for m in s1.modules() if isinstance(m, FusedOp)]
    assert fused and all(m.ops_backend == "torch" for m in fused)
    with torch.no_grad():
        s1(_video(2), generator=torch.Generator().manual_seed(0))
        s1.decoder.sample(torch.randn(3, 32), num_steps=2, generator=torch.Generator().manual_seed(0))
    s2 = set_ops_backend(_model(2), "torch")
    with torch.no_grad():
        s2(_video(2), generator=torch.Generator().manual_seed(0))
    seen = {op for op, _ in dispatch_log}
    assert seen >= {
        "masked_attention", "gather_visible", "scatter_tokens", "semantic_mask", "multiblock_mask",
        "q_sample", "diffusion_loss", "adaln_modulate", "p_sample_loop",
    }, seen  # fmt: skip
    assert {b for _, b in dispatch_log} == {"torch"}
    dispatch_log.clear()
    set_ops_backend(s1, "auto")
    with torch.no_grad():
        s1(_video(2), generator=torch.Generator().manual_seed(0))
    assert dispatch_log and {b for _, b in dispatch_log} == {"auto"}


def test_forced_backends_apply_where_an_implementation_exists():
    from invnext.ops import _dispatch

    without = {b: [op for op in _dispatch.ops() if b not in _dispatch._ACCELERATED[op]] for b in ("triton", "cuda")}
    for backend in ("triton", "cuda"):
        for op in _dispatch.ops():
            has = backend in _dispatch._ACCELERATED[op]
            assert op_backend(backend, op) == (backend if has else "auto"), (backend, op)
    assert without["triton"] and without["cuda"], "some op lacks each family: the fallback is exercised"
    for op in _dispatch.ops():
        assert op_backend("torch", op) == "torch" and op_backend("auto", op) == "auto"
    # "cuda" really reaches the ops that have a CUDA kernel, which cannot take CPU tensors
    model = set_ops_backend(_model(1), "cuda")
    need_cuda = r"backend 'cuda' is unavailable: the CUDA kernels need CUDA"
    with torch.no_grad(), pytest.raises(ops.BackendUnavailableError, match=need_cuda) as err:
        model(_video(2), generator=torch.Generator().manual_seed(0))
    failed = str(err.value).split(":")[0].removeprefix("invnext.ops.")
    assert "cuda" in _dispatch._ACCELERATED[failed], failed


def test_switches_reject_bad_arguments():
    model = _model(2)
    with pytest.raises(ValueError, match=r"set_ops_backend: backend must be one of .*got 'fast'"):
        set_ops_backend(model, "fast")
    with pytest.raises(TypeError, match=r"set_ops_backend: module must be a torch.nn.Module, got str"):
        set_ops_backend("model", "torch")
    with pytest.raises(TypeError, match=r"set_grad_checkpointing: enabled must be a bool, got int 1"):
        set_grad_checkpointing(model, 1)
    with pytest.raises(ValueError, match=r"TrainConfig\.ops_backend: must be one of .*got 'fast'"):
        load_train_config(1, preset="tiny", sets=["ops_backend=fast"])
    with pytest.raises(ConfigError, match=r"unknown key 'grad_checkpoint' .*'grad_checkpointing'"):
        load_train_config(1, preset="tiny", sets=["grad_checkpoint=true"])


# --------------------------------------------------------------------------- activation checkpointing


def _count_block_calls(model: torch.nn.Module) -> dict[str, int]:
    counts = {"encoder": 0, "predictor": 0, "decoder": 0}
    stacks = [("encoder", model.encoder.blocks), ("predictor", model.predictor.layers)]
    if isinstance(model, Stage1Model):
        stacks.append(("decoder", model.decoder.blocks))
    for name, blocks in stacks:
        for block in blocks:
            # a pre-hook: the recomputation stops early once it has what backward needs (no post-hook)
            block.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


@pytest.mark.parametrize("stage", [1, 2])
def test_grad_checkpointing_gives_identical_losses_and_grads(stage):
    plain = _model(stage)
    ckpt = set_grad_checkpointing(copy.deepcopy(plain), True)
    assert ckpt.encoder.grad_checkpointing and ckpt.predictor.grad_checkpointing
    assert not plain.encoder.grad_checkpointing
    calls_plain, calls_ckpt = _count_block_calls(plain), _count_block_calls(ckpt)
    video = _video()
    loss_a, grads_a = _step(plain, video, seed=3)
    loss_b, grads_b = _step(ckpt, video, seed=3)
    # each checkpointed block ran again in the backward pass (the plain model's blocks once)
    assert calls_plain["encoder"] > 0 and calls_ckpt == {k: 2 * v for k, v in calls_plain.items()}
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    # the recomputation replays the same kernels on the same inputs: bit-identical gradients
    assert all(torch.equal(grads_b[name], g) for name, g in grads_a.items())
    # drop path really draws from the RNG the checkpoint replays: another seed, another loss
    loss_c, _ = _step(plain, video, seed=4)
    assert not torch.equal(loss_a, loss_c)
    # not while evaluating or without grad
    for key in calls_ckpt:
        calls_ckpt[key] = calls_plain[key] = 0
    with torch.no_grad():
        ckpt(video, generator=torch.Generator().manual_seed(0))
        plain(video, generator=torch.Generator().manual_seed(0))
    assert calls_ckpt == calls_plain


# --------------------------------------------------------------------------- profiler regions


@pytest.mark.parametrize("stage, regions", [(1, STAGE1_REGIONS), (2, STAGE2_REGIONS)])
def test_profiler_regions(stage, regions):
    model = _model(stage)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(_video(2), generator=torch.Generator().manual_seed(0))
    names = {e.name for e in prof.events()}
    assert regions <= names, regions - names
    assert stage == 1 or "decoder" not in names


# --------------------------------------------------------------------------- the trainer keys


def _run(root: Path, stage: int, *extra: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses of every step and the final weights of a short CPU run."""
    cfg = load_train_config(stage, preset="tiny", sets=[*SETS, *extra])
    out = root / "run"
    train_stage(cfg, out, CPU)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return losses, load_file(out / "model.safetensors")


@pytest.mark.parametrize("stage", [1, 2])
def test_trainer_ops_backend_and_checkpointing_keys(stage, tmp_path, dispatch_log, monkeypatch):
    losses, weights = _run(tmp_path / "auto", stage)
    assert len(losses) == 2 and {b for _, b in dispatch_log} == {"auto"}
    dispatch_log.clear()
    torch_losses, torch_weights = _run(tmp_path / "torch", stage, "ops_backend=torch")
    assert {b for _, b in dispatch_log} == {"torch"}
    # On the CPU "auto" is the reference too: the same numbers, bit for bit.
    assert torch_losses == losses
    assert torch_weights.keys() == weights.keys() and all(torch.equal(torch_weights[k], v) for k, v in weights.items())

    checkpointed = []
    real = switches.checkpoint
    monkeypatch.setattr(switches, "checkpoint", lambda fn, *a, **kw: checkpointed.append(fn) or real(fn, *a, **kw))
    ckpt_losses, ckpt_weights = _run(tmp_path / "ckpt", stage, "grad_checkpointing=true")
    assert len(checkpointed) >= 2 * 2 * 2, "every block of every micro-batch was checkpointed"
    assert ckpt_losses == losses
    assert all(torch.equal(ckpt_weights[k], v) for k, v in weights.items())  # the same gradients, the same updates


@pytest.mark.slow
def test_trainer_compile_matches_eager(tmp_path, monkeypatch):
    """``compile: true`` captures the forward with torch.compile and trains like eager.

    Inductor's C++ code generation is what costs on this CPU (minutes for the tiny model), so
    the test hands the captured graphs to a counting backend that runs them as they are: what
    is checked is the wiring, dynamo's capture of the model (guards, recompiles for step 2)
    and the parameter names of the checkpoints. Inductor itself was run outside the suite (the
    tiny test config, 2 steps: ~12 minutes on a busy 2-core CPU, losses within 4e-7 relative).
    """
    graphs: list[torch.fx.GraphModule] = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=counting_backend))
    torch._dynamo.reset()
    try:
        losses, weights = _run(tmp_path / "compiled", 1, *MINI, "compile=true")
    finally:
        torch._dynamo.reset()
    assert len(graphs) > 3, "the forward was captured by torch.compile"
    eager_losses, eager_weights = _run(tmp_path / "eager", 1, *MINI)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-6)
    assert weights.keys() == eager_weights.keys() and not any("_orig_mod" in k for k in weights)
    for k, v in eager_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-6, msg=k)
