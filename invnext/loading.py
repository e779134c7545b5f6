"""``load_encoder``: a ready video encoder from a preset, one of our checkpoints, or the authors' release.

``source`` is one of:

* a preset name (``tiny``, ``base``, ``large``, ``1b``): randomly initialised, Stage 2's encoder config;
* our checkpoint: a safetensors file written by :func:`save_encoder` (or by
  :func:`invnext.models.save_weights` with ``metadata=config_metadata(cfg)``). Its config travels in
  the safetensors metadata, so one file is the whole model:

      "invnext.config_class": "EncoderConfig" | "Stage1Config" | "Stage2Config"
      "invnext.config":       the JSON of ``to_dict(cfg)``

  An ``EncoderConfig`` file holds the encoder's tensors at the top level; a Stage-1/Stage-2 file
  holds the whole model and the (student) encoder is read from under ``encoder.``;
* the authors' released encoder (a ``.pt``/``.pth``/``.bin`` file, read with
  ``torch.load(weights_only=True)``, never a full unpickle, or a ``.safetensors`` file), its names
  mapped by :mod:`invnext.models.release` (training-only parts skipped and reported).

A folder is accepted when it holds exactly one weights file (``model.safetensors`` preferred).
The encoder comes back in eval mode; ``encoder.preprocess(frames)`` turns uint8 RGB frames
``[B, T, H, W, 3]`` into its input and ``encoder.encode(video)`` returns ``(grid tokens [B, N, C],
pooled [B, embed_dim])``.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from invnext.config import PRESETS, EncoderConfig, Stage1Config, Stage2Config, from_dict, get_preset, to_dict
from invnext.models.encoder import Encoder
from invnext.models.io import check_finite, check_shapes, save_weights
from invnext.models.release import convert_release_state_dict, is_release_state_dict, strip_wrappers

__all__ = ["CONFIG_CLASS_KEY", "CONFIG_KEY", "build_encoder", "config_metadata", "load_encoder", "save_encoder"]

CONFIG_KEY = "invnext.config"
CONFIG_CLASS_KEY = "invnext.config_class"
_CONFIG_CLASSES = {
    "EncoderConfig": (EncoderConfig, ""),
    "Stage1Config": (Stage1Config, "encoder."),
    "Stage2Config": (Stage2Config, "encoder."),
}
_PICKLED = (".pt", ".pth", ".bin", ".ckpt")
_CONTAINERS = ("module", "model", "state_dict", "model_state_dict")


def config_metadata(cfg: EncoderConfig | Stage1Config | Stage2Config) -> dict[str, str]:
    """The safetensors metadata that makes a weights file loadable by :func:`load_encoder`."""
    name = type(cfg).__name__
    if name not in _CONFIG_CLASSES:
        raise TypeError(f"config_metadata: cfg must be an EncoderConfig, Stage1Config or Stage2Config, got {name}")
    return {CONFIG_CLASS_KEY: name, CONFIG_KEY: json.dumps(to_dict(cfg))}


def save_encoder(encoder: Encoder, path: str | os.PathLike) -> None:
    """Write ``encoder`` (weights + config) as one safetensors file that :func:`load_encoder` reads back."""
    if not isinstance(encoder, Encoder):
        raise TypeError(f"save_encoder: encoder must be an invnext Encoder, got {type(encoder).__name__}")
    save_weights(encoder, path, metadata=config_metadata(encoder.cfg))


def build_encoder(cfg: EncoderConfig, *, empty: bool = False) -> Encoder:
    """``Encoder(cfg)``.

    ``empty=True`` skips the random initialisation (the parameters are uninitialised CPU memory),
    for a model whose every tensor is about to be loaded.
    """
    if empty:
        with torch.device("meta"):
            encoder = Encoder(cfg)
    else:
        encoder = Encoder(cfg)
    return encoder.to_empty(device="cpu") if empty else encoder


# --------------------------------------------------------------------------- reading files


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    preferred = path / "model.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.suffix in _PICKLED))
    if len(found) != 1:
        names = [p.name for p in found]
        raise ValueError(
            f"load_encoder: the folder {str(path)!r} must hold exactly one weights file, found {names or 'none'}"
        )
    return found[0]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a torch checkpoint, read without running pickled code; unwraps {'module': ...} etc."""
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as exc:  # a file cut short or not a torch file at all
        raise ValueError(
            f"load_encoder: {str(path)!r} is not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"load_encoder: {str(path)!r} holds objects other than tensors and plain containers, which are not "
            "unpickled here (weights_only=True). Extract its state dict in an environment you trust and save it "
            f"with safetensors. ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"load_encoder: {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    for key in _CONTAINERS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    raise ValueError(
        f"load_encoder: no state dict in {str(path)!r}: top-level keys {sorted(map(str, obj))[:12]}; "
        f"expected tensors or one of {_CONTAINERS} holding them"
    )


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a weights file; of our Stage-1/2 files only the ``encoder.`` tensors."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                prefix = (
                    _CONFIG_CLASSES.get(metadata.get(CONFIG_CLASS_KEY, ""), (None, ""))[1]
                    if CONFIG_KEY in metadata
                    else ""
                )
                return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}, metadata
        except SafetensorError as exc:
            raise ValueError(f"load_encoder: {str(path)!r} is not a readable safetensors file ({exc})") from None
    if path.suffix in _PICKLED:
        return _torch_load(path), {}
    raise ValueError(
        f"load_encoder: {str(path)!r} is neither .safetensors nor a torch checkpoint ({', '.join(_PICKLED)})"
    )


# --------------------------------------------------------------------------- loading


def _overrides(config: EncoderConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, EncoderConfig):
        return to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(
        f"load_encoder: config must be an EncoderConfig or a mapping of its fields, got {type(config).__name__}"
    )


def _strict_load(encoder: Encoder, state: Mapping[str, torch.Tensor], what: str) -> None:
    # Strict: the encoder is built empty, so every one of its tensors must come from the file.
    # load_resized resamples the position table itself; any other shape mismatch is named here
    # rather than left to load_state_dict's message, which names no file.
    check_shapes(encoder, state, f"load_encoder: {what}", skip=("pos_embed.weight",))
    try:
        missing, unexpected = encoder.load_resized(dict(state), strict=False)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"load_encoder: {what} does not fit the encoder: {exc}") from None
    if missing or unexpected:
        raise ValueError(
            f"load_encoder: {what} does not fit the encoder: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )


def _load_ours(state, metadata, overrides, where: str) -> Encoder:
    if CONFIG_KEY in metadata:
        cls_name = metadata.get(CONFIG_CLASS_KEY, "EncoderConfig")
        if cls_name not in _CONFIG_CLASSES:
            raise ValueError(
                f"load_encoder: {where} has config class {cls_name!r}; expected one of {sorted(_CONFIG_CLASSES)}"
            )
        cls, prefix = _CONFIG_CLASSES[cls_name]
        try:
            cfg = from_dict(cls, json.loads(metadata[CONFIG_KEY]))
        except json.JSONDecodeError as exc:
            raise ValueError(f"load_encoder: {where}: its {CONFIG_KEY!r} metadata is not valid JSON ({exc})") from None
        except (TypeError, ValueError) as exc:  # ConfigError is a ValueError
            raise type(exc)(
                f"load_encoder: {where}: its {CONFIG_KEY!r} metadata is not a valid {cls_name}: {exc}"
            ) from None
        enc_cfg = cfg if cls is EncoderConfig else cfg.encoder
    else:
        if not overrides:
            raise ValueError(
                f"load_encoder: {where} carries no invnext config in its metadata; pass config=EncoderConfig(...) "
                "or save it with save_encoder / config_metadata"
            )
        prefix = "encoder." if any(k.startswith("encoder.") for k in state) else ""
        enc_cfg = EncoderConfig()
    enc_cfg = from_dict(EncoderConfig, {**to_dict(enc_cfg), **overrides})
    used = {k: v for k, v in state.items() if k.startswith(prefix)}
    check_finite(used, f"load_encoder: {where}")
    encoder = build_encoder(enc_cfg, empty=True)
    _strict_load(encoder, {k[len(prefix) :]: v for k, v in used.items()}, where)
    return encoder


def _load_release(state, overrides, where: str, verbose: bool) -> Encoder:
    conv = convert_release_state_dict(state, overrides)
    skipped = set(conv.skipped)  # parts the encoder does not use may hold anything
    check_finite({k: v for k, v in state.items() if k not in skipped}, f"load_encoder: the authors' checkpoint {where}")
    encoder = build_encoder(from_dict(EncoderConfig, conv.config), empty=True)
    _strict_load(encoder, conv.state, f"the authors' checkpoint {where}")
    if verbose:
        print(
            f"load_encoder: {len(conv.state)} tensors of the authors' encoder loaded from {where}; "
            f"skipped {len(conv.skipped)} (not encoder parts)"
        )
        groups: dict[str, int] = {}
        for key in conv.skipped:
            head = strip_wrappers(key).split(".")[0]
            groups[head] = groups.get(head, 0) + 1
        for head, count in sorted(groups.items()):
            print(f"  skipped {head}: {count} tensor(s)")
    return encoder


def load_encoder(
    source: str | os.PathLike,
    device: str | torch.device | None = None,
    *,
    config: EncoderConfig | Mapping[str, Any] | None = None,
    verbose: bool = True,
) -> Encoder:
    """A ready :class:`Encoder` (eval mode) from a preset name, our checkpoint, or the authors' release.

    Args:
        source: preset name, or path to a weights file / a folder holding one (see the module docstring).
        device: where the encoder goes (default: stays on the CPU).
        config: EncoderConfig fields (a mapping, or an EncoderConfig) overriding what the preset or
            checkpoint says; for the authors' checkpoints it supplies what their weights do not store
            (``heads``, ``pool_heads``, ``img_size`` / ``num_frames`` when not the release's).
        verbose: print what was loaded and skipped from the authors' checkpoints.
    Returns:
        :class:`Encoder` with ``preprocess(frames)`` and ``encode(video)``.
    Raises:
        ValueError: unknown preset / missing file, a file that is not a state dict, names with no
            counterpart, or weights that do not fit (missing / unexpected keys listed).
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_encoder: source must be a preset name or a path, got {type(source).__name__}")
    overrides = _overrides(config)
    path = Path(os.fspath(source))
    if path.exists():
        file = _weights_file(path)
        state, metadata = _read(file)
        where = repr(os.fspath(file))
        if CONFIG_KEY not in metadata and is_release_state_dict(state):
            encoder = _load_release(state, overrides, where, verbose)
        else:
            encoder = _load_ours(state, metadata, overrides, where)
    elif str(source) in PRESETS:
        base = get_preset(str(source)).stage2.encoder
        encoder = build_encoder(from_dict(EncoderConfig, {**to_dict(base), **overrides}))
    else:
        raise ValueError(
            f"load_encoder: {os.fspath(source)!r} is neither a preset ({', '.join(PRESETS)}) "
            "nor an existing file or folder"
        )
    encoder.eval()
    return encoder.to(device) if device is not None else encoder
