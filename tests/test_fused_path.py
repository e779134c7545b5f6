"""The fused path end to end: tiny Stage-1 and Stage-2 models with every op on its Triton
kernel (``ops_backend="triton"``, the CPU interpreter here, the GPU in the GPU check) give the
plain-PyTorch path's loss and gradients in fp32, and under bf16 autocast (as the GPU trainer
runs) stay within 3x the plain path's bf16 error against fp32.

The kernels are tested one by one elsewhere; this checks what only the models exercise: the
layouts they hand the kernels (views of a packed qkv, the predictor's windowed local layers and
their cached tile lists, the encoder's prefix tokens, the decoder's strided AdaLN modulation) and
that every gradient still reaches every parameter.
"""
from __future__ import annotations

import pytest
import torch
from test_model_switches import _model, _step, _video, dispatch_log  # noqa: F401 - a fixture

from invnext.models import set_ops_backend

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_torch_thread")]

FUSED = {"masked_attention", "gather_visible", "scatter_tokens"}
FUSED_STAGE1 = FUSED | {"q_sample", "diffusion_loss", "adaln_modulate"}


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_path_matches_plain_pytorch(stage, dispatch_log, triton_device):  # noqa: F811
    if triton_device.type != "cpu":
        pytest.skip("the GPU runs this path in the step benchmark")
    model, video = _model(stage), _video(2)
    set_ops_backend(model, "torch")
    loss_ref, grads_ref = _step(model, video, seed=5)
    dispatch_log.clear()
    set_ops_backend(model, "triton")
    loss, grads = _step(model, video, seed=5)
    assert {op for op, backend in dispatch_log if backend == "triton"} == (FUSED_STAGE1 if stage == 1 else FUSED)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert set(grads) == set(grads_ref)
    scale = max(g.abs().max() for g in grads_ref.values())
    for name, g in grads.items():
        # fp32 kernels against fp32 torch: agreement to float32 noise of the largest gradient
        # (some gradients are exactly 0 in exact arithmetic, e.g. a key bias under softmax)
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-6 * float(scale), msg=name)


def _autocast_step(model, video, seed):
    """``_step`` under bf16 autocast, as the GPU trainer and step benchmark run."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(video.device.type, dtype=torch.bfloat16):
        out = model(video, generator=torch.Generator().manual_seed(seed + 1))
    out["loss"].backward()
    return out["loss"].detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_path_under_bf16_autocast(stage, triton_device):
    """Under bf16 autocast the kernels get bf16 tensors; against the fp32 step, the fused path's
    loss and gradient errors stay within 3x those of the plain-PyTorch path in bf16."""
    if triton_device.type != "cpu":
        pytest.skip("the GPU runs this path in the step benchmark")
    model, video = _model(stage), _video(2)
    set_ops_backend(model, "torch")
    loss32, grads32 = _step(model, video, seed=5)
    loss_t, grads_t = _autocast_step(model, video, seed=5)
    set_ops_backend(model, "triton")
    loss_f, grads_f = _autocast_step(model, video, seed=5)
    scale = max(g.abs().max() for g in grads32.values())

    def grad_err(grads):
        return max(float((grads[n].float() - g).abs().max() / scale) for n, g in grads32.items())

    e_torch, e_fused = abs(float(loss_t - loss32)), abs(float(loss_f - loss32))
    assert e_fused <= 3 * e_torch + 1e-6, f"loss: fused err {e_fused:.3g} > 3x torch bf16 err {e_torch:.3g}"
    e_torch, e_fused = grad_err(grads_t), grad_err(grads_f)
    assert e_fused <= 3 * e_torch, f"grads: fused err {e_fused:.3g} > 3x torch bf16 err {e_torch:.3g}"
