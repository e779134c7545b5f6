"""Stage-1 reconstruction: what the diffusion decoder draws for the tokens the encoder never saw.

``reconstruct(checkpoint, video)`` (also ``invnext reconstruct``):

1. Loads the encoder, predictor and diffusion decoder of a Stage-1 checkpoint (our safetensors
   file, its :class:`~invnext.config.Stage1Config` in the metadata; a checkpoint or stage folder
   works too). The predictor's text initialisation is not re-run: its weights are the file's.
2. Reads ``frames`` frames spread evenly over the video (evaluation sampling) and centre-crops
   them to the encoder's input size.
3. Masks the clip. ``mask="auto"``: the Stage-1 semantic mask when a teacher is available (the
   file's own ``teacher.*`` tensors, else the cached bundled default teacher for a ``tiny``
   teacher config, else a local SigLIP tower at ``teacher.path``); otherwise a tube mask (one
   random spatial mask repeated through every frame) hiding the same share of every frame,
   ``mask_ratio``. Trainer checkpoints leave the frozen teacher out, so for them the teacher
   comes from its source, like in training.
4. Encoder on the visible tokens, predictor on [visible; mask tokens], then the decoder's
   ancestral sampler (``steps`` respaced steps, noise ``temperature``) draws a pixel patch for
   every hidden token from its predicted latent.
5. Writes a PNG grid: rows = original, masked (hidden patches grey), reconstructed (visible
   patches as given, hidden ones sampled); one column per frame. Tiles are ``img_size`` px with a
   2 px white gap, so the image is ``3*s + 8`` x ``F*s + 2*(F+1)`` pixels (H x W).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from invnext import ops
from invnext.checkpoint_layout import resolve_weights
from invnext.config import Stage1Config, from_dict
from invnext.models.decoder import DiffusionDecoder
from invnext.models.encoder import Encoder
from invnext.models.layers import patchify
from invnext.models.predictor import Predictor
from invnext.models.stage1 import kept_per_frame
from invnext.models.teacher import teacher_input
from invnext.models.teacher_interface import token_attention

__all__ = ["GAP", "Stage1Parts", "grid_image", "load_stage1", "reconstruct", "unpatchify"]

GAP = 2  # white pixels between tiles


@dataclasses.dataclass
class Stage1Parts:
    """What reconstruction needs of a Stage-1 model."""

    cfg: Stage1Config
    encoder: Encoder
    predictor: Predictor
    decoder: DiffusionDecoder
    teacher: nn.Module | None
    teacher_from: str  # where the teacher came from, or why there is none
    weights: Path


def unpatchify(patches: torch.Tensor, grid: tuple[int, int, int], patch: int, tubelet: int = 1) -> torch.Tensor:
    """Inverse of :func:`invnext.models.layers.patchify`: ``[B, N, C*tubelet*patch^2] -> [B, C, T, H, W]``."""
    B, N, D = patches.shape
    t, h, w = grid
    if N != t * h * w or D % (tubelet * patch * patch):
        raise ValueError(
            f"unpatchify: patches {list(patches.shape)} do not fit grid {grid} with patch {patch}, tubelet {tubelet}"
        )
    C = D // (tubelet * patch * patch)
    x = patches.reshape(B, t, h, w, C, tubelet, patch, patch).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, C, t * tubelet, h * patch, w * patch)


def grid_image(rows: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Tile ``rows`` (each ``uint8 [F, s, s, 3]``) into one ``uint8 [R*s + (R+1)*gap, F*s + (F+1)*gap, 3]`` image."""
    R, (Fn, s) = len(rows), rows[0].shape[:2]
    img = np.full((R * s + (R + 1) * gap, Fn * s + (Fn + 1) * gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for f in range(Fn):
            y, x = gap + r * (s + gap), gap + f * (s + gap)
            img[y : y + s, x : x + s] = row[f]
    return img


# --------------------------------------------------------------------------- loading


def _weights_file(checkpoint: str | os.PathLike) -> Path:
    try:
        return Path(resolve_weights(checkpoint))
    except FileNotFoundError as exc:
        raise ValueError(f"reconstruct: checkpoint: {exc}") from None


def _load_part(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, where: Path) -> None:
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if isinstance(module, Encoder):
        missing, unexpected = module.load_resized(part, strict=False)
    else:
        missing, unexpected = module.load_state_dict(part, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"reconstruct: {where}: the '{prefix}' tensors do not fit the config: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


def _find_teacher(cfg: Stage1Config, state: dict[str, torch.Tensor], teacher: str, weights: Path):
    """``(teacher module or None, where it came from / why none)`` for the ``teacher`` choice."""
    from invnext.models.teacher import build_teacher

    def from_state(tensors: dict[str, torch.Tensor], where: str):
        module = build_teacher(cfg.teacher)
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"reconstruct: teacher weights {where} do not fit the config's teacher: missing "
                f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return module

    if teacher == "none":
        return None, "none (asked)"
    if teacher not in ("auto", "default"):
        from safetensors.torch import load_file

        return from_state(load_file(teacher), teacher), teacher
    own = {k[len("teacher.") :]: v for k, v in state.items() if k.startswith("teacher.")}
    if own and teacher == "auto":
        return from_state(own, str(weights)), f"{weights} (teacher.*)"
    if cfg.teacher.kind == "tiny":
        from invnext.data.bundled import default_cache_root
        from invnext.teacher_pretrain import load_default_teacher

        root = default_cache_root()
        try:
            return load_default_teacher(root, cfg.teacher), f"default teacher in {root}"
        except (FileNotFoundError, ValueError) as exc:
            if teacher == "default":
                raise ValueError(f"reconstruct: --teacher default: {exc}") from None
            return None, f"none: no teacher in the checkpoint and no usable default teacher ({exc})"
    if cfg.teacher.path is not None and Path(cfg.teacher.path).exists():
        return build_teacher(cfg.teacher), cfg.teacher.path
    return None, f"none: no teacher in the checkpoint and no local {cfg.teacher.kind} tower (teacher.path)"


def load_stage1(checkpoint: str | os.PathLike, *, teacher: str = "auto") -> Stage1Parts:
    """Encoder, predictor, decoder (eval mode, CPU) and the teacher (see the module docstring) of a Stage-1 checkpoint.

    ``teacher``: ``"auto"``, ``"default"`` (the bundled default teacher), ``"none"``, or a
    safetensors file of teacher weights for the checkpoint's teacher config.
    """
    from safetensors.torch import load_file, safe_open

    from invnext.loading import CONFIG_CLASS_KEY, CONFIG_KEY

    weights = _weights_file(checkpoint)
    if weights.suffix != ".safetensors":
        raise ValueError(f"reconstruct: {weights} is not a .safetensors file (our Stage-1 checkpoints are)")
    with safe_open(os.fspath(weights), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    kind = meta.get(CONFIG_CLASS_KEY)
    if CONFIG_KEY not in meta or kind != "Stage1Config":
        raise ValueError(
            f"reconstruct: {weights} is not a Stage-1 checkpoint (its config class is {kind!r}); reconstruction "
            "needs the Stage-1 diffusion decoder"
        )
    cfg = from_dict(Stage1Config, json.loads(meta[CONFIG_KEY]))
    state = load_file(os.fspath(weights))
    enc_cfg = cfg.encoder
    encoder = Encoder(enc_cfg)
    predictor = Predictor(dataclasses.replace(cfg.predictor, init_from=None), enc_cfg.width, enc_cfg.grid)
    decoder = DiffusionDecoder(cfg.decoder, enc_cfg.patch_dim, cfg.predictor.width)
    for module, prefix in ((encoder, "encoder."), (predictor, "predictor."), (decoder, "decoder.")):
        _load_part(module, state, prefix, weights)
    tmodule, where = _find_teacher(cfg, state, teacher, weights)
    if tmodule is not None:
        tmodule.requires_grad_(False).eval()
    return Stage1Parts(cfg, encoder.eval(), predictor.eval(), decoder.eval(), tmodule, where, weights)


# --------------------------------------------------------------------------- reconstruction


@torch.no_grad()
def sample_pixels(
    decoder: nn.Module,
    cond: torch.Tensor,
    steps: int,
    temperature: float,
    *,
    generator: torch.Generator | None = None,
    clip_x0: bool = True,
) -> torch.Tensor:
    """Ancestral sampling of pixel patches ``[M, target_dim]`` in [-1, 1] from ``decoder`` given ``cond[M, W]``.

    ``clip_x0``: at every step the clean patch implied by the predicted noise,
    ``x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps``, is clipped to [-1, 1] and the noise is
    re-derived from it, ``eps' = (sqrt(1/abar_t) x_t - clip(x0)) / sqrt(1/abar_t - 1)``, so the
    unchanged reverse step draws from the posterior around the clipped ``x0`` (DDPM's
    ``clip_denoised`` for images). Why: the noisiest steps divide the prediction error by
    ``sqrt(abar_t)`` ~ 0, so a decoder trained for minutes (the default run) leaves unclipped
    samples saturated with noise; pixels have a known range, and clipping uses only that.
    Without it this is exactly ``decoder.sample``.
    """
    if not clip_x0:
        return decoder.sample(cond, steps, temperature, generator=generator)
    sched = decoder.schedule(cond.device, respace=steps)
    # t_model = timestep_map[t] reaches the model: map it back to the respaced row of the tables.
    row_of = torch.full((int(sched.timestep_map.max()) + 1,), -1, dtype=torch.int64, device=cond.device)
    row_of[sched.timestep_map] = torch.arange(sched.timestep_map.numel(), device=cond.device)
    recip = sched.sqrt_recip_alphas_cumprod.float()
    recipm1 = sched.sqrt_recipm1_alphas_cumprod.float()
    C = decoder.target_dim

    def denoise(x_t: torch.Tensor, t_model: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = decoder(x_t, t_model, c).float()
        eps, v = out[:, :C], out[:, C:]
        t = row_of[t_model]
        a, b = recip[t][:, None], recipm1[t][:, None]
        x0 = (a * x_t.float() - b * eps).clamp(-1.0, 1.0)
        return torch.cat([(a * x_t.float() - x0) / b, v], dim=1)

    noise = None
    if generator is not None:
        noise = torch.randn((cond.shape[0], C), generator=generator, device=generator.device).to(cond.device)
    return ops.p_sample_loop(
        denoise, cond, sched, channels=C, noise=noise,
        generator=generator if generator is not None and generator.device == cond.device else None,
        temperature=temperature,
    )


def _psnr(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR in dB of patches in [-1, 1], measured on pixels in [0, 1]."""
    mse = float(((pred - truth) / 2).pow(2).mean())
    return float("inf") if mse == 0 else -10.0 * float(np.log10(mse))


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``uint8 [T, H, W, 3]``."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


@torch.no_grad()
def reconstruct(
    checkpoint: str | os.PathLike,
    video: str | os.PathLike,
    *,
    steps: int = 50,
    temperature: float = 1.0,
    frames: int | None = None,
    out: str | os.PathLike | None = None,
    mask: str = "auto",
    teacher: str = "auto",
    seed: int = 0,
    device: str | torch.device | None = None,
    clip_x0: bool = True,
) -> dict[str, Any]:
    """Mask a clip of ``video``, reconstruct the hidden patches with the Stage-1 decoder, write a PNG grid.

    Args:
        checkpoint: a Stage-1 ``model.safetensors`` or a checkpoint / stage folder holding one.
        video: a video file.
        steps: respaced diffusion sampling steps (2 .. the decoder's ``num_steps``).
        temperature: noise scale of the sampler (0: its mean path).
        frames: frames of the clip (a multiple of the encoder's tubelet); default the encoder's ``num_frames``.
        out: the PNG to write (default: ``<video stem>_reconstruction.png`` beside the video).
        mask: ``"auto"`` (semantic when a teacher is available, else tube), ``"semantic"`` or ``"tube"``.
        teacher: ``"auto"``, ``"default"``, ``"none"`` or a teacher weights file (:func:`load_stage1`).
        seed: the mask (tube / sampled semantic) and the sampler's noise.
        device: where the models run (default CUDA when available, else CPU).
        clip_x0: clip the predicted clean patch to the pixel range at every step
            (:func:`sample_pixels`); False samples exactly as the training objective's model does.
    Returns:
        ``{"png", "mask", "teacher", "hidden_fraction", "psnr_hidden", "psnr_hidden_mean_colour", "steps", "temperature", "frames",
        "image_shape", "hidden" (bool [N]), "rows": {"original", "masked", "reconstructed"} (uint8 [F, s, s, 3])}``;
        ``psnr_hidden`` is the PSNR (dB, pixels in [0, 1]) of the sampled patches against the true ones;
        ``psnr_hidden_mean_colour`` that of the trivial baseline painting every hidden pixel with the
        clip's mean colour.
    """
    if mask not in ("auto", "semantic", "tube"):
        raise ValueError(f"reconstruct: mask must be 'auto', 'semantic' or 'tube', got {mask!r}")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise ValueError(f"reconstruct: frames must be an int >= 1, got {frames!r}")
    if not temperature >= 0:
        raise ValueError(f"reconstruct: temperature must be >= 0, got {temperature!r}")
    if not os.path.isfile(video):
        raise ValueError(f"reconstruct: video {os.fspath(video)!r} is not a file")
    parts = load_stage1(checkpoint, teacher="none" if mask == "tube" else teacher)
    cfg = parts.cfg
    enc_cfg = cfg.encoder
    if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= cfg.decoder.num_steps:
        raise ValueError(f"reconstruct: steps must be an int in [2, {cfg.decoder.num_steps}], got {steps!r}")
    frames = enc_cfg.num_frames if frames is None else frames
    if frames % enc_cfg.tubelet_size:
        raise ValueError(f"reconstruct: frames={frames} must be a multiple of the tubelet size {enc_cfg.tubelet_size}")
    if mask == "semantic" and parts.teacher is None:
        raise ValueError(f"reconstruct: mask='semantic' needs a teacher; {parts.teacher_from}")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    for m in (parts.encoder, parts.predictor, parts.decoder, parts.teacher):
        if m is not None:
            m.to(dev)

    from invnext.data.video import eval_transform, read_clip

    clip = eval_transform(torch.from_numpy(read_clip(os.fspath(video), frames)), enc_cfg.img_size)  # uint8 [T, s, s, 3]
    rgb = clip.permute(3, 0, 1, 2)[None].to(dev).float() / 255.0  # [1, 3, T, s, s]
    x = parts.encoder.preprocess(clip[None].to(dev))
    grid = parts.encoder.grid_of(x)
    T, H, W = grid
    S = H * W
    gen = torch.Generator().manual_seed(seed)
    keep = kept_per_frame(cfg.mask_ratio, S)
    use_semantic = parts.teacher is not None
    if use_semantic:
        attn = token_attention(parts.teacher(teacher_input(rgb, parts.teacher)).attn, enc_cfg.tubelet_size).float()
        if tuple(attn.shape) != (1, T, S):
            raise ValueError(
                f"reconstruct: the teacher's token grid {list(attn.shape[1:])} differs from the encoder's ({T}, {S})"
            )
        hidden = ops.semantic_mask(attn.cpu(), keep, cfg.mask_mode, generator=gen).to(dev)
    else:
        hidden = ops.tube_mask(1, grid, cfg.mask_ratio, generator=gen, device=dev)
    num_visible = int((~hidden).sum())

    enc = parts.encoder.forward_masked(x, hidden, num_visible=[num_visible], pool=False)
    latents = parts.predictor(enc.tokens, enc.index, 1, grid)  # [1, N, Wp]
    cond = latents[0][hidden[0]]
    sample = sample_pixels(parts.decoder, cond, steps, temperature, generator=gen, clip_x0=clip_x0).clamp(-1, 1)

    target = patchify(rgb * 2.0 - 1.0, enc_cfg.patch_size, enc_cfg.tubelet_size)  # [1, N, patch_dim]
    recon, grey = target.clone(), target.clone()
    recon[hidden] = sample.to(recon.dtype)
    grey[hidden] = 0.0
    truth = target[hidden]
    psnr = _psnr(sample, truth)
    # What no learning gives: every hidden pixel painted with the clip's mean colour.
    flat = rgb.mean(dim=(2, 3, 4), keepdim=True).expand_as(rgb)
    flat = patchify(flat * 2.0 - 1.0, enc_cfg.patch_size, enc_cfg.tubelet_size)
    psnr_mean_colour = _psnr(flat[hidden], truth)

    def as_img(p: torch.Tensor) -> np.ndarray:
        return _to_uint8(unpatchify(p, grid, enc_cfg.patch_size, enc_cfg.tubelet_size)[0])

    rows = {"original": clip.numpy(), "masked": as_img(grey), "reconstructed": as_img(recon)}
    image = grid_image([rows["original"], rows["masked"], rows["reconstructed"]])

    png = Path(out) if out is not None else Path(video).with_name(f"{Path(video).stem}_reconstruction.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(image).save(png)
    return {
        "png": str(png),
        "mask": "semantic" if use_semantic else "tube",
        "teacher": parts.teacher_from,
        "hidden_fraction": float(hidden.float().mean()),
        "psnr_hidden": psnr,
        "psnr_hidden_mean_colour": psnr_mean_colour,
        "steps": steps,
        "temperature": temperature,
        "clip_x0": clip_x0,
        "frames": frames,
        "image_shape": list(image.shape),
        "hidden": hidden[0].cpu(),
        "rows": rows,
    }
