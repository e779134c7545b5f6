"""Stage 1's per-token conditional diffusion decoder (SimpleMLPAdaLN, method.md "Diffusion decoder").

For M hidden tokens, each a raw pixel patch ``x0[m]`` (``target_dim`` = 588 values in
[-1, 1]) conditioned on the predictor's latent ``cond[m]``:

    y = MLP(timestep_embedding(t, 256)) + Linear(cond)           [M, W]
    h = Linear(x_t)                                                [M, W]
    block (x depth):  shift, scale, gate = Linear(SiLU(y))
                      h = h + gate * MLP(adaln_modulate(h, shift, scale))      MLP = Linear-SiLU-Linear
    final:            shift, scale = Linear(SiLU(y))
                      out = Linear(adaln_modulate(h, shift, scale))          [M, 2 * target_dim] = [eps, v]

Every modulation Linear and the output Linear start at zero, so at initialisation each
block is the identity and the output is zero. The Gaussian diffusion itself (schedule,
q_sample, hybrid loss, reverse steps) is ``invnext.ops``; the loss runs in fp32.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from invnext import nn as inn
from invnext import ops
from invnext.config import DecoderConfig
from invnext.models.switches import CheckpointedBlocks


class AdaLNBlock(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        self.modulate = inn.AdaLNModulate(eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.modulate(x, shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        self.modulate = inn.AdaLNModulate(eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(y).chunk(2, dim=-1)
        return self.linear(self.modulate(x, shift, scale))


class DiffusionDecoder(CheckpointedBlocks, nn.Module):
    """``DiffusionDecoder(cfg, target_dim, cond_dim)``: the denoiser plus its training loss and sampler."""

    def __init__(self, cfg: DecoderConfig, target_dim: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        self.target_dim = target_dim
        self.cond_dim = cond_dim
        W = cfg.width
        self.input_proj = nn.Linear(target_dim, W)
        self.time_embed = nn.Sequential(nn.Linear(cfg.time_embed_dim, W), nn.SiLU(), nn.Linear(W, W))
        self.cond_embed = nn.Linear(cond_dim, W)
        self.blocks = nn.ModuleList(AdaLNBlock(W, cfg.norm_eps) for _ in range(cfg.depth))
        self.final = FinalLayer(W, 2 * target_dim, cfg.norm_eps)
        self._schedules: dict = {}
        train_schedule = self.schedule(torch.device("cpu"))
        self.q_sample = inn.QSample(train_schedule)
        self.diffusion_loss = inn.DiffusionLoss(train_schedule, reduction="mean")
        # The bound method, not the module: a submodule would nest the decoder inside itself.
        # ``sample`` passes its respaced schedule and temperature per call.
        self.sampler = inn.PSampleLoop(self._denoise_fp32, train_schedule, target_dim, temperature=cfg.temperature)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[1].weight)
            nn.init.zeros_(block.modulation[1].bias)
        for lin in (self.final.modulation[1], self.final.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def schedule(self, device: torch.device, respace: int | None = None) -> ops.DiffusionSchedule:
        """The (respaced) schedule on ``device``, built once and cached."""
        key = (str(device), respace)
        if key not in self._schedules:
            self._schedules[key] = ops.make_schedule(self.cfg.num_steps, self.cfg.schedule, respace=respace, device=device)
        return self._schedules[key]

    def _denoise_fp32(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.forward(x, t, c).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x_t[M, target_dim]``, ``t int64[M]`` (original timesteps), ``cond[M, cond_dim]`` -> ``[M, 2*target_dim]``."""
        dtype = self.input_proj.weight.dtype
        temb = ops.timestep_embedding(t, self.cfg.time_embed_dim).to(dtype)
        y = self.time_embed(temb) + self.cond_embed(cond)
        h = self.input_proj(x_t.to(dtype))
        for block in self.blocks:
            h = self.run_block(block, h, y)
        return self.final(h, y)

    def loss(self, cond: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean hybrid diffusion loss of ``target[M, target_dim]`` given ``cond[M, cond_dim]``.

        Draws ``t`` uniformly over the training steps and Gaussian noise on the tensors' device
        (from ``generator`` if given; a generator on another device, e.g. the trainer's CPU
        one, seeds one on this device), repeats every row
        ``cfg.batch_mul`` times, and returns ``ops.diffusion_loss`` (fp32 scalar).
        """
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"DiffusionDecoder.loss: cond must be [M, {self.cond_dim}], got {list(cond.shape)}")
        if target.dim() != 2 or target.shape != (cond.shape[0], self.target_dim):
            raise ValueError(
                f"DiffusionDecoder.loss: target must be [M={cond.shape[0]}, {self.target_dim}], got {list(target.shape)}"
            )
        if self.cfg.batch_mul > 1:
            cond = cond.repeat(self.cfg.batch_mul, 1)
            target = target.repeat(self.cfg.batch_mul, 1)
        device = cond.device
        M = target.shape[0]
        if generator is not None and generator.device != device:
            # Drawing M x target_dim normals on the host and copying them costs more than the
            # decoder step on a GPU: seed a generator on the tensors' device from the given one
            # instead (still deterministic given it; reading a CPU tensor does not sync the GPU).
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            generator = torch.Generator(device).manual_seed(seed)
        t = torch.randint(0, self.q_sample.schedule.num_steps, (M,), generator=generator, device=device)
        x0 = target.float()
        noise = torch.randn(x0.shape, generator=generator, device=device)
        x_t = self.q_sample(x0, noise, t)
        out = self.forward(x_t, t, cond).float()
        return self.diffusion_loss(out, x0, x_t, noise, t)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        num_steps: int | None = None,
        temperature: float | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw pixel patches ``[M, target_dim]`` for ``cond[M, cond_dim]`` by ancestral sampling.

        ``num_steps`` respaced steps (default ``cfg.sample_steps``) and noise ``temperature``
        (default ``cfg.temperature``) through ``ops.p_sample_loop``.
        """
        steps = self.cfg.sample_steps if num_steps is None else num_steps
        temp = self.cfg.temperature if temperature is None else temperature
        sched = self.schedule(cond.device, respace=steps)
        if noise is None and generator is not None:
            noise = torch.randn((cond.shape[0], self.target_dim), generator=generator, device=generator.device).to(cond.device)
        same_device = generator is not None and generator.device == cond.device
        return self.sampler(
            cond, noise=noise, generator=generator if same_device else None, schedule=sched, temperature=temp
        )
