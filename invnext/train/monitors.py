"""Collapse monitors: is the encoder still spreading its features out?

For a feature matrix ``Z[R, C]`` (R rows: tokens or clips), each row L2-normalised to ``z_r``:

    std   = mean_c std_r(z_rc)                       (population std over rows, averaged over channels)
    erank = exp(-sum_k p_k log p_k),  p_k = s_k / sum_j s_j     (s = singular values of the normalised Z)

Isotropic unit vectors give ``std ~ 1/sqrt(C)``; a collapsed encoder (every row the same
direction) gives std -> 0 and erank -> 1. The effective rank is RankMe's (Garrido et al. 2023)
and lies in [1, min(R, C)].

Features are taken from the training pass itself, at no extra cost: a forward hook on the
student encoder's last block keeps its packed output ``[total, C]`` (visible tokens and class
tokens of every sample) on the steps that log. ``token_*`` use every row; ``clip_*`` use one row
per clip (the mean of that clip's rows), i.e. spread across the batch.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CollapseMonitor", "collapse_stats", "warn_collapse"]


def collapse_stats(z: torch.Tensor) -> tuple[float, float]:
    """``(std, erank)`` of the rows of ``z[R, C]`` after L2 normalisation (module docstring); computed in float64.

    Non-finite features give ``(nan, nan)``: a diverging step must reach the trainer's finite
    check (which skips it and counts towards ``max_skipped_steps``) instead of failing in the SVD.
    """
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"collapse_stats: z must be a non-empty [R, C] matrix, got {list(z.shape)}")
    zn = F.normalize(z.detach().to(torch.float64), dim=-1)
    if not bool(torch.isfinite(zn).all()):
        return math.nan, math.nan
    std = zn.std(dim=0, unbiased=False).mean().item()
    s = torch.linalg.svdvals(zn)
    p = s / s.sum().clamp_min(1e-300)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum().item()
    return std, math.exp(entropy)


class CollapseMonitor:
    """Captures the student encoder's last-block output once when armed, and turns it into stats.

    Args:
        encoder: the student :class:`~invnext.models.Encoder` (unwrapped).
        min_std, min_erank_frac: warning thresholds (``MonitorConfig``).
    """

    def __init__(self, encoder: nn.Module, min_std: float, min_erank_frac: float):
        self.num_prefix = encoder.num_prefix
        self.N = math.prod(encoder.cfg.grid)
        self.min_std, self.min_erank_frac = min_std, min_erank_frac
        self._armed = False
        self._captured: torch.Tensor | None = None
        self._handle = encoder.blocks[-1].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self._armed:
            self._captured = output.detach()
            self._armed = False  # the first call of the pass (Stage 2: view 0)

    def arm(self) -> None:
        self._armed, self._captured = True, None

    def close(self) -> None:
        self._handle.remove()

    def compute(self, hidden: torch.Tensor | None) -> tuple[dict[str, float], list[str]]:
        """``(stats, warnings)`` of the captured rows (both empty if nothing was captured).

        ``hidden bool[B, N]`` (the mask of the captured encoder call) groups the rows into clips.
        """
        rows, self._captured, self._armed = self._captured, None, False
        if rows is None:
            return {}, []
        rows = rows.float()
        groups = {"token": rows}
        if hidden is not None:
            B, N = hidden.shape
            sizes = (self.num_prefix + (N - hidden.sum(1))).to(rows.device)
            if int(sizes.sum()) == rows.shape[0]:
                seg = torch.repeat_interleave(torch.arange(B, device=rows.device), sizes)
                groups["clip"] = rows.new_zeros(B, rows.shape[1]).index_add(0, seg, rows) / sizes.to(rows)[:, None]
        stats, msgs = {}, []
        for kind, z in groups.items():
            std, erank = collapse_stats(z)
            stats[f"{kind}_std"], stats[f"{kind}_erank"] = std, erank
            if not (math.isfinite(std) and math.isfinite(erank)):
                continue  # non-finite features: the step's finite check reports it, not a collapse warning
            R, C = z.shape
            std_floor = self.min_std / math.sqrt(C)
            rank_floor = self.min_erank_frac * min(R, C)
            if std < std_floor:
                msgs.append(f"{kind} feature std {std:.4g} < {std_floor:.4g} (monitor.min_std / sqrt({C})): the encoder may be collapsing")
            if erank < rank_floor:
                msgs.append(
                    f"{kind} feature effective rank {erank:.3g} < {rank_floor:.3g} "
                    f"(monitor.min_erank_frac x min({R}, {C})): the encoder may be collapsing"
                )
        return stats, msgs


def warn_collapse(messages: list[str]) -> None:
    for m in messages:
        warnings.warn(m, RuntimeWarning, stacklevel=2)
