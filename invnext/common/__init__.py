"""The floor below every op implementation: what the public ops (``invnext.ops``), the Triton
kernels (``kernels/``, imported as ``invnext_kernels``) and the CUDA launchers (``invnext.native``)
all need, so that none of them imports another's private names.

* :mod:`.validate`: argument checks (shape, dtype, device, values, sizes).
* :mod:`.interpreter`: whether Triton runs on its CPU interpreter.
* :mod:`.diffusion_schedule`: the diffusion decoder's schedule tables.
* :mod:`.diffusion_steps`: the reverse-step math both the reference sampler and the Triton one run.
* :mod:`.philox`: the counter-based RNG every mask draws from.
* :mod:`.mask_geometry`: hidden counts and multi-block boxes, drawn on the host for every backend.
* :mod:`.token_custom_ops`: the ``torch.library`` glue of the token-op backends.
* :mod:`.registry`: where each backend's modules register the ops they implement.
* :mod:`.lazy`: package names that import their submodule on first use (``invnext.ops``, ``invnext.data``).

Modules here import torch, numpy and each other, never another part of invnext
(tests/test_layers.py checks it).
"""
