"""AdamW with the method's weight-decay exclusions, and the warmup + cosine learning-rate schedule.

Weight decay (0.05 by default) applies to weight matrices only. A parameter gets **no** decay when

* it has fewer than 2 dimensions: norm scales, biases, LayerScale gammas, the predictor's mask
  token ``[C]``; or
* it is a position table: a parameter of any :class:`invnext.models.layers.PositionTable`
  (``*.pos_embed.weight``, ``align_pos.weight``) or any parameter whose name contains
  ``pos_embed``; or
* it is a class / mask / probe token: a name ending in ``cls_tokens``, ``mask_token`` or ``probe``.

Frozen parameters (``requires_grad=False``: the teacher, the Stage-2 target, the Stage-2 pool
head) are not given to the optimizer at all.

Schedule (``step`` counts optimizer steps from 0)::

    lr(step) = lr * (step + 1) / warmup                                   step < warmup
    lr(step) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2            p = (step - warmup) / max(1, total - warmup)
"""
from __future__ import annotations

import math

import torch
from torch import nn

from invnext.models.layers import PositionTable
from invnext.train.config import OptimConfig

__all__ = ["build_optimizer", "lr_at", "no_decay_names", "param_groups", "set_lr"]

_TOKEN_SUFFIXES = ("cls_tokens", "mask_token", "probe")


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the trainable parameters exempt from weight decay."""
    tables = {
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, PositionTable)
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    out = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in tables or "pos_embed" in name or name.rsplit(".", 1)[-1] in _TOKEN_SUFFIXES:
            out.add(name)
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters, labelled ``group: "decay"`` and ``"no_decay"``."""
    skip = no_decay_names(model)
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if name in skip else decay).append((name, p))
    groups = []
    for label, items, wd in (("decay", decay, weight_decay), ("no_decay", plain, 0.0)):
        if items:
            groups.append({"params": [p for _, p in items], "weight_decay": wd, "group": label})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (groups from :func:`param_groups`)."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total`` (module docstring)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = value
