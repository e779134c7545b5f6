"""Text initialisation of the predictor: the last K layers of a local ModernBERT checkpoint.

The predictor's layers use ModernBERT's own parameter names, so layer ``L - K + i`` of a
ModernBERT with ``L`` layers maps onto predictor layer ``i`` name for name:

    [model.]layers.{L-K+i}.attn_norm.weight   -> layers.{i}.attn_norm.weight   (absent for layer 0: Identity)
    [model.]layers.{L-K+i}.attn.Wqkv.weight   -> layers.{i}.attn.Wqkv.weight   [3C, C]
    [model.]layers.{L-K+i}.attn.Wo.weight     -> layers.{i}.attn.Wo.weight     [C, C]
    [model.]layers.{L-K+i}.mlp_norm.weight    -> layers.{i}.mlp_norm.weight    [C]
    [model.]layers.{L-K+i}.mlp.Wi.weight      -> layers.{i}.mlp.Wi.weight      [2I, C]
    [model.]layers.{L-K+i}.mlp.Wo.weight      -> layers.{i}.mlp.Wo.weight      [C, I]
    [model.]final_norm.weight                 -> final_norm.weight             (when the predictor has one)

(``model.`` is the prefix of a ``ModernBertForMaskedLM`` save; a ``ModernBertModel`` save has
none.) The embeddings and the masked-LM head are not used.

The checkpoint is read with safetensors (never unpickled) and its ``config.json`` as plain JSON,
so transformers is not needed here and no private transformers API is involved. Both config
spellings are understood: transformers 4.x (``global_attn_every_n_layers``, ``global_rope_theta``,
``local_rope_theta``) and 5.x (``layer_types``, ``rope_parameters``). What must agree, else a
``ValueError`` names the setting: width, heads, MLP width, norm eps, exact GELU, no biases,
default (unscaled) RoPE, the theta and the window of every kind of layer that is loaded
(ModernBERT's window ``local_attention`` sees ``|i - j| <= local_attention // 2``, the
predictor's ``local_window`` the same; a ``local_window_3d`` box is our extension and is not
compared), and the global/local pattern: ``first_layer_id`` must be
``L - K``, and each loaded layer must be global exactly where ModernBERT's is
(``layer_id % global_every == 0`` on our side).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["load_modernbert_layers", "read_modernbert_checkpoint"]

_LAYER_KEY = re.compile(r"^(?P<prefix>(?:[A-Za-z_][\w]*\.)*?)layers\.(?P<idx>\d+)\.(?P<rest>.+)$")
_LAYER_PARAMS = (
    "attn_norm.weight",
    "attn.Wqkv.weight",
    "attn.Wo.weight",
    "mlp_norm.weight",
    "mlp.Wi.weight",
    "mlp.Wo.weight",
)


def _safetensors_files(path: Path) -> tuple[list[Path], Path | None]:
    """The weight files of ``path`` (a folder or one ``.safetensors`` file) and its config.json, if any."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / s for s in shards]
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            found = sorted(path.glob("*.safetensors"))
            if not found:
                pickled = sorted(p.name for p in path.glob("*.bin"))
                hint = (
                    f" (found {pickled}: pickled weights are not loaded; "
                    "re-save with save_pretrained(safe_serialization=True))"
                    if pickled
                    else ""
                )
                raise ValueError(f"init_from: no .safetensors weights in the folder {str(path)!r}{hint}")
            files = found
        config = path / "config.json"
        return files, config if config.is_file() else None
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"init_from: {str(path)!r} is not a .safetensors file (pickled weights are not loaded)")
        config = path.parent / "config.json"
        return [path], config if config.is_file() else None
    raise ValueError(f"init_from: no such file or folder: {str(path)!r}")


def read_modernbert_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """``(layer and final-norm tensors, config dict or None, key prefix)`` of a local ModernBERT.

    Keys come back without the prefix (``"model."`` for a masked-LM save, else ``""``), as
    ``layers.{j}.<param>`` and ``final_norm.weight``; only those tensors are read.
    """
    from safetensors import safe_open

    files, config_path = _safetensors_files(Path(os.fspath(path)))
    file_of: dict[str, Path] = {}
    for file in files:
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            file_of.update(dict.fromkeys(f.keys(), file))
    layer_keys = {key: m for key in file_of if (m := _LAYER_KEY.match(key)) is not None}
    prefixes = {m["prefix"] for m in layer_keys.values()}
    if not layer_keys:
        raise ValueError(f"init_from: {os.fspath(path)!r} holds no ModernBERT layers (no 'layers.<i>.' keys)")
    if len(prefixes) > 1:
        raise ValueError(f"init_from: {os.fspath(path)!r} holds layers under several prefixes {sorted(prefixes)}")
    wanted = {key: f"layers.{m['idx']}.{m['rest']}" for key, m in layer_keys.items()}
    prefix = prefixes.pop()
    norm_key = f"{prefix}final_norm.weight"
    if norm_key in file_of:
        wanted[norm_key] = "final_norm.weight"
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            tensors.update((wanted[key], f.get_tensor(key)) for key in wanted if file_of[key] == file)
    config = json.loads(config_path.read_text()) if config_path is not None else None
    return tensors, config, prefix


# --------------------------------------------------------------------------- config checks


def _layer_is_global(config: dict, layer: int) -> bool:
    types = config.get("layer_types")
    if types is not None:
        return types[layer] == "full_attention"
    return layer % int(config.get("global_attn_every_n_layers", 3)) == 0


def _rope(config: dict, is_global: bool) -> tuple[float, str]:
    """(theta, rope type) of global or local layers in either config spelling."""
    params = config.get("rope_parameters")
    kind = "full_attention" if is_global else "sliding_attention"
    if isinstance(params, dict) and isinstance(params.get(kind), dict):
        p = params[kind]
        default = 160000.0 if is_global else 10000.0
        return float(p.get("rope_theta", default)), str(p.get("rope_type", "default"))
    legacy = "global_rope_theta" if is_global else "local_rope_theta"
    scaling = config.get("rope_scaling")
    return float(config.get(legacy, 160000.0 if is_global else 10000.0)), "default" if not scaling else str(scaling)


def _check_config(pcfg, config: dict, num_layers: int, where: str) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"init_from {where}: {msg}")

    width, heads, inner = pcfg.width, pcfg.heads, pcfg.mlp_hidden
    for theirs, ours, value in (
        ("hidden_size", "width", width),
        ("num_attention_heads", "heads", heads),
        ("intermediate_size", "mlp_hidden", inner),
    ):
        need(config.get(theirs) == value, f"ModernBERT {theirs}={config.get(theirs)} but predictor.{ours}={value}")
    eps = float(config.get("norm_eps", 1e-5))
    need(abs(eps - pcfg.norm_eps) <= 1e-12, f"ModernBERT norm_eps={eps} but predictor.norm_eps={pcfg.norm_eps}")
    need(
        config.get("hidden_activation", "gelu") == "gelu",
        f"ModernBERT hidden_activation={config.get('hidden_activation')!r}; the predictor's MLP uses exact GELU",
    )
    for flag in ("norm_bias", "attention_bias", "mlp_bias"):
        need(not config.get(flag, False), f"ModernBERT {flag}=True; the predictor's layers have no biases")
    need(
        config.get("num_hidden_layers", num_layers) == num_layers,
        f"config num_hidden_layers={config.get('num_hidden_layers')} but the weights hold {num_layers} layers",
    )
    first = num_layers - pcfg.depth
    need(
        pcfg.first_layer_id == first,
        f"loading the last {pcfg.depth} of {num_layers} layers (ModernBERT layers {first}..{num_layers - 1}) needs "
        f"predictor.first_layer_id={first} (it fixes which layers are global and whether layer 0's attn_norm "
        "is Identity), "
        f"got {pcfg.first_layer_id}",
    )
    kinds = set()
    for i in range(pcfg.depth):
        j = first + i
        theirs = _layer_is_global(config, j)
        ours = pcfg.layer_is_global(j)
        need(
            theirs == ours,
            f"ModernBERT layer {j} is {'global' if theirs else 'local'} but predictor layer {i} (layer_id {j}, "
            f"global_every={pcfg.global_every}) is {'global' if ours else 'local'}",
        )
        kinds.add(ours)
    for is_global in sorted(kinds):
        theta, rope_type = _rope(config, is_global)
        need(
            rope_type == "default",
            f"ModernBERT uses RoPE type {rope_type!r} on {'global' if is_global else 'local'} layers; "
            "only plain RoPE maps",
        )
        ours = pcfg.global_rope_theta if is_global else pcfg.local_rope_theta
        name = "global_rope_theta" if is_global else "local_rope_theta"
        need(
            theta == ours,
            f"ModernBERT {'global' if is_global else 'local'} RoPE theta={theta} but predictor.{name}={ours}",
        )
    if False in kinds and pcfg.local_window_3d is None:
        window = int(config.get("local_attention", 128))
        need(
            window == pcfg.local_window,
            f"ModernBERT local_attention={window} but predictor.local_window={pcfg.local_window}",
        )


# --------------------------------------------------------------------------- loading


def load_modernbert_layers(predictor: nn.Module, source: str | os.PathLike, *, verbose: bool = True) -> dict[str, str]:
    """Copy the last ``K = predictor.cfg.depth`` layers of a local ModernBERT into ``predictor``.

    Args:
        predictor: an :class:`invnext.models.Predictor`.
        source: a ``save_pretrained`` folder (``config.json`` + ``model.safetensors`` or shards) of a
            ``ModernBertModel`` or ``ModernBertForMaskedLM``, or one ``.safetensors`` file (its
            folder's ``config.json`` is used when present; without one only shapes are checked).
        verbose: print the mapping (checkpoint key -> predictor key) of everything loaded.
    Returns:
        ``{checkpoint key without its "model." prefix, if any: predictor key}`` for every tensor copied.
    Raises:
        ValueError: the checkpoint is missing, not safetensors, or does not fit the predictor
            (the message names the setting).
    """
    pcfg = predictor.cfg
    where = repr(os.fspath(source))
    tensors, config, prefix = read_modernbert_checkpoint(source)
    num_layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("layers."))
    if num_layers < pcfg.depth:
        raise ValueError(f"init_from {where}: ModernBERT has {num_layers} layers, the predictor needs {pcfg.depth}")
    if config is not None:
        _check_config(pcfg, config, num_layers, where)
    elif pcfg.first_layer_id != num_layers - pcfg.depth:
        raise ValueError(
            f"init_from {where}: loading the last {pcfg.depth} of {num_layers} layers needs "
            f"predictor.first_layer_id={num_layers - pcfg.depth}, got {pcfg.first_layer_id}"
        )

    ours = predictor.state_dict()
    first = num_layers - pcfg.depth
    foreign = sorted(k for k in tensors if k.startswith("layers.") and k.split(".", 2)[2] not in _LAYER_PARAMS)
    if foreign:
        raise ValueError(
            f"init_from {where}: ModernBERT tensors with no place in the predictor's layers: {foreign[:8]}"
        )
    mapping: dict[str, str] = {}
    for i in range(pcfg.depth):
        for param in _LAYER_PARAMS:
            src, dst = f"layers.{first + i}.{param}", f"layers.{i}.{param}"
            if (src in tensors) != (dst in ours):
                raise ValueError(
                    f"init_from {where}: {'only the checkpoint' if src in tensors else 'only the predictor'} has "
                    f"{param} for ModernBERT layer {first + i} (predictor layer {i})"
                )
            if src in tensors:
                mapping[src] = dst
    if "final_norm.weight" in tensors and "final_norm.weight" in ours:
        mapping["final_norm.weight"] = "final_norm.weight"
    for src, dst in mapping.items():
        if tuple(tensors[src].shape) != tuple(ours[dst].shape):
            raise ValueError(
                f"init_from {where}: {src} has shape {list(tensors[src].shape)}, "
                f"predictor {dst} needs {list(ours[dst].shape)}"
            )
    with torch.no_grad():
        for src, dst in mapping.items():
            ours[dst].copy_(tensors[src])

    if verbose:
        note = "" if config is not None else " (no config.json: shapes checked, attention settings not verifiable)"
        print(
            f"Predictor: loaded ModernBERT layers {first}..{num_layers - 1} of {num_layers} from {os.fspath(source)}"
            f" into predictor layers 0..{pcfg.depth - 1}{note}:"
        )
        width = max(len(prefix + s) for s in mapping)
        for src, dst in mapping.items():
            print(f"  {prefix + src:<{width}} -> {dst}")
        if "final_norm.weight" in tensors and "final_norm.weight" not in mapping:
            print("  (final_norm.weight not loaded: predictor.final_norm is off)")
    return mapping
