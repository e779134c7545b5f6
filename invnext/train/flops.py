"""Analytic FLOP count of one Stage-1 / Stage-2 training step, and model FLOPs utilisation (MFU).

The count is "model FLOPs": the matrix multiplications the model must do for one
optimizer step on one batch, read from the configs and the batch's token counts. Nothing
else is credited: norms, activations, softmax exponentials, RoPE, losses, masks, token
gathers and the optimizer are elementwise or data movement (a few percent of the time,
none of the FLOPs a matmul peak measures).

Formulas (a multiply-add is 2 FLOPs):

* Linear over ``m`` rows, ``k -> n`` features: ``2 m k n`` (biases not counted).
* Attention, per head and sample: ``4 D * pairs`` (the score matmul ``Q K^T`` and the
  mixing matmul ``P V``), where ``pairs`` counts the query-key pairs the op lets interact:
  ``L^2`` for a sample of ``L`` tokens, ``L_q * L_k`` for a pooling query, and for a window
  exactly the allowed pairs (1D window ``w``, half-width ``h = w // 2`` over ``n`` tokens:
  ``n^2 - (n - h)(n - h - 1)`` when ``h < n``; a 3D box window: the product of the 1D counts
  per axis). Summed over heads, ``H * D = width``. This is the "window fraction": skipped
  tiles and masked-out pairs earn nothing.
* Backward = 2 x forward for every trained part (gradients w.r.t. the input and the weight,
  each a matmul of the forward's size; attention: dQ, dK, dV, dP), except a trained Linear
  whose input carries no gradient (the diffusion decoder's ``input_proj`` on ``x_t`` and the
  first timestep-MLP Linear), which computes only its weight gradient: 1 x.
* Frozen parts (the Stage-1 teacher, the Stage-2 target encoder) run forward only.
* Activation checkpointing recomputes forwards; recomputation earns no credit (the count
  does not change), so checkpointing lowers MFU honestly.

Per component (the profiler regions of the models; ``R`` = packed encoder rows, ``P``
class tokens, ``N`` grid tokens per clip, ``W`` widths, ``I`` MLP hidden sizes):

* teacher (TinyTeacher layout, also the random stand-in for SigLIP2 in the benchmarks),
  ``F`` frames of ``S`` tokens: patch ``2 F S (3 p^2) C`` (the conv stem: ``2 * 9 * C_in * C_out``
  per output pixel of each 3x3 convolution); per block ``2 F S (4 C^2 + 2 C I)``
  and ``4 S^2 C`` per frame; the probe pool ``2 C^2`` (one probe) + ``2 F S 2 C^2`` (k, v) +
  ``4 F S C`` (one query per frame) + ``2 F (C^2 + 2 C I)`` (+ ``2 F C Cp`` if the pooled
  width differs).
* encoder: patch embed on all ``B N`` tokens ``2 B N patch_dim W`` (it runs before the
  gather); per block ``2 R (4 W^2 + 2 W I)`` + ``4 W sum_b L_b^2``; the attention pool (Stage 1)
  ``2 B W^2 + 2 R 2 W^2 + 4 R W + 2 B W E``.
* predictor: embed ``2 R (W_e W_p + W_p^2)`` (+ the mask token, one row); per layer on ``B N``
  rows ``2 B N (4 W_p^2 + 3 W_p I_p)`` (GeGLU: ``W_p -> 2 I_p -> W_p``) + ``4 W_p B pairs``.
* decoder (Stage 1, ``M`` hidden tokens x ``batch_mul`` rows): ``2 M (256 W + W^2)`` time MLP,
  ``2 M W_p W`` condition, ``2 M 588 W`` input, per block ``2 M 5 W^2`` (MLP + modulation),
  final ``2 M (2 W^2 + 2 W 588)``.
* loss heads: Stage 1 alignment heads on the ``B V`` visible grid tokens and the pool head on
  ``B`` rows; Stage 2 the prediction head on the hidden tokens of every view.

``mfu(flops, seconds, peak) = flops / seconds / peak`` with ``peak`` the card's *measured*
bf16 matmul FLOP/s (``benchmarks.common.measured_peaks``).

Checked in ``tests/test_bench_suite.py`` against ``torch.utils.flop_counter.FlopCounterMode``
on real tiny Stage-1 and Stage-2 steps (forward and backward): the counts agree exactly once
the encoder's attention pool is set aside (the model writes it as elementwise products and
sums, which FlopCounterMode does not count); the window pair counts are checked against the
attention op's own dense mask.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from invnext.config import DecoderConfig, EncoderConfig, PredictorConfig, Stage1Config, Stage2Config, TeacherConfig

__all__ = [
    "StepFlops",
    "attention_flops",
    "conv_stem_flops",
    "decoder_terms",
    "encoder_terms",
    "linear_flops",
    "mfu",
    "predictor_terms",
    "stage1_step_flops",
    "stage2_step_flops",
    "teacher_terms",
    "window_pairs",
    "window_pairs_1d",
]

COMPONENTS = ("teacher", "encoder", "predictor", "decoder", "loss")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, itemised.

    ``terms`` maps ``"component/term"`` (component one of ``COMPONENTS``) to
    ``(forward, backward)`` FLOPs, exact Python ints.
    """

    terms: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        return sum(f for f, _ in self.terms.values())

    @property
    def backward(self) -> int:
        return sum(b for _, b in self.terms.values())

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def by_component(self) -> dict[str, int]:
        """Forward + backward FLOPs per component, every component of ``COMPONENTS`` present."""
        out = dict.fromkeys(COMPONENTS, 0)
        for key, (f, b) in self.terms.items():
            out[key.split("/", 1)[0]] += f + b
        return out


def _check_count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"flops: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"flops: {name} must be >= {minimum}, got {value}")
    return value


def linear_flops(rows: int, k: int, n: int) -> int:
    """``2 * rows * k * n``: a Linear ``k -> n`` applied to ``rows`` rows."""
    return 2 * rows * k * n


def window_pairs_1d(n: int, half: int | None) -> int:
    """Ordered pairs ``(i, j)`` of ``range(n)`` with ``|i - j| <= half`` (``half=None``: all, ``n^2``)."""
    _check_count("n", n)
    if half is None or half >= n:
        return n * n
    _check_count("half", half)
    return n * n - (n - half) * (n - half - 1)


def window_pairs(grid: int | Sequence[int], window: None | int | Sequence[int]) -> int:
    """Query-key pairs one sample allows (no prefix tokens).

    Args:
        grid: the sample's length ``n`` (1D window) or its ``(T, H, W)`` token grid in raster order.
        window: None (global), int ``w`` (1D, ``|i - j| <= w // 2`` in raster order) or ``(wt, wh, ww)``
            (``|dt| <= wt // 2`` and ``|dh| <= wh // 2`` and ``|dw| <= ww // 2``).
    """
    if isinstance(grid, int):
        n = grid
        dims = None
    else:
        dims = tuple(grid)
        if len(dims) != 3:
            raise ValueError(f"window_pairs: grid must be an int or (T, H, W), got {grid!r}")
        n = dims[0] * dims[1] * dims[2]
    if window is None:
        return n * n
    if isinstance(window, int):
        return window_pairs_1d(n, window // 2)
    window = tuple(window)
    if dims is None or len(window) != 3:
        raise ValueError(f"window_pairs: a 3D window {window!r} needs a (T, H, W) grid, got {grid!r}")
    out = 1
    for size, w in zip(dims, window):
        out *= window_pairs_1d(size, w // 2)
    return out


def attention_flops(pairs: int, width: int) -> int:
    """Forward FLOPs of attention over ``pairs`` query-key pairs summed over heads (``H * D = width``)."""
    return 4 * pairs * width


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops / seconds / peak_flops`` (``peak_flops`` in FLOP/s)."""
    for name, value in (("flops", flops), ("seconds", seconds), ("peak_flops", peak_flops)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"mfu: {name} must be a number, got {type(value).__name__} {value!r}")
    if flops < 0:
        raise ValueError(f"mfu: flops must be >= 0, got {flops}")
    if not seconds > 0:
        raise ValueError(f"mfu: seconds must be > 0, got {seconds}")
    if not peak_flops > 0:
        raise ValueError(f"mfu: peak_flops must be > 0, got {peak_flops}")
    return flops / seconds / peak_flops


# --------------------------------------------------------------------------- components
# Each returns {term: forward FLOPs}; the step functions attach the backward multiplier.


def conv_stem_flops(width: int, patch: int, tokens: int) -> int:
    """FLOPs of TinyTeacher's convolutional stem making ``tokens`` patch tokens (``frames * g * g``).

    Each 3x3 convolution costs ``2 * 9 * C_in * C_out`` per output pixel; the stem averages
    ``p/4 x p/4`` blocks, then runs at 4x, 2x, 1x, 1x the token grid's resolution.
    """
    from invnext.models.teacher import CONV_STEM_CHANNELS

    c1, c2 = CONV_STEM_CHANNELS
    del patch  # the stem's cost per token does not depend on the patch size (it pools first)
    per_token = 16 * 3 * c1 + 4 * c1 * c2 + c2 * c2 + c2 * width
    return 2 * 9 * tokens * per_token


def teacher_terms(cfg: TeacherConfig, frames: int) -> dict[str, int]:
    """Forward FLOPs of the image teacher on ``frames`` frames (TinyTeacher layout)."""
    C, p = cfg.width, cfg.patch_size
    S = (cfg.img_size // p) ** 2
    I = round(C * cfg.mlp_ratio)
    rows = frames * S
    block = linear_flops(rows, C, 3 * C) + linear_flops(rows, C, C) + linear_flops(rows, C, I) + linear_flops(rows, I, C)
    head = (
        linear_flops(1, C, C)  # the probe's query: one row, shared by every frame
        + 2 * linear_flops(rows, C, C)
        + attention_flops(frames * S, C)  # one query per frame over its S tokens
        + linear_flops(frames, C, C)
        + linear_flops(frames, C, I)
        + linear_flops(frames, I, C)
        + (linear_flops(frames, C, cfg.pooled_dim) if cfg.pooled_dim != C else 0)
    )
    return {
        "patch_embed": conv_stem_flops(C, p, frames * S) if cfg.patch_embed == "conv" else linear_flops(rows, 3 * p * p, C),
        "blocks.linear": cfg.depth * block,
        "blocks.attention": cfg.depth * frames * attention_flops(S * S, C),
        "pool": head,
    }


def encoder_terms(cfg: EncoderConfig, lengths: Sequence[int], *, pool: bool) -> dict[str, int]:
    """Forward FLOPs of the encoder on a packed batch: ``lengths[b]`` rows per sample (class tokens included)."""
    lengths = [_check_count("lengths[i]", n) for n in lengths]
    B, W, I = len(lengths), cfg.width, cfg.mlp_hidden
    N = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
    R = sum(lengths)
    block = linear_flops(R, W, 3 * W) + linear_flops(R, W, W) + linear_flops(R, W, I) + linear_flops(R, I, W)
    terms = {
        "patch_embed": linear_flops(B * N, cfg.patch_dim, W),
        "blocks.linear": cfg.depth * block,
        "blocks.attention": cfg.depth * attention_flops(sum(n * n for n in lengths), W),
    }
    if pool:
        terms["pool.linear"] = linear_flops(B, W, W) + 2 * linear_flops(R, W, W) + linear_flops(B, W, cfg.embed_dim)
        terms["pool.attention"] = attention_flops(R, W)  # one query per sample over its rows
    return terms


def predictor_terms(cfg: PredictorConfig, in_dim: int, rows_in: int, batch_size: int, grid: Sequence[int]) -> dict[str, int]:
    """Forward FLOPs of the predictor: ``rows_in`` packed encoder rows embedded, layers on ``B * N`` grid rows."""
    Wp, I = cfg.width, cfg.mlp_hidden
    T, H, W = grid
    N = T * H * W
    rows = batch_size * N
    layer = linear_flops(rows, Wp, 3 * Wp) + linear_flops(rows, Wp, Wp) + linear_flops(rows, Wp, 2 * I) + linear_flops(rows, I, Wp)
    pairs = 0
    for i in range(cfg.depth):
        if cfg.layer_is_global(cfg.first_layer_id + i):
            pairs += N * N
        elif cfg.local_window_3d is not None:
            pairs += window_pairs((T, H, W), cfg.local_window_3d)
        else:
            pairs += window_pairs(N, cfg.local_window)
    return {
        "embed": linear_flops(rows_in + 1, in_dim, Wp) + linear_flops(rows_in + 1, Wp, Wp),  # + the mask token
        "layers.linear": cfg.depth * layer,
        "layers.attention": attention_flops(batch_size * pairs, Wp),
    }


def decoder_terms(cfg: DecoderConfig, target_dim: int, cond_dim: int, hidden_tokens: int) -> dict[str, int]:
    """Forward FLOPs of the diffusion decoder's training pass on ``hidden_tokens`` (x ``batch_mul``) rows."""
    M, W = hidden_tokens * cfg.batch_mul, cfg.width
    return {
        # No input gradient: x_t and the timestep embedding are data (backward 1x, see the step functions).
        "input_proj": linear_flops(M, target_dim, W),
        "time_embed.0": linear_flops(M, cfg.time_embed_dim, W),
        "time_embed.2": linear_flops(M, W, W),
        "cond_embed": linear_flops(M, cond_dim, W),
        "blocks": cfg.depth * (2 * linear_flops(M, W, W) + linear_flops(M, W, 3 * W)),
        "final": linear_flops(M, W, 2 * W) + linear_flops(M, W, 2 * target_dim),
    }


def _mlp_head(rows: int, in_dim: int, hidden: int, out_dim: int) -> int:
    return linear_flops(rows, in_dim, hidden) + linear_flops(rows, hidden, out_dim)


_WEIGHT_GRAD_ONLY = ("decoder/input_proj", "decoder/time_embed.0")


def _assemble(trained: dict[str, dict[str, int]], frozen: dict[str, dict[str, int]]) -> StepFlops:
    terms: dict[str, tuple[int, int]] = {}
    for comp, parts in frozen.items():
        for name, f in parts.items():
            terms[f"{comp}/{name}"] = (f, 0)
    for comp, parts in trained.items():
        for name, f in parts.items():
            key = f"{comp}/{name}"
            terms[key] = (f, f if key in _WEIGHT_GRAD_ONLY else 2 * f)
    return StepFlops(terms)


def _prefixed(prefix: str, parts: dict[str, int]) -> dict[str, int]:
    return {f"{prefix}{k}": v for k, v in parts.items()}


def stage1_step_flops(cfg: Stage1Config, batch_size: int) -> StepFlops:
    """FLOPs of one Stage-1 step on ``batch_size`` clips (the semantic mask keeps a fixed count per frame)."""
    from invnext.models.stage1 import kept_per_frame  # models import torch; keep this module light

    B = _check_count("batch_size", batch_size, 1)
    enc, tcfg = cfg.encoder, cfg.teacher
    T, H, W = enc.grid
    N, S = T * H * W, H * W
    V = T * kept_per_frame(cfg.mask_ratio, S)  # visible grid tokens per clip
    P = enc.num_class_tokens
    K = len(tcfg.layers)
    Ct, Cp = tcfg.width, tcfg.pooled_dim
    lengths = [P + V] * B
    trained = {
        "encoder": encoder_terms(enc, lengths, pool=True),
        "predictor": predictor_terms(cfg.predictor, enc.width, sum(lengths), B, enc.grid),
        "decoder": decoder_terms(cfg.decoder, enc.patch_dim, cfg.predictor.width, B * (N - V)),
        "loss": {
            "align_heads": K * _mlp_head(B * V, enc.width, Ct, Ct * cfg.frames_per_alignment),
            "pool_head": _mlp_head(B, enc.embed_dim, Cp, Cp),
        },
    }
    frozen = {"teacher": teacher_terms(tcfg, B * enc.num_frames)}
    return _assemble(trained, frozen)


def stage2_step_flops(cfg: Stage2Config, hidden_counts: Sequence[Iterable[int]]) -> StepFlops:
    """FLOPs of one Stage-2 step.

    Args:
        cfg: the Stage-2 config.
        hidden_counts: per view (one entry per ``cfg.views``), the hidden token count of every
            sample (``hidden.sum(1)`` of that view's mask); the batch size is their length.
    """
    views = [[_check_count("hidden_counts[v][b]", int(c)) for c in view] for view in hidden_counts]
    if len(views) != len(cfg.views):
        raise ValueError(f"stage2_step_flops: hidden_counts must hold {len(cfg.views)} views, got {len(views)}")
    B = len(views[0])
    if B < 1 or any(len(v) != B for v in views):
        raise ValueError(f"stage2_step_flops: every view needs the same batch size >= 1, got {[len(v) for v in views]}")
    enc, pred = cfg.encoder, cfg.predictor
    N = enc.grid[0] * enc.grid[1] * enc.grid[2]
    P = enc.num_class_tokens
    if any(c > N for v in views for c in v):
        raise ValueError(f"stage2_step_flops: a hidden count exceeds the {N} grid tokens")
    trained: dict[str, dict[str, int]] = {"encoder": {}, "predictor": {}, "loss": {}}
    for i, counts in enumerate(views):
        lengths = [P + N - c for c in counts]
        trained["encoder"].update(_prefixed(f"view{i}.", encoder_terms(enc, lengths, pool=False)))
        trained["predictor"].update(_prefixed(f"view{i}.", predictor_terms(pred, enc.width, sum(lengths), B, enc.grid)))
        trained["loss"][f"view{i}.head"] = _mlp_head(sum(counts), pred.width, pred.width, enc.width)
    frozen = {"teacher": _prefixed("target.", encoder_terms(enc, [P + N] * B, pool=False))}
    return _assemble(trained, frozen)
