"""Video data: index files, decoding, sparse sampling, transforms and the bundled default dataset.

* :mod:`invnext.data.video`: decoders (PyAV; torchcodec / decord when installed), sparse
  sampling, crops and resizes on uint8 clips, on-device normalisation.
* :mod:`invnext.data.dataset`: CSV / JSONL / folder indexes, ``VideoDataset``, ``collate_videos``,
  ``VideoLoader`` and the bad-file accounting (``BadFileLog``).
* :mod:`invnext.data.bundled`: the default dataset (moving sklearn digits), generated on first use
  (its teacher, a model, is trained by :mod:`invnext.teacher_pretrain`).
* :mod:`invnext.data.check`: ``invnext data check INDEX``.

Names are imported on first use, so ``import invnext.data`` stays cheap.
"""

from __future__ import annotations

from invnext.common.lazy import lazy_exports

_EXPORTS = {
    "video": (
        "DECODERS", "DecodeError", "sample_indices", "train_transform", "eval_transform", "crop_resize",
        "random_resized_crop_box", "to_model_input", "make_reader", "read_clip", "write_video",
    ),
    "dataset": (
        "VideoEntry", "VideoIndex", "IndexFileError", "read_index", "VideoDataset", "BadSample", "BadFileLog",
        "collate_videos", "EpochSampler", "VideoLoader",
    ),
    "bundled": ("DefaultData", "ensure_default_clips", "default_cache_root"),
    "check": ("run_data_check", "check_index"),
}  # fmt: skip
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
