"""The fused path end to end: tiny Stage-1 and Stage-2 models with every op on its Triton
kernel (``ops_backend="triton"``, the CPU interpreter here, the GPU in the GPU check) give the
plain-PyTorch path's loss and gradients.

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
