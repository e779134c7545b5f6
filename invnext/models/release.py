"""The authors' released InternVideo-Next checkpoints -> our :class:`Encoder`.

Their encoder (``InternVideo2`` in ``InternVideo-Next/models/InternVideo_next*.py`` of the
OpenGVLab/InternVideo release) has the same structure as ours; only names and two layouts differ.
After stripping wrapper prefixes (``module.``, ``model.``, ``encoder.``, ``student.``, repeatedly)::

    theirs                                        ours                              conversion
    patch_embed.proj.weight  [C, 3, t, p, p]      patch_embed.proj.weight  [C, 3tpp]  kernel flattened (c, t, y, x)
    patch_embed.proj.bias                         patch_embed.proj.bias
    patch_embed.norm_before.weight  [t*p*p*3]     patch_embed.pre_norm.weight       permute (t, y, x, c) -> (c, t, y, x)
    patch_embed.norm.weight                       patch_embed.post_norm.weight
    cls_token  [1, P, C]                          cls_tokens
    pos_embed  [1, P + N, C]                      pos_embed.weight
    blocks.{i}.norm1.weight                       blocks.{i}.norm1.weight
    blocks.{i}.attn.qkv.weight                    blocks.{i}.attn.qkv.weight
    blocks.{i}.attn.q_norm.weight                 blocks.{i}.attn.q_norm.weight
    blocks.{i}.attn.k_norm.weight                 blocks.{i}.attn.k_norm.weight
    blocks.{i}.attn.proj.{weight,bias}            blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.ls1.gamma                          blocks.{i}.ls1.gamma
    blocks.{i}.norm2.weight                       blocks.{i}.norm2.weight
    blocks.{i}.mlp.fc1.{weight,bias}              blocks.{i}.mlp.fc1.{weight,bias}
    blocks.{i}.mlp.fc2.{weight,bias}              blocks.{i}.mlp.fc2.{weight,bias}
    blocks.{i}.ls2.gamma                          blocks.{i}.ls2.gamma
    clip_projector.norm1_q.{weight,bias}          pool.norm_q.{weight,bias}
    clip_projector.norm1_k.{weight,bias}          pool.norm_k.{weight,bias}
    clip_projector.norm1_v.{weight,bias}          pool.norm_v.{weight,bias}
    clip_projector.cross_attn.q.weight            pool.q.weight
    clip_projector.cross_attn.q_bias              pool.q.bias
    clip_projector.cross_attn.k.weight            pool.k.weight
    clip_projector.cross_attn.k_bias              pool.k.bias
    clip_projector.cross_attn.v.weight            pool.v.weight
    clip_projector.cross_attn.v_bias              pool.v.bias
    clip_projector.cross_attn.proj.{weight,bias}  pool.proj.{weight,bias}

Layouts: their patch embedding RMS-normalises each raw patch flattened channel-last
``(t, y, x, c)`` and then runs a Conv3d; ours flattens ``(c, t, y, x)`` (a Conv3d kernel's order)
for both the norm and the Linear, so the norm's weight is permuted and the kernel flattened. Their
grid tokens follow ``(t, h, w)`` raster order after the class tokens, as ours do.

Their blocks' default MLP is flash-attn's ``FusedMLP``, whose GELU is the tanh approximation
(their unfused fallback uses exact GELU, but the released weights were trained fused), so a
converted encoder is built with ``EncoderConfig.activation="gelu_tanh"``.

Their encoder has no norm after the last block (the fused pre-norm blocks leave the residual
stream as the output), so a converted encoder is built with ``EncoderConfig.final_norm=False``.

Skipped (reported, never loaded): the Stage-1/2 training parts, i.e. the alignment and predictor
position tables (``clip_pos_embed``, ``diff_pos_embed``), the ModernBERT predictor
(``bert_decoder.*``) and its in/out heads (``to_bert_proj``, ``bert_mask_token``,
``selfdist_*``), the teacher-alignment heads (``clip_decoder``, ``final_clip_decoder``) and the
pixel decoders (``diffloss``, ``mse_projector``). Any other name is an error that lists it.

Shapes fix most of the config (width, depth, MLP ratio, patch, tubelet, class tokens, pooled
width); the head counts are not stored and follow the release's presets (width 768 -> 12 heads,
1024 -> 16, 1408 -> 16; pool heads 16), and the grid follows the release's 224 px unless given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

__all__ = [
    "RELEASE_SKIPPED",
    "RELEASE_TO_INVNEXT",
    "ReleaseConversion",
    "convert_release_state_dict",
    "is_release_state_dict",
    "release_names",
]

WRAPPER_PREFIXES = ("module.", "model.", "encoder.", "student.")


def _conv3d_to_linear(w: torch.Tensor) -> torch.Tensor:
    """Conv3d kernel ``[C, c, t, p, p]`` -> Linear weight ``[C, c*t*p*p]`` over (c, t, y, x) patch vectors."""
    return w.reshape(w.shape[0], -1)


def _channels_last_to_first(w: torch.Tensor, conv: torch.Tensor) -> torch.Tensor:
    """Patch-norm weight over (t, y, x, c) -> over (c, t, y, x); ``conv`` gives (c, t, p)."""
    _, c, t, p, q = conv.shape
    return w.reshape(t, p, q, c).permute(3, 0, 1, 2).reshape(-1)


# (their name pattern, our name template). ``{0}`` is the block index. Layout conversions are
# keyed by our name in _CONVERSIONS.
RELEASE_TO_INVNEXT: tuple[tuple[str, str], ...] = (
    (r"patch_embed\.proj\.weight", "patch_embed.proj.weight"),
    (r"patch_embed\.proj\.bias", "patch_embed.proj.bias"),
    (r"patch_embed\.norm_before\.weight", "patch_embed.pre_norm.weight"),
    (r"patch_embed\.norm\.weight", "patch_embed.post_norm.weight"),
    (r"cls_token", "cls_tokens"),
    (r"pos_embed", "pos_embed.weight"),
    (r"blocks\.(\d+)\.norm1\.weight", "blocks.{0}.norm1.weight"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", "blocks.{0}.attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.q_norm\.weight", "blocks.{0}.attn.q_norm.weight"),
    (r"blocks\.(\d+)\.attn\.k_norm\.weight", "blocks.{0}.attn.k_norm.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.weight", "blocks.{0}.attn.proj.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.bias", "blocks.{0}.attn.proj.bias"),
    (r"blocks\.(\d+)\.ls1\.gamma", "blocks.{0}.ls1.gamma"),
    (r"blocks\.(\d+)\.norm2\.weight", "blocks.{0}.norm2.weight"),
    (r"blocks\.(\d+)\.mlp\.fc1\.weight", "blocks.{0}.mlp.fc1.weight"),
    (r"blocks\.(\d+)\.mlp\.fc1\.bias", "blocks.{0}.mlp.fc1.bias"),
    (r"blocks\.(\d+)\.mlp\.fc2\.weight", "blocks.{0}.mlp.fc2.weight"),
    (r"blocks\.(\d+)\.mlp\.fc2\.bias", "blocks.{0}.mlp.fc2.bias"),
    (r"blocks\.(\d+)\.ls2\.gamma", "blocks.{0}.ls2.gamma"),
    (r"clip_projector\.norm1_q\.weight", "pool.norm_q.weight"),
    (r"clip_projector\.norm1_q\.bias", "pool.norm_q.bias"),
    (r"clip_projector\.norm1_k\.weight", "pool.norm_k.weight"),
    (r"clip_projector\.norm1_k\.bias", "pool.norm_k.bias"),
    (r"clip_projector\.norm1_v\.weight", "pool.norm_v.weight"),
    (r"clip_projector\.norm1_v\.bias", "pool.norm_v.bias"),
    (r"clip_projector\.cross_attn\.q\.weight", "pool.q.weight"),
    (r"clip_projector\.cross_attn\.q_bias", "pool.q.bias"),
    (r"clip_projector\.cross_attn\.k\.weight", "pool.k.weight"),
    (r"clip_projector\.cross_attn\.k_bias", "pool.k.bias"),
    (r"clip_projector\.cross_attn\.v\.weight", "pool.v.weight"),
    (r"clip_projector\.cross_attn\.v_bias", "pool.v.bias"),
    (r"clip_projector\.cross_attn\.proj\.weight", "pool.proj.weight"),
    (r"clip_projector\.cross_attn\.proj\.bias", "pool.proj.bias"),
)

# Parts of their Stage-1/2 models that are not the encoder: skipped and reported.
RELEASE_SKIPPED: tuple[str, ...] = (
    r"clip_pos_embed(_spatial|_temporal|_cls)?",
    r"diff_pos_embed",
    r"bert_mask_token",
    r"bert_decoder\..*",
    r"to_bert_proj\..*",
    r"selfdist_decoder\..*",
    r"selfdist_normproj_decoder\..*",
    r"selfdist_proj_clip\..*",
    r"clip_decoder\..*",
    r"final_clip_decoder\..*",
    r"diffloss\..*",
    r"mse_projector\..*",
)

_COMPILED = tuple((re.compile(pat + r"$"), template) for pat, template in RELEASE_TO_INVNEXT)
_SKIP = re.compile("(?:" + "|".join(RELEASE_SKIPPED) + r")$")
_SEPARABLE = ("pos_embed_spatial", "pos_embed_temporal", "pos_embed_cls")

# Head counts of the release's presets (not recoverable from shapes): width -> (heads, pool heads).
RELEASE_HEADS = {768: (12, 16), 1024: (16, 16), 1408: (16, 16)}
RELEASE_IMG_SIZE = 224


class ReleaseConversion(NamedTuple):
    """state: our names -> tensors; config: EncoderConfig fields read from shapes; skipped: their names not loaded."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    skipped: list[str]


def strip_wrappers(key: str) -> str:
    """``key`` without leading wrapper prefixes (``module.``, ``model.``, ``encoder.``, ``student.``)."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _our_name(theirs: str) -> str | None:
    for pattern, template in _COMPILED:
        m = pattern.match(theirs)
        if m is not None:
            return template.format(*m.groups())
    return None


def is_release_state_dict(state: Mapping[str, Any]) -> bool:
    """True when ``state`` looks like the authors' encoder (their patch-norm and class-token names)."""
    names = {strip_wrappers(k) for k in state}
    return "patch_embed.norm_before.weight" in names or ("cls_token" in names and "blocks.0.attn.qkv.weight" in names)


def release_names(depth: int) -> list[str]:
    """Every name the authors' encoder of ``depth`` blocks has, from :data:`RELEASE_TO_INVNEXT`."""
    out = []
    for pattern, _ in RELEASE_TO_INVNEXT:
        text = pattern.replace("\\.", ".")
        if "(\\d+)" in text:
            out.extend(text.replace("(\\d+)", str(i)) for i in range(depth))
        else:
            out.append(text)
    return out


def _infer_config(state: dict[str, torch.Tensor], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """EncoderConfig fields of the converted state (``overrides`` fill what shapes cannot tell)."""
    conv = state["patch_embed.proj.weight"]
    width, in_chans, tubelet, patch = conv.shape[0], conv.shape[1], conv.shape[2], conv.shape[3]
    prefix = state["cls_tokens"].shape[1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    pool_out = state["pool.proj.weight"].shape[0]
    heads, pool_heads = RELEASE_HEADS.get(width, (None, 16))
    cfg: dict[str, Any] = {
        "patch_size": patch,
        "tubelet_size": tubelet,
        "in_chans": in_chans,
        "width": width,
        "depth": depth,
        "mlp_ratio": hidden / width,
        "num_class_tokens": prefix,
        "pool_dim": None if pool_out == width else pool_out,
        "pool_heads": pool_heads,
        "drop_path": 0.0,
        "use_rope": False,
        "final_norm": False,
        # Their default block MLP is flash-attn's FusedMLP (tanh GELU); the weights were trained with it.
        "activation": "gelu_tanh",
    }
    if heads is not None:
        cfg["heads"] = heads
    cfg.update(overrides)
    if "heads" not in cfg:
        raise ValueError(
            f"load_encoder: the checkpoint's width {width} is not one of the release presets {sorted(RELEASE_HEADS)}; "
            "attention heads are not stored in the weights: pass config={'heads': ...}"
        )
    if round(width * cfg["mlp_ratio"]) != hidden:
        raise ValueError(
            f"load_encoder: mlp_ratio={cfg['mlp_ratio']} gives an MLP of {round(width * cfg['mlp_ratio'])}, "
            f"the checkpoint has {hidden}"
        )
    # The grid: N = T * g * g tokens after the class rows.
    n = state["pos_embed.weight"].shape[1] - prefix
    if "img_size" in cfg and "num_frames" in cfg:
        return cfg
    if "img_size" in cfg:
        g = cfg["img_size"] // patch
        if g < 1 or n % (g * g):
            raise ValueError(
                f"load_encoder: a position table of {n} grid rows does not fit img_size={cfg['img_size']} "
                f"(patch {patch})"
            )
        cfg["num_frames"] = n // (g * g) * tubelet
    elif "num_frames" in cfg:
        t = cfg["num_frames"] // tubelet
        g = round((n // max(t, 1)) ** 0.5)
        if t < 1 or g * g * t != n:
            raise ValueError(
                f"load_encoder: a position table of {n} grid rows does not fit num_frames={cfg['num_frames']}"
            )
        cfg["img_size"] = g * patch
    else:
        g = RELEASE_IMG_SIZE // patch
        if n % (g * g):
            raise ValueError(
                f"load_encoder: a position table of {n} grid rows does not fit the release's {RELEASE_IMG_SIZE} px "
                f"(patch {patch}); pass config={{'img_size': ...}} or config={{'num_frames': ...}}"
            )
        cfg["img_size"], cfg["num_frames"] = RELEASE_IMG_SIZE, n // (g * g) * tubelet
    return cfg


def convert_release_state_dict(
    state: Mapping[str, torch.Tensor], overrides: Mapping[str, Any] | None = None
) -> ReleaseConversion:
    """Map the authors' encoder weights to ours (see the module docstring for the table).

    Args:
        state: their state dict (any wrapper prefixes), tensors of any float dtype.
        overrides: EncoderConfig fields that shapes cannot give (``heads``, ``pool_heads``,
            ``img_size`` / ``num_frames``) or that should differ.
    Returns:
        :class:`ReleaseConversion`.
    Raises:
        ValueError: a name is neither mapped nor a known skipped part (all such names listed),
            two names map to one of ours, or the encoder's core tensors are missing.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    skipped, unknown = [], []
    for key, value in state.items():
        name = strip_wrappers(key)
        if name in _SEPARABLE:
            raise ValueError(
                "load_encoder: separable position embeddings (sep_pos_embed=True) are not supported; "
                "the released encoders use one joint table 'pos_embed'"
            )
        ours = _our_name(name)
        if ours is None:
            (skipped if _SKIP.match(name) else unknown).append(key)
            continue
        if ours in out:
            raise ValueError(f"load_encoder: {source[ours]!r} and {key!r} both map to {ours!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_encoder: {key!r} holds a {type(value).__name__}, not a tensor")
        out[ours], source[ours] = value, key
    if unknown:
        raise ValueError(
            f"load_encoder: {len(unknown)} parameter(s) of the checkpoint have no counterpart: {sorted(unknown)}"
        )
    for required in (
        "patch_embed.proj.weight",
        "cls_tokens",
        "pos_embed.weight",
        "blocks.0.mlp.fc1.weight",
        "pool.proj.weight",
    ):
        if required not in out:
            raise ValueError(
                f"load_encoder: nothing in the checkpoint maps to our {required!r}; "
                "it is not an InternVideo-Next encoder"
            )
    conv = out["patch_embed.proj.weight"]
    if conv.dim() != 5:
        raise ValueError(
            f"load_encoder: patch_embed.proj.weight must be a Conv3d kernel [C, 3, t, p, p], got {list(conv.shape)}"
        )
    conversions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "patch_embed.proj.weight": _conv3d_to_linear,
        "patch_embed.pre_norm.weight": lambda w: _channels_last_to_first(w, conv),
    }
    config = _infer_config(out, dict(overrides or {}))
    out = {k: conversions[k](v) if k in conversions else v for k, v in out.items()}
    return ReleaseConversion(out, config, sorted(skipped))
