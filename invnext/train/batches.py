"""Which clips every step sees, on any number of devices, and the random seeds of every micro-batch.

A run is a stream of sample positions ``p = 0, 1, 2, ...``. Epoch ``e = p // L`` (L = clips in
the index) visits a permutation of the index drawn from ``(seed, e)``, so position ``p`` is clip
``perm_e[p % L]``. Step ``s`` consumes positions ``[s*G, (s+1)*G)`` (G = ``batch.global_size``),
cut into ``G / m`` micro-batches of ``m = batch.per_device`` clips. On ``W`` devices rank ``r``
takes micro-batches ``[r*A, (r+1)*A)`` (A = accumulation = ``G / (m*W)``), so the global batch
is the same clips in the same micro-batches for every ``W``: one process with A = 2 and two
processes with A = 1 compute the same thing.

Every random number of a micro-batch's forward pass (drop path, masks, diffusion timesteps and
noise) is drawn from ``micro_seed(seed, step, j)`` for global micro-batch ``j``, never from a
per-rank stream; with the data position given by the step alone, a resumed run and a run on
another number of devices draw exactly what the uninterrupted single-process run draws.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["StepSampler", "SyntheticClips", "make_loader", "micro_range", "micro_seed", "mix_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 chained over the parts)."""
    h = 0x5EED
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The seed of global micro-batch ``micro`` of 0-based step ``step``."""
    return mix_seed(seed, 1, step, micro)


def micro_range(rank: int, accumulation: int) -> range:
    """The global micro-batch indices rank ``rank`` computes each step."""
    return range(rank * accumulation, (rank + 1) * accumulation)


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches for steps ``start_step .. total_steps - 1``.

    A micro-batch is a list of ``(clip index, epoch)`` pairs (the epoch seeds the clip's augmentation).
    """

    def __init__(
        self,
        dataset_size: int,
        global_size: int,
        per_device: int,
        rank: int,
        accumulation: int,
        seed: int,
        start_step: int,
        total_steps: int,
    ):
        if dataset_size < 1:
            raise ValueError(f"StepSampler: the dataset is empty (dataset_size={dataset_size})")
        self.L, self.G, self.m = dataset_size, global_size, per_device
        self.rank, self.A, self.seed = rank, accumulation, seed
        self.start, self.total = start_step, total_steps
        self._epoch, self._perm = -1, None

    def _clip(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.L)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 2, epoch))
            self._perm = torch.randperm(self.L, generator=g).tolist()
            self._epoch = epoch
        return self._perm[offset], epoch

    def micro_batch(self, step: int, micro: int) -> list[tuple[int, int]]:
        base = step * self.G + micro * self.m
        return [self._clip(base + i) for i in range(self.m)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            for j in micro_range(self.rank, self.A):
                yield self.micro_batch(step, j)

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.A


class SyntheticClips(Dataset):
    """``num_clips`` random uint8 clips ``[T, size, size, 3]``, each fixed by ``(seed, index)``.

    Blocky (8x8-pixel cells) so that neighbouring patches correlate a little, as in real video.
    Items follow ``invnext.data.VideoDataset``: ``{"video", "index", "labels"}`` (no labels).
    """

    def __init__(self, num_clips: int, num_frames: int, size: int, seed: int = 0):
        self.num_clips, self.T, self.size, self.seed = num_clips, num_frames, size, seed

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"SyntheticClips: index {index} out of range [0, {self.num_clips})")
        g = torch.Generator().manual_seed(mix_seed(self.seed, 3, index))
        cells = -(-self.size // 8)
        small = torch.randint(0, 256, (self.T, cells, cells, 3), generator=g, dtype=torch.uint8)
        video = small.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, : self.size, : self.size].contiguous()
        return {"video": video, "index": index, "labels": {}}


def make_loader(
    dataset: Dataset, sampler: StepSampler, workers: int, collate: Callable, pin_memory: bool
) -> DataLoader:
    """A loader yielding this rank's micro-batches in order (workers prefetch; order is kept)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
